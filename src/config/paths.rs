//! Host paths named by a config: `~` expansion, resolution against the
//! declaring source's directory, and finding the QEMU binary.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

/// Searched when the caller has no `PATH` at all (as `execvp` does).
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Makes `raw` absolute: `~` and `~/…` expand to `home`, relative paths join
/// `base_dir`; `.` and `..` are then removed lexically, so the dangerous-path
/// policy sees the path a person would read.
pub(crate) fn resolve_host_path(
    raw: &str,
    base_dir: &Path,
    home: &Path,
) -> Result<PathBuf, String> {
    if raw.is_empty() {
        return Err("the path is empty".to_owned());
    }
    let joined = if raw == "~" {
        home.to_path_buf()
    } else if let Some(rest) = raw.strip_prefix("~/") {
        home.join(rest)
    } else if raw.starts_with('~') {
        return Err(format!(
            "`{raw}`: only `~` and `~/…` are expanded; write the full path"
        ));
    } else {
        base_dir.join(raw)
    };
    if !joined.is_absolute() {
        // A source without a directory (see `source::read_fd`) says why in `base_dir`.
        return Err(format!(
            "`{raw}` is relative and there is no directory to resolve it against ({}); write an absolute path",
            base_dir.display()
        ));
    }
    let normalized = normalize(&joined);
    if normalized.to_str().is_none() {
        return Err(format!("`{}` is not valid UTF-8", normalized.display()));
    }
    Ok(normalized)
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Whether a `binary:` value names a file rather than a command to search in PATH.
pub(crate) fn is_path_like(binary: &str) -> bool {
    binary.contains('/') || binary.starts_with('~')
}

/// A failed binary lookup: what is wrong, and how to fix it.
#[derive(Debug)]
pub(crate) struct BinaryError {
    pub message: String,
    pub hint: String,
}

/// Finds `binary`: a path must be an executable file; a bare command name is
/// searched in `path_env` (or a default PATH when there is none).
pub(crate) fn find_binary(binary: &str, path_env: Option<&OsStr>) -> Result<PathBuf, BinaryError> {
    if binary.contains('/') {
        let path = PathBuf::from(binary);
        return match check_executable(&path) {
            Ok(()) => Ok(path),
            Err(why) => Err(BinaryError {
                message: format!("QEMU binary `{binary}` {why}"),
                hint: "set `binary:` to the full path of an installed QEMU system emulator, or to a command name found in PATH".to_owned(),
            }),
        };
    }
    let search = path_env.unwrap_or(OsStr::new(DEFAULT_PATH));
    std::env::split_paths(search)
        // Empty or relative PATH entries would depend on maqetd's working directory.
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(binary))
        .find(|candidate| check_executable(candidate).is_ok())
        .ok_or_else(|| BinaryError {
            message: format!(
                "QEMU binary `{binary}` was not found in PATH ({})",
                search.to_string_lossy()
            ),
            hint: format!(
                "install QEMU (e.g. the `{}` package) or set `binary:` to a full path",
                package_hint(binary)
            ),
        })
}

fn check_executable(path: &Path) -> Result<(), &'static str> {
    match std::fs::metadata(path) {
        Err(_) => Err("does not exist"),
        Ok(meta) if !meta.is_file() => Err("is not a regular file"),
        Ok(_) => {
            rustix::fs::access(path, rustix::fs::Access::EXEC_OK).map_err(|_| "is not executable")
        }
    }
}

/// The Debian/Ubuntu package that ships `qemu-system-<arch>`.
fn package_hint(binary: &str) -> &'static str {
    let arch = binary.strip_prefix("qemu-system-").unwrap_or("");
    match arch {
        "x86_64" | "i386" => "qemu-system-x86",
        "aarch64" | "arm" => "qemu-system-arm",
        "ppc" | "ppc64" => "qemu-system-ppc",
        "s390x" => "qemu-system-s390x",
        a if a.starts_with("mips") => "qemu-system-mips",
        a if a.starts_with("sparc") => "qemu-system-sparc",
        "riscv32" | "riscv64" | "loongarch64" => "qemu-system-misc",
        _ => "qemu-system",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn resolution() {
        let base = Path::new("/vms/web");
        let home = Path::new("/home/u");
        let ok = |raw| resolve_host_path(raw, base, home).unwrap();
        assert_eq!(ok("disk.qcow2"), Path::new("/vms/web/disk.qcow2"));
        assert_eq!(ok("./a/../b.img"), Path::new("/vms/web/b.img"));
        assert_eq!(ok("../../../../etc/x"), Path::new("/etc/x"));
        assert_eq!(ok("/abs/x"), Path::new("/abs/x"));
        assert_eq!(ok("~"), Path::new("/home/u"));
        assert_eq!(ok("~/shared"), Path::new("/home/u/shared"));
        assert_eq!(ok("dir/"), Path::new("/vms/web/dir"));
        assert!(
            resolve_host_path("~bob/x", base, home)
                .unwrap_err()
                .contains("`~/…`")
        );
        assert!(resolve_host_path("", base, home).is_err());
        assert!(resolve_host_path("x", Path::new("rel"), home).is_err());
    }

    #[test]
    fn binary_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("qemu-system-x86_64");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("qemu-system-aarch64");
        std::fs::write(&plain, "").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();

        let path_env = std::env::join_paths(["relative", dir.path().to_str().unwrap()]).unwrap();
        assert_eq!(
            find_binary("qemu-system-x86_64", Some(&path_env)).unwrap(),
            exe
        );
        let err = find_binary("qemu-system-aarch64", Some(&path_env)).unwrap_err();
        assert!(err.message.contains("not found in PATH"));
        assert!(err.hint.contains("qemu-system-arm"));
        assert_eq!(find_binary(exe.to_str().unwrap(), None).unwrap(), exe);
        let err = find_binary(plain.to_str().unwrap(), None).unwrap_err();
        assert!(
            err.message.ends_with("is not executable"),
            "{}",
            err.message
        );
        let err = find_binary("/nonexistent/qemu", None).unwrap_err();
        assert!(err.message.ends_with("does not exist"));
        let err = find_binary(dir.path().to_str().unwrap(), None).unwrap_err();
        assert!(err.message.ends_with("is not a regular file"));
    }
}
