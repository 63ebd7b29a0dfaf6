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

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use rustix::fs::{CWD, FileType, Mode, OFlags};

use super::nofollow;
use crate::config::{Access, PassAs, VmConfig, escape_commas};
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
/// Fails with `Storage` naming the file when one cannot be opened safely.
pub fn open_for_qemu(config: &VmConfig) -> Result<OpenedFiles, MaqetError> {
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
        let opened = open_for_qemu(&config).unwrap();
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
        let err = open_for_qemu(&config).err().unwrap();
        assert_eq!(err.kind(), "Storage");
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }
}
