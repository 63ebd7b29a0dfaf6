//! What `maqet storage ls` and `maqet storage verify` report about a VM's storage
//! entries: plain data in, one row per entry out. Nothing here changes a file.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::qemu_img::QemuImg;
use crate::config::{StorageEntry, StorageKind, format_size};

/// One row of `Storage.List`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryReport {
    pub name: String,
    /// `qcow2`, `raw` or `virtfs`.
    pub format: String,
    pub path: PathBuf,
    pub exists: bool,
    /// Bytes the guest sees (0 for shares, or when unknown).
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: u64,
    /// In maqet's record of files it created (the ones `delete_storage` removes).
    pub created_by_maqet: bool,
}

/// One row of `Storage.Verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub name: String,
    pub ok: bool,
    pub message: String,
}

/// Describes every entry. A qcow2's virtual size comes from `qemu-img info`; when that
/// fails (no qemu-img, unreadable image) the row says 0 and `verify` tells why.
pub async fn list(
    qemu_img: Option<&QemuImg>,
    entries: &[StorageEntry],
    created: &HashSet<PathBuf>,
) -> Vec<EntryReport> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let meta = std::fs::metadata(&e.path).ok();
        let exists = meta.as_ref().is_some_and(|m| {
            if e.kind.is_disk() {
                m.is_file()
            } else {
                m.is_dir()
            }
        });
        let (mut virtual_size, mut actual_size) = (0, 0);
        if let (true, Some(m)) = (e.kind.is_disk() && exists, &meta) {
            actual_size = m.blocks() * 512;
            virtual_size = match (e.kind, qemu_img) {
                (StorageKind::Raw, _) => m.len(),
                (_, Some(img)) => match img.info(e.kind.as_str(), &e.path).await {
                    Ok(info) => info.virtual_size,
                    Err(err) => {
                        tracing::warn!(path = %e.path.display(), error = %err, "cannot read image size");
                        0
                    }
                },
                (_, None) => 0,
            };
        } else if e.kind.is_disk() {
            // Not created yet: what the first start will create.
            virtual_size = e.size.unwrap_or(0);
        }
        out.push(EntryReport {
            name: e.name.clone(),
            format: e.kind.as_str().to_owned(),
            path: e.path.clone(),
            exists,
            virtual_size,
            actual_size,
            created_by_maqet: created.contains(&e.path),
        });
    }
    out
}

/// Checks every entry: `qemu-img check` for qcow2 (`in_use`: the VM runs, so the
/// check reads a live image and may report transient leaks), readability for raw
/// images and shares. A disk maqet will create on the next start is fine.
pub async fn verify(
    qemu_img: Result<QemuImg, super::StorageError>,
    entries: &[StorageEntry],
    in_use: bool,
) -> Vec<VerifyReport> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let (ok, message) = verify_one(&qemu_img, e, in_use).await;
        out.push(VerifyReport {
            name: e.name.clone(),
            ok,
            message,
        });
    }
    out
}

async fn verify_one(
    qemu_img: &Result<QemuImg, super::StorageError>,
    e: &StorageEntry,
    in_use: bool,
) -> (bool, String) {
    let meta = match std::fs::metadata(&e.path) {
        Ok(m) => m,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return match (e.kind.is_disk(), e.size, &e.backing_file) {
                (true, Some(size), _) => (
                    true,
                    format!(
                        "not created yet: maqet creates it ({}) on the next start",
                        format_size(size)
                    ),
                ),
                (true, None, Some(_)) => (
                    true,
                    "not created yet: maqet creates it over its backing file on the next start"
                        .into(),
                ),
                (true, None, None) => (
                    false,
                    "missing, and its entry has no `size` to create it with".into(),
                ),
                (false, ..) => (false, "the shared directory does not exist".into()),
            };
        }
        Err(err) => return (false, format!("cannot read it: {err}")),
    };
    match e.kind {
        StorageKind::Virtfs if !meta.is_dir() => (false, "not a directory".into()),
        StorageKind::Virtfs => readable(&e.path, "directory is readable"),
        _ if !meta.is_file() => (false, "not a regular file".into()),
        StorageKind::Raw => readable(&e.path, "raw image is readable"),
        StorageKind::Qcow2 => match qemu_img {
            Err(err) => (false, err.to_string()),
            Ok(img) => match img.check(&e.path, in_use).await {
                Ok(report) if in_use && report.ok => (
                    true,
                    format!("{} (checked while the VM runs)", report.message),
                ),
                Ok(report) => (report.ok, report.message),
                Err(err) => (false, err.to_string()),
            },
        },
    }
}

fn readable(path: &Path, ok: &str) -> (bool, String) {
    let opened = if path.is_dir() {
        std::fs::read_dir(path).map(|_| ())
    } else {
        std::fs::File::open(path).map(|_| ())
    };
    match opened {
        Ok(()) => (true, ok.to_owned()),
        Err(e) => (false, format!("cannot open it: {e}")),
    }
}
