//! One VM: its record, its QEMU process, and the operations on it.
//!
//! Owns: the lifecycle state machine in action. Every state change goes through
//! [`Vm::transition`] (database row + history event in one transaction, then the
//! in-memory state, then the announcement), and every operation that depends on state
//! takes the VM's operation lock, so parallel calls are serialized per VM while calls on
//! different VMs run in parallel. Must not touch D-Bus: it announces through
//! [`EventSink`].
//!
//! Operations that outlive a call (snapshot jobs) mark the VM busy instead of holding
//! the lock: while busy, every state-changing call is refused with `InvalidState`
//! (monitor calls still work), so a job and a lifecycle operation never interleave.

pub mod launch;
mod monitor;
pub mod process;
pub mod status;
mod supervisor;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use rustix::process::Signal;
use serde_json::Value;
use tokio::sync::{Notify, broadcast, watch};

use crate::config::{self, ConfigSource, VmConfig};

use crate::error::MaqetError;
use crate::events::{Cause, CoreEvent, EventSink};
use crate::paths::Paths;
use crate::qmp::{QmpClient, QmpError};
use crate::store::{Store, StoreError, Transition, VmRecord};
use crate::time::now_us;
pub use monitor::DEVICE_DEL_WAIT;
use process::{ExitInfo, Process};
pub use status::{Operation, Status};

/// How long QEMU may take from spawn to a ready monitor.
const MONITOR_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Replies to D-Bus callers must come well within the default 25 s call timeout.
pub const REPLY_LIMIT: Duration = Duration::from_secs(20);
/// Escalation step waits after the graceful phase.
const QUIT_WAIT: Duration = Duration::from_secs(5);
const TERM_WAIT: Duration = Duration::from_secs(5);
/// QMP events a slow `Wait(event=…)` caller may fall behind by before it skips some.
const QMP_EVENT_BUFFER: usize = 256;
/// A QMP command maqet issues itself.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the core needs from its surroundings: paths, state, and where to announce.
#[derive(Debug)]
pub struct Ctx {
    pub paths: Paths,
    pub store: Arc<Store>,
    pub sink: EventSink,
    /// `PATH` used to find QEMU binaries.
    pub path_env: Option<OsString>,
    pub default_arch: String,
}

impl Ctx {
    fn with_validation<R>(&self, f: impl FnOnce(&config::ValidationContext<'_>) -> R) -> R {
        let home = &self.paths.home;
        let check = |p: &std::path::Path, usage: config::PathUse| {
            crate::storage::danger::check(p, home, usage)
        };
        f(&config::ValidationContext {
            home,
            path_env: self.path_env.as_deref(),
            default_arch: &self.default_arch,
            check_path: &check,
        })
    }

    /// Parses and validates config sources with this service's environment.
    pub fn load_config(&self, sources: &[ConfigSource]) -> Result<VmConfig, MaqetError> {
        self.with_validation(|v| config::load(sources, v))
            .map_err(|e| config_error(&e, ""))
    }

    /// Re-reads a stored (merged, absolute) config; the binary is checked at start.
    pub fn load_stored_config(&self, yaml: &str) -> Result<VmConfig, MaqetError> {
        self.with_validation(|v| config::load_stored(yaml, v))
            .map_err(|e| config_error(&e, "the stored config no longer validates: "))
    }
}

/// A config whose only problems are dangerous locations is a `Storage` error (the
/// YAML is fine, the place is not); anything else is `InvalidConfig`.
fn config_error(e: &config::ConfigError, prefix: &str) -> MaqetError {
    let message = format!("{prefix}{e}");
    if e.only_dangerous_locations() {
        MaqetError::Storage(message)
    } else {
        MaqetError::InvalidConfig(message)
    }
}

/// A consistent snapshot of a VM's properties.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub config: String,
    pub status: Status,
    pub reason: String,
    pub pid: Option<u32>,
    pub pid_start_time: Option<u64>,
    pub created_at: u64,
    pub started_at: u64,
    pub stopped_at: u64,
    pub exit_status: i32,
}

impl VmInfo {
    pub fn from_record(rec: VmRecord) -> Result<VmInfo, MaqetError> {
        let status = Status::parse(&rec.status).ok_or_else(|| {
            MaqetError::Internal(format!(
                "VM {} has unknown status '{}' in the database",
                rec.name, rec.status
            ))
        })?;
        Ok(VmInfo {
            id: rec.id,
            name: rec.name,
            config: rec.config,
            status,
            reason: rec.status_reason,
            pid: rec.pid,
            pid_start_time: rec.pid_start_time,
            created_at: rec.created_at,
            started_at: rec.started_at,
            stopped_at: rec.stopped_at,
            exit_status: rec.exit_status,
        })
    }
}

/// Why a stop happened, so the exit can be told apart from a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopIntent {
    None,
    /// ACPI power-down requested.
    Powerdown,
    /// QMP `quit` sent (by a stop, a restart, or the QMP passthrough).
    Quit,
    Terminate,
    Kill,
}

/// What QEMU said in its `SHUTDOWN` event.
#[derive(Debug, Clone)]
struct ShutdownEvent {
    guest: bool,
    reason: String,
}

