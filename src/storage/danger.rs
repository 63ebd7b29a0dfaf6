//! The one list of host locations a VM's disks and shares must never point into.
//!
//! Checked when a VM is added or applied (so a bad path is refused before anything
//! runs), after resolving symlinks of every existing ancestor, so `~/vm/link/x.qcow2`
//! with `link -> /etc` is seen as `/etc/x.qcow2`. The resolved path is what the config
//! stores and what maqetd later opens with no symlinks allowed (`hostfiles`).

use std::path::{Component, Path, PathBuf};

use crate::config::PathUse;

/// System trees: writing a disk image or sharing them with a guest can break or expose
/// the host. `(prefix, allowed sub-trees)`.
const SYSTEM_TREES: &[(&str, &[&str])] = &[
    ("/etc", &[]),
    ("/usr", &[]),
    ("/bin", &[]),
    ("/sbin", &[]),
    ("/lib", &[]),
    ("/lib32", &[]),
    ("/lib64", &[]),
    ("/libx32", &[]),
    ("/boot", &[]),
    ("/efi", &[]),
    ("/proc", &[]),
    ("/sys", &[]),
    ("/dev", &["/dev/shm"]),
    ("/run", &["/run/user", "/run/media"]),
    ("/var", &["/var/tmp"]),
    ("/snap", &[]),
];
// Not listed: /opt, /srv, /mnt, /media and /tmp are where people keep VM images.

/// System trees that only hold software and data shipped for everyone (firmware images,
/// ISOs in `/usr/share`): fine for a guest to read, never to write.
const SHARED_READ_ONLY_TREES: &[&str] = &[
    "/usr", "/opt", "/snap", "/boot", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];

/// Inside the user's home: credentials and the desktop's own configuration.
const HOME_TREES: &[&str] = &[
    ".ssh",
    ".gnupg",
    ".config",
    ".pki",
    ".password-store",
    ".local/share/keyrings",
];

/// Devices any user may read and that hurt nothing: the entropy sources QEMU's
/// `rng-random` backend reads (`{object: {rng-random: null, filename: /dev/urandom}}`).
const ENTROPY_DEVICES: &[&str] = &["/dev/urandom", "/dev/random"];

/// Paths whose meaning depends on the process that opens them (`/proc/self/cwd/…`,
/// `/dev/fd/3`, `/dev/stdin`): never stored, whatever they lead to now.
const PROCESS_RELATIVE: &[&str] = &[
    "/proc",
    "/dev/fd",
    "/dev/stdin",
    "/dev/stdout",
    "/dev/stderr",
];

/// Where `path` really leads (symlinks of existing ancestors resolved, `..` folded),
/// or why it is refused. `path` must be absolute. Boot inputs (a kernel QEMU only
/// reads) may come from system directories; nothing may come from the user's
/// credential directories; a dangling symlink or a process-relative path is refused.
pub fn check(path: &Path, home: &Path, usage: PathUse) -> Result<PathBuf, String> {
    if let Some(tree) = PROCESS_RELATIVE.iter().find(|t| path.starts_with(t)) {
        return Err(format!(
            "{} is under {tree}, whose meaning depends on which process opens it; name the file itself",
            path.display()
        ));
    }
    let resolved = resolve(path);
    let shown = if resolved != path {
        format!("{} (resolves to {})", path.display(), resolved.display())
    } else {
        path.display().to_string()
    };
    if let Some((link, target)) = dangling_link(&resolved) {
        let at = if link == resolved {
            String::new()
        } else {
            format!(": {}", link.display())
        };
        return Err(format!(
            "{shown}{at} is a symlink to {}, which does not exist; create the target first or name the real location",
            target.display()
        ));
    }
    if resolved.starts_with("/proc") {
        return Err(format!(
            "{shown} is inside /proc: kernel interfaces, not files"
        ));
    }
    if ENTROPY_DEVICES.iter().any(|d| resolved == Path::new(d)) {
        return Ok(resolved);
    }
    if resolved == Path::new("/") {
        return Err(format!("{shown} is the root directory"));
    }
    let system_trees = match usage {
        PathUse::Storage | PathUse::ReadOnly => SYSTEM_TREES,
        PathUse::BootInput => &[],
    };
    for (tree, allowed) in system_trees {
        let read_only_ok = usage == PathUse::ReadOnly && SHARED_READ_ONLY_TREES.contains(tree);
        if resolved.starts_with(tree)
            && !allowed.iter().any(|a| resolved.starts_with(a))
            && !read_only_ok
        {
            return Err(format!(
                "{shown} is inside the system directory {tree}; keep VM disks and shares in your home or data directory"
            ));
        }
    }
    let home = resolve(home);
    if let Some(other) = other_users_home(&resolved, &home) {
        return Err(format!(
            "{shown} is inside {}, another user's home; keep VM disks and shares in your own",
            other.display()
        ));
    }
    for rel in HOME_TREES {
        let tree = home.join(rel);
        if resolved.starts_with(&tree) {
            return Err(format!(
                "{shown} is inside {}, which holds credentials or desktop settings; choose another directory",
                tree.display()
            ));
        }
    }
    if resolved == home {
        return Err(format!(
            "{shown} is your whole home directory; share a sub-directory instead"
        ));
    }
    Ok(resolved)
}

