//! A small YAML tree that remembers where every node came from, built from
//! yaml-rust2's event stream, plus the emitter for normalized output.
//!
//! Scalars are resolved with the YAML 1.2 core schema. Anchors are accepted but
//! aliases are refused: expanding them would lose the one location an error can
//! point at, and a config that needs sharing can be split into merged files.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::diag::Diags;

/// Deeper documents are refused so the recursive passes cannot overflow the stack.
const MAX_DEPTH: usize = 64;

/// The source a node came from: shown in errors, and the base of its relative paths.
#[derive(Debug)]
pub(crate) struct Origin {
    pub label: String,
    pub base_dir: PathBuf,
}

/// A position in one source (1-based line and column).
#[derive(Clone)]
pub(crate) struct Loc {
    pub origin: Arc<Origin>,
    pub line: usize,
    pub col: usize,
}

impl Loc {
    pub fn start(origin: &Arc<Origin>) -> Loc {
        Loc {
            origin: origin.clone(),
            line: 1,
            col: 1,
        }
    }

    fn at(origin: &Arc<Origin>, mark: Marker) -> Loc {
        Loc {
            origin: origin.clone(),
            line: mark.line(),
            col: mark.col() + 1,
        }
    }

    pub fn same_source(&self, other: &Loc) -> bool {
        Arc::ptr_eq(&self.origin, &other.origin)
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.origin.label, self.line, self.col)
    }
}

impl fmt::Debug for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A resolved YAML value. Numbers keep their text: QEMU gets them as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(String),
    Float(String),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// A value and where it was written. Equality ignores locations: two nodes are
/// equal when they denote the same YAML value.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub value: Value,
    pub loc: Loc,
}

impl PartialEq for Node {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl Eq for Node {}

/// One mapping entry; keys are always strings (others are refused when parsing).
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub key_loc: Loc,
    pub value: Node,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.value == other.value
    }
}

impl Eq for Entry {}

impl Node {
    pub fn new(value: Value, loc: Loc) -> Node {
        Node { value, loc }
    }

    /// Scalar text as QEMU should see it (`on`/`off` for booleans); `None` for
    /// null and collections.
    pub fn scalar_text(&self) -> Option<String> {
        match &self.value {
            Value::Bool(b) => Some(if *b { "on" } else { "off" }.to_owned()),
            Value::Int(s) | Value::Float(s) | Value::Str(s) => Some(s.clone()),
            Value::Null | Value::Seq(_) | Value::Map(_) => None,
        }
    }

    /// "a string", "a list", … for "expected X, found Y" messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Resolves a plain (unquoted) scalar with the YAML 1.2 core schema.
pub(crate) fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => return Value::Float(s.to_owned()),
        _ => {}
    }
    if is_core_int(s) {
        Value::Int(s.to_owned())
    } else if is_core_float(s) {
        Value::Float(s.to_owned())
    } else {
        Value::Str(s.to_owned())
    }
}

fn is_core_int(s: &str) -> bool {
    if let Some(hex) = s.strip_prefix("0x") {
        return !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit());
    }
    if let Some(oct) = s.strip_prefix("0o") {
        return !oct.is_empty() && oct.chars().all(|c| ('0'..='7').contains(&c));
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

/// `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`
fn is_core_float(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((int, frac)) => {
            int.chars().all(|c| c.is_ascii_digit())
                && frac.chars().all(|c| c.is_ascii_digit())
                && !(int.is_empty() && frac.is_empty())
        }
        None => !mantissa.is_empty() && mantissa.chars().all(|c| c.is_ascii_digit()),
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    });
    mantissa_ok && exponent_ok
}

/// Parses one source. `None` means an empty document (or a fatal error, which
/// is then in `diags`). Problems that do not stop parsing (duplicate keys,
/// aliases, …) are reported too; the caller stops before validating when any
/// diagnostic exists.
pub(crate) fn parse(text: &str, origin: Arc<Origin>, diags: &mut Diags) -> Option<Node> {
    // The parser takes a raw NUL for the end of the input and would silently drop the rest.
    if let Some(at) = text.find('\0') {
        let before = &text[..at];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let loc = Loc {
            origin: origin.clone(),
            line: before.matches('\n').count() + 1,
            col: before[line_start..].chars().count() + 1,
        };
        diags.error_hint(
            &loc,
            "a NUL byte in the config text",
            "a VM config is UTF-8 text; is this a binary file?",
        );
        return None;
    }
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        origin,
        diags,
    };
    builder.document().ok().flatten()
}

