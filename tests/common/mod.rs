//! Test fixture: a private session bus that D-Bus-activates the freshly built maqetd,
//! throwaway XDG directories, and helpers to drive real QEMU VMs.
//!
//! Every process the test causes (maqetd, QEMU) inherits a unique marker in its
//! environment; dropping the fixture kills exactly those, through pidfds.

#![allow(dead_code)]

pub mod guest;
pub mod linux_guest;
pub mod logind;
pub mod notifications;
pub mod require;
pub mod systemd;

#[allow(unused_imports)] // each test binary uses its own part of the fixture
pub use require::{program, require, root};

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use maqet::client::{ManagerProxy, VmProxy, vm_proxy};
use zbus::{Connection, OwnedObjectPath};

/// Generous bound for anything a VM does under TCG on a loaded 2-core machine.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// How a test bus is set up.
#[derive(Default)]
pub struct BusOptions<'a> {
    /// Scripts `(name, body)` put first on maqetd's `PATH`.
    pub tools: &'a [(&'a str, &'a str)],
    /// maqetd.yaml.
    pub settings: &'a str,
    /// Let other uids connect (the bus socket's directory is made traversable).
    pub other_users: bool,
    /// maqetd's system bus (for polkit); default: none.
    pub system_bus: Option<&'a str>,
    /// No activation file for maqetd: the bus uses the standard session service
    /// directories instead.
    pub no_activation: bool,
    /// `$XDG_DATA_HOME` on a tmpfs of this size (e.g. `8m`), for a full disk; needs
    /// root (see [`Bus::start_with_small_data_dir`]); unmounted when the bus drops.
    pub data_tmpfs: Option<&'a str>,
}

pub struct Bus {
    /// The tmpfs mounted as `$XDG_DATA_HOME`, if any (unmounted after the processes
    /// are killed: fields drop after `Drop::drop`).
    tmpfs: Option<Tmpfs>,
    daemon: Child,
    pub address: String,
    pub dir: tempfile::TempDir,
    marker: String,
}

pub fn maqetd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_maqetd")
}

pub fn maqet_bin() -> &'static str {
    env!("CARGO_BIN_EXE_maqet")
}

/// KVM when this user can use it, TCG otherwise (`MAQET_TEST_ACCEL=tcg` forces TCG).
pub fn accel() -> &'static str {
    if std::env::var("MAQET_TEST_ACCEL").is_ok_and(|a| a == "tcg") {
        return "tcg";
    }
    if maqet::host::kvm_usable() {
        "kvm"
    } else {
        "tcg"
    }
}

/// The smallest useful VM: no disk, no devices, 64 MiB.
pub fn tiny_vm_yaml(name: &str) -> String {
    format!(
        "name: {name}\nbinary: qemu-system-x86_64\ndisplay: none\nmemory: 64\narguments:\n  - nodefaults\n  - accel: {}\n",
        accel()
    )
}

impl Bus {
    pub fn start() -> Bus {
        Bus::start_with(&[], "")
    }

    /// A bus whose maqetd reads `settings` as its maqetd.yaml.
    pub fn start_with_settings(settings: &str) -> Bus {
        Bus::start_with(&[], settings)
    }

    /// Like [`Bus::start`], with scripts `(name, body)` in a directory put first on
    /// maqetd's `PATH` (e.g. a `qemu-img` that simulates a slow disk).
    pub fn start_with_tools(tools: &[(&str, &str)]) -> Bus {
        Bus::start_with(tools, "")
    }

    /// A bus with extra tools on maqetd's `PATH` and a maqetd.yaml.
    pub fn start_with(tools: &[(&str, &str)], settings: &str) -> Bus {
        Bus::start_with_options(&BusOptions {
            tools,
            settings,
            ..BusOptions::default()
        })
    }

