//! End-to-end: QEMU gets file descriptors maqetd opened itself, never names it could
//! be raced on (docs/storage.md, "How QEMU gets its files"). Real QEMU, private bus.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{Bus, error_name, tiny_vm_yaml};

/// A tiny VM with one raw disk and one read-only raw disk.
fn vm_with_disk(name: &str, disk: &Path, iso: &Path) -> String {
    format!(
        "{}storage:\n  - {{name: d, type: raw, file: '{}'}}\n  - {{name: r, type: raw, file: '{}', options: {{readonly: true}}}}\n",
        tiny_vm_yaml(name),
        disk.display(),
        iso.display()
    )
}

/// Where each fd of `pid` leads.
fn open_files(pid: u32) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect()
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect()
}

/// While `Start` runs again and again, a thread swaps the disk's directory for a
/// symlink to a decoy directory (atomically, `RENAME_EXCHANGE`) in a tight loop. The
/// decoy is somewhere the location policy allows, so only the fd passing stands
/// between QEMU and it: QEMU must never hold the decoy open, and a start either runs
/// on the real disk or is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_swapped_for_a_symlink_during_start_never_reaches_qemu() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let race = bus.root().join("race");
    let real = race.join("vms");
    let decoy_dir = bus.root().join("decoy");
    std::fs::create_dir_all(&real).unwrap();
    std::fs::create_dir_all(&decoy_dir).unwrap();
    for dir in [&real, &decoy_dir] {
        std::fs::write(dir.join("disk.img"), vec![0u8; 1 << 16]).unwrap();
        std::fs::write(dir.join("ro.iso"), vec![0u8; 1 << 16]).unwrap();
    }
    let decoys = [decoy_dir.join("disk.img"), decoy_dir.join("ro.iso")];
    let vm = bus
        .add(
            &conn,
            "",
            &vm_with_disk("raced", &real.join("disk.img"), &real.join("ro.iso")),
        )
        .await;
    // `evil` is a symlink to the decoy directory; exchanging it with `vms` makes
    // `race/vms/disk.img` lead to the decoy.
    let evil = race.join("evil");
    symlink(&decoy_dir, &evil).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicUsize::new(0));
    let swapper = {
        let (stop, swaps, real, evil) = (stop.clone(), swaps.clone(), real.clone(), evil.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let swapped = rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &real,
                    rustix::fs::CWD,
                    &evil,
                    rustix::fs::RenameFlags::EXCHANGE,
                );
                if swapped.is_err() {
                    // The test failed and its directory is gone.
                    break;
                }
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let (mut started, mut refused) = (0, 0);
    // Starts whose QEMU held a decoy open, or got a disk path by name.
    let (mut decoy_held, mut by_name) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        match vm.start().await {
            Ok(()) => {
                started += 1;
                let pid = vm.pid().await.unwrap();
                let files = open_files(pid);
                if decoys.iter().any(|d| files.contains(d)) {
                    decoy_held.push(files.clone());
                }
                // It runs on the real disk, whatever the directory is called now.
                assert!(
                    files
                        .iter()
                        .any(|f| f.starts_with(&race) && f.ends_with("disk.img")),
                    "{files:?}"
                );
                // Never by name (only the fd sets' labels mention it).
                let args = cmdline(pid);
                let named = |a: &String| a.contains("disk.img") && !a.contains("opaque=");
                if args.iter().any(named) || !args.iter().any(|a| a.contains("file=/dev/fdset/")) {
                    by_name.push(args);
                }
                vm.stop(true, 10).await.unwrap();
            }
            Err(e) => {
                refused += 1;
                assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.Storage", "{e}");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    eprintln!(
        "{started} starts, {refused} refused, {} swaps",
        swaps.load(Ordering::Relaxed)
    );
    assert!(
        decoy_held.is_empty(),
        "QEMU held a decoy open: {decoy_held:?}"
    );
    assert!(
        by_name.is_empty(),
        "QEMU got disk paths by name: {by_name:?}"
    );
    // The race was really run: some starts saw the swapped state.
    assert!(refused > 0, "{started} started, {refused} refused");
    // With the directory back in place, the VM starts on the real disk (so the
    // refusals above were the race, not a broken setup).
    if std::fs::symlink_metadata(&real)
        .unwrap()
        .file_type()
        .is_symlink()
    {
        std::fs::rename(&real, race.join("tmp")).unwrap();
        std::fs::rename(&evil, &real).unwrap();
        std::fs::rename(race.join("tmp"), &evil).unwrap();
    }
    vm.start().await.unwrap();
    let files = open_files(vm.pid().await.unwrap());
    assert!(files.contains(&real.join("disk.img")), "{files:?}");
    assert!(files.contains(&real.join("ro.iso")), "{files:?}");
    vm.stop(true, 10).await.unwrap();
}

/// A qcow2 chain whose headers name their backing files relatively (as `qemu-img
/// create -b base.qcow2` writes them): every link is opened by maqetd and passed as an
/// fd set; QEMU runs on all three files and never gets a name.
#[tokio::test]
async fn a_relative_backing_chain_is_passed_as_fds() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let dir = bus.root().join("chain");
    std::fs::create_dir(&dir).unwrap();
    let img = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    img(&["create", "-f", "raw", "base.raw", "1M"]);
    img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "base.raw",
        "mid.qcow2",
    ]);
    img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "mid.qcow2",
        "top.qcow2",
    ]);
    for extra in [
        format!(
            "storage:\n  - {{name: d, type: qcow2, file: '{}/top.qcow2'}}\n",
            dir.display()
        ),
        format!(
            "  - drive: {{file: '{}/top.qcow2', if: virtio, id: d}}\n",
            dir.display()
        ),
    ] {
        let vm = bus
            .add(&conn, "", &format!("{}{extra}", tiny_vm_yaml("chain")))
            .await;
        vm.start().await.unwrap();
        let pid = vm.pid().await.unwrap();
        let files = open_files(pid);
        for f in ["top.qcow2", "mid.qcow2", "base.raw"] {
            assert!(files.contains(&dir.join(f)), "{f}: {files:?}");
        }
        let args = cmdline(pid);
        assert!(
            args.iter()
                .any(|a| a.contains("backing.backing.driver=raw")),
            "{args:?}"
        );
        let named = |a: &String| a.contains(".qcow2") && !a.contains("opaque=");
        assert!(!args.iter().any(named), "{args:?}");
        vm.stop(true, 10).await.unwrap();
        bus.manager(&conn)
            .await
            .remove_vm("chain", false, false)
            .await
            .unwrap();
    }
}

