//! VM configuration: YAML sources in, a validated [`VmConfig`] out.
//!
//! This module owns everything about a VM definition: parsing YAML with
//! locations (`yaml`), merging several sources in order (`merge`),
//! validation and normalization (`validate`, `storage`, `size`, `paths`), the
//! QEMU argv (`argv`), and the normalized YAML stored in the database
//! ([`VmConfig::to_yaml`], which [`load_stored`] reads back to an equal config).
//!
//! Every problem is reported as a [`Diagnostic`] naming the source, line and
//! column of the node that caused it, even after merging; `load` collects all
//! of them (up to a cap) instead of stopping at the first.
//!
//! Decisions worth knowing (see `docs/config.md` for the user-facing rules):
//! - YAML 1.2 core schema (`yes`/`on` are strings); one document per source;
//!   anchors are accepted, aliases refused; tags other than `!!str` refused.
//! - A top-level key set to null unsets it, so a later file can clear a value.
//! - Relative paths resolve against the directory of the source that declared
//!   them and are normalized lexically (`..` removed) before the
//!   dangerous-location check; the stored YAML holds them absolute.
//! - The `binary` is looked up at load time but is not subject to the
//!   dangerous-location policy (it lives in system directories by design).

mod argv;
mod cloud_init;
mod diag;
mod display;
mod edit;
mod guest;
mod hostfile;
mod merge;
mod paths;
mod session;
mod size;
pub mod source;
mod storage;
mod validate;
mod yaml;

#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) use argv::escape_commas;
pub use cloud_init::{CloudInit, SeedDoc};
pub use diag::{ConfigError, Diagnostic, DiagnosticKind};
pub use display::DisplayServer;
pub use edit::NewDiskEntry;
pub use guest::{Forward, GuestKeys, OWN_NETDEV_ID, Proto, user_netdevs};
pub use hostfile::{Access, HostFile, PassAs};
pub(crate) use paths::find_binary;
pub use session::{LogoutAction, RestartPolicy, SessionKeys, SleepAction};
pub use size::{format_size, parse_size};
pub use storage::{Interface, StorageEntry, StorageKind};

use validate::TOP_LEVEL_KEYS;
use yaml::{Entry, Loc, Node, Origin, Value};

/// One YAML document and where it came from.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// Shown in errors: the file path, or a label like `<AddVM yaml>`.
    pub origin: String,
    pub text: String,
    /// Relative paths declared in this source resolve here (must be absolute).
    pub base_dir: PathBuf,
}

impl ConfigSource {
    /// Reads a config file; its relative paths resolve against its directory.
    pub fn read(path: &Path) -> std::io::Result<ConfigSource> {
        let text = std::fs::read_to_string(path)?;
        let absolute = std::path::absolute(path)?;
        Ok(ConfigSource {
            origin: path.display().to_string(),
            text,
            base_dir: absolute.parent().unwrap_or(Path::new("/")).to_path_buf(),
        })
    }
}

/// What validation needs from the host, passed in so nothing reads the
/// environment behind the caller's back.
pub struct ValidationContext<'a> {
    /// Target of `~` expansion.
    pub home: &'a Path,
    /// `PATH` for finding the QEMU binary (`None`: a default system PATH).
    pub path_env: Option<&'a OsStr>,
    /// The default binary is `qemu-system-<default_arch>`.
    pub default_arch: &'a str,
    /// The dangerous-location policy, called with every absolute host path
    /// (storage files and shares, kernels, `file=`/`path=` values…) and how
    /// QEMU uses it. `Ok` is where the path really leads (symlinks resolved): the
    /// config stores that. An `Err` becomes a config error at that node.
    pub check_path: &'a dyn Fn(&Path, PathUse) -> Result<PathBuf, String>,
    /// The VM's own data directory: a disk entry without `file` is created there
    /// (`<dir>/<name>.<type>`). `None` (no VM yet): such an entry is an error.
    pub vm_data_dir: Option<&'a Path>,
    /// Tells a backing image's format (the service runs `qemu-img info`) for a
    /// storage entry with `backing_file` but no `backing_format`; the result is
    /// stored in the config. `None`: `backing_format` is required.
    pub probe_format: Option<&'a FormatProbe<'a>>,
}

/// Tells an image file's format, or says why it cannot (`qemu-img info`).
pub type FormatProbe<'a> = dyn Fn(&Path) -> Result<String, String> + 'a;

/// How QEMU uses a host path named in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathUse {
    /// Read once at start and never written: `-kernel`, `-initrd`, `-bios`, `-dtb`
    /// (a host kernel from /boot is a normal thing to boot).
    BootInput,
    /// Opened read-only and readable by the guest (read-only disks and ISOs, UEFI
    /// firmware code): may come from the system's shared read-only trees (`/usr`,
    /// `/opt`, …), not from host configuration, devices or state (`/etc`, `/dev`, `/var`).
    ReadOnly,
    /// Disks, shares, sockets and every other path QEMU may write through.
    Storage,
}

