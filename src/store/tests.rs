use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ffi};
use serde_json::json;

use super::schema::{APPLICATION_ID, migrate};
use super::*;

// ---- helpers -----------------------------------------------------------------

fn db_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("maqet.db")
}

fn fast() -> StoreOptions {
    StoreOptions {
        busy_timeout: Duration::from_millis(200),
    }
}

fn vm(name: &str) -> VmRecord {
    VmRecord::new(
        uuid::Uuid::new_v4().to_string(),
        name.to_owned(),
        format!("name: {name}\nmemory: 1G\n"),
        "created",
        now_us(),
    )
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// (file name, content) of every file in the directory, sorted: "the
/// directory is exactly as it was".
fn snapshot_dir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn count(store: &Database, sql: &str) -> i64 {
    store.lock().query_row(sql, [], |r| r.get(0)).unwrap()
}

fn event_count(store: &Database) -> i64 {
    count(store, "SELECT count(*) FROM events")
}

/// Deterministic pseudo-random bytes (xorshift), no dependency needed.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// A populated maqet database, closed (WAL checkpointed into the main file).
fn populated(path: &Path, n: usize) -> Vec<VmRecord> {
    let store = Database::open(path).unwrap();
    let vms: Vec<_> = (0..n)
        .map(|i| {
            let mut rec = vm(&format!("vm-{i:04}"));
            rec.config = format!("name: vm-{i:04}\n# {}\n", "x".repeat(900));
            store.insert_vm(&rec).unwrap();
            rec
        })
        .collect();
    drop(store);
    vms
}

#[test]
fn store_is_send_and_sync_and_the_database_can_move_to_its_thread() {
    fn check<T: Send + Sync>() {}
    fn movable<T: Send>() {}
    check::<Store>();
    movable::<Database>();
}

#[test]
fn application_id_spells_mqet() {
    assert_eq!(APPLICATION_ID, 1_297_171_796);
    assert_eq!(&(APPLICATION_ID as u32).to_be_bytes(), b"MQET");
}

// ---- opening -----------------------------------------------------------------

#[test]
fn create_then_reopen_keeps_data_and_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    let store = Database::open(&path).unwrap();
    assert_eq!(store.path(), path);
    assert_eq!(mode(&path), 0o600);
    let rec = vm("web");
    store.insert_vm(&rec).unwrap();
    for suffix in ["-wal", "-shm"] {
        let side = open::sidecar(&path, suffix);
        if side.exists() {
            assert_eq!(mode(&side), 0o600, "{suffix}");
        }
    }
    {
        let conn = store.lock();
        let jm: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(jm, "wal");
        let fk: i64 = conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let sync: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1, "NORMAL");
    }
    drop(store);
    assert_eq!(mode(&path), 0o600);

    let store = Database::open(&path).unwrap();
    assert_eq!(store.get_vm(&rec.id).unwrap(), Some(rec.clone()));
    assert_eq!(store.load_vms().unwrap(), vec![rec]);
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn existing_world_readable_database_is_tightened() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    drop(Database::open(&path).unwrap());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    drop(Database::open(&path).unwrap());
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn empty_existing_file_is_initialized() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    fs::write(&path, b"").unwrap();
    let store = Database::open(&path).unwrap();
    store.insert_vm(&vm("a")).unwrap();
    assert_eq!(store.load_vms().unwrap().len(), 1);
}

#[test]
fn missing_directory_is_an_io_error_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope").join("maqet.db");
    let err = Database::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    assert!(err.to_string().contains("nope/maqet.db"), "{err}");
    assert!(!dir.path().join("nope").exists());
}