    /// A bus that does not know maqetd: it activates from the standard session service
    /// directories (`$XDG_DATA_HOME/dbus-1/services`, empty until `maqet setup --user`).
    pub fn start_unactivated() -> Bus {
        Bus::start_with_options(&BusOptions {
            no_activation: true,
            ..BusOptions::default()
        })
    }

    /// The general form: see [`BusOptions`].
    pub fn start_with_options(opts: &BusOptions<'_>) -> Bus {
        let (tools, settings, activation) = (opts.tools, opts.settings, !opts.no_activation);
        let dir = tempfile::Builder::new()
            .prefix("maqet-test-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path();
        if opts.other_users {
            use std::os::unix::fs::PermissionsExt;
            // Others may reach the bus socket in this directory, nothing else in it.
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        for d in ["services", "run", "data", "state", "config", "home", "bin"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let tmpfs = opts
            .data_tmpfs
            .map(|size| Tmpfs::mount(&root.join("data"), size));
        for (name, body) in tools {
            use std::os::unix::fs::PermissionsExt;
            let file = root.join("bin").join(name);
            std::fs::write(&file, body).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path_env = format!(
            "{}:{}",
            root.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("run"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let servicedirs = if activation {
            std::fs::write(
                root.join("services/org.maqet.Maqet1.service"),
                format!(
                    "[D-BUS Service]\nName=org.maqet.Maqet1\nExec={}\n",
                    maqetd_bin()
                ),
            )
            .unwrap();
            format!("<servicedir>{}/services</servicedir>", root.display())
        } else {
            "<standard_session_servicedirs/>".to_string()
        };
        std::fs::write(
            root.join("bus.conf"),
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={root}</listen>
  {servicedirs}
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>{others}
  </policy>
</busconfig>
"#,
                root = root.display(),
                others = if opts.other_users {
                    "\n    <allow user=\"*\"/>"
                } else {
                    ""
                }
            ),
        )
        .unwrap();
        std::fs::create_dir_all(root.join("config/maqet")).unwrap();
        std::fs::write(root.join("config/maqet/maqetd.yaml"), settings).unwrap();
        let marker = uuid::Uuid::new_v4().to_string();
        let mut cmd = Command::new("dbus-daemon");
        cmd.arg(format!("--config-file={}", root.join("bus.conf").display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            // Activated services inherit this: maqetd's log lands in <dir>/bus.log.
            .stderr(std::fs::File::create(root.join("bus.log")).unwrap())
            .env("MAQET_TEST_MARKER", &marker)
            // No polkitd unless the test brings its own: `auth` answers are then
            // deterministic ("polkitd is not reachable"), never a prompt on a desktop.
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                opts.system_bus
                    .unwrap_or("unix:path=/nonexistent/system_bus_socket"),
            )
            .env("PATH", path_env)
            .env(
                "RUST_LOG",
                std::env::var("MAQET_TEST_LOG").unwrap_or_else(|_| "warn,maqet=debug".into()),
            );
        for (k, v) in Self::xdg_env(root) {
            cmd.env(k, v);
        }
        let mut daemon = cmd.spawn().expect("dbus-daemon must be installed");
        let mut out = daemon.stdout.take().unwrap();
        let mut address = String::new();
        // dbus-daemon prints its address as soon as it listens; read that one line.
        let mut byte = [0u8; 1];
        use std::io::Read;
        while out.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            address.push(byte[0] as char);
        }
        assert!(address.starts_with("unix:"), "bad bus address {address:?}");
        Bus {
            tmpfs,
            daemon,
            address,
            dir,
            marker,
        }
    }

    /// A bus whose `$XDG_DATA_HOME` (database, image store, VM disks) is a tmpfs of
    /// `size`, to fill up; `None` (skipped) when the test is not root.
    pub fn start_with_small_data_dir(size: &str) -> Option<Bus> {
        require::require(require::root(
            "mounting a small tmpfs as the data directory",
        ))?;
        Some(Bus::start_with_options(&BusOptions {
            data_tmpfs: Some(size),
            ..BusOptions::default()
        }))
    }

    fn xdg_env(root: &Path) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("XDG_RUNTIME_DIR", root.join("run")),
            ("XDG_DATA_HOME", root.join("data")),
            ("XDG_STATE_HOME", root.join("state")),
            ("XDG_CONFIG_HOME", root.join("config")),
            ("HOME", root.join("home")),
        ]
    }

    /// The environment marker that makes a process this test's to clean up.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Writes maqetd's policy.yaml (re-read by maqetd on its next decision).
    pub fn write_policy(&self, yaml: &str) {
        let path = self.root().join("config/maqet/policy.yaml");
        // Write-and-rename: maqetd sees either the old or the new file, never half.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn database(&self) -> PathBuf {
        self.root().join("data/maqet/maqet.db")
    }

    pub async fn conn(&self) -> Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .expect("connect to the test bus")
    }

    pub async fn manager(&self, conn: &Connection) -> ManagerProxy<'static> {
        ManagerProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .unwrap()
    }

    pub async fn vm(&self, conn: &Connection, path: OwnedObjectPath) -> VmProxy<'static> {
        vm_proxy(conn, path).await.unwrap()
    }

