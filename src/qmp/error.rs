//! The one error type of the QMP client.

use std::io;
use std::time::Duration;

/// Why a QMP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Reading from or writing to the monitor socket failed for a reason other than the
    /// peer going away (that is [`QmpError::Disconnected`]).
    #[error("QMP I/O error: {0}")]
    Io(#[source] io::Error),
    /// QEMU sent something that is not QMP (the offending text is truncated).
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU ran the command and refused it.
    #[error("QMP error {class}: {desc}")]
    Command { class: String, desc: String },
    /// The connection ended: QEMU exited, closed its monitor, or every `QmpClient`
    /// handle was dropped.
    #[error("QMP connection closed (QEMU exited or closed its monitor socket)")]
    Disconnected,
    /// No reply within the given time. The command may still run in QEMU.
    #[error("QMP command got no reply within {0:?}")]
    Timeout(Duration),
    /// Nothing was sent: QMP arguments must be a JSON object.
    #[error("invalid QMP arguments: {0}")]
    InvalidArguments(String),
}

impl From<io::Error> for QmpError {
    /// A peer that went away is reported as `Disconnected`, whichever syscall noticed.
    fn from(err: io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => QmpError::Disconnected,
            _ => QmpError::Io(err),
        }
    }
}
