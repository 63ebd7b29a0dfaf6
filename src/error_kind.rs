//! The classes of failure the core reports, one per D-Bus error kind.
//!
//! Core modules have their own error types (`VmError`, `ManagerError`, `SnapshotError`,
//! `StorageError`, `StoreError`, `QmpError`, …) that carry the underlying error as their
//! `source()`; each can say which of these kinds it is. The service edge
//! (`service/errors.rs`) turns a kind and a message into the D-Bus error
//! `org.maqet.Maqet1.Error.<Kind>`, so the core never names the D-Bus type.

/// What kind of failure an error is; the D-Bus error name is `org.maqet.Maqet1.Error.<Kind>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    InvalidConfig,
    InvalidState,
    AccessDenied,
    Qmp,
    QemuFailed,
    Storage,
    Timeout,
    Cancelled,
    Internal,
}

impl ErrorKind {
    /// The short kind, the last part of the D-Bus error name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "NotFound",
            ErrorKind::AlreadyExists => "AlreadyExists",
            ErrorKind::InvalidArgument => "InvalidArgument",
            ErrorKind::InvalidConfig => "InvalidConfig",
            ErrorKind::InvalidState => "InvalidState",
            ErrorKind::AccessDenied => "AccessDenied",
            ErrorKind::Qmp => "Qmp",
            ErrorKind::QemuFailed => "QemuFailed",
            ErrorKind::Storage => "Storage",
            ErrorKind::Timeout => "Timeout",
            ErrorKind::Cancelled => "Cancelled",
            ErrorKind::Internal => "Internal",
        }
    }
}

/// Appends each `source()` below `e` to its message, for logs (the D-Bus message is
/// the top error's own text, which already says what the caller needs).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}
