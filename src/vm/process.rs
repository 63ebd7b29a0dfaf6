//! A QEMU (or swtpm) process held by its pidfd.
//!
//! Owns: identifying a process (pid + start time + a [`Mark`] on its command line:
//! QEMU's `-uuid <id>`, swtpm's `--tpmstate dir=<the VM's tpm dir>`), waiting
//! for its exit on the tokio reactor, reaping it, and signalling it. Every signal goes
//! through `pidfd_send_signal`, so a pid that was reused by another process can never be
//! hit: the pidfd names one process for its whole life.

use parking_lot::Mutex;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::process::{
    Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, pidfd_open, pidfd_send_signal, waitid,
};
use tokio::io::unix::AsyncFd;

/// How a QEMU process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Ended, but it was not our child (re-adopted after a maqetd restart): no status.
    Unknown,
}

impl ExitInfo {
    /// The `ExitStatus` property: the code, 128 + signal (as shells report it), -1 unknown.
    pub fn as_property(self) -> i32 {
        match self {
            ExitInfo::Code(c) => c,
            ExitInfo::Signal(s) => 128 + s,
            ExitInfo::Unknown => -1,
        }
    }

    pub fn describe(self) -> String {
        match self {
            ExitInfo::Code(c) => format!("exited with status {c}"),
            ExitInfo::Signal(s) => format!("was killed by signal {s} ({})", signal_name(s)),
            ExitInfo::Unknown => "exited".to_string(),
        }
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        _ => "signal",
    }
}

/// What tells a process of ours from any other with the same pid and start time: this
/// pair of consecutive arguments on its command line.
#[derive(Debug, Clone, Copy)]
pub struct Mark<'a> {
    pub flag: &'a str,
    pub value: &'a str,
}

impl<'a> Mark<'a> {
    /// QEMU's mark: `-uuid <the VM's id>`.
    pub fn uuid(uuid: &'a str) -> Mark<'a> {
        Mark {
            flag: "-uuid",
            value: uuid,
        }
    }
}

impl std::fmt::Display for Mark<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.flag, self.value)
    }
}

/// One live (or just-ended) QEMU process.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    start_time: u64,
    pidfd: AsyncFd<OwnedFd>,
    /// Our own child: we reap it and learn its exit status.
    is_child: bool,
    exit: Mutex<Option<ExitInfo>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("process {0} no longer exists")]
    Gone(u32),
    #[error("pid {pid} now belongs to another process ({why})")]
    Reused { pid: u32, why: String },
    #[error("cannot watch process {pid}: {source}")]
    Io { pid: u32, source: io::Error },
}

impl Process {
    /// Wraps a child we just spawned. The child is not yet reaped, so its pid cannot have
    /// been reused between `fork` and `pidfd_open`: no window.
    pub fn from_child(pid: u32) -> io::Result<Process> {
        let fd = open_pidfd(pid)?;
        let start_time = proc_start_time(pid)?;
        Ok(Process {
            pid,
            start_time,
            pidfd: crate::fdio::readable(fd)?,
            is_child: true,
            exit: Mutex::new(None),
        })
    }

    /// Re-adopts a QEMU that outlived a previous maqetd: the pid must still have the
    /// recorded start time and carry `-uuid <uuid>` on its command line, checked both
    /// before and after the pidfd is opened (so the pidfd cannot name a newcomer).
    pub fn adopt(pid: u32, start_time: u64, uuid: &str) -> Result<Process, AdoptError> {
        Process::adopt_marked(pid, start_time, Mark::uuid(uuid))
    }