#[test]
fn non_regular_files_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let err = Database::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");

    let fifo = dir.path().join("fifo.db");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = Database::open(&fifo).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn migrations_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    let rec = vm("web");
    {
        let store = Database::open(&path).unwrap();
        store.insert_vm(&rec).unwrap();
    }
    for _ in 0..3 {
        let store = Database::open(&path).unwrap();
        let mut conn = store.lock();
        assert_eq!(migrate(&mut conn).unwrap(), schema::Migrated::UpToDate);
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let app: i64 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .unwrap();
        assert_eq!(app, APPLICATION_ID);
    }
    let store = Database::open(&path).unwrap();
    assert_eq!(store.load_vms().unwrap(), vec![rec]);
    // The `added` event was written once, not once per open.
    assert_eq!(event_count(&store), 1);
}

#[test]
fn fresh_migration_reports_from_zero() {
    let mut conn = Connection::open_in_memory().unwrap();
    assert_eq!(migrate(&mut conn).unwrap(), schema::Migrated::From(0));
    assert_eq!(migrate(&mut conn).unwrap(), schema::Migrated::UpToDate);
}

/// Asserts that opening `path` fails in the expected way and leaves the
/// database, and the whole directory, exactly as they were.
fn assert_refused_untouched(path: &Path, expect: impl Fn(&StoreError) -> bool) -> StoreError {
    let dir = path.parent().unwrap();
    let before = snapshot_dir(dir);
    let err = Database::open_with_options(path, &fast()).unwrap_err();
    assert!(expect(&err), "unexpected error: {err:?}");
    assert!(
        err.to_string().contains(path.to_str().unwrap()),
        "message names the file: {err}"
    );
    let after = snapshot_dir(dir);
    assert_eq!(
        before.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        after.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "directory entries changed"
    );
    assert!(before == after, "file content changed");
    err
}

#[test]
fn random_bytes_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    fs::write(&path, noise(65536, 0x5eed)).unwrap();
    let err = assert_refused_untouched(&path, |e| matches!(e, StoreError::Corrupt { .. }));
    let msg = err.to_string();
    assert!(msg.contains("will not touch it"), "{msg}");
    assert!(msg.contains(".broken"), "{msg}");
}

#[test]
fn short_file_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    fs::write(&path, b"hello").unwrap();
    assert_refused_untouched(&path, |e| matches!(e, StoreError::Corrupt { .. }));
}

#[test]
fn sqlite_header_followed_by_garbage_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    let mut bytes = b"SQLite format 3\0".to_vec();
    bytes.extend(noise(8192, 42));
    fs::write(&path, bytes).unwrap();
    assert_refused_untouched(&path, |e| matches!(e, StoreError::Corrupt { .. }));
}

#[test]
fn damaged_page_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    populated(&path, 300);
    let (page_size, root): (usize, usize) = {
        let conn = Connection::open(&path).unwrap();
        let ps: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .unwrap();
        let root: i64 = conn
            .query_row(
                "SELECT rootpage FROM sqlite_schema WHERE name = 'vms'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (ps as usize, root as usize)
    };
    let mut bytes = fs::read(&path).unwrap();
    let start = (root - 1) * page_size;
    bytes[start..start + page_size].copy_from_slice(&noise(page_size, 7));
    fs::write(&path, &bytes).unwrap();
    let err = assert_refused_untouched(&path, |e| matches!(e, StoreError::Corrupt { .. }));
    println!("{err}");
}

#[test]
fn foreign_sqlite_database_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE photos (id INTEGER PRIMARY KEY, file TEXT);")
            .unwrap();
    }
    assert_refused_untouched(&path, |e| matches!(e, StoreError::NotMaqet { .. }));

    fs::remove_file(&path).unwrap();
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA application_id = 1234; CREATE TABLE t (x);")
            .unwrap();
    }
    assert_refused_untouched(&path, |e| matches!(e, StoreError::NotMaqet { .. }));
}

#[test]
fn newer_schema_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    populated(&path, 3);
    {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = assert_refused_untouched(&path, |e| {
        matches!(
            e,
            StoreError::NewerSchema {
                found: 99,
                supported: SCHEMA_VERSION,
                ..
            }
        )
    });
    let msg = err.to_string();
    assert!(msg.contains("schema 99"), "{msg}");
    assert!(msg.contains("upgrade maqet"), "{msg}");
}

