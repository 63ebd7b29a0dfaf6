//! The one D-Bus error type, shared by the service, the CLI and the tests.
//!
//! Every failure that crosses the bus is one of these variants, named
//! `org.maqet.Maqet1.Error.<Kind>`, so clients match on the kind and never parse text.
//! Internal error types (config, store, QMP, …) stay in their modules and are mapped here
//! at the boundary; the message always says what failed, why, and what to do.

use zbus::DBusError;

/// The error name prefix of every maqet D-Bus error.
pub const ERROR_PREFIX: &str = "org.maqet.Maqet1.Error";

#[derive(DBusError, Debug)]
#[zbus(prefix = "org.maqet.Maqet1.Error", impl_display = false)]
pub enum MaqetError {
    /// A transport or protocol error of the bus itself (never sent by maqetd).
    #[zbus(error)]
    ZBus(zbus::Error),
    NotFound(String),
    AlreadyExists(String),
    InvalidArgument(String),
    InvalidConfig(String),
    InvalidState(String),
    AccessDenied(String),
    Qmp(String),
    QemuFailed(String),
    Storage(String),
    Timeout(String),
    Cancelled(String),
    Internal(String),
}

/// Result of anything that answers a D-Bus caller.
pub type Result<T, E = MaqetError> = std::result::Result<T, E>;

impl MaqetError {
    /// The short kind (`NotFound`, `InvalidState`, …), also used in audit rows and CLI JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            MaqetError::ZBus(_) => "Bus",
            MaqetError::NotFound(_) => "NotFound",
            MaqetError::AlreadyExists(_) => "AlreadyExists",
            MaqetError::InvalidArgument(_) => "InvalidArgument",
            MaqetError::InvalidConfig(_) => "InvalidConfig",
            MaqetError::InvalidState(_) => "InvalidState",
            MaqetError::AccessDenied(_) => "AccessDenied",
            MaqetError::Qmp(_) => "Qmp",
            MaqetError::QemuFailed(_) => "QemuFailed",
            MaqetError::Storage(_) => "Storage",
            MaqetError::Timeout(_) => "Timeout",
            MaqetError::Cancelled(_) => "Cancelled",
            MaqetError::Internal(_) => "Internal",
        }
    }

    /// The human message without the error name.
    pub fn message(&self) -> String {
        match self {
            MaqetError::ZBus(e) => e.to_string(),
            MaqetError::NotFound(m)
            | MaqetError::AlreadyExists(m)
            | MaqetError::InvalidArgument(m)
            | MaqetError::InvalidConfig(m)
            | MaqetError::InvalidState(m)
            | MaqetError::AccessDenied(m)
            | MaqetError::Qmp(m)
            | MaqetError::QemuFailed(m)
            | MaqetError::Storage(m)
            | MaqetError::Timeout(m)
            | MaqetError::Cancelled(m)
            | MaqetError::Internal(m) => m.clone(),
        }
    }
}

impl std::fmt::Display for MaqetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError;

    #[test]
    fn names_follow_the_contract() {
        let e = MaqetError::InvalidState("VM web is running".into());
        assert_eq!(e.name().as_str(), "org.maqet.Maqet1.Error.InvalidState");
        assert_eq!(e.to_string(), "VM web is running");
        assert_eq!(e.kind(), "InvalidState");
    }
}
