//! End-to-end: `CloneVM` (linked and full) with real qemu-img and QEMU on a private,
//! D-Bus-activating bus: the clones boot, share no writable file with their source,
//! and a refused or failed clone leaves no VM and no file behind.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::guest::{Behaviour, write_image};
use common::{Bus, Fill, data_image, error_name, job_end, stderr, stdout};
use futures_util::StreamExt;
use maqet::client::{ImagesProxy, JobProxy, MANAGER_PATH, VmProxy, proxy_at, vm_proxy};
use zbus::Connection;
use zbus::zvariant::Variant;

fn qemu_img_info(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

/// Imports the tiny guest as image `guest` and adds VM `name` whose disk starts as it.
async fn booting_vm(bus: &Bus, conn: &Connection, name: &str) -> VmProxy<'static> {
    let raw = write_image(bus.root(), Behaviour::AcpiAware);
    let images: ImagesProxy = proxy_at(conn, MANAGER_PATH.try_into().unwrap())
        .await
        .unwrap();
    let f = std::fs::File::open(&raw).unwrap();
    let job = images
        .import(zbus::Fd::from(&f), "guest", HashMap::new())
        .await
        .unwrap();
    let (state, message) = common::job_end(conn, job).await;
    assert_eq!(state, "completed", "{message}");
    let yaml = format!(
        "name: {name}\nbinary: qemu-system-x86_64\ndisplay: none\nmemory: 64\narguments:\n  - nodefaults\n  - machine: pc\n  - accel: {}\nstorage:\n  - {{name: root, from: guest, interface: ide}}\n",
        common::accel()
    );
    bus.add(conn, "", &yaml).await
}

fn disk_of(bus: &Bus, id: &str) -> PathBuf {
    bus.root()
        .join("data/maqet/vms")
        .join(id)
        .join("root.qcow2")
}

async fn boots(vm: &VmProxy<'_>) {
    vm.start().await.unwrap();
    vm.wait("event=RTC_CHANGE", 60).await.unwrap();
    vm.stop(true, 10).await.unwrap();
}

fn full_copy() -> HashMap<&'static str, Variant<'static>> {
    HashMap::from([("full", Variant::from(true))])
}

/// A VM (never started) whose one disk is `disk`.
async fn vm_on(bus: &Bus, conn: &Connection, name: &str, disk: &Path) -> VmProxy<'static> {
    let yaml = format!(
        "{}storage:\n  - {{name: root, type: qcow2, file: '{}'}}\n",
        common::tiny_vm_yaml(name),
        disk.display()
    );
    bus.add(conn, "", &yaml).await
}

