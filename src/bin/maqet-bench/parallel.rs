//! Scale of work: 50 VMs started at once by 50 clients (one bus connection each) against
//! 50 bare QEMUs spawned at once, and each Start call against one Start alone.

use std::time::{Duration, Instant};

use maqet::client::VmProxy;

use crate::bare::{self, BareQemu};
use crate::report::{Samples, Unit};
use crate::sections::{Bench, cpu_ns, ratio};
use crate::session::{Context, Res, Session, Watch, act_until};

const N: usize = 50;

pub async fn parallel(b: &mut Bench<'_>) -> Res<()> {
    let s = Session::new(b.run).await?;
    let mut paths = Vec::new();
    for i in 0..N {
        let vm = s.add_tiny(&format!("p{i:02}")).await?;
        paths.push(vm.inner().path().to_owned());
    }
    // One client per VM, each with its own connection to the bus.
    let mut clients: Vec<(VmProxy<'static>, Watch)> = Vec::new();
    let mut conns = Vec::new();
    for p in &paths {
        let conn = s.bus.conn().await.ctx("client connection")?;
        let vm = maqet::client::vm_proxy(&conn, p.clone().into())
            .await
            .ctx("VM proxy")?;
        let w = Watch::new(&vm).await?;
        clients.push((vm, w));
        conns.push(conn);
    }
    let maqetd = s.maqetd_pid().await?;
    let (mut single, mut single_cpu) = (Samples::default(), Samples::default());
    for i in 0..=b.opts.runs.min(5) {
        let (vm, w) = &mut clients[0];
        let cpu = cpu_ns(maqetd)?;
        let t = Instant::now();
        vm.start().await.ctx("Start")?;
        let d = t.elapsed();
        w.until("running").await?;
        let cpu = cpu_ns(maqetd)? - cpu;
        act_until(w, "stopped", vm.stop(true, 0)).await?;
        if i > 0 {
            single.push(d);
            single_cpu.push(Duration::from_nanos(cpu));
        }
    }
    let (binary, args) = bare::command_line(&uuid::Uuid::new_v4().to_string(), "bare")?;
    let rounds = if b.opts.quick { 1 } else { 3 };
    let (mut maqet_all, mut bare_all, mut slowest) =
        (Samples::default(), Samples::default(), Samples::default());
    let (mut maqet_cpu, mut bare_cpu) = (RoundCpu::default(), RoundCpu::default());
    for round in 0..rounds {
        for side in [round % 2, (round + 1) % 2] {
            if side == 0 {
                let window = CpuWindow::open(&s, maqetd)?;
                let (took, qemus) = bare_at_once(&binary, &args, &s, window)?;
                bare_all.push(took);
                bare_cpu.add(qemus);
                continue;
            }
            let window = CpuWindow::open(&s, maqetd)?;
            let t0 = Instant::now();
            let calls = futures_util::future::join_all(clients.iter_mut().map(|(vm, w)| async {
                let t = Instant::now();
                vm.start().await.ctx("Start")?;
                let call = t.elapsed();
                w.until("running").await?;
                Ok::<_, String>(call)
            }))
            .await;
            let total = t0.elapsed();
            let mut spent = window.close()?;
            let calls = calls.into_iter().collect::<Res<Vec<Duration>>>()?;
            for (vm, _) in &clients {
                window.count_qemu(&mut spent, vm.pid().await.ctx("Pid")?)?;
            }
            maqet_cpu.add(spent);
            maqet_all.push(total);
            slowest.push(calls.into_iter().max().unwrap_or_default());
            let stops = futures_util::future::join_all(
                clients
                    .iter_mut()
                    .map(|(vm, w)| act_until(w, "stopped", vm.stop(true, 0))),
            )
            .await;
            stops.into_iter().collect::<Res<Vec<_>>>()?;
        }
    }
    let r = &mut b.report;
    r.add(
        "parallel",
        "single_start",
        "maqet: one Start call, alone (median)",
        single.median(),
        Unit::Us,
        single.len(),
    );
    r.add(
        "parallel",
        "cpu_single_start",
        "maqetd CPU for one Start alone, call → running (median)",
        single_cpu.median(),
        Unit::Us,
        single_cpu.len(),
    );
    r.add(
        "parallel",
        "par50_bare",
        "floor: 50 bare QEMUs spawned at once → all QMP ready (median)",
        bare_all.median(),
        Unit::Us,
        bare_all.len(),
    );
    r.add(
        "parallel",
        "par50_maqet",
        "maqet: 50 clients Start at once → all running (median)",
        maqet_all.median(),
        Unit::Us,
        maqet_all.len(),
    );
    r.add(
        "parallel",
        "par50_ratio",
        "maqet 50 at once / bare 50 at once",
        ratio(maqet_all.median(), bare_all.median()),
        Unit::Ratio,
        0,
    );
    r.add(
        "parallel",
        "par50_slowest",
        "maqet: slowest of the 50 Start calls (median over rounds)",
        slowest.median(),
        Unit::Us,
        slowest.len(),
    );
    maqet_cpu.report(r, "maqet", "50 Starts");
    bare_cpu.report(r, "bare", "50 bare spawns");
    drop(conns);
    Ok(())
}

/// Who spent the machine's CPU during one round: the figure to compare when wall
/// times on 2 CPUs shared by 50 QEMUs (and other work) say little.
#[derive(Debug, Default, Clone, Copy)]
struct Spent {
    maqetd: Duration,
    dbus_daemon: Duration,
    bench: Duration,
    /// The 50 QEMUs' own CPU from spawn to the end of the round.
    qemus: Duration,
    /// Share of the machine's CPU time that was idle during the round.
    idle: f64,
    /// When the last of the 50 QEMUs was spawned, after the round began.
    last_spawn: Duration,
}

/// CPU counters read when a round starts.
struct CpuWindow {
    /// CLOCK_BOOTTIME when the round began: QEMUs' start times count from boot.
    began: Duration,
    maqetd: u32,
    dbus_daemon: u32,
    at: [u64; 4],
    machine: (u64, u64),
}

impl CpuWindow {
    fn open(s: &Session, maqetd: u32) -> Res<CpuWindow> {
        let dbus_daemon = s.bus.daemon_pid();
        Ok(CpuWindow {
            at: [cpu_ns(maqetd)?, cpu_ns(dbus_daemon)?, own_cpu_ns(), 0],
            machine: machine_ticks()?,
            began: since_boot(),
            maqetd,
            dbus_daemon,
        })
    }

    fn close(&self) -> Res<Spent> {
        let (busy, idle) = machine_ticks()?;
        let (busy, idle) = (busy - self.machine.0, idle - self.machine.1);
        Ok(Spent {
            maqetd: Duration::from_nanos(cpu_ns(self.maqetd)? - self.at[0]),
            dbus_daemon: Duration::from_nanos(cpu_ns(self.dbus_daemon)? - self.at[1]),
            bench: Duration::from_nanos(own_cpu_ns() - self.at[2]),
            qemus: Duration::ZERO,
            idle: idle as f64 / (busy + idle).max(1) as f64,
            last_spawn: Duration::ZERO,
        })
    }

    /// Adds one QEMU of the round: its CPU so far, and when it was spawned.
    fn count_qemu(&self, spent: &mut Spent, pid: u32) -> Res<()> {
        spent.qemus += Duration::from_nanos(cpu_ns(pid)?);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ctx("QEMU's stat")?;
        // Field 22, after the parenthesised command name: start time in clock ticks.
        let ticks: u64 = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19))
            .and_then(|v| v.parse().ok())
            .ok_or("bad /proc/PID/stat")?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let at = Duration::from_millis(ticks * 1000 / hz);
        spent.last_spawn = spent.last_spawn.max(at.saturating_sub(self.began));
        Ok(())
    }
}

