//! The measurements. Each section runs on a fresh private bus with a fresh maqetd, so
//! sections neither disturb each other nor depend on each other's order; where a target
//! compares maqet with a floor, both are measured in the same section, interleaved, so
//! the machine's load at the time weighs on both alike.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use maqet::client::{BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH, VM_INTERFACE};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

use crate::bare::{self, BareQemu};
use crate::fixture::{Run, wait_pidfd};
use crate::report::{Report, Samples, Unit};
use crate::session::{Context, Res, Session, Watch, act_until};

pub struct Opts {
    pub quick: bool,
    /// Samples of each start, stop and crash figure.
    pub runs: usize,
    /// Samples of each call-latency figure.
    pub calls: usize,
    /// Idle window.
    pub idle: Duration,
    /// Idle window with real guests running.
    pub guest_idle: Duration,
}

pub struct Bench<'a> {
    pub run: &'a Run,
    pub opts: &'a Opts,
    pub report: Report,
}

const PEER: &str = "org.freedesktop.DBus.Peer";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const QMP_INTERFACE: &str = "org.maqet.Maqet1.QMP";
const OBJECT_MANAGER: &str = "org.freedesktop.DBus.ObjectManager";

/// Bare QEMU spawn → QMP ready vs maqet `Start()` → `running`, and the stops.
pub async fn start(b: &mut Bench<'_>) -> Res<()> {
    let s = Session::new(b.run).await?;
    let vm = s.add_tiny("start").await?;
    let mut watch = Watch::new(&vm).await?;
    let (binary, args) = bare::command_line(&uuid::Uuid::new_v4().to_string(), "bare")?;
    let socket = s.bus.dir().join("bare.sock");
    let (mut bare_spawn, mut bare_quit, mut start, mut stop) = Default::default();
    // One unmeasured round of each warms the page cache and maqetd's code paths.
    for i in 0..=b.opts.runs {
        let measured = i > 0;
        // Alternate who goes first, so a drift in load weighs on both sides alike.
        for side in [i % 2, (i + 1) % 2] {
            if side == 0 {
                let (q, d) = BareQemu::spawn_ready(&binary, &args, &socket, s.bus.marker())
                    .ctx("bare QEMU")?;
                settle_guest().await;
                let quit = q.quit().ctx("bare QEMU quit")?;
                if measured {
                    Samples::push(&mut bare_spawn, d);
                    Samples::push(&mut bare_quit, quit);
                }
            } else {
                let d = act_until(&mut watch, "running", vm.start()).await?;
                settle_guest().await;
                let d2 = act_until(&mut watch, "stopped", vm.stop(true, 0)).await?;
                if measured {
                    Samples::push(&mut start, d);
                    Samples::push(&mut stop, d2);
                }
            }
        }
    }
    let r = &mut b.report;
    let n = b.opts.runs;
    r.add(
        "start",
        "bare_spawn_ready",
        "floor: bare QEMU spawn → QMP ready (median)",
        bare_spawn.median(),
        Unit::Us,
        n,
    );
    r.add(
        "start",
        "start_running",
        "maqet: Start() → StatusChanged(running) (median)",
        start.median(),
        Unit::Us,
        n,
    );
    r.add(
        "start",
        "start_ratio",
        "maqet start / bare spawn",
        ratio(start.median(), bare_spawn.median()),
        Unit::Ratio,
        0,
    );
    r.add(
        "start",
        "bare_quit_exit",
        "floor: bare QMP quit → process exit (median)",
        bare_quit.median(),
        Unit::Us,
        n,
    );
    r.add(
        "start",
        "stop_force_stopped",
        "maqet: Stop(force) → StatusChanged(stopped) (median)",
        stop.median(),
        Unit::Us,
        n,
    );
    Ok(())
}

