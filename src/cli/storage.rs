//! `maqet storage ls|verify`: a VM's disks and shares as the service sees them.

use comfy_table::{Table, presets};
use serde_json::json;

use super::output::print_json;
use super::session::{Session, vm_object};
use crate::client::StorageProxy;
use crate::config::format_size;
use crate::error::MaqetError;

#[derive(clap::Subcommand, Debug)]
pub enum StorageCommand {
    /// List a VM's disks and shares: path, format, sizes, whether maqet created them.
    #[command(alias = "list")]
    Ls {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
    },
    /// Check a VM's disks (qemu-img check for qcow2; readable for raw images and shares).
    Verify {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
    },
    /// List disk images maqet created whose VM was removed without --delete-storage
    /// (nothing is deleted).
    Orphaned,
}

/// `Ok(false)`: a verification found problems (already printed).
pub(super) async fn run(s: &Session, command: StorageCommand) -> Result<bool, MaqetError> {
    match command {
        StorageCommand::Ls { vm } => list(s, &vm).await.map(|()| true),
        StorageCommand::Verify { vm } => verify(s, &vm).await,
        StorageCommand::Orphaned => orphaned(s).await.map(|()| true),
    }
}

async fn orphaned(s: &Session) -> Result<(), MaqetError> {
    let files = s.manager.orphaned_storage().await?;
    if s.json {
        let list: Vec<_> = files
            .iter()
            .map(|(path, vm, size)| json!({ "path": path, "former_vm": vm, "size": size }))
            .collect();
        print_json(&list);
        return Ok(());
    }
    if files.is_empty() {
        println!("no orphaned storage: every disk maqet created belongs to a VM");
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_header(["SIZE", "FORMER VM", "PATH"]);
    for (path, vm, size) in files {
        let vm = if vm.is_empty() { "-".to_owned() } else { vm };
        t.add_row([format_size(size), vm, path]);
    }
    println!("{t}");
    println!("\ndelete one with rm PATH, or use it again by naming it as a disk's `file`");
    Ok(())
}

async fn list(s: &Session, vm: &str) -> Result<(), MaqetError> {
    let (_, storage): (_, StorageProxy) = vm_object(s, vm).await?;
    let rows = storage.list().await?;
    if s.json {
        let list: Vec<_> = rows
            .iter()
            .map(|(name, format, path, exists, virt, actual, created)| {
                json!({
                    "name": name, "format": format, "path": path, "exists": exists,
                    "virtual_size": virt, "actual_size": actual, "created_by_maqet": created,
                })
            })
            .collect();
        print_json(&list);
        return Ok(());
    }
    if rows.is_empty() {
        println!("{vm} has no storage entries");
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_header([
        "NAME",
        "FORMAT",
        "VIRTUAL",
        "ACTUAL",
        "CREATED BY",
        "PATH",
    ]);
    for (name, format, path, exists, virt, actual, created) in rows {
        let size = |b: u64| {
            if b == 0 {
                "-".to_owned()
            } else {
                format_size(b)
            }
        };
        let path = if exists {
            path
        } else {
            format!("{path} (not created yet)")
        };
        let by = if created { "maqet" } else { "you" };
        t.add_row([name, format, size(virt), size(actual), by.to_owned(), path]);
    }
    println!("{t}");
    Ok(())
}

async fn verify(s: &Session, vm: &str) -> Result<bool, MaqetError> {
    let (_, storage): (_, StorageProxy) = vm_object(s, vm).await?;
    let rows = storage.verify().await?;
    let all_ok = rows.iter().all(|(_, ok, _)| *ok);
    if s.json {
        let results: Vec<_> = rows
            .iter()
            .map(|(name, ok, message)| json!({ "name": name, "ok": ok, "message": message }))
            .collect();
        print_json(&json!({ "vm": vm, "ok": all_ok, "results": results }));
    } else if rows.is_empty() {
        println!("{vm} has no storage entries");
    } else {
        let mut t = Table::new();
        t.load_preset(presets::NOTHING)
            .set_header(["NAME", "RESULT", "DETAILS"]);
        for (name, ok, message) in rows {
            t.add_row([name, if ok { "ok" } else { "FAILED" }.to_owned(), message]);
        }
        println!("{t}");
    }
    Ok(all_ok)
}
