//! Snapshots of a running or paused VM: QEMU's `snapshot-save`, `snapshot-load` and
//! `snapshot-delete` jobs (QEMU ≥ 6.0), driven over QMP.
//!
//! The disks are named by their block node names (maqet gives each disk
//! `node-name=maqet-d<N>`; `query-block` maps the drive id, which is the storage
//! name, to it). The VM state goes to the first disk. A save's progress is measured
//! from outside QEMU while it writes ([`super::save_meter`]: QEMU reports none and
//! answers no query meanwhile); a load's and a delete's come from the job's
//! `JOB_STATUS_CHANGE` events and `query-jobs`' `current-progress`/`total-progress`.
//! QEMU creates these jobs with manual dismissal: maqet reads the outcome from
//! `query-jobs` and dismisses them. A failed or cancelled save is followed by a
//! `snapshot-delete` of whatever QEMU left, so `List` never shows a half-made snapshot.
//! QEMU cannot stop a save once it has begun: a cancel that maqet accepted is honoured
//! by deleting the finished snapshot too (the job ends `cancelled`, nothing is left).

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::SnapshotError;
use super::save_meter::{self, SaveMeter};
use super::{Disk, Op, Outcome, SnapshotInfo};
use crate::jobs::{Job, JobState};
use crate::qmp::QmpClient;
use crate::storage::qemu_img::ImageInfo;
use crate::storage::space;
use crate::time::now_us;
use crate::vm::{Vm, qmp_error};

/// A query maqet sends while a job runs (QEMU may answer late: a save blocks its main
/// loop; a late answer only costs a progress update).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// One disk as the running QEMU has it.
pub(super) struct LiveDisk {
    pub node: String,
    pub snapshots: Vec<SnapshotInfo>,
}

/// Node names and current snapshots of `disks`, from `query-block`.
pub(super) async fn inspect(vm: &Vm, disks: &[Disk]) -> Result<Vec<LiveDisk>, SnapshotError> {
    let qmp = vm.qmp()?;
    let blocks = qmp
        .execute_timeout("query-block", None, QUERY_TIMEOUT)
        .await
        .map_err(|e| qmp_error(&vm.name(), e))?;
    let blocks = blocks.as_array().cloned().unwrap_or_default();
    disks
        .iter()
        .map(|d| {
            let inserted = blocks
                .iter()
                .find(|b| crate::vm::is_disk_block(b, &d.name))
                .and_then(|b| b.get("inserted"))
                .ok_or_else(|| {
                    SnapshotError::Storage(format!(
                        "disk '{}' is not attached to the running QEMU of VM '{}' (was the config applied after the start?); restart the VM",
                        d.name,
                        vm.name()
                    ))
                })?;
            let node = inserted
                .get("node-name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let snapshots = inserted
                .get("image")
                .map(ImageInfo::from_json)
                .transpose()
                .map_err(|e| SnapshotError::Qmp(format!("unexpected query-block answer: {e}")))?
                .map(|i| i.snapshots)
                .unwrap_or_default();
            Ok(LiveDisk { node, snapshots })
        })
        .collect()
}

/// Everything a live job needs, checked before it starts.
pub(super) struct Prepared {
    disks: Vec<(Disk, LiveDisk)>,
    /// The guest's RAM in bytes (known for a save: the most its VM state holds).
    guest_ram: u64,
}

impl Prepared {
    pub fn per_disk(&self) -> Vec<Vec<SnapshotInfo>> {
        self.disks
            .iter()
            .map(|(_, l)| l.snapshots.clone())
            .collect()
    }
}

pub(super) async fn prepare(
    vm: &Vm,
    disks: &[Disk],
    op: Op,
    name: &str,
) -> Result<Prepared, SnapshotError> {
    ensure_commands(vm, op).await?;
    let live = inspect(vm, disks).await?;
    if let Some((d, _)) = disks.iter().zip(&live).find(|(_, l)| l.node.is_empty()) {
        return Err(SnapshotError::Storage(format!(
            "disk '{}' has no block node name in QEMU; restart VM '{}' so maqet can name it",
            d.name,
            vm.name()
        )));
    }
    let mut guest_ram = 0;
    match op {
        Op::Create { .. } => guest_ram = ensure_room_for_state(vm, &disks[0]).await?,
        Op::Load => {
            let state = live[0].snapshots.iter().find(|s| s.name == name);
            if state.is_some_and(|s| s.vm_state_size == 0) {
                return Err(SnapshotError::InvalidState(format!(
                    "snapshot '{name}' holds no VM state (it was taken while VM '{}' was stopped); stop the VM and load it then",
                    vm.name()
                )));
            }
        }
        Op::Delete => {}
    }
    Ok(Prepared {
        disks: disks.iter().cloned().zip(live).collect(),
        guest_ram,
    })
}

/// The QMP commands a live `op` sends, beyond the ones every QMP has.
fn commands_needed(op: Op) -> &'static [&'static str] {
    match op {
        // A failed, cancelled or overwriting save deletes too.
        Op::Create { .. } => &["snapshot-save", "snapshot-delete"],
        Op::Load => &["snapshot-load"],
        Op::Delete => &["snapshot-delete"],
    }
}

