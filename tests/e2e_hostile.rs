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
}

fn mkfifo(path: &std::path::Path) {
    rustix::fs::mkfifoat(rustix::fs::CWD, path, rustix::fs::Mode::from(0o600)).unwrap();
}

fn assert_kind(e: &maqet::error::MaqetError, kind: &str, needle: &str) {
    assert_eq!(
        error_name(e),
        format!("org.maqet.Maqet1.Error.{kind}"),
        "{e}"
    );
    assert!(e.to_string().contains(needle), "{needle:?} not in: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_never_end_or_never_answer_are_refused() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let dir = bus.root().join("configs");
    std::fs::create_dir(&dir).unwrap();
    let (fifo1, fifo2) = (dir.join("fifo1"), dir.join("fifo2"));
    mkfifo(&fifo1);
    mkfifo(&fifo2);
    let big = dir.join("big.yaml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(2 << 20))).unwrap();

    let by_path = |p: String| {
        let manager = manager.clone();
        async move { manager.add_vm_from_files("", &[p.as_str()]).await }
    };
    let e = by_path("/dev/zero".into()).await.unwrap_err();
    assert_kind(&e, "InvalidArgument", "character device");
    let e = by_path(dir.display().to_string()).await.unwrap_err();
    assert_kind(&e, "InvalidArgument", "directory");
    let e = by_path(big.display().to_string()).await.unwrap_err();
    assert_kind(&e, "InvalidArgument", "1 MiB");

    // Two FIFOs at once, and the service answers a property read meanwhile.
    let (a, b, version) = tokio::time::timeout(
        TIMEOUT,
        futures_util::future::join3(
            by_path(fifo1.display().to_string()),
            by_path(fifo2.display().to_string()),
            manager.version(),
        ),
    )
    .await
    .expect("FIFOs must not hang the service");
    assert_kind(&a.unwrap_err(), "InvalidArgument", "FIFO");
    assert_kind(&b.unwrap_err(), "InvalidArgument", "FIFO");
    assert!(!version.unwrap().is_empty());

    // The same limits for passed descriptors (a FIFO opened read-write does not block).
    let fifo = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo1)
        .unwrap();
    let e = manager
        .add_vm_from_fds("", &[zbus::Fd::from(&fifo)])
        .await
        .unwrap_err();
    assert_kind(&e, "InvalidArgument", "FIFO");
    let zero = std::fs::File::open("/dev/zero").unwrap();
    let e = manager
        .add_vm_from_fds("", &[zbus::Fd::from(&zero)])
        .await
        .unwrap_err();
    assert_kind(&e, "InvalidArgument", "character device");
    let big = std::fs::File::open(&big).unwrap();
    let e = manager
        .add_vm_from_fds("", &[zbus::Fd::from(&big)])
        .await
        .unwrap_err();
    assert_kind(&e, "InvalidArgument", "1 MiB");
    assert!(manager.list_vms().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passed_files_merge_and_resolve_relative_paths_by_their_directory() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let dir = bus.root().join("home/vms");
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.yaml");
    std::fs::write(&base, tiny_vm_yaml("fromfds")).unwrap();
    let disk = dir.join("disk.yaml");
    std::fs::write(
        &disk,
        "storage:\n  - name: hd\n    type: qcow2\n    file: hd.qcow2\n    size: 1M\n",
    )
    .unwrap();
    let files = [
        std::fs::File::open(&base).unwrap(),
        std::fs::File::open(&disk).unwrap(),
    ];
    let fds: Vec<zbus::Fd<'_>> = files.iter().map(zbus::Fd::from).collect();
    let path = manager.add_vm_from_fds("", &fds).await.unwrap();
    let vm = bus.vm(&conn, path).await;
    assert_eq!(vm.name().await.unwrap(), "fromfds");
    let config = vm.config().await.unwrap();
    assert!(
        config.contains(&dir.join("hd.qcow2").display().to_string()),
        "{config}"
    );

    // A file no path names any more: relative paths in it are refused, absolute ones work.
    let gone = dir.join("gone.yaml");
    std::fs::write(
        &gone,
        "storage:\n  - name: hd\n    type: qcow2\n    file: x.qcow2\n    size: 1M\n",
    )
    .unwrap();
    let f = std::fs::File::open(&gone).unwrap();
    std::fs::remove_file(&gone).unwrap();
    let e = manager
        .add_vm_from_fds("gone", &[zbus::Fd::from(&files[0]), zbus::Fd::from(&f)])
        .await
        .unwrap_err();
    assert_kind(&e, "InvalidConfig", "config file #2");
    assert!(e.to_string().contains("absolute path"), "{e}");

    // The CLI passes the files it opened: relative names work from its directory.
    let out = bus
        .maqet_command(&["add", "--name", "cli", "-c", "base.yaml", "-c", "disk.yaml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed = manager.list_vms().await.unwrap();
    assert!(listed.iter().any(|v| v.1 == "cli"), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_timeouts_are_capped_and_a_shorter_stop_takes_over() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    // No guest OS: nothing answers the ACPI power button, so only the timeout ends it.
    let vm = bus.add(&conn, "deaf", &tiny_vm_yaml("deaf")).await;
    vm.start().await.unwrap();

    let e = vm.stop(false, u32::MAX).await.unwrap_err();
    assert_kind(&e, "InvalidArgument", "3600");
    assert_eq!(vm.status().await.unwrap(), "running");

    let mut watch = common::StatusWatch::new(&vm).await;
    let slow = {
        let vm = vm.clone();
        tokio::spawn(async move { vm.stop(false, 3600).await })
    };
    watch.until("stopping").await;
    // The second Stop's 1 s replaces the first one's hour.
    vm.stop(false, 1).await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "stopped");
    slow.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_qmp_arguments_never_reach_qemu() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "big", &tiny_vm_yaml("big")).await;
    vm.start().await.unwrap();
    let qmp = maqet::client::qmp_proxy(&conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();

    // 20 MB of string, a 1.1M-element array, deep nesting: each refused by name.
    let string = format!(r#"{{"path": "{}"}}"#, "x".repeat(20 << 20));
    let e = qmp.execute("qom-list", &string, false).await.unwrap_err();
    assert_kind(&e, "InvalidArgument", "1 MiB");
    let array = format!(r#"{{"keys": [{}0]}}"#, "0,".repeat(1_100_000));
    let e = qmp.execute("send-key", &array, false).await.unwrap_err();
    assert_kind(&e, "InvalidArgument", "limit");
    let many = format!(r#"{{"keys": [{}0]}}"#, "0,".repeat(200_000));
    let e = qmp.execute("send-key", &many, false).await.unwrap_err();
    assert_kind(&e, "InvalidArgument", "100000 JSON values");
    let deep = format!(r#"{{"a": {}1{}}}"#, "[".repeat(40), "]".repeat(40));
    let e = qmp.execute("qom-list", &deep, false).await.unwrap_err();
    assert_kind(&e, "InvalidArgument", "32 levels");

    // The monitor is free at once, and the log holds no flood.
    let status = qmp.execute("query-status", "", false).await.unwrap();
    assert!(status.contains("running"), "{status}");
    let log = bus.root().join("state/maqet/logs");
    for entry in std::fs::read_dir(&log).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(text.lines().count() < 100, "{}", entry.path().display());
    }
}