/// A running QEMU as maqetd holds it.
struct Runtime {
    process: Process,
    qmp: QmpClient,
    log_offset: u64,
    intent: Mutex<StopIntent>,
    /// The stop was requested as part of `Restart`.
    restarting: AtomicBool,
    pause_requested: AtomicBool,
    shutdown: Mutex<Option<ShutdownEvent>>,
    /// Set to true by the supervisor once the exit has been recorded.
    exited: watch::Sender<bool>,
    /// Wakes a running stop escalation to skip its graceful wait (`Stop(force)`).
    force_now: Notify,
    /// A client is attached to the serial console (see `monitor::open_console`).
    console_attached: AtomicBool,
}

impl Runtime {
    fn new(process: Process, qmp: QmpClient, log_offset: u64) -> Arc<Runtime> {
        let (exited, _) = watch::channel(false);
        Arc::new(Runtime {
            process,
            qmp,
            log_offset,
            intent: Mutex::new(StopIntent::None),
            restarting: AtomicBool::new(false),
            pause_requested: AtomicBool::new(false),
            shutdown: Mutex::new(None),
            exited,
            force_now: Notify::new(),
            console_attached: AtomicBool::new(false),
        })
    }

    fn set_intent(&self, intent: StopIntent) {
        *self.intent.lock().unwrap() = intent;
    }

    async fn wait_exited(&self, limit: Duration) -> bool {
        let mut rx = self.exited.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|e| *e))
            .await
            .is_ok()
    }
}

/// One defined VM.
pub struct Vm {
    id: String,
    ctx: Arc<Ctx>,
    info: RwLock<VmInfo>,
    status_tx: watch::Sender<Status>,
    op_lock: tokio::sync::Mutex<()>,
    runtime: Mutex<Option<Arc<Runtime>>>,
    /// QMP events for `Wait(event=…)`, made on the first subscription: a buffer of
    /// [`QMP_EVENT_BUFFER`] slots costs ~20 KiB, which most of 10,000 defined VMs
    /// would carry for nothing.
    qmp_events: OnceLock<broadcast::Sender<(String, Value)>>,
    busy: Mutex<Option<Busy>>,
}

/// An exclusive operation that holds the VM beyond one call.
#[derive(Debug, Clone)]
struct Busy {
    /// For refusals: "a snapshot create ('before-upgrade', job 3)".
    what: String,
    /// Runs inside QEMU: its STOP/RESUME events are the job's, not a pause.
    live: bool,
}

/// Marks a VM busy until dropped (see [`Vm::begin_exclusive`]).
pub struct BusyGuard {
    vm: Arc<Vm>,
}

impl BusyGuard {
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Renames what the VM is busy with (once the job has an id).
    pub fn describe(&self, what: String) {
        if let Some(b) = self.vm.busy.lock().unwrap().as_mut() {
            b.what = what;
        }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        *self.vm.busy.lock().unwrap() = None;
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("id", &self.id).finish()
    }
}

/// What `Wait` can wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitCondition {
    /// `status=running` or `status=stopped|crashed`.
    Status(Vec<Status>),
    /// `event=RESUME`: the next QMP event of that name.
    Event(String),
}

