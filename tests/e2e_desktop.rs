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
    assert!(n.body.contains("SIGKILL"), "body carries the reason: {n:?}");
    assert!(reason.contains("SIGKILL"));
    assert_eq!(n.action_keys(), ["start", "log"]);
    assert_eq!(n.app_name, "maqet");
    assert_eq!(n.app_icon, "org.maqet.Maqet");
    assert_eq!(
        n.hint_str("desktop-entry").as_deref(),
        Some("org.maqet.Maqet")
    );

    // "Show log": the opener gets the VM's QEMU log.
    server.click(n.id, "log").await;
    let got = opened.recv_timeout(TIMEOUT).expect("the log opener ran");
    assert!(got.ends_with(&format!("logs/{id}.log")), "{got}");

    // "Start again": the VM runs again, and the audit names the server as the caller.
    server.click(n.id, "start").await;
    watch.until("running").await;
    server.dismiss(n.id).await;
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

    // A stop the user asked for is not news; the next notification is the failed start
    // below, so none came in between (the notifier keeps the core's order).
    let out = bus.maqet(&["stop", "crashy", "--force"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let bad = format!("{}args: [-no-such-option]\n", tiny_vm_yaml("broken"));
    let broken = bus.add(&conn, "", &bad).await;
    assert!(broken.start().await.is_err());
    let n = server.next().await;
    assert_eq!(n.summary, "VM 'broken' failed to start", "{n:?}");
    assert!(n.body.contains("no-such-option"), "{n:?}");
    assert_eq!(n.action_keys(), ["log"]);

    // A guest that powers itself off is news, without buttons.
    let img = guest::write_image(bus.root(), Behaviour::PowerOffAtOnce);
    let off = bus
        .add(&conn, "", &guest::vm_yaml("lights-out", &img))
        .await;
    let mut off_watch = StatusWatch::new(&off).await;
    off.start().await.unwrap();
    off_watch.until("stopped").await;
    let n = server.next().await;
    assert_eq!(n.summary, "VM 'lights-out' powered off", "{n:?}");
    assert!(n.actions.is_empty());
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
