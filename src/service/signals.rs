//! Where a signal goes: broadcast while everyone on the bus is admitted, else one copy
//! to each admitted connection (see `access/peers.rs` and docs/security.md).

use zbus::names::{BusName, UniqueName};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, ObjectPath};

use crate::access::{Gate, Recipients};
use crate::vm::Vm;

/// The emitters that send one signal from `path` about `vm` to everyone allowed to
/// hear it: one broadcast emitter, or one per admitted connection (possibly none).
pub async fn emitters(
    gate: &Gate,
    conn: &Connection,
    path: ObjectPath<'_>,
    vm: Option<&Vm>,
) -> zbus::Result<Vec<SignalEmitter<'static>>> {
    let about = vm.map(|vm| (vm.id().to_string(), vm.name()));
    let about = about
        .as_ref()
        .map(|(id, name)| (id.as_str(), name.as_str()));
    let base = SignalEmitter::new(conn, path)?.into_owned();
    Ok(match gate.signal_recipients(conn, about).await {
        Recipients::Everyone => vec![base],
        Recipients::Only(names) => names
            .into_iter()
            .filter_map(|n| UniqueName::try_from(n).ok())
            .map(|n| base.clone().set_destination(BusName::Unique(n)))
            .collect(),
    })
}
