//! The session-life keys: `autostart`, `autostart_delay`, `restart`, `on_sleep`,
//! `on_logout`, `memory_max`, `cpu_quota`. None of them touches the QEMU command line;
//! maqetd acts on them (`crate::session`, docs/lifecycle.md).

use super::diag::Diags;
use super::size::parse_size;
use super::yaml::{Node, Value};

/// What happens when a VM's QEMU ends without being asked to (`restart:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Never restarted by maqet (the default).
    #[default]
    No,
    /// Restarted when it crashed (status `crashed`).
    OnCrash,
    /// Restarted when it crashed or the guest powered itself off; never after a stop
    /// someone asked for.
    Always,
}

impl RestartPolicy {
    pub fn parse(text: &str) -> Option<RestartPolicy> {
        Some(match text {
            "no" => RestartPolicy::No,
            "on-crash" => RestartPolicy::OnCrash,
            "always" => RestartPolicy::Always,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnCrash => "on-crash",
            RestartPolicy::Always => "always",
        }
    }
}

/// What a running VM does when the machine goes to sleep (`on_sleep:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SleepAction {
    /// Pause the vCPUs before sleep, resume them on wake (the default).
    #[default]
    Pause,
    /// Save a live snapshot `maqet-sleep` and quit; restore it on wake.
    Save,
    /// Leave the VM alone.
    None,
}

impl SleepAction {
    pub fn parse(text: &str) -> Option<SleepAction> {
        Some(match text {
            "pause" => SleepAction::Pause,
            "save" => SleepAction::Save,
            "none" => SleepAction::None,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SleepAction::Pause => "pause",
            SleepAction::Save => "save",
            SleepAction::None => "none",
        }
    }
}

/// What a running VM does when the session ends (`on_logout:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogoutAction {
    /// Keep running: VMs outlive maqetd (the default).
    #[default]
    Keep,
    /// Graceful stop (ACPI, then escalation) with the default stop timeout.
    Stop,
    /// Save a live snapshot `maqet-logout` and quit.
    Save,
}

impl LogoutAction {
    pub fn parse(text: &str) -> Option<LogoutAction> {
        Some(match text {
            "keep" => LogoutAction::Keep,
            "stop" => LogoutAction::Stop,
            "save" => LogoutAction::Save,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogoutAction::Keep => "keep",
            LogoutAction::Stop => "stop",
            LogoutAction::Save => "save",
        }
    }
}

/// What the session keys compiled to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionKeys {
    pub autostart: bool,
    /// Seconds to wait before this VM's autostart (after the VMs before it started).
    pub autostart_delay: u32,
    pub restart: RestartPolicy,
    pub on_sleep: SleepAction,
    pub on_logout: LogoutAction,
    /// Bytes: the scope's `MemoryMax`.
    pub memory_max: Option<u64>,
    /// Percent of one CPU: the scope's `CPUQuota` (150 = one and a half CPUs).
    pub cpu_quota: Option<u32>,
}

/// The longest `autostart_delay`: an hour (a longer one is surely a typo).
const MAX_AUTOSTART_DELAY: u32 = 3600;

pub(crate) fn boolean(node: &Node, key: &str, diags: &mut Diags) -> bool {
    match node.value {
        Value::Bool(b) => b,
        _ => {
            let message = format!("`{key}` must be true or false, found {}", node.kind_name());
            diags.error(&node.loc, message);
            false
        }
    }
}

pub(crate) fn autostart_delay(node: &Node, diags: &mut Diags) -> u32 {
    if let Value::Int(text) = &node.value
        && let Ok(s) = text.parse::<u32>()
        && s <= MAX_AUTOSTART_DELAY
    {
        return s;
    }
    let found = node
        .scalar_text()
        .unwrap_or_else(|| node.kind_name().into());
    diags.error_hint(
        &node.loc,
        format!("invalid `autostart_delay` `{found}`"),
        format!("a whole number of seconds from 0 to {MAX_AUTOSTART_DELAY}"),
    );
    0
}

/// A keyword key (`restart`, `on_sleep`, `on_logout`).
pub(crate) fn keyword<T>(
    node: &Node,
    key: &str,
    parse: fn(&str) -> Option<T>,
    choices: &str,
    diags: &mut Diags,
) -> Option<T> {
    let found = match &node.value {
        Value::Str(s) => {
            if let Some(v) = parse(s) {
                return Some(v);
            }
            s.clone()
        }
        // YAML 1.2: `no` is a string, but `false` is not.
        _ => node
            .scalar_text()
            .unwrap_or_else(|| node.kind_name().into()),
    };
    diags.error_hint(
        &node.loc,
        format!("invalid `{key}` `{found}`"),
        format!("use {choices}"),
    );
    None
}

/// `memory_max: 2G` (bytes, at least 1 MiB).
pub(crate) fn memory_max(node: &Node, diags: &mut Diags) -> Option<u64> {
    let text = node.scalar_text().unwrap_or_default();
    match parse_size(&text) {
        Ok(bytes) if bytes >= 1 << 20 => Some(bytes),
        _ => {
            diags.error_hint(
                &node.loc,
                format!("invalid `memory_max` `{text}`"),
                "a size of at least 1M, e.g. `memory_max: 2G`",
            );
            None
        }
    }
}

/// `cpu_quota: 150%` (percent of one CPU, 1 to 100000).
pub(crate) fn cpu_quota(node: &Node, diags: &mut Diags) -> Option<u32> {
    let text = node.scalar_text().unwrap_or_default();
    let number = text.strip_suffix('%').unwrap_or(&text);
    match number.parse::<u32>() {
        Ok(p) if (1..=100_000).contains(&p) => Some(p),
        _ => {
            diags.error_hint(
                &node.loc,
                format!("invalid `cpu_quota` `{text}`"),
                "a percentage of one CPU, e.g. `cpu_quota: 150%` for one and a half CPUs",
            );
            None
        }
    }
}