/// The commands of `needed` that a `query-commands` answer does not list.
fn missing_commands<'a>(answer: &Value, needed: &[&'a str]) -> Vec<&'a str> {
    let has = |c: &str| {
        answer.as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e.get("name").and_then(Value::as_str) == Some(c))
        })
    };
    needed.iter().copied().filter(|c| !has(c)).collect()
}

/// Whether this VM's QEMU can do `op` live, asked by capability (`query-commands`),
/// never by version number: the snapshot jobs came with QEMU 6.0, and a build may lack
/// or add commands whatever its version says.
async fn ensure_commands(vm: &Vm, op: Op) -> Result<(), SnapshotError> {
    let qmp = vm.qmp()?;
    let answer = qmp
        .execute_timeout("query-commands", None, QUERY_TIMEOUT)
        .await
        .map_err(|e| qmp_error(&vm.name(), e))?;
    let missing = missing_commands(&answer, commands_needed(op));
    if missing.is_empty() {
        return Ok(());
    }
    Err(SnapshotError::InvalidState(format!(
        "the QEMU running VM '{}' has no {} (live snapshots need QEMU 6.0 or later); stop the VM to use offline snapshots, or upgrade QEMU and restart the VM",
        vm.name(),
        missing.join(", ")
    )))
}

/// The guest's RAM (at most) goes into the first disk: check its file system has room.
/// Returns the guest's RAM in bytes.
async fn ensure_room_for_state(vm: &Vm, disk: &Disk) -> Result<u64, SnapshotError> {
    let qmp = vm.qmp()?;
    let mem = qmp
        .execute_timeout("query-memory-size-summary", None, QUERY_TIMEOUT)
        .await
        .map_err(|e| qmp_error(&vm.name(), e))?;
    let field = |k: &str| mem.get(k).and_then(Value::as_u64).unwrap_or(0);
    let ram = field("base-memory") + field("plugged-memory");
    let dir = disk.path.parent().unwrap_or(std::path::Path::new("/"));
    let available = std::fs::File::open(dir)
        .and_then(|f| space::available(&f))
        .map_err(|e| {
            SnapshotError::Storage(format!("cannot check free space in {}: {e}", dir.display()))
        })?;
    space::ensure(
        available,
        space::for_live_save(ram),
        &format!("the VM state of a live snapshot (disk '{}')", disk.name),
        dir,
    )?;
    Ok(ram)
}

/// How one QEMU job ended, when not well.
enum JobEnd {
    Failed(String),
    Cancelled,
}

