//! Autostart (`autostart: true`): once per login session, when maqetd first starts
//! (at login with `maqet setup --user --autostart`, else on the first D-Bus activation),
//! it starts every VM that asks for it and has no QEMU yet.
//!
//! "Once per session" is a marker file in `$XDG_RUNTIME_DIR/maqet/`, which the system
//! removes at logout: maqetd leaving when idle and coming back on the next call does
//! not start again the VMs the person stopped meanwhile. The VMs are chosen before
//! maqetd requests its bus name ([`prepare`]), but the marker is only claimed once the
//! name is maqetd's ([`claim_and_spawn`]): a maqetd that loses the name to another
//! one (two started at once at login) exits without having used up the session's
//! autostart, which the name's owner then does.
//!
//! Order: VMs start one after another in name order; each waits its own
//! `autostart_delay` seconds first, and the next one starts after it is running (or
//! failed), so an `autostart_delay` is counted from the previous VM's start.

use std::sync::Arc;
use std::time::Duration;

use super::Busy;
use crate::access::ActivityObserver;
use crate::manager::Manager;
use crate::vm::{Operation, Vm};

const MARKER: &str = "autostart-done";

/// Claims this session's autostart. False when an earlier maqetd of this session did it
/// (or the runtime directory is unusable: then nothing is started twice either).
fn claim(manager: &Manager) -> bool {
    let dir = &manager.ctx().paths.runtime_dir;
    if let Err(e) = crate::paths::create_private_dir(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "no autostart: cannot create the runtime directory");
        return false;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join(MARKER))
    {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "no autostart: cannot mark it done");
            false
        }
    }
}

/// The VMs to start, in order, with their delays.
fn plan(manager: &Manager) -> Vec<(Arc<Vm>, Duration)> {
    manager
        .list()
        .into_iter()
        .filter_map(|vm| {
            let keys = vm.stored_config().ok()?.session().clone();
            (keys.autostart && Operation::Start.is_allowed(vm.status()))
                .then(|| (vm, Duration::from_secs(keys.autostart_delay.into())))
        })
        .collect()
}

/// The autostart VMs, in order with their delays. Taken before maqetd owns its name,
/// so a VM a caller adds in the first moments is not mistaken for one that was waiting
/// for the session. Claims nothing: see [`claim_and_spawn`].
pub fn prepare(manager: &Manager) -> Vec<(Arc<Vm>, Duration)> {
    plan(manager)
}

/// Once maqetd owns its name: claims this session's autostart and starts the
/// [`prepare`]d VMs in the background; does nothing when the session already had it.
pub fn claim_and_spawn(
    manager: &Manager,
    vms: Vec<(Arc<Vm>, Duration)>,
    activity: Option<Arc<dyn ActivityObserver>>,
) {
    if !claim(manager) || vms.is_empty() {
        return;
    }
    let busy = Busy::hold(&activity);
    tokio::spawn(async move {
        let _busy = busy;
        for (vm, delay) in vms {
            tokio::time::sleep(delay).await;
            tracing::info!(vm = %vm.name(), "autostart");
            if let Err(e) = vm.start().await {
                tracing::warn!(vm = %vm.name(), error = %e, "autostart failed");
            }
        }
    });
}
