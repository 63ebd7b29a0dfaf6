//! maqetd's own settings: `$XDG_CONFIG_HOME/maqet/maqetd.yaml`.
//!
//! Every key is optional; a missing file means the defaults. A malformed file is
//! reported (with its line and column) and the defaults are used: maqetd still starts.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Seconds without any running VM and without calls after which maqetd exits
    /// (D-Bus activation brings it back). 0 = never.
    pub idle_exit_sec: u64,
    /// Desktop notifications (docs/desktop.md).
    pub notifications: Notifications,
    /// `maqet view`'s viewer command (the display's address is appended); empty:
    /// remote-viewer. `MAQET_VIEWER` overrides it.
    pub viewer: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            idle_exit_sec: 60,
            notifications: Notifications::default(),
            viewer: Vec::new(),
        }
    }
}

/// Which events become desktop notifications, and what their actions do. Defaults: what
/// a person wants to hear about on, what they just asked for off.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Notifications {
    /// Master switch.
    pub enabled: bool,
    /// QEMU died without a shutdown request (killed, nonzero exit, guest panic).
    pub crashed: bool,
    /// The guest powered itself off (not answering a `Stop`).
    pub powered_off: bool,
    /// A start failed (bad option, missing binary, disk creation).
    pub start_failed: bool,
    pub snapshot_finished: bool,
    pub snapshot_failed: bool,
    /// A VM started (noise when you started it yourself: off).
    pub started: bool,
    /// A VM stopped because someone asked it to (`Stop`, QMP `quit`): off.
    pub stopped: bool,
    /// Offer "Start again" / "Show log" buttons where the server supports actions.
    pub actions: bool,
    /// How long an open notification with buttons keeps maqetd from its idle exit,
    /// so the buttons still work when clicked. 0 = not at all.
    pub action_keep_alive_sec: u64,
    /// The command "Show log" runs with the log file appended.
    pub log_opener: Vec<String>,
}

impl Default for Notifications {
    fn default() -> Self {
        Notifications {
            enabled: true,
            crashed: true,
            powered_off: true,
            start_failed: true,
            snapshot_finished: true,
            snapshot_failed: true,
            started: false,
            stopped: false,
            actions: true,
            action_keep_alive_sec: 900,
            log_opener: vec!["xdg-open".into()],
        }
    }
}

impl Settings {
    /// Reads the settings file; `Err` carries a message for the log (defaults apply).
    pub fn load(path: &Path) -> (Settings, Option<String>) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return (Settings::default(), None);
            }
            Err(e) => {
                return (
                    Settings::default(),
                    Some(format!(
                        "cannot read {}: {e}; using defaults",
                        path.display()
                    )),
                );
            }
        };
        if text.trim().is_empty() {
            return (Settings::default(), None);
        }
        match serde_yaml::from_str(&text) {
            Ok(s) => (s, None),
            Err(e) => (
                Settings::default(),
                Some(format!("{}: {e}; using defaults", path.display())),
            ),
        }
    }

    /// The idle-exit delay, `None` when disabled.
    pub fn idle_exit(&self) -> Option<Duration> {
        (self.idle_exit_sec > 0).then(|| Duration::from_secs(self.idle_exit_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_empty_and_partial_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("maqetd.yaml");
        assert_eq!(Settings::load(&p), (Settings::default(), None));
        std::fs::write(&p, "").unwrap();
        assert_eq!(Settings::load(&p).0, Settings::default());
        std::fs::write(&p, "idle_exit_sec: 0\n").unwrap();
        let (s, err) = Settings::load(&p);
        assert_eq!((s.idle_exit(), err), (None, None));
        std::fs::write(
            &p,
            "notifications:\n  started: true\n  log_opener: [gio, open]\n",
        )
        .unwrap();
        let (s, err) = Settings::load(&p);
        assert_eq!(err, None);
        assert!(s.notifications.started && s.notifications.crashed);
        assert_eq!(s.notifications.log_opener, ["gio", "open"]);
        assert_eq!(s.idle_exit_sec, 60);
    }

    /// docs/configuration.md documents every key of maqetd.yaml.
    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../docs/configuration.md");
        let section = doc
            .split("## maqetd settings")
            .nth(1)
            .expect("docs/configuration.md has a '## maqetd settings' section");
        // serde names every field it expects when it meets an unknown one.
        let fields = |yaml: &str| -> Vec<String> {
            let err = serde_yaml::from_str::<Settings>(yaml)
                .unwrap_err()
                .to_string();
            // "unknown field `zzz`, expected `a` or `b`" / "expected one of `a`, `b`, …"
            let expected = err
                .split(", expected")
                .nth(1)
                .unwrap_or_else(|| panic!("no field list in {err:?}"));
            expected
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        let mut keys = fields("zzz: 1\n");
        let nested = fields("notifications: {zzz: 1}\n");
        assert!(nested.len() > 10, "{nested:?}");
        keys.extend(nested.iter().map(|k| format!("notifications.{k}")));
        for k in keys {
            assert!(
                section.contains(&format!("| `{k}` |")),
                "{k} is not documented"
            );
        }
    }

    #[test]
    fn a_bad_file_is_reported_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("maqetd.yaml");
        std::fs::write(&p, "idle_exit: 5\n").unwrap();
        let (s, err) = Settings::load(&p);
        assert_eq!(s, Settings::default());
        let err = err.unwrap();
        assert!(
            err.contains("maqetd.yaml") && err.contains("idle_exit"),
            "{err}"
        );
    }
}
