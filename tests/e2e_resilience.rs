//! VMs outlive maqetd: killed, the service is re-activated by the next call and takes
//! its VMs back; a VM that died meanwhile is reported honestly.

mod common;

use common::{Bus, StatusWatch, tiny_vm_yaml};
use futures_util::StreamExt;

fn kill(pid: u32) {
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_survive_a_killed_maqetd_and_are_readopted() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let a = bus.add(&conn, "", &tiny_vm_yaml("alpha")).await;
    let b = bus.add(&conn, "", &tiny_vm_yaml("beta")).await;
    a.start().await.unwrap();
    b.start().await.unwrap();
    let (pa, pb) = (a.pid().await.unwrap(), b.pid().await.unwrap());

    let daemons = bus.marked_processes("maqetd");
    assert_eq!(daemons.len(), 1);
    let manager = bus.manager(&conn).await;
    let mut owner_changes = zbus::fdo::DBusProxy::new(&conn)
        .await
        .unwrap()
        .receive_name_owner_changed_with_args(&[(0, "org.maqet.Maqet1")])
        .await
        .unwrap();
    kill(daemons[0]);
    common::process_gone(daemons[0]).await;
    // The bus saw the name go: the service is really down now.
    tokio::time::timeout(common::TIMEOUT, owner_changes.next())
        .await
        .unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pa}")).exists());
    assert!(std::path::Path::new(&format!("/proc/{pb}")).exists());
    // While maqetd is down, beta's QEMU dies.
    kill(pb);
    common::process_gone(pb).await;

    // The next call activates a new maqetd, which re-adopts alpha and buries beta.
    let list = manager.list_vms().await.unwrap();
    let status = |n: &str| list.iter().find(|v| v.1 == n).unwrap().3.clone();
    assert_eq!(status("alpha"), "running");
    assert_eq!(status("beta"), "crashed");
    assert_ne!(bus.marked_processes("maqetd"), daemons);
    assert_eq!(a.pid().await.unwrap(), pa, "same QEMU, not a new one");
    let reason = b.status_reason().await.unwrap();
    assert!(reason.contains("while maqetd was not running"), "{reason}");
    assert_eq!(b.pid().await.unwrap(), 0);

    // The re-adopted VM is fully managed: QMP works and stop works.
    let mut watch = StatusWatch::new(&a).await;
    a.pause().await.unwrap();
    watch.until("paused").await;
    a.resume().await.unwrap();
    a.stop(true, 0).await.unwrap();
    watch.until("stopped").await;
    common::process_gone(pa).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_manager_lists_and_announces_vms() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let om = zbus::fdo::ObjectManagerProxy::builder(&conn)
        .destination("org.maqet.Maqet1")
        .path("/org/maqet/Maqet1")
        .build()
        .await
        .unwrap();
    assert!(om.get_managed_objects().await.unwrap().is_empty());
    let mut added = om.receive_interfaces_added().await.unwrap();
    let mut removed = om.receive_interfaces_removed().await.unwrap();
    let vm = bus.add(&conn, "", &tiny_vm_yaml("om")).await;
    let sig = tokio::time::timeout(common::TIMEOUT, added.next())
        .await
        .unwrap()
        .unwrap();
    let args = sig.args().unwrap();
    assert_eq!(args.object_path().as_str(), vm.inner().path().as_str());
    let props = &args.interfaces_and_properties()["org.maqet.Maqet1.VM"];
    assert_eq!(
        String::try_from(props["Name"].try_clone().unwrap()).unwrap(),
        "om"
    );
    let objects = om.get_managed_objects().await.unwrap();
    let vm_props = &objects[vm.inner().path()]["org.maqet.Maqet1.VM"];
    assert_eq!(
        String::try_from(vm_props["Status"].try_clone().unwrap()).unwrap(),
        "created"
    );
    bus.manager(&conn)
        .await
        .remove_vm("om", false, false)
        .await
        .unwrap();
    let sig = tokio::time::timeout(common::TIMEOUT, removed.next())
        .await
        .unwrap()
        .unwrap();
    let args = sig.args().unwrap();
    assert!(
        args.interfaces()
            .iter()
            .any(|i| i.as_str() == "org.maqet.Maqet1.VM")
    );
    assert!(om.get_managed_objects().await.unwrap().is_empty());
}

