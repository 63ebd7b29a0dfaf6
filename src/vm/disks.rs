//! Disk changes on a defined VM (`Storage.Resize`, `Storage.Attach`, `Storage.Detach`):
//! offline through `qemu-img` and the stored config, online through QMP done by maqetd
//! itself (`block_resize`, `blockdev-add` + `device_add`, `device_del` + `blockdev-del`),
//! always ending in the stored config so the next start sees the same disks.
//! docs/storage.md ("Changing disks") is the user-facing description.
//!
//! Naming in the running QEMU: a disk from the command line is the drive whose id is
//! its storage name; a hot-plugged one is the device `maqet-disk-<name>` over the block
//! node `maqet-h<N>` (node names are at most 31 bytes, storage names up to 64).

use std::os::fd::AsFd;
use std::path::PathBuf;

use serde_json::json;

use super::*;
use crate::config::{Access, NewDiskEntry, PathUse, StorageEntry, StorageKind};
use crate::qmp::classify::Command;
use crate::storage::{QemuImg, danger, hostfiles};

/// The controller `interface: scsi` disks hang on (as at start).
const SCSI_CONTROLLER: &str = "maqet-scsi";
/// Sizes must be whole sectors: QEMU rounds others, and the config would lie.
const SECTOR: u64 = 512;

/// What `Storage.Attach` adds.
#[derive(Debug, Clone)]
pub enum DiskSource {
    /// An existing image file (absolute path), checked like a config's `file`.
    File(PathBuf),
    /// A new image maqet creates in the VM's data directory, of this many bytes.
    New(u64),
}

/// `Storage.Attach`'s request, its options already parsed.
#[derive(Debug, Clone)]
pub struct AttachSpec {
    pub source: DiskSource,
    /// The storage name; `None`: the first free `diskN`.
    pub name: Option<String>,
    /// `qcow2` or `raw`; `None`: qcow2 for a new disk, the probed format of a file.
    pub format: Option<StorageKind>,
    /// `virtio` or `scsi` (default: scsi, which unplugs without the guest's help).
    pub interface: String,
    pub readonly: bool,
}

/// A disk as the running QEMU has it (from `query-block`).
struct LiveDisk {
    node: String,
    /// What `device_del` takes: the device id, or the QOM path of an anonymous device.
    device: String,
    virtual_size: u64,
    /// Added with `blockdev-add`, so its node stays until `blockdev-del`.
    hot_plugged: bool,
}

fn device_id(name: &str) -> String {
    format!("maqet-disk-{name}")
}

/// Whether a `query-block` entry is storage entry `name`: a command-line drive or a
/// hot-plugged disk (`Storage.Attach`).
pub fn is_disk_block(block: &Value, name: &str) -> bool {
    block.get("device").and_then(Value::as_str) == Some(name) || hot_plugged(block, name)
}

fn hot_plugged(block: &Value, name: &str) -> bool {
    // `qdev` is the device's id, or the QOM path of the object holding the backend
    // (virtio-blk's is a child of the device).
    let id = device_id(name);
    let path = format!("/machine/peripheral/{id}");
    let qdev = block
        .get("qdev")
        .and_then(Value::as_str)
        .unwrap_or_default();
    qdev == id || qdev == path || qdev.starts_with(&format!("{path}/"))
}

fn find_live(blocks: &Value, name: &str) -> Option<LiveDisk> {
    blocks.as_array()?.iter().find_map(|b| {
        if !is_disk_block(b, name) {
            return None;
        }
        let hot_plugged = hot_plugged(b, name);
        let qdev = b.get("qdev").and_then(Value::as_str).unwrap_or_default();
        let inserted = b.get("inserted")?;
        let device = if hot_plugged {
            device_id(name)
        } else {
            qdev.strip_suffix("/virtio-backend")
                .unwrap_or(qdev)
                .to_owned()
        };
        Some(LiveDisk {
            node: inserted.get("node-name")?.as_str()?.to_owned(),
            device,
            virtual_size: inserted
                .pointer("/image/virtual-size")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            hot_plugged,
        })
    })
}