pub(super) async fn run(vm: &Vm, job: &Job, op: Op, name: &str, p: Prepared) -> Outcome {
    let qmp = match vm.qmp() {
        Ok(q) => q,
        Err(e) => return Outcome::new(JobState::Failed, e.to_string()),
    };
    let runner = Runner {
        vm,
        qmp: &qmp,
        job,
        prefix: format!("maqet-{}-{}", job.id(), now_us()),
    };
    let nodes: Vec<String> = p.disks.iter().map(|(_, l)| l.node.clone()).collect();
    let holding: Vec<String> = p
        .disks
        .iter()
        .filter(|(_, l)| l.snapshots.iter().any(|s| s.name == name))
        .map(|(_, l)| l.node.clone())
        .collect();
    match op {
        Op::Create { overwrite } => {
            if overwrite && !holding.is_empty() {
                let args = json!({ "tag": name, "devices": holding });
                if let Err(e) = runner
                    .job("snapshot-delete", "replace", args, false, None)
                    .await
                {
                    return failed(e, format!("could not replace the old snapshot '{name}'"));
                }
            }
            if job.cancel_requested() {
                let note = if overwrite && !holding.is_empty() {
                    format!("the old snapshot '{name}' was already deleted to be replaced")
                } else {
                    "nothing was saved".into()
                };
                return Outcome::new(
                    JobState::Cancelled,
                    format!("cancelled before saving; {note}"),
                );
            }
            let args = json!({ "tag": name, "vmstate": nodes[0], "devices": nodes });
            // Consistent filesystems in the snapshot when the guest agent can freeze
            // them; thawed right after the save, whatever its outcome.
            let frozen = vm.agent_freeze().await;
            let pid = vm.with_info(|i| i.pid);
            let meter = SaveMeter::start(&p.disks[0].0.path, pid, p.guest_ram);
            let saved = runner
                .job("snapshot-save", "save", args, true, Some(meter))
                .await;
            if frozen {
                vm.agent_thaw().await;
            }
            match saved {
                // QEMU (7.2 at least) saves in one block of its main loop and cannot
                // stop a save once begun: a cancel maqet accepted is honoured by
                // deleting what QEMU made, so the user sees no snapshot.
                Ok(()) if job.seal() => match runner.remove_made(name, &p).await {
                    Ok(_) => Outcome::new(
                        JobState::Cancelled,
                        format!(
                            "cancelled; QEMU had already saved snapshot '{name}' (it cannot stop a save once begun), so maqet deleted it"
                        ),
                    ),
                    Err(why) => Outcome::new(
                        JobState::Failed,
                        format!(
                            "cancelled too late: QEMU had already saved snapshot '{name}', and deleting it failed ({why}); delete it (maqet snapshot rm)"
                        ),
                    ),
                },
                Ok(()) => Outcome::new(JobState::Completed, format!("created snapshot '{name}'")),
                Err(e) => {
                    let note = runner.remove_partial(name, &p).await;
                    failed(e, note)
                }
            }
        }
        Op::Load => {
            let args = json!({ "tag": name, "vmstate": nodes[0], "devices": nodes });
            match runner.job("snapshot-load", "load", args, true, None).await {
                Ok(()) => Outcome::new(JobState::Completed, format!("loaded snapshot '{name}'")),
                Err(e) => failed(e, format!("snapshot '{name}' was not loaded")),
            }
        }
        Op::Delete => {
            let args = json!({ "tag": name, "devices": holding });
            match runner
                .job("snapshot-delete", "delete", args, true, None)
                .await
            {
                Ok(()) => Outcome::new(JobState::Completed, format!("deleted snapshot '{name}'")),
                Err(e) => failed(e, format!("snapshot '{name}' may remain on some disks")),
            }
        }
    }
}

/// The next tick of `ticks`; never, without ticks.
async fn next_tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A save's `Message` while it writes, e.g. `saving the VM state: 312 MiB of about 1040 MiB`.
fn saving_message(written: u64, total: u64) -> String {
    format!(
        "saving the VM state: {} MiB of about {} MiB",
        written >> 20,
        total >> 20
    )
}

