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
//!
//! The crashes are counted in the database (`restart_crashes`), so a maqetd that exits
//! (SIGTERM, an upgrade) and comes back continues the count instead of granting a fresh
//! budget, and [`Restarter::resume`] finishes a back-off the previous maqetd left
//! pending.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::Busy;
use crate::access::ActivityObserver;
use crate::config::RestartPolicy;
use crate::events::{Cause, CoreEvent};
use crate::manager::Manager;
use crate::store::Store;
use crate::time::now_us;
use crate::vm::{Status, Vm};

/// Crashes within [`WINDOW`] after which maqet stops restarting a VM.
pub const LIMIT: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(600);
/// The first back-off; each further crash in the window doubles it.
const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(60);

const RESTARTING: &str = "restarting (";
const GAVE_UP: &str = "gave up restarting";

/// Per VM, which back-off is the current one: bumped by every end, so a back-off only
/// starts the VM if it is still the latest.
type Generations = Arc<Mutex<HashMap<String, u64>>>;

pub struct Restarter {
    generations: Generations,
    store: Arc<Store>,
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
    pub fn new(store: Arc<Store>, activity: Option<Arc<dyn ActivityObserver>>) -> Restarter {
        Restarter {
            generations: Arc::default(),
            store,
            activity,
        }
    }

    /// Looks at one core event; schedules a restart when the VM's policy asks for one.
    pub fn observe(&self, ev: &CoreEvent) {
        match ev {
            CoreEvent::StatusChanged {
                vm, info, cause, ..
            } => {
                if !unplanned(info.status, *cause) || !policy_applies(vm, info.status) {
                    return;
                }
                self.ended(vm, &info.reason);
            }
            // Its crash rows go with its database row.
            CoreEvent::VmRemoved { vm, .. } => {
                self.generations.lock().remove(vm.id());
            }
            _ => {}
        }
    }

    /// A new back-off for this VM: the earlier one, if any, no longer starts it.
    fn next_generation(&self, vm: &Vm) -> u64 {
        let mut all = self.generations.lock();
        let g = all.entry(vm.id().to_string()).or_default();
        *g += 1;
        *g
    }

    fn ended(&self, vm: &Arc<Vm>, why: &str) {
        let generation = self.next_generation(vm);
        let status = vm.status();
        let (vm, why) = (vm.clone(), why.to_string());
        let (generations, store) = (self.generations.clone(), self.store.clone());
        let busy = Busy::hold(&self.activity);
        tokio::spawn(async move {
            let _busy = busy;
            let id = vm.id().to_string();
            let window = WINDOW.as_micros() as u64;
            let decision = match store
                .write(move |db| db.record_crash(&id, now_us(), window))
                .await
            {
                Ok(crashes) => decide(crashes.len()),
                Err(e) => {
                    // Without a count the limit cannot hold: restarting blindly could
                    // loop forever, so this crash is the last one restarted.
                    tracing::warn!(vm = %vm.name(), error = %e, "cannot count the crash; no restart");
                    Decision::GiveUp
                }
            };
            match decision {
                Decision::GiveUp => {
                    // A person's next start gets a fresh budget.
                    let id = vm.id().to_string();
                    if let Err(e) = store.write(move |db| db.clear_crashes(&id)).await {
                        tracing::warn!(vm = %vm.name(), error = %e, "cannot reset the crash count");
                    }
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
                    if vm.explain(status, &reason).await {
                        back_off(&vm, status, generation, delay, &generations).await;
                    }
                }
            }
        });
    }

    /// Finishes the back-offs an earlier maqetd of this session left pending (it exited
    /// during one): each such VM is still `crashed` with a `restarting (n/5)` reason.
    /// It starts when its back-off would have ended, counted from its last crash.
    pub async fn resume(&self, manager: &Manager) {
        for vm in manager.list() {
            let (status, reason) = vm.with_info(|i| (i.status, i.reason.clone()));
            if status != Status::Crashed
                || !reason.starts_with(RESTARTING)
                || !policy_applies(&vm, status)
            {
                continue;
            }
            let id = vm.id().to_string();
            let crashes = match self.store.read(move |db| db.crashes(&id)).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(vm = %vm.name(), error = %e, "cannot read the crash count; the back-off is not resumed");
                    continue;
                }
            };
            let delay = match (crashes.last(), decide(crashes.len())) {
                (Some(last), Decision::Restart { delay, .. }) => {
                    let ends = last.saturating_add(delay.as_micros() as u64);
                    Duration::from_micros(ends.saturating_sub(now_us()))
                }
                // Its crashes left the window meanwhile: nothing left to wait for.
                _ => Duration::ZERO,
            };
            tracing::info!(vm = %vm.name(), delay_ms = delay.as_millis() as u64, "resuming a restart back-off");
            let generation = self.next_generation(&vm);
            let generations = self.generations.clone();
            let busy = Busy::hold(&self.activity);
            tokio::spawn(async move {
                let _busy = busy;
                back_off(&vm, status, generation, delay, &generations).await;
            });
        }
    }
}

/// Waits out a back-off, then starts the VM unless something happened meanwhile (a
/// person started it, or a newer end replaced this back-off).
async fn back_off(
    vm: &Arc<Vm>,
    status: Status,
    generation: u64,
    delay: Duration,
    generations: &Generations,
) {
    tokio::time::sleep(delay).await;
    let current = generations.lock().get(vm.id()) == Some(&generation);
    if !current || vm.status() != status {
        return;
    }
    if let Err(e) = vm.start().await {
        tracing::warn!(vm = %vm.name(), error = %e, "restart failed");
    }
}

/// An end nobody asked for: a crash, or the guest powering itself off.
fn unplanned(status: Status, cause: Cause) -> bool {
    status == Status::Crashed || (status == Status::Stopped && cause == Cause::Guest)
}

fn policy_applies(vm: &Vm, status: Status) -> bool {
    vm.stored_config()
        .is_ok_and(|c| applies(c.session().restart, status))
}

fn applies(policy: RestartPolicy, status: Status) -> bool {
    match policy {
        RestartPolicy::No => false,
        RestartPolicy::OnCrash => status == Status::Crashed,
        RestartPolicy::Always => true,
    }
}

/// Decides after the `n`th end within [`WINDOW`]: back off 1, 2, 4, … s, or give up at
/// the [`LIMIT`]th.
fn decide(n: usize) -> Decision {
    if n >= LIMIT {
        return Decision::GiveUp;
    }
    let delay = FIRST_DELAY
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(MAX_DELAY);
    Decision::Restart {
        attempt: n.max(1),
        delay,
    }
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
        let delays: Vec<u64> = (1..LIMIT)
            .map(|n| match decide(n) {
                Decision::Restart { attempt, delay } => {
                    assert_eq!(attempt, n);
                    delay.as_secs()
                }
                Decision::GiveUp => panic!("gave up too early"),
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 8]);
        assert_eq!(decide(LIMIT), Decision::GiveUp);
        assert_eq!(decide(LIMIT + 3), Decision::GiveUp);
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
