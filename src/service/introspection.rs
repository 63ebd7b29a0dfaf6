//! `org.freedesktop.DBus.Introspectable` for the nodes above the VMs and jobs, answered
//! per caller: a stranger (a user the policy does not admit) sees the path to the
//! manager and no VM or job below it.
//!
//! zbus answers `Introspect` itself on every node, listing every child, recursively, to
//! whoever asks. So maqetd replaces that interface on `/`, `/org`, `/org/maqet`, the
//! manager and the `vm` and `job` nodes with this one, which writes the node's own
//! interfaces (as zbus would) and its children as plain `<node name="…"/>` entries
//! (as GDBus does; clients introspect a child to learn more, so the root's answer does
//! not grow with the number of VMs), leaving out what the caller may not observe. The
//! leaves (VM, job, search provider and KRunner objects) get the same interface, which
//! lists their interfaces to anyone (reading anything there goes through the gate).
//! Every answer carries the members' documentation as `org.gtk.GDBus.DocString`
//! annotations ([`super::docstrings`]). Each node also gets maqet's
//! `org.freedesktop.DBus.Properties` ([`super::properties_iface`]).
//!
//! zbus drops a node that has no children and only the standard interfaces, and makes a
//! fresh one (with its own `Introspectable`) when a child appears again. The `vm` and
//! `job` nodes therefore also carry [`Anchor`], an interface with no members that keeps
//! them, and this guard, in place for the service's lifetime; it is left out of the
//! XML.

use std::fmt::Write;
use std::sync::Arc;

use zbus::message::Header;
use zbus::names::InterfaceName;
use zbus::object_server::Interface;
use zbus::{Connection, ObjectServer, interface};

use super::properties_iface::PropertiesIface;
use super::{
    GuestIface, ImagesIface, JobIface, KRUNNER_PATH, KRunnerIface, ManagerServed,
    ObjectManagerIface, QmpIface, SEARCH_PROVIDER_PATH, SearchProviderIface, Shared,
    SnapshotsIface, StorageIface, VmIface, docstrings,
};
use crate::client::{MANAGER_PATH, vm_path};

const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const VMS_PATH: &str = "/org/maqet/Maqet1/vm";
const JOBS_PATH: &str = "/org/maqet/Maqet1/job";

/// The guarded nodes, from the root down, and the kinds of leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Root,
    Org,
    Maqet,
    Manager,
    Vms,
    Jobs,
    SearchProvider,
    KRunner,
    /// A VM's object (any of them: the path comes with the call).
    Vm,
    /// A job's object.
    Job,
}

impl Node {
    const ALL: [Node; 6] = [
        Node::Root,
        Node::Org,
        Node::Maqet,
        Node::Manager,
        Node::Vms,
        Node::Jobs,
    ];

    fn path(self) -> &'static str {
        match self {
            Node::Root => "/",
            Node::Org => "/org",
            Node::Maqet => "/org/maqet",
            Node::Manager => MANAGER_PATH,
            Node::Vms => VMS_PATH,
            Node::Jobs => JOBS_PATH,
            Node::SearchProvider => SEARCH_PROVIDER_PATH,
            Node::KRunner => KRUNNER_PATH,
            // Served per object by [`document`], never through this.
            Node::Vm | Node::Job => "/",
        }
    }
}

/// Keeps the `vm` and `job` nodes (and their guard) alive while they have no child.
pub struct Anchor;

#[interface(name = "org.maqet.Maqet1.Internal.Anchor", introspection_docs = false)]
impl Anchor {}

/// Only for its introspection XML: zbus serves the real `org.freedesktop.DBus.Peer`
/// on every node but does not export its type.
struct PeerXml;

#[interface(name = "org.freedesktop.DBus.Peer", introspection_docs = false)]
impl PeerXml {
    fn ping(&self) {}
    fn get_machine_id(&self) -> zbus::fdo::Result<String> {
        Err(zbus::fdo::Error::NotSupported(String::new()))
    }
}

pub struct GuardedIntrospection {
    shared: Arc<Shared>,
    node: Node,
}

