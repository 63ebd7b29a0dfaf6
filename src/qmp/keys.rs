//! Key names and text → QMP `send-key` qcodes.
//!
//! This module owns the vocabulary users type for keys: QEMU's qcode names, friendly
//! aliases, and the US keyboard layout used to type text. It is pure logic; sending the
//! keys is the caller's business (`send-key` with [`send_key_arguments`]).
//!
//! Combo syntax ([`parse_combo`]): key names joined by `-` or `+`, case-insensitive, e.g.
//! `ctrl-alt-delete`, `Ctrl+Alt+F2`, `shift-a`, `ret`. A key may also be written as the
//! single character it types without shift on a US keyboard (`ctrl-/`, `ctrl-.`). The
//! minus key is `minus`, or a literal `-` when it is the whole combo or its last key:
//! `-` and `ctrl--` (or `ctrl+-`) both work; `--a` does not.

use serde_json::{Value, json};

/// Every QKeyCode of QEMU 7.2 (qapi/ui.json), in QEMU's order, as listed by
/// `query-qmp-schema` of qemu-system-x86_64 7.2.22. `unmapped` is left out: it types
/// nothing.
#[rustfmt::skip]
pub const QCODES: &[&str] = &[
    "shift", "shift_r", "alt", "alt_r", "ctrl", "ctrl_r", "menu", "esc",
    "1", "2", "3", "4", "5", "6", "7", "8", "9", "0",
    "minus", "equal", "backspace", "tab",
    "q", "w", "e", "r", "t", "y", "u", "i", "o", "p", "bracket_left", "bracket_right", "ret",
    "a", "s", "d", "f", "g", "h", "j", "k", "l", "semicolon", "apostrophe", "grave_accent",
    "backslash", "z", "x", "c", "v", "b", "n", "m", "comma", "dot", "slash",
    "asterisk", "spc", "caps_lock",
    "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f10",
    "num_lock", "scroll_lock",
    "kp_divide", "kp_multiply", "kp_subtract", "kp_add", "kp_enter", "kp_decimal", "sysrq",
    "kp_0", "kp_1", "kp_2", "kp_3", "kp_4", "kp_5", "kp_6", "kp_7", "kp_8", "kp_9",
    "less", "f11", "f12", "print", "home", "pgup", "pgdn", "end",
    "left", "up", "down", "right", "insert", "delete",
    "stop", "again", "props", "undo", "front", "copy", "open", "paste", "find", "cut",
    "lf", "help", "meta_l", "meta_r", "compose", "pause",
    "ro", "hiragana", "henkan", "yen", "muhenkan", "katakanahiragana",
    "kp_comma", "kp_equals", "power", "sleep", "wake",
    "audionext", "audioprev", "audiostop", "audioplay", "audiomute", "volumeup", "volumedown",
    "mediaselect", "mail", "calculator", "computer",
    "ac_home", "ac_back", "ac_forward", "ac_refresh", "ac_bookmarks", "lang1", "lang2",
];

/// Friendly names → qcodes. Lowercase; none of them is itself a qcode.
pub const ALIASES: &[(&str, &str)] = &[
    ("enter", "ret"),
    ("return", "ret"),
    ("space", "spc"),
    ("del", "delete"),
    ("ins", "insert"),
    ("escape", "esc"),
    ("control", "ctrl"),
    ("ctrl_l", "ctrl"),
    ("control_r", "ctrl_r"),
    ("shift_l", "shift"),
    ("alt_l", "alt"),
    ("altgr", "alt_r"),
    ("super", "meta_l"),
    ("super_l", "meta_l"),
    ("super_r", "meta_r"),
    ("win", "meta_l"),
    ("windows", "meta_l"),
    ("meta", "meta_l"),
    ("pageup", "pgup"),
    ("page_up", "pgup"),
    ("pagedown", "pgdn"),
    ("page_down", "pgdn"),
    ("backtick", "grave_accent"),
    ("grave", "grave_accent"),
    ("capslock", "caps_lock"),
    ("numlock", "num_lock"),
    ("scrolllock", "scroll_lock"),
    ("printscreen", "print"),
    ("prtsc", "print"),
    ("period", "dot"),
    ("equals", "equal"),
    ("dash", "minus"),
    ("hyphen", "minus"),
    ("quote", "apostrophe"),
    ("bracketleft", "bracket_left"),
    ("bracketright", "bracket_right"),
    ("kp_plus", "kp_add"),
    ("kp_minus", "kp_subtract"),
    ("kp_star", "kp_multiply"),
    ("kp_slash", "kp_divide"),
    ("kp_dot", "kp_decimal"),
    ("kp_period", "kp_decimal"),
    ("kp_return", "kp_enter"),
    ("kp_ret", "kp_enter"),
];

