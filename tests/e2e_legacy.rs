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

/// The rest of 0.0.x's spellings: `add --config a b`, `add --empty NAME`,
/// `ls --status`, `--format`, `start --wait-for`, `rm --all`; the ones that cannot be
/// kept answer with exit 2 and the new spelling.
#[test]
fn more_old_cli_spellings() {
    let bus = Bus::start();
    let a = bus.root().join("a.yaml");
    let b = bus.root().join("b.yaml");
    std::fs::write(&a, tiny_vm_yaml("one")).unwrap();
    std::fs::write(&b, "memory: 80\n").unwrap();
    let out = bus.maqet(&["add", "--config", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = bus.maqet(&["add", "--empty", "placeholder"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("maqet apply placeholder"),
        "{}",
        stdout(&out)
    );
    let out = bus.maqet(&["--format", "yaml", "inspect", "placeholder"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: serde_json::Value = serde_yaml::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown["name"], "placeholder", "{}", stdout(&out));
    assert_eq!(shown["status"], "created");
    let out = bus.maqet(&["add", "--empty", "x", a.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // `process-started` was 0.0.x's default: what start always waits for.
    let out = bus.maqet(&["start", "one", "--wait-for", "process-started"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["--format", "json", "ls", "--status", "running"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let running: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let names: Vec<_> = running
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["one"]);
    let out = bus.maqet(&["--format", "plain", "ls", "--status", "created"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("placeholder") && !stdout(&out).contains("one "));
    // 0.0.x's `orphaned`/`corrupted` states do not exist here: clap lists the real ones.
    let out = bus.maqet(&["ls", "--status", "orphaned"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("running"), "{}", stderr(&out));

    // Conditions that cannot be kept name the new spelling; nothing is started.
    let out = bus.maqet(&["start", "placeholder", "--wait-for", "file-exists"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--wait-for status=running"),
        "{}",
        stderr(&out)
    );
    let out = bus.maqet(&["--json", "status", "placeholder"]);
    assert!(stdout(&out).contains("\"created\""), "{}", stdout(&out));
    // Filled in with `apply`, then maqet's own conditions are waited for.
    let p = bus.root().join("p.yaml");
    std::fs::write(&p, tiny_vm_yaml("placeholder")).unwrap();
    let out = bus.maqet(&["apply", "placeholder", p.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["start", "placeholder", "--wait-for", "status=running"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // `rm --all` asks first; with no terminal to ask on it needs --force.
    let out = bus.maqet(&["rm", "--all"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert!(bus.maqet(&["status", "one"]).status.success());
    let out = bus.maqet(&["rm", "--all", "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("removed one"), "{}", stdout(&out));
    let out = bus.maqet(&["--json", "ls"]);
    assert_eq!(stdout(&out).trim(), "[]");
}

/// `storage orphaned`: a disk maqet created outlives its VM when removed without
/// `--delete-storage`, and is listed with the VM's name.
#[test]
fn storage_orphaned_lists_disks_of_removed_vms() {
    let bus = Bus::start();
    let config = bus.root().join("vm.yaml");
    let yaml = format!(
        "{}storage: [{{name: hdd, size: 1G}}]\n",
        tiny_vm_yaml("gone")
    );
    std::fs::write(&config, yaml).unwrap();
    let out = bus.maqet(&["--json", "add", "-c", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let added: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let disk = bus
        .root()
        .join("data/maqet/vms")
        .join(added["id"].as_str().unwrap())
        .join("hdd.qcow2");
    assert!(bus.maqet(&["start", "gone"]).status.success());
    let out = bus.maqet(&["--json", "storage", "orphaned"]);
    assert_eq!(
        stdout(&out).trim(),
        "[]",
        "a running VM's disk is not orphaned"
    );
    assert!(bus.maqet(&["stop", "--force", "gone"]).status.success());
    let out = bus.maqet(&["rm", "gone"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = bus.maqet(&["--json", "storage", "orphaned"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed[0]["path"], disk.to_str().unwrap(), "{listed}");
    assert_eq!(listed[0]["former_vm"], "gone");
    assert!(listed[0]["size"].as_u64().unwrap() > 0);
    let out = bus.maqet(&["storage", "orphaned"]);
    assert!(
        stdout(&out).contains(disk.to_str().unwrap()),
        "{}",
        stdout(&out)
    );
    assert!(disk.exists(), "listing deletes nothing");
}

/// maqet 0.0.15's `instances.db`, built with its schema (state_manager.py after the
/// v6 migration, WAL mode as the old tool sets it).
fn old_database(path: &std::path::Path, rows: &[(&str, &str, &str)]) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE vm_instances (
            id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, config_path TEXT,
            config_data TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'created', pid INTEGER,
            runner_pid INTEGER, socket_path TEXT,
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
            updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, qmp_socket_path TEXT);
         CREATE INDEX idx_vm_name ON vm_instances(name);
         CREATE TABLE schema_version (version INTEGER PRIMARY KEY,
            applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, description TEXT);
         INSERT INTO schema_version (version, description) VALUES (6, 'storage registry');
         CREATE TABLE storage_registry (id INTEGER PRIMARY KEY AUTOINCREMENT,
            vm_name TEXT NOT NULL, storage_path TEXT NOT NULL, storage_type TEXT NOT NULL,
            size_bytes INTEGER, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
            last_verified TIMESTAMP, UNIQUE(vm_name, storage_path));",
    )
    .unwrap();
    for (id, name, config) in rows {
        c.execute(
            "INSERT INTO vm_instances (id, name, config_path, config_data, status) VALUES (?1, ?2, '/old/vm.yaml', ?3, 'stopped')",
            [id, name, config],
        )
        .unwrap();
    }
}

/// `import-legacy` defines the old database's VMs, skips and reports the ones whose
/// config does not validate (or whose name is taken), and never changes the file.
#[test]
fn import_legacy_reads_the_old_database_and_never_changes_it() {
    let bus = Bus::start();
    let accel = common::accel();
    let readme = format!(
        r#"{{"binary": "qemu-system-x86_64", "memory": "64M", "display": "none", "arguments": ["nodefaults", {{"accel": "{accel}"}}], "storage": [{{"name": "hdd", "size": "20G", "type": "qcow2", "interface": "virtio"}}]}}"#
    );
    let db = bus.root().join("old/instances.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    old_database(
        &db,
        &[
            ("0a", "web", &readme),
            ("0b", "typo", r#"{"memry": "1G"}"#),
            ("0c", "taken", "{}"),
            ("0d", "blank", "{}"),
        ],
    );
    let before = std::fs::read(&db).unwrap();
    std::fs::write(bus.root().join("t.yaml"), tiny_vm_yaml("taken")).unwrap();
    let t = bus.root().join("t.yaml");
    assert!(
        bus.maqet(&["add", "-c", t.to_str().unwrap()])
            .status
            .success()
    );

    let out = bus.maqet(&["import-legacy", db.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(
        text.contains("imported web") && text.contains("imported blank"),
        "{text}"
    );
    assert!(
        text.contains("skipped typo:") && text.contains("memory"),
        "{text}"
    );
    assert!(
        text.contains("skipped taken:") && text.contains("already exists"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "the old database is unchanged"
    );

    // The imported VM runs as it did, its disk in its own directory now.
    let out = bus.maqet(&["start", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["--json", "storage", "ls", "web"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed[0]["exists"], true, "{listed}");
    assert_eq!(listed[0]["virtual_size"], 20u64 << 30, "{listed}");
    assert!(bus.maqet(&["stop", "--force", "web"]).status.success());
    let out = bus.maqet(&["rm", "--delete-storage", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Again: everything is taken now, and still nothing is written to the old file.
    let out = bus.maqet(&["--json", "import-legacy", db.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["imported"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["skipped"].as_array().unwrap().len(), 3, "{report}");
    assert_eq!(std::fs::read(&db).unwrap(), before);

    let out = bus.maqet(&[
        "import-legacy",
        bus.root().join("nope.db").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
}

/// `backing_file` without `backing_format` is probed with qemu-img; the overlay maqet
/// creates names its backing relatively, so the directory can move.
#[test]
fn backing_format_is_probed_and_a_moved_directory_keeps_its_chain() {
    let bus = Bus::start();
    let dir = bus.root().join("vmdir");
    std::fs::create_dir(&dir).unwrap();
    let base = dir.join("base.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let config = dir.join("vm.yaml");
    std::fs::write(
        &config,
        format!(
            "{}storage: [{{name: root, file: overlay.qcow2, backing_file: base.qcow2}}]\n",
            tiny_vm_yaml("layered")
        ),
    )
    .unwrap();
    let out = bus.maqet(&["add", "-c", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["inspect", "--config", "layered"]);
    assert!(
        stdout(&out).contains("backing_format: qcow2"),
        "{}",
        stdout(&out)
    );
    let out = bus.maqet(&["start", "layered"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let overlay = dir.join("overlay.qcow2");
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", overlay.to_str().unwrap()])
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], "base.qcow2", "{info}");
    assert_eq!(info["virtual-size"], 64u64 << 20);
    assert!(bus.maqet(&["stop", "--force", "layered"]).status.success());
    assert!(bus.maqet(&["rm", "layered"]).status.success());

    // Moved as a whole; a config naming only the overlay starts on the same chain.
    let moved = bus.root().join("moved");
    std::fs::rename(&dir, &moved).unwrap();
    let config = moved.join("again.yaml");
    std::fs::write(
        &config,
        format!(
            "{}storage: [{{name: root, file: overlay.qcow2}}]\n",
            tiny_vm_yaml("moved")
        ),
    )
    .unwrap();
    assert!(
        bus.maqet(&["add", "-c", config.to_str().unwrap()])
            .status
            .success()
    );
    let out = bus.maqet(&["start", "moved"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(bus.maqet(&["stop", "--force", "moved"]).status.success());

    // Only a failed probe is refused, and the error says what to write.
    std::fs::write(
        &config,
        format!(
            "{}storage: [{{name: root, file: o2.qcow2, backing_file: missing.qcow2}}]\n",
            tiny_vm_yaml("broken")
        ),
    )
    .unwrap();
    let out = bus.maqet(&["add", "-c", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot tell the format of backing file")
            && stderr(&out).contains("backing_format: qcow2"),
        "{}",
        stderr(&out)
    );
}

/// `maqet rm --all` under a terminal (util-linux `script` gives it one): it asks;
/// "n" removes nothing; "y" removes the VMs that are not running and reports the
/// running one as kept (exit 1), since no `--force` was given.
#[test]
fn rm_all_asks_on_a_terminal() {
    use std::io::Write;
    let bus = Bus::start();
    for name in ["idle", "busy"] {
        let file = bus.root().join(format!("{name}.yaml"));
        std::fs::write(&file, tiny_vm_yaml(name)).unwrap();
        assert!(
            bus.maqet(&["add", "-c", file.to_str().unwrap()])
                .status
                .success()
        );
    }
    assert!(bus.maqet(&["start", "busy"]).status.success());
    let on_terminal = |answer: &str| {
        let base = bus.maqet_command(&[]);
        let line = format!("{} rm --all", base.get_program().to_str().unwrap());
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &line, "/dev/null"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd.spawn().expect("util-linux script");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = on_terminal("n\n");
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("Remove all 2 VMs? [y/N]"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("nothing removed"), "{}", stdout(&out));
    assert!(bus.maqet(&["status", "idle"]).status.success());

    let out = on_terminal("y\n");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("removed idle"), "{}", stdout(&out));
    assert!(stdout(&out).contains("kept busy"), "{}", stdout(&out));
    assert_eq!(bus.maqet(&["status", "idle"]).status.code(), Some(3));
    assert!(bus.maqet(&["status", "busy"]).status.success());
    assert!(bus.maqet(&["stop", "--force", "busy"]).status.success());
}
