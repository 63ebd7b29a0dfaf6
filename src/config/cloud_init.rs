//! The cloud-init keys: `cloud_init: {user_data, meta_data, network_config}` (each a
//! file or an inline mapping) and the convenience keys `ssh_authorized_keys`,
//! `hostname` and `user`. They compile to a [`CloudInit`]; maqetd writes the NoCloud
//! seed from it at start (`storage::seed`).

use std::path::PathBuf;

use super::PathUse;
use super::diag::suggest;
use super::validate::Cx;
use super::yaml::{Entry, Node, Value};

/// One seed document: a host file maqetd reads at start, or YAML written in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeedDoc {
    File(PathBuf),
    Inline(serde_yaml::Mapping),
}

/// What the seed is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloudInit {
    pub user_data: Option<SeedDoc>,
    pub meta_data: Option<SeedDoc>,
    pub network_config: Option<SeedDoc>,
    pub ssh_authorized_keys: Vec<String>,
    pub hostname: Option<String>,
    pub user: Option<String>,
}

const KEYS: &[&str] = &["user_data", "meta_data", "network_config"];

/// `cloud_init: {…}`.
pub(crate) fn cloud_init(entry: &mut Entry, out: &mut CloudInit, cx: &mut Cx) {
    let found = entry.value.kind_name();
    let Value::Map(entries) = &mut entry.value.value else {
        let message = format!("`cloud_init` must be a mapping, found {found}");
        cx.diags.error_hint(
            &entry.value.loc,
            message,
            "e.g. `cloud_init: {user_data: ./user-data.yaml}` or an inline mapping",
        );
        return;
    };
    for e in entries {
        let slot = match e.key.as_str() {
            "user_data" => &mut out.user_data,
            "meta_data" => &mut out.meta_data,
            "network_config" => &mut out.network_config,
            other => {
                let message = format!(
                    "unknown `cloud_init` key `{other}`{}",
                    suggest(other, KEYS)
                        .map(|s| format!(" (did you mean `{s}`?)"))
                        .unwrap_or_default()
                );
                cx.diags.error(&e.key_loc, message);
                continue;
            }
        };
        *slot = doc(&e.key, &mut e.value, cx);
    }
}

fn doc(key: &str, node: &mut Node, cx: &mut Cx) -> Option<SeedDoc> {
    match &node.value {
        Value::Str(_) => cx
            .resolve_path(node, PathUse::ReadOnly)
            .map(|p| SeedDoc::File(p.into())),
        Value::Map(_) => match to_serde(node) {
            serde_yaml::Value::Mapping(m) => Some(SeedDoc::Inline(m)),
            _ => unreachable!("a mapping converts to a mapping"),
        },
        _ => {
            let message = format!(
                "`{key}` must be a file or a mapping, found {}",
                node.kind_name()
            );
            cx.diags.error(&node.loc, message);
            None
        }
    }
}

/// `ssh_authorized_keys: [KEY, …]`: public keys, one line each.
pub(crate) fn authorized_keys(entry: &mut Entry, cx: &mut Cx) -> Vec<String> {
    let items = match &entry.value.value {
        Value::Seq(items) => items.clone(),
        Value::Str(_) => vec![entry.value.clone()],
        _ => {
            let message = format!(
                "`ssh_authorized_keys` must be a list of public keys, found {}",
                entry.value.kind_name()
            );
            cx.diags.error(&entry.value.loc, message);
            return Vec::new();
        }
    };
    let mut keys = Vec::new();
    for item in items {
        match &item.value {
            // `ssh-ed25519 AAAA… comment`: one line, a type word and a key.
            Value::Str(k) if !k.contains(['\n', '\r']) && k.split_whitespace().count() >= 2 => {
                keys.push(k.trim().to_owned())
            }
            _ => cx.diags.error_hint(
                &item.loc,
                "not an ssh public key",
                "one line like `ssh-ed25519 AAAA… you@host` (the contents of a .pub file)",
            ),
        }
    }
    keys
}

/// `hostname: NAME` (RFC 1123 labels) and `user: NAME` (a POSIX-ish user name).
pub(crate) fn name(entry: &mut Entry, cx: &mut Cx) -> Option<String> {
    let text = entry.value.scalar_text().unwrap_or_default();
    let (ok, hint) = if entry.key == "hostname" {
        (
            !text.is_empty()
                && text.len() <= 253
                && text.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                }),
            "letters, digits and `-`, dot-separated labels of at most 63",
        )
    } else {
        (
            !text.is_empty()
                && text.len() <= 32
                && text.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && text
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c)),
            "lower-case letters, digits, `_` or `-`, starting with a letter or `_`",
        )
    };
    if ok && matches!(entry.value.value, Value::Str(_)) {
        return Some(text);
    }
    let message = format!("invalid `{}` `{text}`", entry.key);
    cx.diags.error_hint(&entry.value.loc, message, hint);
    None
}

/// A config node as plain YAML (numbers as numbers), for an inline seed document.
fn to_serde(node: &Node) -> serde_yaml::Value {
    use serde_yaml::Value as Y;
    match &node.value {
        Value::Null => Y::Null,
        Value::Bool(b) => Y::Bool(*b),
        Value::Int(s) | Value::Float(s) => {
            serde_yaml::from_str::<Y>(s).unwrap_or_else(|_| Y::String(s.clone()))
        }
        Value::Str(s) => Y::String(s.clone()),
        Value::Seq(items) => Y::Sequence(items.iter().map(to_serde).collect()),
        Value::Map(entries) => Y::Mapping(
            entries
                .iter()
                .map(|e| (Y::String(e.key.clone()), to_serde(&e.value)))
                .collect(),
        ),
    }
}
