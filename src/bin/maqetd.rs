//! maqetd: the maqet session service. Normally started by D-Bus activation.

use clap::Parser;

/// The maqet VM manager service for this user's session bus.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Take over the bus name from a maqetd that is already running.
    #[arg(long)]
    replace: bool,
    /// Exit after this many seconds with no VM running and no calls (0 = never);
    /// overrides `idle_exit_sec` in maqetd.yaml (default 60).
    #[arg(long, value_name = "SECS")]
    idle_exit: Option<u64>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    maqet::logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("maqetd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let opts = maqet::service::Options {
        replace: args.replace,
        idle_exit_sec: args.idle_exit,
    };
    match runtime.block_on(maqet::service::run(opts)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("maqetd: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
