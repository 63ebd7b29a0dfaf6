//! End-to-end tests of `load`: YAML in, argv / diagnostics / YAML out.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::*;

const HOME: &str = "/home/u";
/// The data directory of the VM being validated.
const VM_DATA_DIR: &str = "/home/u/.local/share/maqet/vms/id-1";

/// A PATH holding a fake `qemu-system-x86_64`.
struct TestEnv {
    _dir: tempfile::TempDir,
    path_env: OsString,
}

impl TestEnv {
    fn new() -> TestEnv {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("qemu-system-x86_64");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path_env = dir.path().as_os_str().to_owned();
        TestEnv {
            _dir: dir,
            path_env,
        }
    }

    fn ctx(&self) -> ValidationContext<'_> {
        ValidationContext {
            home: Path::new(HOME),
            path_env: Some(&self.path_env),
            default_arch: "x86_64",
            check_path: &deny_secrets,
            vm_data_dir: Some(Path::new(VM_DATA_DIR)),
            probe_format: None,
        }
    }
}

fn deny_secrets(path: &Path, _usage: PathUse) -> Result<std::path::PathBuf, String> {
    if path.starts_with("/etc") || path.starts_with("/home/u/.ssh") {
        Err("it is a system or secret location".to_owned())
    } else {
        Ok(path.to_path_buf())
    }
}

fn source(origin: &str, base_dir: &str, text: &str) -> ConfigSource {
    ConfigSource {
        origin: origin.to_owned(),
        text: text.to_owned(),
        base_dir: base_dir.into(),
    }
}

fn load_sources(sources: &[ConfigSource]) -> Result<VmConfig, ConfigError> {
    let env = TestEnv::new();
    load(sources, &env.ctx())
}

fn load_one(text: &str) -> Result<VmConfig, ConfigError> {
    load_sources(&[source("vm.yaml", "/vms/web", text)])
}

fn must_load(sources: &[ConfigSource]) -> VmConfig {
    load_sources(sources).unwrap_or_else(|e| panic!("unexpected errors:\n{e}"))
}

fn argv_of(text: &str) -> Vec<String> {
    must_load(&[source("vm.yaml", "/vms/web", text)]).qemu_args()
}

fn errors_of(sources: &[ConfigSource]) -> Vec<Diagnostic> {
    match load_sources(sources) {
        Ok(config) => panic!("expected errors, got {:?}", config.qemu_args()),
        Err(e) => e.diagnostics,
    }
}

/// The diagnostic whose message contains `needle`, checked to sit at `origin:line:col`.
fn find_diag<'d>(
    diags: &'d [Diagnostic],
    origin: &str,
    line: usize,
    col: usize,
    needle: &str,
) -> &'d Diagnostic {
    let d = diags
        .iter()
        .find(|d| d.message.contains(needle))
        .unwrap_or_else(|| panic!("no diagnostic containing {needle:?} in:\n{}", render(diags)));
    assert_eq!(
        (d.origin.as_str(), d.line, d.col),
        (origin, line, col),
        "location of {needle:?} in:\n{}",
        render(diags)
    );
    d
}

fn error_in(text: &str, line: usize, col: usize, needle: &str) -> Diagnostic {
    let diags = errors_of(&[source("vm.yaml", "/vms/web", text)]);
    find_diag(&diags, "vm.yaml", line, col, needle).clone()
}

fn render(diags: &[Diagnostic]) -> String {
    diags.iter().map(|d| format!("{d}\n")).collect()
}

/// `load(to_yaml())` from another directory gives an equal config, the same
/// argv, and the same YAML again.
fn assert_round_trip(config: &VmConfig) {
    let yaml = config.to_yaml();
    let again = load_sources(&[source("<stored>", "/somewhere/else", &yaml)])
        .unwrap_or_else(|e| panic!("stored YAML does not load:\n{yaml}\n{e}"));
    assert_eq!(
        again.qemu_args(),
        config.qemu_args(),
        "argv after round trip of:\n{yaml}"
    );
    assert_eq!(&again, config, "config after round trip of:\n{yaml}");
    assert_eq!(again.to_yaml(), yaml);
}

const GOLDEN: &[(&str, &[&str])] = &[
    // Flags, with or without a leading dash.
    ("arguments: [enable-kvm]", &["-enable-kvm"]),
    (
        "arguments: [-enable-kvm, --nodefaults, S]",
        &["-enable-kvm", "-nodefaults", "-S"],
    ),
    (
        "arguments: [{no-reboot: null}, {no-shutdown: }]",
        &["-no-reboot", "-no-shutdown"],
    ),
    // Scalars: strings, numbers as written, booleans as on/off.
    ("arguments: [{machine: q35}]", &["-machine", "q35"]),
    ("arguments: [{M: pc}]", &["-M", "pc"]),
    (
        "arguments: [{smp: 04}, {icount: 1e3}, {win2k-hack: true}]",
        &["-smp", "04", "-icount", "1e3", "-win2k-hack", "on"],
    ),
    // Lists join with commas.
    (
        "arguments: [{boot: [order=c, menu=on]}]",
        &["-boot", "order=c,menu=on"],
    ),
    // Multi-key mappings: positional part, then key=value suboptions.
    (
        "arguments: [{display: gtk, zoom-to-fit: on}]",
        &["-display", "gtk,zoom-to-fit=on"],
    ),
    (
        "arguments: [{display: gtk, show-cursor: true, gl: false}]",
        &["-display", "gtk,show-cursor=on,gl=off"],
    ),
    (
        "arguments: [{drive: null, if: none, id: d0, file: a.img}]",
        &["-drive", "if=none,id=d0,file=/vms/web/a.img"],
    ),
    // Nested mappings: a bare first word, dotted keys, repeated list keys.
    (
        "arguments: [{device: {virtio-rng-pci: null}}]",
        &["-device", "virtio-rng-pci"],
    ),
    (
        "arguments: [{device: {virtio-rng-pci: null, id: rng0}}]",
        &["-device", "virtio-rng-pci,id=rng0"],
    ),
    (
        "arguments: [{blockdev: {driver: qcow2, node-name: d0, file: {driver: file, filename: a.img}}}]",
        &[
            "-blockdev",
            "driver=qcow2,node-name=d0,file.driver=file,file.filename=/vms/web/a.img",
        ],
    ),
    (
        "arguments: [{netdev: {user: null, id: n0, hostfwd: [tcp::2222-:22, tcp::8080-:80]}}]",
        &[
            "-netdev",
            "user,id=n0,hostfwd=tcp::2222-:22,hostfwd=tcp::8080-:80",
        ],
    ),
    (
        "arguments: [{global: {driver: cfi.pflash01, property: secure, value: true}}]",
        &["-global", "driver=cfi.pflash01,property=secure,value=on"],
    ),
    (
        "arguments: [{device: virtio-net-pci, netdev: n0, mac: '52:54:00:12:34:56'}]",
        &["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"],
    ),
    // Top-level keys come first, in a fixed order, whatever order they are written in.
    (
        "vga: std\ndisplay: none\ncpu: 2\nmemory: 1G\n",
        &["-m", "1G", "-smp", "2", "-display", "none", "-vga", "std"],
    ),
    // Integers are normalized, size strings kept as written.
    ("memory: 0x800\ncpu: +2\n", &["-m", "2048", "-smp", "2"]),
    (
        "memory: 1.5GiB\ncpu: 4,sockets=1,cores=4\n",
        &["-m", "1536M", "-smp", "4,sockets=1,cores=4"],
    ),
    // Top-level `cpu` is -smp; `cpu` in arguments is -cpu.
    (
        "cpu: 2\narguments: [{cpu: host}]\n",
        &["-smp", "2", "-cpu", "host"],
    ),
    // Raw args are passed verbatim, one item one word.
    (
        "args: [-cpu, host, -append, 'console=ttyS0 root=/dev/vda1 quiet', -no-reboot, \"it's\"]",
        &[
            "-cpu",
            "host",
            "-append",
            "console=ttyS0 root=/dev/vda1 quiet",
            "-no-reboot",
            "it's",
        ],
    ),
    // Order: top-level, arguments, storage, args.
    (
        "args: [-snapshot]\nstorage: [{type: raw, file: r.img}]\narguments: [nodefaults]\nmemory: 512\n",
        &[
            "-m",
            "512",
            "-nodefaults",
            "-drive",
            "file=/vms/web/r.img,format=raw,if=virtio,id=disk0,node-name=maqet-d0",
            "-snapshot",
        ],
    ),
    // Storage.
    (
        "storage: [{name: root, type: qcow2, file: disks/root.qcow2, size: 10G, interface: virtio}]",
        &[
            "-drive",
            "file=/vms/web/disks/root.qcow2,format=qcow2,if=virtio,id=root,node-name=maqet-d0",
        ],
    ),
    (
        "storage: [{name: a, type: raw, file: /data/a.img, interface: sata}, {name: b, type: qcow2, file: b.qcow2, interface: sata}]",
        &[
            "-device",
            "ahci,id=maqet-ahci",
            "-drive",
            "file=/data/a.img,format=raw,if=none,id=a,node-name=maqet-d0",
            "-device",
            "ide-hd,drive=a,bus=maqet-ahci.0",
            "-drive",
            "file=/vms/web/b.qcow2,format=qcow2,if=none,id=b,node-name=maqet-d1",
            "-device",
            "ide-hd,drive=b,bus=maqet-ahci.1",
        ],
    ),
    (
        "storage: [{name: s1, type: qcow2, file: s1.qcow2, interface: scsi}, {name: s2, type: raw, file: s2.img, interface: scsi}]",
        &[
            "-device",
            "virtio-scsi-pci,id=maqet-scsi",
            "-drive",
            "file=/vms/web/s1.qcow2,format=qcow2,if=none,id=s1,node-name=maqet-d0",
            "-device",
            "scsi-hd,drive=s1,bus=maqet-scsi.0",
            "-drive",
            "file=/vms/web/s2.img,format=raw,if=none,id=s2,node-name=maqet-d1",
            "-device",
            "scsi-hd,drive=s2,bus=maqet-scsi.0",
        ],
    ),
    (
        "storage: [{type: raw, file: i.img, interface: ide}, {type: qcow2, file: n.qcow2, interface: none}]\narguments: [{device: {virtio-blk-pci: null, drive: disk1}}]\n",
        &[
            "-device",
            "virtio-blk-pci,drive=disk1",
            "-drive",
            "file=/vms/web/i.img,format=raw,if=ide,id=disk0,node-name=maqet-d0",
            "-drive",
            "file=/vms/web/n.qcow2,format=qcow2,if=none,id=disk1,node-name=maqet-d1",
        ],
    ),
    (
        "storage: [{name: base, type: qcow2, file: overlay.qcow2, backing_file: base.qcow2, backing_format: qcow2, options: {cache: none, discard: unmap, readonly: true}}]",
        &[
            "-drive",
            "file=/vms/web/overlay.qcow2,format=qcow2,if=virtio,id=base,node-name=maqet-d0,backing.driver=qcow2,backing.file.filename=/vms/web/base.qcow2,readonly=on,cache=none,discard=unmap",
        ],
    ),
    (
        "storage: [{name: share, type: virtfs, path: ~/shared, options: {mount_tag: hostshare, security_model: mapped-xattr, readonly: true}}, {type: virtfs, path: /srv/x, options: {multidevs: remap}}]",
        &[
            "-virtfs",
            "local,path=/home/u/shared,mount_tag=hostshare,security_model=mapped-xattr,id=share,readonly=on",
            "-virtfs",
            "local,path=/srv/x,mount_tag=share1,security_model=mapped-xattr,id=share1,multidevs=remap",
        ],
    ),
    // Host paths: raw path options verbatim, suboption paths with commas escaped.
    (
        "arguments: [{kernel: boot/vmlinuz}, {initrd: '../shared/initrd,1.img'}, {append: 'console=ttyS0 root=/dev/vda'}]",
        &[
            "-kernel",
            "/vms/web/boot/vmlinuz",
            "-initrd",
            "/vms/shared/initrd,1.img",
            "-append",
            "console=ttyS0 root=/dev/vda",
        ],
    ),
    (
        "arguments: [{bios: ~/fw/OVMF.fd}, {pflash: vars.fd}]",
        &["-bios", "/home/u/fw/OVMF.fd", "-pflash", "/vms/web/vars.fd"],
    ),
    (
        "arguments: [{drive: {file: 'my,disk.img', format: raw, if: virtio}}]",
        &["-drive", "file=/vms/web/my,,disk.img,format=raw,if=virtio"],
    ),
    (
        "storage: [{name: c, type: raw, file: 'a,b.img'}]",
        &[
            "-drive",
            "file=/vms/web/a,,b.img,format=raw,if=virtio,id=c,node-name=maqet-d0",
        ],
    ),
    (
        "arguments: [{chardev: {socket: null, id: c0, path: run/c0.sock, server: on, wait: off}}]",
        &[
            "-chardev",
            "socket,id=c0,path=/vms/web/run/c0.sock,server=on,wait=off",
        ],
    ),
    // Protocol values and -blockdev node references are not host paths.
    (
        "arguments: [{drive: {file: 'nbd:localhost:10809', if: virtio}}, {blockdev: {driver: qcow2, node-name: top, file: top-file}}]",
        &[
            "-drive",
            "file=nbd:localhost:10809,if=virtio",
            "-blockdev",
            "driver=qcow2,node-name=top,file=top-file",
        ],
    ),
    // Strings that look like other types stay strings.
    (
        "name: '123'\narguments: [{fw_cfg: {name: opt/x, string: 'on'}}, {x: 'null'}, {y: '1e3'}, {z: 'yes'}, {w: \"0x10\"}]",
        &[
            "-fw_cfg",
            "name=opt/x,string=on",
            "-x",
            "null",
            "-y",
            "1e3",
            "-z",
            "yes",
            "-w",
            "0x10",
        ],
    ),
    // Empty documents are empty configs.
    ("", &[]),
    ("---\n# nothing\n", &[]),
];

