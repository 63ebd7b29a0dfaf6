//! Turns the merged tree into a `VmConfig`: checks every top-level key,
//! normalizes values in place (absolute paths, strings where strings are
//! meant) and builds the argv, reporting every problem with its location.

use std::collections::HashMap;

use std::path::PathBuf;

use super::argv::{SINGLE_INSTANCE, canonical, compile_args, compile_arguments, reserved_reason};
use super::cloud_init::{self, CloudInit};
use super::diag::{Diags, suggest, unknown_hint};
use super::display::{self, DisplayServer};
use super::guest::{self, GuestKeys};
use super::hostfile::{Access, HostFile, Markers, PassAs};
use super::paths::{find_binary, is_path_like, resolve_host_path};
use super::session::{self, LogoutAction, RestartPolicy, SessionKeys, SleepAction};
use super::size::{int_value, parse_size_with_unit};
use super::storage::{compile_storage, storage_argv};
use super::yaml::{Entry, Loc, Node, Value};
use super::{DisplayConfig, Firmware, PathUse, ValidationContext, VmConfig, validate_vm_name};

/// Valid top-level keys, in the order normalized YAML lists them.
pub(crate) const TOP_LEVEL_KEYS: &[&str] = &[
    "name",
    "binary",
    "memory",
    "cpu",
    "display",
    "vga",
    "firmware",
    "tpm",
    "arguments",
    "storage",
    "args",
    "guest_agent",
    "forwards",
    "ssh_user",
    "autostart",
    "autostart_delay",
    "restart",
    "on_sleep",
    "on_logout",
    "memory_max",
    "cpu_quota",
    "cloud_init",
    "ssh_authorized_keys",
    "hostname",
    "user",
];

const SMP_KEYS: &[&str] = &[
    "cpus", "maxcpus", "sockets", "dies", "clusters", "modules", "cores", "threads", "books",
    "drawers",
];

/// Validation state shared by the passes: the caller's context, the
/// diagnostics, and which single-instance options / ids are already taken.
pub(crate) struct Cx<'c, 'a> {
    pub ctx: &'c ValidationContext<'a>,
    pub diags: &'c mut Diags,
    /// Off when re-reading a stored config: the binary is checked at start, and a
    /// stored path must still lead where it led when it was stored.
    check_binary: bool,
    first_use: HashMap<String, (Loc, &'static str)>,
    ids: HashMap<(String, String), Loc>,
    markers: Markers,
    host_files: Vec<HostFile>,
    /// Whether the `arguments` item being compiled asks for read-only access
    /// (`readonly=on`, `media=cdrom`): its disk is then opened read-only.
    pub item_readonly: bool,
    /// Whether it names an image format other than qcow2 (`format=raw`): then no
    /// qcow2 header of its file is ever read.
    pub item_not_qcow2: bool,
}

impl<'c, 'a> Cx<'c, 'a> {
    pub fn new(ctx: &'c ValidationContext<'a>, diags: &'c mut Diags, check_binary: bool) -> Self {
        Cx {
            ctx,
            diags,
            check_binary,
            first_use: HashMap::new(),
            ids: HashMap::new(),
            markers: Markers::new(),
            host_files: Vec::new(),
            item_readonly: false,
            item_not_qcow2: false,
        }
    }

    /// Makes a path node absolute (rewriting it in the tree) without the
    /// dangerous-location policy; `None` after reporting a problem.
    fn absolute(&mut self, node: &mut Node) -> Option<String> {
        let Value::Str(raw) = &node.value else {
            let message = format!("expected a path, found {}", node.kind_name());
            self.diags.error(&node.loc, message);
            return None;
        };
        match resolve_host_path(raw, &node.loc.origin.base_dir, self.ctx.home) {
            Ok(path) => {
                let path = path
                    .to_str()
                    .expect("resolve_host_path returns UTF-8")
                    .to_owned();
                node.value = Value::Str(path.clone());
                Some(path)
            }
            Err(message) => {
                self.diags
                    .error(&node.loc, format!("invalid path: {message}"));
                None
            }
        }
    }

