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

mod adopt;
mod console;
mod disks;
mod display;
pub mod error;
mod forward;
pub mod guest;
pub mod launch;
mod lazy_watch;
mod monitor;
pub mod process;
mod start;
pub mod status;
mod stop;
mod supervisor;
mod tpm;
mod wait;
pub mod window;

use lazy_watch::LazyWatch;
use start::qmp_run_state;
pub use wait::WaitCondition;
use wait::next_qmp_event;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use rustix::process::Signal;
use serde_json::Value;
use tokio::sync::{Notify, broadcast, watch};

use crate::config::{self, ConfigSource, VmConfig};

use crate::error_kind::ErrorKind;
use crate::events::{Cause, CoreEvent, EventSink};
use crate::paths::Paths;
use crate::qmp::{QmpClient, QmpError};
use crate::store::{Store, StoreError, Transition, VmRecord};
use crate::time::now_us;
pub use disks::{AttachSpec, DiskSource, is_disk_block};
pub use error::VmError;
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

/// Counts changes to what a listing of every VM shows (any VM's record, or which VMs
/// exist), so a listing encoded once can be reused until the count moves. It is bumped
/// while the changed record (or the registry) is write-locked: a reader that read the
/// count before encoding then either saw the change or will see a newer count.
#[derive(Debug, Default)]
pub struct ListingEpoch(AtomicU64);