#[test]
fn orphan_wal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    let wal = open::sidecar(&path, "-wal");
    fs::write(&wal, noise(4096, 3)).unwrap();
    let err = Database::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::OrphanWal { .. }), "{err}");
    assert!(!path.exists(), "no database was created next to the log");
    // An empty file next to it is refused the same way.
    fs::write(&path, b"").unwrap();
    let err = Database::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::OrphanWal { .. }), "{err}");
    // An empty log is nothing to lose.
    fs::write(&wal, b"").unwrap();
    Database::open(&path).unwrap();
}

#[test]
fn lock_held_by_another_connection_is_reported_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    populated(&path, 1);

    // WAL database: readers pass, the write probe at open waits and fails.
    let holder = Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let t0 = Instant::now();
    let err = Database::open_with_options(&path, &fast()).unwrap_err();
    let waited = t0.elapsed();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(err.to_string().contains("fuser"), "{err}");
    holder.execute_batch("ROLLBACK").unwrap();
    drop(holder);

    // Rollback-journal database: even reading waits, then fails.
    {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
    }
    let holder = Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let before = fs::read(&path).unwrap();
    let t0 = Instant::now();
    let err = Database::open_with_options(&path, &fast()).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert!(t0.elapsed() >= Duration::from_millis(150));
    assert_eq!(fs::read(&path).unwrap(), before);
    holder.execute_batch("ROLLBACK").unwrap();
    drop(holder);

    // Released: opens fine (and goes back to WAL).
    let store = Database::open_with_options(&path, &fast()).unwrap();
    assert_eq!(store.load_vms().unwrap().len(), 1);
}

#[test]
fn lock_taken_while_running_fails_writes_with_locked_and_reads_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    let store = Database::open_with_options(&path, &fast()).unwrap();
    store.insert_vm(&vm("a")).unwrap();
    let holder = Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let err = store.insert_vm(&vm("b")).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert_eq!(store.load_vms().unwrap().len(), 1);
    holder.execute_batch("ROLLBACK").unwrap();
    store.insert_vm(&vm("b")).unwrap();
    assert_eq!(store.load_vms().unwrap().len(), 2);
}

// ---- VMs -----------------------------------------------------------------------

#[test]
fn insert_load_get() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let b = vm("b");
    let mut a = vm("a");
    a.pid = Some(4242);
    a.pid_start_time = Some(123_456);
    a.status = "running".into();
    a.started_at = 17;
    a.exit_status = 0;
    store.insert_vm(&b).unwrap();
    store.insert_vm(&a).unwrap();
    assert_eq!(store.load_vms().unwrap(), vec![a.clone(), b.clone()]);
    assert_eq!(store.get_vm(&a.id).unwrap(), Some(a.clone()));
    assert_eq!(store.get_vm_by_name("b").unwrap(), Some(b.clone()));
    assert_eq!(
        store.get_vm(&uuid::Uuid::new_v4().to_string()).unwrap(),
        None
    );
    assert_eq!(store.get_vm_by_name("zzz").unwrap(), None);

    let ev = store.events(Some(&a.id), None, 0).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, "added");
    assert_eq!(ev[0].status.as_deref(), Some("running"));
    assert_eq!(ev[0].vm_name, "a");
}

#[test]
fn names_are_unique_and_ids_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let a = vm("web");
    store.insert_vm(&a).unwrap();

    let err = store.insert_vm(&vm("web")).unwrap_err();
    assert!(
        matches!(&err, StoreError::NameTaken(n) if n == "web"),
        "{err:?}"
    );

    let mut same_id = vm("other");
    same_id.id = a.id.clone();
    let err = store.insert_vm(&same_id).unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");

    let mut upper = vm("upper");
    upper.id = upper.id.to_uppercase();
    let err = store.insert_vm(&upper).unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");

    let mut half_pid = vm("half");
    half_pid.pid = Some(12);
    let err = store.insert_vm(&half_pid).unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");

    assert_eq!(store.load_vms().unwrap(), vec![a]);
    assert_eq!(event_count(&store), 1, "failed inserts leave no event");
}

