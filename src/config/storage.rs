//! `storage` entries: disks (qcow2, raw) and virtfs shares, their validation,
//! typed form (used to create missing images) and QEMU arguments.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::PathUse;
use super::argv::render_suboptions;
use super::diag::unknown_hint;
use super::hostfile::{Access, HostFile, PassAs};
use super::size::parse_size;
use super::validate::Cx;
use super::yaml::{Entry, Loc, Node, Value};

const STORAGE_KEYS: &[&str] = &[
    "name",
    "type",
    "file",
    "path",
    "size",
    "interface",
    "backing_file",
    "backing_format",
    "options",
    // maqet 0.0.x wrote these beside `options`; they are moved into it.
    "readonly",
    "media",
    "mount_tag",
    "security_model",
];
/// Keys accepted directly on an entry as the same setting as in its `options`.
const OPTION_SHORTHANDS: &[&str] = &["readonly", "media", "mount_tag", "security_model"];
/// Size of a new disk whose entry has no `size` (maqet 0.0.x's default).
pub const DEFAULT_DISK_SIZE: u64 = 10 << 30;
const TYPES: &[&str] = &["qcow2", "raw", "virtfs"];
const INTERFACES: &[&str] = &["virtio", "sata", "ide", "scsi", "none"];
const SECURITY_MODELS: &[&str] = &[
    "mapped-xattr",
    "mapped-file",
    "mapped",
    "passthrough",
    "none",
];
/// Ports of the AHCI controller maqet adds for `interface: sata`.
const AHCI_PORTS: usize = 6;
const AHCI_ID: &str = "maqet-ahci";
const SCSI_ID: &str = "maqet-scsi";
/// Prefix of the block node name maqet gives each disk's format layer (`maqet-d<N>`,
/// N = position in `storage`): QEMU's snapshot commands only accept explicit node
/// names, node names share a namespace with drive ids, and they are at most 31 bytes.
pub const NODE_NAME_PREFIX: &str = "maqet-d";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    Qcow2,
    Raw,
    Virtfs,
}

impl StorageKind {
    /// The config spelling, which is also the `qemu-img`/`-drive` format for disks.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::Qcow2 => "qcow2",
            StorageKind::Raw => "raw",
            StorageKind::Virtfs => "virtfs",
        }
    }

    pub fn is_disk(self) -> bool {
        self != StorageKind::Virtfs
    }
}

/// How a disk is attached. Virtfs shares carry `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    Virtio,
    Sata,
    Ide,
    Scsi,
    /// `-drive if=none`: the config attaches it itself in `arguments`.
    None,
}

/// One validated `storage` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageEntry {
    /// Unique; also the QEMU drive/fsdev id.
    pub name: String,
    pub kind: StorageKind,
    /// Absolute: the image file (disks) or the shared directory (virtfs).
    pub path: PathBuf,
    /// Bytes; only needed to create a missing image.
    pub size: Option<u64>,
    pub interface: Interface,
    pub backing_file: Option<PathBuf>,
    pub backing_format: Option<String>,
    pub readonly: bool,
    /// Virtfs only (defaults: the name, `mapped-xattr`).
    pub mount_tag: Option<String>,
    pub security_model: Option<String>,
    /// Further `options` as rendered `key=value` suboptions, already escaped.
    pub extra_options: Vec<String>,
}

/// Validates the `storage` list; default names are written into the tree so
/// the normalized YAML keeps them stable.
pub(crate) fn compile_storage(items: &mut [Node], cx: &mut Cx) -> Vec<StorageEntry> {
    let mut compiled = Vec::new();
    let (mut disks, mut shares, mut sata) = (0usize, 0usize, 0usize);
    let mut names: HashMap<String, Loc> = HashMap::new();
    for item in items {
        let Some((entry, name_loc)) = compile_entry(item, &mut disks, &mut shares, cx) else {
            continue;
        };
        if let Some(first) = names.get(&entry.name) {
            let message = format!("storage name `{}` is already used at {first}", entry.name);
            cx.diags.error_hint(
                &name_loc,
                message,
                "give each storage entry a unique `name:`",
            );
            continue;
        }
        names.insert(entry.name.clone(), name_loc.clone());
        if entry.interface == Interface::Sata {
            sata += 1;
            if sata > AHCI_PORTS {
                let message = format!("at most {AHCI_PORTS} disks can use `interface: sata`");
                cx.diags.error_hint(
                    &name_loc,
                    message,
                    "use `interface: virtio` or `scsi` for the others",
                );
            }
        }
        compiled.push(entry);
    }
    compiled
}