fn disk_names(config: &VmConfig) -> String {
    let names: Vec<&str> = config
        .storage()
        .iter()
        .filter(|e| e.kind.is_disk())
        .map(|e| e.name.as_str())
        .collect();
    if names.is_empty() {
        "it has no disks".to_owned()
    } else {
        format!("its disks are: {}", names.join(", "))
    }
}

/// The disk entry `name`, or `NotFound` listing the VM's disks.
fn find_disk<'c>(config: &'c VmConfig, vm: &str, name: &str) -> Result<&'c StorageEntry, VmError> {
    match config.storage().iter().find(|e| e.name == name) {
        Some(e) if e.kind.is_disk() => Ok(e),
        Some(_) => Err(VmError::InvalidArgument(format!(
            "storage entry '{name}' of VM '{vm}' is a shared directory, not a disk; {}",
            disk_names(config)
        ))),
        None => Err(VmError::NotFound(format!(
            "VM '{vm}' has no disk '{name}'; {}",
            disk_names(config)
        ))),
    }
}

fn refuse_attached_twice(
    config: &VmConfig,
    vm: &str,
    path: &std::path::Path,
) -> Result<(), VmError> {
    match config.storage().iter().find(|e| e.path == path) {
        Some(other) => Err(VmError::AlreadyExists(format!(
            "{} is already disk '{}' of VM '{vm}'",
            path.display(),
            other.name
        ))),
        None => Ok(()),
    }
}

impl Vm {
    /// Whether the disk change goes to a running QEMU (`true`) or only to files and
    /// the stored config; `InvalidState` while QEMU starts or stops.
    fn disk_change_is_live(&self) -> Result<bool, VmError> {
        match self.status() {
            Status::Running | Status::Paused => Ok(true),
            s if !s.has_process() => Ok(false),
            s => Err(VmError::InvalidState(format!(
                "VM '{}' is {s}; change its disks once it is running or stopped",
                self.name()
            ))),
        }
    }

    async fn query_block(&self) -> Result<Value, VmError> {
        self.run_qmp("query-block", None).await
    }

    async fn store_changed_config(self: &Arc<Self>, yaml: String) -> Result<(), VmError> {
        // Validated again like any config: a place refused since is refused now.
        self.ctx.load_stored_config(&yaml)?;
        self.commit_config(self.name(), yaml, || {}).await
    }

