//! The VM lifecycle commands (add, start, stop, ls, …) and the dispatcher.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use zbus::fdo::ObjectManagerProxy;
use zbus::message::Type as MessageType;
use zbus::{MatchRule, MessageStream, OwnedObjectPath};

use super::output::{VmView, print_json, vm_details, vm_table};
use super::session::{Session, read_input, view, vm, vm_object, wait_chunked};
use crate::client::{
    BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH, QMP_INTERFACE, StorageProxy, VM_INTERFACE,
    id_from_path, vm_proxy,
};
use crate::error::MaqetError;
use crate::time::format_us;

/// The states `ls --status` filters by (the D-Bus `Status` values).
pub(crate) const STATUSES: [&str; 8] = [
    "created", "starting", "running", "paused", "stopping", "stopped", "crashed", "failed",
];

/// A stop's escalation after the graceful timeout: quit, SIGTERM, SIGKILL.
const STOP_ESCALATION: Duration = Duration::from_secs(15);

pub(super) async fn add(s: &Session, name: String, files: Vec<String>) -> Result<(), MaqetError> {
    let path = if files.len() == 1 && files[0] == "-" {
        s.manager.add_vm(&name, &read_input("-")?).await?
    } else {
        if files.is_empty() {
            return Err(MaqetError::InvalidArgument(
                "no config given: maqet add [--name NAME] -c FILE [-c FILE…] (or - for stdin)"
                    .into(),
            ));
        }
        add_files(s, &name, &files).await?
    };
    let proxy = vm_proxy(&s.conn, path.clone()).await?;
    let (name, id) = (proxy.name().await?, proxy.id().await?);
    if s.json {
        print_json(&json!({ "name": name, "id": id, "path": path.as_str() }));
    } else {
        println!("added {name} ({id})");
    }
    Ok(())
}

