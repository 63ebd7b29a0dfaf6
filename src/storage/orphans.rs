//! Disk images maqet created whose VM is gone (`maqet storage orphaned`, 0.0.x's
//! spelling): a VM removed without `--delete-storage` leaves them behind on purpose.
//!
//! Two sources, because the `storage_files` rows go with their VM: the data
//! directories of VMs that no longer exist (`$XDG_DATA_HOME/maqet/vms/<id>/`, where disks
//! declared without `file` and UEFI variable stores live), and the history's
//! "created disk image" events of removed VMs (disks created at a path the config
//! named). A file some defined VM still names is never reported.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// One left-over image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub path: PathBuf,
    /// The removed VM's last name ("" when the history no longer knows it).
    pub former_vm: String,
    pub size: u64,
}

/// A disk creation remembered in the history: (VM id, VM name, path).
pub type Created = (String, String, PathBuf);

/// The orphans under `vms_dir` and among `created`, sorted by path. `known`: ids of
/// defined VMs; `in_use`: every path a defined VM's config names.
pub fn find(
    vms_dir: &Path,
    known: &HashSet<String>,
    in_use: &HashSet<PathBuf>,
    created: &[Created],
) -> Vec<Orphan> {
    let names: HashMap<&str, &str> = created
        .iter()
        .map(|(id, name, _)| (id.as_str(), name.as_str()))
        .collect();
    let mut found: HashMap<PathBuf, Orphan> = HashMap::new();
    let mut consider = |path: PathBuf, id: &str| {
        if in_use.contains(&path) || found.contains_key(&path) {
            return;
        }
        // Regular files only, never through a symlink.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            return;
        };
        if !meta.is_file() {
            return;
        }
        let former_vm = names.get(id).copied().unwrap_or_default().to_owned();
        found.insert(
            path.clone(),
            Orphan {
                path,
                former_vm,
                size: meta.len(),
            },
        );
    };
    if let Ok(dirs) = std::fs::read_dir(vms_dir) {
        for dir in dirs.flatten() {
            let id = dir.file_name().to_string_lossy().into_owned();
            if known.contains(&id) || !dir.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for file in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                consider(file.path(), &id);
            }
        }
    }
    for (id, _, path) in created.iter().filter(|(id, ..)| !known.contains(id)) {
        consider(path.clone(), id);
    }
    let mut list: Vec<Orphan> = found.into_values().collect();
    list.sort_by(|a, b| a.path.cmp(&b.path));
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_overs_of_removed_vms_only() {
        let tmp = tempfile::tempdir().unwrap();
        let vms = tmp.path().join("vms");
        for (dir, file) in [
            ("live", "root.qcow2"),
            ("gone", "hdd.qcow2"),
            ("gone", "used.img"),
        ] {
            std::fs::create_dir_all(vms.join(dir)).unwrap();
            std::fs::write(vms.join(dir).join(file), "12345").unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", vms.join("gone/link")).unwrap();
        let named = tmp.path().join("named.qcow2");
        std::fs::write(&named, "1").unwrap();
        let known: HashSet<String> = ["live".to_owned()].into();
        let in_use: HashSet<PathBuf> = [vms.join("gone/used.img")].into();
        let created = vec![
            ("gone".to_owned(), "web".to_owned(), named.clone()),
            (
                "gone".to_owned(),
                "web".to_owned(),
                tmp.path().join("deleted.qcow2"),
            ),
            (
                "live".to_owned(),
                "db".to_owned(),
                vms.join("live/root.qcow2"),
            ),
        ];
        let found = find(&vms, &known, &in_use, &created);
        let paths: Vec<_> = found.iter().map(|o| o.path.clone()).collect();
        assert_eq!(paths, [named, vms.join("gone/hdd.qcow2")]);
        assert_eq!(found[1].former_vm, "web");
        assert_eq!(found[1].size, 5);
        assert!(find(&tmp.path().join("none"), &known, &in_use, &[]).is_empty());
    }
}
