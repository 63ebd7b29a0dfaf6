//! `org.maqet.Maqet1.Storage`: one per VM; what `maqet storage ls|verify` show. Reads
//! only ([`crate::storage::inventory`] does the work).

use std::collections::HashSet;
use std::sync::Arc;

use zbus::message::Header;
use zbus::{Connection, interface};

use super::Shared;
use crate::access::{Action, Request};
use crate::client::{StorageRow, VerifyRow};
use crate::error::MaqetError;
use crate::storage::{QemuImg, StorageError, inventory};
use crate::vm::{Vm, store_error};

pub struct StorageIface {
    shared: Arc<Shared>,
    vm: Arc<Vm>,
}

impl StorageIface {
    pub fn new(shared: Arc<Shared>, vm: Arc<Vm>) -> StorageIface {
        StorageIface { shared, vm }
    }

    fn qemu_img(&self) -> Result<QemuImg, StorageError> {
        QemuImg::find(self.shared.manager.ctx().path_env.as_deref())
    }
}

#[interface(name = "org.maqet.Maqet1.Storage")]
impl StorageIface {
    /// Every storage entry: (name, format, path, exists, virtual size, actual size,
    /// created by maqet). Sizes in bytes; a disk not created yet shows the size it
    /// will be created with.
    #[zbus(out_args("entries"))]
    async fn list(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<StorageRow>, MaqetError> {
        let req = Request::new(Action::Observe, "Storage.List").on_vm(&self.vm);
        let work = async {
            let config = self.vm.stored_config()?;
            let id = self.vm.id().to_string();
            let created: HashSet<_> = self
                .shared
                .manager
                .ctx()
                .store
                .read(move |db| db.created_files(&id))
                .await
                .map_err(store_error)?
                .into_iter()
                .map(|f| f.path)
                .collect();
            let img = self.qemu_img().ok();
            Ok(inventory::list(img.as_ref(), config.storage(), &created)
                .await
                .into_iter()
                .map(|r| {
                    (
                        r.name,
                        r.format,
                        r.path.to_string_lossy().into_owned(),
                        r.exists,
                        r.virtual_size,
                        r.actual_size,
                        r.created_by_maqet,
                    )
                })
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Checks every entry: (name, ok, message). qcow2: `qemu-img check`; raw images
    /// and shares: present and readable.
    #[zbus(out_args("results"))]
    async fn verify(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<VerifyRow>, MaqetError> {
        let req = Request::new(Action::Observe, "Storage.Verify").on_vm(&self.vm);
        let work = async {
            let config = self.vm.stored_config()?;
            let in_use = self.vm.status().has_process();
            Ok(inventory::verify(self.qemu_img(), config.storage(), in_use)
                .await
                .into_iter()
                .map(|r| (r.name, r.ok, r.message))
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }
}
