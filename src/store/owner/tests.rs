//! The owner thread: group commit, savepoint isolation, failure propagation, kept
//! records, recreation of a deleted file.

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use rusqlite::Connection;

use super::*;
use crate::store::VmRecord;

fn vm(name: &str) -> VmRecord {
    VmRecord::new(
        uuid::Uuid::new_v4().to_string(),
        name.into(),
        format!("name: {name}\n"),
        "created",
        1,
    )
}

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("maqet.db")
}

fn fast() -> StoreOptions {
    StoreOptions {
        busy_timeout: Duration::from_millis(200),
    }
}

/// Names of the VMs in the file, read by a connection of our own (as another process
/// would).
fn names_in_file(path: &Path) -> Vec<String> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn.prepare("SELECT name FROM vms ORDER BY name").unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

/// Holds the owner inside a read until the returned sender is dropped, so that what
/// is queued meanwhile forms one batch.
fn hold_owner(store: &std::sync::Arc<Store>) -> std_mpsc::Sender<()> {
    let (release, wait) = std_mpsc::channel::<()>();
    let (started, running) = std_mpsc::channel();
    let store = store.clone();
    tokio::spawn(async move {
        store
            .read(move |_| {
                started.send(()).unwrap();
                let _ = wait.recv();
                Ok(())
            })
            .await
    });
    running.recv().unwrap();
    release
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_share_one_transaction_and_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(&db_path(&dir)).unwrap());
    let release = hold_owner(&store);
    let (a, a2, b) = (vm("a"), vm("a"), vm("b"));
    // Each write reports whether it ran inside a transaction it did not open itself.
    let w1 = store.write(move |db| {
        db.insert_vm(&a)?;
        Ok(db.is_autocommit())
    });
    let w2 = store.write(move |db| {
        db.insert_vm(&a2)?;
        Ok(db.is_autocommit())
    });
    let w3 = store.write(move |db| {
        db.insert_vm(&b)?;
        Ok(db.is_autocommit())
    });
    // `join!` polls in order: the three are queued, then the owner is let go.
    let (r1, r2, r3, ()) = tokio::join!(w1, w2, w3, async { drop(release) });
    assert!(!r1.unwrap(), "ran inside the group's transaction");
    let dup = r2.unwrap_err();
    assert!(
        matches!(dup, StoreError::NameTaken(ref n) if n == "a"),
        "{dup:?}"
    );
    assert!(!r3.unwrap());
    // The failing request rolled back alone: its neighbours were committed.
    assert_eq!(names_in_file(&db_path(&dir)), ["a", "b"]);
}

#[tokio::test]
async fn a_panicking_request_fails_alone_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&db_path(&dir)).unwrap();
    let half = vm("half");
    let err = store
        .write(move |db| -> Result<(), StoreError> {
            db.insert_vm(&half)?;
            panic!("simulated bug in the middle of a request");
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    let whole = vm("whole");
    store.write(move |db| db.insert_vm(&whole)).await.unwrap();
    assert_eq!(names_in_file(&db_path(&dir)), ["whole"]);
}

#[tokio::test]
async fn a_lock_held_elsewhere_fails_writes_with_locked_and_kept_records_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Store::open_with_options(&path, &fast()).unwrap();
    let other = Connection::open(&path).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let refused = vm("refused");
    let err = store
        .write(move |db| db.insert_vm(&refused))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert!(
        err.to_string().contains("locked by another process"),
        "{err}"
    );

    let kept = vm("kept");
    let first = store
        .write_kept("test", move |db| db.insert_vm(&kept))
        .await
        .unwrap_err();
    assert!(first.is_transient(), "{first:?}");
    // Reads still work (WAL: a writer elsewhere does not block them).
    assert!(store.read(|db| db.load_vms()).await.unwrap().is_empty());
    let health = store.health().await;
    assert_eq!(health.waiting, 1);
    assert!(health.problem.unwrap().contains("locked"));

    other.execute_batch("COMMIT").unwrap();
    store.flush().await;
    assert_eq!(names_in_file(&path), ["kept"]);
    assert_eq!(store.health().await.waiting, 0);
}

