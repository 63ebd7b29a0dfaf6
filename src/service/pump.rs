//! The one consumer of core events: turns them into D-Bus signals, in the order the
//! core produced them, and hands each to the desktop notifier after its signal.

use std::collections::HashMap;

use tokio::sync::mpsc::UnboundedReceiver;
use zbus::Connection;
use zbus::object_server::SignalEmitter;

use std::sync::Arc;

use super::idle::Idle;
use super::properties::{
    CONFIG_PROPERTIES, STATUS_PROPERTIES, emit_changed, guest_property, vm_property,
};
use super::signals::emitters;
use super::{QmpIface, VmIface};
use crate::access::Gate;
use crate::client::{GUEST_INTERFACE, VM_INTERFACE, vm_path};
use crate::events::CoreEvent;
use crate::log_limit::LogLimiter;
use crate::notify::Notifier;
use crate::outbound::escape;
use crate::vm::VmInfo;
use crate::vm::guest::{FORWARD_PROPERTIES, GUEST_PROPERTIES};

/// A broken connection fails every signal; say so at a bounded rate.
static EMIT_FAILED: LogLimiter = LogLimiter::new();

pub async fn run(
    conn: Connection,
    gate: Arc<Gate>,
    mut events: UnboundedReceiver<CoreEvent>,
    idle: Arc<Idle>,
    notifier: Notifier,
) {
    while let Some(ev) = events.recv().await {
        if matches!(ev, CoreEvent::StatusChanged { .. }) {
            idle.vms_changed();
        }
        if let Err(e) = emit(&conn, &gate, &ev).await {
            EMIT_FAILED.warn("signal-emit", || {
                tracing::warn!(error = %e, "cannot emit signal");
            });
        }
        // Queues and returns: a slow notification server never holds up a signal.
        notifier.observe(&ev);
    }
}

/// Sends the signals of one event, to those allowed to hear about its VM.
async fn emit(conn: &Connection, gate: &Gate, ev: &CoreEvent) -> zbus::Result<()> {
    let vm = match ev {
        CoreEvent::StatusChanged { vm, .. }
        | CoreEvent::RuntimeChanged { vm, .. }
        | CoreEvent::ConfigChanged { vm, .. }
        | CoreEvent::Qmp { vm, .. }
        | CoreEvent::GuestChanged { vm, .. } => vm,
        // The job's own object signals `Completed`.
        CoreEvent::JobFinished { .. } => return Ok(()),
    };
    for emitter in emitters(gate, conn, vm_path(vm.id()).into(), Some(vm)).await? {
        emit_to(&emitter, ev).await?;
    }
    Ok(())
}

async fn emit_to(emitter: &SignalEmitter<'_>, ev: &CoreEvent) -> zbus::Result<()> {
    match ev {
        CoreEvent::StatusChanged { info, previous, .. } => {
            VmIface::vm_status_changed(
                emitter,
                info.status.as_str(),
                previous.as_str(),
                &escape(&info.reason),
            )
            .await?;
            properties_changed(emitter, info, STATUS_PROPERTIES).await
        }
        CoreEvent::RuntimeChanged { info, .. } => {
            properties_changed(emitter, info, STATUS_PROPERTIES).await
        }
        CoreEvent::ConfigChanged { info, .. } => {
            properties_changed(emitter, info, CONFIG_PROPERTIES).await
        }
        CoreEvent::Qmp {
            name,
            data_json,
            timestamp_us,
            ..
        } => QmpIface::event(emitter, &escape(name), &escape(data_json), *timestamp_us).await,
        CoreEvent::GuestChanged { view, changed, .. } => {
            for (interface, names) in [
                (GUEST_INTERFACE, GUEST_PROPERTIES),
                (VM_INTERFACE, FORWARD_PROPERTIES),
            ] {
                let props: HashMap<&str, zbus::Variant<'_>> = changed
                    .iter()
                    .filter(|n| names.contains(n))
                    .filter_map(|n| Some((*n, guest_property(view, n)?)))
                    .collect();
                if !props.is_empty() {
                    emit_changed(emitter, interface, props).await?;
                }
            }
            Ok(())
        }
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
