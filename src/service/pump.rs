//! The one consumer of core events: turns them into D-Bus signals (and serves or
//! removes the objects of VMs added or removed), in the order the core produced them, and hands each to the desktop notifier after its signal.

use std::collections::HashMap;

use tokio::sync::mpsc::UnboundedReceiver;
use zbus::Connection;
use zbus::ObjectPath;
use zbus::object_server::SignalEmitter;

use std::sync::Arc;

use super::idle::Idle;
use super::object_manager::ObjectManagerIface;
use super::properties::{
    CONFIG_PROPERTIES, STATUS_PROPERTIES, emit_changed, guest_property, vm_property,
};
use super::signals::emitters;
use super::{ManagerIface, QmpIface, Shared, VmIface, vm_objects};
use crate::client::{GUEST_INTERFACE, MANAGER_PATH, VM_INTERFACE, vm_path};
use crate::events::CoreEvent;
use crate::log_limit::LogLimiter;
use crate::notify::Notifier;
use crate::outbound::escape;
use crate::session::SessionLife;
use crate::vm::guest::{FORWARD_PROPERTIES, GUEST_PROPERTIES};
use crate::vm::{Vm, VmInfo};

/// A broken connection fails every signal; say so at a bounded rate.
static EMIT_FAILED: LogLimiter = LogLimiter::new();

pub async fn run(
    conn: Connection,
    shared: Arc<Shared>,
    mut events: UnboundedReceiver<CoreEvent>,
    idle: Arc<Idle>,
    notifier: Notifier,
    session: Arc<SessionLife>,
) {
    while let Some(ev) = events.recv().await {
        if matches!(
            ev,
            CoreEvent::StatusChanged { .. }
                | CoreEvent::VmAdded { .. }
                | CoreEvent::VmRemoved { .. }
        ) {
            idle.vms_changed();
        }
        // Asked before the signals go out: a client that leaves once it hears the
        // outcome was still there to see it.
        let seen = shared.witnesses.saw(&conn, &ev).await;
        let result = match &ev {
            CoreEvent::VmAdded { vm, info } => added(&conn, &shared, vm, info).await,
            CoreEvent::VmRemoved { vm, name } => removed(&conn, &shared, vm, name).await,
            other => emit(&conn, &shared, other).await,
        };
        if let Err(e) = result {
            EMIT_FAILED.warn("signal-emit", || {
                tracing::warn!(error = %e, "cannot emit signal");
            });
        }
        if let CoreEvent::VmAdded { vm, .. } | CoreEvent::VmRemoved { vm, .. } = &ev {
            vm.mark_announced();
        }
        // Queues and returns: a slow notification server never holds up a signal.
        notifier.observe(&ev, seen);
        // A crash under a restart policy schedules its restart; logind's locks follow
        // the running VMs.
        session.observe(&ev);
    }
}

/// Serves a new VM's objects, then announces them (InterfacesAdded, VMAdded) to those
/// allowed to hear about it.
async fn added(
    conn: &Connection,
    shared: &Arc<Shared>,
    vm: &Arc<Vm>,
    info: &VmInfo,
) -> zbus::Result<()> {
    let path = vm_objects::publish(conn, shared, vm).await?;
    let at = ObjectPath::from_static_str_unchecked(MANAGER_PATH);
    for emitter in emitters(&shared.gate, conn, at, Some(vm)).await? {
        ObjectManagerIface::announce_added(&emitter, vm).await?;
        ManagerIface::vm_added(&emitter, path.as_ref(), &escape(&info.name)).await?;
    }
    Ok(())
}

/// Takes a removed VM's objects off the bus, then announces it (InterfacesRemoved,
/// VMRemoved) to those allowed to hear about it.
async fn removed(
    conn: &Connection,
    shared: &Arc<Shared>,
    vm: &Arc<Vm>,
    name: &str,
) -> zbus::Result<()> {
    let path = vm_path(vm.id());
    let ifaces = vm_objects::unpublish(conn, &path).await?;
    let at = ObjectPath::from_static_str_unchecked(MANAGER_PATH);
    for emitter in emitters(&shared.gate, conn, at, Some(vm)).await? {
        ObjectManagerIface::announce_removed(&emitter, &path, &ifaces).await?;
        ManagerIface::vm_removed(&emitter, path.as_ref(), &escape(name)).await?;
    }
    Ok(())
}

/// Sends the signals of one event, to those allowed to hear about its VM.
async fn emit(conn: &Connection, shared: &Shared, ev: &CoreEvent) -> zbus::Result<()> {
    let vm = match ev {
        CoreEvent::StatusChanged { vm, .. }
        | CoreEvent::RuntimeChanged { vm, .. }
        | CoreEvent::ConfigChanged { vm, .. }
        | CoreEvent::Qmp { vm, .. }
        | CoreEvent::GuestChanged { vm, .. } => vm,
        // The job's own object signals `Completed`; additions and removals are
        // handled in `run`.
        CoreEvent::JobFinished { .. } | CoreEvent::VmAdded { .. } | CoreEvent::VmRemoved { .. } => {
            return Ok(());
        }
    };
    for emitter in emitters(&shared.gate, conn, vm_path(vm.id()).into(), Some(vm)).await? {
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
        CoreEvent::JobFinished { .. } | CoreEvent::VmAdded { .. } | CoreEvent::VmRemoved { .. } => {
            Ok(())
        }
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