#[test]
fn transition_updates_row_and_appends_event() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let a = vm("a");
    store.insert_vm(&a).unwrap();

    let rec = store
        .transition(
            &a.id,
            "created",
            &Transition {
                status: "running",
                reason: "started by :1.42",
                pid: Some(Some(777)),
                pid_start_time: Some(Some(99_000)),
                started_at: Some(1_000),
                detail: Some(json!({"qemu": "/usr/bin/qemu-system-x86_64"})),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(rec.status, "running");
    assert_eq!(rec.status_reason, "started by :1.42");
    assert_eq!((rec.pid, rec.pid_start_time), (Some(777), Some(99_000)));
    assert_eq!(
        (rec.started_at, rec.stopped_at, rec.exit_status),
        (1_000, 0, -1)
    );
    assert_eq!(store.get_vm(&a.id).unwrap(), Some(rec.clone()));

    let rec = store
        .transition(
            &a.id,
            "running",
            &Transition {
                status: "stopped",
                reason: "guest powered off",
                pid: Some(None),
                pid_start_time: Some(None),
                stopped_at: Some(2_000),
                exit_status: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((rec.pid, rec.pid_start_time), (None, None));
    assert_eq!(
        (rec.started_at, rec.stopped_at, rec.exit_status),
        (1_000, 2_000, 0)
    );

    let ev = store.events(Some(&a.id), None, 0).unwrap();
    let kinds: Vec<_> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["added", "status", "status"]);
    assert_eq!(ev[1].status.as_deref(), Some("running"));
    assert_eq!(ev[1].previous.as_deref(), Some("created"));
    assert_eq!(ev[1].reason, "started by :1.42");
    assert_eq!(
        ev[1].detail,
        Some(json!({"qemu": "/usr/bin/qemu-system-x86_64"}))
    );
    assert_eq!(ev[2].previous.as_deref(), Some("running"));
    assert_eq!(ev[2].detail, None);

    // A caller with a stale idea of the status still records; history tells the truth.
    store
        .transition(
            &a.id,
            "running",
            &Transition {
                status: "starting",
                ..Default::default()
            },
        )
        .unwrap();
    let last = store.events(Some(&a.id), None, 1).unwrap();
    assert_eq!(last[0].previous.as_deref(), Some("stopped"));
}

#[test]
fn failed_transitions_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let a = vm("a");
    store.insert_vm(&a).unwrap();
    let events = event_count(&store);

    let missing = uuid::Uuid::new_v4().to_string();
    let t = Transition {
        status: "running",
        ..Default::default()
    };
    let err = store.transition(&missing, "created", &t).unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(id) if *id == missing),
        "{err:?}"
    );

    // pid without its start time violates the schema: refused, row untouched.
    let err = store
        .transition(
            &a.id,
            "created",
            &Transition {
                status: "running",
                pid: Some(Some(5)),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");

    assert_eq!(store.get_vm(&a.id).unwrap(), Some(a));
    assert_eq!(event_count(&store), events);
}

#[test]
fn update_config_and_rename() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let a = vm("a");
    let b = vm("b");
    store.insert_vm(&a).unwrap();
    store.insert_vm(&b).unwrap();

    store.update_config(&a.id, "a", "memory: 2G\n").unwrap();
    store.update_config(&a.id, "alpha", "memory: 4G\n").unwrap();
    let got = store.get_vm(&a.id).unwrap().unwrap();
    assert_eq!(
        (got.name.as_str(), got.config.as_str()),
        ("alpha", "memory: 4G\n")
    );
    assert_eq!(store.get_vm_by_name("a").unwrap(), None);

    let ev = store.events(Some(&a.id), None, 0).unwrap();
    let kinds: Vec<_> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["added", "applied", "applied", "renamed"]);
    assert_eq!(ev[0].vm_name, "a");
    assert_eq!(ev[3].vm_name, "alpha");
    assert_eq!(ev[3].detail, Some(json!({"from": "a", "to": "alpha"})));

    let events = event_count(&store);
    let err = store.update_config(&a.id, "b", "x").unwrap_err();
    assert!(
        matches!(&err, StoreError::NameTaken(n) if n == "b"),
        "{err:?}"
    );
    assert_eq!(store.get_vm(&a.id).unwrap(), Some(got));
    assert_eq!(event_count(&store), events);

    let err = store
        .update_config(&uuid::Uuid::new_v4().to_string(), "c", "x")
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert_eq!(event_count(&store), events);
}