/// Call latencies: Peer.Ping (floor), property Get, QMP.Execute, raw QMP (floor).
pub async fn calls(b: &mut Bench<'_>) -> Res<()> {
    let s = Session::new(b.run).await?;
    let vm = s.add_tiny("calls").await?;
    let mut watch = Watch::new(&vm).await?;
    act_until(&mut watch, "running", vm.start()).await?;
    let path = vm.inner().path().to_string();
    let (binary, args) = bare::command_line(&uuid::Uuid::new_v4().to_string(), "bare")?;
    let (mut bare, _) = BareQemu::spawn_ready(
        &binary,
        &args,
        &s.bus.dir().join("bare.sock"),
        s.bus.marker(),
    )
    .ctx("bare QEMU")?;

    let exec = qmp_execute_args(&s, &path).await;
    if let Err(why) = &exec {
        b.report.notes.push(format!("QMP.Execute: {why}"));
    }
    let (mut ping, mut get, mut qmp, mut raw) = Default::default();
    let (mut audited, mut unaudited) = (Samples::default(), Samples::default());
    let warmup = (b.opts.calls / 10).max(20);
    for i in 0..warmup + b.opts.calls {
        let measured = i >= warmup;
        let (d, _) = s
            .timed_call(&path, PEER, "Ping", &())
            .await
            .ctx("Peer.Ping")?;
        let (d2, _) = s
            .timed_call(&path, PROPERTIES, "Get", &(VM_INTERFACE, "Status"))
            .await
            .ctx("Get(Status)")?;
        let d3 = match &exec {
            Ok(body) => Some(
                s.timed_call(&path, QMP_INTERFACE, "Execute", body)
                    .await
                    .ctx("QMP.Execute")?
                    .0,
            ),
            Err(_) => None,
        };
        let d4 = bare.query_status().ctx("raw QMP query-status")?;
        // Every tenth round, two refusals that differ only in the audit: Start on a
        // running VM (InvalidState, audited like every call that is not a read, as
        // QMP.Execute will be) and FindVM of a missing name (NotFound, a read).
        let refused = if i % 10 == 0 {
            Some((
                refusal(&s, &path, VM_INTERFACE, "Start", &()).await?,
                refusal(
                    &s,
                    MANAGER_PATH,
                    MANAGER_INTERFACE,
                    "FindVM",
                    &("no-such-vm",),
                )
                .await?,
            ))
        } else {
            None
        };
        if measured {
            if let Some((d5, d6)) = refused {
                audited.push(d5);
                unaudited.push(d6);
            }
            Samples::push(&mut ping, d);
            Samples::push(&mut get, d2);
            if let Some(d3) = d3 {
                Samples::push(&mut qmp, d3);
            }
            Samples::push(&mut raw, d4);
        }
    }
    drop(bare);
    let cpu = cpu_per_call(&s, &path, b.opts.calls, exec.as_ref().ok()).await?;
    act_until(&mut watch, "stopped", vm.stop(true, 0)).await?;

    let r = &mut b.report;
    r.add_pcts("calls", "ping", "floor: Peer.Ping to maqetd", &ping);
    r.add_pcts("calls", "raw_qmp", "floor: raw QMP query-status", &raw);
    r.add_pcts("calls", "get_status", "maqet: Get(VM.Status)", &get);
    r.add_pcts(
        "calls",
        "qmp_execute",
        "maqet: QMP.Execute(query-status)",
        &qmp,
    );
    if exec.is_err() {
        r.note_last("not available on this build");
    }
    r.add_pcts(
        "calls",
        "refused",
        "maqet: refused read (FindVM → NotFound)",
        &unaudited,
    );
    r.add_pcts(
        "calls",
        "audited",
        "maqet: refused Start (running → InvalidState)",
        &audited,
    );
    r.add(
        "calls",
        "audit_cost",
        "maqet: audit cost (refused Start p50 − refused read p50)",
        (|| Some(audited.median()? - unaudited.median()?))(),
        Unit::Us,
        0,
    );
    for (key, label, v) in &cpu {
        r.add("calls", key, label, Some(*v), Unit::Us, b.opts.calls);
    }
    r.add(
        "calls",
        "cpu_audit",
        "maqetd CPU per call: audit (refused Start − refused read)",
        (|| {
            let get = |k: &str| cpu.iter().find(|c| c.0 == k).map(|c| c.2);
            Some(get("cpu_refused_start")? - get("cpu_refused_read")?)
        })(),
        Unit::Us,
        0,
    );
    r.note_last("the gate's audit (row + log line) that every non-read call pays");
    r.add(
        "calls",
        "cpu_qmp_overhead",
        "maqetd CPU per call: QMP.Execute − Peer.Ping",
        (|| {
            let get = |k: &str| cpu.iter().find(|c| c.0 == k).map(|c| c.2);
            Some(get("cpu_qmp_execute")? - get("cpu_ping")?)
        })(),
        Unit::Us,
        0,
    );
    r.note_last("classify, gate, QMP client round trip, JSON in and out");
    Ok(())
}