    /// A host path maqet or QEMU will open: made absolute, checked against the
    /// dangerous-location policy, and rewritten in the tree to where it really
    /// leads (symlinks resolved), so the stored config names the checked file.
    pub fn resolve_path(&mut self, node: &mut Node, usage: PathUse) -> Option<String> {
        let path = self.absolute(node)?;
        let hint = "choose a location of your own (docs/storage.md lists the refused places)";
        let resolved = match (self.ctx.check_path)(path.as_ref(), usage) {
            Ok(resolved) => resolved,
            Err(why) => {
                let message = format!("path `{path}` is not allowed: {why}");
                self.diags.dangerous(&node.loc, message, hint);
                return None;
            }
        };
        let Some(resolved) = resolved.to_str().map(str::to_owned) else {
            let message = format!(
                "path `{path}` leads to `{}`, which is not valid UTF-8",
                resolved.display()
            );
            self.diags.error(&node.loc, message);
            return None;
        };
        if resolved != path {
            if !self.check_binary {
                // Stored paths are resolved already: one that resolves elsewhere now
                // had a component replaced by a symlink since.
                let message = format!(
                    "path `{path}` now leads to `{resolved}`: a directory on the way was replaced by a symlink after the VM was defined"
                );
                let hint = "if the move is intended, apply the config again (`maqet apply`) so the new location is checked and stored";
                self.diags.dangerous(&node.loc, message, hint);
                return None;
            }
            node.value = Value::Str(resolved.clone());
        }
        Some(resolved)
    }

    /// [`Cx::resolve_path`] for a file QEMU will use: registered as a host file that
    /// maqetd opens at start; returns the slot to put in the argv word.
    pub fn host_file(
        &mut self,
        node: &mut Node,
        usage: PathUse,
        access: Access,
        pass: PassAs,
        escaped: bool,
    ) -> Option<String> {
        let path = self.resolve_path(node, usage)?;
        let file = HostFile {
            path: PathBuf::from(path),
            access,
            pass,
            qcow2: pass == PassAs::FdSet && !self.item_not_qcow2,
            chain: None,
        };
        Some(self.register_host_file(file, escaped))
    }

    /// The slot for `host_files[index]`'s backing chain options.
    pub fn chain_slot(&self, index: usize) -> String {
        self.markers.chain_marker(index)
    }

    /// How many host files are registered so far.
    pub fn host_file_count(&self) -> usize {
        self.host_files.len()
    }

    /// Marks `host_files[index]` as a `-drive` image whose backing chain maqetd passes.
    pub fn pass_chain(&mut self, index: usize, prefix: &str) {
        self.host_files[index].chain = Some(prefix.to_owned());
    }

    pub fn host_file_at(&self, index: usize) -> &HostFile {
        &self.host_files[index]
    }

    /// Registers an already resolved host file; returns its argv slot.
    pub fn register_host_file(&mut self, file: HostFile, escaped: bool) -> String {
        let index = self.host_files.len();
        self.host_files.push(file);
        self.markers.marker(index, escaped)
    }

    /// Records a use of `-option`; `false` (after reporting) when it is
    /// reserved or a second use of a single-instance option.
    pub fn register_option(&mut self, option: &str, loc: &Loc, by: &'static str) -> bool {
        let canon = canonical(option);
        if let Some(reason) = reserved_reason(canon) {
            self.diags
                .error(loc, format!("`-{option}` cannot be used: {reason}"));
            return false;
        }
        if !SINGLE_INSTANCE.contains(&canon) {
            return true;
        }
        if let Some((first, first_by)) = self.first_use.get(canon) {
            let message =
                format!("`-{canon}` is already set at {first} by `{first_by}`; set it once");
            let top_level = ["memory", "cpu", "display", "vga"].contains(first_by);
            if top_level && !first.same_source(loc) {
                let hint = format!("to override it from this file, set `{first_by}:` here instead");
                self.diags.error_hint(loc, message, hint);
            } else {
                self.diags.error(loc, message);
            }
            return false;
        }
        self.first_use.insert(canon.to_owned(), (loc.clone(), by));
        true
    }

