//! Reading config files for the service: by path (`AddVMFromFiles`, the service's own
//! user only) or from a file descriptor a client opened (`AddVMFromFds`).
//!
//! A config file is a regular file of at most [`MAX_CONFIG_BYTES`]: anything else
//! (a FIFO that never answers, `/dev/zero` that never ends, a directory, a socket) is
//! refused after one `fstat`, before a byte is read. Paths are opened with `O_NONBLOCK`
//! (opening a FIFO does not wait for a writer) and `O_NOCTTY`; symlinks are followed
//! (the caller is the service's own user, who can read the target anyway, and dotfile
//! setups link configs). Both readers block: the service calls them from
//! `spawn_blocking`, never on an async worker.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::ConfigSource;

/// The largest config file read (1 MiB): far above any real config.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Why a config file could not be read; the message names the file and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Not a regular file, too big, unreadable: the argument is wrong.
    File(String),
    /// Read, but not text.
    Text(String),
}

impl std::error::Error for ReadError {}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::File(m) | ReadError::Text(m) => f.write_str(m),
        }
    }
}

/// Reads the config file at an absolute `path`; its relative paths resolve against
/// the directory it is in.
pub fn read_path(path: &Path) -> Result<ConfigSource, ReadError> {
    let label = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| ReadError::File(format!("cannot open config file {label}: {e}")))?;
    let text = read_capped(&file, &label)?;
    Ok(ConfigSource {
        origin: label,
        text,
        base_dir: path.parent().unwrap_or(Path::new("/")).to_path_buf(),
    })
}

/// Reads a config from a file descriptor a client passed (`index`: its position in the
/// call, for messages). It is named by the path `/proc/self/fd` shows; its relative
/// paths resolve against that path's directory when the path still names this very
/// file (same device and inode), else they are refused (deleted, renamed, or a file
/// from another mount namespace: there is no directory to trust).
pub fn read_fd(fd: OwnedFd, index: usize) -> Result<ConfigSource, ReadError> {
    let file = File::from(fd);
    let fd_path = std::fs::read_link(format!("/proc/self/fd/{}", fd_number(&file))).ok();
    let meta = file
        .metadata()
        .map_err(|e| ReadError::File(format!("cannot fstat config file #{index}: {e}")))?;
    let named = fd_path
        .filter(|p| p.is_absolute())
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| same_file(&m, &meta)));
    let label = match &named {
        Some(p) => p.display().to_string(),
        None => format!("config file #{index}"),
    };
    let text = read_capped(&file, &label)?;
    let base_dir = match &named {
        Some(p) => p.parent().unwrap_or(Path::new("/")).to_path_buf(),
        // Relative: `resolve_host_path` refuses relative paths against it, with this text.
        None => PathBuf::from(format!(
            "(none: {label} was passed as a file descriptor with no path naming it)"
        )),
    };
    Ok(ConfigSource {
        origin: label,
        text,
        base_dir,
    })
}

fn fd_number(file: &File) -> i32 {
    use std::os::fd::AsRawFd;
    file.as_raw_fd()
}

fn same_file(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// `fstat` first: only a regular file within the cap is read, and never past the cap
/// (it may grow while being read). Reads from offset 0 without moving the file's
/// offset, which a passed descriptor shares with its sender.
fn read_capped(file: &File, label: &str) -> Result<String, ReadError> {
    let meta = file
        .metadata()
        .map_err(|e| ReadError::File(format!("cannot fstat config file {label}: {e}")))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO (named pipe)"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(ReadError::File(format!(
            "config file {label} is {what}; a config must be a regular file (save it to a file first)"
        )));
    }
    let too_big = || {
        ReadError::File(format!(
            "config file {label} is larger than {MAX_CONFIG_BYTES} bytes (1 MiB), the most a VM config may be"
        ))
    };
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    let mut reader = OffsetReader { file, offset: 0 };
    (&mut reader)
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::File(format!("cannot read config file {label}: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes).map_err(|e| {
        ReadError::Text(format!(
            "config file {label} is not UTF-8 text (invalid byte at offset {}); a VM config is YAML text",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// `pread` from a running offset.
struct OffsetReader<'a> {
    file: &'a File,
    offset: u64,
}

impl Read for OffsetReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_error(r: Result<ConfigSource, ReadError>) -> String {
        match r {
            Err(ReadError::File(m)) => m,
            other => panic!("expected a file error, got {other:?}"),
        }
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(file_error(read_path(Path::new("/dev/zero"))).contains("character device"));
        assert!(file_error(read_path(dir.path())).contains("directory"));
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from(0o600)).unwrap();
        assert!(file_error(read_path(&fifo)).contains("FIFO"));
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
        assert!(file_error(read_path(&big)).contains("1 MiB"));
        let ok = dir.path().join("ok.yaml");
        std::fs::write(&ok, "memory: 64\n").unwrap();
        let s = read_path(&ok).unwrap();
        assert_eq!(
            (s.text.as_str(), s.base_dir.as_path()),
            ("memory: 64\n", dir.path())
        );
        let bin = dir.path().join("bin.yaml");
        std::fs::write(&bin, b"\xff\xfe").unwrap();
        assert!(matches!(read_path(&bin), Err(ReadError::Text(_))));
    }

    #[test]
    fn a_passed_fd_is_named_by_its_path_and_read_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.yaml");
        std::fs::write(&path, "memory: 64\n").unwrap();
        let mut f = File::open(&path).unwrap();
        let mut skip = [0u8; 3];
        f.read_exact(&mut skip).unwrap();
        let s = read_fd(f.into(), 1).unwrap();
        assert_eq!(s.text, "memory: 64\n");
        assert_eq!(s.origin, path.display().to_string());
        assert_eq!(s.base_dir, dir.path());
        // Deleted: no directory to resolve against.
        let f = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let s = read_fd(f.into(), 2).unwrap();
        assert_eq!(s.origin, "config file #2");
        assert!(s.base_dir.is_relative());
    }
}