fn failed(e: JobEnd, note: String) -> Outcome {
    match e {
        JobEnd::Cancelled => Outcome::new(JobState::Cancelled, format!("cancelled; {note}")),
        JobEnd::Failed(why) => Outcome::new(JobState::Failed, format!("{why}; {note}")),
    }
}

struct Runner<'a> {
    vm: &'a Vm,
    qmp: &'a QmpClient,
    job: &'a Job,
    /// QEMU job ids must be unique among QEMU's jobs, also across maqetd restarts.
    prefix: String,
}

impl Runner<'_> {
    /// Runs one QEMU job to its end. `main`: it reports progress and can be cancelled.
    /// `meter`: progress is measured by it (every [`save_meter::INTERVAL`] while the
    /// job runs) instead of asked of QEMU.
    async fn job(
        &self,
        command: &str,
        suffix: &str,
        mut args: Value,
        main: bool,
        mut meter: Option<SaveMeter>,
    ) -> Result<(), JobEnd> {
        let id = format!("{}-{suffix}", self.prefix);
        args["job-id"] = json!(id);
        // Subscribe before sending: the job's first events may beat the reply.
        let mut events = self.vm.subscribe_qmp();
        let mut cancel = if main {
            self.job.cancel_receiver()
        } else {
            watch::channel(false).1
        };
        let reply = self.qmp.execute(command, Some(args));
        tokio::pin!(reply);
        // Only while this job runs: no timer exists otherwise. The first measure comes
        // one interval in: a save that ends sooner reports nothing before its end.
        let mut ticks = meter.as_ref().map(|_| {
            let first = tokio::time::Instant::now() + save_meter::INTERVAL;
            let mut t = tokio::time::interval_at(first, save_meter::INTERVAL);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            t
        });
        // `cancel_done`: the cancel branch has fired (a receiver whose sender is gone
        // fires at once, without a cancel); `cancel_sent`: QEMU was asked to cancel.
        let (mut replied, mut cancel_done, mut cancel_sent) = (false, false, false);
        loop {
            tokio::select! {
                r = &mut reply, if !replied => {
                    replied = true;
                    if let Err(e) = r {
                        return Err(JobEnd::Failed(qmp_error(&self.vm.name(), e).to_string()));
                    }
                }
                ev = events.recv() => match ev {
                    Ok((event, data)) if event == "JOB_STATUS_CHANGE"
                        && data.get("id").and_then(Value::as_str) == Some(id.as_str()) =>
                    {
                        let status = data.get("status").and_then(Value::as_str).unwrap_or("");
                        // With a meter, `query-jobs` would only be answered after the
                        // save, holding up the measuring.
                        if main && meter.is_none() {
                            self.report_progress(&id, status).await;
                        }
                        if status == "concluded" {
                            break;
                        }
                    }
                    Ok(_) => {}
                    // Missed events: ask where the job is instead.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if self.query(&id).await.is_some_and(|j| j["status"] == "concluded") {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(JobEnd::Failed("QEMU went away during the snapshot".into()));
                    }
                },
                changed = async { cancel.wait_for(|c| *c).await.is_ok() }, if !cancel_done => {
                    cancel_done = true;
                    cancel_sent = changed;
                    if changed {
                        // Refused once the job is past the point of no return; the
                        // job then simply ends on its own.
                        let _ = self.qmp.execute_timeout("job-cancel", Some(json!({ "id": id })), QUERY_TIMEOUT).await;
                    }
                }
                _ = next_tick(&mut ticks) => {
                    if let Some(m) = meter.as_mut() {
                        let (progress, written) = m.measure();
                        // Below 1 % is noise (QEMU's own replies and log lines), and a
                        // client would show a bar stuck at 0 % instead of a spinner.
                        if progress >= save_meter::FIRST_STEP {
                            self.job.set_progress(progress, &saving_message(written, m.total()));
                        }
                    }
                }
                () = self.qmp.closed() => {
                    return Err(JobEnd::Failed("QEMU exited during the snapshot".into()));
                }
            }
        }
        let error = self
            .query(&id)
            .await
            .and_then(|j| j.get("error").and_then(Value::as_str).map(str::to_owned));
        let _ = self
            .qmp
            .execute_timeout("job-dismiss", Some(json!({ "id": id })), QUERY_TIMEOUT)
            .await;
        match error {
            None => Ok(()),
            Some(_) if cancel_sent => Err(JobEnd::Cancelled),
            Some(e) => Err(JobEnd::Failed(format!("QEMU's {command} failed: {e}"))),
        }
    }

    /// This job's entry in `query-jobs`.
    async fn query(&self, id: &str) -> Option<Value> {
        let jobs = self
            .qmp
            .execute_timeout("query-jobs", None, QUERY_TIMEOUT)
            .await
            .ok()?;
        jobs.as_array()?
            .iter()
            .find(|j| j.get("id").and_then(Value::as_str) == Some(id))
            .cloned()
    }

    async fn report_progress(&self, id: &str, status: &str) {
        let Some(j) = self.query(id).await else {
            return;
        };
        let get = |k: &str| j.get(k).and_then(Value::as_u64).unwrap_or(0);
        let (current, total) = (get("current-progress"), get("total-progress"));
        if total > 0 {
            self.job
                .set_progress(current as f64 / total as f64, &format!("QEMU job {status}"));
        }
    }

    /// After a failed save: delete whatever QEMU wrote under the name.
    async fn remove_partial(&self, name: &str, p: &Prepared) -> String {
        match self.remove_made(name, p).await {
            Ok(false) => "no partial snapshot was left behind".into(),
            Ok(true) => "the partial snapshot was removed".into(),
            Err(why) => format!(
                "the partial snapshot '{name}' could not be removed ({why}); delete it (maqet snapshot rm)"
            ),
        }
    }

    /// Deletes snapshot `name` from every disk that now holds it (after a save that
    /// failed or was cancelled). `Ok(true)`: something was deleted; `Err`: why not.
    async fn remove_made(&self, name: &str, p: &Prepared) -> Result<bool, String> {
        let disks: Vec<Disk> = p.disks.iter().map(|(d, _)| d.clone()).collect();
        let holding: Vec<String> = inspect(self.vm, &disks)
            .await
            .map_err(|e| format!("could not check which disks hold it: {e}"))?
            .into_iter()
            .filter(|l| l.snapshots.iter().any(|s| s.name == name))
            .map(|l| l.node)
            .collect();
        if holding.is_empty() {
            return Ok(false);
        }
        let args = json!({ "tag": name, "devices": holding });
        match self
            .job("snapshot-delete", "cleanup", args, false, None)
            .await
        {
            Ok(()) => Ok(true),
            Err(JobEnd::Failed(why)) => Err(why),
            Err(JobEnd::Cancelled) => Err("cancelled".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_commands_are_found_by_name_in_query_commands() {
        let qemu_7_2 = json!([{"name": "snapshot-save"}, {"name": "snapshot-load"}, {"name": "snapshot-delete"}, {"name": "query-jobs"}]);
        let qemu_5_2 = json!([{"name": "query-jobs"}, {"name": "savevm-not-in-qmp"}]);
        for op in [Op::Create { overwrite: true }, Op::Load, Op::Delete] {
            assert!(missing_commands(&qemu_7_2, commands_needed(op)).is_empty());
        }
        assert_eq!(
            missing_commands(&qemu_5_2, commands_needed(Op::Create { overwrite: false })),
            ["snapshot-save", "snapshot-delete"]
        );
        assert_eq!(
            missing_commands(&qemu_5_2, commands_needed(Op::Load)),
            ["snapshot-load"]
        );
        assert_eq!(
            missing_commands(&json!({}), &["snapshot-delete"]),
            ["snapshot-delete"]
        );
    }
}
