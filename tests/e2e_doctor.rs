//! `maqet doctor`: finds what is wrong and, with --fix, repairs what is safe.

mod common;

use common::{Bus, stdout, tiny_vm_yaml};

fn doctor(bus: &Bus, fix: bool) -> (Option<i32>, Vec<serde_json::Value>) {
    let mut args = vec!["--json", "doctor"];
    if fix {
        args.push("--fix");
    }
    let out = bus.maqet(&args);
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    (out.status.code(), rows)
}

fn row<'a>(
    rows: &'a [serde_json::Value],
    check: &str,
    status: &str,
) -> Option<&'a serde_json::Value> {
    rows.iter()
        .find(|r| r["check"] == check && r["status"] == status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_adopts_an_orphan_qemu_and_removes_stale_sockets() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("lost")).await;
    let id = vm.id().await.unwrap();

    // A stale socket directory of a VM that no longer exists.
    let run = bus.root().join("run/maqet/vms");
    let stale = run.join("00000000-0000-4000-8000-000000000000");
    std::fs::create_dir_all(&stale).unwrap();
    // A QEMU running VM "lost" that maqetd does not know about (as if started before a
    // database restore): its monitor where maqetd expects it.
    let dir = run.join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for d in [&bus.root().join("run/maqet"), &run, &dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let sock = dir.join("qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    use std::os::fd::AsRawFd;
    let fd = listener.as_raw_fd();
    let mut cmd = std::process::Command::new("qemu-system-x86_64");
    cmd.args([
        "-uuid",
        &id,
        "-name",
        "lost",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "64",
    ])
    .args(["-accel", common::accel()])
    .args([
        "-chardev",
        &format!("socket,id=m,fd={fd},server=on,wait=off"),
    ])
    .args(["-mon", "chardev=m,mode=control"])
    .env("MAQET_TEST_MARKER", bus.marker());
    // The listening socket must survive exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            libc::fcntl(fd, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let mut orphan = cmd.spawn().unwrap();
    drop(listener);

    let (code, rows) = doctor(&bus, false);
    assert_eq!(code, Some(1), "{rows:#?}");
    let found = row(&rows, "vm-state", "error").expect("orphan reported");
    assert!(
        found["message"]
            .as_str()
            .unwrap()
            .contains(&orphan.id().to_string())
    );
    assert!(row(&rows, "sockets", "warning").is_some(), "{rows:#?}");
    assert_eq!(
        vm.status().await.unwrap(),
        "created",
        "nothing changed without --fix"
    );

    let (code, rows) = doctor(&bus, true);
    assert_eq!(code, Some(0), "{rows:#?}");
    assert!(row(&rows, "vm-state", "fixed").is_some(), "{rows:#?}");
    assert!(row(&rows, "sockets", "fixed").is_some(), "{rows:#?}");
    assert!(!stale.exists());
    assert_eq!(vm.status().await.unwrap(), "running");
    assert_eq!(vm.pid().await.unwrap(), orphan.id());

    // Adopted means managed: maqet can stop it.
    vm.stop(true, 0).await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "stopped");
    let _ = orphan.wait();
    let (code, _) = doctor(&bus, false);
    assert_eq!(code, Some(0));
}

#[test]
fn doctor_reports_a_refused_database() {
    let bus = Bus::start();
    let db = bus.database();
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    std::fs::write(&db, b"definitely not sqlite").unwrap();
    let (code, rows) = doctor(&bus, false);
    assert_eq!(code, Some(1));
    let r = row(&rows, "database", "error").expect("database problem reported");
    assert!(r["message"].as_str().unwrap().contains("maqet.db"), "{r}");
    assert!(r["hint"].as_str().unwrap().contains("move it aside"), "{r}");
}

#[test]
fn doctor_without_a_bus_says_so() {
    let out = std::process::Command::new(common::maqet_bin())
        .arg("doctor")
        .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("bus") && text.contains("error"), "{text}");
}