/// One entry and the location to report name clashes at.
fn compile_entry(
    item: &mut Node,
    disks: &mut usize,
    shares: &mut usize,
    cx: &mut Cx,
) -> Option<(StorageEntry, Loc)> {
    let loc = item.loc.clone();
    let Value::Map(entries) = &mut item.value else {
        let message = format!(
            "each `storage` entry must be a mapping like `{{name: root, type: qcow2, file: root.qcow2, size: 10G}}`, found {}",
            item.kind_name()
        );
        cx.diags.error(&loc, message);
        return None;
    };
    for e in entries
        .iter()
        .filter(|e| !STORAGE_KEYS.contains(&e.key.as_str()))
    {
        let hint = unknown_hint(&e.key, STORAGE_KEYS, "storage keys");
        cx.diags
            .error_hint(&e.key_loc, format!("unknown storage key `{}`", e.key), hint);
    }
    let kind = storage_kind(entries, &loc, cx)?;
    for e in entries.iter() {
        if let Some(reason) = misplaced_key(kind, &e.key) {
            cx.diags.error(&e.key_loc, reason);
        }
    }
    move_shorthands_into_options(entries, &loc, cx);

    let counter = if kind.is_disk() { disks } else { shares };
    let ordinal = *counter;
    *counter += 1;
    let default_name = format!("{}{ordinal}", if kind.is_disk() { "disk" } else { "share" });
    let (name, name_loc) = match position(entries, "name") {
        Some(i) => {
            let node = &entries[i].value;
            match &node.value {
                Value::Str(name) => {
                    if let Err(message) = validate_storage_name(name) {
                        cx.diags.error(&node.loc, message);
                    }
                    (name.clone(), node.loc.clone())
                }
                _ => {
                    let message = format!(
                        "storage `name` must be a string, found {}",
                        node.kind_name()
                    );
                    cx.diags.error(&node.loc, message);
                    (default_name, node.loc.clone())
                }
            }
        }
        None => {
            let value = Node::new(Value::Str(default_name.clone()), loc.clone());
            let key_loc = loc.clone();
            entries.insert(
                0,
                Entry {
                    key: "name".to_owned(),
                    key_loc,
                    value,
                },
            );
            (default_name, loc.clone())
        }
    };

    let mut options = Options::default();
    if let Some(i) = position(entries, "options") {
        compile_options(kind, &mut entries[i].value, cx, &mut options);
    }
    // A disk QEMU only reads (a CD-ROM, firmware) may come from a system directory.
    let usage = if kind.is_disk() && options.readonly {
        PathUse::ReadOnly
    } else {
        PathUse::Storage
    };
    let path_key = if kind.is_disk() { "file" } else { "path" };
    let path = match position(entries, path_key) {
        Some(i) => cx
            .resolve_path(&mut entries[i].value, usage)
            .map(PathBuf::from),
        None if kind.is_disk() && cx.ctx.vm_data_dir.is_some() => {
            default_disk_file(entries, &name, kind, &loc, cx)
        }
        None => {
            let message = format!("a `{}` storage entry needs `{path_key}`", kind.as_str());
            cx.diags.error(&loc, message);
            None
        }
    };

    // A new disk without `size` (and nothing to take it from) gets 10G, as in 0.0.x.
    let size = match position(entries, "size") {
        Some(i) => storage_size(&entries[i].value, cx),
        None if kind.is_disk() && position(entries, "backing_file").is_none() => {
            Some(DEFAULT_DISK_SIZE)
        }
        None => None,
    };
    let interface = match position(entries, "interface") {
        Some(i) => interface(&entries[i].value, cx),
        None if kind.is_disk() => Interface::Virtio,
        None => Interface::None,
    };

    let backing_file = position(entries, "backing_file").and_then(|i| {
        let node = &mut entries[i].value;
        if let (Value::Str(raw), Some(image)) = (&node.value, &path) {
            // maqet 0.0.x's rule: relative to the image's own directory when the file
            // is there (qemu-img's own convention), else to the config's directory.
            let beside = image.parent().map(|dir| dir.join(raw));
            if let Some(beside) = beside
                .filter(|b| !raw.starts_with(['/', '~']) && std::fs::symlink_metadata(b).is_ok())
                && let Some(text) = beside.to_str()
            {
                node.value = Value::Str(text.to_owned());
            }
        }
        cx.resolve_path(node, PathUse::Storage).map(PathBuf::from)
    });
    let mut backing_format =
        position(entries, "backing_format").and_then(|i| backing_format(&entries[i].value, cx));
    match (
        position(entries, "backing_file"),
        position(entries, "backing_format"),
    ) {
        (Some(i), None) => {
            backing_format = probe_backing_format(entries, i, backing_file.as_deref(), cx);
        }
        (None, Some(i)) => cx
            .diags
            .error(&entries[i].key_loc, "`backing_format` needs `backing_file`"),
        _ => {}
    }

    let entry = StorageEntry {
        kind,
        path: path?,
        size,
        interface,
        backing_file,
        backing_format,
        readonly: options.readonly,
        mount_tag: (kind == StorageKind::Virtfs)
            .then(|| options.mount_tag.unwrap_or_else(|| name.clone())),
        security_model: (kind == StorageKind::Virtfs).then(|| {
            options
                .security_model
                .unwrap_or_else(|| "mapped-xattr".to_owned())
        }),
        extra_options: options.extra,
        name,
    };
    Some((entry, name_loc))
}

