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
