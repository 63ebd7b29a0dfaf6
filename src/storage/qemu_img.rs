//! Running `qemu-img`: finding it, command lines that never let it guess an image's
//! format, cancellation, the JSON it prints, and errors that say what failed.
//!
//! Every image is named with `--image-opts driver=<format>,file.filename=<path>` (or
//! `-f`): format probing of a raw image the guest wrote could read it as qcow2 with a
//! backing file anywhere on the host.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::watch;

use super::error::StorageError;
use crate::config::{escape_commas, find_binary};

/// The fd number a new image is handed to `qemu-img create` at (`/proc/self/fd/3`).
const IMAGE_FD: i32 = 3;
/// How much of `qemu-img`'s stderr an error carries.
const STDERR_LIMIT: usize = 1024;

/// A `qemu-img` found on the service's `PATH`.
#[derive(Debug, Clone)]
pub struct QemuImg {
    program: PathBuf,
}

/// Why a `qemu-img` run did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The caller cancelled; the process was killed and reaped.
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Failed(#[from] StorageError),
}

/// What `qemu-img snapshot` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOp {
    Create,
    Apply,
    Delete,
}

impl SnapshotOp {
    fn flag(self) -> &'static str {
        match self {
            SnapshotOp::Create => "-c",
            SnapshotOp::Apply => "-a",
            SnapshotOp::Delete => "-d",
        }
    }
}

/// One internal snapshot, as `qemu-img info` and QMP's `ImageInfo` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// Bytes of saved VM state (0: a disk-only snapshot).
    pub vm_state_size: u64,
    /// µs since the Unix epoch.
    pub date_us: u64,
    /// The guest's clock at the snapshot, ns.
    pub vm_clock_ns: u64,
}

/// The parts of QEMU's `ImageInfo` maqet uses (same schema from `qemu-img info
/// --output=json` and from QMP `query-block`'s `inserted.image`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    /// Bytes allocated on the host (0 when QEMU could not tell).
    pub actual_size: u64,
    pub snapshots: Vec<SnapshotInfo>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawImageInfo {
    format: String,
    virtual_size: u64,
    #[serde(default)]
    actual_size: u64,
    #[serde(default)]
    snapshots: Vec<RawSnapshot>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawSnapshot {
    name: String,
    vm_state_size: u64,
    date_sec: u64,
    date_nsec: u64,
    vm_clock_sec: u64,
    vm_clock_nsec: u64,
}

impl ImageInfo {
    pub fn from_json(value: &serde_json::Value) -> Result<ImageInfo, String> {
        let raw = RawImageInfo::deserialize(value).map_err(|e| e.to_string())?;
        Ok(ImageInfo {
            format: raw.format,
            virtual_size: raw.virtual_size,
            actual_size: raw.actual_size,
            snapshots: raw
                .snapshots
                .into_iter()
                .map(|s| SnapshotInfo {
                    name: s.name,
                    vm_state_size: s.vm_state_size,
                    date_us: s.date_sec * 1_000_000 + s.date_nsec / 1_000,
                    vm_clock_ns: s.vm_clock_sec * 1_000_000_000 + s.vm_clock_nsec,
                })
                .collect(),
        })
    }
}

/// What `qemu-img check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// No corruption and no error (leaks are harmless).
    pub ok: bool,
    pub message: String,
}

impl QemuImg {
    /// Finds `qemu-img` on `path_env`, or says which package ships it.
    pub fn find(path_env: Option<&OsStr>) -> Result<QemuImg, StorageError> {
        find_binary("qemu-img", path_env)
            .map(|program| QemuImg { program })
            .map_err(|e| {
                StorageError::Failed(format!(
                    "{}; maqet needs qemu-img for disk images and snapshots: install the `qemu-utils` package (Debian, Ubuntu) or `qemu-img` (Fedora)",
                    e.message.replace("QEMU binary", "the program")
                ))
            })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LC_ALL", "C")
            .kill_on_drop(true);
        cmd
    }

