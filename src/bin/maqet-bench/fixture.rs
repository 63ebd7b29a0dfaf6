//! The bench's own world: throwaway XDG directories, a private `dbus-daemon` per bus
//! that D-Bus-activates the release `maqetd`, and the clean-up of every process a run
//! caused.
//!
//! Bookkeeping, so nothing outlives the run:
//! - the bench is a child subreaper, so orphans (maqetd's QEMUs after maqetd dies)
//!   come back to it and are reaped here, never left as zombies elsewhere;
//! - every process carries `MAQET_BENCH_MARKER=<run>/<bus>` in its environment
//!   (dbus-daemon passes it to maqetd, maqetd to QEMU); clean-up finds them by it and
//!   kills through a pidfd after re-checking the marker on that pidfd's process;
//! - each dbus-daemon leads a process group (maqetd inherits it), killed as a whole.

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use zbus::Connection;

pub const MARKER_VAR: &str = "MAQET_BENCH_MARKER";

/// One bench run: a private temp directory and the marker every process inherits.
pub struct Run {
    root: PathBuf,
    marker: String,
    maqetd: PathBuf,
    buses: AtomicU32,
}

impl Run {
    pub fn new(maqetd: PathBuf) -> io::Result<Run> {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let marker = uuid::Uuid::new_v4().simple().to_string();
        // Short: QMP socket paths below it must fit a sockaddr_un (108 bytes).
        let root = std::env::temp_dir().join(format!("maqet-bench-{}", &marker[..8]));
        std::fs::create_dir(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        Ok(Run {
            root,
            marker,
            maqetd,
            buses: AtomicU32::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// The `maqet` CLI built beside the maqetd this run activates.
    pub fn maqet_cli(&self) -> PathBuf {
        self.maqetd.with_file_name("maqet")
    }

    /// A fresh private session bus whose maqetd starts on the first call (activation).
    pub fn bus(&self) -> io::Result<Bus> {
        let n = self.buses.fetch_add(1, Ordering::Relaxed) + 1;
        let dir = self.root.join(format!("b{n}"));
        for d in ["services", "run", "data", "state", "config/maqet", "home"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o700))?;
        std::fs::write(
            dir.join("services/org.maqet.Maqet1.service"),
            format!(
                "[D-BUS Service]\nName=org.maqet.Maqet1\nExec={}\n",
                self.maqetd.display()
            ),
        )?;
        // Never exit while the bench measures (the 10,000-VM start-up kills it instead).
        std::fs::write(dir.join("config/maqet/maqetd.yaml"), "idle_exit_sec: 0\n")?;
        std::fs::write(
            dir.join("bus.conf"),
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={root}</listen>
  <servicedir>{root}/services</servicedir>
  <auth>EXTERNAL</auth>
  <limit name="max_replies_per_connection">50000</limit>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                root = dir.display()
            ),
        )?;
        let marker = format!("{}/{n}", self.marker);
        let mut cmd = Command::new("dbus-daemon");
        cmd.arg(format!("--config-file={}", dir.join("bus.conf").display()))
            .args(["--nofork", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("bus.log"))?)
            .env(MARKER_VAR, &marker)
            // maqetd logs at its own default level (audit lines included), as deployed.
            .env_remove("RUST_LOG")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .process_group(0);
        for (k, v) in xdg_env(&dir) {
            cmd.env(k, v);
        }
        let mut daemon = cmd.spawn()?;
        let mut out = daemon.stdout.take().expect("piped stdout");
        let mut address = String::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte)? == 1 && byte[0] != b'\n' {
            address.push(byte[0] as char);
        }
        if !address.starts_with("unix:") {
            let _ = daemon.kill();
            let _ = daemon.wait();
            return Err(io::Error::other(format!(
                "dbus-daemon printed no address ({address:?}); see {}",
                dir.join("bus.log").display()
            )));
        }
        Ok(Bus {
            daemon,
            address,
            dir,
            marker,
        })
    }
}

/// While it lives, orphans go to init instead of the bench: peers (libvirt, the Python
/// maqet) daemonise their QEMUs and wait for them to vanish, which a zombie the bench has
/// not reaped yet never does. Clean-up still finds them by marker or name.
pub struct OrphansToInit(());

impl OrphansToInit {
    pub fn new() -> OrphansToInit {
        set_subreaper(false);
        OrphansToInit(())
    }
}

impl Drop for OrphansToInit {
    fn drop(&mut self) {
        set_subreaper(true);
    }
}

fn set_subreaper(on: bool) {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, on as libc::c_ulong, 0, 0, 0) };
}

