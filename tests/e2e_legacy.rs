//! End-to-end: configs written for maqet 0.0.x keep working through the CLI
//! (docs/configuration.md, "Coming from maqet 0.0.x").

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{Bus, stderr, stdout, tiny_vm_yaml};

/// The old README's first example: a disk with no `file`, which maqet creates in the
/// VM's own data directory, owns, and deletes with `--delete-storage`.
#[test]
fn readme_disk_without_file_is_created_owned_and_deleted() {
    let bus = Bus::start();
    let config = bus.root().join("old.yaml");
    let yaml = format!(
        "{}storage: [{{name: hdd, size: 20G, type: qcow2, interface: virtio}}]\n",
        tiny_vm_yaml("legacy")
    );
    std::fs::write(&config, yaml).unwrap();

    let out = bus.maqet(&["--json", "add", "-c", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let added: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let id = added["id"].as_str().unwrap();
    let vm_dir = bus.root().join("data/maqet/vms").join(id);
    let disk = vm_dir.join("hdd.qcow2");
    assert!(!disk.exists(), "nothing is created before the first start");

    let out = bus.maqet(&["start", "legacy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", disk.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(info.status.success(), "{}", stderr(&info));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 20u64 << 30);
    let mode = std::fs::metadata(&vm_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the VM's data directory is private");

    // maqet says the disk is its own.
    let out = bus.maqet(&["--json", "storage", "ls", "legacy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed[0]["created_by_maqet"], true, "{listed}");

    let out = bus.maqet(&["stop", "--force", "legacy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["rm", "--delete-storage", "legacy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("deleted {}", disk.display())),
        "{}",
        stdout(&out)
    );
    assert!(!disk.exists(), "the disk is deleted");
    assert!(!vm_dir.exists(), "and its now empty directory");
}

/// `--delete-storage` deletes only maqet's disk: files the user put in the VM's
/// directory stay, and so does the directory.
#[test]
fn delete_storage_keeps_the_users_files_in_the_vm_directory() {
    let bus = Bus::start();
    let config = bus.root().join("old.yaml");
    let yaml = format!(
        "{}storage: [{{name: hdd, size: 1G}}]\n",
        tiny_vm_yaml("keep")
    );
    std::fs::write(&config, yaml).unwrap();
    let out = bus.maqet(&["--json", "add", "-c", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let added: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let vm_dir = bus
        .root()
        .join("data/maqet/vms")
        .join(added["id"].as_str().unwrap());
    let out = bus.maqet(&["start", "keep"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["stop", "--force", "keep"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(vm_dir.join("notes.txt"), "mine").unwrap();

    let out = bus.maqet(&["rm", "--delete-storage", "keep"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !vm_dir.join("hdd.qcow2").exists(),
        "maqet's disk is deleted"
    );
    assert_eq!(
        std::fs::read_to_string(vm_dir.join("notes.txt")).unwrap(),
        "mine"
    );
}

/// A share written the old way (`mount_tag`/`security_model` on the entry, a directory
/// that does not exist yet): the directory is created and QEMU gets those settings.
#[test]
fn old_style_share_is_created_and_honoured() {
    let bus = Bus::start();
    let shared = bus.root().join("home/new/shared");
    let config = bus.root().join("old.yaml");
    let yaml = format!(
        "{}storage: [{{name: share, type: virtfs, path: '{}', mount_tag: hostshare, security_model: passthrough}}]\n",
        tiny_vm_yaml("sharing"),
        shared.display()
    );
    std::fs::write(&config, yaml).unwrap();
    let out = bus.maqet(&["add", "-c", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["start", "sharing"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(shared.is_dir(), "the missing share directory is created");
    let mode = std::fs::metadata(&shared).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);

    let qemu = bus.marked_processes("qemu");
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", qemu[0])).unwrap();
    let words: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let virtfs = words
        .iter()
        .skip_while(|w| *w != "-virtfs")
        .nth(1)
        .unwrap_or_else(|| panic!("no -virtfs in {words:?}"));
    assert!(
        virtfs.contains(",mount_tag=hostshare,security_model=passthrough,"),
        "{virtfs}"
    );
    let out = bus.maqet(&["stop", "--force", "sharing"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `memory: 0.125GB` (a spelling QEMU itself refuses) starts, with `-m 128M`.
#[test]
fn old_memory_spelling_starts() {
    let bus = Bus::start();
    let config = bus.root().join("old.yaml");
    let yaml = tiny_vm_yaml("mem").replace("memory: 64\n", "memory: 0.125GB\n");
    assert!(yaml.contains("0.125GB"));
    std::fs::write(&config, yaml).unwrap();
    let out = bus.maqet(&["add", "-c", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["start", "mem"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let qemu = bus.marked_processes("qemu");
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", qemu[0])).unwrap();
    assert!(
        cmdline.windows(8).any(|w| w == b"-m\x00128M\x00"),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    let out = bus.maqet(&["stop", "--force", "mem"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `{object: {rng-random: null, filename: /dev/urandom}}` passes the location check
/// (an entropy device, not a system file) and QEMU starts with it.
#[test]
fn rng_random_object_starts() {
    let bus = Bus::start();
    let config = bus.root().join("old.yaml");
    let yaml = format!(
        "{}  - object: {{rng-random: null, filename: /dev/urandom, id: rng0}}\n  - device: {{virtio-rng-pci: null, rng: rng0}}\n",
        tiny_vm_yaml("rng")
    );
    std::fs::write(&config, yaml).unwrap();
    let out = bus.maqet(&["add", "-c", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["start", "rng"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["stop", "--force", "rng"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The old CLI spellings `add --vm-config a.yaml b.yaml` and `info VM`.
#[test]
fn old_cli_spellings() {
    let bus = Bus::start();
    let a = bus.root().join("a.yaml");
    let b = bus.root().join("b.yaml");
    std::fs::write(&a, tiny_vm_yaml("spelled")).unwrap();
    std::fs::write(&b, "memory: 96\n").unwrap();
    let out = bus.maqet(&[
        "add",
        "--vm-config",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["info", "spelled", "--config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("memory: 96"), "{}", stdout(&out));
}
