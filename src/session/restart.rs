//! The restart policy (`restart: no | on-crash | always`): a VM whose QEMU ended
//! without being asked to is started again after an exponential back-off, until it
//! crashed [`LIMIT`] times within [`WINDOW`]; then maqet stops trying and says so in the
//! VM's reason.
//!
//! Driven by the status changes the core announces (the signal pump hands each one over
//! in order): no polling. The only timer is the back-off of a VM about to restart.
//! During the back-off the VM stays `crashed` and its reason reads
//! `restarting (2/5) in 2 s: <why it crashed>` (the second crash of the five allowed);
//! [`shown_status`] turns that into the status column `restarting (2/5)`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::Busy;
use crate::access::ActivityObserver;
use crate::config::RestartPolicy;
use crate::events::{Cause, CoreEvent};
use crate::vm::{Status, Vm};

/// Crashes within [`WINDOW`] after which maqet stops restarting a VM.
pub const LIMIT: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(600);
/// The first back-off; each further crash in the window doubles it.
const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(60);

const RESTARTING: &str = "restarting (";
const GAVE_UP: &str = "gave up restarting";

/// Per VM: the recent unplanned ends, and which back-off is the current one.
#[derive(Default)]
struct History {
    ends: VecDeque<Instant>,
    /// Bumped by every end: a back-off only starts the VM if it is still the latest.
    generation: u64,
}

pub struct Restarter {
    history: Arc<Mutex<HashMap<String, History>>>,
    activity: Option<Arc<dyn ActivityObserver>>,
}

/// What one unplanned end leads to.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Start again after the delay; this was crash `attempt` of [`LIMIT`].
    Restart {
        attempt: usize,
        delay: Duration,
    },
    GiveUp,
}

impl Restarter {
    pub fn new(activity: Option<Arc<dyn ActivityObserver>>) -> Restarter {
        Restarter {
            history: Arc::default(),
            activity,
        }
    }

    /// Looks at one core event; schedules a restart when the VM's policy asks for one.
    pub fn observe(&self, ev: &CoreEvent) {
        match ev {
            CoreEvent::StatusChanged {
                vm, info, cause, ..
            } => {
                if !unplanned(info.status, *cause) {
                    return;
                }
                let policy = match vm.stored_config() {
                    Ok(c) => c.session().restart,
                    Err(_) => return,
                };
                if !applies(policy, info.status) {
                    return;
                }
                self.ended(vm, &info.reason);
            }
            CoreEvent::VmRemoved { vm, .. } => {
                self.history.lock().remove(vm.id());
            }
            _ => {}
        }
    }