    /// `driver=<format>,file.filename=<path>`: the image, with its format stated.
    fn image_opts(format: &str, path: &Path) -> String {
        format!(
            "driver={format},file.filename={}",
            escape_commas(&path.to_string_lossy())
        )
    }

    /// Size, allocation and internal snapshots of an image. `-U` lets it read an
    /// image a running QEMU holds.
    pub async fn info(&self, format: &str, path: &Path) -> Result<ImageInfo, StorageError> {
        let mut cmd = self.command();
        cmd.args(["info", "-U", "--output=json", "--image-opts"])
            .arg(Self::image_opts(format, path));
        let out = run(cmd, "info", path, None).await.map_err(failed)?;
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            StorageError::Failed(format!(
                "qemu-img info {}: unreadable output ({e})",
                path.display()
            ))
        })?;
        ImageInfo::from_json(&value).map_err(|e| {
            StorageError::Failed(format!(
                "qemu-img info {}: unexpected output ({e})",
                path.display()
            ))
        })
    }

    /// `qemu-img check` of a qcow2 image (read-only; `-U` while a VM uses it).
    pub async fn check(&self, path: &Path, in_use: bool) -> Result<CheckReport, StorageError> {
        let mut cmd = self.command();
        cmd.args(["check", "--output=json"]);
        if in_use {
            cmd.arg("-U");
        }
        cmd.arg("--image-opts").arg(Self::image_opts("qcow2", path));
        let out = match spawn_and_wait(cmd, None).await {
            Ok(out) => out,
            Err(WaitError::Io(e)) => return Err(spawn_error("check", e)),
            Err(WaitError::Cancelled) => unreachable!("no cancel receiver"),
        };
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let count = |k: &str| json.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        // Exit codes (qemu-img(1)): 0 clean, 2 corrupted, 3 leaked clusters only.
        Ok(match out.status.code() {
            Some(0) => CheckReport {
                ok: true,
                message: "no errors".into(),
            },
            Some(3) => CheckReport {
                ok: true,
                message: format!(
                    "{} leaked clusters (harmless; `qemu-img check -r leaks` reclaims them while the VM is stopped)",
                    count("leaks")
                ),
            },
            Some(2) => CheckReport {
                ok: false,
                message: format!(
                    "{} corruptions, {} leaked clusters: restore from a backup, or repair with `qemu-img check -r all` while the VM is stopped",
                    count("corruptions"),
                    count("leaks")
                ),
            },
            _ => CheckReport {
                ok: false,
                message: format!("the check could not complete: {}", stderr_text(&out)),
            },
        })
    }

    /// `qemu-img snapshot -c|-a|-d NAME` on a qcow2 image; killed when `cancel` turns
    /// true.
    pub async fn snapshot(
        &self,
        op: SnapshotOp,
        name: &str,
        path: &Path,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let mut cmd = self.command();
        cmd.args(["snapshot", op.flag(), name, "--image-opts"])
            .arg(Self::image_opts("qcow2", path));
        run(cmd, &format!("snapshot {}", op.flag()), path, Some(cancel))
            .await
            .map(|_| ())
    }

    /// Formats the (empty, just created) image open at `image`: `qemu-img` opens it
    /// through `/proc/self/fd/3`, the very inode maqet created, never by a path that
    /// could have been swapped since.
    pub async fn create(
        &self,
        image: BorrowedFd<'_>,
        shown: &Path,
        format: &str,
        size: Option<u64>,
        backing: Option<(&Path, &str)>,
    ) -> Result<(), StorageError> {
        let mut cmd = self.command();
        cmd.args(["create", "-q", "-f", format]);
        if let Some((file, fmt)) = backing {
            // A relative backing name is relative to the image's directory, which
            // qemu-img cannot see through /proc/self/fd: it is recorded unchecked (-u),
            // and maqetd opens and checks the chain itself at start.
            if file.is_relative() {
                cmd.arg("-u");
            }
            cmd.arg("-b").arg(file).args(["-F", fmt]);
        }
        cmd.arg(format!("/proc/self/fd/{IMAGE_FD}"));
        if let Some(size) = size {
            cmd.arg(size.to_string());
        }
        let fd = image.as_raw_fd();
        // SAFETY: place_fd only calls dup2/fcntl, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || crate::child::place_fd(fd, IMAGE_FD));
        }
        run(cmd, "create", shown, None).await.map_err(failed)?;
        Ok(())
    }

    /// Changes the virtual size of the image open at `image` to `size` bytes
    /// (`qemu-img resize`, through `/proc/self/fd/3` like [`QemuImg::create`]). `shrink`
    /// allows a smaller size, which cuts off the end of the disk. A qcow2's backing
    /// chain is not opened (`"backing": null`): resizing an overlay does not read it.
    pub async fn resize(
        &self,
        image: BorrowedFd<'_>,
        shown: &Path,
        format: &str,
        size: u64,
        shrink: bool,
    ) -> Result<(), StorageError> {
        let mut cmd = self.command_with_fd(image);
        cmd.args(["resize", "-q"]);
        if shrink {
            cmd.arg("--shrink");
        }
        let file = format!("/proc/self/fd/{IMAGE_FD}");
        if format == "qcow2" {
            let spec = serde_json::json!({
                "driver": "qcow2",
                "backing": null,
                "file": { "driver": "file", "filename": file },
            });
            cmd.arg(format!("json:{spec}"));
        } else {
            cmd.args(["-f", format]).arg(file);
        }
        cmd.arg(size.to_string());
        run(cmd, "resize", shown, None).await.map_err(failed)?;
        Ok(())
    }

    /// Rewrites the backing file name in the header of the qcow2 image open at
    /// `image` (`rebase -u`: the data is not touched and the backing is not opened).
    pub async fn set_backing_name(
        &self,
        image: BorrowedFd<'_>,
        shown: &Path,
        name: &Path,
        format: &str,
    ) -> Result<(), StorageError> {
        let mut cmd = self.command();
        cmd.args(["rebase", "-q", "-u", "-f", "qcow2", "-b"])
            .arg(name)
            .args(["-F", format])
            .arg(format!("/proc/self/fd/{IMAGE_FD}"));
        let fd = image.as_raw_fd();
        // SAFETY: place_fd only calls dup2/fcntl, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || crate::child::place_fd(fd, IMAGE_FD));
        }
        run(cmd, "rebase", shown, None).await.map_err(failed)?;
        Ok(())
    }
}

