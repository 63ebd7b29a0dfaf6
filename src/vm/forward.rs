//! Port forwards on a VM's user-mode network: checked free before QEMU starts, installed
//! through the monitor once it runs (`hostfwd_add`), and changed at run time by
//! `VM.AddForward`/`RemoveForward`. The HMP commands go through maqetd's own monitor,
//! so a caller never needs the dangerous tier for them.

use std::net::{SocketAddrV4, TcpListener, UdpSocket};
use std::sync::Arc;

use serde_json::json;

use super::VmError;
use super::{QMP_TIMEOUT, Vm, qmp_error};
use crate::config::{Forward, Proto, VmConfig};
use crate::qmp::QmpClient;

/// Refuses a start whose forwards name a host port something already holds.
pub(super) fn check_host_ports(forwards: &[Forward]) -> Result<(), VmError> {
    for f in forwards {
        let addr = SocketAddrV4::new(f.bind, f.host);
        let free = match f.proto {
            Proto::Tcp => TcpListener::bind(addr).map(drop),
            Proto::Udp => UdpSocket::bind(addr).map(drop),
        };
        if let Err(e) = free {
            return Err(VmError::InvalidArgument(format!(
                "host port {} ({} on {}) for forward {f} is not available: {e}; choose another `host:` port in `forwards`",
                f.host,
                f.proto.as_str(),
                f.bind
            )));
        }
    }
    Ok(())
}

/// The user-mode netdev forwards go on: the config's forward network, or its only
/// `-netdev user`.
fn netdev(config: &VmConfig, vm: &str) -> Result<String, VmError> {
    if let Some(id) = &config.guest().forward_netdev {
        return Ok(id.clone());
    }
    match crate::config::user_netdevs(&config.qemu_args()).as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(VmError::InvalidState(format!(
            "VM '{vm}' has no user-mode network to forward on; add `forwards:` (or a `-netdev user`) to its config and restart it"
        ))),
        several => Err(VmError::InvalidState(format!(
            "VM '{vm}' has several user-mode networks ({}); name one with `netdev:` in `forwards:`",
            several.join(", ")
        ))),
    }
}

/// Runs an HMP command on maqetd's monitor; `ok` tells its success text (HMP has no
/// error channel: `hostfwd_add` prints nothing when it works, `hostfwd_remove`
/// "… removed").
async fn hmp_on(
    vm: &str,
    qmp: &QmpClient,
    command_line: String,
    ok: fn(&str) -> bool,
) -> Result<(), VmError> {
    let out = qmp
        .execute_timeout(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
            QMP_TIMEOUT,
        )
        .await
        .map_err(|e| qmp_error(vm, e))?;
    match out.as_str().map(str::trim).unwrap_or_default() {
        text if ok(text) => Ok(()),
        text => Err(VmError::InvalidArgument(format!(
            "VM '{vm}': QEMU refused `{command_line}`: {text}"
        ))),
    }
}

/// Installs the config's forwards on a QEMU that just started (before the start
/// succeeds: a forward that cannot be set up fails it).
pub(super) async fn install(vm: &str, qmp: &QmpClient, config: &VmConfig) -> Result<(), VmError> {
    let forwards = &config.guest().forwards;
    if forwards.is_empty() {
        return Ok(());
    }
    let id = netdev(config, vm)?;
    for f in forwards {
        hmp_on(
            vm,
            qmp,
            format!("hostfwd_add {id} {}", f.hostfwd_rule()),
            str::is_empty,
        )
        .await?;
    }
    Ok(())
}

impl Vm {
    async fn hmp(&self, command_line: String, ok: fn(&str) -> bool) -> Result<(), VmError> {
        hmp_on(&self.name(), &self.qmp()?, command_line, ok).await
    }

    /// `VM.AddForward`: a new forward on the running VM (until it stops).
    pub async fn add_forward(self: &Arc<Self>, spec: &str) -> Result<(), VmError> {
        let f = Forward::parse(spec).map_err(VmError::InvalidArgument)?;
        let _op = self.op_lock.lock().await;
        self.require_process()?;
        let mut current = self.guest_view().forwards;
        if let Some(same) = current.iter().find(|c| c.hostfwd_key() == f.hostfwd_key()) {
            return Err(VmError::AlreadyExists(format!(
                "host port {} is already forwarded ({same})",
                f.host
            )));
        }
        check_host_ports(std::slice::from_ref(&f))?;
        let id = netdev(&self.stored_config()?, &self.name())?;
        self.hmp(
            format!("hostfwd_add {id} {}", f.hostfwd_rule()),
            str::is_empty,
        )
        .await?;
        current.push(f);
        self.set_forwards(current);
        Ok(())
    }

    /// `VM.RemoveForward`: by the same spec (only protocol, bind address and host port
    /// matter).
    pub async fn remove_forward(self: &Arc<Self>, spec: &str) -> Result<(), VmError> {
        let f = Forward::parse(spec).map_err(VmError::InvalidArgument)?;
        let _op = self.op_lock.lock().await;
        self.require_process()?;
        let mut current = self.guest_view().forwards;
        let Some(at) = current
            .iter()
            .position(|c| c.hostfwd_key() == f.hostfwd_key())
        else {
            return Err(VmError::NotFound(format!(
                "no forward from {} port {} on {}; `Forwards` lists them",
                f.proto.as_str(),
                f.host,
                f.bind
            )));
        };
        let id = netdev(&self.stored_config()?, &self.name())?;
        self.hmp(format!("hostfwd_remove {id} {}", f.hostfwd_key()), |t| {
            t.ends_with("removed")
        })
        .await?;
        current.remove(at);
        self.set_forwards(current);
        Ok(())
    }

    fn require_process(&self) -> Result<(), VmError> {
        let status = self.status();
        if status.has_process() && status != super::Status::Stopping {
            Ok(())
        } else {
            Err(VmError::InvalidState(format!(
                "VM '{}' is {status}; forwards change on a running VM (start it first)",
                self.name()
            )))
        }
    }
}
