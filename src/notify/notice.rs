//! Which core events a person hears about, and what the notification says. Pure: no
//! bus, so every decision is unit-tested.

use crate::events::{Cause, CoreEvent};
use crate::jobs::JobState;
use crate::settings::Notifications;
use crate::vm::Status;

/// Action keys (the spec's `action_key`): stable, documented in docs/desktop.md.
pub const ACTION_START: &str = "start";
pub const ACTION_LOG: &str = "log";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Crashed,
    PoweredOff,
    StartFailed,
    Started,
    Stopped,
    SnapshotFinished,
    SnapshotFailed,
    /// A notification's own action could not be carried out (feedback for the click).
    ActionFailed,
}

impl Kind {
    fn wanted(self, s: &Notifications) -> bool {
        match self {
            Kind::Crashed => s.crashed,
            Kind::PoweredOff => s.powered_off,
            Kind::StartFailed => s.start_failed,
            Kind::Started => s.started,
            Kind::Stopped => s.stopped,
            Kind::SnapshotFinished => s.snapshot_finished,
            Kind::SnapshotFailed => s.snapshot_failed,
            Kind::ActionFailed => true,
        }
    }
}

/// The spec's `urgency` hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    Low = 0,
    Normal = 1,
    /// Stays until dismissed on GNOME and KDE, so its buttons stay reachable.
    Critical = 2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub kind: Kind,
    pub vm_id: String,
    /// For the log (the summary already names it).
    pub vm_name: String,
    pub summary: String,
    /// Plain text (escaped for servers that read markup when sent).
    pub body: String,
    /// (key, label), offered where the server advertises `actions`.
    pub actions: Vec<(&'static str, &'static str)>,
    pub urgency: Urgency,
}

/// The notification an event deserves under these settings, if any.
pub fn for_event(ev: &CoreEvent, s: &Notifications) -> Option<Notice> {
    if !s.enabled {
        return None;
    }
    let notice = match ev {
        CoreEvent::StatusChanged {
            info,
            previous,
            cause,
            ..
        } => {
            let kind = status_kind(info.status, *previous, *cause)?;
            about_status(kind, &info.id, &info.name, &info.reason)
        }
        CoreEvent::JobFinished {
            vm,
            operation,
            target,
            state,
            message,
            ..
        } => about_job(vm.id(), &vm.name(), operation, target, *state, message)?,
        CoreEvent::RuntimeChanged { .. }
        | CoreEvent::ConfigChanged { .. }
        | CoreEvent::Qmp { .. }
        | CoreEvent::GuestChanged { .. }
        | CoreEvent::VmAdded { .. }
        | CoreEvent::VmRemoved { .. } => return None,
    };
    notice.kind.wanted(s).then_some(notice)
}

/// What a status change means to a person (`None`: nothing worth saying).
fn status_kind(status: Status, previous: Status, cause: Cause) -> Option<Kind> {
    Some(match (status, cause) {
        (Status::Crashed, _) => Kind::Crashed,
        (Status::Failed, _) => Kind::StartFailed,
        (Status::Stopped, Cause::Guest) => Kind::PoweredOff,
        (Status::Stopped, Cause::Restart) => return None,
        (Status::Stopped, Cause::Other) => Kind::Stopped,
        (Status::Running | Status::Paused, _) if previous == Status::Starting => Kind::Started,
        _ => return None,
    })
}

fn about_status(kind: Kind, vm_id: &str, name: &str, reason: &str) -> Notice {
    let (summary, actions, urgency) = match kind {
        Kind::Crashed => (
            format!("VM '{name}' crashed"),
            vec![(ACTION_START, "Start again"), (ACTION_LOG, "Show log")],
            Urgency::Critical,
        ),
        Kind::StartFailed => (
            format!("VM '{name}' failed to start"),
            vec![(ACTION_LOG, "Show log")],
            Urgency::Normal,
        ),
        Kind::PoweredOff => (format!("VM '{name}' powered off"), vec![], Urgency::Normal),
        Kind::Started => (format!("VM '{name}' started"), vec![], Urgency::Low),
        _ => (format!("VM '{name}' stopped"), vec![], Urgency::Low),
    };
    Notice {
        kind,
        vm_id: vm_id.to_string(),
        vm_name: name.to_string(),
        summary,
        body: reason.to_string(),
        actions,
        urgency,
    }
}

