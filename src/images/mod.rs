//! The image store: disk images and ISOs imported once into
//! `$XDG_DATA_HOME/maqet/images/` and used by VMs as `from: NAME` (a qcow2 overlay per
//! VM, [`crate::vm`]'s first start) or as a read-only `file:`.
//!
//! Owns: image names, the store directory, the `images` rows (through the store's
//! owner thread), listing, removal (refused while a VM uses the image) and imports
//! ([`import`], a job). docs/storage.md is the user-facing description.

pub mod import;

use std::path::{Path, PathBuf};

use crate::manager::Manager;
use crate::store::ImageRecord;
use crate::vm::VmError;
use crate::vm::{Ctx, store_error};

/// Longest image name.
pub const MAX_NAME_LEN: usize = 64;
/// Prefix of a file being imported (never listed, removed at service start).
pub const PARTIAL_PREFIX: &str = ".import-";

/// Image names: 1 to 64 of `[A-Za-z0-9._-]`, starting with a letter or digit (so
/// the file name is never hidden and never an option).
pub fn validate_name(name: &str) -> Result<(), VmError> {
    let bad = |why: &str| {
        Err(VmError::InvalidArgument(format!(
            "invalid image name '{name}': {why}; use 1 to {MAX_NAME_LEN} letters, digits, `.`, `_` or `-`, starting with a letter or digit"
        )))
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return bad("wrong length");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return bad(&format!("`{}` is not allowed", c.escape_default()));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return bad("it must start with a letter or digit");
    }
    Ok(())
}

/// A name for an image imported from `file` without one: its file name without the
/// image extension, with anything not allowed replaced by `-`.
pub fn name_from_file(file: &Path) -> String {
    let stem = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = [".qcow2", ".img", ".raw", ".vmdk", ".vdi", ".vhdx", ".iso"]
        .iter()
        .find_map(|ext| stem.strip_suffix(ext))
        .unwrap_or(&stem);
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_start_matches(['.', '_', '-']).to_owned();
    name.truncate(MAX_NAME_LEN);
    name
}

/// Where a stored image's file is.
pub fn file_path(ctx: &Ctx, rec: &ImageRecord) -> PathBuf {
    ctx.paths.images_dir().join(&rec.file)
}

/// Every stored image, by name.
pub async fn list(ctx: &Ctx) -> Result<Vec<ImageRecord>, VmError> {
    ctx.store.read(|db| db.images()).await.map_err(store_error)
}

/// The stored image `name`, or `NotFound` saying what is there.
pub async fn find(ctx: &Ctx, name: &str) -> Result<ImageRecord, VmError> {
    let wanted = name.to_owned();
    let found = ctx
        .store
        .read(move |db| db.image(&wanted))
        .await
        .map_err(store_error)?;
    match found {
        Some(rec) => Ok(rec),
        None => {
            let names: Vec<String> = list(ctx).await?.into_iter().map(|r| r.name).collect();
            let have = if names.is_empty() {
                "the store is empty".to_owned()
            } else {
                format!("stored images: {}", names.join(", "))
            };
            Err(VmError::NotFound(format!(
                "no image named '{name}' in the image store ({have}); import it with `maqet image import FILE --name {name}`"
            )))
        }
    }
}

/// The VMs whose storage uses the image (by `from:`, or its file as a disk or a
/// backing file), with the disk: `web (disk 'root')`.
pub fn users(manager: &Manager, rec: &ImageRecord, path: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for vm in manager.list() {
        let Ok(config) = vm.stored_config() else {
            continue;
        };
        for e in config.storage() {
            let uses = e.from.as_deref() == Some(rec.name.as_str())
                || e.path == path
                || e.backing_file.as_deref() == Some(path);
            if uses {
                out.push(format!("{} (disk '{}')", vm.name(), e.name));
            }
        }
    }
    out
}

