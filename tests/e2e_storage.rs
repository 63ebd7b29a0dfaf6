//! End-to-end: disks, snapshots and jobs with real QEMU, real qemu-img and qcow2 images
//! on a private, D-Bus-activating session bus.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Bus, StatusWatch, TIMEOUT, error_name, stderr, stdout, tiny_vm_yaml};
use futures_util::StreamExt;
use maqet::client::{
    EventStream, JobProxy, QmpProxy, SnapshotsProxy, StorageProxy, VmProxy, proxy_at, qmp_proxy,
};
use zbus::zvariant::Variant;
use zbus::{Connection, OwnedObjectPath};

/// A tiny VM with `storage` entries (YAML flow mappings, one per line).
fn vm_with_disks(name: &str, entries: &[String]) -> String {
    let mut yaml = tiny_vm_yaml(name);
    yaml.push_str("storage:\n");
    for e in entries {
        yaml.push_str(&format!("  - {e}\n"));
    }
    yaml
}

fn qcow2_entry(name: &str, file: &Path, size: &str) -> String {
    format!(
        "{{name: {name}, type: qcow2, file: '{}', size: {size}}}",
        file.display()
    )
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", stderr(&out));
    stdout(&out)
}

/// A disk the user brought (not created by maqet).
fn user_disk(path: &Path, format: &str) {
    qemu_img(&["create", "-q", "-f", format, path.to_str().unwrap(), "32M"]);
}

/// Adds VM `name` with one qcow2 disk `root` at `<bus root>/<name>.qcow2` (made first
/// with qemu-img when `brought`, else left for maqet to create on start).
async fn one_disk_vm(
    bus: &Bus,
    conn: &Connection,
    name: &str,
    brought: bool,
) -> (VmProxy<'static>, PathBuf) {
    let disk = bus.root().join(format!("{name}.qcow2"));
    if brought {
        user_disk(&disk, "qcow2");
    }
    let yaml = vm_with_disks(name, &[qcow2_entry("root", &disk, "64M")]);
    (bus.add(conn, "", &yaml).await, disk)
}