/// Parses, merges (in order, later wins) and validates VM config sources.
pub fn load(sources: &[ConfigSource], ctx: &ValidationContext) -> Result<VmConfig, ConfigError> {
    load_with(sources, ctx, true)
}

/// Re-reads YAML produced by [`VmConfig::to_yaml`] (e.g. from the database).
/// Validates like [`load`] except that the binary is not looked up: a VM whose
/// QEMU was uninstalled must still load, and [`VmConfig::resolve_binary`]
/// reports the problem when it starts.
pub fn load_stored(yaml: &str, ctx: &ValidationContext) -> Result<VmConfig, ConfigError> {
    let source = ConfigSource {
        origin: "<stored config>".to_owned(),
        text: yaml.to_owned(),
        base_dir: PathBuf::from("/"),
    };
    load_with(&[source], ctx, false)
}

fn load_with(
    sources: &[ConfigSource],
    ctx: &ValidationContext,
    check_binary: bool,
) -> Result<VmConfig, ConfigError> {
    let mut diags = diag::Diags::default();
    let mut docs = Vec::new();
    let mut fallback = None;
    for source in sources {
        let origin = Arc::new(Origin {
            label: source.origin.clone(),
            base_dir: source.base_dir.clone(),
        });
        fallback.get_or_insert_with(|| Loc::start(&origin));
        match yaml::parse(&source.text, origin, &mut diags) {
            Some(
                root @ Node {
                    value: Value::Map(_),
                    ..
                },
            ) => docs.push(root),
            Some(root) => {
                let message = format!(
                    "a VM config must be a mapping of keys like `memory:`, found {}",
                    root.kind_name()
                );
                diags.error(&root.loc, message);
            }
            None => {}
        }
    }
    // YAML-level problems first: validating a half-read tree would only add noise.
    if !diags.is_empty() {
        return Err(diags.into_error());
    }
    let fallback = fallback.unwrap_or_else(|| {
        Loc::start(&Arc::new(Origin {
            label: "<config>".to_owned(),
            base_dir: PathBuf::from("/"),
        }))
    });
    let merged = merge::merge_documents(docs);
    let config = validate::compile(
        merged,
        &fallback,
        &mut validate::Cx::new(ctx, &mut diags, check_binary),
    );
    diags.finish(config)
}

/// A validated, merged VM definition. Equality compares the definition, not
/// where its parts were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Normalized top-level entries, in `TOP_LEVEL_KEYS` order.
    doc: Vec<Entry>,
    name: Option<String>,
    /// As written (command name) or absolute (path); `None`: the default.
    binary: Option<String>,
    default_binary: String,
    /// QEMU arguments; host files are slots into `host_files`.
    argv: Vec<Vec<hostfile::Seg>>,
    host_files: Vec<HostFile>,
    storage: Vec<StorageEntry>,
    guest: GuestKeys,
    firmware: Firmware,
    tpm: bool,
    display: Option<DisplayConfig>,
    session: SessionKeys,
}

/// `display: spice | vnc`: the server maqetd adds at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DisplayConfig {
    pub server: DisplayServer,
    /// The config names no graphics device (`vga:`, `-vga`, a graphics `-device`), so
    /// maqet adds one: a display server without a screen would show nothing.
    pub add_graphics_device: bool,
}

/// The `firmware:` key: what the VM boots from. UEFI images are found through QEMU's
/// firmware descriptors when the VM starts (`storage::firmware`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Firmware {
    /// QEMU's default (SeaBIOS on x86), or whatever `-bios` the config names.
    #[default]
    Bios,
    /// UEFI (OVMF) without Secure Boot.
    Uefi,
    /// UEFI with Secure Boot enforced and the usual keys enrolled.
    UefiSecure,
}

impl Firmware {
    pub fn parse(text: &str) -> Option<Firmware> {
        Some(match text {
            "bios" => Firmware::Bios,
            "uefi" => Firmware::Uefi,
            "uefi-secure" => Firmware::UefiSecure,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
            Firmware::UefiSecure => "uefi-secure",
        }
    }
}

impl VmConfig {
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The configured binary (command name or absolute path), or the default
    /// `qemu-system-<arch>`.
    pub fn binary(&self) -> &str {
        self.binary.as_deref().unwrap_or(&self.default_binary)
    }

    /// Finds the binary now (also used at start time: it may have been
    /// uninstalled since the config was validated).
    pub fn resolve_binary(&self, path_env: Option<&OsStr>) -> Result<PathBuf, String> {
        paths::find_binary(self.binary(), path_env)
            .map_err(|e| format!("{} ({})", e.message, e.hint))
    }

