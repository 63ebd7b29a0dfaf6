//! `org.freedesktop.DBus.Properties` as D-Bus tools expect it, in place of zbus's on
//! maqet's objects: `Get`/`GetAll` with an empty interface name (qdbus sends one; the
//! specification lets the service pick the interface that has the property), and
//! `Set` of a read-only property answered `PropertyReadOnly` rather than "unknown".
//! Values still come from the interfaces' own getters, which go through the gate.

use std::collections::HashMap;

use zbus::message::Header;
use zbus::object_server::{Interface, SignalEmitter};
use zbus::{BoxDBusError, Connection, ObjectServer, OwnedVariant, Variant, fdo, interface};

use super::docstrings::property_access;
use super::{
    GuestIface, JobIface, KRunnerIface, ManagerServed, ObjectManagerIface, QmpIface,
    SearchProviderIface, SnapshotsIface, StorageIface, VmIface,
};

pub struct PropertiesIface;

/// What one of the interfaces maqet serves can answer, by name, at a path.
enum Asked<'a> {
    /// The XML of the interface, to learn its properties.
    Xml,
    Get(&'a str),
    GetAll,
}

enum Answer {
    Xml(String),
    Value(Option<Result<OwnedVariant, BoxDBusError>>),
    All(fdo::Result<HashMap<String, OwnedVariant>>),
}

/// Every interface name maqet serves with properties or without.
const INTERFACES: &[&str] = &[
    "org.maqet.Maqet1.VM",
    "org.maqet.Maqet1.Guest",
    "org.maqet.Maqet1.Manager",
    "org.maqet.Maqet1.Job",
    "org.maqet.Maqet1.QMP",
    "org.maqet.Maqet1.Snapshots",
    "org.maqet.Maqet1.Storage",
    "org.freedesktop.DBus.ObjectManager",
    "org.gnome.Shell.SearchProvider2",
    "org.kde.krunner1",
];

struct Call<'a> {
    server: &'a ObjectServer,
    conn: &'a Connection,
    hdr: &'a Header<'a>,
    emitter: &'a SignalEmitter<'a>,
    path: String,
}

impl Call<'_> {
    /// `asked` of the interface `name` at this path (`None`: not served here).
    async fn ask(&self, name: &str, asked: Asked<'_>) -> Option<Answer> {
        match name {
            "org.maqet.Maqet1.VM" => self.on::<VmIface>(asked).await,
            "org.maqet.Maqet1.Guest" => self.on::<GuestIface>(asked).await,
            "org.maqet.Maqet1.Manager" => self.on::<ManagerServed>(asked).await,
            "org.maqet.Maqet1.Job" => self.on::<JobIface>(asked).await,
            "org.maqet.Maqet1.QMP" => self.on::<QmpIface>(asked).await,
            "org.maqet.Maqet1.Snapshots" => self.on::<SnapshotsIface>(asked).await,
            "org.maqet.Maqet1.Storage" => self.on::<StorageIface>(asked).await,
            "org.freedesktop.DBus.ObjectManager" => self.on::<ObjectManagerIface>(asked).await,
            "org.gnome.Shell.SearchProvider2" => self.on::<SearchProviderIface>(asked).await,
            "org.kde.krunner1" => self.on::<KRunnerIface>(asked).await,
            _ => None,
        }
    }

    async fn on<I: Interface>(&self, asked: Asked<'_>) -> Option<Answer> {
        let iface = self
            .server
            .interface::<_, I>(self.path.as_str())
            .await
            .ok()?;
        let iface = iface.get().await;
        let (server, conn, hdr, em) = (self.server, self.conn, Some(self.hdr), self.emitter);
        Some(match asked {
            Asked::Xml => {
                let mut xml = String::new();
                iface.introspect_to_writer(&mut xml, 0);
                Answer::Xml(xml)
            }
            // The getter's own error (the gate's `AccessDenied`) goes back as it is.
            Asked::Get(prop) => Answer::Value(iface.get(prop, server, conn, hdr, em).await),
            Asked::GetAll => Answer::All(iface.get_all(server, conn, hdr, em).await),
        })
    }

    /// The interface that declares `prop` here, with the property's access.
    async fn declaring(&self, interface: &str, prop: &str) -> fdo::Result<(String, String)> {
        let candidates: Vec<&str> = if interface.is_empty() {
            INTERFACES.to_vec()
        } else {
            vec![interface]
        };
        let mut served = false;
        for name in candidates {
            let Some(Answer::Xml(xml)) = self.ask(name, Asked::Xml).await else {
                continue;
            };
            served = true;
            if let Some(access) = property_access(&xml, prop) {
                return Ok((name.to_string(), access.to_string()));
            }
        }
        Err(unknown(interface, prop, served))
    }
}