#[test]
fn remove_keeps_history_and_frees_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let a = vm("a");
    store.insert_vm(&a).unwrap();
    store.remove_vm(&a.id).unwrap();
    assert_eq!(store.get_vm(&a.id).unwrap(), None);
    assert!(store.load_vms().unwrap().is_empty());

    let ev = store.events(Some(&a.id), None, 0).unwrap();
    let kinds: Vec<_> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["added", "removed"]);
    assert_eq!(ev[1].previous.as_deref(), Some("created"));
    assert_eq!(ev[1].vm_name, "a");

    let err = store.remove_vm(&a.id).unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    store.insert_vm(&vm("a")).unwrap();
}

// ---- events ----------------------------------------------------------------

#[test]
fn events_filter_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let a = vm("a");
    let b = vm("b");
    store.insert_vm(&a).unwrap();
    store.insert_vm(&b).unwrap();
    for i in 0..5 {
        let (v, n) = if i % 2 == 0 { (&a, "a") } else { (&b, "b") };
        let seq = store
            .add_event(
                &v.id,
                n,
                "snapshot",
                &format!("s{i}"),
                Some(&json!({"i": i})),
            )
            .unwrap();
        assert!(seq > 0);
        std::thread::sleep(Duration::from_millis(2));
    }
    // An event for a VM that never existed in the table is fine (history).
    store.add_event("gone", "gone", "note", "", None).unwrap();

    let all = store.events(None, None, 0).unwrap();
    assert_eq!(all.len(), 8);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "oldest first");
    assert!(all.windows(2).all(|w| w[0].time <= w[1].time));

    let of_a = store.events(Some(&a.id), None, 0).unwrap();
    let reasons: Vec<_> = of_a.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, ["", "s0", "s2", "s4"]);
    assert_eq!(of_a[1].detail, Some(json!({"i": 0})));

    let last2 = store.events(Some(&a.id), None, 2).unwrap();
    let reasons: Vec<_> = last2.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, ["s2", "s4"], "the newest, newest last");

    let since = all[4].time;
    let recent = store.events(None, Some(since), 0).unwrap();
    let expected: Vec<_> = all.iter().filter(|e| e.time >= since).cloned().collect();
    assert_eq!(recent, expected);
    let recent_a = store.events(Some(&a.id), Some(since), 1).unwrap();
    assert_eq!(recent_a.len(), 1);
    assert_eq!(recent_a[0].reason, "s4");

    assert_eq!(store.prune_events(since).unwrap(), 4);
    assert_eq!(store.events(None, None, 0).unwrap(), expected);
    let err = store.add_event(&a.id, "a", "", "", None).unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
}

// ---- created files ---------------------------------------------------------

