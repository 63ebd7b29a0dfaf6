//! Which QMP commands a D-Bus caller may send, and under which action.
//!
//! This module owns the one classification table of QMP commands (QEMU 7.2) and the
//! parsing of passthrough requests (`Execute`'s command name and JSON arguments). Every
//! command falls in one [`Tier`]; each tier names the policy [`Action`] a caller needs.
//! `docs/qmp.md` explains every decision; a test keeps that page and this table in step.
//!
//! Commands not in the table are treated as dangerous: a newer QEMU may add commands
//! that write host files, and maqet cannot know until someone classifies them.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::access::Action;

/// The chardev id maqet gives its own monitor; QMP passthrough never touches it.
pub const QMP_CHARDEV_ID: &str = "maqet-qmp";

/// How much trust a command needs, from least to most. Ordered: a composite command
/// (`transaction`) takes the highest tier of its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Reads state; changes nothing (not audited when allowed, like every read).
    Query,
    /// Changes confined to the guest's view that a caller can undo: input events,
    /// statistics settings.
    Execute,
    /// Changes the VM's run state, hardware or attached storage.
    Privileged,
    /// Copies guest memory out to a host file.
    MemoryDump,
    /// Reaches the host beyond the VM's configured resources: creates, opens or writes
    /// host files, opens host sockets or devices, runs host programs, or runs arbitrary
    /// human-monitor commands. Needs `allow_dangerous`.
    Dangerous,
    /// Never sent: it would break maqet's own monitor, or it needs file-descriptor
    /// passing on the monitor socket, which a JSON string cannot carry.
    Refused,
}

impl Tier {
    pub const ALL: [Tier; 6] = [
        Tier::Query,
        Tier::Execute,
        Tier::Privileged,
        Tier::MemoryDump,
        Tier::Dangerous,
        Tier::Refused,
    ];

    /// The policy action a caller needs. Refused commands are checked as plain execute
    /// calls, so the attempt is audited; they are then refused without being sent.
    pub fn action(self) -> Action {
        match self {
            Tier::Query | Tier::Execute | Tier::Refused => Action::QmpExecute,
            Tier::Privileged => Action::QmpPrivileged,
            Tier::MemoryDump => Action::QmpMemoryDump,
            Tier::Dangerous => Action::QmpDangerous,
        }
    }

    /// Whether the caller must also pass `allow_dangerous=true`. Memory dumps write a
    /// host file at a path the caller names, which is exactly what the flag is about.
    pub fn needs_allow_dangerous(self) -> bool {
        matches!(self, Tier::Dangerous | Tier::MemoryDump)
    }

    /// The name `docs/qmp.md` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Query => "query",
            Tier::Execute => "execute",
            Tier::Privileged => "privileged",
            Tier::MemoryDump => "memory-dump",
            Tier::Dangerous => "dangerous",
            Tier::Refused => "refused",
        }
    }
}

/// A command's tier and why it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    pub tier: Tier,
    pub why: Cow<'static, str>,
}

use Tier::{Dangerous as D, Execute as E, MemoryDump as M, Privileged as P, Refused as R};

