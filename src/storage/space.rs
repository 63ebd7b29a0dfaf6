//! Free-space checks: how much room an operation needs, and whether the file system
//! holding its files has it. Checked before a disk is created and before a live
//! snapshot saves the guest's RAM, so a full disk is reported up front instead of
//! surfacing as a half-written image.

use std::os::fd::AsFd;
use std::path::Path;

use super::error::StorageError;
use crate::config::{StorageKind, format_size};

/// A new qcow2 image starts as its header and first tables (a few hundred KiB); this
/// leaves room for them and for the first writes.
pub const QCOW2_NEW_IMAGE: u64 = 16 << 20;
/// A live snapshot writes the guest's RAM (at most its size, zero pages compress away)
/// plus device state and qcow2 metadata; this covers the latter two.
pub const LIVE_SAVE_MARGIN: u64 = 64 << 20;

/// Bytes a new image needs: a raw image may be filled to its virtual size (it is
/// sparse, but the guest will believe it can write all of it); a qcow2 grows on demand.
pub fn for_new_image(kind: StorageKind, virtual_size: u64) -> u64 {
    match kind {
        StorageKind::Raw => virtual_size,
        StorageKind::Qcow2 | StorageKind::Virtfs => QCOW2_NEW_IMAGE,
    }
}

/// Bytes a live snapshot of a guest with `ram` bytes of memory may write.
pub fn for_live_save(ram: u64) -> u64 {
    ram.saturating_add(LIVE_SAVE_MARGIN)
}

/// Bytes an unprivileged user may still write on the file system holding `fd`.
pub fn available(fd: impl AsFd) -> std::io::Result<u64> {
    let st = rustix::fs::fstatvfs(fd)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// `Storage` error unless `available` covers `required`.
pub fn ensure(available: u64, required: u64, what: &str, dir: &Path) -> Result<(), StorageError> {
    if available >= required {
        return Ok(());
    }
    Err(StorageError::NoSpace(format!(
        "the disk is full: not enough free space in {} for {what}: it needs {} and {} are free; free some space or choose another location",
        dir.display(),
        format_size(required),
        format_size(available)
    )))
}

/// A failed write of `what`: ENOSPC (or EDQUOT) becomes [`StorageError::NoSpace`].
pub fn write_error(what: &str, e: std::io::Error) -> StorageError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageError::NoSpace(format!(
            "the disk is full: no space left to write {what}; free some space there and try again"
        )),
        _ => StorageError::Io {
            message: format!("cannot write {what}: {e}"),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_needs_its_size_qcow2_a_margin() {
        assert_eq!(for_new_image(StorageKind::Raw, 10 << 30), 10 << 30);
        assert_eq!(for_new_image(StorageKind::Qcow2, 10 << 30), QCOW2_NEW_IMAGE);
        assert_eq!(for_live_save(1 << 30), (1 << 30) + LIVE_SAVE_MARGIN);
        assert_eq!(for_live_save(u64::MAX), u64::MAX);
    }

    #[test]
    fn shortfall_names_both_numbers() {
        let dir = Path::new("/vms");
        assert!(ensure(100, 100, "x", dir).is_ok());
        let err = ensure(1 << 20, 2 << 30, "disk 'root'", dir).unwrap_err();
        let m = err.to_string();
        assert!(
            m.contains("/vms") && m.contains("2.0 GiB") && m.contains("1.0 MiB"),
            "{m}"
        );
        assert_eq!(err.kind().as_str(), "Storage");
        assert!(matches!(err, StorageError::NoSpace(_)), "{err:?}");
        let full = write_error("x.qcow2", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(full.to_string().starts_with("the disk is full"), "{full}");
        let other = write_error("x.qcow2", std::io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(other, StorageError::Io { .. }), "{other:?}");
    }

    #[test]
    fn free_space_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let fd = std::fs::File::open(dir.path()).unwrap();
        assert!(available(&fd).unwrap() > 0);
    }
}