    fn ended(&self, vm: &Arc<Vm>, why: &str) {
        let (decision, generation) = {
            let mut all = self.history.lock();
            let h = all.entry(vm.id().to_string()).or_default();
            h.generation += 1;
            let d = decide(&mut h.ends, Instant::now());
            if d == Decision::GiveUp {
                // A person's next start gets a fresh budget.
                h.ends.clear();
            }
            (d, h.generation)
        };
        let status = vm.status();
        let (vm, why) = (vm.clone(), why.to_string());
        let history = self.history.clone();
        let busy = Busy::hold(&self.activity);
        tokio::spawn(async move {
            let _busy = busy;
            match decision {
                Decision::GiveUp => {
                    let reason = format!(
                        "{GAVE_UP} after {LIMIT} crashes within {} min; start it yourself (maqet start {}) once fixed: {why}",
                        WINDOW.as_secs() / 60,
                        vm.name()
                    );
                    tracing::warn!(vm = %vm.name(), "{reason}");
                    vm.explain(status, &reason).await;
                }
                Decision::Restart { attempt, delay } => {
                    let reason = format!(
                        "{RESTARTING}{attempt}/{LIMIT}) in {} s: {why}",
                        delay.as_secs()
                    );
                    tracing::info!(vm = %vm.name(), "{reason}");
                    if !vm.explain(status, &reason).await {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    let current = history
                        .lock()
                        .get(vm.id())
                        .is_some_and(|h| h.generation == generation);
                    if !current || vm.status() != status {
                        return;
                    }
                    if let Err(e) = vm.start().await {
                        tracing::warn!(vm = %vm.name(), error = %e, "restart failed");
                    }
                }
            }
        });
    }
}

/// An end nobody asked for: a crash, or the guest powering itself off.
fn unplanned(status: Status, cause: Cause) -> bool {
    status == Status::Crashed || (status == Status::Stopped && cause == Cause::Guest)
}

fn applies(policy: RestartPolicy, status: Status) -> bool {
    match policy {
        RestartPolicy::No => false,
        RestartPolicy::OnCrash => status == Status::Crashed,
        RestartPolicy::Always => true,
    }
}

/// Records an end at `now` and decides: back off 1, 2, 4, … s, or give up at the
/// [`LIMIT`]th end within [`WINDOW`].
fn decide(ends: &mut VecDeque<Instant>, now: Instant) -> Decision {
    while ends
        .front()
        .is_some_and(|t| now.duration_since(*t) >= WINDOW)
    {
        ends.pop_front();
    }
    ends.push_back(now);
    let n = ends.len();
    if n >= LIMIT {
        return Decision::GiveUp;
    }
    let delay = FIRST_DELAY
        .saturating_mul(1 << (n - 1).min(16))
        .min(MAX_DELAY);
    Decision::Restart { attempt: n, delay }
}

/// The status as a person should read it: `restarting (2/5)` while a crashed VM waits
/// for its restart, else the status itself.
pub fn shown_status(status: &str, reason: &str) -> String {
    if status == Status::Crashed.as_str()
        && let Some(rest) = reason.strip_prefix(RESTARTING)
        && let Some((count, _)) = rest.split_once(')')
    {
        return format!("{RESTARTING}{count})");
    }
    status.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_then_gives_up_at_the_limit() {
        let mut ends = VecDeque::new();
        let t0 = Instant::now();
        let mut delays = Vec::new();
        for i in 0..LIMIT - 1 {
            match decide(&mut ends, t0 + Duration::from_secs(i as u64)) {
                Decision::Restart { attempt, delay } => {
                    assert_eq!(attempt, i + 1);
                    delays.push(delay.as_secs());
                }
                Decision::GiveUp => panic!("gave up too early"),
            }
        }
        assert_eq!(delays, [1, 2, 4, 8]);
        assert_eq!(
            decide(&mut ends, t0 + Duration::from_secs(9)),
            Decision::GiveUp
        );
    }

    #[test]
    fn crashes_older_than_the_window_are_forgotten() {
        let mut ends = VecDeque::new();
        let t0 = Instant::now();
        for i in 0..LIMIT - 1 {
            decide(&mut ends, t0 + Duration::from_secs(i as u64));
        }
        let later = t0 + WINDOW + Duration::from_secs(LIMIT as u64);
        assert_eq!(
            decide(&mut ends, later),
            Decision::Restart {
                attempt: 1,
                delay: FIRST_DELAY
            }
        );
    }

    #[test]
    fn only_unplanned_ends_under_a_policy_restart() {
        assert!(unplanned(Status::Crashed, Cause::Other));
        assert!(unplanned(Status::Stopped, Cause::Guest));
        assert!(!unplanned(Status::Stopped, Cause::Other));
        assert!(!unplanned(Status::Stopped, Cause::Restart));
        assert!(!unplanned(Status::Failed, Cause::Other));
        assert!(!applies(RestartPolicy::No, Status::Crashed));
        assert!(applies(RestartPolicy::OnCrash, Status::Crashed));
        assert!(!applies(RestartPolicy::OnCrash, Status::Stopped));
        assert!(applies(RestartPolicy::Always, Status::Stopped));
    }

    #[test]
    fn the_status_column_shows_the_back_off() {
        let r = "restarting (3/5) in 4 s: QEMU was killed by signal 9 (SIGKILL)";
        assert_eq!(shown_status("crashed", r), "restarting (3/5)");
        assert_eq!(
            shown_status("crashed", "QEMU exited with status 1"),
            "crashed"
        );
        assert_eq!(shown_status("running", r), "running");
    }
}
