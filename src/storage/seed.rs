//! cloud-init's NoCloud seed: `user-data`, `meta-data` and `network-config` composed
//! from a config's `cloud_init` keys, written as an ISO 9660 volume labelled `cidata`
//! (with Joliet and Rock Ridge names, as cloud-localds makes it) by a packaged tool
//! (`xorriso` or `genisoimage`), and attached read-only. docs/storage.md says why a tool
//! and not maqet's own writer.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::{Mapping, Value};

use crate::config::{CloudInit, SeedDoc};

/// The seed's file name in the VM's data directory.
pub const FILE_NAME: &str = "cidata.iso";
/// The volume label cloud-init's NoCloud datasource looks for.
pub const LABEL: &str = "cidata";
/// The most a seed document read from a file may hold (cloud-init's own limits are
/// far lower; this keeps /dev/zero out).
const MAX_DOC_BYTES: u64 = 1 << 20;

pub fn seed_path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// The seed's files, in the order they go on the volume. `instance-id` defaults to one
/// derived from the VM's id and the seed's contents, so cloud-init treats a changed
/// config as a new instance and applies it (its per-instance modules run again).
pub fn compose(seed: &CloudInit, vm_id: &str) -> Result<Vec<(&'static str, Vec<u8>)>, String> {
    let user_data = match &seed.user_data {
        Some(SeedDoc::File(path)) => read_doc(path, "user_data")?,
        Some(SeedDoc::Inline(map)) => cloud_config(user_mapping(map.clone(), seed))?,
        None => cloud_config(user_mapping(Mapping::new(), seed))?,
    };
    let network = match &seed.network_config {
        Some(SeedDoc::File(path)) => Some(read_doc(path, "network_config")?),
        Some(SeedDoc::Inline(map)) => Some(yaml(map)?),
        None => None,
    };
    let mut meta = Mapping::new();
    if let Some(host) = &seed.hostname {
        meta.insert("local-hostname".into(), host.as_str().into());
    }
    if !seed.ssh_authorized_keys.is_empty() {
        // NoCloud gives `public-keys` to the default user, whatever user-data says.
        let keys = seed.ssh_authorized_keys.iter().map(|k| k.as_str().into());
        meta.insert("public-keys".into(), Value::Sequence(keys.collect()));
    }
    let meta_data = match &seed.meta_data {
        Some(SeedDoc::File(path)) => read_doc(path, "meta_data")?,
        inline => {
            if let Some(SeedDoc::Inline(map)) = inline {
                // The config's own meta-data wins over what the convenience keys made.
                for (k, v) in map {
                    meta.insert(k.clone(), v.clone());
                }
            }
            if !meta.contains_key("instance-id") {
                let mut h = Fnv::default();
                h.write(&user_data);
                h.write(yaml(&meta)?.as_slice());
                h.write(network.as_deref().unwrap_or_default());
                let id = format!("maqet-{vm_id}-{:016x}", h.0);
                meta.insert("instance-id".into(), id.into());
            }
            yaml(&meta)?
        }
    };
    let mut files = vec![("meta-data", meta_data), ("user-data", user_data)];
    if let Some(network) = network {
        files.push(("network-config", network));
    }
    Ok(files)
}

/// user-data as cloud-config: the config's mapping plus `hostname` and `user` (keys the
/// mapping sets itself are left alone).
fn user_mapping(mut map: Mapping, seed: &CloudInit) -> Mapping {
    if let Some(host) = &seed.hostname
        && !map.contains_key("hostname")
    {
        map.insert("hostname".into(), host.as_str().into());
    }
    if let Some(user) = &seed.user
        && !map.contains_key("users")
    {
        let mut entry = Mapping::new();
        entry.insert("name".into(), user.as_str().into());
        entry.insert("sudo".into(), "ALL=(ALL) NOPASSWD:ALL".into());
        entry.insert("shell".into(), "/bin/bash".into());
        if !seed.ssh_authorized_keys.is_empty() {
            let keys = seed.ssh_authorized_keys.iter().map(|k| k.as_str().into());
            entry.insert(
                "ssh_authorized_keys".into(),
                Value::Sequence(keys.collect()),
            );
        }
        let users = vec!["default".into(), Value::Mapping(entry)];
        map.insert("users".into(), Value::Sequence(users));
    }
    map
}

fn cloud_config(map: Mapping) -> Result<Vec<u8>, String> {
    let mut out = b"#cloud-config\n".to_vec();
    if !map.is_empty() {
        out.extend(yaml(&map)?);
    }
    Ok(out)
}

fn yaml(map: &Mapping) -> Result<Vec<u8>, String> {
    serde_yaml::to_string(map)
        .map(String::into_bytes)
        .map_err(|e| format!("cannot write the cloud-init seed: {e}"))
}

/// A seed document from the user's file: a regular file (a FIFO would hang the start),
/// not followed through a symlink, at most [`MAX_DOC_BYTES`].
fn read_doc(path: &Path, key: &str) -> Result<Vec<u8>, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cloud_init {key} {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cloud_init {key} {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "cloud_init {key} {} is not a regular file; name a YAML file",
            path.display()
        ));
    }
    let mut data = Vec::new();
    file.take(MAX_DOC_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cloud_init {key} {}: {e}", path.display()))?;
    if data.len() as u64 > MAX_DOC_BYTES {
        return Err(format!(
            "cloud_init {key} {} is larger than {MAX_DOC_BYTES} bytes",
            path.display()
        ));
    }
    Ok(data)
}

