//! End-to-end: what a user types. The `maqet` CLI, `busctl` and `gdbus` against the
//! D-Bus-activated service, with real QEMU.

mod common;

use common::{Bus, ChildLines, accel, stderr, stdout};

fn write_pair(bus: &Bus) -> (String, String) {
    let dir = bus.root().join("vms");
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.yaml");
    let extra = dir.join("extra.yaml");
    std::fs::write(
        &base,
        format!(
            "binary: qemu-system-x86_64\ncpu: 1\ndisplay: none\narguments: [{{machine: q35}}, {{m: 256M}}, nodefaults, {{accel: {}}}]\n",
            accel()
        ),
    )
    .unwrap();
    std::fs::write(
        &extra,
        "arguments: [{m: 512M}, {device: {virtio-rng-pci: null}}]\n",
    )
    .unwrap();
    (
        base.to_string_lossy().into_owned(),
        extra.to_string_lossy().into_owned(),
    )
}

#[test]
fn cli_drives_a_vm_from_merged_files() {
    let bus = Bus::start();
    let (base, extra) = write_pair(&bus);
    let out = bus.maqet(&["add", "--name", "web", "-c", &base, "-c", &extra]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("added web"));

    let out = bus.maqet(&["start", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("web: running (pid "),
        "{}",
        stdout(&out)
    );

    // The merged command line: one -m 512M, the rng device, -smp 1, -display none.
    let out = bus.maqet(&["--json", "status", "web"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = v["pid"].as_u64().unwrap();
    let cmdline = String::from_utf8(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .unwrap()
        .replace('\0', " ");
    assert_eq!(cmdline.matches(" -m ").count(), 1, "{cmdline}");
    assert!(cmdline.contains(" -m 512M"), "{cmdline}");
    assert!(cmdline.contains(" -device virtio-rng-pci"), "{cmdline}");
    assert!(cmdline.contains(" -smp 1"), "{cmdline}");
    assert!(cmdline.contains(" -display none"), "{cmdline}");

    let out = bus.maqet(&["ls"]);
    let table = stdout(&out);
    let header = table.lines().next().unwrap();
    for col in ["NAME", "STATUS", "PID", "UPTIME"] {
        assert!(header.contains(col), "{table}");
    }
    let row = table.lines().find(|l| l.contains("web")).unwrap();
    assert!(
        row.contains("running") && row.contains(&pid.to_string()),
        "{table}"
    );

    let out = bus.maqet(&["--json", "ls"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "web");
    assert_eq!(list[0]["status"], "running");

    assert!(bus.maqet(&["pause", "web"]).status.success());
    assert!(stdout(&bus.maqet(&["status", "web"])).contains("paused"));
    assert!(bus.maqet(&["resume", "web"]).status.success());

    let out = bus.maqet(&["stop", "web", "--timeout", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("web: stopped"), "{}", stdout(&out));

    let out = bus.maqet(&["rm", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&bus.maqet(&["ls"])).contains("no VMs defined"));
}

#[test]
fn cli_errors_have_messages_and_distinct_exit_codes() {
    let bus = Bus::start();
    let out = bus.maqet(&["start", "nope"]);
    assert_eq!(out.status.code(), Some(3), "not found");
    assert!(
        stderr(&out).contains("no VM is named 'nope'"),
        "{}",
        stderr(&out)
    );

    let bad = bus.root().join("bad.yaml");
    std::fs::write(&bad, "memroy: 64\n").unwrap();
    let out = bus.maqet(&["add", "-c", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "invalid input");
    let msg = stderr(&out);
    assert!(
        msg.contains("bad.yaml:1:1") && msg.contains("memory"),
        "{msg}"
    );

    let good = bus.root().join("good.yaml");
    std::fs::write(&good, common::tiny_vm_yaml("one")).unwrap();
    assert!(
        bus.maqet(&["add", "-c", good.to_str().unwrap()])
            .status
            .success()
    );
    let out = bus.maqet(&["resume", "one"]);
    assert_eq!(out.status.code(), Some(5), "invalid state");

    let out = bus.maqet(&["--json", "resume", "one"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "InvalidState");

    // No service reachable.
    let out = std::process::Command::new(common::maqet_bin())
        .arg("ls")
        .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "unreachable");
    assert!(
        stderr(&out).contains("cannot reach maqetd"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn busctl_is_a_first_class_client() {
    let bus = Bus::start();
    let yaml = common::tiny_vm_yaml("bc");
    let out = bus.busctl(&[
        "call",
        "org.maqet.Maqet1",
        "/org/maqet/Maqet1",
        "org.maqet.Maqet1.Manager",
        "AddVM",
        "ss",
        "",
        &yaml,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reply = stdout(&out);
    // o "/org/maqet/Maqet1/vm/<id>"
    let path = reply
        .trim()
        .trim_start_matches("o ")
        .trim_matches('"')
        .to_string();
    assert!(path.starts_with("/org/maqet/Maqet1/vm/"), "{reply}");

    let out = bus.busctl(&["introspect", "org.maqet.Maqet1", &path]);
    let text = stdout(&out);
    for member in [
        ".Start",
        ".Stop",
        ".Restart",
        ".Reset",
        ".Pause",
        ".Resume",
        ".Apply",
        ".Wait",
        ".StatusChanged",
        ".Status",
        ".Pid",
        ".ExitStatus",
    ] {
        assert!(text.contains(member), "{member} missing:\n{text}");
    }

    let call = |method: &str, sig: &[&str]| {
        let mut args = vec![
            "call",
            "org.maqet.Maqet1",
            path.as_str(),
            "org.maqet.Maqet1.VM",
            method,
        ];
        args.extend_from_slice(sig);
        bus.busctl(&args)
    };
    assert!(call("Start", &[]).status.success());
    let out = bus.busctl(&[
        "get-property",
        "org.maqet.Maqet1",
        &path,
        "org.maqet.Maqet1.VM",
        "Status",
    ]);
    assert_eq!(stdout(&out).trim(), "s \"running\"");
    let out = call("Start", &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));

    let out = bus.busctl(&[
        "call",
        "org.maqet.Maqet1",
        "/org/maqet/Maqet1",
        "org.maqet.Maqet1.Manager",
        "ListVMs",
    ]);
    let listing = stdout(&out);
    assert!(listing.starts_with("a(ssos) 1 "), "{listing}");
    assert!(
        listing.contains("\"bc\"") && listing.contains("\"running\""),
        "{listing}"
    );

    assert!(call("Stop", &["bu", "true", "0"]).status.success());
    let out = bus.busctl(&[
        "get-property",
        "org.maqet.Maqet1",
        &path,
        "org.maqet.Maqet1.VM",
        "Status",
    ]);
    assert_eq!(stdout(&out).trim(), "s \"stopped\"");

    for prop in ["Version", "KvmAvailable", "PolkitAvailable", "QemuBinaries"] {
        let out = bus.busctl(&[
            "get-property",
            "org.maqet.Maqet1",
            "/org/maqet/Maqet1",
            "org.maqet.Maqet1.Manager",
            prop,
        ]);
        assert!(out.status.success(), "{prop}: {}", stderr(&out));
    }
    let out = bus.busctl(&[
        "get-property",
        "org.maqet.Maqet1",
        "/org/maqet/Maqet1",
        "org.maqet.Maqet1.Manager",
        "QemuBinaries",
    ]);
    assert!(
        stdout(&out).contains("qemu-system-x86_64"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn gdbus_monitor_sees_status_and_property_changes() {
    let bus = Bus::start();
    let good = bus.root().join("m.yaml");
    std::fs::write(&good, common::tiny_vm_yaml("mon")).unwrap();
    assert!(
        bus.maqet(&["add", "-c", good.to_str().unwrap()])
            .status
            .success()
    );

    let mut gdbus = bus.gdbus();
    gdbus.args([
        "monitor",
        "--address",
        &bus.address,
        "--dest",
        "org.maqet.Maqet1",
    ]);
    let monitor = ChildLines::spawn(gdbus);
    let next_matching = |pred: &dyn Fn(&str) -> bool| monitor.next_matching(pred);
    // gdbus says which unique name owns the service once it is watching it.
    next_matching(&|l| l.contains("is owned by"));

    assert!(bus.maqet(&["start", "mon"]).status.success());
    let l = next_matching(&|l| {
        l.contains("org.maqet.Maqet1.VM.StatusChanged") && l.contains("'running'")
    });
    assert!(l.contains("('running', 'starting', 'started')"), "{l}");
    let l = next_matching(&|l| l.contains("org.freedesktop.DBus.Properties.PropertiesChanged"));
    assert!(l.contains("'Status': <'running'>"), "{l}");
    assert!(bus.maqet(&["stop", "--force", "mon"]).status.success());
    next_matching(&|l| l.contains("StatusChanged") && l.contains("'stopped'"));
}

#[test]
fn cli_events_apply_wait_inspect() {
    let bus = Bus::start();
    let f = bus.root().join("ev.yaml");
    std::fs::write(&f, common::tiny_vm_yaml("ev")).unwrap();
    assert!(
        bus.maqet(&["add", "-c", f.to_str().unwrap()])
            .status
            .success()
    );

    // `maqet events` says on stderr when it is subscribed; act only after that.
    let events = ChildLines::spawn(bus.maqet_command(&["events"]));
    events.next_matching(&|l| l.contains("following maqet events"));

    assert!(bus.maqet(&["start", "ev"]).status.success());
    let first = events.next_matching(&|l| l.contains("ev: "));
    assert!(
        first.ends_with("ev: created → starting (start requested)"),
        "{first}"
    );
    let second = events.next_matching(&|l| l.contains("ev: "));
    assert!(second.contains("ev: starting → running"), "{second}");

    // wait: already true, and a timeout with exit code 9.
    let out = bus.maqet(&["wait", "ev", "status=running", "--timeout", "5"]);
    assert_eq!(stdout(&out).trim(), "running");
    let out = bus.maqet(&["wait", "ev", "status=paused", "--timeout", "0"]);
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));

    // apply while running: the CLI says what needs a restart.
    let bigger = bus.root().join("ev2.yaml");
    std::fs::write(
        &bigger,
        common::tiny_vm_yaml("ev").replace("memory: 64", "memory: 80"),
    )
    .unwrap();
    let out = bus.maqet(&["apply", "ev", bigger.to_str().unwrap()]);
    assert!(
        stdout(&out).contains("restart it for these changes to take effect: memory"),
        "{}",
        stdout(&out)
    );
    let out = bus.maqet(&["inspect", "ev", "--config"]);
    assert!(stdout(&out).contains("memory: 80"), "{}", stdout(&out));
    let out = bus.maqet(&["--json", "inspect", "ev"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "running");
    assert!(v["config"].as_str().unwrap().contains("memory: 80"));

    assert!(bus.maqet(&["stop", "--force", "ev"]).status.success());
    events.next_matching(&|l| l.contains("stopping → stopped"));
}
