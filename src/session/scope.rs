//! Transient scopes: where the systemd user manager runs (`org.freedesktop.systemd1` on
//! the session bus), each QEMU is moved into its own scope
//! `maqet-vm-<name>-<short id>.scope` in `maqet.slice`, with the VM's `memory_max` and
//! `cpu_quota` as `MemoryMax=` / `CPUQuota=`. `systemctl --user status`, `systemd-cgtop`
//! and the limits then work per VM, and the VM's cgroup is no longer maqetd's: a restart
//! of maqetd's unit cannot take the VMs with it, whatever its `KillMode=`.
//!
//! Without a user manager nothing changes (and `maqet doctor` says so). A QEMU is placed
//! once it runs (its start's `StatusChanged`); re-adopted ones are looked up by pid
//! (`GetUnitByPID`) and placed if they are in no scope of maqet's.

use std::sync::Arc;

use zbus::Connection;
use zbus::{OwnedObjectPath, Variant as Value};

use crate::manager::Manager;
use crate::vm::Vm;

pub const SLICE: &str = "maqet.slice";

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait SystemdManager {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, &[(&str, Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;
    #[zbus(name = "GetUnitByPID")]
    fn get_unit_by_pid(&self, pid: u32) -> zbus::Result<OwnedObjectPath>;
    #[zbus(property)]
    fn system_state(&self) -> zbus::Result<String>;
}

/// The scope's unit name: `maqet-vm-<name>-<first 8 of the id>.scope`, with every
/// character systemd does not take in a unit name escaped as `\xNN` (VM names allow
/// only `[A-Za-z0-9._-]`, all of which it takes).
pub fn unit_name(vm_name: &str, vm_id: &str) -> String {
    let mut out = String::from("maqet-vm-");
    for c in vm_name.chars() {
        if c.is_ascii_alphanumeric() || "._-".contains(c) {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{:02x}", c as u32 & 0xff));
        }
    }
    let short: String = vm_id.chars().filter(|c| *c != '-').take(8).collect();
    format!("{out}-{short}.scope")
}

/// The properties sent with `StartTransientUnit` for a VM.
pub fn properties(vm: &Vm, pid: u32) -> Vec<(&'static str, Value<'static>)> {
    let name = vm.name();
    let mut props: Vec<(&'static str, Value<'static>)> = vec![
        ("PIDs", Value::from(vec![pid])),
        ("Slice", Value::from(SLICE.to_string())),
        ("Description", Value::from(format!("maqet VM {name}"))),
        // The scope goes when QEMU does, even after a crash.
        ("CollectMode", Value::from("inactive-or-failed".to_string())),
    ];
    if let Ok(config) = vm.stored_config() {
        let keys = config.session();
        if let Some(bytes) = keys.memory_max {
            props.push(("MemoryMax", Value::from(bytes)));
        }
        if let Some(percent) = keys.cpu_quota {
            // CPUQuota=150% is 1.5 s of CPU time per second.
            props.push((
                "CPUQuotaPerSecUSec",
                Value::from(u64::from(percent) * 10_000),
            ));
        }
    }
    props
}

/// The user manager, when there is one.
pub struct Scopes {
    systemd: Option<SystemdManagerProxy<'static>>,
}

impl Scopes {
    /// Looks for the user manager on maqetd's session bus connection.
    pub async fn find(conn: &Connection) -> Scopes {
        let found = async {
            let dbus = zbus::fdo::DBusProxy::new(conn)
                .await
                .map_err(|e| e.to_string())?;
            let name = zbus::names::BusName::try_from("org.freedesktop.systemd1")
                .map_err(|e| e.to_string())?;
            if !dbus.name_has_owner(name).await.unwrap_or(false) {
                return Err("org.freedesktop.systemd1 is not on the session bus".to_string());
            }
            SystemdManagerProxy::new(conn)
                .await
                .map_err(|e| e.to_string())
        };
        match found.await {
            Ok(p) => {
                super::found_user_manager(Ok(()));
                Scopes { systemd: Some(p) }
            }
            Err(why) => {
                tracing::info!("no transient scopes for VMs: {why}");
                super::found_user_manager(Err(why));
                Scopes { systemd: None }
            }
        }
    }

    pub fn available(&self) -> bool {
        self.systemd.is_some()
    }

    /// Moves a running QEMU into its scope.
    pub async fn place(&self, vm: &Arc<Vm>, pid: u32) {
        let Some(systemd) = &self.systemd else { return };
        let unit = unit_name(&vm.name(), vm.id());
        let props = properties(vm, pid);
        match systemd
            .start_transient_unit(&unit, "fail", &props, &[])
            .await
        {
            Ok(_) => tracing::info!(vm = %vm.name(), unit, "QEMU runs in its own scope"),
            Err(e) => {
                tracing::warn!(vm = %vm.name(), unit, error = %e, "cannot make the VM's scope")
            }
        }
    }

    /// After a re-adoption: finds the QEMU's scope, or makes it when it has none of ours.
    pub async fn refind(&self, vm: &Arc<Vm>, pid: u32) {
        let Some(systemd) = &self.systemd else { return };
        match systemd.get_unit_by_pid(pid).await {
            Ok(path) if path.as_str().contains("maqet_2dvm_2d") => {
                tracing::info!(vm = %vm.name(), unit = path.as_str(), "re-adopted QEMU is in its scope");
            }
            _ => self.place(vm, pid).await,
        }
    }

    /// Whether the user manager is shutting down (the session is ending).
    pub async fn stopping(&self) -> bool {
        match &self.systemd {
            Some(s) => s.system_state().await.is_ok_and(|st| st == "stopping"),
            None => false,
        }
    }
}

/// Re-finds the scopes of the VMs that were re-adopted at start.
pub async fn refind_all(scopes: &Scopes, manager: &Manager) {
    for vm in manager.list() {
        if let Some(pid) = vm
            .with_info(|i| i.pid)
            .filter(|_| vm.status().has_process())
        {
            scopes.refind(&vm, pid).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_are_short_and_valid() {
        assert_eq!(
            unit_name("web-1.test_a", "7eb9c9a6-3bc9-4b44-91a6-c441a86954ed"),
            "maqet-vm-web-1.test_a-7eb9c9a6.scope"
        );
    }
}