/// A syntax error already reported; parsing cannot go on.
struct Fatal;

struct Builder<'t, 'd> {
    parser: Parser<std::str::Chars<'t>>,
    origin: Arc<Origin>,
    diags: &'d mut Diags,
}

impl Builder<'_, '_> {
    fn next(&mut self) -> Result<(Event, Loc), Fatal> {
        match self.parser.next_token() {
            Ok((event, mark)) => Ok((event, Loc::at(&self.origin, mark))),
            Err(e) => {
                let loc = Loc::at(&self.origin, *e.marker());
                self.diags
                    .error(&loc, format!("YAML syntax error: {}", e.info()));
                Err(Fatal)
            }
        }
    }

    fn document(&mut self) -> Result<Option<Node>, Fatal> {
        // The stream starts with StreamStart, then DocumentStart or StreamEnd.
        let (_stream_start, _) = self.next()?;
        let (event, _) = self.next()?;
        if event != Event::DocumentStart {
            return Ok(None);
        }
        let (event, loc) = self.next()?;
        let root = self.node(event, loc, 0)?;
        let (_document_end, _) = self.next()?;
        let (event, loc) = self.next()?;
        if event == Event::DocumentStart {
            self.diags.error_hint(
                &loc,
                "a config source holds one YAML document, found a second one (`---`)",
                "put each document in its own file and pass the files in order",
            );
        }
        Ok(match root.value {
            Value::Null => None,
            _ => Some(root),
        })
    }

    fn node(&mut self, event: Event, loc: Loc, depth: usize) -> Result<Node, Fatal> {
        if depth > MAX_DEPTH {
            self.diags
                .error(&loc, format!("nesting deeper than {MAX_DEPTH} levels"));
            return Err(Fatal);
        }
        match event {
            Event::Scalar(text, style, _anchor, tag) => {
                // QEMU's argv, file names and D-Bus strings cannot hold a NUL.
                if text.contains('\0') {
                    self.diags.error_hint(
                        &loc,
                        "a NUL character (`\\0`) in a value",
                        "remove it: no QEMU option, file name or VM name can contain one",
                    );
                }
                let value = match (style, tag) {
                    (TScalarStyle::Plain, None) => resolve_plain(&text),
                    (_, None) => Value::Str(text),
                    (_, Some(tag)) if is_core_tag(&tag, "str") => Value::Str(text),
                    (_, Some(tag)) => {
                        self.unsupported_tag(&loc, &tag);
                        Value::Null
                    }
                };
                Ok(Node::new(value, loc))
            }
            Event::Alias(_) => {
                self.diags.error_hint(
                    &loc,
                    "YAML aliases (`*name`) are not supported",
                    "write the value out, or split the config into files merged in order",
                );
                Ok(Node::new(Value::Null, loc))
            }
            Event::SequenceStart(_anchor, tag) => {
                self.check_collection_tag(&loc, tag, "seq");
                let mut items = Vec::new();
                loop {
                    let (event, item_loc) = self.next()?;
                    if event == Event::SequenceEnd {
                        break;
                    }
                    items.push(self.node(event, item_loc, depth + 1)?);
                }
                Ok(Node::new(Value::Seq(items), loc))
            }
            Event::MappingStart(_anchor, tag) => {
                self.check_collection_tag(&loc, tag, "map");
                self.mapping(loc, depth)
            }
            // The parser only yields node events here; anything else is its bug.
            other => {
                self.diags
                    .error(&loc, format!("unexpected YAML event {other:?}"));
                Err(Fatal)
            }
        }
    }

