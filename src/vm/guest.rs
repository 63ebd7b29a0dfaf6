//! The guest side of a VM: its QEMU guest agent (owned by maqetd, like the monitor) and
//! its port forwards.
//!
//! With `guest_agent: true` the VM gets a virtio-serial port `org.qemu.guest_agent.0`
//! whose host end is a socket maqetd binds and fd-passes (`launch`). A task per running
//! QEMU connects to it and synchronises (`crate::agent`); it is `connected` once an agent
//! answers, and then reads the guest's identity and addresses. It waits on events only:
//! QEMU's `VSERPORT_CHANGE` says when the guest opens or closes the port (qemu-ga
//! starting, exiting, restarting), and the process exit ends the task. A re-adopted VM
//! gets the same task, connecting to the same socket.

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::Notify;

use super::VmError;
use super::{Runtime, StopIntent, Vm};
use crate::agent::{self, Address, AgentClient, AgentError, ExecOutput, GuestInfo, Limits};
use crate::config::Forward;
use crate::error_kind::ErrorKind;
use crate::events::CoreEvent;

/// The id of the virtserialport device, as QEMU names it in `VSERPORT_CHANGE`.
pub const AGENT_PORT_ID: &str = "maqet-ga-port";
/// The chardev behind it.
pub const AGENT_CHARDEV_ID: &str = "maqet-ga";
/// How long a synchronisation may take before the agent counts as not there (yet).
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// The most `ReadFile` returns and `WriteFile` takes: well under the bus's message cap.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// `GuestAgent`: whether an agent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentState {
    /// No agent channel (not configured, or the VM is not running).
    #[default]
    Absent,
    /// The channel exists; no agent has answered on it (yet, or since it went away).
    Connecting,
    Connected,
}

impl AgentState {
    pub const ALL: [AgentState; 3] = [
        AgentState::Absent,
        AgentState::Connecting,
        AgentState::Connected,
    ];

    pub fn parse(text: &str) -> Option<AgentState> {
        AgentState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Absent => "absent",
            AgentState::Connecting => "connecting",
            AgentState::Connected => "connected",
        }
    }
}

/// What the guest properties show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestView {
    pub agent: AgentState,
    pub info: GuestInfo,
    pub addresses: Vec<Address>,
    /// Forwards in place on the running VM (config ones and runtime ones).
    pub forwards: Vec<Forward>,
}

impl GuestView {
    /// `GuestInfo` as `a{ss}`: only what the guest said.
    pub fn info_map(&self) -> std::collections::HashMap<String, String> {
        let i = &self.info;
        [
            ("os-name", &i.os_name),
            ("os-version", &i.os_version),
            ("hostname", &i.hostname),
            ("agent-version", &i.agent_version),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect()
    }

    pub fn address_rows(&self) -> Vec<(String, String, String)> {
        self.addresses
            .iter()
            .map(|a| (a.interface.clone(), a.family.clone(), a.address.clone()))
            .collect()
    }

    pub fn forward_specs(&self) -> Vec<String> {
        self.forwards.iter().map(ToString::to_string).collect()
    }
}

/// Per-VM guest state, kept on the `Vm`.
#[derive(Default)]
pub(super) struct GuestLink {
    view: RwLock<GuestView>,
    /// The current agent connection, once synchronised.
    client: Mutex<Option<Arc<AgentClient>>>,
    /// The guest opened the agent's port, or someone asked for a refresh.
    wake: Notify,
    /// `GuestAgent` for `Wait agent=…`, made on the first subscription.
    agent_tx: super::LazyWatch<AgentState>,
}

/// The guest properties, by the interface that carries them.
pub const GUEST_PROPERTIES: &[&str] = &["GuestAgent", "GuestInfo", "Addresses"];
pub const FORWARD_PROPERTIES: &[&str] = &["Forwards"];

impl Vm {
    pub fn guest_view(&self) -> GuestView {
        self.guest.view.read().clone()
    }

    /// Reads the guest view without cloning it (never across an await).
    pub fn with_guest_view<R>(&self, f: impl FnOnce(&GuestView) -> R) -> R {
        f(&self.guest.view.read())
    }

    pub(super) fn subscribe_agent(&self) -> tokio::sync::watch::Receiver<AgentState> {
        let view = self.guest.view.read();
        self.guest.agent_tx.subscribe(|| view.agent)
    }