/// US layout: characters other than letters and digits, as (character, qcode, shift).
/// Letters and digits are their own qcodes (see [`us_key`]).
const US_SYMBOLS: &[(char, &str, bool)] = &[
    (' ', "spc", false),
    ('\n', "ret", false),
    ('\t', "tab", false),
    ('`', "grave_accent", false),
    ('~', "grave_accent", true),
    ('!', "1", true),
    ('@', "2", true),
    ('#', "3", true),
    ('$', "4", true),
    ('%', "5", true),
    ('^', "6", true),
    ('&', "7", true),
    ('*', "8", true),
    ('(', "9", true),
    (')', "0", true),
    ('-', "minus", false),
    ('_', "minus", true),
    ('=', "equal", false),
    ('+', "equal", true),
    ('[', "bracket_left", false),
    ('{', "bracket_left", true),
    (']', "bracket_right", false),
    ('}', "bracket_right", true),
    ('\\', "backslash", false),
    ('|', "backslash", true),
    (';', "semicolon", false),
    (':', "semicolon", true),
    ('\'', "apostrophe", false),
    ('"', "apostrophe", true),
    (',', "comma", false),
    ('<', "comma", true),
    ('.', "dot", false),
    ('>', "dot", true),
    ('/', "slash", false),
    ('?', "slash", true),
];

/// Why keys could not be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("empty key combination")]
    Empty,
    /// A separator with no key name next to it, e.g. `ctrl++a` or `ctrl-`.
    #[error(
        "key combination '{0}' has an empty key name: join keys with '-' or '+', \
         and write the minus key as 'minus' (a trailing '-' works too, as in 'ctrl--')"
    )]
    InvalidCombo(String),
    #[error("unknown key '{0}'{hint}", hint = suggestion_hint(.0))]
    UnknownKey(String),
    /// `position` is the 0-based index of the character in the text.
    #[error("character {ch:?} at index {position} cannot be typed on a US keyboard layout")]
    Unmappable { ch: char, position: usize },
}

/// Parses a combo such as `ctrl-alt-delete` into qcodes, in the given order.
pub fn parse_combo(spec: &str) -> Result<Vec<String>, KeyError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err(KeyError::Empty);
    }
    let (head, trailing_minus) = if spec == "-" {
        ("", true)
    } else if let Some(head) = spec.strip_suffix("--").or_else(|| spec.strip_suffix("+-")) {
        (head, true)
    } else {
        (spec, false)
    };
    if trailing_minus && head.is_empty() && spec != "-" {
        return Err(KeyError::InvalidCombo(spec.to_owned()));
    }

    let mut qcodes = Vec::new();
    if !head.is_empty() {
        for token in head.split(['-', '+']).map(str::trim) {
            if token.is_empty() {
                return Err(KeyError::InvalidCombo(spec.to_owned()));
            }
            let qcode = lookup(token).ok_or_else(|| KeyError::UnknownKey(token.to_owned()))?;
            qcodes.push(qcode.to_owned());
        }
    }
    if trailing_minus {
        qcodes.push("minus".to_owned());
    }
    Ok(qcodes)
}

