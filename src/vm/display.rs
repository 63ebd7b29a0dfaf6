//! The VM's display server (`display: spice | vnc`) and `OpenDisplay`.
//!
//! QEMU serves SPICE or VNC on a unix socket in the VM's 0700 runtime directory, with no
//! ticket or password: only this user can reach the socket. A client never needs the
//! path, though: `OpenDisplay` makes a socket pair, hands one end to QEMU (QMP `getfd`,
//! then `add_client`, as libvirt's `openGraphicsFD` does) and returns the other, already
//! connected. SPICE opens one connection per channel, so a viewer calls it once per
//! channel (`maqet view` does, through its bridge).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use super::error::VmError;
use super::{QMP_TIMEOUT, Vm, qmp_error};
use crate::config::{DisplayConfig, DisplayServer, escape_commas};
use crate::qmp::QmpError;

/// Names the fds passed with `getfd`, unique within this maqetd.
static NEXT_FD_NAME: AtomicU64 = AtomicU64::new(0);

/// What maqet adds to the command line for `display: spice | vnc`: no window of QEMU's
/// own (`-display none`), the server on `socket`, and a standard VGA when the config
/// names no graphics device (std VGA works with every guest and firmware; a config that
/// wants QXL or virtio-gpu names it with `vga:`).
pub fn qemu_args(display: DisplayConfig, socket: &Path) -> Vec<String> {
    let path = escape_commas(&socket.to_string_lossy());
    let mut args = vec!["-display".to_owned(), "none".to_owned()];
    match display.server {
        DisplayServer::Spice => args.extend([
            "-spice".to_owned(),
            format!("unix=on,addr={path},disable-ticketing=on"),
        ]),
        DisplayServer::Vnc => args.extend(["-vnc".to_owned(), format!("unix:{path}")]),
    }
    if display.add_graphics_device {
        args.extend(["-vga".to_owned(), "std".to_owned()]);
    }
    args
}

impl Vm {
    /// A socket connected to the VM's SPICE or VNC server (see the module docs).
    /// `InvalidState` without a running QEMU; `InvalidArgument`, naming the key to set,
    /// when the VM has no display server.
    pub async fn open_display(&self) -> Result<UnixStream, VmError> {
        let qmp = self.qmp()?;
        let name = self.name();
        let wanted = self.stored_config()?.display().map(|d| d.server);
        let server = self.running_display_server(&qmp, wanted).await?;
        let Some(server) = server else {
            let message = match wanted {
                Some(w) => format!(
                    "VM '{name}' has `display: {0}` in its config, but its QEMU was started \
                     without it (the config was applied while it ran): restart it (maqet restart {name})",
                    w.as_str()
                ),
                None => format!(
                    "VM '{name}' has no SPICE or VNC display: set `display: spice` (or \
                     `display: vnc`) in its config (maqet apply) and restart it"
                ),
            };
            return Err(VmError::InvalidArgument(message));
        };
        let failed = |what: &str, e: std::io::Error| {
            VmError::Internal(format!("display of VM '{name}': {what}: {e}"))
        };
        let (ours, theirs) = UnixStream::pair().map_err(|e| failed("socket pair", e))?;
        let fdname = format!(
            "maqet-display-{}",
            NEXT_FD_NAME.fetch_add(1, Ordering::Relaxed)
        );
        qmp.execute_with_fd(
            "getfd",
            Some(json!({ "fdname": fdname })),
            std::os::fd::OwnedFd::from(theirs),
        )
        .await
        .map_err(|e| qmp_error(&name, e))?;
        // No skipauth: maqet's own server has no ticket to skip, and a server the config
        // started itself keeps its password.
        let mut arguments =
            json!({ "protocol": server.as_str(), "fdname": fdname, "skipauth": false });
        if server == DisplayServer::Spice {
            arguments["tls"] = json!(false);
        }
        let added = qmp
            .execute_timeout("add_client", Some(arguments), QMP_TIMEOUT)
            .await;
        if let Err(e) = added {
            // add_client consumes the fd only when it succeeds.
            let _ = qmp
                .execute_timeout("closefd", Some(json!({ "fdname": fdname })), QMP_TIMEOUT)
                .await;
            return Err(qmp_error(&name, e));
        }
        Ok(ours)
    }

    /// Which server the running QEMU has: the config's kind if enabled, else whichever
    /// is (a config may start one through its arguments), SPICE first.
    async fn running_display_server(
        &self,
        qmp: &crate::qmp::QmpClient,
        wanted: Option<DisplayServer>,
    ) -> Result<Option<DisplayServer>, VmError> {
        let mut order = vec![DisplayServer::Spice, DisplayServer::Vnc];
        if let Some(w) = wanted {
            order.retain(|s| *s != w);
            order.insert(0, w);
        }
        for server in order {
            let query = format!("query-{}", server.as_str());
            match qmp.execute_timeout(&query, None, QMP_TIMEOUT).await {
                Ok(v) if v.get("enabled").and_then(Value::as_bool) == Some(true) => {
                    return Ok(Some(server));
                }
                Ok(_) => {}
                // A QEMU built without SPICE does not know the query.
                Err(QmpError::Command { class, .. }) if class == "CommandNotFound" => {}
                Err(e) => return Err(qmp_error(&self.name(), e)),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_args_name_the_socket_and_add_a_screen_only_when_asked() {
        let spice = DisplayConfig {
            server: DisplayServer::Spice,
            add_graphics_device: true,
        };
        assert_eq!(
            qemu_args(spice, Path::new("/run/user/1/maqet/vms/x/display.sock")),
            [
                "-display",
                "none",
                "-spice",
                "unix=on,addr=/run/user/1/maqet/vms/x/display.sock,disable-ticketing=on",
                "-vga",
                "std"
            ]
        );
        let vnc = DisplayConfig {
            server: DisplayServer::Vnc,
            add_graphics_device: false,
        };
        // A comma in the path cannot start a new suboption.
        assert_eq!(
            qemu_args(vnc, Path::new("/r,un/display.sock")),
            ["-display", "none", "-vnc", "unix:/r,,un/display.sock"]
        );
    }
}
