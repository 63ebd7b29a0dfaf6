//! The libvirt peer: libvirt's session daemon, libvirt-dbus and a private session bus of
//! their own, all started by the bench in the run's directory, with the same tiny VM
//! defined. Nothing of the system's (no system daemon, socket or bus) is touched.
//!
//! Run as root, libvirt maps `qemu:///session` to the privileged daemon; so every libvirt
//! process runs in a user namespace where the bench's uid appears as `nobody` (65534):
//! libvirt sees an unprivileged user and keeps all its state under the XDG directories
//! given, while outside the namespace the processes keep the bench's own credentials
//! (so QEMU still opens /dev/kvm). The bench's own D-Bus connection to that bus
//! authenticates ANONYMOUS, since across the namespace its uid does not match.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath};

use crate::bare::accel;
use crate::fixture::{MARKER_VAR, kill_marked};
use crate::report::{Samples, Unit};
use crate::sections::Bench;
use crate::session::{Context, Res, TIMEOUT};
use crate::targets::LIBVIRT;

const CONNECT: &str = "org.libvirt.Connect";
const DOMAIN_IFACE: &str = "org.libvirt.Domain";
const QEMU_PATH: &str = "/org/libvirt/QEMU";
/// The `event` of libvirt-dbus's `DomainEvent` for a start, and those that end a
/// domain (libvirt 9 / libvirt-dbus 1.4 report a destroy as 6, a crash as 5 or 8).
const EVENT_STARTED: &[i32] = &[2];
const EVENT_STOPPED: &[i32] = &[5, 6, 8];

/// libvirt's daemons, bus and client, started for one section.
pub struct Libvirt {
    dir: PathBuf,
    marker: String,
    pub domain: String,
    bus: Child,
    address: String,
    pub conn: Connection,
    pub domain_path: String,
}

/// The programs the peer needs, or why it is missing.
fn programs() -> Result<(), String> {
    let missing: Vec<&str> = [
        "virsh",
        "libvirtd",
        "libvirt-dbus",
        "unshare",
        "dbus-daemon",
    ]
    .into_iter()
    .filter(|p| which(p).is_none())
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} not installed (scripts/setup-deps --bench installs libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients, libvirt-dbus)",
            missing.join(", ")
        ))
    }
}

impl Libvirt {
    /// Starts the peer with the tiny VM defined (not running); `None` (recorded as
    /// "peer missing" with why) when libvirt is not installed or cannot run here.
    pub async fn start(b: &mut Bench<'_>) -> Res<Option<Libvirt>> {
        if let Err(why) = programs() {
            b.report.peer_missing(LIBVIRT, why);
            return Ok(None);
        }
        match Self::try_start(b).await {
            Ok(l) => Ok(Some(l)),
            Err(why) => {
                b.report
                    .peer_missing(LIBVIRT, format!("installed but cannot run here: {why}"));
                Ok(None)
            }
        }
    }