/// Every non-query command of QEMU 7.2 (plus a few of other targets), sorted by name.
/// Queries (`query-*`, `x-query-*`, `x-debug-query-*`) are [`Tier::Query`] by rule.
/// Some rows are refined by the arguments in [`classify`].
#[rustfmt::skip]
const TABLE: &[(&str, Tier, &str)] = &[
    ("add-fd", R, "needs a file descriptor passed on the monitor socket"),
    ("add_client", R, "needs a file descriptor passed on the monitor socket (getfd)"),
    ("announce-self", E, "sends gratuitous ARP/RARP packets from the guest's NICs"),
    ("balloon", P, "changes the guest's memory"),
    ("block-commit", P, "merges images of the VM's own disk chain"),
    ("block-dirty-bitmap-add", P, "changes disk image metadata"),
    ("block-dirty-bitmap-clear", P, "changes disk image metadata"),
    ("block-dirty-bitmap-disable", P, "changes disk image metadata"),
    ("block-dirty-bitmap-enable", P, "changes disk image metadata"),
    ("block-dirty-bitmap-merge", P, "changes disk image metadata"),
    ("block-dirty-bitmap-remove", P, "changes disk image metadata"),
    ("block-export-add", D, "exports a disk on a host socket or FUSE mount point"),
    ("block-export-del", P, "ends a disk export"),
    ("block-job-cancel", P, "controls a block job"),
    ("block-job-complete", P, "controls a block job"),
    ("block-job-dismiss", P, "controls a block job"),
    ("block-job-finalize", P, "controls a block job"),
    ("block-job-pause", P, "controls a block job"),
    ("block-job-resume", P, "controls a block job"),
    ("block-job-set-speed", P, "controls a block job"),
    ("block-latency-histogram-set", E, "configures statistics only"),
    ("block-set-write-threshold", E, "configures an event threshold only"),
    ("block-stream", P, "rewrites the VM's own disk images"),
    ("block_resize", P, "resizes an attached disk image"),
    ("block_set_io_throttle", P, "changes disk I/O limits"),
    ("blockdev-add", D, "opens host files, devices and network storage"),
    ("blockdev-backup", P, "copies between block nodes already attached"),
    ("blockdev-change-medium", D, "opens a host file named by the caller"),
    ("blockdev-close-tray", P, "changes removable media state"),
    ("blockdev-create", D, "creates image files on the host"),
    ("blockdev-del", P, "detaches a block node"),
    ("blockdev-insert-medium", P, "inserts an attached block node as media"),
    ("blockdev-mirror", P, "copies between block nodes already attached"),
    ("blockdev-open-tray", P, "changes removable media state"),
    ("blockdev-remove-medium", P, "changes removable media state"),
    ("blockdev-reopen", D, "can reopen host images read-write and swap their files"),
    ("blockdev-snapshot", P, "switches a disk to an overlay node already attached"),
    ("blockdev-snapshot-delete-internal-sync", P, "deletes an internal snapshot of an attached disk"),
    ("blockdev-snapshot-internal-sync", P, "creates an internal snapshot of an attached disk"),
    ("blockdev-snapshot-sync", D, "creates an overlay image file on the host"),
    ("calc-dirty-rate", E, "measures the guest's memory dirty rate"),
    ("cancel-vcpu-dirty-limit", P, "changes vCPU throttling"),
    ("change-backing-file", D, "rewrites which host file an image opens as its backing file"),
    ("change-vnc-password", P, "changes display access"),
    ("chardev-add", D, "opens host files, sockets, pipes and terminals"),
    ("chardev-change", D, "reopens a character device on host files or sockets"),
    ("chardev-remove", P, "removes a character device"),
    ("chardev-send-break", E, "sends a break to a character device"),
    ("client_migrate_info", P, "changes SPICE client migration data"),
    ("closefd", R, "manages file descriptors passed on the monitor socket, which maqet owns"),
    ("cont", P, "resumes the vCPUs"),
    ("device-list-properties", Tier::Query, "reads device type properties"),
    ("device_add", P, "hot-plugs a device"),
    ("device_del", P, "hot-unplugs a device"),
    ("display-reload", P, "reloads display TLS credentials"),
    ("display-update", D, "makes the display listen on host sockets"),
    ("drive-backup", D, "creates a backup image file on the host"),
    ("drive-mirror", D, "creates a mirror image file on the host"),
    ("dump-guest-memory", M, "writes the guest's memory to a host file"),
    ("dump-skeys", D, "writes storage keys to a host file (s390x)"),
    ("dumpdtb", D, "writes the device tree to a host file"),
    ("eject", P, "ejects removable media"),
    ("expire_password", P, "changes display access"),
    ("getfd", R, "needs a file descriptor passed on the monitor socket"),
    ("human-monitor-command", D, "runs any human-monitor command, including ones that write host files"),
    ("inject-nmi", D, "injects a non-maskable interrupt, which can crash or dump the guest kernel"),
    ("input-send-event", E, "sends input events to the guest"),
    ("job-cancel", P, "controls a job"),
    ("job-complete", P, "controls a job"),
    ("job-dismiss", P, "controls a job"),
    ("job-finalize", P, "controls a job"),
    ("job-pause", P, "controls a job"),
    ("job-resume", P, "controls a job"),
    ("memsave", M, "writes guest virtual memory to a host file"),
    ("migrate", D, "sends the whole guest state to a host socket or program (exec:)"),
    ("migrate-continue", P, "controls a migration"),
    ("migrate-incoming", D, "listens on a host socket or runs a host program (exec:)"),
    ("migrate-pause", P, "controls a migration"),
    ("migrate-recover", D, "listens on a host socket or runs a host program (exec:)"),
    ("migrate-set-capabilities", P, "changes migration settings"),
    ("migrate-set-parameters", P, "changes migration settings"),
    ("migrate-start-postcopy", P, "controls a migration"),
    ("migrate_cancel", P, "controls a migration"),
    ("nbd-server-add", P, "exports an attached disk on a running NBD server"),
    ("nbd-server-remove", P, "ends an NBD export"),
    ("nbd-server-start", D, "listens on a host socket"),
    ("nbd-server-stop", P, "stops the NBD server"),
    ("netdev_add", D, "opens tap devices, runs network scripts, forwards host ports"),
    ("netdev_del", P, "removes a network backend"),
    ("object-add", D, "creates objects backed by host files, devices and sockets"),
    ("object-del", P, "removes an object"),
    ("pmemsave", M, "writes guest physical memory to a host file"),
    ("qmp_capabilities", R, "maqet negotiated the monitor's capabilities itself"),
    ("qom-get", Tier::Query, "reads a property"),
    ("qom-list", Tier::Query, "lists properties"),
    ("qom-list-properties", Tier::Query, "lists properties of a type"),
    ("qom-list-types", Tier::Query, "lists types"),
    ("qom-set", P, "changes any object property"),
    ("quit", P, "ends the QEMU process (reads as a stop, not a crash)"),
    ("remove-fd", R, "manages file descriptors passed on the monitor socket, which maqet owns"),
    ("replay-break", P, "controls record/replay"),
    ("replay-delete-break", P, "controls record/replay"),
    ("replay-seek", P, "controls record/replay"),
    ("ringbuf-read", E, "reads (and consumes) a ring buffer character device"),
    ("ringbuf-write", E, "sends data to the guest through a ring buffer character device"),
    ("rtc-reset-reinjection", P, "changes RTC interrupt state"),
    ("screendump", D, "writes an image to a host file named by the caller (use Screendump)"),
    ("send-key", E, "sends keys to the guest"),
    ("set-action", P, "changes what QEMU does on reboot, shutdown, panic and watchdog"),
    ("set-numa-node", P, "configures NUMA (pre-config only)"),
    ("set-vcpu-dirty-limit", P, "changes vCPU throttling"),
    ("set_link", P, "changes a NIC's link state"),
    ("set_password", P, "changes display access"),
    ("sev-inject-launch-secret", P, "writes into confidential guest memory"),
    ("snapshot-delete", P, "deletes a VM snapshot inside attached disks"),
    ("snapshot-load", P, "reverts the VM to a snapshot inside attached disks"),
    ("snapshot-save", P, "saves a VM snapshot inside attached disks"),
    ("stop", P, "pauses the vCPUs"),
    ("system_powerdown", P, "asks the guest to power off"),
    ("system_reset", P, "resets the guest"),
    ("system_wakeup", P, "wakes a suspended guest"),
    ("trace-event-get-state", Tier::Query, "reads trace settings"),
    ("trace-event-set-state", P, "enables tracing, which can flood the VM's log"),
    ("transaction", P, "runs several block actions at once; takes the highest tier of its actions"),
    ("watchdog-set-action", P, "changes what the watchdog does"),
    ("x-blockdev-amend", P, "changes disk image format options"),
    ("x-blockdev-change", P, "changes quorum children among attached nodes"),
    ("x-blockdev-set-iothread", P, "moves a disk to another I/O thread"),
    ("x-colo-lost-heartbeat", P, "controls COLO fault tolerance"),
    ("x-debug-block-dirty-bitmap-sha256", Tier::Query, "reads a bitmap checksum"),
    ("x-exit-preconfig", P, "leaves the pre-config state"),
    ("xen-colo-do-checkpoint", P, "controls Xen COLO"),
    ("xen-load-devices-state", D, "reads device state from a host file"),
    ("xen-save-devices-state", D, "writes device state to a host file"),
    ("xen-set-global-dirty-log", P, "controls Xen dirty logging"),
    ("xen-set-replication", P, "controls Xen replication"),
    ("yank", P, "cuts network connections of block, migration or character devices"),
];

