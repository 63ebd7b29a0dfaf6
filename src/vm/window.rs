//! Where QEMU's own window opens (`display: gtk`, `sdl`): on the graphical session of
//! whoever started the VM, not on whatever `DISPLAY` maqetd inherited when it was
//! activated (perhaps a session that has ended since).
//!
//! `StartWithOptions({"environment": {...}})` carries the caller's graphical variables;
//! maqetd keeps the last ones per VM (a `Restart` or a notification's "Start again"
//! reuses them) and gives QEMU exactly those: a variable the caller did not pass is
//! removed, so a stale `WAYLAND_DISPLAY` cannot win over the caller's `DISPLAY`.

use std::collections::HashMap;

use super::error::VmError;

/// The variables that say where a window opens, and nothing else a caller may set.
pub const GRAPHICAL_VARS: [&str; 4] = [
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XAUTHORITY",
    "XDG_SESSION_TYPE",
];

/// Whether the arguments give QEMU a window of its own (`-display gtk|sdl[,…]`).
pub fn opens_window(qemu_args: &[String]) -> bool {
    qemu_args.windows(2).any(|w| {
        w[0].trim_start_matches('-') == "display"
            && matches!(w[1].split(',').next(), Some("gtk" | "sdl"))
    })
}

/// Longer values are refused (a path or a display name is far shorter).
const MAX_VALUE_BYTES: usize = 4096;

/// A caller's graphical environment; `None` inside: maqetd's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphicalEnv(Option<Vec<(String, String)>>);

impl GraphicalEnv {
    /// Checks the `environment` option of `StartWithOptions`.
    pub fn from_vars(vars: HashMap<String, String>) -> Result<GraphicalEnv, VmError> {
        let mut checked = Vec::new();
        for (key, value) in vars {
            if !GRAPHICAL_VARS.contains(&key.as_str()) {
                return Err(VmError::InvalidArgument(format!(
                    "environment variable '{key}' cannot be passed to QEMU; only {} can",
                    GRAPHICAL_VARS.join(", ")
                )));
            }
            if value.len() > MAX_VALUE_BYTES || value.contains('\0') {
                return Err(VmError::InvalidArgument(format!(
                    "environment variable '{key}' is too long or holds a NUL byte"
                )));
            }
            checked.push((key, value));
        }
        checked.sort();
        Ok(GraphicalEnv(Some(checked)))
    }

    /// Whether a caller's environment is set (else QEMU inherits maqetd's).
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// The changes that give QEMU exactly the caller's graphical variables (each set
    /// or removed; none when no caller's environment is set).
    pub fn env_changes(&self) -> Vec<(&'static str, Option<&str>)> {
        let Some(vars) = &self.0 else {
            return Vec::new();
        };
        GRAPHICAL_VARS
            .iter()
            .map(|key| {
                let value = vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
                (*key, value)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn windows_are_gtk_and_sdl() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(opens_window(&args(&["-m", "1", "-display", "gtk"])));
        assert!(opens_window(&args(&["--display", "sdl,gl=on"])));
        assert!(!opens_window(&args(&["-display", "none"])));
        assert!(!opens_window(&args(&["-display", "vnc=:1"])));
        assert!(!opens_window(&args(&["-name", "gtk"])));
    }

    #[test]
    fn only_the_graphical_variables_pass() {
        let env = GraphicalEnv::from_vars(vars(&[("DISPLAY", ":3")])).unwrap();
        assert!(env.is_set());
        let set: HashMap<_, _> = env.env_changes().into_iter().collect();
        assert_eq!(set["DISPLAY"], Some(":3"));
        // Not passed: removed, not inherited.
        assert_eq!(set["WAYLAND_DISPLAY"], None);
        assert!(set.contains_key("XAUTHORITY"));

        for bad in [("LD_PRELOAD", "/x.so"), ("PATH", "/tmp")] {
            let e = GraphicalEnv::from_vars(vars(&[bad])).unwrap_err();
            assert!(e.to_string().contains("only DISPLAY"), "{e}");
        }
        let long = "x".repeat(MAX_VALUE_BYTES + 1);
        assert!(GraphicalEnv::from_vars(vars(&[("DISPLAY", &long)])).is_err());
        assert!(GraphicalEnv::from_vars(vars(&[("DISPLAY", "a\0b")])).is_err());
        assert!(!GraphicalEnv::default().is_set());
    }
}