#[test]
fn golden_argv_and_round_trip() {
    assert!(GOLDEN.len() >= 25);
    for (yaml, expected) in GOLDEN {
        let config = load_one(yaml).unwrap_or_else(|e| panic!("{yaml}\n{e}"));
        assert_eq!(config.qemu_args(), *expected, "argv of:\n{yaml}");
        assert_round_trip(&config);
    }
}

const BASE: &str = "\
binary: qemu-system-x86_64
cpu: 1
display: none
arguments: [{machine: q35}, {m: 256M}, nodefaults]
";
const EXTRA: &str = "arguments: [{m: 512M}, {device: {virtio-rng-pci: null}}]\n";

#[test]
fn two_file_golden_example() {
    let config = must_load(&[
        source("base.yaml", "/vms/a", BASE),
        source("extra.yaml", "/vms/b", EXTRA),
    ]);
    assert_eq!(
        config.qemu_args(),
        [
            "-smp",
            "1",
            "-display",
            "none",
            "-machine",
            "q35",
            "-m",
            "512M",
            "-nodefaults",
            "-device",
            "virtio-rng-pci"
        ]
    );
    assert_eq!(config.binary(), "qemu-system-x86_64");
    assert_round_trip(&config);
}

#[test]
fn stored_configs_load_without_the_binary() {
    let config = load_one("binary: qemu-system-x86_64\nmemory: 1G\n").unwrap();
    let ctx = ValidationContext {
        home: Path::new(HOME),
        path_env: Some(OsStr::new("/nonexistent")),
        default_arch: "x86_64",
        check_path: &deny_secrets,
        vm_data_dir: None,
        probe_format: None,
    };
    assert!(load(&[source("x", "/", &config.to_yaml())], &ctx).is_err());
    let stored = load_stored(&config.to_yaml(), &ctx).unwrap();
    assert_eq!(stored, config);
    assert!(stored.resolve_binary(ctx.path_env).is_err());
    // Everything else is still validated.
    let err = load_stored("memory: 0\n", &ctx).unwrap_err();
    find_diag(
        &err.diagnostics,
        "<stored config>",
        1,
        9,
        "greater than zero",
    );
}

#[test]
fn normalized_yaml() {
    let config = load_one(
        "storage: [{type: qcow2, file: d.qcow2, size: 1G}]\nmemory: 0x400\nname: web\narguments: [{kernel: k}]\n",
    )
    .unwrap();
    assert_eq!(
        config.to_yaml(),
        "\
name: web
memory: 1024
arguments:
  - kernel: /vms/web/k
storage:
  - name: disk0
    type: qcow2
    file: /vms/web/d.qcow2
    size: 1G
"
    );
    assert_eq!(load_one("").unwrap().to_yaml(), "{}\n");
}

#[test]
fn accessors() {
    let env = TestEnv::new();
    let config = load(&[source("vm.yaml", "/vms/web", "name: web\n")], &env.ctx()).unwrap();
    assert_eq!(config.name(), Some("web"));
    assert_eq!(config.binary(), "qemu-system-x86_64");
    let found = config.resolve_binary(Some(&env.path_env)).unwrap();
    assert!(found.ends_with("qemu-system-x86_64"));
    let err = config
        .resolve_binary(Some(OsStr::new("/nonexistent")))
        .unwrap_err();
    assert!(
        err.contains("not found in PATH") && err.contains("qemu-system-x86"),
        "{err}"
    );
}

#[test]
fn storage_entries_are_typed() {
    let config = load_one(
        "\
storage:
  - {name: root, type: qcow2, file: disks/root.qcow2, size: 10G, interface: virtio}
  - {name: data, type: raw, file: /data/d.img, size: 512M, interface: sata}
  - {name: base, type: qcow2, file: overlay.qcow2, backing_file: base.qcow2, backing_format: qcow2}
  - {name: share, type: virtfs, path: ~/shared, options: {mount_tag: hostshare, security_model: mapped-xattr, readonly: true}}
  - {type: raw, file: big.img, size: 1099511627776}
",
    )
    .unwrap();
    let s = config.storage();
    assert_eq!(s.len(), 5);
    assert_eq!(s[0].name, "root");
    assert_eq!(s[0].kind, StorageKind::Qcow2);
    assert_eq!(s[0].path, Path::new("/vms/web/disks/root.qcow2"));
    assert_eq!(s[0].size, Some(10 << 30));
    assert_eq!(s[0].interface, Interface::Virtio);
    assert_eq!(s[1].interface, Interface::Sata);
    assert_eq!(s[1].size, Some(512 << 20));
    assert_eq!(
        s[2].backing_file.as_deref(),
        Some(Path::new("/vms/web/base.qcow2"))
    );
    assert_eq!(s[2].backing_format.as_deref(), Some("qcow2"));
    assert_eq!(s[2].size, None);
    assert_eq!(s[3].kind, StorageKind::Virtfs);
    assert_eq!(s[3].path, Path::new("/home/u/shared"));
    assert!(s[3].readonly);
    assert_eq!(s[3].mount_tag.as_deref(), Some("hostshare"));
    assert_eq!(s[3].interface, Interface::None);
    assert_eq!(s[4].name, "disk3");
    assert_eq!(s[4].size, Some(1 << 40));
}

// ---- errors: each names origin, line, column and what is wrong ----

#[test]
fn yaml_syntax_error() {
    let d = error_in(
        "memory: 1G\narguments: [a, b\nstorage: []\n",
        3,
        8,
        "YAML syntax error",
    );
    assert!(d.message.contains("':'"), "{}", d.message);
}

#[test]
fn unknown_top_level_key() {
    let d = error_in("memroy: 1G\n", 1, 1, "unknown key `memroy`");
    let hint = d.hint.unwrap();
    assert!(hint.starts_with("did you mean `memory`?"), "{hint}");
    assert!(hint.contains("name, binary, memory, cpu"), "{hint}");
    let d = error_in("name: x\nzzz: 1\n", 2, 1, "unknown key `zzz`");
    assert!(d.hint.unwrap().starts_with("valid keys:"));
}

#[test]
fn unknown_storage_key() {
    let d = error_in(
        "storage:\n  - name: root\n    type: qcow2\n    file: r.qcow2\n    sise: 10G\n",
        5,
        5,
        "unknown storage key `sise`",
    );
    assert!(d.hint.unwrap().contains("did you mean `size`?"));
}

#[test]
fn duplicate_single_instance_option_in_one_file() {
    let d = error_in(
        "arguments:\n  - m: 1G\n  - m: 2G\n",
        3,
        5,
        "`-m` is already set at vm.yaml:2:5 by `arguments`; set it once",
    );
    assert_eq!(d.hint, None);
    error_in(
        "args: [-machine, q35]\narguments: [{M: pc}]\n",
        1,
        8,
        "`-machine` is already set at vm.yaml:2:14",
    );
    error_in(
        "arguments: [{kernel: a}]\nargs: [-kernel, b]\n",
        2,
        8,
        "`-kernel` is already set at vm.yaml:1:14 by `arguments`",
    );
}

#[test]
fn duplicate_memory_top_level_and_arguments() {
    error_in(
        "memory: 1G\narguments:\n  - m: 2G\n",
        3,
        5,
        "`-m` is already set at vm.yaml:1:1 by `memory`; set it once",
    );
    // Across files, the message names the file of each occurrence.
    let diags = errors_of(&[
        source("base.yaml", "/vms", "name: web\nmemory: 1G\n"),
        source("extra.yaml", "/vms", "arguments: [{m: 2G}]\n"),
    ]);
    let d = find_diag(
        &diags,
        "extra.yaml",
        1,
        14,
        "`-m` is already set at base.yaml:2:1 by `memory`",
    );
    assert!(d.hint.as_deref().unwrap().contains("set `memory:` here"));
}

