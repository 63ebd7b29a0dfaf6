//! `maqet disk resize|attach|detach`: changes to a VM's disks (`org.maqet.Maqet1.Storage`).

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::json;
use zbus::Variant;

use super::output::print_json;
use super::session::{Session, vm_object};
use crate::client::StorageProxy;
use crate::config::{format_size, parse_size};
use crate::error::MaqetError;

#[derive(clap::Subcommand, Debug)]
pub enum DiskCommand {
    /// Change a disk's size (qemu-img while stopped, live while running). Growing is
    /// safe; the guest then grows its partition and file system itself.
    Resize {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        /// The disk's storage name (`maqet storage ls VM`).
        disk: String,
        /// The new size: bytes or with a unit (20G, 512M).
        size: String,
        /// Allow a smaller size: cuts off the end of the disk (shrink the guest's file
        /// system and partitions first).
        #[arg(long)]
        shrink: bool,
    },
    /// Add a disk: an existing qcow2/raw image, or a new one with --size. On a running
    /// VM it is hot-plugged; it stays in the config for the next start.
    Attach {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        /// An existing image file (omit with --size for a new disk).
        #[arg(required_unless_present = "size", conflicts_with = "size")]
        path: Option<PathBuf>,
        /// Create a new disk of this size in the VM's data directory.
        #[arg(long)]
        size: Option<String>,
        /// Its storage name (default: the first free diskN).
        #[arg(long)]
        name: Option<String>,
        /// qcow2 or raw (an existing raw image must say raw).
        #[arg(long, value_parser = ["qcow2", "raw"])]
        format: Option<String>,
        /// How the guest sees it: scsi (default; unplugs without the guest's help) or
        /// virtio (virtio-blk; unplugging needs a guest that handles PCI hot-unplug).
        #[arg(long, value_parser = ["scsi", "virtio"])]
        interface: Option<String>,
        #[arg(long)]
        readonly: bool,
    },
    /// Remove a disk from the VM (hot-unplugged if running) and from its config. The
    /// image file is kept.
    Detach {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        disk: String,
    },
}

fn bad(e: impl std::fmt::Display) -> MaqetError {
    MaqetError::InvalidArgument(e.to_string())
}

pub(super) async fn run(s: &Session, command: DiskCommand) -> Result<(), MaqetError> {
    match command {
        DiskCommand::Resize {
            vm,
            disk,
            size,
            shrink,
        } => {
            let bytes = parse_size(&size).map_err(bad)?;
            let (_, storage): (_, StorageProxy) = vm_object(s, &vm).await?;
            let mut options = HashMap::new();
            if shrink {
                options.insert("shrink", Variant::from(true));
            }
            storage.resize(&disk, bytes, options).await?;
            if s.json {
                print_json(&json!({ "vm": vm, "disk": disk, "size": bytes }));
            } else {
                println!("{vm}: disk {disk} is now {}", format_size(bytes));
            }
        }
        DiskCommand::Attach {
            vm,
            path,
            size,
            name,
            format,
            interface,
            readonly,
        } => {
            let source = match &path {
                Some(p) => std::path::absolute(p)
                    .map_err(|e| bad(format!("{}: {e}", p.display())))?
                    .to_str()
                    .ok_or_else(|| bad(format!("{} is not valid UTF-8", p.display())))?
                    .to_owned(),
                None => String::new(),
            };
            let mut options: HashMap<&str, Variant<'_>> = HashMap::new();
            if let Some(size) = &size {
                options.insert("size", Variant::from(parse_size(size).map_err(bad)?));
            }
            for (key, value) in [("name", name), ("format", format), ("interface", interface)] {
                if let Some(v) = value {
                    options.insert(key, Variant::from(v));
                }
            }
            if readonly {
                options.insert("readonly", Variant::from(true));
            }
            let (_, storage): (_, StorageProxy) = vm_object(s, &vm).await?;
            let disk = storage.attach(&source, options).await?;
            if s.json {
                print_json(&json!({ "vm": vm, "disk": disk }));
            } else {
                println!("{vm}: disk {disk} attached");
            }
        }
        DiskCommand::Detach { vm, disk } => {
            let (_, storage): (_, StorageProxy) = vm_object(s, &vm).await?;
            storage.detach(&disk).await?;
            if s.json {
                print_json(&json!({ "vm": vm, "disk": disk }));
            } else {
                println!("{vm}: disk {disk} detached (its image file is kept)");
            }
        }
    }
    Ok(())
}
