//! The session's notification server (`org.freedesktop.Notifications`, Desktop
//! Notifications Specification 1.2), as maqetd uses it.
//!
//! A proxy of our own rather than notify-rust: it runs on maqetd's own connection, so a
//! server that sends `ActionInvoked` only to the notification's sender (unicast) still
//! reaches us, the signal's header names who clicked for the access gate, and nothing
//! blocks a thread (notify-rust's `wait_for_action` does).

use std::collections::HashMap;

use zbus::proxy;
use zbus::zvariant::Variant;

pub const SERVER_NAME: &str = "org.freedesktop.Notifications";
pub const SERVER_PATH: &str = "/org/freedesktop/Notifications";

/// The application as the notification server shows it, and the desktop entry and icon
/// it finds (`data/applications/org.maqet.Maqet.desktop`, `data/icons/`).
pub const APP_NAME: &str = "maqet";
pub const APP_ID: &str = "org.maqet.Maqet";

#[proxy(
    interface = "org.freedesktop.Notifications",
    default_service = "org.freedesktop.Notifications",
    default_path = "/org/freedesktop/Notifications"
)]
pub trait Notifications {
    fn get_capabilities(&self) -> zbus::Result<Vec<String>>;

    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        app_name: &str,
        replaces_id: u32,
        app_icon: &str,
        summary: &str,
        body: &str,
        actions: &[&str],
        hints: HashMap<&str, Variant<'_>>,
        expire_timeout: i32,
    ) -> zbus::Result<u32>;

    fn close_notification(&self, id: u32) -> zbus::Result<()>;

    #[zbus(signal)]
    fn action_invoked(&self, id: u32, action_key: &str) -> zbus::Result<()>;

    /// `reason`: 1 expired, 2 dismissed by the user, 3 closed by a call, 4 other.
    #[zbus(signal)]
    fn notification_closed(&self, id: u32, reason: u32) -> zbus::Result<()>;
}

/// Body text for a server that reads markup (`body-markup`): the spec's subset of XML,
/// so `<`, `>` and `&` in a QEMU message must be escaped.
pub fn escape_markup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            escape_markup("qemu: -device <x> & more"),
            "qemu: -device &lt;x&gt; &amp; more"
        );
    }
}
