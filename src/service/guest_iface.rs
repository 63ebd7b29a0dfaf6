//! `org.maqet.Maqet1.Guest`: the guest agent of one VM. Authorize through the gate,
//! forward to [`crate::vm::guest`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use zbus::message::Header;
use zbus::{Connection, OwnedVariant, interface};

use super::Shared;
use crate::access::{Action, Request};
use crate::error::MaqetError;
use crate::outbound::Outbound;
use crate::vm::Vm;
use crate::vm::guest::GuestView;

/// `Exec` without a `timeout` option: inside the bus's default 25 s call timeout.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest `Exec` may wait (the caller raises its own call timeout to match).
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);
/// Standard input an `Exec` takes (the agent holds it in memory, base64'd).
const MAX_STDIN: usize = 16 << 20;

pub struct GuestIface {
    shared: Arc<Shared>,
    vm: Arc<Vm>,
}

impl GuestIface {
    pub fn new(shared: Arc<Shared>, vm: Arc<Vm>) -> GuestIface {
        GuestIface { shared, vm }
    }

    fn req(&self, action: Action, method: &'static str) -> Request {
        Request::new(action, method).on_vm(&self.vm)
    }

    /// The guest view, after the gate's `org.maqet.vm.observe` check.
    async fn view(
        &self,
        conn: &Connection,
        hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<GuestView> {
        self.shared
            .gate
            .check_read(conn, hdr.as_ref(), Some(&self.vm))
            .await?;
        Ok(self.vm.guest_view())
    }
}

/// `options` of `Exec`: `timeout` (u, seconds; 0 = the default).
fn exec_timeout(options: &HashMap<String, OwnedVariant>) -> Result<Duration, MaqetError> {
    if let Some(key) = options.keys().find(|k| k.as_str() != "timeout") {
        return Err(MaqetError::InvalidArgument(format!(
            "unknown Exec option '{key}'; known options: timeout"
        )));
    }
    let Some(v) = options.get("timeout") else {
        return Ok(DEFAULT_EXEC_TIMEOUT);
    };
    let secs = v
        .try_clone()
        .ok()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| {
            MaqetError::InvalidArgument("option 'timeout' must be seconds as D-Bus type u".into())
        })?;
    match Duration::from_secs(secs.into()) {
        d if d.is_zero() => Ok(DEFAULT_EXEC_TIMEOUT),
        d if d > MAX_EXEC_TIMEOUT => Err(MaqetError::InvalidArgument(format!(
            "an Exec timeout of {secs} s is above the maximum of {} s",
            MAX_EXEC_TIMEOUT.as_secs()
        ))),
        d => Ok(d),
    }
}

#[interface(name = "org.maqet.Maqet1.Guest")]
impl GuestIface {
    /// Succeeds when the guest agent answers.
    async fn ping(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = self.req(Action::Observe, "Ping");
        self.shared
            .gate
            .call(conn, &hdr, req, self.vm.guest_ping())
            .await
    }

    /// Runs `argv` in the guest (argv[0] searched in the agent's PATH) with `stdin`;
    /// returns its exit code (128 + N for signal N), stdout and stderr. Options:
    /// `timeout` (u, seconds, 0 = 20; at most 3600: raise your call timeout to match).
    #[zbus(out_args("exit_code", "stdout", "stderr"))]
    async fn exec(
        &self,
        argv: Vec<String>,
        stdin: Vec<u8>,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(i32, Vec<u8>, Vec<u8>), MaqetError> {
        // The program, never its arguments: they may hold secrets.
        let program = argv.first().cloned().unwrap_or_default();
        let req = self.req(Action::GuestExec, "Exec").with_args(format!(
            "{program:?} with {} arguments, {} bytes of stdin",
            argv.len().saturating_sub(1),
            stdin.len()
        ));
        let work = async {
            let timeout = exec_timeout(&options)?;
            if stdin.len() > MAX_STDIN {
                return Err(MaqetError::InvalidArgument(format!(
                    "{} bytes of standard input is more than Exec takes ({MAX_STDIN}); copy a file in with WriteFile",
                    stdin.len()
                )));
            }
            let out = self.vm.guest_exec(&argv, &stdin, timeout).await?;
            Ok((out.exit_code, out.stdout, out.stderr))
        };
        let (code, out, err) = self.shared.gate.call(conn, &hdr, req, work).await?;
        Ok((code, out, err))
    }

    /// A guest file's content, at most `max` bytes (0 = 64 MiB, the most there is); a
    /// longer file is an error, never cut short.
    #[zbus(out_args("data"))]
    async fn read_file(
        &self,
        path: &str,
        max: u64,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<u8>, MaqetError> {
        let req = self
            .req(Action::GuestFiles, "ReadFile")
            .with_args(format!("{path:?} max={max}"));
        let work = self.vm.guest_read_file(path, max);
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// Creates or replaces a guest file with `data`; `mode` (e.g. 0o644) when not 0.
    async fn write_file(
        &self,
        path: &str,
        data: Vec<u8>,
        mode: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = self
            .req(Action::GuestFiles, "WriteFile")
            .with_args(format!("{path:?} {} bytes mode={mode:o}", data.len()));
        let work = self.vm.guest_write_file(path, &data, mode);
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// Asks the agent for the guest's addresses again (`Addresses` changes if they did).
    async fn refresh_addresses(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = self.req(Action::Observe, "RefreshAddresses");
        let work = self.vm.refresh_addresses();
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// `absent` (no agent channel, or not running), `connecting`, `connected` (an agent
    /// answers; `GuestInfo` and `Addresses` follow, each with its own change).
    #[zbus(property)]
    async fn guest_agent(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        Ok(self.view(conn, hdr).await?.agent.as_str().to_owned())
    }

    /// What the agent says: `os-name`, `os-version`, `hostname`, `agent-version`.
    #[zbus(property)]
    async fn guest_info(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<HashMap<String, String>> {
        Ok(self.view(conn, hdr).await?.info_map().outbound())
    }

    /// (interface, `ipv4`|`ipv6`, address) for each non-loopback guest address.
    #[zbus(property)]
    async fn addresses(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<Vec<(String, String, String)>> {
        Ok(self
            .view(conn, hdr)
            .await?
            .address_rows()
            .into_iter()
            .map(|(a, b, c)| (a.outbound(), b.outbound(), c.outbound()))
            .collect())
    }
}
