//! End-to-end: session life (docs/lifecycle.md, "Session life") on a private bus with
//! real QEMU: restart on crash with back-off and a limit, autostart once per session,
//! sleep / wake / logout against a logind stand-in (on_sleep, on_logout: save restored by
//! the next maqetd, the guest's clock set after wake on the real Linux guest), transient
//! scopes against a user-manager stand-in.

mod common;

use common::guest::{self, Behaviour};
use common::{Bus, Reasons, StatusWatch, TIMEOUT, stdout, tiny_vm_yaml};
use futures_util::StreamExt;

fn kill(pid: u32) {
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_vm_with_restart_on_crash_comes_back_until_the_limit() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let yaml = format!("{}restart: on-crash\n", tiny_vm_yaml("phoenix"));
    let vm = bus.add(&conn, "", &yaml).await;
    let plain = bus.add(&conn, "", &tiny_vm_yaml("mortal")).await;

    // `ls --json` shows the policy.
    let ls: serde_json::Value =
        serde_json::from_str(&stdout(&bus.maqet(&["--json", "ls"]))).unwrap();
    let by_name = |n: &str| {
        ls.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("phoenix")["restart"], "on-crash");
    assert_eq!(by_name("phoenix")["autostart"], false);
    assert_eq!(by_name("mortal")["restart"], "no");

    vm.start().await.unwrap();
    for crash in 1..=4 {
        let pid = vm.pid().await.unwrap();
        assert!(pid > 0);
        let mut watch = StatusWatch::new(&vm).await;
        let mut reasons = Reasons::new(&vm).await;
        kill(pid);
        let (_, _, reason) = watch.until("crashed").await;
        assert!(reason.contains("SIGKILL"), "{reason}");
        let backoff = reasons.until("restarting (").await;
        assert!(
            backoff.starts_with(&format!(
                "restarting ({crash}/5) in {} s: ",
                1 << (crash - 1)
            )),
            "{backoff}"
        );
        assert!(backoff.contains("SIGKILL"), "{backoff}");
        if crash == 4 {
            // An 8 s back-off: the status table says what is going on.
            let table = stdout(&bus.maqet(&["ls"]));
            assert!(table.contains("restarting (4/5)"), "{table}");
        }
        let (_, prev, _) = watch.until("running").await;
        assert_eq!(prev, "starting");
        assert_ne!(vm.pid().await.unwrap(), pid, "a new QEMU");
    }
    // The fifth crash within ten minutes: maqet stops trying and says why.
    let mut watch = StatusWatch::new(&vm).await;
    let mut reasons = Reasons::new(&vm).await;
    kill(vm.pid().await.unwrap());
    watch.until("crashed").await;
    let reason = reasons.until("gave up restarting").await;
    assert!(
        reason.contains("5 crashes") && reason.contains("maqet start phoenix"),
        "{reason}"
    );
    assert_eq!(vm.status().await.unwrap(), "crashed");
    assert_eq!(vm.pid().await.unwrap(), 0);
    let table = stdout(&bus.maqet(&["ls"]));
    assert!(!table.contains("restarting"), "{table}");

    // Without a policy a crash stays a crash (its reason has no back-off).
    plain.start().await.unwrap();
    let mut watch = StatusWatch::new(&plain).await;
    kill(plain.pid().await.unwrap());
    let (_, _, reason) = watch.until("crashed").await;
    assert!(!reason.starts_with("restarting"), "{reason}");

    // A person's start gets a fresh budget.
    let mut watch = StatusWatch::new(&vm).await;
    let mut reasons = Reasons::new(&vm).await;
    vm.start().await.unwrap();
    kill(vm.pid().await.unwrap());
    watch.until("crashed").await;
    reasons.until("restarting (1/5)").await;
    watch.until("running").await;
    vm.stop(true, 0).await.unwrap();
    // A stop someone asked for is not restarted.
    assert_eq!(vm.status().await.unwrap(), "stopped");
}