fn position(entries: &[Entry], key: &str) -> Option<usize> {
    entries.iter().position(|e| e.key == key)
}

/// The entry's `type`: case-insensitive, `qcow2` when absent (as in maqet 0.0.x);
/// written back lower-case so the stored config is normalized.
fn storage_kind(entries: &mut Vec<Entry>, loc: &Loc, cx: &mut Cx) -> Option<StorageKind> {
    let Some(i) = position(entries, "type") else {
        let at = position(entries, "name").map_or(0, |n| n + 1);
        let value = Node::new(Value::Str("qcow2".to_owned()), loc.clone());
        let key_loc = loc.clone();
        entries.insert(
            at,
            Entry {
                key: "type".to_owned(),
                key_loc,
                value,
            },
        );
        return Some(StorageKind::Qcow2);
    };
    let node = &mut entries[i].value;
    let kind = match str_of(node).to_ascii_lowercase().as_str() {
        "qcow2" => StorageKind::Qcow2,
        "raw" => StorageKind::Raw,
        "virtfs" => StorageKind::Virtfs,
        _ => {
            unknown_value(node, "storage type", TYPES, cx);
            return None;
        }
    };
    node.value = Value::Str(kind.as_str().to_owned());
    Some(kind)
}

/// `readonly`, `media`, `mount_tag`, `security_model` written directly on the entry
/// (maqet 0.0.x's spelling) are moved into `options`, where they are validated and
/// honoured like any option; setting one in both places is an error.
fn move_shorthands_into_options(entries: &mut Vec<Entry>, loc: &Loc, cx: &mut Cx) {
    let mut moved = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        if OPTION_SHORTHANDS.contains(&entries[i].key.as_str()) {
            moved.push(entries.remove(i));
        } else {
            i += 1;
        }
    }
    if moved.is_empty() {
        return;
    }
    let options = match position(entries, "options") {
        Some(i) => i,
        None => {
            entries.push(Entry {
                key: "options".to_owned(),
                key_loc: loc.clone(),
                value: Node::new(Value::Map(Vec::new()), loc.clone()),
            });
            entries.len() - 1
        }
    };
    // A non-mapping `options` is reported by `compile_options`.
    let Value::Map(options) = &mut entries[options].value.value else {
        return;
    };
    for entry in moved {
        if let Some(there) = options.iter().find(|o| o.key == entry.key) {
            let message = format!(
                "`{}` is set both on the entry and in its `options` (at {})",
                entry.key, there.key_loc
            );
            cx.diags
                .error_hint(&entry.key_loc, message, "keep one of the two");
            continue;
        }
        options.push(entry);
    }
}

