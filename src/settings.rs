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
}

impl Default for Settings {
    fn default() -> Self {
        Settings { idle_exit_sec: 60 }
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
