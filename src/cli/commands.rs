//! One function per subcommand. Each talks to maqetd only through the proxies.

use std::collections::HashMap;
use std::io::Read;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use zbus::fdo::ObjectManagerProxy;
use zbus::message::Type as MessageType;
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath};

use super::output::{VmView, print_json, vm_details, vm_table};
use super::{Cli, Command};
use crate::client::{
    BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH, ManagerProxy, VM_INTERFACE, VmProxy, id_from_path,
    vm_proxy,
};
use crate::error::MaqetError;
use crate::time::format_us;

/// Keep each blocking call well under the bus's default 25 s reply timeout.
const CALL_CHUNK: Duration = Duration::from_secs(20);
/// A stop's escalation after the graceful timeout: quit, SIGTERM, SIGKILL.
const STOP_ESCALATION: Duration = Duration::from_secs(15);

struct Session {
    conn: Connection,
    manager: ManagerProxy<'static>,
    json: bool,
}

pub async fn run(cli: Cli) -> Result<(), MaqetError> {
    let conn = Connection::session().await?;
    let manager = ManagerProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let s = Session {
        conn,
        manager,
        json: cli.json,
    };
    match cli.command {
        Command::Add {
            name,
            configs,
            files,
        } => {
            add(
                &s,
                name.unwrap_or_default(),
                configs.into_iter().chain(files).collect(),
            )
            .await
        }
        Command::Start { vm } => lifecycle(&s, &vm, "start").await,
        Command::Stop {
            vm,
            force,
            timeout,
            no_wait,
        } => stop(&s, &vm, force, timeout, no_wait).await,
        Command::Restart { vm } => lifecycle(&s, &vm, "restart").await,
        Command::Reset { vm } => lifecycle(&s, &vm, "reset").await,
        Command::Pause { vm } => lifecycle(&s, &vm, "pause").await,
        Command::Resume { vm } => lifecycle(&s, &vm, "resume").await,
        Command::Rm {
            vm,
            force,
            delete_storage,
        } => remove(&s, &vm, force, delete_storage).await,
        Command::Ls => list(&s).await,
        Command::Status { vm } => status(&s, &vm, false).await,
        Command::Inspect { vm, config } => {
            if config {
                let v = view(&s, &vm).await?;
                print!("{}", v.config);
                Ok(())
            } else {
                status(&s, &vm, true).await
            }
        }
        Command::Apply { vm, file } => apply(&s, &vm, &file).await,
        Command::Wait {
            vm,
            condition,
            timeout,
        } => wait(&s, &vm, &condition, timeout).await,
        Command::Events { vm } => events(&s, vm.as_deref()).await,
    }
}

async fn vm(s: &Session, name: &str) -> Result<(OwnedObjectPath, VmProxy<'static>), MaqetError> {
    let path = s.manager.find_vm(name).await?;
    let proxy = vm_proxy(&s.conn, path.clone()).await?;
    Ok((path, proxy))
}

/// All properties of one VM in one round trip.
async fn view(s: &Session, name: &str) -> Result<VmView, MaqetError> {
    let (path, _) = vm(s, name).await?;
    let props = zbus::fdo::PropertiesProxy::builder(&s.conn)
        .destination(BUS_NAME)
        .path(path)
        .build()
        .await?
        .get_all(VM_INTERFACE.try_into().expect("valid interface name"))
        .await
        .map_err(zbus::Error::from)?;
    Ok(VmView::from_properties(&props))
}

fn read_input(file: &str) -> Result<String, MaqetError> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| MaqetError::InvalidArgument(format!("cannot read stdin: {e}")))?;
        Ok(text)
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| MaqetError::InvalidArgument(format!("cannot read {file}: {e}")))
    }
}

