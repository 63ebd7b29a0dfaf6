//! Hostile input cannot take the service down (issue 11): text from QEMU, a guest or a
//! config that a D-Bus message cannot carry, oversized QMP arguments, endless stop
//! timeouts, and files that never end or never answer.

mod common;

use common::{Bus, TIMEOUT, error_name, stdout, tiny_vm_yaml};
use maqet::client::BUS_NAME;
use zbus::Connection;
use zbus::fdo::{DBusProxy, ObjectManagerProxy};
use zbus::names::BusName;

/// maqetd's pid on the bus: unchanged means it never left (activation would hide a crash).
async fn maqetd_pid(conn: &Connection) -> u32 {
    DBusProxy::new(conn)
        .await
        .unwrap()
        .get_connection_unix_process_id(BusName::try_from(BUS_NAME).unwrap())
        .await
        .unwrap()
}

/// A "QEMU" that says something no D-Bus string can hold and fails.
fn fake_qemu(bus: &Bus, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = bus.root().join("bin").join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_from_qemu_is_escaped_and_the_service_stays_up() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let binary = fake_qemu(&bus, "nul-qemu", r"printf 'x\000y\033[2J\n' >&2; exit 1");
    let vm = bus
        .add(
            &conn,
            "nul",
            &format!("name: nul\nbinary: {binary}\ndisplay: none\n"),
        )
        .await;
    let pid = maqetd_pid(&conn).await;
    let mut watch = common::StatusWatch::new(&vm).await;

    let e = vm.start().await.unwrap_err();
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.QemuFailed", "{e}");
    assert!(e.to_string().contains(r"x\0y\x1b[2J"), "{e}");
    let (_, _, reason) = watch.until("failed").await;
    assert!(reason.contains(r"x\0y"), "{reason}");

    // The service is the same process and every reader still works.
    assert_eq!(maqetd_pid(&conn).await, pid);
    assert!(vm.status_reason().await.unwrap().contains(r"x\0y"));
    assert_eq!(manager.list_vms().await.unwrap().len(), 1);
    let om = ObjectManagerProxy::builder(&conn)
        .destination(BUS_NAME)
        .path("/org/maqet/Maqet1")
        .build()
        .await
        .unwrap();
    let objects = om.get_managed_objects().await.unwrap();
    assert!(format!("{objects:?}").contains(r"x\\0y"));
    let history = vm.history(0, 0).await.unwrap();
    assert!(history.iter().any(|h| h.4.contains(r"x\0y")), "{history:?}");
    let ls = bus.maqet(&["ls"]);
    assert!(ls.status.success(), "{ls:?}");
    let audit = bus.maqet(&["audit", "--json"]);
    assert!(audit.status.success(), "{audit:?}");
    assert!(stdout(&audit).contains(r"x\\0y"), "{}", stdout(&audit));
    assert_eq!(maqetd_pid(&conn).await, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_a_config_is_refused() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let e = manager
        .add_vm("", "name: \"a\\0b\"\ndisplay: none\n")
        .await
        .unwrap_err();
    assert_eq!(
        error_name(&e),
        "org.maqet.Maqet1.Error.InvalidConfig",
        "{e}"
    );
    assert!(e.to_string().contains("NUL"), "{e}");
    // A raw NUL in a file is refused too, not taken for the end of the text.
    let file = bus.root().join("nul.yaml");
    std::fs::write(&file, "display: none\0\nmemory: 64\n").unwrap();
    let e = manager
        .add_vm_from_files("", &[file.to_str().unwrap()])
        .await
        .unwrap_err();
    assert_eq!(
        error_name(&e),
        "org.maqet.Maqet1.Error.InvalidConfig",
        "{e}"
    );
    assert!(manager.list_vms().await.unwrap().is_empty());
    let _ = tiny_vm_yaml;
    let _ = TIMEOUT;
}