#[interface(
    name = "org.freedesktop.DBus.Introspectable",
    introspection_docs = false
)]
impl GuardedIntrospection {
    async fn introspect(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> zbus::fdo::Result<String> {
        let uid = self.shared.gate.caller_uid(conn, &hdr).await;
        let may_observe =
            |vm: Option<(&str, &str)>| uid.is_some_and(|uid| self.shared.gate.may_observe(uid, vm));
        let mut xml = String::from(
            "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
        );
        let path = hdr.path().map(|p| p.to_string()).unwrap_or_default();
        // Interfaces in name order, as zbus lists them.
        self.introspect_to_writer(&mut xml, 2);
        if self.node == Node::Manager {
            write_iface::<ObjectManagerIface>(server, &path, &mut xml).await?;
        }
        PeerXml.introspect_to_writer(&mut xml, 2);
        zbus::fdo::Properties.introspect_to_writer(&mut xml, 2);
        match self.node {
            Node::Manager => {
                write_iface::<ImagesIface>(server, &path, &mut xml).await?;
                write_iface::<ManagerServed>(server, &path, &mut xml).await?
            }
            Node::SearchProvider => {
                write_iface::<SearchProviderIface>(server, &path, &mut xml).await?
            }
            Node::KRunner => write_iface::<KRunnerIface>(server, &path, &mut xml).await?,
            Node::Vm => {
                write_iface::<GuestIface>(server, &path, &mut xml).await?;
                write_iface::<QmpIface>(server, &path, &mut xml).await?;
                write_iface::<SnapshotsIface>(server, &path, &mut xml).await?;
                write_iface::<StorageIface>(server, &path, &mut xml).await?;
                write_iface::<VmIface>(server, &path, &mut xml).await?;
            }
            Node::Job => write_iface::<JobIface>(server, &path, &mut xml).await?,
            _ => {}
        }
        let children: Vec<String> = match self.node {
            Node::Root => vec!["org".into()],
            Node::Org => vec!["maqet".into()],
            Node::Maqet => vec!["Maqet1".into()],
            Node::Manager if may_observe(None) => {
                vec![
                    "SearchProvider".into(),
                    "job".into(),
                    "krunner".into(),
                    "vm".into(),
                ]
            }
            Node::Vms => {
                let mut ids = Vec::new();
                for vm in self.shared.manager.list() {
                    let path = vm_path(vm.id());
                    let visible = may_observe(Some((vm.id(), &vm.name())))
                        && server.interface::<_, VmIface>(&path).await.is_ok();
                    if visible {
                        ids.push(path.rsplit('/').next().unwrap_or_default().to_string());
                    }
                }
                ids.sort();
                ids
            }
            Node::Jobs => self
                .shared
                .retired_jobs
                .served()
                .into_iter()
                .filter(|(_, vm_id)| {
                    let vm = self.shared.manager.get(vm_id);
                    let about = vm.as_ref().map(|vm| (vm.id().to_string(), vm.name()));
                    may_observe(about.as_ref().map(|(id, n)| (id.as_str(), n.as_str())))
                })
                .map(|(n, _)| n.to_string())
                .collect(),
            Node::Manager | Node::SearchProvider | Node::KRunner | Node::Vm | Node::Job => {
                Vec::new()
            }
        };
        for child in children {
            let _ = writeln!(xml, "  <node name=\"{child}\"/>");
        }
        xml.push_str("</node>\n");
        let xml = docstrings::annotate(&xml);
        Ok(match self.node {
            Node::Vm => name_first(&xml),
            _ => xml,
        })
    }
}

/// The VM interface's XML with the `Name` property as its first member. Object paths
/// are UUIDs, so the name is what says which VM an object is; zbus writes members in
/// name order (methods, then properties, then signals), and tools that keep the XML's
/// order (D-Feet, `gdbus introspect`) then show it first. The interface's own
/// annotations stay ahead of it.
fn name_first(xml: &str) -> String {
    let lines: Vec<&str> = xml.lines().collect();
    let Some(iface) = lines
        .iter()
        .position(|l| l.trim() == "<interface name=\"org.maqet.Maqet1.VM\">")
    else {
        return xml.to_string();
    };
    let indent = |l: &str| l.len() - l.trim_start().len();
    let member = indent(lines[iface]) + 2;
    let after_docs = lines[iface + 1..]
        .iter()
        .position(|l| !(indent(l) == member && l.trim_start().starts_with("<annotation ")))
        .map_or(lines.len(), |p| iface + 1 + p);
    let Some(start) = lines[after_docs..]
        .iter()
        .take_while(|l| l.trim() != "</interface>")
        .position(|l| indent(l) == member && l.trim_start().starts_with("<property name=\"Name\" "))
        .map(|p| after_docs + p)
    else {
        return xml.to_string();
    };
    let end = if lines[start].ends_with("/>") {
        start
    } else {
        match lines[start..]
            .iter()
            .position(|l| l.trim() == "</property>")
        {
            Some(p) => start + p,
            None => return xml.to_string(),
        }
    };
    let mut order: Vec<&str> = Vec::with_capacity(lines.len());
    order.extend(&lines[..after_docs]);
    order.extend(&lines[start..=end]);
    order.extend(&lines[after_docs..start]);
    order.extend(&lines[end + 1..]);
    let mut out = order.join("\n");
    out.push('\n');
    out
}

/// Writes the XML of the interface `I` served at `path`.
async fn write_iface<I: Interface>(
    server: &ObjectServer,
    path: &str,
    xml: &mut String,
) -> zbus::fdo::Result<()> {
    let iface = server.interface::<_, I>(path).await?;
    iface.get().await.introspect_to_writer(xml, 2);
    Ok(())
}

/// Gives the object at `path` maqet's `Introspectable` (documented, per caller) and
/// `Properties` (qdbus's empty interface name, `PropertyReadOnly`) in place of zbus's.
pub async fn document(
    conn: &Connection,
    shared: &Arc<Shared>,
    path: &str,
    node: Node,
) -> zbus::Result<()> {
    let server = conn.object_server();
    for (name, replacement) in [(INTROSPECTABLE, true), (PROPERTIES, false)] {
        server
            .remove_named(path, InterfaceName::from_static_str_unchecked(name))
            .await?;
        let refused = if replacement {
            let guard = GuardedIntrospection {
                shared: shared.clone(),
                node,
            };
            server.at(path, guard).await?.is_some()
        } else {
            server.at(path, PropertiesIface).await?.is_some()
        };
        if refused {
            return Err(zbus::Error::InterfaceExists(
                InterfaceName::from_static_str_unchecked(name),
                zbus::ObjectPath::try_from(path.to_string())?,
            ));
        }
    }
    Ok(())
}

/// Puts the guard in place of zbus's `Introspectable` on every guarded node and every
/// object (before the service takes its bus name, so no caller ever sees zbus's
/// answer).
pub async fn install(conn: &Connection, shared: &Arc<Shared>) -> zbus::Result<()> {
    let server = conn.object_server();
    for node in [Node::Vms, Node::Jobs] {
        server.at(node.path(), Anchor).await?;
    }
    for node in Node::ALL {
        // Every node on the way to the manager and the anchors exists by now.
        server
            .remove_named(
                node.path(),
                InterfaceName::from_static_str_unchecked(INTROSPECTABLE),
            )
            .await?;
        let guard = GuardedIntrospection {
            shared: shared.clone(),
            node,
        };
        if server.at(node.path(), guard).await?.is_some() {
            return Err(zbus::Error::InterfaceExists(
                InterfaceName::from_static_str_unchecked(INTROSPECTABLE),
                node.path().try_into()?,
            ));
        }
    }
    server
        .remove_named(
            MANAGER_PATH,
            InterfaceName::from_static_str_unchecked(PROPERTIES),
        )
        .await?;
    let _ = server.at(MANAGER_PATH, PropertiesIface).await?;
    for node in [Node::SearchProvider, Node::KRunner] {
        document(conn, shared, node.path(), node).await?;
    }
    for vm in shared.manager.list() {
        document(conn, shared, &vm_path(vm.id()), Node::Vm).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::name_first;

    #[test]
    fn the_name_property_becomes_the_vm_interfaces_first_member() {
        let xml = "<node>\n  <interface name=\"org.maqet.Maqet1.VM\">\n    <annotation name=\"d\" value=\"x\"/>\n    <method name=\"Start\">\n    </method>\n    <property name=\"Id\" type=\"s\" access=\"read\"/>\n    <property name=\"Name\" type=\"s\" access=\"read\">\n      <annotation name=\"d\" value=\"n\"/>\n    </property>\n  </interface>\n  <interface name=\"x.Other\">\n    <property name=\"Name\" type=\"s\" access=\"read\"/>\n  </interface>\n</node>\n";
        let want = "<node>\n  <interface name=\"org.maqet.Maqet1.VM\">\n    <annotation name=\"d\" value=\"x\"/>\n    <property name=\"Name\" type=\"s\" access=\"read\">\n      <annotation name=\"d\" value=\"n\"/>\n    </property>\n    <method name=\"Start\">\n    </method>\n    <property name=\"Id\" type=\"s\" access=\"read\"/>\n  </interface>\n  <interface name=\"x.Other\">\n    <property name=\"Name\" type=\"s\" access=\"read\"/>\n  </interface>\n</node>\n";
        assert_eq!(name_first(xml), want);
        // Nothing to move: unchanged.
        assert_eq!(name_first("<node>\n</node>\n"), "<node>\n</node>\n");
    }
}