    /// `Storage.Resize`: the disk's virtual size becomes `bytes`. Offline with
    /// `qemu-img resize`, online with QMP `block_resize`; then the stored `size`.
    /// A smaller size is refused unless `shrink` (it cuts off the end of the disk).
    pub async fn resize_disk(
        self: &Arc<Self>,
        disk: &str,
        bytes: u64,
        shrink: bool,
    ) -> Result<(), VmError> {
        let _op = self.op_lock.lock().await;
        self.ensure_idle()?;
        let name = self.name();
        let config = self.stored_config()?;
        let entry = find_disk(&config, &name, disk)?;
        if bytes == 0 || !bytes.is_multiple_of(SECTOR) {
            return Err(VmError::InvalidArgument(format!(
                "cannot resize disk '{disk}' to {bytes} bytes: give a size above zero in whole 512-byte sectors (e.g. 20G)"
            )));
        }
        if entry.readonly {
            return Err(VmError::InvalidArgument(format!(
                "disk '{disk}' of VM '{name}' is read-only (an ISO or base image); maqet does not resize it"
            )));
        }
        if entry.kind == StorageKind::Raw && !self.created_by_maqet(&entry.path).await? {
            return Err(VmError::InvalidArgument(format!(
                "disk '{disk}' of VM '{name}' is a raw file maqet did not create ({}); resize it yourself with `qemu-img resize -f raw` while the VM is stopped",
                entry.path.display()
            )));
        }
        let refuse_shrink = |from: u64| {
            VmError::InvalidArgument(format!(
                "disk '{disk}' of VM '{name}' is {} and {} is smaller: shrinking cuts off the end of the disk and loses what is there; shrink the file system and partitions in the guest first, then pass shrink=true (maqet disk resize --shrink)",
                config::format_size(from),
                config::format_size(bytes)
            ))
        };
        if self.disk_change_is_live()? {
            let live = find_live(&self.query_block().await?, disk).ok_or_else(|| {
                VmError::InvalidState(format!(
                    "disk '{disk}' is in the config of VM '{name}' but not in its running QEMU (the config was applied after the start); restart the VM or resize it while stopped"
                ))
            })?;
            if bytes < live.virtual_size && !shrink {
                return Err(refuse_shrink(live.virtual_size));
            }
            self.run_qmp(
                "block_resize",
                Some(json!({ "node-name": live.node, "size": bytes })),
            )
            .await?;
        } else if std::fs::symlink_metadata(&entry.path).is_ok() {
            let fds = hostfiles::open_image(&entry.path, Access::ReadWrite)?;
            let img = QemuImg::find(self.ctx.path_env.as_deref())?;
            let format = entry.kind.as_str();
            let current = img.info(format, &entry.path).await?.virtual_size;
            if bytes < current && !shrink {
                return Err(refuse_shrink(current));
            }
            img.resize(fds[0].as_fd(), &entry.path, format, bytes, shrink)
                .await?;
        }
        // A disk not created yet is simply created at the new size.
        let yaml = config
            .yaml_with_disk_size(disk, bytes)
            .ok_or_else(|| VmError::Internal(format!("disk '{disk}' vanished from the config")))?;
        self.store_changed_config(yaml).await
    }

    async fn created_by_maqet(&self, path: &std::path::Path) -> Result<bool, VmError> {
        let id = self.id.clone();
        let files = self
            .ctx
            .store
            .read(move |db| db.created_files(&id))
            .await
            .map_err(store_error)?;
        Ok(files.iter().any(|f| f.path == path))
    }

