//! The one rule for text maqetd sends on the bus.
//!
//! A guest, QEMU and the files a config names are untrusted: their text reaches property
//! values (`StatusReason` holds QEMU's last line of stderr), error messages, audit and
//! history rows, QMP event names and job messages. D-Bus strings must be valid UTF-8
//! without NUL; a NUL makes dbus-daemon drop the sender's whole connection, which would
//! take maqetd off the bus. Rust strings are always UTF-8, so the rule is about control
//! characters, and it is applied on the way out (values are stored as they came):
//!
//! - U+0000 (NUL) becomes the two characters `\0`;
//! - every other C0 control character except tab, line feed and carriage return
//!   (U+0001..U+001F without U+0009, U+000A, U+000D) becomes `\xHH` (two lowercase hex
//!   digits), so escape sequences a guest prints cannot drive a client's terminal;
//! - everything else, backslashes included, is sent unchanged (JSON stays valid: JSON
//!   text never holds a raw control character).
//!
//! The escape is not reversible (a literal `\0` in the input looks the same); it is for
//! reading, never for round trips.
//!
//! Everything a method returns goes through [`Outbound`] in the access gate's `call`
//! (the path every D-Bus method takes), errors included; property getters, signals and
//! desktop notifications call it where they build their values (`service::properties`,
//! the signal pump, job objects, the notifier).

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::Hash;

use crate::error::MaqetError;

/// Whether a byte must be escaped (C0 controls other than tab, LF, CR).
fn needs_escape(b: u8) -> bool {
    b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')
}

/// `s` made safe for a D-Bus string by the module's rule; borrowed when already safe.
pub fn escape(s: &str) -> Cow<'_, str> {
    // No early exit: the whole-string check compiles to vector code, and text that
    // needs escaping is rare (ListVMs and GetManagedObjects check every name).
    if !s.bytes().fold(false, |found, b| found | needs_escape(b)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\0' => out.push_str("\\0"),
            c if c.is_ascii() && needs_escape(c as u8) => {
                out.push_str(&format!("\\x{:02x}", c as u8));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A value on its way onto the bus: every string in it escaped by [`escape`].
pub trait Outbound {
    fn outbound(self) -> Self;
}

impl Outbound for String {
    fn outbound(self) -> String {
        match escape(&self) {
            Cow::Borrowed(_) => self,
            Cow::Owned(s) => s,
        }
    }
}

/// Values that hold no free text (object paths are checked by zbus to be `[A-Za-z0-9_/]`).
macro_rules! text_free {
    ($($t:ty),*) => {$(
        impl Outbound for $t {
            fn outbound(self) -> Self {
                self
            }
        }
    )*};
}
text_free!(
    (),
    bool,
    u8,
    u16,
    u32,
    u64,
    i16,
    i32,
    i64,
    f64,
    zbus::OwnedObjectPath,
    zbus::OwnedFd
);

impl<T: Outbound> Outbound for Vec<T> {
    fn outbound(self) -> Self {
        self.into_iter().map(Outbound::outbound).collect()
    }
}

impl<T: Outbound> Outbound for Option<T> {
    fn outbound(self) -> Self {
        self.map(Outbound::outbound)
    }
}

impl<K: Outbound + Eq + Hash, V: Outbound> Outbound for HashMap<K, V> {
    fn outbound(self) -> Self {
        self.into_iter()
            .map(|(k, v)| (k.outbound(), v.outbound()))
            .collect()
    }
}

impl Outbound for zbus::OwnedVariant {
    fn outbound(self) -> Self {
        let escaped = match &*self {
            zbus::Variant::Str(s) => match escape(s.as_str()) {
                Cow::Borrowed(_) => None,
                Cow::Owned(e) => Some(e),
            },
            _ => None,
        };
        match escaped.and_then(|e| zbus::OwnedVariant::try_from(zbus::Variant::from(e)).ok()) {
            Some(v) => v,
            None => self,
        }
    }
}

macro_rules! tuple {
    ($($n:tt $t:ident),+) => {
        impl<$($t: Outbound),+> Outbound for ($($t,)+) {
            fn outbound(self) -> Self {
                ($(self.$n.outbound(),)+)
            }
        }
    };
}
tuple!(0 A, 1 B);
tuple!(0 A, 1 B, 2 C);
tuple!(0 A, 1 B, 2 C, 3 D);
tuple!(0 A, 1 B, 2 C, 3 D, 4 E);
tuple!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F);
tuple!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F, 6 G);
tuple!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F, 6 G, 7 H);
tuple!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F, 6 G, 7 H, 8 I);
tuple!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F, 6 G, 7 H, 8 I, 9 J);
tuple!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F, 6 G, 7 H, 8 I, 9 J, 10 K);
tuple!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F, 6 G, 7 H, 8 I, 9 J, 10 K, 11 L);

impl Outbound for MaqetError {
    fn outbound(self) -> Self {
        use MaqetError::*;
        match self {
            ZBus(e) => ZBus(e),
            NotFound(m) => NotFound(m.outbound()),
            AlreadyExists(m) => AlreadyExists(m.outbound()),
            InvalidArgument(m) => InvalidArgument(m.outbound()),
            InvalidConfig(m) => InvalidConfig(m.outbound()),
            InvalidState(m) => InvalidState(m.outbound()),
            AccessDenied(m) => AccessDenied(m.outbound()),
            Qmp(m) => Qmp(m.outbound()),
            QemuFailed(m) => QemuFailed(m.outbound()),
            Storage(m) => Storage(m.outbound()),
            Timeout(m) => Timeout(m.outbound()),
            Cancelled(m) => Cancelled(m.outbound()),
            Internal(m) => Internal(m.outbound()),
        }
    }
}

impl<T: Outbound> Outbound for Result<T, MaqetError> {
    fn outbound(self) -> Self {
        self.map(Outbound::outbound).map_err(Outbound::outbound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_and_controls_are_escaped_and_nothing_is_dropped() {
        assert_eq!(escape("x\0y"), "x\\0y");
        assert_eq!(escape("\x1b[31mred\x07"), "\\x1b[31mred\\x07");
        assert_eq!(escape("tab\tnl\ncr\r"), "tab\tnl\ncr\r");
        assert_eq!(escape("é\u{0}ü"), "é\\0ü");
        assert!(matches!(escape("plain \\0 text"), Cow::Borrowed(_)));
    }

    #[test]
    fn nested_values_and_errors_are_escaped() {
        let rows = vec![(1u64, "a\0".to_string(), vec!["\0".to_string()])];
        assert_eq!(
            rows.outbound(),
            vec![(1, "a\\0".to_string(), vec!["\\0".to_string()])]
        );
        let e = MaqetError::QemuFailed("stderr: x\0y".into()).outbound();
        assert_eq!(e.message(), "stderr: x\\0y");
        let v = zbus::OwnedVariant::try_from(zbus::Variant::from("a\0b")).unwrap();
        let v = v.outbound();
        assert_eq!(String::try_from(v).unwrap(), "a\\0b");
    }

    #[test]
    fn json_stays_json() {
        let json = serde_json::json!({"k": "x\0y\u{1b}"}).to_string();
        assert_eq!(escape(&json), json);
    }
}
