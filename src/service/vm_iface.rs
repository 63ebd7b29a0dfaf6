//! `org.maqet.Maqet1.VM`: one object per VM. Authorize through the gate, convert, forward.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedVariant, interface};

use super::Shared;
use crate::access::{Action, Request};
use crate::client::HistoryRow;
use crate::error::MaqetError;
use crate::outbound::Outbound;
use crate::vm::{Vm, WaitCondition};

/// `Stop(force=false, timeout_sec=0)` waits this long for the guest to power off.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct VmIface {
    shared: Arc<Shared>,
    vm: Arc<Vm>,
}

impl VmIface {
    pub fn new(shared: Arc<Shared>, vm: Arc<Vm>) -> VmIface {
        VmIface { shared, vm }
    }

    fn req(&self, action: Action, method: &'static str) -> Request {
        Request::new(action, method).on_vm(&self.vm)
    }

    /// A property read, after the gate's `org.maqet.vm.observe` check.
    async fn read<T>(
        &self,
        conn: &Connection,
        hdr: Option<Header<'_>>,
        value: impl FnOnce(&crate::vm::VmInfo) -> T,
    ) -> zbus::fdo::Result<T>
    where
        T: Outbound,
    {
        self.shared
            .gate
            .check_read(conn, hdr.as_ref(), Some(&self.vm))
            .await?;
        Ok(self.vm.with_info(value).outbound())
    }
}

/// `StartWithOptions`' options: only `environment`, an a{ss}.
fn graphical_env(
    mut options: HashMap<String, OwnedVariant>,
) -> Result<Option<HashMap<String, String>>, MaqetError> {
    let env = options.remove("environment");
    if let Some(key) = options.keys().next() {
        return Err(MaqetError::InvalidArgument(format!(
            "unknown start option '{key}'; known options: environment"
        )));
    }
    match env {
        None => Ok(None),
        Some(v) => v
            .try_clone()
            .ok()
            .and_then(|v| HashMap::<String, String>::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| {
                MaqetError::InvalidArgument(
                    "option 'environment' must be a string dictionary (D-Bus type a{ss})".into(),
                )
            }),
    }
}

/// A file or socket handed to the caller (`h`).
fn fd(f: impl Into<std::os::fd::OwnedFd>) -> zbus::OwnedFd {
    zbus::OwnedFd::from(f.into())
}

#[interface(name = "org.maqet.Maqet1.VM")]
impl VmIface {
    /// Starts QEMU; returns once its monitor is ready.
    async fn start(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = self.req(Action::Lifecycle, "Start");
        // The caller hears how it went: a failure is not notified on the desktop too.
        let witnesses = &self.shared.witnesses;
        witnesses.start_called(self.vm.id());
        let result = self
            .shared
            .gate
            .call(conn, &hdr, req, self.vm.start())
            .await;
        witnesses.start_answered(self.vm.id(), &result);
        result
    }

    /// `Start` with options. `environment` (a{ss}): the caller's `DISPLAY`,
    /// `WAYLAND_DISPLAY`, `XAUTHORITY`, `XDG_SESSION_TYPE`, so QEMU's own window
    /// (`display: gtk`, `sdl`) opens on the caller's session; kept for later starts.
    async fn start_with_options(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let env = graphical_env(options);
        let names = match &env {
            Ok(Some(vars)) => vars.keys().cloned().collect::<Vec<_>>().join(","),
            Ok(None) => "none".to_owned(),
            Err(_) => "invalid options".to_owned(),
        };
        // Audited as a start: it is one (the variables' names, never their values).
        let req = self
            .req(Action::Lifecycle, "Start")
            .with_args(format!("environment: {names}"));
        let work = async {
            let env: Result<_, MaqetError> = env;
            let env = match env? {
                Some(vars) => crate::vm::window::GraphicalEnv::from_vars(vars)?,
                None => crate::vm::window::GraphicalEnv::default(),
            };
            Ok(self.vm.start_with_env(env).await?)
        };
        // As `Start`: the caller hears how it went.
        let witnesses = &self.shared.witnesses;
        witnesses.start_called(self.vm.id());
        let result = self
            .shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await;
        witnesses.start_answered(self.vm.id(), &result);
        result
    }

    /// ACPI power-down, then quit, SIGTERM, SIGKILL after `timeout_sec` (0 = 30 s, at
    /// most 3600); `force` starts at quit. A Stop while stopping can shorten the wait.
    async fn stop(
        &self,
        force: bool,
        timeout_sec: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let timeout = match timeout_sec {
            0 => DEFAULT_STOP_TIMEOUT,
            s => Duration::from_secs(s.into()),
        };
        let req = self
            .req(Action::Lifecycle, "Stop")
            .with_args(format!("force={force} timeout_sec={timeout_sec}"));
        self.shared
            .gate
            .call(conn, &hdr, req, self.vm.stop(force, timeout))
            .await
    }

