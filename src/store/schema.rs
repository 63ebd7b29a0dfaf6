//! The schema and its migrations.
//!
//! `PRAGMA user_version` is the number of migrations applied. Migration `n`
//! (1-based) is `MIGRATIONS[n - 1]`; it runs in one `BEGIN IMMEDIATE`
//! transaction together with the version bump, so a crash leaves either the
//! old or the new schema. Never edit a migration that has shipped: append one.
//!
//! `PRAGMA application_id` marks the file as maqet's, so a stray SQLite file
//! at our path is refused instead of having tables added to it.

use rusqlite::{Connection, TransactionBehavior};

/// "MQET" in ASCII: written into the database header by migration 1.
pub(crate) const APPLICATION_ID: i64 = 0x4d51_4554;

/// Schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Tables are STRICT (a type bug is an error, not a silently stored string)
/// and timestamps are INTEGER microseconds since the Unix epoch, 0 = never.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    r#"
PRAGMA application_id = 1297171796;

-- One row per defined VM. The lifecycle module owns the set of status names,
-- so status is free text here (a CHECK would need a table rebuild per new state).
CREATE TABLE vms (
    id             TEXT PRIMARY KEY NOT NULL CHECK (length(id) = 36),
    name           TEXT NOT NULL UNIQUE CHECK (name <> ''),
    config         TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status <> ''),
    status_reason  TEXT NOT NULL DEFAULT '',
    pid            INTEGER CHECK (pid > 0),
    -- clock ticks since boot (field 22 of /proc/<pid>/stat)
    pid_start_time INTEGER CHECK (pid_start_time >= 0),
    created_at     INTEGER NOT NULL CHECK (created_at >= 0),
    started_at     INTEGER NOT NULL DEFAULT 0 CHECK (started_at >= 0),
    stopped_at     INTEGER NOT NULL DEFAULT 0 CHECK (stopped_at >= 0),
    exit_status    INTEGER NOT NULL DEFAULT -1,
    -- a pid without its start time cannot be told from a reused pid
    CHECK ((pid IS NULL) = (pid_start_time IS NULL))
) STRICT;

-- Lifecycle history. No foreign key: history outlives the VM, and vm_name is
-- the name at the time of the event. AUTOINCREMENT so a seq is never reused,
-- even after pruning: clients may use it as a cursor.
CREATE TABLE events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    time     INTEGER NOT NULL,
    vm_id    TEXT NOT NULL,
    vm_name  TEXT NOT NULL,
    kind     TEXT NOT NULL CHECK (kind <> ''),
    status   TEXT,
    previous TEXT,
    reason   TEXT NOT NULL DEFAULT '',
    detail   TEXT -- JSON
) STRICT;
CREATE INDEX events_vm_seq ON events (vm_id, seq);
CREATE INDEX events_time ON events (time);

-- Who did what. Insert-only (pruning aside): one row per call.
CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    time        INTEGER NOT NULL,
    caller_uid  INTEGER,
    caller_pid  INTEGER,
    caller_name TEXT,
    action      TEXT NOT NULL,
    vm_id       TEXT,
    method      TEXT,
    arguments   TEXT,
    decision    TEXT NOT NULL CHECK (decision IN ('allow', 'deny')),
    outcome     TEXT,
    message     TEXT
) STRICT;
CREATE INDEX audit_time ON audit (time);
CREATE INDEX audit_vm_seq ON audit (vm_id, seq);

-- Disk images maqet itself created: the only files RemoveVM(delete_storage)
-- may delete. Absolute paths only.
CREATE TABLE storage_files (
    vm_id      TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    path       TEXT NOT NULL CHECK (substr(path, 1, 1) = '/'),
    format     TEXT NOT NULL,
    created_at INTEGER NOT NULL CHECK (created_at >= 0),
    PRIMARY KEY (vm_id, path)
) STRICT, WITHOUT ROWID;
"#,
    // 2: the image store ($XDG_DATA_HOME/maqet/images/).
    r#"
-- One row per stored image; `file` is its name inside the store directory, so the
-- store can move with the data directory.
CREATE TABLE images (
    name         TEXT PRIMARY KEY NOT NULL CHECK (name <> ''),
    file         TEXT NOT NULL UNIQUE CHECK (file <> '' AND instr(file, '/') = 0),
    format       TEXT NOT NULL CHECK (format IN ('qcow2', 'iso')),
    virtual_size INTEGER NOT NULL CHECK (virtual_size >= 0),
    file_size    INTEGER NOT NULL CHECK (file_size >= 0),
    sha256       TEXT NOT NULL CHECK (length(sha256) = 64),
    source       TEXT NOT NULL DEFAULT '',
    imported_at  INTEGER NOT NULL CHECK (imported_at >= 0)
) STRICT;
"#,
    // 3: what maqetd must find again after a restart: a VM's swtpm, and the crashes
    // its restart back-off counts.
    r#"
-- The swtpm of a VM with `tpm: true` while it runs (vm::tpm). Like vms.pid: the start
-- time tells it from a process that reused the pid.
CREATE TABLE tpm_processes (
    vm_id          TEXT PRIMARY KEY NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    pid            INTEGER NOT NULL CHECK (pid > 0),
    pid_start_time INTEGER NOT NULL CHECK (pid_start_time >= 0)
) STRICT;

-- The unplanned ends the restart policy counts (session::restart): one row per crash
-- within its window, older ones deleted as new ones come.
CREATE TABLE restart_crashes (
    vm_id TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
    time  INTEGER NOT NULL CHECK (time >= 0)
) STRICT;
CREATE INDEX restart_crashes_vm ON restart_crashes (vm_id, time);
"#,
];

/// What `migrate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Migrated {
    /// Already at `SCHEMA_VERSION`.
    UpToDate,
    /// Applied migrations, from version `from` to `SCHEMA_VERSION`.
    From(i64),
    /// Someone (a newer maqet) moved the schema past us meanwhile.
    Newer(i64),
}

/// Brings the schema to `SCHEMA_VERSION`. Idempotent. Every step starts a
/// write transaction, so this also fails fast (`SQLITE_BUSY` after the busy
/// timeout) when another process holds the write lock.
pub(crate) fn migrate(conn: &mut Connection) -> rusqlite::Result<Migrated> {
    let mut first = None;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Re-read inside the write lock: another process may have migrated.
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Ok(Migrated::Newer(version));
        }
        if version == SCHEMA_VERSION {
            tx.commit()?;
            return Ok(first.map_or(Migrated::UpToDate, Migrated::From));
        }
        // Negative versions are refused at open; never guess what they mean.
        let step = usize::try_from(version)
            .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, version))?;
        first.get_or_insert(version);
        tx.execute_batch(MIGRATIONS[step])?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
        tracing::info!(from = version, to = version + 1, "database schema migrated");
    }
}