impl Drop for Run {
    fn drop(&mut self) {
        kill_marked(|m| m.starts_with(&self.marker));
        reap_all(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn xdg_env(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("XDG_RUNTIME_DIR", dir.join("run")),
        ("XDG_DATA_HOME", dir.join("data")),
        ("XDG_STATE_HOME", dir.join("state")),
        ("XDG_CONFIG_HOME", dir.join("config")),
        ("HOME", dir.join("home")),
    ]
}

/// A private session bus and the maqetd it activates.
pub struct Bus {
    daemon: Child,
    pub address: String,
    dir: PathBuf,
    marker: String,
}

impl Bus {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// The bus daemon's own pid (its CPU is part of every D-Bus figure).
    pub fn daemon_pid(&self) -> u32 {
        self.daemon.id()
    }

    /// A command run as a client of this bus, the way a user in that session runs it.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null())
            .env(MARKER_VAR, &self.marker)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address);
        for (k, v) in xdg_env(&self.dir) {
            cmd.env(k, v);
        }
        cmd
    }

    pub async fn conn(&self) -> zbus::Result<Connection> {
        zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
    }

    /// The pid of the process that owns maqet's bus name (activating it if needed).
    pub async fn maqetd_pid(&self, conn: &Connection) -> zbus::Result<u32> {
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        // StartServiceByName: a no-op when it already runs.
        let name = zbus::names::WellKnownName::try_from(maqet::client::BUS_NAME)?;
        dbus.start_service_by_name(name.clone(), 0).await?;
        Ok(dbus.get_connection_unix_process_id(name.into()).await?)
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        kill_marked(|m| m == self.marker);
        // The daemon's group holds maqetd too (QEMU leaves it by setsid: marker above).
        // SAFETY: the daemon is our unreaped child, so its pid (= pgid) is still ours.
        unsafe { libc::killpg(self.daemon.id() as i32, libc::SIGKILL) };
        let _ = self.daemon.wait();
        reap_all(Duration::from_millis(200));
    }
}

pub fn marker_of(pid: u32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{MARKER_VAR}=");
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Kills every process whose marker `matches`, through a pidfd opened first and the
/// marker re-checked after (so a reused pid is never hit); waits until they are gone.
pub fn kill_marked(matches: impl Fn(&str) -> bool) {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for pid in rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        if pid == me || !marker_of(pid).is_some_and(|m| matches(&m)) {
            continue;
        }
        let Some(p) = Pid::from_raw(pid as i32) else {
            continue;
        };
        let Ok(fd) = pidfd_open(p, PidfdFlags::empty()) else {
            continue;
        };
        if marker_of(pid).is_some_and(|m| matches(&m)) {
            let _ = pidfd_send_signal(fd.as_fd(), Signal::KILL);
            fds.push(fd);
        }
    }
    for fd in &fds {
        wait_pidfd(fd, Duration::from_secs(5));
    }
}

/// Blocks until the pidfd's process has exited (readable), at most `limit`.
pub fn wait_pidfd(fd: &OwnedFd, limit: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let t = Timespec {
        tv_sec: limit.as_secs() as i64,
        tv_nsec: limit.subsec_nanos() as i64,
    };
    matches!(poll(&mut fds, Some(&t)), Ok(n) if n > 0)
}

/// Reaps every exited child (own or adopted as subreaper) until none is left or
/// `limit` passes; live children (a bus still in use) are left alone.
fn reap_all(limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: plain waitpid on any child, non-blocking.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r > 0 {
            continue;
        }
        if r < 0 || Instant::now() >= deadline {
            return; // ECHILD: nothing left.
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
