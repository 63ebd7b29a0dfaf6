//! Which core events a person hears about, and what the notification says. Pure: no
//! bus, so every decision is unit-tested.

use crate::events::{Cause, CoreEvent};
use crate::jobs::JobState;
use crate::settings::Notifications;
use crate::vm::Status;

/// Action verbs. The key sent is `<verb>:<VM id>` (the spec's `action_key`): it
/// carries all a click needs, so a button still works after maqetd restarted or idled
/// out; documented in docs/desktop.md.
pub const ACTION_START: &str = "start";
pub const ACTION_LOG: &str = "log";
const VERBS: [&str; 2] = [ACTION_START, ACTION_LOG];

/// The action key of `verb` for the VM `vm_id`.
pub fn action_key(verb: &str, vm_id: &str) -> String {
    format!("{verb}:{vm_id}")
}

/// The verb and VM id of one of our action keys (`None`: not ours).
pub fn parse_action_key(key: &str) -> Option<(&'static str, &str)> {
    let (verb, vm_id) = key.split_once(':')?;
    let verb = VERBS.into_iter().find(|v| *v == verb)?;
    let uuid_like = vm_id.len() == 36 && vm_id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit());
    uuid_like.then_some((verb, vm_id))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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

/// What ends each kind's situation when the VM runs again: its card is withdrawn.
const ENDED_BY_A_RUN: &[Kind] = &[
    Kind::Crashed,
    Kind::PoweredOff,
    Kind::StartFailed,
    Kind::Stopped,
    Kind::ActionFailed,
];
const ALL_KINDS: &[Kind] = &[
    Kind::Crashed,
    Kind::PoweredOff,
    Kind::StartFailed,
    Kind::Started,
    Kind::Stopped,
    Kind::SnapshotFinished,
    Kind::SnapshotFailed,
    Kind::ActionFailed,
];

/// The notifications of a VM an event makes untrue (VM id, kinds): a VM that runs
/// again has not crashed any more; a removed VM has nothing left to say.
pub fn withdrawn_by(ev: &CoreEvent) -> Option<(String, &'static [Kind])> {
    match ev {
        CoreEvent::StatusChanged { info, previous, .. }
            if matches!(info.status, Status::Running | Status::Paused)
                && *previous == Status::Starting =>
        {
            Some((info.id.clone(), ENDED_BY_A_RUN))
        }
        CoreEvent::VmRemoved { vm, .. } => Some((vm.id().to_string(), ALL_KINDS)),
        _ => None,
    }
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
    /// (verb, label), offered where the server advertises `actions` (the key sent is
    /// [`action_key`]).
    pub actions: Vec<(&'static str, &'static str)>,
    pub urgency: Urgency,
}