    /// Adds a VM from YAML and returns its proxy.
    pub async fn add(&self, conn: &Connection, name: &str, yaml: &str) -> VmProxy<'static> {
        let path = self
            .manager(conn)
            .await
            .add_vm(name, yaml)
            .await
            .unwrap_or_else(|e| panic!("AddVM {name}: {e}"));
        self.vm(conn, path).await
    }

    fn with_env(&self, cmd: &mut Command) {
        cmd.env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .env("MAQET_TEST_MARKER", &self.marker)
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS");
        for (k, v) in Self::xdg_env(self.root()) {
            cmd.env(k, v);
        }
    }

    /// The `maqet` CLI against this bus, to run as the caller likes.
    pub fn maqet_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(maqet_bin());
        cmd.args(args).stdin(Stdio::null());
        self.with_env(&mut cmd);
        cmd
    }

    /// A `maqetd` started by hand (not by the bus) with this bus's environment.
    pub fn maqetd_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(maqetd_bin());
        cmd.args(args).stdin(Stdio::null());
        self.with_env(&mut cmd);
        cmd
    }

    /// The `maqet` CLI against this bus.
    pub fn maqet(&self, args: &[&str]) -> Output {
        self.maqet_command(args).output().expect("run maqet")
    }

    /// `busctl` against this bus.
    pub fn busctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("busctl");
        cmd.arg(format!("--address={}", self.address)).args(args);
        self.with_env(&mut cmd);
        cmd.output().expect("run busctl")
    }

    /// A `gdbus` command with this bus's environment; pass `--address` yourself.
    pub fn gdbus(&self) -> Command {
        let mut cmd = Command::new("gdbus");
        self.with_env(&mut cmd);
        cmd
    }

    /// Processes started on behalf of this test (maqetd, QEMU), by environment marker.
    pub fn marked_processes(&self, comm_prefix: &str) -> Vec<u32> {
        marked_pids(&self.marker)
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim().starts_with(comm_prefix))
            })
            .collect()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        for pid in marked_pids(&self.marker) {
            kill_verified(pid, &self.marker);
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// A small tmpfs mounted on a directory (root only), to fill up; unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `8m`) on the existing directory `dir`.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        let options = format!("size={size},mode=0700");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount tmpfs: {}", stderr(&out));
        Tmpfs(dir.to_path_buf())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process that has not died yet cannot keep the mount alive.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn marked_pids(marker: &str) -> Vec<u32> {
    let needle = format!("MAQET_TEST_MARKER={marker}");
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| *pid != me)
                .filter(|pid| environ_has(*pid, &needle))
                .collect()
        })
        .unwrap_or_default()
}

fn environ_has(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        .unwrap_or(false)
}

