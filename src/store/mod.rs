//! maqetd's state: one SQLite database (WAL, schema versioned by
//! `PRAGMA user_version`).
//!
//! This module owns the database file at the path it is given, and its
//! `-wal` / `-shm` companions: it creates, validates, migrates, reads and
//! writes them, and nothing else does. maqetd is the only writer and holds one
//! [`Store`]: the async handle on the thread that owns the [`Database`]
//! (`owner.rs`: group commit, records kept while the database refuses writes,
//! recreation of a deleted file). The CLI never opens the database.
//!
//! It does not:
//! - choose the path or create its directory (the paths module does);
//! - know the lifecycle state machine: `status` is whatever the lifecycle
//!   module says; the store records transitions atomically with their events;
//! - touch disk images: it only remembers which ones maqet created
//!   ([`Database::record_created_file`]) so that removal can delete exactly those;
//! - decide policy: it stores audit rows it is handed.
//!
//! Every [`Database`] method runs a few short statements in one savepoint and
//! returns; on the owner thread that savepoint nests in the batch's transaction.
//! A damaged, foreign, newer or locked database is refused with an error that
//! names the file and says what to do; it is never recreated over the user's
//! data (see `open.rs`).

pub mod call_audit;
mod error;
mod images;
mod open;
mod owner;
mod schema;
mod supervision;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::cell::{RefCell, RefMut};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, ffi, params};
use serde::{Deserialize, Serialize};

pub use error::StoreError;
pub use images::ImageRecord;
pub use open::StoreOptions;
pub use owner::{Health, LAZY_DELAY, MAX_KEPT, Store};
pub use schema::SCHEMA_VERSION;

use error::{constraint_to_invalid, sqlite_failure, vm_row_error};

/// Rows deleted per statement when pruning, so that a big prune never holds
/// the connection (and the write lock) for long.
const PRUNE_BATCH: i64 = 5_000;

/// Longest `arguments` / `message` stored in an audit row, in bytes; the rest
/// is cut (a `TypeText` or `Apply` argument can be arbitrarily long).
pub const AUDIT_TEXT_MAX: usize = 4096;

/// Microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// One VM: its definition and its last recorded runtime state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Canonical lowercase hyphenated UUID, immutable.
    pub id: String,
    pub name: String,
    /// Merged YAML.
    pub config: String,
    pub status: String,
    pub status_reason: String,
    /// Set together with `pid_start_time` or not at all (schema CHECK).
    pub pid: Option<u32>,
    /// Clock ticks since boot, field 22 of `/proc/<pid>/stat`.
    pub pid_start_time: Option<u64>,
    /// µs since the Unix epoch; 0 = never for the three timestamps.
    pub created_at: u64,
    pub started_at: u64,
    pub stopped_at: u64,
    /// -1 = unknown / none.
    pub exit_status: i32,
}

impl VmRecord {
    /// A never-started VM: no pid, timestamps 0 but `created_at`, exit status -1.
    pub fn new(id: String, name: String, config: String, status: &str, created_at: u64) -> Self {
        VmRecord {
            id,
            name,
            config,
            status: status.to_owned(),
            status_reason: String::new(),
            pid: None,
            pid_start_time: None,
            created_at,
            started_at: 0,
            stopped_at: 0,
            exit_status: -1,
        }
    }
}

/// A status change for [`Database::transition`]. `None` fields stay unchanged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transition<'a> {
    pub status: &'a str,
    pub reason: &'a str,
    /// `None` = unchanged, `Some(None)` = clear, `Some(Some(pid))` = set.
    pub pid: Option<Option<u32>>,
    /// Same convention as `pid`; the two must end up both set or both clear.
    pub pid_start_time: Option<Option<u64>>,
    pub started_at: Option<u64>,
    pub stopped_at: Option<u64>,
    pub exit_status: Option<i32>,
    /// Stored in the `status` event.
    pub detail: Option<serde_json::Value>,
}