/// Stops the running maqetd (SIGTERM) and waits until its name is gone.
async fn stop_maqetd(bus: &Bus, conn: &zbus::Connection) {
    let daemons = bus.marked_processes("maqetd");
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    let mut gone = zbus::fdo::DBusProxy::new(conn)
        .await
        .unwrap()
        .receive_name_owner_changed_with_args(&[(0, "org.maqet.Maqet1"), (2, "")])
        .await
        .unwrap();
    unsafe { libc::kill(daemons[0] as i32, libc::SIGTERM) };
    tokio::time::timeout(TIMEOUT, gone.next()).await.unwrap();
    common::process_gone(daemons[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autostart_vms_come_up_once_per_session_in_order() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let first = bus
        .add(
            &conn,
            "",
            &format!("{}autostart: true\n", tiny_vm_yaml("a-first")),
        )
        .await;
    let second = bus
        .add(
            &conn,
            "",
            &format!(
                "{}autostart: true\nautostart_delay: 1\n",
                tiny_vm_yaml("b-second")
            ),
        )
        .await;
    let manual = bus.add(&conn, "", &tiny_vm_yaml("c-manual")).await;
    // The maqetd that defined them started with this session: it had nothing to start.
    assert_eq!(first.status().await.unwrap(), "created");

    // A new login session: its runtime directory is new (no marker).
    stop_maqetd(&bus, &conn).await;
    std::fs::remove_file(bus.root().join("run/maqet/autostart-done")).unwrap();
    // Any call activates maqetd, which starts the autostart VMs by itself.
    assert_eq!(first.wait("status=running", 20).await.unwrap(), "running");
    assert_eq!(second.wait("status=running", 20).await.unwrap(), "running");
    assert_eq!(manual.status().await.unwrap(), "created");
    // In name order, each after the one before it ran: b-second after a-first.
    assert!(second.started_at().await.unwrap() > first.started_at().await.unwrap());
    let ls: serde_json::Value =
        serde_json::from_str(&stdout(&bus.maqet(&["--json", "ls"]))).unwrap();
    assert!(
        ls.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "a-first" && v["autostart"] == true)
    );

    // The person stops one; maqetd leaving and coming back in the same session does
    // not start it again.
    first.stop(true, 0).await.unwrap();
    stop_maqetd(&bus, &conn).await;
    assert_eq!(manual.status().await.unwrap(), "created");
    assert_eq!(first.status().await.unwrap(), "stopped");
    assert_eq!(second.status().await.unwrap(), "running");
    second.stop(true, 0).await.unwrap();
}

/// `maqet setup --user --autostart` enables the unit for login; `--uninstall` undoes it.
#[test]
fn setup_autostart_links_the_unit_into_default_target() {
    let bus = Bus::start_unactivated();
    let out = bus.maqet(&["--json", "setup", "--user", "--autostart"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["autostart"], true);
    let units = bus.root().join("config/systemd/user");
    let link = units.join("default.target.wants/maqetd.service");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        units.join("maqetd.service")
    );
    let unit = std::fs::read_to_string(units.join("maqetd.service")).unwrap();
    assert!(
        unit.contains("[Install]\nWantedBy=default.target\n"),
        "{unit}"
    );
    // Again: idempotent.
    assert!(
        bus.maqet(&["setup", "--user", "--autostart"])
            .status
            .success()
    );
    let out = bus.maqet(&["--json", "setup", "--user", "--uninstall"]);
    assert!(out.status.success());
    assert!(link.symlink_metadata().is_err(), "the login link is gone");

    // Something that is not our link is not replaced.
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::fs::write(&link, "not a link").unwrap();
    let out = bus.maqet(&["setup", "--user", "--autostart"]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("not a symlink"),
        "{}",
        common::stderr(&out)
    );
    assert_eq!(std::fs::read_to_string(&link).unwrap(), "not a link");
}

/// A bus whose maqetd finds the logind stand-in on its system bus.
fn bus_with(logind: &common::logind::Logind) -> Bus {
    Bus::start_with_options(&common::BusOptions {
        system_bus: Some(&logind.address),
        ..common::BusOptions::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_pauses_running_vms_under_a_delay_inhibitor_and_wake_resumes_them() {
    let logind = common::logind::Logind::start().await;
    let bus = bus_with(&logind);
    let conn = bus.conn().await;
    let sleepy = bus.add(&conn, "", &tiny_vm_yaml("sleepy")).await;
    let awake = bus
        .add(
            &conn,
            "",
            &format!("{}on_sleep: none\n", tiny_vm_yaml("awake")),
        )
        .await;
    // No VM runs: no inhibitor.
    logind.until_held("sleep", 0).await;
    sleepy.start().await.unwrap();
    logind.until_held("sleep", 1).await;
    awake.start().await.unwrap();
    // Still one: the lock is per service, not per VM.
    logind.until_held("sleep", 1).await;
    logind.until_held("shutdown", 0).await;

    let mut watch = StatusWatch::new(&sleepy).await;
    logind.prepare_for_sleep(true).await;
    watch.until("paused").await;
    // Done with its work, maqetd lets the machine sleep.
    logind.until_held("sleep", 0).await;
    assert_eq!(awake.status().await.unwrap(), "running");

    logind.prepare_for_sleep(false).await;
    watch.until("running").await;
    logind.until_held("sleep", 1).await;
    assert_eq!(awake.status().await.unwrap(), "running");

    sleepy.stop(true, 0).await.unwrap();
    logind.until_held("sleep", 1).await;
    awake.stop(true, 0).await.unwrap();
    logind.until_held("sleep", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sleep_save_snapshots_and_quits_then_restores_on_wake() {
    let logind = common::logind::Logind::start().await;
    let bus = bus_with(&logind);
    let conn = bus.conn().await;
    let yaml = format!(
        "{}on_sleep: save\nstorage:\n  - {{name: disk, type: qcow2, size: 16M}}\n",
        tiny_vm_yaml("saver")
    );
    let vm = bus.add(&conn, "", &yaml).await;
    vm.start().await.unwrap();
    logind.until_held("sleep", 1).await;
    let first_pid = vm.pid().await.unwrap();

    let mut watch = StatusWatch::new(&vm).await;
    logind.prepare_for_sleep(true).await;
    watch.until("stopped").await;
    logind.until_held("sleep", 0).await;
    let snaps = stdout(&bus.maqet(&["snapshot", "ls", "saver"]));
    assert!(snaps.contains("maqet-sleep"), "{snaps}");

    let mut reasons = Reasons::new(&vm).await;
    logind.prepare_for_sleep(false).await;
    watch.until("running").await;
    reasons.until("restored from snapshot 'maqet-sleep'").await;
    assert_eq!(vm.status().await.unwrap(), "running");
    assert_ne!(vm.pid().await.unwrap(), first_pid, "a new QEMU, restored");
    // The restore is a snapshot load, recorded in the VM's history.
    let logs = stdout(&bus.maqet(&["logs", "saver", "-n", "0"]));
    let loaded = logs
        .lines()
        .any(|l| l.contains("maqet-sleep") && l.contains("load"));
    assert!(loaded, "{logs}");
    logind.until_held("sleep", 1).await;
    vm.stop(true, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_end_stops_vms_with_on_logout_stop_and_keeps_the_rest() {
    let logind = common::logind::Logind::start().await;
    let bus = bus_with(&logind);
    let conn = bus.conn().await;
    let kept = bus.add(&conn, "", &tiny_vm_yaml("kept")).await;
    kept.start().await.unwrap();
    logind.until_held("sleep", 1).await;
    // Only a VM with something to do at logout needs the shutdown lock.
    logind.until_held("shutdown", 0).await;
    // A guest that answers the power button: the stop is graceful, not a 30 s escalation.
    let image = guest::write_image(bus.root(), Behaviour::AcpiAware);
    let stopper = bus
        .add(
            &conn,
            "",
            &format!("{}on_logout: stop\n", guest::vm_yaml("stopper", &image)),
        )
        .await;
    stopper.start().await.unwrap();
    stopper.wait("event=RTC_CHANGE", 60).await.unwrap();
    logind.until_held("shutdown", 1).await;

    let mut watch = StatusWatch::new(&stopper).await;
    logind.prepare_for_shutdown(true).await;
    let (_, _, reason) = watch.until("stopped").await;
    assert_eq!(reason, "guest powered off after an ACPI power-down request");
    logind.until_held("shutdown", 0).await;
    assert_eq!(kept.status().await.unwrap(), "running");
    kept.stop(true, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_qemu_runs_in_its_own_scope_when_a_user_manager_exists() {
    use common::systemd::{Call, UserManager};
    let bus = Bus::start();
    let mut systemd = UserManager::start(&bus).await;
    let conn = bus.conn().await;
    // A guest that answers the power button, for the graceful on_logout stop below.
    let image = guest::write_image(bus.root(), Behaviour::AcpiAware);
    let yaml = format!(
        "{}memory_max: 256M\ncpu_quota: 50%\non_logout: stop\n",
        guest::vm_yaml("scoped", &image)
    );
    let vm = bus.add(&conn, "", &yaml).await;
    vm.start().await.unwrap();
    vm.wait("event=RTC_CHANGE", 60).await.unwrap();
    let pid = vm.pid().await.unwrap();
    let id = vm.id().await.unwrap();
    let Call::StartTransientUnit(unit) = systemd.next().await else {
        panic!("expected StartTransientUnit")
    };
    assert_eq!(unit.name, format!("maqet-vm-scoped-{}.scope", &id[..8]));
    assert_eq!(unit.mode, "fail");
    let prop = |k: &str| {
        unit.properties
            .get(k)
            .unwrap_or_else(|| panic!("no {k}"))
            .try_clone()
            .unwrap()
    };
    assert_eq!(Vec::<u32>::try_from(prop("PIDs")).unwrap(), vec![pid]);
    assert_eq!(String::try_from(prop("Slice")).unwrap(), "maqet.slice");
    assert_eq!(u64::try_from(prop("MemoryMax")).unwrap(), 256 << 20);
    assert_eq!(u64::try_from(prop("CPUQuotaPerSecUSec")).unwrap(), 500_000);

    // doctor: the user manager was found; logind (no system bus here) was not.
    let out = bus.maqet(&["--json", "doctor"]);
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let row = |check: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["check"] == check)
            .unwrap_or_else(|| panic!("no {check} row: {rows:#}"))
            .clone()
    };
    assert_eq!(row("user manager")["status"], "ok", "{rows:#}");
    assert_eq!(row("logind")["status"], "warning", "{rows:#}");
    assert!(
        row("logind")["message"]
            .as_str()
            .unwrap()
            .contains("no system bus"),
        "{rows:#}"
    );

    // A new maqetd re-finds the scope of the QEMU it re-adopts (and makes no new one).
    stop_maqetd(&bus, &conn).await;
    assert_eq!(vm.status().await.unwrap(), "running");
    match systemd.next().await {
        Call::GetUnitByPid(p) => assert_eq!(p, pid),
        other => panic!("expected GetUnitByPID, got {other:?}"),
    }

    // maqetd stopped by a stopping user manager: the session ends, on_logout: stop.
    systemd.set_state("stopping");
    let mut watch = StatusWatch::new(&vm).await;
    let daemon = bus.marked_processes("maqetd")[0];
    unsafe { libc::kill(daemon as i32, libc::SIGTERM) };
    watch.until("stopped").await;
    common::process_gone(daemon).await;
    assert!(
        systemd.calls.try_recv().is_err(),
        "no further scope was made"
    );
}

/// The user unit, as `setup --user --autostart` installs it, passes `systemd-analyze
/// verify` (the man page check is off: `setup` installs the page where `man` may not look).
#[test]
fn the_installed_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = common::require(common::program("systemd-analyze", "systemd")) else {
        return;
    };
    let bus = Bus::start_unactivated();
    let out = bus.maqet(&["setup", "--user", "--autostart"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let unit = bus.root().join("config/systemd/user/maqetd.service");
    let out = std::process::Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        stdout(&out),
        common::stderr(&out)
    );
}

/// The status reason `on_logout: save` leaves until the next maqetd restores the VM.
const SAVED_AT_LOGOUT: &str = "saved to snapshot 'maqet-logout' when the session ended";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_logout_save_snapshots_a_real_guest_and_the_next_maqetd_restores_it() {
    use common::linux_guest::{self, Setup};
    let Some(image) = linux_guest::image() else {
        return;
    };
    let logind = common::logind::Logind::start().await;
    let bus = bus_with(&logind);
    let conn = bus.conn().await;
    let keys = "on_logout: save\nstorage:\n  - {name: disk, type: qcow2, size: 16M}\n";
    let setup = Setup {
        keys,
        ..Setup::default()
    };
    let (vm, mut serial) = linux_guest::boot(&bus, &conn, "saved", image, &setup).await;
    // State only a restore brings back: a file in the guest's RAM (its root is the
    // initramfs) and its uptime.
    let (rc, _) = serial.run("echo kept-$$ > /tmp/marker").await;
    assert_eq!(rc, 0);
    let (_, marker) = serial.run("cat /tmp/marker").await;
    let marker = marker
        .lines()
        .find(|l| l.starts_with("kept-"))
        .unwrap_or_else(|| panic!("no marker in {marker:?}"))
        .trim()
        .to_string();
    let uptime = |shown: &str| -> f64 {
        shown
            .lines()
            .find_map(|l| l.strip_prefix("UPTIME="))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no uptime in {shown:?}"))
    };
    let (_, shown) = serial.run("echo UPTIME=$(cat /proc/uptime)").await;
    let before = uptime(&shown);
    logind.until_held("shutdown", 1).await;

    // The session ends: a live snapshot, then the VM quits.
    let mut watch = StatusWatch::new(&vm).await;
    logind.prepare_for_shutdown(true).await;
    let (_, _, reason) = watch.until("stopped").await;
    assert!(reason.starts_with("stopped by request"), "{reason}");
    logind.until_held("shutdown", 0).await;
    let reason = vm.status_reason().await.unwrap();
    assert!(reason.starts_with(SAVED_AT_LOGOUT), "{reason}");
    let snaps = stdout(&bus.maqet(&["snapshot", "ls", "saved"]));
    assert!(snaps.contains("maqet-logout"), "{snaps}");
    drop(serial);

    // The next login: maqetd is gone with the session, the first call brings it back,
    // and it restores the VM by itself.
    stop_maqetd(&bus, &conn).await;
    let mut reasons = Reasons::new(&vm).await;
    assert_eq!(vm.wait("status=running", 60).await.unwrap(), "running");
    reasons
        .until("restored from snapshot 'maqet-logout' saved when the last session ended")
        .await;
    assert_eq!(vm.status().await.unwrap(), "running");
    let mut serial = linux_guest::Serial::attach(&vm).await;
    let (_, shown) = serial.run("cat /tmp/marker").await;
    assert!(
        shown.contains(&marker),
        "not the guest that was saved: {shown:?}"
    );
    // Its clock went on from where it was saved (a fresh boot would show a marker-less
    // /tmp above; this only checks nothing went backwards).
    let (_, shown) = serial.run("echo UPTIME=$(cat /proc/uptime)").await;
    assert!(uptime(&shown) >= before, "{shown:?}");
    // Restored once: a later maqetd leaves it alone.
    drop(serial);
    vm.stop(true, 0).await.unwrap();
    stop_maqetd(&bus, &conn).await;
    assert_eq!(vm.status().await.unwrap(), "stopped");
    let reason = vm.status_reason().await.unwrap();
    assert!(!reason.starts_with("restored"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_shutdown_restores_at_once_and_a_persons_start_cancels_the_restore() {
    let logind = common::logind::Logind::start().await;
    let bus = bus_with(&logind);
    let conn = bus.conn().await;
    let yaml = format!(
        "{}on_logout: save\nstorage:\n  - {{name: disk, type: qcow2, size: 16M}}\n",
        tiny_vm_yaml("undecided")
    );
    let vm = bus.add(&conn, "", &yaml).await;
    vm.start().await.unwrap();
    // A paused VM is saved too, and comes back paused.
    let yaml = format!(
        "{}on_logout: save\nstorage:\n  - {{name: disk, type: qcow2, size: 16M}}\n",
        tiny_vm_yaml("napping")
    );
    let napping = bus.add(&conn, "", &yaml).await;
    napping.start().await.unwrap();
    napping.pause().await.unwrap();
    logind.until_held("shutdown", 1).await;
    let first_pid = vm.pid().await.unwrap();

    let mut watch = StatusWatch::new(&vm).await;
    let mut napping_watch = StatusWatch::new(&napping).await;
    logind.prepare_for_shutdown(true).await;
    watch.until("stopped").await;
    napping_watch.until("stopped").await;
    logind.until_held("shutdown", 0).await;
    // logind calls the shutdown off: the session goes on, and so do the VMs.
    let mut reasons = Reasons::new(&vm).await;
    let mut napping_reasons = Reasons::new(&napping).await;
    logind.prepare_for_shutdown(false).await;
    reasons.until("restored from snapshot 'maqet-logout'").await;
    assert_eq!(vm.status().await.unwrap(), "running");
    assert_ne!(vm.pid().await.unwrap(), first_pid, "a new QEMU, restored");
    napping_reasons
        .until("restored from snapshot 'maqet-logout'")
        .await;
    assert_eq!(napping.status().await.unwrap(), "paused");
    napping.stop(true, 0).await.unwrap();
    logind.until_held("shutdown", 1).await;

    // Saved again; then a person starts and stops it before the next login: that
    // snapshot is stale, and the next maqetd does not load it over the person's choice.
    let mut watch = StatusWatch::new(&vm).await;
    logind.prepare_for_shutdown(true).await;
    watch.until("stopped").await;
    vm.start().await.unwrap();
    vm.stop(true, 0).await.unwrap();
    // The witness: maqetd autostarts after it has restored what it restores.
    let witness = format!("{}autostart: true\n", tiny_vm_yaml("witness"));
    let witness = bus.add(&conn, "", &witness).await;
    stop_maqetd(&bus, &conn).await;
    std::fs::remove_file(bus.root().join("run/maqet/autostart-done")).unwrap();
    assert_eq!(witness.wait("status=running", 20).await.unwrap(), "running");
    assert_eq!(vm.status().await.unwrap(), "stopped");
    let reason = vm.status_reason().await.unwrap();
    assert!(!reason.starts_with("restored"), "{reason}");
    witness.stop(true, 0).await.unwrap();
    let snaps = stdout(&bus.maqet(&["snapshot", "ls", "undecided"]));
    assert!(
        snaps.contains("maqet-logout"),
        "the snapshot is kept: {snaps}"
    );
}

/// The guest's clock, read in the guest through the agent (`date +%s`).
async fn guest_clock(guest: &maqet::client::GuestProxy<'_>) -> i64 {
    let (rc, out, err) = guest
        .exec(&["date", "+%s"], b"", Default::default())
        .await
        .unwrap();
    assert_eq!(rc, 0, "{}", String::from_utf8_lossy(&err));
    String::from_utf8_lossy(&out).trim().parse().unwrap()
}

fn host_clock() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_sets_a_real_guests_clock_through_the_agent() {
    use common::linux_guest::{self, Setup};
    let Some(image) = linux_guest::image() else {
        return;
    };
    let logind = common::logind::Logind::start().await;
    let bus = bus_with(&logind);
    let conn = bus.conn().await;
    let setup = Setup {
        keys: "guest_agent: true\n",
        ..Setup::default()
    };
    let (vm, _serial) = linux_guest::boot(&bus, &conn, "clock", image, &setup).await;
    vm.wait("agent=connected", 60).await.unwrap();
    let path = bus.manager(&conn).await.find_vm("clock").await.unwrap();
    let guest: maqet::client::GuestProxy = maqet::client::proxy_at(&conn, path).await.unwrap();

    // An hour behind, hardware clock included (what the agent's guest-set-time with a
    // time does: settimeofday, then `hwclock -w`): reading the hardware clock back
    // would not help this guest.
    let wrong = host_clock() - 3600;
    let (rc, _, err) = guest
        .exec(
            &["sh", "-c", &format!("date -s @{wrong} && hwclock -w")],
            b"",
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(rc, 0, "{}", String::from_utf8_lossy(&err));
    let off = host_clock() - guest_clock(&guest).await;
    assert!(off > 3000, "the guest's clock was not set back: {off} s");
    logind.until_held("sleep", 1).await;

    let mut watch = StatusWatch::new(&vm).await;
    logind.prepare_for_sleep(true).await;
    watch.until("paused").await;
    logind.until_held("sleep", 0).await;
    logind.prepare_for_sleep(false).await;
    watch.until("running").await;
    // maqetd takes the lock again once it has done everything the wake asks for.
    logind.until_held("sleep", 1).await;
    let off = host_clock() - guest_clock(&guest).await;
    assert!(
        off.abs() <= 2,
        "the guest's clock is {off} s off the host's"
    );
    vm.stop(true, 0).await.unwrap();
}

/// The crash count of `restart: on-crash` is kept in the database: maqetd exiting
/// (SIGTERM) and coming back continues it, and a back-off the old maqetd left pending
/// is finished by the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crash_count_survives_a_maqetd_restart() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let yaml = format!("{}restart: on-crash\n", tiny_vm_yaml("phoenix"));
    let vm = bus.add(&conn, "", &yaml).await;
    vm.start().await.unwrap();
    for crash in 1..=2 {
        let mut watch = StatusWatch::new(&vm).await;
        let mut reasons = Reasons::new(&vm).await;
        kill(vm.pid().await.unwrap());
        reasons.until(&format!("restarting ({crash}/5)")).await;
        watch.until("running").await;
    }
    // A new maqetd re-adopts the running VM; the next crash is the third, not a first.
    stop_maqetd(&bus, &conn).await;
    assert_eq!(vm.status().await.unwrap(), "running");
    let mut reasons = Reasons::new(&vm).await;
    kill(vm.pid().await.unwrap());
    let backoff = reasons.until("restarting (").await;
    assert!(
        backoff.starts_with("restarting (3/5) in 4 s: "),
        "{backoff}"
    );

    // maqetd exits during the 4 s back-off: the VM stays "restarting (3/5)" for the
    // next maqetd, which starts it when the back-off ends.
    stop_maqetd(&bus, &conn).await;
    let table = stdout(&bus.maqet(&["ls"]));
    assert!(table.contains("restarting (3/5)"), "{table}");
    assert_eq!(vm.wait("status=running", 20).await.unwrap(), "running");
    let db = rusqlite::Connection::open(bus.database()).unwrap();
    let counted: i64 = db
        .query_row("SELECT count(*) FROM restart_crashes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(counted, 3);

    // And it keeps counting: the fourth.
    let mut watch2 = StatusWatch::new(&vm).await;
    let mut reasons = Reasons::new(&vm).await;
    kill(vm.pid().await.unwrap());
    watch2.until("crashed").await;
    reasons.until("restarting (4/5)").await;
    let shown: serde_json::Value =
        serde_json::from_str(&stdout(&bus.maqet(&["--json", "status", "phoenix"]))).unwrap();
    assert!(shown.to_string().contains("restarting (4/5)"), "{shown}");
    // A person's start during the back-off wins.
    vm.start().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "running");
    vm.stop(true, 0).await.unwrap();
}

/// A maqetd that cannot own the name (another one has it) exits without using up the
/// session's autostart: the marker is only written by the name's owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maqetd_that_loses_the_name_leaves_the_autostart_to_its_owner() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus
        .add(
            &conn,
            "",
            &format!("{}autostart: true\n", tiny_vm_yaml("early")),
        )
        .await;
    stop_maqetd(&bus, &conn).await;
    // A new session, whose name someone else (this test) already owns.
    let marker = bus.root().join("run/maqet/autostart-done");
    let _ = std::fs::remove_file(&marker);
    let other = bus.conn().await;
    other.request_name("org.maqet.Maqet1").await.unwrap();
    let out = bus.maqetd_command(&[]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another maqetd already owns"), "{err}");
    assert!(
        !marker.exists(),
        "the loser claimed the session's autostart"
    );
    // The name's next owner still has the session's autostart to do.
    other.release_name("org.maqet.Maqet1").await.unwrap();
    assert_eq!(vm.wait("status=running", 20).await.unwrap(), "running");
    assert!(marker.exists());
    vm.stop(true, 0).await.unwrap();
}
