//! `org.maqet.Maqet1.Storage`: one per VM; what `maqet storage ls|verify` show. Reads
//! only ([`crate::storage::inventory`] does the work).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use zbus::message::Header;
use zbus::{Connection, OwnedVariant, interface};

use super::Shared;
use super::options::{bool_option, check_keys, size_option, str_option};
use crate::access::{Action, Request};
use crate::client::{StorageRow, VerifyRow};
use crate::config::StorageKind;
use crate::error::MaqetError;
use crate::storage::{QemuImg, StorageError, inventory};
use crate::vm::{AttachSpec, DiskSource, Vm, store_error};

/// The keys `Resize` and `Attach` understand in `options`.
const RESIZE_OPTIONS: &[&str] = &["shrink"];
const ATTACH_OPTIONS: &[&str] = &["name", "size", "format", "interface", "readonly"];

/// `Attach`'s arguments as the core takes them.
fn attach_spec(
    source: &str,
    options: &HashMap<String, OwnedVariant>,
) -> Result<AttachSpec, MaqetError> {
    check_keys(options, ATTACH_OPTIONS, "Attach")?;
    let size = size_option(options)?;
    let source = match (source, size) {
        ("", Some(bytes)) => DiskSource::New(bytes),
        ("", None) => {
            return Err(MaqetError::InvalidArgument(
                "Attach needs the path of an existing image, or an empty path and option 'size' for a new disk".into(),
            ));
        }
        (path, None) if path.starts_with('/') && !path.contains('\0') => {
            DiskSource::File(PathBuf::from(path))
        }
        (path, None) => {
            return Err(MaqetError::InvalidArgument(format!(
                "'{}' is not an absolute path; pass the image's absolute path",
                path.escape_debug()
            )));
        }
        (_, Some(_)) => {
            return Err(MaqetError::InvalidArgument(
                "option 'size' is for a new disk (empty path); an existing image keeps its size (resize it after attaching)".into(),
            ));
        }
    };
    let format = match str_option(options, "format")?.as_deref() {
        None => None,
        Some("qcow2") => Some(StorageKind::Qcow2),
        Some("raw") => Some(StorageKind::Raw),
        Some(other) => {
            return Err(MaqetError::InvalidArgument(format!(
                "format '{}' cannot be attached; use qcow2 or raw",
                other.escape_debug()
            )));
        }
    };
    Ok(AttachSpec {
        source,
        name: str_option(options, "name")?,
        format,
        interface: str_option(options, "interface")?.unwrap_or_else(|| "scsi".into()),
        readonly: bool_option(options, "readonly")?,
    })
}

pub struct StorageIface {
    shared: Arc<Shared>,
    vm: Arc<Vm>,
}

impl StorageIface {
    pub fn new(shared: Arc<Shared>, vm: Arc<Vm>) -> StorageIface {
        StorageIface { shared, vm }
    }

    fn qemu_img(&self) -> Result<QemuImg, StorageError> {
        QemuImg::find(self.shared.manager.ctx().path_env.as_deref())
    }
}

#[interface(name = "org.maqet.Maqet1.Storage")]
impl StorageIface {
    /// Every storage entry: (name, format, path, exists, virtual size, actual size,
    /// created by maqet). Sizes in bytes; a disk not created yet shows the size it
    /// will be created with.
    #[zbus(out_args("entries"))]
    async fn list(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<StorageRow>, MaqetError> {
        let req = Request::new(Action::Observe, "Storage.List").on_vm(&self.vm);
        let work = async {
            let config = self.vm.stored_config()?;
            let id = self.vm.id().to_string();
            let created: HashSet<_> = self
                .shared
                .manager
                .ctx()
                .store
                .read(move |db| db.created_files(&id))
                .await
                .map_err(store_error)?
                .into_iter()
                .map(|f| f.path)
                .collect();
            let img = self.qemu_img().ok();
            Ok(inventory::list(img.as_ref(), config.storage(), &created)
                .await
                .into_iter()
                .map(|r| {
                    (
                        r.name,
                        r.format,
                        r.path.to_string_lossy().into_owned(),
                        r.exists,
                        r.virtual_size,
                        r.actual_size,
                        r.created_by_maqet,
                    )
                })
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Changes disk `disk`'s virtual size to `bytes` (whole 512-byte sectors): with
    /// `qemu-img resize` while the VM is stopped, with QMP `block_resize` while it
    /// runs; the stored config records the new size. A smaller size is refused unless
    /// `options` has `shrink` (b) true. Read-only disks, and raw files maqet did not
    /// create, are refused.
    async fn resize(
        &self,
        disk: &str,
        bytes: u64,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = Request::new(Action::Manage, "Storage.Resize")
            .on_vm(&self.vm)
            .with_args(format!("disk={disk:?} bytes={bytes}"));
        let work = async {
            check_keys(&options, RESIZE_OPTIONS, "Resize")?;
            let shrink = bool_option(&options, "shrink")?;
            Ok(self.vm.resize_disk(disk, bytes, shrink).await?)
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Adds a disk and returns its storage name. `source`: the absolute path of an
    /// existing qcow2 or raw image (checked like a config's `file`), or empty for a new
    /// image maqet creates in the VM's data directory (option `size` required).
    /// `options`: `name` (s, default the first free diskN), `size` (t bytes or s like
    /// "10G"), `format` (s: qcow2 or raw; an existing raw image must say raw),
    /// `interface` (s: scsi, the default, or virtio), `readonly` (b). On a running VM
    /// the disk is hot-plugged; the stored config keeps it for the next start.
    #[zbus(out_args("name"))]
    async fn attach(
        &self,
        source: &str,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, MaqetError> {
        let req = Request::new(Action::Manage, "Storage.Attach")
            .on_vm(&self.vm)
            .with_args(format!("source={source:?}"));
        let work = async {
            let spec = attach_spec(source, &options)?;
            Ok(self.vm.attach_disk(spec).await?)
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Removes disk `disk`: hot-unplugged from a running VM (waiting for QEMU's
    /// DEVICE_DELETED), and from the stored config. The image file is kept.
    async fn detach(
        &self,
        disk: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = Request::new(Action::Manage, "Storage.Detach")
            .on_vm(&self.vm)
            .with_args(format!("disk={disk:?}"));
        let work = async { Ok(self.vm.detach_disk(disk).await?) };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Checks every entry: (name, ok, message). qcow2: `qemu-img check`; raw images
    /// and shares: present and readable.
    #[zbus(out_args("results"))]
    async fn verify(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<VerifyRow>, MaqetError> {
        let req = Request::new(Action::Observe, "Storage.Verify").on_vm(&self.vm);
        let work = async {
            let config = self.vm.stored_config()?;
            let in_use = self.vm.status().has_process();
            Ok(inventory::verify(self.qemu_img(), config.storage(), in_use)
                .await
                .into_iter()
                .map(|r| (r.name, r.ok, r.message))
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }
}