fn snapshot_names_on(path: &Path) -> Vec<String> {
    let info = qemu_img(&["info", "-U", "--output=json", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn snapshots(conn: &Connection, vm: &VmProxy<'_>) -> SnapshotsProxy<'static> {
    proxy_at(conn, vm.inner().path().to_owned().into())
        .await
        .unwrap()
}

async fn storage(conn: &Connection, vm: &VmProxy<'_>) -> StorageProxy<'static> {
    proxy_at(conn, vm.inner().path().to_owned().into())
        .await
        .unwrap()
}

/// The end of a job: (state, message, progress). Subscribes to `Completed` first, then
/// reads the state, so an end in between is not missed.
async fn job_end(conn: &Connection, path: OwnedObjectPath) -> (String, String, f64) {
    let job: JobProxy = proxy_at(conn, path).await.unwrap();
    let mut completed = job.receive_completed().await.unwrap();
    if job.state().await.unwrap() == "running" {
        let sig = tokio::time::timeout(TIMEOUT, completed.next())
            .await
            .expect("no Completed signal in time")
            .unwrap();
        let args = sig.args().unwrap();
        assert_eq!(*args.success(), job.state().await.unwrap() == "completed");
    }
    (
        job.state().await.unwrap(),
        job.message().await.unwrap(),
        job.progress().await.unwrap(),
    )
}

fn names(rows: &[(String, u64, u64, u64)]) -> Vec<&str> {
    rows.iter().map(|r| r.0.as_str()).collect()
}

fn no_overwrite() -> HashMap<&'static str, Variant<'static>> {
    HashMap::new()
}

/// History rows of one kind for a VM, from the database (read-only).
fn history(bus: &Bus, vm_id: &str, kind: &str) -> Vec<String> {
    let db = rusqlite::Connection::open_with_flags(
        bus.database(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = db
        .prepare("SELECT reason FROM events WHERE vm_id = ?1 AND kind = ?2 ORDER BY seq")
        .unwrap();
    stmt.query_map([vm_id, kind], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_are_created_on_first_start_and_only_those_are_deleted() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let made = bus.root().join("vms/new/root.qcow2");
    let brought = bus.root().join("brought.qcow2");
    user_disk(&brought, "qcow2");
    let brought_inode = std::fs::metadata(&brought).unwrap().ino();
    let yaml = vm_with_disks(
        "disks",
        &[
            qcow2_entry("root", &made, "64M"),
            qcow2_entry("data", &brought, "1G"),
        ],
    );
    let vm = bus.add(&conn, "", &yaml).await;
    assert!(!made.exists(), "nothing is created before the first start");

    vm.start().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "running");
    let meta = std::fs::metadata(&made).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "a new disk is private");
    let info = qemu_img(&["info", "-U", "--output=json", made.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 << 20);
    let parent = std::fs::metadata(made.parent().unwrap()).unwrap();
    assert_eq!(parent.permissions().mode() & 0o777, 0o700);
    let brought_now = std::fs::metadata(&brought).unwrap();
    assert_eq!(
        brought_now.ino(),
        brought_inode,
        "an existing disk is used as is"
    );
    assert_eq!(
        brought_now.len(),
        std::fs::metadata(&brought).unwrap().len()
    );
    let created = history(&bus, &vm.id().await.unwrap(), "storage");
    assert_eq!(created.len(), 1, "{created:?}");
    assert!(created[0].contains("root.qcow2"), "{created:?}");

    // Storage.List says who made what; `storage ls`/`verify` show the same.
    let rows = storage(&conn, &vm).await.list().await.unwrap();
    let row = |n: &str| rows.iter().find(|r| r.0 == n).unwrap().clone();
    let root = row("root");
    assert_eq!(
        (root.1.as_str(), root.3, root.4, root.6),
        ("qcow2", true, 64 << 20, true)
    );
    assert!(root.5 > 0, "actual size");
    assert!(!row("data").6, "the user's disk is not maqet's");
    let out = bus.maqet(&["--json", "storage", "ls", "disks"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed[0]["created_by_maqet"], true);
    assert_eq!(listed[1]["created_by_maqet"], false);
    let out = bus.maqet(&["storage", "verify", "disks"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("ok"), "{}", stdout(&out));

    let out = bus.maqet(&["stop", "--force", "disks"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["rm", "--delete-storage", "disks"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(!made.exists(), "maqet's disk is deleted");
    assert!(brought.exists(), "the user's disk stays");
    assert!(
        text.contains(&format!("deleted {}", made.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("kept {}", brought.display())),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dangerous_locations_are_refused_and_nothing_is_written() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let storage_error = "org.maqet.Maqet1.Error.Storage";

    let err = manager
        .add_vm(
            "",
            &vm_with_disks("etc", &[qcow2_entry("d", Path::new("/etc/x.qcow2"), "1M")]),
        )
        .await
        .unwrap_err();
    assert_eq!(error_name(&err), storage_error, "{err}");
    assert!(err.to_string().contains("/etc/x.qcow2"), "{err}");

    // Through a symlinked directory that points into /etc.
    let link = bus.root().join("innocent");
    std::os::unix::fs::symlink("/etc", &link).unwrap();
    let sneaky = link.join("maqet-e2e.qcow2");
    let err = manager
        .add_vm(
            "",
            &vm_with_disks("sneaky", &[qcow2_entry("d", &sneaky, "1M")]),
        )
        .await
        .unwrap_err();
    assert_eq!(error_name(&err), storage_error, "{err}");
    assert!(
        err.to_string().contains("resolves to /etc/maqet-e2e.qcow2"),
        "{err}"
    );

    // Apply is checked the same way.
    let vm = bus.add(&conn, "", &tiny_vm_yaml("fine")).await;
    let err = vm
        .apply(&vm_with_disks("fine", &[qcow2_entry("d", &sneaky, "1M")]))
        .await
        .unwrap_err();
    assert_eq!(error_name(&err), storage_error, "{err}");

    // A directory that was harmless when the VM was added and is swapped for a
    // symlink into /etc before the start: creation re-checks, writes nothing.
    let dir = bus.root().join("later");
    std::fs::create_dir(&dir).unwrap();
    let swapped = dir.join("maqet-e2e-swap.qcow2");
    let vm = bus
        .add(
            &conn,
            "",
            &vm_with_disks("swap", &[qcow2_entry("d", &swapped, "1M")]),
        )
        .await;
    std::fs::remove_dir(&dir).unwrap();
    std::os::unix::fs::symlink("/etc", &dir).unwrap();
    let err = vm.start().await.unwrap_err();
    assert_eq!(error_name(&err), storage_error, "{err}");
    assert!(err.to_string().contains("resolves to /etc"), "{err}");
    assert_ne!(vm.status().await.unwrap(), "running");
    for p in [
        "/etc/x.qcow2",
        "/etc/maqet-e2e.qcow2",
        "/etc/maqet-e2e-swap.qcow2",
    ] {
        assert!(!Path::new(p).exists(), "{p} was written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_snapshots_keep_the_vm_running() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (vm, _) = one_disk_vm(&bus, &conn, "live", false).await;
    let mut watch = StatusWatch::new(&vm).await;
    vm.start().await.unwrap();
    watch.until("running").await;
    let snaps = snapshots(&conn, &vm).await;

    let job = snaps.create("s1", no_overwrite()).await.unwrap();
    assert!(job.as_str().starts_with("/org/maqet/Maqet1/job/"), "{job}");
    let (state, message, progress) = job_end(&conn, job.clone()).await;
    assert_eq!(state, "completed", "{message}");
    assert_eq!(progress, 1.0);
    let job_proxy: JobProxy = proxy_at(&conn, job).await.unwrap();
    assert_eq!(job_proxy.operation().await.unwrap(), "snapshot-create");
    assert_eq!(
        job_proxy.vm().await.unwrap().as_str(),
        vm.inner().path().as_str()
    );
    assert_eq!(vm.status().await.unwrap(), "running");

    let list = snaps.list().await.unwrap();
    assert_eq!(names(&list), ["s1"]);
    let (_, state_size, date, _) = list[0];
    assert!(state_size > 0, "a live snapshot holds the VM state");
    assert!(date > 1_600_000_000_000_000, "date in µs: {date}");

    let err = snaps.create("s1", no_overwrite()).await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.AlreadyExists");
    let overwrite = HashMap::from([("overwrite", Variant::from(true))]);
    let (state, message, _) = job_end(&conn, snaps.create("s1", overwrite).await.unwrap()).await;
    assert_eq!(state, "completed", "{message}");
    assert_eq!(names(&snaps.list().await.unwrap()), ["s1"]);
    let err = snaps.create("123", no_overwrite()).await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidArgument");

    let (state, message, _) = job_end(&conn, snaps.load("s1").await.unwrap()).await;
    assert_eq!(state, "completed", "{message}");
    assert_eq!(vm.status().await.unwrap(), "running");
    let err = snaps.load("nope").await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.NotFound");
    assert!(err.to_string().contains("its snapshots: s1"), "{err}");

    let (state, message, _) = job_end(&conn, snaps.delete("s1").await.unwrap()).await;
    assert_eq!(state, "completed", "{message}");
    assert!(snaps.list().await.unwrap().is_empty());

    // QEMU stopped and resumed the vCPUs around each job: none of that may have shown
    // as a status change. The next StatusChanged is the pause asked for now.
    vm.pause().await.unwrap();
    let (status, previous, reason) = watch.until("paused").await;
    assert_eq!(
        (previous.as_str(), reason.as_str()),
        ("running", "paused by request"),
        "{status}"
    );

    let done = history(&bus, &vm.id().await.unwrap(), "snapshot");
    assert_eq!(done.len(), 4, "{done:?}");
    assert!(done[0].contains("created snapshot 's1'"), "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_snapshots_through_the_cli() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (vm, disk) = one_disk_vm(&bus, &conn, "off", true).await;

    let out = bus.maqet(&["--json", "snapshot", "create", "off", "first"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let end: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(end["state"], "completed", "{end}");
    assert_eq!(snapshot_names_on(&disk), ["first"]);

    // A job outlives the connection that started it.
    let other = bus.conn().await;
    let started = snapshots(
        &other,
        &bus.vm(&other, vm.inner().path().to_owned().into()).await,
    )
    .await
    .create("second", no_overwrite())
    .await
    .unwrap();
    drop(other);
    let (state, message, _) = job_end(&conn, started).await;
    assert_eq!(state, "completed", "{message}");
    assert_eq!(snapshot_names_on(&disk), ["first", "second"]);

    let out = bus.maqet(&["snapshot", "ls", "off"]);
    assert!(stdout(&out).contains("first"), "{}", stdout(&out));
    assert!(stdout(&out).contains("disks only"), "{}", stdout(&out));
    let out = bus.maqet(&["snapshot", "load", "off", "first", "--no-progress"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = bus.maqet(&["snapshot", "rm", "off", "missing"]);
    assert_eq!(out.status.code(), Some(3), "NotFound: {}", stderr(&out));
    assert!(
        stderr(&out).contains("its snapshots: first"),
        "{}",
        stderr(&out)
    );
    for name in ["first", "second"] {
        let out = bus.maqet(&["snapshot", "rm", "off", name]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    }
    assert!(snapshot_names_on(&disk).is_empty());
}

/// A `qemu-img` whose snapshot creation never finishes (a very slow disk); everything
/// else is the real one.
fn stuck_qemu_img() -> String {
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v qemu-img"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    format!(
        "#!/bin/sh\nif [ \"$1\" = snapshot ] && [ \"$2\" = -c ]; then exec sleep 600; fi\nexec {} \"$@\"\n",
        real.trim()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_an_offline_job_kills_qemu_img_and_leaves_nothing() {
    let bus = Bus::start_with_tools(&[("qemu-img", &stuck_qemu_img())]);
    let conn = bus.conn().await;
    let (vm, disk) = one_disk_vm(&bus, &conn, "slow", true).await;
    let snaps = snapshots(&conn, &vm).await;
    let path = snaps.create("never", no_overwrite()).await.unwrap();
    let job: JobProxy = proxy_at(&conn, path.clone()).await.unwrap();
    assert_eq!(job.state().await.unwrap(), "running");

    // No Start while qemu-img holds the disks.
    let err = vm.start().await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidState");
    assert!(err.to_string().contains("busy"), "{err}");
    let err = snaps.delete("never").await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidState");

    // Subscribed before the cancel: the change of State must be announced.
    let props = zbus::fdo::PropertiesProxy::builder(&conn)
        .destination("org.maqet.Maqet1")
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let mut changes = props.receive_properties_changed().await.unwrap();
    job.cancel().await.unwrap();
    let (state, message, _) = job_end(&conn, path).await;
    assert_eq!(state, "cancelled", "{message}");
    let announced = async {
        while let Some(change) = changes.next().await {
            let args = change.args().unwrap();
            let state = args.changed_properties().get("State").cloned();
            if let Some(v) = state {
                return String::try_from(v.try_to_owned().unwrap()).unwrap();
            }
        }
        panic!("PropertiesChanged stream ended");
    };
    let announced = tokio::time::timeout(TIMEOUT, announced).await.unwrap();
    assert_eq!(announced, "cancelled");
    assert!(message.contains("no partial snapshot"), "{message}");
    assert!(
        bus.marked_processes("sleep").is_empty(),
        "qemu-img was not reaped"
    );
    assert!(snapshot_names_on(&disk).is_empty());
    assert!(snaps.list().await.unwrap().is_empty());
    let err = job.cancel().await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidState");
    // The VM is free again.
    vm.start().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "running");
}

/// The next QMP `Event` signal named `name` (others are passed over).
async fn next_qmp_event(events: &mut maqet::client::EventStream, name: &str) {
    let wait = async {
        while let Some(sig) = events.next().await {
            if sig.args().unwrap().name() == &name {
                return;
            }
        }
        panic!("the Event stream ended before {name}");
    };
    tokio::time::timeout(TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| panic!("no {name} event in time"));
}

/// A cancel that lands while QEMU is saving. QEMU cannot stop a save once begun (7.2
/// saves in one block of its main loop and answers `job-cancel` only after it), so
/// maqet honours the cancel by deleting what QEMU made: the job ends `cancelled`, the
/// VM runs on, and no snapshot is left. The guest dirties 448 MiB of RAM first, so the
/// save takes a while; the test cancels once QEMU announces the save began (`STOP`)
/// and requires the cancel to be accepted, so it cannot pass without hitting a save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_live_job_ends_consistently() {
    let (bus, conn, vm, qmp, mut events, disk) = filling_guest("lc", 448, 512).await;
    // The guest announces that its RAM is dirty.
    next_qmp_event(&mut events, "RTC_CHANGE").await;

    let snaps = snapshots(&conn, &vm).await;
    let path = snaps.create("never", no_overwrite()).await.unwrap();
    let job: JobProxy = proxy_at(&conn, path.clone()).await.unwrap();
    // QEMU stops the vCPUs when its save begins: the cancel comes during the save.
    next_qmp_event(&mut events, "STOP").await;
    job.cancel()
        .await
        .expect("the cancel must reach a job that is still saving");
    let (state, message, _) = job_end(&conn, path).await;
    assert_eq!(state, "cancelled", "{message}");
    assert!(message.contains("maqet deleted it"), "{message}");

    // Nothing is left, in maqet's view or on the disk, and the VM runs on.
    assert!(snaps.list().await.unwrap().is_empty());
    assert!(snapshot_names_on(&disk).is_empty());
    assert_eq!(vm.status().await.unwrap(), "running");
    let status: serde_json::Value =
        serde_json::from_str(&qmp.execute("query-status", "", false).await.unwrap()).unwrap();
    assert_eq!(status["status"], "running", "{status}");
    let done = history(&bus, &vm.id().await.unwrap(), "snapshot");
    assert_eq!(done.len(), 1, "{done:?}");
    assert!(done[0].starts_with("cancelled"), "{done:?}");
    let err = job.cancel().await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidState");
    // The VM is free for the next snapshot, which completes.
    let (state, message, _) =
        job_end(&conn, snaps.create("after", no_overwrite()).await.unwrap()).await;
    assert_eq!(state, "completed", "{message}");
    assert_eq!(snapshot_names_on(&disk), ["after"]);
}

/// Every `Progress` value the job at `path` announces (`PropertiesChanged`), and its
/// `Message`s, until its `Completed` signal; `signals` was subscribed before the job
/// was created, so none is missed.
async fn job_progress(
    signals: &mut zbus::MessageStream,
    path: &OwnedObjectPath,
) -> (Vec<f64>, Vec<String>, bool) {
    let (mut progress, mut messages) = (Vec::new(), Vec::new());
    let wait = async {
        while let Some(msg) = signals.next().await {
            let msg = msg.unwrap();
            let h = msg.header();
            if h.path().map(|p| p.as_str()) != Some(path.as_str()) {
                continue;
            }
            match h.member().map(|m| m.as_str()) {
                Some("Completed") => {
                    let (ok, _) = msg.body().deserialize::<(bool, String)>().unwrap();
                    return ok;
                }
                Some("PropertiesChanged") => {
                    let (_, changed, _) = msg
                        .body()
                        .deserialize::<(String, HashMap<String, zbus::OwnedVariant>, Vec<String>)>()
                        .unwrap();
                    if let Some(p) = changed.get("Progress") {
                        progress.push(f64::try_from(p).unwrap());
                    }
                    if let Some(m) = changed.get("Message") {
                        messages.push(String::try_from(m.try_clone().unwrap()).unwrap());
                    }
                }
                _ => {}
            }
        }
        panic!("the signal stream ended before the job's end");
    };
    let ok = tokio::time::timeout(TIMEOUT, wait)
        .await
        .expect("no Completed signal in time");
    (progress, messages, ok)
}

/// A live save's `Progress` moves while QEMU writes the VM state (QEMU itself reports
/// nothing until the end): rising values below 1, then 1 at the end. The guest dirties
/// 960 MiB of RAM, so the save writes that much (a second or more, where the progress is
/// measured every 200 ms; the count of steps depends on the machine's speed, so only
/// "more than the end alone" is asserted). The second save overwrites the
/// first, so its VM state lands in the clusters the deleted one freed (the file does not
/// grow): its progress must move too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_save_progress_moves_while_the_vm_state_is_written() {
    let (_bus, conn, vm, _qmp, mut events, disk) = filling_guest("prog", 960, 1024).await;
    next_qmp_event(&mut events, "RTC_CHANGE").await;
    let snaps = snapshots(&conn, &vm).await;

    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(maqet::client::BUS_NAME)
        .build()
        .unwrap();
    let mut signals = zbus::MessageStream::for_match_rule(rule, &conn, None)
        .await
        .unwrap();
    for overwrite in [false, true] {
        let opts = HashMap::from([("overwrite", Variant::from(overwrite))]);
        let path = snaps.create("moving", opts).await.unwrap();
        let (progress, messages, ok) = job_progress(&mut signals, &path).await;
        assert!(ok, "the save failed: {messages:?}");
        eprintln!("overwrite {overwrite}: Progress {progress:?}");
        assert!(
            progress.len() > 1,
            "overwrite {overwrite}: Progress moved only {} times: {progress:?}",
            progress.len()
        );
        assert!(
            progress.windows(2).all(|w| w[0] < w[1]),
            "Progress must only rise: {progress:?}"
        );
        assert_eq!(progress.last(), Some(&1.0), "{progress:?}");
        assert!(
            progress[..progress.len() - 1]
                .iter()
                .all(|p| *p > 0.0 && *p < 1.0),
            "{progress:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("saving the VM state: ")),
            "{messages:?}"
        );
    }
    assert_eq!(snapshot_names_on(&disk), ["moving"]);
    assert_eq!(vm.status().await.unwrap(), "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_disks_and_diskless_vms_cannot_have_snapshots() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let qcow = bus.root().join("a.qcow2");
    let raw: PathBuf = bus.root().join("b.img");
    user_disk(&qcow, "qcow2");
    user_disk(&raw, "raw");
    let entries = [
        qcow2_entry("a", &qcow, "32M"),
        format!("{{name: b, type: raw, file: '{}'}}", raw.display()),
    ];
    let mixed = bus.add(&conn, "", &vm_with_disks("mixed", &entries)).await;
    let bare = bus.add(&conn, "", &tiny_vm_yaml("bare")).await;
    for (vm, why) in [(mixed, "is a raw image"), (bare, "has no disks")] {
        let err = snapshots(&conn, &vm)
            .await
            .create("x", no_overwrite())
            .await
            .unwrap_err();
        assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.Storage");
        assert!(err.to_string().contains(why), "{err}");
    }
    assert!(snapshot_names_on(&qcow).is_empty());
}

/// A running TCG VM (`memory` MiB) whose guest dirties `mib` MiB of RAM and then sends
/// `RTC_CHANGE`, with a stream of its QMP events opened before the start. TCG: under a
/// nested, software KVM every first touch of a page is a slow exit.
async fn filling_guest(
    name: &str,
    mib: u32,
    memory: u32,
) -> (
    Bus,
    Connection,
    VmProxy<'static>,
    QmpProxy<'static>,
    EventStream,
    PathBuf,
) {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let boot = common::guest::write_fill_image(bus.root(), mib);
    let disk = bus.root().join(format!("{name}.qcow2"));
    let (boot, disk_s) = (boot.to_str().unwrap(), disk.to_str().unwrap());
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", boot, disk_s]);
    qemu_img(&["resize", "-q", disk_s, "64M"]);
    let yaml = format!(
        "name: {name}\nbinary: qemu-system-x86_64\ndisplay: none\nmemory: {memory}\narguments:\n  - nodefaults\n  - accel: tcg\nstorage:\n  - {}\n",
        qcow2_entry("root", &disk, "64M")
    );
    let vm = bus.add(&conn, "", &yaml).await;
    let qmp = qmp_proxy(&conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    let events = qmp.receive_event().await.unwrap();
    vm.start().await.unwrap();
    (bus, conn, vm, qmp, events, disk)
}