/// One row of the lifecycle history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Increasing, never reused.
    pub seq: i64,
    /// µs since the Unix epoch, stamped by the store.
    pub time: u64,
    pub vm_id: String,
    /// The VM's name when the event happened.
    pub vm_name: String,
    /// `added`, `status`, `applied`, `renamed`, `removed`, or anything passed
    /// to [`Database::add_event`] (`snapshot`, ...).
    pub kind: String,
    pub status: Option<String>,
    pub previous: Option<String>,
    pub reason: String,
    pub detail: Option<serde_json::Value>,
}

/// Whether the policy let a call through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditDecision {
    Allow,
    Deny,
}

impl AuditDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditDecision::Allow => "allow",
            AuditDecision::Deny => "deny",
        }
    }
}

/// One audited call. The store's convention is one row per call, written
/// once the outcome is known: `decision` = what the policy said, `outcome` =
/// `ok` or the D-Bus error kind (`AccessDenied` for a denied call, `NotFound`,
/// ...). Rows are never updated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    /// Assigned by the store; ignored by [`Database::insert_audit`].
    pub seq: i64,
    /// µs since the Unix epoch; 0 = let the store stamp it.
    pub time: u64,
    pub caller_uid: Option<u32>,
    pub caller_pid: Option<u32>,
    /// The caller's unique bus name (`:1.42`).
    pub caller_name: Option<String>,
    /// The polkit-style action, e.g. `org.maqet.vm.lifecycle`.
    pub action: String,
    pub vm_id: Option<String>,
    /// D-Bus method, e.g. `org.maqet.Maqet1.VM.Start`.
    pub method: Option<String>,
    /// Summary of the arguments (cut at [`AUDIT_TEXT_MAX`] bytes).
    pub arguments: Option<String>,
    pub decision: AuditDecision,
    pub outcome: Option<String>,
    /// Cut at [`AUDIT_TEXT_MAX`] bytes.
    pub message: Option<String>,
}

/// A disk image maqet created for a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedFile {
    /// Absolute.
    pub path: PathBuf,
    /// `qcow2`, `raw`, ...
    pub format: String,
    pub created_at: u64,
}

/// The open database: synchronous, on one thread at a time. maqetd moves it onto the
/// owner thread ([`Store`]) and never touches it from anywhere else; every method
/// runs its statements in a savepoint of its own, so it is atomic alone and nests in
/// the owner's group commit.
pub struct Database {
    path: PathBuf,
    options: StoreOptions,
    /// Device and inode of the file at open (or recreation), to notice it was
    /// deleted or replaced under us; `None` in memory.
    identity: Option<(u64, u64)>,
    conn: RefCell<Connection>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("path", &self.path)
            .finish()
    }
}

/// Column list of `vms`, in the order `vm_from_row` reads it.
macro_rules! vm_columns {
    () => {
        "id, name, config, status, status_reason, pid, pid_start_time, \
         created_at, started_at, stopped_at, exit_status"
    };
}

const EVENT_COLUMNS: &str = "seq, time, vm_id, vm_name, kind, status, previous, reason, detail";
const AUDIT_COLUMNS: &str = "seq, time, caller_uid, caller_pid, caller_name, action, vm_id, \
                             method, arguments, decision, outcome, message";

impl Database {
    /// Opens the database at `path`, creating it (mode 0600) if missing; the
    /// directory must exist. Refuses, without writing anything, a file that is
    /// not a healthy maqet database of a schema this build knows. Default
    /// [`StoreOptions`] (3 s busy timeout).
    pub fn open(path: &Path) -> Result<Database, StoreError> {
        Database::open_with_options(path, &StoreOptions::default())
    }

    /// [`Database::open`] with explicit options.
    pub fn open_with_options(path: &Path, options: &StoreOptions) -> Result<Database, StoreError> {
        let conn = open::open(path, options)?;
        Ok(Database {
            path: path.to_path_buf(),
            options: options.clone(),
            identity: open::identity(path),
            conn: RefCell::new(conn),
        })
    }

