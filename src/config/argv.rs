//! QEMU command-line rules: which options are single-instance or reserved,
//! how `arguments` items become argv words (suboptions, nesting, host paths),
//! and how raw `args` strings are split.

use super::PathUse;
use super::hostfile::{Access, PassAs};
use super::validate::Cx;
use super::yaml::{Entry, Loc, Node, Value};

/// Options QEMU honours once; a second one is a config error.
pub(crate) const SINGLE_INSTANCE: &[&str] = &[
    "m", "smp", "machine", "cpu", "display", "vga", "kernel", "initrd", "append", "bios", "boot",
];

/// Options whose value is a raw host path that QEMU takes verbatim (no
/// suboption parsing, so commas are not escaped).
const RAW_PATH_OPTIONS: &[&str] = &[
    "kernel", "initrd", "bios", "pflash", "dtb", "cdrom", "hda", "hdb", "hdc", "hdd", "fda", "fdb",
];

/// Raw path options QEMU only reads, once, at start.
const BOOT_INPUT_OPTIONS: &[&str] = &["kernel", "initrd", "bios", "dtb"];

/// Raw path options QEMU's block layer opens (so `/dev/fdset/N` works), and whether
/// it opens them read-only.
const BLOCK_PATH_OPTIONS: &[(&str, bool)] = &[
    ("cdrom", true),
    ("pflash", false),
    ("hda", false),
    ("hdb", false),
    ("hdc", false),
    ("hdd", false),
    ("fda", false),
    ("fdb", false),
];

/// Suboption keys whose string value is a host path QEMU reads, writes, serves to the
/// guest or runs.
const PATH_KEYS: &[&str] = &[
    "file",
    "path",
    "filename",
    "logfile",
    "mem-path",
    "dir",
    "smb",
    "tftp",
    "script",
    "downscript",
    "romfile",
];

/// Values of path keys that switch the feature off instead of naming a file.
fn names_no_file(key: &str, value: &str) -> bool {
    match key {
        "script" | "downscript" => value == "no",
        "romfile" => value.is_empty(),
        _ => false,
    }
}

/// Options whose string value is a character-device backend, which may name a file,
/// a socket or a device (`file:/x`, `unix:/x`, `/dev/ttyS0`), or run a command
/// (`exec:`).
const BACKEND_OPTIONS: &[&str] = &[
    "serial",
    "parallel",
    "monitor",
    "qmp",
    "qmp-pretty",
    "debugcon",
    "gdb",
    "virtioconsole",
    "incoming",
    "mon",
];
const BACKEND_PATH_PREFIXES: &[&str] = &["file:", "pipe:", "unix:", "exec:", "/"];

/// Options that take a host path QEMU opens by name (a log file, a directory to search):
/// checked like any path in an `arguments` mapping, refused in `args`.
const OTHER_PATH_OPTIONS: &[&str] = &["L", "mem-path", "readconfig", "option-rom", "D"];

/// Block protocols that reach the network only, never the host's files.
const NETWORK_PROTOCOLS: &[&str] = &[
    "nbd",
    "nbd+tcp",
    "http",
    "https",
    "ftp",
    "ftps",
    "iscsi",
    "ssh",
    "gluster",
    "gluster+tcp",
    "rbd",
    "nfs",
];

/// Why an option maqet controls itself cannot appear in a config.
pub(crate) fn reserved_reason(option: &str) -> Option<&'static str> {
    Some(match option {
        "uuid" => "maqet sets `-uuid` itself to identify the VM",
        "name" => "maqet sets `-name` itself; use the top-level `name:` key",
        "daemonize" => "maqetd supervises the QEMU process itself",
        "runas" | "run-with" | "chroot" => {
            "maqetd supervises the QEMU process and runs it as your user; it cannot follow a QEMU that switches user or root directory"
        }
        "pidfile" => "maqetd tracks the QEMU process through a pidfd; no pidfile is needed",
        "add-fd" => "maqetd passes QEMU the file descriptors of the files it opened itself",
        _ => return None,
    })
}

/// The name an option is tracked under: without leading dashes, aliases folded.
pub(crate) fn canonical(option: &str) -> &str {
    let name = option
        .strip_prefix("--")
        .or_else(|| option.strip_prefix('-'))
        .unwrap_or(option);
    match name {
        "M" => "machine",
        other => other,
    }
}

