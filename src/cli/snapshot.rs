//! `maqet snapshot create|load|rm|ls`: start a snapshot job and follow it to its end
//! with a progress bar (Ctrl-C cancels the job), or list a VM's snapshots.

use std::collections::HashMap;

use comfy_table::{Table, presets};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use zbus::OwnedObjectPath;
use zbus::fdo::PropertiesProxy;
use zbus::zvariant::Variant;

use super::output::print_json;
use super::session::{Session, vm_object};
use crate::client::{BUS_NAME, JobProxy, SnapshotsProxy, proxy_at};
use crate::config::format_size;
use crate::error::MaqetError;
use crate::time::{format_duration_us, format_local_us};

/// Resolution of the progress bar (the job's `Progress` is 0..1).
const BAR_STEPS: u64 = 1000;

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot (live with RAM while the VM runs, of the disks while it is stopped).
    Create {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        name: String,
        /// Replace a snapshot of the same name.
        #[arg(long)]
        overwrite: bool,
        /// Do not draw a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Revert the VM to a snapshot.
    Load {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        name: String,
        #[arg(long)]
        no_progress: bool,
    },
    /// Delete a snapshot.
    #[command(alias = "delete")]
    Rm {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        name: String,
        #[arg(long)]
        no_progress: bool,
    },
    /// List a VM's snapshots.
    #[command(alias = "list")]
    Ls {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
    },
}

pub(super) async fn run(s: &Session, command: SnapshotCommand) -> Result<(), MaqetError> {
    let (vm, name, no_progress, op) = match command {
        SnapshotCommand::Ls { vm } => return list(s, &vm).await,
        SnapshotCommand::Create {
            vm,
            name,
            overwrite,
            no_progress,
        } => (vm, name, no_progress, Op::Create { overwrite }),
        SnapshotCommand::Load {
            vm,
            name,
            no_progress,
        } => (vm, name, no_progress, Op::Load),
        SnapshotCommand::Rm {
            vm,
            name,
            no_progress,
        } => (vm, name, no_progress, Op::Delete),
    };
    let (_, snapshots): (_, SnapshotsProxy) = vm_object(s, &vm).await?;
    let job = match op {
        Op::Create { overwrite } => {
            let mut options = HashMap::new();
            if overwrite {
                options.insert("overwrite", Variant::from(true));
            }
            snapshots.create(&name, options).await?
        }
        Op::Load => snapshots.load(&name).await?,
        Op::Delete => snapshots.delete(&name).await?,
    };
    let end = follow(s, job.clone(), !no_progress && !s.json).await?;
    if s.json {
        print_json(&json!({
            "vm": vm, "snapshot": name, "job": job.as_str(),
            "state": end.state, "message": end.message,
        }));
    } else if end.state == "completed" {
        println!("{vm}: {}", end.message);
    }
    end.into_result()
}

enum Op {
    Create { overwrite: bool },
    Load,
    Delete,
}

/// How a job ended.
pub(super) struct JobEnd {
    pub state: String,
    pub message: String,
}

impl JobEnd {
    /// A failed job exits like a QEMU failure (8), a cancelled one as a failure (1).
    pub(super) fn into_result(self) -> Result<(), MaqetError> {
        match self.state.as_str() {
            "completed" => Ok(()),
            "cancelled" => Err(MaqetError::Cancelled(self.message)),
            _ => Err(MaqetError::QemuFailed(self.message)),
        }
    }
}

/// A bar for a job that reports progress, else a spinner with the elapsed time.
const BAR_TEMPLATE: &str = "{bar:40} {percent:>3}% {wide_msg}";
const SPINNER_TEMPLATE: &str = "{spinner} {elapsed:>4} {wide_msg}";

fn progress_style(determinate: bool) -> ProgressStyle {
    let template = if determinate {
        BAR_TEMPLATE
    } else {
        SPINNER_TEMPLATE
    };
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// Follows a job to its end. Subscribes to its signals first, then reads its state,
/// so an end that happens in between is not missed. Ctrl-C asks the job to cancel.
pub(super) async fn follow(
    s: &Session,
    path: OwnedObjectPath,
    show_progress: bool,
) -> Result<JobEnd, MaqetError> {
    let job: JobProxy = proxy_at(&s.conn, path.clone()).await?;
    let mut completed = job.receive_completed().await?;
    let props = PropertiesProxy::builder(&s.conn)
        .destination(BUS_NAME)
        .path(path)
        .build()
        .await?;
    let mut changes = props.receive_properties_changed().await?;
    // A spinner with the elapsed time until the job reports real progress (QEMU's
    // jobs do; a disk-only snapshot of one disk has none to report): never a bar
    // stuck at 0 %.
    let bar = show_progress.then(|| {
        let bar = ProgressBar::new(BAR_STEPS);
        bar.set_style(progress_style(false));
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    let determinate = std::cell::Cell::new(false);
    let show = |progress: f64, message: &str| {
        if let Some(bar) = &bar {
            // Switched only once the bar would show a whole percent (a bar drawn at
            // "0 %" looks stuck), and not by the 100 % a job reports as it ends: a job
            // that never moved keeps its spinner to the end.
            if (0.01..1.0).contains(&progress) && !determinate.replace(true) {
                bar.set_style(progress_style(true));
            }
            bar.set_position((progress.clamp(0.0, 1.0) * BAR_STEPS as f64) as u64);
            bar.set_message(message.to_owned());
        }
    };
    show(job.progress().await?, &job.message().await?);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut cancel_sent = false;
    while job.state().await? == "running" {
        tokio::select! {
            _ = completed.next() => break,
            Some(change) = changes.next() => {
                if let Ok(args) = change.args() {
                    let changed = args.changed_properties();
                    let progress = changed.get("Progress").and_then(|v| f64::try_from(v).ok());
                    let message = changed.get("Message").and_then(|v| <&str>::try_from(v).ok());
                    if let Some(p) = progress {
                        show(p, message.unwrap_or_default());
                    }
                }
            }
            _ = &mut ctrl_c, if !cancel_sent => {
                cancel_sent = true;
                if let Some(bar) = &bar {
                    bar.set_message("cancelling…");
                } else if !s.json {
                    eprintln!("cancelling…");
                }
                // The job may have ended meanwhile (InvalidState): its end tells.
                let _ = job.cancel().await;
            }
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    Ok(JobEnd {
        state: job.state().await?,
        message: job.message().await?,
    })
}

async fn list(s: &Session, vm: &str) -> Result<(), MaqetError> {
    let (_, snapshots): (_, SnapshotsProxy) = vm_object(s, vm).await?;
    let rows = snapshots.list().await?;
    if s.json {
        let list: Vec<_> = rows
            .iter()
            .map(|(name, state, date, clock)| {
                json!({ "name": name, "vm_state_size": state, "date": date, "vm_clock_ns": clock })
            })
            .collect();
        print_json(&list);
    } else if rows.is_empty() {
        println!("{vm} has no snapshots; take one with: maqet snapshot create {vm} NAME");
    } else {
        let mut t = Table::new();
        t.load_preset(presets::NOTHING)
            .set_header(["NAME", "VM STATE", "DATE", "VM CLOCK"]);
        for (name, state, date, clock) in rows {
            let state = if state == 0 {
                "- (disks only)".to_owned()
            } else {
                format_size(state)
            };
            t.add_row([
                name,
                state,
                format_local_us(date),
                format_duration_us(clock / 1000),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_and_the_spinner_templates_are_valid() {
        for t in [BAR_TEMPLATE, SPINNER_TEMPLATE] {
            assert!(ProgressStyle::with_template(t).is_ok(), "{t}");
        }
    }
}
