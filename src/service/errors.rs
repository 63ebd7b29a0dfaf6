//! The service edge: core errors become D-Bus errors here and nowhere else.
//!
//! Each core error knows its [`ErrorKind`]; the D-Bus error is
//! `org.maqet.Maqet1.Error.<Kind>` with the error's own message (which already says what
//! failed and what to do). The full `source()` chain goes to the log.

use crate::error::MaqetError;
use crate::error_kind::{self, ErrorKind};
use crate::jobs::JobError;
use crate::manager::ManagerError;
use crate::snapshot::SnapshotError;
use crate::storage::StorageError;
use crate::vm::VmError;

impl MaqetError {
    /// The D-Bus error of `kind` carrying `message`.
    pub fn from_kind(kind: ErrorKind, message: String) -> MaqetError {
        match kind {
            ErrorKind::NotFound => MaqetError::NotFound(message),
            ErrorKind::AlreadyExists => MaqetError::AlreadyExists(message),
            ErrorKind::InvalidArgument => MaqetError::InvalidArgument(message),
            ErrorKind::InvalidConfig => MaqetError::InvalidConfig(message),
            ErrorKind::InvalidState => MaqetError::InvalidState(message),
            ErrorKind::AccessDenied => MaqetError::AccessDenied(message),
            ErrorKind::Qmp => MaqetError::Qmp(message),
            ErrorKind::QemuFailed => MaqetError::QemuFailed(message),
            ErrorKind::Storage => MaqetError::Storage(message),
            ErrorKind::Timeout => MaqetError::Timeout(message),
            ErrorKind::Cancelled => MaqetError::Cancelled(message),
            ErrorKind::Internal => MaqetError::Internal(message),
        }
    }
}

/// The D-Bus error for a core error; its source chain is logged when it adds anything.
fn to_dbus(kind: ErrorKind, e: &dyn std::error::Error) -> MaqetError {
    let message = e.to_string();
    if e.source().is_some() {
        let chain = error_kind::chain(e);
        if chain != message {
            tracing::debug!(kind = kind.as_str(), error = %chain, "call failed");
        }
    }
    MaqetError::from_kind(kind, message)
}

/// `From<CoreError> for MaqetError`, through the error's `kind()`.
macro_rules! at_the_edge {
    ($($core:ty),* $(,)?) => {
        $(impl From<$core> for MaqetError {
            fn from(e: $core) -> MaqetError {
                to_dbus(e.kind(), &e)
            }
        })*
    };
}

