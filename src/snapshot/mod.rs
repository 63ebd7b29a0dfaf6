//! VM snapshots: internal qcow2 snapshots of every disk, taken, loaded and deleted as
//! jobs ([`crate::jobs`]).
//!
//! Owns: snapshot names, which disks take part (and the refusals: raw, read-only, no
//! disk), listing, and running an operation to its end. A stopped VM's disks are
//! handled by `qemu-img snapshot` ([`offline`]); a running or paused VM's by QEMU's
//! `snapshot-save|load|delete` jobs over QMP ([`live`]), which also save the guest's
//! RAM and device state. While a job runs the VM is busy ([`Vm::begin_exclusive`]):
//! lifecycle calls are refused, so no Start can race an offline snapshot and no Stop a
//! live one. Every outcome lands in the VM's history (`events`, kind `snapshot`).

pub mod error;
mod live;
mod offline;
mod save_meter;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{StorageKind, VmConfig};
use crate::events::CoreEvent;
use crate::jobs::{Job, JobRegistry, JobState};
use crate::storage::QemuImg;
pub use crate::storage::qemu_img::SnapshotInfo;
use crate::vm::{BusyGuard, Status, Vm, VmError};
pub use error::SnapshotError;

/// Longest snapshot name.
pub const MAX_NAME_LEN: usize = 64;

/// What a snapshot job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `overwrite`: replace a snapshot of the same name (deleted first).
    Create {
        overwrite: bool,
    },
    Load,
    Delete,
}

impl Op {
    /// The job's `Operation` property.
    pub fn operation(self) -> &'static str {
        match self {
            Op::Create { .. } => "snapshot-create",
            Op::Load => "snapshot-load",
            Op::Delete => "snapshot-delete",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Load => "load",
            Op::Delete => "delete",
        }
    }
}

/// Snapshot names: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `-`, and not all
/// digits (`qemu-img` and QEMU read a number as a snapshot id).
pub fn validate_name(name: &str) -> Result<(), SnapshotError> {
    let rules =
        "use 1 to 64 letters, digits, `.`, `_` or `-`, not starting with `-` and not only digits";
    let bad = |why: &str| {
        Err(SnapshotError::InvalidArgument(format!(
            "invalid snapshot name '{name}': {why}; {rules}"
        )))
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return bad("wrong length");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return bad(&format!("`{c}` is not allowed"));
    }
    if name.starts_with('-') {
        return bad("it starts with `-`");
    }
    if name.chars().all(|c| c.is_ascii_digit()) {
        return bad("a number would be read as a snapshot id");
    }
    Ok(())
}

/// A disk taking part in snapshots, in `storage` order (the first holds the VM state).
#[derive(Debug, Clone)]
pub(crate) struct Disk {
    pub name: String,
    pub path: PathBuf,
}

/// The qcow2 disks (the only ones that can hold snapshots).
fn qcow2_disks(config: &VmConfig) -> Vec<Disk> {
    config
        .storage()
        .iter()
        .filter(|e| e.kind == StorageKind::Qcow2)
        .map(|e| Disk {
            name: e.name.clone(),
            path: e.path.clone(),
        })
        .collect()
}

/// The disks an operation works on, or why the VM cannot have snapshots: every disk
/// must be a writable qcow2 (a snapshot that skipped a disk would restore a guest
/// whose disks disagree).
fn plan(vm: &str, config: &VmConfig) -> Result<Vec<Disk>, SnapshotError> {
    let disks: Vec<_> = config
        .storage()
        .iter()
        .filter(|e| e.kind.is_disk())
        .collect();
    if disks.is_empty() {
        return Err(SnapshotError::Storage(format!(
            "VM '{vm}' has no disks in `storage`; snapshots live inside qcow2 disks, so add one (type: qcow2)"
        )));
    }
    for e in &disks {
        if e.kind == StorageKind::Raw {
            return Err(SnapshotError::Storage(format!(
                "VM '{vm}' cannot have snapshots: disk '{}' ({}) is a raw image, and raw images cannot hold snapshots; convert it (qemu-img convert -O qcow2) or take it out of `storage`",
                e.name,
                e.path.display()
            )));
        }
        if e.readonly {
            return Err(SnapshotError::Storage(format!(
                "VM '{vm}' cannot have snapshots: disk '{}' is read-only, so no snapshot can be written into it; drop `readonly` or take the disk out of `storage`",
                e.name
            )));
        }
    }
    Ok(qcow2_disks(config))
}

