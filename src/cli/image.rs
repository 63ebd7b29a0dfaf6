//! `maqet image import|ls|rm`: the image store. The CLI opens the file to import and
//! passes the descriptor; the import is a job followed with a progress bar (Ctrl-C
//! cancels it).

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;

use comfy_table::{Table, presets};
use serde_json::json;
use zbus::zvariant::Variant;

use super::output::print_json;
use super::session::Session;
use super::snapshot::follow;
use crate::client::{ImagesProxy, MANAGER_PATH, proxy_at};
use crate::config::format_size;
use crate::error::MaqetError;
use crate::time::format_local_us;

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Import a disk image (qcow2, raw, vmdk, vdi, vhdx: converted to qcow2) or an ISO
    /// (stored as it is) into the image store; VMs use it with `from: NAME`.
    Import {
        file: String,
        /// Name in the store (default: the file's name without its extension).
        #[arg(long, short)]
        name: Option<String>,
        /// The file's format, instead of recognising it (qcow2, raw, vmdk, vdi, vhdx, iso).
        #[arg(long)]
        format: Option<String>,
        /// Do not draw a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// List the stored images.
    #[command(alias = "list")]
    Ls,
    /// Delete a stored image (refused while a VM uses it).
    #[command(alias = "remove")]
    Rm { name: String },
}

pub(super) async fn run(s: &Session, command: ImageCommand) -> Result<(), MaqetError> {
    let images: ImagesProxy = proxy_at(&s.conn, MANAGER_PATH.try_into()?).await?;
    match command {
        ImageCommand::Import {
            file,
            name,
            format,
            no_progress,
        } => import(s, &images, &file, name, format, no_progress).await,
        ImageCommand::Ls => list(s, &images).await,
        ImageCommand::Rm { name } => {
            images.remove(&name).await?;
            if s.json {
                print_json(&json!({ "image": name, "removed": true }));
            } else {
                println!("removed image '{name}'");
            }
            Ok(())
        }
    }
}

async fn import(
    s: &Session,
    images: &ImagesProxy<'_>,
    file: &str,
    name: Option<String>,
    format: Option<String>,
    no_progress: bool,
) -> Result<(), MaqetError> {
    if s.remote {
        return Err(MaqetError::InvalidArgument(
            "an import passes the open file to maqetd, which cannot cross --host: copy the file to that machine and import it there".into(),
        ));
    }
    // Non-blocking: a FIFO must not hang the open (the service refuses it).
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(file)
        .map_err(|e| MaqetError::InvalidArgument(format!("cannot open {file}: {e}")))?;
    let mut options = HashMap::new();
    if let Some(f) = &format {
        options.insert("format", Variant::from(f.as_str()));
    }
    let name = name.unwrap_or_default();
    let job = images
        .import(zbus::Fd::from(&opened), &name, options)
        .await?;
    let end = follow(s, job.clone(), !no_progress && !s.json).await?;
    if s.json {
        print_json(&json!({
            "file": file, "job": job.as_str(), "state": end.state, "message": end.message,
        }));
    } else if end.state == "completed" {
        println!("{}", end.message);
    }
    end.into_result()
}

async fn list(s: &Session, images: &ImagesProxy<'_>) -> Result<(), MaqetError> {
    let rows = images.list().await?;
    if s.json {
        let list: Vec<_> = rows
            .iter()
            .map(|(name, format, vsize, size, sha, at, path)| {
                json!({ "name": name, "format": format, "virtual_size": vsize, "file_size": size,
                        "sha256": sha, "imported_at": at, "path": path })
            })
            .collect();
        print_json(&list);
    } else if rows.is_empty() {
        println!("the image store is empty; add one with: maqet image import FILE");
    } else {
        let mut t = Table::new();
        t.load_preset(presets::NOTHING)
            .set_header(["NAME", "FORMAT", "SIZE", "ON DISK", "IMPORTED", "SHA256"]);
        for (name, format, vsize, size, sha, at, _) in rows {
            t.add_row([
                name,
                format,
                format_size(vsize),
                format_size(size),
                format_local_us(at),
                sha.chars().take(16).collect(),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}
