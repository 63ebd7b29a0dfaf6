//! Everything served at a VM's object path, in one place: registering the interfaces at
//! start-up and on `AddVM`, removing them on `RemoveVM`, and describing them for the
//! ObjectManager. A new per-VM interface is added here and nowhere else.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::connection::Builder;
use zbus::{Connection, OwnedObjectPath, OwnedVariant};

use super::properties::{VM_PROPERTIES, guest_properties, vm_properties};
use super::{GuestIface, QmpIface, Shared, SnapshotsIface, StorageIface, VmIface};
use crate::client::{
    GUEST_INTERFACE, QMP_INTERFACE, SNAPSHOTS_INTERFACE, STORAGE_INTERFACE, VM_INTERFACE, vm_path,
};
use crate::vm::guest::{FORWARD_PROPERTIES, GUEST_PROPERTIES, GuestView};
use crate::vm::{Vm, VmInfo};

/// Interfaces with their properties, as `GetManagedObjects` and `InterfacesAdded` carry
/// them.
pub type InterfaceProps = HashMap<String, HashMap<String, OwnedVariant>>;

/// Registers a VM's objects on a connection that is being built.
pub fn serve_on<'a>(builder: Builder<'a>, shared: &Arc<Shared>, vm: &Arc<Vm>) -> Builder<'a> {
    let path = vm_path(vm.id());
    builder
        .serve_at(path.clone(), VmIface::new(shared.clone(), vm.clone()))
        .serve_at(path.clone(), QmpIface::new(shared.clone(), vm.clone()))
        .serve_at(
            path.clone(),
            SnapshotsIface::new(shared.clone(), vm.clone()),
        )
        .serve_at(path.clone(), StorageIface::new(shared.clone(), vm.clone()))
        .serve_at(path, GuestIface::new(shared.clone(), vm.clone()))
}

/// Registers a new VM's objects on a live connection.
pub async fn publish(
    conn: &Connection,
    shared: &Arc<Shared>,
    vm: &Arc<Vm>,
) -> zbus::Result<OwnedObjectPath> {
    let path = vm_path(vm.id());
    let server = conn.object_server();
    server
        .at(&path, VmIface::new(shared.clone(), vm.clone()))
        .await?;
    server
        .at(&path, QmpIface::new(shared.clone(), vm.clone()))
        .await?;
    server
        .at(&path, SnapshotsIface::new(shared.clone(), vm.clone()))
        .await?;
    server
        .at(&path, StorageIface::new(shared.clone(), vm.clone()))
        .await?;
    server
        .at(&path, GuestIface::new(shared.clone(), vm.clone()))
        .await?;
    super::introspection::document(conn, shared, &path, super::introspection::Node::Vm).await?;
    Ok(path)
}

/// Removes a VM's objects. Returns the interface names that were served.
pub async fn unpublish(
    conn: &Connection,
    path: &OwnedObjectPath,
) -> zbus::Result<Vec<&'static str>> {
    let server = conn.object_server();
    server.remove::<VmIface, _>(path).await?;
    server.remove::<QmpIface, _>(path).await?;
    server.remove::<SnapshotsIface, _>(path).await?;
    server.remove::<StorageIface, _>(path).await?;
    server.remove::<GuestIface, _>(path).await?;
    Ok(vec![
        VM_INTERFACE,
        QMP_INTERFACE,
        SNAPSHOTS_INTERFACE,
        STORAGE_INTERFACE,
        GUEST_INTERFACE,
    ])
}

/// A VM's interfaces and their properties.
pub fn interfaces(info: &VmInfo, guest: &GuestView) -> InterfaceProps {
    let mut ifaces = HashMap::new();
    let mut vm = vm_properties(info, VM_PROPERTIES);
    vm.extend(guest_properties(guest, FORWARD_PROPERTIES));
    ifaces.insert(VM_INTERFACE.to_string(), vm);
    ifaces.insert(
        GUEST_INTERFACE.to_string(),
        guest_properties(guest, GUEST_PROPERTIES),
    );
    // No properties: listed so clients see the interfaces exist.
    ifaces.insert(QMP_INTERFACE.to_string(), HashMap::new());
    ifaces.insert(SNAPSHOTS_INTERFACE.to_string(), HashMap::new());
    ifaces.insert(STORAGE_INTERFACE.to_string(), HashMap::new());
    ifaces
}
