//! What a user waits for: whole CLI commands, process start to exit, next to `busctl
//! --user` doing the same D-Bus call (the floor), `virsh` and the Python maqet (peers).
//! Each round runs every tool once, so the load of the moment weighs on all alike.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use maqet::client::{BUS_NAME, MANAGER_PATH, VM_INTERFACE};

use crate::libvirt::Libvirt;
use crate::pymaqet::PyMaqet;
use crate::report::{Samples, Unit};
use crate::sections::Bench;
use crate::session::{Context, Res, Session, Watch, act_until};
use crate::targets::PYTHON_MAQET;

/// Runs a command to its exit with its output discarded; the wall time.
fn timed(mut cmd: Command, what: &str) -> Res<Duration> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    timed_as_is(cmd, what)
}

/// [`timed`] with the output wherever `cmd` already sends it.
pub fn timed_as_is(mut cmd: Command, what: &str) -> Res<Duration> {
    let t0 = Instant::now();
    let out = cmd.output().ctx(what)?;
    let d = t0.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(d)
}

/// A Python maqet figure, or `None` after recording that it fails here (its figures
/// then say "peer missing"; maqet's own go on).
fn py_ok(py: &mut Option<PyMaqet>, b: &mut Bench<'_>, r: Res<Duration>) -> Option<Duration> {
    match r {
        Ok(d) => Some(d),
        Err(e) => {
            b.report
                .peer_missing(PYTHON_MAQET, format!("fails here: {e}"));
            *py = None;
            None
        }
    }
}

