//! Spawning QEMU: the management command line, the fd-passed QMP and console sockets,
//! the fd-passed host files (`storage::hostfiles`), the log.
//!
//! maqetd binds the QMP socket itself and hands the listening fd to QEMU, so the socket
//! exists before QEMU runs (no polling for a socket file) and lives in a 0700 directory
//! only this user can enter (no unauthenticated control socket). The serial console
//! (`maqet console`) is a second socket made the same way, added only when the config
//! does not choose its own serial port. QEMU runs in its own session with no
//! parent-death signal: it outlives maqetd by design.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::process::Process;
use crate::qmp::classify::QMP_CHARDEV_ID;

/// The fd number QEMU finds its QMP listening socket at.
const QMP_FD: RawFd = 3;
/// The fd number of the serial console's listening socket.
const CONSOLE_FD: RawFd = 4;
/// The chardev behind the first serial port when maqet provides the console.
pub const CONSOLE_CHARDEV_ID: &str = "maqet-console";
/// Logs above this size are rotated to `<id>.log.1` when a VM starts.
const LOG_ROTATE_BYTES: u64 = 1024 * 1024;
/// How much of QEMU's output a start failure carries.
const TAIL_BYTES: u64 = 2048;

/// What maqet adds to every QEMU command line: identity, its monitor, and (`console`)
/// the first serial port on a socket for `maqet console`. Nothing else.
pub fn management_args(uuid: &str, name: &str, console: bool) -> Vec<String> {
    management_args_with_agent(uuid, name, console, None)
}

/// [`management_args`], plus (`agent`: the fd number of its listening socket) a
/// virtio-serial port `org.qemu.guest_agent.0` for the QEMU guest agent.
pub fn management_args_with_agent(
    uuid: &str,
    name: &str,
    console: bool,
    agent: Option<RawFd>,
) -> Vec<String> {
    let mut args = vec![
        "-uuid".into(),
        uuid.into(),
        "-name".into(),
        // Names are [A-Za-z0-9._-]: no QEMU option escaping needed.
        name.into(),
        "-chardev".into(),
        format!("socket,id={QMP_CHARDEV_ID},fd={QMP_FD},server=on,wait=off"),
        "-mon".into(),
        format!("chardev={QMP_CHARDEV_ID},mode=control"),
    ];
    if console {
        // wait=off: the guest runs whether or not anyone is attached (output with no
        // one attached is dropped).
        args.extend([
            "-chardev".into(),
            format!("socket,id={CONSOLE_CHARDEV_ID},fd={CONSOLE_FD},server=on,wait=off"),
            "-serial".into(),
            format!("chardev:{CONSOLE_CHARDEV_ID}"),
        ]);
    }
    if let Some(fd) = agent {
        use super::guest::{AGENT_CHARDEV_ID, AGENT_PORT_ID};
        args.extend([
            "-chardev".into(),
            format!("socket,id={AGENT_CHARDEV_ID},fd={fd},server=on,wait=off"),
            "-device".into(),
            format!("virtio-serial-pci,id={AGENT_CHARDEV_ID}-serial"),
            "-device".into(),
            format!(
                "virtserialport,id={AGENT_PORT_ID},chardev={AGENT_CHARDEV_ID},name={},bus={AGENT_CHARDEV_ID}-serial.0",
                crate::agent::PORT_NAME
            ),
        ]);
    }
    args
}

/// The fd number of the agent's listening socket: above every other fd QEMU gets.
fn agent_fd(files: &[(RawFd, RawFd)]) -> RawFd {
    files.iter().map(|p| p.1).fold(CONSOLE_FD, RawFd::max) + 1
}

/// Whether maqet may give the first serial port to `maqet console`: not when the config
/// chooses a serial port itself (`-serial`, `-nographic`, an `isa-serial` device), so a
/// user's serial setup is never taken away.
pub fn wants_console(user_args: &[String]) -> bool {
    let mut prev = "";
    for a in user_args {
        let a = a.as_str();
        let serial_device = matches!(prev, "-device" | "--device") && a.starts_with("isa-serial");
        if matches!(a, "-serial" | "--serial" | "-nographic" | "--nographic") || serial_device {
            return false;
        }
        prev = a;
    }
    true
}