/// A disk entry without `file`: `<VM data dir>/<name>.<type>`, created at start and
/// owned by maqet (deleted with `--delete-storage`). Written into the tree so the
/// stored config names it.
fn default_disk_file(
    entries: &mut Vec<Entry>,
    name: &str,
    kind: StorageKind,
    loc: &Loc,
    cx: &mut Cx,
) -> Option<PathBuf> {
    // An invalid name was reported already; it must not become a file name.
    validate_storage_name(name).ok()?;
    let dir = cx.ctx.vm_data_dir?;
    let file = dir.join(format!("{name}.{}", kind.as_str()));
    let mut value = Node::new(Value::Str(file.to_str()?.to_owned()), loc.clone());
    let resolved = cx
        .resolve_path(&mut value, PathUse::Storage)
        .map(PathBuf::from);
    let at = position(entries, "type").map_or(entries.len(), |t| t + 1);
    entries.insert(
        at,
        Entry {
            key: "file".to_owned(),
            key_loc: loc.clone(),
            value,
        },
    );
    resolved
}

/// A string node's text; "" for anything else (which then matches nothing).
fn str_of(node: &Node) -> &str {
    match &node.value {
        Value::Str(s) => s,
        _ => "",
    }
}

/// Reports a value that is not one of `candidates`, with a did-you-mean.
fn unknown_value(node: &Node, what: &str, candidates: &[&str], cx: &mut Cx) {
    let shown = node
        .scalar_text()
        .unwrap_or_else(|| node.kind_name().to_owned());
    let hint = unknown_hint(&shown, candidates, "values");
    cx.diags
        .error_hint(&node.loc, format!("unknown {what} `{shown}`"), hint);
}

/// Why `key` does not belong in an entry of this kind.
fn misplaced_key(kind: StorageKind, key: &str) -> Option<&'static str> {
    match (kind, key) {
        (StorageKind::Virtfs, "file") => {
            Some("`file` is for disk images; virtfs shares use `path`")
        }
        (StorageKind::Virtfs, "size") => Some("`size` only applies to disk images"),
        (StorageKind::Virtfs, "interface") => Some("`interface` only applies to disk images"),
        (StorageKind::Virtfs, "media") => Some("`media` only applies to disk images"),
        (StorageKind::Qcow2 | StorageKind::Raw, "mount_tag" | "security_model") => {
            Some("`mount_tag` and `security_model` only apply to virtfs shares")
        }
        (StorageKind::Qcow2 | StorageKind::Raw, "path") => {
            Some("`path` is for virtfs shares; disk images use `file`")
        }
        (StorageKind::Raw | StorageKind::Virtfs, "backing_file" | "backing_format") => {
            Some("backing images only apply to `type: qcow2`")
        }
        _ => None,
    }
}

/// QEMU ids must start with a letter; `maqet-` ids belong to maqet.
fn validate_storage_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.len() <= 64;
    if !valid {
        Err(format!(
            "invalid storage name `{name}`: use up to 64 letters, digits, `_` and `-`, starting with a letter"
        ))
    } else if name.starts_with("maqet-") {
        Err(format!(
            "invalid storage name `{name}`: names starting with `maqet-` are reserved"
        ))
    } else {
        Ok(())
    }
}

fn storage_size(node: &Node, cx: &mut Cx) -> Option<u64> {
    let result = match &node.value {
        Value::Int(text) => match super::size::int_value(text) {
            Some(n) if n > 0 => u64::try_from(n).map_err(|_| format!("`{text}` is too large")),
            Some(_) => Err(format!(
                "`{text}` is not a valid size: it must be greater than zero"
            )),
            None => Err(format!("`{text}` is too large")),
        },
        Value::Str(s) => parse_size(s),
        _ => Err(format!(
            "expected a size like `20G`, found {}",
            node.kind_name()
        )),
    };
    result
        .map_err(|message| cx.diags.error_hint(&node.loc, message, "e.g. `size: 20G`"))
        .ok()
}

/// The entry's interface; an unknown one is reported and read as `virtio`.
fn interface(node: &Node, cx: &mut Cx) -> Interface {
    match str_of(node) {
        "virtio" => Interface::Virtio,
        "sata" => Interface::Sata,
        "ide" => Interface::Ide,
        "scsi" => Interface::Scsi,
        "none" => Interface::None,
        _ => {
            unknown_value(node, "disk interface", INTERFACES, cx);
            Interface::Virtio
        }
    }
}

