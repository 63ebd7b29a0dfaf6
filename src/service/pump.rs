//! The one consumer of core events: turns them into D-Bus signals, in the order the
//! core produced them, and hands each to the desktop notifier after its signal.

use std::collections::HashMap;

use tokio::sync::mpsc::UnboundedReceiver;
use zbus::Connection;
use zbus::object_server::SignalEmitter;

use std::sync::Arc;

use super::idle::Idle;
use super::properties::{CONFIG_PROPERTIES, STATUS_PROPERTIES, emit_changed, vm_property};
use super::{QmpIface, VmIface};
use crate::client::{VM_INTERFACE, vm_path};
use crate::events::CoreEvent;
use crate::log_limit::LogLimiter;
use crate::notify::Notifier;
use crate::outbound::escape;
use crate::vm::VmInfo;

/// A broken connection fails every signal; say so at a bounded rate.
static EMIT_FAILED: LogLimiter = LogLimiter::new();

pub async fn run(
    conn: Connection,
    mut events: UnboundedReceiver<CoreEvent>,
    idle: Arc<Idle>,
    notifier: Notifier,
) {
    while let Some(ev) = events.recv().await {
        if matches!(ev, CoreEvent::StatusChanged { .. }) {
            idle.vms_changed();
        }
        if let Err(e) = emit(&conn, &ev).await {
            EMIT_FAILED.warn("signal-emit", || {
                tracing::warn!(error = %e, "cannot emit signal");
            });
        }
        // Queues and returns: a slow notification server never holds up a signal.
        notifier.observe(&ev);
    }
}

async fn emit(conn: &Connection, ev: &CoreEvent) -> zbus::Result<()> {
    match ev {
        CoreEvent::StatusChanged {
            vm, info, previous, ..
        } => {
            let emitter = SignalEmitter::new(conn, vm_path(vm.id()))?;
            VmIface::vm_status_changed(
                &emitter,
                info.status.as_str(),
                previous.as_str(),
                &escape(&info.reason),
            )
            .await?;
            properties_changed(&emitter, info, STATUS_PROPERTIES).await
        }
        CoreEvent::RuntimeChanged { vm, info } => {
            let emitter = SignalEmitter::new(conn, vm_path(vm.id()))?;
            properties_changed(&emitter, info, STATUS_PROPERTIES).await
        }
        CoreEvent::ConfigChanged { vm, info } => {
            let emitter = SignalEmitter::new(conn, vm_path(vm.id()))?;
            properties_changed(&emitter, info, CONFIG_PROPERTIES).await
        }
        CoreEvent::Qmp {
            vm,
            name,
            data_json,
            timestamp_us,
        } => {
            let emitter = SignalEmitter::new(conn, vm_path(vm.id()))?;
            QmpIface::event(&emitter, &escape(name), &escape(data_json), *timestamp_us).await
        }
        // The job's own object signals `Completed`.
        CoreEvent::JobFinished { .. } => Ok(()),
    }
}

async fn properties_changed(
    emitter: &SignalEmitter<'_>,
    info: &VmInfo,
    names: &[&str],
) -> zbus::Result<()> {
    let changed: HashMap<&str, zbus::Variant<'_>> = names
        .iter()
        .filter_map(|n| Some((*n, vm_property(info, n)?)))
        .collect();
    emit_changed(emitter, VM_INTERFACE, changed).await
}
