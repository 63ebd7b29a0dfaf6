//! Cloning a stopped VM: a new VM (new UUID, new name) whose disks are the source's,
//! either as qcow2 overlays on them (linked: instant, done within the call, the
//! source's disks become the clone's read-only base) or as full copies (`qemu-img
//! convert -p`, standalone: a job with progress that can be cancelled).
//!
//! What is per VM comes fresh: the UEFI variable store and the TPM state live in the
//! new VM's data directory and are made on its first start. Read-only disks (ISOs,
//! firmware) are shared; writable files outside `storage` (a `-drive` in `arguments`)
//! cannot be cloned safely, so such a VM is refused. The new disks are made in the new
//! VM's directory before its row exists (a full copy under a hidden temporary name,
//! renamed when every copy is whole) and deleted again when anything fails or the job
//! is cancelled: no half clone is left in the database or on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_yaml::Value;

use super::ManagerError;
use super::{INLINE_ORIGIN, Manager};
use crate::config::Access;
use crate::config::{self, ConfigSource, StorageKind};
use crate::error_kind::ErrorKind;
use crate::jobs::{Job, JobState};
use crate::storage::QemuImg;
use crate::storage::qemu_img::RunError;
use crate::vm::{BusyGuard, Status, Vm, VmError, store_error};

/// The job's `Operation` for a full clone.
pub const OPERATION: &str = "vm-clone";
/// Name prefix of a disk copy that is not whole yet (in the new VM's directory).
const PARTIAL_PREFIX: &str = ".clone-";

/// How a clone gets its disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMode {
    /// qcow2 overlays backed by the source's disks.
    Linked,
    /// Independent copies.
    Full,
}

/// What a clone call started.
pub enum Cloned {
    /// A linked clone: defined already.
    Done(Arc<Vm>),
    /// A full clone: the job copying the disks; on success the VM with this id exists.
    Job { id: String, job: Arc<Job> },
}

/// Everything checked before any disk is touched.
struct Plan {
    config: config::VmConfig,
    id: String,
    dir: PathBuf,
    new_name: String,
    mode: CloneMode,
}

impl Manager {
    /// Defines `new_name` as a clone of the stopped VM `source`: a linked clone at
    /// once, a full clone as a job (the source is busy until it ends).
    pub async fn clone_vm(
        self: &Arc<Self>,
        source: &Arc<Vm>,
        new_name: &str,
        mode: CloneMode,
    ) -> Result<Cloned, ManagerError> {
        let src = source.name();
        let what = match mode {
            CloneMode::Linked => format!("a linked clone to '{new_name}'"),
            CloneMode::Full => format!("a full clone to '{new_name}'"),
        };
        // Busy throughout: the source cannot start while its disks are read.
        let guard = hold_stopped(source, what, "a clone").await?;
        let plan = self.plan_clone(source, new_name, mode)?;
        match mode {
            CloneMode::Linked => {
                let vm = self.clone_and_clean(source, &plan, None).await?;
                drop(guard);
                Ok(Cloned::Done(vm))
            }
            CloneMode::Full => {
                let job = self.jobs().new_job(
                    OPERATION,
                    source.id(),
                    &format!("cloning '{src}' as '{new_name}'"),
                );
                guard.describe(format!("a full clone to '{new_name}' (job {})", job.id()));
                tracing::info!(source = %src, clone = %new_name, job = job.id(), "full clone started");
                let id = plan.id.clone();
                tokio::spawn(self.clone().run_full_clone(guard, job.clone(), plan));
                Ok(Cloned::Job { id, job })
            }
        }
    }

