//! Snapshots of a stopped VM: `qemu-img snapshot` on each qcow2 disk in turn.
//!
//! `qemu-img` reports no progress of its own, so progress moves one disk at a time.
//! Cancelling kills the running `qemu-img` (and waits for it, so its image lock is
//! released) and undoes what can be undone: a cancelled or failed create removes the
//! snapshot from every disk that got it; a load or delete cannot be undone and says
//! which disks it already changed.

use tokio::sync::watch;

use super::SnapshotError;
use super::{Disk, Op, Outcome, SnapshotInfo};
use crate::jobs::{Job, JobState};
use crate::storage::QemuImg;
use crate::storage::qemu_img::{RunError, SnapshotOp};

/// Each disk's snapshots (a missing file has none).
pub(super) async fn per_disk(
    qemu_img: &QemuImg,
    disks: &[Disk],
) -> Result<Vec<Vec<SnapshotInfo>>, SnapshotError> {
    let mut out = Vec::with_capacity(disks.len());
    for d in disks {
        out.push(if d.path.exists() {
            qemu_img.info("qcow2", &d.path).await?.snapshots
        } else {
            Vec::new()
        });
    }
    Ok(out)
}

fn names(disks: &[&Disk]) -> String {
    if disks.is_empty() {
        "none".into()
    } else {
        disks
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A receiver that never fires: cleanup must not be cancelled half-way.
fn uncancellable() -> watch::Receiver<bool> {
    watch::channel(false).1
}

pub(super) async fn run(
    qemu_img: &QemuImg,
    job: &Job,
    op: Op,
    name: &str,
    disks: &[Disk],
    present: &[bool],
) -> Outcome {
    let mut cancel = job.cancel_receiver();
    let n = disks.len() as f64;
    let (step, verb) = match op {
        Op::Create { .. } => (SnapshotOp::Create, "creating"),
        Op::Load => (SnapshotOp::Apply, "loading"),
        Op::Delete => (SnapshotOp::Delete, "deleting"),
    };
    if let Op::Create { overwrite: true } = op {
        for (d, _) in disks.iter().zip(present).filter(|(_, p)| **p) {
            if let Err(e) = qemu_img
                .snapshot(SnapshotOp::Delete, name, &d.path, &mut cancel)
                .await
            {
                let note = format!(
                    "while replacing the old snapshot '{name}' on disk '{}', which may now be gone from some disks",
                    d.name
                );
                return ended(e, note);
            }
        }
    }
    let mut done: Vec<&Disk> = Vec::new();
    for (i, (d, had)) in disks.iter().zip(present).enumerate() {
        if op == Op::Delete && !had {
            continue;
        }
        job.set_progress(
            i as f64 / n,
            &format!("{verb} '{name}' on disk '{}'", d.name),
        );
        match qemu_img.snapshot(step, name, &d.path, &mut cancel).await {
            Ok(()) => done.push(d),
            Err(e) => {
                let note = match op {
                    Op::Create { .. } => rollback(qemu_img, name, &done, d).await,
                    Op::Load => format!(
                        "disks already reverted: {}; disk '{}' may be partly reverted, so load the snapshot again before starting the VM",
                        names(&done),
                        d.name
                    ),
                    Op::Delete => format!("already deleted from: {}", names(&done)),
                };
                return ended(e, note);
            }
        }
    }
    let past = match op {
        Op::Create { .. } => "created",
        Op::Load => "loaded",
        Op::Delete => "deleted",
    };
    Outcome::new(
        JobState::Completed,
        format!("{past} snapshot '{name}' (disks: {})", names(&done)),
    )
}

/// A failed or cancelled run: the error, plus what it left behind.
fn ended(e: RunError, note: String) -> Outcome {
    match e {
        RunError::Cancelled => Outcome::new(JobState::Cancelled, format!("cancelled; {note}")),
        RunError::Failed(e) => Outcome::new(JobState::Failed, format!("{}; {note}", e)),
    }
}

/// Removes a half-made snapshot from the disks that got it (and from the one that was
/// being written, which may or may not have it).
async fn rollback(qemu_img: &QemuImg, name: &str, done: &[&Disk], current: &Disk) -> String {
    let mut left = Vec::new();
    for d in done {
        if let Err(e) = qemu_img
            .snapshot(SnapshotOp::Delete, name, &d.path, &mut uncancellable())
            .await
        {
            left.push(format!("'{}' ({e})", d.name));
        }
    }
    let current_has_it = qemu_img
        .info("qcow2", &current.path)
        .await
        .is_ok_and(|i| i.snapshots.iter().any(|s| s.name == name));
    if current_has_it
        && qemu_img
            .snapshot(
                SnapshotOp::Delete,
                name,
                &current.path,
                &mut uncancellable(),
            )
            .await
            .is_err()
    {
        left.push(format!("'{}'", current.name));
    }
    if left.is_empty() {
        "no partial snapshot was left behind".into()
    } else {
        format!(
            "the partial snapshot could not be removed from disk(s) {}; delete it (maqet snapshot rm)",
            left.join(", ")
        )
    }
}