/// The home directory (`/home/<name>`, `/root`, or `/home` itself) of someone else
/// that `resolved` is in, if any.
fn other_users_home(resolved: &Path, home: &Path) -> Option<PathBuf> {
    if resolved.starts_with("/root") && !home.starts_with("/root") {
        return Some(PathBuf::from("/root"));
    }
    let rest = resolved.strip_prefix("/home").ok()?;
    let Some(Component::Normal(user)) = rest.components().next() else {
        // `/home` itself holds every user's home.
        return Some(PathBuf::from("/home"));
    };
    let theirs = Path::new("/home").join(user);
    (!home.starts_with(&theirs)).then_some(theirs)
}

/// In a [`resolve`]d path (a symlink-free existing prefix, then names that did not
/// resolve), the first unresolved name when it is a symlink: one whose target is
/// missing, which a later write would follow.
fn dangling_link(resolved: &Path) -> Option<(PathBuf, PathBuf)> {
    let first = resolved
        .ancestors()
        .find(|a| std::fs::symlink_metadata(a).is_ok())?;
    let is_link = std::fs::symlink_metadata(first)
        .ok()?
        .file_type()
        .is_symlink();
    is_link.then(|| {
        (
            first.to_path_buf(),
            std::fs::read_link(first).unwrap_or_default(),
        )
    })
}

