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
//! A qcow2 header can name a backing file, which QEMU would open by name (and resolve
//! a relative name against `/dev/fdset/`). For `-drive` images maqetd reads the header
//! itself, checks the name against the dangerous-location list as if the config had
//! named it, opens it, and adds it to the drive as `backing.file.filename=/dev/fdset/S`
//! (a chain slot of the argv), link after link: a disk brought from elsewhere cannot
//! make QEMU hand the guest `~/.ssh/id_rsa` as backing data.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, FileType, Mode, OFlags};

use super::error::StorageError;
use super::{danger, nofollow};
use crate::config::{Access, PassAs, PathUse, VmConfig, escape_commas};

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
    next_fd: RawFd,
    next_set: usize,
}

impl OpenedFiles {
    /// (our fd, QEMU's fd number) pairs for `child::place_fds`.
    pub fn placements(&self) -> Vec<(RawFd, RawFd)> {
        self.fds
            .iter()
            .map(|(fd, n)| (fd.as_raw_fd(), *n))
            .collect()
    }

    /// Hands QEMU one more open fd (a socket maqetd made), at the number returned.
    pub fn pass_fd(&mut self, fd: OwnedFd, what: &str) -> RawFd {
        let mut b = Builder {
            opened: self,
            add_fd: Vec::new(),
        };
        b.add(fd, what, Path::new("(socket)"), None)
    }

    /// Opens one more file for QEMU's block layer that maqetd chose itself (UEFI
    /// firmware), in an fd set of its own like a config's; returns `/dev/fdset/S` for
    /// the caller's argument.
    pub fn add_block_file(&mut self, path: &Path, access: Access) -> Result<String, String> {
        let fd = open_checked(path, access)?;
        let mut b = Builder {
            opened: self,
            add_fd: Vec::new(),
        };
        let set = b.new_set();
        if access == Access::ReadWrite {
            let ro = reopen_read_only(&fd)
                .map_err(|e| format!("cannot reopen {} read-only: {e}", path.display()))?;
            b.add(fd, "read-write", path, Some(set));
            b.add(ro, "read-only", path, Some(set));
        } else {
            b.add(fd, "read-only", path, Some(set));
        }
        let add_fd = b.add_fd;
        // `-add-fd` is processed before any drive, wherever it is; first, as for the rest.
        self.args.splice(0..0, add_fd);
        Ok(format!("/dev/fdset/{set}"))
    }
}

/// Opens a disk image for a running QEMU (`Storage.Attach`, `Storage.Resize`) the way
/// start does: no symlink anywhere in the path, a regular file or block device. With
/// `ReadWrite`, also the same inode read-only, since QEMU picks the fd of an fd set
/// whose access mode matches what it asks for.
pub fn open_image(path: &Path, access: Access) -> Result<Vec<OwnedFd>, StorageError> {
    let fd = open_checked(path, access).map_err(StorageError::Failed)?;
    if access != Access::ReadWrite {
        return Ok(vec![fd]);
    }
    let ro = reopen_read_only(&fd).map_err(|e| StorageError::Io {
        message: format!("cannot reopen {} read-only: {e}", path.display()),
        source: e.into(),
    })?;
    Ok(vec![fd, ro])
}

/// The longest backing chain maqetd follows (QEMU's own limit is similar).
const MAX_CHAIN: usize = 16;

/// The fds, fd sets and log notes being assembled.
struct Builder<'a> {
    opened: &'a mut OpenedFiles,
    add_fd: Vec<String>,
}

impl Builder<'_> {
    /// Places `fd` at the next number; with `set`, also in that fd set. Returns the number.
    fn add(&mut self, fd: OwnedFd, how: &str, path: &Path, set: Option<usize>) -> RawFd {
        let n = self.opened.next_fd;
        self.opened.next_fd += 1;
        let shown = path.display().to_string();
        if let Some(set) = set {
            self.add_fd.push("-add-fd".to_owned());
            self.add_fd
                .push(format!("fd={n},set={set},opaque={}", escape_commas(&shown)));
        }
        self.opened.notes.push(format!("fd {n} = {shown} ({how})"));
        self.opened.fds.push((fd, n));
        n
    }

    fn new_set(&mut self) -> usize {
        self.opened.next_set += 1;
        self.opened.next_set
    }
}

