//! The snapshot module's error: refusals (name, state, disks), and the VM (monitor) and
//! storage (`qemu-img`) failures below it, kept as `source()`.

use crate::error_kind::ErrorKind;
use crate::storage::StorageError;
use crate::vm::VmError;

/// Why a snapshot could not be listed, taken, loaded or deleted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// The VM's status or QEMU's abilities refuse the operation.
    #[error("{0}")]
    InvalidState(String),
    /// A disk is not fit for snapshots (format, missing, no room).
    #[error("{0}")]
    Storage(String),
    /// QEMU answered something the snapshot code cannot use.
    #[error("{0}")]
    Qmp(String),
    /// A VM operation or monitor command failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// `qemu-img` or a free-space check failed.
    #[error(transparent)]
    HostStorage(#[from] StorageError),
}

impl SnapshotError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::NotFound(_) => ErrorKind::NotFound,
            SnapshotError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            SnapshotError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            SnapshotError::InvalidState(_) => ErrorKind::InvalidState,
            SnapshotError::Storage(_) => ErrorKind::Storage,
            SnapshotError::Qmp(_) => ErrorKind::Qmp,
            SnapshotError::Vm(e) => e.kind(),
            SnapshotError::HostStorage(e) => e.kind(),
        }
    }
}