    /// Records `-option …,id=<id>`; QEMU refuses the same id twice.
    pub fn register_id(&mut self, option: &str, id: &str, loc: &Loc) {
        let key = (canonical(option).to_owned(), id.to_owned());
        if let Some(first) = self.ids.get(&key) {
            let message = format!("`-{}` with id `{id}` is already defined at {first}", key.0);
            self.diags.error_hint(
                loc,
                message,
                "ids must be unique; a later file replaces an item with the same id",
            );
        } else {
            self.ids.insert(key, loc.clone());
        }
    }
}

/// The merged top-level entries, one slot per known key.
type Slots = [Option<Entry>; TOP_LEVEL_KEYS.len()];

fn slot(key: &str) -> usize {
    TOP_LEVEL_KEYS
        .iter()
        .position(|k| *k == key)
        .expect("known key")
}

/// Validates the merged document. `fallback` locates problems that belong to
/// no node (the default binary missing). The result is only usable when no
/// diagnostic was reported; the caller decides.
pub(crate) fn compile(root: Option<Node>, fallback: &Loc, cx: &mut Cx) -> VmConfig {
    let mut slots: Slots = Default::default();
    if let Some(Node {
        value: Value::Map(entries),
        ..
    }) = root
    {
        for entry in entries {
            match TOP_LEVEL_KEYS.iter().position(|k| *k == entry.key) {
                // A null value unsets the key (a later file can clear one).
                Some(_) if entry.value.value == Value::Null => {}
                Some(i) => slots[i] = Some(entry),
                None => {
                    let hint = unknown_hint(&entry.key, TOP_LEVEL_KEYS, "keys");
                    cx.diags.error_hint(
                        &entry.key_loc,
                        format!("unknown key `{}`", entry.key),
                        hint,
                    );
                }
            }
        }
    }

    let name = slots[slot("name")]
        .as_mut()
        .and_then(|e| vm_name(&mut e.value, cx));
    let binary = slots[slot("binary")]
        .as_mut()
        .and_then(|e| binary(&mut e.value, cx));
    let default_binary = format!("qemu-system-{}", cx.ctx.default_arch);
    if slots[slot("binary")].is_none() {
        check_binary(&default_binary, fallback, cx);
    }

    let mut argv = Vec::new();
    if let Some(e) = &mut slots[slot("memory")] {
        top_level_option(e, "m", memory, cx, &mut argv);
    }
    if let Some(e) = &mut slots[slot("cpu")] {
        top_level_option(e, "smp", cpu, cx, &mut argv);
    }
    let display_server = slots[slot("display")]
        .as_mut()
        .and_then(|e| display(e, cx, &mut argv));
    if let Some(e) = &mut slots[slot("vga")] {
        top_level_option(e, "vga", plain_string, cx, &mut argv);
    }
    let firmware = slots[slot("firmware")]
        .as_mut()
        .and_then(|e| firmware(e, cx))
        .unwrap_or_default();
    let tpm = slots[slot("tpm")]
        .as_ref()
        .is_some_and(|e| tpm(&e.value, cx));
    if let Some(items) = slots[slot("arguments")].as_mut().and_then(|e| list(e, cx)) {
        compile_arguments(items, cx, &mut argv);
    }
    let storage = match slots[slot("storage")].as_mut().and_then(|e| list(e, cx)) {
        Some(items) => compile_storage(items, cx),
        None => Vec::new(),
    };
    argv.extend(storage_argv(&storage, cx));
    if let Some(items) = slots[slot("args")].as_mut().and_then(|e| list(e, cx)) {
        compile_args(items, cx, &mut argv);
    }
    let guest = guest_keys(&mut slots, fallback, cx, &mut argv);
    let display = display_server.map(|(server, loc)| {
        display::check_no_second_server(server, &argv, &loc, cx);
        DisplayConfig {
            server,
            add_graphics_device: !display::has_graphics_device(&argv),
        }
    });
    let session = session_keys(&slots, cx);

    VmConfig {
        doc: slots.into_iter().flatten().collect(),
        name,
        binary,
        default_binary,
        argv: argv.iter().map(|w| cx.markers.split(w)).collect(),
        host_files: std::mem::take(&mut cx.host_files),
        storage,
        firmware,
        tpm,
        guest,
        display,
        session,
    }
}

/// `display:`: `spice` / `vnc` ask for maqet's display server (no `-display` word: the
/// server is added at start, `vm::display`); any other value is `-display <value>`.
/// Either way it claims `-display`. Returns the server and where the key was written.
fn display(entry: &mut Entry, cx: &mut Cx, argv: &mut Vec<String>) -> Option<(DisplayServer, Loc)> {
    let server = match &entry.value.value {
        Value::Str(s) => DisplayServer::parse(s),
        _ => None,
    };
    match server {
        Some(server) => cx
            .register_option("display", &entry.key_loc, "display")
            .then(|| (server, entry.value.loc.clone())),
        None => {
            top_level_option(entry, "display", plain_string, cx, argv);
            None
        }
    }
}

/// `autostart`, `restart`, `on_sleep`, … : read by maqetd, never on the command line.
fn session_keys(slots: &Slots, cx: &mut Cx) -> SessionKeys {
    let node = |key: &str| slots[slot(key)].as_ref().map(|e| &e.value);
    let d = &mut *cx.diags;
    let mut keys = SessionKeys::default();
    if let Some(n) = node("autostart") {
        keys.autostart = session::boolean(n, "autostart", d);
    }
    if let Some(n) = node("autostart_delay") {
        keys.autostart_delay = session::autostart_delay(n, d);
    }
    if let Some(n) = node("restart") {
        let choices = "`no` (the default), `on-crash` or `always`";
        keys.restart =
            session::keyword(n, "restart", RestartPolicy::parse, choices, d).unwrap_or_default();
    }
    if let Some(n) = node("on_sleep") {
        let choices = "`pause` (the default), `save` or `none`";
        keys.on_sleep =
            session::keyword(n, "on_sleep", SleepAction::parse, choices, d).unwrap_or_default();
    }
    if let Some(n) = node("on_logout") {
        let choices = "`keep` (the default), `stop` or `save`";
        keys.on_logout =
            session::keyword(n, "on_logout", LogoutAction::parse, choices, d).unwrap_or_default();
    }
    keys.memory_max = node("memory_max").and_then(|n| session::memory_max(n, d));
    keys.cpu_quota = node("cpu_quota").and_then(|n| session::cpu_quota(n, d));
    keys
}

/// `guest_agent`, `forwards`, `ssh_user`; a forward network maqet provides goes last
/// in the argv, so a config without forwards keeps its argv word for word.
fn guest_keys(slots: &mut Slots, fallback: &Loc, cx: &mut Cx, argv: &mut Vec<String>) -> GuestKeys {
    let guest_agent = slots[slot("guest_agent")]
        .as_mut()
        .is_some_and(|e| guest::guest_agent(e, cx));
    let ssh_user = slots[slot("ssh_user")]
        .as_mut()
        .and_then(|e| guest::ssh_user(e, cx));
    let mut forwards = Vec::new();
    let mut loc = fallback.clone();
    if let Some(entry) = slots[slot("forwards")].as_mut() {
        loc = entry.key_loc.clone();
        if let Some(items) = list(entry, cx) {
            forwards = guest::forwards(items, cx);
        }
    }
    let (forward_netdev, network) = guest::forward_network(&forwards, argv, &loc, cx);
    argv.extend(network);
    GuestKeys {
        guest_agent,
        forwards: forwards.into_iter().map(|(f, _)| f).collect(),
        forward_netdev,
        ssh_user,
        cloud_init: cloud_init_keys(slots, cx),
    }
}

/// `cloud_init` and its convenience keys; `None` when the config names none of them.
fn cloud_init_keys(slots: &mut Slots, cx: &mut Cx) -> Option<CloudInit> {
    let mut seed = CloudInit::default();
    let mut any = false;
    if let Some(e) = slots[slot("cloud_init")].as_mut() {
        any = true;
        cloud_init::cloud_init(e, &mut seed, cx);
    }
    if let Some(e) = slots[slot("ssh_authorized_keys")].as_mut() {
        any = true;
        seed.ssh_authorized_keys = cloud_init::authorized_keys(e, cx);
    }
    if let Some(e) = slots[slot("hostname")].as_mut() {
        any = true;
        seed.hostname = cloud_init::name(e, cx);
    }
    if let Some(e) = slots[slot("user")].as_mut() {
        any = true;
        seed.user = cloud_init::name(e, cx);
        if matches!(seed.user_data, Some(cloud_init::SeedDoc::File(_))) {
            cx.diags.error_hint(
                &e.key_loc,
                "`user` cannot be added to a `user_data` file",
                "create the user in that file (`users:`), or write `user_data` inline",
            );
        }
    }
    any.then_some(seed)
}

/// `tpm: true`: an emulated TPM 2.0 (an `swtpm` per VM, started by maqetd: `vm::tpm`).
fn tpm(node: &Node, cx: &mut Cx) -> bool {
    match node.value {
        Value::Bool(b) => b,
        _ => {
            let message = format!("`tpm` must be true or false, found {}", node.kind_name());
            cx.diags.error(&node.loc, message);
            false
        }
    }
}

/// `firmware: bios | uefi | uefi-secure`. UEFI is attached at start (`storage::firmware`),
/// so it claims `-bios`: a config cannot name other firmware besides.
fn firmware(entry: &mut Entry, cx: &mut Cx) -> Option<Firmware> {
    let text = plain_string(&mut entry.value, cx)?;
    let Some(firmware) = Firmware::parse(&text) else {
        let message = format!("unknown firmware `{text}`");
        cx.diags.error_hint(
            &entry.value.loc,
            message,
            "use `bios` (the default), `uefi` or `uefi-secure`".to_owned(),
        );
        return None;
    };
    if firmware != Firmware::Bios {
        cx.register_option("bios", &entry.key_loc, "firmware");
    }
    Some(firmware)
}

fn vm_name(node: &mut Node, cx: &mut Cx) -> Option<String> {
    let text = plain_string(node, cx)?;
    match validate_vm_name(&text) {
        Ok(()) => Some(text),
        Err(message) => {
            cx.diags.error(&node.loc, message);
            None
        }
    }
}

/// `binary:` as it will be stored: command names as written, paths absolute.
fn binary(node: &mut Node, cx: &mut Cx) -> Option<String> {
    let Value::Str(text) = &node.value else {
        let message = format!(
            "`binary` must be a path or command name, found {}",
            node.kind_name()
        );
        cx.diags.error(&node.loc, message);
        return None;
    };
    // The binary lives in system directories by design: no dangerous-path check.
    let binary = if is_path_like(text) {
        cx.absolute(node)?
    } else {
        text.clone()
    };
    check_binary(&binary, &node.loc, cx);
    Some(binary)
}

fn check_binary(binary: &str, loc: &Loc, cx: &mut Cx) {
    if !cx.check_binary {
        return;
    }
    if let Err(e) = find_binary(binary, cx.ctx.path_env) {
        cx.diags.error_hint(loc, e.message, e.hint);
    }
}

fn list<'n>(entry: &'n mut Entry, cx: &mut Cx) -> Option<&'n mut Vec<Node>> {
    let found = entry.value.kind_name();
    match &mut entry.value.value {
        Value::Seq(items) => Some(items),
        _ => {
            let message = format!("`{}` must be a list, found {found}", entry.key);
            cx.diags.error(&entry.value.loc, message);
            None
        }
    }
}

