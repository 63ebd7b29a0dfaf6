//! Real guests: maqet's Linux test guest (scripts/build-test-guest, TCG), booted through
//! maqet and bare with the same QEMU command line; a live snapshot of touched RAM through
//! maqet's job and through raw QMP `snapshot-save`; maqetd's idle cost with several
//! guests running.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use maqet::client::{BUS_NAME, GuestProxy, JobProxy, SnapshotsProxy, VmProxy, proxy_at};
use zbus::{MatchRule, MessageStream, OwnedObjectPath};

use crate::bare::{self, BareQemu};
use crate::report::{Samples, Unit, median_of};
use crate::sections::{Bench, cpu_ticks, ctx_switches};
use crate::session::{Context, Res, Session, Watch, act_until};

/// The fd number the bare QEMU gets the agent's socket at (above QMP's 3 and the
/// console's 4, as maqetd places it).
const AGENT_FD: i32 = 5;
/// The disk's format node (maqet names the first disk's `maqet-d0`).
const DISK_NODE: &str = "maqet-d0";
/// A real kernel under TCG on a loaded machine: generous, only a hang hits it.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

struct Image {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// The built guest, or `None` with a note when it cannot be had here.
fn image(b: &mut Bench<'_>) -> Option<Image> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-test-guest");
    let out = std::process::Command::new(script)
        .stdin(std::process::Stdio::null())
        .output();
    let why = match out {
        Ok(o) if o.status.success() => {
            let dir = String::from_utf8_lossy(&o.stdout);
            let dir = PathBuf::from(dir.lines().last().unwrap_or_default());
            return Some(Image {
                kernel: dir.join("vmlinuz"),
                initrd: dir.join("initrd.img"),
            });
        }
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("{script}: {e}"),
    };
    b.report
        .notes
        .push(format!("guests: no Linux test guest ({why}); not measured"));
    None
}

/// The guest's VM config: TCG, the agent channel, a qcow2 disk of its own.
fn yaml(name: &str, img: &Image, memory_mib: u64, disk: &Path) -> String {
    format!(
        "name: {name}\nbinary: qemu-system-x86_64\ndisplay: none\nmemory: {memory_mib}\n\
         guest_agent: true\nstorage:\n  - {{name: root, type: qcow2, file: {}, size: 64M}}\n\
         arguments:\n  - nodefaults\n  - machine: pc\n  - accel: tcg\n\
         \x20 - kernel: {}\n  - initrd: {}\n  - append: \"console=ttyS0\"\n",
        disk.display(),
        img.kernel.display(),
        img.initrd.display(),
    )
}

fn qcow2(path: &Path) -> Res<()> {
    let _ = std::fs::remove_file(path);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("64M")
        .output()
        .ctx("qemu-img")?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

pub async fn guests(b: &mut Bench<'_>) -> Res<()> {
    let Some(img) = image(b) else {
        return Ok(());
    };
    let s = Session::new(b.run).await?;
    // RAM to touch before the snapshot, and the guest's memory around it.
    let touch_mib: u64 = if b.opts.quick { 128 } else { 1024 };
    let memory = touch_mib + 384;
    let dir = s.bus.dir().join("guests");
    std::fs::create_dir_all(&dir).ctx("guests dir")?;
    let maqet_disk = dir.join("maqet.qcow2");
    let bare_disk = dir.join("bare.qcow2");
    let vm_yaml = yaml("guest", &img, memory, &maqet_disk);
    let path = s
        .manager
        .add_vm("guest", &vm_yaml)
        .await
        .ctx("AddVM guest")?;
    let vm = s.vm(path.clone()).await?;
    let guest: GuestProxy<'static> = proxy_at(&s.conn, path.clone()).await.ctx("Guest proxy")?;
    let mut watch = Watch::new(&vm).await?;

    // Boot → agent answers, bare and maqet alternating who goes first. The last pair
    // stays up for the snapshot. TCG boots spread by ±10 % from one to the next (the
    // log of one pair's ratio has a spread of ~0.1), so five a side could not tell a
    // 5 % difference: fifteen pairs (quick three), each pair booted back to back; an odd
    // count, so the median is one pair's ratio.
    let rounds = if b.opts.quick { 3 } else { 15 };
    let (mut boot_m, mut boot_b) = (Samples::default(), Samples::default());
    let mut pair_ratios = Vec::with_capacity(rounds);
    let mut pairs = Vec::with_capacity(rounds);
    let mut kept = None;
    for round in 0..rounds {
        let last = round + 1 == rounds;
        let (mut bare_t, mut maqet_t) = (Duration::ZERO, Duration::ZERO);
        for side in [round % 2, (round + 1) % 2] {
            if side == 0 {
                qcow2(&bare_disk)?;
                let g = BareGuest::boot(&s, &bare_disk, &img, memory)?;
                bare_t = g.boot;
                if last {
                    kept = Some(g);
                }
            } else {
                qcow2(&maqet_disk)?;
                let t0 = Instant::now();
                vm.start().await.ctx("Start guest")?;
                agent_answers(&guest).await?;
                maqet_t = t0.elapsed();
                if !last {
                    act_until(&mut watch, "stopped", vm.stop(true, 0)).await?;
                }
            }
        }
        boot_b.push(bare_t);
        boot_m.push(maqet_t);
        pair_ratios.push(maqet_t.as_secs_f64() / bare_t.as_secs_f64());
        pairs.push(format!(
            "{:.2}/{:.2}",
            bare_t.as_secs_f64(),
            maqet_t.as_secs_f64()
        ));
    }
    let r = &mut b.report;
    r.add(
        "guests",
        "guest_boot_bare",
        "floor: bare QEMU, same command line: spawn → guest agent answers (median)",
        boot_b.median(),
        Unit::Us,
        boot_b.len(),
    );
    r.add(
        "guests",
        "guest_boot_maqet",
        "maqet: Start() → Guest.Ping answers (median)",
        boot_m.median(),
        Unit::Us,
        boot_m.len(),
    );
    r.add(
        "guests",
        "guest_boot_pair_ratio",
        "maqet / bare of each back-to-back pair (median of the pairs' ratios)",
        median_of(&mut pair_ratios),
        Unit::Ratio,
        pair_ratios.len(),
    );
    r.note_last(format!("pairs, bare/maqet s: {}", pairs.join(", ")));
    let mut bare = kept.ok_or("no bare guest kept")?;
    snapshot(b, &s, &vm, &guest, &path, &mut bare, touch_mib).await?;
    drop(bare);
    idle(b, &s, &img, &vm, &guest, &dir).await?;
    act_until(&mut watch, "stopped", vm.stop(true, 0)).await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Waits until maqetd has the agent connected, then until `Guest.Ping` answers.
///
/// The property stream needs a caching proxy: on an uncached one (`proxy_at`) it ends at
/// once, and this loop became a busy poll of `GuestAgent` that took the 2-core machine's
/// CPU from the booting TCG guest (maqet's boot measured ~1.4-1.7× bare because of it).
async fn agent_answers(plain: &GuestProxy<'_>) -> Res<()> {
    let guest: GuestProxy<'_> = zbus::proxy::Builder::new(plain.inner().connection())
        .path(plain.inner().path().to_owned())
        .cache_properties(zbus::proxy::CacheProperties::Yes)
        .build()
        .await
        .ctx("caching Guest proxy")?;
    let mut changes = guest.receive_guest_agent_changed().await;
    let wait = async {
        loop {
            if guest.guest_agent().await.ctx("GuestAgent")? == "connected"
                && guest.ping().await.is_ok()
            {
                return Ok(());
            }
            // The next change, or a short while when it was connected but the ping
            // failed (the agent restarting).
            let _ = tokio::time::timeout(Duration::from_millis(50), changes.next()).await;
        }
    };
    tokio::time::timeout(BOOT_LIMIT, wait)
        .await
        .map_err(|_| format!("the guest agent did not answer within {BOOT_LIMIT:?}"))?
}

/// The guest started bare, with its QMP and agent connections open.
struct BareGuest {
    qmp: BareQemu,
    agent: BufReader<UnixStream>,
    boot: Duration,
    next_id: u64,
}

impl BareGuest {
    fn boot(s: &Session, disk: &Path, img: &Image, memory: u64) -> Res<BareGuest> {
        let (binary, args) = bare::command_line_for(
            &yaml("bare", img, memory, disk),
            &uuid::Uuid::new_v4().to_string(),
            "bare",
            Some(AGENT_FD),
        )?;
        let dir = s.bus.dir();
        let agent_path = dir.join("bare-ga.sock");
        let t0 = Instant::now();
        let _ = std::fs::remove_file(&agent_path);
        let listener = UnixListener::bind(&agent_path).ctx("agent socket")?;
        let (mut qmp, _) = BareQemu::spawn_ready_with(
            &binary,
            &args,
            &dir.join("bare-guest.sock"),
            s.bus.marker(),
            &[(listener.as_raw_fd(), AGENT_FD)],
        )
        .ctx("bare guest")?;
        drop(listener);
        let stream = UnixStream::connect(&agent_path).ctx("agent connect")?;
        let _ = std::fs::remove_file(&agent_path);
        // The agent's port opens in the guest when qemu-ga starts.
        qmp.wait_event(BOOT_LIMIT, |l| {
            l.contains("VSERPORT_CHANGE") && l.contains("\"open\": true")
        })
        .ctx("waiting for the agent's port to open")?;
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .ctx("timeout")?;
        let mut g = BareGuest {
            qmp,
            agent: BufReader::new(stream),
            boot: Duration::ZERO,
            next_id: 1,
        };
        // Sync (retried: the agent may still be starting), then a ping.
        let deadline = Instant::now() + BOOT_LIMIT;
        loop {
            if g.sync().is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err("the bare guest's agent never answered guest-sync".into());
            }
        }
        g.agent_call(r#"{"execute":"guest-ping"}"#)?;
        g.boot = t0.elapsed();
        Ok(g)
    }

    fn sync(&mut self) -> Res<()> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = format!("{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":{id}}}}}\n");
        self.agent
            .get_mut()
            .write_all(msg.as_bytes())
            .ctx("agent write")?;
        let mut line = String::new();
        loop {
            line.clear();
            match self.agent.read_line(&mut line) {
                Ok(0) => return Err("agent closed".into()),
                Ok(_)
                    if serde_json::from_str::<serde_json::Value>(&line)
                        .is_ok_and(|v| v["return"].as_u64() == Some(id)) =>
                {
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => return Err(format!("agent: {e}")),
            }
        }
    }