#[test]
fn reserved_options() {
    error_in(
        "arguments:\n  - daemonize\n",
        2,
        5,
        "`-daemonize` cannot be used: maqetd supervises the QEMU process itself",
    );
    error_in(
        "arguments: [{name: web}]\n",
        1,
        14,
        "`-name` cannot be used: maqet sets `-name` itself",
    );
    error_in("arguments: [{uuid: x}]\n", 1, 14, "`-uuid` cannot be used");
    error_in(
        "args: [-pidfile, /tmp/p]\n",
        1,
        8,
        "`-pidfile` cannot be used",
    );
    error_in("args: [-runas, nobody]\n", 1, 8, "`-runas` cannot be used");
    // A value following an option is not mistaken for one.
    assert_eq!(argv_of("args: [-append, -name]\n"), ["-append", "-name"]);
}

#[test]
fn bad_sizes() {
    let d = error_in(
        "memory: 4X\n",
        1,
        9,
        "invalid `memory`: `4X` is not a valid size",
    );
    assert!(d.message.contains("e.g. `512M`"));
    assert!(d.hint.unwrap().contains("memory: 4G"));
    error_in("memory: 0\n", 1, 9, "`memory` must be greater than zero");
    error_in("memory: -5\n", 1, 9, "`memory` must be greater than zero");
    error_in("memory: 99999999999999999999\n", 1, 9, "too large");
    error_in(
        "storage:\n  - {type: raw, file: a.img, size: 0}\n",
        2,
        36,
        "must be greater than zero",
    );
    error_in(
        "storage:\n  - {type: raw, file: a.img, size: 10Q}\n",
        2,
        36,
        "`10Q` is not a valid size",
    );
    error_in(
        "storage:\n  - {type: raw, file: a.img, size: -1G}\n",
        2,
        36,
        "negative",
    );
    error_in("cpu: 0\n", 1, 6, "`cpu` must be a positive CPU count");
    error_in("cpu: 4,core=2\n", 1, 6, "did you mean `cores`");
}

#[test]
fn bad_names() {
    error_in("name: -web\n", 1, 7, "invalid VM name `-web`");
    error_in("name: 'a b'\n", 1, 7, "` ` is not allowed");
    error_in(
        "name: 123e4567-e89b-12d3-a456-426614174000\n",
        1,
        7,
        "reads as a UUID",
    );
    error_in(
        "storage: [{name: 1st, type: raw, file: a}]\n",
        1,
        18,
        "invalid storage name `1st`",
    );
    error_in(
        "storage: [{name: maqet-ahci, type: raw, file: a}]\n",
        1,
        18,
        "reserved",
    );
}

#[test]
fn missing_binary() {
    let d = error_in(
        "memory: 1G\nbinary: qemu-system-aarch64\n",
        2,
        9,
        "`qemu-system-aarch64` was not found in PATH",
    );
    assert!(d.hint.unwrap().contains("`qemu-system-arm` package"));
    error_in(
        "binary: bin/qemu\n",
        1,
        9,
        "`/vms/web/bin/qemu` does not exist",
    );
    // The default binary, missing: reported at the start of the first source.
    let ctx = ValidationContext {
        home: Path::new(HOME),
        path_env: Some(OsStr::new("/nonexistent")),
        default_arch: "riscv64",
        check_path: &deny_secrets,
        vm_data_dir: None,
        probe_format: None,
    };
    let err = load(&[source("vm.yaml", "/vms", "memory: 1G\n")], &ctx).unwrap_err();
    let d = find_diag(
        &err.diagnostics,
        "vm.yaml",
        1,
        1,
        "`qemu-system-riscv64` was not found",
    );
    assert!(
        d.hint
            .as_deref()
            .unwrap()
            .contains("set `binary:` to a full path")
    );
}

#[test]
fn dangerous_paths() {
    let d = error_in(
        "storage:\n  - {type: raw, file: /etc/passwd}\n",
        2,
        23,
        "path `/etc/passwd` is not allowed: it is a system or secret location",
    );
    assert!(d.hint.is_some());
    error_in(
        "arguments: [{drive: {file: ~/.ssh/id_rsa}}]\n",
        1,
        28,
        "path `/home/u/.ssh/id_rsa` is not allowed",
    );
    error_in(
        "arguments: [{kernel: ../../../etc/k}]\n",
        1,
        22,
        "path `/etc/k` is not allowed",
    );
    error_in(
        "storage: [{type: virtfs, path: /etc}]\n",
        1,
        32,
        "path `/etc` is not allowed",
    );
    error_in(
        "storage: [{type: qcow2, file: a.qcow2, backing_file: /etc/b, backing_format: raw}]\n",
        1,
        54,
        "path `/etc/b` is not allowed",
    );
    error_in(
        "arguments: [{kernel: ~root/k}]\n",
        1,
        22,
        "only `~` and `~/…` are expanded",
    );
}

#[test]
fn dangerous_locations_are_their_own_kind() {
    let only = load_one("storage: [{type: raw, file: /etc/x.img}]\n").unwrap_err();
    assert_eq!(only.diagnostics[0].kind, DiagnosticKind::DangerousLocation);
    assert!(only.only_dangerous_locations());
    // Mixed with a YAML problem, the YAML problem decides (fix that first).
    let mixed = load_one("memroy: 1G\nstorage: [{type: raw, file: /etc/x.img}]\n").unwrap_err();
    assert!(!mixed.only_dangerous_locations(), "{mixed}");
}

#[test]
fn disk_node_names_belong_to_maqet() {
    error_in(
        "storage: [{type: qcow2, file: a.qcow2, options: {node-name: x}}]\n",
        1,
        50,
        "`node-name` is set by maqet",
    );
}

#[test]
fn bad_types() {
    error_in("display: [gtk]\n", 1, 10, "expected a string, found a list");
    error_in(
        "memory: [1G]\n",
        1,
        9,
        "`memory` must be a size, found a list",
    );
    error_in(
        "arguments: {m: 1G}\n",
        1,
        12,
        "`arguments` must be a list, found a mapping",
    );
    error_in(
        "arguments: [{boot: [[a]]}]\n",
        1,
        21,
        "expected a value (string, number or boolean) in the list of `-boot`",
    );
    error_in(
        "arguments: [{device: {e1000: null, id: [[x]]}}]\n",
        1,
        41,
        "suboption `id` of `-device` expects a value",
    );
    error_in(
        "arguments: [{device: {e1000: null, id: null}}]\n",
        1,
        40,
        "suboption `id` of `-device` needs a value",
    );
    error_in(
        "arguments: [{device: {e1000: null, x: {}}}]\n",
        1,
        39,
        "empty mapping",
    );
    error_in("arguments: [42]\n", 1, 13, "found a number");
    error_in(
        "arguments: [{boot: []}]\n",
        1,
        20,
        "`-boot` has an empty list",
    );
    error_in("arguments: [{}]\n", 1, 13, "found an empty mapping");
    error_in(
        "arguments: ['cpu host']\n",
        1,
        13,
        "`cpu host` is not a QEMU option name",
    );
    error_in(
        "arguments: [{kernel: a, x: y}]\n",
        1,
        14,
        "`-kernel` takes a single path",
    );
    error_in(
        "arguments: [{device: {e1000: null, 'bad key': 1}}]\n",
        1,
        36,
        "not a valid suboption name",
    );
    error_in(
        "args: [[a]]\n",
        1,
        8,
        "each `args` item must be a string, found a list",
    );
    error_in(
        "storage: [{type: raw, file: [a]}]\n",
        1,
        29,
        "expected a path, found a list",
    );
    error_in(
        "storage: [raw]\n",
        1,
        11,
        "each `storage` entry must be a mapping",
    );
    error_in("- a\n", 1, 1, "a VM config must be a mapping");
    error_in(
        "binary: 42\n",
        1,
        9,
        "`binary` must be a path or command name",
    );
}

#[test]
fn storage_rules() {
    let d = error_in(
        "storage: [{type: qcow, file: a}]\n",
        1,
        18,
        "unknown storage type `qcow`",
    );
    assert!(d.hint.unwrap().starts_with("did you mean `qcow2`?"));
    error_in(
        "storage: [{type: virtfs}]\n",
        1,
        11,
        "a `virtfs` storage entry needs `path`",
    );
    error_in(
        "storage: [{type: raw, path: a}]\n",
        1,
        23,
        "`path` is for virtfs shares; disk images use `file`",
    );
    error_in(
        "storage: [{type: virtfs, path: a, size: 1G}]\n",
        1,
        35,
        "`size` only applies to disk images",
    );
    error_in(
        "storage: [{type: raw, file: a, backing_file: b, backing_format: raw}]\n",
        1,
        32,
        "backing images only apply",
    );
    error_in(
        "storage: [{type: qcow2, file: a, backing_file: b}]\n",
        1,
        34,
        "`backing_file` needs `backing_format`",
    );
    error_in(
        "storage: [{type: raw, file: a, interface: usb}]\n",
        1,
        43,
        "unknown disk interface `usb`",
    );
    error_in(
        "storage: [{type: raw, file: a, options: {readonly: yes}}]\n",
        1,
        52,
        "`readonly` must be true or false",
    );
    error_in(
        "storage: [{type: raw, file: a, options: {if: ide}}]\n",
        1,
        42,
        "`if` is set by maqet",
    );
    error_in(
        "storage: [{type: virtfs, path: a, options: {security_model: mapd}}]\n",
        1,
        61,
        "unknown `security_model` `mapd`",
    );
    error_in(
        "storage:\n  - {name: a, type: raw, file: a}\n  - {name: a, type: raw, file: b}\n",
        3,
        12,
        "storage name `a` is already used at vm.yaml:2:12",
    );
    // A default name that collides with an explicit one.
    error_in(
        "storage:\n  - {name: disk1, type: raw, file: a}\n  - {type: raw, file: b}\n",
        3,
        5,
        "storage name `disk1` is already used",
    );
    let seven: String = (0..7)
        .map(|i| format!("  - {{type: raw, file: d{i}, interface: sata}}\n"))
        .collect();
    error_in(&format!("storage:\n{seven}"), 8, 5, "at most 6 disks");
}

#[test]
fn duplicate_mapping_key() {
    let d = error_in(
        "memory: 1G\ncpu: 2\nmemory: 2G\n",
        3,
        1,
        "duplicate key `memory` (first set at line 1, column 1)",
    );
    assert!(d.hint.is_some());
    error_in(
        "arguments:\n  - {device: {e1000: null, id: a, id: b}}\n",
        2,
        35,
        "duplicate key `id`",
    );
}

