//! `maqet exec`, `ip`, `cp`, `ssh`: reaching inside a guest through its agent
//! (`org.maqet.Maqet1.Guest`) and its forwards.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};

use super::output;
use super::session::{self, Session};
use crate::client::{GuestProxy, VmProxy};
use crate::error::MaqetError;

/// The most `maqet exec` forwards as standard input, and `maqet cp` copies.
const MAX_STDIN: u64 = 16 << 20;
const MAX_COPY: u64 = 64 << 20;

async fn guest(s: &Session, vm: &str) -> Result<GuestProxy<'static>, MaqetError> {
    Ok(session::vm_object::<GuestProxy>(s, vm).await?.1)
}

/// Runs a command in the guest; returns its exit code (0-255) for the CLI to exit with.
pub async fn exec(
    s: &Session,
    vm: &str,
    command: &[String],
    timeout: u32,
) -> Result<u8, MaqetError> {
    let guest = guest(s, vm).await?;
    // A terminal on stdin means nobody piped anything in: send none.
    let mut stdin = Vec::new();
    if !std::io::stdin().is_terminal() {
        std::io::stdin()
            .take(MAX_STDIN + 1)
            .read_to_end(&mut stdin)
            .map_err(|e| MaqetError::InvalidArgument(format!("cannot read stdin: {e}")))?;
        if stdin.len() as u64 > MAX_STDIN {
            return Err(MaqetError::InvalidArgument(format!(
                "standard input is larger than {MAX_STDIN} bytes; copy it in with `maqet cp` instead"
            )));
        }
    }
    let argv: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut options = HashMap::new();
    if timeout != 0 {
        options.insert("timeout", zbus::Variant::from(timeout));
    }
    let (code, out, err) = guest.exec(&argv, &stdin, options).await?;
    if s.json {
        output::print_json(&serde_json::json!({
            "exit_code": code,
            "stdout": String::from_utf8_lossy(&out),
            "stderr": String::from_utf8_lossy(&err),
        }));
    } else {
        let _ = std::io::stdout().write_all(&out);
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().write_all(&err);
    }
    Ok(code.clamp(0, 255) as u8)
}

/// The guest's addresses (refreshed first when the agent answers).
pub async fn ip(s: &Session, vm: &str) -> Result<(), MaqetError> {
    let guest = guest(s, vm).await?;
    let refreshed = guest.refresh_addresses().await;
    let addresses = guest.addresses().await.map_err(MaqetError::from)?;
    if addresses.is_empty() {
        refreshed?;
    }
    if s.json {
        let rows: Vec<_> = addresses
            .iter()
            .map(|(i, f, a)| serde_json::json!({"interface": i, "family": f, "address": a}))
            .collect();
        output::print_json(&rows);
    } else {
        for (interface, family, address) in addresses {
            println!("{interface}\t{family}\t{address}");
        }
    }
    Ok(())
}

/// `VM:/path` → (VM, /path); anything else is a local path.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (vm, path) = spec.split_once(':')?;
    (!vm.is_empty() && !vm.contains('/') && path.starts_with('/')).then_some((vm, path))
}

/// Copies one file into or out of a guest; `-` is stdin or stdout.
pub async fn cp(s: &Session, from: &str, to: &str) -> Result<(), MaqetError> {
    match (remote(from), remote(to)) {
        (Some((vm, path)), None) => {
            let data = guest(s, vm).await?.read_file(path, MAX_COPY).await?;
            if to == "-" {
                std::io::stdout()
                    .write_all(&data)
                    .and_then(|()| std::io::stdout().flush())
                    .map_err(|e| MaqetError::Internal(format!("cannot write stdout: {e}")))?;
            } else {
                std::fs::write(to, &data)
                    .map_err(|e| MaqetError::InvalidArgument(format!("cannot write {to}: {e}")))?;
            }
            if s.json {
                output::print_json(&serde_json::json!({"copied": data.len()}));
            }
            Ok(())
        }
        (None, Some((vm, path))) => {
            let (data, mode) = read_local(from)?;
            guest(s, vm).await?.write_file(path, &data, mode).await?;
            if s.json {
                output::print_json(&serde_json::json!({"copied": data.len()}));
            }
            Ok(())
        }
        _ => Err(MaqetError::InvalidArgument(
            "name exactly one side as VM:/absolute/path, e.g. `maqet cp web:/etc/hostname .` or `maqet cp notes.txt web:/root/notes.txt`".into(),
        )),
    }
}