/// `device_add` drivers that reach host devices or files by themselves.
pub const HOST_DEVICE_DRIVERS: &[&str] = &[
    "loader",
    "u2f-passthru",
    "usb-host",
    "usb-mtp",
    "vfio-ap",
    "vfio-ccw",
    "vfio-pci",
    "vfio-pci-nohotplug",
    "vfio-platform",
    "vhost-scsi",
    "vhost-scsi-pci",
    "vhost-vdpa-device-pci",
];

/// `device_add` properties that name host files, devices or descriptors.
pub const HOST_DEVICE_PROPERTIES: &[&str] = &[
    "fd",
    "fds",
    "file",
    "filename",
    "hidraw",
    "host",
    "hostaddr",
    "hostbus",
    "hostdevice",
    "hostport",
    "path",
    "romfile",
    "rootdir",
    "sysfsdev",
    "vhostdev",
    "vhostfd",
    "vhostfds",
];

/// Longest command name accepted (QEMU's are under 40 characters).
const MAX_NAME_LEN: usize = 128;

/// A command as a caller asked for it, checked and classified, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub name: String,
    pub arguments: Option<Map<String, Value>>,
    pub class: Class,
}

impl Command {
    /// Parses `Execute`'s arguments: a QMP-style name and empty or a JSON object. A
    /// refused command is an error here, before any policy or QEMU is asked.
    pub fn parse(name: &str, arguments_json: &str) -> Result<Command, String> {
        check_name(name)?;
        super::limits::check_text(name, arguments_json)?;
        let arguments = parse_arguments(name, arguments_json)?;
        Command::new(name, arguments)
    }

