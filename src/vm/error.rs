//! The VM module's error: plain refusals with their kind, and the failures of the parts
//! a VM drives (QMP, guest agent, database, config, host storage) kept as `source()`.

use crate::agent::AgentError;
use crate::config::ConfigError;
use crate::error_kind::ErrorKind;
use crate::qmp::QmpError;
use crate::storage::StorageError;
use crate::store::StoreError;

/// Why a VM operation failed. The message says which VM, why, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    InvalidConfig(String),
    /// The VM's status (or a missing process, monitor, agent) refuses the operation.
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    Qmp(String),
    /// QEMU did not start or ended while starting.
    #[error("{0}")]
    QemuFailed(String),
    #[error("{0}")]
    Storage(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
    /// A monitor command failed (`Qmp`, `Timeout` or `InvalidArgument`).
    #[error("{message}")]
    Monitor {
        kind: ErrorKind,
        message: String,
        #[source]
        source: QmpError,
    },
    /// A guest-agent command failed.
    #[error("{message}")]
    Agent {
        kind: ErrorKind,
        message: String,
        #[source]
        source: AgentError,
    },
    /// The database refused (`AlreadyExists`, `NotFound` or `Storage`).
    #[error("{message}")]
    Store {
        kind: ErrorKind,
        message: String,
        #[source]
        source: StoreError,
    },
    /// A config did not validate (`InvalidConfig`, or `Storage` when only its places are
    /// refused).
    #[error("{message}")]
    Config {
        kind: ErrorKind,
        message: String,
        #[source]
        source: ConfigError,
    },
    /// A host file or disk image could not be opened or created.
    #[error(transparent)]
    HostStorage(#[from] StorageError),
}

impl VmError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            VmError::NotFound(_) => ErrorKind::NotFound,
            VmError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            VmError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            VmError::InvalidConfig(_) => ErrorKind::InvalidConfig,
            VmError::InvalidState(_) => ErrorKind::InvalidState,
            VmError::Qmp(_) => ErrorKind::Qmp,
            VmError::QemuFailed(_) => ErrorKind::QemuFailed,
            VmError::Storage(_) => ErrorKind::Storage,
            VmError::Timeout(_) => ErrorKind::Timeout,
            VmError::Internal(_) => ErrorKind::Internal,
            VmError::Monitor { kind, .. }
            | VmError::Agent { kind, .. }
            | VmError::Store { kind, .. }
            | VmError::Config { kind, .. } => *kind,
            VmError::HostStorage(e) => e.kind(),
        }
    }
}

impl From<StoreError> for VmError {
    fn from(e: StoreError) -> VmError {
        super::store_error(e)
    }
}