    fn mapping(&mut self, start: Loc, depth: usize) -> Result<Node, Fatal> {
        let mut entries: Vec<Entry> = Vec::new();
        loop {
            let (event, key_loc) = self.next()?;
            if event == Event::MappingEnd {
                break;
            }
            let key = self.node(event, key_loc, depth + 1)?;
            let (event, value_loc) = self.next()?;
            let value = self.node(event, value_loc, depth + 1)?;
            let Value::Str(name) = key.value else {
                let hint = match key.value {
                    Value::Seq(_) | Value::Map(_) => "use a plain word as the key",
                    _ => "quote the key to make it a string",
                };
                self.diags.error_hint(
                    &key.loc,
                    format!("mapping keys must be strings, found {}", key.kind_name()),
                    hint,
                );
                continue;
            };
            if let Some(first) = entries.iter().find(|e| e.key == name) {
                let message = format!(
                    "duplicate key `{name}` (first set at line {}, column {})",
                    first.key_loc.line, first.key_loc.col
                );
                self.diags.error_hint(
                    &key.loc,
                    message,
                    "a key may appear once per mapping; remove one of them",
                );
                continue;
            }
            entries.push(Entry {
                key: name,
                key_loc: key.loc,
                value,
            });
        }
        // A block mapping's start mark lands after its first key's first
        // character, a flow mapping's on `{`: the earlier of the two is right.
        let loc = match entries.first() {
            Some(e) if (e.key_loc.line, e.key_loc.col) < (start.line, start.col) => {
                e.key_loc.clone()
            }
            _ => start,
        };
        Ok(Node::new(Value::Map(entries), loc))
    }

    fn check_collection_tag(&mut self, loc: &Loc, tag: Option<Tag>, expected: &str) {
        if let Some(tag) = tag
            && !is_core_tag(&tag, expected)
        {
            self.unsupported_tag(loc, &tag);
        }
    }

    fn unsupported_tag(&mut self, loc: &Loc, tag: &Tag) {
        let shown = if tag.handle == CORE_TAG_PREFIX {
            format!("!!{}", tag.suffix)
        } else {
            format!("{}{}", tag.handle, tag.suffix)
        };
        self.diags.error_hint(
            loc,
            format!("YAML tag `{shown}` is not supported"),
            "remove the tag; quote a value to make it a string",
        );
    }
}

const CORE_TAG_PREFIX: &str = "tag:yaml.org,2002:";

fn is_core_tag(tag: &Tag, suffix: &str) -> bool {
    tag.handle == CORE_TAG_PREFIX && tag.suffix == suffix
}

/// Emits a top-level mapping as block YAML that `parse` reads back to an equal tree.
pub(crate) fn emit_document(entries: &[Entry]) -> String {
    let mut out = String::new();
    if entries.is_empty() {
        out.push_str("{}\n");
    } else {
        emit_map(entries, 0, false, &mut out);
    }
    out
}

fn emit_map(entries: &[Entry], indent: usize, first_inline: bool, out: &mut String) {
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 || !first_inline {
            push_indent(out, indent);
        }
        out.push_str(&emit_str(&entry.key));
        out.push(':');
        match &entry.value.value {
            Value::Map(m) if !m.is_empty() => {
                out.push('\n');
                emit_map(m, indent + 2, false, out);
            }
            Value::Seq(s) if !s.is_empty() => {
                out.push('\n');
                emit_seq(s, indent + 2, false, out);
            }
            _ => {
                out.push(' ');
                out.push_str(&emit_flat(&entry.value.value));
                out.push('\n');
            }
        }
    }
}

fn emit_seq(items: &[Node], indent: usize, first_inline: bool, out: &mut String) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 || !first_inline {
            push_indent(out, indent);
        }
        out.push_str("- ");
        match &item.value {
            Value::Map(m) if !m.is_empty() => emit_map(m, indent + 2, true, out),
            Value::Seq(s) if !s.is_empty() => emit_seq(s, indent + 2, true, out),
            other => {
                out.push_str(&emit_flat(other));
                out.push('\n');
            }
        }
    }
}

fn push_indent(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// Scalars and empty collections, which fit on one line.
fn emit_flat(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        // Numbers were resolved from this very text, so it reads back the same.
        Value::Int(s) | Value::Float(s) => s.clone(),
        Value::Str(s) => emit_str(s),
        Value::Seq(_) => "[]".to_owned(),
        Value::Map(_) => "{}".to_owned(),
    }
}

