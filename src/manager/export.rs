//! Exporting a stopped VM into a directory the caller opened: `config.yaml` and one
//! standalone copy of each disk beside it, named relative to the config, so the
//! directory can be carried to another machine and defined there with
//! `maqet add --from-export DIR` (an ordinary add of `DIR/config.yaml`).
//!
//! The call checks and plans (which files, none of them present yet) and starts a job
//! that copies the disks (`qemu-img convert -p`, progress on the job, cancellable).
//! Every file is written under a hidden temporary name and renamed (never over an
//! existing file) only when all are whole; a failed or cancelled export leaves nothing.
//! maqetd writes only through the directory descriptor the caller passed (`openat`,
//! `O_EXCL | O_NOFOLLOW`; `qemu-img` through `/proc/self/fd/3/<name>`), never by a
//! path of the caller's choosing.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use serde_yaml::Value;

use super::Manager;
use super::ManagerError;
use super::clone::{hold_stopped, job_progress, run_error};
use crate::error_kind::ErrorKind;
use crate::jobs::{Job, JobState};
use crate::storage::QemuImg;
use crate::vm::{BusyGuard, VmError};

/// The config's name inside an export.
pub const EXPORT_CONFIG: &str = "config.yaml";
/// The job's `Operation`.
pub const OPERATION: &str = "vm-export";
/// Name prefix of a file not whole yet.
const PARTIAL_PREFIX: &str = ".maqet-export-";

/// One disk to copy.
struct DiskCopy {
    source: std::path::PathBuf,
    format: &'static str,
    file: String,
}

/// What the job writes.
struct Plan {
    dir: OwnedFd,
    config_text: String,
    disks: Vec<DiskCopy>,
}

impl Plan {
    /// The final names, config first.
    fn files(&self) -> Vec<String> {
        std::iter::once(EXPORT_CONFIG.to_owned())
            .chain(self.disks.iter().map(|d| d.file.clone()))
            .collect()
    }
}

impl Manager {
    /// Starts exporting `vm` into the directory open at `dir`; returns the names of the
    /// files the job will write and the job.
    pub async fn export_vm(
        &self,
        vm: &Arc<crate::vm::Vm>,
        dir: OwnedFd,
    ) -> Result<(Vec<String>, Arc<Job>), ManagerError> {
        let name = vm.name();
        // Busy until the job ends: the VM cannot start while its disks are read.
        let guard = hold_stopped(vm, format!("an export of '{name}'"), "an export").await?;
        let st = rustix::fs::fstat(&dir)
            .map_err(|e| ManagerError::InvalidArgument(format!("export directory: {e}")))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(ManagerError::InvalidArgument(
                "the export target is not a directory; pass an open directory".into(),
            ));
        }
        let plan = plan(vm, dir)?;
        let files = plan.files();
        // Refused up front (and again at the rename): an export never overwrites.
        if let Some(f) = files
            .iter()
            .find(|f| rustix::fs::statat(&plan.dir, f.as_str(), AtFlags::SYMLINK_NOFOLLOW).is_ok())
        {
            return Err(ManagerError::AlreadyExists(format!(
                "{f} already exists in the export directory; export into an empty directory"
            )));
        }
        let job = self
            .jobs()
            .new_job(OPERATION, vm.id(), &format!("exporting '{name}'"));
        guard.describe(format!("an export (job {})", job.id()));
        tracing::info!(vm = %name, job = job.id(), files = files.len(), "export started");
        let qemu_img = if plan.disks.is_empty() {
            None
        } else {
            Some(QemuImg::find(self.ctx.path_env.as_deref())?)
        };
        tokio::spawn(run(guard, job.clone(), plan, qemu_img));
        Ok((files, job))
    }
}