/// Translates text into one combo per character, typed on a US layout: uppercase
/// letters and shifted symbols carry `shift`, `\n` is `ret`, `\t` is `tab`. Fails on the
/// first character that cannot be typed, before producing anything.
pub fn text_to_combos(text: &str) -> Result<Vec<Vec<String>>, KeyError> {
    text.chars()
        .enumerate()
        .map(|(position, ch)| {
            let (qcode, shift) = us_key(ch).ok_or(KeyError::Unmappable { ch, position })?;
            let mut combo = Vec::with_capacity(2);
            if shift {
                combo.push("shift".to_owned());
            }
            combo.push(qcode.to_owned());
            Ok(combo)
        })
        .collect()
}

/// The arguments of QMP `send-key` for one combo; `hold_ms` is QEMU's `hold-time`
/// (QEMU's default, 100 ms, applies when `None`).
pub fn send_key_arguments(qcodes: &[String], hold_ms: Option<u32>) -> Value {
    let keys: Vec<Value> = qcodes
        .iter()
        .map(|qcode| json!({"type": "qcode", "data": qcode}))
        .collect();
    let mut arguments = json!({ "keys": keys });
    if let Some(hold_ms) = hold_ms {
        arguments["hold-time"] = hold_ms.into();
    }
    arguments
}

/// One key name (already trimmed) → qcode: a qcode, an alias, or a character typed
/// without shift on a US keyboard.
fn lookup(token: &str) -> Option<&'static str> {
    let name = token.to_ascii_lowercase();
    if let Some(qcode) = QCODES.iter().find(|qcode| **qcode == name) {
        return Some(qcode);
    }
    if let Some((_, qcode)) = ALIASES.iter().find(|(alias, _)| *alias == name) {
        return Some(qcode);
    }
    let mut chars = name.chars();
    match (chars.next(), chars.next()) {
        (Some(ch), None) => us_key(ch).and_then(|(qcode, shift)| (!shift).then_some(qcode)),
        _ => None,
    }
}

/// The key (and whether shift is held) that types `ch` on a US keyboard.
fn us_key(ch: char) -> Option<(&'static str, bool)> {
    if ch.is_ascii_alphanumeric() {
        let lower = ch.to_ascii_lowercase();
        // Letters and digits are exactly the one-character qcodes.
        let qcode = QCODES
            .iter()
            .find(|qcode| qcode.len() == 1 && qcode.starts_with(lower))?;
        return Some((qcode, ch.is_ascii_uppercase()));
    }
    US_SYMBOLS
        .iter()
        .find(|(symbol, ..)| *symbol == ch)
        .map(|&(_, qcode, shift)| (qcode, shift))
}

/// Known names closest to `name`: by edit distance, plus names it is a prefix of.
fn suggestions(name: &str) -> Vec<&'static str> {
    let name = name.to_ascii_lowercase();
    // One-character names are too short for edit distance to mean anything.
    let max_distance = match name.chars().count() {
        0 | 1 => 0,
        2 | 3 => 1,
        _ => 2,
    };
    let mut scored: Vec<(usize, &'static str)> = QCODES
        .iter()
        .copied()
        .chain(ALIASES.iter().map(|(alias, _)| *alias))
        .filter_map(|candidate| {
            let distance = strsim::levenshtein(&name, candidate);
            let prefix = name.len() >= 2 && candidate.starts_with(&name);
            (distance <= max_distance || prefix).then_some((distance, candidate))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, name)| name).collect()
}

