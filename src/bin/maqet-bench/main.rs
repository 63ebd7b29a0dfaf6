//! maqet-bench: measures maqet against its floors (bare QEMU, raw QMP, a bare D-Bus
//! round trip) in one run on one machine, and reports each target of issue 8 as MET or
//! MISSED. See docs/benchmarks.md for what each figure means.

mod bare;
mod fixture;
mod libvirt;
mod report;
mod sections;
mod session;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use report::{Machine, Report, Target, Unit, Verdict, fmt_value};
use sections::{Bench, Opts};

const SECTIONS: &[&str] = &[
    "start",
    "calls",
    "crash",
    "footprint",
    "scale",
    "parallel",
    "libvirt",
];

/// Measures maqet against bare QEMU, raw QMP and D-Bus floors; prints figures and targets.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Few samples and no 10,000-VM part: a smoke run for CI.
    #[arg(long)]
    quick: bool,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    json: bool,
    /// Run only these sections (comma-separated): start, calls, crash, footprint,
    /// scale, parallel, libvirt.
    #[arg(long, value_delimiter = ',', value_name = "SECTION")]
    only: Vec<String>,
    /// Samples of each start/stop/crash figure (default 10, quick 3).
    #[arg(long)]
    runs: Option<usize>,
    /// Samples of each call-latency figure (default 2000, quick 200).
    #[arg(long)]
    calls: Option<usize>,
    /// The maqetd to activate (default: the one next to this executable).
    #[arg(long)]
    maqetd: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(bad) = args.only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
        eprintln!(
            "maqet-bench: unknown section '{bad}'; sections: {}",
            SECTIONS.join(", ")
        );
        return ExitCode::from(2);
    }
    let maqetd = match args
        .maqetd
        .clone()
        .or_else(|| Some(std::env::current_exe().ok()?.parent()?.join("maqetd")))
    {
        Some(p) if p.is_file() => p,
        other => {
            eprintln!(
                "maqet-bench: no maqetd at {}; build it (cargo build --release) or pass --maqetd",
                other.map(|p| p.display().to_string()).unwrap_or_default()
            );
            return ExitCode::from(2);
        }
    };
    // One thread: the bench's own scheduling stays out of the figures, and blocking
    // floor steps (bare QEMU, raw QMP) run with nothing else in between.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("maqet-bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run = match fixture::Run::new(maqetd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("maqet-bench: cannot set up the run: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(bench(&args, &run));
    drop(rt);
    drop(run); // kills and reaps everything, removes the temp dir
    code
}