/// Plain when that reads back as the same string (in YAML 1.2 and, for the
/// benefit of other tools reading the stored config, YAML 1.1), else double-quoted.
fn emit_str(s: &str) -> String {
    if is_safe_plain(s) {
        s.to_owned()
    } else {
        double_quote(s)
    }
}

fn is_safe_plain(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let chars_ok = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_./~+-=@:,".contains(c));
    chars_ok
        && (first.is_ascii_alphanumeric() || "_./~".contains(first))
        && !s.ends_with(':')
        && matches!(resolve_plain(s), Value::Str(_))
        && !is_yaml11_special(s)
}

/// Words and shapes that YAML 1.1 resolvers (PyYAML, …) read as non-strings.
fn is_yaml11_special(s: &str) -> bool {
    const WORDS: &[&str] = &["y", "n", "yes", "no", "on", "off"];
    if WORDS.iter().any(|w| w.eq_ignore_ascii_case(s)) {
        return true;
    }
    // 1.1 ints/floats allow `_` and sexagesimal `:`; binary `0b…`; dates.
    let stripped: String = s.chars().filter(|c| *c != '_' && *c != ':').collect();
    let binary = s
        .strip_prefix("0b")
        .is_some_and(|b| !b.is_empty() && b.chars().all(|c| c == '0' || c == '1' || c == '_'));
    let bytes = s.as_bytes();
    let date = bytes.len() >= 8
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && bytes[4] == b'-'
        && bytes[5].is_ascii_digit();
    binary || date || (stripped != s && !matches!(resolve_plain(&stripped), Value::Str(_)))
}