    /// `Storage.Attach`: one more disk, in the stored config and, on a running VM,
    /// hot-plugged. Returns the disk's storage name. Nothing is left behind on failure.
    pub async fn attach_disk(self: &Arc<Self>, spec: AttachSpec) -> Result<String, VmError> {
        let _op = self.op_lock.lock().await;
        self.ensure_idle()?;
        let vm = self.name();
        let config = self.stored_config()?;
        let live = self.disk_change_is_live()?;
        let disk = match &spec.name {
            Some(n) => n.clone(),
            None => (0..)
                .map(|i| format!("disk{i}"))
                .find(|n| config.storage().iter().all(|e| &e.name != n))
                .expect("an unused name"),
        };
        if config.storage().iter().any(|e| e.name == disk) {
            return Err(VmError::AlreadyExists(format!(
                "VM '{vm}' already has a storage entry '{disk}'; choose another name (name=…)"
            )));
        }
        if !matches!(spec.interface.as_str(), "virtio" | "scsi") {
            return Err(VmError::InvalidArgument(format!(
                "interface '{}' cannot be attached; use virtio or scsi",
                spec.interface
            )));
        }
        let home = self.ctx.paths.home.clone();
        let (path, format, size) = match &spec.source {
            DiskSource::File(file) => {
                let usage = if spec.readonly {
                    PathUse::ReadOnly
                } else {
                    PathUse::Storage
                };
                let path = danger::check(file, &home, usage).map_err(VmError::Storage)?;
                refuse_attached_twice(&config, &vm, &path)?;
                let format = self.probe_attachable(&path, spec.format, live).await?;
                (path, format, None)
            }
            DiskSource::New(bytes) => {
                if *bytes == 0 || !bytes.is_multiple_of(SECTOR) {
                    return Err(VmError::InvalidArgument(format!(
                        "a new disk of {bytes} bytes: give a size above zero in whole 512-byte sectors (e.g. 10G)"
                    )));
                }
                let format = spec.format.unwrap_or(StorageKind::Qcow2);
                let path = self
                    .ctx
                    .paths
                    .vm_data_dir(&self.id)
                    .join(format!("{disk}.{}", format.as_str()));
                if std::fs::symlink_metadata(&path).is_ok() {
                    return Err(VmError::AlreadyExists(format!(
                        "{} already exists (a disk detached earlier?); attach it by its path, or choose another name",
                        path.display()
                    )));
                }
                (path, format, Some(*bytes))
            }
        };
        refuse_attached_twice(&config, &vm, &path)?;
        let yaml = config.yaml_with_disk(&NewDiskEntry {
            name: &disk,
            format: format.as_str(),
            file: &path,
            size,
            interface: &spec.interface,
            readonly: spec.readonly,
        });
        // Checks the name and the place like any config, before anything is made.
        let new_config = self.ctx.load_stored_config(&yaml)?;
        let entry = find_disk(&new_config, &vm, &disk)?.clone();
        if size.is_some() {
            self.create_attached(&entry).await?;
        }
        let undo_file = || async {
            if size.is_some() {
                let _ = std::fs::remove_file(&entry.path);
                let (id, path) = (self.id.clone(), entry.path.clone());
                let _ = self
                    .ctx
                    .store
                    .write(move |db| db.forget_created_file(&id, &path))
                    .await;
            }
        };
        if live && let Err(e) = self.hot_plug(&entry).await {
            undo_file().await;
            return Err(e);
        }
        if let Err(e) = self.commit_config(vm.clone(), yaml, || {}).await {
            if live
                && let Ok(blocks) = self.query_block().await
                && let Some(l) = find_live(&blocks, &disk)
            {
                let _ = self.unplug(&l, &entry.path).await;
            }
            undo_file().await;
            return Err(e);
        }
        tracing::info!(vm = %vm, disk = %disk, path = %entry.path.display(), live, "disk attached");
        Ok(disk)
    }

    /// The format of an existing file offered to `Attach`: read through an fd opened
    /// like at start (so a FIFO or device is refused), and refused when it is not a
    /// qcow2 or raw image, reaches into other files while QEMU runs, or is raw by
    /// guess only (a raw guess is what any file looks like).
    async fn probe_attachable(
        &self,
        path: &std::path::Path,
        wanted: Option<StorageKind>,
        live: bool,
    ) -> Result<StorageKind, VmError> {
        let fds = hostfiles::open_image(path, Access::Read)?;
        let img = QemuImg::find(self.ctx.path_env.as_deref())?;
        let probed = img
            .probe_fd(fds[0].as_fd(), None, path)
            .await
            .map_err(|e| {
                VmError::InvalidArgument(format!(
                    "{} is not a disk image maqet can read: {e}",
                    path.display()
                ))
            })?;
        let format = match (probed.format.as_str(), wanted) {
            ("qcow2", None | Some(StorageKind::Qcow2)) => StorageKind::Qcow2,
            ("raw", Some(StorageKind::Raw)) => StorageKind::Raw,
            ("raw", _) => {
                return Err(VmError::InvalidArgument(format!(
                    "{} has no image format qemu-img recognises; if it really is a raw disk image, say so with format=raw (maqet disk attach --format raw)",
                    path.display()
                )));
            }
            (other, _) => {
                return Err(VmError::InvalidArgument(format!(
                    "{} is a {other} image; maqet attaches qcow2 and raw images: import it first (maqet image import) or convert it with qemu-img convert -O qcow2",
                    path.display()
                )));
            }
        };
        if let (true, Some(why)) = (live, &probed.external) {
            return Err(VmError::InvalidArgument(format!(
                "{} cannot be hot-plugged: {why}; attach it while the VM is stopped (maqetd then opens its backing chain itself at start)",
                path.display()
            )));
        }
        Ok(format)
    }