/// `backing_file` without `backing_format` (as maqet 0.0.x allowed): the format
/// qemu-img detects, written into the entry so the stored config states it. Refused
/// only when there is no probe or it fails.
fn probe_backing_format(
    entries: &mut Vec<Entry>,
    key: usize,
    backing: Option<&Path>,
    cx: &mut Cx,
) -> Option<String> {
    let hint = "name the backing image's format, e.g. `backing_format: qcow2`";
    let key_loc = entries[key].key_loc.clone();
    // An unusable `backing_file` has its own error already.
    let backing = backing?;
    let Some(probe) = cx.ctx.probe_format else {
        cx.diags
            .error_hint(&key_loc, "`backing_file` needs `backing_format`", hint);
        return None;
    };
    let format = match probe(backing) {
        Ok(format) => format,
        Err(why) => {
            let message = format!(
                "cannot tell the format of backing file `{}`: {why}",
                backing.display()
            );
            cx.diags.error_hint(&key_loc, message, hint);
            return None;
        }
    };
    let node = Node::new(Value::Str(format), key_loc.clone());
    let format = backing_format(&node, cx)?;
    entries.insert(
        key + 1,
        Entry {
            key: "backing_format".to_owned(),
            key_loc,
            value: node,
        },
    );
    Some(format)
}

fn backing_format(node: &Node, cx: &mut Cx) -> Option<String> {
    match &node.value {
        Value::Str(s)
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) =>
        {
            Some(s.clone())
        }
        _ => {
            cx.diags.error(
                &node.loc,
                "`backing_format` must be an image format like `qcow2` or `raw`",
            );
            None
        }
    }
}

#[derive(Default)]
struct Options {
    readonly: bool,
    mount_tag: Option<String>,
    security_model: Option<String>,
    extra: Vec<String>,
}

/// `options`: the keys maqet understands, the ones it sets itself (refused),
/// and the rest rendered as extra `-drive`/`-virtfs` suboptions.
fn compile_options(kind: StorageKind, node: &mut Node, cx: &mut Cx, options: &mut Options) {
    let Value::Map(entries) = &mut node.value else {
        let message = format!(
            "storage `options` must be a mapping, found {}",
            node.kind_name()
        );
        cx.diags.error(&node.loc, message);
        return;
    };
    let option = if kind.is_disk() { "drive" } else { "virtfs" };
    for entry in entries.iter_mut() {
        let key = entry.key.clone();
        let value = &entry.value;
        match (kind, key.as_str()) {
            (_, "readonly") => match value.value {
                Value::Bool(b) => options.readonly = b,
                _ => cx
                    .diags
                    .error(&value.loc, "`readonly` must be true or false"),
            },
            (StorageKind::Virtfs, "mount_tag") => match &value.value {
                Value::Str(s)
                    if !s.is_empty() && !s.contains(',') && !s.contains(char::is_whitespace) =>
                {
                    options.mount_tag = Some(s.clone());
                }
                _ => cx.diags.error(
                    &value.loc,
                    "`mount_tag` must be a word without commas or spaces",
                ),
            },
            (StorageKind::Virtfs, "security_model") => match &value.value {
                Value::Str(s) if SECURITY_MODELS.contains(&s.as_str()) => {
                    options.security_model = Some(s.clone())
                }
                _ => unknown_value(value, "`security_model`", SECURITY_MODELS, cx),
            },
            // A CD-ROM is read-only for QEMU: its file is opened read-only too, so an
            // ISO under /usr/share is usable.
            (StorageKind::Qcow2 | StorageKind::Raw, "media") => {
                if matches!(&value.value, Value::Str(m) if m == "cdrom") {
                    options.readonly = true;
                }
                render_suboptions(
                    option,
                    std::slice::from_mut(entry),
                    "",
                    false,
                    cx,
                    &mut options.extra,
                );
            }
            (StorageKind::Virtfs, "path" | "id")
            | (_, "file" | "format" | "if" | "id")
            | (StorageKind::Qcow2 | StorageKind::Raw, "node-name") => {
                let message = format!(
                    "`{key}` is set by maqet from the storage entry; remove it from `options`"
                );
                cx.diags.error(&entry.key_loc, message);
            }
            _ => render_suboptions(
                option,
                std::slice::from_mut(entry),
                "",
                false,
                cx,
                &mut options.extra,
            ),
        }
    }
}

