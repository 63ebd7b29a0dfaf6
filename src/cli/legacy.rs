//! `maqet import-legacy [PATH]`: defines the VMs of maqet 0.0.x's `instances.db` here.
//!
//! The old database is opened read-only (and `query_only`), so importing never changes
//! it: a user can go back to the old tool. Its schema (maqet 0.0.15, `state_manager.py`):
//! `vm_instances(id, name, config_path, config_data, status, pid, runner_pid,
//! socket_path, created_at, updated_at[, qmp_socket_path])`, where `config_data` is the
//! merged config as JSON with paths already absolute and the name removed.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde_json::{Value, json};

use super::ExitCode;
use super::output::print_json;
use super::session::Session;
use crate::error::MaqetError;

/// One VM of the old database.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LegacyVm {
    pub id: String,
    pub name: String,
    pub config: Value,
}

/// The old tool's database: `$XDG_DATA_HOME/maqet/instances.db`.
fn default_path() -> Result<PathBuf, MaqetError> {
    let install = crate::paths::UserInstall::from_env().map_err(|e| {
        MaqetError::InvalidArgument(format!("cannot find your data directory: {e}"))
    })?;
    Ok(install.data_home.join("maqet/instances.db"))
}

/// `file:` URI of `path` with `immutable=1`, for a database whose WAL index cannot be
/// created next to it (a read-only directory).
fn immutable_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'%' | b'?' | b'#' => uri.push_str(&format!("%{b:02X}")),
            _ => uri.push(char::from(*b)),
        }
    }
    uri + "?immutable=1"
}

/// Reads every VM of the old database at `path`, never writing to it.
pub(crate) fn read_db(path: &Path) -> Result<Vec<LegacyVm>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    let ro = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, ro)
        .and_then(|c| read_vms(&c).map(|vms| (c, vms)))
        .or_else(|_| {
            let c =
                Connection::open_with_flags(immutable_uri(path), ro | OpenFlags::SQLITE_OPEN_URI)?;
            read_vms(&c).map(|vms| (c, vms))
        });
    let (_conn, rows) = conn.map_err(|e| {
        format!(
            "{} is not a maqet 0.0.x database ({e}); name the old tool's instances.db",
            path.display()
        )
    })?;
    rows.into_iter()
        .map(|(id, name, data)| {
            let config = serde_json::from_str(&data)
                .map_err(|e| format!("VM {name}: its stored config is not JSON ({e})"))?;
            Ok(LegacyVm { id, name, config })
        })
        .collect()
}