/// Where QEMU finds its fds, as `(our fd, QEMU's number)` for [`crate::child::SpawnSpec`]:
/// `output` on 1 and 2, `listener` at fd 3 (where [`management_args`] tell QEMU to find
/// its monitor), the console's listener at 4, then each of `files`. Shared with the
/// benchmark's bare QEMU floor, so both start QEMU the same way.
pub fn qemu_fds(
    output: RawFd,
    listener: &UnixListener,
    console: Option<&UnixListener>,
    files: &[(RawFd, RawFd)],
) -> Vec<(RawFd, RawFd)> {
    let mut fds = vec![(output, 1), (output, 2), (listener.as_raw_fd(), QMP_FD)];
    fds.extend(console.map(|l| (l.as_raw_fd(), CONSOLE_FD)));
    fds.extend_from_slice(files);
    fds
}

pub struct LaunchSpec<'a> {
    pub binary: &'a Path,
    pub uuid: &'a str,
    pub name: &'a str,
    pub user_args: &'a [String],
    pub qmp_socket: &'a Path,
    /// Where the serial console listens, when maqet provides one.
    pub console_socket: Option<&'a Path>,
    /// Where the guest agent's channel listens (`guest_agent: true`).
    pub agent_socket: Option<&'a Path>,
    /// The display server's options (`display: spice | vnc`, see `vm::display`).
    pub display_args: &'a [String],
    /// Where QEMU's own window opens (`vm::window`).
    pub graphical_env: &'a super::window::GraphicalEnv,
    pub log_file: &'a Path,
    /// Host files opened for QEMU: `(fd, number in QEMU)`, and what each one is (for
    /// the log). `user_args` name them by number.
    pub files: &'a [(RawFd, RawFd)],
    pub file_notes: &'a [String],
}

/// A spawned QEMU and where its output for this run begins.
pub struct Spawned {
    pub process: Process,
    pub log_offset: u64,
}

/// Binds the QMP socket, opens the log and spawns QEMU. Returns as soon as the process
/// exists; the caller connects to the socket (the connection queues on the listening
/// socket until QEMU's main loop accepts it).
pub fn spawn(spec: &LaunchSpec<'_>) -> io::Result<Spawned> {
    let listener = bind_fresh(spec.qmp_socket)?;
    let console = spec.console_socket.map(bind_fresh).transpose()?;
    let agent = spec.agent_socket.map(bind_fresh).transpose()?;
    let mut files = spec.files.to_vec();
    files.extend(
        agent
            .as_ref()
            .map(|l| (l.as_raw_fd(), agent_fd(spec.files))),
    );
    let (log, log_offset) = open_log(spec)?;

    let mut args = spec_management_args(spec);
    args.extend_from_slice(spec.user_args);
    // Session-bus activation variables mean nothing to QEMU.
    let mut env = vec![
        ("DBUS_STARTER_ADDRESS", None),
        ("DBUS_STARTER_BUS_TYPE", None),
    ];
    env.extend(spec.graphical_env.env_changes());
    let fds = qemu_fds(log.as_raw_fd(), &listener, console.as_ref(), &files);
    // Not reaped here: the pidfd takes over from here.
    let pid = crate::child::spawn_in_session(&crate::child::SpawnSpec {
        program: spec.binary,
        args: &args,
        env: &env,
        fds: &fds,
    })?;
    drop(log);
    drop(listener);
    drop(console);
    drop(agent);
    let process = Process::from_child(pid)?;
    Ok(Spawned {
        process,
        log_offset,
    })
}

fn spec_management_args(spec: &LaunchSpec<'_>) -> Vec<String> {
    let agent = spec.agent_socket.map(|_| agent_fd(spec.files));
    let mut args =
        management_args_with_agent(spec.uuid, spec.name, spec.console_socket.is_some(), agent);
    args.extend_from_slice(spec.display_args);
    args
}

/// Binds a listening socket at `path`, replacing a stale one from a dead QEMU (the
/// directory is ours and 0700, so removing it cannot be raced by another user).
fn bind_fresh(path: &Path) -> io::Result<UnixListener> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

fn open_log(spec: &LaunchSpec<'_>) -> io::Result<(File, u64)> {
    if fs::metadata(spec.log_file).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let mut old = spec.log_file.as_os_str().to_owned();
        old.push(".1");
        fs::rename(spec.log_file, PathBuf::from(old))?;
    }
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(spec.log_file)?;
    let mut line = format!(
        "=== maqet: starting VM {} ({}) at {}: {}",
        spec.name,
        spec.uuid,
        crate::time::format_us(crate::time::now_us()),
        spec.binary.display()
    );
    for a in spec_management_args(spec).iter().chain(spec.user_args) {
        line.push(' ');
        line.push_str(a);
    }
    line.push('\n');
    for note in spec.file_notes {
        line.push_str(&format!("=== maqet: {note}\n"));
    }
    log.write_all(line.as_bytes())?;
    let offset = log.seek(SeekFrom::End(0))?;
    Ok((log, offset))
}

