//! `maqet doctor`: checks what maqetd can see of its own health and, with `fix`,
//! repairs what is safe to repair. The bus and service checks happen in the CLI (they
//! are what stands between the CLI and this code).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;

use crate::manager::Manager;
use crate::vm::process;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    Warning,
    Error,
    /// Was wrong, and `fix` repaired it.
    Fixed,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Warning => "warning",
            Health::Error => "error",
            Health::Fixed => "fixed",
        }
    }
}

/// One check's result: (check, health, what was found, what to do).
#[derive(Debug, Clone)]
pub struct Finding {
    pub check: &'static str,
    pub health: Health,
    pub message: String,
    pub hint: String,
}

fn finding(check: &'static str, health: Health, message: String, hint: &str) -> Finding {
    Finding {
        check,
        health,
        message,
        hint: hint.to_string(),
    }
}

/// Runs every check. `refusal` is why the database was refused, if it was;
/// `policy_problem` why policy.yaml was not taken, if it was not.
pub async fn run(
    manager: &Arc<Manager>,
    refusal: Option<&str>,
    policy_problem: Option<String>,
    fix: bool,
) -> Vec<Finding> {
    let mut out = vec![
        binaries(manager),
        kvm(),
        database(manager, refusal).await,
        policy(manager, policy_problem),
    ];
    out.extend(session_services());
    out.push(runtime_dir(manager, fix));
    if refusal.is_none() {
        out.extend(processes(manager, fix).await);
        out.extend(stale_sockets(manager, fix));
    }
    out
}

fn binaries(manager: &Manager) -> Finding {
    let found = crate::host::qemu_binaries(manager.ctx().path_env.as_deref());
    if found.is_empty() {
        finding(
            "qemu",
            Health::Error,
            "no qemu-system-* binary on maqetd's PATH".into(),
            "install QEMU (Debian: apt install qemu-system-x86), or give VMs a full `binary:` path",
        )
    } else {
        finding("qemu", Health::Ok, found.join(", "), "")
    }
}

/// logind and the systemd user manager: optional, so their absence is a warning that
/// says what does not happen without them.
fn session_services() -> [Finding; 2] {
    let p = crate::session::presence();
    let logind = match p.logind {
        Some(Ok(())) => finding("logind", Health::Ok, "found on the system bus: VMs are paused or saved before sleep (on_sleep) and handled at session end (on_logout)".into(), ""),
        Some(Err(why)) => finding("logind", Health::Warning, format!("not found ({why}): on_sleep and on_logout do nothing"), "normal in containers and CI; on a desktop, check that systemd-logind runs and DBUS_SYSTEM_BUS_ADDRESS (if set) is right"),
        None => finding("logind", Health::Warning, "still looking for logind".into(), "ask again in a moment"),
    };
    let manager = match p.user_manager {
        Some(Ok(())) => finding("user manager", Health::Ok, "systemd --user found: each VM runs in its own scope (maqet-vm-<name>-<id>.scope in maqet.slice)".into(), ""),
        Some(Err(why)) => finding("user manager", Health::Warning, format!("not found ({why}): VMs run without scopes, so memory_max and cpu_quota do nothing"), "normal in containers and CI; on a desktop, log in through a systemd session"),
        None => finding("user manager", Health::Warning, "not looked for yet (it is looked for at the first VM start)".into(), "start a VM, then ask again"),
    };
    [logind, manager]
}

fn kvm() -> Finding {
    if crate::host::kvm_usable() {
        finding("kvm", Health::Ok, "/dev/kvm is usable".into(), "")
    } else {
        finding(
            "kvm",
            Health::Warning,
            "/dev/kvm cannot be opened read-write: VMs run with TCG (slow)".into(),
            "enable virtualization in the firmware, load kvm_intel/kvm_amd, and add yourself to the `kvm` group",
        )
    }
}

async fn database(manager: &Manager, refusal: Option<&str>) -> Finding {
    let path = manager.ctx().paths.database();
    if let Some(why) = refusal {
        return finding(
            "database",
            Health::Error,
            why.to_string(),
            "maqetd leaves the file untouched; move it aside to start afresh, or restore a backup",
        );
    }
    // The owner checks that the path still names the open file (and writes a deleted
    // one anew) before it answers.
    let health = manager.ctx().store.health().await;
    let waiting = if health.waiting > 0 {
        format!("; {} records wait to be written", health.waiting)
    } else {
        String::new()
    };
    if health.unlinked {
        return finding(
            "database",
            Health::Error,
            format!(
                "{} is not the file maqetd writes (deleted or replaced while maqetd runs): {}{waiting}",
                path.display(),
                health.problem.unwrap_or_default()
            ),
            "nothing is lost yet (maqetd holds everything); free the path or its directory so \
             maqetd can write the file anew, or restart maqetd to use the file now there",
        );
    }
    if let Some(problem) = health.problem {
        return finding(
            "database",
            Health::Error,
            format!("writes fail: {problem}{waiting}"),
            "maqetd keeps what happened (exits, audit records) in memory and writes it once \
             the database takes writes again; a state change asked for meanwhile fails",
        );
    }
    if health.lost > 0 {
        return finding(
            "database",
            Health::Error,
            format!(
                "{} records were lost while the database refused writes",
                health.lost
            ),
            "see the log; the count is written to the audit log once writes work",
        );
    }
    if health.recreated > 0 {
        return finding(
            "database",
            Health::Warning,
            format!(
                "{} was deleted while maqetd ran; maqetd wrote it anew from the open file \
                 ({} time(s)): no VM, history or audit record was lost",
                path.display(),
                health.recreated
            ),
            "find out what deletes files in your data directory (a cleaner, a script)",
        );
    }
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    finding(
        "database",
        Health::Ok,
        format!(
            "{} ({} KiB, schema {}, {} VMs)",
            path.display(),
            size / 1024,
            crate::store::SCHEMA_VERSION,
            manager.list().len()
        ),
        "",
    )
}

