//! The replies that describe every VM at once: `ListVMs` and `GetManagedObjects`.
//!
//! Both are serialized straight from the registry's shared list of VMs
//! ([`crate::manager::Manager::list_shared`]):
//! each value is written as the reply is encoded, text borrowed (escaped on the way out
//! by [`escape`], which copies only what needs escaping) and object paths formatted into
//! one reused buffer. Building them as owned rows and maps first, escaping those into
//! fresh copies and dropping everything again cost most of the time with 10,000 VMs
//! (docs/benchmarks.md, "Profiling: scale").
//!
//! `ListVMs`' body is also kept encoded ([`EncodedVmList`]) until a VM's record or the
//! set of VMs changes, so a call with nothing changed encodes nothing
//! (docs/benchmarks.md, "Profiling: ListVMs at 10,000 VMs").

use std::collections::HashMap;
use std::sync::Arc;

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use zbus::wire::serialized::Context;
use zbus::wire::{Endian, Signature, Type};
use zbus::{OwnedObjectPath, OwnedVariant};

use super::vm_objects::VmInterfaces;
use crate::client::{VmListEntry, write_vm_path};
use crate::manager::Manager;
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

/// `ListVMs`' reply body as encoded for the last caller, with the listing epoch
/// ([`crate::vm::ListingEpoch`]) it was encoded at.
#[derive(Default)]
pub struct EncodedVmList(parking_lot::Mutex<Option<Encoded>>);

struct Encoded {
    epoch: u64,
    endian: Endian,
    body: Arc<[u8]>,
}

/// The epoch and size, not the megabyte of bytes.
impl std::fmt::Debug for EncodedVmList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.0.lock();
        let kept = kept.as_ref().map(|e| (e.epoch, e.body.len()));
        f.debug_tuple("EncodedVmList").field(&kept).finish()
    }
}

/// An encoded `ListVMs` body.
pub struct VmListBody(pub Arc<[u8]>);

/// Escaped while it was encoded.
impl Outbound for VmListBody {
    fn outbound(self) -> Self {
        self
    }
}

impl EncodedVmList {
    /// The body of `ListVMs`' reply (signature [`VmList::SIGNATURE`]) in `endian` (the
    /// caller's: a reply takes its call's byte order), encoded again only if something
    /// listed changed since the last call. A D-Bus body starts 8-aligned, so one encoded
    /// at offset 0 is the same bytes wherever the header ends.
    pub fn body(&self, manager: &Manager, endian: Endian) -> zbus::Result<VmListBody> {
        // Read before the list is: a change after this point moves the epoch, so a
        // listing that might have missed it is stored under an epoch already stale.
        let epoch = manager.ctx().listing_epoch.get();
        if let Some(e) = &*self.0.lock()
            && e.epoch == epoch
            && e.endian == endian
        {
            return Ok(VmListBody(e.body.clone()));
        }
        let data = zbus::wire::to_bytes(Context::new(endian, 0), &VmList(manager.list_shared()))?;
        // Exactly sized: the encoder's buffer has grown by doubling.
        let body: Arc<[u8]> = Arc::from(data.bytes());
        *self.0.lock() = Some(Encoded {
            epoch,
            endian,
            body: body.clone(),
        });
        Ok(VmListBody(body))
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