/// maqetd's CPU time per call (all threads, from schedstat), for blocks of `n` calls of
/// one kind: load on the machine stretches latencies, much less the work done per call.
async fn cpu_per_call(
    s: &Session,
    path: &str,
    n: usize,
    exec: Option<&(&'static str, &'static str, bool)>,
) -> Res<Vec<(&'static str, &'static str, f64)>> {
    let pid = s.maqetd_pid().await?;
    let mut out = Vec::new();
    let kinds: [(&str, &str); 5] = [
        ("cpu_ping", "maqetd CPU per call: Peer.Ping"),
        ("cpu_get", "maqetd CPU per call: Get(Status)"),
        (
            "cpu_qmp_execute",
            "maqetd CPU per call: QMP.Execute(query-status)",
        ),
        (
            "cpu_refused_read",
            "maqetd CPU per call: refused read (FindVM)",
        ),
        (
            "cpu_refused_start",
            "maqetd CPU per call: refused Start (audited)",
        ),
    ];
    for (key, label) in kinds {
        // QMP.Execute's arguments, when this build has the interface.
        let exec = match (key, exec) {
            ("cpu_qmp_execute", None) => continue,
            (_, exec) => exec,
        };
        let before = cpu_ns(pid)?;
        for _ in 0..n {
            let _ = match key {
                "cpu_ping" => s.timed_call(path, PEER, "Ping", &()).await,
                "cpu_get" => {
                    s.timed_call(path, PROPERTIES, "Get", &(VM_INTERFACE, "Status"))
                        .await
                }
                "cpu_qmp_execute" => {
                    let body = exec.ok_or("no QMP.Execute")?;
                    s.timed_call(path, QMP_INTERFACE, "Execute", body).await
                }
                "cpu_refused_read" => {
                    s.timed_call(MANAGER_PATH, MANAGER_INTERFACE, "FindVM", &("no-such-vm",))
                        .await
                }
                _ => s.timed_call(path, VM_INTERFACE, "Start", &()).await,
            };
        }
        // Let work the calls left behind (the audit writer) finish before reading.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let spent = cpu_ns(pid)? - before;
        out.push((key, label, spent as f64 / 1000.0 / n as f64));
    }
    Ok(out)
}

/// Nanoseconds on CPU of every thread of `pid` (first field of each task's schedstat).
pub fn cpu_ns(pid: u32) -> Res<u64> {
    let mut sum = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ctx("task dir")? {
        let t = t.ctx("task")?.path().join("schedstat");
        let text = std::fs::read_to_string(&t).ctx("schedstat")?;
        sum += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("bad schedstat")?;
    }
    Ok(sum)
}

/// A call that must fail; returns its round trip.
async fn refusal<B>(s: &Session, path: &str, iface: &str, method: &str, body: &B) -> Res<Duration>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    let t = Instant::now();
    match s.timed_call(path, iface, method, body).await {
        Ok(_) => Err(format!("{method} was expected to be refused")),
        Err(_) => Ok(t.elapsed()),
    }
}

/// The arguments `QMP.Execute` takes for `query-status`, or why it cannot be measured.
async fn qmp_execute_args(
    s: &Session,
    path: &str,
) -> Result<(&'static str, &'static str, bool), String> {
    let mut last = String::new();
    // The interface is young: accept either spelling of "no arguments".
    for body in [("query-status", "{}", false), ("query-status", "", false)] {
        let err = match s.timed_call(path, QMP_INTERFACE, "Execute", &body).await {
            Ok(_) => return Ok(body),
            Err(e) => e,
        };
        // zbus turns the standard errors into `Error::FDO`; others stay `MethodError`.
        let name = match &err {
            zbus::Error::MethodError(name, _, _) => name.to_string(),
            zbus::Error::FDO(e) => zbus::DBusError::name(e.as_ref()).to_string(),
            _ => String::new(),
        };
        if matches!(
            name.as_str(),
            "org.freedesktop.DBus.Error.UnknownInterface"
                | "org.freedesktop.DBus.Error.UnknownMethod"
                | "org.freedesktop.DBus.Error.UnknownObject"
        ) {
            return Err(format!("not available ({name}); reported as not measured"));
        }
        last = err.to_string();
    }
    Err(format!("refused query-status ({last})"))
}