    /// One agent command; its reply line.
    fn agent_call(&mut self, msg: &str) -> Res<String> {
        self.agent
            .get_mut()
            .write_all(format!("{msg}\n").as_bytes())
            .ctx("agent write")?;
        self.agent
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(600)))
            .ctx("timeout")?;
        let mut line = String::new();
        self.agent.read_line(&mut line).ctx("agent reply")?;
        if line.contains("\"error\"") {
            return Err(format!("agent: {}", line.trim()));
        }
        Ok(line)
    }

    /// Runs `script` with `sh -c` through the agent and waits for it to end.
    fn exec(&mut self, script: &str) -> Res<()> {
        let cmd = serde_json::json!({
            "execute": "guest-exec",
            "arguments": {"path": "sh", "arg": ["-c", script], "capture-output": true}
        });
        let reply = self.agent_call(&cmd.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&reply).ctx("guest-exec reply")?;
        let pid = v["return"]["pid"]
            .as_i64()
            .ok_or("guest-exec gave no pid")?;
        loop {
            let st = self.agent_call(
                &serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}})
                    .to_string(),
            )?;
            let v: serde_json::Value = serde_json::from_str(&st).ctx("status reply")?;
            if v["return"]["exited"].as_bool() == Some(true) {
                return match v["return"]["exitcode"].as_i64() {
                    Some(0) => Ok(()),
                    code => Err(format!("the guest's fill script exited with {code:?}")),
                };
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Fills `mib` MiB of guest RAM with non-zero pages (zero pages cost a snapshot nothing):
/// a tmpfs holding copies of 4 MiB of random bytes.
fn fill_script(mib: u64) -> String {
    format!(
        "mkdir -p /mnt/fill && mount -t tmpfs -o size={}m tmpfs /mnt/fill && \
         dd if=/dev/urandom of=/mnt/fill/seed bs=1M count=4 2>/dev/null && \
         i=0; while [ $i -lt {} ]; do cat /mnt/fill/seed >> /mnt/fill/f || exit 1; i=$((i+1)); done",
        mib + 16,
        mib / 4
    )
}

/// A live snapshot of both guests with `mib` MiB touched: maqet's job (call → job
/// completed) vs raw QMP `snapshot-save` (command → job concluded).
async fn snapshot(
    b: &mut Bench<'_>,
    s: &Session,
    vm: &VmProxy<'_>,
    guest: &GuestProxy<'_>,
    path: &OwnedObjectPath,
    bare: &mut BareGuest,
    mib: u64,
) -> Res<()> {
    let script = fill_script(mib);
    let mut opts: HashMap<&str, zbus::Variant<'_>> = HashMap::new();
    opts.insert("timeout", zbus::Variant::from(600u32));
    let (code, _, err) = guest
        .exec(&["sh", "-c", &script], &[], opts)
        .await
        .ctx("Guest.Exec (filling RAM)")?;
    if code != 0 {
        return Err(format!(
            "filling the maqet guest's RAM failed ({code}): {}",
            String::from_utf8_lossy(&err)
        ));
    }
    bare.exec(&script)?;
    let _ = vm;

    // Raw QMP on the bare guest.
    let t0 = Instant::now();
    bare.qmp
        .execute(
            serde_json::json!({"execute": "snapshot-save", "arguments": {
                "job-id": "bench-snap", "tag": "bench", "vmstate": DISK_NODE,
                "devices": [DISK_NODE]}})
            .to_string()
            .as_bytes(),
        )
        .ctx("snapshot-save")?;
    bare.qmp
        .wait_event(BOOT_LIMIT, |l| {
            l.contains("JOB_STATUS_CHANGE") && l.contains("bench-snap") && l.contains("concluded")
        })
        .ctx("snapshot-save job")?;
    let raw = t0.elapsed();
    let jobs = bare
        .qmp
        .execute(b"{\"execute\":\"query-jobs\"}\n")
        .ctx("query-jobs")?;
    if jobs.contains("\"error\"") {
        return Err(format!("raw snapshot-save failed: {}", jobs.trim()));
    }

    // maqet's job: Progress changes and the end, seen as signals.
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(BUS_NAME)
        .build()
        .ctx("match rule")?;
    let mut signals =
        MessageStream::for_match_rule(rule, &s.conn, std::num::NonZeroUsize::new(4096))
            .await
            .ctx("subscribing")?;
    let snaps: SnapshotsProxy<'_> = proxy_at(&s.conn, path.clone())
        .await
        .ctx("Snapshots proxy")?;
    let t0 = Instant::now();
    let job = snaps
        .create("bench", HashMap::new())
        .await
        .ctx("Snapshots.Create")?;
    let mut values: Vec<f64> = Vec::new();
    let wait = async {
        while let Some(msg) = signals.next().await {
            let Ok(msg) = msg else { continue };
            let h = msg.header();
            if h.path().map(|p| p.as_str()) != Some(job.as_str()) {
                continue;
            }
            match h.member().map(|m| m.as_str()) {
                Some("Completed") => {
                    let (ok, why) = msg
                        .body()
                        .deserialize::<(bool, String)>()
                        .ctx("Completed")?;
                    return if ok {
                        Ok(Instant::now())
                    } else {
                        Err(format!("maqet's snapshot job failed: {why}"))
                    };
                }
                Some("PropertiesChanged") => {
                    if let Ok((_, changed, _)) = msg.body().deserialize::<(
                        String,
                        HashMap<String, zbus::OwnedVariant>,
                        Vec<String>,
                    )>() && let Some(p) =
                        changed.get("Progress").and_then(|v| f64::try_from(v).ok())
                        && values.last() != Some(&p)
                    {
                        values.push(p);
                    }
                }
                _ => {}
            }
        }
        Err("signal stream ended".to_string())
    };
    let done = tokio::time::timeout(BOOT_LIMIT, wait)
        .await
        .map_err(|_| "maqet's snapshot job did not end")??;
    let mine = done.duration_since(t0);
    let job: JobProxy<'_> = proxy_at(&s.conn, job).await.ctx("Job proxy")?;
    let state = job.state().await.unwrap_or_default();
    let r = &mut b.report;
    r.add(
        "guests",
        "snap_raw",
        &format!("floor: raw QMP snapshot-save, {mib} MiB touched: command → job concluded"),
        Some(raw.as_secs_f64() * 1e6),
        Unit::Us,
        0,
    );
    r.add(
        "guests",
        "snap_maqet",
        &format!("maqet: Snapshots.Create, {mib} MiB touched: call → job Completed"),
        Some(mine.as_secs_f64() * 1e6),
        Unit::Us,
        0,
    );
    r.note_last(format!(
        "job state {state}; with fsfreeze through the agent"
    ));
    r.add(
        "guests",
        "snap_progress_moves",
        "maqet: the job's Progress property changes during it",
        Some(values.len() as f64),
        Unit::Count,
        0,
    );
    let rising = values.windows(2).all(|w| w[0] < w[1]);
    r.note_last(format!(
        "{}, ending at {}; raw {:.2} s, maqet {:.2} s ({:.2}×)",
        if rising { "rising" } else { "NOT rising" },
        values
            .last()
            .map_or("nothing".into(), |v| format!("{v:.2}")),
        raw.as_secs_f64(),
        mine.as_secs_f64(),
        mine.as_secs_f64() / raw.as_secs_f64().max(1e-9)
    ));
    Ok(())
}

/// Idle: several real guests running, nothing called; maqetd's wake-ups against the
/// events the guests caused (every signal maqetd emits in the window).
async fn idle(
    b: &mut Bench<'_>,
    s: &Session,
    img: &Image,
    _first: &VmProxy<'_>,
    first_guest: &GuestProxy<'_>,
    dir: &Path,
) -> Res<()> {
    let n = if b.opts.quick { 2 } else { 5 };
    let mut more = Vec::new();
    for i in 1..n {
        let disk = dir.join(format!("idle{i}.qcow2"));
        qcow2(&disk)?;
        let path = s
            .manager
            .add_vm(
                &format!("idle{i}"),
                &yaml(&format!("idle{i}"), img, 256, &disk),
            )
            .await
            .ctx("AddVM idle guest")?;
        let vm = s.vm(path.clone()).await?;
        let g: GuestProxy<'static> = proxy_at(&s.conn, path).await.ctx("Guest proxy")?;
        let w = Watch::new(&vm).await?;
        vm.start().await.ctx("Start idle guest")?;
        more.push((vm, g, w));
    }
    agent_answers(first_guest).await?;
    for (_, g, _) in &more {
        agent_answers(g).await?;
    }
    let pid = s.maqetd_pid().await?;
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(BUS_NAME)
        .build()
        .ctx("match rule")?;
    let mut signals =
        MessageStream::for_match_rule(rule, &s.conn, std::num::NonZeroUsize::new(65536))
            .await
            .ctx("subscribing")?;
    // Let the boots' tails (agent sync, address refresh) pass first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while tokio::time::timeout(Duration::from_millis(1), signals.next())
        .await
        .is_ok()
    {}
    let (t0, c0) = (cpu_ticks(pid)?, ctx_switches(pid)?);
    let window = b.opts.guest_idle;
    let mut events = 0u64;
    let _ = tokio::time::timeout(window, async {
        while signals.next().await.is_some() {
            events += 1;
        }
    })
    .await;
    let (t1, c1) = (cpu_ticks(pid)?, ctx_switches(pid)?);
    for (vm, _, w) in more.iter_mut() {
        act_until(w, "stopped", vm.stop(true, 0)).await?;
    }
    let secs = window.as_secs();
    let r = &mut b.report;
    r.add(
        "guests",
        "guest_idle_switches",
        &format!("maqetd wake-ups (context switches), {secs} s, {n} real guests running"),
        Some((c1 - c0) as f64),
        Unit::Count,
        0,
    );
    r.add(
        "guests",
        "guest_idle_events",
        &format!("guest-originated events maqetd signalled in those {secs} s"),
        Some(events as f64),
        Unit::Count,
        0,
    );
    r.add(
        "guests",
        "guest_idle_ticks",
        &format!("maqetd CPU ticks in those {secs} s"),
        Some((t1 - t0) as f64),
        Unit::Count,
        0,
    );
    Ok(())
}