/// Whether an option takes a value (known for the options this module tracks;
/// used to skip that value when scanning `args`).
fn takes_value(canonical: &str) -> bool {
    SINGLE_INSTANCE.contains(&canonical)
        || (reserved_reason(canonical).is_some() && canonical != "daemonize")
}

/// What an `arguments` item is merged by: a later item with the same identity
/// replaces the earlier one in place.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Identity {
    Single(String),
    Id(String, String),
}

pub(crate) fn identity(item: &Node) -> Option<Identity> {
    let (option, id) = match &item.value {
        Value::Str(s) => (canonical(s), None),
        Value::Map(entries) => {
            let (first, rest) = entries.split_first()?;
            let nested: &[Entry] = match &first.value.value {
                Value::Map(inner) => inner,
                _ => &[],
            };
            let id = rest
                .iter()
                .chain(nested)
                .find(|e| e.key == "id")
                .and_then(|e| e.value.scalar_text())
                // The string form (`{netdev: "user,id=n0"}`) is identified the same way.
                .or_else(|| match &first.value.value {
                    Value::Str(s) => split_suboptions(s)
                        .into_iter()
                        .find_map(|part| part.strip_prefix("id=").map(str::to_owned)),
                    _ => None,
                });
            (canonical(&first.key), id)
        }
        _ => return None,
    };
    if SINGLE_INSTANCE.contains(&option) {
        Some(Identity::Single(option.to_owned()))
    } else {
        id.map(|id| Identity::Id(option.to_owned(), id))
    }
}

/// `name` without its leading dashes, if it looks like a QEMU option.
fn option_name(name: &str) -> Result<&str, String> {
    let bare = name
        .strip_prefix("--")
        .or_else(|| name.strip_prefix('-'))
        .unwrap_or(name);
    let mut chars = bare.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(bare)
    } else {
        Err(format!("`{name}` is not a QEMU option name"))
    }
}

fn is_suboption_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// QEMU's option syntax doubles commas inside a value.
pub(crate) fn escape_commas(value: &str) -> String {
    value.replace(',', ",,")
}

/// Compiles each `arguments` item to argv words; host paths inside are made
/// absolute in the tree itself, so the normalized YAML carries them.
pub(crate) fn compile_arguments(items: &mut [Node], cx: &mut Cx, out: &mut Vec<String>) {
    for item in items {
        compile_argument(item, cx, out);
    }
}