    async fn try_start(b: &mut Bench<'_>) -> Res<Libvirt> {
        let n = b.report.notes.len() + b.report.figures.len();
        let dir = b.run.root().join(format!("lv{n}"));
        for d in ["run", "config", "cache", "data", "home"] {
            std::fs::create_dir_all(dir.join(d)).ctx("libvirt dirs")?;
        }
        std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o700))
            .ctx("libvirt runtime dir")?;
        let marker = format!("{}/lv{n}", b.run.marker());
        let domain = format!("maqet-bench-{}-{n}", &b.run.marker()[..8]);
        std::fs::write(dir.join("bus.conf"), bus_conf(&dir.join("run/bus"))).ctx("bus.conf")?;
        let mut bus = userns(&dir, &marker, "dbus-daemon")
            .arg(format!("--config-file={}", dir.join("bus.conf").display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("bus.log")).ctx("bus.log")?)
            .process_group(0)
            .spawn()
            .ctx("dbus-daemon for libvirt")?;
        let address = read_line(bus.stdout.take().expect("piped"))?;
        let mut peer = Libvirt {
            dir,
            marker,
            domain,
            bus,
            address: address.clone(),
            conn: anonymous(&address).await?,
            domain_path: String::new(),
        };
        let log = std::fs::File::create(peer.dir.join("libvirtd.log")).ctx("libvirtd.log")?;
        peer.userns_cmd("libvirtd")
            .stdout(log.try_clone().ctx("log")?)
            .stderr(log)
            .spawn()
            .ctx("libvirtd")?;
        let sock = peer.dir.join("run/libvirt/libvirt-sock");
        wait_for(|| sock.exists(), "libvirtd's session socket")?;
        let xml = peer.dir.join("domain.xml");
        std::fs::write(&xml, domain_xml(&peer.domain)).ctx("domain XML")?;
        peer.virsh_ok(&["define", &xml.to_string_lossy()])?;
        let uuid = peer.virsh_ok(&["domuuid", &peer.domain])?;
        peer.domain_path = format!("{QEMU_PATH}/domain/_{}", uuid.trim().replace('-', "_"));
        let log = std::fs::File::create(peer.dir.join("libvirt-dbus.log")).ctx("log")?;
        peer.userns_cmd("libvirt-dbus")
            .arg("--session")
            .stdout(log.try_clone().ctx("log")?)
            .stderr(log)
            .spawn()
            .ctx("libvirt-dbus")?;
        let dbus = zbus::fdo::DBusProxy::new(&peer.conn)
            .await
            .ctx("DBus proxy")?;
        let name = zbus::names::BusName::try_from("org.libvirt").ctx("name")?;
        let deadline = Instant::now() + TIMEOUT;
        while !dbus
            .name_has_owner(name.clone())
            .await
            .ctx("NameHasOwner")?
        {
            if Instant::now() > deadline {
                return Err("libvirt-dbus did not take its bus name".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(peer)
    }

    fn userns_cmd(&self, program: &str) -> Command {
        let mut cmd = userns(&self.dir, &self.marker, program);
        cmd.env("DBUS_SESSION_BUS_ADDRESS", &self.address);
        cmd
    }

    /// `virsh -c qemu:///session ARGS` as the libvirt user runs it (not yet spawned).
    pub fn virsh(&self, args: &[&str]) -> Command {
        let mut cmd = self.userns_cmd("virsh");
        cmd.args(["-c", "qemu:///session"]).args(args);
        cmd
    }

    /// Runs virsh; its stdout, or the error it printed.
    pub fn virsh_ok(&self, args: &[&str]) -> Res<String> {
        let out = self.virsh(args).output().ctx("virsh")?;
        if !out.status.success() {
            return Err(format!(
                "virsh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// RSS of libvirt's own processes (libvirtd, virtlogd, libvirt-dbus), not QEMU's.
    pub fn daemons_rss(&self) -> u64 {
        let mut sum = 0;
        for_marked(&self.marker, |pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if matches!(comm.trim(), "libvirtd" | "virtlogd" | "libvirt-dbus") {
                sum += crate::sections::rss_bytes(pid).unwrap_or(0);
            }
        });
        sum
    }

    /// The running domain's QEMU, from libvirt's pid file.
    pub fn qemu_pid(&self) -> Res<u32> {
        let f = self
            .dir
            .join(format!("run/libvirt/qemu/run/{}.pid", self.domain));
        std::fs::read_to_string(&f)
            .ctx("libvirt's QEMU pid file")?
            .trim()
            .parse()
            .ctx("pid file")
    }

    /// libvirt-dbus's `DomainEvent` signals of this domain; subscribe before acting.
    pub async fn events(&self) -> Res<MessageStream> {
        let rule = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface(CONNECT)
            .member("DomainEvent")
            .build()
            .ctx("match rule")?;
        MessageStream::for_match_rule(rule, &self.conn, std::num::NonZeroUsize::new(64))
            .await
            .ctx("subscribing to DomainEvent")
    }

    /// One `org.libvirt.Domain` method with a `u` flags argument, timed to its reply.
    pub async fn domain_call(&self, method: &str) -> zbus::Result<(Duration, zbus::Message)> {
        let t0 = Instant::now();
        let reply = self
            .conn
            .call_method(
                Some("org.libvirt"),
                self.domain_path.as_str(),
                Some(DOMAIN_IFACE),
                method,
                &(0u32,),
            )
            .await?;
        Ok((t0.elapsed(), reply))
    }

    /// Calls `method` and waits for this domain's event `want`; the time to the event.
    async fn act_until(
        &self,
        events: &mut MessageStream,
        method: &str,
        want: &[i32],
    ) -> Res<Duration> {
        let t0 = Instant::now();
        let (reply, seen) =
            futures_util::future::join(self.domain_call(method), self.until(events, want)).await;
        reply.ctx(&format!("libvirt-dbus {method}"))?;
        Ok(seen?.duration_since(t0))
    }

    async fn until(&self, events: &mut MessageStream, want: &[i32]) -> Res<Instant> {
        let wait = async {
            while let Some(msg) = events.next().await {
                let at = Instant::now();
                let Ok(msg) = msg else { continue };
                if let Ok((path, event, _)) =
                    msg.body().deserialize::<(OwnedObjectPath, i32, i32)>()
                    && path.as_str() == self.domain_path
                    && want.contains(&event)
                {
                    return Ok(at);
                }
            }
            Err("libvirt's event stream ended".to_string())
        };
        tokio::time::timeout(TIMEOUT, wait)
            .await
            .map_err(|_| format!("no libvirt DomainEvent {want:?} within {TIMEOUT:?}"))?
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let _ = self.virsh(&["destroy", &self.domain]).output();
        // libvirt gives QEMU and virtlogd a clean environment (no marker): find QEMU
        // by its name, virtlogd by the runtime directory it kept.
        let needle = format!("guest={}", self.domain);
        let runtime = format!("XDG_RUNTIME_DIR={}", self.dir.join("run").display());
        kill_where(|pid| {
            let has = |file: &str, word: &[u8]| {
                std::fs::read(format!("/proc/{pid}/{file}"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == word))
            };
            has("cmdline", needle.as_bytes()) || has("environ", runtime.as_bytes())
        });
        kill_marked(|m| m == self.marker);
        // SAFETY: the bus is our unreaped child, so its pid (= pgid) is still ours.
        unsafe { libc::killpg(self.bus.id() as i32, libc::SIGKILL) };
        let _ = self.bus.wait();
    }
}

/// libvirt side by side: start → event and crash → event through libvirt-dbus, the
/// D-Bus state read, and the daemons' memory, with the same tiny VM.
pub async fn libvirt(b: &mut Bench<'_>) -> Res<()> {
    let _orphans = crate::fixture::OrphansToInit::new();
    let Some(lv) = Libvirt::start(b).await? else {
        return Ok(());
    };
    let mut events = lv.events().await?;
    let (mut start, mut crash) = (Samples::default(), Samples::default());
    let runs = b.opts.runs.min(5);
    for i in 0..=runs {
        let d = lv.act_until(&mut events, "Create", EVENT_STARTED).await?;
        crate::sections::settle_guest().await;
        lv.act_until(&mut events, "Destroy", EVENT_STOPPED).await?;
        if i > 0 {
            start.push(d);
        }
    }
    for _ in 0..runs {
        lv.act_until(&mut events, "Create", EVENT_STARTED).await?;
        crate::sections::settle_guest().await;
        let pid = lv.qemu_pid()?;
        let fd = Pid::from_raw(pid as i32)
            .ok_or("pid 0")
            .and_then(|p| pidfd_open(p, PidfdFlags::empty()).map_err(|_| "pidfd_open"))?;
        let t0 = Instant::now();
        pidfd_send_signal(&fd, Signal::KILL).ctx("SIGKILL libvirt's QEMU")?;
        let at = lv.until(&mut events, EVENT_STOPPED).await?;
        crash.push(at.duration_since(t0));
    }
    lv.act_until(&mut events, "Create", EVENT_STARTED).await?;
    let mut get = Samples::default();
    let warmup = (b.opts.calls / 10).max(20);
    for i in 0..warmup + b.opts.calls {
        let (d, _) = lv
            .domain_call("GetState")
            .await
            .ctx("libvirt-dbus GetState")?;
        if i >= warmup {
            get.push(d);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = lv.daemons_rss();
    lv.act_until(&mut events, "Destroy", EVENT_STOPPED).await?;
    let r = &mut b.report;
    r.add(
        "libvirt",
        "lv_start",
        "libvirt: Domain.Create → DomainEvent(started) via libvirt-dbus (median)",
        start.median(),
        Unit::Us,
        start.len(),
    );
    r.add(
        "libvirt",
        "lv_crash",
        "libvirt: QEMU SIGKILLed → DomainEvent(stopped) (median)",
        crash.median(),
        Unit::Us,
        crash.len(),
    );
    r.add_pcts(
        "libvirt",
        "lv_getstate",
        "libvirt: libvirt-dbus Domain.GetState",
        &get,
    );
    r.add(
        "libvirt",
        "lv_rss",
        "libvirt: RSS of libvirtd + virtlogd + libvirt-dbus, one VM running",
        Some(rss as f64),
        Unit::Bytes,
        0,
    );
    Ok(())
}

/// `program` in a user namespace where the bench's uid is `nobody`, with the peer's
/// XDG directories and the run's marker.
fn userns(dir: &Path, marker: &str, program: &str) -> Command {
    let mut cmd = Command::new("unshare");
    let program = which(program).unwrap_or_else(|| program.to_string());
    cmd.args(["--user", "--map-user=65534", "--map-group=65534", &program])
        .stdin(Stdio::null())
        .env(MARKER_VAR, marker)
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .env_remove("LIBVIRT_DEFAULT_URI")
        .env("XDG_RUNTIME_DIR", dir.join("run"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("HOME", dir.join("home"));
    cmd
}

async fn anonymous(address: &str) -> Res<Connection> {
    zbus::connection::Builder::address(address)
        .auth_mechanism(zbus::connection::AuthMechanism::Anonymous)
        .build()
        .await
        .ctx("connecting to libvirt's bus")
}

fn read_line(mut out: impl Read) -> Res<String> {
    let mut line = String::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).ctx("dbus-daemon address")? == 1 && byte[0] != b'\n' {
        line.push(byte[0] as char);
    }
    if line.starts_with("unix:") {
        Ok(line)
    } else {
        Err(format!("dbus-daemon printed no address ({line:?})"))
    }
}

/// Polls `ready` (a daemon's socket appearing) every 10 ms, up to [`TIMEOUT`].
fn wait_for(ready: impl Fn() -> bool, what: &str) -> Res<()> {
    let deadline = Instant::now() + TIMEOUT;
    while !ready() {
        if Instant::now() > deadline {
            return Err(format!("no {what} within {TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn bus_conf(socket: &Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <auth>ANONYMOUS</auth>
  <allow_anonymous/>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
        socket.display()
    )
}

/// The tiny VM in libvirt's words: 64 MiB, one vCPU, no disk, no display, and none of
/// the devices libvirt adds by default that the tiny VM does not have.
fn domain_xml(name: &str) -> String {
    let domain_type = if accel() == "kvm" { "kvm" } else { "qemu" };
    let emulator =
        which("qemu-system-x86_64").unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into());
    format!(
        r#"<domain type='{domain_type}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"#
    )
}

/// `cmd` on PATH, or in /usr/sbin (libvirtd's home, not on every user's PATH).
pub fn which(cmd: &str) -> Option<String> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
}

fn for_marked(marker: &str, mut f: impl FnMut(u32)) {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        if crate::fixture::marker_of(pid).is_some_and(|m| m == marker) {
            f(pid);
        }
    }
}

/// SIGKILLs every process `matches` picks (re-checked on its pidfd) and waits for it.
fn kill_where(matches: impl Fn(u32) -> bool) {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        if !matches(pid) {
            continue;
        }
        let Some(fd) =
            Pid::from_raw(pid as i32).and_then(|p| pidfd_open(p, PidfdFlags::empty()).ok())
        else {
            continue;
        };
        if matches(pid) {
            let _ = pidfd_send_signal(&fd, Signal::KILL);
            crate::fixture::wait_pidfd(&fd, Duration::from_secs(5));
        }
    }
}