    /// A command maqet builds itself (hot-plug); classified like any other.
    pub fn new(name: &str, arguments: Option<Map<String, Value>>) -> Result<Command, String> {
        if let Some(args) = &arguments {
            super::limits::check_value(name, args)?;
        }
        let class = classify(name, arguments.as_ref());
        if class.tier == Tier::Refused {
            return Err(format!("maqet refuses '{name}': {}", class.why));
        }
        Ok(Command {
            name: name.to_owned(),
            arguments,
            class,
        })
    }

    /// `device_add` of `driver` as `id` with extra properties (hot-plug).
    pub fn device_add(
        driver: &str,
        id: &str,
        mut properties: Map<String, Value>,
    ) -> Result<Command, String> {
        let driver_ok = driver
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && driver
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ','));
        if !driver_ok {
            return Err(format!(
                "'{driver}' is not a device driver name (e.g. virtio-rng-pci; \
                 maqet qmp VM device-list-properties … lists a driver's properties)"
            ));
        }
        check_device_id(id)?;
        for key in ["driver", "id"] {
            if properties.contains_key(key) {
                return Err(format!(
                    "the property '{key}' is DeviceAdd's own argument; leave it out of the properties"
                ));
            }
        }
        properties.insert("driver".into(), driver.into());
        properties.insert("id".into(), id.into());
        Command::new("device_add", Some(properties))
    }

    /// `device_del` of the device `id`.
    pub fn device_del(id: &str) -> Result<Command, String> {
        check_device_id(id)?;
        let mut arguments = Map::new();
        arguments.insert("id".into(), id.into());
        Command::new("device_del", Some(arguments))
    }

    /// Why the command needs `allow_dangerous`, when it does.
    pub fn dangerous_refusal(&self) -> Option<String> {
        self.class.tier.needs_allow_dangerous().then(|| {
            format!(
                "'{}' is {}: {}",
                self.name,
                self.class.tier.as_str(),
                self.class.why
            )
        })
    }

    /// What the audit log keeps of the call: the command and its argument names, never
    /// the values (they may hold passwords or secrets).
    pub fn summary(&self) -> String {
        let mut s = self.name.clone();
        for key in self.arguments.iter().flat_map(|a| a.keys()) {
            s.push(' ');
            s.push_str(key);
        }
        s
    }
}