fn compile_argument(item: &mut Node, cx: &mut Cx, out: &mut Vec<String>) {
    let identity = identity(item);
    let loc = item.loc.clone();
    let expected = "expected an option like `enable-kvm` or a mapping like `{machine: q35}`";
    match &mut item.value {
        Value::Str(s) => {
            let option = match option_name(s) {
                Ok(option) => option.to_owned(),
                Err(message) => {
                    let hint = "write an option with a value as a mapping (`{cpu: host}`), or use `args:` for raw strings";
                    cx.diags.error_hint(&loc, message, hint);
                    return;
                }
            };
            if cx.register_option(&option, &loc, "arguments") {
                out.push(format!("-{option}"));
            }
        }
        Value::Map(entries) if !entries.is_empty() => {
            let (first, rest) = entries.split_at_mut(1);
            let first = &mut first[0];
            let option = match option_name(&first.key) {
                Ok(option) => option.to_owned(),
                Err(message) => {
                    cx.diags.error(&first.key_loc, message);
                    return;
                }
            };
            if !cx.register_option(&option, &first.key_loc, "arguments") {
                return;
            }
            if let Some(Identity::Id(_, id)) = &identity {
                cx.register_id(&option, id, &first.key_loc);
            }
            let mut parts = Vec::new();
            let canon = canonical(&option);
            let path_option =
                RAW_PATH_OPTIONS.contains(&canon) || OTHER_PATH_OPTIONS.contains(&canon);
            if path_option {
                if !rest.is_empty() || !matches!(first.value.value, Value::Str(_)) {
                    cx.diags.error(
                        &first.key_loc,
                        format!(
                            "`-{option}` takes a single path, e.g. `{{{option}: images/file}}`"
                        ),
                    );
                    return;
                }
                if OTHER_PATH_OPTIONS.contains(&canon) {
                    // Checked; QEMU opens it by name (docs/storage.md).
                    parts.extend(cx.resolve_path(&mut first.value, PathUse::Storage));
                    out.push(format!("-{option}"));
                    out.extend(parts);
                    return;
                }
                let (usage, access, pass) = if BOOT_INPUT_OPTIONS.contains(&canon) {
                    (PathUse::BootInput, Access::Read, PassAs::ProcFd)
                } else {
                    let read_only = BLOCK_PATH_OPTIONS.iter().any(|(o, ro)| *o == canon && *ro);
                    let access = if read_only {
                        Access::Read
                    } else {
                        Access::ReadWrite
                    };
                    (path_use(access), access, PassAs::FdSet)
                };
                parts.extend(cx.host_file(&mut first.value, usage, access, pass, false));
            } else {
                if let Some(entries) = keyval_mapping(&option, &first.value) {
                    // Paths in the string form get the mapping form's treatment.
                    first.value.value = Value::Map(entries);
                }
                let (read_only, not_qcow2, sets_backing) = {
                    let nested: &[Entry] = match &first.value.value {
                        Value::Map(inner) => inner,
                        _ => &[],
                    };
                    let all = || rest.iter().chain(nested);
                    (
                        asks_read_only(all()),
                        names_other_format(all()),
                        all().any(|e| e.key.starts_with("backing")),
                    )
                };
                cx.item_readonly = read_only;
                cx.item_not_qcow2 = not_qcow2;
                let first_file = cx.host_file_count();
                positional(&option, &mut first.value, cx, &mut parts);
                render_suboptions(&option, rest, "", false, cx, &mut parts);
                // A qcow2 `-drive` image whose backing the item leaves to its header:
                // maqetd passes that chain as fds (QEMU would resolve a relative name
                // against `/dev/fdset/`).
                if canon == "drive" && !sets_backing && cx.host_file_count() == first_file + 1 {
                    let file = cx.host_file_at(first_file);
                    if file.qcow2 && file.pass == PassAs::FdSet {
                        cx.pass_chain(first_file, "backing.");
                        let slot = cx.chain_slot(first_file);
                        match parts.last_mut() {
                            Some(last) => last.push_str(&slot),
                            None => parts.push(slot),
                        }
                    }
                }
                cx.item_readonly = false;
                cx.item_not_qcow2 = false;
            }
            out.push(format!("-{option}"));
            if !parts.is_empty() {
                out.push(parts.join(","));
            }
        }
        Value::Map(_) => cx
            .diags
            .error(&loc, format!("{expected}, found an empty mapping")),
        _ => {
            let found = item.kind_name();
            cx.diags.error(&loc, format!("{expected}, found {found}"));
        }
    }
}

/// The value of an item's first key: nothing, a word, a list joined by
/// commas, or nested suboptions whose first entry may be a bare word.
fn positional(option: &str, node: &mut Node, cx: &mut Cx, parts: &mut Vec<String>) {
    match &mut node.value {
        Value::Null => {}
        Value::Seq(items) if items.is_empty() => {
            cx.diags
                .error(&node.loc, format!("`-{option}` has an empty list"));
        }
        Value::Seq(items) => {
            let mut words = Vec::new();
            for item in items.iter() {
                match item.scalar_text() {
                    Some(text) => {
                        refuse_string_path(option, &text, &item.loc, cx);
                        words.push(text);
                    }
                    None => cx.diags.error(
                        &item.loc,
                        format!(
                            "expected a value (string, number or boolean) in the list of `-{option}`, found {}",
                            item.kind_name()
                        ),
                    ),
                }
            }
            parts.push(words.join(","));
        }
        Value::Map(entries) if entries.is_empty() => {
            cx.diags
                .error(&node.loc, format!("`-{option}` has an empty mapping"));
        }
        Value::Map(entries) => render_suboptions(option, entries, "", true, cx, parts),
        _ => {
            if let Some(text) = unix_backend(option, node, cx) {
                parts.push(text);
            } else if let Some(text) = node.scalar_text() {
                refuse_string_path(option, &text, &node.loc, cx);
                parts.push(text);
            }
        }
    }
}