async fn bench(args: &Args, run: &fixture::Run) -> ExitCode {
    let opts = Opts {
        quick: args.quick,
        runs: args.runs.unwrap_or(if args.quick { 3 } else { 10 }).max(1),
        calls: args
            .calls
            .unwrap_or(if args.quick { 200 } else { 2000 })
            .max(10),
        idle: Duration::from_secs(10),
    };
    let mut b = Bench {
        run,
        opts: &opts,
        report: Report {
            machine: machine(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            ..Default::default()
        },
    };
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let mut failed = false;
    let work = async {
        for &name in SECTIONS {
            if !wanted(name) {
                continue;
            }
            eprintln!("maqet-bench: {name}…");
            let res = match name {
                "start" => sections::start(&mut b).await,
                "calls" => sections::calls(&mut b).await,
                "crash" => sections::crash(&mut b).await,
                "footprint" => sections::footprint(&mut b).await,
                "scale" => sections::scale(&mut b).await,
                "parallel" => sections::parallel(&mut b).await,
                "libvirt" => libvirt::libvirt(&mut b).await,
                _ => unreachable!("checked against SECTIONS"),
            };
            if let Err(e) = res {
                eprintln!("maqet-bench: section {name} failed: {e}");
                b.report.notes.push(format!("section {name} failed: {e}"));
                failed = true;
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let interrupted = tokio::select! {
        _ = work => false,
        _ = tokio::signal::ctrl_c() => true,
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => true,
    };
    if interrupted {
        eprintln!("maqet-bench: interrupted; cleaning up");
        return ExitCode::from(130);
    }
    b.report.machine.load_after = loadavg();
    b.report.targets = targets(&b.report);
    if args.json {
        match serde_json::to_string_pretty(&b.report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("maqet-bench: JSON: {e}"),
        }
    } else {
        b.report.print_table();
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        accel: bare::accel().to_uppercase(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        qemu,
        load_before: loadavg(),
        load_after: String::new(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

const MIB: f64 = 1024.0 * 1024.0;

/// The targets of issue 8, judged from the figures of this run.
fn targets(r: &Report) -> Vec<Target> {
    let us = |v: f64| fmt_value(Some(v), Unit::Us);
    let judge = |key, label, measured: Option<(String, bool)>, limit: &str| {
        let (measured, verdict) = match measured {
            Some((m, true)) => (m, Verdict::Met),
            Some((m, false)) => (m, Verdict::Missed),
            None => ("n/a".to_string(), Verdict::NotMeasured),
        };
        Target {
            key,
            label,
            measured,
            limit: limit.to_string(),
            verdict,
        }
    };
    let g = |k: &str| r.get(k);
    vec![
        judge(
            "start",
            "Start → running",
            (|| {
                let (m, f) = (g("start_running")?, g("bare_spawn_ready")?);
                Some((
                    format!("{} / {} = {:.2}×", us(m), us(f), m / f),
                    m <= 1.20 * f,
                ))
            })(),
            "≤ 1.20 × bare QEMU spawn → QMP ready",
        ),
        judge(
            "get",
            "property Get p50",
            (|| {
                let (m, f) = (g("get_status_p50")?, g("ping_p50")?);
                Some((
                    format!("{} / {} = {:.2}×", us(m), us(f), m / f),
                    m <= 1.5 * f,
                ))
            })(),
            "≤ 1.5 × Peer.Ping p50",
        ),
        judge(
            "qmp",
            "QMP Execute p50",
            (|| {
                let (m, p, q) = (g("qmp_execute_p50")?, g("ping_p50")?, g("raw_qmp_p50")?);
                let limit = p + q + 150.0;
                Some((
                    format!(
                        "{} vs {} + {} + 150 µs = {}",
                        us(m),
                        us(p),
                        us(q),
                        us(limit)
                    ),
                    m <= limit,
                ))
            })(),
            "≤ Peer.Ping p50 + raw QMP p50 + 150 µs",
        ),
        judge(
            "crash",
            "crash → signal (median)",
            g("crash_signal").map(|m| (us(m), m <= 50_000.0)),
            "≤ 50 ms",
        ),
        judge(
            "idle",
            "idle 10 s, 10 VMs running",
            (|| {
                let (t, c) = (g("idle_ticks")?, g("idle_switches")?);
                Some((
                    format!("{t:.0} ticks, {c:.0} switches"),
                    t == 0.0 && c <= 5.0,
                ))
            })(),
            "0 CPU ticks, ≤ 5 context switches",
        ),
        judge(
            "rss_one",
            "maqetd RSS, one VM running",
            g("rss_1").map(|v| (fmt_value(Some(v), Unit::Bytes), v <= 16.0 * MIB)),
            "≤ 16 MiB",
        ),
        judge(
            "rss_per_vm",
            "maqetd RSS per further VM",
            g("rss_per_vm").map(|v| (fmt_value(Some(v), Unit::Bytes), v <= 256.0 * 1024.0)),
            "≤ 256 KiB",
        ),
        judge(
            "listvms",
            "ListVMs p50, 1,000 VMs",
            g("listvms_1000_p50").map(|v| (us(v), v <= 8_000.0)),
            "≤ 8 ms",
        ),
        judge(
            "gmo",
            "GetManagedObjects p50, 1,000 VMs",
            g("gmo_1000_p50").map(|v| (us(v), v <= 150_000.0)),
            "≤ 150 ms",
        ),
        judge(
            "startup",
            "maqetd start, 10,000 VMs defined",
            g("startup_10000").map(|v| (us(v), v <= 500_000.0)),
            "≤ 500 ms activation → first reply",
        ),
    ]
}