/// The error for a property no interface here answered: the interface itself is
/// unknown when it was named and is not served at this path.
fn unknown(interface: &str, prop: &str, served: bool) -> fdo::Error {
    if !served && !interface.is_empty() {
        return fdo::Error::UnknownInterface(format!("no interface '{interface}' on this object"));
    }
    fdo::Error::UnknownProperty(format!(
        "no property '{prop}' on this object{}",
        if interface.is_empty() {
            String::new()
        } else {
            format!(" in '{interface}'")
        }
    ))
}

#[interface(name = "org.freedesktop.DBus.Properties", introspection_docs = false)]
impl PropertiesIface {
    /// A property's value; an empty `interface_name` means whichever interface has it.
    async fn get(
        &self,
        interface_name: &str,
        property_name: &str,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedVariant, BoxDBusError> {
        let call = Call {
            server,
            conn,
            hdr: &hdr,
            emitter: &emitter,
            path: hdr.path().map(|p| p.to_string()).unwrap_or_default(),
        };
        // Ask the getters directly, in `INTERFACES` order (the order `declaring` looks
        // in): a getter answers `None` for a property its interface lacks, so no
        // interface is introspected on this hot path.
        let candidates: &[&str] = if interface_name.is_empty() {
            INTERFACES
        } else {
            &[interface_name]
        };
        let mut served = false;
        for name in candidates {
            match call.ask(name, Asked::Get(property_name)).await {
                Some(Answer::Value(Some(value))) => return value,
                Some(_) => served = true,
                None => {}
            }
        }
        Err(unknown(interface_name, property_name, served).into())
    }

    /// Every property of an interface; an empty `interface_name` means all of them.
    async fn get_all(
        &self,
        interface_name: &str,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> fdo::Result<HashMap<String, OwnedVariant>> {
        let call = Call {
            server,
            conn,
            hdr: &hdr,
            emitter: &emitter,
            path: hdr.path().map(|p| p.to_string()).unwrap_or_default(),
        };
        let names: Vec<&str> = if interface_name.is_empty() {
            INTERFACES.to_vec()
        } else {
            vec![interface_name]
        };
        let mut all = HashMap::new();
        let mut served = false;
        for name in names {
            if let Some(Answer::All(props)) = call.ask(name, Asked::GetAll).await {
                served = true;
                all.extend(props?);
            }
        }
        if !served && !interface_name.is_empty() {
            return Err(fdo::Error::UnknownInterface(format!(
                "no interface '{interface_name}' on this object"
            )));
        }
        Ok(all)
    }

    /// maqet's properties are all read-only: changes go through methods (`Apply`,
    /// `Rename`…), which the gate checks and the audit records.
    #[allow(clippy::too_many_arguments)]
    async fn set(
        &self,
        interface_name: &str,
        property_name: &str,
        _value: Variant<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> fdo::Result<()> {
        let call = Call {
            server,
            conn,
            hdr: &hdr,
            emitter: &emitter,
            path: hdr.path().map(|p| p.to_string()).unwrap_or_default(),
        };
        let (name, access) = call.declaring(interface_name, property_name).await?;
        if access == "read" {
            return Err(fdo::Error::PropertyReadOnly(format!(
                "property '{property_name}' of {name} is read-only; it cannot be set"
            )));
        }
        // None is writable today; one that becomes so needs its setter called here.
        Err(fdo::Error::NotSupported(format!(
            "property '{property_name}' of {name} cannot be set through this service"
        )))
    }

    #[zbus(signal)]
    async fn properties_changed(
        emitter: &SignalEmitter<'_>,
        interface_name: &str,
        changed_properties: HashMap<&str, Variant<'_>>,
        invalidated_properties: Vec<&str>,
    ) -> zbus::Result<()>;
}