/// QEMU killed with SIGKILL → `StatusChanged(crashed)`.
pub async fn crash(b: &mut Bench<'_>) -> Res<()> {
    let s = Session::new(b.run).await?;
    let vm = s.add_tiny("crash").await?;
    let id = vm.id().await.ctx("Id")?;
    let mut watch = Watch::new(&vm).await?;
    let (binary, args) = bare::command_line(&uuid::Uuid::new_v4().to_string(), "bare")?;
    let socket = s.bus.dir().join("bare.sock");
    let (mut crash, mut bare_kill, mut detect): (Samples, Samples, Samples) = Default::default();
    for _ in 0..b.opts.runs {
        let (q, _) =
            BareQemu::spawn_ready(&binary, &args, &socket, s.bus.marker()).ctx("bare QEMU")?;
        settle_guest().await;
        bare_kill.push(q.kill().ctx("bare QEMU kill")?);
        act_until(&mut watch, "running", vm.start()).await?;
        settle_guest().await;
        let pid = vm.pid().await.ctx("Pid")?;
        let fd = Pid::from_raw(pid as i32)
            .ok_or("Pid is 0 while running")
            .and_then(|p| pidfd_open(p, PidfdFlags::empty()).map_err(|_| "pidfd_open failed"))?;
        // The pidfd names the process for good; check it is this VM's QEMU.
        if !maqet::vm::process::cmdline_has_uuid(pid, &id).unwrap_or(false) {
            return Err(format!("pid {pid} is not the QEMU of VM {id}"));
        }
        // Watch the exit ourselves too: maqet's own share is exit → signal.
        // SAFETY: the AsyncFd owns the pidfd, which stays open and unchanged while it lives.
        let exited = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .ctx("pidfd on the reactor")?;
        let t0 = Instant::now();
        pidfd_send_signal(exited.get_ref(), Signal::KILL).ctx("SIGKILL")?;
        let seen_exit = async {
            let _ = exited.readable().await;
            Instant::now()
        };
        let (exit_at, at) = futures_util::future::join(seen_exit, watch.until("crashed")).await;
        let at = at?;
        crash.push(at.duration_since(t0));
        detect.push(at.saturating_duration_since(exit_at));
    }
    b.report.add(
        "crash",
        "bare_kill_exit",
        "floor: bare QEMU SIGKILLed → pidfd readable (median)",
        bare_kill.median(),
        Unit::Us,
        bare_kill.len(),
    );
    b.report.add(
        "crash",
        "crash_signal",
        "maqet: QEMU SIGKILLed → StatusChanged(crashed) (median)",
        crash.median(),
        Unit::Us,
        crash.len(),
    );
    b.report.add(
        "crash",
        "crash_detect",
        "maqet's share: QEMU exit (pidfd readable) → StatusChanged(crashed) (median)",
        detect.median(),
        Unit::Us,
        detect.len(),
    );
    b.report
        .note_last("the rest is the kernel tearing QEMU down (KVM: 4–20 ms, bimodal here)");
    Ok(())
}

