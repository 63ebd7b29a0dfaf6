//! `org.freedesktop.DBus.ObjectManager` at `/org/maqet/Maqet1`, written for maqet.
//!
//! zbus's generic ObjectManager announces every object when it is registered and reads
//! each interface through its lock for `GetManagedObjects`; with thousands of VMs that
//! costs start-up time and a signal per interface. This one builds its answer straight
//! from the VMs' snapshots and announces each VM once, with all its interfaces.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use zbus::object_server::SignalEmitter;
use zbus::{ObjectPath, OwnedObjectPath, OwnedVariant, Variant, interface};

use super::Shared;
use super::properties::{VM_PROPERTIES, vm_properties, vm_property};
use crate::client::{VM_INTERFACE, vm_path};
use crate::vm::Vm;

type InterfaceProps = HashMap<String, HashMap<String, OwnedVariant>>;

pub struct ObjectManagerIface {
    shared: Arc<Shared>,
}

impl ObjectManagerIface {
    pub fn new(shared: Arc<Shared>) -> ObjectManagerIface {
        ObjectManagerIface { shared }
    }

    pub async fn announce_added(emitter: &SignalEmitter<'_>, vm: &Vm) -> zbus::Result<()> {
        let info = vm.info();
        let props: HashMap<&str, Variant<'_>> = VM_PROPERTIES
            .iter()
            .filter_map(|n| Some((*n, vm_property(&info, n)?)))
            .collect();
        let mut ifaces = HashMap::new();
        ifaces.insert(VM_INTERFACE, props);
        let path = vm_path(vm.id());
        Self::interfaces_added(emitter, path.as_ref(), ifaces).await
    }

    pub async fn announce_removed(
        emitter: &SignalEmitter<'_>,
        path: &OwnedObjectPath,
    ) -> zbus::Result<()> {
        Self::interfaces_removed(emitter, path.as_ref(), Cow::Borrowed(&[VM_INTERFACE])).await
    }
}

#[interface(name = "org.freedesktop.DBus.ObjectManager")]
impl ObjectManagerIface {
    /// Every VM object with its interfaces and their properties.
    #[zbus(out_args("objects"))]
    async fn get_managed_objects(&self) -> HashMap<OwnedObjectPath, InterfaceProps> {
        self.shared
            .manager
            .list()
            .iter()
            .map(|vm| {
                let props = vm.with_info(|info| vm_properties(info, VM_PROPERTIES));
                let mut ifaces = HashMap::new();
                ifaces.insert(VM_INTERFACE.to_string(), props);
                (vm_path(vm.id()), ifaces)
            })
            .collect()
    }

    #[zbus(signal)]
    async fn interfaces_added(
        emitter: &SignalEmitter<'_>,
        object_path: ObjectPath<'_>,
        interfaces_and_properties: HashMap<&str, HashMap<&str, Variant<'_>>>,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn interfaces_removed(
        emitter: &SignalEmitter<'_>,
        object_path: ObjectPath<'_>,
        interfaces: Cow<'_, [&str]>,
    ) -> zbus::Result<()>;
}
