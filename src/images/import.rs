//! Importing a file into the image store, as a job.
//!
//! The caller opens the file and passes the descriptor (maqetd never opens a caller's
//! path with its own authority); `qemu-img` reads it as `/proc/self/fd/3`. Before the
//! job starts: the descriptor must be a readable regular file, an ISO 9660 volume or
//! an image of a known format (qcow2, raw, vmdk, vdi, vhdx) that reaches no other file
//! (no backing file, data file or extent), and there must be room for it. The job then
//! checks the image (`qemu-img check`: a truncated download fails here), converts disk
//! images to qcow2 (`qemu-img convert -p`, progress on the job) or copies an ISO as it
//! is, records the SHA-256 of the stored file and adds the row. It writes to a hidden
//! temporary name and renames on success, so a failed or cancelled import leaves
//! nothing in the store.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{FileType, Mode, OFlags};

use super::{PARTIAL_PREFIX, validate_name};
use crate::jobs::{Job, JobState};
use crate::manager::Manager;
use crate::storage::QemuImg;
use crate::storage::StorageError;
use crate::storage::qemu_img::RunError;
use crate::store::ImageRecord;
use crate::vm::VmError;
use crate::vm::{Ctx, store_error};

/// Formats `qemu-img` may read on import.
pub const FORMATS: &[&str] = &["qcow2", "raw", "vmdk", "vdi", "vhdx"];
/// The job's `Operation`.
pub const OPERATION: &str = "image-import";
/// Where an ISO 9660 volume descriptor says `CD001`.
const ISO_MAGIC_AT: u64 = 0x8001;
const SECTOR: u64 = 512;

/// What the job produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Converted to qcow2 from this format.
    Disk(&'static str),
    /// Stored byte for byte.
    Iso,
}

impl Kind {
    fn store_format(self) -> &'static str {
        match self {
            Kind::Disk(_) => "qcow2",
            Kind::Iso => "iso",
        }
    }
}

/// Everything checked before the job starts.
struct Plan {
    fd: OwnedFd,
    shown: PathBuf,
    size: u64,
    kind: Kind,
    name: String,
    qemu_img: QemuImg,
    dir: PathBuf,
}

fn invalid(shown: &Path, why: impl std::fmt::Display) -> VmError {
    VmError::InvalidArgument(format!("cannot import {}: {why}", shown.display()))
}

/// Checks the request and starts the import job; returns it.
pub async fn start(
    manager: &Manager,
    fd: OwnedFd,
    name: &str,
    format: Option<&str>,
) -> Result<Arc<Job>, VmError> {
    let ctx = manager.ctx();
    // What the caller's file is called, for messages and the record only.
    let shown = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap_or_else(|_| PathBuf::from("the passed file"));
    let name = if name.is_empty() {
        super::name_from_file(&shown)
    } else {
        name.to_owned()
    };
    validate_name(&name)?;
    if let Some(f) = format
        && !FORMATS.contains(&f)
        && f != "iso"
    {
        return Err(VmError::InvalidArgument(format!(
            "unknown image format '{f}'; maqet imports {} and iso",
            FORMATS.join(", ")
        )));
    }
    let wanted = name.clone();
    if ctx
        .store
        .read(move |db| db.image(&wanted))
        .await
        .map_err(store_error)?
        .is_some()
    {
        return Err(VmError::AlreadyExists(format!(
            "an image named '{name}' is already in the store; choose another name (--name) or remove it first (maqet image rm {name})"
        )));
    }
    let size = readable_regular_file(&fd, &shown)?;
    let qemu_img = QemuImg::find(ctx.path_env.as_deref())?;
    let kind = match format {
        Some("iso") => Kind::Iso,
        _ if format.is_none() && is_iso(&fd) => Kind::Iso,
        _ => {
            let probed = qemu_img.probe_fd(fd.as_fd(), format, &shown).await?;
            let Some(known) = FORMATS.iter().find(|f| **f == probed.format) else {
                return Err(invalid(
                    &shown,
                    format!(
                        "it is a {} image; maqet imports {} and ISO images (convert it with qemu-img first)",
                        probed.format,
                        FORMATS.join(", ")
                    ),
                ));
            };
            if let Some(why) = probed.external {
                return Err(invalid(
                    &shown,
                    format!(
                        "{why}; import a self-contained image (`qemu-img convert -O qcow2` flattens it)"
                    ),
                ));
            }
            // Anything qemu-img does not recognise reads as raw: a raw disk is whole
            // sectors, a text file or a download page is not.
            if *known == "raw" && (size % SECTOR != 0) {
                return Err(invalid(
                    &shown,
                    format!(
                        "it is not a disk image: qemu-img recognises no image format in it, and as a raw disk its {size} bytes are not whole 512-byte sectors"
                    ),
                ));
            }
            Kind::Disk(known)
        }
    };
    let dir = ctx.paths.images_dir();
    crate::paths::create_private_dir(&dir)
        .map_err(|e| VmError::Storage(format!("image store {}: {e}", dir.display())))?;
    let dir_fd = rustix::fs::open(&dir, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| VmError::Storage(format!("image store {}: {e}", dir.display())))?;
    let available = crate::storage::space::available(&dir_fd)
        .map_err(|e| VmError::Storage(format!("image store {}: {e}", dir.display())))?;
    crate::storage::space::ensure(
        available,
        size,
        &format!("image '{name}' ({})", shown.display()),
        &dir,
    )?;
    let job = manager.jobs().new_job(
        OPERATION,
        "",
        &format!("importing {} as '{name}'", shown.display()),
    );
    tracing::info!(image = %name, job = job.id(), file = %shown.display(), kind = ?kind, "image import started");
    let plan = Plan {
        fd,
        shown,
        size,
        kind,
        name,
        qemu_img,
        dir,
    };
    tokio::spawn(run(manager.ctx().clone(), job.clone(), plan));
    Ok(job)
}

