//! Located diagnostics: what `load` reports instead of stopping at the first problem.

use std::fmt;

use super::yaml::Loc;

/// At most this many diagnostics are kept; the rest are only counted.
const MAX_DIAGNOSTICS: usize = 20;

/// One problem in a VM config, pinned to the source that supplied the offending node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// File path or origin label (`<AddVM yaml>`).
    pub origin: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    pub message: String,
    /// What to do about it, when there is something useful to say.
    pub hint: Option<String>,
    pub kind: DiagnosticKind,
}

/// What kind of problem a diagnostic reports, so the service can tell "fix the YAML"
/// (`InvalidConfig`) from "this host location is off limits" (`Storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiagnosticKind {
    /// The YAML itself: syntax, keys, values.
    Config,
    /// A well-formed path into a location on the dangerous list (`storage::danger`).
    DangerousLocation,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.origin, self.line, self.col, self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

/// Every problem found in a VM config (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
    /// Problems found beyond the cap and not listed.
    pub omitted: usize,
}

impl ConfigError {
    /// A single problem (for callers that check something outside `load`).
    pub fn single(diagnostic: Diagnostic) -> Self {
        ConfigError {
            diagnostics: vec![diagnostic],
            omitted: 0,
        }
    }

    /// Every reported problem is a dangerous location: the YAML is fine, the place is not.
    pub fn only_dangerous_locations(&self) -> bool {
        self.omitted == 0
            && self
                .diagnostics
                .iter()
                .all(|d| d.kind == DiagnosticKind::DangerousLocation)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        if self.omitted > 0 {
            write!(f, "\n({} more problems not shown)", self.omitted)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Collector threaded through parsing and validation.
#[derive(Debug, Default)]
pub(crate) struct Diags {
    list: Vec<Diagnostic>,
    omitted: usize,
}

impl Diags {
    pub fn error(&mut self, loc: &Loc, message: impl Into<String>) {
        self.push(loc, message.into(), None, DiagnosticKind::Config);
    }

    pub fn error_hint(&mut self, loc: &Loc, message: impl Into<String>, hint: impl Into<String>) {
        self.push(
            loc,
            message.into(),
            Some(hint.into()),
            DiagnosticKind::Config,
        );
    }

    /// A path refused by the dangerous-location policy.
    pub fn dangerous(&mut self, loc: &Loc, message: String, hint: &str) {
        let hint = Some(hint.to_owned());
        self.push(loc, message, hint, DiagnosticKind::DangerousLocation);
    }

    fn push(&mut self, loc: &Loc, message: String, hint: Option<String>, kind: DiagnosticKind) {
        if self.list.len() >= MAX_DIAGNOSTICS {
            self.omitted += 1;
            return;
        }
        self.list.push(Diagnostic {
            origin: loc.origin.label.clone(),
            line: loc.line,
            col: loc.col,
            message: one_line(message),
            hint,
            kind,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// `Ok(value)` when nothing was reported, else every diagnostic.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(self.into_error())
        }
    }

    pub fn into_error(self) -> ConfigError {
        ConfigError {
            diagnostics: self.list,
            omitted: self.omitted,
        }
    }
}

/// The longest diagnostic message kept, in characters.
const MAX_MESSAGE_CHARS: usize = 300;

/// A diagnostic quotes at most (part of) its own line of the source: a multi-line value
/// is cut at its first line break, a long one at [`MAX_MESSAGE_CHARS`]. Error messages
/// and audit rows then never carry more of a file than the lines that are wrong.
fn one_line(message: String) -> String {
    let first = message.split('\n').next().unwrap_or_default();
    if first.len() == message.len() && first.chars().count() <= MAX_MESSAGE_CHARS {
        return message;
    }
    let mut cut: String = first.chars().take(MAX_MESSAGE_CHARS).collect();
    cut.push_str(" […]");
    cut
}

/// "did you mean" candidate: the closest word within a small edit distance.
pub(crate) fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = if word.chars().count() <= 3 { 1 } else { 2 };
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Hint for an unknown word: "did you mean `x`? valid …: a, b, c".
pub(crate) fn unknown_hint(word: &str, candidates: &[&str], what: &str) -> String {
    let list = candidates.join(", ");
    match suggest(word, candidates) {
        Some(s) => format!("did you mean `{s}`? valid {what}: {list}"),
        None => format!("valid {what}: {list}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_quotes_at_most_one_line() {
        assert_eq!(one_line("bad `x`".into()), "bad `x`");
        assert_eq!(one_line("bad `a\nsecret`".into()), "bad `a […]");
        assert_eq!(
            one_line("y".repeat(400)).chars().count(),
            MAX_MESSAGE_CHARS + 4
        );
    }

    #[test]
    fn suggestions_only_when_close() {
        let keys = ["name", "memory", "cpu", "args", "arguments"];
        assert_eq!(suggest("memroy", &keys), Some("memory"));
        assert_eq!(suggest("nmae", &keys), Some("name"));
        assert_eq!(suggest("cpus", &keys), Some("cpu"));
        assert_eq!(suggest("argument", &keys), Some("arguments"));
        assert_eq!(suggest("zzz", &keys), None);
        assert_eq!(suggest("vga", &keys), None);
    }
}