/// A local file (or stdin) and the permission bits to give its copy (0: the guest's
/// default).
fn read_local(from: &str) -> Result<(Vec<u8>, u32), MaqetError> {
    let mut data = Vec::new();
    let mode = if from == "-" {
        std::io::stdin()
            .take(MAX_COPY + 1)
            .read_to_end(&mut data)
            .map(|_| 0)
    } else {
        std::fs::File::open(from).and_then(|f| {
            use std::os::unix::fs::PermissionsExt;
            let meta = f.metadata()?;
            if !meta.is_file() {
                return Err(std::io::Error::other("not a regular file"));
            }
            f.take(MAX_COPY + 1).read_to_end(&mut data)?;
            Ok(meta.permissions().mode() & 0o7777)
        })
    }
    .map_err(|e| MaqetError::InvalidArgument(format!("cannot read {from}: {e}")))?;
    if data.len() as u64 > MAX_COPY {
        return Err(MaqetError::InvalidArgument(format!(
            "{from} is larger than {MAX_COPY} bytes, more than maqet cp copies"
        )));
    }
    Ok((data, mode))
}

/// `maqet ssh VM [-- ARGS]`: through a forward to the guest's port 22 (added on a free
/// host port when there is none), as the config's `ssh_user`.
pub async fn ssh(
    s: &Session,
    vm_name: &str,
    host: Option<&str>,
    args: &[String],
) -> Result<(), MaqetError> {
    let (_, vm): (_, VmProxy) = session::vm(s, vm_name).await?;
    let forwards = vm.forwards().await.map_err(MaqetError::from)?;
    let existing = forwards.iter().find_map(|spec| {
        let f = crate::config::Forward::parse(spec).ok()?;
        (f.guest == 22 && f.proto == crate::config::Proto::Tcp).then_some(f.host)
    });
    let port = match existing {
        Some(port) => port,
        None => add_ssh_forward(&vm).await?,
    };
    let config = vm.config().await.map_err(MaqetError::from)?;
    let user = serde_yaml::from_str::<serde_yaml::Value>(&config)
        .ok()
        .and_then(|v| v.get("ssh_user")?.as_str().map(str::to_owned));
    let client = std::env::var("MAQET_SSH_CLIENT").unwrap_or_else(|_| "ssh".into());
    let mut cmd = std::process::Command::new(client);
    cmd.args(["-p", &port.to_string()])
        // One known_hosts entry per VM, not per (changing) port of 127.0.0.1.
        .args(["-o", &format!("HostKeyAlias=maqet-{vm_name}")]);
    if let Some(user) = &user {
        cmd.args(["-l", user]);
    }
    if let Some(host) = host {
        // The forward listens on the service's machine: jump through it.
        cmd.args(["-J", host]);
    }
    cmd.arg("127.0.0.1").args(args);
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(MaqetError::Internal(format!("cannot run ssh: {err}")))
}

/// Adds a forward from a free local port to the guest's port 22; a port free here may
/// be taken by the time maqetd binds it (or on its machine): a few tries.
async fn add_ssh_forward(vm: &VmProxy<'_>) -> Result<u16, MaqetError> {
    let mut last = None;
    for _ in 0..5 {
        let port = free_port()?;
        match vm.add_forward(&format!("tcp:127.0.0.1:{port}:22")).await {
            Ok(()) => return Ok(port),
            Err(e @ MaqetError::InvalidArgument(_)) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| MaqetError::Internal("no free port for ssh".into())))
}

fn free_port() -> Result<u16, MaqetError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| MaqetError::Internal(format!("cannot find a free port: {e}")))
}

#[cfg(test)]
mod tests {
    use super::remote;

    #[test]
    fn remote_paths_name_a_vm_and_an_absolute_path() {
        assert_eq!(remote("web:/etc/hostname"), Some(("web", "/etc/hostname")));
        assert_eq!(remote("./web:/x"), None);
        assert_eq!(remote("web:rel"), None);
        assert_eq!(remote("/tmp/a:b"), None);
        assert_eq!(remote("-"), None);
        assert_eq!(remote(":/x"), None);
    }
}
