//! The registry of defined VMs: add, find, list, apply, remove.
//!
//! The core command API the D-Bus layer adapts (cloud-hypervisor style): everything
//! here is callable without a bus. Names are unique; the registry lock makes "check the
//! name, write the row, publish the VM" one atomic step, and the database's UNIQUE
//! constraint backs it up.

pub mod error;

pub use error::ManagerError;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::config::{self, ConfigSource};
use crate::events::CoreEvent;
use crate::jobs::JobRegistry;
use crate::store::VmRecord;
use crate::time::now_us;
use crate::vm::{Ctx, Operation, Status, Vm, VmError, store_error};

mod clone;
mod export;
pub use clone::{CloneMode, Cloned, OPERATION as CLONE_OPERATION, remove_partial_clones};
pub use export::EXPORT_CONFIG;
pub use export::OPERATION as EXPORT_OPERATION;

#[derive(Default)]
struct Registry {
    by_id: HashMap<String, Arc<Vm>>,
    /// name → VM, kept in name order: listing (ListVMs, start-up) sorts nothing and
    /// looks nothing up.
    by_name: BTreeMap<String, Arc<Vm>>,
}

pub struct Manager {
    ctx: Arc<Ctx>,
    registry: RwLock<Registry>,
    /// [`Manager::list_shared`]'s answer until the registry next changes: `ListVMs` and
    /// `GetManagedObjects` then copy no list of 10,000 `Arc`s per call.
    listed: parking_lot::Mutex<Option<Arc<[Arc<Vm>]>>>,
    jobs: JobRegistry,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

/// Origin label of configs passed inline over D-Bus (shown in error locations).
pub const INLINE_ORIGIN: &str = "<yaml>";

impl Manager {
    /// Loads every VM definition from the database.
    pub async fn open(ctx: Arc<Ctx>) -> Result<Arc<Manager>, ManagerError> {
        let records = ctx
            .store
            .read(|db| db.load_vms())
            .await
            .map_err(store_error)?;
        let mut reg = Registry::default();
        for rec in records {
            let vm = Vm::from_record(ctx.clone(), rec)?;
            reg.by_name.insert(vm.name(), vm.clone());
            reg.by_id.insert(vm.id().to_string(), vm);
        }
        Ok(Arc::new(Manager {
            ctx,
            registry: RwLock::new(reg),
            listed: Default::default(),
            jobs: JobRegistry::default(),
        }))
    }

    /// The registry, for a few memory-only steps (never held across an await). A
    /// panic while it was held cannot leave it half-changed (every change is two map
    /// inserts or removes), so a poisoned lock is taken as is.
    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Every change takes this, forgets the shared list and moves the listing epoch: a
    /// list made under the read lock is stored before any writer gets in, so it is never
    /// stale.
    fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        let reg = self.registry.write().unwrap_or_else(|p| p.into_inner());
        *self.listed.lock() = None;
        self.ctx.listing_epoch.bump();
        reg
    }

    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// Where snapshot (and future) jobs get their ids.
    pub fn jobs(&self) -> &JobRegistry {
        &self.jobs
    }

    /// Re-attaches to every QEMU the database says is alive (after a maqetd restart).
    pub async fn readopt_all(&self) {
        let alive: Vec<Arc<Vm>> = self
            .list()
            .into_iter()
            .filter(|vm| vm.status().has_process())
            .collect();
        let tasks: Vec<_> = alive
            .into_iter()
            .map(|vm| tokio::spawn(async move { vm.readopt().await }))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        self.report_undefined_qemus();
    }

    /// QEMUs that run a VM this database does not define (found by their runtime
    /// directory and `-uuid`; e.g. after the database was deleted): reported, never
    /// touched. `maqet doctor` lists them too and keeps their sockets.
    fn report_undefined_qemus(&self) {
        let Ok(entries) = std::fs::read_dir(self.ctx.paths.runtime_dir.join("vms")) else {
            return;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if self.get(&id).is_some() {
                continue;
            }
            if let Some((pid, _)) = crate::vm::process::find_by_uuid(&id) {
                tracing::warn!(id, pid, dir = %e.path().display(),
                    "found a QEMU of a VM that is not defined (found, not defined): left running, sockets kept");
            }
        }
    }

