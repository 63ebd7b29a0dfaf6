//! The host files of a VM's command line, opened by maqetd for QEMU.
//!
//! At start, every disk image, declared backing image, ISO, firmware, kernel, initrd
//! and share root the config names ([`VmConfig::host_files`], resolved and checked when
//! the config was added or applied) is opened here with no symlink allowed anywhere in
//! the path (`nofollow`), and QEMU gets the fd instead of the name:
//! - block devices (`-drive file=`, `-blockdev filename=`, `-cdrom`, `-pflash`, …):
//!   `-add-fd fd=N,set=S,opaque=…` and `/dev/fdset/S`. A writable file's set holds a
//!   read-write fd and a read-only one (reopened through the first, so the same inode):
//!   QEMU's block layer picks the fd whose access mode matches what it asks for, and
//!   asks read-only while probing;
//! - plain paths (`-kernel`, `-initrd`, `-bios`, `-dtb`, virtfs share roots):
//!   `/proc/self/fd/N`, which in the QEMU process is the fd maqetd placed at N.
//!
//! The fds are placed at 5, 6, … between fork and exec (`child::place_fds`).
//!
//! A qcow2 header can name a backing file, which QEMU opens by name (read-only) unless
//! the config declared it (then it is fd-passed too). Such a name is checked here
//! against the dangerous-location list, as if the config had named it: a disk brought
//! from elsewhere cannot make QEMU hand the guest `~/.ssh/id_rsa` as backing data.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, FileType, Mode, OFlags};

use super::{danger, nofollow};
use crate::config::{Access, PassAs, PathUse, VmConfig, escape_commas};
use crate::error::MaqetError;

/// The first fd number host files get in QEMU (3 and 4 are the QMP and console
/// sockets).
pub const FIRST_FD: RawFd = 5;

/// The opened files and the argv that names them.
pub struct OpenedFiles {
    /// Each fd and the number QEMU finds it at.
    fds: Vec<(OwnedFd, RawFd)>,
    /// The config's QEMU arguments with `-add-fd` options first and every host file
    /// slot filled with its fd path.
    pub args: Vec<String>,
    /// For the log: `fd 5 = /home/u/vms/root.qcow2 (read-write)`.
    pub notes: Vec<String>,
}

impl OpenedFiles {
    /// (our fd, QEMU's fd number) pairs for `child::place_fds`.
    pub fn placements(&self) -> Vec<(RawFd, RawFd)> {
        self.fds
            .iter()
            .map(|(fd, n)| (fd.as_raw_fd(), *n))
            .collect()
    }
}

/// Opens every host file of `config` and builds QEMU's arguments around the fds.
/// Fails with `Storage` naming the file when one cannot be opened safely, or when a
/// qcow2 header names a backing file in a place refused for `home`'s user.
pub fn open_for_qemu(config: &VmConfig, home: &Path) -> Result<OpenedFiles, MaqetError> {
    // Images whose backing the config names: QEMU gets that one, not the header's.
    let overridden: Vec<&Path> = config
        .storage()
        .iter()
        .filter(|e| e.backing_file.is_some())
        .map(|e| e.path.as_path())
        .collect();
    let mut opened = OpenedFiles {
        fds: Vec::new(),
        args: Vec::new(),
        notes: Vec::new(),
    };
    let mut add_fd = Vec::new();
    let mut fills = Vec::new();
    let mut next = FIRST_FD;
    for (index, file) in config.host_files().iter().enumerate() {
        let fd = open_checked(&file.path, file.access).map_err(MaqetError::Storage)?;
        if file.qcow2 && !overridden.contains(&file.path.as_path()) {
            check_backing_name(&fd, &file.path, home).map_err(MaqetError::Storage)?;
        }
        let mut fds = Vec::new();
        if file.access == Access::ReadWrite && file.pass == PassAs::FdSet {
            let ro = reopen_read_only(&fd).map_err(|e| {
                MaqetError::Storage(format!(
                    "cannot reopen {} read-only: {e}",
                    file.path.display()
                ))
            })?;
            fds.push((fd, "read-write"));
            fds.push((ro, "read-only"));
        } else {
            let how = match file.access {
                Access::Read => "read-only",
                Access::ReadWrite => "read-write",
                Access::Directory => "directory",
            };
            fds.push((fd, how));
        }
        let set = index + 1;
        let shown = file.path.display().to_string();
        for (fd, how) in fds {
            if file.pass == PassAs::FdSet {
                add_fd.push("-add-fd".to_owned());
                add_fd.push(format!(
                    "fd={next},set={set},opaque={}",
                    escape_commas(&shown)
                ));
            }
            opened.notes.push(format!("fd {next} = {shown} ({how})"));
            opened.fds.push((fd, next));
            next += 1;
        }
        fills.push(match file.pass {
            PassAs::FdSet => format!("/dev/fdset/{set}"),
            PassAs::ProcFd => format!("/proc/self/fd/{}", next - 1),
        });
    }
    opened.args = add_fd;
    opened
        .args
        .extend(config.launch_args(&|i| fills[i].clone()));
    Ok(opened)
}

