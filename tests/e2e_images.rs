//! End-to-end: the image store (import as a job, list, remove), disks made `from:` a
//! stored image, with real qemu-img and QEMU on a private, D-Bus-activating bus.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::guest::{Behaviour, write_image};
use common::{Bus, Fill, TIMEOUT, data_image, error_name, job_end, stderr, stdout};
use futures_util::StreamExt;
use maqet::client::{ImagesProxy, JobProxy, MANAGER_PATH, proxy_at};
use zbus::Connection;

async fn images(conn: &Connection) -> ImagesProxy<'static> {
    proxy_at(conn, MANAGER_PATH.try_into().unwrap())
        .await
        .unwrap()
}

/// Imports `file` over D-Bus; the job's end, or the call's error name.
async fn import(
    conn: &Connection,
    file: &Path,
    name: &str,
) -> Result<(String, String), (String, String)> {
    let f = std::fs::File::open(file).unwrap();
    match images(conn)
        .await
        .import(zbus::Fd::from(&f), name, HashMap::new())
        .await
    {
        Ok(job) => Ok(job_end(conn, job).await),
        Err(e) => Err((error_name(&e), e.to_string())),
    }
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", stderr(&out));
    stdout(&out)
}

fn store_dir(bus: &Bus) -> PathBuf {
    bus.root().join("data/maqet/images")
}

/// Files in the store directory (none hidden from the test).
fn store_files(bus: &Bus) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store_dir(bus))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    stdout(&out).split_whitespace().next().unwrap().to_owned()
}