    /// Changes the guest view and announces the properties that changed.
    fn update_guest(self: &Arc<Self>, f: impl FnOnce(&mut GuestView)) {
        let (before, after) = {
            let mut view = self.guest.view.write();
            let before = view.clone();
            f(&mut view);
            (before, view.clone())
        };
        let mut changed = Vec::new();
        if before.agent != after.agent {
            changed.push("GuestAgent");
            self.guest.agent_tx.send(after.agent);
        }
        if before.info != after.info {
            changed.push("GuestInfo");
        }
        if before.addresses != after.addresses {
            changed.push("Addresses");
        }
        if before.forwards != after.forwards {
            changed.push("Forwards");
        }
        if !changed.is_empty() {
            self.ctx.sink.emit(CoreEvent::GuestChanged {
                vm: self.clone(),
                view: after,
                changed,
            });
        }
    }

    /// `VSERPORT_CHANGE` from QEMU: the guest opened or closed a virtio-serial port.
    pub(super) fn agent_port_changed(self: &Arc<Self>, data: &Value) {
        if data.get("id").and_then(Value::as_str) != Some(AGENT_PORT_ID) {
            return;
        }
        if data.get("open").and_then(Value::as_bool) == Some(true) {
            tracing::debug!(vm = %self.name(), "guest agent port opened");
            self.guest.wake.notify_one();
        } else {
            *self.guest.client.lock() = None;
            self.update_guest(|v| v.agent = AgentState::Connecting);
        }
    }

    /// The connected agent, or `InvalidState` saying why there is none.
    fn agent(&self) -> Result<Arc<AgentClient>, VmError> {
        if let Some(client) = self.guest.client.lock().clone() {
            return Ok(client);
        }
        let name = self.name();
        let why = match self.guest_view().agent {
            AgentState::Absent if !self.status().has_process() => {
                format!("VM '{name}' is not running")
            }
            AgentState::Absent => format!(
                "VM '{name}' has no guest agent channel; set `guest_agent: true` in its config and restart it"
            ),
            _ => format!(
                "no guest agent answers in VM '{name}' (yet); install and start qemu-guest-agent in the guest"
            ),
        };
        Err(VmError::InvalidState(why))
    }

    /// A call failed: an ended or silent agent counts as gone until it answers again.
    fn agent_failed(self: &Arc<Self>, e: &AgentError) {
        if matches!(e, AgentError::Disconnected | AgentError::Timeout(_)) {
            *self.guest.client.lock() = None;
            if self.guest_view().agent == AgentState::Connected {
                self.update_guest(|v| v.agent = AgentState::Connecting);
            }
            self.guest.wake.notify_one();
        }
    }

    async fn with_agent<T>(
        self: &Arc<Self>,
        op: impl AsyncFnOnce(&AgentClient) -> Result<T, AgentError>,
    ) -> Result<T, VmError> {
        let client = self.agent()?;
        op(&client).await.map_err(|e| {
            self.agent_failed(&e);
            agent_error(&self.name(), e)
        })
    }

    /// Sets the guest's clock to the host's (after a sleep or a long pause), when an
    /// agent answers.
    pub async fn guest_sync_time(self: &Arc<Self>) -> Result<(), VmError> {
        self.with_agent(async |a| {
            // Read at the last moment: the agent may have been slow to answer before.
            let now_ns = crate::time::now_us().saturating_mul(1000);
            a.set_time(i64::try_from(now_ns).unwrap_or(i64::MAX)).await
        })
        .await
    }

    pub async fn guest_ping(self: &Arc<Self>) -> Result<(), VmError> {
        self.with_agent(async |a| a.ping().await).await
    }