    /// By name, else by UUID (with `-` or `_`).
    pub fn find(&self, name_or_id: &str) -> Result<Arc<Vm>, ManagerError> {
        let reg = self.registry();
        let found = reg
            .by_name
            .get(name_or_id)
            .or_else(|| reg.by_id.get(&name_or_id.replace('_', "-")));
        found.cloned().ok_or_else(|| {
            ManagerError::NotFound(format!(
                "no VM is named '{name_or_id}' or has that id; `maqet ls` lists the VMs"
            ))
        })
    }

    pub fn get(&self, id: &str) -> Option<Arc<Vm>> {
        self.registry().by_id.get(id).cloned()
    }

    /// Every VM, sorted by name.
    pub fn list(&self) -> Vec<Arc<Vm>> {
        let reg = self.registry();
        reg.by_name.values().cloned().collect()
    }

    /// Every VM, sorted by name, shared until the registry next changes.
    pub fn list_shared(&self) -> Arc<[Arc<Vm>]> {
        let reg = self.registry();
        let mut listed = self.listed.lock();
        listed
            .get_or_insert_with(|| reg.by_name.values().cloned().collect())
            .clone()
    }

    /// How many VMs have a QEMU process (or one being made).
    pub fn active_count(&self) -> usize {
        let reg = self.registry();
        reg.by_id
            .values()
            .filter(|vm| vm.status().has_process())
            .count()
    }

    /// Reads config files for `AddVMFromFiles`: absolute paths only (the service cannot
    /// know the caller's working directory), each resolving relative paths against its
    /// own directory. Capped and regular files only ([`config::source`]); read on a
    /// blocking thread, so a slow file never holds up an async worker.
    pub async fn sources_from_files(paths: Vec<String>) -> Result<Vec<ConfigSource>, ManagerError> {
        if paths.is_empty() {
            return Err(ManagerError::InvalidArgument(
                "no config files given; pass at least one YAML file".into(),
            ));
        }
        if let Some(p) = paths.iter().find(|p| !Path::new(p).is_absolute()) {
            return Err(ManagerError::InvalidArgument(format!(
                "config path '{p}' is relative; pass absolute paths (the maqet CLI does this for you)"
            )));
        }
        read_blocking(move || {
            paths
                .iter()
                .map(|p| config::source::read_path(Path::new(p)))
                .collect()
        })
        .await
    }

    /// Reads config files a client passed as descriptors (`AddVMFromFds`), with the
    /// same limits as [`Manager::sources_from_files`].
    pub async fn sources_from_fds(fds: Vec<OwnedFd>) -> Result<Vec<ConfigSource>, ManagerError> {
        if fds.is_empty() {
            return Err(ManagerError::InvalidArgument(
                "no config files given; pass at least one open YAML file".into(),
            ));
        }
        read_blocking(move || {
            fds.into_iter()
                .enumerate()
                .map(|(i, fd)| config::source::read_fd(fd, i + 1))
                .collect()
        })
        .await
    }

    /// Defines a VM. `name` empty: the config's `name`, else a generated one.
    /// `sources` with an empty `base_dir` resolve against the VM's own data directory.
    pub async fn add(
        &self,
        name: &str,
        sources: Vec<ConfigSource>,
    ) -> Result<Arc<Vm>, ManagerError> {
        self.add_with_id(uuid::Uuid::new_v4().to_string(), name, sources)
            .await
    }

