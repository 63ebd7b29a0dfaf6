//! The `maqet` command line: parses arguments, talks only D-Bus (through
//! [`crate::client`]), prints tables for people and JSON for programs.

// The CLI's own `print!`/`println!` (they shadow std's in every module below): a reader
// that closed the pipe (`maqet ls | head -1`) ends maqet quietly instead of a panic.
macro_rules! print {
    ($($arg:tt)*) => { $crate::cli::output::print_fmt(format_args!($($arg)*)) };
}
macro_rules! println {
    () => { $crate::cli::output::print_fmt(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::cli::output::print_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod audit;
mod complete;
mod console;
mod disk;
mod doctor;
mod exit;
mod guest;
mod image;
mod legacy;
mod logs;
mod output;
mod qmp;
mod remote;
mod session;
mod setup;
mod snapshot;
mod storage;
mod version;
mod view;
mod vm;

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use crate::error::MaqetError;

pub use exit::ExitCode;

/// What `--help` and the man page say after the options.
const AFTER_LONG_HELP: &str = "\
Exit codes:
  0 ok; 1 any other failure; 2 bad usage; 3 no such VM; 4 invalid input (arguments,
  config, name taken); 5 not legal in the VM's current state; 6 access denied;
  7 maqetd unreachable (no session bus, not installed, ssh failed); 8 QEMU failed to
  start; 9 timed out.

Environment:
  DBUS_SESSION_BUS_ADDRESS  the session bus maqetd is on
  MAQET_SSH                 the ssh command for --host (default: ssh)
  NO_COLOR                  no colours (there are none when stdout is not a terminal)

Files: ~/.config/maqet/maqetd.yaml (service settings), ~/.local/state/maqet/logs/
(QEMU logs), ~/.local/share/maqet/maqet.db (state). See docs/ in the source tree.";

/// maqet: run QEMU virtual machines through your session's maqetd service.
#[derive(Parser, Debug)]
#[command(
    name = "maqet",
    about = "Run QEMU virtual machines through your desktop session's maqetd service",
    version,
    disable_version_flag = true,
    after_help = "Exit codes: 0 ok, 1 other failure, 2 usage, 3 not found, 4 invalid input, \
                  5 invalid state, 6 access denied, 7 service unreachable, 8 QEMU failed, 9 timeout.",
    after_long_help = AFTER_LONG_HELP
)]
pub struct Cli {
    /// Print machine-readable JSON instead of tables and messages.
    #[arg(long, global = true)]
    pub json: bool,

    /// Output format (maqet 0.0.x's spelling): json (= --json), yaml, table or auto
    /// (the default), plain (no colour).
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub format: Option<output::Format>,

    /// Drive maqetd of a user on another machine, over ssh (that machine needs
    /// systemd-stdio-bridge; ssh options go in MAQET_SSH).
    #[arg(long, global = true, value_name = "[USER@]MACHINE")]
    pub host: Option<String>,

    /// Print the CLI's and the service's versions (and warn when they differ).
    #[arg(short = 'V', long)]
    pub version: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

// `defer`: a command's arguments are built only when that command is the one run (or
// help, completion or the man pages walk the tree): building all of them was ~45 % of
// the instructions of a whole `maqet ls`. Not on the nested enums (disk, image, …): a
// deferred command there gets the global `--format` before its own `--format` exists,
// and would list both.
#[derive(Subcommand, Debug)]
#[command(defer = true)]
pub enum Command {
    /// Define a VM from YAML files merged in order (later files win), or `-` for stdin.
    Add {
        /// VM name (default: the config's `name`, else a generated one).
        #[arg(long, short)]
        name: Option<String>,
        /// Config file; repeat to merge several.
        #[arg(long = "config", short = 'c', value_name = "FILE", alias = "vm-config")]
        configs: Vec<String>,
        /// More config files (same as -c).
        #[arg(value_name = "FILE")]
        files: Vec<String>,
        /// Define a VM with an empty config (QEMU's defaults, no disks) to fill in later
        /// with `maqet apply`; its name is --name or the one argument.
        #[arg(long, conflicts_with_all = ["configs", "from_export"])]
        empty: bool,
        /// A directory `maqet export` wrote: its config.yaml comes first (its disks are
        /// used where they are).
        #[arg(long, value_name = "DIR")]
        from_export: Option<PathBuf>,
    },
    /// Start a VM; returns once QEMU's monitor is ready.
    Start {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        /// Then wait for a condition as `maqet wait` does: status=<state>[|<state>…] or
        /// event=<QMP EVENT>. `process-started` (maqet 0.0.x's default) is what start
        /// always waits for.
        #[arg(long, value_name = "CONDITION")]
        wait_for: Option<String>,
        /// Seconds --wait-for waits.
        #[arg(long, default_value_t = 60, requires = "wait_for")]
        timeout: u32,
    },
    /// Stop a VM: guest-agent shutdown or ACPI power-down, then quit, SIGTERM and SIGKILL after the timeout.
    Stop {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        /// Skip the ACPI power-down and quit QEMU at once.
        #[arg(long, short)]
        force: bool,
        /// Seconds the guest gets to power off before maqet escalates.
        #[arg(long, short, default_value_t = 30)]
        timeout: u32,
        /// Return as soon as the stop has begun.
        #[arg(long)]
        no_wait: bool,
    },
    /// Restart a VM with a new QEMU process (applied config changes take effect).
    Restart {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
    },
    /// Reset the guest (like pressing the reset button).
    Reset {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
    },
    /// Pause a VM's virtual CPUs.
    Pause {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
    },
    /// Remove a VM definition.
    #[command(alias = "remove")]
    Rm {
        #[arg(add = crate::cli::complete::vm())]
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        vm: Option<String>,
        /// Remove every VM: asks first on a terminal; --force removes without asking
        /// (and kills running ones), which scripts need.
        #[arg(long)]
        all: bool,
        /// Kill the VM first if it is running.
        #[arg(long, short)]
        force: bool,
        /// Also delete the disk images maqet created for it (never disks you brought).
        #[arg(long)]
        delete_storage: bool,
    },
    /// List VMs: name, status, pid, uptime.
    #[command(alias = "list")]
    Ls {
        /// Only VMs in this state.
        #[arg(long, value_parser = crate::cli::vm::STATUSES)]
        status: Option<String>,
    },
    /// Show one VM's state.
    Status {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
    },
    /// Show every property of a VM, including its merged config.
    #[command(alias = "info")]
    Inspect {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        /// Print only the merged YAML config.
        #[arg(long)]
        config: bool,
    },
    /// Replace a VM's config with one YAML file (`-` for stdin).
    Apply {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        #[arg(value_name = "FILE")]
        file: String,
    },
    /// Wait for a condition: status=<state>[|<state>…], agent=connected or event=<QMP EVENT>.
    Wait {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        condition: String,
        /// Give up after this many seconds.
        #[arg(long, short, default_value_t = 60)]
        timeout: u32,
    },
    /// Follow status changes, QMP events and VM additions/removals as they happen.
    Events {
        /// Only this VM.
        #[arg(add = crate::cli::complete::vm())]
        vm: Option<String>,
    },
    /// Show the audit log: every denied call and every call that changed something.
    Audit {
        /// Only this VM (name or id).
        #[arg(long)]
        #[arg(add = crate::cli::complete::vm())]
        vm: Option<String>,
        /// Only entries since then: 90s, 30m, 2h, 7d, or a UTC date (2026-11-22T14:05:00Z).
        #[arg(long)]
        since: Option<String>,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Check the bus, the service, QEMU, KVM, the database, sockets and VM states.
    Doctor {
        /// Repair what is safe to repair (stale sockets, loose permissions, orphan VMs).
        #[arg(long)]
        fix: bool,
    },
    /// Run a QMP command on a running VM; prints QEMU's answer as JSON.
    Qmp {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        /// e.g. query-status, device_add, human-monitor-command.
        command: String,
        /// The command's arguments as one JSON object, e.g. '{"path": "/machine"}'.
        #[arg(value_name = "ARGS_JSON")]
        arguments: Option<String>,
        /// Allow commands that can touch the host (human monitor, host files, memory
        /// dumps); see docs/qmp.md.
        #[arg(long)]
        allow_dangerous: bool,
    },
    /// Press key combinations in a VM, e.g. ctrl-alt-f2, ret, shift-a.
    ///
    /// A combination that starts with `-` (the minus key) goes after `--`.
    Keys {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        #[arg(required = true, value_name = "COMBO")]
        combos: Vec<String>,
        /// How long each combination is held (0: QEMU's default, 100 ms).
        #[arg(long, default_value_t = 0)]
        hold_ms: u32,
    },
    /// Type text into a VM on a US keyboard layout (\n is Enter, \t Tab, \\ a backslash).
    Type {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        /// The text; put `--` before it if it starts with `-`.
        text: String,
    },
    /// Save a PNG of a VM's display (`-`: standard output). The VM needs a display
    /// device, e.g. `vga: std`.
    Screendump {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        #[arg(value_name = "FILE.png")]
        file: String,
    },
    /// Hot-plug and unplug devices of a running VM.
    Device {
        #[command(subcommand)]
        action: qmp::DeviceCommand,
    },
    /// Snapshots: create, load, rm, ls.
    Snapshot {
        #[command(subcommand)]
        command: snapshot::SnapshotCommand,
    },
    /// Define a new VM as a clone of a stopped one: linked (qcow2 overlays on its
    /// disks, which it then keeps stopped) or, with --full, with copied disks.
    Clone {
        #[arg(add = crate::cli::complete::vm())]
        source: String,
        new_name: String,
        /// Copy the disks instead of linking to them.
        #[arg(long)]
        full: bool,
    },
    /// Write a stopped VM into an empty directory (config.yaml and copies of its
    /// disks) to move it to another machine (`maqet add --from-export DIR` there).
    Export {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        dir: PathBuf,
    },
    /// The image store: import, ls, rm.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Change a VM's disks: resize, attach, detach.
    Disk {
        #[command(subcommand)]
        command: disk::DiskCommand,
    },
    /// A VM's disks and shares: ls, verify.
    Storage {
        #[command(subcommand)]
        command: storage::StorageCommand,
    },
    /// Define the VMs of maqet 0.0.x's database (default
    /// $XDG_DATA_HOME/maqet/instances.db), which is only read, never changed. VMs whose
    /// config does not validate, or whose name is taken, are skipped and reported.
    ImportLegacy {
        #[arg(value_name = "PATH")]
        path: Option<PathBuf>,
    },
    /// Show a VM's lifecycle history and QEMU's log.
    Logs {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        /// Keep printing new log output and status changes.
        #[arg(long, short)]
        follow: bool,
        /// How many history events and log lines to show first (0: all).
        #[arg(long, short = 'n', default_value_t = 50)]
        lines: usize,
    },
    /// Attach this terminal to a VM's serial console; Ctrl-] detaches.
    Console {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
    },
    /// Open a viewer (remote-viewer, or MAQET_VIEWER) on a VM's display
    /// (`display: spice` or `display: vnc` in its config).
    View {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
    },
    /// The VM's display on stdin/stdout (what `maqet --host H view` runs on H).
    #[command(hide = true)]
    DisplayStdio { vm: String },
    /// Run a command in the guest through its agent (`guest_agent: true`): its stdout,
    /// stderr and exit code become maqet's; piped stdin is passed on.
    Exec {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        /// Seconds to wait for the command (0: 20).
        #[arg(long, default_value_t = 0)]
        timeout: u32,
        /// The program and its arguments, after `--`.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// The guest's network addresses, as its agent reports them.
    Ip {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
    },
    /// Copy a file into or out of a guest: `maqet cp VM:/path LOCAL` or
    /// `maqet cp LOCAL VM:/path` (`-`: stdin or stdout).
    Cp { from: String, to: String },
    /// ssh into the guest through a forward to its port 22 (added when missing), as
    /// the config's `ssh_user`; arguments after `--` go to ssh.
    Ssh {
        #[arg(add = crate::cli::complete::vm())]
        vm: String,
        #[arg(last = true, value_name = "SSH-ARGS")]
        args: Vec<String>,
    },
    /// Install maqetd for your desktop session: systemd user unit, D-Bus activation,
    /// desktop entry and icons, GNOME search provider, KRunner plugin, interface XML,
    /// shell completions, man pages.
    Setup {
        /// Install for this user (the only kind of install maqet does itself).
        #[arg(long, required = true)]
        user: bool,
        /// Remove what `setup --user` installed.
        #[arg(long)]
        uninstall: bool,
        /// The maqetd to run (default: the one next to this maqet).
        #[arg(long, value_name = "PATH", conflicts_with = "uninstall")]
        maqetd: Option<PathBuf>,
        /// Start maqetd at login (enables the unit for default.target), so VMs with
        /// `autostart: true` come up without a call.
        #[arg(long, conflicts_with = "uninstall")]
        autostart: bool,
    },
    /// Print a shell completion script (bash, zsh and fish complete VM names by asking
    /// maqetd); `maqet setup --user` installs them.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per command into a directory.
    Manpage {
        /// Write maqet.1 and maqet-<command>.1 here instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

async fn run(cli: Cli, command: Command) -> Result<ExitCode, MaqetError> {
    let host = cli.host.as_deref();
    // The commands that work without maqetd.
    match command {
        Command::Doctor { fix } => return doctor::run(cli.json, fix, host).await,
        Command::Setup {
            user: _,
            uninstall,
            maqetd,
            autostart,
        } => {
            if host.is_some() {
                return Err(MaqetError::InvalidArgument(
                    "setup installs on this machine; run it on the other one (ssh HOST maqet setup --user)".into(),
                ));
            }
            return setup::run(cli.json, uninstall, maqetd, autostart).await;
        }
        Command::Completions { shell } => {
            return write_stdout(&completion_script(shell)?).map(|()| ExitCode::Ok);
        }
        Command::Manpage { dir } => return manpage(dir),
        _ => {}
    }
    let s = session::Session::connect(cli.json, host).await?;
    match command {
        Command::Logs { vm, follow, lines } => logs::run(&s, &vm, follow, lines).await,
        Command::Console { vm } => console::run(&s, &vm).await,
        Command::View { vm } => view::run(&s, &vm, host).await,
        Command::DisplayStdio { vm } => view::stdio(&s, &vm).await,
        Command::Exec {
            vm,
            timeout,
            command,
        } => {
            let code = guest::exec(&s, &vm, &command, timeout).await?;
            return Ok(ExitCode::Guest(code));
        }
        Command::Ip { vm } => guest::ip(&s, &vm).await,
        Command::Cp { from, to } => guest::cp(&s, &from, &to).await,
        Command::Ssh { vm, args } => guest::ssh(&s, &vm, host, &args).await,
        Command::Disk { command } => disk::run(&s, command).await,
        Command::Storage { command } => {
            // A verification that found problems has printed them; only the code says so.
            return Ok(match storage::run(&s, command).await? {
                true => ExitCode::Ok,
                false => ExitCode::Failure,
            });
        }
        Command::Snapshot { command } => snapshot::run(&s, command).await,
        Command::Image { command } => image::run(&s, command).await,
        Command::Export { vm, dir } => vm::export(&s, &vm, &dir).await,
        Command::Clone {
            source,
            new_name,
            full,
        } => vm::clone(&s, &source, &new_name, full).await,
        Command::Add {
            name,
            configs,
            files,
            empty,
            from_export,
        } => {
            if empty {
                return vm::add_empty(&s, name, files).await.map(|()| ExitCode::Ok);
            }
            let exported = from_export.map(|d| {
                d.join(crate::manager::EXPORT_CONFIG)
                    .to_string_lossy()
                    .into_owned()
            });
            vm::add(
                &s,
                name.unwrap_or_default(),
                exported.into_iter().chain(configs).chain(files).collect(),
            )
            .await
        }
        Command::Start {
            vm,
            wait_for,
            timeout,
        } => vm::start(&s, &vm, wait_for.as_deref(), timeout).await,
        Command::ImportLegacy { path } => return legacy::import(&s, path).await,
        Command::Stop {
            vm,
            force,
            timeout,
            no_wait,
        } => vm::stop(&s, &vm, force, timeout, no_wait).await,
        Command::Restart { vm } => vm::lifecycle(&s, &vm, "restart").await,
        Command::Reset { vm } => vm::lifecycle(&s, &vm, "reset").await,
        Command::Pause { vm } => vm::lifecycle(&s, &vm, "pause").await,
        Command::Resume { vm } => vm::lifecycle(&s, &vm, "resume").await,
        Command::Rm {
            vm: Some(vm),
            force,
            delete_storage,
            ..
        } => vm::remove(&s, &vm, force, delete_storage).await,
        Command::Rm {
            vm: None,
            force,
            delete_storage,
            ..
        } => return vm::remove_all(&s, force, delete_storage).await,
        Command::Ls { status } => vm::list(&s, status.as_deref()).await,
        Command::Status { vm } => vm::status(&s, &vm, false).await,
        Command::Inspect { vm, config } => {
            if config {
                let v = session::view(&s, &vm).await?;
                if s.json {
                    output::print_json(&serde_json::json!({ "vm": v.name, "config": v.config }));
                } else {
                    print!("{}", v.config);
                }
                Ok(())
            } else {
                vm::status(&s, &vm, true).await
            }
        }
        Command::Apply { vm, file } => vm::apply(&s, &vm, &file).await,
        Command::Wait {
            vm,
            condition,
            timeout,
        } => vm::wait(&s, &vm, &condition, timeout).await,
        Command::Events { vm } => vm::events(&s, vm.as_deref()).await,
        Command::Doctor { .. }
        | Command::Setup { .. }
        | Command::Completions { .. }
        | Command::Manpage { .. } => unreachable!("handled before connecting"),
        Command::Audit { vm, since, limit } => {
            audit::run(&s, vm.as_deref(), since.as_deref(), limit).await
        }
        Command::Qmp {
            vm,
            command,
            arguments,
            allow_dangerous,
        } => {
            let arguments = arguments.unwrap_or_default();
            qmp::execute(&s, &vm, &command, &arguments, allow_dangerous).await
        }
        Command::Keys {
            vm,
            combos,
            hold_ms,
        } => qmp::keys(&s, &vm, &combos, hold_ms).await,
        Command::Type { vm, text } => qmp::type_text(&s, &vm, &text).await,
        Command::Screendump { vm, file } => qmp::screendump(&s, &vm, &file).await,
        Command::Device { action } => qmp::device(&s, action).await,
    }
    .map(|()| ExitCode::Ok)
}

/// The completion script of `shell`: for bash, zsh and fish the dynamic one that
/// completes VM names, for the others clap's static script.
pub(crate) fn completion_script(shell: clap_complete::Shell) -> Result<Vec<u8>, MaqetError> {
    if let Some(dynamic) = complete::dynamic_shell(shell) {
        let me = std::env::current_exe()
            .map_err(|e| MaqetError::Internal(format!("cannot find this maqet binary: {e}")))?;
        return Ok(complete::registration(dynamic, &me.to_string_lossy()));
    }
    // Generated into memory: clap_complete panics on a closed pipe.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "maqet", &mut script);
    Ok(script)
}

/// Every man page: `maqet.1` first, then one per command (`maqet-snapshot-create.1`), in
/// memory. The pages' SUBCOMMANDS sections name exactly these pages (no `help` command,
/// which has no page).
pub(crate) fn man_pages() -> Vec<(String, Vec<u8>)> {
    fn render(cmd: clap::Command, out: &mut Vec<(String, Vec<u8>)>) {
        let subs: Vec<clap::Command> = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .cloned()
            .collect();
        let man = clap_mangen::Man::new(cmd);
        let mut page = Vec::new();
        // Rendering into memory cannot fail.
        let _ = man.render(&mut page);
        out.push((man.get_filename(), page));
        for sub in subs {
            render(sub, out);
        }
    }
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    render(cmd, &mut pages);
    pages
}

/// The man page on stdout, or every command's page into `dir`.
fn manpage(dir: Option<PathBuf>) -> Result<ExitCode, MaqetError> {
    let failed =
        |e: std::io::Error| MaqetError::Internal(format!("cannot write the man page: {e}"));
    let mut pages = man_pages();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(failed)?;
            for (name, page) in pages {
                std::fs::write(dir.join(name), page).map_err(failed)?;
            }
        }
        None => write_stdout(&pages.swap_remove(0).1)?,
    }
    Ok(ExitCode::Ok)
}

/// Ends maqet with a usage error (exit 2), the way clap reports one: for an old
/// spelling that cannot be kept, the message names the new one.
pub(crate) fn usage_error(message: impl std::fmt::Display) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::InvalidValue, message)
        .exit()
}

/// Writes generated output (a reader that went away ends maqet quietly).
fn write_stdout(bytes: &[u8]) -> Result<(), MaqetError> {
    output::write_out(bytes)
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> std::process::ExitCode {
    complete::answer_if_asked();
    let mut cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("maqet: cannot start the async runtime: {e}");
            return ExitCode::Failure.into();
        }
    };
    if let Some(format) = cli.format {
        cli.json |= output::set_format(format);
    }
    let (json, host) = (cli.json, cli.host.clone());
    let result = match cli.command.take() {
        _ if cli.version => Ok(runtime.block_on(version::run(json, host.as_deref()))),
        Some(command) => runtime.block_on(run(cli, command)),
        None => {
            eprint!("{}", Cli::command().render_help());
            return ExitCode::Usage.into();
        }
    };
    match result {
        Ok(code) => code.into(),
        Err(e) => {
            let code = ExitCode::for_error(&e);
            output::print_error(&e, json, host.as_deref());
            code.into()
        }
    }
}
