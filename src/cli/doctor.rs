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
            if host.is_none() {
                rows.extend(graphical_env_row(s).await);
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

/// Whether maqetd's own graphical variables (what QEMU windows get when a start carries
/// none: `Restart`, a notification's button, busctl) still name this session's screen.
/// Read from `/proc/<maqetd>/environ`: maqetd never changes its environment.
async fn graphical_env_row(s: &Session) -> Option<Row> {
    let mine = graphical_vars(std::env::vars());
    if mine.is_empty() {
        // No graphical session here (a text console, ssh): nothing to compare.
        return None;
    }
    let dbus = zbus::fdo::DBusProxy::new(&s.conn).await.ok()?;
    let name = zbus::names::BusName::try_from(crate::client::BUS_NAME).ok()?;
    let pid = dbus.get_connection_unix_process_id(name).await.ok()?;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let service = graphical_vars(environ.split(|b| *b == 0).filter_map(|entry| {
        let entry = String::from_utf8_lossy(entry);
        let (k, v) = entry.split_once('=')?;
        Some((k.to_owned(), v.to_owned()))
    }));
    Some(compare_graphical(&service, &mine))
}

fn graphical_vars(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut found: Vec<_> = vars
        .filter(|(k, _)| crate::vm::window::GRAPHICAL_VARS.contains(&k.as_str()))
        .collect();
    found.sort();
    found
}

fn compare_graphical(service: &[(String, String)], mine: &[(String, String)]) -> Row {
    let show = |vars: &[(String, String)]| {
        if vars.is_empty() {
            return "none".to_owned();
        }
        vars.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if service == mine {
        return row(
            "display-env",
            "ok",
            format!("maqetd's graphical session is this one ({})", show(mine)),
            "",
        );
    }
    row(
        "display-env",
        "warning",
        format!(
            "maqetd's graphical environment is stale: it has {}, this session has {}. \
             `maqet start` passes this session's, but a Restart, a notification's button or a \
             plain D-Bus Start opens QEMU windows (display: gtk/sdl) where maqetd's points",
            show(service),
            show(mine)
        ),
        "systemctl --user import-environment DISPLAY WAYLAND_DISPLAY XAUTHORITY XDG_SESSION_TYPE \
         (or dbus-update-activation-environment --all), then let maqetd restart (it exits when \
         idle) or: systemctl --user restart maqetd",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        graphical_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn a_service_on_another_screen_is_stale() {
        let mine = vars(&[
            ("DISPLAY", ":1"),
            ("HOME", "/h"),
            ("XDG_SESSION_TYPE", "x11"),
        ]);
        assert_eq!(mine.len(), 2);
        let same = compare_graphical(&mine, &mine);
        assert_eq!(same.status, "ok");
        let stale = compare_graphical(&vars(&[("DISPLAY", ":0")]), &mine);
        assert_eq!(stale.status, "warning");
        assert!(stale.message.contains("DISPLAY=:0"), "{}", stale.message);
        assert!(stale.hint.contains("import-environment"));
        let none = compare_graphical(&[], &mine);
        assert!(none.message.contains("it has none"), "{}", none.message);
    }
}
