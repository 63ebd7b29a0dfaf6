//! Changes maqet itself makes to a stored config's `storage` list (`Storage.Resize`,
//! `Storage.Attach`, `Storage.Detach`). Each returns the new YAML; the caller validates
//! it again like any config (dangerous places, names) before storing it.

use std::path::Path;
use std::sync::Arc;

use super::VmConfig;
use super::validate::TOP_LEVEL_KEYS;
use super::yaml::{Entry, Loc, Node, Origin, Value};

/// A disk entry maqet adds to a config.
#[derive(Debug, Clone)]
pub struct NewDiskEntry<'a> {
    pub name: &'a str,
    /// `qcow2` or `raw`.
    pub format: &'a str,
    pub file: &'a Path,
    /// Bytes; only for a disk maqet creates.
    pub size: Option<u64>,
    /// `virtio` or `scsi`.
    pub interface: &'a str,
    pub readonly: bool,
}

fn loc() -> Loc {
    Loc::start(&Arc::new(Origin {
        label: "<storage change>".to_owned(),
        base_dir: std::path::PathBuf::from("/"),
    }))
}

fn entry(key: &str, value: Value) -> Entry {
    Entry {
        key: key.to_owned(),
        key_loc: loc(),
        value: Node::new(value, loc()),
    }
}

fn entry_name(node: &Node) -> Option<&str> {
    let Value::Map(entries) = &node.value else {
        return None;
    };
    entries
        .iter()
        .find(|e| e.key == "name")
        .and_then(|e| match &e.value.value {
            Value::Str(s) => Some(s.as_str()),
            _ => None,
        })
}

impl VmConfig {
    fn storage_items(&mut self) -> Option<&mut Vec<Node>> {
        match &mut self
            .doc
            .iter_mut()
            .find(|e| e.key == "storage")?
            .value
            .value
        {
            Value::Seq(items) => Some(items),
            _ => None,
        }
    }

    /// The YAML with storage entry `name`'s `size` set to `bytes`; `None` when there is
    /// no such entry.
    pub fn yaml_with_disk_size(&self, name: &str, bytes: u64) -> Option<String> {
        let mut copy = self.clone();
        let item = copy
            .storage_items()?
            .iter_mut()
            .find(|n| entry_name(n) == Some(name))?;
        let Value::Map(entries) = &mut item.value else {
            return None;
        };
        let size = Value::Int(bytes.to_string());
        match entries.iter_mut().find(|e| e.key == "size") {
            Some(e) => e.value = Node::new(size, loc()),
            None => entries.push(entry("size", size)),
        }
        Some(copy.to_yaml())
    }

    /// The YAML with one more disk at the end of `storage`.
    pub fn yaml_with_disk(&self, disk: &NewDiskEntry<'_>) -> String {
        let mut fields = vec![
            entry("name", Value::Str(disk.name.to_owned())),
            entry("type", Value::Str(disk.format.to_owned())),
            entry("file", Value::Str(disk.file.to_string_lossy().into_owned())),
        ];
        if let Some(size) = disk.size {
            fields.push(entry("size", Value::Int(size.to_string())));
        }
        fields.push(entry("interface", Value::Str(disk.interface.to_owned())));
        if disk.readonly {
            fields.push(entry(
                "options",
                Value::Map(vec![entry("readonly", Value::Bool(true))]),
            ));
        }
        let item = Node::new(Value::Map(fields), loc());
        let mut copy = self.clone();
        match copy.storage_items() {
            Some(items) => items.push(item),
            None => {
                // Keep the normalized key order (`TOP_LEVEL_KEYS`).
                let rank = |k: &str| TOP_LEVEL_KEYS.iter().position(|t| *t == k);
                let mine = rank("storage");
                copy.doc.retain(|e| e.key != "storage");
                let at = copy
                    .doc
                    .iter()
                    .position(|e| rank(&e.key) > mine)
                    .unwrap_or(copy.doc.len());
                copy.doc
                    .insert(at, entry("storage", Value::Seq(vec![item])));
            }
        }
        copy.to_yaml()
    }

    /// The YAML without storage entry `name`; `None` when there is no such entry.
    pub fn yaml_without_storage(&self, name: &str) -> Option<String> {
        let mut copy = self.clone();
        let items = copy.storage_items()?;
        let at = items.iter().position(|n| entry_name(n) == Some(name))?;
        items.remove(at);
        Some(copy.to_yaml())
    }
}
