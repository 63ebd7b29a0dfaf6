//! End-to-end: desktop integration. Notifications to a test notification server on the
//! private bus (a crash with working "Start again" and "Show log" buttons, silence for
//! a requested stop), with real QEMU.

mod common;

use std::io::BufRead;
use std::path::Path;

use common::guest::{self, Behaviour};
use common::notifications::FakeNotifications;
use common::{Bus, StatusWatch, TIMEOUT, tiny_vm_yaml};

/// A FIFO a tool writes one line into; the test reads it without polling.
fn fifo(path: &Path) -> std::sync::mpsc::Receiver<String> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        // Opening blocks until the writer opens its end.
        let f = std::fs::File::open(&path).unwrap();
        let mut line = String::new();
        let _ = std::io::BufReader::new(f).read_line(&mut line);
        let _ = tx.send(line.trim().to_string());
    });
    rx
}

fn kill9(pid: u32) {
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Calls KRunner's `Run(id, "start")` as Plasma would: a start nobody watches in a
/// terminal (the shell shows no D-Bus error), so a failure is notified.
async fn start_from_krunner(conn: &zbus::Connection, id: &str) {
    let _ = conn
        .call_method(
            Some("org.maqet.Maqet1"),
            "/org/maqet/Maqet1/krunner",
            Some("org.kde.krunner1"),
            "Run",
            &(id, "start"),
        )
        .await;
}

/// The last line of a VM's QEMU log that says how a run ended.
fn run_end(bus: &Bus, id: &str) -> String {
    // The state directory's layout belongs to the fixture: find the log.
    let found = walk(bus.root(), &format!("{id}.log")).expect("the VM's QEMU log");
    let log = std::fs::read_to_string(found).unwrap();
    log.lines()
        .rfind(|l| l.starts_with("=== maqet: run ended at "))
        .unwrap_or_else(|| panic!("no run end in the log:\n{log}"))
        .to_string()
}

fn walk(dir: &Path, file: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.file_name().is_some_and(|n| n == file) {
            return Some(p);
        }
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && let Some(found) = walk(&p, file)
        {
            return Some(found);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_is_notified_and_its_buttons_work_through_the_gate() {
    // "Show log" runs this opener, which reports the file it was given.
    let opener = "#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/../opened.fifo\"\n";
    let bus = Bus::start_with(
        &[("test-opener", opener)],
        "notifications:\n  log_opener: [test-opener]\n",
    );
    let opened = fifo(&bus.root().join("opened.fifo"));
    let mut server = FakeNotifications::start(&bus, &["actions", "body", "body-markup"]).await;
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("crashy")).await;
    let id = vm.id().await.unwrap();
    let mut watch = StatusWatch::new(&vm).await;
    vm.start().await.unwrap();
    watch.until("running").await;

    kill9(vm.pid().await.unwrap());
    let (_, _, reason) = watch.until("crashed").await;
    let n = server.next().await;
    assert_eq!(n.summary, "VM 'crashy' crashed", "{n:?}");
    assert_eq!(n.replaces_id, 0);
    assert!(n.body.contains("SIGKILL"), "body carries the reason: {n:?}");
    assert!(
        !n.body.contains("crashy"),
        "the body does not repeat the title: {n:?}"
    );
    assert!(reason.contains("SIGKILL"));
    // The keys carry the verb and the VM: a later maqetd can act on them.
    assert_eq!(
        n.action_keys(),
        [format!("start:{id}"), format!("log:{id}")]
    );
    assert_eq!(n.app_name, "maqet");
    assert_eq!(n.app_icon, "org.maqet.Maqet");
    assert_eq!(
        n.hint_str("desktop-entry").as_deref(),
        Some("org.maqet.Maqet")
    );
    // "Show log" answers the notification's question: the log says how the run ended.
    let end = run_end(&bus, &id);
    assert!(
        end.ends_with(": crashed: QEMU was killed by signal 9 (SIGKILL)"),
        "{end}"
    );

    // "Show log": the opener gets the VM's QEMU log.
    server.click(n.id, &format!("log:{id}")).await;
    let got = opened.recv_timeout(TIMEOUT).expect("the log opener ran");
    assert!(got.ends_with(&format!("logs/{id}.log")), "{got}");

    // "Start again": the VM runs again (the audit, checked below, names the server as
    // the caller), and the crash card, no longer true, is withdrawn.
    server.click(n.id, &format!("start:{id}")).await;
    watch.until("running").await;
    assert_eq!(
        server.next_close().await,
        n.id,
        "the crash card is withdrawn"
    );
    // A stop the user asked for is not news, nor a start that failed in front of its
    // caller (this test's own call); the next notification is the failed start below
    // that nobody watched, so none came in between (the notifier keeps the core's
    // order).
    let out = bus.maqet(&["stop", "crashy", "--force"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let bad = format!("{}args: [-no-such-option]\n", tiny_vm_yaml("broken"));
    let broken = bus.add(&conn, "", &bad).await;
    let broken_id = broken.id().await.unwrap();
    assert!(broken.start().await.is_err());
    let out = bus.maqet(&["start", "broken"]);
    assert!(!out.status.success());
    start_from_krunner(&conn, &broken_id).await;
    let n = server.next().await;
    assert_eq!(n.summary, "VM 'broken' failed to start", "{n:?}");
    // The card leads with QEMU's own words, and does not repeat the title.
    let first = n.body.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("qemu-system-") && first.contains("no-such-option"),
        "{n:?}"
    );
    assert!(!n.body.contains("broken"), "{n:?}");
    assert_eq!(n.action_keys(), [format!("log:{broken_id}")]);
    // Failing again replaces the card instead of adding one.
    start_from_krunner(&conn, &broken_id).await;
    let again = server.next().await;
    assert_eq!(again.summary, "VM 'broken' failed to start");
    assert_eq!((again.replaces_id, again.id), (n.id, n.id), "{again:?}");
    assert!(run_end(&bus, &broken_id).contains(": failed: "));

    // A guest that powers itself off is news, without buttons.
    let img = guest::write_image(bus.root(), Behaviour::PowerOffAtOnce);
    let off = bus
        .add(&conn, "", &guest::vm_yaml("lights-out", &img))
        .await;
    let off_id = off.id().await.unwrap();
    let mut off_watch = StatusWatch::new(&off).await;
    off.start().await.unwrap();
    off_watch.until("stopped").await;
    let n = server.next().await;
    assert_eq!(n.summary, "VM 'lights-out' powered off", "{n:?}");
    assert!(
        n.body.is_empty(),
        "\"guest powered off\" only repeats the title: {n:?}"
    );
    assert!(n.actions.is_empty());
    assert!(run_end(&bus, &off_id).ends_with(": stopped: guest powered off"));
    // Removing a VM withdraws what was said about it.
    bus.manager(&conn)
        .await
        .remove_vm("lights-out", false, false)
        .await
        .unwrap();
    assert_eq!(server.next_close().await, n.id);
    assert!(server.closes_so_far().is_empty());

    // The audit rows of both clicks: written when each action's call ended, which was
    // long before this (a stop, another VM's failed start and a boot ago).
    let db = rusqlite::Connection::open(bus.database()).unwrap();
    let (caller, method, outcome): (String, String, String) = db
        .query_row(
            "SELECT caller_name, method, outcome FROM audit WHERE method = 'Start' \
             AND arguments LIKE '%notification%' ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("the notification's start is audited");
    assert_eq!(
        (caller.as_str(), method.as_str(), outcome.as_str()),
        (server.conn.unique_name().unwrap().as_str(), "Start", "ok")
    );
    let shown: String = db
        .query_row(
            "SELECT method FROM audit WHERE method = 'ShowLog'",
            [],
            |r| r.get(0),
        )
        .expect("showing the log is audited");
    assert_eq!(shown, "ShowLog");

    // `maqet audit` names the VM and that the start came from a notification button.
    let out = bus.maqet(&["--json", "audit", "--vm", "crashy"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let start = rows
        .iter()
        .rev()
        .find(|r| r["method"] == "Start" && r["via"] == "notification")
        .unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!(start["vm"], "crashy");
    assert_eq!(start["arguments"], "notification action \"Start again\"");
    let table = common::stdout(&bus.maqet(&["audit", "--vm", "crashy"]));
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains("VM") && header.contains("VIA"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("crashy") && l.contains("Start") && l.contains("notification")),
        "{table}"
    );
}

/// A button outlives the maqetd that sent it: the key names the VM and the verb, the
/// gate decides as always; a button whose VM is gone says so. A snapshot the CLI
/// followed to its end is not notified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buttons_work_after_maqetd_restarts_and_a_gone_vm_says_so() {
    let bus = Bus::start();
    let mut server = FakeNotifications::start(&bus, &["actions", "body"]).await;
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("phoenix")).await;
    let id = vm.id().await.unwrap();
    let mut watch = StatusWatch::new(&vm).await;
    vm.start().await.unwrap();
    watch.until("running").await;
    kill9(vm.pid().await.unwrap());
    watch.until("crashed").await;
    let n = server.next().await;
    assert_eq!(n.summary, "VM 'phoenix' crashed");

    // maqetd goes away (as after an idle exit); the next call activates a new one.
    let daemon = bus.marked_processes("maqetd")[0];
    unsafe { libc::kill(daemon as i32, libc::SIGTERM) };
    common::process_gone(daemon).await;
    let ls = bus.maqet(&["ls"]);
    assert!(ls.status.success(), "{}", common::stderr(&ls));
    assert_ne!(bus.marked_processes("maqetd"), [daemon]);

    // The old notification's button still starts the VM, through the gate.
    server.click(n.id, &format!("start:{id}")).await;
    let fresh = bus.conn().await;
    let vm = bus.vm(&fresh, vm.inner().path().to_owned().into()).await;
    assert_eq!(vm.wait("status=running", 60).await.unwrap(), "running");
    // The new maqetd knew the old card (notifications.json): running again, it withdraws it.
    assert_eq!(server.next_close().await, n.id);

    // A snapshot the CLI created and showed is not news.
    let disk = bus.root().join("snap.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "1M"])
        .status()
        .unwrap();
    assert!(made.success());
    let yaml = format!(
        "{}storage:\n  - {{type: qcow2, file: '{}'}}\n",
        tiny_vm_yaml("ghost"),
        disk.display()
    );
    let ghost = bus.add(&fresh, "", &yaml).await;
    let ghost_id = ghost.id().await.unwrap();
    let out = bus.maqet(&["snapshot", "create", "ghost", "base", "--no-progress"]);
    assert!(out.status.success(), "{}", common::stderr(&out));

    // A crash is: the next notification (none came for the snapshot in between).
    let mut watch = StatusWatch::new(&ghost).await;
    ghost.start().await.unwrap();
    watch.until("running").await;
    kill9(ghost.pid().await.unwrap());
    watch.until("crashed").await;
    let m = server.next().await;
    assert_eq!(m.summary, "VM 'ghost' crashed", "{m:?}");

    // Removing the VM withdraws its card; a click that still arrives says it is gone.
    bus.manager(&fresh)
        .await
        .remove_vm("ghost", false, false)
        .await
        .unwrap();
    assert_eq!(server.next_close().await, m.id);
    server.click(m.id, &format!("start:{ghost_id}")).await;
    let gone = server.next().await;
    assert_eq!(gone.summary, "This VM no longer exists", "{gone:?}");
    assert!(!gone.body.is_empty() && gone.actions.is_empty());

    // The click's audit row: written when its call ended, long before this (a snapshot,
    // a boot and a crash ago).
    let db = rusqlite::Connection::open(bus.database()).unwrap();
    let caller: String = db
        .query_row(
            "SELECT caller_name FROM audit WHERE method = 'Start' AND outcome = 'ok' \
             AND arguments LIKE '%notification%'",
            [],
            |r| r.get(0),
        )
        .expect("the click is audited");
    assert_eq!(caller, server.conn.unique_name().unwrap().as_str());
    vm.stop(true, 0).await.unwrap();
}

/// SIGTERMs the running maqetd and waits until a new one answers (D-Bus activation).
async fn restart_maqetd(bus: &Bus) {
    let daemon = bus.marked_processes("maqetd")[0];
    unsafe { libc::kill(daemon as i32, libc::SIGTERM) };
    common::process_gone(daemon).await;
    let ls = bus.maqet(&["ls"]);
    assert!(ls.status.success(), "{}", common::stderr(&ls));
    assert_ne!(bus.marked_processes("maqetd"), [daemon]);
}

/// Cards stay true across maqetd restarts: a crash card an earlier maqetd raised is
/// withdrawn when the VM runs again, and a failed-start card is replaced, not doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cards_an_earlier_maqetd_raised_are_withdrawn_and_replaced() {
    let bus = Bus::start();
    let mut server = FakeNotifications::start(&bus, &["actions", "body"]).await;
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("lazarus")).await;
    let mut watch = StatusWatch::new(&vm).await;
    vm.start().await.unwrap();
    watch.until("running").await;
    kill9(vm.pid().await.unwrap());
    watch.until("crashed").await;
    let crash = server.next().await;
    assert_eq!(crash.summary, "VM 'lazarus' crashed");

    let bad = format!("{}args: [-no-such-option]\n", tiny_vm_yaml("broken"));
    let broken_id = bus.add(&conn, "", &bad).await.id().await.unwrap();
    start_from_krunner(&conn, &broken_id).await;
    let failed = server.next().await;
    assert_eq!(failed.summary, "VM 'broken' failed to start");
    assert_eq!(failed.replaces_id, 0);

    restart_maqetd(&bus).await;
    let conn = bus.conn().await;
    // The same failure again replaces the earlier maqetd's card.
    start_from_krunner(&conn, &broken_id).await;
    let again = server.next().await;
    assert_eq!(again.summary, "VM 'broken' failed to start");
    assert_eq!(again.replaces_id, failed.id, "{again:?}");

    // Twice restarted (the replacement was remembered too): the crashed VM runs again
    // and its card, raised two maqetds ago, is withdrawn.
    restart_maqetd(&bus).await;
    let out = bus.maqet(&["start", "lazarus"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(server.next_close().await, crash.id);
    assert!(server.closes_so_far().is_empty());

    bus.maqet(&["stop", "lazarus", "--force"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_notification_server_maqetd_says_so_once_and_carries_on() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("lonely")).await;
    let mut watch = StatusWatch::new(&vm).await;
    let mut crash = async || {
        vm.start().await.unwrap();
        watch.until("running").await;
        kill9(vm.pid().await.unwrap());
        watch.until("crashed").await;
    };
    crash().await;
    crash().await;
    // A server that appears later is used: no retry loop, the next event simply goes
    // there. Notices go out in order, so the two before have been dealt with by now.
    let mut server = FakeNotifications::start(&bus, &["body"]).await;
    crash().await;
    let n = server.next().await;
    assert_eq!(n.summary, "VM 'lonely' crashed");
    assert!(n.actions.is_empty(), "no `actions` capability, no buttons");
    let log = std::fs::read_to_string(bus.root().join("bus.log")).unwrap();
    assert_eq!(
        log.matches("no notification server answers").count(),
        1,
        "{log}"
    );
}

/// `maqet setup --user` into a throwaway HOME: the files land where systemd, the bus and
/// the desktop look, name the freshly built binaries, and make activation work; then
/// `--uninstall` removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_user_installs_what_activation_needs_and_uninstall_removes_it() {
    let bus = Bus::start_unactivated();
    let before = bus.maqet(&["ls"]);
    assert_eq!(before.status.code(), Some(7), "nothing installed yet");

    let out = bus.maqet(&["setup", "--user"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    assert!(text.contains("session bus: reloaded"), "{text}");
    let maqetd = common::maqetd_bin();
    let root = bus.root();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
    let unit = read("config/systemd/user/maqetd.service");
    assert!(unit.contains(&format!("ExecStart={maqetd}\n")), "{unit}");
    assert!(unit.contains("KillMode=process") && unit.contains("Type=dbus"));
    let service = read("data/dbus-1/services/org.maqet.Maqet1.service");
    assert!(service.contains(&format!("Exec={maqetd}\n")), "{service}");
    let desktop = read("data/applications/org.maqet.Maqet.desktop");
    let maqet = common::maqet_bin();
    assert!(desktop.contains(&format!("Exec=sh -c \"{maqet} ls; exec {maqet} events\"\n")));
    assert!(!desktop.contains("NoDisplay=true") && desktop.contains("Icon=org.maqet.Maqet"));
    assert!(read("data/icons/hicolor/scalable/apps/org.maqet.Maqet.svg").contains("<svg"));
    assert!(read("data/dbus-1/interfaces/org.maqet.Maqet1.VM.xml").contains("OpenConsole"));

    // The bus now activates maqetd from the installed file.
    let ls = bus.maqet(&["ls"]);
    assert!(ls.status.success(), "{}", common::stderr(&ls));

    let out = bus.maqet(&["--json", "setup", "--user", "--uninstall"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["action"], "removed");
    let removed = v["files"].as_array().unwrap();
    let pages = std::fs::read_dir(root.join("data/man/man1")).map_or(0, |d| d.count());
    assert_eq!(pages, 0, "every man page is removed");
    assert!(removed.len() > 20, "{v}");
    for p in [
        "config/systemd/user/maqetd.service",
        "data/dbus-1/services/org.maqet.Maqet1.service",
        "data/applications/org.maqet.Maqet.desktop",
        "data/icons/hicolor/scalable/apps/org.maqet.Maqet.svg",
    ] {
        assert!(!root.join(p).exists(), "{p} left behind");
    }
    let again = bus.maqet(&["setup", "--user", "--uninstall"]);
    assert!(common::stdout(&again).contains("nothing to remove"));
}

/// Reads a child's stdout as bytes arrive (console output has no newlines to wait for).
fn collect(mut from: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

fn read_until(rx: &std::sync::mpsc::Receiver<Vec<u8>>, seen: &mut Vec<u8>, want: &str) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !String::from_utf8_lossy(seen).contains(want) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.extend(chunk),
            Err(_) => panic!(
                "no {want:?} on the console; got {:?}",
                String::from_utf8_lossy(seen)
            ),
        }
    }
}

/// `maqet console VM` with its input, and its output as it comes.
fn console(
    bus: &Bus,
    vm: &str,
) -> (
    std::process::Child,
    std::process::ChildStdin,
    std::sync::mpsc::Receiver<Vec<u8>>,
) {
    let mut child = bus
        .maqet_command(&["console", vm])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = collect(child.stdout.take().unwrap());
    let stdin = child.stdin.take().unwrap();
    (child, stdin, out)
}

/// `maqet console`: bytes go through QEMU's serial port to a guest that echoes them,
/// Ctrl-] detaches, a second client is refused while one is attached, and a VM whose
/// config chooses its own serial port keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_round_trip_through_the_guests_serial_port() {
    use std::io::Write;
    let bus = Bus::start();
    let conn = bus.conn().await;
    let img = guest::write_console_image(bus.root());
    let vm = bus.add(&conn, "", &guest::vm_yaml("serial", &img)).await;
    vm.start().await.unwrap();

    let (mut child, mut stdin, out) = console(&bus, "serial");
    let err = collect(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    read_until(&err, &mut seen, "Ctrl-] detaches");
    // The banner went out at boot, before anyone attached: maqetd kept it.
    let mut seen = Vec::new();
    read_until(&out, &mut seen, "maqet console guest");
    // The echo proves both directions.
    seen.clear();
    stdin.write_all(b"maqet-ping-42").unwrap();
    stdin.flush().unwrap();
    read_until(&out, &mut seen, "maqet-ping-42");

    let second = bus.maqet(&["console", "serial"]);
    assert_eq!(second.status.code(), Some(5), "{}", common::stderr(&second));
    assert!(common::stderr(&second).contains("in use"));

    stdin.write_all(&[0x1d]).unwrap();
    stdin.flush().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    let mut seen = Vec::new();
    read_until(&err, &mut seen, "detached");
    assert_eq!(
        vm.status().await.unwrap(),
        "running",
        "detaching leaves the VM be"
    );

    // Attach again: the console is free once detached.
    let (mut again, mut stdin, out) = console(&bus, "serial");
    stdin.write_all(b"second-visit").unwrap();
    stdin.flush().unwrap();
    let mut seen = Vec::new();
    read_until(&out, &mut seen, "second-visit");
    // The end of input detaches too.
    drop(stdin);
    assert!(again.wait().unwrap().success());
    // Piped input: the guest's answer (the echo) is shown before the end of input
    // detaches; the banner was shown to the first client, so it is not repeated.
    let mut piped = bus.maqet_command(&["console", "serial"]);
    piped.stdin(std::process::Stdio::piped());
    let mut piped = piped.stdout(std::process::Stdio::piped()).spawn().unwrap();
    piped
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped-question")
        .unwrap();
    let piped = piped.wait_with_output().unwrap();
    assert!(piped.status.success());
    let text = common::stdout(&piped);
    assert!(text.contains("piped-question"), "{text:?}");
    assert!(!text.contains("maqet console guest"), "{text:?}");

    let own = format!("{}args: [-serial, none]\n", tiny_vm_yaml("own-serial"));
    let own = bus.add(&conn, "", &own).await;
    own.start().await.unwrap();
    let refused = bus.maqet(&["console", "own-serial"]);
    assert_eq!(
        refused.status.code(),
        Some(3),
        "{}",
        common::stderr(&refused)
    );
    assert!(common::stderr(&refused).contains("chooses its own serial port"));
}

/// `maqet logs`: history and QEMU's log; `-f` follows both (inotify, StatusChanged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_show_history_and_the_qemu_log_and_follow_them() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("chatty")).await;
    let never = bus.maqet(&["logs", "chatty"]);
    assert!(never.status.success());
    assert!(
        common::stdout(&never).contains("chatty: added"),
        "{}",
        common::stdout(&never)
    );
    assert!(common::stderr(&never).contains("no QEMU log yet"));

    // Following from before the first start: the log appears with the first run.
    let first = common::ChildLines::spawn(bus.maqet_command(&["logs", "chatty", "-f"]));
    first.next_matching(&|l| l.contains("chatty: added"));
    vm.start().await.unwrap();
    wait_for_run(&first);
    drop(first);
    let out = bus.maqet(&["stop", "chatty", "--force"]);
    assert!(out.status.success());
    let out = bus.maqet(&["logs", "chatty"]);
    let text = common::stdout(&out);
    assert!(
        text.contains("created → starting (start requested)"),
        "{text}"
    );
    assert!(text.contains("stopping → stopped"), "{text}");
    assert!(text.contains("=== maqet: starting VM chatty"), "{text}");
    assert!(!text.contains('\x1b'), "no colour into a pipe");

    let json = bus.maqet(&["--json", "logs", "chatty", "-n", "0"]);
    let lines: Vec<serde_json::Value> = common::stdout(&json)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "history" && l["status"] == "running")
    );
    assert!(lines.iter().any(|l| {
        l["type"] == "log"
            && l["line"]
                .as_str()
                .unwrap()
                .starts_with("=== maqet: starting VM chatty")
    }));

    let follow = common::ChildLines::spawn(bus.maqet_command(&["logs", "chatty", "-f", "-n", "0"]));
    follow.next_matching(&|l| l.starts_with("=== maqet: starting VM chatty"));
    vm.start().await.unwrap();
    wait_for_run(&follow);
}

/// A `logs -f` sees a start: the run's header in the log (through inotify) and the
/// change to running (a signal), in either order.
fn wait_for_run(follow: &common::ChildLines) {
    let header = |l: &str| l.starts_with("=== maqet: starting VM chatty");
    let (mut header_seen, mut running_seen) = (false, false);
    while !(header_seen && running_seen) {
        let l = follow.next_matching(&|l| header(l) || l.contains("starting → running"));
        header_seen |= header(&l);
        running_seen |= !header(&l);
    }
}

#[test]
fn completions_and_man_page_come_from_the_command_definitions() {
    let bus_less = |args: &[&str]| {
        std::process::Command::new(common::maqet_bin())
            .args(args)
            .output()
            .unwrap()
    };
    // bash, zsh and fish get the dynamic script: it calls maqet back for every Tab
    // (tests/e2e_cli_polish.rs runs them); the other shells clap's static one.
    for shell in ["bash", "zsh", "fish"] {
        let out = bus_less(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = common::stdout(&out);
        assert!(
            script.contains("MAQET_COMPLETE") && script.contains(common::maqet_bin()),
            "{shell}: {script}"
        );
    }
    let out = bus_less(&["completions", "elvish"]);
    let script = common::stdout(&out);
    for sub in ["console", "logs", "snapshot", "setup"] {
        assert!(script.contains(sub), "elvish completion lacks {sub}");
    }
    let page = common::stdout(&bus_less(&["manpage"]));
    assert!(
        page.starts_with(".ie") && page.contains(".TH maqet 1"),
        "{page}"
    );
    for sub in ["maqet\\-logs", "maqet\\-console", "maqet\\-setup"] {
        assert!(page.contains(sub), "the man page lists {sub}");
    }
    assert!(page.contains("Exit codes"));
    let dir = tempfile::tempdir().unwrap();
    let out = bus_less(&["manpage", "--dir", dir.path().to_str().unwrap()]);
    assert!(out.status.success());
    let logs = std::fs::read_to_string(dir.path().join("maqet-logs.1")).unwrap();
    assert!(logs.contains("follow"));
}

/// A maqetd of another version, as far as `--version` can tell.
struct OldManager;

#[zbus::interface(name = "org.maqet.Maqet1.Manager")]
impl OldManager {
    #[zbus(property)]
    fn version(&self) -> String {
        "0.0.1-old".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_shows_both_sides_and_warns_when_they_differ() {
    let cli = env!("CARGO_PKG_VERSION");
    let bus = Bus::start();
    let out = bus.maqet(&["--version"]);
    assert!(out.status.success());
    assert_eq!(common::stdout(&out), format!("maqet {cli}\nmaqetd {cli}\n"));
    assert!(!common::stderr(&out).contains("warning"));

    let old = Bus::start_unactivated();
    let _service = zbus::connection::Builder::address(old.address.as_str())
        .serve_at("/org/maqet/Maqet1", OldManager)
        .name("org.maqet.Maqet1")
        .build()
        .await
        .unwrap();
    let out = old.maqet(&["--version"]);
    assert!(out.status.success());
    assert!(common::stdout(&out).contains("maqetd 0.0.1-old"));
    assert!(common::stderr(&out).contains("warning: maqetd is version 0.0.1-old"));
    let out = old.maqet(&["--json", "--version"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["cli"].as_str(), v["differ"].as_bool()),
        (Some(cli), Some(true))
    );

    let out = bus
        .maqet_command(&["--version"])
        .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the CLI's own version is always known"
    );
    assert!(common::stdout(&out).contains("maqetd: not reachable"));
}