/// The backing file a qcow2 header names, if the file is a qcow2 image with one.
fn qcow2_backing_name(fd: &OwnedFd) -> Result<Option<Vec<u8>>, String> {
    let mut header = [0u8; 20];
    let read = rustix::io::pread(fd, &mut header, 0).map_err(|e| e.to_string())?;
    if read < header.len() || header[..4] != *b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let size = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    // QEMU refuses names longer than 1023 bytes.
    if size > 1023 {
        return Err(format!(
            "its qcow2 header names a backing file of {size} bytes"
        ));
    }
    let mut name = vec![0u8; size];
    let read = rustix::io::pread(fd, &mut name, offset).map_err(|e| e.to_string())?;
    name.truncate(read);
    Ok(Some(name))
}

/// Refuses a qcow2 image whose header names a backing file in a place the location
/// policy refuses for read-only use (or through a protocol that reaches host
/// files, such as `json:`).
fn check_backing_name(fd: &OwnedFd, image: &Path, home: &Path) -> Result<(), String> {
    let refuse = |why: String| {
        format!(
            "{}: its qcow2 header names the backing file {why}; QEMU would open it by name. Declare the backing image with `backing_file` in the storage entry, or rebase the image (`qemu-img rebase`)",
            image.display()
        )
    };
    let Some(name) =
        qcow2_backing_name(fd).map_err(|e| format!("cannot read {}: {e}", image.display()))?
    else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(&name).into_owned();
    let raw = std::ffi::OsStr::from_bytes(&name);
    let first = text.split('/').next().unwrap_or("");
    if first.contains(':') {
        return Err(refuse(format!("`{text}`, a protocol maqet cannot check")));
    }
    let path = match image.parent() {
        Some(dir) if !Path::new(raw).is_absolute() => dir.join(raw),
        _ => PathBuf::from(raw),
    };
    danger::check(&path, home, PathUse::BootInput)
        .map(drop)
        .map_err(|why| refuse(format!("`{text}`, which is not allowed: {why}")))
}

/// Opens one host file with no symlinks, without blocking (a FIFO planted at a disk
/// path must not hang the start), and checks its type.
fn open_checked(path: &std::path::Path, access: Access) -> Result<OwnedFd, String> {
    let mode = match access {
        Access::Read => OFlags::RDONLY,
        Access::ReadWrite => OFlags::RDWR,
        Access::Directory => OFlags::RDONLY | OFlags::DIRECTORY,
    };
    let fd = nofollow::open(path, mode | OFlags::NOCTTY | OFlags::NONBLOCK)?;
    let stat =
        rustix::fs::fstat(&fd).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    let fits = match access {
        Access::Directory => kind == FileType::Directory,
        _ => matches!(kind, FileType::RegularFile | FileType::BlockDevice),
    };
    if !fits {
        let wanted = if access == Access::Directory {
            "a directory"
        } else {
            "a regular file or block device"
        };
        return Err(format!("{} is not {wanted}", path.display()));
    }
    let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| e.to_string())?;
    rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK).map_err(|e| e.to_string())?;
    Ok(fd)
}