/// The bench's own CPU time, threads that have ended included (the bare side's 50
/// spawning threads are gone when the round is read).
fn own_cpu_ns() -> u64 {
    // SAFETY: a zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(ru.ru_utime) + us(ru.ru_stime)) * 1000
}

/// CLOCK_BOOTTIME, the clock of `/proc/PID/stat`'s start times.
fn since_boot() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Busy and idle ticks of the whole machine, from `/proc/stat`'s `cpu` line.
fn machine_ticks() -> Res<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ctx("/proc/stat")?;
    let v: Vec<u64> = stat
        .lines()
        .next()
        .ok_or("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let busy = v.iter().take(8).sum::<u64>() - idle;
    Ok((busy, idle))
}

#[derive(Default)]
struct RoundCpu {
    maqetd: Samples,
    dbus_daemon: Samples,
    bench: Samples,
    qemus: Samples,
    last_spawn: Samples,
    idle: Vec<f64>,
}

impl RoundCpu {
    fn add(&mut self, s: Spent) {
        self.maqetd.push(s.maqetd);
        self.dbus_daemon.push(s.dbus_daemon);
        self.bench.push(s.bench);
        self.qemus.push(s.qemus);
        self.last_spawn.push(s.last_spawn);
        self.idle.push(s.idle);
    }