/// A top-level key that stands for a single-instance option: its value is
/// checked (and normalized) by `value`, then `-option value` is emitted.
fn top_level_option(
    entry: &mut Entry,
    option: &str,
    value: fn(&mut Node, &mut Cx) -> Option<String>,
    cx: &mut Cx,
    argv: &mut Vec<String>,
) {
    let by = TOP_LEVEL_KEYS[slot(&entry.key)];
    let registered = cx.register_option(option, &entry.key_loc, by);
    if let Some(text) = value(&mut entry.value, cx)
        && registered
    {
        argv.extend([format!("-{option}"), text]);
    }
}

/// Strings, and numbers read as their text (`name: 2024`); stored as strings.
fn plain_string(node: &mut Node, cx: &mut Cx) -> Option<String> {
    match &node.value {
        Value::Str(s) | Value::Int(s) | Value::Float(s) => {
            let text = s.clone();
            node.value = Value::Str(text.clone());
            Some(text)
        }
        _ => {
            cx.diags.error(
                &node.loc,
                format!("expected a string, found {}", node.kind_name()),
            );
            None
        }
    }
}

/// `memory`: MiB as an integer (normalized to decimal) or a size string kept as written.
fn memory(node: &mut Node, cx: &mut Cx) -> Option<String> {
    let hint = "e.g. `memory: 4G`, or a number of MiB like `memory: 2048`";
    let result = match &node.value {
        Value::Int(text) => match int_value(text) {
            Some(mib) if mib > 0 && mib <= i128::from(u64::MAX >> 20) => {
                node.value = Value::Int(mib.to_string());
                Ok(mib.to_string())
            }
            Some(mib) if mib <= 0 => Err(format!(
                "`memory` must be greater than zero, found `{text}`"
            )),
            _ => Err(format!("`memory: {text}` is too large")),
        },
        Value::Str(s) => parse_size_with_unit(s, 20)
            .map(|bytes| qemu_memory_size(s, bytes))
            .map_err(|e| format!("invalid `memory`: {e}")),
        _ => Err(format!(
            "`memory` must be a size, found {}",
            node.kind_name()
        )),
    };
    result
        .map_err(|message| cx.diags.error_hint(&node.loc, message, hint))
        .ok()
}