    /// A fresh database in memory, for a service that must answer calls while its real
    /// database is refused (every call is then answered with the refusal).
    pub fn open_in_memory() -> Result<Database, StoreError> {
        let path = Path::new(":memory:");
        let mut conn =
            Connection::open_in_memory().map_err(|e| StoreError::from(e).classify(path))?;
        schema::migrate(&mut conn).map_err(|e| StoreError::from(e).classify(path))?;
        Ok(Database {
            path: path.to_path_buf(),
            options: StoreOptions::default(),
            identity: None,
            conn: RefCell::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection and gives SQLite errors their meaning
    /// (full, locked, corrupt...). Every public method goes through here.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        f(&mut conn).map_err(|e| e.classify(&self.path))
    }

    /// The connection, for one statement or method at a time (never held while
    /// another method runs).
    fn lock(&self) -> RefMut<'_, Connection> {
        self.conn.borrow_mut()
    }

    /// Whether the file this connection writes is still the one at its path:
    /// `Ok(true)` when it is, `Ok(false)` when the path no longer exists (the file
    /// was deleted while open: writes would land in an unlinked inode and vanish
    /// with maqetd), an error when another file took its place.
    pub fn file_is_linked(&self) -> Result<bool, StoreError> {
        let Some(ours) = self.identity else {
            return Ok(true);
        };
        match open::identity_checked(&self.path) {
            Ok(Some(found)) if found == ours => Ok(true),
            Ok(Some(_)) => Err(StoreError::Replaced {
                path: self.path.clone(),
            }),
            Ok(None) => Ok(false),
            Err(source) => Err(StoreError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Writes a new database file at the path from the one still open (deleted from
    /// its directory but intact behind our descriptor: every VM, history and audit
    /// row), then continues on the new file. Used when [`Database::file_is_linked`]
    /// says the file is gone.
    pub fn recreate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let io = |source: std::io::Error| StoreError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        let fresh = open::sidecar(&path, ".recreated");
        let _ = std::fs::remove_file(&fresh);
        {
            let conn = self.lock();
            // Everything committed moves from the log into the (unlinked) file, so
            // the copy below holds it and the log left at the path is empty.
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .map_err(|e| StoreError::from(e).classify(&path))?;
            let target = fresh.to_str().ok_or_else(|| {
                StoreError::InvalidArgument(format!("{} is not valid UTF-8", fresh.display()))
            })?;
            conn.execute("VACUUM INTO ?1", [target])
                .map_err(|e| StoreError::from(e).classify(&path))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        // Close the old file; its -wal/-shm (if still at the path) are empty leftovers
        // that would otherwise be taken as the new file's log.
        let placeholder = Connection::open_in_memory()?;
        drop(std::mem::replace(&mut *self.lock(), placeholder));
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(open::sidecar(&path, suffix));
        }
        std::fs::rename(&fresh, &path).map_err(io)?;
        let conn = open::open(&path, &self.options)?;
        *self.lock() = conn;
        self.identity = open::identity(&path);
        Ok(())
    }

    /// Runs raw SQL (transaction control of the owner's group commit).
    pub(crate) fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        self.lock()
            .execute_batch(sql)
            .map_err(|e| StoreError::from(e).classify(&self.path))
    }

    /// No transaction is open (SQLite rolled the whole one back, e.g. on a full disk).
    pub(crate) fn is_autocommit(&self) -> bool {
        self.lock().is_autocommit()
    }

    // ---- VMs -------------------------------------------------------------

    /// Inserts a new VM and its `added` event, in one transaction.
    /// [`StoreError::NameTaken`] if the name is in use.
    pub fn insert_vm(&self, rec: &VmRecord) -> Result<(), StoreError> {
        check_uuid(&rec.id)?;
        let created_at = to_i64(rec.created_at, "created_at")?;
        let started_at = to_i64(rec.started_at, "started_at")?;
        let stopped_at = to_i64(rec.stopped_at, "stopped_at")?;
        let pid_start_time = rec
            .pid_start_time
            .map(|t| to_i64(t, "pid_start_time"))
            .transpose()?;
        self.with_conn(|conn| {
            let tx = conn.savepoint()?;
            tx.prepare_cached(concat!(
                "INSERT INTO vms (",
                vm_columns!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ))?
            .execute(params![
                rec.id,
                rec.name,
                rec.config,
                rec.status,
                rec.status_reason,
                rec.pid,
                pid_start_time,
                created_at,
                started_at,
                stopped_at,
                rec.exit_status,
            ])
            .map_err(|e| vm_write_error(e, &rec.id, &rec.name))?;
            insert_event(
                &tx,
                &NewEvent {
                    vm_id: &rec.id,
                    vm_name: &rec.name,
                    kind: "added",
                    status: Some(&rec.status),
                    previous: None,
                    reason: &rec.status_reason,
                    detail: None,
                },
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Every VM, ordered by name. One query.
    pub fn load_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt =
                conn.prepare_cached(concat!("SELECT ", vm_columns!(), " FROM vms ORDER BY name"))?;
            let rows = stmt.query_map([], vm_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// The VM with this id, if any.
    pub fn get_vm(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        self.with_conn(|conn| {
            Ok(conn
                .prepare_cached(concat!("SELECT ", vm_columns!(), " FROM vms WHERE id = ?1"))?
                .query_row([id], vm_from_row)
                .optional()?)
        })
    }

    /// The VM with this name, if any.
    pub fn get_vm_by_name(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        self.with_conn(|conn| {
            Ok(conn
                .prepare_cached(concat!(
                    "SELECT ",
                    vm_columns!(),
                    " FROM vms WHERE name = ?1"
                ))?
                .query_row([name], vm_from_row)
                .optional()?)
        })
    }

    /// One transaction: updates the row's status fields and appends a
    /// `status` event; returns the updated record. [`StoreError::NotFound`]
    /// (and nothing written) if the row is gone.
    ///
    /// The event's `previous` is the status the row held, read in the same
    /// transaction, so the history never lies. `previous` is what the caller
    /// believed it to be; a mismatch (the in-memory state drifted, e.g. after
    /// a failed write) is logged as a warning, not refused, so that a VM can
    /// never get stuck unable to record its real state.
    pub fn transition(
        &self,
        id: &str,
        previous: &str,
        t: &Transition<'_>,
    ) -> Result<VmRecord, StoreError> {
        let pid_start_time = match t.pid_start_time {
            Some(Some(v)) => Some(to_i64(v, "pid_start_time")?),
            _ => None,
        };
        let started_at = t.started_at.map(|v| to_i64(v, "started_at")).transpose()?;
        let stopped_at = t.stopped_at.map(|v| to_i64(v, "stopped_at")).transpose()?;
        let detail = t.detail.as_ref();
        self.with_conn(|conn| {
            let tx = conn.savepoint()?;
            let Some((name, stored)) = vm_name_status(&tx, id)? else {
                return Err(StoreError::NotFound(id.to_owned()));
            };
            if stored != previous {
                tracing::warn!(vm = %name, id, expected = previous, stored = %stored,
                    status = t.status, "status transition from an unexpected stored status");
            }
            let rec = tx
                .prepare_cached(concat!(
                    "UPDATE vms SET status = ?2, status_reason = ?3, \
                     pid = CASE WHEN ?4 THEN ?5 ELSE pid END, \
                     pid_start_time = CASE WHEN ?6 THEN ?7 ELSE pid_start_time END, \
                     started_at = coalesce(?8, started_at), \
                     stopped_at = coalesce(?9, stopped_at), \
                     exit_status = coalesce(?10, exit_status) \
                     WHERE id = ?1 RETURNING ",
                    vm_columns!()
                ))?
                .query_row(
                    params![
                        id,
                        t.status,
                        t.reason,
                        t.pid.is_some(),
                        t.pid.flatten(),
                        t.pid_start_time.is_some(),
                        pid_start_time,
                        started_at,
                        stopped_at,
                        t.exit_status,
                    ],
                    vm_from_row,
                )
                .map_err(constraint_to_invalid)?;
            insert_event(
                &tx,
                &NewEvent {
                    vm_id: id,
                    vm_name: &name,
                    kind: "status",
                    status: Some(t.status),
                    previous: Some(&stored),
                    reason: t.reason,
                    detail,
                },
            )?;
            tx.commit()?;
            Ok(rec)
        })
    }

    /// Replaces the name and merged config, with an `applied` event and, when
    /// the name changes, a `renamed` event (`detail: {"from", "to"}`); one
    /// transaction. [`StoreError::NameTaken`] / [`StoreError::NotFound`].
    pub fn update_config(&self, id: &str, name: &str, config: &str) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            let tx = conn.savepoint()?;
            let Some((old_name, _)) = vm_name_status(&tx, id)? else {
                return Err(StoreError::NotFound(id.to_owned()));
            };
            tx.prepare_cached("UPDATE vms SET name = ?2, config = ?3 WHERE id = ?1")?
                .execute(params![id, name, config])
                .map_err(|e| vm_write_error(e, id, name))?;
            let mut event = NewEvent {
                vm_id: id,
                vm_name: name,
                kind: "applied",
                status: None,
                previous: None,
                reason: "",
                detail: None,
            };
            insert_event(&tx, &event)?;
            if old_name != name {
                let detail = serde_json::json!({ "from": old_name, "to": name });
                event.kind = "renamed";
                event.detail = Some(&detail);
                insert_event(&tx, &event)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Deletes the VM (its [`CreatedFile`] rows go with it) and appends a
    /// `removed` event (`previous` = its last status); one transaction. Its
    /// history stays. Read [`Database::created_files`] first if you need them.
    pub fn remove_vm(&self, id: &str) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            let tx = conn.savepoint()?;
            let Some((name, status)) = vm_name_status(&tx, id)? else {
                return Err(StoreError::NotFound(id.to_owned()));
            };
            tx.prepare_cached("DELETE FROM vms WHERE id = ?1")?
                .execute([id])?;
            insert_event(
                &tx,
                &NewEvent {
                    vm_id: id,
                    vm_name: &name,
                    kind: "removed",
                    status: None,
                    previous: Some(&status),
                    reason: "",
                    detail: None,
                },
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    // ---- events ----------------------------------------------------------

    /// Appends an event of any kind (`snapshot`, ...); returns its seq. The VM
    /// need not exist (history of removed VMs).
    pub fn add_event(
        &self,
        vm_id: &str,
        vm_name: &str,
        kind: &str,
        reason: &str,
        detail: Option<&serde_json::Value>,
    ) -> Result<i64, StoreError> {
        self.with_conn(|conn| {
            insert_event(
                conn,
                &NewEvent {
                    vm_id,
                    vm_name,
                    kind,
                    status: None,
                    previous: None,
                    reason,
                    detail,
                },
            )
        })
    }

    /// The newest `limit` events (0 = all) of one VM or of all, with
    /// `time >= since_us` if given; oldest first, newest last.
    pub fn events(
        &self,
        vm_id: Option<&str>,
        since_us: Option<u64>,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let since = since_us.map(|v| to_i64(v, "since_us")).transpose()?;
        let sql = tail_query("events", EVENT_COLUMNS, vm_id.is_some(), since.is_some());
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![vm_id, since, sql_limit(limit)], event_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Deletes events older than `older_than_us`; returns how many. Works in
    /// batches, releasing the connection between them.
    pub fn prune_events(&self, older_than_us: u64) -> Result<usize, StoreError> {
        self.prune_older("events", older_than_us)
    }

    // ---- disk images maqet created --------------------------------------

    /// Remembers that maqet created `path` (absolute, UTF-8) for this VM; a
    /// second call for the same path updates format and time.
    /// [`StoreError::NotFound`] if the VM does not exist.
    pub fn record_created_file(
        &self,
        vm_id: &str,
        path: &Path,
        format: &str,
    ) -> Result<(), StoreError> {
        let path_str = storage_path(path)?;
        let now = to_i64(now_us(), "now")?;
        self.with_conn(|conn| {
            conn.prepare_cached(
                "INSERT INTO storage_files (vm_id, path, format, created_at) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (vm_id, path) DO UPDATE \
                 SET format = excluded.format, created_at = excluded.created_at",
            )?
            .execute(params![vm_id, path_str, format, now])
            .map_err(vm_row_error(vm_id))?;
            Ok(())
        })
    }

    /// The disk images maqet created for this VM, oldest first.
    pub fn created_files(&self, vm_id: &str) -> Result<Vec<CreatedFile>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT path, format, created_at FROM storage_files \
                 WHERE vm_id = ?1 ORDER BY created_at, path",
            )?;
            let rows = stmt.query_map([vm_id], |r| {
                Ok(CreatedFile {
                    path: PathBuf::from(r.get::<_, String>(0)?),
                    format: r.get(1)?,
                    created_at: get_u64(r, 2)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Forgets one created file (e.g. after deleting it); returns whether it
    /// was recorded.
    pub fn forget_created_file(&self, vm_id: &str, path: &Path) -> Result<bool, StoreError> {
        let Some(path_str) = path.to_str() else {
            return Ok(false); // never recorded: record_created_file refuses non-UTF-8
        };
        self.with_conn(|conn| {
            let n = conn
                .prepare_cached("DELETE FROM storage_files WHERE vm_id = ?1 AND path = ?2")?
                .execute(params![vm_id, path_str])?;
            Ok(n > 0)
        })
    }

    // ---- audit -----------------------------------------------------------

    /// Appends one audit row (see [`AuditRow`] for the convention); returns its seq.
    pub fn insert_audit(&self, row: &AuditRow) -> Result<i64, StoreError> {
        self.with_conn(|conn| insert_audit_row(conn, row))
    }

    /// Fills in the outcome of a call's record written with its change
    /// (`call_audit.rs`); `false` if no such record is still pending.
    pub fn finish_audit(&self, seq: i64, outcome: &str, message: &str) -> Result<bool, StoreError> {
        let message = clip(message);
        self.with_conn(|conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE audit SET outcome = ?2, message = ?3 WHERE seq = ?1 AND outcome = ?4",
                )?
                .execute(params![seq, outcome, message, call_audit::PENDING])?;
            Ok(n == 1)
        })
    }

    /// Appends several audit rows in order, in one transaction (one commit for a burst
    /// of calls instead of one each). All or none are written.
    pub fn insert_audits(&self, rows: &[AuditRow]) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            let tx = conn.savepoint()?;
            for row in rows {
                insert_audit_row(&tx, row)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The newest `limit` audit rows (0 = all) about one VM or all, with
    /// `time >= since_us` if given; oldest first, newest last.
    pub fn audit(
        &self,
        vm_id: Option<&str>,
        since_us: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let since = since_us.map(|v| to_i64(v, "since_us")).transpose()?;
        let sql = tail_query("audit", AUDIT_COLUMNS, vm_id.is_some(), since.is_some());
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![vm_id, since, sql_limit(limit)], audit_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Deletes audit rows older than `older_than_us`; returns how many.
    /// Works in batches, releasing the connection between them.
    pub fn prune_audit(&self, older_than_us: u64) -> Result<usize, StoreError> {
        self.prune_older("audit", older_than_us)
    }

    /// Keeps only the newest `keep` audit rows; returns how many were deleted.
    pub fn prune_audit_keep_last(&self, keep: usize) -> Result<usize, StoreError> {
        self.prune_audit_where("1", keep)
    }

    /// Caps the audit log per kind of caller: the newest `keep_own` rows of the
    /// service's own user (`owner_uid`, and maqetd's own rows without a uid) and,
    /// separately, the newest `keep_strangers` rows of every other uid. A flood of
    /// denied calls from a stranger therefore only ever prunes strangers' rows.
    /// Returns how many rows were deleted.
    pub fn prune_audit_caps(
        &self,
        owner_uid: u32,
        keep_own: usize,
        keep_strangers: usize,
    ) -> Result<usize, StoreError> {
        let strangers = format!("caller_uid IS NOT NULL AND caller_uid <> {owner_uid}");
        let own = format!("(caller_uid IS NULL OR caller_uid = {owner_uid})");
        Ok(self.prune_audit_where(&strangers, keep_strangers)?
            + self.prune_audit_where(&own, keep_own)?)
    }

    /// Deletes all but the newest `keep` audit rows matching `filter` (SQL, built
    /// from numbers only).
    fn prune_audit_where(&self, filter: &str, keep: usize) -> Result<usize, StoreError> {
        let offset = i64::try_from(keep).unwrap_or(i64::MAX);
        let cutoff: Option<i64> = self.with_conn(|conn| {
            Ok(conn
                .prepare(&format!(
                    "SELECT seq FROM audit WHERE {filter} ORDER BY seq DESC LIMIT 1 OFFSET ?1"
                ))?
                .query_row([offset], |r| r.get(0))
                .optional()?)
        })?;
        let Some(cutoff) = cutoff else { return Ok(0) };
        self.prune_batches(
            &format!(
                "DELETE FROM audit WHERE seq IN \
                 (SELECT seq FROM audit WHERE {filter} AND seq <= ?1 ORDER BY seq LIMIT ?2)"
            ),
            cutoff,
        )
    }

    fn prune_older(&self, table: &'static str, older_than_us: u64) -> Result<usize, StoreError> {
        let before = i64::try_from(older_than_us).unwrap_or(i64::MAX);
        self.prune_batches(
            &format!(
                "DELETE FROM {table} WHERE seq IN \
                 (SELECT seq FROM {table} WHERE time < ?1 LIMIT ?2)"
            ),
            before,
        )
    }

    /// Runs `sql` (params: bound, batch size) until it deletes less than a batch.
    fn prune_batches(&self, sql: &str, bound: i64) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let n = self.with_conn(|conn| {
                Ok(conn
                    .prepare_cached(sql)?
                    .execute(params![bound, PRUNE_BATCH])?)
            })?;
            total += n;
            if (n as i64) < PRUNE_BATCH {
                return Ok(total);
            }
        }
    }
}

// ---- helpers ---------------------------------------------------------------

struct NewEvent<'a> {
    vm_id: &'a str,
    vm_name: &'a str,
    kind: &'a str,
    status: Option<&'a str>,
    previous: Option<&'a str>,
    reason: &'a str,
    detail: Option<&'a serde_json::Value>,
}

fn insert_event(conn: &Connection, ev: &NewEvent<'_>) -> Result<i64, StoreError> {
    let time = to_i64(now_us(), "now")?;
    let detail = ev.detail.map(|d| d.to_string());
    conn.prepare_cached(
        "INSERT INTO events (time, vm_id, vm_name, kind, status, previous, reason, detail) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        time,
        ev.vm_id,
        ev.vm_name,
        ev.kind,
        ev.status,
        ev.previous,
        ev.reason,
        detail
    ])
    .map_err(constraint_to_invalid)?;
    Ok(conn.last_insert_rowid())
}

/// Name and status of a VM, read inside the caller's transaction.
fn vm_name_status(conn: &Connection, id: &str) -> Result<Option<(String, String)>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT name, status FROM vms WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Constraint failures of an insert/update on `vms`, in the caller's terms.
fn vm_write_error(e: rusqlite::Error, id: &str, name: &str) -> StoreError {
    match sqlite_failure(&e) {
        Some((ffi::SQLITE_CONSTRAINT_UNIQUE, msg)) if msg.contains("vms.name") => {
            StoreError::NameTaken(name.to_owned())
        }
        Some((ffi::SQLITE_CONSTRAINT_PRIMARYKEY, _)) => {
            StoreError::InvalidArgument(format!("a VM with id {id} already exists"))
        }
        _ => constraint_to_invalid(e),
    }
}

fn vm_from_row(r: &Row<'_>) -> rusqlite::Result<VmRecord> {
    Ok(VmRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        config: r.get(2)?,
        status: r.get(3)?,
        status_reason: r.get(4)?,
        pid: r.get(5)?,
        pid_start_time: opt_u64(r, 6)?,
        created_at: get_u64(r, 7)?,
        started_at: get_u64(r, 8)?,
        stopped_at: get_u64(r, 9)?,
        exit_status: r.get(10)?,
    })
}

fn event_from_row(r: &Row<'_>) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        seq: r.get(0)?,
        time: get_u64(r, 1)?,
        vm_id: r.get(2)?,
        vm_name: r.get(3)?,
        kind: r.get(4)?,
        status: r.get(5)?,
        previous: r.get(6)?,
        reason: r.get(7)?,
        detail: json_column(r, 8)?,
    })
}

fn insert_audit_row(conn: &Connection, row: &AuditRow) -> Result<i64, StoreError> {
    let time = to_i64(if row.time == 0 { now_us() } else { row.time }, "time")?;
    let arguments = row.arguments.as_deref().map(clip);
    let message = row.message.as_deref().map(clip);
    conn.prepare_cached(
        "INSERT INTO audit (time, caller_uid, caller_pid, caller_name, action, vm_id, \
         method, arguments, decision, outcome, message) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        time,
        row.caller_uid,
        row.caller_pid,
        row.caller_name,
        row.action,
        row.vm_id,
        row.method,
        arguments,
        row.decision.as_str(),
        row.outcome,
        message,
    ])
    .map_err(constraint_to_invalid)?;
    Ok(conn.last_insert_rowid())
}

fn audit_from_row(r: &Row<'_>) -> rusqlite::Result<AuditRow> {
    let decision = match r.get_ref(9)?.as_str()? {
        "allow" => AuditDecision::Allow,
        "deny" => AuditDecision::Deny,
        other => {
            return Err(rusqlite::Error::FromSqlConversionFailure(
                9,
                rusqlite::types::Type::Text,
                format!("unknown audit decision {other:?}").into(),
            ));
        }
    };
    Ok(AuditRow {
        seq: r.get(0)?,
        time: get_u64(r, 1)?,
        caller_uid: r.get(2)?,
        caller_pid: r.get(3)?,
        caller_name: r.get(4)?,
        action: r.get(5)?,
        vm_id: r.get(6)?,
        method: r.get(7)?,
        arguments: r.get(8)?,
        decision,
        outcome: r.get(10)?,
        message: r.get(11)?,
    })
}

/// rusqlite reads u64 only with its `fallible_uint` feature; do it here.
fn get_u64(r: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(idx)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

fn opt_u64(r: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = r.get(idx)?;
    v.map(|v| u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v)))
        .transpose()
}

fn json_column(r: &Row<'_>, idx: usize) -> rusqlite::Result<Option<serde_json::Value>> {
    let Some(text) = r.get_ref(idx)?.as_str_or_null()? else {
        return Ok(None);
    };
    serde_json::from_str(text).map(Some).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, e.into())
    })
}

/// "Newest `?3` rows matching, oldest first": the inner query walks the
/// (vm_id, seq) or seq index backwards and stops at the limit. Parameters:
/// ?1 vm_id, ?2 since (µs), ?3 limit; unused ones are bound but not referenced.
fn tail_query(table: &str, columns: &str, by_vm: bool, since: bool) -> String {
    let mut filters = Vec::new();
    if by_vm {
        filters.push("vm_id = ?1");
    }
    if since {
        filters.push("time >= ?2");
    }
    let filter = if filters.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", filters.join(" AND "))
    };
    format!(
        "SELECT * FROM (SELECT {columns} FROM {table}{filter} ORDER BY seq DESC LIMIT ?3) \
         ORDER BY seq"
    )
}

/// SQLite's `LIMIT -1` is "no limit".
fn sql_limit(limit: usize) -> i64 {
    if limit == 0 {
        -1
    } else {
        i64::try_from(limit).unwrap_or(i64::MAX)
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::InvalidArgument(format!("{what} {v} is too large")))
}

/// VM ids are the canonical (lowercase, hyphenated) UUID text: object paths
/// and lookups compare them as strings.
fn check_uuid(id: &str) -> Result<(), StoreError> {
    match uuid::Uuid::parse_str(id) {
        Ok(u) if u.hyphenated().to_string() == id => Ok(()),
        _ => Err(StoreError::InvalidArgument(format!(
            "VM id {id:?} is not a lowercase hyphenated UUID"
        ))),
    }
}

/// Created files are stored as absolute UTF-8 text (config paths come from
/// YAML, so they are UTF-8); a relative path would later resolve elsewhere.
fn storage_path(path: &Path) -> Result<&str, StoreError> {
    if !path.is_absolute() {
        return Err(StoreError::InvalidArgument(format!(
            "created file path {} is not absolute",
            path.display()
        )));
    }
    path.to_str().ok_or_else(|| {
        StoreError::InvalidArgument(format!(
            "created file path {} is not valid UTF-8",
            path.display()
        ))
    })
}

/// Cuts `s` to at most [`AUDIT_TEXT_MAX`] bytes on a char boundary, saying so.
fn clip(s: &str) -> Cow<'_, str> {
    if s.len() <= AUDIT_TEXT_MAX {
        return Cow::Borrowed(s);
    }
    let mut end = AUDIT_TEXT_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…[{} more bytes]", &s[..end], s.len() - end))
}
