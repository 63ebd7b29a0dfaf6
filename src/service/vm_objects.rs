//! Everything served at a VM's object path, in one place: registering the interfaces at
//! start-up and on `AddVM`, removing them on `RemoveVM`, and describing them for the
//! ObjectManager. A new per-VM interface is added here and nowhere else.

use std::collections::HashMap;
use std::sync::Arc;

use serde::ser::{Serialize, SerializeMap, Serializer};
use zbus::connection::Builder;
use zbus::wire::{Signature, Type};
use zbus::{Connection, OwnedObjectPath, OwnedVariant};

use super::properties::{VM_PROPERTIES, guest_property, vm_property};
use super::{GuestIface, QmpIface, Shared, SnapshotsIface, StorageIface, VmIface};
use crate::client::{
    GUEST_INTERFACE, QMP_INTERFACE, SNAPSHOTS_INTERFACE, STORAGE_INTERFACE, VM_INTERFACE, vm_path,
};
use crate::vm::guest::{FORWARD_PROPERTIES, GUEST_PROPERTIES, GuestView};
use crate::vm::{Vm, VmInfo};

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

/// A VM's interfaces and their properties (`a{sa{sv}}`), as `GetManagedObjects` and
/// `InterfacesAdded` carry them. Written straight from the VM's records while the reply
/// is serialized: no map of owned values is built, escaped and dropped per VM (10,000
/// VMs made that most of `GetManagedObjects`' cost; docs/benchmarks.md, "Profiling:
/// scale").
pub struct VmInterfaces<'a> {
    info: &'a VmInfo,
    guest: &'a GuestView,
}

impl<'a> VmInterfaces<'a> {
    pub fn new(info: &'a VmInfo, guest: &'a GuestView) -> VmInterfaces<'a> {
        VmInterfaces { info, guest }
    }
}

impl Type for VmInterfaces<'_> {
    const SIGNATURE: &'static Signature =
        <HashMap<String, HashMap<String, OwnedVariant>> as Type>::SIGNATURE;
}

impl Serialize for VmInterfaces<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let props = |of| Props { of, vm: self };
        let mut ifaces = serializer.serialize_map(Some(5))?;
        ifaces.serialize_entry(VM_INTERFACE, &props(PropsOf::Vm))?;
        ifaces.serialize_entry(GUEST_INTERFACE, &props(PropsOf::Guest))?;
        // No properties: listed so clients see the interfaces exist.
        for name in [QMP_INTERFACE, SNAPSHOTS_INTERFACE, STORAGE_INTERFACE] {
            ifaces.serialize_entry(name, &props(PropsOf::Nothing))?;
        }
        ifaces.end()
    }
}

/// Which properties one interface of a VM carries.
#[derive(Clone, Copy)]
enum PropsOf {
    Vm,
    Guest,
    Nothing,
}

/// One interface's properties (`a{sv}`), each value made as it is written.
struct Props<'a> {
    of: PropsOf,
    vm: &'a VmInterfaces<'a>,
}

impl Serialize for Props<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (info, guest) = (self.vm.info, self.vm.guest);
        let (vm_names, guest_names): (&[&str], &[&str]) = match self.of {
            PropsOf::Vm => (VM_PROPERTIES, FORWARD_PROPERTIES),
            PropsOf::Guest => (&[], GUEST_PROPERTIES),
            PropsOf::Nothing => (&[], &[]),
        };
        let mut map = serializer.serialize_map(Some(vm_names.len() + guest_names.len()))?;
        for name in vm_names {
            if let Some(v) = vm_property(info, name) {
                map.serialize_entry(name, &v)?;
            }
        }
        for name in guest_names {
            if let Some(v) = guest_property(guest, name) {
                map.serialize_entry(name, &v)?;
            }
        }
        map.end()
    }
}