/// Kill through a pidfd, after re-checking the marker on the pidfd's process.
fn kill_verified(pid: u32, marker: &str) {
    use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
    let Some(p) = Pid::from_raw(pid as i32) else {
        return;
    };
    let Ok(fd) = pidfd_open(p, PidfdFlags::empty()) else {
        return;
    };
    if environ_has(pid, &format!("MAQET_TEST_MARKER={marker}")) {
        let _ = pidfd_send_signal(fd.as_fd(), Signal::KILL);
    }
}

/// Waits until the job at `path` reports progress above 0 (a `PropertiesChanged` of
/// its `Progress`; subscribed before reading the current value, so none is missed).
pub async fn first_progress(conn: &Connection, path: &OwnedObjectPath) {
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination(maqet::client::BUS_NAME)
        .path(path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    let mut changes = props.receive_properties_changed().await.unwrap();
    let job: maqet::client::JobProxy = maqet::client::proxy_at(conn, path.clone()).await.unwrap();
    if job.progress().await.unwrap() > 0.0 {
        return;
    }
    loop {
        let change = tokio::time::timeout(TIMEOUT, changes.next())
            .await
            .expect("the job reports progress in time")
            .expect("the signal stream");
        let args = change.args().unwrap();
        let progress = args
            .changed_properties()
            .get("Progress")
            .and_then(|v| f64::try_from(v).ok());
        if progress.is_some_and(|p| p > 0.0) {
            return;
        }
    }
}

/// What [`data_image`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Random bytes: the file is as big as its data, a copy takes a while.
    Random,
    /// A repeated byte, qcow2-compressed: a small file that expands when copied (zeros
    /// would be skipped by a copy).
    Compressed,
    /// A repeated byte in the first quarter, the rest unallocated.
    Pattern,
}

/// An image `dir/name.<format>` of `mib` MiB virtual size holding data as `fill` says,
/// made with the real qemu-img and qemu-io.
pub fn data_image(dir: &Path, name: &str, mib: u64, fill: Fill, format: &str) -> PathBuf {
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run a qemu tool");
        assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    };
    let raw = dir.join(format!("{name}.data.raw"));
    if fill == Fill::Random {
        run(Command::new("dd").args([
            "if=/dev/urandom",
            &format!("of={}", raw.display()),
            "bs=1M",
            &format!("count={mib}"),
        ]));
    } else {
        let len = if fill == Fill::Pattern { mib / 4 } else { mib };
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&raw)
            .arg(format!("{mib}M")));
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P 0xa5 0 {len}M")])
            .arg(&raw));
    }
    let image = dir.join(format!("{name}.{format}"));
    let mut convert = Command::new("qemu-img");
    convert.args(["convert", "-f", "raw", "-O", format]);
    if fill == Fill::Compressed {
        convert.arg("-c");
    }
    run(convert.arg(&raw).arg(&image));
    std::fs::remove_file(&raw).unwrap();
    image
}

/// The end of a job: (state, message). Subscribes to `Completed` first, then reads
/// the state, so an end in between is not missed.
pub async fn job_end(conn: &Connection, path: OwnedObjectPath) -> (String, String) {
    let job: maqet::client::JobProxy = maqet::client::proxy_at(conn, path).await.unwrap();
    let mut completed = job.receive_completed().await.unwrap();
    if job.state().await.unwrap() == "running" {
        tokio::time::timeout(TIMEOUT, completed.next())
            .await
            .expect("no Completed signal in time")
            .unwrap();
    }
    (job.state().await.unwrap(), job.message().await.unwrap())
}

/// Waits for a `StatusChanged` to `want` on `vm` (subscribe first, then act).
pub struct StatusWatch {
    stream: maqet::client::StatusChangedStream,
}

impl StatusWatch {
    pub async fn new(vm: &VmProxy<'_>) -> StatusWatch {
        StatusWatch {
            stream: vm.receive_vm_status_changed().await.unwrap(),
        }
    }

