//! Where a call came from, when it was not a plain D-Bus method call: a notification
//! button, the GNOME Shell search, KRunner. The gate treats them all alike (the caller is
//! still who the bus says sent the message); the audit log records the origin, so
//! `maqet audit` can tell a click on "Start again" from `maqet start`.
//!
//! The audit table keeps the origin at the head of the `arguments` column, as
//! `(via <tag>) <arguments>`: no schema change, and readable with any SQLite tool. Only
//! maqetd writes that prefix; arguments of a plain call that happen to start with
//! `(via ` are recorded behind `(via bus) `, so a caller cannot forge an origin.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A button of one of maqetd's desktop notifications.
    Notification,
    /// GNOME Shell's overview search (`org.gnome.Shell.SearchProvider2`).
    GnomeSearch,
    /// KDE's KRunner (`org.kde.krunner1`).
    KRunner,
}

const PREFIX: &str = "(via ";

impl Origin {
    const ALL: [Origin; 3] = [Origin::Notification, Origin::GnomeSearch, Origin::KRunner];

    /// The word `maqet audit` shows.
    pub fn tag(self) -> &'static str {
        match self {
            Origin::Notification => "notification",
            Origin::GnomeSearch => "gnome-search",
            Origin::KRunner => "krunner",
        }
    }

    /// The audited `arguments` of a call from `origin` (None: a plain D-Bus call).
    pub fn record(origin: Option<Origin>, args: &str) -> String {
        match origin {
            Some(o) => format!("{PREFIX}{}) {args}", o.tag()),
            None if args.starts_with(PREFIX) => format!("{PREFIX}bus) {args}"),
            None => args.to_string(),
        }
    }

    /// Splits audited `arguments` into the origin's tag (`bus` for a plain call) and the
    /// arguments themselves; the inverse of [`Origin::record`].
    pub fn split(recorded: &str) -> (&str, &str) {
        let Some(rest) = recorded.strip_prefix(PREFIX) else {
            return ("bus", recorded);
        };
        let known = Origin::ALL.iter().map(|o| o.tag()).chain(["bus"]);
        for tag in known {
            if let Some(args) = rest.strip_prefix(tag).and_then(|r| {
                r.strip_prefix(") ")
                    .or(r.strip_prefix(')').filter(|r| r.is_empty()))
            }) {
                return (tag, args);
            }
        }
        ("bus", recorded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_round_trip_and_cannot_be_forged() {
        for o in Origin::ALL {
            let rec = Origin::record(Some(o), "x=1");
            assert_eq!(Origin::split(&rec), (o.tag(), "x=1"));
            assert_eq!(Origin::split(&Origin::record(Some(o), "")), (o.tag(), ""));
        }
        assert_eq!(Origin::split("name=\"a\""), ("bus", "name=\"a\""));
        // A caller's argument that imitates the prefix stays a plain call's argument.
        let forged = "(via notification) x";
        let rec = Origin::record(None, forged);
        assert_eq!(Origin::split(&rec), ("bus", forged));
        assert_eq!(
            Origin::split("(via nonsense) y"),
            ("bus", "(via nonsense) y")
        );
    }
}