fn vm_dirs(bus: &Bus) -> usize {
    std::fs::read_dir(bus.root().join("data/maqet/vms"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_linked_clone_boots_on_overlays_and_keeps_its_source_stopped() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let src = booting_vm(&bus, &conn, "src").await;
    boots(&src).await; // makes the source's disk
    let src_id = src.id().await.unwrap();
    let src_disk = disk_of(&bus, &src_id);

    // Running: refused, nothing made.
    src.start().await.unwrap();
    let err = manager
        .clone_vm("src", "copy", HashMap::new())
        .await
        .unwrap_err();
    assert_eq!(
        error_name(&err),
        "org.maqet.Maqet1.Error.InvalidState",
        "{err}"
    );
    assert!(err.to_string().contains("maqet stop src"), "{err}");
    src.stop(true, 10).await.unwrap();
    // A taken name, and an unknown option.
    let err = manager
        .clone_vm("src", "src", HashMap::new())
        .await
        .unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.AlreadyExists");
    let mut odd = HashMap::new();
    odd.insert("fast", Variant::from(true));
    let err = manager.clone_vm("src", "copy", odd).await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidArgument");
    assert_eq!(manager.list_vms().await.unwrap().len(), 1);

    let out = bus.maqet(&["clone", "src", "copy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let copy = bus.vm(&conn, manager.find_vm("copy").await.unwrap()).await;
    let copy_id = copy.id().await.unwrap();
    assert_ne!(copy_id, src_id, "a clone has its own UUID");
    let copy_disk = disk_of(&bus, &copy_id);
    let info = qemu_img_info(&copy_disk);
    assert_eq!(
        info["backing-filename"].as_str(),
        src_disk.to_str(),
        "the clone's disk is an overlay on the source's: {info}"
    );
    boots(&copy).await;

    // The source is the clone's base now: it no longer starts.
    let err = src.start().await.unwrap_err();
    assert_eq!(
        error_name(&err),
        "org.maqet.Maqet1.Error.InvalidState",
        "{err}"
    );
    assert!(err.to_string().contains("copy (disk 'root')"), "{err}");
    assert_eq!(src.status().await.unwrap(), "stopped");

    // Removing the clone with its storage frees the source.
    manager.remove_vm("copy", false, true).await.unwrap();
    assert!(!copy_disk.exists());
    assert!(
        !copy_disk.parent().unwrap().exists(),
        "nothing of the clone is left"
    );
    boots(&src).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_clone_is_standalone_and_a_failed_clone_leaves_nothing() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let src = booting_vm(&bus, &conn, "src").await;
    boots(&src).await;

    let out = bus.maqet(&["clone", "--full", "src", "twin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("cloned src as twin (full)"),
        "{}",
        stdout(&out)
    );
    let twin = bus.vm(&conn, manager.find_vm("twin").await.unwrap()).await;
    let twin_disk = disk_of(&bus, &twin.id().await.unwrap());
    let info = qemu_img_info(&twin_disk);
    assert!(
        info.get("backing-filename").is_none(),
        "a full copy is flattened: {info}"
    );
    // Both run at once: no shared writable file (QEMU's image locks would refuse).
    src.start().await.unwrap();
    twin.start().await.unwrap();
    twin.wait("event=RTC_CHANGE", 60).await.unwrap();
    src.stop(true, 10).await.unwrap();
    twin.stop(true, 10).await.unwrap();

    // A disk maqet cannot copy (a damaged qcow2): the clone fails as a whole.
    let dirs = vm_dirs(&bus);
    let bad = bus.root().join("bad.qcow2");
    let mut bytes = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    bytes.resize(1 << 16, 0xee);
    std::fs::write(&bad, &bytes).unwrap();
    let yaml = format!(
        "{}storage:\n  - {{name: root, type: qcow2, file: '{}'}}\n",
        common::tiny_vm_yaml("broken"),
        bad.display()
    );
    bus.add(&conn, "", &yaml).await;
    let (path, job) = manager
        .clone_vm("broken", "broken2", full_copy())
        .await
        .unwrap();
    let (state, message) = job_end(&conn, job).await;
    assert_eq!(state, "failed", "{message}");
    assert!(
        message.contains("qemu-img convert failed") && message.contains("no clone was made"),
        "{message}"
    );
    assert!(
        vm_proxy(&conn, path).await.unwrap().id().await.is_err(),
        "the path the clone would have had names no VM"
    );
    assert!(
        manager.find_vm("broken2").await.is_err(),
        "no half clone is defined"
    );
    assert_eq!(vm_dirs(&bus), dirs, "no half clone is on disk");

    // A writable disk outside `storage` would be shared: refused.
    let raw = write_image(bus.root(), Behaviour::AcpiAware);
    bus.add(&conn, "", &common::guest::vm_yaml("plain", &raw))
        .await;
    let out = bus.maqet(&["clone", "plain", "plain2"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("outside `storage`"),
        "{}",
        stderr(&out)
    );
    assert!(manager.find_vm("plain2").await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exported_vm_moves_as_a_directory_and_boots_without_its_source() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let src = booting_vm(&bus, &conn, "src").await;
    boots(&src).await;
    let out_dir = bus.root().join("moved");

    src.start().await.unwrap();
    let out = bus.maqet(&["export", "src", out_dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "running: {}", stderr(&out));
    src.stop(true, 10).await.unwrap();

    let out = bus.maqet(&["export", "src", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut files: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["config.yaml", "root.qcow2"]);
    let info = qemu_img_info(&out_dir.join("root.qcow2"));
    assert!(info.get("backing-filename").is_none(), "flattened: {info}");
    let config = std::fs::read_to_string(out_dir.join("config.yaml")).unwrap();
    assert!(config.contains("file: root.qcow2"), "{config}");
    // Never over an earlier export.
    let before = std::fs::read(out_dir.join("config.yaml")).unwrap();
    let out = bus.maqet(&["export", "src", out_dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(std::fs::read(out_dir.join("config.yaml")).unwrap(), before);
    assert!(out_dir.join("root.qcow2").exists());

    // The source and its image go; the export still defines a VM that boots.
    manager.remove_vm("src", false, true).await.unwrap();
    let out = bus.maqet(&["image", "rm", "guest"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&[
        "add",
        "--from-export",
        out_dir.to_str().unwrap(),
        "--name",
        "moved",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let moved = bus.vm(&conn, manager.find_vm("moved").await.unwrap()).await;
    boots(&moved).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_clone_is_a_job_with_progress_and_a_cancel_leaves_no_clone() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let disk = data_image(bus.root(), "big", 256, Fill::Random, "qcow2");
    let src = vm_on(&bus, &conn, "big", &disk).await;
    let dirs = vm_dirs(&bus);

    let (path, job) = manager.clone_vm("big", "big2", full_copy()).await.unwrap();
    let job: JobProxy = proxy_at(&conn, job).await.unwrap();
    let mut completed = job.receive_completed().await.unwrap();
    assert_eq!(job.operation().await.unwrap(), "vm-clone");
    assert_eq!(
        job.vm().await.unwrap().as_str(),
        src.inner().path().as_str()
    );
    // While it copies, the source is busy: it cannot start.
    let err = src.start().await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidState");
    assert!(err.to_string().contains("full clone"), "{err}");
    // The first progress qemu-img reports, then the cancel.
    common::first_progress(&conn, &job.inner().path().clone().into()).await;
    job.cancel().await.unwrap();
    if job.state().await.unwrap() == "running" {
        tokio::time::timeout(common::TIMEOUT, completed.next())
            .await
            .expect("the job ends")
            .unwrap();
    }
    assert_eq!(
        job.state().await.unwrap(),
        "cancelled",
        "{}",
        job.message().await.unwrap()
    );
    assert!(
        vm_proxy(&conn, path).await.unwrap().id().await.is_err(),
        "no clone is defined"
    );
    assert!(manager.find_vm("big2").await.is_err());
    assert_eq!(vm_dirs(&bus), dirs, "no half clone is on disk");
    // The source is free again, and a second clone completes with the VM it named.
    let (path, job) = manager.clone_vm("big", "big2", full_copy()).await.unwrap();
    let (state, message) = job_end(&conn, job).await;
    assert_eq!(state, "completed", "{message}");
    assert!(message.contains("'big2'"), "{message}");
    let copy = bus.vm(&conn, path).await;
    assert_eq!(copy.name().await.unwrap(), "big2");
    let copy_disk = disk_of(&bus, &copy.id().await.unwrap());
    assert!(qemu_img_info(&copy_disk).get("backing-filename").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_clone_onto_a_full_disk_says_so_and_leaves_nothing() {
    let Some(bus) = Bus::start_with_small_data_dir("8m") else {
        return;
    };
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    // 32 MiB of data in a file of a few hundred KiB, outside the 8 MiB data directory.
    let outside = tempfile::tempdir().unwrap();
    let disk = data_image(outside.path(), "packed", 32, Fill::Compressed, "qcow2");
    vm_on(&bus, &conn, "packed", &disk).await;
    let dirs = vm_dirs(&bus);

    let (path, job) = manager
        .clone_vm("packed", "packed2", full_copy())
        .await
        .unwrap();
    let (state, message) = job_end(&conn, job).await;
    assert_eq!(state, "failed", "{message}");
    assert!(message.starts_with("the disk is full"), "{message}");
    assert!(message.contains("no clone was made"), "{message}");
    assert!(vm_proxy(&conn, path).await.unwrap().id().await.is_err());
    assert!(manager.find_vm("packed2").await.is_err());
    assert_eq!(vm_dirs(&bus), dirs, "no half clone is on disk");
    // The CLI says the same and exits nonzero.
    let out = bus.maqet(&["clone", "--full", "packed", "packed3"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the disk is full"),
        "{}",
        stderr(&out)
    );
    assert_eq!(manager.list_vms().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_is_a_job_and_a_cancelled_or_full_export_leaves_an_empty_directory() {
    let Some(()) = common::require(common::root(
        "mounting a small tmpfs as the export directory",
    )) else {
        return;
    };
    let bus = Bus::start();
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let disk = data_image(bus.root(), "big", 256, Fill::Random, "qcow2");
    let src = vm_on(&bus, &conn, "big", &disk).await;
    let entries = |dir: &Path| std::fs::read_dir(dir).unwrap().count();

    // Cancelled after its first progress: the directory stays empty.
    let out_dir = bus.root().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let opened = std::fs::File::open(&out_dir).unwrap();
    let (files, job) = manager
        .export_vm("big", zbus::Fd::from(&opened))
        .await
        .unwrap();
    assert_eq!(files, ["config.yaml", "root.qcow2"]);
    let job: JobProxy = proxy_at(&conn, job).await.unwrap();
    let mut completed = job.receive_completed().await.unwrap();
    assert_eq!(job.operation().await.unwrap(), "vm-export");
    let err = src.start().await.unwrap_err();
    assert!(err.to_string().contains("export"), "busy: {err}");
    common::first_progress(&conn, &job.inner().path().clone().into()).await;
    job.cancel().await.unwrap();
    if job.state().await.unwrap() == "running" {
        tokio::time::timeout(common::TIMEOUT, completed.next())
            .await
            .expect("the job ends")
            .unwrap();
    }
    let message = job.message().await.unwrap();
    assert_eq!(job.state().await.unwrap(), "cancelled", "{message}");
    assert!(message.contains("nothing was left"), "{message}");
    assert_eq!(entries(&out_dir), 0, "no partial file is left");

    // Onto a file system too small for the copy: "the disk is full", nothing left.
    let small = bus.root().join("small");
    std::fs::create_dir(&small).unwrap();
    let tmpfs = common::Tmpfs::mount(&small, "8m");
    let out = bus.maqet(&["export", "big", tmpfs.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the disk is full"),
        "{}",
        stderr(&out)
    );
    assert_eq!(entries(tmpfs.path()), 0, "no partial file is left");

    // The source is free again; a whole export completes with the files it named.
    let out = bus.maqet(&["export", "big", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["config.yaml", "root.qcow2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_copies_of_a_clone_a_killed_maqetd_left_are_removed_at_its_start() {
    let bus = Bus::start();
    let vms = bus.root().join("data/maqet/vms");
    // What a maqetd killed during a full clone leaves: a directory no VM row names,
    // holding a partial copy; beside it a directory with a file maqet did not make.
    let half = vms.join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join(".clone-0123.qcow2"), b"half a disk").unwrap();
    let other = vms.join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"the user's").unwrap();

    let conn = bus.conn().await;
    // The first call activates maqetd, which cleans up before it answers.
    assert!(
        bus.manager(&conn)
            .await
            .list_vms()
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!half.exists(), "the half clone's directory is gone");
    assert!(other.join("notes.txt").exists(), "other files stay");
}
