//! The floor: bare QEMU with the tiny VM's own arguments, started exactly the way maqetd
//! starts it (bind the QMP socket, pass the listening fd as fd 3, `setsid`, connect,
//! greeting, `qmp_capabilities`), and raw QMP over a blocking socket. No maqet code runs
//! on the timed path; the library only supplies the argument list, so both sides run
//! the same QEMU command line.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use rustix::process::{
    Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, pidfd_open, pidfd_send_signal, waitid,
};

use maqet::child::{SpawnSpec, spawn_in_session};
use maqet::config::{self, ConfigSource, ValidationContext};
use maqet::vm::launch::{management_args_with_agent, qemu_fds};

use crate::fixture::{MARKER_VAR, wait_pidfd};

/// KVM when this user can use it, TCG otherwise (the tests' choice).
pub fn accel() -> &'static str {
    if maqet::host::kvm_usable() {
        "kvm"
    } else {
        "tcg"
    }
}

/// The smallest useful VM: no disk, no devices, 64 MiB (as in the end-to-end tests).
pub fn tiny_vm_yaml(name: &str) -> String {
    format!(
        "name: {name}\nbinary: qemu-system-x86_64\ndisplay: none\nmemory: 64\narguments:\n  - nodefaults\n  - accel: {}\n",
        accel()
    )
}

/// The binary and full command line maqetd would run for the tiny VM.
pub fn command_line(uuid: &str, name: &str) -> Result<(PathBuf, Vec<String>), String> {
    command_line_for(&tiny_vm_yaml(name), uuid, name, None)
}

/// The binary and full command line maqetd would run for the VM `yaml` describes, host
/// files named by path; `agent`: the fd number of the guest agent's listening socket.
pub fn command_line_for(
    yaml: &str,
    uuid: &str,
    name: &str,
    agent: Option<std::os::fd::RawFd>,
) -> Result<(PathBuf, Vec<String>), String> {
    let home = std::env::temp_dir();
    let path_env = std::env::var_os("PATH");
    let no_policy = |p: &Path, _: config::PathUse| Ok(p.to_path_buf());
    let ctx = ValidationContext {
        home: &home,
        path_env: path_env.as_deref(),
        default_arch: std::env::consts::ARCH,
        check_path: &no_policy,
        vm_data_dir: None,
        probe_format: None,
    };
    let source = ConfigSource {
        origin: "<bench>".into(),
        text: yaml.to_string(),
        base_dir: home.clone(),
    };
    let cfg = config::load(&[source], &ctx).map_err(|e| e.to_string())?;
    let binary = cfg.resolve_binary(path_env.as_deref())?;
    // With the serial console maqetd adds to a config without one, as it really runs.
    let mut args = management_args_with_agent(uuid, name, true, agent);
    args.extend(cfg.qemu_args());
    Ok((binary, args))
}

/// A bare QEMU with its QMP connection open.
pub struct BareQemu {
    pid: u32,
    pidfd: OwnedFd,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
    /// Events read while waiting for a reply, for [`BareQemu::wait_event`].
    events: Vec<String>,
    reaped: bool,
}

impl BareQemu {
    /// Spawns QEMU and completes the QMP handshake; returns it with the time from the
    /// first step (binding the socket) to the `qmp_capabilities` reply.
    pub fn spawn_ready(
        binary: &Path,
        args: &[String],
        socket: &Path,
        marker: &str,
    ) -> io::Result<(BareQemu, Duration)> {
        Self::spawn_ready_with(binary, args, socket, marker, &[])
    }

