//! `org.maqet.Maqet1.Job` objects at `/org/maqet/Maqet1/job/<n>`: serving a core
//! [`Job`], announcing its changes, and retiring finished ones.
//!
//! Each published job gets a watcher task that turns the job's status changes into
//! `PropertiesChanged` and, at the end, `Completed`. Finished job objects stay on the
//! bus so a client that looks late still reads the outcome: the newest
//! [`KEEP_FINISHED`] finished jobs are kept, older ones are removed as newer ones
//! finish (no timers). The outcome is also in the VM's history for good.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, Variant, interface};

use super::Shared;
use super::properties::emit_changed;
use super::signals::emitters;
use crate::access::{Action, Request};
use crate::client::{JOB_INTERFACE, job_path, vm_path};
use crate::error::MaqetError;
use crate::jobs::{Job, JobState, JobStatus};
use crate::outbound::{Outbound, escape};

/// Finished job objects kept on the bus.
pub const KEEP_FINISHED: usize = 32;

/// Job objects on the bus: all of them (for introspection), and the finished ones,
/// oldest first.
#[derive(Debug, Default)]
pub struct Retired {
    paths: Mutex<VecDeque<OwnedObjectPath>>,
    /// Job id → its VM's id, for every job object served.
    served: Mutex<BTreeMap<u64, String>>,
}

impl Retired {
    /// (job id, VM id) of every job object on the bus.
    pub fn served(&self) -> Vec<(u64, String)> {
        let served = self.served.lock();
        served.iter().map(|(n, vm)| (*n, vm.clone())).collect()
    }
}

pub struct JobIface {
    shared: Arc<Shared>,
    job: Arc<Job>,
}

/// The action that guards a job: the one its operation needed.
fn action_of(job: &Job) -> Action {
    match job.operation() {
        "snapshot-load" => Action::SnapshotLoad,
        "snapshot-delete" => Action::SnapshotDelete,
        crate::images::import::OPERATION => Action::Images,
        crate::manager::CLONE_OPERATION | crate::manager::EXPORT_OPERATION => Action::Manage,
        _ => Action::SnapshotCreate,
    }
}

impl JobIface {
    /// A property read, after the gate's `org.maqet.vm.observe` check on the job's VM
    /// (a job's properties say which VM it works on and what it does).
    async fn read<T>(
        &self,
        conn: &Connection,
        hdr: Option<Header<'_>>,
        value: impl FnOnce(&Job) -> T,
    ) -> zbus::fdo::Result<T> {
        let vm = self.shared.manager.get(self.job.vm_id());
        self.shared
            .gate
            .check_read(conn, hdr.as_ref(), vm.as_deref())
            .await?;
        Ok(value(&self.job))
    }
}

#[interface(name = "org.maqet.Maqet1.Job")]
impl JobIface {
    /// Asks the job to stop. Its end (cancelled, or completed when it was already past
    /// the point of no return) arrives as `Completed` and in `State`.
    async fn cancel(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let mut req = Request::new(action_of(&self.job), "Job.Cancel")
            .with_args(format!("job={}", self.job.id()));
        if let Some(vm) = self.shared.manager.get(self.job.vm_id()) {
            req = req.on_vm(&vm);
        }
        let work = async { self.job.cancel() };
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// E.g. `snapshot-create`.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn operation(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.read(conn, hdr, |job| job.operation().to_string())
            .await
    }

    /// The VM the job works on (`/` for none, e.g. an image import; the source VM of
    /// a full clone or an export).
    #[zbus(property(emits_changed_signal = "const"), name = "VM")]
    async fn vm(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        // "/" for a job on no VM (an image import).
        self.read(conn, hdr, |job| match job.vm_id() {
            "" => OwnedObjectPath::try_from("/").expect("a valid path"),
            id => vm_path(id),
        })
        .await
    }