/// Resolves when maqetd gives up its name on the bus.
async fn name_lost(
    conn: &zbus::Connection,
) -> impl futures_util::Stream<Item = zbus::fdo::NameOwnerChanged> + use<> {
    zbus::fdo::DBusProxy::new(conn)
        .await
        .unwrap()
        .receive_name_owner_changed_with_args(&[(0, "org.maqet.Maqet1"), (2, "")])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_maqetd_exits_and_comes_back_with_everything() {
    let bus = Bus::start_with_settings("idle_exit_sec: 1\n");
    let conn = bus.conn().await;
    let mut lost = name_lost(&conn).await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("sleeper")).await;
    vm.start().await.unwrap();
    let pid = vm.pid().await.unwrap();
    // With a VM running maqetd stays, however long it is idle (3 idle periods here).
    let early = tokio::time::timeout(std::time::Duration::from_secs(3), lost.next()).await;
    assert!(early.is_err(), "maqetd left while a VM was running");
    vm.stop(true, 0).await.unwrap();
    let daemons = bus.marked_processes("maqetd");
    // No VM, no calls: it leaves within about a second.
    tokio::time::timeout(common::TIMEOUT, lost.next())
        .await
        .expect("maqetd did not exit when idle");
    common::process_gone(daemons[0]).await;
    // The next call brings it back with the VM, its state and its history.
    assert_eq!(vm.status().await.unwrap(), "stopped");
    assert_eq!(vm.name().await.unwrap(), "sleeper");
    assert_ne!(bus.marked_processes("maqetd"), daemons);
    let db = rusqlite::Connection::open(bus.database()).unwrap();
    let history: Vec<String> = db
        .prepare("SELECT status FROM events WHERE kind = 'status' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        history.ends_with(&["stopping".to_string(), "stopped".to_string()]),
        "{history:?}"
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_vms_running_and_they_are_readopted() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("steady")).await;
    vm.start().await.unwrap();
    let pid = vm.pid().await.unwrap();
    let daemon = bus.marked_processes("maqetd")[0];
    unsafe { libc::kill(daemon as i32, libc::SIGTERM) };
    common::process_gone(daemon).await;
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(vm.status().await.unwrap(), "running");
    assert_eq!(vm.pid().await.unwrap(), pid);
    vm.stop(true, 0).await.unwrap();
}

/// A QEMU "binary" that waits for the test before becoming QEMU (same pid: exec).
fn gated_qemu(bus: &Bus) -> (std::path::PathBuf, std::path::PathBuf) {
    let fifo = bus.root().join("gate");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let script = bus.root().join("gated-qemu");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nread _ < {}\nexec qemu-system-x86_64 \"$@\"\n",
            fifo.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, fifo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_leaves_no_orphan_and_no_ghost() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (script, fifo) = gated_qemu(&bus);
    let yaml = tiny_vm_yaml("interrupted").replace(
        "binary: qemu-system-x86_64",
        &format!("binary: {}", script.display()),
    );
    let vm = bus.add(&conn, "", &yaml).await;
    let props = zbus::fdo::PropertiesProxy::builder(&conn)
        .destination("org.maqet.Maqet1")
        .path(vm.inner().path().clone())
        .build()
        .await
        .unwrap();
    let mut changes = props.receive_properties_changed().await.unwrap();
    let starter = {
        let vm = vm.clone();
        tokio::spawn(async move { vm.start().await })
    };
    // The pid is recorded (and announced) before maqetd waits for QEMU's monitor.
    let pid = loop {
        let sig = tokio::time::timeout(common::TIMEOUT, changes.next())
            .await
            .unwrap()
            .unwrap();
        let args = sig.args().unwrap();
        if let Some(p) = args.changed_properties().get("Pid") {
            let p: u32 = p.try_into().unwrap();
            if p != 0 {
                break p;
            }
        }
    };
    let daemon = bus.marked_processes("maqetd")[0];
    unsafe { libc::kill(daemon as i32, libc::SIGTERM) };
    common::process_gone(daemon).await;
    assert!(starter.await.unwrap().is_err(), "the start was cut off");
    // Let the gated QEMU go on: it was spawned, so it must not be lost.
    std::fs::write(&fifo, "go\n").unwrap();
    // The next call re-activates maqetd, which takes the QEMU back.
    vm.wait("status=running", 30).await.unwrap();
    assert_eq!(vm.pid().await.unwrap(), pid);
    assert_eq!(bus.marked_processes("qemu-system").len(), 1);
    vm.stop(true, 0).await.unwrap();
    common::process_gone(pid).await;
    assert!(bus.marked_processes("qemu-system").is_empty());
}

