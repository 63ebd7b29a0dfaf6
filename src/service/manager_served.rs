//! `org.maqet.Maqet1.Manager` as served: [`ManagerIface`] (the `#[interface]` macro's
//! dispatch, properties and introspection) for everything but `ListVMs`, whose reply is
//! sent from a body kept encoded ([`EncodedVmList`]).
//!
//! The macro serializes whatever a method returns on every call; with 10,000 VMs that
//! was most of maqetd's ~4–5 ms per `ListVMs` (docs/benchmarks.md, "Profiling: ListVMs
//! at 10,000 VMs"). zbus sends a pre-encoded body only through
//! [`zbus::message::Builder::build_raw_body`], which only a hand-written dispatch can
//! reach, hence this thin layer in front of the macro's.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use async_trait::async_trait;
use zbus::message::{Flags, Header};
use zbus::names::{InterfaceName, MemberName};
use zbus::object_server::{DispatchResult, Interface, SignalEmitter};
use zbus::wire::{Signature, Type};
use zbus::{BoxDBusError, Connection, Message, ObjectServer, OwnedVariant, Variant, fdo};

use super::Shared;
use super::all_vms::VmList;
use super::manager_iface::ManagerIface;
use crate::access::{Action, Request};
use crate::error::MaqetError;

pub struct ManagerServed {
    iface: ManagerIface,
    shared: Arc<Shared>,
}

impl ManagerServed {
    pub fn new(shared: Arc<Shared>) -> ManagerServed {
        ManagerServed {
            iface: ManagerIface::new(shared.clone()),
            shared,
        }
    }

    /// `ListVMs`: the same gate as every call, then the kept body.
    async fn list_vms(&self, conn: &Connection, msg: &Message) -> zbus::Result<()> {
        let hdr = msg.header();
        let endian = hdr.primary().endian_sig().into();
        let req = Request::new(Action::Observe, "ListVMs");
        let work = async {
            self.shared
                .vm_list
                .body(&self.shared.manager, endian)
                .map_err(|e| MaqetError::Internal(format!("encoding ListVMs: {e}")))
        };
        let body = self
            .shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await;
        if hdr.primary().flags().contains(Flags::NO_REPLY_EXPECTED) {
            return Ok(());
        }
        match body {
            Ok(body) => conn.send(&reply(conn, &hdr, &body.0)?).await,
            Err(e) => conn.reply_dbus_error(&hdr, e).await,
        }
    }
}

/// The method return for `call` with `body` (the signature of [`VmList`]), as
/// [`Connection::reply`] would build it.
fn reply(conn: &Connection, call: &Header<'_>, body: &[u8]) -> zbus::Result<Message> {
    let mut builder = Message::method_return(call);
    if let Some(sender) = conn.unique_name() {
        builder = builder.sender(sender);
    }
    // SAFETY: `body` is a `VmList` encoded in the call's byte order at an 8-aligned
    // offset ([`super::all_vms::EncodedVmList::body`]), with no file descriptors.
    unsafe { builder.build_raw_body(body, VmList::SIGNATURE, vec![]) }
}

/// Everything but `ListVMs` goes to the macro's dispatch unchanged.
#[async_trait]
impl Interface for ManagerServed {
    fn name() -> InterfaceName<'static> {
        ManagerIface::name()
    }

    fn spawn_tasks_for_methods(&self) -> bool {
        self.iface.spawn_tasks_for_methods()
    }

    async fn get(
        &self,
        property_name: &str,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> Option<Result<OwnedVariant, BoxDBusError>> {
        self.iface
            .get(property_name, server, connection, header, emitter)
            .await
    }

    async fn get_all(
        &self,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> fdo::Result<HashMap<String, OwnedVariant>> {
        self.iface
            .get_all(server, connection, header, emitter)
            .await
    }

    fn set<'call>(
        &'call self,
        property_name: &'call str,
        value: &'call Variant<'_>,
        server: &'call ObjectServer,
        connection: &'call Connection,
        header: Option<&'call Header<'_>>,
        emitter: &'call SignalEmitter<'_>,
    ) -> DispatchResult<'call> {
        self.iface
            .set(property_name, value, server, connection, header, emitter)
    }

    async fn set_mut(
        &mut self,
        property_name: &str,
        value: &Variant<'_>,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> Option<Result<(), BoxDBusError>> {
        self.iface
            .set_mut(property_name, value, server, connection, header, emitter)
            .await
    }

    fn call<'call>(
        &'call self,
        server: &'call ObjectServer,
        connection: &'call Connection,
        msg: &'call Message,
        name: MemberName<'call>,
    ) -> DispatchResult<'call> {
        // A call with arguments goes to the macro's dispatch, which refuses them.
        if name.as_str() == "ListVMs" && *msg.body().signature() == Signature::Unit {
            return DispatchResult::Async(Box::pin(async move {
                self.list_vms(connection, msg).await.map_err(Into::into)
            }));
        }
        self.iface.call(server, connection, msg, name)
    }

    fn call_mut<'call>(
        &'call mut self,
        server: &'call ObjectServer,
        connection: &'call Connection,
        msg: &'call Message,
        name: MemberName<'call>,
    ) -> DispatchResult<'call> {
        self.iface.call_mut(server, connection, msg, name)
    }

    fn introspect_to_writer(&self, writer: &mut dyn Write, level: usize) {
        self.iface.introspect_to_writer(writer, level)
    }
}
