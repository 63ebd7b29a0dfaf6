//! Idle exit: with no VM process and no call for a while, maqetd leaves (D-Bus
//! activation brings it back with all its state).
//!
//! No polling: while a VM runs, the task sleeps on a notification; while none runs, on
//! one timer that ends at "last call + delay" and is re-armed only if a call came since.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::access::ActivityObserver;
use crate::manager::Manager;

pub struct Idle {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last call's start or end.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Woken when the set of VMs with a process may have changed.
    changed: Notify,
}

impl Idle {
    pub fn new() -> Arc<Idle> {
        Arc::new(Idle {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            changed: Notify::new(),
        })
    }

    fn stamp(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// A VM's status changed: maybe the last one stopped, maybe one started.
    pub fn vms_changed(&self) {
        self.changed.notify_one();
    }

    /// Resolves when maqetd has been idle for `delay`.
    pub async fn until_idle(&self, manager: &Manager, delay: Duration) {
        loop {
            if manager.active_count() > 0 {
                self.changed.notified().await;
                continue;
            }
            if manager.jobs().running().wait_next_finish().await {
                continue;
            }
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                // The call's end stamps and notifies.
                self.changed.notified().await;
                continue;
            }
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.epoch + last + delay;
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = self.changed.notified() => {}
            }
        }
    }
}

impl ActivityObserver for Idle {
    fn call_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.stamp();
    }

    fn call_ended(&self) {
        self.stamp();
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.changed.notify_one();
        }
    }
}