/// A `unix:PATH[,server=on,…]` character-device backend (`{serial: "unix:./s.sock"}`):
/// QEMU parses what follows `unix:` as suboptions whose implied first key is `path`, so
/// the path is resolved against the declaring file and checked like a chardev `path=`
/// (the tree keeps the absolute path). `None` when the value is no such backend.
fn unix_backend(option: &str, node: &mut Node, cx: &mut Cx) -> Option<String> {
    let Value::Str(value) = &node.value else {
        return None;
    };
    let rest = value.strip_prefix("unix:")?;
    if !BACKEND_OPTIONS.contains(&canonical(option)) || value.contains("json:") {
        return None;
    }
    let mut items = split_raw_suboptions(rest).into_iter();
    let raw_path = items.next().unwrap_or_default().replace(",,", ",");
    let others: Vec<String> = items.map(str::to_owned).collect();
    for item in &others {
        refuse_string_path(option, item, &node.loc, cx);
    }
    let mut path_node = Node {
        value: Value::Str(raw_path),
        loc: node.loc.clone(),
    };
    let Some(path) = cx.resolve_path(&mut path_node, PathUse::Storage) else {
        // Reported already; the config fails.
        return Some(String::new());
    };
    let path = escape_commas(&path);
    let text = std::iter::once(format!("unix:{path}"))
        .chain(others)
        .collect::<Vec<_>>()
        .join(",");
    node.value = Value::Str(text.clone());
    Some(text)
}

/// Whether suboptions ask QEMU for read-only access (`readonly=on`, `read-only=on`,
/// `media=cdrom`), so the disk's fd is opened read-only.
fn asks_read_only<'e>(mut entries: impl Iterator<Item = &'e Entry>) -> bool {
    entries.any(|e| {
        let text = e.value.scalar_text().unwrap_or_default();
        match e.key.as_str() {
            "readonly" | "read-only" => matches!(text.as_str(), "on" | "true" | "yes"),
            "media" => text == "cdrom",
            _ => false,
        }
    })
}

/// Whether suboptions name an image format other than qcow2 (`format=raw`).
fn names_other_format<'e>(mut entries: impl Iterator<Item = &'e Entry>) -> bool {
    entries.any(|e| e.key == "format" && e.value.scalar_text().is_some_and(|f| f != "qcow2"))
}

/// How a path suboption of `-option` reaches QEMU: `Some` when maqetd opens it and
/// passes the fd, `None` when QEMU opens it by name after the check (documented in
/// docs/storage.md).
fn host_file_use(option: &str, key: &str, read_only: bool) -> Option<(Access, PassAs)> {
    let last = key.rsplit('.').next().unwrap_or(key);
    match (canonical(option), last) {
        ("drive" | "blockdev", "file" | "filename") => {
            let access = if read_only {
                Access::Read
            } else {
                Access::ReadWrite
            };
            Some((access, PassAs::FdSet))
        }
        ("virtfs" | "fsdev", "path") => Some((Access::Directory, PassAs::ProcFd)),
        _ => None,
    }
}

/// What in a string value of `-option` would make QEMU open a host path maqet neither
/// checked nor opened: a `file=`/`path=`/`filename=` suboption, a `json:` block spec,
/// a JSON option naming a file, a backend naming a file, socket, device or command.
pub(crate) fn string_path_problem(option: &str, value: &str) -> Option<String> {
    let option = canonical(option);
    if option == "append" {
        // The guest kernel's command line: its paths are the guest's.
        return None;
    }
    if value.contains("json:") {
        return Some("a `json:` block specification".to_owned());
    }
    if value.trim_start().starts_with('{') {
        return ["\"filename\"", "\"path\"", "\"file\""]
            .iter()
            .any(|k| value.contains(k))
            .then(|| "a JSON option naming a file".to_owned());
    }
    if BACKEND_OPTIONS.contains(&option)
        && let Some(prefix) = BACKEND_PATH_PREFIXES.iter().find(|p| value.starts_with(*p))
    {
        return Some(format!("the backend `{prefix}…`"));
    }
    for part in split_suboptions(value) {
        let Some((key, v)) = part.split_once('=') else {
            continue;
        };
        let last = key.rsplit('.').next().unwrap_or(key);
        // `-blockdev …,file=<node>` names another block node, not a file.
        let node_ref = option == "blockdev" && key == "file" && !v.contains('/');
        if PATH_KEYS.contains(&last) && !node_ref && !is_network_url(v) && !names_no_file(last, v) {
            return Some(format!("`{part}`"));
        }
    }
    None
}

