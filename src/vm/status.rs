//! The VM state machine: states, and which operation is legal in which state.
//!
//! `docs/lifecycle.md` draws the same machine; the table in [`Operation::allowed_in`] is
//! the single source both the core and the docs test check against.

use std::fmt;

/// Where a VM is in its life. The string forms are the D-Bus `Status` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Defined, never started.
    Created,
    /// QEMU spawned, monitor not yet ready.
    Starting,
    Running,
    Paused,
    /// A stop is in progress (ACPI power-down, then escalation).
    Stopping,
    /// QEMU exited after a shutdown request (ours or the guest's).
    Stopped,
    /// QEMU died without a shutdown request: killed, or a nonzero exit.
    Crashed,
    /// QEMU could not start; the reason says why.
    Failed,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Created,
        Status::Starting,
        Status::Running,
        Status::Paused,
        Status::Stopping,
        Status::Stopped,
        Status::Crashed,
        Status::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::Crashed => "crashed",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// A QEMU process exists (or is being created) for the VM.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            Status::Starting | Status::Running | Status::Paused | Status::Stopping
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every call that depends on the VM's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Start,
    Stop,
    Restart,
    Reset,
    Pause,
    Resume,
    /// `RemoveVM` without `force`.
    Remove,
    /// QMP passthrough, keys, screendump, device hot-plug, live snapshots.
    Monitor,
}

impl Operation {
    pub const ALL: [Operation; 8] = [
        Operation::Start,
        Operation::Stop,
        Operation::Restart,
        Operation::Reset,
        Operation::Pause,
        Operation::Resume,
        Operation::Remove,
        Operation::Monitor,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Start => "Start",
            Operation::Stop => "Stop",
            Operation::Restart => "Restart",
            Operation::Reset => "Reset",
            Operation::Pause => "Pause",
            Operation::Resume => "Resume",
            Operation::Remove => "RemoveVM",
            Operation::Monitor => "QMP and console calls",
        }
    }

    /// The states in which the operation is legal. Anything else is `InvalidState`.
    pub fn allowed_in(self) -> &'static [Status] {
        use Status::*;
        match self {
            Operation::Start => &[Created, Stopped, Crashed, Failed],
            // Stop while stopping joins (or, with force, escalates) the stop in progress.
            Operation::Stop => &[Running, Paused, Stopping],
            // Like `systemctl restart`: a VM that is not running is simply started.
            Operation::Restart => &[Running, Paused, Created, Stopped, Crashed, Failed],
            Operation::Reset => &[Running, Paused],
            Operation::Pause => &[Running],
            Operation::Resume => &[Paused],
            Operation::Remove => &[Created, Stopped, Crashed, Failed],
            Operation::Monitor => &[Running, Paused],
        }
    }

    pub fn is_allowed(self, status: Status) -> bool {
        self.allowed_in().contains(&status)
    }

    /// What to tell a caller whose call is illegal in `status`.
    pub fn refusal(self, vm: &str, status: Status) -> String {
        let hint = match (self, status) {
            (Operation::Start, Status::Running | Status::Paused) => "it is already running",
            (Operation::Start, Status::Starting) => "it is already starting",
            (Operation::Start, Status::Stopping) => {
                "it is stopping; wait for it to stop (maqet wait VM status=stopped) and start it again"
            }
            (Operation::Remove, _) => {
                "stop it first (maqet stop VM), or remove it with force to kill it"
            }
            (Operation::Pause, Status::Paused) => "it is already paused",
            (Operation::Resume, Status::Running) => "it is not paused",
            (_, Status::Starting) => "it is still starting; wait until it is running",
            _ => "start it first (maqet start VM)",
        };
        format!(
            "{} is not possible while VM '{vm}' is {status}: {}",
            self.name(),
            hint.replace("VM", vm)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("bogus"), None);
    }

    #[test]
    fn start_is_refused_while_a_process_exists() {
        for s in Status::ALL {
            assert_eq!(Operation::Start.is_allowed(s), !s.has_process(), "{s}");
        }
    }

    /// docs/lifecycle.md's table of legal calls must say what the code does.
    #[test]
    fn lifecycle_doc_table_matches_the_code() {
        let doc = include_str!("../../docs/lifecycle.md");
        let header = doc
            .lines()
            .find(|l| l.starts_with("| call |"))
            .expect("table header");
        let states: Vec<Status> = header
            .split('|')
            .map(str::trim)
            .skip(2)
            .filter(|c| !c.is_empty())
            .map(|c| Status::parse(c).unwrap_or_else(|| panic!("unknown state {c}")))
            .collect();
        assert_eq!(states.len(), Status::ALL.len());
        for op in Operation::ALL {
            let label = match op {
                Operation::Remove => "`RemoveVM` (no force)".to_string(),
                Operation::Monitor => "QMP and console calls".to_string(),
                other => format!("`{}`", other.name()),
            };
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| {label} |")))
                .unwrap_or_else(|| panic!("no row for {label}"));
            let cells: Vec<&str> = row.split('|').map(str::trim).skip(2).collect();
            for (state, cell) in states.iter().zip(cells) {
                assert_eq!(
                    cell == "yes",
                    op.is_allowed(*state),
                    "{label} in {state}: the doc says {cell}"
                );
            }
        }
    }

    #[test]
    fn refusal_names_vm_state_and_remedy() {
        let m = Operation::Remove.refusal("web", Status::Running);
        assert!(
            m.contains("'web'") && m.contains("running") && m.contains("maqet stop web"),
            "{m}"
        );
    }
}