    fn report(&self, r: &mut crate::report::Report, side: &str, what: &str) {
        let n = self.maqetd.len();
        let mut add = |key: &str, label: String, v: Option<f64>, unit| {
            r.add("parallel", &format!("cpu_{side}_{key}"), &label, v, unit, n)
        };
        if side == "maqet" {
            add(
                "maqetd",
                format!("maqetd CPU during the {what} (median)"),
                self.maqetd.median(),
                Unit::Us,
            );
            add(
                "maqetd_per_start",
                "maqetd CPU per Start (the above / 50)".into(),
                self.maqetd.median().map(|v| v / N as f64),
                Unit::Us,
            );
        }
        add(
            "dbus_daemon",
            format!("dbus-daemon CPU during the {what} (median)"),
            self.dbus_daemon.median(),
            Unit::Us,
        );
        add(
            "bench",
            format!("the bench's own CPU during the {what} (median)"),
            self.bench.median(),
            Unit::Us,
        );
        add(
            "qemus",
            format!("the 50 QEMUs' CPU, spawn to the end of the {what} (median)"),
            self.qemus.median(),
            Unit::Us,
        );
        add(
            "last_spawn",
            format!(
                "the last QEMU of the {what} spawned, after the round began (median; 10 ms ticks)"
            ),
            self.last_spawn.median(),
            Unit::Us,
        );
        let mut idle = self.idle.clone();
        idle.sort_by(f64::total_cmp);
        add(
            "idle",
            format!("machine idle share during the {what} (median)"),
            idle.get(idle.len() / 2).copied(),
            Unit::Ratio,
        );
    }
}

/// 50 bare QEMUs spawned by 50 threads at once; the time until the last is QMP-ready,
/// and the CPU spent meanwhile.
fn bare_at_once(
    binary: &std::path::Path,
    args: &[String],
    s: &Session,
    window: CpuWindow,
) -> Res<(Duration, Spent)> {
    let barrier = std::sync::Barrier::new(N + 1);
    let dir = s.bus.dir();
    let marker = s.bus.marker();
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let barrier = &barrier;
                sc.spawn(move || {
                    barrier.wait();
                    BareQemu::spawn_ready(binary, args, &dir.join(format!("p{i}.sock")), marker)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut up = Vec::new();
        for h in handles {
            up.push(
                h.join()
                    .map_err(|_| "a spawning thread panicked")?
                    .ctx("bare QEMU")?,
            );
        }
        let total = t0.elapsed();
        let mut spent = window.close()?;
        for (q, _) in &up {
            window.count_qemu(&mut spent, q.pid())?;
        }
        for (q, _) in up {
            q.quit().ctx("bare QEMU quit")?;
        }
        Ok((total, spent))
    })
}