/// A VM booting the tiny guest from a disk made `from:` a stored image.
fn from_image_yaml(name: &str, image: &str, size: &str) -> String {
    format!(
        "name: {name}\nbinary: qemu-system-x86_64\ndisplay: none\nmemory: 64\narguments:\n  - nodefaults\n  - machine: pc\n  - accel: {}\nstorage:\n  - {{name: root, from: {image}, size: {size}, interface: ide}}\n",
        common::accel()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_imported_image_boots_a_vm_through_an_overlay_and_cannot_be_removed_while_used() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let raw = write_image(bus.root(), Behaviour::AcpiAware);
    // The CLI opens the file and passes it; the service converts it to qcow2.
    let out = bus.maqet(&["image", "import", raw.to_str().unwrap(), "--name", "guest"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("imported 'guest'"),
        "{}",
        stdout(&out)
    );
    let rows = images(&conn).await.list().await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (name, format, vsize, size, sha, at, path) = rows[0].clone();
    assert_eq!(
        (name.as_str(), format.as_str(), vsize),
        ("guest", "qcow2", 512)
    );
    let stored = PathBuf::from(&path);
    assert_eq!(stored, store_dir(&bus).join("guest.qcow2"));
    assert_eq!(
        sha,
        sha256(&stored),
        "the recorded checksum is the stored file's"
    );
    assert_eq!(size, std::fs::metadata(&stored).unwrap().len());
    assert!(at > 0);
    assert_eq!(store_files(&bus), ["guest.qcow2"]);
    let info = qemu_img(&["info", "--output=json", &path]);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    // The same name again is refused before any work.
    let (kind, _) = import(&conn, &raw, "guest").await.unwrap_err();
    assert_eq!(kind, "org.maqet.Maqet1.Error.AlreadyExists");

    // A VM whose disk starts as the image: the guest boots from the overlay's backing.
    let vm = bus
        .add(&conn, "", &from_image_yaml("web", "guest", "2M"))
        .await;
    vm.start().await.unwrap();
    vm.wait("event=RTC_CHANGE", 60).await.unwrap();
    let disk = bus
        .root()
        .join("data/maqet/vms")
        .join(vm.id().await.unwrap())
        .join("root.qcow2");
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-U",
        "--output=json",
        disk.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(
        info["backing-filename"], "../../images/guest.qcow2",
        "{info}"
    );
    assert_eq!(info["virtual-size"], 2 << 20, "resized to `size:`");

    // In use: refused with the VM named, by D-Bus and by the CLI.
    let err = images(&conn).await.remove("guest").await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidState");
    assert!(err.to_string().contains("web (disk 'root')"), "{err}");
    let out = bus.maqet(&["image", "rm", "guest"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stored.exists());

    vm.stop(true, 10).await.unwrap();
    bus.manager(&conn)
        .await
        .remove_vm("web", false, true)
        .await
        .unwrap();
    assert!(
        !disk.exists(),
        "the overlay is the VM's and goes with its storage"
    );
    let out = bus.maqet(&["image", "rm", "guest"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stored.exists());
    assert!(images(&conn).await.list().await.unwrap().is_empty());
    let (kind, msg) = match images(&conn).await.remove("guest").await {
        Err(e) => (error_name(&e), e.to_string()),
        Ok(()) => panic!("removed twice"),
    };
    assert_eq!(kind, "org.maqet.Maqet1.Error.NotFound", "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_imports_are_refused_and_leave_nothing_in_the_store() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let root = bus.root();

    // Not an image: a text file reads as "raw" to qemu-img, but is no disk.
    let text = root.join("notes.txt");
    std::fs::write(&text, "not a disk image\n").unwrap();
    let (kind, msg) = import(&conn, &text, "notes").await.unwrap_err();
    assert_eq!(kind, "org.maqet.Maqet1.Error.InvalidArgument", "{msg}");
    assert!(msg.contains("not a disk image"), "{msg}");

    // A FIFO and a character device are not files to import (the CLI opens without
    // blocking; the service refuses by type before reading).
    let fifo = root.join("pipe");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let out = bus.maqet(&["image", "import", fifo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("a pipe"), "{}", stderr(&out));
    let (kind, msg) = import(&conn, Path::new("/dev/zero"), "zero")
        .await
        .unwrap_err();
    assert_eq!(kind, "org.maqet.Maqet1.Error.InvalidArgument", "{msg}");
    assert!(msg.contains("character device"), "{msg}");

    // An empty file, and a bad name.
    let empty = root.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let (kind, msg) = import(&conn, &empty, "empty").await.unwrap_err();
    assert!(msg.contains("empty"), "{kind}: {msg}");
    let raw = write_image(root, Behaviour::AcpiAware);
    let (kind, _) = import(&conn, &raw, "../evil").await.unwrap_err();
    assert_eq!(kind, "org.maqet.Maqet1.Error.InvalidArgument");

    // A qcow2 with a backing file would pull another file into the store.
    let base = root.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
    let top = root.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let (kind, msg) = import(&conn, &top, "top").await.unwrap_err();
    assert_eq!(kind, "org.maqet.Maqet1.Error.InvalidArgument", "{msg}");
    assert!(msg.contains("backing file"), "{msg}");

    // A truncated download: qemu-img converts it "fine" (it reads zeros past the end);
    // the check before the conversion fails the job, and nothing is stored.
    let whole = root.join("whole.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        whole.to_str().unwrap(),
        "16M",
    ]);
    let io = Command::new("qemu-io")
        .args(["-c", "write -P 0xab 0 8M", whole.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(io.status.success(), "{}", stderr(&io));
    let cut = root.join("cut.qcow2");
    std::fs::copy(&whole, &cut).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    f.set_len(4 << 20).unwrap();
    drop(f);
    let (state, msg) = import(&conn, &cut, "cut").await.unwrap();
    assert_eq!(state, "failed", "{msg}");
    assert!(msg.contains("damaged"), "{msg}");
    assert!(msg.contains("nothing was added"), "{msg}");

    assert!(images(&conn).await.list().await.unwrap().is_empty());
    assert!(
        store_files(&bus).is_empty(),
        "no partial image is left: {:?}",
        store_files(&bus)
    );

    // The whole image imports, and an ISO is stored byte for byte.
    let (state, msg) = import(&conn, &whole, "").await.unwrap();
    assert_eq!(state, "completed", "{msg}");
    let iso = root.join("install.iso");
    let mut bytes = vec![0u8; 64 << 10];
    bytes[0x8001..0x8006].copy_from_slice(b"CD001");
    bytes[0x9000] = 7;
    std::fs::write(&iso, &bytes).unwrap();
    let (state, msg) = import(&conn, &iso, "").await.unwrap();
    assert_eq!(state, "completed", "{msg}");
    let rows = images(&conn).await.list().await.unwrap();
    let names: Vec<(&str, &str)> = rows.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    assert_eq!(names, [("install", "iso"), ("whole", "qcow2")]);
    assert_eq!(rows[0].4, sha256(&iso), "an ISO is stored as it is");
    assert_eq!(store_files(&bus), ["install.iso", "whole.qcow2"]);

    // An ISO is no disk to start from; a missing image fails the start with the fix.
    let vm = bus
        .add(&conn, "", &from_image_yaml("cd", "install", "1M"))
        .await;
    let err = vm.start().await.unwrap_err();
    assert!(err.to_string().contains("is an ISO"), "{err}");
    let vm = bus
        .add(&conn, "", &from_image_yaml("gone", "nosuch", "1M"))
        .await;
    let err = vm.start().await.unwrap_err();
    assert!(err.to_string().contains("no image named 'nosuch'"), "{err}");
    assert!(err.to_string().contains("maqet image import"), "{err}");
    let vm = bus
        .add(&conn, "", &from_image_yaml("small", "whole", "1M"))
        .await;
    let err = vm.start().await.unwrap_err();
    assert!(err.to_string().contains("cannot be smaller"), "{err}");
    assert_eq!(vm.status().await.unwrap(), "failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn vmdk_vdi_and_vhdx_images_import_as_qcow2_with_their_size_and_checksum() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let formats = ["vmdk", "vdi", "vhdx"];
    for format in formats {
        let file = data_image(
            bus.root(),
            &format!("disk-{format}"),
            16,
            Fill::Pattern,
            format,
        );
        let info = qemu_img(&["info", "--output=json", file.to_str().unwrap()]);
        assert!(
            info.contains(&format!("\"format\": \"{format}\"")),
            "{info}"
        );
        let (state, msg) = import(&conn, &file, format).await.unwrap();
        assert_eq!(state, "completed", "{format}: {msg}");
        let stored = store_dir(&bus).join(format!("{format}.qcow2"));
        // The guest sees the same bytes in the stored copy.
        qemu_img(&[
            "compare",
            "-f",
            format,
            "-F",
            "qcow2",
            file.to_str().unwrap(),
            stored.to_str().unwrap(),
        ]);
    }
    let rows = images(&conn).await.list().await.unwrap();
    let mut names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    names.sort();
    assert_eq!(names, ["vdi", "vhdx", "vmdk"]);
    for (name, format, vsize, size, sha, _, path) in &rows {
        assert_eq!(format, "qcow2", "{name} is stored converted");
        assert_eq!(*vsize, 16 << 20, "{name}'s virtual size");
        let stored = store_dir(&bus).join(format!("{name}.qcow2"));
        assert_eq!(Path::new(path), stored);
        assert_eq!(*size, std::fs::metadata(&stored).unwrap().len(), "{name}");
        assert_eq!(*sha, sha256(&stored), "{name}'s recorded checksum");
    }
    assert_eq!(store_files(&bus), ["vdi.qcow2", "vhdx.qcow2", "vmdk.qcow2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_import_ends_cancelled_and_leaves_nothing_in_the_store() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    // 256 MiB of random data in a sparse 1 GiB raw disk: long enough to cancel.
    let raw = data_image(bus.root(), "big", 256, Fill::Random, "raw");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let f = std::fs::File::open(&raw).unwrap();
    let path = images(&conn)
        .await
        .import(zbus::Fd::from(&f), "big", HashMap::new())
        .await
        .unwrap();
    let job: JobProxy = proxy_at(&conn, path).await.unwrap();
    let mut completed = job.receive_completed().await.unwrap();
    // The first progress the conversion reports, then the cancel.
    common::first_progress(&conn, &job.inner().path().clone().into()).await;
    job.cancel().await.unwrap();
    if job.state().await.unwrap() == "running" {
        tokio::time::timeout(TIMEOUT, completed.next())
            .await
            .expect("the job ends")
            .unwrap();
    }
    let message = job.message().await.unwrap();
    assert_eq!(job.state().await.unwrap(), "cancelled", "{message}");
    assert!(message.contains("nothing was added"), "{message}");
    assert!(images(&conn).await.list().await.unwrap().is_empty());
    assert!(
        store_files(&bus).is_empty(),
        "no partial image is left: {:?}",
        store_files(&bus)
    );
    // A second cancel is refused: the job has ended.
    let err = job.cancel().await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidState");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_import_onto_a_full_disk_says_so_and_leaves_nothing() {
    let Some(bus) = Bus::start_with_small_data_dir("8m") else {
        return;
    };
    let conn = bus.conn().await;
    let outside = tempfile::tempdir().unwrap();
    // Bigger than the free space already: refused before any work.
    let big = data_image(outside.path(), "big", 16, Fill::Pattern, "raw");
    let (kind, msg) = import(&conn, &big, "big").await.unwrap_err();
    assert_eq!(kind, "org.maqet.Maqet1.Error.Storage", "{msg}");
    assert!(msg.starts_with("the disk is full"), "{msg}");
    // A small file that expands past the free space: the conversion hits ENOSPC.
    let packed = data_image(outside.path(), "packed", 32, Fill::Compressed, "qcow2");
    assert!(std::fs::metadata(&packed).unwrap().len() < 4 << 20);
    let (state, msg) = import(&conn, &packed, "packed").await.unwrap();
    assert_eq!(state, "failed", "{msg}");
    assert!(msg.starts_with("the disk is full"), "{msg}");
    assert!(msg.contains("nothing was added"), "{msg}");
    assert!(images(&conn).await.list().await.unwrap().is_empty());
    assert!(
        store_files(&bus).is_empty(),
        "no partial image is left: {:?}",
        store_files(&bus)
    );
    // The CLI says the same and exits nonzero.
    let out = bus.maqet(&["image", "import", packed.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the disk is full"),
        "{}",
        stderr(&out)
    );
    assert!(store_files(&bus).is_empty());
}