fn about_job(
    vm_id: &str,
    name: &str,
    operation: &str,
    target: &str,
    state: JobState,
    message: &str,
) -> Option<Notice> {
    let (verb, done) = match operation {
        "snapshot-create" => ("create", "created"),
        "snapshot-load" => ("load", "loaded"),
        "snapshot-delete" => ("delete", "deleted"),
        _ => return None,
    };
    let (kind, summary) = match state {
        JobState::Completed => (
            Kind::SnapshotFinished,
            format!("VM '{name}': snapshot '{target}' {done}"),
        ),
        JobState::Failed => (
            Kind::SnapshotFailed,
            format!("VM '{name}': snapshot {verb} of '{target}' failed"),
        ),
        // Someone asked for the cancel; a running job is not news.
        JobState::Cancelled | JobState::Running => return None,
    };
    Some(Notice {
        kind,
        vm_id: vm_id.to_string(),
        vm_name: name.to_string(),
        summary,
        body: message.to_string(),
        actions: vec![],
        urgency: Urgency::Normal,
    })
}

/// Feedback when a notification's button could not do its job.
pub fn action_failed(vm_id: &str, vm_name: &str, what: &str, why: &str) -> Notice {
    Notice {
        kind: Kind::ActionFailed,
        vm_id: vm_id.to_string(),
        vm_name: vm_name.to_string(),
        summary: what.to_string(),
        body: why.to_string(),
        actions: vec![],
        urgency: Urgency::Normal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> Notifications {
        Notifications::default()
    }

    #[test]
    fn crashes_failures_and_guest_poweroffs_are_news() {
        use Status::*;
        assert_eq!(
            status_kind(Crashed, Running, Cause::Other),
            Some(Kind::Crashed)
        );
        assert_eq!(
            status_kind(Failed, Starting, Cause::Other),
            Some(Kind::StartFailed)
        );
        assert_eq!(
            status_kind(Stopped, Running, Cause::Guest),
            Some(Kind::PoweredOff)
        );
        assert_eq!(status_kind(Stopped, Stopping, Cause::Restart), None);
        assert_eq!(
            status_kind(Stopped, Stopping, Cause::Other),
            Some(Kind::Stopped)
        );
        assert_eq!(
            status_kind(Running, Starting, Cause::Other),
            Some(Kind::Started)
        );
        assert_eq!(status_kind(Running, Paused, Cause::Other), None);
        assert_eq!(status_kind(Stopping, Running, Cause::Other), None);
    }

    #[test]
    fn what_the_user_asked_for_is_quiet_by_default() {
        let s = on();
        assert!(!Kind::Started.wanted(&s) && !Kind::Stopped.wanted(&s));
        assert!(Kind::Crashed.wanted(&s) && Kind::PoweredOff.wanted(&s));
        let off = Notifications {
            crashed: false,
            ..on()
        };
        assert!(!Kind::Crashed.wanted(&off));
    }

    #[test]
    fn a_crash_names_the_vm_carries_the_reason_and_offers_start_and_log() {
        let n = about_status(
            Kind::Crashed,
            "id",
            "web",
            "QEMU was killed by signal 9 (SIGKILL)",
        );
        assert_eq!(n.summary, "VM 'web' crashed");
        assert!(n.body.contains("SIGKILL"));
        let keys: Vec<_> = n.actions.iter().map(|a| a.0).collect();
        assert_eq!(keys, [ACTION_START, ACTION_LOG]);
        assert_eq!(n.urgency, Urgency::Critical);
    }

    #[test]
    fn snapshot_jobs() {
        let n = about_job(
            "id",
            "web",
            "snapshot-create",
            "base",
            JobState::Completed,
            "done",
        )
        .unwrap();
        assert_eq!(
            (n.kind, n.summary.as_str()),
            (Kind::SnapshotFinished, "VM 'web': snapshot 'base' created")
        );
        let n = about_job("id", "web", "snapshot-load", "base", JobState::Failed, "no").unwrap();
        assert_eq!(n.kind, Kind::SnapshotFailed);
        assert!(n.summary.contains("load of 'base' failed"), "{}", n.summary);
        assert_eq!(
            about_job("id", "web", "snapshot-delete", "x", JobState::Cancelled, ""),
            None
        );
    }
}
