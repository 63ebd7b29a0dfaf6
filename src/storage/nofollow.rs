//! Opening host paths without following any symlink, so the file opened is the file
//! that was checked: a path component swapped for a symlink after the check makes the
//! open fail instead of leading elsewhere.
//!
//! `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` (Linux ≥ 5.6) where the kernel
//! has it; otherwise a walk from `/` one component at a time with
//! `openat(O_DIRECTORY | O_NOFOLLOW)`, then `O_NOFOLLOW` on the last name.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{CWD, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Opens `path` (absolute, already resolved: no symlink, no `..`) with `flags`
/// (`O_CLOEXEC` and `O_NOFOLLOW` are added).
pub fn open(path: &Path, flags: OFlags) -> Result<OwnedFd, String> {
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!(
            "{} is not an absolute, normalized path",
            path.display()
        ));
    }
    let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(CWD, path, flags, Mode::empty(), resolve) {
        Err(Errno::NOSYS) => open_by_walk(path, flags),
        other => other.map_err(|e| describe(path, e)),
    }
}

/// The fallback for kernels without `openat2`.
fn open_by_walk(path: &Path, flags: OFlags) -> Result<OwnedFd, String> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        // `/` itself.
        return rustix::fs::openat(CWD, "/", flags, Mode::empty()).map_err(|e| describe(path, e));
    };
    let dir = open_dir_chain(parent, false)?;
    rustix::fs::openat(&dir, name, flags, Mode::empty()).map_err(|e| describe(path, e))
}

/// Why opening `path` failed, in words that say what to do.
fn describe(path: &Path, e: Errno) -> String {
    match e {
        Errno::LOOP | Errno::XDEV => format!(
            "{}: a component of the path is a symbolic link (was a directory replaced by a symlink after the VM was defined?); nothing was opened. If the move is intended, apply the config again",
            path.display()
        ),
        Errno::NOENT => format!("{} does not exist", path.display()),
        Errno::NOTDIR => format!(
            "{}: a component of the path is not a directory",
            path.display()
        ),
        e => format!("cannot open {}: {e}", path.display()),
    }
}

/// Opens `dir` (absolute, symlink-free) from `/` without following any symlink;
/// with `create`, missing directories are made with mode 0700.
pub fn open_dir_chain(dir: &Path, create: bool) -> Result<OwnedFd, String> {
    let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
    let mut fd = rustix::fs::openat(CWD, "/", flags, Mode::empty()).map_err(|e| e.to_string())?;
    let mut walked = PathBuf::from("/");
    for c in dir.components() {
        let Component::Normal(part) = c else {
            continue;
        };
        walked.push(part);
        let next = match rustix::fs::openat(&fd, part, flags, Mode::empty()) {
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&fd, part, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(format!("cannot create {}: {e}", walked.display())),
                }
                rustix::fs::openat(&fd, part, flags, Mode::empty())
            }
            other => other,
        };
        fd = next.map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => format!(
                "{} is not a directory or became a symlink after it was checked; nothing was written",
                walked.display()
            ),
            e => format!("cannot open {}: {e}", walked.display()),
        })?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmp() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        (t, base)
    }

    #[test]
    fn plain_files_open_and_symlinks_anywhere_are_refused() {
        let (_t, base) = tmp();
        std::fs::create_dir(base.join("real")).unwrap();
        std::fs::write(base.join("real/disk.img"), "x").unwrap();
        symlink(base.join("real"), base.join("link")).unwrap();
        symlink(base.join("real/disk.img"), base.join("real/leaf")).unwrap();
        for walk in [false, true] {
            let open = |p: &Path| {
                if walk {
                    open_by_walk(p, OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW)
                } else {
                    open(p, OFlags::RDONLY)
                }
            };
            assert!(open(&base.join("real/disk.img")).is_ok());
            let err = open(&base.join("link/disk.img")).unwrap_err();
            assert!(
                err.contains("symbolic link") || err.contains("became a symlink"),
                "{err}"
            );
            assert!(open(&base.join("real/leaf")).is_err());
            assert!(
                open(&base.join("real/missing"))
                    .unwrap_err()
                    .contains("does not exist")
                    || walk
            );
        }
        assert!(open(&base.join("real/../real/disk.img"), OFlags::RDONLY).is_err());
        assert!(open(Path::new("/proc/self/fd/0"), OFlags::RDONLY).is_err());
    }

    #[test]
    fn the_walk_creates_missing_directories_privately() {
        use std::os::unix::fs::PermissionsExt;
        let (_t, base) = tmp();
        let deep = base.join("a/b");
        open_dir_chain(&deep, true).unwrap();
        let mode = std::fs::metadata(&deep).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(open_dir_chain(&base.join("c/d"), false).is_err());
        assert!(!base.join("c").exists());
    }
}