impl ListingEpoch {
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// What the core needs from its surroundings: paths, state, and where to announce.
#[derive(Debug)]
pub struct Ctx {
    pub paths: Paths,
    pub store: Arc<Store>,
    pub sink: EventSink,
    /// `PATH` used to find QEMU binaries.
    pub path_env: Option<OsString>,
    pub default_arch: String,
    pub listing_epoch: ListingEpoch,
}

impl Ctx {
    /// `vm_id`: the VM the config is for, whose data directory receives disks
    /// declared without `file`.
    fn with_validation<R>(
        &self,
        vm_id: Option<&str>,
        f: impl FnOnce(&config::ValidationContext<'_>) -> R,
    ) -> R {
        let vm_data_dir = vm_id.map(|id| self.paths.vm_data_dir(id));
        let home = &self.paths.home;
        let check = |p: &std::path::Path, usage: config::PathUse| {
            crate::storage::danger::check(p, home, usage)
        };
        let path_env = self.path_env.as_deref();
        let probe = |p: &std::path::Path| crate::storage::qemu_img::probe_format(path_env, p);
        f(&config::ValidationContext {
            home,
            path_env,
            default_arch: &self.default_arch,
            check_path: &check,
            vm_data_dir: vm_data_dir.as_deref(),
            probe_format: Some(&probe),
        })
    }

    /// Parses and validates config sources with this service's environment.
    pub fn load_config(&self, sources: &[ConfigSource], vm_id: &str) -> Result<VmConfig, VmError> {
        self.with_validation(Some(vm_id), |v| config::load(sources, v))
            .map_err(|e| config_error(e, ""))
    }

    /// Re-reads a stored (merged, absolute) config; the binary is checked at start.
    pub fn load_stored_config(&self, yaml: &str) -> Result<VmConfig, VmError> {
        self.with_validation(None, |v| config::load_stored(yaml, v))
            .map_err(|e| config_error(e, "the stored config no longer validates: "))
    }
}

/// A config whose only problems are dangerous locations is a `Storage` error (the
/// YAML is fine, the place is not); anything else is `InvalidConfig`.
fn config_error(e: config::ConfigError, prefix: &str) -> VmError {
    let kind = if e.only_dangerous_locations() {
        ErrorKind::Storage
    } else {
        ErrorKind::InvalidConfig
    };
    VmError::Config {
        kind,
        message: format!("{prefix}{e}"),
        source: e,
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
    pub fn from_record(rec: VmRecord) -> Result<VmInfo, VmError> {
        let status = Status::parse(&rec.status).ok_or_else(|| {
            VmError::Internal(format!(
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

/// The runtime fields a transition sets, copied out of it for memory.
struct RuntimeFields {
    pid: Option<Option<u32>>,
    pid_start_time: Option<Option<u64>>,
    started_at: Option<u64>,
    stopped_at: Option<u64>,
    exit_status: Option<i32>,
}

fn t_fields(t: &Transition<'_>) -> RuntimeFields {
    RuntimeFields {
        pid: t.pid,
        pid_start_time: t.pid_start_time,
        started_at: t.started_at,
        stopped_at: t.stopped_at,
        exit_status: t.exit_status,
    }
}

impl RuntimeFields {
    fn apply(&self, info: &mut VmInfo) {
        if let Some(pid) = self.pid {
            info.pid = pid;
        }
        if let Some(st) = self.pid_start_time {
            info.pid_start_time = st;
        }
        if let Some(v) = self.started_at {
            info.started_at = v;
        }
        if let Some(v) = self.stopped_at {
            info.stopped_at = v;
        }
        if let Some(v) = self.exit_status {
            info.exit_status = v;
        }
    }
}

/// Why a stop happened, so the exit can be told apart from a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopIntent {
    None,
    /// ACPI power-down requested.
    Powerdown,
    /// `guest-shutdown` sent through the guest agent.
    AgentShutdown,
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
    /// The VM's swtpm (`tpm: true`), ended with QEMU (`tpm::end`).
    tpm: Option<Arc<Process>>,
    qmp: QmpClient,
    log_offset: u64,
    intent: Mutex<StopIntent>,
    /// The stop was requested as part of `Restart`.
    restarting: AtomicBool,
    pause_requested: AtomicBool,
    shutdown: Mutex<Option<ShutdownEvent>>,
    /// Set to true by the supervisor once the exit has been recorded.
    exited: watch::Sender<bool>,
    /// When a running stop escalation ends its graceful wait; a later `Stop` with a
    /// shorter timeout (or `force`: now) moves it earlier, never later.
    stop_deadline: watch::Sender<Option<tokio::time::Instant>>,
    /// A client is attached to the serial console (see `monitor::open_console`).
    console_attached: AtomicBool,
    /// Hands clients to the console's keeper ([`console`]), once it runs.
    console_keeper: Mutex<
        Option<tokio::sync::mpsc::UnboundedSender<console::Client<monitor::ConsoleAttached>>>,
    >,
}

impl Runtime {
    fn new(
        process: Process,
        tpm: Option<Arc<Process>>,
        qmp: QmpClient,
        log_offset: u64,
    ) -> Arc<Runtime> {
        let (exited, _) = watch::channel(false);
        Arc::new(Runtime {
            process,
            tpm,
            qmp,
            log_offset,
            intent: Mutex::new(StopIntent::None),
            restarting: AtomicBool::new(false),
            pause_requested: AtomicBool::new(false),
            shutdown: Mutex::new(None),
            exited,
            stop_deadline: watch::channel(None).0,
            console_attached: AtomicBool::new(false),
            console_keeper: Mutex::new(None),
        })
    }

    fn set_intent(&self, intent: StopIntent) {
        *self.intent.lock() = intent;
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
    /// The status for `Wait`ers, made on the first subscription ([`LazyWatch`]).
    status_tx: LazyWatch<Status>,
    op_lock: tokio::sync::Mutex<()>,
    /// Orders transitions (commit, memory, announcement) without a std lock.
    transitions: tokio::sync::Mutex<()>,
    runtime: Mutex<Option<Arc<Runtime>>>,
    /// QMP events for `Wait(event=…)`, made on the first subscription: a buffer of
    /// [`QMP_EVENT_BUFFER`] slots costs ~20 KiB, which most of 10,000 defined VMs
    /// would carry for nothing.
    qmp_events: OnceLock<broadcast::Sender<(String, Value)>>,
    busy: Mutex<Option<Busy>>,
    /// The guest agent and what it said (`guest::GuestView`).
    guest: guest::GuestLink,
    /// The event consumer has handled this VM's `VmAdded` / `VmRemoved`.
    announced: Notify,
    /// The graphical session of whoever last started it (`window`).
    graphical_env: Mutex<window::GraphicalEnv>,
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
        if let Some(b) = self.vm.busy.lock().as_mut() {
            b.what = what;
        }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        *self.vm.busy.lock() = None;
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("id", &self.id).finish()
    }
}

/// A database failure as a VM error: a taken name is `AlreadyExists`, a missing row
/// `NotFound`, anything else `Storage`.
pub(crate) fn store_error(e: StoreError) -> VmError {
    let (kind, message) = match &e {
        StoreError::NameTaken(name) => (
            ErrorKind::AlreadyExists,
            format!("a VM named '{name}' already exists"),
        ),
        StoreError::NotFound(what) => (ErrorKind::NotFound, what.clone()),
        other => (ErrorKind::Storage, other.to_string()),
    };
    VmError::Store {
        kind,
        message,
        source: e,
    }
}

/// Connects to a VM's monitor socket and negotiates QMP, within
/// [`MONITOR_READY_TIMEOUT`]; the VM's events arrive on the receiver.
async fn connect_monitor(
    socket: &std::path::Path,
) -> Result<
    (
        QmpClient,
        tokio::sync::mpsc::UnboundedReceiver<crate::qmp::QmpEvent>,
    ),
    QmpError,
> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let connect = async {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        QmpClient::connect_unix(stream, tx).await
    };
    match tokio::time::timeout(MONITOR_READY_TIMEOUT, connect).await {
        Ok(Ok((client, _greeting))) => Ok((client, rx)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(QmpError::Timeout(MONITOR_READY_TIMEOUT)),
    }
}

/// A monitor failure of VM `vm`: QEMU's own refusal is `Qmp`, no answer in time
/// `Timeout`, a bad argument `InvalidArgument`, a broken monitor `Qmp`.
pub(crate) fn qmp_error(vm: &str, e: QmpError) -> VmError {
    let (kind, message) = match &e {
        QmpError::Command { class, desc } => (ErrorKind::Qmp, format!("{class}: {desc}")),
        QmpError::Timeout(d) => (
            ErrorKind::Timeout,
            format!(
                "VM '{vm}': QEMU did not answer on its monitor within {} s",
                d.as_secs()
            ),
        ),
        QmpError::InvalidArguments(m) => (ErrorKind::InvalidArgument, m.clone()),
        other => (ErrorKind::Qmp, format!("VM '{vm}': {other}")),
    };
    VmError::Monitor {
        kind,
        message,
        source: e,
    }
}

impl Vm {
    /// Builds the in-memory VM from its database row (no process attached yet).
    pub fn from_record(ctx: Arc<Ctx>, rec: VmRecord) -> Result<Arc<Vm>, VmError> {
        let info = VmInfo::from_record(rec)?;
        Ok(Arc::new(Vm {
            id: info.id.clone(),
            ctx,
            status_tx: LazyWatch::default(),
            info: RwLock::new(info),
            op_lock: tokio::sync::Mutex::new(()),
            transitions: tokio::sync::Mutex::new(()),
            runtime: Mutex::new(None),
            qmp_events: OnceLock::new(),
            busy: Mutex::new(None),
            guest: guest::GuestLink::default(),
            announced: Notify::new(),
            graphical_env: Mutex::new(window::GraphicalEnv::default()),
        }))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Called by the event consumer once it has handled the VM's addition or removal.
    pub fn mark_announced(&self) {
        self.announced.notify_one();
    }

    /// Waits (at most `limit`) until the event consumer has handled the VM's addition
    /// or removal, so the call that caused it answers after the bus shows it.
    pub async fn wait_announced(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.announced.notified()).await;
    }

    pub fn name(&self) -> String {
        self.info.read().name.clone()
    }

    pub fn status(&self) -> Status {
        self.info.read().status
    }

    /// The status as it changes, from now on.
    fn subscribe_status(&self) -> watch::Receiver<Status> {
        let info = self.info.read();
        self.status_tx.subscribe(|| info.status)
    }

    pub fn info(&self) -> VmInfo {
        self.info.read().clone()
    }

    /// Reads the snapshot without cloning it.
    pub fn with_info<R>(&self, f: impl FnOnce(&VmInfo) -> R) -> R {
        f(&self.info.read())
    }

    pub fn log_file(&self) -> PathBuf {
        self.ctx.paths.vm_log(&self.id)
    }

    /// QEMU's log of this VM (every run's output), opened read-only.
    pub fn open_log(&self) -> Result<std::fs::File, VmError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.log_file();
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => VmError::NotFound(format!(
                    "VM '{}' has no QEMU log yet: it is written from the first start on",
                    self.name()
                )),
                _ => VmError::Storage(format!("cannot open {}: {e}", path.display())),
            })
    }

    /// The VM's lifecycle history, oldest first: events at or after `since_us` (0: all),
    /// the newest `limit` of them (0: all).
    pub async fn history(
        &self,
        since_us: u64,
        limit: usize,
    ) -> Result<Vec<crate::store::EventRecord>, VmError> {
        let since = (since_us > 0).then_some(since_us);
        let id = self.id.clone();
        self.ctx
            .store
            .read(move |db| db.events(Some(&id), since, limit))
            .await
            .map_err(store_error)
    }

    fn runtime(&self) -> Option<Arc<Runtime>> {
        self.runtime.lock().clone()
    }

    /// The QMP client of the running QEMU, or `InvalidState`.
    pub fn qmp(&self) -> Result<QmpClient, VmError> {
        let status = self.status();
        if !Operation::Monitor.is_allowed(status) {
            return Err(VmError::InvalidState(
                Operation::Monitor.refusal(&self.name(), status),
            ));
        }
        self.runtime()
            .map(|rt| rt.qmp.clone())
            .ok_or_else(|| VmError::InvalidState(format!("VM '{}' has no monitor", self.name())))
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
    pub(crate) fn ensure_idle(&self) -> Result<(), VmError> {
        match self.busy.lock().as_ref() {
            None => Ok(()),
            Some(b) => Err(VmError::InvalidState(format!(
                "VM '{}' is busy with {}; wait for it to finish or cancel it",
                self.name(),
                b.what
            ))),
        }
    }

    /// A live snapshot job runs inside QEMU (its STOP/RESUME are not a pause).
    pub(crate) fn live_job_active(&self) -> bool {
        self.busy.lock().as_ref().is_some_and(|b| b.live)
    }

    /// Marks the VM busy with an operation that outlives this call. `choose` sees the
    /// status (under the operation lock, so it cannot change meanwhile) and says
    /// whether the operation runs inside QEMU (live) or refuses.
    pub(crate) async fn begin_exclusive(
        self: &Arc<Self>,
        what: String,
        choose: impl FnOnce(Status) -> Result<bool, VmError>,
    ) -> Result<(BusyGuard, Status), VmError> {
        let _op = self.op_lock.lock().await;
        self.ensure_idle()?;
        let status = self.status();
        let live = choose(status)?;
        *self.busy.lock() = Some(Busy { what, live });
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
                let _ = self.transition(now, why, true, |_| {}).await;
            }
        }
    }

    fn check(&self, op: Operation) -> Result<Status, VmError> {
        if op != Operation::Monitor {
            self.ensure_idle()?;
        }
        let (status, name) = self.with_info(|i| (i.status, i.name.clone()));
        if op.is_allowed(status) {
            Ok(status)
        } else {
            Err(VmError::InvalidState(op.refusal(&name, status)))
        }
    }

    /// The one place a VM's state changes: database (row + history, one transaction),
    /// then memory, then the announcement. Transitions of one VM are serialized by
    /// their own async lock (never a std lock across the commit), so every observer sees
    /// them in the order they were committed, and memory never moves ahead of the
    /// database.
    ///
    /// `kept` marks changes that happened, or must happen, whatever the database says:
    /// QEMU exited (the process is the source of truth for runtime state), or a stop
    /// began (stopping is how a user frees a full disk). They are applied in memory even
    /// if the write fails, and the owner keeps their row until the database takes it.
    async fn transition(
        self: &Arc<Self>,
        status: Status,
        reason: &str,
        kept: bool,
        fill: impl FnOnce(&mut Transition<'static>),
    ) -> Result<(), VmError> {
        self.transition_because(status, reason, kept, Cause::Other, fill)
            .await
    }

    /// [`Vm::transition`] for a change whose cause listeners need to know (the guest
    /// powered off, a restart's stop).
    async fn transition_because(
        self: &Arc<Self>,
        status: Status,
        reason: &str,
        kept: bool,
        cause: Cause,
        fill: impl FnOnce(&mut Transition<'static>),
    ) -> Result<(), VmError> {
        let _order = self.transitions.lock().await;
        let (previous, name) = self.with_info(|i| (i.status, i.name.clone()));
        let mut t = Transition {
            status: status.as_str(),
            reason: "",
            ..Transition::default()
        };
        fill(&mut t);
        let applied = t_fields(&t);
        let (id, owned_reason) = (self.id.clone(), reason.to_string());
        let write = move |db: &crate::store::Database| {
            let t = Transition {
                reason: &owned_reason,
                ..t.clone()
            };
            db.transition(&id, previous.as_str(), &t).map(|_| ())
        };
        let db = if kept {
            self.ctx.store.write_kept("status transition", write).await
        } else {
            self.ctx.store.write(write).await
        };
        if let Err(e) = db {
            tracing::error!(vm = %name, status = %status, error = %e,
                kept, "cannot record transition");
            if !kept {
                return Err(store_error(e));
            }
        }
        let info = {
            let mut info = self.info.write();
            self.ctx.listing_epoch.bump();
            info.status = status;
            info.reason = reason.to_string();
            applied.apply(&mut info);
            info.clone()
        };
        if previous != status {
            tracing::info!(vm = %name, status = %status, previous = %previous, reason, "status changed");
            self.ctx.sink.emit(CoreEvent::StatusChanged {
                vm: self.clone(),
                info,
                previous,
                cause,
            });
        } else {
            self.ctx.sink.emit(CoreEvent::RuntimeChanged {
                vm: self.clone(),
                info,
            });
        }
        self.status_tx.send(status);
        Ok(())
    }

    /// Parses the stored (merged, absolute) config.
    pub(crate) fn stored_config(&self) -> Result<VmConfig, VmError> {
        let yaml = self.with_info(|i| i.config.clone());
        self.ctx.load_stored_config(&yaml)
    }

    // ----- operations -----

    /// Guest reset (QMP `system_reset`): same process, the guest reboots.
    pub async fn reset(self: &Arc<Self>) -> Result<(), VmError> {
        let _op = self.op_lock.lock().await;
        self.check(Operation::Reset)?;
        self.run_qmp("system_reset", None).await.map(|_| ())
    }

    /// Pauses the vCPUs; returns once the VM is `paused`.
    pub async fn pause(self: &Arc<Self>) -> Result<(), VmError> {
        let _op = self.op_lock.lock().await;
        self.check(Operation::Pause)?;
        if let Some(rt) = self.runtime() {
            rt.pause_requested.store(true, Ordering::SeqCst);
        }
        self.run_qmp("stop", None).await?;
        self.await_status(&[Status::Paused], QMP_TIMEOUT).await
    }

    /// Resumes the vCPUs; returns once the VM is `running`.
    pub async fn resume(self: &Arc<Self>) -> Result<(), VmError> {
        let _op = self.op_lock.lock().await;
        self.check(Operation::Resume)?;
        self.run_qmp("cont", None).await?;
        self.await_status(&[Status::Running], QMP_TIMEOUT).await
    }

    async fn run_qmp(&self, command: &str, args: Option<Value>) -> Result<Value, VmError> {
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

    /// Rewrites the reason of a VM while it is still `status` (the restart back-off
    /// says what it waits for; a wake says it restored the VM). False when the VM moved on.
    pub(crate) async fn explain(self: &Arc<Self>, status: Status, reason: &str) -> bool {
        let _op = self.op_lock.lock().await;
        if self.status() != status {
            return false;
        }
        self.transition(status, reason, false, |_| {}).await.is_ok()
    }

    /// Replaces the config and commits it. `check(old_name, new_name)` refuses a
    /// taken name (the manager keeps names unique; the database's UNIQUE backs it up
    /// against a race); `renamed(old, new)` runs after the commit. Returns the changed
    /// top-level keys that need a restart to take effect (none when no QEMU runs: the
    /// next start uses the new config).
    pub async fn apply(
        self: &Arc<Self>,
        mut new: VmConfig,
        check: impl FnOnce(&str, &str) -> Result<(), VmError>,
        renamed: impl FnOnce(&str, &str),
    ) -> Result<Vec<String>, VmError> {
        let _op = self.op_lock.lock().await;
        self.ensure_idle()?;
        let old = self.stored_config()?;
        let (old_name, status) = self.with_info(|i| (i.name.clone(), i.status));
        let new_name = new.name().map(str::to_string).unwrap_or(old_name.clone());
        new.set_name(&new_name);
        let changed = config::changed_keys(&old, &new);
        let yaml = new.to_yaml();
        check(&old_name, &new_name)?;
        self.commit_config(new_name.clone(), yaml, || {
            if old_name != new_name {
                renamed(&old_name, &new_name);
            }
        })
        .await?;
        Ok(if status.has_process() {
            changed.into_iter().filter(|k| k != "name").collect()
        } else {
            Vec::new()
        })
    }

    /// Stores a new config (and name) for this VM: database, then memory, then the
    /// announcement; `after_write` runs between the commit and the memory update.
    /// The caller holds the operation lock.
    async fn commit_config(
        self: &Arc<Self>,
        new_name: String,
        yaml: String,
        after_write: impl FnOnce(),
    ) -> Result<(), VmError> {
        let _order = self.transitions.lock().await;
        let (id, name, config) = (self.id.clone(), new_name.clone(), yaml.clone());
        self.ctx
            .store
            .write(move |db| db.update_config(&id, &name, &config))
            .await
            .map_err(store_error)?;
        after_write();
        let info = {
            let mut info = self.info.write();
            self.ctx.listing_epoch.bump();
            info.name = new_name;
            info.config = yaml;
            info.clone()
        };
        self.ctx.sink.emit(CoreEvent::ConfigChanged {
            vm: self.clone(),
            info,
        });
        Ok(())
    }

    /// Takes the operation lock for a manager-level operation (removal).
    pub(crate) async fn lock_ops(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.op_lock.lock().await
    }

    fn cleanup_runtime_dir(&self) {
        self.ctx.paths.remove_vm_runtime_dir(&self.id);
    }
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
        listing_epoch: Default::default(),
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