async fn add(s: &Session, name: String, files: Vec<String>) -> Result<(), MaqetError> {
    let path = if files.len() == 1 && files[0] == "-" {
        s.manager.add_vm(&name, &read_input("-")?).await?
    } else {
        if files.is_empty() {
            return Err(MaqetError::InvalidArgument(
                "no config given: maqet add [--name NAME] -c FILE [-c FILE…] (or - for stdin)"
                    .into(),
            ));
        }
        // The service cannot know our working directory: send absolute paths.
        let abs = files
            .iter()
            .map(|f| {
                std::path::absolute(f)
                    .map(|p| p.to_string_lossy().into_owned())
                    .map_err(|e| MaqetError::InvalidArgument(format!("bad path {f}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&str> = abs.iter().map(String::as_str).collect();
        s.manager.add_vm_from_files(&name, &refs).await?
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

async fn lifecycle(s: &Session, name: &str, op: &str) -> Result<(), MaqetError> {
    let (_, proxy) = vm(s, name).await?;
    match op {
        "start" => proxy.start().await?,
        "restart" => proxy.restart().await?,
        "reset" => proxy.reset().await?,
        "pause" => proxy.pause().await?,
        "resume" => proxy.resume().await?,
        other => unreachable!("unknown lifecycle op {other}"),
    }
    report(s, name).await
}

async fn report(s: &Session, name: &str) -> Result<(), MaqetError> {
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

async fn stop(
    s: &Session,
    name: &str,
    force: bool,
    timeout: u32,
    no_wait: bool,
) -> Result<(), MaqetError> {
    let (_, proxy) = vm(s, name).await?;
    if !s.json && !force && !no_wait {
        eprintln!("stopping {name}: ACPI power-down, escalating after {timeout} s…");
    }
    proxy.stop(force, timeout).await?;
    if !no_wait {
        let limit = Duration::from_secs(timeout.into()) + STOP_ESCALATION;
        wait_chunked(&proxy, "status=stopped|crashed|failed|created", limit).await?;
    }
    report(s, name).await
}

/// `Wait` in chunks that each fit the bus's reply timeout.
async fn wait_chunked(
    proxy: &VmProxy<'_>,
    condition: &str,
    limit: Duration,
) -> Result<String, MaqetError> {
    let deadline = Instant::now() + limit;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let chunk = remaining.min(CALL_CHUNK);
        match proxy.wait(condition, chunk.as_secs() as u32).await {
            Err(MaqetError::Timeout(_)) if remaining > chunk => continue,
            other => return other,
        }
    }
}

async fn remove(
    s: &Session,
    name: &str,
    force: bool,
    delete_storage: bool,
) -> Result<(), MaqetError> {
    s.manager.remove_vm(name, force, delete_storage).await?;
    if s.json {
        print_json(&json!({ "removed": name }));
    } else {
        println!("removed {name}");
    }
    Ok(())
}

async fn all_views(s: &Session) -> Result<Vec<VmView>, MaqetError> {
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

async fn list(s: &Session) -> Result<(), MaqetError> {
    let mut views = all_views(s).await?;
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

async fn status(s: &Session, name: &str, with_config: bool) -> Result<(), MaqetError> {
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

async fn apply(s: &Session, name: &str, file: &str) -> Result<(), MaqetError> {
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

async fn wait(s: &Session, name: &str, condition: &str, timeout: u32) -> Result<(), MaqetError> {
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
async fn events(s: &Session, only: Option<&str>) -> Result<(), MaqetError> {
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
        match (iface.as_str(), member.as_str()) {
            (VM_INTERFACE, "StatusChanged") => {
                let Ok((status, previous, reason)) =
                    msg.body().deserialize::<(String, String, String)>()
                else {
                    continue;
                };
                let vm = names
                    .get(path.as_str())
                    .cloned()
                    .or_else(|| id_from_path(path))
                    .unwrap_or_default();
                if s.json {
                    println!(
                        "{}",
                        json!({"time": time, "vm": vm, "signal": "StatusChanged", "status": status, "previous": previous, "reason": reason})
                    );
                } else {
                    println!("{time} {vm}: {previous} → {status} ({reason})");
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