/// Removes an image from the store: refused while a VM uses it.
pub async fn remove(manager: &Manager, name: &str) -> Result<ImageRecord, VmError> {
    let ctx = manager.ctx();
    let rec = find(ctx, name).await?;
    let path = file_path(ctx, &rec);
    let users = users(manager, &rec, &path);
    if !users.is_empty() {
        return Err(VmError::InvalidState(format!(
            "image '{name}' is in use by VM {}; remove those VMs (maqet rm --delete-storage) or change their storage first",
            users.join(", ")
        )));
    }
    let gone = name.to_owned();
    ctx.store
        .write(move |db| db.remove_image(&gone))
        .await
        .map_err(store_error)?;
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(VmError::Storage(format!(
                "image '{name}' is out of the store, but its file {} could not be deleted ({e}); delete it yourself",
                path.display()
            )));
        }
    }
    tracing::info!(image = name, file = %path.display(), "image removed");
    Ok(rec)
}

/// How to make a disk that starts as a stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// The stored image, relative to the disk's directory (so the data directory can
    /// move as a whole).
    pub backing: PathBuf,
    /// The disk's size: `size:` when given, else the image's.
    pub size: u64,
}

/// The overlay for a disk `disk` declared `from: image` (with `size`, if given).
pub async fn overlay(
    ctx: &Ctx,
    image: &str,
    disk: &Path,
    size: Option<u64>,
) -> Result<Overlay, VmError> {
    let rec = find(ctx, image).await?;
    if rec.format != "qcow2" {
        return Err(VmError::InvalidConfig(format!(
            "image '{image}' is an ISO, not a disk image: attach it read-only instead (`file: {}`, `options: {{readonly: true, media: cdrom}}`)",
            file_path(ctx, &rec).display()
        )));
    }
    let size = match size {
        None => rec.virtual_size,
        Some(s) if s >= rec.virtual_size => s,
        Some(s) => {
            return Err(VmError::InvalidConfig(format!(
                "disk {} is declared {} but image '{image}' is {}: a disk cannot be smaller than its image; use at least that `size` or leave `size` out",
                disk.display(),
                crate::config::format_size(s),
                crate::config::format_size(rec.virtual_size)
            )));
        }
    };
    let store = ctx.paths.images_dir();
    let store = store.canonicalize().unwrap_or(store);
    let dir = disk.parent().unwrap_or(Path::new("/"));
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    Ok(Overlay {
        backing: relative(&dir, &store.join(&rec.file)),
        size,
    })
}

/// `to` as seen from the directory `from` (both absolute, no symlinks).
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let (a, b): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c);
    }
    out
}

/// Deletes files of imports a previous maqetd did not finish (it was killed): they
/// are never in the store.
pub fn remove_partial_imports(ctx: &Ctx) {
    let Ok(entries) = std::fs::read_dir(ctx.paths.images_dir()) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX) {
            let _ = std::fs::remove_file(e.path());
            tracing::info!(file = %e.path().display(), "removed an unfinished import");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["debian-12", "a", "Win11_x64.v2", "9front"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert_eq!(
                validate_name(bad).unwrap_err().kind(),
                crate::error_kind::ErrorKind::InvalidArgument
            );
        }
        assert_eq!(name_from_file(Path::new("/d/debian 12.qcow2")), "debian-12");
        assert_eq!(name_from_file(Path::new("/d/.x.iso")), "x");
    }

    #[test]
    fn relative_backing_names() {
        let r = |a: &str, b: &str| relative(Path::new(a), Path::new(b));
        assert_eq!(
            r("/d/maqet/vms/u1", "/d/maqet/images/deb.qcow2"),
            Path::new("../../images/deb.qcow2")
        );
        assert_eq!(
            r("/d/maqet/images", "/d/maqet/images/x.qcow2"),
            Path::new("x.qcow2")
        );
        assert_eq!(r("/tmp/a", "/d/x"), Path::new("../../d/x"));
    }
}
