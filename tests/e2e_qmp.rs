//! End-to-end: QMP over D-Bus with real QEMU on a private bus. Passthrough and its
//! safety tiers, QMP events as signals, keys and text, screendumps, hot-plug, and the
//! CLI commands on top.

mod common;

use std::collections::HashMap;
use std::io::Read;

use common::{
    Bus, ChildLines, StatusWatch, TIMEOUT, accel, error_name, stderr, stdout, tiny_vm_yaml,
};
use futures_util::StreamExt;
use maqet::client::{QmpProxy, VmProxy, qmp_proxy};
use serde_json::Value;
use zbus::{Connection, Variant};

const ERR: &str = "org.maqet.Maqet1.Error.";

/// A q35 VM with a display and a PCIe root port whose slot QEMU can empty on its own:
/// with ACPI PCI hot-plug off, a slot the guest never powered on unplugs without it.
fn console_vm_yaml(name: &str) -> String {
    format!(
        "name: {name}\nbinary: qemu-system-x86_64\ndisplay: none\nvga: std\nmemory: 128\narguments:\n  - nodefaults\n  - machine: q35\n  - accel: {}\n  - global: ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off\n  - device: {{pcie-root-port: null, id: rp1, bus: pcie.0, chassis: 1}}\n",
        accel()
    )
}

