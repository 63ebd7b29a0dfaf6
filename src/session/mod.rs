//! Session life: what maqetd does for VMs when the desktop session does something
//! (docs/lifecycle.md, "Session life"): autostart when the session begins, restart after
//! a crash, sleep and logout through logind, transient scopes through the systemd user
//! manager. Each part is optional; none is needed for a VM to run.

pub mod autostart;
pub mod logind;
pub mod restart;

use std::sync::Arc;

use crate::access::ActivityObserver;
use crate::events::CoreEvent;
use crate::manager::Manager;

/// The signal pump's handle on session life: sees every core event after its signal.
pub struct SessionLife {
    restarter: restart::Restarter,
    logind: Arc<logind::Logind>,
}

impl SessionLife {
    /// Starts what runs on its own: logind's watch, this session's autostart.
    pub fn start(
        manager: Arc<Manager>,
        activity: Option<Arc<dyn ActivityObserver>>,
    ) -> SessionLife {
        autostart::spawn(manager.clone(), activity.clone());
        SessionLife {
            restarter: restart::Restarter::new(activity),
            logind: logind::Logind::spawn(manager),
        }
    }

    pub fn observe(&self, ev: &CoreEvent) {
        if let CoreEvent::StatusChanged { .. } = ev {
            self.logind.vms_changed();
        }
        self.restarter.observe(ev);
    }
}

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