fn double_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            // Control characters and the characters YAML treats as line breaks
            // or BOM would not survive raw.
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Arc<Origin> {
        Arc::new(Origin {
            label: "t.yaml".into(),
            base_dir: "/".into(),
        })
    }

    fn parse_ok(text: &str) -> Option<Node> {
        let mut diags = Diags::default();
        let node = parse(text, origin(), &mut diags);
        diags.finish(node).unwrap()
    }

    fn parse_err(text: &str) -> Vec<super::super::Diagnostic> {
        let mut diags = Diags::default();
        let _ = parse(text, origin(), &mut diags);
        diags.finish(()).unwrap_err().diagnostics
    }

    #[test]
    fn nul_in_a_value_or_key_is_refused() {
        for text in [
            "name: \"a\\0b\"",
            "name: \"a\\x00b\"",
            "\"k\\0\": 1",
            "name: a\0b",
        ] {
            let errs = parse_err(text);
            assert!(
                errs.iter().any(|d| d.message.contains("NUL")),
                "{text:?}: {errs:?}"
            );
        }
    }

    #[test]
    fn core_schema() {
        let cases = [
            ("", Value::Null),
            ("~", Value::Null),
            ("NULL", Value::Null),
            ("true", Value::Bool(true)),
            ("False", Value::Bool(false)),
            ("yes", Value::Str("yes".into())),
            ("on", Value::Str("on".into())),
            ("12", Value::Int("12".into())),
            ("-12", Value::Int("-12".into())),
            ("0x1F", Value::Int("0x1F".into())),
            ("0o17", Value::Int("0o17".into())),
            ("0o18", Value::Str("0o18".into())),
            ("1e3", Value::Float("1e3".into())),
            ("1.5", Value::Float("1.5".into())),
            (".5", Value::Float(".5".into())),
            ("1.", Value::Float("1.".into())),
            (".", Value::Str(".".into())),
            ("-.inf", Value::Float("-.inf".into())),
            ("512M", Value::Str("512M".into())),
            ("1_000", Value::Str("1_000".into())),
        ];
        for (text, expected) in cases {
            assert_eq!(resolve_plain(text), expected, "{text:?}");
        }
    }

    #[test]
    fn locations_are_one_based() {
        let root = parse_ok("a: 1\nlist:\n  - m: 2\n  - {x: y}\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!()
        };
        assert_eq!((entries[0].key_loc.line, entries[0].key_loc.col), (1, 1));
        assert_eq!(
            (entries[0].value.loc.line, entries[0].value.loc.col),
            (1, 4)
        );
        let Value::Seq(items) = &entries[1].value.value else {
            panic!()
        };
        assert_eq!((items[0].loc.line, items[0].loc.col), (3, 5));
        assert_eq!((items[1].loc.line, items[1].loc.col), (4, 5));
    }

    #[test]
    fn quoted_and_tagged_scalars_are_strings() {
        let root = parse_ok("a: \"12\"\nb: '~'\nc: !!str true\nd: |\n  x\n").unwrap();
        let Value::Map(entries) = root.value else {
            panic!()
        };
        let values: Vec<_> = entries.into_iter().map(|e| e.value.value).collect();
        assert_eq!(
            values,
            [
                Value::Str("12".into()),
                Value::Str("~".into()),
                Value::Str("true".into()),
                Value::Str("x\n".into())
            ]
        );
    }

    #[test]
    fn empty_documents() {
        assert!(parse_ok("").is_none());
        assert!(parse_ok("# only a comment\n").is_none());
        assert!(parse_ok("---\n").is_none());
    }

    #[test]
    fn refused_constructs() {
        let d = parse_err("a: 1\nb: 2\na: 3\n");
        assert_eq!((d[0].line, d[0].col), (3, 1));
        assert!(
            d[0].message.contains("duplicate key `a`"),
            "{}",
            d[0].message
        );
        assert!(d[0].message.contains("line 1, column 1"));

        let d = parse_err("a: 1\n---\nb: 2\n");
        assert_eq!(d[0].line, 2);
        assert!(d[0].message.contains("one YAML document"));

        let d = parse_err("a: &x 1\nb: *x\n");
        assert_eq!((d[0].line, d[0].col), (2, 4));
        assert!(d[0].message.contains("aliases"));

        let d = parse_err("1: a\n");
        assert!(d[0].message.contains("keys must be strings"));

        let d = parse_err("a: !custom x\n");
        assert!(d[0].message.contains("`!custom`"), "{}", d[0].message);

        let d = parse_err("a: [1, 2\nb: 3\n");
        assert_eq!((d[0].line, d[0].col), (2, 2));
        assert!(d[0].message.starts_with("YAML syntax error"));

        let deep = "[".repeat(100) + &"]".repeat(100);
        let d = parse_err(&deep);
        assert!(d[0].message.contains("nesting"));
    }

    #[test]
    fn string_emission_round_trips() {
        let strings = [
            "plain",
            "on",
            "yes",
            "No",
            "123",
            "0x10",
            "1e3",
            "null",
            "~",
            "",
            "true",
            "1_000",
            "1:20",
            "0b101",
            "2001-12-14",
            "-enable-kvm",
            "a: b",
            "a #b",
            "x:",
            "tab\there",
            "line\nbreak",
            "quote\"back\\slash",
            "\u{1}ctl",
            "ünïcode",
            "/abs/path,with,commas",
            "~/x",
            "tcp::2222-:22",
            " lead",
            "trail ",
            "[x]",
            "{x}",
            "*x",
            "&x",
            "!x",
            "%x",
            "@x",
            "`x",
            "'x'",
            ".inf",
            "-1",
            "+1",
        ];
        for s in strings {
            let emitted = emit_str(s);
            let doc = format!("k: {emitted}\n");
            let root = parse_ok(&doc).unwrap();
            let Value::Map(entries) = root.value else {
                panic!()
            };
            assert_eq!(
                entries[0].value.value,
                Value::Str(s.into()),
                "{s:?} as {emitted}"
            );
        }
        assert_eq!(emit_str("512M"), "512M");
        assert_eq!(emit_str("on"), "\"on\"");
    }

    #[test]
    fn document_emission_round_trips() {
        let text = "name: x\nlist:\n  - a\n  - k: v\n    k2:\n      - 1\n      - - n1\n        - n2\n  - []\n  - {}\nempty: {}\nnone: null\nf: 1.5\nb: false\n";
        let root = parse_ok(text).unwrap();
        let Value::Map(entries) = &root.value else {
            panic!()
        };
        let emitted = emit_document(entries);
        assert_eq!(emitted, text);
        assert_eq!(parse_ok(&emitted).unwrap(), root);
    }
}