impl WaitCondition {
    pub fn parse(s: &str) -> Result<WaitCondition, MaqetError> {
        let bad = |why: String| {
            MaqetError::InvalidArgument(format!(
                "bad wait condition '{s}': {why}; use status=<state>[|<state>…] or event=<QMP event name>, e.g. status=running or event=RESUME"
            ))
        };
        let (key, value) = s.split_once('=').ok_or_else(|| bad("missing '='".into()))?;
        match key.trim() {
            "status" => {
                let states = value
                    .split('|')
                    .map(|v| {
                        Status::parse(v.trim()).ok_or_else(|| {
                            bad(format!(
                                "unknown state '{}' (states: {})",
                                v.trim(),
                                Status::ALL.map(|s| s.as_str()).join(", ")
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(WaitCondition::Status(states))
            }
            "event" => {
                let name = value.trim();
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                {
                    return Err(bad("QMP event names are upper case, like RESUME".into()));
                }
                Ok(WaitCondition::Event(name.to_string()))
            }
            other => Err(bad(format!("unknown condition '{other}'"))),
        }
    }
}

pub(crate) fn store_error(e: StoreError) -> MaqetError {
    match e {
        StoreError::NameTaken(name) => {
            MaqetError::AlreadyExists(format!("a VM named '{name}' already exists"))
        }
        StoreError::NotFound(what) => MaqetError::NotFound(what),
        other => MaqetError::Storage(other.to_string()),
    }
}

pub(crate) fn qmp_error(vm: &str, e: QmpError) -> MaqetError {
    match e {
        QmpError::Command { class, desc } => MaqetError::Qmp(format!("{class}: {desc}")),
        QmpError::Timeout(d) => MaqetError::Timeout(format!(
            "VM '{vm}': QEMU did not answer on its monitor within {} s",
            d.as_secs()
        )),
        QmpError::InvalidArguments(m) => MaqetError::InvalidArgument(m),
        other => MaqetError::Qmp(format!("VM '{vm}': {other}")),
    }
}

impl Vm {
    /// Builds the in-memory VM from its database row (no process attached yet).
    pub fn from_record(ctx: Arc<Ctx>, rec: VmRecord) -> Result<Arc<Vm>, MaqetError> {
        let info = VmInfo::from_record(rec)?;
        let (status_tx, _) = watch::channel(info.status);
        Ok(Arc::new(Vm {
            id: info.id.clone(),
            ctx,
            status_tx,
            info: RwLock::new(info),
            op_lock: tokio::sync::Mutex::new(()),
            runtime: Mutex::new(None),
            qmp_events: OnceLock::new(),
            busy: Mutex::new(None),
        }))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn name(&self) -> String {
        self.info.read().unwrap().name.clone()
    }

    pub fn status(&self) -> Status {
        self.info.read().unwrap().status
    }

    pub fn info(&self) -> VmInfo {
        self.info.read().unwrap().clone()
    }

    /// Reads the snapshot without cloning it.
    pub fn with_info<R>(&self, f: impl FnOnce(&VmInfo) -> R) -> R {
        f(&self.info.read().unwrap())
    }

    pub fn log_file(&self) -> PathBuf {
        self.ctx.paths.vm_log(&self.id)
    }

    /// QEMU's log of this VM (every run's output), opened read-only.
    pub fn open_log(&self) -> Result<std::fs::File, MaqetError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.log_file();
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => MaqetError::NotFound(format!(
                    "VM '{}' has no QEMU log yet: it is written from the first start on",
                    self.name()
                )),
                _ => MaqetError::Storage(format!("cannot open {}: {e}", path.display())),
            })
    }

    /// The VM's lifecycle history, oldest first: events at or after `since_us` (0: all),
    /// the newest `limit` of them (0: all).
    pub fn history(
        &self,
        since_us: u64,
        limit: usize,
    ) -> Result<Vec<crate::store::EventRecord>, MaqetError> {
        let since = (since_us > 0).then_some(since_us);
        self.ctx
            .store
            .events(Some(&self.id), since, limit)
            .map_err(store_error)
    }

    fn runtime(&self) -> Option<Arc<Runtime>> {
        self.runtime.lock().unwrap().clone()
    }

    /// The QMP client of the running QEMU, or `InvalidState`.
    pub fn qmp(&self) -> Result<QmpClient, MaqetError> {
        let status = self.status();
        if !Operation::Monitor.is_allowed(status) {
            return Err(MaqetError::InvalidState(
                Operation::Monitor.refusal(&self.name(), status),
            ));
        }
        self.runtime()
            .map(|rt| rt.qmp.clone())
            .ok_or_else(|| MaqetError::InvalidState(format!("VM '{}' has no monitor", self.name())))
    }

    /// Subscribes to the VM's QMP events (name, data).
    pub fn subscribe_qmp(&self) -> broadcast::Receiver<(String, Value)> {
        self.qmp_events
            .get_or_init(|| broadcast::channel(QMP_EVENT_BUFFER).0)
            .subscribe()
    }

    /// Hands a QMP event to the subscribers, if there are any.
    fn publish_qmp(&self, name: &str, data: &Value) {
        if let Some(tx) = self.qmp_events.get()
            && tx.receiver_count() > 0
        {
            let _ = tx.send((name.to_string(), data.clone()));
        }
    }

    pub(crate) fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// `InvalidState` while an exclusive operation (a snapshot job) holds the VM.
    pub(crate) fn ensure_idle(&self) -> Result<(), MaqetError> {
        match self.busy.lock().unwrap().as_ref() {
            None => Ok(()),
            Some(b) => Err(MaqetError::InvalidState(format!(
                "VM '{}' is busy with {}; wait for it to finish or cancel it",
                self.name(),
                b.what
            ))),
        }
    }

    /// A live snapshot job runs inside QEMU (its STOP/RESUME are not a pause).
    pub(crate) fn live_job_active(&self) -> bool {
        self.busy.lock().unwrap().as_ref().is_some_and(|b| b.live)
    }

    /// Marks the VM busy with an operation that outlives this call. `choose` sees the
    /// status (under the operation lock, so it cannot change meanwhile) and says
    /// whether the operation runs inside QEMU (live) or refuses.
    pub(crate) async fn begin_exclusive(
        self: &Arc<Self>,
        what: String,
        choose: impl FnOnce(Status) -> Result<bool, MaqetError>,
    ) -> Result<(BusyGuard, Status), MaqetError> {
        let _op = self.op_lock.lock().await;
        self.ensure_idle()?;
        let status = self.status();
        let live = choose(status)?;
        *self.busy.lock().unwrap() = Some(Busy { what, live });
        Ok((BusyGuard { vm: self.clone() }, status))
    }

    /// After a live job: QEMU stopped and resumed the vCPUs itself, so take its word
    /// for whether the guest runs now.
    pub(crate) async fn sync_run_state(self: &Arc<Self>, why: &str) {
        let status = self.status();
        if !matches!(status, Status::Running | Status::Paused) {
            return;
        }
        let Ok(qmp) = self.qmp() else { return };
        if let Ok(v) = qmp.execute_timeout("query-status", None, QMP_TIMEOUT).await {
            let now = qmp_run_state(&v);
            if now != status {
                let _ = self.transition(now, why, true, |_| {});
            }
        }
    }

    fn check(&self, op: Operation) -> Result<Status, MaqetError> {
        if op != Operation::Monitor {
            self.ensure_idle()?;
        }
        let (status, name) = self.with_info(|i| (i.status, i.name.clone()));
        if op.is_allowed(status) {
            Ok(status)
        } else {
            Err(MaqetError::InvalidState(op.refusal(&name, status)))
        }
    }

    /// The one place a VM's state changes: database (row + history, one transaction),
    /// then memory, then the announcement, all in that order under the info lock so
    /// every observer sees transitions in the same order.
    ///
    /// `observed` marks changes that already happened in the world (QEMU exited): they
    /// are applied in memory even if the database write fails, since the process is the
    /// source of truth for runtime state.
    fn transition(
        self: &Arc<Self>,
        status: Status,
        reason: &str,
        observed: bool,
        fill: impl FnOnce(&mut Transition),
    ) -> Result<(), MaqetError> {
        self.transition_because(status, reason, observed, Cause::Other, fill)
    }

    /// [`Vm::transition`] for a change whose cause listeners need to know (the guest
    /// powered off, a restart's stop).
    fn transition_because(
        self: &Arc<Self>,
        status: Status,
        reason: &str,
        observed: bool,
        cause: Cause,
        fill: impl FnOnce(&mut Transition),
    ) -> Result<(), MaqetError> {
        let mut info = self.info.write().unwrap();
        let previous = info.status;
        let mut t = Transition {
            status: status.as_str(),
            reason,
            pid: None,
            pid_start_time: None,
            started_at: None,
            stopped_at: None,
            exit_status: None,
            detail: None,
        };
        fill(&mut t);
        let db = self.ctx.store.transition(&self.id, previous.as_str(), &t);
        if let Err(e) = &db {
            tracing::error!(vm = %info.name, status = %status, error = %e, "cannot record transition");
            if !observed {
                return Err(store_error(db.unwrap_err()));
            }
        }
        info.status = status;
        info.reason = reason.to_string();
        if let Some(pid) = t.pid {
            info.pid = pid;
        }
        if let Some(st) = t.pid_start_time {
            info.pid_start_time = st;
        }
        if let Some(v) = t.started_at {
            info.started_at = v;
        }
        if let Some(v) = t.stopped_at {
            info.stopped_at = v;
        }
        if let Some(v) = t.exit_status {
            info.exit_status = v;
        }
        let name = info.name.clone();
        if previous != status {
            tracing::info!(vm = %name, status = %status, previous = %previous, reason, "status changed");
            self.ctx.sink.emit(CoreEvent::StatusChanged {
                vm: self.clone(),
                info: info.clone(),
                previous,
                cause,
            });
        } else {
            self.ctx.sink.emit(CoreEvent::PropertiesChanged {
                vm: self.clone(),
                info: info.clone(),
                names: &["StatusReason", "Pid"],
            });
        }
        drop(info);
        self.status_tx.send_replace(status);
        Ok(())
    }

    /// Parses the stored (merged, absolute) config.
    pub(crate) fn stored_config(&self) -> Result<VmConfig, MaqetError> {
        let yaml = self.with_info(|i| i.config.clone());
        self.ctx.load_stored_config(&yaml)
    }

    // ----- operations -----

    /// Starts QEMU and returns once its monitor is ready (status `running`, or `paused`
    /// for a config with `-S`).
    pub async fn start(self: &Arc<Self>) -> Result<(), MaqetError> {
        let _op = self.op_lock.lock().await;
        self.check(Operation::Start)?;
        self.start_locked().await
    }

    async fn start_locked(self: &Arc<Self>) -> Result<(), MaqetError> {
        let name = self.name();
        let config = self.stored_config()?;
        let binary = match config.resolve_binary(self.ctx.path_env.as_deref()) {
            Ok(b) => b,
            Err(why) => {
                let msg = format!("cannot start VM '{name}': {why}");
                self.transition(Status::Failed, &msg, false, |_| {})?;
                return Err(MaqetError::QemuFailed(msg));
            }
        };
        self.transition(Status::Starting, "start requested", false, |_| {})?;
        if let Err(e) = self.create_missing_disks(&config).await {
            let msg = format!("cannot start VM '{name}': {}", e.message());
            self.transition(Status::Failed, &msg, false, |_| {})?;
            return Err(MaqetError::Storage(msg));
        }
        match self.launch(&name, &config, &binary).await {
            Ok((runtime, events, status)) => {
                let pid = runtime.process.pid();
                *self.runtime.lock().unwrap() = Some(runtime.clone());
                let reason = if status == Status::Paused {
                    "started paused (-S)"
                } else {
                    "started"
                };
                self.transition(status, reason, true, |t| {
                    t.pid = Some(Some(pid));
                    t.started_at = Some(now_us());
                    t.exit_status = Some(-1);
                })?;
                supervisor::spawn(self.clone(), runtime, events);
                Ok(())
            }
            Err(failure) => {
                let msg = failure.message;
                self.transition(Status::Failed, &msg, true, |t| {
                    t.pid = Some(None);
                    t.pid_start_time = Some(None);
                    t.stopped_at = Some(now_us());
                    t.exit_status = Some(failure.exit.map(|e| e.as_property()).unwrap_or(-1));
                })?;
                self.cleanup_runtime_dir();
                Err(MaqetError::QemuFailed(msg))
            }
        }
    }

    /// Creates every declared disk image that does not exist yet (race-free, mode
    /// 0600, after a free-space check) and records it as maqet's. An existing file,
    /// or anything else at the path, is used as is.
    async fn create_missing_disks(&self, config: &VmConfig) -> Result<(), MaqetError> {
        let mut qemu_img = None;
        for e in config.storage().iter().filter(|e| e.kind.is_disk()) {
            if std::fs::symlink_metadata(&e.path).is_ok() {
                continue;
            }
            let img = match &qemu_img {
                Some(img) => img,
                None => {
                    qemu_img.insert(crate::storage::QemuImg::find(self.ctx.path_env.as_deref())?)
                }
            };
            let backing = e.backing_file.as_deref().zip(e.backing_format.as_deref());
            let spec = crate::storage::create::NewImage {
                path: &e.path,
                kind: e.kind,
                size: e.size,
                backing,
            };
            let outcome =
                crate::storage::create::create_image(img, &spec, &self.ctx.paths.home).await?;
            if outcome != crate::storage::create::Outcome::Created {
                continue;
            }
            let (id, name) = (self.id.as_str(), self.name());
            self.ctx
                .store
                .record_created_file(id, &e.path, e.kind.as_str())
                .map_err(store_error)?;
            let reason = format!(
                "created {} disk image '{}' at {}",
                e.kind.as_str(),
                e.name,
                e.path.display()
            );
            let detail = serde_json::json!({ "disk": e.name, "path": e.path, "format": e.kind.as_str(), "size": e.size });
            if let Err(err) = self
                .ctx
                .store
                .add_event(id, &name, "storage", &reason, Some(&detail))
            {
                tracing::warn!(vm = %name, error = %err, "cannot record disk creation in history");
            }
            tracing::info!(vm = %name, disk = %e.name, path = %e.path.display(), "created disk image");
        }
        Ok(())
    }

    async fn launch(
        self: &Arc<Self>,
        name: &str,
        config: &VmConfig,
        binary: &std::path::Path,
    ) -> Result<
        (
            Arc<Runtime>,
            tokio::sync::mpsc::UnboundedReceiver<crate::qmp::QmpEvent>,
            Status,
        ),
        LaunchFailure,
    > {
        let paths = &self.ctx.paths;
        let setup = |what: &str, e: &dyn std::fmt::Display| LaunchFailure {
            message: format!("cannot start VM '{name}': {what}: {e}"),
            exit: None,
        };
        paths
            .ensure_vm_runtime_dir(&self.id)
            .map_err(|e| setup("runtime directory", &e))?;
        paths
            .ensure_log_dir()
            .map_err(|e| setup("log directory", &e))?;
        let socket = paths.qmp_socket(&self.id);
        let console = paths.console_socket(&self.id);
        let log_file = paths.vm_log(&self.id);
        let args = config.qemu_args();
        let spawned = launch::spawn(&launch::LaunchSpec {
            binary,
            uuid: &self.id,
            name,
            user_args: &args,
            qmp_socket: &socket,
            console_socket: launch::wants_console(&args).then_some(console.as_path()),
            log_file: &log_file,
        })
        .map_err(|e| setup(&format!("spawning {}", binary.display()), &e))?;
        let process = spawned.process;
        let pid = process.pid();
        // Record the pid before anything can fail: a row never claims no process while
        // one exists.
        if let Err(e) = self.transition(Status::Starting, "QEMU spawned", false, |t| {
            t.pid = Some(Some(pid));
            t.pid_start_time = Some(Some(process.start_time()));
        }) {
            let _ = process.signal(Signal::KILL);
            process.wait().await;
            return Err(setup("recording the process", &e));
        }

        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let connect = async {
            let stream = tokio::net::UnixStream::connect(&socket).await?;
            crate::qmp::QmpClient::connect(stream, tx)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        let failure = |exit: Option<ExitInfo>, why: String| {
            let tail = launch::log_tail(&log_file, spawned.log_offset);
            let mut message = format!("QEMU for VM '{name}' {why}");
            if !tail.is_empty() {
                message.push_str(": ");
                message.push_str(&tail);
            }
            message.push_str(&format!(" (full log: {})", log_file.display()));
            LaunchFailure { message, exit }
        };
        let qmp = tokio::select! {
            res = tokio::time::timeout(MONITOR_READY_TIMEOUT, connect) => match res {
                Ok(Ok((client, _greeting))) => client,
                Ok(Err(e)) => {
                    // Usually QEMU exited during start-up; let its exit speak.
                    let exit = tokio::time::timeout(Duration::from_secs(5), process.wait()).await.ok();
                    if exit.is_none() {
                        let _ = process.signal(Signal::KILL);
                        process.wait().await;
                    }
                    let why = match exit {
                        Some(x) => format!("{} during start-up", x.describe()),
                        None => format!("did not complete the monitor handshake ({e})"),
                    };
                    return Err(failure(exit, why));
                }
                Err(_) => {
                    let _ = process.signal(Signal::KILL);
                    process.wait().await;
                    return Err(failure(None, format!("did not open its monitor within {} s and was killed", MONITOR_READY_TIMEOUT.as_secs())));
                }
            },
            exit = process.wait() => {
                return Err(failure(Some(exit), format!("{} during start-up", exit.describe())));
            }
        };
        let status = match qmp.execute_timeout("query-status", None, QMP_TIMEOUT).await {
            Ok(v) => qmp_run_state(&v),
            Err(e) => {
                let _ = process.signal(Signal::KILL);
                let exit = process.wait().await;
                return Err(failure(
                    Some(exit),
                    format!("failed its first status query ({e})"),
                ));
            }
        };
        let runtime = Runtime::new(process, qmp, spawned.log_offset);
        Ok((runtime, rx, status))
    }

    /// Stops the VM: ACPI power-down, wait up to `timeout`, then QMP `quit`, SIGTERM,
    /// SIGKILL (`force` starts at `quit`). The escalation runs on its own task, so it
    /// finishes even if the caller goes away; the call returns when the VM has stopped,
    /// or after [`REPLY_LIMIT`] with the VM still `stopping`.
    pub async fn stop(self: &Arc<Self>, force: bool, timeout: Duration) -> Result<(), MaqetError> {
        let runtime = {
            let _op = self.op_lock.lock().await;
            let status = self.check(Operation::Stop)?;
            let Some(rt) = self.runtime() else {
                return Err(MaqetError::Internal(format!(
                    "VM '{}' is {status} but maqetd holds no process for it",
                    self.name()
                )));
            };
            if status == Status::Stopping {
                if force {
                    rt.force_now.notify_one();
                }
            } else {
                let graceful = !force && status == Status::Running;
                let reason = if force {
                    "forced stop requested"
                } else {
                    "stop requested"
                };
                self.transition(Status::Stopping, reason, false, |_| {})?;
                tokio::spawn(escalate(
                    self.clone(),
                    rt.clone(),
                    graceful.then_some(timeout),
                ));
            }
            rt
        };
        runtime.wait_exited(REPLY_LIMIT).await;
        Ok(())
    }

    /// Restart: a new QEMU process with the current config (so applied changes take
    /// effect). A running VM is told to `quit` (then killed if it does not); a VM that
    /// is not running is started.
    pub async fn restart(self: &Arc<Self>) -> Result<(), MaqetError> {
        let _op = self.op_lock.lock().await;
        let status = self.check(Operation::Restart)?;
        if status.has_process() {
            let rt = self.runtime().ok_or_else(|| {
                MaqetError::Internal(format!("VM '{}' has no process to restart", self.name()))
            })?;
            rt.restarting.store(true, Ordering::SeqCst);
            self.transition(Status::Stopping, "restart requested", false, |_| {})?;
            rt.set_intent(StopIntent::Quit);
            let _ = rt.qmp.execute_timeout("quit", None, QMP_TIMEOUT).await;
            if !rt.wait_exited(QUIT_WAIT).await {
                rt.set_intent(StopIntent::Kill);
                let _ = rt.process.signal(Signal::KILL);
                rt.wait_exited(REPLY_LIMIT).await;
            }
        }
        self.start_locked().await
    }

    /// Guest reset (QMP `system_reset`): same process, the guest reboots.
    pub async fn reset(self: &Arc<Self>) -> Result<(), MaqetError> {
        let _op = self.op_lock.lock().await;
        self.check(Operation::Reset)?;
        self.run_qmp("system_reset", None).await.map(|_| ())
    }

    /// Pauses the vCPUs; returns once the VM is `paused`.
    pub async fn pause(self: &Arc<Self>) -> Result<(), MaqetError> {
        let _op = self.op_lock.lock().await;
        self.check(Operation::Pause)?;
        if let Some(rt) = self.runtime() {
            rt.pause_requested.store(true, Ordering::SeqCst);
        }
        self.run_qmp("stop", None).await?;
        self.await_status(&[Status::Paused], QMP_TIMEOUT).await
    }

    /// Resumes the vCPUs; returns once the VM is `running`.
    pub async fn resume(self: &Arc<Self>) -> Result<(), MaqetError> {
        let _op = self.op_lock.lock().await;
        self.check(Operation::Resume)?;
        self.run_qmp("cont", None).await?;
        self.await_status(&[Status::Running], QMP_TIMEOUT).await
    }

    async fn run_qmp(&self, command: &str, args: Option<Value>) -> Result<Value, MaqetError> {
        let qmp = self.qmp()?;
        qmp.execute_timeout(command, args, QMP_TIMEOUT)
            .await
            .map_err(|e| qmp_error(&self.name(), e))
    }

    /// Marks that a QMP passthrough `quit` is intended, so the exit counts as a stop.
    pub fn note_quit_requested(&self) {
        if let Some(rt) = self.runtime() {
            rt.set_intent(StopIntent::Quit);
        }
    }

    async fn await_status(&self, wanted: &[Status], limit: Duration) -> Result<(), MaqetError> {
        let mut rx = self.status_tx.subscribe();
        match tokio::time::timeout(limit, rx.wait_for(|s| wanted.contains(s))).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(MaqetError::Timeout(format!(
                "VM '{}' did not become {} within {} s (it is {})",
                self.name(),
                wanted
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" or "),
                limit.as_secs(),
                self.status()
            ))),
        }
    }

    /// Waits for a condition; returns what satisfied it (the status, or the event's
    /// data as JSON).
    pub async fn wait(&self, cond: &WaitCondition, limit: Duration) -> Result<String, MaqetError> {
        let timeout = || {
            MaqetError::Timeout(format!(
                "VM '{}': condition not met within {} s (status is {})",
                self.name(),
                limit.as_secs(),
                self.status()
            ))
        };
        match cond {
            WaitCondition::Status(states) => {
                let mut rx = self.status_tx.subscribe();
                match tokio::time::timeout(limit, rx.wait_for(|s| states.contains(s))).await {
                    Ok(Ok(s)) => Ok(s.as_str().to_string()),
                    _ => Err(timeout()),
                }
            }
            WaitCondition::Event(name) => {
                let mut rx = self.subscribe_qmp();
                let wait = next_qmp_event(&mut rx, |n, _| n == name);
                match tokio::time::timeout(limit, wait).await {
                    Ok(Some(data)) => Ok(data.to_string()),
                    _ => Err(timeout()),
                }
            }
        }
    }

    /// Replaces the config. `commit(old_name, new_name, yaml)` persists it (the manager
    /// keeps names unique). Returns the changed top-level keys that need a restart to
    /// take effect (none when no QEMU runs: the next start uses the new config).
    pub async fn apply(
        self: &Arc<Self>,
        mut new: VmConfig,
        commit: impl FnOnce(&str, &str, &str) -> Result<(), MaqetError>,
    ) -> Result<Vec<String>, MaqetError> {
        let _op = self.op_lock.lock().await;
        self.ensure_idle()?;
        let old = self.stored_config()?;
        let (old_name, status) = self.with_info(|i| (i.name.clone(), i.status));
        let new_name = new.name().map(str::to_string).unwrap_or(old_name.clone());
        new.set_name(&new_name);
        let changed = config::changed_keys(&old, &new);
        let yaml = new.to_yaml();
        commit(&old_name, &new_name, &yaml)?;
        {
            let mut info = self.info.write().unwrap();
            info.name = new_name;
            info.config = yaml;
            self.ctx.sink.emit(CoreEvent::PropertiesChanged {
                vm: self.clone(),
                info: info.clone(),
                names: &["Name", "Config"],
            });
        }
        Ok(if status.has_process() {
            changed.into_iter().filter(|k| k != "name").collect()
        } else {
            Vec::new()
        })
    }

    /// Kills the process for a forced removal and waits until it is gone.
    pub(crate) async fn kill_for_removal(self: &Arc<Self>) {
        if let Some(rt) = self.runtime() {
            if self.status() != Status::Stopping {
                let _ = self.transition(Status::Stopping, "forced removal", false, |_| {});
            }
            rt.set_intent(StopIntent::Kill);
            let _ = rt.process.signal(Signal::KILL);
            rt.wait_exited(REPLY_LIMIT).await;
        }
    }

    /// Takes the operation lock for a manager-level operation (removal).
    pub(crate) async fn lock_ops(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.op_lock.lock().await
    }

    fn cleanup_runtime_dir(&self) {
        let dir = self.ctx.paths.vm_runtime_dir(&self.id);
        let _ = std::fs::remove_file(self.ctx.paths.qmp_socket(&self.id));
        let _ = std::fs::remove_file(self.ctx.paths.console_socket(&self.id));
        monitor::remove_stale_screendumps(&dir);
        let _ = std::fs::remove_dir(&dir);
    }

    /// Takes over a QEMU that runs this VM although its record says otherwise (found by
    /// `maqet doctor`): record the process, then re-adopt it like after a restart.
    pub(crate) async fn adopt_orphan(self: &Arc<Self>, pid: u32, start_time: u64) {
        let _op = self.op_lock.lock().await;
        if self.status().has_process() {
            return;
        }
        let noted = self.transition(Status::Starting, "found running QEMU", true, |t| {
            t.pid = Some(Some(pid));
            t.pid_start_time = Some(Some(start_time));
        });
        if noted.is_ok() {
            self.readopt().await;
        }
    }

    /// Re-attaches to a QEMU that outlived a previous maqetd (see docs/architecture.md).
    pub(crate) async fn readopt(self: &Arc<Self>) {
        let info = self.info();
        if !info.status.has_process() {
            return;
        }
        let gone = |why: String| {
            let reason = format!("QEMU ended while maqetd was not running ({why})");
            let status = if info.status == Status::Stopping {
                Status::Stopped
            } else {
                Status::Crashed
            };
            let _ = self.transition(status, &reason, true, |t| {
                t.pid = Some(None);
                t.pid_start_time = Some(None);
                t.stopped_at = Some(now_us());
                t.exit_status = Some(-1);
            });
            self.cleanup_runtime_dir();
        };
        let recorded = match (info.pid, info.pid_start_time) {
            (Some(pid), Some(start)) => Some((pid, start)),
            _ => process::find_by_uuid(&self.id),
        };
        let Some((pid, start)) = recorded else {
            gone("no process was recorded".into());
            return;
        };
        let process = match Process::adopt(pid, start, &self.id) {
            Ok(p) => p,
            Err(e) => {
                gone(e.to_string());
                return;
            }
        };
        let socket = self.ctx.paths.qmp_socket(&self.id);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let connect = async {
            let stream = tokio::net::UnixStream::connect(&socket).await?;
            QmpClient::connect(stream, tx)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        let qmp = match tokio::time::timeout(MONITOR_READY_TIMEOUT, connect).await {
            Ok(Ok((c, _))) => c,
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::error!(vm = %info.name, pid, error = %why, "cannot reconnect to the monitor of a surviving QEMU");
                // Alive but unmanageable: end it through the pidfd (never by bare pid)
                // rather than leave a VM nobody can control.
                let _ = process.signal(Signal::KILL);
                gone(format!(
                    "its monitor at {} was unreachable ({why}), so maqetd killed it",
                    socket.display()
                ));
                return;
            }
        };
        let status = match qmp.execute_timeout("query-status", None, QMP_TIMEOUT).await {
            Ok(v) => qmp_run_state(&v),
            Err(_) => info.status,
        };
        let log_offset = std::fs::metadata(self.log_file()).map_or(0, |m| m.len());
        let runtime = Runtime::new(process, qmp, log_offset);
        *self.runtime.lock().unwrap() = Some(runtime.clone());
        let _ = self.transition(status, "re-adopted after a maqetd restart", true, |t| {
            t.pid = Some(Some(pid));
            t.pid_start_time = Some(Some(start));
            if info.started_at == 0 {
                t.started_at = Some(now_us());
            }
        });
        supervisor::spawn(self.clone(), runtime, rx);
        tracing::info!(vm = %info.name, pid, "re-adopted running QEMU");
    }
}

/// The data of the next QMP event `matches` accepts; `None` once no more can come.
async fn next_qmp_event(
    rx: &mut broadcast::Receiver<(String, Value)>,
    matches: impl Fn(&str, &Value) -> bool,
) -> Option<Value> {
    loop {
        match rx.recv().await {
            Ok((name, data)) if matches(&name, &data) => return Some(data),
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

struct LaunchFailure {
    message: String,
    exit: Option<ExitInfo>,
}

/// `query-status` → our status: a QEMU that is not executing vCPUs is `paused`.
fn qmp_run_state(v: &Value) -> Status {
    if v.get("running").and_then(Value::as_bool).unwrap_or(false) {
        Status::Running
    } else {
        Status::Paused
    }
}

/// The stop escalation of ARCHITECTURE §3; runs detached from the caller.
async fn escalate(vm: Arc<Vm>, rt: Arc<Runtime>, graceful: Option<Duration>) {
    let name = vm.name();
    if let Some(timeout) = graceful {
        rt.set_intent(StopIntent::Powerdown);
        match rt
            .qmp
            .execute_timeout("system_powerdown", None, QMP_TIMEOUT)
            .await
        {
            Ok(_) => {
                let mut rx = rt.exited.subscribe();
                tokio::select! {
                    _ = tokio::time::timeout(timeout, rx.wait_for(|e| *e)) => {}
                    _ = rt.force_now.notified() => {}
                }
                if *rt.exited.borrow() {
                    return;
                }
                tracing::info!(vm = %name, "guest did not power off in time; escalating to quit");
            }
            Err(e) => tracing::warn!(vm = %name, error = %e, "system_powerdown failed; escalating"),
        }
    }
    rt.set_intent(StopIntent::Quit);
    if rt
        .qmp
        .execute_timeout("quit", None, QMP_TIMEOUT)
        .await
        .is_ok()
        && rt.wait_exited(QUIT_WAIT).await
    {
        return;
    }
    rt.set_intent(StopIntent::Terminate);
    tracing::warn!(vm = %name, "QEMU did not quit; sending SIGTERM");
    let _ = rt.process.signal(Signal::TERM);
    if rt.wait_exited(TERM_WAIT).await {
        return;
    }
    rt.set_intent(StopIntent::Kill);
    tracing::warn!(vm = %name, "QEMU ignored SIGTERM; sending SIGKILL");
    let _ = rt.process.signal(Signal::KILL);
}

/// A core context over an in-memory database and XDG directories under `root`.
#[cfg(test)]
pub(crate) fn test_ctx(root: &std::path::Path) -> Arc<Ctx> {
    let root = root.to_path_buf();
    let paths = Paths::from_lookup(&|k| match k {
        "HOME" => Some(root.join("home").into()),
        "XDG_RUNTIME_DIR" => Some(root.join("run").into()),
        "XDG_DATA_HOME" => Some(root.join("data").into()),
        "XDG_STATE_HOME" => Some(root.join("state").into()),
        "XDG_CONFIG_HOME" => Some(root.join("config").into()),
        _ => None,
    })
    .unwrap();
    Arc::new(Ctx {
        paths,
        store: Arc::new(Store::open_in_memory().unwrap()),
        sink: EventSink::new().0,
        path_env: std::env::var_os("PATH"),
        default_arch: "x86_64".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> Arc<Vm> {
        let dir = tempfile::tempdir().unwrap();
        let rec = VmRecord::new("id-1".into(), "web".into(), String::new(), "created", 1);
        Vm::from_record(test_ctx(dir.path()), rec).unwrap()
    }

    #[test]
    fn qmp_events_reach_subscribers_and_cost_nothing_without_them() {
        let vm = vm();
        // No subscriber yet: nothing is allocated and publishing is a no-op.
        vm.publish_qmp("RESET", &serde_json::json!({}));
        assert!(vm.qmp_events.get().is_none());
        let mut rx = vm.subscribe_qmp();
        vm.publish_qmp("STOP", &serde_json::json!({"a": 1}));
        let (name, data) = rx.try_recv().unwrap();
        assert_eq!(name, "STOP");
        assert_eq!(data["a"], 1);
        // The event from before the subscription was not kept.
        assert!(rx.try_recv().is_err());
    }
}
