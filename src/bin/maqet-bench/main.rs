//! maqet-bench: measures maqet against its floors (bare QEMU, raw QMP, a bare D-Bus
//! round trip, busctl) and its peers (libvirt, the Python maqet) in one run on one
//! machine, and reports each target of issues 8 and 17 as MET or MISSED. See
//! docs/benchmarks.md for what each figure means.

mod bare;
mod cli;
mod fixture;
mod guests;
mod libvirt;
mod parallel;
mod pymaqet;
mod report;
mod sections;
mod session;
mod targets;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use report::{Machine, Report};
use sections::{Bench, Opts};

const SECTIONS: &[&str] = &[
    "start",
    "calls",
    "crash",
    "footprint",
    "scale",
    "parallel",
    "libvirt",
    "cli",
    "guests",
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
    /// scale, parallel, libvirt, cli, guests.
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
    /// Exit with status 3 when a peer (libvirt, the Python maqet) is missing, instead of
    /// reporting "peer missing" and carrying on.
    #[arg(long)]
    require_peers: bool,
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
        guest_idle: Duration::from_secs(if args.quick { 10 } else { 60 }),
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
                "parallel" => parallel::parallel(&mut b).await,
                "libvirt" => libvirt::libvirt(&mut b).await,
                "cli" => cli::cli(&mut b).await,
                "guests" => guests::guests(&mut b).await,
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
    b.report.targets = targets::judge(&b.report);
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
    } else if args.require_peers && !b.report.peers_missing.is_empty() {
        eprintln!(
            "maqet-bench: peers missing (--require-peers): {}; scripts/setup-deps --bench installs them",
            b.report
                .peers_missing
                .iter()
                .map(|(p, _)| p.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        ExitCode::from(3)
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