fn suggestion_hint(name: &str) -> String {
    let mut chars = name.chars();
    if let (Some(ch), None) = (chars.next(), chars.next())
        && let Some((qcode, true)) = us_key(ch)
    {
        return format!(" ('{ch}' is typed with shift: write shift-{qcode})");
    }
    let close = suggestions(name);
    if close.is_empty() {
        " (key names are QEMU qcodes such as ctrl, alt, shift, f1, ret, spc, esc, delete, \
         or a single character such as a, 1 or /)"
            .to_owned()
    } else {
        format!(" (did you mean {}?)", close.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn combo(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|key| (*key).to_owned()).collect()
    }

    #[test]
    fn qcode_list_matches_qemu_7_2() {
        assert_eq!(QCODES.len(), 149);
        let unique: HashSet<_> = QCODES.iter().collect();
        assert_eq!(unique.len(), QCODES.len());
        for qcode in QCODES {
            assert_eq!(parse_combo(qcode).unwrap(), combo(&[qcode]));
        }
    }

    #[test]
    fn aliases_resolve_to_qcodes_and_shadow_none() {
        for (alias, qcode) in ALIASES {
            assert!(QCODES.contains(qcode), "{alias} → {qcode} is not a qcode");
            assert!(!QCODES.contains(alias), "alias {alias} shadows a qcode");
            assert_eq!(parse_combo(alias).unwrap(), combo(&[qcode]), "{alias}");
        }
        let named = [
            ("enter", "ret"),
            ("return", "ret"),
            ("space", "spc"),
            ("del", "delete"),
            ("escape", "esc"),
            ("super", "meta_l"),
            ("win", "meta_l"),
            ("meta", "meta_l"),
            ("control", "ctrl"),
            ("pageup", "pgup"),
            ("pagedown", "pgdn"),
            ("backtick", "grave_accent"),
        ];
        for (alias, qcode) in named {
            assert_eq!(parse_combo(alias).unwrap(), combo(&[qcode]), "{alias}");
        }
    }

    #[test]
    fn combos() {
        let cases: &[(&str, &[&str])] = &[
            ("ctrl-alt-delete", &["ctrl", "alt", "delete"]),
            ("ctrl-alt-f2", &["ctrl", "alt", "f2"]),
            ("shift-a", &["shift", "a"]),
            ("ret", &["ret"]),
            ("f1", &["f1"]),
            ("esc", &["esc"]),
            ("a", &["a"]),
            ("1", &["1"]),
            ("kp_add", &["kp_add"]),
            ("spc", &["spc"]),
            ("ctrl+alt+del", &["ctrl", "alt", "delete"]),
            ("ctrl + shift - t", &["ctrl", "shift", "t"]),
            ("ctrl-minus", &["ctrl", "minus"]),
            ("ctrl--", &["ctrl", "minus"]),
            ("ctrl+-", &["ctrl", "minus"]),
            ("-", &["minus"]),
            ("ctrl-/", &["ctrl", "slash"]),
            ("ctrl-.", &["ctrl", "dot"]),
            ("alt-=", &["alt", "equal"]),
            ("super-`", &["meta_l", "grave_accent"]),
        ];
        for (spec, expected) in cases {
            assert_eq!(parse_combo(spec).unwrap(), combo(expected), "{spec}");
        }
    }

    #[test]
    fn case_insensitive() {
        assert_eq!(
            parse_combo("CTRL-Alt-DeLeTe").unwrap(),
            combo(&["ctrl", "alt", "delete"])
        );
        assert_eq!(parse_combo("Shift+A").unwrap(), combo(&["shift", "a"]));
        assert_eq!(parse_combo("KP_Enter").unwrap(), combo(&["kp_enter"]));
        assert_eq!(parse_combo("PageUp").unwrap(), combo(&["pgup"]));
    }

    #[test]
    fn malformed_combos() {
        assert_eq!(parse_combo("  "), Err(KeyError::Empty));
        for spec in ["ctrl-", "ctrl++a", "-a", "--", "+-", "ctrl-+", "--a"] {
            assert!(
                matches!(parse_combo(spec), Err(KeyError::InvalidCombo(_))),
                "{spec}: {:?}",
                parse_combo(spec)
            );
        }
        // Shifted characters are not keys: write `shift-1`, not `!`.
        let err = parse_combo("!").unwrap_err();
        assert_eq!(err, KeyError::UnknownKey("!".into()));
        assert!(err.to_string().contains("write shift-1"), "{err}");
    }

    #[test]
    fn unknown_key_suggests_close_names() {
        let err = parse_combo("ctrl-alt-deleet").unwrap_err();
        assert_eq!(err, KeyError::UnknownKey("deleet".into()));
        let message = err.to_string();
        assert!(message.starts_with("unknown key 'deleet'"), "{message}");
        assert!(message.contains("did you mean delete"), "{message}");

        let message = parse_combo("Ctl-c").unwrap_err().to_string();
        assert!(message.contains("unknown key 'Ctl'"), "{message}");
        assert!(message.contains("ctrl"), "{message}");

        assert!(
            parse_combo("pag")
                .unwrap_err()
                .to_string()
                .contains("pageup")
        );
        assert!(
            parse_combo("entr")
                .unwrap_err()
                .to_string()
                .contains("enter")
        );

        let message = parse_combo("zzzzzzzz").unwrap_err().to_string();
        assert!(message.contains("key names are QEMU qcodes"), "{message}");
    }

    #[test]
    fn every_printable_ascii_character_maps_uniquely() {
        const SHIFTED: &str = "~!@#$%^&*()_+{}|:\"<>?";
        let mut seen = HashSet::new();
        for byte in 0x20u8..=0x7e {
            let ch = char::from(byte);
            let combos = text_to_combos(&ch.to_string()).unwrap();
            assert_eq!(combos.len(), 1, "{ch:?}");
            let keys = &combos[0];
            let shifted = ch.is_ascii_uppercase() || SHIFTED.contains(ch);
            let expected_len = if shifted { 2 } else { 1 };
            assert_eq!(keys.len(), expected_len, "{ch:?} → {keys:?}");
            assert_eq!(keys[0] == "shift", shifted, "{ch:?} → {keys:?}");
            assert!(QCODES.contains(&keys.last().unwrap().as_str()), "{ch:?}");
            // Typing the combo back gives the same character: no two characters collide.
            assert!(seen.insert(keys.clone()), "{ch:?} collides: {keys:?}");
        }
        assert_eq!(seen.len(), 95);
    }

    #[test]
    fn text_with_controls() {
        let combos = text_to_combos("Hi!\n\tok").unwrap();
        let expected: Vec<Vec<String>> = vec![
            combo(&["shift", "h"]),
            combo(&["i"]),
            combo(&["shift", "1"]),
            combo(&["ret"]),
            combo(&["tab"]),
            combo(&["o"]),
            combo(&["k"]),
        ];
        assert_eq!(combos, expected);
        assert_eq!(text_to_combos(""), Ok(vec![]));
    }

    #[test]
    fn unmappable_characters_report_their_position() {
        assert_eq!(
            text_to_combos("café"),
            Err(KeyError::Unmappable {
                ch: 'é',
                position: 3
            })
        );
        // The index counts characters, not bytes.
        assert_eq!(
            text_to_combos("éa\u{7f}"),
            Err(KeyError::Unmappable {
                ch: 'é',
                position: 0
            })
        );
        let err = text_to_combos("ab\u{7f}").unwrap_err();
        assert_eq!(
            err,
            KeyError::Unmappable {
                ch: '\u{7f}',
                position: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "character '\\u{7f}' at index 2 cannot be typed on a US keyboard layout"
        );
        assert!(matches!(
            text_to_combos("a\r\n"),
            Err(KeyError::Unmappable {
                ch: '\r',
                position: 1
            })
        ));
    }

    #[test]
    fn send_key_arguments_shape() {
        let keys = combo(&["ctrl", "alt", "delete"]);
        assert_eq!(
            send_key_arguments(&keys, Some(50)),
            json!({"keys": [
                {"type": "qcode", "data": "ctrl"},
                {"type": "qcode", "data": "alt"},
                {"type": "qcode", "data": "delete"},
            ], "hold-time": 50})
        );
        assert_eq!(
            send_key_arguments(&combo(&["a"]), None),
            json!({"keys": [{"type": "qcode", "data": "a"}]})
        );
    }
}