    fn plan_clone(
        &self,
        source: &Arc<Vm>,
        new_name: &str,
        mode: CloneMode,
    ) -> Result<Plan, ManagerError> {
        let src = source.name();
        config::validate_vm_name(new_name).map_err(|why| {
            ManagerError::InvalidArgument(format!("invalid VM name '{new_name}': {why}"))
        })?;
        if self.registry().by_name.contains_key(new_name) {
            return Err(ManagerError::AlreadyExists(format!(
                "a VM named '{new_name}' already exists; choose another name for the clone"
            )));
        }
        let config = source.stored_config()?;
        let in_storage: Vec<&Path> = config.storage().iter().map(|e| e.path.as_path()).collect();
        if let Some(f) = config
            .host_files()
            .iter()
            .find(|f| f.access == Access::ReadWrite && !in_storage.contains(&f.path.as_path()))
        {
            return Err(ManagerError::InvalidConfig(format!(
                "VM '{src}' writes {} outside `storage` (in `arguments`), which a clone would share; declare that disk in `storage` so maqet can clone it",
                f.path.display()
            )));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.ctx.paths.vm_data_dir(&id);
        Ok(Plan {
            config,
            id,
            dir,
            new_name: new_name.to_owned(),
            mode,
        })
    }

    async fn run_full_clone(self: Arc<Self>, guard: BusyGuard, job: Arc<Job>, plan: Plan) {
        let source = guard.vm().clone();
        let (state, message) = match self.clone_and_clean(&source, &plan, Some(&job)).await {
            Ok(vm) => (
                JobState::Completed,
                format!("cloned '{}' as '{}' (full copy)", source.name(), vm.name()),
            ),
            Err(e) => {
                let state = if e.kind() == ErrorKind::Cancelled {
                    JobState::Cancelled
                } else {
                    JobState::Failed
                };
                (state, format!("{e}; no clone was made"))
            }
        };
        drop(guard);
        tracing::info!(source = %source.name(), clone = %plan.new_name, job = job.id(), state = state.as_str(), %message, "full clone finished");
        job.finish(state, &message);
    }

    /// Makes the clone; on failure removes every file it made and the directory.
    async fn clone_and_clean(
        &self,
        source: &Arc<Vm>,
        plan: &Plan,
        job: Option<&Arc<Job>>,
    ) -> Result<Arc<Vm>, ManagerError> {
        let mut made: Vec<(PathBuf, &'static str)> = Vec::new();
        let outcome = self.clone_into(source, plan, job, &mut made).await;
        if outcome.is_err() {
            for (path, _) in &made {
                let _ = std::fs::remove_file(path);
            }
            if let Ok(entries) = std::fs::read_dir(&plan.dir) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&plan.dir);
        }
        outcome
    }

    async fn clone_into(
        &self,
        source: &Arc<Vm>,
        plan: &Plan,
        job: Option<&Arc<Job>>,
        made: &mut Vec<(PathBuf, &'static str)>,
    ) -> Result<Arc<Vm>, ManagerError> {
        let (dir, new_name, mode) = (&plan.dir, plan.new_name.as_str(), plan.mode);
        let yaml = source.with_info(|i| i.config.clone());
        let mut doc: Value = serde_yaml::from_str(&yaml).map_err(|e| {
            ManagerError::Internal(format!(
                "the stored config of '{}' does not parse: {e}",
                source.name()
            ))
        })?;
        let disks: Vec<_> = plan
            .config
            .storage()
            .iter()
            .filter(|e| e.kind.is_disk() && !e.readonly)
            .collect();
        let copies = disks
            .iter()
            .filter(|e| std::fs::symlink_metadata(&e.path).is_ok())
            .count();
        let mut copied = 0usize;
        // Full copies, made under temporary names and renamed once all are whole.
        let mut partial: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut qemu_img = None;
        for e in disks {
            let target = dir.join(format!("{}.{}", e.name, e.kind.as_str()));
            let entry = storage_entry(&mut doc, &e.name)?;
            set(entry, "file", target.to_string_lossy().into_owned());
            if std::fs::symlink_metadata(&e.path).is_err() {
                // Never made yet: the clone makes its own on first start, the same way.
                continue;
            }
            let img = match &qemu_img {
                Some(img) => img,
                None => qemu_img.insert(QemuImg::find(self.ctx.path_env.as_deref())?),
            };
            crate::paths::create_private_dir(dir)
                .map_err(|err| ManagerError::Storage(format!("{}: {err}", dir.display())))?;
            match mode {
                CloneMode::Linked => {
                    let spec = crate::storage::create::NewImage {
                        path: &target,
                        kind: StorageKind::Qcow2,
                        size: None,
                        backing: Some((&e.path, e.kind.as_str())),
                    };
                    made.push((target.clone(), "qcow2"));
                    crate::storage::create::create_image(img, &spec, &self.ctx.paths.home).await?;
                    set(entry, "type", "qcow2".into());
                    set(entry, "backing_file", e.path.to_string_lossy().into_owned());
                    set(entry, "backing_format", e.kind.as_str().into());
                    remove(entry, "from");
                    remove(entry, "size");
                }
                CloneMode::Full => {
                    let temp = dir.join(format!(
                        "{PARTIAL_PREFIX}{}.{}",
                        uuid::Uuid::new_v4().simple(),
                        e.kind.as_str()
                    ));
                    partial.push((temp.clone(), target.clone()));
                    let (progress, mut cancel) = job_progress(job, copied, copies, &e.name);
                    img.copy_disk(&e.path, e.kind.as_str(), &temp, progress, &mut cancel)
                        .await
                        .map_err(run_error)?;
                    copied += 1;
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
                        .map_err(|err| {
                            ManagerError::Storage(format!("{}: {err}", temp.display()))
                        })?;
                    // A standalone copy: the chain was flattened into it.
                    for key in ["from", "backing_file", "backing_format"] {
                        remove(entry, key);
                    }
                    made.push((target.clone(), e.kind.as_str()));
                }
            }
        }
        // The outcome is decided here: a cancel that came first is honoured.
        if let Some(job) = job
            && job.seal()
        {
            return Err(VmError::HostStorage(crate::storage::StorageError::Cancelled).into());
        }
        for (temp, target) in &partial {
            std::fs::rename(temp, target).map_err(|err| {
                ManagerError::Storage(format!(
                    "cannot rename {} to {}: {err}",
                    temp.display(),
                    target.display()
                ))
            })?;
        }
        if let Value::Mapping(m) = &mut doc {
            m.insert("name".into(), new_name.into());
        }
        let text = serde_yaml::to_string(&doc)
            .map_err(|e| ManagerError::Internal(format!("cannot write the clone's config: {e}")))?;
        let source_text = ConfigSource {
            origin: format!("{INLINE_ORIGIN} (clone of '{}')", source.name()),
            text,
            base_dir: dir.to_path_buf(),
        };
        let vm = self
            .add_with_id(plan.id.clone(), new_name, vec![source_text])
            .await?;
        // The new disks are the clone's: `rm --delete-storage` removes them.
        let (owner, files) = (plan.id.clone(), made.clone());
        let recorded = self
            .ctx
            .store
            .write(move |db| {
                for (path, format) in &files {
                    db.record_created_file(&owner, path, format)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = recorded {
            // Undo the definition: no clone whose files maqet would not own.
            let _ = self.remove(&vm, true, false).await;
            return Err(store_error(e).into());
        }
        tracing::info!(source = %source.name(), clone = %new_name, mode = ?mode, disks = made.len(), "VM cloned");
        Ok(vm)
    }
}

/// Deletes disk copies of full clones a previous maqetd did not finish (it was
/// killed), and the clone directories they leave empty: no VM row ever named them.
pub fn remove_partial_clones(ctx: &crate::vm::Ctx) {
    let Ok(dirs) = std::fs::read_dir(ctx.paths.data_dir.join("vms")) else {
        return;
    };
    for dir in dirs.flatten() {
        let Ok(files) = std::fs::read_dir(dir.path()) else {
            continue;
        };
        let mut removed = false;
        for f in files.flatten() {
            if f.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX) {
                removed |= std::fs::remove_file(f.path()).is_ok();
                tracing::info!(file = %f.path().display(), "removed a disk copy of an unfinished clone");
            }
        }
        if removed {
            // Only if empty: a directory with anything else in it is not ours to judge.
            let _ = std::fs::remove_dir(dir.path());
        }
    }
}

/// Progress of copy `index` of `count` (named `disk`) as a share of the job, and the
/// job's cancel switch; a no-op pair without a job.
pub(super) fn job_progress(
    job: Option<&Arc<Job>>,
    index: usize,
    count: usize,
    disk: &str,
) -> (
    Box<dyn Fn(f64) + Send + Sync>,
    tokio::sync::watch::Receiver<bool>,
) {
    let Some(job) = job else {
        return (Box::new(|_| {}), tokio::sync::watch::channel(false).1);
    };
    let (job2, count, message) = (
        job.clone(),
        count.max(1) as f64,
        format!("copying disk '{disk}' ({} of {count})", index + 1),
    );
    let progress = Box::new(move |p: f64| {
        job2.set_progress((index as f64 + p) / count * 0.99, &message);
    });
    (progress, job.cancel_receiver())
}

/// A `qemu-img` run's end as the manager's error (a cancel stays `Cancelled`).
pub(super) fn run_error(e: RunError) -> ManagerError {
    let storage = match e {
        RunError::Cancelled => crate::storage::StorageError::Cancelled,
        RunError::Failed(e) => e,
    };
    VmError::HostStorage(storage).into()
}

/// The `storage` entry named `name` in a stored config.
pub(super) fn storage_entry<'a>(
    doc: &'a mut Value,
    name: &str,
) -> Result<&'a mut serde_yaml::Mapping, ManagerError> {
    doc.get_mut("storage")
        .and_then(|s| s.as_sequence_mut())
        .and_then(|items| {
            items
                .iter_mut()
                .filter_map(|i| i.as_mapping_mut())
                .find(|m| m.get("name").and_then(|n| n.as_str()) == Some(name))
        })
        .ok_or_else(|| {
            ManagerError::Internal(format!("the stored config has no storage entry '{name}'"))
        })
}

fn set(entry: &mut serde_yaml::Mapping, key: &str, value: String) {
    entry.insert(key.into(), value.into());
}

fn remove(entry: &mut serde_yaml::Mapping, key: &str) {
    entry.remove(key);
}

/// Marks a stopped VM busy with `what` (shown to a caller who tries to start it) while
/// its disks are read for `purpose`; refuses a VM whose disks someone may be writing.
pub(super) async fn hold_stopped(
    vm: &Arc<Vm>,
    what: String,
    purpose: &str,
) -> Result<BusyGuard, VmError> {
    let name = vm.name();
    let (guard, _) = vm
        .begin_exclusive(what, |status| {
            if matches!(
                status,
                Status::Created | Status::Stopped | Status::Crashed | Status::Failed
            ) {
                Ok(false)
            } else {
                Err(VmError::InvalidState(format!(
                    "VM '{name}' is {status}: {purpose} needs disks nobody is writing; stop it first (maqet stop {name})"
                )))
            }
        })
        .await?;
    Ok(guard)
}