    /// Creates a new attached disk (race-free, after a free-space check) and records it
    /// as maqet's, so `rm --delete-storage` removes it.
    async fn create_attached(&self, e: &StorageEntry) -> Result<(), VmError> {
        let img = QemuImg::find(self.ctx.path_env.as_deref())?;
        let spec = crate::storage::create::NewImage {
            path: &e.path,
            kind: e.kind,
            size: e.size,
            backing: None,
        };
        let outcome =
            crate::storage::create::create_image(&img, &spec, &self.ctx.paths.home).await?;
        if outcome != crate::storage::create::Outcome::Created {
            return Err(VmError::AlreadyExists(format!(
                "{} appeared while maqet was creating it; choose another name",
                e.path.display()
            )));
        }
        let (id, path, format) = (self.id.clone(), e.path.clone(), e.kind.as_str());
        let recorded = self
            .ctx
            .store
            .write(move |db| db.record_created_file(&id, &path, format))
            .await;
        if let Err(err) = recorded {
            let _ = std::fs::remove_file(&e.path);
            return Err(store_error(err));
        }
        Ok(())
    }

    /// `add-fd` (the image's fds in a new fd set), `blockdev-add`, then `device_add`;
    /// each step undone if a later one fails.
    async fn hot_plug(&self, e: &StorageEntry) -> Result<(), VmError> {
        let vm = self.name();
        let qmp = self.qmp()?;
        let access = if e.readonly {
            Access::Read
        } else {
            Access::ReadWrite
        };
        let mut set: Option<u64> = None;
        for fd in hostfiles::open_image(&e.path, access)? {
            let mut args = json!({ "opaque": e.path.to_string_lossy() });
            if let Some(id) = set {
                args["fdset-id"] = json!(id);
            }
            let added = qmp
                .execute_with_fd("add-fd", Some(args), fd)
                .await
                .map_err(|err| qmp_error(&vm, err));
            match added {
                Ok(v) => set = v.get("fdset-id").and_then(Value::as_u64),
                Err(err) => {
                    if let Some(id) = set {
                        let _ = self
                            .run_qmp("remove-fd", Some(json!({ "fdset-id": id })))
                            .await;
                    }
                    return Err(err);
                }
            }
        }
        let set = set.ok_or_else(|| VmError::Qmp("add-fd answered without an fd set".into()))?;
        let node = self.free_node_name().await?;
        let blockdev = json!({
            "driver": e.kind.as_str(),
            "node-name": node,
            "read-only": e.readonly,
            "file": { "driver": "file", "filename": format!("/dev/fdset/{set}") },
        });
        let added = self.run_qmp("blockdev-add", Some(blockdev)).await;
        // The node holds its own dup of the fd: the set's are closed once unused.
        let _ = self
            .run_qmp("remove-fd", Some(json!({ "fdset-id": set })))
            .await;
        added?;
        let result = async {
            let mut device = json!({ "id": device_id(&e.name), "drive": node });
            if e.interface == config::Interface::Scsi {
                self.ensure_scsi_controller().await?;
                device["driver"] = json!("scsi-hd");
                device["bus"] = json!(format!("{SCSI_CONTROLLER}.0"));
            } else {
                device["driver"] = json!("virtio-blk-pci");
            }
            self.run_qmp("device_add", Some(device)).await
        }
        .await;
        if let Err(err) = result {
            let _ = self
                .run_qmp("blockdev-del", Some(json!({ "node-name": node })))
                .await;
            return Err(err);
        }
        Ok(())
    }

