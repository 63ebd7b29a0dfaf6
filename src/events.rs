//! What the core announces. The D-Bus layer turns these into signals; notifications
//! and other listeners can subscribe to the same stream. The core never touches D-Bus.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::jobs::JobState;
use crate::vm::{Status, Vm, VmInfo};

/// What brought a status change about, for listeners that tell what a person asked for
/// from what happened on its own (notifications).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A call, maqet itself, or the host (a crash reads as such from its status).
    Other,
    /// The guest: it powered off, or rebooted under `-no-reboot`.
    Guest,
    /// The stop between a restart's two QEMU processes.
    Restart,
}

#[derive(Debug, Clone)]
pub enum CoreEvent {
    /// A VM's status changed; `info` is the VM as of this change (listeners must not
    /// read the live VM instead: it may already have moved on).
    StatusChanged {
        vm: Arc<Vm>,
        info: VmInfo,
        previous: Status,
        cause: Cause,
    },
    /// The runtime record changed without a status change (the pid of a QEMU being
    /// started, a re-adoption): reason, pid, timestamps, exit status.
    RuntimeChanged { vm: Arc<Vm>, info: VmInfo },
    /// The definition changed (`Apply`): name and config.
    ConfigChanged { vm: Arc<Vm>, info: VmInfo },
    /// A VM was defined (its row is committed). The consumer serves and announces it,
    /// then calls [`Vm::mark_announced`] so the call that added it can answer.
    VmAdded { vm: Arc<Vm>, info: VmInfo },
    /// A VM's definition was removed; `name` is its last name. Handled like `VmAdded`.
    VmRemoved { vm: Arc<Vm>, name: String },
    /// An asynchronous QMP event of a running VM, with QEMU's own timestamp.
    Qmp {
        vm: Arc<Vm>,
        name: String,
        data_json: String,
        timestamp_us: u64,
    },
    /// What the guest agent reports, or the forwards, changed: `changed` names the
    /// properties (`GuestAgent`, `GuestInfo`, `Addresses`, `Forwards`).
    GuestChanged {
        vm: Arc<Vm>,
        view: crate::vm::guest::GuestView,
        changed: Vec<&'static str>,
    },
    /// A job ended (the Job object signals `Completed` itself; this is for listeners
    /// that did not start it).
    JobFinished {
        vm: Arc<Vm>,
        job: u64,
        /// E.g. `snapshot-create`.
        operation: &'static str,
        /// What it worked on (a snapshot name).
        target: String,
        state: JobState,
        message: String,
    },
}

/// Where the core sends events: an unbounded queue, so emitting never blocks a state
/// transition and no status change is ever dropped.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: mpsc::UnboundedSender<CoreEvent>,
}

impl EventSink {
    pub fn new() -> (EventSink, mpsc::UnboundedReceiver<CoreEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EventSink { tx }, rx)
    }

    pub fn emit(&self, ev: CoreEvent) {
        // A closed receiver means the service is shutting down; nothing to announce to.
        let _ = self.tx.send(ev);
    }
}
