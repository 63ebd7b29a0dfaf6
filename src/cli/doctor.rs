//! `maqet doctor`: the bus and the service from the CLI's side, then maqetd's own
//! checks (`Manager.Doctor`).

use comfy_table::{Table, presets};
use serde::Serialize;

use super::ExitCode;
use super::output::print_json;
use super::session::Session;
use crate::error::MaqetError;

#[derive(Serialize)]
struct Row {
    check: String,
    status: String,
    message: String,
    hint: String,
}

fn row(check: &str, status: &str, message: String, hint: &str) -> Row {
    Row {
        check: check.into(),
        status: status.into(),
        message,
        hint: hint.into(),
    }
}

/// Prints every finding; the exit code says whether any check failed.
pub async fn run(json: bool, fix: bool, host: Option<&str>) -> Result<ExitCode, MaqetError> {
    let mut rows = Vec::new();
    let session = match Session::connect(json, host).await {
        Ok(s) => {
            rows.push(row("bus", "ok", "session bus reachable".into(), ""));
            Some(s)
        }
        Err(e) => {
            rows.push(row(
                "bus",
                "error",
                format!("cannot connect to the session bus: {e}"),
                "log in to a desktop session, or start one: eval $(dbus-launch --sh-syntax)",
            ));
            None
        }
    };
    if let Some(s) = &session {
        match s.manager.version().await {
            Ok(v) if v == env!("CARGO_PKG_VERSION") => {
                rows.push(row("service", "ok", format!("maqetd {v}"), ""))
            }
            Ok(v) => rows.push(row(
                "service",
                "warning",
                format!("maqetd is {v}, this CLI is {}", env!("CARGO_PKG_VERSION")),
                "restart maqetd after upgrading (systemctl --user restart maqetd)",
            )),
            Err(e) => rows.push(row(
                "service",
                "error",
                format!("maqetd cannot be reached or activated: {e}"),
                "install maqetd for your session (maqet setup --user) or run maqetd by hand",
            )),
        }
        if rows.last().is_some_and(|r| r.status != "error") {
            match s.manager.polkit_available().await {
                Ok(true) => rows.push(row("polkit", "ok", "polkitd is reachable".into(), "")),
                Ok(false) => rows.push(row(
                    "polkit",
                    "warning",
                    "polkitd is not reachable: actions the policy marks `auth` are denied".into(),
                    "install polkitd, or set those actions to yes/no in policy.yaml",
                )),
                Err(_) => {}
            }
            for (check, status, message, hint) in s.manager.doctor(fix).await? {
                rows.push(Row {
                    check,
                    status,
                    message,
                    hint,
                });
            }
        }
    }
    let failed = rows.iter().any(|r| r.status == "error");
    if json {
        print_json(&rows);
    } else {
        let mut t = Table::new();
        t.load_preset(presets::NOTHING)
            .set_header(["CHECK", "STATUS", "FINDING"]);
        for r in &rows {
            let mut finding = r.message.clone();
            if !r.hint.is_empty() {
                finding.push_str(&format!("\n→ {}", r.hint));
            }
            t.add_row([r.check.clone(), r.status.clone(), finding]);
        }
        println!("{t}");
    }
    Ok(if failed {
        ExitCode::Failure
    } else {
        ExitCode::Ok
    })
}
