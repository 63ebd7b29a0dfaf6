//! Exit codes: scripts can tell "no such VM" from "wrong state" from "no service".
//! Documented in docs/cli.md.

use crate::error::MaqetError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Ok,
    /// Anything not covered below (internal errors, storage, QMP).
    Failure,
    /// Bad command-line usage (clap uses 2 as well).
    Usage,
    NotFound,
    /// Bad arguments, bad config, name taken.
    InvalidInput,
    /// The call is not legal in the VM's current state.
    InvalidState,
    AccessDenied,
    /// No session bus, or maqetd cannot be reached or activated.
    Unreachable,
    /// QEMU refused to start or failed.
    QemuFailed,
    Timeout,
    /// `maqet exec`: the guest command's own exit code, passed through.
    Guest(u8),
}

impl ExitCode {
    /// The process exit status.
    pub fn code(self) -> u8 {
        match self {
            ExitCode::Ok => 0,
            ExitCode::Failure => 1,
            ExitCode::Usage => 2,
            ExitCode::NotFound => 3,
            ExitCode::InvalidInput => 4,
            ExitCode::InvalidState => 5,
            ExitCode::AccessDenied => 6,
            ExitCode::Unreachable => 7,
            ExitCode::QemuFailed => 8,
            ExitCode::Timeout => 9,
            ExitCode::Guest(code) => code,
        }
    }

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
        std::process::ExitCode::from(c.code())
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
