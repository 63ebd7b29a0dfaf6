//! Exit codes: scripts can tell "no such VM" from "wrong state" from "no service".
//! Documented in docs/cli.md.

use crate::error::MaqetError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Ok = 0,
    /// Anything not covered below (internal errors, storage, QMP).
    Failure = 1,
    /// Bad command-line usage (clap uses 2 as well).
    Usage = 2,
    NotFound = 3,
    /// Bad arguments, bad config, name taken.
    InvalidInput = 4,
    /// The call is not legal in the VM's current state.
    InvalidState = 5,
    AccessDenied = 6,
    /// No session bus, or maqetd cannot be reached or activated.
    Unreachable = 7,
    /// QEMU refused to start or failed.
    QemuFailed = 8,
    Timeout = 9,
}

impl ExitCode {
    pub fn for_error(e: &MaqetError) -> ExitCode {
        match e {
            MaqetError::NotFound(_) => ExitCode::NotFound,
            MaqetError::InvalidArgument(_)
            | MaqetError::InvalidConfig(_)
            | MaqetError::AlreadyExists(_) => ExitCode::InvalidInput,
            MaqetError::InvalidState(_) => ExitCode::InvalidState,
            MaqetError::AccessDenied(_) => ExitCode::AccessDenied,
            MaqetError::QemuFailed(_) => ExitCode::QemuFailed,
            MaqetError::Timeout(_) => ExitCode::Timeout,
            MaqetError::ZBus(z) if is_unreachable(z) => ExitCode::Unreachable,
            _ => ExitCode::Failure,
        }
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(c: ExitCode) -> Self {
        std::process::ExitCode::from(c as u8)
    }
}

/// Bus errors that mean "the service is not there", as opposed to a failed call.
pub fn is_unreachable(e: &zbus::Error) -> bool {
    match e {
        zbus::Error::MethodError(name, _, _) => {
            let n = name.as_str();
            n == "org.freedesktop.DBus.Error.ServiceUnknown"
                || n == "org.freedesktop.DBus.Error.NameHasNoOwner"
                || n == "org.freedesktop.DBus.Error.NoReply"
                || n.starts_with("org.freedesktop.DBus.Error.Spawn")
        }
        zbus::Error::InputOutput(_)
        | zbus::Error::Address(_)
        | zbus::Error::Handshake(_)
        | zbus::Error::Connection(..) => true,
        zbus::Error::FDO(e) => matches!(
            **e,
            zbus::fdo::Error::ServiceUnknown(_)
                | zbus::fdo::Error::NameHasNoOwner(_)
                | zbus::fdo::Error::NoReply(_)
                | zbus::fdo::Error::SpawnFailed(_)
                | zbus::fdo::Error::SpawnExecFailed(_)
                | zbus::fdo::Error::SpawnChildExited(_)
                | zbus::fdo::Error::SpawnChildSignaled(_)
        ),
        _ => false,
    }
}
