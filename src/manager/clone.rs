//! Cloning a stopped VM: a new VM (new UUID, new name) whose disks are the source's,
//! either as qcow2 overlays on them (linked: instant, the source's disks become the
//! clone's read-only base) or as full copies (`qemu-img convert`, standalone).
//!
//! What is per VM comes fresh: the UEFI variable store and the TPM state live in the
//! new VM's data directory and are made on its first start. Read-only disks (ISOs,
//! firmware) are shared; writable files outside `storage` (a `-drive` in `arguments`)
//! cannot be cloned safely, so such a VM is refused. The new disks are made in the new
//! VM's directory before its row exists and deleted again when anything fails: no half
//! clone is left in the database or on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_yaml::Value;

use super::ManagerError;
use super::{INLINE_ORIGIN, Manager};
use crate::config::Access;
use crate::config::{self, ConfigSource, StorageKind};
use crate::storage::QemuImg;
use crate::vm::{Status, Vm, store_error};

/// How a clone gets its disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMode {
    /// qcow2 overlays backed by the source's disks.
    Linked,
    /// Independent copies.
    Full,
}

impl Manager {
    /// Defines `new_name` as a clone of the stopped VM `source`; returns it.
    pub async fn clone_vm(
        &self,
        source: &Arc<Vm>,
        new_name: &str,
        mode: CloneMode,
    ) -> Result<Arc<Vm>, ManagerError> {
        // Held throughout: the source cannot start while its disks are read.
        let _op = source.lock_ops().await;
        source.ensure_idle()?;
        let src = source.name();
        let status = source.status();
        if !matches!(
            status,
            Status::Created | Status::Stopped | Status::Crashed | Status::Failed
        ) {
            return Err(ManagerError::InvalidState(format!(
                "VM '{src}' is {status}: a clone needs disks nobody is writing; stop it first (maqet stop {src})"
            )));
        }
        config::validate_vm_name(new_name).map_err(|why| {
            ManagerError::InvalidArgument(format!("invalid VM name '{new_name}': {why}"))
        })?;
        if self.registry().by_name.contains_key(new_name) {
            return Err(ManagerError::AlreadyExists(format!(
                "a VM named '{new_name}' already exists; choose another name for the clone"
            )));
        }
        let config = source.stored_config()?;
        let in_storage: Vec<&Path> = config.storage().iter().map(|e| e.path.as_path()).collect();
        if let Some(f) = config
            .host_files()
            .iter()
            .find(|f| f.access == Access::ReadWrite && !in_storage.contains(&f.path.as_path()))
        {
            return Err(ManagerError::InvalidConfig(format!(
                "VM '{src}' writes {} outside `storage` (in `arguments`), which a clone would share; declare that disk in `storage` so maqet can clone it",
                f.path.display()
            )));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.ctx.paths.vm_data_dir(&id);
        let mut made: Vec<(PathBuf, &'static str)> = Vec::new();
        let outcome = self
            .clone_into(source, &config, &id, &dir, new_name, mode, &mut made)
            .await;
        match outcome {
            Ok(vm) => Ok(vm),
            Err(e) => {
                for (path, _) in &made {
                    let _ = std::fs::remove_file(path);
                }
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn clone_into(
        &self,
        source: &Arc<Vm>,
        config: &config::VmConfig,
        id: &str,
        dir: &Path,
        new_name: &str,
        mode: CloneMode,
        made: &mut Vec<(PathBuf, &'static str)>,
    ) -> Result<Arc<Vm>, ManagerError> {
        let yaml = source.with_info(|i| i.config.clone());
        let mut doc: Value = serde_yaml::from_str(&yaml).map_err(|e| {
            ManagerError::Internal(format!(
                "the stored config of '{}' does not parse: {e}",
                source.name()
            ))
        })?;
        let mut qemu_img = None;
        for e in config
            .storage()
            .iter()
            .filter(|e| e.kind.is_disk() && !e.readonly)
        {
            let target = dir.join(format!("{}.{}", e.name, e.kind.as_str()));
            let entry = storage_entry(&mut doc, &e.name)?;
            set(entry, "file", target.to_string_lossy().into_owned());
            if std::fs::symlink_metadata(&e.path).is_err() {
                // Never made yet: the clone makes its own on first start, the same way.
                continue;
            }
            let img = match &qemu_img {
                Some(img) => img,
                None => qemu_img.insert(QemuImg::find(self.ctx.path_env.as_deref())?),
            };
            crate::paths::create_private_dir(dir)
                .map_err(|err| ManagerError::Storage(format!("{}: {err}", dir.display())))?;
            match mode {
                CloneMode::Linked => {
                    let spec = crate::storage::create::NewImage {
                        path: &target,
                        kind: StorageKind::Qcow2,
                        size: None,
                        backing: Some((&e.path, e.kind.as_str())),
                    };
                    made.push((target.clone(), "qcow2"));
                    crate::storage::create::create_image(img, &spec, &self.ctx.paths.home).await?;
                    set(entry, "type", "qcow2".into());
                    set(entry, "backing_file", e.path.to_string_lossy().into_owned());
                    set(entry, "backing_format", e.kind.as_str().into());
                    remove(entry, "from");
                    remove(entry, "size");
                }
                CloneMode::Full => {
                    made.push((target.clone(), e.kind.as_str()));
                    img.copy_disk(&e.path, e.kind.as_str(), &target).await?;
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                        .map_err(|err| {
                            ManagerError::Storage(format!("{}: {err}", target.display()))
                        })?;
                    // A standalone copy: the chain was flattened into it.
                    for key in ["from", "backing_file", "backing_format"] {
                        remove(entry, key);
                    }
                }
            }
        }
        if let Value::Mapping(m) = &mut doc {
            m.insert("name".into(), new_name.into());
        }
        let text = serde_yaml::to_string(&doc)
            .map_err(|e| ManagerError::Internal(format!("cannot write the clone's config: {e}")))?;
        let source_text = ConfigSource {
            origin: format!("{INLINE_ORIGIN} (clone of '{}')", source.name()),
            text,
            base_dir: dir.to_path_buf(),
        };
        let vm = self
            .add_with_id(id.to_owned(), new_name, vec![source_text])
            .await?;
        // The new disks are the clone's: `rm --delete-storage` removes them.
        let (owner, files) = (id.to_owned(), made.clone());
        let recorded = self
            .ctx
            .store
            .write(move |db| {
                for (path, format) in &files {
                    db.record_created_file(&owner, path, format)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = recorded {
            // Undo the definition: no clone whose files maqet would not own.
            let _ = self.remove(&vm, true, false).await;
            return Err(store_error(e).into());
        }
        tracing::info!(source = %source.name(), clone = %new_name, mode = ?mode, disks = made.len(), "VM cloned");
        Ok(vm)
    }
}

/// The `storage` entry named `name` in a stored config.
pub(super) fn storage_entry<'a>(
    doc: &'a mut Value,
    name: &str,
) -> Result<&'a mut serde_yaml::Mapping, ManagerError> {
    doc.get_mut("storage")
        .and_then(|s| s.as_sequence_mut())
        .and_then(|items| {
            items
                .iter_mut()
                .filter_map(|i| i.as_mapping_mut())
                .find(|m| m.get("name").and_then(|n| n.as_str()) == Some(name))
        })
        .ok_or_else(|| {
            ManagerError::Internal(format!("the stored config has no storage entry '{name}'"))
        })
}

fn set(entry: &mut serde_yaml::Mapping, key: &str, value: String) {
    entry.insert(key.into(), value.into());
}

fn remove(entry: &mut serde_yaml::Mapping, key: &str) {
    entry.remove(key);
}