/// Hands the files to the service as open descriptors (maqetd reads nothing by path on
/// our behalf). Over `--host` no descriptor passes: one file is read here and sent as
/// text (`AddVM`, so its relative paths resolve against the VM's directory there).
async fn add_files(
    s: &Session,
    name: &str,
    files: &[String],
) -> Result<OwnedObjectPath, MaqetError> {
    use std::os::unix::fs::OpenOptionsExt;
    if s.remote {
        let [file] = files else {
            return Err(MaqetError::InvalidArgument(
                "with --host, maqet add takes one config file (file descriptors do not pass over ssh): merge them into one, or run maqet on that machine".into(),
            ));
        };
        let source = crate::config::source::read_path(
            &std::path::absolute(file)
                .map_err(|e| MaqetError::InvalidArgument(format!("bad path {file}: {e}")))?,
        )
        .map_err(|e| MaqetError::InvalidArgument(e.to_string()))?;
        return s.manager.add_vm(name, &source.text).await;
    }
    let opened = files
        .iter()
        .map(|f| {
            // Non-blocking: a FIFO must not hang the open (the service refuses it).
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(f)
                .map_err(|e| MaqetError::InvalidArgument(format!("cannot open {f}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fds: Vec<zbus::Fd<'_>> = opened.iter().map(zbus::Fd::from).collect();
    s.manager.add_vm_from_fds(name, &fds).await
}

/// `add --empty [--name NAME | NAME]` (maqet 0.0.x): a VM with an empty config.
pub(super) async fn add_empty(
    s: &Session,
    name: Option<String>,
    args: Vec<String>,
) -> Result<(), MaqetError> {
    let name = match (name, args.as_slice()) {
        (name, []) => name.unwrap_or_default(),
        (None, [name]) => name.clone(),
        _ => super::usage_error(
            "add --empty takes no config files, only a name: maqet add --empty NAME",
        ),
    };
    let path = s.manager.add_vm(&name, "{}\n").await?;
    let proxy = vm_proxy(&s.conn, path.clone()).await?;
    let (name, id) = (proxy.name().await?, proxy.id().await?);
    if s.json {
        print_json(&json!({ "name": name, "id": id, "path": path.as_str() }));
    } else {
        println!("added {name} ({id}), empty: give it a config with maqet apply {name} FILE");
    }
    Ok(())
}

/// The conditions maqet 0.0.x's `start --wait-for` knew, and what they are here.
fn legacy_wait_for(condition: &str) -> Option<Result<(), String>> {
    match condition.to_ascii_lowercase().as_str() {
        // The start returns once QEMU's monitor answers: that is "process started".
        "process-started" | "process" | "started" => Some(Ok(())),
        "file-exists" => Some(Err(
            "--wait-for file-exists is gone (maqet 0.0.x's CLI could not name the file either); wait for the VM instead: maqet start VM --wait-for status=running, or --wait-for event=<QMP EVENT>".into(),
        )),
        "ssh-ready" | "boot-complete" => Some(Err(format!(
            "--wait-for {condition} was removed (already in maqet 0.0.x); with `guest_agent: true` wait for the guest with maqet exec VM -- true, or use --wait-for event=<QMP EVENT>"
        ))),
        _ => None,
    }
}

/// `start [--wait-for CONDITION]`: starts, then waits like `maqet wait`.
pub(super) async fn start(
    s: &Session,
    name: &str,
    wait_for: Option<&str>,
    timeout: u32,
) -> Result<(), MaqetError> {
    let condition = match wait_for.map(|c| (c, legacy_wait_for(c))) {
        None | Some((_, Some(Ok(())))) => None,
        Some((_, Some(Err(message)))) => super::usage_error(message),
        Some((c, None)) if c.starts_with("status=") || c.starts_with("event=") => Some(c),
        Some((c, None)) => super::usage_error(format!(
            "unknown --wait-for condition `{c}`: use status=<state>[|<state>…], event=<QMP EVENT> or process-started"
        )),
    };
    let (_, proxy) = vm(s, name).await?;
    start_here(s, &proxy).await?;
    if let Some(condition) = condition {
        wait_chunked(&proxy, condition, Duration::from_secs(timeout.into())).await?;
    }
    report(s, name).await
}

pub(super) async fn lifecycle(s: &Session, name: &str, op: &str) -> Result<(), MaqetError> {
    let (_, proxy) = vm(s, name).await?;
    match op {
        "start" => start_here(s, &proxy).await?,
        "restart" => proxy.restart().await?,
        "reset" => proxy.reset().await?,
        "pause" => proxy.pause().await?,
        "resume" => proxy.resume().await?,
        other => unreachable!("unknown lifecycle op {other}"),
    }
    report(s, name).await
}

pub(super) async fn report(s: &Session, name: &str) -> Result<(), MaqetError> {
    let v = view(s, name).await?;
    if s.json {
        print_json(&v);
    } else if v.pid != 0 {
        println!("{}: {} (pid {})", v.name, v.status, v.pid);
    } else {
        println!("{}: {} ({})", v.name, v.status, v.status_reason);
    }
    Ok(())
}

pub(super) async fn stop(
    s: &Session,
    name: &str,
    force: bool,
    timeout: u32,
    no_wait: bool,
) -> Result<(), MaqetError> {
    let (_, proxy) = vm(s, name).await?;
    if !s.json && !force && !no_wait {
        eprintln!(
            "stopping {name}: asking the guest to power off (guest agent, ACPI), escalating after {timeout} s…"
        );
    }
    proxy.stop(force, timeout).await?;
    if !no_wait {
        let limit = Duration::from_secs(timeout.into()) + STOP_ESCALATION;
        wait_chunked(&proxy, "status=stopped|crashed|failed|created", limit).await?;
    }
    report(s, name).await
}

/// `rm --all`: every VM. On a terminal it lists them and asks; otherwise it needs
/// `--force` (which also kills running VMs). Without `--force`, running VMs are kept
/// and reported. Returns exit 2 when refused, 1 when some could not be removed.
pub(super) async fn remove_all(
    s: &Session,
    force: bool,
    delete_storage: bool,
) -> Result<super::ExitCode, MaqetError> {
    use std::io::{BufRead, IsTerminal, Write};
    let views = all_views(s).await?;
    if views.is_empty() {
        if s.json {
            print_json(&json!({ "removed": [], "kept": [] }));
        } else {
            println!("no VMs defined");
        }
        return Ok(super::ExitCode::Ok);
    }
    if !force {
        if !std::io::stdin().is_terminal() || s.json {
            super::usage_error(format!(
                "rm --all removes {} VMs and asks first; without a terminal to ask on, add --force (which also kills running VMs)",
                views.len()
            ));
        }
        eprintln!("{}", super::output::vm_table(&views));
        eprint!(
            "Remove all {} VMs{}? [y/N] ",
            views.len(),
            if delete_storage {
                " and the disks maqet created for them"
            } else {
                ""
            }
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            eprintln!("nothing removed");
            return Ok(super::ExitCode::Ok);
        }
    }
    let (mut removed, mut kept) = (Vec::new(), Vec::new());
    for v in &views {
        match s.manager.remove_vm(&v.id, force, delete_storage).await {
            Ok(()) => removed.push(v.name.clone()),
            Err(e) => kept.push((v.name.clone(), e.message())),
        }
    }
    if s.json {
        let kept: Vec<_> = kept
            .iter()
            .map(|(name, why)| json!({ "vm": name, "error": why }))
            .collect();
        print_json(&json!({ "removed": removed, "kept": kept }));
    } else {
        for name in &removed {
            println!("removed {name}");
        }
        for (name, why) in &kept {
            println!("kept {name}: {why}");
        }
    }
    Ok(if kept.is_empty() {
        super::ExitCode::Ok
    } else {
        super::ExitCode::Failure
    })
}

pub(super) async fn export(
    s: &Session,
    name: &str,
    dir: &std::path::Path,
) -> Result<(), MaqetError> {
    if s.remote {
        return Err(MaqetError::InvalidArgument(
            "an export writes through an open directory, which cannot cross --host: run maqet export on that machine".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        MaqetError::InvalidArgument(format!("cannot create {}: {e}", dir.display()))
    })?;
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| MaqetError::InvalidArgument(format!("cannot open {}: {e}", dir.display())))?;
    let (files, job) = s.manager.export_vm(name, zbus::Fd::from(&opened)).await?;
    let end = super::snapshot::follow(s, job.clone(), !s.json).await?;
    if s.json {
        print_json(&json!({
            "vm": name, "dir": dir, "files": files, "job": job.as_str(),
            "state": end.state, "message": end.message,
        }));
    } else if end.state == "completed" {
        println!("exported {name} to {}: {}", dir.display(), files.join(", "));
        println!(
            "define it elsewhere with: maqet add --from-export {}",
            dir.display()
        );
    }
    end.into_result()
}

pub(super) async fn clone(
    s: &Session,
    source: &str,
    new_name: &str,
    full: bool,
) -> Result<(), MaqetError> {
    let mut options = std::collections::HashMap::new();
    if full {
        options.insert("full", zbus::Variant::from(true));
    }
    let (path, job) = s.manager.clone_vm(source, new_name, options).await?;
    let kind = if full { "full" } else { "linked" };
    // A full copy is a job: follow it (Ctrl-C cancels it, leaving no clone).
    let end = if job.as_str() == "/" {
        None
    } else {
        Some(super::snapshot::follow(s, job.clone(), !s.json).await?)
    };
    if s.json {
        let mut out =
            json!({ "source": source, "vm": new_name, "path": path.as_str(), "mode": kind });
        if let Some(end) = &end {
            out["job"] = json!(job.as_str());
            out["state"] = json!(end.state);
            out["message"] = json!(end.message);
        }
        print_json(&out);
    } else if end.as_ref().is_none_or(|e| e.state == "completed") {
        println!("cloned {source} as {new_name} ({kind})");
    }
    end.map_or(Ok(()), |e| e.into_result())
}

pub(super) async fn remove(
    s: &Session,
    name: &str,
    force: bool,
    delete_storage: bool,
) -> Result<(), MaqetError> {
    // RemoveVM returns nothing: what it deleted is read before (the files maqet
    // created, from Storage.List) and checked after (which of them are gone).
    let (created, kept) = if delete_storage {
        storage_files(s, name).await?
    } else {
        (Vec::new(), Vec::new())
    };
    s.manager.remove_vm(name, force, delete_storage).await?;
    let deleted: Vec<String> = created
        .into_iter()
        .filter(|p| !std::path::Path::new(p).exists())
        .collect();
    if s.json {
        print_json(&json!({ "removed": name, "deleted_files": deleted, "kept_files": kept }));
    } else {
        println!("removed {name}");
        for p in &deleted {
            println!("deleted {p} (created by maqet)");
        }
        for p in &kept {
            println!("kept {p} (not created by maqet)");
        }
    }
    Ok(())
}

/// A VM's existing disk files: (created by maqet, brought by the user).
async fn storage_files(s: &Session, name: &str) -> Result<(Vec<String>, Vec<String>), MaqetError> {
    let (_, storage): (_, StorageProxy) = vm_object(s, name).await?;
    let (mut created, mut kept) = (Vec::new(), Vec::new());
    for (_, format, path, exists, _, _, by_maqet) in storage.list().await? {
        if !exists || format == "virtfs" {
            continue;
        }
        if by_maqet {
            created.push(path);
        } else {
            kept.push(path);
        }
    }
    Ok((created, kept))
}

pub(super) async fn all_views(s: &Session) -> Result<Vec<VmView>, MaqetError> {
    let om = ObjectManagerProxy::builder(&s.conn)
        .destination(BUS_NAME)
        .path(MANAGER_PATH)
        .build()
        .await?;
    let objects = om.get_managed_objects().await.map_err(zbus::Error::from)?;
    let mut views: Vec<VmView> = objects
        .values()
        .filter_map(|ifaces| ifaces.get(VM_INTERFACE))
        .map(VmView::from_properties)
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(views)
}

pub(super) async fn list(s: &Session, status: Option<&str>) -> Result<(), MaqetError> {
    let mut views = all_views(s).await?;
    if let Some(status) = status {
        views.retain(|v| v.status == status);
        if views.is_empty() && !s.json {
            println!("no VMs are {status}");
            return Ok(());
        }
    }
    if s.json {
        for v in &mut views {
            v.config.clear();
        }
        print_json(&views);
    } else if views.is_empty() {
        println!("no VMs defined; add one with: maqet add --name NAME -c vm.yaml");
    } else {
        println!("{}", vm_table(&views));
    }
    Ok(())
}

pub(super) async fn status(s: &Session, name: &str, with_config: bool) -> Result<(), MaqetError> {
    let mut v = view(s, name).await?;
    if s.json {
        if !with_config {
            v.config.clear();
        }
        print_json(&v);
    } else {
        println!("{}", vm_details(&v));
        if with_config {
            println!("\nConfig:\n{}", v.config);
        }
    }
    Ok(())
}

pub(super) async fn apply(s: &Session, name: &str, file: &str) -> Result<(), MaqetError> {
    let yaml = read_input(file)?;
    let (_, proxy) = vm(s, name).await?;
    let needs_restart = proxy.apply(&yaml).await?;
    if s.json {
        print_json(&json!({ "vm": name, "needs_restart": needs_restart }));
    } else if needs_restart.is_empty() {
        println!("applied to {name}");
    } else {
        println!(
            "applied to {name}; restart it for these changes to take effect: {}",
            needs_restart.join(", ")
        );
    }
    Ok(())
}

pub(super) async fn wait(
    s: &Session,
    name: &str,
    condition: &str,
    timeout: u32,
) -> Result<(), MaqetError> {
    let (_, proxy) = vm(s, name).await?;
    let got = wait_chunked(&proxy, condition, Duration::from_secs(timeout.into())).await?;
    if s.json {
        print_json(&json!({ "vm": name, "condition": condition, "result": got }));
    } else {
        println!("{got}");
    }
    Ok(())
}

/// Live tail of the service's signals (one line, or one JSON object, per signal).
pub(super) async fn events(s: &Session, only: Option<&str>) -> Result<(), MaqetError> {
    let only_id = match only {
        Some(name) => Some(vm(s, name).await?.0),
        None => None,
    };
    let mut names: HashMap<String, String> = s
        .manager
        .list_vms()
        .await?
        .into_iter()
        .map(|(_, name, path, _)| (path.to_string(), name))
        .collect();
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender(BUS_NAME)
        .path_namespace(MANAGER_PATH)
        .build()?;
    let mut stream = MessageStream::for_match_rule(rule, &s.conn, None).await?;
    if !s.json {
        eprintln!("following maqet events (Ctrl-C to stop)…");
    }
    while let Some(msg) = stream.next().await {
        let Ok(msg) = msg else { continue };
        let hdr = msg.header();
        let (Some(path), Some(iface), Some(member)) = (hdr.path(), hdr.interface(), hdr.member())
        else {
            continue;
        };
        if only_id
            .as_ref()
            .is_some_and(|p| p.as_str() != path.as_str())
        {
            continue;
        }
        let time = format_us(crate::time::now_us());
        let vm_name = || {
            names
                .get(path.as_str())
                .cloned()
                .or_else(|| id_from_path(path))
                .unwrap_or_default()
        };
        match (iface.as_str(), member.as_str()) {
            (VM_INTERFACE, "StatusChanged") => {
                let Ok((status, previous, reason)) =
                    msg.body().deserialize::<(String, String, String)>()
                else {
                    continue;
                };
                let vm = vm_name();
                if s.json {
                    println!(
                        "{}",
                        json!({"time": time, "vm": vm, "signal": "StatusChanged", "status": status, "previous": previous, "reason": reason})
                    );
                } else {
                    println!("{time} {vm}: {previous} → {status} ({reason})");
                }
            }
            (QMP_INTERFACE, "Event") => {
                let Ok((event, data, timestamp)) =
                    msg.body().deserialize::<(String, String, u64)>()
                else {
                    continue;
                };
                // QEMU's own time of the event, to the microsecond.
                let time = format!(
                    "{}.{:06}Z",
                    format_us(timestamp).trim_end_matches('Z'),
                    timestamp % 1_000_000
                );
                let vm = vm_name();
                if s.json {
                    let data: serde_json::Value =
                        serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data));
                    println!(
                        "{}",
                        json!({"time": time, "timestamp_us": timestamp, "vm": vm, "signal": "Event", "event": event, "data": data})
                    );
                } else {
                    println!("{time} {vm}: QMP {event} {data}");
                }
            }
            (MANAGER_INTERFACE, "VMAdded" | "VMRemoved") => {
                let Ok((vm_path, name)) = msg.body().deserialize::<(OwnedObjectPath, String)>()
                else {
                    continue;
                };
                if member.as_str() == "VMAdded" {
                    names.insert(vm_path.to_string(), name.clone());
                }
                if s.json {
                    println!(
                        "{}",
                        json!({"time": time, "vm": name, "signal": member.as_str()})
                    );
                } else {
                    let what = if member.as_str() == "VMAdded" {
                        "added"
                    } else {
                        "removed"
                    };
                    println!("{time} {name}: {what}");
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `Start`, with this session's graphical variables when there are any (so a
/// `display: gtk` window opens here, docs/desktop.md); never over `--host`, where they
/// name this machine's screen, not that one's.
async fn start_here(
    s: &Session,
    proxy: &crate::client::VmProxy<'static>,
) -> Result<(), MaqetError> {
    let env: std::collections::HashMap<String, String> = crate::vm::window::GRAPHICAL_VARS
        .iter()
        .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
        .collect();
    if s.remote || env.is_empty() {
        return proxy.start().await;
    }
    let options =
        std::collections::HashMap::from([("environment", zbus::zvariant::Variant::from(env))]);
    proxy.start_with_options(options).await
}