/// Folds `.` and `..` lexically (as the config does: the path a person reads), then
/// canonicalizes the longest existing ancestor and appends the rest, so the check sees
/// where a write would land.
pub fn resolve(path: &Path) -> PathBuf {
    let mut lexical = PathBuf::from("/");
    push_normalized(&mut lexical, path);
    let path = lexical.as_path();
    let mut existing = path.to_path_buf();
    let mut rest: Vec<PathBuf> = Vec::new();
    loop {
        if let Ok(canon) = existing.canonicalize() {
            let mut out = canon;
            for c in rest.iter().rev() {
                push_normalized(&mut out, c);
            }
            return out;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(PathBuf::from(name));
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        push_normalized(&mut out, Path::new(c.as_os_str()));
    }
    out
}

fn push_normalized(out: &mut PathBuf, part: &Path) {
    for c in part.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_directories_are_refused() {
        let home = Path::new("/home/u");
        for p in [
            "/",
            "/etc/x.qcow2",
            "/usr/lib/d.img",
            "/dev/sda",
            "/boot/x",
            "/var/lib/x",
            "/home/other/x.img",
            "/home",
            "/root/x.img",
        ] {
            assert!(check(Path::new(p), home, PathUse::Storage).is_err(), "{p}");
        }
        for p in [
            "/dev/shm/x.img",
            "/var/tmp/x.img",
            "/tmp/x.qcow2",
            "/home/u/vms/a.qcow2",
            "/opt/vms/a.qcow2",
            "/srv/vm/a.img",
            "/mnt/data/a.img",
            "/media/usb/a.iso",
            "/dev/urandom",
            "/dev/random",
        ] {
            assert!(check(Path::new(p), home, PathUse::Storage).is_ok(), "{p}");
        }
    }

    #[test]
    fn credentials_in_home_are_refused() {
        let home = Path::new("/home/u");
        let err = check(Path::new("/home/u/.ssh/disk.img"), home, PathUse::Storage).unwrap_err();
        assert!(err.contains(".ssh"), "{err}");
        assert!(
            check(
                Path::new("/home/u/.config/maqet/d.img"),
                home,
                PathUse::Storage
            )
            .is_err()
        );
        assert!(check(Path::new("/home/u"), home, PathUse::Storage).is_err());
        assert!(check(Path::new("/home/u/.configs/d.img"), home, PathUse::Storage).is_ok());
    }

    #[test]
    fn a_host_kernel_may_be_booted() {
        let home = Path::new("/home/u");
        assert!(check(Path::new("/boot/vmlinuz"), home, PathUse::BootInput).is_ok());
        // Read-only disks too (firmware, ISOs); writable ones are refused there.
        let iso = Path::new("/usr/share/ovmf/OVMF.fd");
        assert!(check(iso, home, PathUse::ReadOnly).is_ok());
        assert!(check(iso, home, PathUse::Storage).is_err());
        assert!(check(Path::new("/home/u/.ssh/id_rsa"), home, PathUse::ReadOnly).is_err());
        assert!(check(Path::new("/home/other/a.iso"), home, PathUse::ReadOnly).is_err());
        assert!(check(Path::new("/home/u/.ssh/id_rsa"), home, PathUse::BootInput).is_err());
    }

    /// Firmware and ISOs shipped in /usr may be attached read-only; host configuration,
    /// devices and state may not, and nothing in /usr may be written.
    #[test]
    fn system_files_may_be_read_not_written() {
        let home = Path::new("/home/u");
        let ovmf = Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd");
        assert!(check(ovmf, home, PathUse::ReadOnly).is_ok());
        assert!(check(Path::new("/opt/isos/x.iso"), home, PathUse::ReadOnly).is_ok());
        assert!(check(ovmf, home, PathUse::Storage).is_err());
        for p in [
            "/etc/shadow",
            "/dev/sda",
            "/var/lib/x.img",
            "/home/u/.ssh/id_rsa",
        ] {
            assert!(check(Path::new(p), home, PathUse::ReadOnly).is_err(), "{p}");
        }
    }

    #[test]
    fn symlinked_parents_are_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("innocent");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let err = check(
            &link.join("x.qcow2"),
            Path::new("/home/u"),
            PathUse::Storage,
        )
        .unwrap_err();
        assert!(err.contains("resolves to /etc/x.qcow2"), "{err}");
        // `..` out of a harmless directory into a system one.
        let sneaky = tmp.path().join("missing/../../../../../../etc/y");
        assert!(check(&sneaky, Path::new("/home/u"), PathUse::Storage).is_err());
    }

    #[test]
    fn the_resolved_path_is_returned() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(base.join("data")).unwrap();
        std::os::unix::fs::symlink(base.join("data"), base.join("vms")).unwrap();
        let home = Path::new("/home/u");
        // A symlink the user made on purpose: followed once, stored resolved.
        let got = check(&base.join("vms/a/../d.img"), home, PathUse::Storage).unwrap();
        assert_eq!(got, base.join("data/d.img"));
        let got = check(&base.join("vms/new/x.img"), home, PathUse::Storage).unwrap();
        assert_eq!(got, base.join("data/new/x.img"));
    }

    #[test]
    fn process_relative_paths_and_dangling_symlinks_are_refused() {
        let home = Path::new("/home/u");
        for p in [
            "/proc/self/cwd/x.img",
            "/dev/fd/3",
            "/dev/stdin",
            "/proc/1/root/etc",
        ] {
            let err = check(Path::new(p), home, PathUse::BootInput).unwrap_err();
            assert!(err.contains("depends on which process"), "{p}: {err}");
        }
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        std::os::unix::fs::symlink(base.join("nowhere"), base.join("leaf.img")).unwrap();
        let err = check(&base.join("leaf.img"), home, PathUse::Storage).unwrap_err();
        assert!(
            err.contains("is a symlink to") && err.contains("does not exist"),
            "{err}"
        );
        // A dangling directory link on the way.
        std::os::unix::fs::symlink(base.join("gone"), base.join("dir")).unwrap();
        let err = check(&base.join("dir/x/y.img"), home, PathUse::Storage).unwrap_err();
        assert!(
            err.contains(&format!("{} is a symlink", base.join("dir").display())),
            "{err}"
        );
        // A link that leads into /proc is refused wherever it is.
        std::os::unix::fs::symlink("/proc/self", base.join("me")).unwrap();
        assert!(check(&base.join("me/environ"), home, PathUse::BootInput).is_err());
    }
}