    /// [`BareQemu::spawn_ready`], also placing each `(fd, number)` of `files` in QEMU
    /// (as maqetd places the guest agent's socket).
    pub fn spawn_ready_with(
        binary: &Path,
        args: &[String],
        socket: &Path,
        marker: &str,
        files: &[(std::os::fd::RawFd, std::os::fd::RawFd)],
    ) -> io::Result<(BareQemu, Duration)> {
        let t0 = Instant::now();
        match std::fs::remove_file(socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(socket)?;
        let console_path = socket.with_extension("console");
        let _ = std::fs::remove_file(&console_path);
        let console = UnixListener::bind(&console_path)?;
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        let pid = spawn_in_session(&SpawnSpec {
            program: binary,
            args,
            env: &[(MARKER_VAR, Some(marker))],
            fds: &qemu_fds(null.as_raw_fd(), &listener, Some(&console), files),
        })?;
        let pid = Pid::from_raw(pid as i32).expect("child pid");
        // Unreaped child: the pidfd names it.
        let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
        drop(null);
        drop(listener);
        drop(console);
        let _ = std::fs::remove_file(&console_path);
        let writer = UnixStream::connect(socket)?;
        writer.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut q = BareQemu {
            pid: pid.as_raw_nonzero().get() as u32,
            pidfd,
            reader: BufReader::new(writer.try_clone()?),
            writer,
            line: String::new(),
            events: Vec::new(),
            reaped: false,
        };
        q.read_line()?; // greeting
        q.command(b"{\"execute\":\"qmp_capabilities\"}\n")?;
        Ok((q, t0.elapsed()))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn read_line(&mut self) -> io::Result<&str> {
        self.line.clear();
        if self.reader.read_line(&mut self.line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "QEMU closed its monitor",
            ));
        }
        Ok(&self.line)
    }

    /// Sends one command and reads up to its reply (keeping events aside).
    fn command(&mut self, msg: &[u8]) -> io::Result<()> {
        self.execute(msg).map(|_| ())
    }

    /// Sends one command; its reply line.
    pub fn execute(&mut self, msg: &[u8]) -> io::Result<String> {
        self.writer.write_all(msg)?;
        loop {
            let line = self.read_line()?;
            if line.starts_with("{\"return\"") {
                return Ok(line.to_string());
            }
            if line.starts_with("{\"error\"") {
                return Err(io::Error::other(line.trim().to_string()));
            }
            if line.starts_with("{\"event\"") {
                let line = line.to_string();
                self.events.push(line);
            }
        }
    }

    /// Waits up to `limit` for an event line `matches` accepts (one read while waiting
    /// for a reply counts too).
    pub fn wait_event(
        &mut self,
        limit: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> io::Result<()> {
        if let Some(i) = self.events.iter().position(|e| matches(e)) {
            self.events.drain(..=i);
            return Ok(());
        }
        self.writer.set_read_timeout(Some(limit))?;
        let res = loop {
            match self.read_line() {
                Ok(line) if matches(line) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(e),
            }
        };
        self.writer
            .set_read_timeout(Some(Duration::from_secs(20)))?;
        res
    }

    /// One raw `query-status` round trip.
    pub fn query_status(&mut self) -> io::Result<Duration> {
        let t0 = Instant::now();
        self.command(b"{\"execute\":\"query-status\"}\n")?;
        Ok(t0.elapsed())
    }

    /// QMP `quit` → process exit (the floor of a forced stop).
    pub fn quit(mut self) -> io::Result<Duration> {
        let t0 = Instant::now();
        self.writer.write_all(b"{\"execute\":\"quit\"}\n")?;
        if !wait_pidfd(&self.pidfd, Duration::from_secs(20)) {
            return Err(io::Error::other("QEMU did not exit after quit"));
        }
        let d = t0.elapsed();
        self.reap();
        Ok(d)
    }

    /// SIGKILL → the pidfd reports the exit (the floor of crash detection: what the
    /// kernel takes to tear a QEMU down).
    pub fn kill(mut self) -> io::Result<Duration> {
        let t0 = Instant::now();
        pidfd_send_signal(&self.pidfd, Signal::KILL)?;
        if !wait_pidfd(&self.pidfd, Duration::from_secs(20)) {
            return Err(io::Error::other("QEMU did not exit on SIGKILL"));
        }
        let d = t0.elapsed();
        self.reap();
        Ok(d)
    }

    fn reap(&mut self) {
        if !self.reaped {
            let _ = waitid(WaitId::PidFd(self.pidfd.as_fd()), WaitIdOptions::EXITED);
            self.reaped = true;
        }
    }
}

impl Drop for BareQemu {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = pidfd_send_signal(&self.pidfd, Signal::KILL);
            self.reap();
        }
    }
}
