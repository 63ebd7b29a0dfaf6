//! The interface XML in `dbus-interfaces/` is the API contract: this test compares it,
//! member by member, with what the live service answers to `Introspect`.
//!
//! After an intended API change, regenerate the files with
//! `MAQET_BLESS_INTERFACES=1 cargo test --test e2e_interfaces` and review the diff.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::{Bus, tiny_vm_yaml};
use maqet::client::{SnapshotsProxy, proxy_at};
use zbus::fdo::IntrospectableProxy;

/// (object path, interface) pairs whose XML is part of the contract.
fn contract(vm_path: &str, job_path: &str) -> Vec<(String, &'static str)> {
    vec![
        ("/org/maqet/Maqet1".into(), "org.maqet.Maqet1.Manager"),
        ("/org/maqet/Maqet1".into(), "org.maqet.Maqet1.Images"),
        (vm_path.into(), "org.maqet.Maqet1.VM"),
        (vm_path.into(), "org.maqet.Maqet1.QMP"),
        (vm_path.into(), "org.maqet.Maqet1.Snapshots"),
        (vm_path.into(), "org.maqet.Maqet1.Storage"),
        (vm_path.into(), "org.maqet.Maqet1.Guest"),
        (job_path.into(), "org.maqet.Maqet1.Job"),
        // The desktop shells' launchers (maqet implements the shells' interfaces).
        (
            "/org/maqet/Maqet1/SearchProvider".into(),
            "org.gnome.Shell.SearchProvider2",
        ),
        ("/org/maqet/Maqet1/krunner".into(), "org.kde.krunner1"),
    ]
}

fn parse(xml: &str) -> roxmltree::Document<'_> {
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(xml, opts).expect("valid introspection XML")
}

/// A comparable description of one interface: every member with its arguments,
/// property types and access, and annotations (the documentation annotations too).
fn members(xml: &str, iface: &str) -> BTreeSet<String> {
    let doc = parse(xml);
    let node = doc
        .descendants()
        .find(|n| n.has_tag_name("interface") && n.attribute("name") == Some(iface))
        .unwrap_or_else(|| panic!("interface {iface} missing"));
    let mut out = BTreeSet::new();
    for m in node.children().filter(|n| n.is_element()) {
        let name = m.attribute("name").unwrap_or("");
        let mut desc = format!("{} {name}", m.tag_name().name());
        for a in ["type", "access", "value"] {
            if let Some(v) = m.attribute(a) {
                desc.push_str(&format!(" {a}={v}"));
            }
        }
        for c in m.children().filter(|n| n.is_element()) {
            desc.push_str(&format!(
                " [{} {} {} {} {}]",
                c.tag_name().name(),
                c.attribute("name").unwrap_or("-"),
                c.attribute("type").unwrap_or("-"),
                c.attribute("direction").unwrap_or("-"),
                c.attribute("value").unwrap_or("-"),
            ));
        }
        out.insert(desc);
    }
    out
}

/// The `<interface>` element as the service prints it (with its doc comments).
fn interface_text(xml: &str, iface: &str) -> String {
    let doc = parse(xml);
    let node = doc
        .descendants()
        .find(|n| n.has_tag_name("interface") && n.attribute("name") == Some(iface))
        .unwrap();
    format!(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n  {}\n</node>\n",
        &xml[node.range()]
    )
}

/// The interface and its members that lack an `org.gtk.GDBus.DocString` or its short form.
fn undocumented(xml: &str, iface: &str) -> Vec<String> {
    let doc = parse(xml);
    let node = doc
        .descendants()
        .find(|n| n.has_tag_name("interface") && n.attribute("name") == Some(iface))
        .unwrap();
    let documented = |n: roxmltree::Node<'_, '_>| {
        ["org.gtk.GDBus.DocString", "org.gtk.GDBus.DocString.Short"]
            .iter()
            .all(|name| {
                n.children().any(|c| {
                    c.has_tag_name("annotation")
                        && c.attribute("name") == Some(name)
                        && c.attribute("value").is_some_and(|v| !v.trim().is_empty())
                })
            })
    };
    std::iter::once(node)
        .chain(node.children().filter(|c| {
            c.has_tag_name("method") || c.has_tag_name("property") || c.has_tag_name("signal")
        }))
        .filter(|n| !documented(*n))
        .map(|n| {
            format!(
                "{} {}",
                n.tag_name().name(),
                n.attribute("name").unwrap_or("")
            )
        })
        .collect()
}