/// QEMU arguments for all entries, in order; the SATA/SCSI controller is added
/// before the first disk that needs it. Image files, declared backing images and
/// share roots are host files maqetd opens at start (docs/storage.md).
pub(crate) fn storage_argv(entries: &[StorageEntry], cx: &mut Cx) -> Vec<String> {
    let mut out = Vec::new();
    let (mut sata_port, mut scsi_added) = (0usize, false);
    for (index, e) in entries.iter().enumerate() {
        let (access, pass) = match (e.kind, e.readonly) {
            (StorageKind::Virtfs, _) => (Access::Directory, PassAs::ProcFd),
            (_, true) => (Access::Read, PassAs::FdSet),
            (_, false) => (Access::ReadWrite, PassAs::FdSet),
        };
        let file_index = cx.host_file_count();
        let file = HostFile {
            path: e.path.clone(),
            access,
            pass,
            qcow2: e.kind == StorageKind::Qcow2,
            chain: None,
        };
        let path = cx.register_host_file(file, true);
        // The image whose backing chain maqetd passes as fds: the declared backing
        // image, else the disk itself.
        let mut chain = (e.kind == StorageKind::Qcow2).then_some((file_index, "backing."));
        let mut parts = if e.kind == StorageKind::Virtfs {
            vec![
                "local".to_owned(),
                format!("path={path}"),
                format!("mount_tag={}", e.mount_tag.as_deref().unwrap_or(&e.name)),
                format!(
                    "security_model={}",
                    e.security_model.as_deref().unwrap_or("mapped-xattr")
                ),
                format!("id={}", e.name),
            ]
        } else {
            let bus = match e.interface {
                Interface::Virtio => "virtio",
                Interface::Ide => "ide",
                Interface::Sata | Interface::Scsi | Interface::None => "none",
            };
            vec![
                format!("file={path}"),
                format!("format={}", e.kind.as_str()),
                format!("if={bus}"),
                format!("id={}", e.name),
                format!("node-name={NODE_NAME_PREFIX}{index}"),
            ]
        };
        if let (Some(backing), Some(format)) = (&e.backing_file, &e.backing_format) {
            // Named explicitly, so QEMU takes the fd-passed image instead of opening
            // the name in the qcow2 header.
            let file = HostFile {
                path: backing.clone(),
                access: Access::Read,
                pass: PassAs::FdSet,
                qcow2: format == "qcow2",
                chain: None,
            };
            chain = (format == "qcow2").then(|| (cx.host_file_count(), "backing.backing."));
            let slot = cx.register_host_file(file, true);
            parts.push(format!("backing.driver={format}"));
            parts.push(format!("backing.file.filename={slot}"));
        }
        if e.readonly {
            parts.push("readonly=on".to_owned());
        }
        parts.extend(e.extra_options.iter().cloned());
        let flag = if e.kind == StorageKind::Virtfs {
            "-virtfs"
        } else {
            "-drive"
        };
        let device = match e.interface {
            Interface::Sata if e.kind.is_disk() => {
                if sata_port == 0 {
                    out.extend(["-device".to_owned(), format!("ahci,id={AHCI_ID}")]);
                }
                sata_port += 1;
                Some(format!(
                    "ide-hd,drive={},bus={AHCI_ID}.{}",
                    e.name,
                    sata_port - 1
                ))
            }
            Interface::Scsi if e.kind.is_disk() => {
                if !scsi_added {
                    out.extend([
                        "-device".to_owned(),
                        format!("virtio-scsi-pci,id={SCSI_ID}"),
                    ]);
                    scsi_added = true;
                }
                Some(format!("scsi-hd,drive={},bus={SCSI_ID}.0", e.name))
            }
            _ => None,
        };
        let mut word = parts.join(",");
        if let Some((index, prefix)) = chain {
            cx.pass_chain(index, prefix);
            word.push_str(&cx.chain_slot(index));
        }
        out.extend([flag.to_owned(), word]);
        if let Some(device) = device {
            out.extend(["-device".to_owned(), device]);
        }
    }
    out
}