#[test]
fn created_files_roundtrip_and_cascade() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let a = vm("a");
    store.insert_vm(&a).unwrap();
    let disk = Path::new("/home/u/.local/share/maqet/vms/a/disk.qcow2");
    let seed = Path::new("/home/u/.local/share/maqet/vms/a/seed.img");
    store.record_created_file(&a.id, disk, "raw").unwrap();
    store.record_created_file(&a.id, seed, "raw").unwrap();
    store.record_created_file(&a.id, disk, "qcow2").unwrap(); // upsert
    let files = store.created_files(&a.id).unwrap();
    let mut got: Vec<_> = files
        .iter()
        .map(|f| (f.path.as_path(), f.format.as_str()))
        .collect();
    got.sort();
    assert_eq!(got, [(disk, "qcow2"), (seed, "raw")]);

    assert!(store.forget_created_file(&a.id, seed).unwrap());
    assert!(!store.forget_created_file(&a.id, seed).unwrap());
    assert_eq!(store.created_files(&a.id).unwrap().len(), 1);

    let err = store
        .record_created_file(&a.id, Path::new("disk.qcow2"), "qcow2")
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
    let err = store
        .record_created_file(&uuid::Uuid::new_v4().to_string(), disk, "qcow2")
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

    store.remove_vm(&a.id).unwrap();
    assert!(store.created_files(&a.id).unwrap().is_empty());
    assert_eq!(count(&store, "SELECT count(*) FROM storage_files"), 0);
}

// ---- audit -------------------------------------------------------------------

fn audit_row(time: u64, vm_id: Option<&str>, decision: AuditDecision) -> AuditRow {
    AuditRow {
        seq: 0,
        time,
        caller_uid: Some(1000),
        caller_pid: Some(4321),
        caller_name: Some(":1.42".into()),
        action: "org.maqet.vm.lifecycle".into(),
        vm_id: vm_id.map(str::to_owned),
        method: Some("org.maqet.Maqet1.VM.Start".into()),
        arguments: Some("()".into()),
        decision,
        outcome: Some(match decision {
            AuditDecision::Allow => "ok".into(),
            AuditDecision::Deny => "AccessDenied".into(),
        }),
        message: None,
    }
}

#[test]
fn audit_insert_list_prune() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let rows = [
        audit_row(100, Some("vm-1"), AuditDecision::Allow),
        audit_row(200, Some("vm-2"), AuditDecision::Deny),
        audit_row(300, Some("vm-1"), AuditDecision::Allow),
        audit_row(400, None, AuditDecision::Allow),
    ];
    let mut seqs = Vec::new();
    for r in &rows {
        seqs.push(store.insert_audit(r).unwrap());
    }
    let all = store.audit(None, None, 0).unwrap();
    assert_eq!(all.len(), 4);
    for ((got, want), seq) in all.iter().zip(&rows).zip(&seqs) {
        assert_eq!(
            got,
            &AuditRow {
                seq: *seq,
                ..want.clone()
            }
        );
    }
    let vm1 = store.audit(Some("vm-1"), None, 0).unwrap();
    assert_eq!(vm1.iter().map(|r| r.time).collect::<Vec<_>>(), [100, 300]);
    let recent = store.audit(None, Some(200), 2).unwrap();
    assert_eq!(
        recent.iter().map(|r| r.time).collect::<Vec<_>>(),
        [300, 400]
    );

    assert_eq!(store.prune_audit(250).unwrap(), 2);
    assert_eq!(store.audit(None, None, 0).unwrap().len(), 2);
    assert_eq!(store.prune_audit(250).unwrap(), 0);

    for t in 500..510 {
        store
            .insert_audit(&audit_row(t, None, AuditDecision::Allow))
            .unwrap();
    }
    assert_eq!(store.prune_audit_keep_last(3).unwrap(), 9);
    let left = store.audit(None, None, 0).unwrap();
    assert_eq!(
        left.iter().map(|r| r.time).collect::<Vec<_>>(),
        [507, 508, 509]
    );
    assert_eq!(store.prune_audit_keep_last(3).unwrap(), 0);
    assert_eq!(store.prune_audit_keep_last(0).unwrap(), 3);
    // seq keeps growing after the table was emptied.
    let seq = store
        .insert_audit(&audit_row(600, None, AuditDecision::Allow))
        .unwrap();
    assert!(seq > *seqs.last().unwrap() + 10);
}

