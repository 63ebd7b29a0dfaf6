//! The monitor commands: `qmp`, `keys`, `type`, `screendump`, `device add|del`.

use std::collections::HashMap;
use std::io::Write;

use clap::Subcommand;
use serde_json::json;
use zbus::Variant;

use super::output::print_json;
use super::session::{Session, qmp, vm};
use crate::error::MaqetError;

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Hot-plug a device, e.g. `maqet device add web virtio-rng-pci rng1 --prop bus=rp1`.
    Add {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        driver: String,
        id: String,
        /// A device property; `true`/`false` and integers are sent typed, the rest as
        /// strings. Repeat for several.
        #[arg(long = "prop", value_name = "KEY=VALUE")]
        props: Vec<String>,
    },
    /// Hot-unplug a device; waits up to 10 s for QEMU to report it gone.
    Del {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        id: String,
    },
}

/// Runs one QMP command and prints QEMU's answer as JSON.
pub(super) async fn execute(
    s: &Session,
    name: &str,
    command: &str,
    arguments: &str,
    allow_dangerous: bool,
) -> Result<(), MaqetError> {
    let proxy = qmp(s, name).await?;
    let result = proxy.execute(command, arguments, allow_dangerous).await?;
    let value: serde_json::Value = serde_json::from_str(&result)
        .map_err(|e| MaqetError::Internal(format!("maqetd sent invalid JSON ({e}): {result}")))?;
    print_json(&value);
    Ok(())
}

pub(super) async fn keys(
    s: &Session,
    name: &str,
    combos: &[String],
    hold_ms: u32,
) -> Result<(), MaqetError> {
    let (_, proxy) = vm(s, name).await?;
    let refs: Vec<&str> = combos.iter().map(String::as_str).collect();
    proxy.send_keys(&refs, hold_ms).await?;
    if s.json {
        print_json(&json!({ "vm": name, "keys": combos }));
    } else {
        println!("sent {} to {name}", plural(combos.len(), "key combination"));
    }
    Ok(())
}

pub(super) async fn type_text(s: &Session, name: &str, text: &str) -> Result<(), MaqetError> {
    let text = unescape(text);
    let (_, proxy) = vm(s, name).await?;
    proxy.type_text(&text).await?;
    let count = text.chars().count();
    if s.json {
        print_json(&json!({ "vm": name, "characters": count }));
    } else {
        println!("typed {} into {name}", plural(count, "character"));
    }
    Ok(())
}

/// Writes the PNG to `file` (`-`: standard output).
pub(super) async fn screendump(s: &Session, name: &str, file: &str) -> Result<(), MaqetError> {
    s.need_fd_passing("screendump")?;
    let (_, proxy) = vm(s, name).await?;
    let fd = proxy.screendump().await?;
    let mut png = std::fs::File::from(std::os::fd::OwnedFd::from(fd));
    let failed =
        |e: std::io::Error| MaqetError::InvalidArgument(format!("cannot write {file}: {e}"));
    let bytes = if file == "-" {
        let mut out = std::io::stdout().lock();
        let n = std::io::copy(&mut png, &mut out).map_err(failed)?;
        out.flush().map_err(failed)?;
        n
    } else {
        let mut out = std::fs::File::create(file).map_err(failed)?;
        std::io::copy(&mut png, &mut out).map_err(failed)?
    };
    if bytes == 0 {
        return Err(MaqetError::Internal(
            "maqetd returned an empty screendump".into(),
        ));
    }
    if file == "-" {
        // Standard output holds the image.
    } else if s.json {
        print_json(&json!({ "vm": name, "file": file, "bytes": bytes }));
    } else {
        println!("wrote {file} ({bytes} bytes of PNG)");
    }
    Ok(())
}

pub(super) async fn device(s: &Session, cmd: DeviceCommand) -> Result<(), MaqetError> {
    match cmd {
        DeviceCommand::Add {
            vm,
            driver,
            id,
            props,
        } => {
            let props = parse_props(&props)?;
            qmp(s, &vm).await?.device_add(&driver, &id, props).await?;
            if s.json {
                print_json(&json!({ "vm": vm, "added": id, "driver": driver }));
            } else {
                println!("added {driver} '{id}' to {vm}");
            }
        }
        DeviceCommand::Del { vm, id } => {
            qmp(s, &vm).await?.device_del(&id).await?;
            if s.json {
                print_json(&json!({ "vm": vm, "removed": id }));
            } else {
                println!("removed '{id}' from {vm}");
            }
        }
    }
    Ok(())
}

/// `KEY=VALUE` pairs: `true`/`false` → booleans, integers → numbers, else strings.
fn parse_props(props: &[String]) -> Result<HashMap<&str, Variant<'_>>, MaqetError> {
    props
        .iter()
        .map(|p| {
            let (key, value) = p.split_once('=').ok_or_else(|| {
                MaqetError::InvalidArgument(format!(
                    "--prop {p}: expected KEY=VALUE, e.g. --prop bus=rp1"
                ))
            })?;
            let value = match value {
                "true" => Variant::from(true),
                "false" => Variant::from(false),
                v => match (v.parse::<i64>(), v.parse::<u64>()) {
                    (Ok(n), _) => Variant::from(n),
                    (_, Ok(n)) => Variant::from(n),
                    _ => Variant::from(v),
                },
            };
            Ok((key, value))
        })
        .collect()
}

/// Shell arguments cannot easily hold a newline: `\n` is Enter, `\t` Tab, `\\` a
/// backslash; any other backslash stays as typed (so `C:\Users` needs no escaping).
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let replacement = match chars.peek() {
                Some('n') => Some('\n'),
                Some('t') => Some('\t'),
                Some('\\') => Some('\\'),
                _ => None,
            };
            if let Some(r) = replacement {
                chars.next();
                out.push(r);
                continue;
            }
        }
        out.push(c);
    }
    out
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(unescape(r"root\n"), "root\n");
        assert_eq!(unescape(r"a\tb\\n"), "a\tb\\n");
        assert_eq!(unescape(r"C:\Users\x"), r"C:\Users\x");
        assert_eq!(unescape("trailing\\"), "trailing\\");
    }

    #[test]
    fn props_are_typed() {
        let raw: Vec<String> = [
            "bus=rp1",
            "chassis=3",
            "on=true",
            "big=18446744073709551615",
            "x=a=b",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = parse_props(&raw).unwrap();
        assert_eq!(p["bus"], Variant::from("rp1"));
        assert_eq!(p["chassis"], Variant::from(3i64));
        assert_eq!(p["on"], Variant::from(true));
        assert_eq!(p["big"], Variant::from(u64::MAX));
        assert_eq!(p["x"], Variant::from("a=b"));
        assert!(parse_props(&["nobus".to_string()]).is_err());
    }
}
