//! Exporting a stopped VM into a directory the caller opened: `config.yaml` and one
//! standalone copy of each disk beside it, named relative to the config, so the
//! directory can be carried to another machine and defined there with
//! `maqet add --from-export DIR` (an ordinary add of `DIR/config.yaml`).
//!
//! maqetd writes only through the directory descriptor the caller passed (`openat`,
//! `O_EXCL | O_NOFOLLOW`; `qemu-img` through `/proc/self/fd/3/<name>`), never by a
//! path of the caller's choosing, and removes what it wrote when anything fails.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde_yaml::Value;

use super::Manager;
use super::ManagerError;
use crate::storage::QemuImg;
use crate::vm::{Status, Vm};

/// The config's name inside an export.
pub const EXPORT_CONFIG: &str = "config.yaml";

impl Manager {
    /// Writes the export of `vm` into the directory open at `dir`; returns the names
    /// of the files written.
    pub async fn export_vm(&self, vm: &Arc<Vm>, dir: OwnedFd) -> Result<Vec<String>, ManagerError> {
        let _op = vm.lock_ops().await;
        vm.ensure_idle()?;
        let name = vm.name();
        if !matches!(
            vm.status(),
            Status::Created | Status::Stopped | Status::Crashed | Status::Failed
        ) {
            return Err(ManagerError::InvalidState(format!(
                "VM '{name}' is {}: an export needs disks nobody is writing; stop it first (maqet stop {name})",
                vm.status()
            )));
        }
        let st = rustix::fs::fstat(&dir)
            .map_err(|e| ManagerError::InvalidArgument(format!("export directory: {e}")))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(ManagerError::InvalidArgument(
                "the export target is not a directory; pass an open directory".into(),
            ));
        }
        let mut written = Vec::new();
        let outcome = self.export_into(vm, &dir, &mut written).await;
        if outcome.is_err() {
            for f in &written {
                let _ = rustix::fs::unlinkat(&dir, f.as_str(), AtFlags::empty());
            }
        }
        outcome.map(|()| written)
    }

    async fn export_into(
        &self,
        vm: &Arc<Vm>,
        dir: &OwnedFd,
        written: &mut Vec<String>,
    ) -> Result<(), ManagerError> {
        let config = vm.stored_config()?;
        let yaml = vm.with_info(|i| i.config.clone());
        let mut doc: Value = serde_yaml::from_str(&yaml).map_err(|e| {
            ManagerError::Internal(format!("the stored config does not parse: {e}"))
        })?;
        // Claimed first, so an export never overwrites an earlier one.
        let config_file = create_excl(dir, EXPORT_CONFIG)?;
        written.push(EXPORT_CONFIG.to_owned());
        let mut qemu_img = None;
        for e in config.storage().iter().filter(|e| e.kind.is_disk()) {
            if std::fs::symlink_metadata(&e.path).is_err() {
                // Never made: the imported VM makes it on its first start.
                if e.from.is_some() {
                    return Err(ManagerError::InvalidState(format!(
                        "disk '{}' starts from image '{}' and was never made; start the VM once (or import the image on the other machine) before exporting",
                        e.name,
                        e.from.as_deref().unwrap_or_default()
                    )));
                }
                let entry = super::clone::storage_entry(&mut doc, &e.name)?;
                entry.remove("file");
                continue;
            }
            let file = format!("{}.{}", e.name, e.kind.as_str());
            drop(create_excl(dir, &file)?);
            written.push(file.clone());
            let img = match &qemu_img {
                Some(img) => img,
                None => qemu_img.insert(QemuImg::find(self.ctx.path_env.as_deref())?),
            };
            img.copy_disk_into(&e.path, e.kind.as_str(), dir.as_fd(), &file)
                .await?;
            let entry = super::clone::storage_entry(&mut doc, &e.name)?;
            entry.insert("file".into(), file.into());
            for key in ["from", "backing_file", "backing_format"] {
                entry.remove(key);
            }
        }
        let text = serde_yaml::to_string(&doc).map_err(|e| {
            ManagerError::Internal(format!("cannot write the exported config: {e}"))
        })?;
        let mut out = std::fs::File::from(config_file);
        use std::io::Write;
        out.write_all(text.as_bytes())
            .and_then(|()| out.sync_all())
            .map_err(|e| ManagerError::Storage(format!("cannot write {EXPORT_CONFIG}: {e}")))?;
        tracing::info!(vm = %vm.name(), files = written.len(), "VM exported");
        Ok(())
    }
}

fn create_excl(dir: &OwnedFd, name: &str) -> Result<OwnedFd, ManagerError> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| {
        ManagerError::AlreadyExists(format!(
            "cannot create {name} in the export directory ({e}); export into an empty directory"
        ))
    })
}
