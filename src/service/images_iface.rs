//! `org.maqet.Maqet1.Images` on the manager object: the image store ([`crate::images`]).

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, interface};

use super::options::{check_keys, str_option};
use super::{Shared, job_iface};
use crate::access::{Action, Request};
use crate::client::ImageRow;
use crate::error::MaqetError;
use crate::images;

/// The keys `Import` understands in `options`.
const IMPORT_OPTIONS: &[&str] = &["format"];

pub struct ImagesIface {
    shared: Arc<Shared>,
}

impl ImagesIface {
    pub fn new(shared: Arc<Shared>) -> ImagesIface {
        ImagesIface { shared }
    }
}

fn format_option(options: &HashMap<String, OwnedVariant>) -> Result<Option<String>, MaqetError> {
    check_keys(options, IMPORT_OPTIONS, "import")?;
    str_option(options, "format")
}

#[interface(name = "org.maqet.Maqet1.Images")]
impl ImagesIface {
    /// Starts importing the file open at `file` (the caller opens it; maqetd reads only
    /// through the descriptor) into the image store as `name` ("" = from the file's
    /// name); returns the job. Disk images (qcow2, raw, vmdk, vdi, vhdx) are checked
    /// and converted to qcow2, ISO images stored as they are. `options`: `format` (s)
    /// names the file's format instead of recognising it.
    #[zbus(out_args("job"))]
    async fn import(
        &self,
        file: zbus::OwnedFd,
        name: &str,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, MaqetError> {
        let req = Request::new(Action::Images, "Images.Import")
            .with_args(format!("name={name:?} options={:?}", options.keys()));
        let work = async {
            let format = format_option(&options)?;
            let job = images::import::start(
                &self.shared.manager,
                std::os::fd::OwnedFd::from(file),
                name,
                format.as_deref(),
            )
            .await?;
            job_iface::publish(conn, &self.shared, job).await
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Every stored image: (name, format `qcow2`|`iso`, virtual size, file size,
    /// SHA-256 of the stored file, import date in µs since the epoch, file path).
    #[zbus(out_args("images"))]
    async fn list(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<ImageRow>, MaqetError> {
        let req = Request::new(Action::Observe, "Images.List");
        let work = async {
            let ctx = self.shared.manager.ctx();
            Ok(images::list(ctx)
                .await?
                .into_iter()
                .map(|r| {
                    let path = images::file_path(ctx, &r).to_string_lossy().into_owned();
                    (
                        r.name,
                        r.format,
                        r.virtual_size,
                        r.file_size,
                        r.sha256,
                        r.imported_at,
                        path,
                    )
                })
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Deletes a stored image; refused (`InvalidState`, naming the VMs) while a VM's
    /// storage uses it.
    async fn remove(
        &self,
        name: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let req = Request::new(Action::Images, "Images.Remove").with_args(format!("name={name:?}"));
        let work = async {
            images::remove(&self.shared.manager, name).await?;
            Ok(())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }
}