    /// [`Process::adopt`] for any process that carries `mark` (a VM's swtpm).
    pub fn adopt_marked(pid: u32, start_time: u64, mark: Mark<'_>) -> Result<Process, AdoptError> {
        verify_identity(pid, start_time, mark)?;
        let fd = open_pidfd(pid).map_err(|source| match source.raw_os_error() {
            Some(libc::ESRCH) => AdoptError::Gone(pid),
            _ => AdoptError::Io { pid, source },
        })?;
        verify_identity(pid, start_time, mark)?;
        let pidfd = crate::fdio::readable(fd).map_err(|source| AdoptError::Io { pid, source })?;
        Ok(Process {
            pid,
            start_time,
            pidfd,
            is_child: false,
            exit: Mutex::new(None),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    pub fn is_child(&self) -> bool {
        self.is_child
    }

    /// Resolves when the process has ended (the pidfd becomes readable), and reaps it.
    /// Event-driven: no polling, one wakeup.
    pub async fn wait(&self) -> ExitInfo {
        loop {
            if let Some(info) = self.try_reap() {
                return info;
            }
            match self.pidfd.readable().await {
                Ok(mut guard) => {
                    // Readable means exited; reap below. Clear so a spurious wakeup re-arms.
                    if let Some(info) = self.try_reap() {
                        return info;
                    }
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::error!(pid = self.pid, error = %e, "pidfd wait failed");
                    return ExitInfo::Unknown;
                }
            }
        }
    }

    /// The exit, if the process has ended (reaping it when it is our child).
    pub fn try_reap(&self) -> Option<ExitInfo> {
        let mut exit = self.exit.lock();
        if let Some(info) = *exit {
            return Some(info);
        }
        let info = if self.is_child {
            match waitid(
                WaitId::PidFd(self.pidfd.get_ref().as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
            ) {
                Ok(Some(status)) => {
                    if let Some(sig) = status.terminating_signal() {
                        ExitInfo::Signal(sig)
                    } else {
                        ExitInfo::Code(status.exit_status().unwrap_or(-1))
                    }
                }
                Ok(None) => return None,
                // ECHILD: already reaped elsewhere; we only know it ended.
                Err(_) => ExitInfo::Unknown,
            }
        } else {
            // Not our child: a pidfd is readable once the process has exited.
            if !pidfd_exited(self.pidfd.get_ref()) {
                return None;
            }
            ExitInfo::Unknown
        };
        *exit = Some(info);
        Some(info)
    }

    /// Sends a signal through the pidfd. Sending to an ended process is a no-op.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        match pidfd_send_signal(self.pidfd.get_ref(), sig) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == libc::ESRCH => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn open_pidfd(pid: u32) -> io::Result<OwnedFd> {
    let raw = Pid::from_raw(pid as i32)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid 0"))?;
    Ok(pidfd_open(raw, PidfdFlags::NONBLOCK)?)
}

/// Whether a pidfd reports its process as exited, without blocking.
fn pidfd_exited(fd: &OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks after boot.
pub fn proc_start_time(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat format"),
        )
    })
}

/// The command name (field 2) may contain spaces and parentheses: split after the last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')' come fields 3.. ; start time is field 22, i.e. index 19 here.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `/proc/<pid>/cmdline` carries `-uuid <uuid>`.
pub fn cmdline_has_uuid(pid: u32, uuid: &str) -> io::Result<bool> {
    cmdline_has(pid, Mark::uuid(uuid))
}

/// Whether `/proc/<pid>/cmdline` carries the two arguments of `mark` one after the other.
pub fn cmdline_has(pid: u32, mark: Mark<'_>) -> io::Result<bool> {
    let raw = fs::read(format!("/proc/{pid}/cmdline"))?;
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    Ok(args
        .windows(2)
        .any(|w| w[0] == mark.flag.as_bytes() && w[1] == mark.value.as_bytes()))
}

/// Finds a process of this user that carries `-uuid <uuid>`: the QEMU of a start that
/// was cut off (maqetd killed) between spawning it and recording its pid. A scan of
/// `/proc` at start-up only, never a loop.
pub fn find_by_uuid(uuid: &str) -> Option<(u32, u64)> {
    find_marked(Mark::uuid(uuid))
}

/// Finds a process of this user that carries `mark` (see [`find_by_uuid`]).
pub fn find_marked(mark: Mark<'_>) -> Option<(u32, u64)> {
    use std::os::unix::fs::MetadataExt;
    let uid = rustix::process::getuid().as_raw();
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            (e.metadata().ok()?.uid() == uid).then_some(pid)
        })
        .filter(|pid| cmdline_has(*pid, mark).unwrap_or(false))
        .find_map(|pid| Some((pid, proc_start_time(pid).ok()?)))
}

fn verify_identity(pid: u32, start_time: u64, mark: Mark<'_>) -> Result<(), AdoptError> {
    let found = match proc_start_time(pid) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(AdoptError::Gone(pid)),
        Err(source) => return Err(AdoptError::Io { pid, source }),
    };
    if found != start_time {
        return Err(AdoptError::Reused {
            pid,
            why: format!("start time {found}, expected {start_time}"),
        });
    }
    match cmdline_has(pid, mark) {
        Ok(true) => Ok(()),
        Ok(false) => Err(AdoptError::Reused {
            pid,
            why: format!("its command line has no {mark}"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(AdoptError::Gone(pid)),
        Err(source) => Err(AdoptError::Io { pid, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "1234 (qemu (x) 1) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 1000 200";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn own_process_start_time_is_readable() {
        let me = std::process::id();
        assert!(proc_start_time(me).unwrap() > 0);
    }

    // The pidfd reaps these children; clippy cannot see that.
    #[allow(clippy::zombie_processes)]
    #[tokio::test]
    async fn child_exit_is_seen_and_reaped() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let p = Process::from_child(child.id()).unwrap();
        assert_eq!(p.wait().await, ExitInfo::Code(7));
        // Reaped: the pid is gone from /proc (no zombie left).
        assert!(!std::path::Path::new(&format!("/proc/{}", child.id())).exists());
    }

    #[allow(clippy::zombie_processes)]
    #[tokio::test]
    async fn signal_goes_through_the_pidfd() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let p = Process::from_child(child.id()).unwrap();
        p.signal(Signal::KILL).unwrap();
        assert_eq!(p.wait().await, ExitInfo::Signal(libc::SIGKILL));
        assert_eq!(ExitInfo::Signal(9).as_property(), 137);
        // Signalling an ended process is harmless.
        p.signal(Signal::TERM).unwrap();
    }

    #[test]
    fn adoption_refuses_a_mismatched_process() {
        let me = std::process::id();
        let t = proc_start_time(me).unwrap();
        assert!(matches!(
            Process::adopt(me, t + 1, "x"),
            Err(AdoptError::Reused { .. })
        ));
        assert!(matches!(
            Process::adopt(me, t, "00000000-0000-0000-0000-000000000000"),
            Err(AdoptError::Reused { .. })
        ));
    }
}