/// Opens every host file of `config` and builds QEMU's arguments around the fds.
/// Fails with `Storage` naming the file when one cannot be opened safely, or when a
/// qcow2 header names a backing file in a place refused for `home`'s user.
pub fn open_for_qemu(config: &VmConfig, home: &Path) -> Result<OpenedFiles, StorageError> {
    // Images whose backing the config names: QEMU gets that one, not the header's.
    let overridden: Vec<&Path> = config
        .storage()
        .iter()
        .filter(|e| e.backing_file.is_some())
        .map(|e| e.path.as_path())
        .collect();
    let files = config.host_files();
    let mut opened = OpenedFiles {
        fds: Vec::new(),
        args: Vec::new(),
        notes: Vec::new(),
        next_fd: FIRST_FD,
        // Sets 1..=N belong to the host files themselves.
        next_set: files.len(),
    };
    let mut b = Builder {
        opened: &mut opened,
        add_fd: Vec::new(),
    };
    let mut fills = Vec::new();
    let mut chains = vec![String::new(); files.len()];
    for (index, file) in files.iter().enumerate() {
        let storage = |e: String| StorageError::Failed(e);
        let fd = open_checked(&file.path, file.access).map_err(storage)?;
        if let Some(prefix) = &file.chain {
            chains[index] =
                chain_options(&fd, &file.path, prefix, home, &mut b).map_err(storage)?;
        } else if file.qcow2 && !overridden.contains(&file.path.as_path()) {
            // QEMU opens this header's backing by name: at least check the name.
            if let Some(backing) = qcow2_backing(&fd, &file.path).map_err(storage)? {
                backing_location(&backing, &file.path, home).map_err(storage)?;
            }
        }
        let set = index + 1;
        let pass_set = (file.pass == PassAs::FdSet).then_some(set);
        let last = if file.access == Access::ReadWrite && file.pass == PassAs::FdSet {
            let ro = reopen_read_only(&fd).map_err(|e| {
                storage(format!(
                    "cannot reopen {} read-only: {e}",
                    file.path.display()
                ))
            })?;
            b.add(fd, "read-write", &file.path, pass_set);
            b.add(ro, "read-only", &file.path, pass_set)
        } else {
            let how = match file.access {
                Access::Read => "read-only",
                Access::ReadWrite => "read-write",
                Access::Directory => "directory",
            };
            b.add(fd, how, &file.path, pass_set)
        };
        fills.push(match file.pass {
            PassAs::FdSet => format!("/dev/fdset/{set}"),
            PassAs::ProcFd => format!("/proc/self/fd/{last}"),
        });
    }
    let args = config.launch_args(&|i| fills[i].clone(), &|i| chains[i].clone());
    opened.args = b.add_fd;
    opened.args.extend(args);
    Ok(opened)
}

/// Opens the backing chain below the qcow2 image `top` (each link checked, opened with
/// no symlinks, read-only, in an fd set of its own) and returns the `-drive` options
/// that hand it to QEMU: `,backing.driver=qcow2,backing.file.filename=/dev/fdset/7,
/// backing.backing.driver=raw,…`.
fn chain_options(
    top: &OwnedFd,
    top_path: &Path,
    prefix: &str,
    home: &Path,
    b: &mut Builder<'_>,
) -> Result<String, String> {
    let mut options = String::new();
    let mut prefix = prefix.to_owned();
    let mut next = qcow2_backing(top, top_path)?;
    let mut image = top_path.to_path_buf();
    for _ in 0..MAX_CHAIN {
        let Some(backing) = next else {
            return Ok(options);
        };
        let path = backing_location(&backing, &image, home)?;
        let fd = open_checked(&path, Access::Read)?;
        let format = match backing.format {
            Some(f) => f,
            None if is_qcow2(&fd) => "qcow2".to_owned(),
            None => "raw".to_owned(),
        };
        if format.is_empty() || !format.bytes().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "{}: its qcow2 header names the backing format `{format}`",
                image.display()
            ));
        }
        next = if format == "qcow2" {
            qcow2_backing(&fd, &path)?
        } else {
            None
        };
        let set = b.new_set();
        b.add(fd, "read-only backing image", &path, Some(set));
        options.push_str(&format!(
            ",{prefix}driver={format},{prefix}file.filename=/dev/fdset/{set}"
        ));
        prefix.push_str("backing.");
        image = path;
    }
    Err(format!(
        "{}: its backing chain is longer than {MAX_CHAIN} images",
        top_path.display()
    ))
}