#[test]
fn audit_stamps_time_and_clips_long_text() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let mut row = audit_row(0, None, AuditDecision::Allow);
    row.arguments = Some("é".repeat(10_000));
    let before = now_us();
    store.insert_audit(&row).unwrap();
    let got = store.audit(None, None, 0).unwrap().remove(0);
    assert!(got.time >= before && got.time <= now_us());
    let args = got.arguments.unwrap();
    assert!(args.len() < AUDIT_TEXT_MAX + 64, "{}", args.len());
    assert!(args.ends_with("more bytes]"), "{args}");
}

#[test]
fn prune_works_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    {
        let mut conn = store.lock();
        let tx = conn.transaction().unwrap();
        for t in 0..(PRUNE_BATCH * 2 + 10) {
            tx.execute(
                "INSERT INTO audit (time, action, decision) VALUES (?1, 'a', 'allow')",
                [t],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    assert_eq!(
        store.prune_audit(u64::MAX).unwrap(),
        (PRUNE_BATCH * 2 + 10) as usize
    );
}

// ---- scale and failure -----------------------------------------------------

#[test]
fn load_10000_vms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    {
        let mut conn = store.lock();
        let tx = conn.transaction().unwrap();
        for i in 0..10_000 {
            let r = vm(&format!("vm-{i:05}"));
            tx.execute(
                "INSERT INTO vms (id, name, config, status, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![r.id, r.name, r.config, r.status, r.created_at as i64],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let t0 = Instant::now();
    let all = store.load_vms().unwrap();
    let took = t0.elapsed();
    println!("load_vms of {} rows took {took:?}", all.len());
    assert_eq!(all.len(), 10_000);
    assert_eq!(all[0].name, "vm-00000");
    assert_eq!(all[9_999].name, "vm-09999");
}

#[test]
fn disk_full_is_reported_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let a = vm("a");
    store.insert_vm(&a).unwrap();
    let events = event_count(&store);
    // Cap the database at its current size: the next growth is SQLITE_FULL.
    {
        let conn = store.lock();
        let pages: i64 = conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        let _: i64 = conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get(0)
            })
            .unwrap();
    }
    let big = "x".repeat(256 * 1024);
    let err = store.update_config(&a.id, "renamed", &big).unwrap_err();
    assert!(matches!(err, StoreError::Full { .. }), "{err:?}");
    assert!(err.to_string().contains("nothing was committed"), "{err}");
    assert_eq!(store.get_vm(&a.id).unwrap(), Some(a.clone()));
    assert_eq!(event_count(&store), events);

    let mut b = vm("b");
    b.config = big.clone();
    let err = store.insert_vm(&b).unwrap_err();
    assert!(matches!(err, StoreError::Full { .. }), "{err:?}");
    assert_eq!(store.load_vms().unwrap(), vec![a.clone()]);
    assert_eq!(event_count(&store), events);

    // Space is back: the same store keeps working.
    {
        let conn = store.lock();
        let _: i64 = conn
            .query_row("PRAGMA max_page_count = 1000000", [], |r| r.get(0))
            .unwrap();
    }
    store.update_config(&a.id, "renamed", &big).unwrap();
    assert_eq!(store.get_vm(&a.id).unwrap().unwrap().name, "renamed");
}

#[test]
fn sqlite_codes_are_classified_everywhere() {
    let path = Path::new("/tmp/x.db");
    let err =
        |code| StoreError::Sqlite(rusqlite::Error::SqliteFailure(ffi::Error::new(code), None));
    assert!(matches!(
        err(ffi::SQLITE_FULL).classify(path),
        StoreError::Full { .. }
    ));
    assert!(matches!(
        err(ffi::SQLITE_BUSY).classify(path),
        StoreError::Locked { .. }
    ));
    assert!(matches!(
        err(ffi::SQLITE_LOCKED).classify(path),
        StoreError::Locked { .. }
    ));
    assert!(matches!(
        err(ffi::SQLITE_CORRUPT).classify(path),
        StoreError::Corrupt { .. }
    ));
    assert!(matches!(
        err(ffi::SQLITE_NOTADB).classify(path),
        StoreError::Corrupt { .. }
    ));
    assert!(matches!(
        err(ffi::SQLITE_READONLY).classify(path),
        StoreError::ReadOnly { .. }
    ));
    assert!(matches!(
        err(ffi::SQLITE_MISUSE).classify(path),
        StoreError::Sqlite(_)
    ));
    assert!(matches!(
        StoreError::NameTaken("x".into()).classify(path),
        StoreError::NameTaken(_)
    ));
}

#[test]
fn read_only_database_is_refused_clearly() {
    // Root ignores file modes; nothing to test there.
    if rustix::process::geteuid().is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = db_in(&dir);
    populated(&path, 1);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    let err = Database::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::ReadOnly { .. }), "{err:?}");
}