/// The notification an event deserves under these settings, if any. `seen`: the
/// person who caused it saw the outcome (a failed start answered to its caller, a
/// snapshot its starter followed to the end): nothing to tell them.
pub fn for_event(ev: &CoreEvent, s: &Notifications, seen: bool) -> Option<Notice> {
    if !s.enabled || seen {
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
    let body = match kind {
        Kind::StartFailed | Kind::Crashed => failure_body(name, reason),
        _ => reason.to_string(),
    };
    Notice {
        kind,
        vm_id: vm_id.to_string(),
        vm_name: name.to_string(),
        body: without_repetition(&summary, name, &body),
        summary,
        actions,
        urgency,
    }
}

/// A failure's body: QEMU's own error first (its warnings last), then maqet's account
/// without the VM's name, which the summary already gives.
fn failure_body(name: &str, reason: &str) -> String {
    let (mut errors, mut warnings, mut account) = (Vec::new(), Vec::new(), Vec::new());
    let mut full_log = None;
    for line in reason.lines() {
        let mut line = line.trim();
        if let Some(at) = line.rfind(" (full log: ") {
            full_log = Some(line[at + 1..].to_string());
            line = line[..at].trim_end();
        }
        // maqet's words, then (after ": ") the first line QEMU wrote.
        let (ours, qemu) = match line.find("qemu-") {
            Some(0) => ("", line),
            Some(at) if line[..at].ends_with(": ") => (line[..at - 2].trim(), &line[at..]),
            _ => (line, ""),
        };
        if !ours.is_empty() {
            account.push(ours.to_string());
        }
        if qemu.contains("warning:") {
            warnings.push(qemu);
        } else if !qemu.is_empty() {
            errors.push(qemu);
        }
    }
    let account = account
        .join(" ")
        .replace(&format!("cannot start VM '{name}': "), "")
        .replace(&format!("QEMU for VM '{name}' "), "QEMU ");
    let mut out: Vec<String> = errors.into_iter().map(str::to_string).collect();
    out.extend((!account.is_empty()).then_some(account));
    out.extend(warnings.into_iter().map(str::to_string));
    out.extend(full_log);
    out.join("\n")
}

/// The body, or nothing where it would only say what the summary says (every word of
/// it is in the summary but for who did it: "guest powered off" under "VM 'web'
/// powered off").
fn without_repetition(summary: &str, name: &str, body: &str) -> String {
    const WHO: [&str; 6] = ["the", "guest", "vm", "qemu", "was", "by"];
    let words = |s: &str| -> Vec<String> {
        s.replace(&format!("VM '{name}'"), "")
            .replace(['\'', ':', '.', ','], " ")
            .split_whitespace()
            .map(str::to_lowercase)
            .collect()
    };
    let said = words(summary);
    let repeats = words(body)
        .iter()
        .all(|w| WHO.contains(&w.as_str()) || said.contains(w));
    if repeats {
        String::new()
    } else {
        body.to_string()
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
        body: without_repetition(&summary, name, message),
        summary,
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

/// The answer to a button whose VM no longer exists.
pub fn vm_gone(vm_id: &str) -> Notice {
    Notice {
        kind: Kind::ActionFailed,
        vm_id: vm_id.to_string(),
        vm_name: String::new(),
        summary: "This VM no longer exists".into(),
        body: "It was removed after the notification was shown.".into(),
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
    fn action_keys_carry_the_verb_and_the_vm() {
        let id = "0b7c3f4e-1d2a-4c5b-9e8f-123456789abc";
        assert_eq!(action_key(ACTION_START, id), format!("start:{id}"));
        assert_eq!(
            parse_action_key(&action_key(ACTION_LOG, id)),
            Some((ACTION_LOG, id))
        );
        for other in [
            "default",
            "start",
            "start:",
            "start:../x",
            "reboot:{id}",
            &format!("start:{id}x"),
        ] {
            assert_eq!(parse_action_key(other), None, "{other}");
        }
    }

    #[test]
    fn a_failed_start_leads_with_qemus_error_and_does_not_repeat_the_title() {
        let reason = "QEMU for VM 'web' exited with status 1 during start-up: qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]\nqemu-system-x86_64: -no-such-option: invalid option (full log: /x/web.log)";
        let n = about_status(Kind::StartFailed, "id", "web", reason);
        let lines: Vec<&str> = n.body.lines().collect();
        assert_eq!(
            lines,
            [
                "qemu-system-x86_64: -no-such-option: invalid option",
                "QEMU exited with status 1 during start-up",
                "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]",
                "(full log: /x/web.log)",
            ]
        );
        let n = about_status(
            Kind::StartFailed,
            "id",
            "web",
            "cannot start VM 'web': no QEMU binary found",
        );
        assert_eq!(n.body, "no QEMU binary found");
        assert!(!n.body.contains("web"));
    }

    #[test]
    fn a_body_that_says_what_the_summary_says_is_left_out() {
        let n = about_job(
            "id",
            "web",
            "snapshot-create",
            "base",
            JobState::Completed,
            "snapshot 'base' created",
        )
        .unwrap();
        assert_eq!(n.body, "");
        let n = about_status(Kind::PoweredOff, "id", "web", "guest powered off");
        assert_eq!(n.body, "");
        let n = about_job(
            "id",
            "web",
            "snapshot-create",
            "base",
            JobState::Failed,
            "disk 'hd0' is read-only",
        )
        .unwrap();
        assert_eq!(n.body, "disk 'hd0' is read-only");
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
