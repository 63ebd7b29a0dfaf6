//! logind (on the system bus): a sleep *delay* inhibitor while a VM runs, and what each
//! running VM does when the machine sleeps, wakes, or the session ends (`on_sleep`,
//! `on_logout`; docs/lifecycle.md "Session life").
//!
//! Event-driven: the task sleeps on logind's `PrepareForSleep` / `PrepareForShutdown`
//! signals and on a notification from the signal pump that the set of running VMs
//! changed. Without a system bus or logind it says so once in the log and does nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use zbus::OwnedFd;

use crate::config::{LogoutAction, SleepAction};
use crate::jobs::JobState;
use crate::manager::Manager;
use crate::snapshot::{self, Op};
use crate::vm::{Status, Vm};

/// The snapshot `on_sleep: save` takes before sleep and loads on wake.
pub const SLEEP_SNAPSHOT: &str = "maqet-sleep";
/// The snapshot `on_logout: save` takes before the session ends.
pub const LOGOUT_SNAPSHOT: &str = "maqet-logout";
/// The reason a VM saved at session end keeps until a maqetd restores it. It is also
/// the mark of "to be restored": it is stored with the status, so it outlives maqetd and
/// the logout, and any later change of the VM (a person starting it) removes it.
pub const SAVED_AT_LOGOUT: &str =
    "saved to snapshot 'maqet-logout' when the session ended; restored when maqet next starts";
/// The same for a VM that was paused then: it comes back paused.
pub const SAVED_PAUSED_AT_LOGOUT: &str = "saved paused to snapshot 'maqet-logout' when the session ended; restored paused when maqet next starts";
/// The longest a save before sleep or shutdown may take (logind's own delay limit,
/// `InhibitDelayMaxSec`, is 5 s by default: a big guest's RAM may not make it).
const SAVE_LIMIT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[zbus::proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1"
)]
pub trait LoginManager {
    fn inhibit(&self, what: &str, who: &str, why: &str, mode: &str) -> zbus::Result<OwnedFd>;
    #[zbus(signal)]
    fn prepare_for_sleep(&self, start: bool) -> zbus::Result<()>;
    #[zbus(signal)]
    fn prepare_for_shutdown(&self, start: bool) -> zbus::Result<()>;
}

/// The pump's handle: tells the task that VMs started or stopped.
#[derive(Default)]
pub struct Logind {
    changed: Notify,
}

impl Logind {
    pub fn vms_changed(&self) {
        self.changed.notify_one();
    }

    /// Connects to logind and runs until the system bus goes away (nothing at all
    /// without one: said once in the log).
    pub fn spawn(manager: Arc<Manager>) -> Arc<Logind> {
        let me = Arc::new(Logind::default());
        let task = me.clone();
        tokio::spawn(async move {
            let proxy = match connect().await {
                Ok(p) => p,
                Err(why) => {
                    tracing::info!("no sleep or shutdown handling: {why}");
                    super::found_logind(Err(why));
                    return;
                }
            };
            super::found_logind(Ok(()));
            if let Err(e) = task.run(&proxy, &manager).await {
                tracing::warn!(error = %e, "lost logind; sleep and shutdown are no longer handled");
            }
            super::found_logind(Err("the connection to logind ended".into()));
        });
        me
    }

    async fn run(
        &self,
        logind: &LoginManagerProxy<'_>,
        manager: &Arc<Manager>,
    ) -> zbus::Result<()> {
        let mut sleep = logind.receive_prepare_for_sleep().await?;
        let mut shutdown = logind.receive_prepare_for_shutdown().await?;
        let mut locks = Locks::default();
        let mut asleep: Option<Asleep> = None;
        let mut ending = false;
        loop {
            if asleep.is_none() && !ending {
                locks.sync(logind, manager).await;
            }
            tokio::select! {
                _ = self.changed.notified() => {}
                Some(s) = sleep.next() => {
                    if s.args()?.start {
                        if asleep.is_none() {
                            asleep = Some(before_sleep(manager).await);
                        }
                        // Done: let the machine sleep.
                        locks.sleep = None;
                    } else if let Some(a) = asleep.take() {
                        after_wake(manager, a).await;
                    }
                }
                Some(s) = shutdown.next() => {
                    if s.args()?.start && !ending {
                        ending = true;
                        before_logout(manager).await;
                        locks = Locks::default();
                    } else if !s.args()?.start {
                        // The shutdown was cancelled: the session goes on.
                        ending = false;
                        restore_after_logout(manager, saved_at_logout(manager)).await;
                    }
                }
                else => return Ok(()),
            }
        }
    }
}

