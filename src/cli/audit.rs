//! `maqet audit`: who did what, from maqetd's audit log.

use comfy_table::{Table, presets};
use serde::Serialize;

use super::output::print_json;
use super::session::Session;
use crate::error::MaqetError;
use crate::time::{format_us, now_us, parse_since};

#[derive(Serialize)]
struct Row {
    time: u64,
    caller_uid: u32,
    caller_pid: u32,
    caller: String,
    action: String,
    vm_id: String,
    method: String,
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
    let rows: Vec<Row> = s
        .manager
        .audit(vm.unwrap_or(""), since, limit)
        .await?
        .into_iter()
        .map(|r| Row {
            time: r.0,
            caller_uid: r.1,
            caller_pid: r.2,
            caller: r.3,
            action: r.4,
            vm_id: r.5,
            method: r.6,
            arguments: r.7,
            decision: r.8,
            outcome: r.9,
            message: r.10,
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
        "TIME", "UID", "PID", "METHOD", "ACTION", "DECISION", "OUTCOME",
    ]);
    for r in &rows {
        let outcome = if r.message.is_empty() {
            r.outcome.clone()
        } else {
            format!("{}: {}", r.outcome, r.message)
        };
        t.add_row([
            format_us(r.time),
            r.caller_uid.to_string(),
            r.caller_pid.to_string(),
            r.method.clone(),
            r.action.clone(),
            r.decision.clone(),
            outcome,
        ]);
    }
    println!("{t}");
    Ok(())
}
