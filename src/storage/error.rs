//! The storage module's error: host files, image creation, free space, `qemu-img`.

use crate::error_kind::ErrorKind;

/// Why a storage operation failed; every case is a `Storage` error on the bus except a
/// cancelled `qemu-img` (`Cancelled`).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A refused or failed storage step; the message names the file and what to do.
    #[error("{0}")]
    Failed(String),
    /// The file system ran out of space (ENOSPC, or too little free space up front);
    /// the message says the disk is full, where, and what to do.
    #[error("{0}")]
    NoSpace(String),
    /// `qemu-img` could not be started.
    #[error("cannot run qemu-img {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A file operation failed; the message names the file.
    #[error("{message}")]
    Io {
        message: String,
        #[source]
        source: std::io::Error,
    },
    /// The caller cancelled a `qemu-img` run; the process was killed and reaped.
    #[error("qemu-img was cancelled")]
    Cancelled,
}

impl StorageError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StorageError::Cancelled => ErrorKind::Cancelled,
            StorageError::Failed(_)
            | StorageError::NoSpace(_)
            | StorageError::Spawn { .. }
            | StorageError::Io { .. } => ErrorKind::Storage,
        }
    }
}