#[test]
fn option_and_value_in_one_args_item() {
    let d = error_in(
        "args:\n  - -m 2G\n",
        2,
        5,
        "`args` item `-m 2G` holds an option and its value in one word",
    );
    assert_eq!(d.hint.unwrap(), "write them as two items: `[-m, '2G']`");
    // As a value, words with spaces are fine; quotes are not interpreted.
    assert_eq!(
        argv_of("args: [-append, \"console=ttyS0 'quiet' -x y\", a b]\n"),
        ["-append", "console=ttyS0 'quiet' -x y", "a b"]
    );
}

#[test]
fn yaml_level_refusals() {
    error_in("a: 1\n---\nb: 2\n", 2, 1, "one YAML document");
    error_in("x: &a 1\narguments: [*a]\n", 2, 13, "aliases");
    error_in("1: x\n", 1, 1, "mapping keys must be strings");
}

#[test]
fn all_problems_are_collected() {
    let diags = errors_of(&[source(
        "vm.yaml",
        "/vms",
        "memroy: 1G\ncpu: 0\nstorage: [{type: virtfs}]\nargs: ['-m 2G']\n",
    )]);
    assert_eq!(diags.len(), 4, "{}", render(&diags));
    // Across files, syntax errors of each are reported.
    let diags = errors_of(&[
        source("a.yaml", "/vms", "x: [\n"),
        source("b.yaml", "/vms", "y: ]\n"),
    ]);
    assert_eq!(diags.len(), 2, "{}", render(&diags));
    assert_eq!(
        (diags[0].origin.as_str(), diags[1].origin.as_str()),
        ("a.yaml", "b.yaml")
    );
    // The list is capped.
    let many: String = (0..30).map(|i| format!("unknown{i}: 1\n")).collect();
    let err = load_one(&many).unwrap_err();
    assert_eq!((err.diagnostics.len(), err.omitted), (20, 10));
    assert!(err.to_string().ends_with("(10 more problems not shown)"));
}

#[test]
fn error_display() {
    let err = load_one("memroy: 1G\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "vm.yaml:1:1: unknown key `memroy` (did you mean `memory`? valid keys: name, binary, memory, cpu, display, vga, firmware, tpm, arguments, storage, args, guest_agent, forwards, ssh_user, autostart, autostart_delay, restart, on_sleep, on_logout, memory_max, cpu_quota, cloud_init, ssh_authorized_keys, hostname, user)"
    );
}

// ---- merging ----

#[test]
fn nested_mappings_merge_and_lists_concatenate() {
    use super::yaml::{Origin, parse};
    use std::sync::Arc;
    let doc = |label: &str, text: &str| {
        let origin = Arc::new(Origin {
            label: label.into(),
            base_dir: "/".into(),
        });
        parse(text, origin, &mut diag::Diags::default()).unwrap()
    };
    let merged = merge::merge_documents(vec![
        doc("a", "x: {a: 1, b: {c: 2}, l: [1]}\nargs: [a]\nk: 1\n"),
        doc("b", "x: {b: {d: 3}, e: 4, l: [2]}\nargs: [b]\nk: [z]\n"),
    ])
    .unwrap();
    let yaml::Value::Map(entries) = &merged.value else {
        panic!()
    };
    assert_eq!(
        yaml::emit_document(entries),
        "x:\n  a: 1\n  b:\n    c: 2\n    d: 3\n  l:\n    - 1\n    - 2\n  e: 4\nargs:\n  - a\n  - b\nk:\n  - z\n"
    );
}

#[test]
fn args_concatenate_across_files() {
    let config = must_load(&[
        source("a.yaml", "/vms", "args: [-no-reboot]\n"),
        source("b.yaml", "/vms", "args: [-snapshot]\n"),
    ]);
    assert_eq!(config.qemu_args(), ["-no-reboot", "-snapshot"]);
}

#[test]
fn arguments_replace_in_place_by_identity() {
    let config = must_load(&[
        source(
            "a.yaml",
            "/vms",
            "arguments:\n  - {device: {virtio-net-pci: null, id: nic0, netdev: n0}}\n  - {M: q35}\n  - {device: {virtio-rng-pci: null}}\n  - enable-kvm\n",
        ),
        source(
            "b.yaml",
            "/vms",
            "arguments:\n  - {machine: pc}\n  - {device: e1000, id: nic0, netdev: n0}\n  - {device: {virtio-rng-pci: null}}\n  - enable-kvm\n",
        ),
    ]);
    assert_eq!(
        config.qemu_args(),
        [
            "-device",
            "e1000,id=nic0,netdev=n0",
            "-machine",
            "pc",
            "-device",
            "virtio-rng-pci",
            "-enable-kvm",
            "-device",
            "virtio-rng-pci",
            "-enable-kvm",
        ]
    );
    assert_round_trip(&config);
}

#[test]
fn duplicates_within_a_later_file_are_still_errors() {
    let diags = errors_of(&[
        source("a.yaml", "/vms", "arguments: [{m: 1G}]\n"),
        source("b.yaml", "/vms", "arguments: [{m: 2G}, {m: 3G}]\n"),
    ]);
    find_diag(
        &diags,
        "b.yaml",
        1,
        23,
        "`-m` is already set at b.yaml:1:14",
    );
    let diags = errors_of(&[source(
        "a.yaml",
        "/vms",
        "arguments: [{device: x, id: d}, {device: y, id: d}]\n",
    )]);
    find_diag(
        &diags,
        "a.yaml",
        1,
        34,
        "`-device` with id `d` is already defined at a.yaml:1:14",
    );
}

#[test]
fn storage_merges_by_name() {
    let config = must_load(&[
        source(
            "a.yaml",
            "/vms/a",
            "storage:\n  - {name: root, type: qcow2, file: root.qcow2}\n  - {name: data, type: raw, file: data.img}\n",
        ),
        source(
            "b.yaml",
            "/vms/b",
            "storage:\n  - {name: root, type: raw, file: other.img}\n  - {type: raw, file: extra.img}\n",
        ),
    ]);
    let names: Vec<_> = config
        .storage()
        .iter()
        .map(|s| (s.name.as_str(), s.path.to_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("root", "/vms/b/other.img"),
            ("data", "/vms/a/data.img"),
            ("disk2", "/vms/b/extra.img")
        ]
    );
    assert_round_trip(&config);
}

#[test]
fn locations_survive_merging() {
    let diags = errors_of(&[
        source(
            "base.yaml",
            "/vms",
            "memory: 1G\nstorage:\n  - {name: root, type: raw, file: a.img}\n",
        ),
        source(
            "extra.yaml",
            "/vms",
            "memory: 2X\nstorage:\n  - {name: root, type: raw, file: /etc/x}\nbogus: 1\n",
        ),
    ]);
    assert_eq!(diags.len(), 3, "{}", render(&diags));
    find_diag(&diags, "extra.yaml", 1, 9, "invalid `memory`");
    find_diag(&diags, "extra.yaml", 3, 35, "path `/etc/x` is not allowed");
    find_diag(&diags, "extra.yaml", 4, 1, "unknown key `bogus`");
    // A top-level key overridden later is reported where the later file sets it.
    let diags = errors_of(&[
        source("base.yaml", "/vms", "memory: 1G\n"),
        source(
            "extra.yaml",
            "/vms",
            "name: x\nmemory: 2G\narguments: [{m: 1G}]\n",
        ),
    ]);
    find_diag(
        &diags,
        "extra.yaml",
        3,
        14,
        "already set at extra.yaml:2:1 by `memory`",
    );
}

#[test]
fn null_unsets_a_key() {
    let config = must_load(&[
        source("a.yaml", "/vms", "memory: 1G\narguments: [enable-kvm]\n"),
        source("b.yaml", "/vms", "memory: ~\narguments:\n"),
    ]);
    assert!(config.qemu_args().is_empty());
    assert_eq!(config.to_yaml(), "{}\n");
}

#[test]
fn relative_paths_resolve_per_file() {
    let config = must_load(&[
        source(
            "/vms/base/base.yaml",
            "/vms/base",
            "arguments: [{kernel: vmlinuz}]\n",
        ),
        source(
            "/srv/extra/extra.yaml",
            "/srv/extra",
            "storage: [{type: raw, file: ../d.img}]\n",
        ),
    ]);
    assert_eq!(config.qemu_args()[..2], ["-kernel", "/vms/base/vmlinuz"]);
    assert_eq!(config.storage()[0].path, Path::new("/srv/d.img"));
    // The binary is made absolute (and then found missing, as a path).
    let diags = errors_of(&[source("vm.yaml", "/vms", "binary: ~/bin/../qemu/qemu\n")]);
    find_diag(
        &diags,
        "vm.yaml",
        1,
        9,
        "`/home/u/qemu/qemu` does not exist",
    );
}

// ---- whole-config API ----

#[test]
fn changed_keys_lists_differing_top_level_keys() {
    let old =
        load_one("name: a\nmemory: 1G\narguments: [enable-kvm]\nstorage: [{type: raw, file: a}]\n")
            .unwrap();
    let new = load_one("name: a\nmemory: 2G\narguments: [enable-kvm, nodefaults]\nstorage: [{type: raw, file: a}]\ncpu: 2\n").unwrap();
    assert_eq!(changed_keys(&old, &new), ["memory", "cpu", "arguments"]);
    assert!(changed_keys(&old, &old.clone()).is_empty());
    // Relative and absolute spellings of the same path are the same value.
    let abs = load_one(
        "name: a\nmemory: 1G\narguments: [enable-kvm]\nstorage: [{type: raw, file: /vms/web/a}]\n",
    )
    .unwrap();
    assert!(changed_keys(&old, &abs).is_empty());
}

#[test]
fn set_name_updates_the_yaml() {
    let mut config = load_one("memory: 1G\n").unwrap();
    config.set_name("web-1");
    assert_eq!(config.name(), Some("web-1"));
    assert_eq!(config.to_yaml(), "name: web-1\nmemory: 1G\n");
    assert_round_trip(&config);
    config.set_name("2024");
    assert_eq!(config.to_yaml(), "name: \"2024\"\nmemory: 1G\n");
    assert_round_trip(&config);
}