/// The ISO 9660 writers maqet can use, best first (`xorriso` speaks mkisofs's options
/// after `-as mkisofs`).
const TOOLS: &[(&str, &[&str])] = &[
    ("xorriso", &["-as", "mkisofs"]),
    ("genisoimage", &[]),
    ("mkisofs", &[]),
];

/// Writes `files` as an ISO 9660 volume labelled `cidata` to `dest` (mode 0600),
/// through a temporary name in the same directory: a failure leaves the old seed or
/// nothing. `path_env` is where the tool is searched.
pub fn write_iso(
    files: &[(&str, Vec<u8>)],
    dest: &Path,
    path_env: Option<&OsStr>,
) -> Result<(), String> {
    let (tool, prefix) = TOOLS
        .iter()
        .find_map(|(name, prefix)| {
            crate::config::find_binary(name, path_env)
                .ok()
                .map(|p| (p, *prefix))
        })
        .ok_or(
            "writing a cloud-init seed needs xorriso or genisoimage: install one (e.g. `apt install genisoimage`, which scripts/setup-deps does)",
        )?;
    let dir = dest.parent().ok_or("the seed has no directory")?;
    crate::paths::create_private_dir(dir).map_err(|e| e.to_string())?;
    let stage = tempfile_dir(dir)?;
    let result = (|| {
        let mut names = Vec::new();
        for (name, data) in files {
            let path = stage.join(name);
            std::fs::write(&path, data).map_err(|e| format!("cannot write {name}: {e}"))?;
            names.push(path);
        }
        let tmp = stage.join(FILE_NAME);
        let out = Command::new(&tool)
            .args(prefix)
            .args(["-quiet", "-output"])
            .arg(&tmp)
            .args(["-volid", LABEL, "-joliet", "-rock"])
            .args(&names)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", tool.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed writing the cloud-init seed: {}",
                tool.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, dest).map_err(|e| format!("cannot write {}: {e}", dest.display()))
    })();
    let _ = std::fs::remove_dir_all(&stage);
    result
}

/// A fresh private directory for staging, inside `dir`.
fn tempfile_dir(dir: &Path) -> Result<PathBuf, String> {
    for n in 0..100u32 {
        let path = dir.join(format!(".cidata-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot stage the seed in {}: {e}", dir.display())),
        }
    }
    Err(format!("cannot stage the seed in {}", dir.display()))
}

/// A file of the seed: its name and contents.
pub type SeedFile = (String, Vec<u8>);

/// What an ISO 9660 volume holds: its label and the files of its root directory, by
/// their Joliet names (what Linux shows). Reads what [`write_iso`] makes; for tests and
/// checks, not a general ISO reader.
pub fn read_iso(iso: &[u8]) -> Result<(String, Vec<SeedFile>), String> {
    const SECTOR: usize = 2048;
    let sector = |n: usize| {
        iso.get(n * SECTOR..(n + 1) * SECTOR)
            .ok_or_else(|| format!("the volume ends before sector {n}"))
    };
    let u32_le = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let mut label = None;
    let mut joliet_root = None;
    for n in 16..64 {
        let d = sector(n)?;
        if &d[1..6] != b"CD001" {
            return Err(format!("sector {n} is not a volume descriptor"));
        }
        match d[0] {
            1 => label = Some(String::from_utf8_lossy(&d[40..72]).trim_end().to_owned()),
            // A supplementary descriptor with a UCS-2 escape sequence: Joliet.
            2 if matches!(&d[88..91], b"%/@" | b"%/C" | b"%/E") => {
                joliet_root = Some((u32_le(d, 156 + 2) as usize, u32_le(d, 156 + 10) as usize))
            }
            255 => break,
            _ => {}
        }
    }
    let label = label.ok_or("no primary volume descriptor")?;
    let (extent, size) = joliet_root.ok_or("no Joliet directory")?;
    let dir = iso
        .get(extent * SECTOR..extent * SECTOR + size)
        .ok_or("the root directory lies outside the volume")?;
    let mut files = Vec::new();
    let mut at = 0;
    while at < dir.len() {
        let len = dir[at] as usize;
        if len == 0 {
            // Records do not cross sectors: the rest of this one is padding.
            at = (at / SECTOR + 1) * SECTOR;
            continue;
        }
        let rec = dir
            .get(at..at + len)
            .ok_or("a directory record is cut off")?;
        at += len;
        let name_len = rec[32] as usize;
        let raw = rec.get(33..33 + name_len).ok_or("a name is cut off")?;
        if rec[25] & 2 != 0 || name_len == 1 {
            continue; // `.`, `..` and directories
        }
        let units: Vec<u16> = raw
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        let name = String::from_utf16_lossy(&units);
        let name = name.split(';').next().unwrap_or_default().to_owned();
        let (start, len) = (u32_le(rec, 2) as usize, u32_le(rec, 10) as usize);
        let data = iso
            .get(start * SECTOR..start * SECTOR + len)
            .ok_or_else(|| format!("{name} lies outside the volume"))?;
        files.push((name, data.to_vec()));
    }
    Ok((label, files))
}

/// FNV-1a (64 bit): a hash that stays the same across builds, for the instance-id.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        self.0 = (self.0 ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
}

#[cfg(test)]
mod tests;