    /// A new QEMU process with the current config.
    async fn restart(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = self.req(Action::Lifecycle, "Restart");
        self.shared
            .gate
            .call(conn, &hdr, req, self.vm.restart())
            .await
    }

    /// Guest reset (the same QEMU process).
    async fn reset(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = self.req(Action::Lifecycle, "Reset");
        self.shared
            .gate
            .call(conn, &hdr, req, self.vm.reset())
            .await
    }

    /// Pauses the guest's CPUs (QMP `stop`); the QEMU process stays.
    async fn pause(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = self.req(Action::Lifecycle, "Pause");
        self.shared
            .gate
            .call(conn, &hdr, req, self.vm.pause())
            .await
    }

    /// Resumes a paused guest (QMP `cont`).
    async fn resume(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = self.req(Action::Lifecycle, "Resume");
        self.shared
            .gate
            .call(conn, &hdr, req, self.vm.resume())
            .await
    }

    /// Replaces the config; returns the changed keys that need a restart.
    #[zbus(out_args("needs_restart"))]
    async fn apply(
        &self,
        yaml: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<String>, MaqetError> {
        let req = self
            .req(Action::Manage, "Apply")
            .with_args(format!("{} bytes of YAML", yaml.len()));
        let manager = &self.shared.manager;
        self.shared
            .gate
            .call(conn, &hdr, req, manager.apply(&self.vm, yaml))
            .await
    }

    /// Waits for `status=<s>[|<s>…]` or `event=<QMP EVENT>`; 0 s = check without waiting.
    /// Returns the status reached, or the event's data as JSON.
    #[zbus(out_args("result"))]
    async fn wait(
        &self,
        condition: &str,
        timeout_sec: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, MaqetError> {
        let req = self
            .req(Action::Observe, "Wait")
            .with_args(condition.to_string());
        let work = async {
            let cond = WaitCondition::parse(condition)?;
            self.vm
                .wait(&cond, Duration::from_secs(timeout_sec.into()))
                .await
        };
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// Presses each key combination (`ctrl-alt-f2`, `ret`) in turn, each held `hold_ms`
    /// (0 = 100 ms); returns once the last is released. Unknown keys are refused before
    /// anything is sent.
    async fn send_keys(
        &self,
        keys: Vec<String>,
        hold_ms: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        // Never the keys themselves: they may be a password.
        let req = self.req(Action::Console, "SendKeys").with_args(format!(
            "{} key combinations, hold_ms={hold_ms}",
            keys.len()
        ));
        let work = self.vm.send_keys(&keys, hold_ms);
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// Types text on a US keyboard layout (`\n` is Enter, `\t` Tab); returns once it is
    /// typed. A character the layout cannot type is refused before anything is sent.
    async fn type_text(
        &self,
        text: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = self
            .req(Action::Console, "TypeText")
            .with_args(format!("{} characters", text.chars().count()));
        let work = self.vm.type_text(text);
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// A PNG of the display, as a readable file descriptor (the file has no name left).
    #[zbus(out_args("png"))]
    async fn screendump(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<zbus::OwnedFd, MaqetError> {
        let req = self.req(Action::Console, "Screendump");
        let work = async { self.vm.screendump().await.map(fd) };
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// A connected socket to the VM's serial console (the first serial port, when maqet
    /// provides it): read the guest's output from it, write its input to it. One client
    /// at a time.
    #[zbus(out_args("console"))]
    async fn open_console(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<zbus::OwnedFd, MaqetError> {
        let req = self.req(Action::Console, "OpenConsole");
        let work = async { self.vm.open_console().await.map(fd) };
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// A socket connected to the VM's SPICE or VNC server (`display: spice | vnc`), for a
    /// viewer to speak that protocol on; SPICE viewers call it once per channel.
    /// `InvalidState` when no QEMU runs, `InvalidArgument` when the VM has no display
    /// server (the message names the key to set).
    #[zbus(out_args("display"))]
    async fn open_display(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<zbus::OwnedFd, MaqetError> {
        let req = self.req(Action::Console, "OpenDisplay");
        let work = async { self.vm.open_display().await.map(fd) };
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// The lifecycle history, oldest first: (time µs, kind, status, previous status,
    /// reason, detail JSON). Events at or after `since` (0: all), the newest `limit` of
    /// them (0: all). Kinds: `added`, `status`, `applied`, `renamed`, `storage`,
    /// `snapshot`; status and previous are empty for events that are not status changes.
    #[zbus(out_args("events"))]
    async fn history(
        &self,
        since: u64,
        limit: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<HistoryRow>, MaqetError> {
        let req = self
            .req(Action::Observe, "History")
            .with_args(format!("since={since} limit={limit}"));
        let work = async {
            let rows = self.vm.history(since, limit as usize).await?;
            Ok(rows
                .into_iter()
                .map(|e| {
                    (
                        e.time,
                        e.kind,
                        e.status.unwrap_or_default(),
                        e.previous.unwrap_or_default(),
                        e.reason,
                        e.detail.map(|d| d.to_string()).unwrap_or_default(),
                    )
                })
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// QEMU's log of this VM (its output, every run, newest last) as a read-only fd; a
    /// client follows it by watching the fd (e.g. inotify on /proc/self/fd/N).
    #[zbus(out_args("log"))]
    async fn open_log(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<zbus::OwnedFd, MaqetError> {
        let req = self.req(Action::Observe, "OpenLog");
        let work = async { self.vm.open_log().map(fd) };
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// Forwards a host port to the guest on its user-mode network until the VM stops:
    /// `[tcp:|udp:][BIND:]HOST:GUEST` (BIND defaults to 127.0.0.1).
    async fn add_forward(
        &self,
        spec: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = self
            .req(Action::Lifecycle, "AddForward")
            .with_args(spec.to_string());
        let work = self.vm.add_forward(spec);
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// Removes a forward (the same spec; the guest port may be left out of the match).
    async fn remove_forward(
        &self,
        spec: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = self
            .req(Action::Lifecycle, "RemoveForward")
            .with_args(spec.to_string());
        let work = self.vm.remove_forward(spec);
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// The forwards in place on the running VM, as `proto:bind:host:guest`.
    #[zbus(property)]
    async fn forwards(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<Vec<String>> {
        self.shared
            .gate
            .check_read(conn, hdr.as_ref(), Some(&self.vm))
            .await?;
        Ok(self.vm.guest_view().forward_specs().outbound())
    }

    /// The VM's UUID, the last element of this object's path; never changes.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn id(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.read(conn, hdr, |i| i.id.clone()).await
    }

    /// The VM's name, unique among the user's VMs, as `maqet` commands take it. The
    /// object path is the UUID, so tools show this to say which VM an object is.
    #[zbus(property)]
    async fn name(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.read(conn, hdr, |i| i.name.clone()).await
    }

    /// `created`, `starting`, `running`, `paused`, `stopping`, `stopped`, `crashed` or
    /// `failed`.
    #[zbus(property)]
    async fn status(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.read(conn, hdr, |i| i.status.as_str().to_string())
            .await
    }

    /// Why the VM has its status, in words (`QEMU was killed by signal 9 (SIGKILL)`).
    #[zbus(property)]
    async fn status_reason(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.read(conn, hdr, |i| i.reason.clone()).await
    }

    /// 0 when no QEMU runs.
    #[zbus(property)]
    async fn pid(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<u32> {
        self.read(conn, hdr, |i| i.pid.unwrap_or(0)).await
    }

    /// The merged, normalized YAML.
    #[zbus(property)]
    async fn config(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        self.read(conn, hdr, |i| i.config.clone()).await
    }

    /// When the VM was defined, in µs since the epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn created_at(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<u64> {
        self.read(conn, hdr, |i| i.created_at).await
    }

    /// When QEMU last started, in µs since the epoch; 0 never.
    #[zbus(property)]
    async fn started_at(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<u64> {
        self.read(conn, hdr, |i| i.started_at).await
    }

    /// When QEMU last ended, in µs since the epoch; 0 never.
    #[zbus(property)]
    async fn stopped_at(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<u64> {
        self.read(conn, hdr, |i| i.stopped_at).await
    }

    /// Exit code, 128 + signal when killed, -1 unknown or not exited.
    #[zbus(property)]
    async fn exit_status(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<i32> {
        self.read(conn, hdr, |i| i.exit_status).await
    }

    /// Every status change (named so it does not clash with the `Status` property's
    /// generated `status_changed`).
    #[zbus(signal, name = "StatusChanged")]
    pub async fn vm_status_changed(
        emitter: &SignalEmitter<'_>,
        status: &str,
        previous: &str,
        reason: &str,
    ) -> zbus::Result<()>;
}