/// maqetd's resident memory with 0, 1 and 10 VMs running, then its idle cost.
pub async fn footprint(b: &mut Bench<'_>) -> Res<()> {
    let s = Session::new(b.run).await?;
    let pid = s.maqetd_pid().await?;
    let mut vms = Vec::new();
    for i in 0..10 {
        vms.push(s.add_tiny(&format!("fp{i}")).await?);
    }
    let settle = || tokio::time::sleep(Duration::from_millis(500));
    settle().await;
    let rss0 = rss_bytes(pid)?;
    let mut watches = Vec::new();
    let (mut rss1, mut anon1) = (0, 0);
    for (i, vm) in vms.iter().enumerate() {
        let mut w = Watch::new(vm).await?;
        act_until(&mut w, "running", vm.start()).await?;
        watches.push(w);
        if i == 0 {
            settle().await;
            rss1 = rss_bytes(pid)?;
            anon1 = proc_status_field(pid, None, "RssAnon")? * 1024;
        }
    }
    settle().await;
    let rss10 = rss_bytes(pid)?;

    // Idle: nothing is called, every VM runs. Only QMP events, exits or calls may wake
    // maqetd, and none should come.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t0, c0) = (cpu_ticks(pid)?, ctx_switches(pid)?);
    tokio::time::sleep(b.opts.idle).await;
    let (t1, c1) = (cpu_ticks(pid)?, ctx_switches(pid)?);
    let threads = thread_count(pid)?;

    for (vm, w) in vms.iter().zip(watches.iter_mut()) {
        act_until(w, "stopped", vm.stop(true, 0)).await?;
    }
    let r = &mut b.report;
    r.add(
        "footprint",
        "rss_0",
        "maqetd RSS, 10 defined, 0 running",
        Some(rss0 as f64),
        Unit::Bytes,
        0,
    );
    r.add(
        "footprint",
        "rss_1",
        "maqetd RSS, 1 running",
        Some(rss1 as f64),
        Unit::Bytes,
        0,
    );
    // Most of the RSS is the executable's pages that the kernel maps around each fault
    // (fault-around, large folios); that part moves with how the binary entered the page
    // cache. The anonymous part is what maqetd allocates.
    r.add(
        "footprint",
        "rss_1_anon",
        "maqetd RSS, 1 running: anonymous (heap, stacks)",
        Some(anon1 as f64),
        Unit::Bytes,
        0,
    );
    r.add(
        "footprint",
        "rss_1_file",
        "maqetd RSS, 1 running: file-backed (code, read-only data, libraries)",
        Some(rss1.saturating_sub(anon1) as f64),
        Unit::Bytes,
        0,
    );
    r.add(
        "footprint",
        "rss_10",
        "maqetd RSS, 10 running",
        Some(rss10 as f64),
        Unit::Bytes,
        0,
    );
    r.add(
        "footprint",
        "idle_ticks",
        &format!(
            "maqetd CPU ticks (utime+stime), {} s idle, 10 VMs running",
            b.opts.idle.as_secs()
        ),
        Some((t1 - t0) as f64),
        Unit::Count,
        0,
    );
    r.add(
        "footprint",
        "idle_switches",
        &format!(
            "maqetd context switches (all threads), {} s idle",
            b.opts.idle.as_secs()
        ),
        Some((c1 - c0) as f64),
        Unit::Count,
        0,
    );
    r.add(
        "footprint",
        "rss_per_vm",
        "maqetd RSS per further running VM ((10 − 1) / 9)",
        Some((rss10 as f64 - rss1 as f64) / 9.0),
        Unit::Bytes,
        0,
    );
    r.add(
        "footprint",
        "threads",
        "maqetd threads",
        Some(threads as f64),
        Unit::Count,
        0,
    );
    Ok(())
}

/// Lets a fresh guest get as far as its firmware takes it before it is stopped or
/// killed: how long QEMU takes to end grows with the guest memory it has touched, so a
/// floor QEMU killed younger than maqet's would flatter the floor.
pub async fn settle_guest() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?)
}

fn proc_status_field(pid: u32, task: Option<&str>, field: &str) -> Res<u64> {
    let path = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let text = std::fs::read_to_string(&path).ctx(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("{path} has no {field}"))
}

pub fn rss_bytes(pid: u32) -> Res<u64> {
    Ok(proc_status_field(pid, None, "VmRSS")? * 1024)
}

fn thread_count(pid: u32) -> Res<u64> {
    proc_status_field(pid, None, "Threads")
}

/// utime + stime of the whole process (all threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Res<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ctx("stat")?;
    let rest = &stat[stat.rfind(')').ok_or("bad stat")? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    let num = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("bad stat")
    };
    Ok(num(11)? + num(12)?)
}

/// Voluntary + involuntary context switches of every thread (`/proc/<pid>/status`
/// counts the main thread only).
pub fn ctx_switches(pid: u32) -> Res<u64> {
    let mut sum = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ctx("task dir")? {
        let t = t.ctx("task")?.file_name();
        let t = t.to_string_lossy();
        sum += proc_status_field(pid, Some(&t), "voluntary_ctxt_switches")?;
        sum += proc_status_field(pid, Some(&t), "nonvoluntary_ctxt_switches")?;
    }
    Ok(sum)
}