/// QEMU's rule for ids: a letter, then letters, digits, `-`, `.` or `_`.
fn check_device_id(id: &str) -> Result<(), String> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{id}' is not a valid device id: QEMU ids start with a letter, then letters, \
             digits, '-', '.' or '_'"
        ))
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let well_formed = name.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a QMP command name: names are lower case letters, digits, \
             '-' and '_', starting with a letter (e.g. query-status, device_add)"
        ))
    }
}

fn parse_arguments(name: &str, json: &str) -> Result<Option<Map<String, Value>>, String> {
    if json.trim().is_empty() {
        return Ok(None);
    }
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(other) => Err(format!(
            "arguments of '{name}' must be a JSON object such as {{\"id\": \"rng1\"}} \
             (or empty), not {}",
            json_kind(&other)
        )),
        Err(e) => Err(format!("arguments of '{name}' are not valid JSON: {e}")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The tier of a command with these arguments.
pub fn classify(name: &str, arguments: Option<&Map<String, Value>>) -> Class {
    let arg = |key: &str| arguments.and_then(|a| a.get(key));
    let own_chardev = |v: Option<&Value>| v.and_then(Value::as_str) == Some(QMP_CHARDEV_ID);
    match name {
        "chardev-change" | "chardev-remove" if own_chardev(arg("id")) => {
            return refused_own_monitor();
        }
        "yank" => {
            let hits_monitor = arg("instances")
                .and_then(Value::as_array)
                .is_some_and(|list| {
                    list.iter().any(|i| {
                        i.get("type").and_then(Value::as_str) == Some("chardev")
                            && own_chardev(i.get("id"))
                    })
                });
            if hits_monitor {
                return refused_own_monitor();
            }
        }
        "device_add" => {
            if let Some(driver) = arg("driver").and_then(Value::as_str)
                && HOST_DEVICE_DRIVERS.contains(&driver)
            {
                return Class {
                    tier: Tier::Dangerous,
                    why: format!("device '{driver}' reaches host devices or files").into(),
                };
            }
            if let Some(key) = arguments
                .into_iter()
                .flat_map(|a| a.keys())
                .find(|k| HOST_DEVICE_PROPERTIES.contains(&k.as_str()))
            {
                return Class {
                    tier: Tier::Dangerous,
                    why: format!("property '{key}' names a host file or device").into(),
                };
            }
        }
        "transaction" => return classify_transaction(arg("actions")),
        _ => {}
    }
    if let Ok(i) = TABLE.binary_search_by(|(n, ..)| n.cmp(&name)) {
        let (_, tier, why) = TABLE[i];
        return Class {
            tier,
            why: why.into(),
        };
    }
    if is_query(name) {
        return Class {
            tier: Tier::Query,
            why: "reads state".into(),
        };
    }
    Class {
        tier: Tier::Dangerous,
        why: "not in maqet's table for QEMU 7.2, so treated as dangerous until classified".into(),
    }
}

fn is_query(name: &str) -> bool {
    ["query-", "x-query-", "x-debug-query-"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn refused_own_monitor() -> Class {
    Class {
        tier: Tier::Refused,
        why: format!("it would take away maqet's own monitor (chardev '{QMP_CHARDEV_ID}')").into(),
    }
}

/// A transaction is as trusted as its most demanding action (action types are named
/// like the commands they run; `abort` runs nothing).
fn classify_transaction(actions: Option<&Value>) -> Class {
    let mut class = Class {
        tier: Tier::Privileged,
        why: "runs block actions on attached disks".into(),
    };
    for action in actions.and_then(Value::as_array).into_iter().flatten() {
        let kind = action.get("type").and_then(Value::as_str).unwrap_or("");
        if kind == "abort" {
            continue;
        }
        let data = action.get("data").and_then(Value::as_object);
        let part = if kind == "transaction" {
            // Not a valid action type; never recurse on caller input.
            Class {
                tier: Tier::Dangerous,
                why: "nested transaction".into(),
            }
        } else {
            classify(kind, data)
        };
        if part.tier > class.tier {
            class = Class {
                tier: part.tier,
                why: format!("its action '{kind}' {}", part.why).into(),
            };
        }
    }
    class
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `query-commands` of qemu-system-x86_64 7.2.22.
    const QEMU_7_2_X86_64: &str = include_str!("qemu-7.2-commands.txt");

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn tier(name: &str, a: Value) -> Tier {
        classify(name, Some(&args(a))).tier
    }

    #[test]
    fn table_is_sorted_unique_and_holds_no_queries() {
        for w in TABLE.windows(2) {
            assert!(w[0].0 < w[1].0, "{} must sort before {}", w[0].0, w[1].0);
        }
        for (name, ..) in TABLE {
            assert!(!is_query(name), "{name} is a query by rule");
            assert!(check_name(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn docs_list_the_table() {
        let doc = include_str!("../../docs/qmp.md");
        let start = doc
            .find("<!-- table:start -->")
            .expect("table start marker");
        let end = doc.find("<!-- table:end -->").expect("table end marker");
        let documented: Vec<(String, String)> = doc[start..end]
            .lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((name.to_owned(), (*cells.get(2)?).to_owned()))
            })
            .collect();
        let table: Vec<(String, String)> = TABLE
            .iter()
            .map(|(name, tier, _)| ((*name).to_owned(), tier.as_str().to_owned()))
            .collect();
        assert_eq!(documented, table, "docs/qmp.md and TABLE differ");
    }

    #[test]
    fn every_qemu_7_2_command_is_classified_explicitly() {
        let commands: Vec<&str> = QEMU_7_2_X86_64.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(commands.len(), 216);
        for c in commands {
            let class = classify(c, None);
            assert!(
                !class.why.contains("not in maqet's table"),
                "{c} is not classified"
            );
        }
    }

    #[test]
    fn the_contract_examples() {
        for (name, want) in [
            ("human-monitor-command", Tier::Dangerous),
            ("inject-nmi", Tier::Dangerous),
            ("quit", Tier::Privileged),
            ("system_reset", Tier::Privileged),
            ("system_powerdown", Tier::Privileged),
            ("device_del", Tier::Privileged),
            ("blockdev-del", Tier::Privileged),
            ("pmemsave", Tier::MemoryDump),
            ("memsave", Tier::MemoryDump),
            ("dump-guest-memory", Tier::MemoryDump),
            ("qmp_capabilities", Tier::Refused),
            ("query-status", Tier::Query),
            ("x-query-virtio", Tier::Query),
            ("send-key", Tier::Execute),
            ("screendump", Tier::Dangerous),
            ("migrate", Tier::Dangerous),
            ("object-add", Tier::Dangerous),
            ("chardev-add", Tier::Dangerous),
            ("netdev_add", Tier::Dangerous),
            ("getfd", Tier::Refused),
        ] {
            assert_eq!(classify(name, None).tier, want, "{name}");
        }
    }

    #[test]
    fn tiers_map_to_actions() {
        assert_eq!(Tier::Query.action(), Action::QmpExecute);
        assert_eq!(Tier::Execute.action(), Action::QmpExecute);
        assert_eq!(Tier::Privileged.action(), Action::QmpPrivileged);
        assert_eq!(Tier::MemoryDump.action(), Action::QmpMemoryDump);
        assert_eq!(Tier::Dangerous.action(), Action::QmpDangerous);
        let flagged: Vec<Tier> = Tier::ALL
            .into_iter()
            .filter(|t| t.needs_allow_dangerous())
            .collect();
        assert_eq!(flagged, [Tier::MemoryDump, Tier::Dangerous]);
    }

    #[test]
    fn unknown_commands_are_dangerous() {
        let c = classify("x-new-thing-in-qemu-9", None);
        assert_eq!(c.tier, Tier::Dangerous);
        assert!(c.why.contains("not in maqet's table"));
        assert_eq!(classify("query-new-thing", None).tier, Tier::Query);
    }

    #[test]
    fn maqets_own_monitor_is_untouchable() {
        let own = json!({"id": QMP_CHARDEV_ID});
        assert_eq!(tier("chardev-remove", own.clone()), Tier::Refused);
        assert_eq!(tier("chardev-change", own), Tier::Refused);
        assert_eq!(
            tier("chardev-remove", json!({"id": "serial0"})),
            Tier::Privileged
        );
        assert_eq!(
            tier("chardev-change", json!({"id": "serial0"})),
            Tier::Dangerous
        );
        let yank_own = json!({"instances": [{"type": "block-node", "node-name": "d"},
                                            {"type": "chardev", "id": QMP_CHARDEV_ID}]});
        assert_eq!(tier("yank", yank_own), Tier::Refused);
        assert_eq!(
            tier(
                "yank",
                json!({"instances": [{"type": "chardev", "id": "s0"}]})
            ),
            Tier::Privileged
        );
    }

    #[test]
    fn host_backed_devices_are_dangerous() {
        assert_eq!(
            tier("device_add", json!({"driver": "virtio-rng-pci", "id": "r"})),
            Tier::Privileged
        );
        assert_eq!(
            tier(
                "device_add",
                json!({"driver": "vfio-pci", "host": "01:00.0"})
            ),
            Tier::Dangerous
        );
        let c = classify(
            "device_add",
            Some(&args(json!({"driver": "e1000", "romfile": "/etc/shadow"}))),
        );
        assert_eq!(c.tier, Tier::Dangerous);
        assert!(c.why.contains("romfile"), "{}", c.why);
    }

    #[test]
    fn transactions_take_their_highest_action() {
        let snap_sync = json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "d", "name": "b"}},
            {"type": "blockdev-snapshot-sync", "data": {"device": "d", "snapshot-file": "/x"}},
        ]});
        let c = classify("transaction", Some(&args(snap_sync)));
        assert_eq!(c.tier, Tier::Dangerous);
        assert!(c.why.contains("blockdev-snapshot-sync"), "{}", c.why);
        let internal = json!({"actions": [
            {"type": "abort", "data": {}},
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d", "name": "s"}},
        ]});
        assert_eq!(tier("transaction", internal), Tier::Privileged);
        assert_eq!(classify("transaction", None).tier, Tier::Privileged);
        assert_eq!(
            tier("transaction", json!({"actions": [{"type": "transaction"}]})),
            Tier::Dangerous
        );
    }

    #[test]
    fn names_must_look_like_qmp_names() {
        for good in ["query-status", "device_add", "x-query-virtio", "a"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Query-Status",
            "-x",
            "1abc",
            "query status",
            "quit;",
            "é",
        ] {
            let e = Command::parse(bad, "").unwrap_err();
            assert!(e.contains("not a QMP command name"), "{bad}: {e}");
        }
        assert!(check_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn arguments_must_be_empty_or_an_object() {
        assert_eq!(Command::parse("query-status", "").unwrap().arguments, None);
        assert_eq!(
            Command::parse("query-status", "  \n").unwrap().arguments,
            None
        );
        let c = Command::parse("qom-list", r#"{"path": "/machine"}"#).unwrap();
        assert_eq!(c.arguments, Some(args(json!({"path": "/machine"}))));
        let e = Command::parse("qom-list", "{\n \"path\": }").unwrap_err();
        assert!(
            e.contains("not valid JSON") && e.contains("line 2 column"),
            "{e}"
        );
        for (json, kind) in [("[1]", "an array"), ("\"x\"", "a string"), ("null", "null")] {
            let e = Command::parse("qom-list", json).unwrap_err();
            assert!(
                e.contains("must be a JSON object") && e.contains(kind),
                "{e}"
            );
        }
    }

    #[test]
    fn refused_commands_are_errors_with_a_reason() {
        let e = Command::parse("qmp_capabilities", "").unwrap_err();
        assert!(
            e.contains("refuses 'qmp_capabilities'") && e.contains("negotiated"),
            "{e}"
        );
        let e = Command::parse("chardev-remove", r#"{"id": "maqet-qmp"}"#).unwrap_err();
        assert!(e.contains("own monitor"), "{e}");
    }

    #[test]
    fn dangerous_refusal_says_why() {
        let c = Command::parse("human-monitor-command", r#"{"command-line": "info"}"#).unwrap();
        let why = c.dangerous_refusal().unwrap();
        assert!(
            why.starts_with("'human-monitor-command' is dangerous: runs any"),
            "{why}"
        );
        assert!(
            Command::parse("pmemsave", "")
                .unwrap()
                .dangerous_refusal()
                .is_some()
        );
        assert!(
            Command::parse("quit", "")
                .unwrap()
                .dangerous_refusal()
                .is_none()
        );
    }

    #[test]
    fn summaries_keep_argument_names_not_values() {
        let c = Command::parse(
            "set_password",
            r#"{"protocol": "vnc", "password": "s3cret"}"#,
        )
        .unwrap();
        assert_eq!(c.summary(), "set_password password protocol");
        assert_eq!(Command::parse("quit", "").unwrap().summary(), "quit");
    }

    #[test]
    fn hot_plug_commands() {
        let mut props = Map::new();
        props.insert("bus".into(), "rp1".into());
        let c = Command::device_add("virtio-rng-pci", "rng1", props).unwrap();
        assert_eq!(c.name, "device_add");
        assert_eq!(
            c.arguments,
            Some(args(
                json!({"driver": "virtio-rng-pci", "id": "rng1", "bus": "rp1"})
            ))
        );
        assert_eq!(c.class.tier, Tier::Privileged);
        let host = Command::device_add("usb-host", "u", Map::new()).unwrap();
        assert_eq!(host.class.tier, Tier::Dangerous);
        for (driver, id) in [
            ("", "a"),
            ("virtio rng", "a"),
            ("x", ""),
            ("x", "1a"),
            ("x", "a b"),
        ] {
            assert!(
                Command::device_add(driver, id, Map::new()).is_err(),
                "{driver:?} {id:?}"
            );
        }
        let mut dup = Map::new();
        dup.insert("id".into(), "other".into());
        let e = Command::device_add("virtio-rng-pci", "rng1", dup).unwrap_err();
        assert!(e.contains("'id'"), "{e}");
        let del = Command::device_del("rng1").unwrap();
        assert_eq!(del.arguments, Some(args(json!({"id": "rng1"}))));
        assert_eq!(del.class.tier, Tier::Privileged);
        assert!(Command::device_del("../x").is_err());
    }
}