    /// Runs `argv` in the guest with `stdin`; waits up to `timeout`.
    pub async fn guest_exec(
        self: &Arc<Self>,
        argv: &[String],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<ExecOutput, VmError> {
        if argv.is_empty() || argv[0].is_empty() {
            return Err(VmError::InvalidArgument(
                "Exec needs a command: argv[0] is the program to run".into(),
            ));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(VmError::InvalidArgument(
                "a command-line argument contains a NUL byte".into(),
            ));
        }
        self.with_agent(async |a| a.exec(argv, stdin, timeout).await)
            .await
    }

    pub async fn guest_read_file(
        self: &Arc<Self>,
        path: &str,
        max: u64,
    ) -> Result<Vec<u8>, VmError> {
        check_guest_path(path)?;
        let max = if max == 0 {
            MAX_FILE_BYTES
        } else {
            max.min(MAX_FILE_BYTES)
        };
        self.with_agent(async |a| a.read_file(path, max).await)
            .await
    }

    /// Writes a guest file; `mode` (when not 0) is applied with `chmod` in the guest,
    /// since the agent's file calls cannot set one.
    pub async fn guest_write_file(
        self: &Arc<Self>,
        path: &str,
        data: &[u8],
        mode: u32,
    ) -> Result<(), VmError> {
        check_guest_path(path)?;
        if data.len() as u64 > MAX_FILE_BYTES {
            return Err(VmError::InvalidArgument(format!(
                "{} bytes is more than WriteFile takes ({MAX_FILE_BYTES}); copy it in parts",
                data.len()
            )));
        }
        if mode > 0o7777 {
            return Err(VmError::InvalidArgument(format!(
                "mode {mode:o} is not a file mode (0 to 7777 octal)"
            )));
        }
        self.with_agent(async |a| a.write_file(path, data).await)
            .await?;
        if mode != 0 {
            let argv = ["chmod".to_owned(), format!("{mode:o}"), path.to_owned()];
            let out = self
                .with_agent(async |a| a.exec(&argv, b"", agent::commands::REQUEST_TIMEOUT).await)
                .await?;
            if out.exit_code != 0 {
                return Err(VmError::InvalidArgument(format!(
                    "wrote {path} but chmod {mode:o} failed in the guest: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        Ok(())
    }

    /// Reads the guest's addresses again (`Addresses` changes if they did).
    pub async fn refresh_addresses(self: &Arc<Self>) -> Result<(), VmError> {
        let addresses = self.with_agent(async |a| a.addresses().await).await?;
        self.update_guest(|v| v.addresses = addresses);
        Ok(())
    }

    /// Asks the agent to power the guest off; `false` when there is no agent or it
    /// refused (the stop then goes on to ACPI).
    pub(super) async fn agent_shutdown(self: &Arc<Self>, rt: &Runtime) -> bool {
        let Ok(client) = self.agent() else {
            return false;
        };
        rt.set_intent(StopIntent::AgentShutdown);
        match client.shutdown().await {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(vm = %self.name(), error = %e, "guest-shutdown failed; using ACPI");
                false
            }
        }
    }

    /// Freezes the guest's filesystems when an agent is connected; `true` if it did.
    pub(crate) async fn agent_freeze(&self) -> bool {
        let Ok(client) = self.agent() else {
            return false;
        };
        match client.fsfreeze().await {
            Ok(n) => {
                tracing::info!(vm = %self.name(), filesystems = n, "guest filesystems frozen");
                true
            }
            Err(e) => {
                tracing::warn!(vm = %self.name(), error = %e, "guest-fsfreeze-freeze failed; saving without it");
                // A partial freeze is undone by thaw: never leave anything frozen.
                let _ = client.fsthaw().await;
                false
            }
        }
    }

    /// Thaws what [`Vm::agent_freeze`] froze; retried once, logged loudly if it fails.
    pub(crate) async fn agent_thaw(&self) {
        let Some(client) = self.guest.client.lock().clone() else {
            tracing::error!(vm = %self.name(), "guest filesystems were frozen and the agent is gone; they thaw when it restarts");
            return;
        };
        for _ in 0..2 {
            match client.fsthaw().await {
                Ok(_) => return,
                Err(e) => {
                    tracing::error!(vm = %self.name(), error = %e, "guest-fsfreeze-thaw failed")
                }
            }
        }
    }

    pub(super) fn set_forwards(self: &Arc<Self>, forwards: Vec<Forward>) {
        self.update_guest(|v| v.forwards = forwards);
    }

    /// The guest view when the process is gone: nothing answers, nothing is forwarded.
    pub(super) fn guest_stopped(self: &Arc<Self>) {
        *self.guest.client.lock() = None;
        self.update_guest(|v| *v = GuestView::default());
    }
}

/// Paths the agent is given are the guest's: absolute, no NUL.
fn check_guest_path(path: &str) -> Result<(), VmError> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(VmError::InvalidArgument(format!(
            "guest path {:?} must be absolute (start with /) and contain no NUL byte",
            crate::outbound::escape(path)
        )));
    }
    Ok(())
}

/// Agent failures as VM errors: a refusal carries the guest's own words.
fn agent_error(vm: &str, e: AgentError) -> VmError {
    let (kind, message) = match &e {
        AgentError::Timeout(d) => (
            ErrorKind::Timeout,
            format!(
                "VM '{vm}': the guest agent did not answer within {} s",
                d.as_secs()
            ),
        ),
        AgentError::Command { command, desc, .. } => (
            ErrorKind::InvalidArgument,
            format!("VM '{vm}': the guest refused {command}: {desc}"),
        ),
        AgentError::TooLarge(n) => (
            ErrorKind::InvalidArgument,
            format!("VM '{vm}': the guest's answer is larger than {n} bytes"),
        ),
        AgentError::Disconnected => (
            ErrorKind::InvalidState,
            format!("VM '{vm}': the guest agent channel closed (the VM stopped?)"),
        ),
        other => (ErrorKind::InvalidState, format!("VM '{vm}': {other}")),
    };
    VmError::Agent {
        kind,
        message,
        source: e,
    }
}

/// Starts the agent task of a running QEMU when the config asks for an agent.
pub(super) fn spawn_agent(vm: &Arc<Vm>, rt: &Arc<Runtime>) {
    let wanted = vm.stored_config().is_ok_and(|c| c.guest().guest_agent);
    if !wanted {
        return;
    }
    vm.update_guest(|v| v.agent = AgentState::Connecting);
    tokio::spawn(run_agent(vm.clone(), rt.clone()));
}

/// Connects, synchronises (then `connected`), reads identity and addresses; waits for
/// the guest to reopen the port (or a failed call) to do it again; ends with the process.
async fn run_agent(vm: Arc<Vm>, rt: Arc<Runtime>) {
    let socket = vm.ctx.paths.agent_socket(&vm.id);
    let mut exited = rt.exited.subscribe();
    let mut client: Option<Arc<AgentClient>> = None;
    loop {
        if *exited.borrow() {
            break;
        }
        if client.is_none() {
            // maqetd bound the socket before QEMU started: the connect completes at once.
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(stream) => client = Some(Arc::new(AgentClient::new(stream, Limits::default()))),
                Err(e) => tracing::debug!(vm = %vm.name(), error = %e, "agent socket not ready"),
            }
        }
        if let Some(c) = &client {
            tracing::debug!(vm = %vm.name(), "guest-sync sent");
            match c.sync(SYNC_TIMEOUT).await {
                Ok(()) => {
                    // The port's opening, if it woke us while this sync waited, is
                    // answered by it: no second round.
                    let _ = vm.guest.wake.notified().now_or_never();
                    // `connected` as soon as the agent answers: a caller waiting for it
                    // can use the agent now. Identity and addresses follow, each with its
                    // own change (the first `guest-network-get-interfaces` after a boot
                    // takes ~80 ms under TCG).
                    *vm.guest.client.lock() = Some(c.clone());
                    vm.update_guest(|v| v.agent = AgentState::Connected);
                    tracing::info!(vm = %vm.name(), "guest agent connected");
                    read_identity(&vm, c).await;
                }
                Err(AgentError::Disconnected) => client = None,
                Err(e) => {
                    tracing::debug!(vm = %vm.name(), error = %e, "no guest agent answers yet")
                }
            }
        }
        tokio::select! {
            _ = vm.guest.wake.notified() => {}
            _ = exited.wait_for(|e| *e) => break,
        }
    }
    vm.guest_stopped();
}

/// Fills `GuestInfo`, then `Addresses`, from a just-connected agent; skipped when that
/// connection is no longer the current one (the guest closed the port meanwhile).
async fn read_identity(vm: &Arc<Vm>, c: &Arc<AgentClient>) {
    let current = || {
        vm.guest
            .client
            .lock()
            .as_ref()
            .is_some_and(|now| Arc::ptr_eq(now, c))
    };
    let info = c.guest_info().await.unwrap_or_default();
    if !current() {
        return;
    }
    vm.update_guest(|v| v.info = info);
    let addresses = c.addresses().await.unwrap_or_default();
    if current() {
        vm.update_guest(|v| v.addresses = addresses);
    }
    tracing::debug!(vm = %vm.name(), "guest identity and addresses read");
}
