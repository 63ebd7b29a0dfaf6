//! Creating a missing disk image without a time-of-check/time-of-use window.
//!
//! The method (docs/storage.md):
//! 1. Resolve the path (`danger::check`: symlinks of every existing ancestor) and
//!    check the result against the dangerous list.
//! 2. Walk the resolved parent from `/` one component at a time with
//!    `openat(O_DIRECTORY | O_NOFOLLOW)`, creating missing directories (0700) with
//!    `mkdirat`. A component that became a symlink after step 1 fails the walk, so the
//!    directory fd we end with is exactly the directory that was checked.
//! 3. Check free space on that directory's file system (`fstatvfs`).
//! 4. `openat(dirfd, name, O_CREAT | O_EXCL | O_NOFOLLOW | O_WRONLY, 0600)`: a file or
//!    symlink planted at the name makes it fail instead of being followed; verify the
//!    result is a regular file.
//! 5. `qemu-img create` formats that inode through `/proc/self/fd/3`, never by path.
//! 6. Verify the name still refers to our inode. On failure the file is removed only if
//!    it is still ours.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::qemu_img::{QemuImg, recorded_backing_name};
use super::{danger, nofollow, space};
use crate::config::{PathUse, StorageKind};
use crate::error::MaqetError;

/// What to create.
#[derive(Debug, Clone, Copy)]
pub struct NewImage<'a> {
    pub path: &'a Path,
    pub kind: StorageKind,
    pub size: Option<u64>,
    pub backing: Option<(&'a Path, &'a str)>,
}

/// Whether maqet made the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    /// Someone created it between the caller's existence check and ours: used as is.
    AlreadyThere,
}

fn storage_err(path: &Path, why: impl std::fmt::Display) -> MaqetError {
    MaqetError::Storage(format!("cannot create {}: {why}", path.display()))
}

/// Creates `spec.path` as an empty image of its kind, mode 0600.
pub async fn create_image(
    qemu_img: &QemuImg,
    spec: &NewImage<'_>,
    home: &Path,
) -> Result<Outcome, MaqetError> {
    let path = spec.path;
    let size = match (spec.size, spec.backing) {
        (Some(size), _) => Some(size),
        // A qcow2 overlay takes its size from the backing image.
        (None, Some(_)) => None,
        (None, None) => {
            return Err(storage_err(
                path,
                "it does not exist and its storage entry has no `size` to create it with; add `size:` or create the file yourself",
            ));
        }
    };
    let resolved =
        danger::check(path, home, PathUse::Storage).map_err(|why| storage_err(path, why))?;
    let (Some(parent), Some(name)) = (resolved.parent(), resolved.file_name()) else {
        return Err(storage_err(path, "it names no file"));
    };
    let dir = nofollow::open_dir_chain(parent, true).map_err(|why| storage_err(path, why))?;

    let available = space::available(&dir).map_err(|e| storage_err(path, e))?;
    let required = space::for_new_image(spec.kind, size.unwrap_or(0));
    space::ensure(
        available,
        required,
        &format!("a new disk image {}", path.display()),
        parent,
    )?;

    let file = match rustix::fs::openat(
        &dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(f) => f,
        Err(Errno::EXIST) => return Ok(Outcome::AlreadyThere),
        Err(e) => return Err(storage_err(path, e)),
    };
    let created = rustix::fs::fstat(&file).map_err(|e| storage_err(path, e))?;
    if FileType::from_raw_mode(created.st_mode) != FileType::RegularFile {
        return Err(storage_err(path, "the created file is not a regular file"));
    }
    let mut formatted = qemu_img
        .create(file.as_fd(), path, spec.kind.as_str(), size, spec.backing)
        .await;
    // An overlay whose backing file is in its own directory tree names it relatively,
    // so moving the VM's directory as a whole keeps the chain intact.
    if let (Ok(()), Some((backing, format))) = (&formatted, spec.backing)
        && let Some(name) = recorded_backing_name(&resolved, backing)
    {
        formatted = qemu_img
            .set_backing_name(file.as_fd(), path, &name, format)
            .await;
    }
    let still_ours = is_same_inode(&dir, name, &created);
    match (formatted, still_ours) {
        (Ok(()), true) => Ok(Outcome::Created),
        (Ok(()), false) => Err(storage_err(
            path,
            "the file was replaced while maqet was creating it; nothing was recorded",
        )),
        (Err(e), ours) => {
            if ours {
                let _ = rustix::fs::unlinkat(&dir, name, AtFlags::empty());
            }
            Err(e)
        }
    }
}

/// Creates a missing virtfs share directory (and missing parents, mode 0700), as
/// maqet 0.0.x did: checked against the dangerous list, walked without following
/// symlinks. An existing directory is left as is.
pub fn create_share_dir(path: &Path, home: &Path) -> Result<(), MaqetError> {
    let fail =
        |why: String| MaqetError::Storage(format!("cannot create share {}: {why}", path.display()));
    let resolved = danger::check(path, home, PathUse::Storage).map_err(fail)?;
    nofollow::open_dir_chain(&resolved, true).map_err(fail)?;
    Ok(())
}