    /// [`Manager::add`] with the new VM's id chosen by the caller (a clone prepares
    /// its disks in the VM's data directory first).
    pub(crate) async fn add_with_id(
        &self,
        id: String,
        name: &str,
        mut sources: Vec<ConfigSource>,
    ) -> Result<Arc<Vm>, ManagerError> {
        for s in &mut sources {
            if s.base_dir.as_os_str().is_empty() {
                s.base_dir = self.ctx.paths.vm_data_dir(&id);
            }
        }
        let mut cfg = self.ctx.load_config(&sources, &id)?;
        let name = if !name.is_empty() {
            config::validate_vm_name(name).map_err(|why| {
                ManagerError::InvalidArgument(format!("invalid VM name '{name}': {why}"))
            })?;
            name.to_string()
        } else if let Some(n) = cfg.name() {
            n.to_string()
        } else {
            format!("vm-{}", &id[..8])
        };
        cfg.set_name(&name);
        let now = now_us();
        let rec = VmRecord {
            id: id.clone(),
            name: name.clone(),
            config: cfg.to_yaml(),
            status: Status::Created.as_str().into(),
            status_reason: "defined".into(),
            pid: None,
            pid_start_time: None,
            created_at: now,
            started_at: 0,
            stopped_at: 0,
            exit_status: -1,
        };
        let taken = || {
            ManagerError::AlreadyExists(format!(
                "a VM named '{name}' already exists; choose another name or remove it first (maqet rm {name})"
            ))
        };
        if self.registry().by_name.contains_key(&name) {
            return Err(taken());
        }
        // No lock across the commit: a racing add of the same name is refused by the
        // database's UNIQUE constraint.
        let row = rec.clone();
        self.ctx
            .store
            .write(move |db| db.insert_vm(&row))
            .await
            .map_err(store_error)?;
        let vm = Vm::from_record(self.ctx.clone(), rec)?;
        {
            let mut reg = self.registry_mut();
            reg.by_name.insert(name, vm.clone());
            reg.by_id.insert(id, vm.clone());
        }
        tracing::info!(vm = %vm.name(), id = %vm.id(), "VM added");
        self.ctx.sink.emit(CoreEvent::VmAdded {
            vm: vm.clone(),
            info: vm.info(),
        });
        Ok(vm)
    }

    /// Replaces a VM's config with one inline YAML document; renames when its `name`
    /// differs. Returns the changed keys that need a restart.
    pub async fn apply(&self, vm: &Arc<Vm>, yaml: &str) -> Result<Vec<String>, ManagerError> {
        let source = ConfigSource {
            origin: INLINE_ORIGIN.into(),
            text: yaml.to_string(),
            base_dir: self.ctx.paths.vm_data_dir(vm.id()),
        };
        let cfg = self
            .ctx
            .load_config(std::slice::from_ref(&source), vm.id())?;
        vm.apply(
            cfg,
            |old, new| {
                if old != new && self.registry().by_name.contains_key(new) {
                    return Err(VmError::AlreadyExists(format!(
                        "cannot rename '{old}' to '{new}': that name is taken"
                    )));
                }
                Ok(())
            },
            |old, new| {
                let mut reg = self.registry_mut();
                reg.by_name.remove(old);
                reg.by_name.insert(new.to_string(), vm.clone());
            },
        )
        .await
        .map_err(ManagerError::from)
    }

    /// Removes a VM's definition. Refused while it runs unless `force` (which kills it).
    /// `delete_storage` deletes only the disk images maqet created for it; returns them.
    pub async fn remove(
        &self,
        vm: &Arc<Vm>,
        force: bool,
        delete_storage: bool,
    ) -> Result<Vec<PathBuf>, ManagerError> {
        let _op = vm.lock_ops().await;
        // Even with force: a snapshot job may be writing the files being removed.
        vm.ensure_idle()?;
        let status = vm.status();
        if !Operation::Remove.is_allowed(status) {
            if !force {
                return Err(ManagerError::InvalidState(
                    Operation::Remove.refusal(&vm.name(), status),
                ));
            }
            vm.kill_for_removal().await;
        }
        let mut deleted = Vec::new();
        if delete_storage {
            let id = vm.id().to_string();
            let files = self
                .ctx
                .store
                .read(move |db| db.created_files(&id))
                .await
                .map_err(store_error)?;
            for file in files {
                let path = file.path;
                match std::fs::remove_file(&path) {
                    Ok(()) => deleted.push(path),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        let done = if deleted.is_empty() {
                            String::new()
                        } else {
                            format!(" (already deleted: {})", list_paths(&deleted))
                        };
                        return Err(ManagerError::Storage(format!(
                            "cannot delete {}: {e}; the VM was not removed{done}",
                            path.display()
                        )));
                    }
                }
            }
            self.ctx.paths.remove_vm_data_dir_if_empty(vm.id());
        }
        let name = vm.name();
        if !deleted.is_empty() {
            // History outlives the VM: this is where "what did it delete" stays answerable.
            let reason = format!(
                "deleted disk images maqet created: {}",
                list_paths(&deleted)
            );
            let detail = serde_json::json!({ "deleted": deleted });
            let kept = self
                .ctx
                .store
                .record_event(vm.id(), &name, "storage", reason, Some(detail));
            if let Err(e) = kept.await {
                tracing::warn!(vm = %name, error = %e, "deleted disks not in history yet (kept for later)");
            }
        }
        // Kept, not required: removing a VM must work on a full disk (it is how space is
        // freed). If the row cannot be deleted now, the VM is gone from memory and the
        // bus, and the deletion is written when the database takes writes again (a
        // maqetd killed before that finds the VM defined, stopped, at its next start).
        let id = vm.id().to_string();
        if let Err(e) = self
            .ctx
            .store
            .write_kept("VM removal", move |db| match db.remove_vm(&id) {
                Err(crate::store::StoreError::NotFound(_)) => Ok(()),
                other => other,
            })
            .await
        {
            tracing::warn!(vm = %name, error = %e, "VM removed; its row is deleted once the database takes writes");
        }
        {
            let mut reg = self.registry_mut();
            reg.by_name.remove(&name);
            reg.by_id.remove(vm.id());
        }
        self.ctx.sink.emit(CoreEvent::VmRemoved {
            vm: vm.clone(),
            name: name.clone(),
        });
        let _ = std::fs::remove_file(vm.log_file());
        if delete_storage {
            // The TPM's state (vm::tpm) is the VM's like the disks maqet created.
            let _ = std::fs::remove_dir_all(self.ctx.paths.vm_data_dir(vm.id()).join("tpm"));
        }
        let _ = std::fs::remove_dir(self.ctx.paths.vm_data_dir(vm.id()));
        tracing::info!(vm = %name, id = %vm.id(), deleted = deleted.len(), "VM removed");
        Ok(deleted)
    }
}

