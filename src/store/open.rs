//! Opening the database without ever damaging what is already there.
//!
//! Order matters: we look at the file ourselves before SQLite does, then let
//! SQLite read (never write) until the file has proven to be a healthy maqet
//! database of a schema we understand, and only then switch it to WAL and
//! migrate. A refused file is left byte-for-byte as it was.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, MAIN_DB, OpenFlags};

use super::error::StoreError;
use super::schema::{self, APPLICATION_ID, Migrated, SCHEMA_VERSION};

/// The first 16 bytes of every SQLite 3 database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Tunables of [`Database::open_with_options`](super::Database::open_with_options).
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How long a call waits for a lock held by another process before
    /// failing with [`StoreError::Locked`]. Applies at open and on every call.
    pub busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            busy_timeout: Duration::from_secs(3),
        }
    }
}

/// What was at the path before we opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileState {
    /// We just created it (mode 0600).
    Created,
    /// An existing 0-byte file: nothing to lose, may be initialized.
    Empty,
    /// An existing file that starts with the SQLite header.
    Existing,
}

/// Opens (creating if missing) and migrates the database. See the module docs.
pub(crate) fn open(path: &Path, opts: &StoreOptions) -> Result<Connection, StoreError> {
    let state = inspect_file(path)?;
    let sidecars = Sidecars::before_open(path);
    let classify = |e: rusqlite::Error| StoreError::from(e).classify(path);

    // READ_WRITE without CREATE: the file exists by now, and if it vanished
    // meanwhile we want an error, not a fresh database.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(classify)?;

    if let Err(e) = validate(&conn, path, opts) {
        drop(conn);
        sidecars.remove_ours(path);
        return Err(e);
    }

    // The file is ours and healthy: from here on we may write.
    (|| -> Result<Connection, StoreError> {
        if conn.is_readonly(MAIN_DB)? {
            return Err(StoreError::ReadOnly {
                path: path.to_path_buf(),
            });
        }
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)?;
        if state != FileState::Created {
            tighten_mode(path);
        }
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            // E.g. a file system without shared memory; still correct, just slower.
            tracing::warn!(path = %path.display(), journal_mode = %mode,
                "database could not switch to WAL mode");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        let mut conn = conn;
        match schema::migrate(&mut conn)? {
            Migrated::Newer(found) => {
                return Err(StoreError::NewerSchema {
                    path: path.to_path_buf(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            Migrated::From(from) => tracing::info!(path = %path.display(), from,
                to = SCHEMA_VERSION, "database schema upgraded"),
            Migrated::UpToDate => {}
        }
        // Enough for every statement of mod.rs (they are few and fixed).
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    })()
    .map_err(|e| e.classify(path))
}

/// Looks at the path without SQLite: creates it (0600) if missing, refuses
/// anything that is not a regular file starting with the SQLite header.
fn inspect_file(path: &Path) -> Result<FileState, StoreError> {
    let io_err = |source: io::Error| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Two rounds: if the file appears between our open and our create, look again.
    for _ in 0..2 {
        // O_NONBLOCK so that a FIFO at the path cannot hang us before the type check.
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => return inspect_existing(path, file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                refuse_orphan_wal(path)?;
                match OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                {
                    Ok(_) => {
                        tracing::info!(path = %path.display(), "created a new state database");
                        return Ok(FileState::Created);
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(io_err(e)),
                }
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    // Still neither openable nor creatable: typically a dangling symlink.
    Err(io_err(io::Error::other(
        "it neither can be opened nor created (a dangling symbolic link?)",
    )))
}

fn inspect_existing(path: &Path, file: File) -> Result<FileState, StoreError> {
    let io_err = |source: io::Error| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(io_err(io::Error::other("not a regular file")));
    }
    if meta.len() == 0 {
        refuse_orphan_wal(path)?;
        return Ok(FileState::Empty);
    }
    let mut head = Vec::with_capacity(SQLITE_HEADER.len());
    file.take(SQLITE_HEADER.len() as u64)
        .read_to_end(&mut head)
        .map_err(io_err)?;
    if head.as_slice() != SQLITE_HEADER {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: "it does not start with the SQLite header".into(),
        });
    }
    Ok(FileState::Existing)
}

/// A non-empty `-wal` next to a missing or empty database belongs to some
/// other database file: SQLite would replay it into ours.
fn refuse_orphan_wal(path: &Path) -> Result<(), StoreError> {
    let wal = sidecar(path, "-wal");
    match fs::metadata(&wal) {
        Ok(m) if m.len() > 0 => Err(StoreError::OrphanWal {
            path: path.to_path_buf(),
            wal,
        }),
        _ => Ok(()),
    }
}

/// Read-only checks: integrity, application id, schema version. Runs with
/// checkpoint-on-close disabled so that closing after a refusal cannot copy
/// a write-ahead log into the refused file.
fn validate(conn: &Connection, path: &Path, opts: &StoreOptions) -> Result<(), StoreError> {
    let run = || -> Result<(), StoreError> {
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        // Refuse writes through sqlite_schema tricks; don't run functions
        // named in the schema on our behalf.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
        conn.busy_timeout(opts.busy_timeout)?;

        let problems = {
            let mut stmt = conn.prepare("PRAGMA quick_check(5)")?;
            stmt.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        if problems.len() != 1 || problems[0] != "ok" {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!(
                    "integrity check: {}",
                    problems.join("; ").replace('\n', "; ")
                ),
            });
        }

        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let app_id: i64 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
        let objects: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
        let not_maqet = |detail: String| StoreError::NotMaqet {
            path: path.to_path_buf(),
            detail,
        };
        if app_id != 0 && app_id != APPLICATION_ID {
            return Err(not_maqet(format!(
                "application id {:#010x}, maqet's is {APPLICATION_ID:#010x}",
                app_id as u32
            )));
        }
        if version > SCHEMA_VERSION && app_id == APPLICATION_ID {
            return Err(StoreError::NewerSchema {
                path: path.to_path_buf(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < 0 {
            return Err(not_maqet(format!("schema version {version}")));
        }
        // Only a blank database may be initialized; a versioned or populated
        // one without our id was made by someone else.
        if app_id == 0 && (version != 0 || objects != 0) {
            return Err(not_maqet(format!(
                "no maqet application id, schema version {version}, {objects} schema objects"
            )));
        }
        if app_id == APPLICATION_ID && version == 0 && objects != 0 {
            return Err(not_maqet(format!(
                "maqet application id but no schema version and {objects} schema objects"
            )));
        }
        Ok(())
    };
    run().map_err(|e| e.classify(path))
}

/// Tightens a database that others can read: VM configs may hold secrets.
fn tighten_mode(path: &Path) {
    let Ok(meta) = fs::metadata(path) else { return };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        match fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o700)) {
            Ok(()) => tracing::warn!(path = %path.display(), old_mode = format!("{mode:o}"),
                "database was accessible to other users; mode tightened to owner-only"),
            Err(e) => tracing::warn!(path = %path.display(), error = %e,
                "database is accessible to other users and its mode could not be tightened"),
        }
    }
}

pub(super) fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

/// Which of SQLite's `-wal` / `-shm` files existed before we opened the file,
/// so that after a refusal we remove only the empty ones SQLite made for our
/// read, and leave the directory as we found it.
struct Sidecars {
    wal: bool,
    shm: bool,
}

impl Sidecars {
    fn before_open(path: &Path) -> Sidecars {
        Sidecars {
            wal: sidecar(path, "-wal").symlink_metadata().is_ok(),
            shm: sidecar(path, "-shm").symlink_metadata().is_ok(),
        }
    }

    /// Call only after the connection is closed.
    fn remove_ours(&self, path: &Path) {
        let wal = sidecar(path, "-wal");
        if !self.wal && fs::metadata(&wal).is_ok_and(|m| m.is_file() && m.len() == 0) {
            let _ = fs::remove_file(&wal);
        }
        // The -shm is only an index of the -wal: without a -wal it holds nothing.
        let shm = sidecar(path, "-shm");
        if !self.shm && wal.symlink_metadata().is_err() && shm.is_file() {
            let _ = fs::remove_file(&shm);
        }
    }
}

/// Device and inode of the file at `path`, if it is there.
pub(super) fn identity(path: &Path) -> Option<(u64, u64)> {
    identity_checked(path).ok().flatten()
}

/// Device and inode of the file at `path`; `None` when nothing is there.
pub(super) fn identity_checked(path: &Path) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(path) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