/// The growth curve: `ListVMs`, `GetManagedObjects`, maqetd's RSS and its start-up
/// (activation to first reply) at 100, 1,000 and (not with `--quick`) 10,000 defined
/// VMs; and `AddVM`'s rate.
pub async fn scale(b: &mut Bench<'_>) -> Res<()> {
    let s = Session::new(b.run).await?;
    let yaml = bare::tiny_vm_yaml("x");
    let mut add = Samples::default();
    // The growth curve: the same figures at 100, 1,000 and (full run) 10,000 VMs.
    for i in 0..1000 {
        let t = Instant::now();
        s.manager
            .add_vm(&format!("s{i:05}"), &yaml)
            .await
            .ctx("AddVM")?;
        add.push(t.elapsed());
        if i + 1 == 100 {
            list_figures(b, &s, 100).await?;
            startup(b, &s, 100).await?;
        }
    }
    // The calls only: the 100-VM figures were taken in between.
    let total = add.total();
    let r = &mut b.report;
    r.add(
        "scale",
        "addvm_rate",
        "maqet: AddVM, one at a time (first 1,000)",
        Some(1000.0 / total.as_secs_f64()),
        Unit::PerSec,
        1000,
    );
    r.add_pcts("scale", "addvm", "maqet: AddVM", &add);
    list_figures(b, &s, 1000).await?;
    startup(b, &s, 1000).await?;
    if !b.opts.quick {
        let t0 = Instant::now();
        let results: Vec<_> = futures_util::stream::iter(1000..10_000)
            .map(|i| {
                let m = &s.manager;
                let yaml = &yaml;
                async move { m.add_vm(&format!("s{i:05}"), yaml).await }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            return Err(format!("AddVM: {e}"));
        }
        b.report.add(
            "scale",
            "addvm_rate_pipelined",
            "maqet: AddVM, 16 in flight (1,000 → 10,000)",
            Some(9000.0 / t0.elapsed().as_secs_f64()),
            Unit::PerSec,
            9000,
        );
        list_figures(b, &s, 10_000).await?;
        startup(b, &s, 10_000).await?;
    }
    Ok(())
}

async fn list_figures(b: &mut Bench<'_>, s: &Session, count: usize) -> Res<()> {
    let rss = rss_bytes(s.maqetd_pid().await?)?;
    b.report.add(
        "scale",
        &format!("rss_defined_{count}"),
        &format!("maqetd RSS, {count} VMs added (none running)"),
        Some(rss as f64),
        Unit::Bytes,
        0,
    );
    let n = if b.opts.quick { 10 } else { 30 };
    let (mut list, mut gmo) = (Samples::default(), Samples::default());
    for i in 0..n + 2 {
        let (d, _) = s
            .timed_call(MANAGER_PATH, "org.maqet.Maqet1.Manager", "ListVMs", &())
            .await
            .ctx("ListVMs")?;
        let (d2, _) = s
            .timed_call(MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects", &())
            .await
            .ctx("GetManagedObjects")?;
        if i >= 2 {
            list.push(d);
            gmo.push(d2);
        }
    }
    let r = &mut b.report;
    r.add(
        "scale",
        &format!("listvms_{count}_p50"),
        &format!("maqet: ListVMs p50, {count} VMs"),
        list.median(),
        Unit::Us,
        list.len(),
    );
    r.add(
        "scale",
        &format!("gmo_{count}_p50"),
        &format!("maqet: GetManagedObjects p50, {count} VMs"),
        gmo.median(),
        Unit::Us,
        gmo.len(),
    );
    Ok(())
}

/// Ends maqetd (SIGTERM, as an idle exit would), then times the call that activates it
/// again until its reply.
async fn startup(b: &mut Bench<'_>, s: &Session, count: usize) -> Res<()> {
    let n = if b.opts.quick { 1 } else { 3 };
    let dbus = zbus::fdo::DBusProxy::new(&s.conn).await.ctx("DBus proxy")?;
    let mut samples = Samples::default();
    for _ in 0..n {
        let pid = s.maqetd_pid().await?;
        let mut gone = dbus
            .receive_name_owner_changed_with_args(&[(0, BUS_NAME), (2, "")])
            .await
            .ctx("NameOwnerChanged")?;
        let fd = Pid::from_raw(pid as i32)
            .ok_or("pid 0")
            .and_then(|p| pidfd_open(p, PidfdFlags::empty()).map_err(|_| "pidfd_open"))?;
        pidfd_send_signal(&fd, Signal::TERM).ctx("SIGTERM maqetd")?;
        if !wait_pidfd(&fd, Duration::from_secs(20)) {
            return Err("maqetd did not exit on SIGTERM".into());
        }
        tokio::time::timeout(TIMEOUT_NAME, gone.next())
            .await
            .map_err(|_| "maqet's bus name was not released")?;
        let d = s.version_call().await.ctx("activating call")?;
        samples.push(d);
    }
    let rss = rss_bytes(s.maqetd_pid().await?)?;
    b.report.add(
        "scale",
        &format!("rss_loaded_{count}"),
        &format!("maqetd RSS right after start with {count} VMs defined"),
        Some(rss as f64),
        Unit::Bytes,
        0,
    );
    b.report.add(
        "scale",
        &format!("startup_{count}"),
        &format!("maqetd start, {count} VMs defined: activation → first reply (median)"),
        samples.median(),
        Unit::Us,
        samples.len(),
    );
    Ok(())
}

const TIMEOUT_NAME: Duration = Duration::from_secs(10);