/// The exported config (disks renamed relative to it) and the disks to copy.
fn plan(vm: &Arc<crate::vm::Vm>, dir: OwnedFd) -> Result<Plan, ManagerError> {
    let config = vm.stored_config()?;
    let yaml = vm.with_info(|i| i.config.clone());
    let mut doc: Value = serde_yaml::from_str(&yaml)
        .map_err(|e| ManagerError::Internal(format!("the stored config does not parse: {e}")))?;
    let mut disks = Vec::new();
    for e in config.storage().iter().filter(|e| e.kind.is_disk()) {
        let entry = super::clone::storage_entry(&mut doc, &e.name)?;
        if std::fs::symlink_metadata(&e.path).is_err() {
            // Never made: the imported VM makes it on its first start.
            if e.from.is_some() {
                return Err(ManagerError::InvalidState(format!(
                    "disk '{}' starts from image '{}' and was never made; start the VM once (or import the image on the other machine) before exporting",
                    e.name,
                    e.from.as_deref().unwrap_or_default()
                )));
            }
            entry.remove("file");
            continue;
        }
        let file = format!("{}.{}", e.name, e.kind.as_str());
        entry.insert("file".into(), file.clone().into());
        for key in ["from", "backing_file", "backing_format"] {
            entry.remove(key);
        }
        disks.push(DiskCopy {
            source: e.path.clone(),
            format: e.kind.as_str(),
            file,
        });
    }
    let config_text = serde_yaml::to_string(&doc)
        .map_err(|e| ManagerError::Internal(format!("cannot write the exported config: {e}")))?;
    Ok(Plan {
        dir,
        config_text,
        disks,
    })
}

async fn run(guard: BusyGuard, job: Arc<Job>, plan: Plan, qemu_img: Option<QemuImg>) {
    let vm = guard.vm().name();
    // (temporary name, final name) of every file written so far.
    let mut temps: Vec<(String, String)> = Vec::new();
    let outcome = write(&job, &plan, qemu_img.as_ref(), &mut temps).await;
    let (state, message) = match outcome {
        Ok(()) => (
            JobState::Completed,
            format!("exported '{vm}': {}", plan.files().join(", ")),
        ),
        Err(e) => {
            for (temp, _) in &temps {
                let _ = rustix::fs::unlinkat(&plan.dir, temp.as_str(), AtFlags::empty());
            }
            let state = if e.kind() == ErrorKind::Cancelled {
                JobState::Cancelled
            } else {
                JobState::Failed
            };
            (
                state,
                format!("{e}; nothing was left in the export directory"),
            )
        }
    };
    drop(guard);
    tracing::info!(%vm, job = job.id(), state = state.as_str(), %message, "export finished");
    job.finish(state, &message);
}

/// Writes every file under a temporary name, then renames them all (on a failed
/// rename, the ones already renamed go back to their temporary names for removal).
async fn write(
    job: &Arc<Job>,
    plan: &Plan,
    qemu_img: Option<&QemuImg>,
    temps: &mut Vec<(String, String)>,
) -> Result<(), ManagerError> {
    let temp_name =
        |file: &str| format!("{PARTIAL_PREFIX}{}-{file}", uuid::Uuid::new_v4().simple());
    let count = plan.disks.len();
    for (i, d) in plan.disks.iter().enumerate() {
        let temp = temp_name(&d.file);
        drop(create_excl(&plan.dir, &temp)?);
        temps.push((temp.clone(), d.file.clone()));
        let img = qemu_img.ok_or_else(|| ManagerError::Internal("no qemu-img".into()))?;
        let (progress, mut cancel) = job_progress(Some(job), i, count, &d.file);
        img.copy_disk_into(
            &d.source,
            d.format,
            plan.dir.as_fd(),
            &temp,
            progress,
            &mut cancel,
        )
        .await
        .map_err(run_error)?;
    }
    let temp = temp_name(EXPORT_CONFIG);
    let config_file = create_excl(&plan.dir, &temp)?;
    temps.push((temp, EXPORT_CONFIG.to_owned()));
    let mut out = std::fs::File::from(config_file);
    use std::io::Write;
    out.write_all(plan.config_text.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|e| VmError::HostStorage(crate::storage::space::write_error(EXPORT_CONFIG, e)))?;
    // The outcome is decided here: a cancel that came first is honoured.
    if job.seal() {
        return Err(VmError::HostStorage(crate::storage::StorageError::Cancelled).into());
    }
    for (n, (temp, file)) in temps.iter().enumerate() {
        if let Err(e) = rustix::fs::renameat_with(
            &plan.dir,
            temp.as_str(),
            &plan.dir,
            file.as_str(),
            RenameFlags::NOREPLACE,
        ) {
            for (temp, file) in &temps[..n] {
                let _ = rustix::fs::renameat(&plan.dir, file.as_str(), &plan.dir, temp.as_str());
            }
            return Err(ManagerError::AlreadyExists(format!(
                "cannot name {file} in the export directory ({e}); export into an empty directory"
            )));
        }
    }
    Ok(())
}

fn create_excl(dir: &OwnedFd, name: &str) -> Result<OwnedFd, ManagerError> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| {
        ManagerError::AlreadyExists(format!(
            "cannot create {name} in the export directory ({e}); export into an empty directory"
        ))
    })
}
