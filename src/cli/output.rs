//! How the CLI shows things: tables and sentences for people, JSON for programs.

use std::collections::HashMap;

use comfy_table::{Table, presets};
use serde::Serialize;
use zbus::OwnedVariant;

use super::exit::{ExitCode, is_unreachable};
use crate::error::MaqetError;
use crate::time::{format_duration_us, format_us, now_us};

/// A VM as the CLI shows it, read from its D-Bus properties.
#[derive(Debug, Clone, Serialize, Default)]
pub struct VmView {
    pub id: String,
    pub name: String,
    pub status: String,
    pub status_reason: String,
    pub pid: u32,
    pub created_at: u64,
    pub started_at: u64,
    pub stopped_at: u64,
    pub exit_status: i32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub config: String,
}

fn prop<T>(props: &HashMap<String, OwnedVariant>, name: &str) -> Option<T>
where
    T: TryFrom<OwnedVariant>,
{
    props.get(name)?.try_clone().ok()?.try_into().ok()
}

impl VmView {
    pub fn from_properties(props: &HashMap<String, OwnedVariant>) -> VmView {
        VmView {
            id: prop(props, "Id").unwrap_or_default(),
            name: prop(props, "Name").unwrap_or_default(),
            status: prop(props, "Status").unwrap_or_default(),
            status_reason: prop(props, "StatusReason").unwrap_or_default(),
            pid: prop(props, "Pid").unwrap_or_default(),
            created_at: prop(props, "CreatedAt").unwrap_or_default(),
            started_at: prop(props, "StartedAt").unwrap_or_default(),
            stopped_at: prop(props, "StoppedAt").unwrap_or_default(),
            exit_status: prop(props, "ExitStatus").unwrap_or(-1),
            config: prop(props, "Config").unwrap_or_default(),
        }
    }

    fn has_process(&self) -> bool {
        self.pid != 0
    }

    pub fn uptime(&self) -> String {
        if self.has_process() && self.started_at > 0 {
            format_duration_us(now_us().saturating_sub(self.started_at))
        } else {
            "-".into()
        }
    }

    pub fn pid_text(&self) -> String {
        if self.pid == 0 {
            "-".into()
        } else {
            self.pid.to_string()
        }
    }
}

pub fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("maqet: cannot encode JSON: {e}"),
    }
}

pub fn vm_table(vms: &[VmView]) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_header(["NAME", "STATUS", "PID", "UPTIME", "ID"]);
    for vm in vms {
        t.add_row([
            vm.name.clone(),
            vm.status.clone(),
            vm.pid_text(),
            vm.uptime(),
            vm.id.clone(),
        ]);
    }
    t.to_string()
}

pub fn vm_details(vm: &VmView) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    let rows: [(&str, String); 9] = [
        ("Name", vm.name.clone()),
        ("Id", vm.id.clone()),
        ("Status", vm.status.clone()),
        ("Reason", vm.status_reason.clone()),
        ("Pid", vm.pid_text()),
        ("Uptime", vm.uptime()),
        ("Created", format_us(vm.created_at)),
        ("Started", format_us(vm.started_at)),
        (
            "Stopped",
            if vm.stopped_at == 0 {
                "never".into()
            } else if vm.exit_status >= 0 {
                format!(
                    "{} (exit status {})",
                    format_us(vm.stopped_at),
                    vm.exit_status
                )
            } else {
                format_us(vm.stopped_at)
            },
        ),
    ];
    for (k, v) in rows {
        t.add_row([format!("{k}:"), v]);
    }
    t.to_string()
}

/// Prints an error the way the user asked for output; for an unreachable service, says
/// what to check.
pub fn print_error(e: &MaqetError, json: bool) {
    let code = ExitCode::for_error(e);
    let mut message = e.message();
    if let MaqetError::ZBus(z) = e
        && is_unreachable(z)
    {
        message = format!(
            "cannot reach maqetd on the session bus ({z}). Check that a session bus is running \
             (DBUS_SESSION_BUS_ADDRESS), that maqetd's D-Bus activation file is installed \
             (README: scripts/demo sets one up), or start `maqetd` by hand"
        );
    }
    if json {
        print_json(&serde_json::json!({
            "error": { "kind": e.kind(), "message": message, "exit_code": code as u8 }
        }));
    } else {
        eprintln!("maqet: {message}");
    }
}
