//! End-to-end: the VM lifecycle through the zbus proxies, with real QEMU on a private,
//! D-Bus-activating session bus.

mod common;

use std::time::Instant;

use common::guest::{self, Behaviour};
use common::{Bus, StatusWatch, TIMEOUT, error_name, tiny_vm_yaml};
use futures_util::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_with_signals_and_properties() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let mut added = manager.receive_vm_added().await.unwrap();
    let mut removed = manager.receive_vm_removed().await.unwrap();

    let vm = bus.add(&conn, "", &tiny_vm_yaml("web")).await;
    let sig = tokio::time::timeout(TIMEOUT, added.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*sig.args().unwrap().name(), "web");
    assert_eq!(vm.name().await.unwrap(), "web");
    assert_eq!(vm.status().await.unwrap(), "created");
    assert_eq!(vm.pid().await.unwrap(), 0);
    assert!(vm.created_at().await.unwrap() > 0);
    assert_eq!(vm.started_at().await.unwrap(), 0);
    // ListVMs' body is kept between calls: a status change must show in the next one.
    let listed_status = async || manager.list_vms().await.unwrap()[0].3.clone();
    assert_eq!(listed_status().await, "created");

    let mut watch = StatusWatch::new(&vm).await;
    vm.start().await.unwrap();
    let (_, prev, _) = watch.until("starting").await;
    assert_eq!(prev, "created");
    watch.until("running").await;
    assert_eq!(vm.status().await.unwrap(), "running");
    assert_eq!(listed_status().await, "running");
    let pid = vm.pid().await.unwrap();
    assert!(pid > 0);
    // The process is QEMU and carries the VM's identity.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let id = vm.id().await.unwrap();
    assert!(
        args.windows(2)
            .any(|w| w[0] == b"-uuid" && w[1] == id.as_bytes())
    );
    // ...in a session of its own, so it outlives maqetd.
    let sid = unsafe { libc::getsid(pid as i32) };
    assert_eq!(sid, pid as i32, "QEMU must lead its own session");

    // Illegal calls are refused with InvalidState, never silently ignored.
    let err = vm.start().await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidState");
    assert!(err.to_string().contains("already running"), "{err}");
    let err = vm.resume().await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidState");
    let err = manager.remove_vm("web", false, false).await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidState");

    vm.pause().await.unwrap();
    watch.until("paused").await;
    assert_eq!(vm.status().await.unwrap(), "paused");
    vm.resume().await.unwrap();
    watch.until("running").await;

    vm.reset().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "running");
    assert_eq!(vm.pid().await.unwrap(), pid, "reset keeps the process");

    vm.stop(true, 0).await.unwrap();
    watch.until("stopping").await;
    let (_, _, reason) = watch.until("stopped").await;
    assert!(reason.contains("quit"), "{reason}");
    assert_eq!(vm.pid().await.unwrap(), 0);
    assert_eq!(vm.exit_status().await.unwrap(), 0);
    assert!(vm.stopped_at().await.unwrap() >= vm.started_at().await.unwrap());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
            // A zombie would mean nobody reaped it.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            !stat.contains(") Z ")
        }
    );

    manager.remove_vm("web", false, false).await.unwrap();
    let sig = tokio::time::timeout(TIMEOUT, removed.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*sig.args().unwrap().name(), "web");
    let err = manager.find_vm("web").await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.NotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_powers_down_an_acpi_aware_guest() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let image = guest::write_image(bus.root(), Behaviour::AcpiAware);
    let vm = bus.add(&conn, "", &guest::vm_yaml("acpi", &image)).await;
    let mut watch = StatusWatch::new(&vm).await;
    vm.start().await.unwrap();
    // The guest announces it is up (and listening for the power button) with RTC_CHANGE.
    vm.wait("event=RTC_CHANGE", 60).await.unwrap();
    vm.stop(false, 30).await.unwrap();
    let (_, _, reason) = watch.until("stopped").await;
    assert_eq!(reason, "guest powered off after an ACPI power-down request");
    assert_eq!(vm.exit_status().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_powers_off_is_stopped_not_crashed() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let image = guest::write_image(bus.root(), Behaviour::PowerOffAtOnce);
    let vm = bus.add(&conn, "", &guest::vm_yaml("short", &image)).await;
    let mut watch = StatusWatch::new(&vm).await;
    vm.start().await.unwrap();
    let (_, prev, reason) = watch.until("stopped").await;
    assert_eq!(prev, "running");
    assert_eq!(reason, "guest powered off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_escalates_past_a_guest_that_ignores_acpi() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("deaf")).await;
    vm.start().await.unwrap();
    let mut watch = StatusWatch::new(&vm).await;
    let t = Instant::now();
    vm.stop(false, 1).await.unwrap();
    let (_, _, reason) = watch.until("stopped").await;
    // No OS answers the power button: after the 1 s grace maqet quits QEMU.
    assert!(t.elapsed().as_secs_f64() >= 1.0);
    assert_eq!(reason, "stopped by request (QMP quit)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_is_reported_crashed() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("victim")).await;
    vm.start().await.unwrap();
    let pid = vm.pid().await.unwrap();
    let mut watch = StatusWatch::new(&vm).await;
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let (_, prev, reason) = watch.until("crashed").await;
    assert_eq!(prev, "running");
    assert!(reason.contains("SIGKILL"), "{reason}");
    assert_eq!(vm.exit_status().await.unwrap(), 128 + 9);
    assert_eq!(vm.pid().await.unwrap(), 0);
    // A crashed VM can be started again.
    vm.start().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "running");
    vm.stop(true, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_starts_make_exactly_one_qemu() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("busy")).await;
    let calls = (0..10).map(|_| {
        let vm = vm.clone();
        async move { vm.start().await }
    });
    let results = futures_util::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(error_name(r), "org.maqet.Maqet1.Error.InvalidState", "{r}");
    }
    assert_eq!(bus.marked_processes("qemu-system").len(), 1);
    vm.stop(true, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_reports_restart_keys_and_restart_uses_the_new_config() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("grow")).await;
    // Not running: nothing needs a restart.
    let keys = vm.apply(&tiny_vm_yaml("grow")).await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    vm.start().await.unwrap();
    let old_pid = vm.pid().await.unwrap();
    let bigger = tiny_vm_yaml("grow").replace("memory: 64", "memory: 96");
    let keys = vm.apply(&bigger).await.unwrap();
    assert_eq!(keys, vec!["memory".to_string()]);
    assert!(vm.config().await.unwrap().contains("96"));
    vm.restart().await.unwrap();
    let pid = vm.pid().await.unwrap();
    assert_ne!(pid, old_pid);
    let cmdline = String::from_utf8(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .unwrap()
        .replace('\0', " ");
    assert!(cmdline.contains("-m 96"), "{cmdline}");
    // Renaming through Apply, announced as a property change.
    let props = zbus::fdo::PropertiesProxy::builder(&conn)
        .destination("org.maqet.Maqet1")
        .path(vm.inner().path().clone())
        .build()
        .await
        .unwrap();
    let mut changes = props.receive_properties_changed().await.unwrap();
    vm.apply(&bigger.replace("name: grow", "name: grown"))
        .await
        .unwrap();
    let renamed = async {
        while let Some(sig) = changes.next().await {
            let args = sig.args().unwrap();
            if let Some(name) = args.changed_properties().get("Name") {
                return String::try_from(name.try_clone().unwrap()).unwrap();
            }
        }
        panic!("no PropertiesChanged with Name");
    };
    assert_eq!(
        tokio::time::timeout(TIMEOUT, renamed).await.unwrap(),
        "grown"
    );
    assert_eq!(vm.name().await.unwrap(), "grown");
    let manager = bus.manager(&conn).await;
    assert!(manager.find_vm("grown").await.is_ok());
    assert!(manager.find_vm("grow").await.is_err());
    vm.stop(true, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_status_and_events() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("waiter")).await;
    // Already true: returns at once.
    assert_eq!(vm.wait("status=created", 0).await.unwrap(), "created");
    let err = vm.wait("status=running", 0).await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.Timeout");
    let err = vm.wait("bogus", 1).await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidArgument");
    vm.start().await.unwrap();
    let mut waiter = {
        let vm = vm.clone();
        tokio::spawn(async move { vm.wait("event=STOP", 30).await })
    };
    // The waiter subscribes at some point after its call reaches maqetd; keep producing
    // STOP events until it has seen one (bounded by its own timeout).
    let data = loop {
        vm.pause().await.unwrap();
        if let Ok(done) = tokio::time::timeout(std::time::Duration::ZERO, &mut waiter).await {
            break done.unwrap().unwrap();
        }
        vm.resume().await.unwrap();
        if waiter.is_finished() {
            break waiter.await.unwrap().unwrap();
        }
    };
    assert_eq!(data, "{}");
    if vm.status().await.unwrap() == "running" {
        vm.pause().await.unwrap();
    }
    assert_eq!(vm.wait("status=paused|stopped", 5).await.unwrap(), "paused");
    vm.stop(true, 0).await.unwrap();
}