async fn connect() -> Result<LoginManagerProxy<'static>, String> {
    let conn = zbus::connection::Builder::system()
        .build()
        .await
        .map_err(|e| format!("no system bus ({e})"))?;
    let dbus = zbus::fdo::DBusProxy::new(&conn)
        .await
        .map_err(|e| e.to_string())?;
    let name =
        zbus::names::BusName::try_from("org.freedesktop.login1").map_err(|e| e.to_string())?;
    if !dbus.name_has_owner(name).await.unwrap_or(false) {
        return Err("logind (org.freedesktop.login1) is not on the system bus".into());
    }
    LoginManagerProxy::new(&conn)
        .await
        .map_err(|e| e.to_string())
}

/// The inhibitors maqetd holds; dropping the fd releases one.
#[derive(Default)]
struct Locks {
    sleep: Option<OwnedFd>,
    shutdown: Option<OwnedFd>,
}

impl Locks {
    /// Holds the sleep lock while any VM runs, the shutdown lock while any running VM
    /// has something to do at logout.
    async fn sync(&mut self, logind: &LoginManagerProxy<'_>, manager: &Manager) {
        let running: Vec<Arc<Vm>> = manager
            .list()
            .into_iter()
            .filter(|vm| vm.status().has_process())
            .collect();
        let want_sleep = !running.is_empty();
        let want_shutdown = running
            .iter()
            .any(|vm| logout_action(vm) != LogoutAction::Keep);
        take_or_release(
            logind,
            &mut self.sleep,
            want_sleep,
            "sleep",
            "VMs are paused or saved before the machine sleeps",
        )
        .await;
        take_or_release(
            logind,
            &mut self.shutdown,
            want_shutdown,
            "shutdown",
            "VMs are stopped or saved before the session ends",
        )
        .await;
    }
}

async fn take_or_release(
    logind: &LoginManagerProxy<'_>,
    lock: &mut Option<OwnedFd>,
    want: bool,
    what: &str,
    why: &str,
) {
    match (want, lock.is_some()) {
        (true, false) => match logind.inhibit(what, "maqet", why, "delay").await {
            Ok(fd) => {
                tracing::debug!(what, "logind delay inhibitor taken");
                *lock = Some(fd);
            }
            Err(e) => tracing::warn!(what, error = %e, "logind refused a delay inhibitor"),
        },
        (false, true) => {
            *lock = None;
            tracing::debug!(what, "logind delay inhibitor released");
        }
        _ => {}
    }
}

fn sleep_action(vm: &Vm) -> SleepAction {
    vm.stored_config()
        .map(|c| c.session().on_sleep)
        .unwrap_or_default()
}

fn logout_action(vm: &Vm) -> LogoutAction {
    vm.stored_config()
        .map(|c| c.session().on_logout)
        .unwrap_or_default()
}

/// What sleep did, to be undone on wake.
#[derive(Default)]
struct Asleep {
    paused: HashSet<String>,
    saved: HashSet<String>,
}

async fn before_sleep(manager: &Manager) -> Asleep {
    let mut asleep = Asleep::default();
    for vm in manager.list() {
        if vm.status() != Status::Running {
            continue;
        }
        match sleep_action(&vm) {
            SleepAction::None => {}
            SleepAction::Pause => match vm.pause().await {
                Ok(()) => {
                    asleep.paused.insert(vm.id().to_string());
                }
                Err(e) => tracing::warn!(vm = %vm.name(), error = %e, "cannot pause before sleep"),
            },
            SleepAction::Save => match save_and_quit(manager, &vm, SLEEP_SNAPSHOT).await {
                Ok(()) => {
                    asleep.saved.insert(vm.id().to_string());
                }
                Err(e) => tracing::warn!(vm = %vm.name(), error = %e, "cannot save before sleep"),
            },
        }
    }
    asleep
}

async fn after_wake(manager: &Manager, asleep: Asleep) {
    for vm in manager.list() {
        if asleep.paused.contains(vm.id()) {
            // Someone may have resumed or stopped it meanwhile: only undo our own pause.
            if vm.status() == Status::Paused
                && let Err(e) = vm.resume().await
            {
                tracing::warn!(vm = %vm.name(), error = %e, "cannot resume after wake");
            }
        } else if asleep.saved.contains(vm.id()) {
            if let Err(e) = restore(manager, &vm, SLEEP_SNAPSHOT, WOKE, false).await {
                tracing::warn!(vm = %vm.name(), error = %e, "cannot restore after wake");
            }
        } else {
            continue;
        }
        // The guest slept with its clock stopped: set it from the host's clock.
        if vm.status() == Status::Running {
            let _ = vm.guest_sync_time().await;
        }
    }
}

