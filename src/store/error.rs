//! Errors of the state database, and the one place that turns SQLite result
//! codes into them.
//!
//! Every message names the file and says what to do: these strings reach the
//! user through D-Bus errors and the log unchanged.

use std::io;
use std::path::{Path, PathBuf};

use rusqlite::ffi;

/// What can go wrong with maqetd's state database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file is not a SQLite database, or SQLite found it damaged (at open
    /// or later: `SQLITE_CORRUPT` / `SQLITE_NOTADB` on any call).
    #[error(
        "database {} is corrupt or is not a SQLite database ({detail}): maqetd will not touch it. \
         Stop maqetd and move it aside (mv {0} {0}.broken, and the same for any {0}-wal and {0}-shm \
         next to it) to start with an empty database, or restore a backup",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },

    /// A valid SQLite database that maqet did not create (another program's
    /// file, or a non-empty database without maqet's application id).
    #[error(
        "{} is a SQLite database but not maqet's ({detail}): maqetd will not touch it. \
         Move it aside (mv {0} {0}.other) or point maqetd at another file",
        path.display()
    )]
    NotMaqet { path: PathBuf, detail: String },

    /// Written by a newer maqet; this build cannot know what the new schema means.
    #[error(
        "database {} was written by a newer maqet (schema {found}, this build knows {supported}): \
         upgrade maqet; maqetd will not touch the file",
        path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    /// Another process held a lock longer than the busy timeout.
    #[error(
        "database {} is locked by another process (is a second maqetd or an sqlite3 shell using it? \
         `fuser {0}` shows who holds it); try again once it is released",
        path.display()
    )]
    Locked { path: PathBuf },

    /// The file (or its directory, for the WAL) cannot be written.
    #[error(
        "database {} is read-only: check the permissions of the file and its directory, \
         and that the file system is mounted read-write",
        path.display()
    )]
    ReadOnly { path: PathBuf },

    /// `SQLITE_FULL`: the transaction was rolled back, nothing was committed.
    #[error(
        "no space left for database {}: nothing was committed; free some disk space and retry",
        path.display()
    )]
    Full { path: PathBuf },

    /// A write-ahead log without its database: opening an empty database next
    /// to it could replay another database's pages into it.
    #[error(
        "found {} but no database {} next to it: the log may hold data of a database that was \
         moved away. Put that database back, or move the log aside too (mv {0} {0}.broken)",
        wal.display(),
        path.display()
    )]
    OrphanWal { path: PathBuf, wal: PathBuf },

    /// The path now names another file than the one maqetd opened: someone moved a
    /// different file into place. maqetd writes into neither until restarted.
    #[error(
        "database {} was replaced by another file while maqetd ran: maqetd writes nothing \
         until it is restarted (its state is in memory; restart maqetd to use the new file, \
         or move the new file aside and restart to have maqetd's state written back)",
        path.display()
    )]
    Replaced { path: PathBuf },

    /// The database owner could not run the request (it stopped), or a failure of the
    /// whole group commit this request was part of, as text.
    #[error("{0}")]
    Unavailable(String),

    /// Another VM already has this name.
    #[error("a VM named {0:?} already exists")]
    NameTaken(String),

    /// No VM with this id.
    #[error("no VM with id {0}")]
    NotFound(String),

    /// The caller passed something the schema refuses (bad UUID, relative
    /// path, pid without start time, value out of range...). A bug in the caller.
    #[error("invalid value for the state database: {0}")]
    InvalidArgument(String),

    /// The file could not be created, read or inspected.
    #[error("cannot use database file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Any other SQLite failure.
    #[error("database error: {0}")]
    Sqlite(#[source] rusqlite::Error),
}

/// Internal code uses `?` on rusqlite calls; `classify` (run by every public
/// method) then turns the codes that mean something to the user into their
/// own variants.
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

impl StoreError {
    /// Maps SQLite result codes that the user can act on (full, locked,
    /// corrupt, read-only) to their variants; everything else is unchanged.
    pub(crate) fn classify(self, path: &Path) -> StoreError {
        let StoreError::Sqlite(e) = self else {
            return self;
        };
        let Some(code) = e.sqlite_error_code() else {
            return StoreError::Sqlite(e);
        };
        let path = path.to_path_buf();
        match code {
            ffi::ErrorCode::DiskFull => StoreError::Full { path },
            ffi::ErrorCode::DatabaseBusy | ffi::ErrorCode::DatabaseLocked => {
                StoreError::Locked { path }
            }
            ffi::ErrorCode::DatabaseCorrupt | ffi::ErrorCode::NotADatabase => StoreError::Corrupt {
                path,
                detail: e.to_string(),
            },
            ffi::ErrorCode::ReadOnly => StoreError::ReadOnly { path },
            _ => StoreError::Sqlite(e),
        }
    }
}

impl StoreError {
    /// The same failure again, for every request of a group commit that failed as a
    /// whole (the variants users act on keep their kind).
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Corrupt { path, detail } => StoreError::Corrupt {
                path: path.clone(),
                detail: detail.clone(),
            },
            StoreError::Locked { path } => StoreError::Locked { path: path.clone() },
            StoreError::ReadOnly { path } => StoreError::ReadOnly { path: path.clone() },
            StoreError::Full { path } => StoreError::Full { path: path.clone() },
            StoreError::Replaced { path } => StoreError::Replaced { path: path.clone() },
            StoreError::NotFound(s) => StoreError::NotFound(s.clone()),
            StoreError::NameTaken(s) => StoreError::NameTaken(s.clone()),
            StoreError::InvalidArgument(s) => StoreError::InvalidArgument(s.clone()),
            other => StoreError::Unavailable(other.to_string()),
        }
    }

    /// A failure of the place, not of the request: the same write may succeed later
    /// (lock released, space freed, file recreated).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Locked { .. }
                | StoreError::ReadOnly { .. }
                | StoreError::Full { .. }
                | StoreError::Io { .. }
                | StoreError::Replaced { .. }
                | StoreError::Unavailable(_)
                | StoreError::Sqlite(_)
        )
    }
}

/// The SQLite extended code and message of a failed statement, if it is one.
pub(crate) fn sqlite_failure(e: &rusqlite::Error) -> Option<(i32, &str)> {
    match e {
        rusqlite::Error::SqliteFailure(err, msg) => {
            Some((err.extended_code, msg.as_deref().unwrap_or("")))
        }
        _ => None,
    }
}

/// For a row that names a VM: a foreign-key failure means the VM is gone
/// ([`StoreError::NotFound`]); other constraint violations as [`constraint_to_invalid`].
pub(crate) fn vm_row_error(vm_id: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |e| match sqlite_failure(&e) {
        Some((ffi::SQLITE_CONSTRAINT_FOREIGNKEY, _)) => StoreError::NotFound(vm_id.to_owned()),
        _ => constraint_to_invalid(e),
    }
}

/// Turns a constraint violation into `InvalidArgument` (the caller's bug,
/// reported with SQLite's wording, which names the column); other errors pass.
pub(crate) fn constraint_to_invalid(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ffi::ErrorCode::ConstraintViolation) => StoreError::InvalidArgument(e.to_string()),
        _ => StoreError::Sqlite(e),
    }
}
