//! The database as an adversary meets it: locked by another process, deleted while
//! maqetd runs, on a full disk. maqetd stalls nothing, answers what memory can answer,
//! fails state changes with `Storage` naming the cause, and loses no record.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Bus, TIMEOUT, error_name, stdout, tiny_vm_yaml};
use maqet::client::{QmpProxy, VmProxy, qmp_proxy};
use zbus::Connection;

fn require_all() -> bool {
    std::env::var("MAQET_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

async fn qmp_of(conn: &Connection, vm: &VmProxy<'_>) -> QmpProxy<'static> {
    qmp_proxy(conn, vm.inner().path().to_owned().into())
        .await
        .unwrap()
}

/// Rows of one column of the database, read by a connection of the test's own.
fn column(db: &Path, sql: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The `(method, outcome)` audit rows of calls on one VM, oldest first.
fn audit_of(db: &Path, vm_id: &str) -> Vec<String> {
    column(
        db,
        &format!(
            "SELECT method || ':' || coalesce(outcome, '') FROM audit \
             WHERE vm_id = '{vm_id}' ORDER BY seq"
        ),
    )
}

fn statuses_of(db: &Path, vm_id: &str) -> Vec<String> {
    column(
        db,
        &format!(
            "SELECT status FROM events WHERE kind = 'status' AND vm_id = '{vm_id}' ORDER BY seq"
        ),
    )
}

/// Makes maqetd write everything it has queued (the audit listing flushes first).
fn flush(bus: &Bus) {
    let out = bus.maqet(&["audit", "--json"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_locked_by_another_process_stalls_nothing_and_loses_nothing() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let busy = bus.add(&conn, "", &tiny_vm_yaml("busy")).await;
    let idle = bus.add(&conn, "", &tiny_vm_yaml("idle")).await;
    busy.start().await.unwrap();
    let (busy_id, idle_id) = (busy.id().await.unwrap(), idle.id().await.unwrap());
    let qmp = qmp_of(&conn, &busy).await;

    // Another process (this test) holds the write lock for as long as it likes; every
    // call below must answer while it does (a call past the 25 s D-Bus timeout fails).
    let holder = rusqlite::Connection::open(bus.database()).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();

    // Memory answers reads; a QMP call on a running VM does not wait for the database.
    let status = qmp.execute("query-status", "", false).await.unwrap();
    assert!(status.contains("running"), "{status}");
    // An audited command (not a query): answered although its record must wait.
    let announced = qmp
        .execute(
            "announce-self",
            r#"{"initial": 50, "max": 550, "rounds": 1, "step": 100}"#,
            false,
        )
        .await
        .unwrap();
    assert_eq!(announced, "{}");
    assert_eq!(bus.manager(&conn).await.list_vms().await.unwrap().len(), 2);
    let ls = bus.maqet(&["ls"]);
    assert!(ls.status.success(), "{}", common::stderr(&ls));
    assert!(stdout(&ls).contains("busy") && stdout(&ls).contains("idle"));
    assert_eq!(busy.status().await.unwrap(), "running");

    // A state change that needs the database fails, naming the lock, and changes nothing.
    let e = idle.start().await.unwrap_err();
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.Storage", "{e}");
    assert!(e.to_string().contains("locked by another process"), "{e}");
    assert_eq!(idle.status().await.unwrap(), "created");

    // What QEMU reports happened anyway: the pause is in memory now and on disk later.
    busy.pause().await.unwrap();
    assert_eq!(busy.status().await.unwrap(), "paused");

    // Hold it past the 25 s D-Bus call timeout (the scenario, not synchronisation): a
    // service that queued calls behind the lock would now time them out.
    let held_since = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_secs(26).saturating_sub(held_since.elapsed()))
        .await;
    qmp.execute(
        "announce-self",
        r#"{"initial": 50, "max": 550, "rounds": 1, "step": 100}"#,
        false,
    )
    .await
    .unwrap();
    assert_eq!(bus.manager(&conn).await.list_vms().await.unwrap().len(), 2);
    let e = idle.start().await.unwrap_err();
    assert!(e.to_string().contains("locked by another process"), "{e}");

    holder.execute_batch("COMMIT").unwrap();
    drop(holder);
    flush(&bus);

    let db = bus.database();
    let statuses = statuses_of(&db, &busy_id);
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("paused"),
        "the paused transition was written after the lock went: {statuses:?}"
    );
    let stored: Vec<String> = column(
        &db,
        &format!("SELECT status FROM vms WHERE id = '{busy_id}'"),
    );
    assert_eq!(stored, ["paused"]);
    let busy_audit = audit_of(&db, &busy_id);
    for (want, n) in [("Execute:ok", 2), ("Pause:ok", 1)] {
        assert_eq!(
            busy_audit.iter().filter(|r| *r == want).count(),
            n,
            "{want} in {busy_audit:?}"
        );
    }
    let idle_audit = audit_of(&db, &idle_id);
    assert_eq!(
        idle_audit.iter().filter(|r| *r == "Start:Storage").count(),
        2,
        "both refused starts are audited: {idle_audit:?}"
    );
    assert!(
        !statuses_of(&db, &idle_id).iter().any(|s| s == "starting"),
        "nothing of the refused start was written"
    );
    // And the VM that could not start then starts.
    idle.start().await.unwrap();
    idle.stop(true, 0).await.unwrap();
    busy.stop(true, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_database_is_recreated_and_a_restart_still_sees_every_vm() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let runner = bus.add(&conn, "", &tiny_vm_yaml("runner")).await;
    bus.add(&conn, "", &tiny_vm_yaml("keeper")).await;
    runner.start().await.unwrap();
    let pid = runner.pid().await.unwrap();

    let db = bus.database();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    // doctor does not call an unlinked file healthy: maqetd notices and writes it anew.
    let doctor = bus.maqet(&["doctor", "--json"]);
    let report = stdout(&doctor);
    assert!(db.exists(), "doctor's check recreated the database");
    assert!(
        report.contains("was deleted while maqetd ran"),
        "doctor reports the deletion: {report}"
    );
    // Writes go on into the new file.
    bus.add(&conn, "", &tiny_vm_yaml("after")).await;
    let names = column(&db, "SELECT name FROM vms ORDER BY name");
    assert_eq!(names, ["after", "keeper", "runner"]);
    let recreated = column(
        &db,
        "SELECT method FROM audit WHERE method = 'RecreateDatabase'",
    );
    assert_eq!(recreated.len(), 1, "the recreation is audited");

    // A restart finds every VM, and re-adopts the running one.
    let daemon = bus.marked_processes("maqetd")[0];
    unsafe { libc::kill(daemon as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + TIMEOUT;
    while Path::new(&format!("/proc/{daemon}")).exists() {
        assert!(std::time::Instant::now() < deadline, "maqetd did not exit");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let listed = bus.manager(&conn).await.list_vms().await.unwrap();
    let mut names: Vec<_> = listed.iter().map(|v| v.1.clone()).collect();
    names.sort();
    assert_eq!(names, ["after", "keeper", "runner"]);
    assert_eq!(runner.status().await.unwrap(), "running");
    assert_eq!(runner.pid().await.unwrap(), pid);
    runner.stop(true, 0).await.unwrap();
}

/// A size-limited tmpfs mounted on a directory for the test's lifetime.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> Option<SmallFs> {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .ok()?;
        out.status.success().then(|| SmallFs {
            dir: dir.to_path_buf(),
        })
    }

    /// Fills the file system with one file; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.dir.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xa5u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", filler.display()),
            }
        }
        // Whatever single blocks remain.
        while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: maqetd may still hold the database open while the bus shuts down.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_full_disk_stop_and_remove_work_and_records_wait_for_space() {
    let bus = Bus::start();
    let data = bus.root().join("data");
    let Some(fs) = SmallFs::mount(&data, "4m") else {
        assert!(
            !require_all(),
            "cannot mount a tmpfs on {} (needs root): MAQET_TEST_REQUIRE_ALL=1 forbids skipping",
            data.display()
        );
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    let conn = bus.conn().await;
    let doomed = bus.add(&conn, "", &tiny_vm_yaml("doomed")).await;
    let spare = bus.add(&conn, "", &tiny_vm_yaml("spare")).await;
    doomed.start().await.unwrap();
    let doomed_id = doomed.id().await.unwrap();

    let filler = fs.fill();

    // Nothing can be written: a new definition fails and says why...
    let e = bus
        .manager(&conn)
        .await
        .add_vm("", &tiny_vm_yaml("refused"))
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.Storage", "{e}");
    assert!(e.to_string().contains("no space left"), "{e}");
    // ...but stopping and removing work: they are how a user frees space.
    doomed.stop(true, 0).await.unwrap();
    assert_eq!(doomed.status().await.unwrap(), "stopped");
    bus.manager(&conn)
        .await
        .remove_vm("doomed", false, false)
        .await
        .unwrap();
    let listed = bus.manager(&conn).await.list_vms().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(spare.name().await.unwrap(), "spare");

    // Space returns: everything that waited is written, in order, nothing lost.
    std::fs::remove_file(filler).unwrap();
    flush(&bus);
    let db = bus.database();
    assert_eq!(
        column(&db, "SELECT name FROM vms ORDER BY name"),
        ["spare"],
        "the removal was written"
    );
    let statuses = statuses_of(&db, &doomed_id);
    assert!(
        statuses.ends_with(&["stopping".to_string(), "stopped".to_string()]),
        "{statuses:?}"
    );
    let audit = audit_of(&db, &doomed_id);
    for want in ["Stop:ok", "RemoveVM:ok"] {
        assert!(audit.iter().any(|r| r == want), "{want} in {audit:?}");
    }
    let removed = column(
        &db,
        &format!("SELECT kind FROM events WHERE vm_id = '{doomed_id}' AND kind = 'removed'"),
    );
    assert_eq!(removed.len(), 1);
    let lost = column(&db, "SELECT method FROM audit WHERE method = 'RecordsLost'");
    assert!(lost.is_empty(), "nothing was lost: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_answered_after_its_audit_record_is_committed() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let db = bus.database();
    for i in 1..=10 {
        manager
            .add_vm("", &tiny_vm_yaml(&format!("vm{i}")))
            .await
            .unwrap();
        // No flush: the record must already be there when the reply arrives.
        let rows = column(
            &db,
            "SELECT method FROM audit WHERE method = 'AddVM' AND outcome = 'ok'",
        );
        assert_eq!(rows.len(), i, "AddVM #{i} answered before its audit record");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_found_but_not_defined_is_reported_and_its_sockets_kept() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("orphan")).await;
    vm.start().await.unwrap();
    let id = vm.id().await.unwrap();
    let pid = vm.pid().await.unwrap();
    // The database goes, and maqetd dies before it could write it anew.
    let daemon = bus.marked_processes("maqetd")[0];
    let db = bus.database();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    unsafe { libc::kill(daemon as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + TIMEOUT;
    while Path::new(&format!("/proc/{daemon}")).exists() {
        assert!(std::time::Instant::now() < deadline, "maqetd did not die");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A new maqetd (activated by this call) has an empty database...
    assert!(
        bus.manager(&conn)
            .await
            .list_vms()
            .await
            .unwrap()
            .is_empty()
    );
    // ...and doctor --fix reports the QEMU instead of deleting its sockets as stale.
    let out = bus.maqet(&["doctor", "--fix"]);
    let report = stdout(&out);
    assert!(
        report.contains("found but not defined") && report.contains(&id),
        "{report}"
    );
    let socket_dir = bus.root().join("run/maqet/vms").join(&id);
    assert!(
        socket_dir.exists(),
        "doctor --fix kept {}",
        socket_dir.display()
    );
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU left running"
    );
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// A change's audit record commits with the change: maqetd killed while a `Stop` waits
/// for a guest that ignores the power button (after the `stopping` transition, before
/// the answer) leaves the call's record in the database, outcome `pending`. (Its record
/// used to be written after the call, so this kill lost it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_interrupted_by_sigkill_keeps_its_audit_record() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    // No guest OS: ACPI power-down is ignored, so Stop waits its full reply limit.
    let vm = bus.add(&conn, "", &tiny_vm_yaml("deaf")).await;
    vm.start().await.unwrap();
    let id = vm.id().await.unwrap();
    let mut watch = common::StatusWatch::new(&vm).await;
    let stopping = vm.clone();
    let stop = tokio::spawn(async move { stopping.stop(false, 600).await });
    watch.until("stopping").await;
    let daemons = bus.marked_processes("maqetd");
    assert_eq!(daemons.len(), 1);
    unsafe { libc::kill(daemons[0] as i32, libc::SIGKILL) };
    let answer = tokio::time::timeout(TIMEOUT, stop).await.unwrap().unwrap();
    assert!(answer.is_err(), "Stop was answered: {answer:?}");

    let audit = audit_of(&bus.database(), &id);
    assert_eq!(
        audit.last().map(String::as_str),
        Some("Stop:pending"),
        "{audit:?}"
    );
    assert!(statuses_of(&bus.database(), &id).contains(&"stopping".to_string()));

    // The next call brings maqetd back; the VM is still there to be stopped for good.
    let mut watch = common::StatusWatch::new(&vm).await;
    vm.stop(true, 0).await.unwrap();
    watch.until("stopped").await;
}
