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
/// property types and access, and annotations; documentation comments are ignored.
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
        let file = contract_file(iface);
        if bless {
            std::fs::write(&file, interface_text(&live, iface)).unwrap();
            continue;
        }
        let written =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
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