/// Reports [`string_path_problem`] at `loc`.
fn refuse_string_path(option: &str, value: &str, loc: &Loc, cx: &mut Cx) {
    if let Some(what) = string_path_problem(option, value) {
        cx.diags.error_hint(
            loc,
            format!(
                "`-{option}` names a host path inside a string ({what}); maqet checks and opens every path QEMU uses itself, so it refuses paths it cannot see"
            ),
            STRUCTURED_HINT,
        );
    }
}

const STRUCTURED_HINT: &str = "declare disks and shares as structured `storage:` entries, or write the option as an `arguments:` mapping such as `{drive: {file: disk.img, format: raw}}` or `{kernel: vmlinuz}`, whose paths are checked (docs/storage.md)";

/// QEMU's suboption list split at unescaped commas (`,,` is a literal comma).
fn split_suboptions(value: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("one part").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("one part").push(c);
        }
    }
    parts
}

/// The mapping a string-form value naming host paths (`{drive: "file=./x.iso,media=cdrom"}`)
/// stands for, parsed as QEMU parses suboptions: `key=value` items split at unescaped
/// commas (`,,` is a literal comma), a leading bare word (the chardev backend, the
/// netdev type) kept as the mapping's bare first entry, and a later bare word a
/// short-form boolean (`server` is `server=on`, `nowait` is `wait=off`). Path values
/// are unescaped here (the mapping form escapes them again); other values stay as
/// written, as mapping values reach QEMU unchanged. `None` leaves the string as it is:
/// it names no host path, or one maqet cannot follow (`json:`, JSON options, a
/// chardev backend like `unix:…`), which [`refuse_string_path`] then refuses.
fn keyval_mapping(option: &str, node: &Node) -> Option<Vec<Entry>> {
    let Value::Str(value) = &node.value else {
        return None;
    };
    let canon = canonical(option);
    // Backends (`unix:…`, `file:…`) are not suboption lists; see [`unix_backend`].
    let backend_path = BACKEND_OPTIONS.contains(&canon)
        && BACKEND_PATH_PREFIXES.iter().any(|p| value.starts_with(p));
    if canon == "append"
        || backend_path
        || value.contains("json:")
        || value.trim_start().starts_with('{')
        || string_path_problem(option, value).is_none()
    {
        return None;
    }
    let entry = |key: &str, value: Value| Entry {
        key: key.to_owned(),
        key_loc: node.loc.clone(),
        value: Node {
            value,
            loc: node.loc.clone(),
        },
    };
    let mut entries = Vec::new();
    for (i, raw) in split_raw_suboptions(value).into_iter().enumerate() {
        match raw.split_once('=') {
            Some((key, v)) => {
                let is_path = is_path_key(option, key)
                    && !names_no_file(key.rsplit('.').next().unwrap_or(key), v)
                    && !is_network_url(v);
                let v = if is_path {
                    v.replace(",,", ",")
                } else {
                    v.to_owned()
                };
                entries.push(entry(key, Value::Str(v)));
            }
            None if i == 0 => entries.push(entry(raw, Value::Null)),
            None => match raw.strip_prefix("no") {
                Some(flag) => entries.push(entry(flag, Value::Str("off".to_owned()))),
                None => entries.push(entry(raw, Value::Str("on".to_owned()))),
            },
        }
    }
    Some(entries)
}

