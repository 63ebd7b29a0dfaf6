//! Bad input gets a typed error that says what to do, and changes nothing.

mod common;

use common::{Bus, error_name, tiny_vm_yaml};
use maqet::error::MaqetError;

async fn vm_count(bus: &Bus, conn: &zbus::Connection) -> usize {
    bus.manager(conn).await.list_vms().await.unwrap().len()
}

fn assert_error(e: &MaqetError, kind: &str, needles: &[&str]) {
    assert_eq!(
        error_name(e),
        format!("org.maqet.Maqet1.Error.{kind}"),
        "{e}"
    );
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "{n:?} not in: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_refused_with_locations() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;

    let e = manager.add_vm("x", "name: [unclosed\n").await.unwrap_err();
    assert_error(&e, "InvalidConfig", &["<yaml>:"]);

    let e = manager.add_vm("x", "memroy: 64\n").await.unwrap_err();
    assert_error(
        &e,
        "InvalidConfig",
        &["<yaml>:1:1", "memroy", "did you mean `memory`"],
    );

    let e = manager
        .add_vm("x", "memory: 64\narguments:\n  - m: 128\n")
        .await
        .unwrap_err();
    assert_error(&e, "InvalidConfig", &["<yaml>:3:5", "-m"]);

    let e = manager
        .add_vm("x", "binary: qemu-system-nonexistent\n")
        .await
        .unwrap_err();
    assert_error(&e, "InvalidConfig", &["qemu-system-nonexistent"]);

    let e = manager
        .add_vm("x", "arguments: [daemonize]\n")
        .await
        .unwrap_err();
    assert_error(&e, "InvalidConfig", &["daemonize"]);

    let e = manager
        .add_vm("bad name!", &tiny_vm_yaml("ok"))
        .await
        .unwrap_err();
    assert_error(&e, "InvalidArgument", &["bad name!"]);

    // Files: relative paths are refused (the service cannot know the caller's cwd),
    // unreadable files say so, and errors name the file.
    let e = manager
        .add_vm_from_files("x", &["relative.yaml"])
        .await
        .unwrap_err();
    assert_error(&e, "InvalidArgument", &["relative"]);
    let e = manager
        .add_vm_from_files("x", &["/nonexistent/vm.yaml"])
        .await
        .unwrap_err();
    assert_error(&e, "InvalidArgument", &["/nonexistent/vm.yaml"]);
    let f = bus.root().join("two.yaml");
    std::fs::write(&f, "display: none\ncpu: zero\n").unwrap();
    let e = manager
        .add_vm_from_files("x", &[f.to_str().unwrap()])
        .await
        .unwrap_err();
    assert_error(&e, "InvalidConfig", &["two.yaml:2:6"]);

    assert_eq!(vm_count(&bus, &conn).await, 0, "nothing was defined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_unique_and_unknown_vms_are_not_found() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("one")).await;
    let e = manager.add_vm("one", &tiny_vm_yaml("x")).await.unwrap_err();
    assert_error(&e, "AlreadyExists", &["one"]);
    // Renaming onto a taken name is refused too, and changes nothing.
    bus.add(&conn, "", &tiny_vm_yaml("two")).await;
    let e = vm.apply(&tiny_vm_yaml("two")).await.unwrap_err();
    assert_error(&e, "AlreadyExists", &["two"]);
    assert_eq!(vm.name().await.unwrap(), "one");

    for call in [
        manager.find_vm("ghost").await.map(|_| ()),
        manager.remove_vm("ghost", true, false).await,
    ] {
        assert_error(&call.unwrap_err(), "NotFound", &["ghost", "maqet ls"]);
    }
    // A VM is found by name, and by id in either spelling.
    let id = vm.id().await.unwrap();
    let by_id = manager.find_vm(&id).await.unwrap();
    assert_eq!(by_id, manager.find_vm(&id.replace('-', "_")).await.unwrap());
    assert_eq!(by_id, manager.find_vm("one").await.unwrap());
    assert_eq!(vm_count(&bus, &conn).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_refusing_an_option_fails_the_vm_with_qemus_words() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let yaml = format!(
        "{}  - device: {{no-such-device: null}}\n",
        tiny_vm_yaml("broken")
    );
    let vm = bus.add(&conn, "", &yaml).await;
    let mut watch = common::StatusWatch::new(&vm).await;
    let e = vm.start().await.unwrap_err();
    assert_error(
        &e,
        "QemuFailed",
        &["no-such-device", "exited with status 1"],
    );
    let (_, prev, reason) = watch.until("failed").await;
    assert_eq!(prev, "starting");
    assert!(reason.contains("no-such-device"), "{reason}");
    assert_eq!(vm.status().await.unwrap(), "failed");
    assert_eq!(vm.exit_status().await.unwrap(), 1);
    assert_eq!(vm.pid().await.unwrap(), 0);
    assert!(bus.marked_processes("qemu-system").is_empty());
    // The full log is kept for the user.
    let log_dir = bus.root().join("state/maqet/logs");
    let log = std::fs::read_dir(&log_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(
        std::fs::read_to_string(log)
            .unwrap()
            .contains("no-such-device")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_binary_fails_the_start_clearly() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    // A copy of QEMU we can make vanish after the VM was defined.
    let bin = bus.root().join("qemu-copy");
    std::fs::copy(
        which("qemu-system-x86_64").expect("qemu-system-x86_64 on PATH"),
        &bin,
    )
    .unwrap();
    let yaml = tiny_vm_yaml("gone").replace(
        "binary: qemu-system-x86_64",
        &format!("binary: {}", bin.display()),
    );
    let vm = bus.add(&conn, "", &yaml).await;
    std::fs::remove_file(&bin).unwrap();
    let e = vm.start().await.unwrap_err();
    assert_error(&e, "QemuFailed", &["qemu-copy"]);
    assert_eq!(vm.status().await.unwrap(), "failed");
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}
