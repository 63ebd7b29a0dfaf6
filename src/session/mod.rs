//! Session life: what maqetd does for VMs when the desktop session does something
//! (docs/lifecycle.md, "Session life"): autostart when the session begins, restart after
//! a crash, sleep and logout through logind, transient scopes through the systemd user
//! manager. Each part is optional; none is needed for a VM to run.

pub mod autostart;
pub mod logind;
pub mod restart;
pub mod scope;

use std::sync::Arc;

use crate::access::ActivityObserver;
use crate::events::CoreEvent;
use crate::manager::Manager;
use crate::vm::Status;

/// What maqetd found of the session's services, for `maqet doctor`: `None` while
/// still looking, else whether it was found and what was seen.
#[derive(Debug, Clone, Default)]
pub struct Presence {
    pub logind: Option<Result<(), String>>,
    pub user_manager: Option<Result<(), String>>,
}

static PRESENCE: parking_lot::Mutex<Presence> = parking_lot::Mutex::new(Presence {
    logind: None,
    user_manager: None,
});

pub fn presence() -> Presence {
    PRESENCE.lock().clone()
}

pub(crate) fn found_logind(r: Result<(), String>) {
    PRESENCE.lock().logind = Some(r);
}

pub(crate) fn found_user_manager(r: Result<(), String>) {
    PRESENCE.lock().user_manager = Some(r);
}

/// The signal pump's handle on session life: sees every core event after its signal.
pub struct SessionLife {
    restarter: restart::Restarter,
    logind: Arc<logind::Logind>,
    conn: zbus::Connection,
    manager: Arc<Manager>,
    /// Looked for once, by whoever needs it first.
    scopes: Arc<tokio::sync::OnceCell<scope::Scopes>>,
}

impl SessionLife {
    /// Starts what runs on its own: logind's watch, the user manager's scopes for
    /// re-adopted VMs, the restore of VMs saved when the last session ended
    /// (`on_logout: save`), the restart back-offs a previous maqetd left pending, this
    /// session's autostart (`autostart::prepare`). Called once maqetd owns its name.
    pub fn start(
        conn: zbus::Connection,
        manager: Arc<Manager>,
        activity: Option<Arc<dyn ActivityObserver>>,
        mut autostart: Vec<(Arc<crate::vm::Vm>, std::time::Duration)>,
    ) -> Arc<SessionLife> {
        // A VM saved at logout comes back from its snapshot, not from a cold autostart.
        let saved = logind::saved_at_logout(&manager);
        autostart.retain(|(vm, _)| !saved.iter().any(|s| Arc::ptr_eq(s, vm)));
        let restoring = (!saved.is_empty()).then(|| Busy::hold(&activity));
        let me = Arc::new(SessionLife {
            restarter: restart::Restarter::new(manager.ctx().store.clone(), activity.clone()),
            logind: logind::Logind::spawn(manager.clone()),
            conn,
            manager: manager.clone(),
            scopes: Arc::default(),
        });
        let life = me.clone();
        tokio::spawn(async move {
            let scopes = life.scopes().await;
            scope::refind_all(scopes, &life.manager).await;
            logind::restore_after_logout(&life.manager, saved).await;
            drop(restoring);
            // After the scopes: a restarted or autostart VM is placed like any other.
            life.restarter.resume(&life.manager).await;
            autostart::claim_and_spawn(&life.manager, autostart, activity);
        });
        me
    }

    async fn scopes(&self) -> &scope::Scopes {
        self.scopes
            .get_or_init(|| scope::Scopes::find(&self.conn))
            .await
    }

    pub fn observe(self: &Arc<Self>, ev: &CoreEvent) {
        if let CoreEvent::StatusChanged {
            vm, info, previous, ..
        } = ev
        {
            self.logind.vms_changed();
            // A QEMU that just started goes into its scope.
            if *previous == Status::Starting
                && info.status.has_process()
                && let Some(pid) = info.pid
            {
                let (life, vm) = (self.clone(), vm.clone());
                tokio::spawn(async move { life.scopes().await.place(&vm, pid).await });
            }
        }
        self.restarter.observe(ev);
    }

    /// maqetd was told to stop (SIGTERM): when the user manager is stopping, the session
    /// ends, and each running VM gets its `on_logout`.
    pub async fn service_stopping(&self) {
        if self.scopes().await.stopping().await {
            tracing::info!("the session ends: on_logout for the running VMs");
            logind::before_logout(&self.manager).await;
        }
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
