//! The replies that describe every VM at once: `ListVMs` and `GetManagedObjects`.
//!
//! Both are serialized straight from the registry's shared list of VMs
//! ([`crate::manager::Manager::list_shared`]):
//! each value is written as the reply is encoded, text borrowed (escaped on the way out
//! by [`escape`], which copies only what needs escaping) and object paths formatted into
//! one reused buffer. Building them as owned rows and maps first, escaping those into
//! fresh copies and dropping everything again cost most of the time with 10,000 VMs
//! (docs/benchmarks.md, "Profiling: scale").

use std::collections::HashMap;
use std::sync::Arc;

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use zbus::wire::{Signature, Type};
use zbus::{OwnedObjectPath, OwnedVariant};

use super::vm_objects::VmInterfaces;
use crate::client::{VmListEntry, write_vm_path};
use crate::outbound::{Outbound, escape};
use crate::vm::Vm;

/// `ListVMs`' reply: (id, name, object path, status) per VM, in the given order.
pub struct VmList(pub Arc<[Arc<Vm>]>);

impl Type for VmList {
    const SIGNATURE: &'static Signature = <Vec<VmListEntry> as Type>::SIGNATURE;
}

impl Serialize for VmList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut path = String::new();
        let mut rows = serializer.serialize_seq(Some(self.0.len()))?;
        for vm in self.0.iter() {
            write_vm_path(&mut path, vm.id());
            vm.with_info(|i| {
                rows.serialize_element(&(
                    escape(&i.id),
                    escape(&i.name),
                    path.as_str(),
                    i.status.as_str(),
                ))
            })?;
        }
        rows.end()
    }
}

/// Escaped while it is serialized.
impl Outbound for VmList {
    fn outbound(self) -> Self {
        self
    }
}

/// `GetManagedObjects`' reply: every VM's object path with its interfaces and their
/// properties.
pub struct ManagedObjects(pub Arc<[Arc<Vm>]>);

impl Type for ManagedObjects {
    const SIGNATURE: &'static Signature = <HashMap<
        OwnedObjectPath,
        HashMap<String, HashMap<String, OwnedVariant>>,
    > as Type>::SIGNATURE;
}

impl Serialize for ManagedObjects {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut path = String::new();
        let mut objects = serializer.serialize_map(Some(self.0.len()))?;
        for vm in self.0.iter() {
            write_vm_path(&mut path, vm.id());
            vm.with_guest_view(|guest| {
                vm.with_info(|i| {
                    objects.serialize_entry(path.as_str(), &VmInterfaces::new(i, guest))
                })
            })?;
        }
        objects.end()
    }
}

/// Escaped while it is serialized.
impl Outbound for ManagedObjects {
    fn outbound(self) -> Self {
        self
    }
}
