//! `maqet --host [USER@]MACHINE`: the session bus of a user on another machine, over ssh.
//!
//! zbus's `unixexec` transport runs `ssh MACHINE systemd-stdio-bridge …` and speaks
//! D-Bus over its standard input and output; on the far side the bridge connects to that
//! user's session bus (`DBUS_SESSION_BUS_ADDRESS`, else `$XDG_RUNTIME_DIR/bus`, else
//! `/run/user/UID/bus`), where D-Bus activation starts maqetd as usual. `MAQET_SSH` replaces the `ssh` command (e.g.
//! `ssh -p 2222 -i ~/.ssh/vmhost`). A pipe carries no file descriptors, so calls that
//! hand one over (console, QEMU log, screendump) need a local connection.

use std::ffi::OsString;

use zbus::Connection;
use zbus::address::transport::{Transport, Unixexec};

use crate::error::MaqetError;

/// Run by the remote user's login shell (whatever it is, `sh` reads the script): the
/// bridge on that user's session bus, or a message saying what is missing. The address
/// is passed explicitly because systemd 252 (Debian 12) ignores `--user` and opens the
/// system bus; errors go to stderr (by default the bridge logs them to the kernel log).
const REMOTE_COMMAND: &str = "sh -c 'command -v systemd-stdio-bridge >/dev/null 2>&1 || \
{ echo \"maqet: systemd-stdio-bridge is not installed on $(hostname) (it comes with systemd)\" >&2; exit 127; }; \
export SYSTEMD_LOG_TARGET=console; \
exec systemd-stdio-bridge --bus-path=\"${DBUS_SESSION_BUS_ADDRESS:-unix:path=${XDG_RUNTIME_DIR:-/run/user/$(id -u)}/bus}\"'";

/// The ssh command line: `MAQET_SSH` (split on spaces) or plain `ssh`, then ours.
fn ssh_argv(host: &str, ssh: Option<&str>) -> Result<(String, Vec<OsString>), MaqetError> {
    ssh_argv_running(host, ssh, REMOTE_COMMAND)
}

/// `(program, args)` running `command` (a shell command line) on `host`, as
/// [`connect`] does: `MAQET_SSH` or `ssh`, no terminal.
pub fn ssh_command(host: &str, command: &str) -> Result<(String, Vec<OsString>), MaqetError> {
    ssh_argv_running(host, std::env::var("MAQET_SSH").ok().as_deref(), command)
}

fn ssh_argv_running(
    host: &str,
    ssh: Option<&str>,
    command: &str,
) -> Result<(String, Vec<OsString>), MaqetError> {
    if host.is_empty() || host.starts_with('-') || host.chars().any(char::is_whitespace) {
        return Err(MaqetError::InvalidArgument(format!(
            "bad --host '{host}': give [USER@]MACHINE (ssh options go in MAQET_SSH)"
        )));
    }
    let mut words = ssh.unwrap_or("ssh").split_whitespace().map(str::to_string);
    let program = words
        .next()
        .ok_or_else(|| MaqetError::InvalidArgument("MAQET_SSH is empty".into()))?;
    let mut args: Vec<OsString> = words.map(OsString::from).collect();
    // No terminal: the channel carries D-Bus bytes, not a session.
    args.extend(["-T", "--", host, command].map(OsString::from));
    Ok((program, args))
}

pub async fn connect(host: &str) -> Result<Connection, MaqetError> {
    let ssh = std::env::var("MAQET_SSH").ok();
    let (program, args) = ssh_argv(host, ssh.as_deref())?;
    let transport = Unixexec::new(program.clone().into(), None, args);
    zbus::connection::Builder::address(zbus::Address::from(Transport::Unixexec(transport)))
        .build()
        .await
        .map_err(|e| explain(host, &program, e))
}

/// Says which end failed, as far as can be told from here. (An `Address` error: the
/// CLI reports it as "unreachable", exit code 7, with this text as it is.)
fn explain(host: &str, program: &str, e: zbus::Error) -> MaqetError {
    if let zbus::Error::Connection(io, _) = &e
        && io.kind() == std::io::ErrorKind::NotFound
    {
        return MaqetError::ZBus(zbus::Error::Address(format!(
            "cannot run {program}: it is not installed (Debian: apt install openssh-client) or not on PATH"
        )));
    }
    MaqetError::ZBus(zbus::Error::Address(format!(
        "cannot reach the session bus of {host} over ssh ({e}). ssh's own message, if any, is above; \
         check that `{program} {host} true` works, that {host} has systemd-stdio-bridge (package systemd), \
         and that the user there has a session bus (a login session, or DBUS_SESSION_BUS_ADDRESS)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_puts_the_host_after_the_options() {
        let (p, a) = ssh_argv("me@box", Some("ssh -p 2222")).unwrap();
        assert_eq!(p, "ssh");
        let a: Vec<_> = a.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(&a[..5], ["-p", "2222", "-T", "--", "me@box"]);
        assert!(a[5].contains("exec systemd-stdio-bridge --bus-path="));
    }

    #[test]
    fn option_injection_is_refused() {
        assert!(ssh_argv("-oProxyCommand=x", None).is_err());
        assert!(ssh_argv("a b", None).is_err());
        assert!(ssh_argv("", None).is_err());
    }
}
