//! How the CLI shows things: tables and sentences for people, JSON for programs.

use std::collections::HashMap;

use std::ffi::OsStr;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, Ordering};

use comfy_table::{Cell, Color, Table, presets};
use serde::Serialize;
use zbus::OwnedVariant;

use super::exit::{ExitCode, is_unreachable};
use crate::error::MaqetError;
use crate::time::{format_duration_us, format_local_us, now_us};

/// Writes to standard output. A reader that went away (`maqet ls | head -1`) ends maqet
/// at once and quietly with status 0, as the producer of a shell pipeline should: no
/// panic, no error message. (SIGPIPE stays ignored, so a broken D-Bus or ssh connection
/// is still an error maqet reports, not a silent death.)
pub fn write_out(bytes: &[u8]) -> Result<(), MaqetError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(MaqetError::Internal(format!("cannot write to stdout: {e}"))),
    }
}

/// What the CLI's `print!`/`println!` do (see `cli/mod.rs`): [`write_out`], and a
/// stdout that cannot be written at all is reported on stderr.
pub fn print_fmt(args: std::fmt::Arguments<'_>) {
    let text = match args.as_str() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(args.to_string()),
    };
    if let Err(e) = write_out(text.as_bytes()) {
        eprintln!("maqet: {}", e.message());
    }
}

/// A VM as the CLI shows it, read from its D-Bus properties.
#[derive(Debug, Clone, Serialize, Default)]
pub struct VmView {
    pub id: String,
    pub name: String,
    pub status: String,
    pub status_reason: String,
    pub pid: u32,
    pub created_at: u64,
    pub started_at: u64,
    pub stopped_at: u64,
    pub exit_status: i32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub config: String,
}

fn prop<T>(props: &HashMap<String, OwnedVariant>, name: &str) -> Option<T>
where
    T: TryFrom<OwnedVariant>,
{
    props.get(name)?.try_clone().ok()?.try_into().ok()
}

impl VmView {
    pub fn from_properties(props: &HashMap<String, OwnedVariant>) -> VmView {
        VmView {
            id: prop(props, "Id").unwrap_or_default(),
            name: prop(props, "Name").unwrap_or_default(),
            status: prop(props, "Status").unwrap_or_default(),
            status_reason: prop(props, "StatusReason").unwrap_or_default(),
            pid: prop(props, "Pid").unwrap_or_default(),
            created_at: prop(props, "CreatedAt").unwrap_or_default(),
            started_at: prop(props, "StartedAt").unwrap_or_default(),
            stopped_at: prop(props, "StoppedAt").unwrap_or_default(),
            exit_status: prop(props, "ExitStatus").unwrap_or(-1),
            config: prop(props, "Config").unwrap_or_default(),
        }
    }

    fn has_process(&self) -> bool {
        self.pid != 0
    }

    pub fn uptime(&self) -> String {
        if self.has_process() && self.started_at > 0 {
            format_duration_us(now_us().saturating_sub(self.started_at))
        } else {
            "-".into()
        }
    }

    pub fn pid_text(&self) -> String {
        if self.pid == 0 {
            "-".into()
        } else {
            self.pid.to_string()
        }
    }
}

pub fn print_json<T: Serialize>(value: &T) {
    if FORMAT.load(Ordering::Relaxed) == Format::Yaml as u8 {
        match serde_yaml::to_string(value) {
            Ok(s) => print!("{s}"),
            Err(e) => eprintln!("maqet: cannot encode YAML: {e}"),
        }
        return;
    }
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("maqet: cannot encode JSON: {e}"),
    }
}

/// `--format` (maqet 0.0.x's spelling): `json` is `--json`; `yaml` is `--json`'s
/// document as YAML (streams, `events` and `logs -f`, stay one JSON object per line);
/// `table` and `auto` are the default; `plain` is the default without colour.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Auto,
    Table,
    Plain,
    Json,
    Yaml,
}

static FORMAT: AtomicU8 = AtomicU8::new(Format::Auto as u8);

/// Chooses the output format for the rest of the run; returns whether it is
/// machine-readable (what `--json` turns on).
pub fn set_format(format: Format) -> bool {
    FORMAT.store(format as u8, Ordering::Relaxed);
    matches!(format, Format::Json | Format::Yaml)
}

/// One compact JSON object per line, for streams (`events`, `logs -f`).
pub fn print_json_line<T: Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("maqet: cannot encode JSON: {e}"),
    }
}