/// Offline for a VM without QEMU, live for one with, refused in between.
fn live_mode(vm: &str, op: Op, status: Status) -> Result<bool, VmError> {
    match status {
        Status::Created | Status::Stopped | Status::Crashed | Status::Failed => Ok(false),
        Status::Running | Status::Paused => Ok(true),
        Status::Starting | Status::Stopping => Err(VmError::InvalidState(format!(
            "a snapshot {} is not possible while VM '{vm}' is {status}; wait until it is running or stopped",
            op.verb()
        ))),
    }
}

/// One list per disk → the VM's snapshots: every name found on any disk, described by
/// the first disk (in `storage` order) that has it, oldest first.
fn merge(per_disk: &[Vec<SnapshotInfo>]) -> Vec<SnapshotInfo> {
    let mut seen = HashSet::new();
    let mut out: Vec<SnapshotInfo> = per_disk
        .iter()
        .flatten()
        .filter(|s| seen.insert(s.name.clone()))
        .cloned()
        .collect();
    out.sort_by(|a, b| a.date_us.cmp(&b.date_us).then(a.name.cmp(&b.name)));
    out
}

/// `AlreadyExists` / `NotFound` (listing what exists) before any job starts.
fn check_name(
    vm: &str,
    op: Op,
    name: &str,
    existing: &[SnapshotInfo],
) -> Result<(), SnapshotError> {
    let found = existing.iter().any(|s| s.name == name);
    match op {
        Op::Create { overwrite: false } if found => Err(SnapshotError::AlreadyExists(format!(
            "VM '{vm}' already has a snapshot named '{name}'; choose another name or overwrite it (maqet snapshot create --overwrite; D-Bus option overwrite=true)"
        ))),
        Op::Load | Op::Delete if !found => {
            let names: Vec<&str> = existing.iter().map(|s| s.name.as_str()).collect();
            let have = if names.is_empty() {
                "it has no snapshots".to_owned()
            } else {
                format!("its snapshots: {}", names.join(", "))
            };
            Err(SnapshotError::NotFound(format!(
                "VM '{vm}' has no snapshot named '{name}'; {have}"
            )))
        }
        _ => Ok(()),
    }
}

fn qemu_img(vm: &Vm) -> Result<QemuImg, SnapshotError> {
    Ok(QemuImg::find(vm.ctx().path_env.as_deref())?)
}

/// The VM's snapshots (from QEMU while it runs, from the image files otherwise).
pub async fn list(vm: &Arc<Vm>) -> Result<Vec<SnapshotInfo>, SnapshotError> {
    let disks = qcow2_disks(&vm.stored_config()?);
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    let per_disk = if vm.status().has_process() {
        live::inspect(vm, &disks)
            .await?
            .into_iter()
            .map(|d| d.snapshots)
            .collect::<Vec<_>>()
    } else {
        offline::per_disk(&qemu_img(vm)?, &disks).await?
    };
    Ok(merge(&per_disk))
}

/// How an operation ended.
pub(crate) struct Outcome {
    pub state: JobState,
    pub message: String,
}

impl Outcome {
    pub fn new(state: JobState, message: impl Into<String>) -> Outcome {
        Outcome {
            state,
            message: message.into(),
        }
    }
}

/// What the job runs, prepared (and checked) before the call returns.
enum Prepared {
    Offline {
        qemu_img: QemuImg,
        /// Per disk: holds a snapshot of this name now.
        present: Vec<bool>,
    },
    Live(live::Prepared),
}

/// Checks everything that can be checked at once (name, state, disks, existing names,
/// free space), then starts the job and returns it; the job runs on its own task.
pub async fn start(
    vm: &Arc<Vm>,
    jobs: &JobRegistry,
    op: Op,
    name: &str,
) -> Result<Arc<Job>, SnapshotError> {
    validate_name(name)?;
    let vm_name = vm.name();
    let what = format!("a snapshot {} of '{name}'", op.verb());
    let (guard, status) = vm
        .begin_exclusive(what.clone(), |status| live_mode(&vm_name, op, status))
        .await?;
    let disks = plan(&vm_name, &vm.stored_config()?)?;
    let prepared = if status.has_process() {
        let p = live::prepare(vm, &disks, op, name).await?;
        check_name(&vm_name, op, name, &merge(&p.per_disk()))?;
        Prepared::Live(p)
    } else {
        if let Some(d) = disks.iter().find(|d| !d.path.exists()) {
            return Err(SnapshotError::Storage(format!(
                "disk '{}' of VM '{vm_name}' does not exist yet ({}); maqet creates it on the first start, so start the VM once before taking snapshots",
                d.name,
                d.path.display()
            )));
        }
        let qemu_img = qemu_img(vm)?;
        let per_disk = offline::per_disk(&qemu_img, &disks).await?;
        check_name(&vm_name, op, name, &merge(&per_disk))?;
        let present = per_disk
            .iter()
            .map(|l| l.iter().any(|s| s.name == name))
            .collect();
        Prepared::Offline { qemu_img, present }
    };
    let mode = if status.has_process() {
        "live"
    } else {
        "offline"
    };
    let job = jobs.new_job(
        op.operation(),
        vm.id(),
        &format!("{mode} snapshot {} of '{name}' started", op.verb()),
    );
    guard.describe(format!("{what} (job {})", job.id()));
    tracing::info!(vm = %vm_name, job = job.id(), operation = op.operation(), snapshot = name, mode, "snapshot job started");
    tokio::spawn(run(
        guard,
        job.clone(),
        op,
        name.to_owned(),
        disks,
        prepared,
    ));
    Ok(job)
}