#[tokio::test]
async fn kept_records_that_are_wrong_in_themselves_are_dropped_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&db_path(&dir)).unwrap();
    let err = store
        .write_kept("test", |db| {
            db.transition(
                "00000000-0000-4000-8000-000000000000",
                "created",
                &crate::store::Transition {
                    status: "running",
                    ..Default::default()
                },
            )
            .map(|_| ())
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert_eq!(store.health().await.waiting, 0);
}

#[tokio::test]
async fn lazy_records_are_written_within_the_deadline_without_company() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&db_path(&dir)).unwrap();
    let v = vm("lazy");
    store.write_lazy("test", move |db| db.insert_vm(&v));
    let deadline = std::time::Instant::now() + LAZY_DELAY * 5;
    // Wait for the state with a timeout (the owner's own deadline writes it).
    loop {
        if names_in_file(&db_path(&dir)) == ["lazy"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lazy record never written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_deleted_database_is_recreated_with_everything_it_held() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Store::open(&path).unwrap();
    let before = vm("before");
    store.write(move |db| db.insert_vm(&before)).await.unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    assert!(!path.exists());
    let after = vm("after");
    store.write(move |db| db.insert_vm(&after)).await.unwrap();
    assert!(path.exists(), "recreated at the same path");
    assert_eq!(names_in_file(&path), ["after", "before"]);
    let health = store.health().await;
    assert_eq!(health.recreated, 1);
    assert!(!health.unlinked);
    let rows = store.read(|db| db.audit(None, None, 0)).await.unwrap();
    assert!(
        rows.iter()
            .any(|r| r.method.as_deref() == Some("RecreateDatabase")),
        "the recreation is audited: {rows:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn pruning_keeps_the_owners_rows_when_strangers_flood_the_log() {
    let store = Store::open_in_memory().unwrap();
    let row = |uid: u32, time: u64| AuditRow {
        seq: 0,
        time,
        caller_uid: Some(uid),
        caller_pid: None,
        caller_name: None,
        action: "org.maqet.vm.lifecycle".into(),
        vm_id: None,
        method: Some("Start".into()),
        arguments: None,
        decision: if uid == 1000 {
            AuditDecision::Allow
        } else {
            AuditDecision::Deny
        },
        outcome: None,
        message: None,
    };
    store
        .write(move |db| {
            for t in 1..=50 {
                db.insert_audit(&row(1000, t))?;
            }
            for t in 51..=500 {
                db.insert_audit(&row(1002, t))?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let pruned = store
        .write(|db| db.prune_audit_caps(1000, 100, 20))
        .await
        .unwrap();
    assert_eq!(pruned, 430);
    let rows = store.read(|db| db.audit(None, None, 0)).await.unwrap();
    let own = rows.iter().filter(|r| r.caller_uid == Some(1000)).count();
    let strangers: Vec<_> = rows.iter().filter(|r| r.caller_uid == Some(1002)).collect();
    assert_eq!(own, 50, "every one of the owner's rows survives");
    assert_eq!(strangers.len(), 20);
    assert_eq!(
        strangers[0].time, 481,
        "the newest strangers' rows are kept"
    );
}

#[test]
fn an_owner_with_nothing_waiting_has_no_deadline_even_after_a_failure() {
    let mut owner = Owner::new(Database::open_in_memory().unwrap());
    assert!(owner.deadline().is_none());
    // A batch of plain requests failed: their callers were told, nothing waits.
    owner.schedule_retry();
    assert!(owner.deadline().is_none(), "an idle owner must not wake");
    owner.keep(Kept {
        what: "test",
        apply: Box::new(|_| Ok(())),
        ack: None,
    });
    owner.schedule_retry();
    assert!(owner.deadline().is_some(), "a waiting record is retried");
}

#[tokio::test]
async fn another_file_moved_into_place_is_never_written_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Store::open(&path).unwrap();
    let first = vm("first");
    store.write(move |db| db.insert_vm(&first)).await.unwrap();
    // Someone moves another file (a backup, another program's) to the path.
    let other = dir.path().join("other.db");
    std::fs::write(&other, b"not ours").unwrap();
    std::fs::rename(&other, &path).unwrap();
    let second = vm("second");
    let err = store
        .write(move |db| db.insert_vm(&second))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Replaced { .. }), "{err:?}");
    assert!(
        err.to_string().contains("replaced by another file"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"not ours", "left untouched");
    let health = store.health().await;
    assert!(health.unlinked && health.problem.is_some(), "{health:?}");
}