/// Host paths hidden in strings are refused at AddVM with a pointer to `storage:`.
#[tokio::test]
async fn host_paths_in_strings_are_refused() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    for extra in [
        "args: ['-drive', 'file=/etc/shadow,format=raw']\n",
        "args: ['-drive', 'file=disk.img,if=virtio']\n",
        "args: ['-blockdev', 'driver=file,filename=/etc/shadow,node-name=x']\n",
        "args: ['-chardev', 'file,id=c0,path=/tmp/x']\n",
        "args: ['-kernel', '/boot/vmlinuz']\n",
        "args: ['-serial', 'file:/etc/x']\n",
        // More `arguments` items (the tiny VM's list ends the YAML).
        "  - serial: 'file:/etc/x'\n",
        "  - drive: {file: 'json:{\"file.filename\": \"/etc/shadow\"}'}\n",
        "  - drive: {if: 'virtio,file=/etc/shadow'}\n",
    ] {
        let yaml = format!("{}{extra}", tiny_vm_yaml("strings"));
        let err = manager.add_vm("", &yaml).await.unwrap_err();
        assert_eq!(
            error_name(&err),
            "org.maqet.Maqet1.Error.InvalidConfig",
            "{extra}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("storage:"), "{extra}: {msg}");
    }
    // A string-form `arguments` value is parsed into its mapping form, so its path
    // meets the location check like any structured path.
    let yaml = format!(
        "{}  - drive: 'file=/etc/shadow,if=virtio'\n",
        tiny_vm_yaml("strings")
    );
    let err = manager.add_vm("", &yaml).await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.Storage", "{err}");
    assert!(
        err.to_string().contains("`/etc/shadow` is not allowed"),
        "{err}"
    );
}

/// A FIFO or a dangling symlink at a disk path: refused, and the start does not hang.
#[tokio::test]
async fn a_fifo_at_a_disk_path_fails_the_start_cleanly() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let dir = bus.root().join("vms");
    std::fs::create_dir(&dir).unwrap();
    let disk = dir.join("disk.img");
    let iso = dir.join("ro.iso");
    std::fs::write(&disk, "x").unwrap();
    std::fs::write(&iso, "x").unwrap();
    let vm = bus.add(&conn, "", &vm_with_disk("fifo", &disk, &iso)).await;
    std::fs::remove_file(&iso).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &iso,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let err = vm.start().await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.Storage", "{err}");
    assert!(err.to_string().contains("not a regular file"), "{err}");
    assert_eq!(vm.status().await.unwrap(), "failed");

    // A dangling symlink is refused when the config is added.
    let dangling = dir.join("gone.img");
    symlink(dir.join("nowhere.img"), &dangling).unwrap();
    let manager = bus.manager(&conn).await;
    let err = manager
        .add_vm("", &vm_with_disk("dangling", &dangling, &disk))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}