/// The three read commands, their busctl equivalents, and the start/stop cycle.
pub async fn cli(b: &mut Bench<'_>) -> Res<()> {
    let _orphans = crate::fixture::OrphansToInit::new();
    let s = Session::new(b.run).await?;
    let vm = s.add_tiny("cli").await?;
    let cycle_vm = s.add_tiny("cycle").await?;
    let mut watch = Watch::new(&vm).await?;
    act_until(&mut watch, "running", vm.start()).await?;
    let path = vm.inner().path().to_string();
    let maqet = b.run.maqet_cli();
    let lv = Libvirt::start(b).await?;
    if let Some(lv) = &lv {
        lv.virsh_ok(&["start", &lv.domain])?;
    }
    let mut py = PyMaqet::find(b);
    if let Some(p) = &py {
        let ready = p
            .add_tiny("cli")
            .and_then(|_| p.add_tiny("cycle"))
            .and_then(|_| p.timed(p.cmd(&["start", "cli"]), "Python maqet start"));
        if let Err(e) = ready {
            b.report
                .peer_missing(PYTHON_MAQET, format!("fails here: {e}"));
            py = None;
        }
    }

    let m = |args: &[&str]| {
        let mut c = s.bus.command(&maqet);
        c.args(args);
        c
    };
    let busctl = |args: &[&str]| {
        let mut c = s.bus.command("busctl");
        c.arg("--user").args(args);
        c
    };
    let query = r#"{"execute":"query-status"}"#;
    let n = if b.opts.quick { 20 } else { 30 };
    let kinds = ["ls", "status", "qmp"];
    let mut got: Vec<[Samples; 4]> = (0..kinds.len()).map(|_| Default::default()).collect();
    // One unmeasured round warms the page cache for every binary.
    for round in 0..=n {
        for (k, kind) in kinds.iter().enumerate() {
            let (mine, floor) = match *kind {
                // `maqet ls` reads every VM's properties in one GetManagedObjects: the
                // floor makes that same call.
                "ls" => (
                    m(&["ls"]),
                    busctl(&[
                        "call",
                        BUS_NAME,
                        MANAGER_PATH,
                        "org.freedesktop.DBus.ObjectManager",
                        "GetManagedObjects",
                    ]),
                ),
                "status" => (
                    m(&["status", "cli"]),
                    busctl(&["get-property", BUS_NAME, &path, VM_INTERFACE, "Status"]),
                ),
                _ => (
                    m(&["qmp", "cli", "query-status"]),
                    busctl(&[
                        "call",
                        BUS_NAME,
                        &path,
                        "org.maqet.Maqet1.QMP",
                        "Execute",
                        "ssb",
                        "query-status",
                        "{}",
                        "false",
                    ]),
                ),
            };
            let d0 = timed(mine, &format!("maqet {kind}"))?;
            let d1 = timed(floor, &format!("busctl for {kind}"))?;
            let d2 = match &lv {
                Some(lv) => Some(timed(
                    match *kind {
                        "ls" => lv.virsh(&["list", "--all"]),
                        "status" => lv.virsh(&["domstate", &lv.domain]),
                        _ => lv.virsh(&["qemu-monitor-command", &lv.domain, query]),
                    },
                    &format!("virsh for {kind}"),
                )?),
                None => None,
            };
            // The Python maqet takes ~0.5 s a command: every fourth round is enough.
            let d3 = match &py {
                Some(p) if *kind != "qmp" && round % 4 == 1 => {
                    let cmd = match *kind {
                        "ls" => p.cmd(&["ls"]),
                        _ => p.cmd(&["status", "cli"]),
                    };
                    let r = p.timed(cmd, &format!("Python maqet {kind}"));
                    py_ok(&mut py, b, r)
                }
                _ => None,
            };
            if round > 0 {
                let g = &mut got[k];
                g[0].push(d0);
                g[1].push(d1);
                if let Some(d) = d2 {
                    g[2].push(d);
                }
                if let Some(d) = d3 {
                    g[3].push(d);
                }
            }
        }
    }
    act_until(&mut watch, "stopped", vm.stop(true, 0)).await?;
    if let Some(lv) = &lv {
        lv.virsh_ok(&["destroy", &lv.domain])?;
    }
    if let Some(p) = &py {
        let r = p.timed(p.cmd(&["stop", "--force", "cli"]), "Python maqet stop");
        py_ok(&mut py, b, r);
    }

    // The start + forced stop cycle, each tool's whole commands back to back.
    let cycles = if b.opts.quick { 3 } else { 10 };
    let mut cyc: [Samples; 3] = Default::default();
    for round in 0..=cycles {
        let d0 = timed(m(&["start", "cycle"]), "maqet start")?
            + timed(m(&["stop", "--force", "cycle"]), "maqet stop --force")?;
        let d1 = match &lv {
            Some(lv) => Some(
                timed(lv.virsh(&["start", &lv.domain]), "virsh start")?
                    + timed(lv.virsh(&["destroy", &lv.domain]), "virsh destroy")?,
            ),
            None => None,
        };
        let d2 = match &py {
            Some(p) => {
                let r = p
                    .timed(p.cmd(&["start", "cycle"]), "Python maqet start")
                    .and_then(|a| {
                        Ok(a + p
                            .timed(p.cmd(&["stop", "--force", "cycle"]), "Python maqet stop")?)
                    });
                py_ok(&mut py, b, r)
            }
            None => None,
        };
        if round > 0 {
            cyc[0].push(d0);
            if let Some(d) = d1 {
                cyc[1].push(d);
            }
            if let Some(d) = d2 {
                cyc[2].push(d);
            }
        }
    }
    drop(cycle_vm);

    let r = &mut b.report;
    for (k, kind) in kinds.iter().enumerate() {
        let [mine, floor, virsh, py] = &got[k];
        let words = match *kind {
            "ls" => (
                "maqet ls",
                "busctl --user call … GetManagedObjects",
                "virsh list --all",
                "Python maqet ls",
            ),
            "status" => (
                "maqet status VM",
                "busctl --user get-property … Status",
                "virsh domstate",
                "Python maqet status",
            ),
            _ => (
                "maqet qmp VM query-status",
                "busctl --user call … QMP Execute",
                "virsh qemu-monitor-command",
                "",
            ),
        };
        r.add(
            "cli",
            &format!("cli_{kind}"),
            &format!("maqet: `{}` (median)", words.0),
            mine.median(),
            Unit::Us,
            mine.len(),
        );
        r.add(
            "cli",
            &format!("busctl_{kind}"),
            &format!("floor: `{}` (median)", words.1),
            floor.median(),
            Unit::Us,
            floor.len(),
        );
        if virsh.len() > 0 {
            r.add(
                "cli",
                &format!("virsh_{kind}"),
                &format!("libvirt: `{}` (median)", words.2),
                virsh.median(),
                Unit::Us,
                virsh.len(),
            );
        }
        if py.len() > 0 {
            r.add(
                "cli",
                &format!("py_{kind}"),
                &format!("Python maqet 0.0.15: `{}` (median)", words.3),
                py.median(),
                Unit::Us,
                py.len(),
            );
        }
    }
    let [mine, virsh, py] = &cyc;
    r.add(
        "cli",
        "cli_cycle",
        "maqet: `maqet start` + `maqet stop --force` (median)",
        mine.median(),
        Unit::Us,
        mine.len(),
    );
    if virsh.len() > 0 {
        r.add(
            "cli",
            "virsh_cycle",
            "libvirt: `virsh start` + `virsh destroy` (median)",
            virsh.median(),
            Unit::Us,
            virsh.len(),
        );
    }
    if py.len() > 0 {
        r.add(
            "cli",
            "py_cycle",
            "Python maqet 0.0.15: `start` + `stop --force` (median)",
            py.median(),
            Unit::Us,
            py.len(),
        );
    }
    Ok(())
}
