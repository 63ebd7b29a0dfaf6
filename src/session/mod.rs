//! Session life: what maqetd does for VMs when the desktop session does something
//! (docs/lifecycle.md, "Session life"): autostart when the session begins, restart after
//! a crash, sleep and logout through logind, transient scopes through the systemd user
//! manager. Each part is optional; none is needed for a VM to run.

pub mod autostart;
pub mod restart;

use std::sync::Arc;

use crate::access::ActivityObserver;

/// Keeps maqetd from exiting idle while a session task (a back-off, an autostart) waits.
pub(crate) struct Busy(Option<Arc<dyn ActivityObserver>>);

impl Busy {
    pub(crate) fn hold(activity: &Option<Arc<dyn ActivityObserver>>) -> Busy {
        if let Some(a) = activity {
            a.call_started();
        }
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(a) = &self.0 {
            a.call_ended();
        }
    }
}