/// QEMU's suboption list split at unescaped commas, each part as written (`,,` kept).
fn split_raw_suboptions(value: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut i) = (0, 0);
    let bytes = value.as_bytes();
    while i < bytes.len() {
        if bytes[i] == b',' {
            if bytes.get(i + 1) == Some(&b',') {
                i += 2;
                continue;
            }
            parts.push(&value[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    parts.push(&value[start..]);
    parts
}

/// A URL of a block protocol that only reaches the network.
fn is_network_url(value: &str) -> bool {
    has_scheme(value)
        && !value.contains("unix")
        && value
            .split_once(':')
            .is_some_and(|(scheme, _)| NETWORK_PROTOCOLS.contains(&scheme))
}

/// `key=value` suboptions; nested mappings join keys with dots, lists repeat
/// the key. Only the very first entry (when `bare_first`) may be a bare word.
pub(crate) fn render_suboptions(
    option: &str,
    entries: &mut [Entry],
    prefix: &str,
    bare_first: bool,
    cx: &mut Cx,
    parts: &mut Vec<String>,
) {
    for (i, entry) in entries.iter_mut().enumerate() {
        if i == 0 && bare_first && matches!(entry.value.value, Value::Null) {
            if entry.key.is_empty()
                || entry.key.contains([',', '='])
                || entry.key.contains(char::is_whitespace)
            {
                cx.diags.error(
                    &entry.key_loc,
                    format!("`{}` is not a valid word for `-{option}`", entry.key),
                );
            } else {
                parts.push(entry.key.clone());
            }
            continue;
        }
        if !is_suboption_key(&entry.key) {
            cx.diags.error_hint(
                &entry.key_loc,
                format!(
                    "`{}` is not a valid suboption name for `-{option}`",
                    entry.key
                ),
                "names use letters, digits, `_`, `-` and `.`",
            );
            continue;
        }
        let key = format!("{prefix}{}", entry.key);
        match &mut entry.value.value {
            Value::Null => cx.diags.error_hint(
                &entry.value.loc,
                format!("suboption `{key}` of `-{option}` needs a value"),
                "only the first entry may be a bare word like `virtio-rng-pci: null`",
            ),
            Value::Map(inner) if inner.is_empty() => {
                cx.diags.error(
                    &entry.value.loc,
                    format!("suboption `{key}` of `-{option}` is an empty mapping"),
                );
            }
            Value::Map(inner) => {
                render_suboptions(option, inner, &format!("{key}."), false, cx, parts)
            }
            Value::Seq(items) => {
                for item in items {
                    if let Some(value) = suboption_value(option, &key, item, cx) {
                        parts.push(format!("{key}={value}"));
                    }
                }
            }
            _ => {
                if let Some(value) = suboption_value(option, &key, &mut entry.value, cx) {
                    parts.push(format!("{key}={value}"));
                }
            }
        }
    }
}

/// How the dangerous-location check treats a block file: a read-only one may come from
/// the system's shared trees (`{drive: {if: pflash, readonly: on, file: /usr/share/…}}`).
fn path_use(access: Access) -> PathUse {
    match access {
        Access::Read => PathUse::ReadOnly,
        Access::ReadWrite | Access::Directory => PathUse::Storage,
    }
}

/// A scalar suboption value as QEMU should see it; host paths are resolved
/// (and rewritten in the tree), checked, and become host file slots where maqetd
/// opens the file for QEMU.
fn suboption_value(option: &str, key: &str, node: &mut Node, cx: &mut Cx) -> Option<String> {
    if let Value::Str(s) = &node.value
        && is_path_key(option, key)
        && !names_no_file(key.rsplit('.').next().unwrap_or(key), s)
    {
        if is_network_url(s) {
            return Some(s.clone());
        }
        if has_scheme(s) {
            let message = format!(
                "`{key}: {s}` asks QEMU to open `{s}` through a protocol maqet cannot check (only network protocols such as `nbd:` or `https:` pass)"
            );
            cx.diags.error_hint(&node.loc, message, STRUCTURED_HINT);
            return None;
        }
        return match host_file_use(option, key, cx.item_readonly) {
            Some((access, pass)) => cx.host_file(node, path_use(access), access, pass, true),
            None => cx
                .resolve_path(node, PathUse::Storage)
                .map(|p| escape_commas(&p)),
        };
    }
    let text = node.scalar_text();
    match &text {
        None => cx.diags.error(
            &node.loc,
            format!(
                "suboption `{key}` of `-{option}` expects a value (string, number or boolean), found {}",
                node.kind_name()
            ),
        ),
        // A comma in a value starts another suboption in QEMU's parser.
        Some(t) => refuse_string_path(option, &format!("{key}={t}"), &node.loc, cx),
    }
    text
}

fn is_path_key(option: &str, key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    // `-blockdev …,file=<node-name>` names another block node, not a file.
    PATH_KEYS.contains(&last) && !(canonical(option) == "blockdev" && key == "file")
}

/// `nbd:…`, `json:{…}`, `https://…`: protocol values QEMU resolves, not host paths.
fn has_scheme(value: &str) -> bool {
    let Some((scheme, _)) = value.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c))
}

/// Splits `args` items into argv words and checks the options among them.
/// An item without whitespace is one word, unchanged; others are split with
/// POSIX shell quoting (no expansion).
pub(crate) fn compile_args(items: &mut [Node], cx: &mut Cx, out: &mut Vec<String>) {
    let mut value_expected = false;
    // The option the next value word belongs to: its host paths are refused (raw
    // strings cannot be fd-passed; docs/storage.md).
    let mut last_option: Option<String> = None;
    for item in items {
        let text = match &item.value {
            Value::Str(s) | Value::Int(s) | Value::Float(s) => s.clone(),
            _ => {
                let found = item.kind_name();
                cx.diags.error(
                    &item.loc,
                    format!("each `args` item must be a string, found {found}"),
                );
                continue;
            }
        };
        item.value = Value::Str(text.clone());
        // One item, one argv word, as written (maqet 0.0.x passed them the same way).
        // An option and its value in one item would reach QEMU as one unknown option.
        if !value_expected && text.starts_with('-') && text.contains(char::is_whitespace) {
            let (option, value) = text
                .split_once(char::is_whitespace)
                .expect("contains whitespace");
            cx.diags.error_hint(
                &item.loc,
                format!("`args` item `{text}` holds an option and its value in one word; each item is passed to QEMU as one argument"),
                format!("write them as two items: `[{option}, '{}']`", value.trim()),
            );
            continue;
        }
        let words = [text];
        for word in words {
            let is_option = word.len() > 1 && word.starts_with('-') && option_name(&word).is_ok();
            if value_expected || !is_option {
                value_expected = false;
                if let Some(option) = &last_option {
                    refuse_raw_path(option, &word, &item.loc, cx);
                }
            } else if let Ok(option) = option_name(&word) {
                cx.register_option(option, &item.loc, "args");
                value_expected = takes_value(canonical(option));
                last_option = Some(option.to_owned());
            }
            out.push(word);
        }
    }
}

/// Refuses an `args` value word that names a host path: the value of a path option
/// (`-kernel x`), or a string with a path inside ([`string_path_problem`]).
fn refuse_raw_path(option: &str, word: &str, loc: &Loc, cx: &mut Cx) {
    let canon = canonical(option);
    if RAW_PATH_OPTIONS.contains(&canon) || OTHER_PATH_OPTIONS.contains(&canon) {
        cx.diags.error_hint(
            loc,
            format!("`-{option} {word}` in `args` names a host path; maqet checks and opens every path QEMU uses itself, so raw strings cannot carry one"),
            STRUCTURED_HINT,
        );
    } else {
        refuse_string_path(option, word, loc, cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(canonical("-M"), "machine");
        assert_eq!(canonical("--m"), "m");
        assert_eq!(option_name("-enable-kvm"), Ok("enable-kvm"));
        assert_eq!(option_name("fw_cfg"), Ok("fw_cfg"));
        assert!(option_name("cpu host").is_err());
        assert!(option_name("---x").is_err());
        assert!(option_name("").is_err());
        assert!(has_scheme("nbd:localhost:10809"));
        assert!(has_scheme("json:{}"));
        assert!(has_scheme("https://x/y"));
        assert!(!has_scheme("dir/a:b.img"));
        assert!(!has_scheme("/abs:x"));
        assert!(!has_scheme("disk.img"));
        assert!(is_path_key("drive", "file"));
        assert!(is_path_key("blockdev", "file.filename"));
        assert!(!is_path_key("blockdev", "file"));
        assert!(is_path_key("chardev", "path"));
    }
}
