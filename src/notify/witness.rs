//! Who saw it happen: a failed start answered to its caller, a snapshot its starter
//! followed to the end. Notifications are for what happens while nobody watches, so
//! the notifier leaves these out (docs/desktop.md).
//!
//! The D-Bus adapters record here; the signal pump asks, in the core's event order,
//! before it emits the event's signals (so a client that exits the moment it hears
//! the outcome still counts as having been there).

use std::collections::HashMap;

use parking_lot::Mutex;
use zbus::Connection;

use crate::error::MaqetError;
use crate::events::CoreEvent;
use crate::vm::Status;

#[derive(Debug, Default)]
pub struct Witnesses {
    /// Per VM id: start calls under way, or that failed in front of their caller, whose
    /// `failed` status change the notifier has not yet seen.
    starts: Mutex<HashMap<String, u32>>,
    /// Per job: the unique bus name of the caller that started it.
    jobs: Mutex<HashMap<u64, String>>,
    /// Per VM id: the caller of a job start still under way (its job may end before
    /// the start returns its id).
    job_calls: Mutex<HashMap<String, String>>,
}

impl Witnesses {
    /// A caller waits for this start's answer; call [`Witnesses::start_answered`] with
    /// it. Recorded before the start runs, so its `failed` event always finds it.
    pub fn start_called(&self, vm_id: &str) {
        *self.starts.lock().entry(vm_id.to_string()).or_default() += 1;
    }

    /// The start's answer went back to its caller. A failure inside the start (QEMU,
    /// disk creation: the errors that come with a `failed` status) keeps its mark for
    /// that event; anything else had no such event and drops it.
    pub fn start_answered(&self, vm_id: &str, result: &Result<(), MaqetError>) {
        if matches!(
            result,
            Err(MaqetError::QemuFailed(_) | MaqetError::Storage(_))
        ) {
            return;
        }
        self.take_start(vm_id);
    }

    fn take_start(&self, vm_id: &str) -> bool {
        let mut starts = self.starts.lock();
        let Some(n) = starts.get_mut(vm_id) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            starts.remove(vm_id);
        }
        true
    }

    /// The connection `caller` is starting a job on the VM `vm_id`; then
    /// [`Witnesses::job_started`] with its id (or `None` if none started).
    pub fn job_called(&self, vm_id: &str, caller: Option<&str>) {
        if let Some(caller) = caller {
            self.job_calls
                .lock()
                .insert(vm_id.to_string(), caller.to_string());
        }
    }

    /// The job start on `vm_id` returned: `job` is the job it started, if any.
    pub fn job_started(&self, vm_id: &str, job: Option<u64>) {
        let caller = self.job_calls.lock().remove(vm_id);
        if let (Some(job), Some(caller)) = (job, caller) {
            self.jobs.lock().insert(job, caller);
        }
    }

    /// Whether someone saw the outcome `ev` reports (and forgets what it consumed).
    pub async fn saw(&self, conn: &Connection, ev: &CoreEvent) -> bool {
        match ev {
            CoreEvent::StatusChanged { info, .. } if info.status == Status::Failed => {
                self.take_start(&info.id)
            }
            CoreEvent::JobFinished { job, vm, .. } => {
                let caller = self.jobs.lock().remove(job);
                // A job that ended before its start returned: its caller is the one
                // still waiting for that answer.
                let caller = caller.or_else(|| self.job_calls.lock().get(vm.id()).cloned());
                let Some(caller) = caller else {
                    return false;
                };
                // Still connected: a client following the job (`maqet snapshot`) sees
                // its end with this very signal.
                still_connected(conn, &caller).await
            }
            _ => false,
        }
    }
}

async fn still_connected(conn: &Connection, name: &str) -> bool {
    let Ok(dbus) = zbus::fdo::DBusProxy::new(conn).await else {
        return false;
    };
    let Ok(name) = zbus::names::BusName::try_from(name) else {
        return false;
    };
    dbus.name_has_owner(name).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_answered_with_a_failure_keeps_its_mark_for_the_event() {
        let w = Witnesses::default();
        w.start_called("a");
        w.start_answered("a", &Err(MaqetError::QemuFailed("x".into())));
        assert!(w.take_start("a"), "the failed event finds the mark");
        assert!(!w.take_start("a"), "once");

        w.start_called("a");
        w.start_answered("a", &Ok(()));
        w.start_called("a");
        w.start_answered("a", &Err(MaqetError::InvalidState("running".into())));
        assert!(!w.take_start("a"), "no failed event follows these");
    }
}
