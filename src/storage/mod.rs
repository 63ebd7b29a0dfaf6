//! Host storage: which locations a VM may use (`danger`), opening host paths without
//! following symlinks (`nofollow`), the files QEMU gets as fds (`hostfiles`), race-free
//! creation of missing disk images (`create`), UEFI firmware and its per-VM variable store
//! (`firmware`), cloud-init NoCloud seeds (`seed`), running `qemu-img` (`qemu_img`), free-space checks
//! (`space`), and what `maqet storage ls|verify` report about a VM's disks
//! (`inventory`). docs/storage.md is the user-facing description.

pub mod create;
pub mod danger;
pub mod error;
pub mod firmware;
pub mod hostfiles;
pub mod inventory;
pub mod nofollow;
pub mod orphans;
pub mod qemu_img;
pub mod seed;
pub mod space;

pub use error::StorageError;
pub use qemu_img::QemuImg;
