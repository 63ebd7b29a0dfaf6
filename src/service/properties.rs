//! A VM's D-Bus property values, built in one place for `GetAll`-style consumers:
//! `PropertiesChanged`, `GetManagedObjects` and `InterfacesAdded`; and the one way any object announces
//! changed properties.

use std::borrow::Cow;
use std::collections::HashMap;

use zbus::Variant;
use zbus::fdo::Properties;
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;

use crate::outbound::{Outbound, escape};
use crate::vm::VmInfo;

/// Every property of `org.maqet.Maqet1.VM`.
pub const VM_PROPERTIES: &[&str] = &[
    "Id",
    "Name",
    "Status",
    "StatusReason",
    "Pid",
    "Config",
    "CreatedAt",
    "StartedAt",
    "StoppedAt",
    "ExitStatus",
];

/// Properties `Apply` can touch.
pub const CONFIG_PROPERTIES: &[&str] = &["Name", "Config"];

/// Properties a status change (or a change of the runtime record) can touch.
pub const STATUS_PROPERTIES: &[&str] = &[
    "Status",
    "StatusReason",
    "Pid",
    "StartedAt",
    "StoppedAt",
    "ExitStatus",
];

/// The value of one VM property, by D-Bus name, its text escaped for the bus
/// ([`crate::outbound`]) and borrowed from `info` when nothing needed escaping.
pub fn vm_property<'a>(info: &'a VmInfo, name: &str) -> Option<Variant<'a>> {
    let text = |s: &'a String| Variant::from(escape(s));
    Some(match name {
        "Id" => text(&info.id),
        "Name" => text(&info.name),
        "Status" => Variant::from(info.status.as_str()),
        "StatusReason" => text(&info.reason),
        "Pid" => Variant::from(info.pid.unwrap_or(0)),
        "Config" => text(&info.config),
        "CreatedAt" => Variant::from(info.created_at),
        "StartedAt" => Variant::from(info.started_at),
        "StoppedAt" => Variant::from(info.stopped_at),
        "ExitStatus" => Variant::from(info.exit_status),
        _ => return None,
    })
}

/// The value of a guest property (`GuestAgent`, `GuestInfo`, `Addresses`, `Forwards`):
/// the guest's words, escaped for the bus.
pub fn guest_property(view: &crate::vm::guest::GuestView, name: &str) -> Option<Variant<'static>> {
    Some(match name {
        "GuestAgent" => Variant::from(view.agent.as_str()),
        "GuestInfo" => Variant::from(view.info_map().outbound()),
        "Addresses" => Variant::from(
            view.address_rows()
                .into_iter()
                .map(|(a, b, c)| (a.outbound(), b.outbound(), c.outbound()))
                .collect::<Vec<_>>(),
        ),
        "Forwards" => Variant::from(view.forward_specs()),
        _ => return None,
    })
}

/// `PropertiesChanged` for `interface` on the emitter's object (nothing invalidated).
pub async fn emit_changed(
    emitter: &SignalEmitter<'_>,
    interface: &'static str,
    changed: HashMap<&str, Variant<'_>>,
) -> zbus::Result<()> {
    Properties::properties_changed(
        emitter,
        InterfaceName::from_static_str_unchecked(interface),
        changed,
        Cow::Borrowed(&[]),
    )
    .await
}
