//! End-to-end: `Storage.Resize`, `Storage.Attach` and `Storage.Detach` with real
//! qemu-img and real QEMU on a private, D-Bus-activating session bus.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Bus, StatusWatch, TIMEOUT, error_name, stderr, stdout, tiny_vm_yaml};
use futures_util::StreamExt;
use maqet::client::{JobProxy, SnapshotsProxy, StorageProxy, VmProxy, proxy_at, qmp_proxy};
use serde_json::Value;
use zbus::Connection;
use zbus::zvariant::Variant;

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", stderr(&out));
    stdout(&out)
}

fn virtual_size(path: &Path) -> u64 {
    let info = qemu_img(&["info", "-U", "--output=json", path.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&info).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// A tiny VM with one qcow2 disk `root` the user made (32 MiB) and the extra entries.
async fn vm_with_root(
    bus: &Bus,
    conn: &Connection,
    name: &str,
    extra: &[String],
) -> (VmProxy<'static>, PathBuf) {
    let root = bus.root().join(format!("{name}-root.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", root.to_str().unwrap(), "32M"]);
    let mut yaml = tiny_vm_yaml(name);
    yaml.push_str(&format!(
        "storage:\n  - {{name: root, type: qcow2, file: '{}'}}\n",
        root.display()
    ));
    for e in extra {
        yaml.push_str(&format!("  - {e}\n"));
    }
    (bus.add(conn, "", &yaml).await, root)
}

async fn storage(conn: &Connection, vm: &VmProxy<'_>) -> StorageProxy<'static> {
    proxy_at(conn, vm.inner().path().to_owned().into())
        .await
        .unwrap()
}

fn opts(pairs: &[(&'static str, Variant<'static>)]) -> HashMap<&'static str, Variant<'static>> {
    pairs.iter().cloned().collect()
}

/// QEMU's `query-block`, through maqetd's QMP interface.
async fn query_block(conn: &Connection, vm: &VmProxy<'_>) -> Vec<Value> {
    let qmp = qmp_proxy(conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    let out = qmp.execute("query-block", "", false).await.unwrap();
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The `query-block` entry of a disk: its drive id (started with it) or maqet's
/// hot-plug device id.
fn block<'a>(blocks: &'a [Value], disk: &str) -> Option<&'a Value> {
    let id = format!("maqet-disk-{disk}");
    let path = format!("/machine/peripheral/{id}");
    blocks.iter().find(|b| {
        b["device"] == disk
            || b["qdev"]
                .as_str()
                .is_some_and(|q| q == id || q.starts_with(&path))
    })
}

fn live_size(blocks: &[Value], disk: &str) -> u64 {
    block(blocks, disk).unwrap()["inserted"]["image"]["virtual-size"]
        .as_u64()
        .unwrap()
}

/// Storage.List's (name, virtual size) pairs.
async fn listed(st: &StorageProxy<'_>) -> Vec<(String, u64)> {
    st.list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.0, r.4))
        .collect()
}

fn audit_rows(bus: &Bus, method: &str) -> Vec<(String, String)> {
    let db = rusqlite::Connection::open_with_flags(
        bus.database(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = db
        .prepare("SELECT action, COALESCE(outcome, '') FROM audit WHERE method = ?1 ORDER BY seq")
        .unwrap();
    stmt.query_map([method], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_resize_grows_the_image_and_refuses_what_it_must() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let iso = bus.root().join("cd.iso");
    std::fs::write(&iso, vec![0u8; 64 * 1024]).unwrap();
    let raw = bus.root().join("mine.raw");
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "8M"]);
    let extra = [
        format!(
            "{{name: cd, type: raw, file: '{}', readonly: true}}",
            iso.display()
        ),
        format!("{{name: mine, type: raw, file: '{}'}}", raw.display()),
        format!(
            "{{name: share, type: virtfs, path: '{}'}}",
            bus.root().display()
        ),
    ];
    let (vm, root) = vm_with_root(&bus, &conn, "grow", &extra).await;
    let st = storage(&conn, &vm).await;

    st.resize("root", 96 * MIB, opts(&[])).await.unwrap();
    assert_eq!(virtual_size(&root), 96 * MIB);
    assert!(listed(&st).await.contains(&("root".into(), 96 * MIB)));
    let config = vm.config().await.unwrap();
    assert!(config.contains(&format!("size: {}", 96 * MIB)), "{config}");

    // Smaller without shrink: refused, nothing changed.
    let err = st.resize("root", 64 * MIB, opts(&[])).await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidArgument");
    assert!(err.to_string().contains("shrink"), "{err}");
    assert_eq!(virtual_size(&root), 96 * MIB);
    let shrink = opts(&[("shrink", Variant::from(true))]);
    st.resize("root", 64 * MIB, shrink).await.unwrap();
    assert_eq!(virtual_size(&root), 64 * MIB);

    let err = st.resize("nope", 64 * MIB, opts(&[])).await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.NotFound");
    assert!(err.to_string().contains("root, cd, mine"), "{err}");
    for (disk, size) in [
        ("root", 1000),
        ("root", 0),
        ("cd", MIB),
        ("mine", 16 * MIB),
        ("share", MIB),
    ] {
        let err = st.resize(disk, size, opts(&[])).await.unwrap_err();
        assert_eq!(
            error_name(&err),
            "org.maqet.Maqet1.Error.InvalidArgument",
            "{disk} {size}: {err}"
        );
    }
    let err = st
        .resize("root", 64 * MIB, opts(&[("grow", Variant::from(true))]))
        .await
        .unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidArgument");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 8 * MIB);
    assert_eq!(std::fs::metadata(&iso).unwrap().len(), 64 * 1024);

    // Audited under the manage action, refusals too.
    let rows = audit_rows(&bus, "Storage.Resize");
    assert!(rows.len() >= 2, "{rows:?}");
    assert!(
        rows.iter().all(|(a, _)| a == "org.maqet.vm.manage"),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_resize_reaches_the_running_qemu() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (vm, root) = vm_with_root(&bus, &conn, "live-grow", &[]).await;
    let st = storage(&conn, &vm).await;
    let mut watch = StatusWatch::new(&vm).await;
    vm.start().await.unwrap();
    watch.until("running").await;

    st.resize("root", 128 * MIB, opts(&[])).await.unwrap();
    assert_eq!(live_size(&query_block(&conn, &vm).await, "root"), 128 * MIB);
    assert_eq!(virtual_size(&root), 128 * MIB);
    let err = st.resize("root", 64 * MIB, opts(&[])).await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.InvalidArgument");
    assert_eq!(live_size(&query_block(&conn, &vm).await, "root"), 128 * MIB);
    assert!(
        vm.config()
            .await
            .unwrap()
            .contains(&format!("size: {}", 128 * MIB))
    );
    vm.stop(true, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_hot_plugs_survives_a_restart_and_detach_removes_it() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (vm, _) = vm_with_root(&bus, &conn, "plug", &[]).await;
    let st = storage(&conn, &vm).await;
    let mut watch = StatusWatch::new(&vm).await;
    vm.start().await.unwrap();
    watch.until("running").await;

    // A new disk, made by maqet and hot-plugged on maqet's SCSI controller.
    let name = st
        .attach(
            "",
            opts(&[
                ("size", Variant::from("16M")),
                ("name", Variant::from("data")),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(name, "data");
    let blocks = query_block(&conn, &vm).await;
    assert_eq!(live_size(&blocks, "data"), 16 * MIB, "{blocks:?}");
    let row = st
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.0 == "data")
        .unwrap();
    let data_file = PathBuf::from(&row.2);
    assert!(row.3 && row.6, "exists and created by maqet: {row:?}");
    assert_eq!(virtual_size(&data_file), 16 * MIB);

    // An image the user brought, by path, as virtio-blk.
    let brought = bus.root().join("brought.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        brought.to_str().unwrap(),
        "8M",
    ]);
    let virtio = opts(&[("interface", Variant::from("virtio"))]);
    let second = st.attach(brought.to_str().unwrap(), virtio).await.unwrap();
    assert_eq!(second, "disk0");
    assert_eq!(live_size(&query_block(&conn, &vm).await, "disk0"), 8 * MIB);

    // The same file or the same name again: refused, nothing added.
    let before = vm.config().await.unwrap();
    let err = st
        .attach(brought.to_str().unwrap(), opts(&[]))
        .await
        .unwrap_err();
    assert_eq!(
        error_name(&err),
        "org.maqet.Maqet1.Error.AlreadyExists",
        "{err}"
    );
    let err = st
        .attach(
            "",
            opts(&[
                ("size", Variant::from(MIB)),
                ("name", Variant::from("data")),
            ]),
        )
        .await
        .unwrap_err();
    assert_eq!(
        error_name(&err),
        "org.maqet.Maqet1.Error.AlreadyExists",
        "{err}"
    );
    assert_eq!(vm.config().await.unwrap(), before);

    // Online resize of a hot-plugged disk.
    st.resize("data", 32 * MIB, opts(&[])).await.unwrap();
    assert_eq!(live_size(&query_block(&conn, &vm).await, "data"), 32 * MIB);

    // A live snapshot covers the hot-plugged disks too (found by their device id).
    let snaps: SnapshotsProxy = proxy_at(&conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    let job: JobProxy = proxy_at(&conn, snaps.create("s1", opts(&[])).await.unwrap())
        .await
        .unwrap();
    let mut completed = job.receive_completed().await.unwrap();
    if job.state().await.unwrap() == "running" {
        tokio::time::timeout(TIMEOUT, completed.next())
            .await
            .unwrap();
    }
    assert_eq!(
        job.state().await.unwrap(),
        "completed",
        "{}",
        job.message().await.unwrap()
    );
    let on_data = qemu_img(&["snapshot", "-U", "-l", row.2.as_str()]);
    assert!(on_data.contains("s1"), "{on_data}");

    // The stored config has them: the next start attaches them from the command line.
    vm.stop(true, 0).await.unwrap();
    watch.until("stopped").await;
    vm.start().await.unwrap();
    watch.until("running").await;
    let blocks = query_block(&conn, &vm).await;
    assert_eq!(
        block(&blocks, "data").unwrap()["device"],
        "data",
        "{blocks:?}"
    );
    assert_eq!(live_size(&blocks, "data"), 32 * MIB);
    assert!(block(&blocks, "disk0").is_some(), "{blocks:?}");

    // Detach: gone from QEMU and from the config; the image stays.
    st.detach("data").await.unwrap();
    let blocks = query_block(&conn, &vm).await;
    assert!(block(&blocks, "data").is_none(), "{blocks:?}");
    assert!(block(&blocks, "root").is_some());
    assert!(!vm.config().await.unwrap().contains("name: data"));
    assert!(data_file.exists());
    let err = st.detach("data").await.unwrap_err();
    assert_eq!(error_name(&err), "org.maqet.Maqet1.Error.NotFound");

    // Attach again by path, hot-plugged, then detach it while it runs (SCSI needs no
    // help from the guest to let go).
    let again = opts(&[("name", Variant::from("data"))]);
    st.attach(data_file.to_str().unwrap(), again).await.unwrap();
    assert!(block(&query_block(&conn, &vm).await, "data").is_some());
    st.detach("data").await.unwrap();
    assert!(block(&query_block(&conn, &vm).await, "data").is_none());

    vm.stop(true, 0).await.unwrap();
    watch.until("stopped").await;
    // Stopped: only the config changes.
    st.detach("disk0").await.unwrap();
    assert!(!vm.config().await.unwrap().contains("brought.qcow2"));
    assert!(brought.exists());
    let rows = audit_rows(&bus, "Storage.Attach");
    assert!(
        rows.iter().all(|(a, _)| a == "org.maqet.vm.manage"),
        "{rows:?}"
    );
    assert!(rows.len() >= 4, "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_attach_inputs_leave_nothing_behind() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (vm, _) = vm_with_root(&bus, &conn, "refuse", &[]).await;
    let st = storage(&conn, &vm).await;
    let before = vm.config().await.unwrap();
    let home = bus.root().join("home");

    let text = bus.root().join("notes.txt");
    std::fs::write(&text, "not a disk\n").unwrap();
    let fifo = bus.root().join("pipe");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let vmdk = bus.root().join("other.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "8M"]);
    let ssh = home.join(".ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    let key = ssh.join("id_rsa");
    std::fs::write(&key, "secret").unwrap();

    let cases: Vec<(String, HashMap<&str, Variant<'_>>, &str)> = vec![
        (text.display().to_string(), opts(&[]), "InvalidArgument"),
        (vmdk.display().to_string(), opts(&[]), "InvalidArgument"),
        (
            fifo.display().to_string(),
            opts(&[("format", Variant::from("raw"))]),
            "Storage",
        ),
        (
            "/dev/zero".into(),
            opts(&[("format", Variant::from("raw"))]),
            "Storage",
        ),
        (
            "/etc/passwd".into(),
            opts(&[("format", Variant::from("raw"))]),
            "Storage",
        ),
        (
            key.display().to_string(),
            opts(&[("format", Variant::from("raw"))]),
            "Storage",
        ),
        ("relative.qcow2".into(), opts(&[]), "InvalidArgument"),
        ("/no/such/image.qcow2".into(), opts(&[]), "Storage"),
        (String::new(), opts(&[]), "InvalidArgument"),
        (
            String::new(),
            opts(&[("size", Variant::from("lots"))]),
            "InvalidArgument",
        ),
        (
            String::new(),
            opts(&[("size", Variant::from(1000u64))]),
            "InvalidArgument",
        ),
        (
            String::new(),
            opts(&[
                ("size", Variant::from(MIB)),
                ("colour", Variant::from(1u32)),
            ]),
            "InvalidArgument",
        ),
        (
            String::new(),
            opts(&[
                ("size", Variant::from(MIB)),
                ("name", Variant::from("bad name")),
            ]),
            "InvalidConfig",
        ),
        (
            String::new(),
            opts(&[
                ("size", Variant::from(MIB)),
                ("format", Variant::from("vdi")),
            ]),
            "InvalidArgument",
        ),
        (
            String::new(),
            opts(&[
                ("size", Variant::from(MIB)),
                ("interface", Variant::from("ide")),
            ]),
            "InvalidArgument",
        ),
    ];
    for (source, options, kind) in cases {
        let err = st.attach(&source, options).await.unwrap_err();
        assert_eq!(
            error_name(&err),
            format!("org.maqet.Maqet1.Error.{kind}"),
            "{source:?}: {err}"
        );
    }
    assert_eq!(vm.config().await.unwrap(), before);
    assert_eq!(st.list().await.unwrap().len(), 1);
    assert_eq!(std::fs::read(&key).unwrap(), b"secret");
    assert_eq!(std::fs::read(&text).unwrap(), b"not a disk\n");
    // No disk file was made for any refused new disk.
    let vm_dir = bus
        .root()
        .join("data/maqet/vms")
        .join(vm.id().await.unwrap());
    let made: Vec<_> = std::fs::read_dir(&vm_dir)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(made.is_empty(), "{made:?}");

    // A text file attached as raw, because the caller says so, is accepted.
    let raw = opts(&[("format", Variant::from("raw"))]);
    assert_eq!(
        st.attach(text.to_str().unwrap(), raw).await.unwrap(),
        "disk0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_resizes_attaches_and_detaches() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (vm, root) = vm_with_root(&bus, &conn, "cli-disks", &[]).await;
    let out = bus.maqet(&["disk", "resize", "cli-disks", "root", "48M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("root is now 48"), "{}", stdout(&out));
    assert_eq!(virtual_size(&root), 48 * MIB);
    let out = bus.maqet(&["disk", "resize", "cli-disks", "root", "16M"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--shrink"), "{}", stderr(&out));
    let out = bus.maqet(&["disk", "resize", "--shrink", "cli-disks", "root", "16M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(virtual_size(&root), 16 * MIB);

    let out = bus.maqet(&[
        "--json",
        "disk",
        "attach",
        "cli-disks",
        "--size",
        "4M",
        "--name",
        "scratch",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["disk"], "scratch");
    assert!(vm.config().await.unwrap().contains("name: scratch"));
    let out = bus.maqet(&["disk", "detach", "cli-disks", "scratch"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!vm.config().await.unwrap().contains("name: scratch"));
    let out = bus.maqet(&["disk", "detach", "cli-disks", "scratch"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("its disks are: root"),
        "{}",
        stderr(&out)
    );
}