/// What `qemu-img info` says about a file offered for import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probed {
    pub format: String,
    pub virtual_size: u64,
    /// Why the image reaches beyond itself (a backing file, an external data file,
    /// extents in other files), if it does.
    pub external: Option<String>,
}

impl Probed {
    pub fn from_json(v: &serde_json::Value) -> Result<Probed, String> {
        let format = v["format"].as_str().ok_or("no format")?.to_owned();
        let virtual_size = v["virtual-size"].as_u64().ok_or("no virtual-size")?;
        let own = v["filename"].as_str().unwrap_or_default();
        let data = &v["format-specific"]["data"];
        let external = if let Some(b) = v["backing-filename"].as_str() {
            Some(format!("it has a backing file ({b})"))
        } else if let Some(d) = data["data-file"].as_str() {
            Some(format!("it keeps its data in another file ({d})"))
        } else {
            data["extents"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["filename"].as_str())
                .find(|f| *f != own)
                .map(|f| format!("it has an extent in another file ({f})"))
        };
        Ok(Probed {
            format,
            virtual_size,
            external,
        })
    }
}

/// `(12.50/100%)` in `qemu-img convert -p` output → 0.125.
pub fn parse_progress(piece: &str) -> Option<f64> {
    let inner = piece.trim().strip_prefix('(')?.strip_suffix(")")?;
    let (done, total) = inner.split_once('/')?;
    let total: f64 = total.strip_suffix('%')?.parse().ok()?;
    let done: f64 = done.parse().ok()?;
    (total > 0.0).then(|| (done / total).clamp(0.0, 1.0))
}