at_the_edge!(StorageError, VmError, ManagerError, SnapshotError, JobError);

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;
    use zbus::DBusError as _;

    #[test]
    fn every_kind_has_its_dbus_name() {
        let kinds = [
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::InvalidArgument,
            ErrorKind::InvalidConfig,
            ErrorKind::InvalidState,
            ErrorKind::AccessDenied,
            ErrorKind::Qmp,
            ErrorKind::QemuFailed,
            ErrorKind::Storage,
            ErrorKind::Timeout,
            ErrorKind::Cancelled,
            ErrorKind::Internal,
        ];
        for kind in kinds {
            let e = MaqetError::from_kind(kind, "why".into());
            assert_eq!(
                e.name().as_str(),
                format!("org.maqet.Maqet1.Error.{}", kind.as_str())
            );
            assert_eq!(e.kind(), kind.as_str());
            assert_eq!(e.message(), "why");
        }
    }

    #[test]
    fn storage_errors_keep_their_cause_and_kind() {
        let io = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let e = StorageError::Spawn {
            what: "info".into(),
            source: io,
        };
        let cause = e.source().expect("the io error is the source");
        assert!(cause.downcast_ref::<std::io::Error>().is_some());
        let message = e.to_string();
        let dbus = MaqetError::from(e);
        assert_eq!(dbus.name().as_str(), "org.maqet.Maqet1.Error.Storage");
        assert_eq!(dbus.message(), message);
        assert!(message.starts_with("cannot run qemu-img info: "));
        let cancelled = MaqetError::from(StorageError::Cancelled);
        assert_eq!(cancelled.kind(), "Cancelled");
        assert_eq!(cancelled.message(), "qemu-img was cancelled");
    }

    #[test]
    fn a_vm_error_reaches_the_qmp_and_io_errors_below_it() {
        let io = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let e = crate::vm::qmp_error("web", crate::qmp::QmpError::Io(io));
        assert_eq!(e.kind(), ErrorKind::Qmp);
        let qmp = e.source().expect("the QMP error is the source");
        assert!(qmp.downcast_ref::<crate::qmp::QmpError>().is_some());
        let io = qmp
            .source()
            .expect("the io error is the QMP error's source");
        assert!(io.downcast_ref::<std::io::Error>().is_some());
        assert!(error_kind::chain(&e).starts_with("VM 'web': QMP I/O error"));
        let dbus = MaqetError::from(e);
        assert_eq!(dbus.name().as_str(), "org.maqet.Maqet1.Error.Qmp");
        assert!(dbus.message().starts_with("VM 'web': QMP I/O error"));
    }

    #[test]
    fn vm_errors_keep_todays_kinds_and_messages() {
        let timeout = crate::vm::qmp_error(
            "web",
            crate::qmp::QmpError::Timeout(std::time::Duration::from_secs(10)),
        );
        let dbus = MaqetError::from(timeout);
        assert_eq!(dbus.name().as_str(), "org.maqet.Maqet1.Error.Timeout");
        assert_eq!(
            dbus.message(),
            "VM 'web': QEMU did not answer on its monitor within 10 s"
        );
        let taken = crate::vm::store_error(crate::store::StoreError::NameTaken("web".into()));
        assert!(
            taken
                .source()
                .and_then(|s| s.downcast_ref::<crate::store::StoreError>())
                .is_some()
        );
        let dbus = MaqetError::from(taken);
        assert_eq!(dbus.name().as_str(), "org.maqet.Maqet1.Error.AlreadyExists");
        assert_eq!(dbus.message(), "a VM named 'web' already exists");
        let state = MaqetError::from(VmError::InvalidState("VM 'web' is running".into()));
        assert_eq!(state.name().as_str(), "org.maqet.Maqet1.Error.InvalidState");
        let storage = MaqetError::from(VmError::from(StorageError::Cancelled));
        assert_eq!(storage.name().as_str(), "org.maqet.Maqet1.Error.Cancelled");
    }

    #[test]
    fn a_manager_error_keeps_the_vm_error_and_its_kind() {
        let vm = crate::vm::qmp_error(
            "web",
            crate::qmp::QmpError::Command {
                class: "GenericError".into(),
                desc: "no".into(),
            },
        );
        let e = ManagerError::from(vm);
        assert_eq!(e.kind(), ErrorKind::Qmp);
        let qmp = e
            .source()
            .and_then(|s| s.downcast_ref::<crate::qmp::QmpError>());
        assert!(qmp.is_some(), "transparent: the QMP error is the source");
        assert_eq!(MaqetError::from(e).message(), "GenericError: no");
        let text = ManagerError::Read(crate::config::source::ReadError::Text("not text".into()));
        assert!(text.source().is_some());
        let dbus = MaqetError::from(text);
        assert_eq!(dbus.name().as_str(), "org.maqet.Maqet1.Error.InvalidConfig");
        assert_eq!(dbus.message(), "not text");
    }

    #[test]
    fn a_snapshot_error_reaches_the_storage_and_io_errors_below_it() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = SnapshotError::from(StorageError::Spawn {
            what: "snapshot -c".into(),
            source: io,
        });
        assert_eq!(e.kind(), ErrorKind::Storage);
        let io = e.source().expect("transparent: the io error is the source");
        assert!(io.downcast_ref::<std::io::Error>().is_some());
        let dbus = MaqetError::from(e);
        assert_eq!(dbus.name().as_str(), "org.maqet.Maqet1.Error.Storage");
        assert!(
            dbus.message()
                .starts_with("cannot run qemu-img snapshot -c: ")
        );
        let vm = SnapshotError::from(VmError::InvalidState("VM 'web' is starting".into()));
        assert_eq!(MaqetError::from(vm).kind(), "InvalidState");
    }
}