async fn run(
    guard: BusyGuard,
    job: Arc<Job>,
    op: Op,
    name: String,
    disks: Vec<Disk>,
    prepared: Prepared,
) {
    let vm = guard.vm().clone();
    let (mode, outcome) = match prepared {
        Prepared::Offline { qemu_img, present } => (
            "offline",
            offline::run(&qemu_img, &job, op, &name, &disks, &present).await,
        ),
        Prepared::Live(p) => {
            let outcome = live::run(&vm, &job, op, &name, p).await;
            vm.sync_run_state("run state after a live snapshot").await;
            ("live", outcome)
        }
    };
    let vm_name = vm.name();
    let detail = serde_json::json!({
        "operation": op.operation(),
        "snapshot": name,
        "mode": mode,
        "job": job.id(),
        "state": outcome.state.as_str(),
    });
    let recorded = vm.ctx().store.record_event(
        vm.id(),
        &vm_name,
        "snapshot",
        outcome.message.clone(),
        Some(detail),
    );
    if let Err(e) = recorded.await {
        tracing::warn!(vm = %vm_name, error = %e, "cannot record the snapshot job in history");
    }
    tracing::info!(vm = %vm_name, job = job.id(), state = outcome.state.as_str(), message = %outcome.message, "snapshot job finished");
    // The VM is free before anyone hears the job ended: a client that reacts to
    // Completed with a Start must not be refused as busy.
    drop(guard);
    job.finish(outcome.state, &outcome.message);
    vm.ctx().sink.emit(CoreEvent::JobFinished {
        vm: vm.clone(),
        job: job.id(),
        operation: op.operation(),
        target: name,
        state: outcome.state,
        message: outcome.message,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "before-upgrade",
            "v1.2_3",
            "1a",
            "x".repeat(64).as_str(),
        ] {
            validate_name(ok).unwrap();
        }
        for (bad, why) in [
            ("", "length"),
            ("x".repeat(65).as_str(), "length"),
            ("a b", "` ` is not allowed"),
            ("a/b", "`/` is not allowed"),
            ("é", "is not allowed"),
            ("-c", "starts with `-`"),
            ("42", "snapshot id"),
        ] {
            let err = validate_name(bad).unwrap_err();
            assert_eq!(err.kind().as_str(), "InvalidArgument");
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }

    fn snap(name: &str, date_us: u64) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            vm_state_size: 0,
            date_us,
            vm_clock_ns: 0,
        }
    }

    #[test]
    fn merged_lists_are_unique_and_oldest_first() {
        let merged = merge(&[
            vec![snap("b", 2), snap("a", 1)],
            vec![snap("b", 9), snap("c", 3)],
        ]);
        let names: Vec<_> = merged
            .iter()
            .map(|s| (s.name.as_str(), s.date_us))
            .collect();
        assert_eq!(names, [("a", 1), ("b", 2), ("c", 3)]);
    }

    #[test]
    fn existing_and_missing_names() {
        let have = [snap("a", 1), snap("b", 2)];
        let create = Op::Create { overwrite: false };
        assert_eq!(
            check_name("web", create, "a", &have)
                .unwrap_err()
                .kind()
                .as_str(),
            "AlreadyExists"
        );
        check_name("web", Op::Create { overwrite: true }, "a", &have).unwrap();
        let err = check_name("web", Op::Load, "zz", &have).unwrap_err();
        assert_eq!(err.kind().as_str(), "NotFound");
        assert!(err.to_string().contains("its snapshots: a, b"), "{err}");
        let err = check_name("web", Op::Delete, "zz", &[]).unwrap_err();
        assert!(err.to_string().contains("no snapshots"), "{err}");
    }

    #[test]
    fn states_choose_the_mode() {
        let op = Op::Load;
        assert!(!live_mode("v", op, Status::Stopped).unwrap());
        assert!(live_mode("v", op, Status::Paused).unwrap());
        assert_eq!(
            live_mode("v", op, Status::Starting)
                .unwrap_err()
                .kind()
                .as_str(),
            "InvalidState"
        );
    }
}