    /// QEMU arguments, without the binary and without maqet's own management
    /// options, naming host files by path (for people and logs; QEMU itself gets
    /// [`VmConfig::launch_args`]).
    pub fn qemu_args(&self) -> Vec<String> {
        let by_name = |i: usize| self.host_files[i].path.to_string_lossy().into_owned();
        self.launch_args(&by_name, &|_| String::new())
    }

    /// QEMU arguments with each host file slot filled by `fill(index into
    /// [`VmConfig::host_files`])`, e.g. `/dev/fdset/1`, and each backing chain slot
    /// (see [`HostFile::chain`]) by `chain(index)`, e.g. `,backing.driver=qcow2,…`.
    pub fn launch_args(
        &self,
        fill: &dyn Fn(usize) -> String,
        chain: &dyn Fn(usize) -> String,
    ) -> Vec<String> {
        self.argv
            .iter()
            .map(|word| hostfile::render(word, fill, chain))
            .collect()
    }

    /// Every host file the arguments name, in argv order: maqetd opens them at start.
    pub fn host_files(&self) -> &[HostFile] {
        &self.host_files
    }

    pub fn storage(&self) -> &[StorageEntry] {
        &self.storage
    }

    /// `guest_agent`, `forwards` (and their netdev), `ssh_user`.
    pub fn guest(&self) -> &GuestKeys {
        &self.guest
    }

    /// `autostart`, `restart`, `on_sleep`, `on_logout`, scope limits.
    pub fn session(&self) -> &SessionKeys {
        &self.session
    }

    pub fn firmware(&self) -> Firmware {
        self.firmware
    }

    /// `tpm: true`: maqetd gives the VM an emulated TPM 2.0.
    pub fn tpm(&self) -> bool {
        self.tpm
    }

    /// `display: spice | vnc`: the display server maqetd gives QEMU, if any.
    pub fn display(&self) -> Option<DisplayConfig> {
        self.display
    }

    /// The machine type the arguments choose (`-machine q35,smm=on` → `q35`), or
    /// `None` for QEMU's default.
    pub fn machine_type(&self) -> Option<String> {
        let args = self.qemu_args();
        let value = args
            .windows(2)
            .find(|w| matches!(w[0].as_str(), "-machine" | "--machine" | "-M" | "--M"))
            .map(|w| w[1].clone())?;
        value
            .split(',')
            .find_map(|part| match part.split_once('=') {
                Some(("type", t)) => Some(t.to_owned()),
                Some(_) => None,
                None => Some(part.to_owned()),
            })
    }

    /// The merged config as YAML, with absolute paths; [`load`] reads it back
    /// (from any base directory) to an equal config with the same argv.
    pub fn to_yaml(&self) -> String {
        yaml::emit_document(&self.doc)
    }

    /// Sets `name` (the caller validates it with [`validate_vm_name`]).
    pub fn set_name(&mut self, name: &str) {
        self.name = Some(name.to_owned());
        let origin = Arc::new(Origin {
            label: "<set_name>".to_owned(),
            base_dir: PathBuf::from("/"),
        });
        let loc = Loc::start(&origin);
        let value = Node::new(Value::Str(name.to_owned()), loc.clone());
        match self.doc.iter_mut().find(|e| e.key == "name") {
            Some(entry) => entry.value = value,
            // `name` sorts first among the top-level keys.
            None => self.doc.insert(
                0,
                Entry {
                    key: "name".to_owned(),
                    key_loc: loc,
                    value,
                },
            ),
        }
    }

    fn entry(&self, key: &str) -> Option<&Entry> {
        self.doc.iter().find(|e| e.key == key)
    }
}

/// Top-level keys (`memory`, `arguments`, `storage`, …) whose value differs
/// between two configs, in the normalized key order.
pub fn changed_keys(old: &VmConfig, new: &VmConfig) -> Vec<String> {
    TOP_LEVEL_KEYS
        .iter()
        .filter(|key| old.entry(key) != new.entry(key))
        .map(|key| (*key).to_owned())
        .collect()
}

/// VM names: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`, and
/// not a UUID (the API accepts a name or a UUID in the same argument).
pub fn validate_vm_name(name: &str) -> Result<(), String> {
    let rules = "use 1 to 64 letters, digits, `.`, `_` or `-`, not starting with `.` or `-`";
    if name.is_empty() || name.len() > 64 {
        return Err(format!("invalid VM name `{name}`: {rules}"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return Err(format!(
            "invalid VM name `{name}`: `{c}` is not allowed; {rules}"
        ));
    }
    if name.starts_with(['.', '-']) {
        return Err(format!("invalid VM name `{name}`: {rules}"));
    }
    if uuid::Uuid::parse_str(name).is_ok() {
        return Err(format!(
            "invalid VM name `{name}`: it reads as a UUID, and VM ids are UUIDs"
        ));
    }
    Ok(())
}