/// `-m`'s value for a size string. QEMU reads `2G`, `512M` and plain MiB but not
/// `1GB`, `1GiB` or (in older versions) fractions, all of which maqet 0.0.x configs use:
/// those are converted to the largest exact unit (`1.5G` → `1536M`).
fn qemu_memory_size(written: &str, bytes: u64) -> String {
    let t = written.trim();
    let plain = t.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    if plain.chars().all(|c| c.is_ascii_digit()) && t.len() - plain.len() <= 1 {
        return t.to_owned();
    }
    [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')]
        .into_iter()
        .find(|(shift, _)| bytes.is_multiple_of(1u64 << shift))
        .map_or_else(
            || format!("{bytes}B"),
            |(shift, unit)| format!("{}{unit}", bytes >> shift),
        )
}

/// `cpu`: the CPU count (`-smp`), an integer or an `-smp` string.
fn cpu(node: &mut Node, cx: &mut Cx) -> Option<String> {
    let hint = "e.g. `cpu: 4` or `cpu: 4,sockets=1,cores=4`";
    let result = match &node.value {
        Value::Int(text) => match int_value(text) {
            Some(n) if n > 0 && n <= i128::from(u32::MAX) => {
                node.value = Value::Int(n.to_string());
                Ok(n.to_string())
            }
            _ => Err(format!(
                "`cpu` must be a positive CPU count, found `{text}`"
            )),
        },
        Value::Str(s) => check_smp(s)
            .map(|()| s.clone())
            .map_err(|e| format!("invalid `cpu` `{s}`: {e}")),
        _ => Err(format!(
            "`cpu` must be a CPU count, found {}",
            node.kind_name()
        )),
    };
    result
        .map_err(|message| cx.diags.error_hint(&node.loc, message, hint))
        .ok()
}

/// `[cpus=]N[,key=N…]` with QEMU's `-smp` keys.
fn check_smp(spec: &str) -> Result<(), String> {
    let positive = |v: &str| v.parse::<u32>().is_ok_and(|n| n > 0);
    for (i, part) in spec.split(',').enumerate() {
        match part.split_once('=') {
            Some((key, value)) => {
                if !SMP_KEYS.contains(&key) {
                    return Err(match suggest(key, SMP_KEYS) {
                        Some(s) => format!("unknown `-smp` key `{key}` (did you mean `{s}`?)"),
                        None => format!("unknown `-smp` key `{key}`"),
                    });
                }
                if !positive(value) {
                    return Err(format!("`{key}` needs a positive number"));
                }
            }
            None if i == 0 && positive(part) => {}
            None => return Err(format!("`{part}` is not a positive number or `key=value`")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smp_specs() {
        assert!(check_smp("4").is_ok());
        assert!(check_smp("4,sockets=1,cores=4").is_ok());
        assert!(check_smp("cpus=4,maxcpus=8").is_ok());
        assert!(check_smp("sockets=2,cores=2").is_ok());
        assert!(check_smp("0").is_err());
        assert!(check_smp("4,").is_err());
        assert!(check_smp("four").is_err());
        assert!(
            check_smp("4,core=2")
                .unwrap_err()
                .contains("did you mean `cores`")
        );
        assert!(check_smp("4,cores=x").is_err());
    }
}