#[test]
fn vm_names() {
    for ok in [
        "web",
        "web-1",
        "a.b_c",
        "A1",
        "x".repeat(64).as_str(),
        "123",
        "deadbeef",
    ] {
        assert_eq!(validate_vm_name(ok), Ok(()), "{ok}");
    }
    for bad in [
        "",
        ".hidden",
        "-x",
        "a/b",
        "a b",
        "é",
        "x".repeat(65).as_str(),
        "123e4567-e89b-12d3-a456-426614174000",
        "123e4567e89b12d3a456426614174000",
    ] {
        assert!(validate_vm_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn number_names_become_strings() {
    let config = load_one("name: 2024\n").unwrap();
    assert_eq!(config.name(), Some("2024"));
    assert_round_trip(&config);
}

#[test]
fn config_source_read_uses_the_file_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vm.yaml");
    std::fs::write(&file, "arguments: [{kernel: k}]\n").unwrap();
    let source = ConfigSource::read(&file).unwrap();
    assert_eq!(source.base_dir, dir.path());
    let config = must_load(&[source]);
    assert_eq!(
        config.qemu_args()[1],
        dir.path().join("k").to_str().unwrap()
    );
}

/// The guest keys: a config that names none of them compiles to the argv it always did
/// (every GOLDEN entry), and `guest_agent`/`ssh_user` never touch the argv.
#[test]
fn guest_keys_leave_the_argv_alone_unless_forwards_need_a_network() {
    for (yaml, expected) in GOLDEN {
        let config = load_one(yaml).unwrap();
        assert_eq!(config.guest(), &GuestKeys::default(), "{yaml}");
        let with = format!("{yaml}\nguest_agent: true\nssh_user: alice\n");
        let config = load_one(&with).unwrap_or_else(|e| panic!("{with}\n{e}"));
        assert_eq!(config.qemu_args(), *expected, "argv of:\n{with}");
        assert!(config.guest().guest_agent);
        assert_eq!(config.guest().ssh_user.as_deref(), Some("alice"));
        assert_round_trip(&config);
    }
    let off = load_one("guest_agent: false\n").unwrap();
    assert!(!off.guest().guest_agent);
}

#[test]
fn forwards_get_a_user_network_of_maqets_own_when_the_config_has_none() {
    let config = must_load(&[source(
        "vm.yaml",
        "/vms/web",
        "memory: 256\nforwards: [{host: 2222, guest: 22}, {host: 8080, guest: 80, proto: udp, bind: 0.0.0.0}]\n",
    )]);
    assert_eq!(
        config.qemu_args(),
        [
            "-m",
            "256",
            "-netdev",
            "user,id=maqet-net",
            "-device",
            "virtio-net-pci,netdev=maqet-net"
        ]
    );
    let g = config.guest();
    assert_eq!(g.forward_netdev.as_deref(), Some("maqet-net"));
    let specs: Vec<String> = g.forwards.iter().map(|f| f.to_string()).collect();
    assert_eq!(specs, ["tcp:127.0.0.1:2222:22", "udp:0.0.0.0:8080:80"]);
    assert_round_trip(&config);
}

#[test]
fn forwards_use_the_configs_own_user_network() {
    let yaml = "arguments:\n  - netdev: {user: null, id: n0, restrict: 'on'}\n  - device: {virtio-net-pci: null, netdev: n0}\nforwards: [{host: 2222, guest: 22}]\n";
    let config = load_one(yaml).unwrap();
    assert_eq!(config.guest().forward_netdev.as_deref(), Some("n0"));
    assert!(!config.qemu_args().iter().any(|a| a.contains("maqet-net")));
    let named = format!("{yaml}  - {{host: 2223, guest: 23, netdev: n0}}\n");
    let named = named.replace(
        "forwards: [{host: 2222, guest: 22}]\n",
        "forwards:\n  - {host: 2222, guest: 22}\n",
    );
    assert_eq!(load_one(&named).unwrap().guest().forwards.len(), 2);
}

#[test]
fn bad_forwards_are_config_errors_at_their_place() {
    error_in("forwards: [{host: 0, guest: 22}]\n", 1, 19, "not a port");
    error_in(
        "forwards: [{host: 22, guest: 70000}]\n",
        1,
        30,
        "not a port",
    );
    error_in("forwards: [{host: 22}]\n", 1, 12, "both `host` and `guest`");
    error_in(
        "forwards: [{host: 22, guest: 2, proto: sctp}]\n",
        1,
        40,
        "tcp or udp",
    );
    error_in(
        "forwards: [{host: 22, guest: 2, bind: '::1'}]\n",
        1,
        39,
        "IPv4",
    );
    error_in(
        "forwards: [{host: 22, guest: 2, hots: 1}]\n",
        1,
        39,
        "did you mean `host`",
    );
    error_in(
        "forwards: [{host: 22, guest: 2}, {host: 22, guest: 3}]\n",
        1,
        34,
        "forwarded twice",
    );
    error_in(
        "forwards: [{host: 22, guest: 2, netdev: nope}]\n",
        1,
        1,
        "`nope`",
    );
    error_in("forwards: 22\n", 1, 11, "must be a list");
    error_in("forwards: [22]\n", 1, 12, "must be a mapping");
    let two = "arguments: [{netdev: {user: null, id: a}}, {netdev: {user: null, id: b}}]\nforwards: [{host: 1, guest: 2}]\n";
    error_in(two, 2, 1, "several user networks");
    error_in("guest_agent: yes\n", 1, 14, "true or false");
    error_in("ssh_user: -oProxyCommand=x\n", 1, 11, "invalid `ssh_user`");
    error_in("ssh_user: 'a b'\n", 1, 11, "invalid `ssh_user`");
}

/// `cloud_init` and its convenience keys compile to the seed's inputs, never touch the
/// argv (maqetd adds the seed's drive at start), and survive a store round trip.
#[test]
fn cloud_init_keys() {
    let plain = load_one("memory: 256\n").unwrap();
    assert_eq!(plain.guest().cloud_init, None);
    let yaml = "memory: 256\nhostname: web-1\nuser: alice\n\
                ssh_authorized_keys: ['ssh-ed25519 AAAA alice@host']\n\
                cloud_init: {user_data: {packages: [htop], write_files: [{path: /x, permissions: 0644}], uid: 1000}}\n";
    let config = load_one(yaml).unwrap();
    assert_eq!(config.qemu_args(), plain.qemu_args());
    let seed = config.guest().cloud_init.clone().unwrap();
    assert_eq!(seed.hostname.as_deref(), Some("web-1"));
    assert_eq!(seed.user.as_deref(), Some("alice"));
    assert_eq!(seed.ssh_authorized_keys, ["ssh-ed25519 AAAA alice@host"]);
    let Some(crate::config::SeedDoc::Inline(user)) = &seed.user_data else {
        panic!("{seed:?}");
    };
    assert_eq!(user["packages"][0], "htop");
    assert_eq!(user["uid"], 1000);
    // Written as text: cloud-init's YAML 1.1 would read a bare 0644 as octal, ours not.
    assert_eq!(user["write_files"][0]["permissions"], "0644");
    let again = load_one(&config.to_yaml()).unwrap();
    assert_eq!(again.guest().cloud_init, config.guest().cloud_init);

    error_in("cloud_init: [1]\n", 1, 13, "must be a mapping");
    error_in(
        "cloud_init: {userdata: {}}\n",
        1,
        14,
        "did you mean `user_data`",
    );
    error_in("cloud_init: {meta_data: 3}\n", 1, 25, "a file or a mapping");
    error_in("hostname: -web\n", 1, 11, "invalid `hostname`");
    error_in("hostname: 'a b'\n", 1, 11, "invalid `hostname`");
    error_in("user: Root\n", 1, 7, "invalid `user`");
    error_in(
        "ssh_authorized_keys: [nokey]\n",
        1,
        23,
        "not an ssh public key",
    );
    error_in("ssh_authorized_keys: 3\n", 1, 22, "list of public keys");
}

/// Host files are slots in the argv: each names the file maqetd opens at start, how
/// (access) and how QEMU finds it (fd set or /proc/self/fd).
#[test]
fn golden_host_file_slots() {
    let config = load_one(
        "storage:\n  - {name: root, type: qcow2, file: root.qcow2, backing_file: base.qcow2, backing_format: qcow2}\n  - {name: iso, type: raw, file: 'a,b.iso', options: {readonly: true}}\n  - {name: share, type: virtfs, path: shared}\narguments:\n  - kernel: vmlinuz\n  - cdrom: boot.iso\n  - drive: {file: data.img, format: raw, if: none, id: data}\n  - drive: {file: ro.img, format: raw, readonly: 'on', id: ro}\n  - fw_cfg: {name: opt/x, file: blob}\n",
    )
    .unwrap();
    let slots = config.launch_args(&|i| format!("<{i}>"), &|i| format!("[chain {i}]"));
    assert_eq!(
        slots,
        [
            "-kernel",
            "<0>",
            "-cdrom",
            "<1>",
            "-drive",
            "file=<2>,format=raw,if=none,id=data",
            "-drive",
            "file=<3>,format=raw,readonly=on,id=ro",
            "-fw_cfg",
            "name=opt/x,file=/vms/web/blob",
            "-drive",
            // The declared backing's own chain goes under `backing.backing.`.
            "file=<4>,format=qcow2,if=virtio,id=root,node-name=maqet-d0,backing.driver=qcow2,backing.file.filename=<5>[chain 5]",
            "-drive",
            "file=<6>,format=raw,if=virtio,id=iso,node-name=maqet-d1,readonly=on",
            "-virtfs",
            "local,path=<7>,mount_tag=share,security_model=mapped-xattr,id=share",
        ]
    );
    let files: Vec<_> = config
        .host_files()
        .iter()
        .map(|f| (f.path.to_str().unwrap(), f.access, f.pass))
        .collect();
    use {Access::*, PassAs::*};
    assert_eq!(
        files,
        [
            ("/vms/web/vmlinuz", Read, ProcFd),
            ("/vms/web/boot.iso", Read, FdSet),
            ("/vms/web/data.img", ReadWrite, FdSet),
            ("/vms/web/ro.img", Read, FdSet),
            ("/vms/web/root.qcow2", ReadWrite, FdSet),
            ("/vms/web/base.qcow2", Read, FdSet),
            ("/vms/web/a,b.iso", Read, FdSet),
            ("/vms/web/shared", Directory, ProcFd),
        ]
    );
    let chains: Vec<_> = config
        .host_files()
        .iter()
        .map(|f| (f.qcow2, f.chain.as_deref()))
        .collect();
    assert_eq!(
        chains,
        [
            (false, None),
            (true, None),
            (false, None),
            (false, None),
            (true, None),
            (true, Some("backing.backing.")),
            (false, None),
            (false, None),
        ]
    );
    // A qcow2 (or probed) `-drive` image gets its header's chain passed.
    let drive = load_one("arguments: [{drive: {file: top.qcow2, if: virtio}}]\n").unwrap();
    assert_eq!(drive.host_files()[0].chain.as_deref(), Some("backing."));
    assert_eq!(
        drive.launch_args(&|_| "F".into(), &|_| ",C".into()),
        ["-drive", "file=F,if=virtio,C"]
    );
    // By name (for people and logs), commas escaped where QEMU parses suboptions.
    assert!(
        config.qemu_args().contains(
            &"file=/vms/web/a,,b.iso,format=raw,if=virtio,id=iso,node-name=maqet-d1,readonly=on"
                .to_owned()
        )
    );
    assert_round_trip(&config);
}

/// A string-form `arguments` value is parsed like QEMU parses suboptions and takes the
/// mapping form's path: relative paths resolve against the declaring file's directory,
/// disks are fd-passed, dangerous places refused (issue 13 within issue 11's rule).
#[test]
fn string_form_paths_take_the_mapping_path() {
    let config = load_one(concat!(
        "arguments:\n",
        "  - {drive: 'file=./x.iso,media=cdrom'}\n",
        "  - {chardev: 'socket,id=c0,path=./s.sock,server=on,wait=off'}\n",
        "  - {drive: 'if=virtio,file=dir/a,,b.img,format=raw,id=d,,1'}\n",
        "  - {chardev: 'socket,id=c1,path=../m.sock,server,nowait'}\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let placeholders = config.launch_args(&|i| format!("<{i}>"), &|_| String::new());
    assert_eq!(
        placeholders,
        [
            "-drive",
            "file=<0>,media=cdrom",
            "-chardev",
            "socket,id=c0,path=/vms/web/s.sock,server=on,wait=off",
            "-drive",
            "if=virtio,file=<1>,format=raw,id=d,,1",
            "-chardev",
            "socket,id=c1,path=/vms/m.sock,server=on,wait=off",
        ]
    );
    let files: Vec<_> = config
        .host_files()
        .iter()
        .map(|f| (f.path.to_str().unwrap(), f.access, f.pass))
        .collect();
    assert_eq!(
        files,
        [
            ("/vms/web/x.iso", Access::Read, PassAs::FdSet),
            ("/vms/web/dir/a,b.img", Access::ReadWrite, PassAs::FdSet),
        ]
    );
    // By name, the comma doubled again where QEMU parses suboptions.
    let argv = config.qemu_args();
    assert!(
        argv.contains(&"file=/vms/web/x.iso,media=cdrom".to_owned()),
        "{argv:?}"
    );
    assert!(
        argv.contains(&"if=virtio,file=/vms/web/dir/a,,b.img,format=raw,id=d,,1".to_owned()),
        "{argv:?}"
    );
    // The stored form is the mapping with absolute paths.
    assert!(
        config.to_yaml().contains("/vms/web/s.sock"),
        "{}",
        config.to_yaml()
    );
    assert_round_trip(&config);

    // Dangerous places are refused in string form exactly as in the mapping form.
    let d = error_in(
        "arguments: [{drive: 'file=/etc/shadow,if=virtio'}]\n",
        1,
        21,
        "path `/etc/shadow` is not allowed",
    );
    assert_eq!(d.kind, DiagnosticKind::DangerousLocation, "{d}");
    error_in(
        "arguments: [{chardev: 'socket,id=c,path=../../../etc/x.sock'}]\n",
        1,
        23,
        "path `/etc/x.sock` is not allowed",
    );
    // A `unix:` backend's path (QEMU's implied first key) resolves the same way.
    let config = load_one(concat!(
        "arguments:\n",
        "  - {serial: 'unix:./s,,1.sock,server=on,wait=off'}\n",
        "  - {monitor: 'unix:/run/user/m.sock'}\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.qemu_args(),
        [
            "-serial",
            "unix:/vms/web/s,,1.sock,server=on,wait=off",
            "-monitor",
            "unix:/run/user/m.sock"
        ]
    );
    assert_round_trip(&config);
    let d = error_in(
        "arguments: [{serial: 'unix:../../etc/s.sock,server=on'}]\n",
        1,
        22,
        "path `/etc/s.sock` is not allowed",
    );
    assert_eq!(d.kind, DiagnosticKind::DangerousLocation, "{d}");
    error_in(
        "arguments: [{serial: 'unix:s.sock,logfile=/etc/x'}]\n",
        1,
        22,
        "`logfile=/etc/x`",
    );
    // What the mapping form refuses stays refused.
    error_in(
        "arguments: [{drive: 'file=fat:rw:/tmp,if=virtio'}]\n",
        1,
        21,
        "protocol maqet cannot check",
    );
}

/// Host paths inside strings cannot be fd-passed or checked: refused, pointing to
/// structured storage.
#[test]
fn host_paths_in_strings_are_refused() {
    for (yaml, needle) in [
        (
            "args: ['-drive', 'file=/etc/shadow,format=raw']\n",
            "`file=/etc/shadow`",
        ),
        (
            "args: [-drive, 'file=disk.img,if=virtio']\n",
            "`file=disk.img`",
        ),
        ("args: [-drive, 'if=virtio,file=x,,y']\n", "`file=x,y`"),
        (
            "args: [-blockdev, 'driver=file,filename=/x,node-name=a']\n",
            "`filename=/x`",
        ),
        (
            "args: [-chardev, 'file,id=c,path=/tmp/x']\n",
            "`path=/tmp/x`",
        ),
        ("args: [-serial, 'file:/etc/x']\n", "the backend `file:…`"),
        (
            "args: [-monitor, 'unix:/tmp/m,server']\n",
            "the backend `unix:…`",
        ),
        ("args: [-serial, /dev/ttyS0]\n", "the backend `/…`"),
        (
            "args: [-incoming, 'exec:cat /etc/x']\n",
            "the backend `exec:…`",
        ),
        (
            "args: [-kernel, /boot/vmlinuz]\n",
            "`-kernel /boot/vmlinuz` in `args`",
        ),
        ("args: [-cdrom, x.iso]\n", "`-cdrom x.iso` in `args`"),
        (
            "args: [-blockdev, '{\"driver\":\"file\",\"filename\":\"/x\"}']\n",
            "a JSON option",
        ),
        (
            "arguments: [{drive: [if=virtio, file=/etc/shadow]}]\n",
            "`file=/etc/shadow`",
        ),
        (
            "arguments: [{serial: 'file:/etc/x'}]\n",
            "the backend `file:…`",
        ),
        (
            "arguments: [{drive: {if: 'virtio,file=/etc/shadow'}}]\n",
            "`file=/etc/shadow`",
        ),
        (
            "arguments: [{drive: {file: 'json:{\"file.filename\": \"/x\"}'}}]\n",
            "protocol maqet cannot check",
        ),
        (
            "arguments: [{drive: {file: 'fat:rw:/etc'}}]\n",
            "protocol maqet cannot check",
        ),
        (
            "arguments: [{drive: {file: 'nbd:unix:/run/x.sock'}}]\n",
            "protocol maqet cannot check",
        ),
        (
            "args: [-chardev, 'stdio,id=s,logfile=/home/u/.bashrc']\n",
            "`logfile=/home/u/.bashrc`",
        ),
        (
            "args: [-netdev, 'tap,id=n,script=/tmp/up']\n",
            "`script=/tmp/up`",
        ),
        (
            "args: [-netdev, 'user,id=n,smb=/home/u']\n",
            "`smb=/home/u`",
        ),
    ] {
        let diags = errors_of(&[source("vm.yaml", "/vms/web", yaml)]);
        let d = diags
            .iter()
            .find(|d| d.message.contains(needle))
            .unwrap_or_else(|| panic!("{yaml}: no {needle:?} in:\n{}", render(&diags)));
        assert!(
            d.hint.as_deref().unwrap_or("").contains("`storage:`"),
            "{yaml}: {d}"
        );
    }
    error_in(
        "args: [-add-fd, 'fd=3,set=1']\n",
        1,
        8,
        "`-add-fd` cannot be used",
    );
    // Not host paths: the guest's command line, block node references, network URLs,
    // sockets maqet does not open as files.
    for ok in [
        "args: [-append, 'root=/dev/vda init=/bin/sh file=/x']\n",
        "args: [-blockdev, 'driver=qcow2,file=node0,node-name=top']\n",
        "args: [-serial, stdio, -monitor, none]\n",
        "arguments: [{drive: {file: 'https://example.org/x.iso', media: cdrom}}]\n",
        "arguments: [{chardev: {socket: null, id: s, path: s.sock, server: 'on'}}]\n",
    ] {
        load_one(ok).unwrap_or_else(|e| panic!("{ok}\n{e}"));
    }
    assert_eq!(
        argv_of("args: [-netdev, 'tap,id=n,script=no,downscript=no']\n")[1],
        "tap,id=n,script=no,downscript=no"
    );
    assert_eq!(
        argv_of(
            "arguments: [{netdev: {user: null, id: n, tftp: tftp}}, {device: {e1000: null, romfile: ''}}]\n"
        ),
        [
            "-netdev",
            "user,id=n,tftp=/vms/web/tftp",
            "-device",
            "e1000,romfile="
        ]
    );
    error_in(
        "arguments: [{chardev: {stdio: null, id: s, logfile: /etc/x}}]\n",
        1,
        53,
        "path `/etc/x` is not allowed",
    );
    // Path options QEMU opens by name are checked in mappings.
    assert_eq!(
        argv_of("arguments: [{D: qemu.log}]\n"),
        ["-D", "/vms/web/qemu.log"]
    );
    error_in(
        "arguments: [{D: /etc/x}]\n",
        1,
        17,
        "path `/etc/x` is not allowed",
    );
}

/// A path is stored where it leads; a stored path that now leads elsewhere (a
/// directory swapped for a symlink since) is refused, not silently followed.
#[test]
fn paths_are_stored_resolved_and_must_stay_put() {
    fn via_link(path: &Path, _: PathUse) -> Result<std::path::PathBuf, String> {
        match path.strip_prefix("/vms/link") {
            Ok(rest) => Ok(Path::new("/data/vms").join(rest)),
            Err(_) => Ok(path.to_path_buf()),
        }
    }
    let env = TestEnv::new();
    let ctx = ValidationContext {
        check_path: &via_link,
        vm_data_dir: None,
        probe_format: None,
        ..env.ctx()
    };
    let config = load(
        &[source(
            "vm.yaml",
            "/vms/link",
            "storage: [{type: raw, file: d.img}]\narguments: [{kernel: k}]\n",
        )],
        &ctx,
    )
    .unwrap();
    assert_eq!(config.storage()[0].path, Path::new("/data/vms/d.img"));
    assert_eq!(config.host_files()[0].path, Path::new("/data/vms/k"));
    assert!(config.to_yaml().contains("/data/vms/d.img"));
    assert!(!config.to_yaml().contains("/vms/link"));

    // Stored with the unresolved name (as if the link appeared after it was stored).
    let stored = "storage:\n  - name: disk0\n    type: raw\n    file: /vms/link/d.img\n";
    let err = load_stored(stored, &ctx).unwrap_err();
    assert!(err.only_dangerous_locations(), "{err}");
    assert!(
        err.to_string()
            .contains("path `/vms/link/d.img` now leads to `/data/vms/d.img`"),
        "{err}"
    );
    assert!(err.to_string().contains("apply the config again"), "{err}");
}

// ---- maqet 0.0.x configs (docs/configuration.md, "Coming from maqet 0.0.x") ----

#[test]
fn legacy_disk_without_file_lives_in_the_vm_data_dir() {
    // The old README's first example.
    let config = must_load(&[source(
        "vm.yaml",
        "/vms/web",
        "storage: [{name: hdd, size: 20G, type: qcow2, interface: virtio}]\n",
    )]);
    assert_eq!(
        config.qemu_args(),
        [
            "-drive",
            "file=/home/u/.local/share/maqet/vms/id-1/hdd.qcow2,format=qcow2,if=virtio,id=hdd,node-name=maqet-d0"
        ]
    );
    assert_eq!(
        config.storage()[0].path,
        Path::new("/home/u/.local/share/maqet/vms/id-1/hdd.qcow2")
    );
    assert_eq!(config.storage()[0].size, Some(20 << 30));
    // The stored YAML names the file, so it loads without knowing the VM.
    assert!(
        config
            .to_yaml()
            .contains("file: /home/u/.local/share/maqet/vms/id-1/hdd.qcow2")
    );
    assert_round_trip(&config);
}

#[test]
fn legacy_disk_without_file_needs_a_vm() {
    // Outside `add`/`apply` (no VM id), there is no place to put it.
    let env = TestEnv::new();
    let mut ctx = env.ctx();
    ctx.vm_data_dir = None;
    let e = load(
        &[source("vm.yaml", "/vms", "storage: [{name: hdd}]\n")],
        &ctx,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("a `qcow2` storage entry needs `file`"),
        "{e}"
    );
}

#[test]
fn legacy_disk_type_defaults_to_qcow2_and_ignores_case() {
    let config = must_load(&[source(
        "vm.yaml",
        "/vms/web",
        "storage: [{name: a, file: a.img}, {name: b, type: RAW, file: b.img}, {name: c, type: QCOW2}]\n",
    )]);
    assert_eq!(
        config.qemu_args(),
        [
            "-drive",
            "file=/vms/web/a.img,format=qcow2,if=virtio,id=a,node-name=maqet-d0",
            "-drive",
            "file=/vms/web/b.img,format=raw,if=virtio,id=b,node-name=maqet-d1",
            "-drive",
            "file=/home/u/.local/share/maqet/vms/id-1/c.qcow2,format=qcow2,if=virtio,id=c,node-name=maqet-d2",
        ]
    );
    let yaml = config.to_yaml();
    assert!(
        yaml.contains("type: raw") && !yaml.contains("RAW"),
        "{yaml}"
    );
    assert_round_trip(&config);
    // An unknown type is still refused, case-insensitively suggested.
    let d = error_in(
        "storage: [{type: QCOW, file: a}]\n",
        1,
        18,
        "unknown storage type `QCOW`",
    );
    assert!(d.hint.is_some());
}

#[test]
fn legacy_disk_size_defaults_to_10g() {
    let config = must_load(&[source(
        "vm.yaml",
        "/vms/web",
        "storage: [{name: a}, {name: b, size: 2G}, {name: c, file: c.qcow2, backing_file: base.qcow2, backing_format: qcow2}, {name: s, type: virtfs, path: s}]\n",
    )]);
    let sizes: Vec<_> = config.storage().iter().map(|e| e.size).collect();
    // An overlay takes its size from its backing image; shares have none.
    assert_eq!(sizes, [Some(10 << 30), Some(2 << 30), None, None]);
}

#[test]
fn legacy_keys_beside_options_are_honoured() {
    let config = must_load(&[source(
        "vm.yaml",
        "/vms/web",
        "storage:\n  - {name: share, type: virtfs, path: s, mount_tag: host, security_model: passthrough, readonly: true}\n  - {name: cd, type: raw, file: x.iso, media: cdrom, interface: ide}\n  - {name: ro, type: raw, file: ro.img, readonly: true}\n",
    )]);
    assert_eq!(
        config.qemu_args(),
        [
            "-virtfs",
            "local,path=/vms/web/s,mount_tag=host,security_model=passthrough,id=share,readonly=on",
            "-drive",
            "file=/vms/web/x.iso,format=raw,if=ide,id=cd,node-name=maqet-d1,readonly=on,media=cdrom",
            "-drive",
            "file=/vms/web/ro.img,format=raw,if=virtio,id=ro,node-name=maqet-d2,readonly=on",
        ]
    );
    // The same as their `options:` forms, down to the stored YAML.
    let options = must_load(&[source(
        "vm.yaml",
        "/vms/web",
        "storage:\n  - {name: share, type: virtfs, path: s, options: {mount_tag: host, security_model: passthrough, readonly: true}}\n  - {name: cd, type: raw, file: x.iso, interface: ide, options: {media: cdrom}}\n  - {name: ro, type: raw, file: ro.img, options: {readonly: true}}\n",
    )]);
    assert_eq!(config, options);
    assert_round_trip(&config);
    // A CD-ROM's file is opened read-only.
    assert_eq!(config.host_files()[1].access, Access::Read);
    // They are validated like options, and only where they apply.
    error_in(
        "storage: [{type: virtfs, path: a, security_model: mapd}]\n",
        1,
        51,
        "unknown `security_model` `mapd`",
    );
    error_in(
        "storage: [{type: raw, file: a, mount_tag: x}]\n",
        1,
        32,
        "only apply to virtfs shares",
    );
    error_in(
        "storage: [{type: virtfs, path: a, media: cdrom}]\n",
        1,
        35,
        "`media` only applies to disk images",
    );
    error_in(
        "storage: [{type: raw, file: a, readonly: true, options: {readonly: false}}]\n",
        1,
        32,
        "`readonly` is set both on the entry and in its `options`",
    );
}

#[test]
fn legacy_memory_sizes_become_sizes_qemu_reads() {
    for (written, qemu) in [
        ("1GB", "1G"),
        ("1GiB", "1G"),
        ("1.5G", "1536M"),
        ("512mb", "512M"),
        ("2g", "2g"),
        ("4096", "4096"),
        ("1.25K", "1280B"),
    ] {
        let config = must_load(&[source("vm.yaml", "/vms", &format!("memory: '{written}'\n"))]);
        assert_eq!(config.qemu_args(), ["-m", qemu], "{written}");
        // The YAML keeps what the user wrote.
        assert!(config.to_yaml().contains(written), "{written}");
    }
    assert_eq!(argv_of("memory: 2048\n"), ["-m", "2048"]);
    error_in("memory: 1XB\n", 1, 9, "invalid `memory`");
}

#[test]
fn read_only_disks_are_checked_as_read_only() {
    fn no_writes_in_usr(path: &Path, usage: PathUse) -> Result<std::path::PathBuf, String> {
        if path.starts_with("/usr") && usage != PathUse::ReadOnly {
            Err("system directory".to_owned())
        } else {
            Ok(path.to_path_buf())
        }
    }
    let env = TestEnv::new();
    let mut ctx = env.ctx();
    ctx.check_path = &no_writes_in_usr;
    let load_text = |text: &str| load(&[source("vm.yaml", "/vms", text)], &ctx);
    for ok in [
        "storage: [{name: cd, type: raw, file: /usr/share/x.iso, media: cdrom}]\n",
        "storage: [{name: fw, type: raw, file: /usr/share/fw.fd, readonly: true}]\n",
        "arguments: [{drive: {file: /usr/share/x.iso, media: cdrom}}]\n",
    ] {
        load_text(ok).unwrap_or_else(|e| panic!("{ok}\n{e}"));
    }
    for refused in [
        "storage: [{name: hd, type: raw, file: /usr/share/x.img}]\n",
        "arguments: [{drive: {file: /usr/share/x.img}}]\n",
    ] {
        let e = load_text(refused).unwrap_err();
        assert!(e.to_string().contains("system directory"), "{refused}\n{e}");
    }
}

#[test]
fn legacy_string_items_override_by_id() {
    let config = must_load(&[
        source(
            "a.yaml",
            "/vms",
            "arguments:\n  - netdev: 'user,id=net0'\n  - device: 'virtio-net-pci,netdev=net0,id=nic0'\n  - {netdev: {user: null, id: net1}}\n",
        ),
        source(
            "b.yaml",
            "/vms",
            "arguments:\n  - netdev: 'user,id=net0,hostfwd=tcp::2222-:22'\n  - {netdev: {user: null, id: net1, restrict: 'on'}}\n  - device: 'e1000,netdev=net0,id=nic0'\n",
        ),
    ]);
    assert_eq!(
        config.qemu_args(),
        [
            "-netdev",
            "user,id=net0,hostfwd=tcp::2222-:22",
            "-device",
            "e1000,netdev=net0,id=nic0",
            "-netdev",
            "user,id=net1,restrict=on",
        ]
    );
    // Within one file, a repeated id is still an error.
    let diags = errors_of(&[source(
        "vm.yaml",
        "/vms",
        "arguments:\n  - netdev: 'user,id=n'\n  - netdev: 'user,id=n'\n",
    )]);
    find_diag(&diags, "vm.yaml", 3, 5, "with id `n` is already defined");
}

#[test]
fn legacy_rng_object_mapping_form() {
    assert_eq!(
        argv_of("arguments: [{object: {rng-random: null, filename: /dev/urandom, id: rng0}}]\n"),
        ["-object", "rng-random,filename=/dev/urandom,id=rng0"]
    );
    // The string form is parsed into that mapping and checked the same way.
    assert_eq!(
        argv_of("arguments: [{object: 'rng-random,filename=/dev/urandom,id=rng0'}]\n"),
        ["-object", "rng-random,filename=/dev/urandom,id=rng0"]
    );
}

#[test]
fn legacy_backing_file_beside_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::write(images.join("base.qcow2"), "").unwrap();
    let base = dir.path().to_str().unwrap();
    let text = "storage:\n  - {name: a, file: images/a.qcow2, backing_file: base.qcow2, backing_format: qcow2}\n  - {name: b, file: images/b.qcow2, backing_file: other.qcow2, backing_format: qcow2}\n";
    let config = must_load(&[source("vm.yaml", base, text)]);
    let backing: Vec<_> = config
        .storage()
        .iter()
        .map(|e| e.backing_file.clone().unwrap())
        .collect();
    // Found beside the image: used from there; not there: the config's directory.
    assert_eq!(
        backing,
        [images.join("base.qcow2"), dir.path().join("other.qcow2")]
    );
}

#[test]
fn legacy_backing_format_is_probed_when_absent() {
    fn probe(path: &Path) -> Result<String, String> {
        match path.file_name().and_then(|n| n.to_str()) {
            Some("base.qcow2") => Ok("qcow2".to_owned()),
            Some("base.img") => Ok("raw".to_owned()),
            _ => Err("qemu-img info failed: Could not open it".to_owned()),
        }
    }
    let env = TestEnv::new();
    let ctx = ValidationContext {
        probe_format: Some(&probe),
        ..env.ctx()
    };
    let text = "storage:\n  - {name: a, file: a.qcow2, backing_file: base.qcow2}\n  - {name: b, file: b.qcow2, backing_file: base.img}\n";
    let config = load(&[source("vm.yaml", "/vms/web", text)], &ctx).unwrap();
    assert_eq!(
        config.qemu_args(),
        [
            "-drive",
            "file=/vms/web/a.qcow2,format=qcow2,if=virtio,id=a,node-name=maqet-d0,backing.driver=qcow2,backing.file.filename=/vms/web/base.qcow2",
            "-drive",
            "file=/vms/web/b.qcow2,format=qcow2,if=virtio,id=b,node-name=maqet-d1,backing.driver=raw,backing.file.filename=/vms/web/base.img",
        ]
    );
    let formats: Vec<_> = config
        .storage()
        .iter()
        .map(|e| e.backing_format.clone())
        .collect();
    assert_eq!(formats, [Some("qcow2".to_owned()), Some("raw".to_owned())]);
    // The stored config states the probed format: it loads without probing again.
    let yaml = config.to_yaml();
    assert!(yaml.contains("backing_format: qcow2"), "{yaml}");
    assert_eq!(load_stored(&yaml, &env.ctx()).unwrap(), config);
    assert_round_trip(&config);

    // A probe that fails is the only refusal, and it says what to write.
    let e = load(
        &[source(
            "vm.yaml",
            "/vms/web",
            "storage: [{name: a, file: a.qcow2, backing_file: missing.qcow2}]\n",
        )],
        &ctx,
    )
    .unwrap_err();
    let d = find_diag(
        &e.diagnostics,
        "vm.yaml",
        1,
        36,
        "cannot tell the format of backing file `/vms/web/missing.qcow2`: qemu-img info failed",
    );
    assert!(d.hint.as_deref().unwrap().contains("backing_format: qcow2"));
    // Without a probe (no service around), the key stays required.
    error_in(
        "storage: [{type: qcow2, file: a, backing_file: b}]\n",
        1,
        34,
        "`backing_file` needs `backing_format`",
    );
}

// ---- firmware ----

#[test]
fn firmware_is_kept_and_claims_bios() {
    let config =
        load_one("firmware: uefi-secure\narguments: [{machine: {q35: null, smm: 'on'}}]\n")
            .unwrap();
    assert_eq!(config.firmware(), super::Firmware::UefiSecure);
    assert_eq!(config.machine_type().as_deref(), Some("q35"));
    let env = TestEnv::new();
    let again = load_stored(&config.to_yaml(), &env.ctx()).unwrap();
    assert_eq!(again.firmware(), super::Firmware::UefiSecure);
    assert_eq!(
        load_one("memory: 64\n").unwrap().firmware(),
        super::Firmware::Bios
    );
    assert_eq!(load_one("memory: 64\n").unwrap().machine_type(), None);
    let config = load_one("arguments: [{machine: {type: pc, accel: tcg}}]\n").unwrap();
    assert_eq!(config.machine_type().as_deref(), Some("pc"));
    // `bios` is the default and leaves `-bios` to the config.
    load_one("firmware: bios\narguments: [{bios: /x/bios.bin}]\n").unwrap();
    let err = load_one("firmware: efi\n").unwrap_err().to_string();
    assert!(
        err.contains("vm.yaml:1:11: unknown firmware `efi`"),
        "{err}"
    );
    let err = load_one("firmware: uefi\narguments: [{bios: /x/bios.bin}]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`-bios` is already set") && err.contains("`firmware`"),
        "{err}"
    );
}

/// `display: spice | vnc` asks for maqet's display server: no `-display` word, the rest
/// of the argv as it was; every other `display:` value is `-display <value>` as always.
#[test]
fn display_servers_leave_the_argv_alone_and_claim_display() {
    use super::{DisplayConfig, DisplayServer};
    for (yaml, expected) in GOLDEN {
        let config = load_one(yaml).unwrap();
        assert_eq!(config.display(), None, "{yaml}");
        if yaml.contains("display") {
            continue;
        }
        for server in ["spice", "vnc"] {
            let with = format!("{yaml}\ndisplay: {server}\n");
            let config = load_one(&with).unwrap_or_else(|e| panic!("{with}\n{e}"));
            assert_eq!(config.qemu_args(), *expected, "argv of:\n{with}");
            assert_eq!(
                config.display().map(|d| d.server.as_str()),
                Some(server),
                "{with}"
            );
            assert_round_trip(&config);
        }
    }
    for other in ["gtk", "sdl", "none", "spice-app", "vnc=:1"] {
        let config = load_one(&format!("display: {other}\n")).unwrap();
        assert_eq!(config.qemu_args(), ["-display", other]);
        assert_eq!(config.display(), None);
    }
    let spice = load_one("display: spice\nmemory: 64\n").unwrap();
    assert_eq!(
        spice.display(),
        Some(DisplayConfig {
            server: DisplayServer::Spice,
            add_graphics_device: true
        })
    );
    // A graphics device named anywhere is kept, and maqet adds none.
    for has_one in [
        "display: vnc\nvga: qxl\n",
        "display: vnc\nvga: none\n",
        "display: spice\narguments: [{device: {virtio-vga: null, id: v0}}]\n",
        "display: spice\nargs: [-device, qxl-vga]\n",
    ] {
        let config = load_one(has_one).unwrap();
        assert!(!config.display().unwrap().add_graphics_device, "{has_one}");
    }
    // `display: spice` is still the one `-display`.
    error_in(
        "display: spice\narguments: [{display: gtk}]\n",
        2,
        14,
        "`-display` is already set",
    );
}

#[test]
fn a_display_server_with_a_second_one_of_its_kind_is_refused() {
    let d = error_in(
        "display: spice\nargs: [-spice, 'port=5930']\n",
        1,
        10,
        "start another one with `-spice`",
    );
    assert!(d.hint.as_deref().unwrap().contains("remove `-spice`"));
    error_in(
        "display: vnc\narguments: [{vnc: ':1'}]\n",
        1,
        10,
        "with `-vnc`",
    );
    // The other kind is the user's business.
    load_one("display: vnc\nargs: [-spice, 'port=5930']\n").unwrap();
}

#[test]
fn session_keys_parse_and_leave_the_argv_alone() {
    let plain = load_one("memory: 256\n").unwrap();
    assert_eq!(plain.session(), &SessionKeys::default());
    let yaml = "memory: 256\nautostart: true\nautostart_delay: 5\nrestart: on-crash\non_sleep: save\non_logout: stop\nmemory_max: 1G\ncpu_quota: 150%\n";
    let c = load_one(yaml).unwrap();
    assert_eq!(c.qemu_args(), plain.qemu_args());
    let s = c.session();
    assert!(s.autostart);
    assert_eq!(s.autostart_delay, 5);
    assert_eq!(s.restart, RestartPolicy::OnCrash);
    assert_eq!(s.on_sleep, SleepAction::Save);
    assert_eq!(s.on_logout, LogoutAction::Stop);
    assert_eq!(s.memory_max, Some(1 << 30));
    assert_eq!(s.cpu_quota, Some(150));
    assert_round_trip(&c);
}

#[test]
fn session_keys_refuse_bad_values_with_the_choices() {
    error_in(
        "restart: sometimes\n",
        1,
        10,
        "invalid `restart` `sometimes`",
    );
    error_in("restart: false\n", 1, 10, "invalid `restart`");
    error_in("on_sleep: hibernate\n", 1, 11, "invalid `on_sleep`");
    error_in("on_logout: 1\n", 1, 12, "invalid `on_logout`");
    error_in(
        "autostart: yes\n",
        1,
        12,
        "`autostart` must be true or false",
    );
    error_in("autostart_delay: -1\n", 1, 18, "invalid `autostart_delay`");
    error_in(
        "autostart_delay: 99999\n",
        1,
        18,
        "invalid `autostart_delay`",
    );
    error_in("memory_max: 10\n", 1, 13, "invalid `memory_max`");
    error_in("cpu_quota: 0%\n", 1, 12, "invalid `cpu_quota`");
    error_in("cpu_quota: \"\\0\"\n", 1, 12, "NUL");
}

#[test]
fn storage_edits_give_back_configs_that_load_with_the_change() {
    let base = "memory: 64\nstorage:\n  - {name: root, type: qcow2, file: /vms/web/root.qcow2, size: 1G}\n  - {name: cd, type: raw, file: /vms/web/cd.iso, readonly: true}\n";
    let config = load_one(base).unwrap();
    let reload = |yaml: String| must_load(&[source("<stored>", "/", &yaml)]);

    let grown = reload(config.yaml_with_disk_size("root", 2 << 30).unwrap());
    assert_eq!(grown.storage()[0].size, Some(2 << 30));
    assert_eq!(grown.storage()[1], config.storage()[1]);
    assert!(config.yaml_with_disk_size("nope", 1).is_none());

    let disk = NewDiskEntry {
        name: "data",
        format: "raw",
        file: Path::new("/vms/web/data.raw"),
        size: Some(1 << 20),
        interface: "scsi",
        readonly: true,
    };
    let added = reload(config.yaml_with_disk(&disk));
    let e = &added.storage()[2];
    assert_eq!(
        (e.name.as_str(), e.kind, e.size, e.interface, e.readonly),
        (
            "data",
            StorageKind::Raw,
            Some(1 << 20),
            Interface::Scsi,
            true
        )
    );
    assert!(
        added
            .qemu_args()
            .iter()
            .any(|a| a.starts_with("scsi-hd,drive=data"))
    );

    let removed = reload(added.yaml_without_storage("root").unwrap());
    let names: Vec<_> = removed.storage().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["cd", "data"]);
    assert!(added.yaml_without_storage("nope").is_none());

    // A config without `storage` gets the key in its normalized place.
    let bare = load_one("memory: 64\nargs: ['-nodefaults']\n").unwrap();
    let first = reload(bare.yaml_with_disk(&NewDiskEntry { size: None, ..disk }));
    assert_eq!(first.storage().len(), 1);
    assert_eq!(reload(first.to_yaml()), first);
}