/// The first member (method, property or signal) of an interface, as "tag name".
fn first_member(xml: &str, iface: &str) -> String {
    let doc = parse(xml);
    let node = doc
        .descendants()
        .find(|n| n.has_tag_name("interface") && n.attribute("name") == Some(iface))
        .unwrap();
    node.children()
        .find(|c| c.is_element() && !c.has_tag_name("annotation"))
        .map(|c| {
            format!(
                "{} {}",
                c.tag_name().name(),
                c.attribute("name").unwrap_or("")
            )
        })
        .unwrap_or_default()
}

fn contract_file(iface: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("dbus-interfaces")
        .join(format!("{iface}.xml"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_introspection_matches_the_interface_files() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    // A VM with a disk, so a snapshot job (and its object) exists.
    let disk = bus.root().join("xml.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "1M"])
        .status()
        .unwrap();
    assert!(made.success());
    let yaml = format!(
        "{}storage:\n  - {{type: qcow2, file: '{}'}}\n",
        tiny_vm_yaml("xml"),
        disk.display()
    );
    let vm = bus.add(&conn, "", &yaml).await;
    let vm_path = vm.inner().path().to_string();
    let snapshots: SnapshotsProxy = proxy_at(&conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    let job_path = snapshots
        .create("xml", std::collections::HashMap::new())
        .await
        .unwrap()
        .to_string();
    let bless = std::env::var_os("MAQET_BLESS_INTERFACES").is_some();
    for (path, iface) in contract(&vm_path, &job_path) {
        let live = IntrospectableProxy::builder(&conn)
            .destination("org.maqet.Maqet1")
            .path(path.as_str())
            .build()
            .await
            .unwrap()
            .introspect()
            .await
            .unwrap();
        if iface.starts_with("org.maqet.") {
            let bare = undocumented(&live, iface);
            assert!(
                bare.is_empty(),
                "{iface}: undocumented (add a doc comment): {bare:#?}"
            );
        }
        let file = contract_file(iface);
        if bless {
            std::fs::write(&file, interface_text(&live, iface)).unwrap();
            continue;
        }
        let written =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if iface == "org.maqet.Maqet1.VM" {
            // Paths are UUIDs: D-Feet and gdbus show the name first, in both.
            assert_eq!(first_member(&live, iface), "property Name", "{live}");
            assert_eq!(first_member(&written, iface), "property Name");
        }
        let (want, got) = (members(&written, iface), members(&live, iface));
        let missing: Vec<_> = want.difference(&got).collect();
        let extra: Vec<_> = got.difference(&want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{iface} drifted from {}:\n in the file, not served: {missing:#?}\n served, not in the file: {extra:#?}",
            file.display()
        );
    }
}

/// What D-Bus tools rely on: gdbus shows the documentation, the root's answer does not
/// grow with the VMs, `Properties.Get` with an empty interface name (qdbus) answers, and
/// setting a read-only property is `PropertyReadOnly`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_see_documentation_and_standard_property_answers() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let introspect = async |path: &str| {
        IntrospectableProxy::builder(&conn)
            .destination("org.maqet.Maqet1")
            .path(path)
            .build()
            .await
            .unwrap()
            .introspect()
            .await
            .unwrap()
    };
    let first = bus.add(&conn, "", &tiny_vm_yaml("doc-a")).await;
    let root_one = introspect("/").await;
    let vms_one = introspect("/org/maqet/Maqet1/vm").await;
    for n in ["doc-b", "doc-c"] {
        bus.add(&conn, "", &tiny_vm_yaml(n)).await;
    }
    let root_three = introspect("/").await;
    let vms_three = introspect("/org/maqet/Maqet1/vm").await;
    assert_eq!(root_one, root_three, "the root's answer does not list VMs");
    assert!(!vms_three.contains("org.maqet.Maqet1.VM"), "{vms_three}");
    assert_eq!(
        vms_three.matches("<node name=").count(),
        vms_one.matches("<node name=").count() + 2
    );
    let manager = introspect("/org/maqet/Maqet1").await;
    for child in ["vm", "job", "SearchProvider", "krunner"] {
        assert!(
            manager.contains(&format!("<node name=\"{child}\"/>")),
            "{manager}"
        );
    }

    // gdbus (as D-Spy, which uses GDBus) reads the annotations of the live service.
    let path = first.inner().path().to_string();
    let out = bus
        .gdbus()
        .args([
            "introspect",
            "--address",
            &bus.address,
            "--dest",
            "org.maqet.Maqet1",
        ])
        .args(["--object-path", &path])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    assert!(
        text.contains("@org.gtk.GDBus.DocString.Short(\"The VM's name"),
        "{text}"
    );
    assert!(text.contains("readonly s Name"), "{text}");

    // Properties.Get("", "Name"), as qdbus sends it.
    let props = zbus::fdo::PropertiesProxy::builder(&conn)
        .destination("org.maqet.Maqet1")
        .path(path.as_str())
        .build()
        .await
        .unwrap();
    let reply = conn
        .call_method(
            Some("org.maqet.Maqet1"),
            path.as_str(),
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &("", "Name"),
        )
        .await
        .expect("Get with an empty interface name");
    let name: zbus::OwnedVariant = reply.body().deserialize().unwrap();
    assert_eq!(String::try_from(name).unwrap(), "doc-a");
    let reply = conn
        .call_method(
            Some("org.maqet.Maqet1"),
            path.as_str(),
            Some("org.freedesktop.DBus.Properties"),
            "GetAll",
            &(""),
        )
        .await
        .unwrap();
    let all: std::collections::HashMap<String, zbus::OwnedVariant> =
        reply.body().deserialize().unwrap();
    assert!(
        all.contains_key("Name") && all.contains_key("GuestAgent"),
        "{all:?}"
    );
    let err = conn
        .call_method(
            Some("org.maqet.Maqet1"),
            path.as_str(),
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &("", "NoSuchThing"),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UnknownProperty"), "{err}");

    // Setting a read-only property, with or without the interface's name.
    for iface in ["org.maqet.Maqet1.VM", ""] {
        let value = zbus::Variant::from("renamed");
        let err = conn
            .call_method(
                Some("org.maqet.Maqet1"),
                path.as_str(),
                Some("org.freedesktop.DBus.Properties"),
                "Set",
                &(iface, "Name", value),
            )
            .await
            .unwrap_err();
        // zbus maps the standard error names to `fdo::Error`, whose text starts with it.
        assert!(
            err.to_string()
                .starts_with("org.freedesktop.DBus.Error.PropertyReadOnly: property 'Name'"),
            "{err}"
        );
    }
    let out = bus.busctl(&[
        "set-property",
        "org.maqet.Maqet1",
        &path,
        "org.maqet.Maqet1.VM",
        "Status",
        "s",
        "running",
    ]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("read-only"),
        "{}",
        common::stderr(&out)
    );
    // The typed Get still goes through the gate and answers.
    let status = props
        .get(
            zbus::names::InterfaceName::from_static_str_unchecked("org.maqet.Maqet1.VM"),
            "Status",
        )
        .await
        .unwrap();
    assert_eq!(String::try_from(status).unwrap(), "created");
    assert_eq!(first.name().await.unwrap(), "doc-a");
}
