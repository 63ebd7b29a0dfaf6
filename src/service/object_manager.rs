//! `org.freedesktop.DBus.ObjectManager` at `/org/maqet/Maqet1`, written for maqet.
//!
//! zbus's generic ObjectManager announces every object when it is registered and reads
//! each interface through its lock for `GetManagedObjects`; with thousands of VMs that
//! costs start-up time and a signal per interface. This one writes its answer straight
//! from the VMs' records ([`super::all_vms`]) and announces each VM once, with all its
//! interfaces.

use std::borrow::Cow;
use std::sync::Arc;

use zbus::message::Header;

use crate::error::MaqetError;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, ObjectPath, OwnedObjectPath, interface};

use super::Shared;
use super::all_vms::ManagedObjects;
use super::vm_objects::VmInterfaces;
use crate::access::{Action, Request};
use crate::client::vm_path;
use crate::vm::Vm;

pub struct ObjectManagerIface {
    shared: Arc<Shared>,
}

impl ObjectManagerIface {
    pub fn new(shared: Arc<Shared>) -> ObjectManagerIface {
        ObjectManagerIface { shared }
    }

    pub async fn announce_added(emitter: &SignalEmitter<'_>, vm: &Vm) -> zbus::Result<()> {
        let path = vm_path(vm.id());
        let guest = vm.guest_view();
        let info = vm.info();
        let ifaces = VmInterfaces::new(&info, &guest);
        Self::interfaces_added(emitter, path.as_ref(), &ifaces).await
    }

    pub async fn announce_removed(
        emitter: &SignalEmitter<'_>,
        path: &OwnedObjectPath,
        interfaces: &[&str],
    ) -> zbus::Result<()> {
        Self::interfaces_removed(emitter, path.as_ref(), Cow::Borrowed(interfaces)).await
    }
}

#[interface(name = "org.freedesktop.DBus.ObjectManager")]
impl ObjectManagerIface {
    /// Every VM object with its interfaces and their properties.
    #[zbus(out_args("objects"))]
    async fn get_managed_objects(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<ManagedObjects, crate::error::MaqetError> {
        let req = Request::new(Action::Observe, "GetManagedObjects");
        let work = async { Ok(ManagedObjects(self.shared.manager.list_shared())) };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    #[zbus(signal)]
    async fn interfaces_added(
        emitter: &SignalEmitter<'_>,
        object_path: ObjectPath<'_>,
        interfaces_and_properties: &VmInterfaces<'_>,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn interfaces_removed(
        emitter: &SignalEmitter<'_>,
        object_path: ObjectPath<'_>,
        interfaces: Cow<'_, [&str]>,
    ) -> zbus::Result<()>;
}