impl QemuImg {
    /// A command with `fd` placed at `/proc/self/fd/3` in the child.
    fn command_with_fd(&self, fd: BorrowedFd<'_>) -> Command {
        let mut cmd = self.command();
        let fd = fd.as_raw_fd();
        // SAFETY: place_fd only calls dup2/fcntl, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || crate::child::place_fd(fd, IMAGE_FD));
        }
        cmd
    }

    /// `qemu-img info` of the file open at `fd` (a caller's file: read through the fd,
    /// never by a name). `format` None: qemu-img recognises it.
    pub async fn probe_fd(
        &self,
        fd: BorrowedFd<'_>,
        format: Option<&str>,
        shown: &Path,
    ) -> Result<Probed, StorageError> {
        let mut cmd = self.command_with_fd(fd);
        cmd.args(["info", "--output=json"]);
        if let Some(f) = format {
            cmd.args(["-f", f]);
        }
        cmd.arg(format!("/proc/self/fd/{IMAGE_FD}"));
        let out = run(cmd, "info", shown, None).await.map_err(failed)?;
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Probed::from_json(&value).map_err(|e| {
            StorageError::Failed(format!(
                "qemu-img info {}: unexpected output ({e})",
                shown.display()
            ))
        })
    }

    /// `qemu-img check` of the file at `fd`: `Err` with what is wrong when it is corrupt
    /// or truncated; formats without a check pass.
    pub async fn check_fd(
        &self,
        fd: BorrowedFd<'_>,
        format: &str,
        shown: &Path,
    ) -> Result<(), StorageError> {
        let mut cmd = self.command_with_fd(fd);
        cmd.args(["check", "-q", "-f", format])
            .arg(format!("/proc/self/fd/{IMAGE_FD}"));
        let out = match spawn_and_wait(cmd, None).await {
            Ok(out) => out,
            Err(WaitError::Io(e)) => return Err(spawn_error("check", e)),
            Err(WaitError::Cancelled) => unreachable!("no cancel receiver"),
        };
        // qemu-img(1): 0 clean, 3 leaks only, 63 the format has no check.
        match out.status.code() {
            Some(0 | 3 | 63) => Ok(()),
            Some(2) => Err(StorageError::Failed(format!(
                "{} is a damaged {format} image (qemu-img check found corruption; a truncated download looks like this): download or copy it again",
                shown.display()
            ))),
            _ => Err(StorageError::Failed(format!(
                "{} cannot be checked as a {format} image: {}",
                shown.display(),
                stderr_text(&out)
            ))),
        }
    }

    /// `qemu-img convert -p` of the file at `fd` into a new qcow2 file at `target`,
    /// reporting progress (0..1) as it goes; killed (and reaped) when `cancel` turns
    /// true.
    pub async fn convert_fd(
        &self,
        fd: BorrowedFd<'_>,
        format: &str,
        target: &Path,
        progress: Box<dyn Fn(f64) + Send + Sync>,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let mut cmd = self.command_with_fd(fd);
        cmd.args(["convert", "-p", "-f", format, "-O", "qcow2"])
            .arg(format!("/proc/self/fd/{IMAGE_FD}"))
            .arg(target);
        convert_with_progress(cmd, progress, cancel).await
    }

    /// `qemu-img convert -p` of a VM's own disk (format stated, its backing chain
    /// flattened) into a new file of the same format at `target`, with progress and
    /// cancellation as [`QemuImg::convert_fd`].
    pub async fn copy_disk(
        &self,
        source: &Path,
        format: &str,
        target: &Path,
        progress: Box<dyn Fn(f64) + Send + Sync>,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let mut cmd = self.command();
        cmd.args(["convert", "-p", "-f", format, "-O", format])
            .arg(source)
            .arg(target);
        convert_with_progress(cmd, progress, cancel).await
    }

    /// [`QemuImg::copy_disk`] into a new file `name` in the directory open at `dir`
    /// (qemu-img reaches it as `/proc/self/fd/3/<name>`).
    pub async fn copy_disk_into(
        &self,
        source: &Path,
        format: &str,
        dir: BorrowedFd<'_>,
        name: &str,
        progress: Box<dyn Fn(f64) + Send + Sync>,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let mut cmd = self.command_with_fd(dir);
        cmd.args(["convert", "-p", "-f", format, "-O", format])
            .arg(source)
            .arg(format!("/proc/self/fd/{IMAGE_FD}/{name}"));
        convert_with_progress(cmd, progress, cancel).await
    }
}