    /// How far the job has got, 0..1. It only rises, and is 1 once the job completed; a live snapshot's is measured from what QEMU has written (see storage.md, Jobs).
    #[zbus(property)]
    async fn progress(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<f64> {
        self.read(conn, hdr, |job| job.status().progress).await
    }

    /// `running`, `completed`, `failed` or `cancelled`.
    #[zbus(property)]
    async fn state(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.read(conn, hdr, |job| job.status().state.as_str().to_string())
            .await
    }

    /// What the job is doing, or how it ended.
    #[zbus(property)]
    async fn message(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.read(conn, hdr, |job| job.status().message.outbound())
            .await
    }

    /// The job ended; `success` is true for `completed`.
    #[zbus(signal)]
    async fn completed(
        emitter: &SignalEmitter<'_>,
        success: bool,
        message: &str,
    ) -> zbus::Result<()>;
}

/// Serves the job's object and starts announcing its changes. Returns its path.
pub async fn publish(
    conn: &Connection,
    shared: &Arc<Shared>,
    job: Arc<Job>,
) -> Result<OwnedObjectPath, MaqetError> {
    let path = job_path(job.id());
    let iface = JobIface {
        shared: shared.clone(),
        job: job.clone(),
    };
    conn.object_server().at(&path, iface).await?;
    super::introspection::document(conn, shared, &path, super::introspection::Node::Job).await?;
    shared
        .retired_jobs
        .served
        .lock()
        .insert(job.id(), job.vm_id().to_string());
    tokio::spawn(watch(conn.clone(), shared.clone(), job, path.clone()));
    Ok(path)
}

async fn watch(conn: Connection, shared: Arc<Shared>, job: Arc<Job>, path: OwnedObjectPath) {
    let mut rx = job.subscribe();
    let mut last = rx.borrow_and_update().clone();
    // A job's signals are about its VM: they reach whoever may observe that VM.
    let audience = || async {
        let vm = shared.manager.get(job.vm_id());
        emitters(&shared.gate, &conn, path.as_ref(), vm.as_deref()).await
    };
    while !last.state.is_finished() {
        if rx.changed().await.is_err() {
            return;
        }
        let now = rx.borrow_and_update().clone();
        let sent = async {
            for emitter in audience().await? {
                properties_changed(&emitter, &last, &now).await?;
            }
            zbus::Result::Ok(())
        };
        if let Err(e) = sent.await {
            tracing::warn!(job = job.id(), error = %e, "cannot announce job progress");
        }
        last = now;
    }
    let success = last.state == JobState::Completed;
    let sent = async {
        for emitter in audience().await? {
            JobIface::completed(&emitter, success, &escape(&last.message)).await?;
        }
        zbus::Result::Ok(())
    };
    if let Err(e) = sent.await {
        tracing::warn!(job = job.id(), error = %e, "cannot announce the job's end");
    }
    retire(&conn, &shared.retired_jobs, path).await;
}

async fn properties_changed(
    emitter: &SignalEmitter<'_>,
    old: &JobStatus,
    new: &JobStatus,
) -> zbus::Result<()> {
    let mut changed: HashMap<&str, Variant<'_>> = HashMap::new();
    if old.progress != new.progress {
        changed.insert("Progress", Variant::from(new.progress));
    }
    if old.state != new.state {
        changed.insert("State", Variant::from(new.state.as_str()));
    }
    if old.message != new.message {
        changed.insert("Message", Variant::from(escape(&new.message).into_owned()));
    }
    if changed.is_empty() {
        return Ok(());
    }
    emit_changed(emitter, JOB_INTERFACE, changed).await
}

/// Keeps the newest finished jobs; removes the oldest beyond [`KEEP_FINISHED`].
async fn retire(conn: &Connection, retired: &Retired, path: OwnedObjectPath) {
    let expired: Vec<OwnedObjectPath> = {
        let mut paths = retired.paths.lock();
        paths.push_back(path);
        let excess = paths.len().saturating_sub(KEEP_FINISHED);
        paths.drain(..excess).collect()
    };
    for old in expired {
        let _ = conn.object_server().remove::<JobIface, _>(&old).await;
        if let Some(n) = old.rsplit('/').next().and_then(|n| n.parse::<u64>().ok()) {
            let mut served = retired.served.lock();
            served.remove(&n);
        }
    }
}