/// The same open file, read-only: through `/proc/self/fd`, which names the inode we
/// hold, not a path that could have changed.
fn reopen_read_only(fd: &OwnedFd) -> rustix::io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    rustix::fs::openat(
        CWD,
        path,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigSource, PathUse, ValidationContext};
    use std::path::Path;

    fn load(dir: &Path, yaml: &str) -> VmConfig {
        let home = Path::new("/home/u");
        let check = |p: &Path, usage: PathUse| super::super::danger::check(p, home, usage);
        let ctx = ValidationContext {
            home,
            path_env: Some(std::ffi::OsStr::new("/usr/bin:/bin")),
            default_arch: "x86_64",
            check_path: &check,
        };
        let source = ConfigSource {
            origin: "vm.yaml".into(),
            text: format!("binary: /bin/sh\n{yaml}"),
            base_dir: dir.to_path_buf(),
        };
        crate::config::load(&[source], &ctx).unwrap()
    }

    /// Config → argv: fd sets for the block layer (a writable one holds a read-write
    /// and a read-only fd of the same inode), /proc/self/fd for plain paths.
    #[test]
    fn golden_fd_argv() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        for f in ["root.img", "boot.iso", "vmlinuz"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        std::fs::create_dir(dir.join("shared")).unwrap();
        let config = load(
            &dir,
            "arguments: [{kernel: vmlinuz}]\nstorage:\n  - {name: root, type: raw, file: root.img}\n  - {name: cd, type: raw, file: boot.iso, options: {readonly: true}}\n  - {name: s, type: virtfs, path: shared}\n",
        );
        let opened = open_for_qemu(&config, Path::new("/home/u")).unwrap();
        let d = dir.display();
        let expected: Vec<String> = [
            "-add-fd".to_owned(),
            format!("fd=6,set=2,opaque={d}/root.img"),
            "-add-fd".to_owned(),
            format!("fd=7,set=2,opaque={d}/root.img"),
            "-add-fd".to_owned(),
            format!("fd=8,set=3,opaque={d}/boot.iso"),
            "-kernel".to_owned(),
            "/proc/self/fd/5".to_owned(),
            "-drive".to_owned(),
            "file=/dev/fdset/2,format=raw,if=virtio,id=root,node-name=maqet-d0".to_owned(),
            "-drive".to_owned(),
            "file=/dev/fdset/3,format=raw,if=virtio,id=cd,node-name=maqet-d1,readonly=on"
                .to_owned(),
            "-virtfs".to_owned(),
            "local,path=/proc/self/fd/9,mount_tag=s,security_model=mapped-xattr,id=s".to_owned(),
        ]
        .into();
        assert_eq!(opened.args, expected);
        assert_eq!(
            opened.notes,
            [
                format!("fd 5 = {d}/vmlinuz (read-only)"),
                format!("fd 6 = {d}/root.img (read-write)"),
                format!("fd 7 = {d}/root.img (read-only)"),
                format!("fd 8 = {d}/boot.iso (read-only)"),
                format!("fd 9 = {d}/shared (directory)"),
            ]
        );
        // Each fd is the file it claims, with the access it claims.
        let placements = opened.placements();
        let access = |i: usize| rustix::fs::fcntl_getfl(&opened.fds[i].0).unwrap() & OFlags::RWMODE;
        assert_eq!(access(1), OFlags::RDWR);
        assert_eq!(access(2), OFlags::RDONLY);
        let ino = |fd: RawFd| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
        use std::os::unix::fs::MetadataExt;
        let root = std::fs::metadata(dir.join("root.img")).unwrap().ino();
        assert_eq!(ino(placements[1].0).ino(), root);
        assert_eq!(ino(placements[2].0).ino(), root);
        assert_eq!(
            placements.iter().map(|p| p.1).collect::<Vec<_>>(),
            [5, 6, 7, 8, 9]
        );
    }

    /// A directory swapped for a symlink after the check: nothing is opened.
    #[test]
    fn a_swapped_directory_opens_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(dir.join("vms")).unwrap();
        std::fs::write(dir.join("vms/root.img"), "x").unwrap();
        let config = load(&dir, "storage: [{type: raw, file: vms/root.img}]\n");
        std::fs::rename(dir.join("vms"), dir.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join("vms")).unwrap();
        let err = open_for_qemu(&config, Path::new("/home/u")).err().unwrap();
        assert_eq!(err.kind(), "Storage");
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    /// A qcow2 brought from elsewhere whose header names a credential file as its
    /// backing: refused before QEMU runs. A declared backing overrides the header.
    #[tokio::test]
    async fn a_qcow2_header_cannot_name_a_refused_backing_file() {
        if super::super::QemuImg::find(std::env::var_os("PATH").as_deref()).is_err() {
            assert!(
                std::env::var_os("MAQET_TEST_REQUIRE_ALL").is_none(),
                "qemu-img missing"
            );
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let home = dir.join("home");
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        std::fs::write(home.join(".ssh/id_rsa"), "secret").unwrap();
        std::fs::write(dir.join("fine.raw"), vec![0u8; 4096]).unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("qemu-img")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let evil = dir.join("evil.qcow2");
        let secret = home.join(".ssh/id_rsa");
        run(&[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-F",
            "raw",
            "-b",
            secret.to_str().unwrap(),
            evil.to_str().unwrap(),
            "1M",
        ]);
        let good = dir.join("good.qcow2");
        run(&[
            "create",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "fine.raw",
            good.to_str().unwrap(),
            "1M",
        ]);

        let check = |p: &Path, usage: PathUse| danger::check(p, &home, usage);
        let ctx = ValidationContext {
            home: &home,
            path_env: Some(std::ffi::OsStr::new("/usr/bin:/bin")),
            default_arch: "x86_64",
            check_path: &check,
        };
        let load = |yaml: &str| {
            let source = ConfigSource {
                origin: "vm.yaml".into(),
                text: format!("binary: /bin/sh\n{yaml}"),
                base_dir: dir.clone(),
            };
            crate::config::load(&[source], &ctx).unwrap()
        };
        for yaml in [
            "storage: [{type: qcow2, file: evil.qcow2}]\n",
            "arguments: [{drive: {file: evil.qcow2, if: virtio}}]\n",
        ] {
            let err = open_for_qemu(&load(yaml), &home).err().unwrap();
            assert_eq!(err.kind(), "Storage");
            assert!(err.to_string().contains("names the backing file"), "{err}");
            assert!(err.to_string().contains(".ssh"), "{err}");
        }
        // Read as raw, its header means nothing.
        open_for_qemu(
            &load("arguments: [{drive: {file: evil.qcow2, format: raw}}]\n"),
            &home,
        )
        .unwrap();
        // A relative backing name in an allowed place is fine.
        open_for_qemu(&load("storage: [{type: qcow2, file: good.qcow2}]\n"), &home).unwrap();
        // A declared backing replaces the header's.
        open_for_qemu(
            &load("storage: [{type: qcow2, file: evil.qcow2, backing_file: fine.raw, backing_format: raw}]\n"),
            &home,
        )
        .unwrap();
    }
}