#[test]
fn audit_batches_land_in_order_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = Database::open(&db_in(&dir)).unwrap();
    let rows: Vec<_> = (1..=3)
        .map(|t| audit_row(t, None, AuditDecision::Allow))
        .collect();
    store.insert_audits(&rows).unwrap();
    let got = store.audit(None, None, 0).unwrap();
    assert_eq!(got.iter().map(|r| r.time).collect::<Vec<_>>(), [1, 2, 3]);
    // One bad row (a time beyond i64) refuses the whole batch.
    let mut bad = rows.clone();
    bad[1].time = u64::MAX;
    assert!(store.insert_audits(&bad).is_err());
    assert_eq!(store.audit(None, None, 0).unwrap().len(), 3);
}

// ---- supervision (tpm_processes, restart_crashes) ---------------------------

#[test]
fn a_vms_swtpm_is_recorded_replaced_and_goes_with_the_vm() {
    let db = Database::open_in_memory().unwrap();
    let rec = vm("tpm");
    db.insert_vm(&rec).unwrap();
    assert_eq!(db.tpm_process(&rec.id).unwrap(), None);
    db.record_tpm_process(&rec.id, 42, 7).unwrap();
    db.record_tpm_process(&rec.id, 43, 8).unwrap();
    assert_eq!(db.tpm_process(&rec.id).unwrap(), Some((43, 8)));
    assert!(matches!(
        db.record_tpm_process(&uuid::Uuid::new_v4().to_string(), 1, 1),
        Err(StoreError::NotFound(_))
    ));
    assert!(db.forget_tpm_process(&rec.id).unwrap());
    assert!(!db.forget_tpm_process(&rec.id).unwrap());
    db.record_tpm_process(&rec.id, 43, 8).unwrap();
    db.remove_vm(&rec.id).unwrap();
    assert_eq!(db.tpm_process(&rec.id).unwrap(), None);
}

#[test]
fn crashes_are_counted_within_their_window_only() {
    let db = Database::open_in_memory().unwrap();
    let rec = vm("phoenix");
    db.insert_vm(&rec).unwrap();
    let window = 600_000_000;
    assert_eq!(db.record_crash(&rec.id, 1_000, window).unwrap(), [1_000]);
    assert_eq!(
        db.record_crash(&rec.id, 2_000, window).unwrap(),
        [1_000, 2_000]
    );
    // Ten minutes after the first, it no longer counts.
    let later = 1_000 + window;
    assert_eq!(
        db.record_crash(&rec.id, later, window).unwrap(),
        [2_000, later]
    );
    assert_eq!(db.crashes(&rec.id).unwrap(), [2_000, later]);
    db.clear_crashes(&rec.id).unwrap();
    assert!(db.crashes(&rec.id).unwrap().is_empty());
    db.record_crash(&rec.id, later, window).unwrap();
    db.remove_vm(&rec.id).unwrap();
    assert!(db.crashes(&rec.id).unwrap().is_empty());
}