/// Colour is for people at a terminal: never when stdout is not a terminal, never
/// with `NO_COLOR` set to anything but empty (no-color.org), never on a dumb terminal.
pub fn colour_enabled() -> bool {
    if FORMAT.load(Ordering::Relaxed) == Format::Plain as u8 {
        return false;
    }
    colour_decision(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
        std::env::var_os("TERM").as_deref(),
    )
}

fn colour_decision(tty: bool, no_color: Option<&OsStr>, term: Option<&OsStr>) -> bool {
    tty && no_color.is_none_or(OsStr::is_empty) && term != Some(OsStr::new("dumb"))
}

/// A status, coloured by what it means when colour is on.
fn status_cell(status: &str, colour: bool) -> Cell {
    let cell = Cell::new(status);
    if !colour {
        return cell;
    }
    match status {
        "running" => cell.fg(Color::Green),
        "paused" | "starting" | "stopping" => cell.fg(Color::Yellow),
        "crashed" | "failed" => cell.fg(Color::Red),
        _ => cell,
    }
}

pub fn vm_table(vms: &[VmView]) -> String {
    let colour = colour_enabled();
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_header(["NAME", "STATUS", "PID", "UPTIME", "ID"]);
    for vm in vms {
        t.add_row([
            Cell::new(&vm.name),
            status_cell(&vm.status, colour),
            Cell::new(vm.pid_text()),
            Cell::new(vm.uptime()),
            Cell::new(&vm.id),
        ]);
    }
    t.to_string()
}

pub fn vm_details(vm: &VmView) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    let rows: [(&str, String); 9] = [
        ("Name", vm.name.clone()),
        ("Id", vm.id.clone()),
        ("Status", vm.status.clone()),
        ("Reason", vm.status_reason.clone()),
        ("Pid", vm.pid_text()),
        ("Uptime", vm.uptime()),
        ("Created", format_local_us(vm.created_at)),
        ("Started", format_local_us(vm.started_at)),
        (
            "Stopped",
            if vm.stopped_at == 0 {
                "never".into()
            } else if vm.exit_status >= 0 {
                format!(
                    "{} (exit status {})",
                    format_local_us(vm.stopped_at),
                    vm.exit_status
                )
            } else {
                format_local_us(vm.stopped_at)
            },
        ),
    ];
    let colour = colour_enabled();
    for (k, v) in rows {
        let value = if k == "Status" {
            status_cell(&v, colour)
        } else {
            Cell::new(v)
        };
        t.add_row([Cell::new(format!("{k}:")), value]);
    }
    t.to_string()
}

/// Prints an error the way the user asked for output; for an unreachable service, says
/// what to check (`host`: the machine of `--host`).
pub fn print_error(e: &MaqetError, json: bool, host: Option<&str>) {
    let code = ExitCode::for_error(e);
    let mut message = e.message();
    if let MaqetError::ZBus(z) = e
        && is_unreachable(z)
    {
        message = match (z, host) {
            // Already explained where the ssh connection failed.
            (zbus::Error::Address(m), Some(_)) => m.clone(),
            (_, Some(h)) => format!(
                "cannot reach maqetd on {h} ({z}). Is maqet installed for that user \
                 (maqet setup --user, run there)?"
            ),
            (_, None) => format!(
                "cannot reach maqetd on the session bus ({z}). Check that a session bus is running \
                 (DBUS_SESSION_BUS_ADDRESS), that maqetd is installed for you (maqet setup --user; \
                 README: scripts/demo sets one up), or start `maqetd` by hand"
            ),
        };
    }
    if json {
        print_json(&serde_json::json!({
            "error": { "kind": e.kind(), "message": message, "exit_code": code.code() }
        }));
    } else {
        eprintln!("maqet: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_for_a_terminal_without_no_color() {
        let term = Some(OsStr::new("xterm-256color"));
        assert!(colour_decision(true, None, term));
        assert!(!colour_decision(false, None, term), "not a terminal");
        assert!(
            !colour_decision(true, Some(OsStr::new("1")), term),
            "NO_COLOR"
        );
        assert!(
            colour_decision(true, Some(OsStr::new("")), term),
            "empty NO_COLOR"
        );
        assert!(!colour_decision(true, None, Some(OsStr::new("dumb"))));
    }
}