impl Manager {
    /// Disk images maqet created for VMs that are gone (removed without
    /// `--delete-storage`), see [`crate::storage::orphans`].
    pub async fn orphaned_storage(
        &self,
    ) -> Result<Vec<crate::storage::orphans::Orphan>, ManagerError> {
        let vms = self.list();
        let known: std::collections::HashSet<String> =
            vms.iter().map(|vm| vm.id().to_string()).collect();
        let in_use = vms
            .iter()
            .filter_map(|vm| vm.stored_config().ok())
            .flat_map(|c| {
                let mut paths: Vec<PathBuf> = c.storage().iter().map(|e| e.path.clone()).collect();
                paths.extend(c.host_files().iter().map(|f| f.path.clone()));
                paths
            })
            .collect();
        let events = self.ctx.store.read(|db| db.events(None, None, 0)).await?;
        let created: Vec<_> = events
            .into_iter()
            .filter(|e| e.kind == "storage")
            .filter_map(|e| {
                let path = e.detail.as_ref()?.get("path")?.as_str()?.to_owned();
                Some((e.vm_id, e.vm_name, PathBuf::from(path)))
            })
            .collect();
        let vms_dir = self.ctx.paths.data_dir.join("vms");
        tokio::task::spawn_blocking(move || {
            crate::storage::orphans::find(&vms_dir, &known, &in_use, &created)
        })
        .await
        .map_err(|e| ManagerError::Internal(format!("looking for orphaned disks failed: {e}")))
    }
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs a config reader on a blocking thread and maps its error.
async fn read_blocking(
    read: impl FnOnce() -> Result<Vec<ConfigSource>, config::source::ReadError> + Send + 'static,
) -> Result<Vec<ConfigSource>, ManagerError> {
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(sources)) => Ok(sources),
        Ok(Err(e)) => Err(ManagerError::Read(e)),
        Err(e) => Err(ManagerError::Internal(format!(
            "reading config files failed: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(m: &Manager) -> Vec<String> {
        m.list().iter().map(|vm| vm.name()).collect()
    }

    #[tokio::test]
    async fn list_is_in_name_order_through_add_rename_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manager::open(crate::vm::test_ctx(dir.path()))
            .await
            .unwrap();
        let yaml = |name: &str| ConfigSource {
            origin: INLINE_ORIGIN.into(),
            text: format!("name: {name}\nbinary: /bin/true\n"),
            base_dir: PathBuf::new(),
        };
        for n in ["web", "db", "cache"] {
            m.add("", vec![yaml(n)]).await.unwrap();
        }
        assert_eq!(names(&m), ["cache", "db", "web"]);
        let db = m.find("db").unwrap();
        m.apply(&db, "name: zoo\nbinary: /bin/true\n")
            .await
            .unwrap();
        assert_eq!(names(&m), ["cache", "web", "zoo"]);
        m.remove(&m.find("web").unwrap(), false, false)
            .await
            .unwrap();
        assert_eq!(names(&m), ["cache", "zoo"]);
    }
}