/// Runs a `qemu-img convert -p`, turning its progress lines into calls of `progress`.
async fn convert_with_progress(
    mut cmd: Command,
    progress: Box<dyn Fn(f64) + Send + Sync>,
    cancel: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    if *cancel.borrow() {
        return Err(RunError::Cancelled);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| RunError::Failed(spawn_error("convert", e)))?;
    let (stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let reader = tokio::spawn(async move {
        let mut err = Vec::new();
        let progress_lines = async {
            let Some(mut out) = stdout else { return };
            let (mut buf, mut chunk) = (Vec::new(), [0u8; 512]);
            while let Ok(n) = out.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|b| *b == b'\r' || *b == b'\n') {
                    let piece: Vec<u8> = buf.drain(..=end).collect();
                    if let Some(p) = parse_progress(&String::from_utf8_lossy(&piece)) {
                        progress(p);
                    }
                }
                // Never more than one unfinished line.
                buf.truncate(256);
            }
        };
        let errors = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut err).await;
            }
        };
        tokio::join!(progress_lines, errors);
        err
    });
    let cancelled = async {
        if cancel.wait_for(|c| *c).await.is_ok() {
            return;
        }
        std::future::pending::<()>().await
    };
    let status = tokio::select! {
        status = child.wait() => status.map_err(|e| RunError::Failed(spawn_error("convert", e)))?,
        () = cancelled => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            reader.abort();
            return Err(RunError::Cancelled);
        }
    };
    let stderr = reader.await.unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let out = std::process::Output {
        status,
        stdout: Vec::new(),
        stderr,
    };
    Err(RunError::Failed(convert_failed(&stderr_text(&out))))
}

/// A failed `qemu-img convert`: a full file system is told as such ([`StorageError::NoSpace`]).
fn convert_failed(stderr: &str) -> StorageError {
    if stderr.contains("No space left on device") {
        StorageError::NoSpace(format!(
            "the disk is full: qemu-img convert found no space left on the device it writes to ({stderr}); free some space there and try again"
        ))
    } else {
        StorageError::Failed(format!("qemu-img convert failed: {stderr}"))
    }
}

/// The format `qemu-img info` detects for the backing image `path`, for a storage
/// entry that names `backing_file` without `backing_format` (maqet 0.0.x configs).
/// Synchronous (config validation is): only a regular file is handed to qemu-img, so
/// a FIFO or device cannot make it block. The probe reads only this file's header;
/// the chain below it is still checked link by link at start (`hostfiles`).
pub fn probe_format(path_env: Option<&OsStr>, path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read it ({e})"))?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    let img = QemuImg::find(path_env).map_err(|e| e.to_string())?;
    let out = std::process::Command::new(&img.program)
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .stdin(Stdio::null())
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("cannot run qemu-img info: {e}"))?;
    if !out.status.success() {
        return Err(format!("qemu-img info failed: {}", stderr_text(&out)));
    }
    let value: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("qemu-img info printed unreadable output ({e})"))?;
    match value.get("format").and_then(|f| f.as_str()) {
        Some(format) if !format.is_empty() => Ok(format.to_owned()),
        _ => Err("qemu-img info named no format".into()),
    }
}

/// The name an overlay at `image` records for its backing file `backing`: relative
/// when the backing file lies in the overlay's directory or below it, so the directory
/// can be moved as a whole; else the absolute path.
pub fn recorded_backing_name(image: &Path, backing: &Path) -> Option<PathBuf> {
    let relative = backing.strip_prefix(image.parent()?).ok()?;
    let plain = relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    (plain && !relative.as_os_str().is_empty()).then(|| relative.to_path_buf())
}

fn failed(e: RunError) -> StorageError {
    match e {
        RunError::Failed(e) => e,
        RunError::Cancelled => StorageError::Cancelled,
    }
}