pub(super) async fn before_logout(manager: &Arc<Manager>) {
    let mut tasks = Vec::new();
    for vm in manager.list() {
        if !vm.status().has_process() {
            continue;
        }
        let action = logout_action(&vm);
        let manager = manager.clone();
        tasks.push(tokio::spawn(async move {
            let done = match action {
                LogoutAction::Keep => return,
                LogoutAction::Stop => stop_to_the_end(&vm).await,
                LogoutAction::Save => save_for_next_login(&manager, &vm).await,
            };
            if let Err(e) = done {
                tracing::warn!(vm = %vm.name(), error = %e, action = action.as_str(), "session end");
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// A graceful stop, waited for to its end: `Stop` answers after 20 s while the
/// escalation goes on, and maqetd may be about to exit.
async fn stop_to_the_end(vm: &Arc<Vm>) -> Result<(), crate::vm::VmError> {
    vm.stop(false, STOP_TIMEOUT).await?;
    let ended = crate::vm::WaitCondition::parse("status=stopped|crashed|failed")?;
    // The escalation after the graceful wait takes at most 10 s more.
    vm.wait(&ended, STOP_TIMEOUT + Duration::from_secs(15))
        .await
        .map(|_| ())
}

/// Runs a snapshot job to its end.
async fn snapshot_job(manager: &Manager, vm: &Arc<Vm>, op: Op, name: &str) -> Result<(), String> {
    let job = snapshot::start(vm, manager.jobs(), op, name)
        .await
        .map_err(|e| e.to_string())?;
    let mut rx = job.subscribe();
    let end = tokio::time::timeout(SAVE_LIMIT, rx.wait_for(|s| s.state.is_finished()))
        .await
        .map_err(|_| {
            format!(
                "snapshot {name} took longer than {} s",
                SAVE_LIMIT.as_secs()
            )
        })?
        .map_err(|_| "the snapshot job vanished".to_string())?
        .clone();
    match end.state {
        JobState::Completed => Ok(()),
        _ => Err(end.message),
    }
}

async fn save_and_quit(
    manager: &Manager,
    vm: &Arc<Vm>,
    name: &str,
) -> Result<(), crate::vm::VmError> {
    snapshot_job(manager, vm, Op::Create { overwrite: true }, name)
        .await
        .map_err(crate::vm::VmError::Storage)?;
    vm.stop(true, STOP_TIMEOUT).await
}

/// `on_logout: save`: the snapshot, the quit, and the mark that has the next maqetd
/// restore the VM ([`saved_at_logout`]).
async fn save_for_next_login(manager: &Manager, vm: &Arc<Vm>) -> Result<(), crate::vm::VmError> {
    let paused = vm.status() == Status::Paused;
    save_and_quit(manager, vm, LOGOUT_SNAPSHOT).await?;
    let mark = if paused {
        SAVED_PAUSED_AT_LOGOUT
    } else {
        SAVED_AT_LOGOUT
    };
    vm.explain(Status::Stopped, mark).await;
    Ok(())
}

/// Whether `on_logout: save` left the VM to restore, and then whether paused.
fn logout_mark(vm: &Vm) -> Option<bool> {
    vm.with_info(|i| match i.reason.as_str() {
        _ if i.status != Status::Stopped => None,
        SAVED_AT_LOGOUT => Some(false),
        SAVED_PAUSED_AT_LOGOUT => Some(true),
        _ => None,
    })
}

/// The VMs an `on_logout: save` left to restore: still `stopped` with the reason it gave
/// them (a person who started or removed one meanwhile took it off the list).
pub fn saved_at_logout(manager: &Manager) -> Vec<Arc<Vm>> {
    manager
        .list()
        .into_iter()
        .filter(|vm| logout_mark(vm).is_some())
        .collect()
}

/// Starts each VM saved at the end of the last session and loads its `maqet-logout`
/// snapshot, all at once (as they were saved).
pub async fn restore_after_logout(manager: &Manager, vms: Vec<Arc<Vm>>) {
    let restores = vms.into_iter().map(|vm| async move {
        // Not when someone started it meanwhile (the mark is gone then).
        let Some(paused) = logout_mark(&vm) else {
            return;
        };
        tracing::info!(vm = %vm.name(), "restoring the VM saved when the session ended");
        if let Err(e) = restore(manager, &vm, LOGOUT_SNAPSHOT, LOGGED_IN, paused).await {
            tracing::warn!(vm = %vm.name(), error = %e, "cannot restore the VM saved at logout");
        }
    });
    futures_util::future::join_all(restores).await;
}

const WOKE: &str = "after the machine woke up";
const LOGGED_IN: &str = "saved when the last session ended";

async fn restore(
    manager: &Manager,
    vm: &Arc<Vm>,
    name: &str,
    when: &str,
    paused: bool,
) -> Result<(), crate::vm::VmError> {
    vm.start().await?;
    snapshot_job(manager, vm, Op::Load, name)
        .await
        .map_err(crate::vm::VmError::Storage)?;
    // Back to the run state it was saved in: a config that starts the VM paused (`-S`)
    // leaves the loaded state paused, a start without one runs it.
    match (paused, vm.status()) {
        (false, Status::Paused) => vm.resume().await?,
        (true, Status::Running) => vm.pause().await?,
        _ => {}
    }
    let status = vm.status();
    vm.explain(status, &format!("restored from snapshot '{name}' {when}"))
        .await;
    Ok(())
}