fn read_vms(conn: &Connection) -> rusqlite::Result<Vec<(String, String, String)>> {
    conn.pragma_update(None, "query_only", true)?;
    let mut stmt =
        conn.prepare("SELECT id, name, config_data FROM vm_instances ORDER BY created_at, rowid")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

/// The old VM's config as YAML for `AddVM`, and notes for the user. A disk without
/// `file` lived at `/tmp/maqet-<old id>-<name>.<type>` under 0.0.x: when that file is
/// still there, the imported entry names it, so the data comes along.
pub(crate) fn to_yaml(vm: &LegacyVm) -> (String, Vec<String>) {
    let mut config = vm.config.clone();
    let mut notes = Vec::new();
    if let Some(Value::Array(storage)) = config.get_mut("storage") {
        for entry in storage.iter_mut().filter_map(Value::as_object_mut) {
            let kind = entry
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("qcow2")
                .to_ascii_lowercase();
            if entry.contains_key("file") || kind == "virtfs" {
                continue;
            }
            let Some(name) = entry.get("name").and_then(Value::as_str) else {
                continue;
            };
            let old = format!("/tmp/maqet-{}-{name}.{kind}", vm.id);
            if Path::new(&old).is_file() {
                notes.push(format!(
                    "disk {name} uses 0.0.x's {old}; move it somewhere that survives a reboot and `maqet apply` the new `file`"
                ));
                entry.insert("file".into(), Value::String(old));
            }
        }
    }
    if config.as_object().is_some_and(|m| m.is_empty()) {
        return ("{}\n".to_owned(), notes);
    }
    let yaml = serde_yaml::to_string(&config).unwrap_or_else(|_| config.to_string());
    (yaml, notes)
}

pub(super) async fn import(s: &Session, path: Option<PathBuf>) -> Result<ExitCode, MaqetError> {
    let path = match path {
        Some(p) => p,
        None => default_path()?,
    };
    let vms = read_db(&path).map_err(MaqetError::InvalidArgument)?;
    let (mut imported, mut skipped) = (Vec::new(), Vec::new());
    for vm in &vms {
        let (yaml, notes) = to_yaml(vm);
        match s.manager.add_vm(&vm.name, &yaml).await {
            Ok(_) => imported.push((vm.name.clone(), notes)),
            Err(e) => skipped.push((vm.name.clone(), e.message())),
        }
    }
    if s.json {
        let imported: Vec<_> = imported
            .iter()
            .map(|(name, notes)| json!({ "vm": name, "notes": notes }))
            .collect();
        let skipped: Vec<_> = skipped
            .iter()
            .map(|(name, why)| json!({ "vm": name, "reason": why }))
            .collect();
        print_json(&json!({ "database": path, "imported": imported, "skipped": skipped }));
    } else {
        if vms.is_empty() {
            println!("{} holds no VMs", path.display());
        }
        for (name, notes) in &imported {
            println!("imported {name}");
            for note in notes {
                println!("  note: {note}");
            }
        }
        for (name, why) in &skipped {
            println!("skipped {name}: {why}");
        }
    }
    Ok(if skipped.is_empty() {
        ExitCode::Ok
    } else {
        ExitCode::InvalidInput
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// maqet 0.0.15's schema after its last migration (v6), as the old tool leaves it.
    pub(crate) const SCHEMA: &str = "
        CREATE TABLE vm_instances (
            id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, config_path TEXT,
            config_data TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'created', pid INTEGER,
            runner_pid INTEGER, socket_path TEXT,
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
            updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, qmp_socket_path TEXT);
        CREATE TABLE schema_version (version INTEGER PRIMARY KEY,
            applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, description TEXT);
        INSERT INTO schema_version (version, description) VALUES (6, 'storage registry');
        PRAGMA journal_mode = WAL;";

    #[test]
    fn reads_the_old_database_without_changing_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("instances.db");
        {
            let c = Connection::open(&db).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            c.execute(
                "INSERT INTO vm_instances (id, name, config_path, config_data) VALUES (?1, ?2, ?3, ?4)",
                ["a1", "web", "/cfg/web.yaml", r#"{"binary": "qemu-system-x86_64", "memory": "1GB", "storage": [{"name": "hdd", "size": "20G", "type": "qcow2", "interface": "virtio"}]}"#],
            )
            .unwrap();
            c.execute(
                "INSERT INTO vm_instances (id, name, config_data) VALUES ('b2', 'empty', '{}')",
                [],
            )
            .unwrap();
        }
        let before = std::fs::read(&db).unwrap();
        let vms = read_db(&db).unwrap();
        assert_eq!(std::fs::read(&db).unwrap(), before);
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].name, "web");
        let (yaml, notes) = to_yaml(&vms[0]);
        assert!(
            yaml.contains("memory: 1GB") && yaml.contains("name: hdd"),
            "{yaml}"
        );
        assert!(notes.is_empty());
        assert_eq!(to_yaml(&vms[1]).0, "{}\n");

        // Not a database, not the old schema, not a file: clear errors.
        std::fs::write(dir.path().join("junk"), "not sqlite").unwrap();
        let err = read_db(&dir.path().join("junk")).unwrap_err();
        assert!(err.contains("is not a maqet 0.0.x database"), "{err}");
        let err = read_db(dir.path()).unwrap_err();
        assert!(err.contains("is not a file"), "{err}");
        let err = read_db(&dir.path().join("missing.db")).unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn a_disk_left_in_tmp_by_the_old_tool_comes_along() {
        let id = format!("maqet-test-{}", std::process::id());
        let old = format!("/tmp/maqet-{id}-data.raw");
        std::fs::write(&old, "x").unwrap();
        let vm = LegacyVm {
            id: id.clone(),
            name: "v".into(),
            config: json!({"storage": [{"name": "data", "type": "RAW"}, {"name": "gone"}]}),
        };
        let (yaml, notes) = to_yaml(&vm);
        std::fs::remove_file(&old).unwrap();
        assert!(yaml.contains(&format!("file: {old}")), "{yaml}");
        assert_eq!(notes.len(), 1, "{notes:?}");
        // `gone` had no file left: it becomes a new disk in the VM's directory.
        assert_eq!(yaml.matches("file:").count(), 1, "{yaml}");
    }

    #[test]
    fn uri_escapes_what_sqlite_reads_as_query() {
        assert_eq!(
            immutable_uri(Path::new("/a b/x?y#z%.db")),
            "file:/a b/x%3Fy%23z%25.db?immutable=1"
        );
    }
}