fn checksum(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_is_refused_and_left_untouched() {
    let bus = Bus::start();
    let db = bus.database();
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&db, &garbage).unwrap();
    let before = checksum(&db);
    let conn = bus.conn().await;
    let e = bus.manager(&conn).await.list_vms().await.unwrap_err();
    assert_eq!(common::error_name(&e), "org.maqet.Maqet1.Error.Storage");
    let msg = e.to_string();
    assert!(msg.contains(db.to_str().unwrap()), "{msg}");
    let out = bus.maqet(&["ls"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        common::stderr(&out).contains("maqet.db"),
        "{}",
        common::stderr(&out)
    );
    let e = bus
        .manager(&conn)
        .await
        .add_vm("", &tiny_vm_yaml("x"))
        .await
        .unwrap_err();
    assert_eq!(common::error_name(&e), "org.maqet.Maqet1.Error.Storage");
    assert_eq!(checksum(&db), before, "the database file was modified");
    let siblings: Vec<_> = std::fs::read_dir(db.parent().unwrap()).unwrap().collect();
    assert_eq!(siblings.len(), 1, "no -wal/-shm or replacement left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_gives_a_clear_error_after_a_bounded_wait() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    bus.add(&conn, "", &tiny_vm_yaml("first")).await;
    let db = rusqlite::Connection::open(bus.database()).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let t = std::time::Instant::now();
    let e = bus
        .manager(&conn)
        .await
        .add_vm("", &tiny_vm_yaml("second"))
        .await
        .unwrap_err();
    assert_eq!(common::error_name(&e), "org.maqet.Maqet1.Error.Storage");
    assert!(e.to_string().contains("locked"), "{e}");
    assert!(t.elapsed() < std::time::Duration::from_secs(20));
    db.execute_batch("ROLLBACK").unwrap();
    bus.add(&conn, "", &tiny_vm_yaml("second")).await;
    assert_eq!(bus.manager(&conn).await.list_vms().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_different_vms_run_in_parallel() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (script, fifo) = gated_qemu(&bus);
    let slow_yaml = tiny_vm_yaml("slow").replace(
        "binary: qemu-system-x86_64",
        &format!("binary: {}", script.display()),
    );
    let slow = bus.add(&conn, "", &slow_yaml).await;
    let quick = bus.add(&conn, "", &tiny_vm_yaml("quick")).await;
    let mut watch = StatusWatch::new(&slow).await;
    let blocked = {
        let slow = slow.clone();
        tokio::spawn(async move { slow.start().await })
    };
    watch.until("starting").await;
    // slow's start is held inside QEMU's launch; quick's start does not wait for it.
    quick.start().await.unwrap();
    assert_eq!(quick.status().await.unwrap(), "running");
    assert_eq!(slow.status().await.unwrap(), "starting");
    std::fs::write(&fifo, "go\n").unwrap();
    blocked.await.unwrap().unwrap();
    assert_eq!(slow.status().await.unwrap(), "running");
    quick.stop(true, 0).await.unwrap();
    slow.stop(true, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_directory_removed_under_a_running_service() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let a = bus.add(&conn, "", &tiny_vm_yaml("before")).await;
    a.start().await.unwrap();
    std::fs::remove_dir_all(bus.root().join("run/maqet")).unwrap();
    // The running VM's monitor connection does not need the path: still fully managed.
    let mut watch = StatusWatch::new(&a).await;
    a.pause().await.unwrap();
    watch.until("paused").await;
    a.resume().await.unwrap();
    // A new start recreates the directory, private again.
    let b = bus.add(&conn, "", &tiny_vm_yaml("after")).await;
    b.start().await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(bus.root().join("run/maqet"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    a.stop(true, 0).await.unwrap();
    b.stop(true, 0).await.unwrap();
    assert_eq!(a.status().await.unwrap(), "stopped");
}

#[test]
fn the_systemd_unit_keeps_vms_alive_across_service_restarts() {
    // What can be checked without systemd: the unit stops only maqetd's own process,
    // never the QEMU processes in its cgroup (docs/architecture.md).
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/maqetd.service"
    ))
    .unwrap();
    let line = |key: &str| {
        unit.lines()
            .find(|l| l.starts_with(&format!("{key}=")))
            .map(|l| l.split_once('=').unwrap().1.trim().to_string())
    };
    assert_eq!(line("KillMode").as_deref(), Some("process"));
    assert_eq!(line("Type").as_deref(), Some("dbus"));
    assert_eq!(line("BusName").as_deref(), Some("org.maqet.Maqet1"));
}