/// A backing file named in a qcow2 header.
struct Backing {
    name: Vec<u8>,
    /// From the backing format header extension, when present.
    format: Option<String>,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// Header extension holding the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// How much of the header maqetd reads (extensions live in the first cluster).
const HEADER_READ: usize = 64 * 1024;

fn is_qcow2(fd: &OwnedFd) -> bool {
    let mut magic = [0u8; 4];
    rustix::io::pread(fd, &mut magic, 0).is_ok_and(|n| n == 4 && magic == *QCOW2_MAGIC)
}

/// The backing file a qcow2 header names, if the file is a qcow2 image with one.
fn qcow2_backing(fd: &OwnedFd, image: &Path) -> Result<Option<Backing>, String> {
    let unreadable = |e: rustix::io::Errno| format!("cannot read {}: {e}", image.display());
    let mut header = vec![0u8; HEADER_READ];
    let read = rustix::io::pread(fd, &mut header, 0).map_err(unreadable)?;
    header.truncate(read);
    if header.len() < 72 || header[..4] != *QCOW2_MAGIC {
        return Ok(None);
    }
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let (offset, size) = (be64(8), be32(16) as usize);
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    // QEMU refuses names longer than 1023 bytes.
    if size > 1023 {
        return Err(format!(
            "{}: its qcow2 header names a backing file of {size} bytes",
            image.display()
        ));
    }
    let mut name = vec![0u8; size];
    let read = rustix::io::pread(fd, &mut name, offset).map_err(unreadable)?;
    name.truncate(read);
    // Version 2 headers are 72 bytes; version 3 says how long it is.
    let mut at = if be32(4) >= 3 && header.len() >= 104 {
        be32(100) as usize
    } else {
        72
    };
    let mut format = None;
    while at + 8 <= header.len() {
        let (kind, len) = (be32(at), be32(at + 4) as usize);
        let data = at + 8;
        if kind == 0 || data + len > header.len() {
            break;
        }
        if kind == EXT_BACKING_FORMAT {
            format = Some(String::from_utf8_lossy(&header[data..data + len]).into_owned());
        }
        at = data + len.div_ceil(8) * 8;
    }
    Ok(Some(Backing { name, format }))
}

/// Where a header's backing name leads (relative names are relative to the image's
/// directory), checked like a path in a config for read-only use; protocol names
/// (`json:…`, `nbd:…`) are refused.
fn backing_location(backing: &Backing, image: &Path, home: &Path) -> Result<PathBuf, String> {
    let text = String::from_utf8_lossy(&backing.name).into_owned();
    let refuse = |why: String| {
        format!(
            "{}: its qcow2 header names the backing file {why}. Declare the backing image with `backing_file` in the storage entry, or rebase the image (`qemu-img rebase`)",
            image.display()
        )
    };
    if text.split('/').next().unwrap_or("").contains(':') {
        return Err(refuse(format!("`{text}`, a protocol maqet cannot check")));
    }
    let raw = Path::new(std::ffi::OsStr::from_bytes(&backing.name));
    let path = match image.parent() {
        Some(dir) if !raw.is_absolute() => dir.join(raw),
        _ => raw.to_path_buf(),
    };
    danger::check(&path, home, PathUse::BootInput)
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
            vm_data_dir: None,
            probe_format: None,
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
        assert_eq!(err.kind().as_str(), "Storage");
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
            vm_data_dir: None,
            probe_format: None,
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
            assert_eq!(err.kind().as_str(), "Storage");
            assert!(err.to_string().contains("names the backing file"), "{err}");
            assert!(err.to_string().contains(".ssh"), "{err}");
        }
        // Read as raw, its header means nothing.
        open_for_qemu(
            &load("arguments: [{drive: {file: evil.qcow2, format: raw}}]\n"),
            &home,
        )
        .unwrap();
        // A relative backing name in an allowed place is passed as an fd set too.
        let opened =
            open_for_qemu(&load("storage: [{type: qcow2, file: good.qcow2}]\n"), &home).unwrap();
        assert_eq!(
            opened.args.last().unwrap(),
            "file=/dev/fdset/1,format=qcow2,if=virtio,id=disk0,node-name=maqet-d0,backing.driver=raw,backing.file.filename=/dev/fdset/2"
        );
        assert!(opened.notes.contains(&format!(
            "fd 5 = {}/fine.raw (read-only backing image)",
            dir.display()
        )));
        // A declared backing replaces the header's.
        open_for_qemu(
            &load("storage: [{type: qcow2, file: evil.qcow2, backing_file: fine.raw, backing_format: raw}]\n"),
            &home,
        )
        .unwrap();
    }
}