fn policy(manager: &Manager, problem: Option<String>) -> Finding {
    let path = manager.ctx().paths.policy_file();
    match problem {
        Some(p) => finding(
            "policy",
            Health::Error,
            p,
            "fix the file (docs/security.md); until then the last good policy applies",
        ),
        None if path.exists() => finding(
            "policy",
            Health::Ok,
            format!("{} in force", path.display()),
            "",
        ),
        None => finding(
            "policy",
            Health::Ok,
            "shipped defaults (no policy.yaml)".into(),
            "",
        ),
    }
}

fn runtime_dir(manager: &Manager, fix: bool) -> Finding {
    let dir = &manager.ctx().paths.runtime_dir;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return finding(
            "runtime",
            Health::Ok,
            format!(
                "{} does not exist yet (made on the first start)",
                dir.display()
            ),
            "",
        );
    };
    let uid = rustix::process::getuid().as_raw();
    if !meta.is_dir() || meta.uid() != uid {
        return finding(
            "runtime",
            Health::Error,
            format!("{} is not a directory owned by you", dir.display()),
            "remove it; maqetd recreates it with mode 0700",
        );
    }
    if meta.mode() & 0o077 != 0 {
        if fix && std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).is_ok() {
            return finding(
                "runtime",
                Health::Fixed,
                format!("{} was accessible to others; now 0700", dir.display()),
                "",
            );
        }
        return finding(
            "runtime",
            Health::Error,
            format!(
                "{} has mode {:o}: others can reach QMP sockets",
                dir.display(),
                meta.mode() & 0o777
            ),
            "run maqet doctor --fix (chmod 700)",
        );
    }
    finding(
        "runtime",
        Health::Ok,
        format!("{} (0700)", dir.display()),
        "",
    )
}

/// VMs whose recorded state and the processes on the host disagree.
async fn processes(manager: &Arc<Manager>, fix: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    for vm in manager.list() {
        let info = vm.info();
        if info.status.has_process() {
            let alive = info.pid.is_some_and(|pid| {
                info.pid_start_time
                    .is_some_and(|t| process::proc_start_time(pid).ok() == Some(t))
            });
            if !alive {
                out.push(finding(
                    "vm-state",
                    Health::Error,
                    format!("VM '{}' is {} but its QEMU is gone", info.name, info.status),
                    "restart maqetd (it re-checks every VM at start)",
                ));
            }
        } else if let Some((pid, start)) = process::find_by_uuid(&info.id) {
            if fix {
                vm.adopt_orphan(pid, start).await;
                out.push(finding(
                    "vm-state",
                    Health::Fixed,
                    format!(
                        "VM '{}' was recorded {} but QEMU pid {pid} runs it; adopted it (now {})",
                        info.name,
                        info.status,
                        vm.status()
                    ),
                    "",
                ));
            } else {
                out.push(finding(
                    "vm-state",
                    Health::Error,
                    format!(
                        "VM '{}' is recorded {} but QEMU pid {pid} runs it",
                        info.name, info.status
                    ),
                    "run maqet doctor --fix to adopt it",
                ));
            }
        }
    }
    if out.is_empty() {
        out.push(finding(
            "vm-state",
            Health::Ok,
            "every VM's state matches its process".into(),
            "",
        ));
    }
    out
}

/// Socket directories of VMs that have no QEMU (left by a crash or a removed VM).
fn stale_sockets(manager: &Manager, fix: bool) -> Vec<Finding> {
    let vms_dir = manager.ctx().paths.runtime_dir.join("vms");
    let Ok(entries) = std::fs::read_dir(&vms_dir) else {
        return vec![finding(
            "sockets",
            Health::Ok,
            "no socket directories".into(),
            "",
        )];
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        let in_use = manager.get(&id).is_some_and(|vm| vm.status().has_process());
        if in_use {
            continue;
        }
        let dir = e.path();
        if manager.get(&id).is_none()
            && let Some((pid, _)) = process::find_by_uuid(&id)
        {
            // A QEMU of a VM the database no longer defines (a deleted database): its
            // sockets are its only handle, so they are never removed as stale.
            out.push(finding(
                "sockets",
                Health::Warning,
                format!(
                    "QEMU pid {pid} runs VM {id}, found but not defined (its socket directory {} is kept)",
                    dir.display()
                ),
                "define the VM again or stop that QEMU yourself (its monitor socket is in that directory)",
            ));
            continue;
        }
        if fix && manager.ctx().paths.remove_vm_runtime_dir(&id) {
            out.push(finding(
                "sockets",
                Health::Fixed,
                format!("removed stale {}", dir.display()),
                "",
            ));
        } else {
            out.push(finding(
                "sockets",
                Health::Warning,
                format!("stale socket directory {}", dir.display()),
                "run maqet doctor --fix to remove it",
            ));
        }
    }
    if out.is_empty() {
        out.push(finding(
            "sockets",
            Health::Ok,
            "no stale sockets".into(),
            "",
        ));
    }
    out
}
