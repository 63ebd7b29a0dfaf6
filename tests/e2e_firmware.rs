//! `firmware: uefi`: the real Linux test guest boots through OVMF found by QEMU's firmware
//! descriptors (its kernel as an EFI stub), with the code read-only and a per-VM variable
//! store made on first start and deleted with the VM's storage; bad firmware choices are
//! refused with what to do.

mod common;

use common::linux_guest::{self, Setup};
use common::{Bus, Reasons, StatusWatch, error_name, tiny_vm_yaml};
use futures_util::StreamExt;

/// UEFI needs the descriptors and images of the `ovmf` package (scripts/setup-deps).
fn have_ovmf() -> bool {
    let found = std::fs::read_dir("/usr/share/qemu/firmware").is_ok_and(|d| d.count() > 0);
    if !found {
        assert!(
            std::env::var("MAQET_TEST_REQUIRE_ALL").map_or(true, |v| v != "1"),
            "no UEFI firmware descriptors in /usr/share/qemu/firmware: install ovmf (MAQET_TEST_REQUIRE_ALL=1)"
        );
        eprintln!("SKIPPED: no UEFI firmware (install ovmf)");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_guest_boots_through_uefi_with_its_own_variable_store() {
    if !have_ovmf() {
        return;
    }
    let Some(image) = linux_guest::image() else {
        return;
    };
    let bus = Bus::start();
    let conn = bus.conn().await;
    let setup = Setup {
        keys: "firmware: uefi\n",
        ..Setup::default()
    };
    // -nodefaults: no NIC, so OVMF does not try network boot first.
    let (vm, serial) = linux_guest::boot(&bus, &conn, "efi", image, &setup).await;
    let log = String::from_utf8_lossy(&serial.log).into_owned();
    assert!(
        log.contains("efi: EFI v") || log.contains("EFI stub"),
        "the kernel did not come up through UEFI:\n{log}"
    );
    let id = vm.id().await.unwrap();
    let vars = bus.root().join(format!("data/maqet/vms/{id}/uefi-vars.fd"));
    let template = std::fs::metadata("/usr/share/OVMF/OVMF_VARS_4M.fd")
        .or_else(|_| std::fs::metadata("/usr/share/OVMF/OVMF_VARS.fd"))
        .unwrap();
    let copy = std::fs::metadata(&vars).unwrap();
    assert_eq!(copy.len(), template.len());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(copy.permissions().mode() & 0o777, 0o600);

    // QEMU got fds, not names: the firmware is in the log as fds, and as pflash drives.
    let qemu_log =
        std::fs::read_to_string(bus.root().join(format!("state/maqet/logs/{id}.log"))).unwrap();
    assert!(
        qemu_log.contains("if=pflash,unit=0,format=raw,readonly=on,file=/dev/fdset/"),
        "{qemu_log}"
    );
    assert!(
        qemu_log.contains("if=pflash,unit=1,format=raw,file=/dev/fdset/"),
        "{qemu_log}"
    );
    assert!(
        qemu_log.contains(&format!("{} (read-write)", vars.display())),
        "{qemu_log}"
    );
    assert!(!qemu_log.contains("file=/usr/share/OVMF"), "{qemu_log}");
    drop(serial);

    // Forced: removal kills the running guest first.
    bus.manager(&conn)
        .await
        .remove_vm("efi", true, true)
        .await
        .unwrap();
    assert!(
        !vars.exists(),
        "the variable store is deleted with the storage"
    );
    assert!(!vars.parent().unwrap().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_firmware_choices_are_refused() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;

    let e = manager
        .add_vm("x", &format!("{}firmware: coreboot\n", tiny_vm_yaml("x")))
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.InvalidConfig");
    let msg = e.to_string();
    assert!(
        msg.contains("unknown firmware `coreboot`") && msg.contains("uefi-secure"),
        "{msg}"
    );
    let e = manager
        .add_vm(
            "x",
            &format!(
                "{}  - bios: /usr/share/seabios/bios.bin\nfirmware: uefi\n",
                tiny_vm_yaml("x")
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.InvalidConfig");
    assert!(e.to_string().contains("`-bios` is already set"), "{e}");
    assert!(manager.list_vms().await.unwrap().is_empty());

    if !have_ovmf() {
        return;
    }
    // Firmware from /usr may be attached read-only by hand, never writable.
    let code = "/usr/share/OVMF/OVMF_CODE_4M.fd";
    let pflash = |ro: &str| {
        format!(
            "{}  - drive: {{if: pflash, format: raw, {ro}file: {code}}}\n",
            tiny_vm_yaml("p")
        )
    };
    let e = manager.add_vm("p", &pflash("")).await.unwrap_err();
    // A dangerous location is a storage refusal (docs/dbus-api.md).
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.Storage");
    assert!(e.to_string().contains("system directory /usr"), "{e}");
    manager
        .add_vm("p", &pflash("readonly: 'on', "))
        .await
        .unwrap();

    // Secure Boot needs SMM, which the default i440fx machine lacks: the start says so
    // and leaves no variable store behind.
    let vm = bus
        .add(
            &conn,
            "sb",
            &format!("{}firmware: uefi-secure\n", tiny_vm_yaml("sb")),
        )
        .await;
    let e = vm.start().await.unwrap_err();
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.Storage", "{e}");
    assert!(e.to_string().contains("machine: q35"), "{e}");
    let id = vm.id().await.unwrap();
    assert!(!bus.root().join(format!("data/maqet/vms/{id}")).exists());
}

/// `tpm: true`: maqetd starts an swtpm for the VM and QEMU reports the TPM; its state is
/// in the VM's data directory and goes with its storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_tpm_true_has_an_emulated_tpm() {
    if !have_swtpm() {
        return;
    }
    let bus = Bus::start();
    let conn = bus.conn().await;
    let e = bus
        .manager(&conn)
        .await
        .add_vm("t", &format!("{}tpm: maybe\n", tiny_vm_yaml("t")))
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.InvalidConfig");

    let vm = bus
        .add(&conn, "tpm", &format!("{}tpm: true\n", tiny_vm_yaml("tpm")))
        .await;
    vm.start().await.unwrap();
    let qmp = maqet::client::qmp_proxy(&conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    let tpms: serde_json::Value =
        serde_json::from_str(&qmp.execute("query-tpm", "", false).await.unwrap()).unwrap();
    assert_eq!(tpms[0]["model"], "tpm-tis", "{tpms}");
    assert_eq!(tpms[0]["options"]["type"], "emulator", "{tpms}");
    let id = vm.id().await.unwrap();
    let state = bus.root().join(format!("data/maqet/vms/{id}/tpm"));
    assert!(state.is_dir());
    bus.manager(&conn)
        .await
        .remove_vm("tpm", true, true)
        .await
        .unwrap();
    assert!(!state.exists(), "the TPM state is deleted with the storage");
}

fn have_swtpm() -> bool {
    let found = std::process::Command::new("swtpm")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        assert!(
            std::env::var("MAQET_TEST_REQUIRE_ALL").map_or(true, |v| v != "1"),
            "swtpm is missing (MAQET_TEST_REQUIRE_ALL=1): install swtpm"
        );
        eprintln!("SKIPPED: no swtpm");
    }
    found
}

/// The swtpm maqetd recorded for the VM: (pid, start time).
fn recorded_swtpm(bus: &Bus, id: &str) -> Option<(u32, u64)> {
    use rusqlite::OptionalExtension;
    rusqlite::Connection::open(bus.database())
        .unwrap()
        .query_row(
            "SELECT pid, pid_start_time FROM tpm_processes WHERE vm_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)),
        )
        .optional()
        .unwrap()
}

fn signal(pid: u32, sig: i32) {
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill {pid}");
}

/// SIGKILLs maqetd and waits until the bus saw its name go.
async fn kill_maqetd(bus: &Bus, conn: &zbus::Connection) {
    let daemons = bus.marked_processes("maqetd");
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    let mut gone = zbus::fdo::DBusProxy::new(conn)
        .await
        .unwrap()
        .receive_name_owner_changed_with_args(&[(0, "org.maqet.Maqet1"), (2, "")])
        .await
        .unwrap();
    signal(daemons[0], libc::SIGKILL);
    common::process_gone(daemons[0]).await;
    tokio::time::timeout(common::TIMEOUT, gone.next())
        .await
        .unwrap();
}

/// swtpm is supervised like QEMU: recorded, re-adopted by the next maqetd, ended with
/// its VM (killed when it does not end by itself), and its death while QEMU runs is
/// reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swtpm_is_readopted_and_ends_with_its_vm() {
    if !have_swtpm() {
        return;
    }
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus
        .add(&conn, "tpm", &format!("{}tpm: true\n", tiny_vm_yaml("tpm")))
        .await;
    let id = vm.id().await.unwrap();
    vm.start().await.unwrap();
    let (swtpm, _) = recorded_swtpm(&bus, &id).expect("swtpm recorded");
    let comm = std::fs::read_to_string(format!("/proc/{swtpm}/comm")).unwrap();
    assert_eq!(comm.trim(), "swtpm");

    // A new maqetd re-adopts the VM and its swtpm.
    kill_maqetd(&bus, &conn).await;
    assert_eq!(vm.status().await.unwrap(), "running");
    let qmp = maqet::client::qmp_proxy(&conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    let tpms = qmp.execute("query-tpm", "", false).await.unwrap();
    assert!(tpms.contains("tpm-tis"), "{tpms}");
    assert_eq!(recorded_swtpm(&bus, &id).map(|r| r.0), Some(swtpm));
    // A frozen swtpm cannot end by itself when QEMU dies: the new maqetd kills it.
    signal(swtpm, libc::SIGSTOP);
    let mut watch = StatusWatch::new(&vm).await;
    signal(vm.pid().await.unwrap(), libc::SIGKILL);
    watch.until("crashed").await;
    common::process_gone(swtpm).await;
    assert_eq!(recorded_swtpm(&bus, &id), None);

    // swtpm dying under a running QEMU: the VM keeps running, its reason says why.
    vm.start().await.unwrap();
    let (swtpm, _) = recorded_swtpm(&bus, &id).expect("swtpm recorded");
    let mut reasons = Reasons::new(&vm).await;
    signal(swtpm, libc::SIGKILL);
    let reason = reasons.until("its TPM is gone").await;
    assert!(reason.contains("restart the VM"), "{reason}");
    assert_eq!(vm.status().await.unwrap(), "running");
    assert_eq!(recorded_swtpm(&bus, &id), None);
    vm.stop(true, 0).await.unwrap();
}

/// A recorded swtpm pid that now belongs to another process (same start time even) is
/// never signalled: the re-adopting maqetd finds the real swtpm by its mark instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_on_a_recorded_swtpm_pid_is_never_killed() {
    if !have_swtpm() {
        return;
    }
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus
        .add(&conn, "tpm", &format!("{}tpm: true\n", tiny_vm_yaml("tpm")))
        .await;
    let id = vm.id().await.unwrap();
    vm.start().await.unwrap();
    let (swtpm, _) = recorded_swtpm(&bus, &id).expect("swtpm recorded");
    kill_maqetd(&bus, &conn).await;

    let mut stranger = std::process::Command::new("sleep")
        .arg("600")
        .env("MAQET_TEST_MARKER", bus.marker())
        .spawn()
        .unwrap();
    let pid = stranger.id();
    let start = maqet::vm::process::proc_start_time(pid).unwrap();
    rusqlite::Connection::open(bus.database())
        .unwrap()
        .execute(
            "UPDATE tpm_processes SET pid = ?1, pid_start_time = ?2 WHERE vm_id = ?3",
            rusqlite::params![pid, start as i64, id],
        )
        .unwrap();

    assert_eq!(vm.status().await.unwrap(), "running");
    assert_eq!(recorded_swtpm(&bus, &id).map(|r| r.0), Some(swtpm));
    vm.stop(true, 0).await.unwrap();
    common::process_gone(swtpm).await;
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "the stranger was killed"
    );
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}