async fn running(
    bus: &Bus,
    conn: &Connection,
    yaml: &str,
) -> (VmProxy<'static>, QmpProxy<'static>) {
    let vm = bus.add(conn, "", yaml).await;
    vm.start().await.unwrap();
    let qmp = qmp_proxy(conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    (vm, qmp)
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn assert_err<T: std::fmt::Debug>(r: Result<T, maqet::error::MaqetError>, kind: &str) -> String {
    let e = r.expect_err(&format!("expected {kind}"));
    assert_eq!(error_name(&e), format!("{ERR}{kind}"), "{e}");
    e.to_string()
}

/// Device ids under `/machine/peripheral`.
async fn peripherals(qmp: &QmpProxy<'_>) -> Vec<String> {
    let list = qmp
        .execute("qom-list", r#"{"path": "/machine/peripheral"}"#, false)
        .await
        .unwrap();
    json(&list)
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"].as_str().unwrap_or("").starts_with("child<"))
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

/// (width, height) from a PNG's IHDR, after checking the signature.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 24, "{} bytes is no PNG", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

/// Rows of the audit table for one method: (action, decision, outcome, arguments).
/// The audit log through the API (which first writes out what is queued).
async fn audit_rows(bus: &Bus, method: &str) -> Vec<(String, String, String, String)> {
    let conn = bus.conn().await;
    bus.manager(&conn)
        .await
        .audit("", 0, 0)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.6 == method)
        .map(|r| (r.4, r.8, r.9, r.7))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_tiers_events_keys_and_quit() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (vm, qmp) = running(&bus, &conn, &tiny_vm_yaml("web")).await;

    // Passthrough: QEMU's `return`, as JSON.
    let status = json(&qmp.execute("query-status", "", false).await.unwrap());
    assert_eq!(status["status"], "running");
    assert_eq!(status["running"], true);
    let machine = json(
        &qmp.execute("qom-list", r#"{"path": "/machine"}"#, false)
            .await
            .unwrap(),
    );
    assert!(
        machine.as_array().is_some_and(|a| !a.is_empty()),
        "{machine}"
    );

    // QEMU's errors carry its class and description.
    let m = assert_err(
        qmp.execute("qom-list", r#"{"path": "/nope"}"#, false).await,
        "Qmp",
    );
    assert!(
        m.starts_with("DeviceNotFound: ") && m.contains("/nope"),
        "{m}"
    );
    let m = assert_err(qmp.execute("query-no-such-thing", "", false).await, "Qmp");
    assert!(m.starts_with("CommandNotFound: "), "{m}");

    // What maqet depends on is refused, with a reason.
    let m = assert_err(
        qmp.execute("qmp_capabilities", "", false).await,
        "InvalidArgument",
    );
    assert!(m.contains("refuses 'qmp_capabilities'"), "{m}");
    let m = assert_err(
        qmp.execute("chardev-remove", r#"{"id": "maqet-qmp"}"#, false)
            .await,
        "InvalidArgument",
    );
    assert!(m.contains("own monitor"), "{m}");

    // Dangerous commands need the flag; the refusal names it and is audited as a denial.
    let hmp = r#"{"command-line": "info version"}"#;
    let m = assert_err(
        qmp.execute("human-monitor-command", hmp, false).await,
        "AccessDenied",
    );
    assert!(m.contains("allow_dangerous=true"), "{m}");
    // The flag alone is not enough: the shipped policy asks polkit (see e2e_access);
    // this user's policy allows dangerous commands.
    bus.write_policy("actions:\n  org.maqet.qmp.dangerous: yes\n");
    let version = qmp
        .execute("human-monitor-command", hmp, true)
        .await
        .unwrap();
    // It ran in this VM's QEMU: HMP says what QMP's query-version says.
    let expected =
        common::hmp_info_version(&qmp.execute("query-version", "", false).await.unwrap());
    assert_eq!(json(&version).as_str().unwrap().trim_end(), expected);
    let hmp_rows: Vec<_> = audit_rows(&bus, "Execute")
        .await
        .into_iter()
        .filter(|r| r.3.starts_with("human-monitor-command"))
        .collect();
    assert_eq!(hmp_rows.len(), 2, "{hmp_rows:?}");
    assert_eq!(hmp_rows[0].0, "org.maqet.qmp.dangerous");
    assert_eq!(
        (hmp_rows[0].1.as_str(), hmp_rows[0].2.as_str()),
        ("deny", "AccessDenied")
    );
    assert_eq!(
        (hmp_rows[1].1.as_str(), hmp_rows[1].2.as_str()),
        ("allow", "ok")
    );
    assert_eq!(
        hmp_rows[1].3, "human-monitor-command command-line",
        "values stay out"
    );
    // Reads are not audited.
    assert!(
        audit_rows(&bus, "Execute")
            .await
            .iter()
            .all(|r| !r.3.starts_with("query-status"))
    );

    // Malformed requests never reach QEMU.
    let m = assert_err(
        qmp.execute("qom-list", "{\"path\": }", false).await,
        "InvalidArgument",
    );
    assert!(
        m.contains("not valid JSON") && m.contains("line 1 column"),
        "{m}"
    );
    let m = assert_err(
        qmp.execute("qom-list", "[\"/machine\"]", false).await,
        "InvalidArgument",
    );
    assert!(m.contains("must be a JSON object"), "{m}");
    let m = assert_err(
        qmp.execute("Query-Status", "", false).await,
        "InvalidArgument",
    );
    assert!(m.contains("not a QMP command name"), "{m}");

    // QMP events reach another client as signals, with QEMU's timestamps.
    let other = bus.conn().await;
    let watcher = qmp_proxy(&other, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    let mut events = watcher.receive_event().await.unwrap();
    vm.pause().await.unwrap();
    vm.resume().await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let sig = tokio::time::timeout(TIMEOUT, events.next())
            .await
            .expect("QMP Event signal")
            .unwrap();
        let args = sig.args().unwrap();
        // Other events (a guest's RTC_CHANGE, say) may come in between.
        if ["STOP", "RESUME"].contains(args.name()) {
            seen.push((
                args.name().to_string(),
                *args.timestamp(),
                json(args.data_json()),
            ));
        }
    }
    assert_eq!(seen[0].0, "STOP");
    assert_eq!(seen[1].0, "RESUME");
    let now = maqet::time::now_us();
    for (name, ts, data) in &seen {
        assert!(
            ts.abs_diff(now) < 600_000_000,
            "{name} timestamp {ts} vs now {now}"
        );
        assert!(data.is_object(), "{name}: {data}");
    }
    assert!(seen[0].1 <= seen[1].1);

    // Keys and text: QEMU accepts them; bad ones are refused before anything is sent.
    vm.send_keys(&["ctrl-alt-delete", "ret"], 0).await.unwrap();
    vm.send_keys(&["shift-a"], 10).await.unwrap();
    let m = assert_err(
        vm.send_keys(&["ret", "ctrl-alt-deleet"], 0).await,
        "InvalidArgument",
    );
    assert!(
        m.contains("'deleet'") && m.contains("did you mean delete"),
        "{m}"
    );
    vm.type_text("root\n\tls -l | grep ~\n").await.unwrap();
    let m = assert_err(vm.type_text("café").await, "InvalidArgument");
    assert!(m.contains("'é'") && m.contains("index 3"), "{m}");
    let keys_rows = audit_rows(&bus, "TypeText").await;
    assert!(keys_rows.iter().all(|r| r.0 == "org.maqet.vm.console"));
    assert!(
        keys_rows.iter().all(|r| !r.3.contains("root")),
        "{keys_rows:?}"
    );

    // `quit` through Execute is a stop, not a crash.
    let mut watch = StatusWatch::new(&vm).await;
    assert_eq!(qmp.execute("quit", "", false).await.unwrap(), "{}");
    let (_, previous, reason) = watch.until("stopped").await;
    assert_eq!(previous, "running");
    assert!(reason.contains("quit"), "{reason}");
    assert_eq!(vm.status().await.unwrap(), "stopped");

    // Nothing of this works on a VM that is not running.
    assert_err(qmp.execute("query-status", "", false).await, "InvalidState");
    assert_err(vm.send_keys(&["ret"], 0).await, "InvalidState");
    assert_err(vm.type_text("a").await, "InvalidState");
    assert_err(vm.screendump().await, "InvalidState");
    assert_err(
        qmp.device_add("virtio-rng-pci", "rng1", HashMap::new())
            .await,
        "InvalidState",
    );
    assert_err(qmp.device_del("rng1").await, "InvalidState");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screendump_png_and_hot_plug() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (vm, qmp) = running(&bus, &conn, &console_vm_yaml("desk")).await;

    // The ObjectManager lists the QMP interface with the VM's.
    let objects = zbus::fdo::ObjectManagerProxy::builder(&conn)
        .destination("org.maqet.Maqet1")
        .path("/org/maqet/Maqet1")
        .build()
        .await
        .unwrap()
        .get_managed_objects()
        .await
        .unwrap();
    let ifaces: Vec<String> = objects[vm.inner().path()]
        .keys()
        .map(|i| i.to_string())
        .collect();
    assert!(
        ifaces.contains(&"org.maqet.Maqet1.QMP".to_string()),
        "{ifaces:?}"
    );

    let fd = vm.screendump().await.unwrap();
    let mut png = Vec::new();
    std::fs::File::from(std::os::fd::OwnedFd::from(fd))
        .read_to_end(&mut png)
        .unwrap();
    let (w, h) = png_size(&png);
    assert!(w > 0 && h > 0, "{w}x{h}");
    // No file is left behind in the VM's runtime directory.
    let id = vm.id().await.unwrap();
    let dir = bus.root().join("run/maqet/vms").join(&id);
    let mut left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["console.sock", "qmp.sock"], "in {}", dir.display());

    // Hot-plug into the root port, then unplug: QEMU empties a slot the guest never
    // powered on without asking the guest, so DEVICE_DELETED comes and DeviceDel returns.
    assert!(!peripherals(&qmp).await.contains(&"rng1".into()));
    let props = HashMap::from([("bus", Variant::from("rp1"))]);
    qmp.device_add("virtio-rng-pci", "rng1", props)
        .await
        .unwrap();
    assert!(peripherals(&qmp).await.contains(&"rng1".into()));
    qmp.device_del("rng1").await.unwrap();
    assert!(!peripherals(&qmp).await.contains(&"rng1".into()));

    // QEMU's own refusal of a property comes back as a QMP error.
    let props = HashMap::from([("bus", Variant::from("nope"))]);
    let m = assert_err(qmp.device_add("virtio-rng-pci", "rng2", props).await, "Qmp");
    assert!(m.contains("nope"), "{m}");
    // Host-backed devices are dangerous, and DeviceAdd has no flag to allow them.
    let m = assert_err(
        qmp.device_add("usb-host", "u1", HashMap::new()).await,
        "AccessDenied",
    );
    assert!(m.contains("'usb-host'") && m.contains("Execute"), "{m}");
    let props = HashMap::from([("bus", Variant::from(vec!["rp1"]))]);
    let m = assert_err(
        qmp.device_add("virtio-rng-pci", "rng3", props).await,
        "InvalidArgument",
    );
    assert!(m.contains("'bus'"), "{m}");
    let m = assert_err(qmp.device_del("no-such").await, "Qmp");
    assert!(m.contains("no-such"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_display_and_a_pending_unplug_say_what_is_going_on() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    // i440fx: PCI hot-unplug goes through ACPI, which needs a guest OS to answer.
    let (vm, qmp) = running(&bus, &conn, &tiny_vm_yaml("plain")).await;

    let m = assert_err(vm.screendump().await, "Qmp");
    assert!(m.contains("no console") && m.contains("vga: std"), "{m}");

    qmp.device_add("virtio-rng-pci", "rng1", HashMap::new())
        .await
        .unwrap();
    let mut events = qmp.receive_event().await.unwrap();
    let started = std::time::Instant::now();
    let m = assert_err(qmp.device_del("rng1").await, "Timeout");
    assert!(started.elapsed() >= maqet::vm::DEVICE_DEL_WAIT);
    assert!(m.contains("pending") && m.contains("DEVICE_DELETED"), "{m}");
    assert!(peripherals(&qmp).await.contains(&"rng1".into()));
    // No DEVICE_DELETED was announced for it.
    while let Ok(Some(sig)) = tokio::time::timeout(std::time::Duration::ZERO, events.next()).await {
        assert_ne!(sig.args().unwrap().name(), &"DEVICE_DELETED");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_round_trips() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (vm, _) = running(&bus, &conn, &console_vm_yaml("web")).await;
    let run = |args: &[&str]| {
        let out = bus.maqet(args);
        assert!(out.status.success(), "maqet {args:?}: {}", stderr(&out));
        stdout(&out)
    };

    let status = json(&run(&["qmp", "web", "query-status"]));
    assert_eq!(status["status"], "running");
    let out = bus.maqet(&["qmp", "web", "qmp_capabilities"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("refuses"), "{}", stderr(&out));
    let hmp = r#"{"command-line": "info version"}"#;
    let out = bus.maqet(&["qmp", "web", "human-monitor-command", hmp]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("allow_dangerous"), "{}", stderr(&out));
    bus.write_policy("actions:\n  org.maqet.qmp.dangerous: yes\n");
    let version = json(&run(&[
        "qmp",
        "web",
        "human-monitor-command",
        hmp,
        "--allow-dangerous",
    ]));
    let expected = common::hmp_info_version(&run(&["qmp", "web", "query-version"]));
    assert_eq!(version.as_str().unwrap().trim_end(), expected);
    let out = bus.maqet(&["--json", "qmp", "web", "qom-list", r#"{"path": "/nope"}"#]);
    assert_eq!(out.status.code(), Some(1));
    let err = json(&stdout(&out));
    assert_eq!(err["error"]["kind"], "Qmp");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("DeviceNotFound")
    );

    // busctl speaks to it too.
    let path = vm.inner().path().to_string();
    let out = bus.busctl(&[
        "call",
        "org.maqet.Maqet1",
        &path,
        "org.maqet.Maqet1.QMP",
        "Execute",
        "ssb",
        "query-status",
        "",
        "false",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(r#"\"status\":\"running\""#),
        "{}",
        stdout(&out)
    );

    assert!(
        run(&["keys", "web", "ctrl-alt-delete", "--hold-ms", "50"]).contains("1 key combination")
    );
    let out = bus.maqet(&["keys", "web", "ctrl-alt-deleet"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("deleet"), "{}", stderr(&out));
    assert!(run(&["type", "web", r"root\n"]).contains("typed 5 characters"));

    let shot = bus.root().join("shot.png");
    let said = run(&["screendump", "web", shot.to_str().unwrap()]);
    assert!(said.contains("shot.png"), "{said}");
    let (w, h) = png_size(&std::fs::read(&shot).unwrap());
    assert!(w > 0 && h > 0);

    let peripheral = |bus: &Bus| {
        let out = bus.maqet(&[
            "qmp",
            "web",
            "qom-list",
            r#"{"path": "/machine/peripheral"}"#,
        ]);
        stdout(&out)
    };
    run(&[
        "device",
        "add",
        "web",
        "virtio-rng-pci",
        "rng1",
        "--prop",
        "bus=rp1",
    ]);
    assert!(peripheral(&bus).contains("\"rng1\""));
    run(&["device", "del", "web", "rng1"]);
    assert!(!peripheral(&bus).contains("\"rng1\""));

    // `maqet events` shows QMP events with their name and data.
    let events = ChildLines::spawn(bus.maqet_command(&["events", "web"]));
    // It says so on stderr once its match rule is in place.
    events.next_matching(&|l| l.contains("following maqet events"));
    run(&["pause", "web"]);
    let stop = events.next_matching(&|l| l.contains("QMP STOP"));
    assert!(stop.contains("web: QMP STOP {}"), "{stop}");
    run(&["resume", "web"]);
    events.next_matching(&|l| l.contains("QMP RESUME"));
}