    /// The next StatusChanged whose status is `want`: (status, previous, reason).
    pub async fn until(&mut self, want: &str) -> (String, String, String) {
        let fut = async {
            while let Some(sig) = self.stream.next().await {
                let a = sig.args().unwrap();
                if *a.status() == want {
                    return (
                        a.status().to_string(),
                        a.previous().to_string(),
                        a.reason().to_string(),
                    );
                }
            }
            panic!("signal stream ended before status {want}");
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| panic!("no StatusChanged to {want} within {TIMEOUT:?}"))
    }
}

/// The VM's `StatusReason` changes, from when it is made (a signal stream: every
/// change queued, none coalesced).
pub struct Reasons(zbus::fdo::PropertiesChangedStream);

impl Reasons {
    pub async fn new(vm: &VmProxy<'_>) -> Reasons {
        let props = zbus::fdo::PropertiesProxy::builder(vm.inner().connection())
            .destination("org.maqet.Maqet1")
            .path(vm.inner().path().clone())
            .build()
            .await
            .unwrap();
        Reasons(props.receive_properties_changed().await.unwrap())
    }

    /// The next `StatusReason` starting with `prefix`.
    pub async fn until(&mut self, prefix: &str) -> String {
        let wait = async {
            while let Some(sig) = self.0.next().await {
                let args = sig.args().unwrap();
                if let Some(v) = args.changed_properties().get("StatusReason") {
                    let r: String = v.try_clone().unwrap().try_into().unwrap();
                    if r.starts_with(prefix) {
                        return r;
                    }
                }
            }
            panic!("signal stream ended");
        };
        tokio::time::timeout(TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| panic!("no StatusReason starting with {prefix:?}"))
    }
}

/// A long-running command (`gdbus monitor`, `maqet events`) whose output lines (stdout
/// and stderr, as they come) a test waits for; killed when dropped.
pub struct ChildLines {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ChildLines {
    pub fn spawn(mut cmd: Command) -> ChildLines {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn a monitoring command");
        let (tx, lines) = mpsc::channel::<String>();
        fn forward(from: impl std::io::Read + Send + 'static, tx: mpsc::Sender<String>) {
            std::thread::spawn(move || {
                for line in BufReader::new(from).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        forward(child.stdout.take().unwrap(), tx.clone());
        forward(child.stderr.take().unwrap(), tx);
        ChildLines { child, lines }
    }

    /// The next line `pred` accepts, within [`TIMEOUT`].
    pub fn next_matching(&self, pred: &dyn Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(e) => panic!("no matching line from the monitoring command: {e}"),
            }
        }
    }
}

impl Drop for ChildLines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The D-Bus error name of a failed call.
pub fn error_name(e: &maqet::error::MaqetError) -> String {
    use zbus::DBusError;
    e.name().to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What HMP's `info version` prints, derived from the same QEMU's QMP `query-version`
/// answer (`{"qemu": {"major", "minor", "micro"}, "package"}`). Comparing the two checks
/// that a human-monitor command really ran in that QEMU, whatever its version.
pub fn hmp_info_version(query_version: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(query_version).expect("query-version JSON");
    let q = &v["qemu"];
    format!(
        "{}.{}.{}{}",
        q["major"],
        q["minor"],
        q["micro"],
        v["package"].as_str().unwrap_or_default()
    )
}

/// Waits (at most [`TIMEOUT`]) for process `pid` to exit: its pidfd becomes readable. A
/// process already gone returns at once.
pub async fn process_gone(pid: u32) {
    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    let Ok(fd) = pidfd_open(Pid::from_raw(pid as i32).unwrap(), PidfdFlags::NONBLOCK) else {
        return;
    };
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .unwrap();
    tokio::time::timeout(TIMEOUT, afd.readable())
        .await
        .unwrap_or_else(|_| panic!("process {pid} did not exit"))
        .unwrap()
        .retain_ready();
}