fn is_same_inode(dir: &OwnedFd, name: &OsStr, created: &rustix::fs::Stat) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|now| now.st_dev == created.st_dev && now.st_ino == created.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_parent_swapped_for_a_symlink_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        // Checked as a directory, then swapped for a symlink into /etc.
        let dir = base.join("vms");
        std::fs::create_dir(&dir).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        std::os::unix::fs::symlink("/etc", &dir).unwrap();
        let err = nofollow::open_dir_chain(&dir, true).unwrap_err();
        assert!(err.contains("became a symlink"), "{err}");
        assert!(!Path::new("/etc/x.qcow2").exists());
    }

    fn new_image(path: &Path, kind: StorageKind, size: Option<u64>) -> NewImage<'_> {
        NewImage {
            path,
            kind,
            size,
            backing: None,
        }
    }

    fn qemu_img() -> Option<QemuImg> {
        crate::require::require(
            QemuImg::find(std::env::var_os("PATH").as_deref()).map_err(|e| e.message()),
        )
    }

    #[tokio::test]
    async fn creates_a_private_qcow2_and_refuses_planted_names() {
        let Some(img) = qemu_img() else {
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d/root.qcow2");
        let spec = new_image(&path, StorageKind::Qcow2, Some(1 << 20));
        let home = Path::new("/nonexistent-home");
        assert_eq!(
            create_image(&img, &spec, home).await.unwrap(),
            Outcome::Created
        );
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(
            img.info("qcow2", &path).await.unwrap().virtual_size,
            1 << 20
        );
        // Existing: used as is, not touched.
        let before = meta.ino();
        assert_eq!(
            create_image(&img, &spec, home).await.unwrap(),
            Outcome::AlreadyThere
        );
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), before);

        // A dangling symlink planted at the name is refused, and the file it points
        // to is never created (O_EXCL|O_NOFOLLOW would not follow it either).
        let target = tmp.path().join("victim");
        let planted = tmp.path().join("d/planted.qcow2");
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        let spec = NewImage {
            path: &planted,
            ..spec
        };
        let err = create_image(&img, &spec, home).await.unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!target.exists());
    }

    #[tokio::test]
    async fn a_path_through_a_symlink_into_etc_writes_nothing() {
        let Some(img) = qemu_img() else {
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("innocent");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let path = link.join("maqet-test-x.qcow2");
        let spec = new_image(&path, StorageKind::Qcow2, Some(1 << 20));
        let err = create_image(&img, &spec, Path::new("/home/u"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "Storage");
        assert!(err.to_string().contains("/etc"), "{err}");
        assert!(!Path::new("/etc/maqet-test-x.qcow2").exists());
    }

    /// `qemu-img info`'s `backing-filename` of `path`, and whether its whole chain opens.
    fn backing_of(path: &Path) -> (String, bool) {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let name = v["backing-filename"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let chain = std::process::Command::new("qemu-img")
            .args(["info", "--backing-chain", "-U"])
            .arg(path)
            .output()
            .unwrap();
        (name, chain.status.success())
    }

    #[tokio::test]
    async fn an_overlay_names_a_backing_in_its_tree_relatively_and_survives_a_move() {
        let Some(img) = qemu_img() else {
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let vm = tmp.path().join("vm");
        std::fs::create_dir_all(vm.join("base")).unwrap();
        let (base, outside) = (vm.join("base/b.qcow2"), tmp.path().join("outside.img"));
        let spec = new_image(&base, StorageKind::Qcow2, Some(1 << 20));
        create_image(&img, &spec, Path::new("/h")).await.unwrap();
        std::fs::write(&outside, vec![0u8; 1 << 20]).unwrap();

        let overlay = vm.join("o.qcow2");
        let spec = NewImage {
            backing: Some((&base, "qcow2")),
            ..new_image(&overlay, StorageKind::Qcow2, None)
        };
        assert_eq!(
            create_image(&img, &spec, Path::new("/h")).await.unwrap(),
            Outcome::Created
        );
        // Its size came from the backing image.
        assert_eq!(
            img.info("qcow2", &overlay).await.unwrap().virtual_size,
            1 << 20
        );
        assert_eq!(backing_of(&overlay), ("base/b.qcow2".to_owned(), true));
        // Outside the overlay's directory: named absolutely.
        let far = vm.join("far.qcow2");
        let spec = NewImage {
            backing: Some((&outside, "raw")),
            ..new_image(&far, StorageKind::Qcow2, None)
        };
        create_image(&img, &spec, Path::new("/h")).await.unwrap();
        assert_eq!(backing_of(&far).0, outside.to_str().unwrap());

        // The VM directory moved as a whole: the relative chain still opens.
        let moved = tmp.path().join("moved");
        std::fs::rename(&vm, &moved).unwrap();
        assert_eq!(
            backing_of(&moved.join("o.qcow2")),
            ("base/b.qcow2".to_owned(), true)
        );
        assert!(backing_of(&moved.join("far.qcow2")).1);
    }

    #[tokio::test]
    async fn no_size_no_image() {
        let Some(img) = qemu_img() else {
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.img");
        let spec = new_image(&path, StorageKind::Raw, None);
        let err = create_image(&img, &spec, Path::new("/h"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("`size`"), "{err}");
        assert!(!path.exists());
    }
}