    async fn node_names(&self) -> Result<Vec<String>, VmError> {
        let nodes = self
            .run_qmp("query-named-block-nodes", Some(json!({ "flat": true })))
            .await?;
        Ok(nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.get("node-name").and_then(Value::as_str))
            .map(str::to_owned)
            .collect())
    }

    async fn node_exists(&self, node: &str) -> Result<bool, VmError> {
        Ok(self.node_names().await?.iter().any(|n| n == node))
    }

    /// The first `maqet-h<N>` no block node of the running QEMU has.
    async fn free_node_name(&self) -> Result<String, VmError> {
        let taken = self.node_names().await?;
        Ok((0..)
            .map(|i| format!("maqet-h{i}"))
            .find(|n| !taken.contains(n))
            .expect("a free node name"))
    }

    /// Adds maqet's virtio-scsi controller unless the running QEMU has it (a VM
    /// started with a SCSI disk does).
    async fn ensure_scsi_controller(&self) -> Result<(), VmError> {
        let path = format!("/machine/peripheral/{SCSI_CONTROLLER}");
        let there = self
            .run_qmp("qom-get", Some(json!({ "path": path, "property": "type" })))
            .await
            .is_ok();
        if !there {
            self.run_qmp(
                "device_add",
                Some(json!({ "driver": "virtio-scsi-pci", "id": SCSI_CONTROLLER })),
            )
            .await?;
        }
        Ok(())
    }

    /// `device_del`, wait for `DEVICE_DELETED`, then `blockdev-del` of a hot-plugged
    /// node (a command-line drive goes with its device).
    async fn unplug(&self, live: &LiveDisk, path: &std::path::Path) -> Result<(), VmError> {
        let mut args = serde_json::Map::new();
        args.insert("id".into(), json!(live.device));
        let cmd = Command::new("device_del", Some(args)).map_err(VmError::InvalidArgument)?;
        self.device_del(&live.device, cmd).await?;
        if live.hot_plugged || self.node_exists(&live.node).await? {
            self.run_qmp("blockdev-del", Some(json!({ "node-name": live.node })))
                .await?;
        }
        self.release_fd_sets(path).await
    }

    /// Closes the fd sets maqetd passed at start for `path` (`-add-fd`, labelled with
    /// the path): they share the image's open file description, so its lock would
    /// outlive the detach and the file could not be attached again.
    async fn release_fd_sets(&self, path: &std::path::Path) -> Result<(), VmError> {
        let label = config::escape_commas(&path.display().to_string());
        let sets = self.run_qmp("query-fdsets", None).await?;
        for set in sets.as_array().into_iter().flatten() {
            let ours = set["fds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|fd| fd["opaque"].as_str() == Some(label.as_str()));
            if let (true, Some(id)) = (ours, set["fdset-id"].as_u64()) {
                self.run_qmp("remove-fd", Some(json!({ "fdset-id": id })))
                    .await?;
            }
        }
        Ok(())
    }

    /// `Storage.Detach`: the disk leaves the running QEMU (hot-unplug) and the stored
    /// config. Its image file stays (a disk maqet created stays maqet's: `rm
    /// --delete-storage` removes it with the VM).
    pub async fn detach_disk(self: &Arc<Self>, disk: &str) -> Result<(), VmError> {
        let _op = self.op_lock.lock().await;
        self.ensure_idle()?;
        let vm = self.name();
        let config = self.stored_config()?;
        let path = find_disk(&config, &vm, disk)?.path.clone();
        let yaml = config
            .yaml_without_storage(disk)
            .ok_or_else(|| VmError::Internal(format!("disk '{disk}' vanished from the config")))?;
        // Checked before QEMU is touched: the config without it must still be valid.
        self.ctx.load_stored_config(&yaml)?;
        if self.disk_change_is_live()?
            && let Some(live) = find_live(&self.query_block().await?, disk)
        {
            self.unplug(&live, &path).await?;
        }
        self.commit_config(vm.clone(), yaml, || {}).await?;
        tracing::info!(vm = %vm, disk, "disk detached");
        Ok(())
    }
}