fn spawn_error(what: &str, e: std::io::Error) -> StorageError {
    StorageError::Spawn {
        what: what.to_string(),
        source: e,
    }
}

fn stderr_text(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    let text = text.trim();
    let cut = text.len().saturating_sub(STDERR_LIMIT);
    // Keep the tail (the actual error), on a char boundary.
    let start = (cut..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    let tail = &text[start..];
    if tail.is_empty() {
        format!("exit status {}", out.status)
    } else {
        tail.replace('\n', "; ")
    }
}

/// Runs to completion; a nonzero exit is a `Storage` error carrying qemu-img's stderr.
async fn run(
    cmd: Command,
    what: &str,
    path: &Path,
    cancel: Option<&mut watch::Receiver<bool>>,
) -> Result<std::process::Output, RunError> {
    let out = spawn_and_wait(cmd, cancel).await.map_err(|e| match e {
        WaitError::Cancelled => RunError::Cancelled,
        WaitError::Io(e) => RunError::Failed(spawn_error(what, e)),
    })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(RunError::Failed(StorageError::Failed(format!(
            "qemu-img {what} {} failed: {}",
            path.display(),
            stderr_text(&out)
        ))))
    }
}

enum WaitError {
    Cancelled,
    Io(std::io::Error),
}

impl From<std::io::Error> for WaitError {
    fn from(e: std::io::Error) -> Self {
        WaitError::Io(e)
    }
}

