//! The manager's error: refusals of the VM set (names, config sources), and the VM,
//! database and config-reading failures below it, kept as `source()`.

use crate::config::source::ReadError;
use crate::error_kind::ErrorKind;
use crate::store::StoreError;
use crate::vm::{VmError, store_error};

/// Why a manager operation (add, remove, find, apply, read config sources) failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    InvalidConfig(String),
    #[error("{0}")]
    Storage(String),
    #[error("{0}")]
    Internal(String),
    /// A config source could not be read: a bad file is `InvalidArgument`, a file that
    /// is not text `InvalidConfig`.
    #[error("{0}")]
    Read(#[source] ReadError),
    /// A VM operation (or the database or config below it) failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl ManagerError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ManagerError::NotFound(_) => ErrorKind::NotFound,
            ManagerError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            ManagerError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            ManagerError::InvalidState(_) => ErrorKind::InvalidState,
            ManagerError::InvalidConfig(_) => ErrorKind::InvalidConfig,
            ManagerError::Storage(_) => ErrorKind::Storage,
            ManagerError::Internal(_) => ErrorKind::Internal,
            ManagerError::Read(ReadError::File(_)) => ErrorKind::InvalidArgument,
            ManagerError::Read(ReadError::Text(_)) => ErrorKind::InvalidConfig,
            ManagerError::Vm(e) => e.kind(),
        }
    }
}

impl From<crate::storage::StorageError> for ManagerError {
    fn from(e: crate::storage::StorageError) -> ManagerError {
        ManagerError::Vm(VmError::from(e))
    }
}

impl From<StoreError> for ManagerError {
    fn from(e: StoreError) -> ManagerError {
        ManagerError::Vm(store_error(e))
    }
}