/// The size of the file open at `fd`, which must be a non-empty regular file opened
/// for reading.
fn readable_regular_file(fd: &OwnedFd, shown: &Path) -> Result<u64, VmError> {
    let st = rustix::fs::fstat(fd).map_err(|e| invalid(shown, e))?;
    let ty = FileType::from_raw_mode(st.st_mode);
    if ty != FileType::RegularFile {
        let what = match ty {
            FileType::Directory => "a directory",
            FileType::Fifo => "a pipe",
            FileType::CharacterDevice => "a character device",
            FileType::BlockDevice => "a block device",
            FileType::Socket => "a socket",
            _ => "not a regular file",
        };
        return Err(invalid(
            shown,
            format!("it is {what}; pass an image file (copy a device to a file first)"),
        ));
    }
    let flags = rustix::fs::fcntl_getfl(fd).map_err(|e| invalid(shown, e))?;
    if flags & OFlags::ACCMODE == OFlags::WRONLY {
        return Err(invalid(shown, "the descriptor is not open for reading"));
    }
    if st.st_size <= 0 {
        return Err(invalid(shown, "it is empty"));
    }
    Ok(st.st_size as u64)
}

fn is_iso(fd: &OwnedFd) -> bool {
    let mut magic = [0u8; 5];
    rustix::io::pread(fd, &mut magic, ISO_MAGIC_AT).is_ok_and(|n| n == 5 && &magic == b"CD001")
}

async fn run(ctx: Arc<Ctx>, job: Arc<Job>, plan: Plan) {
    let temp = plan.dir.join(format!(
        "{PARTIAL_PREFIX}{}.{}",
        uuid::Uuid::new_v4().simple(),
        plan.kind.store_format()
    ));
    let (state, message) = match import(&ctx, &job, &plan, &temp).await {
        Ok(rec) => (
            JobState::Completed,
            format!(
                "imported '{}' ({}, sha256 {})",
                rec.name, rec.format, rec.sha256
            ),
        ),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            let state = match e {
                RunError::Cancelled => JobState::Cancelled,
                RunError::Failed(_) => JobState::Failed,
            };
            (state, format!("{e}; nothing was added to the image store"))
        }
    };
    tracing::info!(image = %plan.name, job = job.id(), state = state.as_str(), %message, "image import finished");
    job.finish(state, &message);
}