/// Appends how a run ended to the QEMU log (`=== maqet: run ended at 14:03:12 CET:
/// crashed: QEMU was killed by signal 9 (SIGKILL)`), so the log that "Show log" opens
/// answers what the notification asked. Best effort: a log that cannot be written
/// does not change how the run ended.
pub fn log_run_end(log_file: &Path, status: &str, reason: &str) {
    let Ok(mut log) = OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log_file)
    else {
        return;
    };
    let when = crate::time::format_local_us(crate::time::now_us());
    // One line: a reason with QEMU's output in it is folded.
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    let _ = writeln!(log, "=== maqet: run ended at {when}: {status}: {reason}");
}

/// The end of what QEMU wrote since `offset` (its words for why it failed).
pub fn log_tail(log_file: &Path, offset: u64) -> String {
    let Ok(mut f) = File::open(log_file) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(TAIL_BYTES));
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(TAIL_BYTES).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn management_args_name_the_vm_and_its_monitor() {
        let a = management_args("1234", "web", false);
        assert_eq!(&a[..4], &["-uuid", "1234", "-name", "web"]);
        assert!(a.contains(&"socket,id=maqet-qmp,fd=3,server=on,wait=off".to_string()));
        assert!(a.contains(&"chardev=maqet-qmp,mode=control".to_string()));
        assert!(!a.contains(&"-serial".to_string()));
        let a = management_args("1234", "web", true);
        assert!(a.contains(&"socket,id=maqet-console,fd=4,server=on,wait=off".to_string()));
        assert!(a.ends_with(&["-serial".to_string(), "chardev:maqet-console".to_string()]));
    }

    #[test]
    fn the_agent_channel_is_added_only_when_asked_with_a_fd_above_the_others() {
        assert_eq!(
            management_args("1", "w", true),
            management_args_with_agent("1", "w", true, None)
        );
        let a = management_args_with_agent("1", "w", false, Some(agent_fd(&[(9, 5), (8, 6)])));
        let tail: Vec<&str> = a[a.len() - 6..].iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "-chardev",
                "socket,id=maqet-ga,fd=7,server=on,wait=off",
                "-device",
                "virtio-serial-pci,id=maqet-ga-serial",
                "-device",
                "virtserialport,id=maqet-ga-port,chardev=maqet-ga,name=org.qemu.guest_agent.0,bus=maqet-ga-serial.0"
            ]
        );
        assert_eq!(agent_fd(&[]), 5);
    }

    #[test]
    fn a_config_with_its_own_serial_port_keeps_it() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(wants_console(&args(&["-m", "64", "-nodefaults"])));
        assert!(!wants_console(&args(&["-serial", "stdio"])));
        assert!(!wants_console(&args(&["-nographic"])));
        assert!(!wants_console(&args(&["-device", "isa-serial,chardev=s0"])));
        assert!(wants_console(&args(&["-device", "virtio-serial-pci"])));
    }

    #[test]
    fn the_end_of_a_run_is_one_line_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        fs::write(&p, "=== maqet: starting VM x\n").unwrap();
        log_run_end(&p, "crashed", "QEMU exited with status 1:\nqemu: oops");
        let text = fs::read_to_string(&p).unwrap();
        let last = text.lines().last().unwrap();
        assert!(last.starts_with("=== maqet: run ended at "), "{last}");
        assert!(
            last.ends_with(": crashed: QEMU exited with status 1: qemu: oops"),
            "{last}"
        );
        log_run_end(&dir.path().join("absent.log"), "stopped", "x");
        assert!(
            !dir.path().join("absent.log").exists(),
            "never creates a log"
        );
    }

    #[test]
    fn log_tail_reads_only_this_run() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        fs::write(&p, "old run failure\n").unwrap();
        let offset = fs::metadata(&p).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"qemu-system-x86_64: -foo: invalid option\n")
            .unwrap();
        assert_eq!(
            log_tail(&p, offset),
            "qemu-system-x86_64: -foo: invalid option"
        );
    }
}
