//! `maqet audit`: who did what, to which VM, and through what (a plain call, a
//! notification button, a desktop shell's search), from maqetd's audit log.

use std::collections::HashMap;

use comfy_table::{Table, presets};
use serde::Serialize;

use super::output::print_json;
use super::session::Session;
use crate::access::Origin;
use crate::error::MaqetError;
use crate::time::{format_local_us, now_us, parse_since};

#[derive(Serialize)]
struct Row {
    time: u64,
    caller_uid: u32,
    caller_pid: u32,
    caller: String,
    action: String,
    vm_id: String,
    /// The VM's current name ("" for a call about no VM; the id's start for a VM
    /// removed since).
    vm: String,
    method: String,
    /// `bus` (a D-Bus call), `notification` (a button), `gnome-search`, `krunner`.
    via: String,
    arguments: String,
    decision: String,
    outcome: String,
    message: String,
}

pub async fn run(
    s: &Session,
    vm: Option<&str>,
    since: Option<&str>,
    limit: u32,
) -> Result<(), MaqetError> {
    let since = since
        .map(|t| parse_since(t, now_us()))
        .transpose()
        .map_err(MaqetError::InvalidArgument)?
        .unwrap_or(0);
    let names: HashMap<String, String> = s
        .manager
        .list_vms()
        .await?
        .into_iter()
        .map(|(id, name, _, _)| (id, name))
        .collect();
    let name_of = |id: &str| match names.get(id) {
        Some(name) => name.clone(),
        None if id.is_empty() => String::new(),
        None => format!("{} (removed)", id.get(..8).unwrap_or(id)),
    };
    let rows: Vec<Row> = s
        .manager
        .audit(vm.unwrap_or(""), since, limit)
        .await?
        .into_iter()
        .map(|r| {
            let (via, arguments) = Origin::split(&r.7);
            Row {
                time: r.0,
                caller_uid: r.1,
                caller_pid: r.2,
                caller: r.3,
                action: r.4,
                vm: name_of(&r.5),
                vm_id: r.5,
                method: r.6,
                via: via.to_string(),
                arguments: arguments.to_string(),
                decision: r.8,
                outcome: r.9,
                message: r.10,
            }
        })
        .collect();
    if s.json {
        print_json(&rows);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no audit entries");
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_header([
        "TIME", "UID", "PID", "VM", "METHOD", "VIA", "ACTION", "DECISION", "OUTCOME",
    ]);
    for r in &rows {
        let outcome = if r.message.is_empty() {
            r.outcome.clone()
        } else {
            format!("{}: {}", r.outcome, r.message)
        };
        t.add_row([
            format_local_us(r.time),
            r.caller_uid.to_string(),
            r.caller_pid.to_string(),
            r.vm.clone(),
            r.method.clone(),
            r.via.clone(),
            r.action.clone(),
            r.decision.clone(),
            outcome,
        ]);
    }
    println!("{t}");
    Ok(())
}