async fn import(
    ctx: &Ctx,
    job: &Arc<Job>,
    plan: &Plan,
    temp: &Path,
) -> Result<ImageRecord, RunError> {
    let mut cancel = job.cancel_receiver();
    match plan.kind {
        Kind::Disk(format) => {
            job.set_progress(0.0, &format!("checking {}", plan.shown.display()));
            plan.qemu_img
                .check_fd(plan.fd.as_fd(), format, &plan.shown)
                .await?;
            let progress_job = job.clone();
            let progress = Box::new(move |p: f64| {
                progress_job.set_progress(p * 0.95, "converting to qcow2");
            });
            plan.qemu_img
                .convert_fd(plan.fd.as_fd(), format, temp, progress, &mut cancel)
                .await?;
        }
        Kind::Iso => {
            let fd = plan.fd.try_clone().map_err(|e| failed(&plan.shown, e))?;
            let (temp, size, job) = (temp.to_path_buf(), plan.size, job.clone());
            tokio::task::spawn_blocking(move || copy_iso(&fd, &temp, size, &job))
                .await
                .map_err(|e| failed(&plan.shown, e))??;
        }
    }
    job.set_progress(0.96, "computing the checksum");
    let hashed = temp.to_path_buf();
    let sha256 = tokio::task::spawn_blocking(move || sha256_file(&hashed))
        .await
        .map_err(|e| failed(temp, e))?
        .map_err(|e| failed(temp, e))?;
    let file_size = std::fs::metadata(temp).map_err(|e| failed(temp, e))?.len();
    let virtual_size = match plan.kind {
        Kind::Disk(_) => plan.qemu_img.info("qcow2", temp).await?.virtual_size,
        Kind::Iso => file_size,
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(temp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| failed(temp, e))?;
    // The outcome is decided here: a cancel that came first is honoured.
    if job.seal() {
        return Err(RunError::Cancelled);
    }
    let file = format!("{}.{}", plan.name, plan.kind.store_format());
    let target = plan.dir.join(&file);
    let cwd = rustix::fs::CWD;
    rustix::fs::renameat_with(cwd, temp, cwd, &target, rustix::fs::RenameFlags::NOREPLACE)
        .map_err(|e| {
            RunError::Failed(StorageError::Failed(format!(
                "cannot store the image as {} ({e}); a file of that name is in the store directory: move it away or choose another name",
                target.display()
            )))
        })?;
    let rec = ImageRecord {
        name: plan.name.clone(),
        file,
        format: plan.kind.store_format().to_owned(),
        virtual_size,
        file_size,
        sha256,
        source: plan
            .shown
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        imported_at: crate::time::now_us(),
    };
    let row = rec.clone();
    if let Err(e) = ctx.store.write(move |db| db.insert_image(&row)).await {
        let _ = std::fs::remove_file(&target);
        return Err(RunError::Failed(match e {
            crate::store::StoreError::NameTaken(n) => StorageError::Failed(format!(
                "an image named '{n}' was added to the store meanwhile; import again under another name"
            )),
            other => StorageError::Failed(store_error(other).to_string()),
        }));
    }
    Ok(rec)
}

fn failed(path: &Path, e: impl std::fmt::Display) -> RunError {
    RunError::Failed(StorageError::Failed(format!("{}: {e}", path.display())))
}

/// Copies `size` bytes from `src` (with `pread`: the caller's file offset is shared
/// and left alone) into a new file at `temp`.
fn copy_iso(src: &OwnedFd, temp: &Path, size: u64, job: &Job) -> Result<(), RunError> {
    use std::io::Write;
    let out = rustix::fs::open(
        temp,
        OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| failed(temp, e))?;
    let mut out = std::fs::File::from(out);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < size {
        if job.cancel_requested() {
            return Err(RunError::Cancelled);
        }
        let n = rustix::io::pread(src, &mut buf, at).map_err(|e| failed(temp, e))?;
        if n == 0 {
            return Err(failed(
                temp,
                format!("the file ended at {at} of {size} bytes (it shrank while being read)"),
            ));
        }
        out.write_all(&buf[..n])
            .map_err(|e| write_failed(temp, e))?;
        at += n as u64;
        job.set_progress(0.95 * at as f64 / size as f64, "copying the ISO image");
    }
    out.sync_all().map_err(|e| write_failed(temp, e))?;
    Ok(())
}

fn write_failed(path: &Path, e: std::io::Error) -> RunError {
    RunError::Failed(crate::storage::space::write_error(
        &path.display().to_string(),
        e,
    ))
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