/// Spawns, collects output, waits. On cancellation the child is killed and reaped
/// before returning, so its image lock is gone when the caller cleans up.
async fn spawn_and_wait(
    mut cmd: Command,
    cancel: Option<&mut watch::Receiver<bool>>,
) -> Result<std::process::Output, WaitError> {
    let already = cancel.as_ref().is_some_and(|c| *c.borrow());
    if already {
        return Err(WaitError::Cancelled);
    }
    let mut child = cmd.spawn()?;
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let output = tokio::spawn(async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut out).await;
        }
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut err).await;
        }
        (out, err)
    });
    let cancelled = async {
        if let Some(rx) = cancel
            && rx.wait_for(|c| *c).await.is_ok()
        {
            return;
        }
        std::future::pending::<()>().await
    };
    let status = tokio::select! {
        status = child.wait() => Some(status?),
        () = cancelled => None,
    };
    let Some(status) = status else {
        let _ = child.start_kill();
        let _ = child.wait().await;
        output.abort();
        return Err(WaitError::Cancelled);
    };
    let (stdout, stderr) = output.await.unwrap_or_default();
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_info_from_qemu_json() {
        let v = serde_json::json!({
            "snapshots": [{"vm-clock-nsec": 929334938, "name": "s1", "date-sec": 1795316966,
                "date-nsec": 550466000, "vm-clock-sec": 2, "id": "1", "vm-state-size": 777340}],
            "virtual-size": 67108864, "filename": "d.qcow2", "format": "qcow2",
            "actual-size": 1130496, "dirty-flag": false
        });
        let info = ImageInfo::from_json(&v).unwrap();
        assert_eq!(info.virtual_size, 64 << 20);
        assert_eq!(info.actual_size, 1130496);
        assert_eq!(
            info.snapshots,
            vec![SnapshotInfo {
                name: "s1".into(),
                vm_state_size: 777340,
                date_us: 1_795_316_966_550_466,
                vm_clock_ns: 2_929_334_938,
            }]
        );
        let bare = serde_json::json!({"virtual-size": 1, "format": "raw"});
        assert!(ImageInfo::from_json(&bare).unwrap().snapshots.is_empty());
    }

    #[test]
    fn convert_progress_and_foreign_parts() {
        assert_eq!(parse_progress("    (12.50/100%)\r"), Some(0.125));
        assert_eq!(parse_progress("(100.00/100%)"), Some(1.0));
        assert_eq!(parse_progress("garbage"), None);
        assert_eq!(parse_progress("(1/0%)"), None);
        let vmdk = serde_json::json!({"format": "vmdk", "virtual-size": 1, "filename": "/proc/self/fd/3",
            "format-specific": {"type": "vmdk", "data": {"extents": [{"filename": "/etc/shadow"}]}}});
        let p = Probed::from_json(&vmdk).unwrap();
        assert!(p.external.unwrap().contains("/etc/shadow"));
        let backed =
            serde_json::json!({"format": "qcow2", "virtual-size": 1, "backing-filename": "b.img"});
        assert!(Probed::from_json(&backed).unwrap().external.is_some());
        let plain = serde_json::json!({"format": "qcow2", "virtual-size": 5, "filename": "x",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}});
        assert_eq!(Probed::from_json(&plain).unwrap().external, None);
    }

    #[test]
    fn a_full_file_system_is_told_as_such() {
        let full =
            convert_failed("qemu-img: error while writing at byte 0: No space left on device");
        assert!(matches!(full, StorageError::NoSpace(_)), "{full:?}");
        assert!(full.to_string().starts_with("the disk is full"), "{full}");
        let other = convert_failed("Could not open 'x': Permission denied");
        assert!(matches!(other, StorageError::Failed(_)), "{other:?}");
        assert!(other.to_string().starts_with("qemu-img convert failed"));
    }

    #[test]
    fn image_opts_state_the_format_and_escape_commas() {
        assert_eq!(
            QemuImg::image_opts("qcow2", Path::new("/v/a,b.qcow2")),
            "driver=qcow2,file.filename=/v/a,,b.qcow2"
        );
    }

    #[test]
    fn a_backing_name_is_relative_only_inside_the_overlay_directory() {
        let rel = |image: &str, backing: &str| {
            recorded_backing_name(Path::new(image), Path::new(backing))
        };
        assert_eq!(rel("/v/a/o.qcow2", "/v/a/b.qcow2"), Some("b.qcow2".into()));
        assert_eq!(
            rel("/v/a/o.qcow2", "/v/a/base/b.qcow2"),
            Some("base/b.qcow2".into())
        );
        assert_eq!(rel("/v/a/o.qcow2", "/v/b.qcow2"), None);
        assert_eq!(rel("/v/a/o.qcow2", "/v/ab/b.qcow2"), None);
        assert_eq!(rel("/v/a/o.qcow2", "/v/a"), None);
    }

    #[test]
    fn probing_tells_qcow2_from_raw_and_refuses_what_is_no_file() {
        let Some(_) = crate::require::require(
            QemuImg::find(std::env::var_os("PATH").as_deref()).map_err(|e| e.to_string()),
        ) else {
            return;
        };
        let path_env = std::env::var_os("PATH");
        let probe = |p: &Path| probe_format(path_env.as_deref(), p);
        let dir = tempfile::tempdir().unwrap();
        let qcow2 = dir.path().join("base.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&qcow2)
            .arg("1M")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let raw = dir.path().join("base.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert_eq!(probe(&qcow2).unwrap(), "qcow2");
        assert_eq!(probe(&raw).unwrap(), "raw");
        // Missing, a FIFO (qemu-img would block on it), a device: refused, not probed.
        let err = probe(&dir.path().join("missing")).unwrap_err();
        assert!(err.contains("cannot read it"), "{err}");
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(probe(&fifo).unwrap_err(), "it is not a regular file");
        assert_eq!(
            probe(Path::new("/dev/zero")).unwrap_err(),
            "it is not a regular file"
        );
        // A broken qcow2 header: qemu-img's own error.
        let broken = dir.path().join("broken.qcow2");
        let mut bytes = std::fs::read(&qcow2).unwrap();
        bytes.truncate(8);
        std::fs::write(&broken, bytes).unwrap();
        let err = probe(&broken).unwrap_err();
        assert!(err.starts_with("qemu-img info failed"), "{err}");
    }

    #[test]
    fn a_missing_qemu_img_names_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let err = QemuImg::find(Some(dir.path().as_os_str())).unwrap_err();
        assert_eq!(err.kind().as_str(), "Storage");
        assert!(err.to_string().contains("qemu-utils"), "{err}");
    }
}
