//! `firmware: uefi | uefi-secure`: which UEFI images a VM boots, found through QEMU's
//! firmware descriptors (docs/interop/firmware.json in QEMU, the format libvirt reads),
//! and the per-VM copy of the variable store.
//!
//! Descriptors are JSON files in `/usr/share/qemu/firmware`, `/etc/qemu/firmware` and
//! `$XDG_CONFIG_HOME/qemu/firmware`; a file in a later directory replaces the one of the
//! same name in an earlier one (an empty file hides it), and all are tried in file-name
//! order. The first that fits the VM wins: a flash-mapped UEFI build for the emulator's
//! architecture and machine type, with Secure Boot enforced (`secure-boot` and
//! `enrolled-keys`) exactly when the config asks for `uefi-secure`.
//!
//! The code image is attached read-only; the variable store is a per-VM copy of the
//! descriptor's template, made on first start in the VM's data directory (so the guest's
//! boot entries persist, and `remove --delete-storage` deletes it). Both reach QEMU as
//! fds like every other host file (`hostfiles`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{danger, hostfiles::OpenedFiles};
use crate::config::{Access, Firmware, PathUse};

/// Where QEMU's firmware descriptors live, lowest priority first.
pub fn descriptor_dirs(xdg_config_home: &Path) -> Vec<PathBuf> {
    vec![
        PathBuf::from("/usr/share/qemu/firmware"),
        PathBuf::from("/etc/qemu/firmware"),
        xdg_config_home.join("qemu/firmware"),
    ]
}

/// A UEFI build chosen for a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// The descriptor file that chose it (for messages and the log).
    pub descriptor: PathBuf,
    pub code: PathBuf,
    pub code_format: String,
    pub vars_template: PathBuf,
    pub vars_format: String,
    /// The build needs SMM and secure flash (`requires-smm`): QEMU must be told.
    pub requires_smm: bool,
}

/// The descriptors of `dirs` in the order they are tried.
fn descriptor_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut by_name = std::collections::BTreeMap::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if Path::new(&name).extension().is_some_and(|e| e == "json") {
                by_name.insert(name, entry.path());
            }
        }
    }
    by_name.into_values().collect()
}

/// The machine type as descriptors name it: QEMU's aliases `pc` and `q35` (and no
/// `-machine`: `pc`) stand for the newest versioned types.
fn versioned_machine(arch: &str, machine: Option<&str>) -> String {
    let x86 = matches!(arch, "x86_64" | "i386");
    match machine {
        None | Some("pc") if x86 => "pc-i440fx-latest".to_owned(),
        Some("q35") if x86 => "pc-q35-latest".to_owned(),
        None => String::new(),
        Some(m) => m.to_owned(),
    }
}

/// Glob with `*` only, as descriptors use it (`pc-q35-*`).
fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// Why one descriptor does not fit, or what it selects.
fn evaluate(
    json: &serde_json::Value,
    firmware: Firmware,
    arch: &str,
    machine: &str,
) -> Result<Selected, String> {
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    if !strings(&json["interface-types"])
        .iter()
        .any(|t| t == "uefi")
    {
        return Err("not UEFI".into());
    }
    let mapping = &json["mapping"];
    if mapping["device"] != "flash" {
        return Err("not mapped as flash".into());
    }
    if mapping["mode"].as_str().is_some_and(|m| m != "split") {
        return Err("not a split code/variables build".into());
    }
    let fits_target = json["targets"].as_array().is_some_and(|targets| {
        targets.iter().any(|t| {
            t["architecture"] == arch
                && strings(&t["machines"])
                    .iter()
                    .any(|m| glob_match(m, machine))
        })
    });
    if !fits_target {
        return Err(format!("not for {arch} machine {machine}"));
    }
    let features = strings(&json["features"]);
    let has = |f: &str| features.iter().any(|x| x == f);
    // Confidential-computing builds boot only such guests.
    if has("intel-tdx") || has("amd-sev-snp") {
        return Err("a confidential-computing build".into());
    }
    let enforced = has("secure-boot") && has("enrolled-keys");
    match firmware {
        Firmware::UefiSecure if !enforced => return Err("no Secure Boot keys enrolled".into()),
        Firmware::Uefi if enforced => return Err("enforces Secure Boot".into()),
        _ => {}
    }
    let file = |key: &str| -> Result<(PathBuf, String), String> {
        let f = &mapping[key];
        let name = f["filename"]
            .as_str()
            .ok_or_else(|| format!("no {key} file"))?;
        let format = f["format"].as_str().unwrap_or("raw").to_owned();
        if !matches!(format.as_str(), "raw" | "qcow2") {
            return Err(format!("{key} format {format}"));
        }
        Ok((PathBuf::from(name), format))
    };
    let (code, code_format) = file("executable")?;
    let (vars_template, vars_format) = file("nvram-template")?;
    Ok(Selected {
        descriptor: PathBuf::new(),
        code,
        code_format,
        vars_template,
        vars_format,
        requires_smm: has("requires-smm"),
    })
}

/// The first descriptor of `dirs` that fits, with both of its files present. The error
/// says what to install or change.
pub fn select(
    dirs: &[PathBuf],
    firmware: Firmware,
    arch: &str,
    machine: Option<&str>,
) -> Result<Selected, String> {
    let versioned = versioned_machine(arch, machine);
    let files = descriptor_files(dirs);
    let mut skipped = Vec::new();
    for path in &files {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        // An empty file hides a lower-priority descriptor of the same name.
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match evaluate(&json, firmware, arch, &versioned) {
            Ok(mut s) if s.code.is_file() && s.vars_template.is_file() => {
                s.descriptor = path.clone();
                return Ok(s);
            }
            Ok(_) => skipped.push(format!("{}: its files are missing", path.display())),
            Err(why) => skipped.push(format!("{}: {why}", path.display())),
        }
    }
    let shown_machine = machine.unwrap_or("pc (QEMU's default)");
    let secure_hint = if firmware == Firmware::UefiSecure && !versioned.starts_with("pc-q35") {
        "; Secure Boot needs SMM, which QEMU offers on `machine: q35`"
    } else {
        ""
    };
    let seen = if skipped.is_empty() {
        format!(
            "no firmware descriptors in {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!("descriptors tried: {}", skipped.join("; "))
    };
    Err(format!(
        "no {} firmware for {arch} machine {shown_machine} ({seen}); install the UEFI firmware package (`ovmf` on Debian and Ubuntu, `edk2-ovmf` on Fedora){secure_hint}",
        firmware.as_str()
    ))
}

/// The per-VM variable store in `data_dir`, one per firmware kind (switching between
/// `uefi` and `uefi-secure` starts from the right template and keeps the other).
pub fn vars_path(data_dir: &Path, firmware: Firmware) -> PathBuf {
    data_dir.join(format!("{}-vars.{}", firmware.as_str(), "fd"))
}

/// Copies the template to `dest` unless it exists; `Ok(true)` when it made the copy.
/// Written to a temporary name (0600) and renamed, so a failed copy leaves nothing.
/// The template is checked like a read-only input: a descriptor in the user's own
/// `~/.config/qemu/firmware` cannot make maqet copy `~/.ssh/id_rsa` into a guest's flash.
pub fn ensure_vars(template: &Path, dest: &Path, home: &Path) -> Result<bool, String> {
    if std::fs::symlink_metadata(dest).is_ok() {
        return Ok(false);
    }
    let template = &danger::check(template, home, PathUse::ReadOnly)
        .map_err(|why| format!("UEFI variable template: {why}"))?;
    let dir = dest.parent().ok_or("no directory for the variable store")?;
    crate::paths::create_private_dir(dir).map_err(|e| e.to_string())?;
    let data =
        std::fs::read(template).map_err(|e| format!("cannot read {}: {e}", template.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let failed = |e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", dest.display())
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    file.write_all(&data).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    drop(file);
    std::fs::rename(&tmp, dest).map_err(failed)?;
    Ok(true)
}

/// Opens the firmware for QEMU (code read-only, `vars` read-write, both as fd sets) and
/// appends the pflash drives to its arguments.
pub fn attach(
    selected: &Selected,
    vars: &Path,
    home: &Path,
    files: &mut OpenedFiles,
) -> Result<(), String> {
    // The descriptor is system configuration, but its names may be symlinks
    // (`OVMF_CODE.ms.fd -> OVMF_CODE.secboot.fd`): resolve them, then check the result
    // like any read-only input.
    let code = danger::check(&selected.code, home, PathUse::ReadOnly)
        .map_err(|why| format!("firmware {}: {why}", selected.descriptor.display()))?;
    let code_set = files.add_block_file(&code, Access::Read)?;
    let vars_set = files.add_block_file(vars, Access::ReadWrite)?;
    files.args.extend([
        "-drive".to_owned(),
        format!(
            "if=pflash,unit=0,format={},readonly=on,file={code_set}",
            selected.code_format
        ),
        "-drive".to_owned(),
        format!(
            "if=pflash,unit=1,format={},file={vars_set}",
            selected.vars_format
        ),
    ]);
    if selected.requires_smm {
        // Only code running in SMM may write the variable store (Secure Boot's guarantee).
        files.args.extend([
            "-global".to_owned(),
            "driver=cfi.pflash01,property=secure,value=on".to_owned(),
        ]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(code: &Path, vars: &Path, machines: &[&str], features: &[&str]) -> String {
        serde_json::json!({
            "description": "test",
            "interface-types": ["uefi"],
            "mapping": {
                "device": "flash",
                "executable": {"filename": code, "format": "raw"},
                "nvram-template": {"filename": vars, "format": "raw"},
            },
            "targets": [{"architecture": "x86_64", "machines": machines}],
            "features": features,
            "tags": [],
        })
        .to_string()
    }

    #[test]
    fn globs() {
        assert!(glob_match("pc-q35-*", "pc-q35-7.2"));
        assert!(glob_match("pc-q35-*", "pc-q35-latest"));
        assert!(!glob_match("pc-q35-*", "pc-i440fx-7.2"));
        assert!(glob_match("virt", "virt"));
        assert!(!glob_match("virt", "virt-8.0"));
        assert!(glob_match("*", "anything"));
    }

    /// The descriptors the way distributions ship them: the first fitting one wins,
    /// Secure Boot only when asked, machine types and overrides respected.
    #[test]
    fn selection_follows_descriptors() {
        let tmp = tempfile::tempdir().unwrap();
        let (sys, user) = (tmp.path().join("sys"), tmp.path().join("user"));
        std::fs::create_dir_all(&sys).unwrap();
        std::fs::create_dir_all(&user).unwrap();
        let f = |n: &str| {
            let p = tmp.path().join(n);
            std::fs::write(&p, n).unwrap();
            p
        };
        let (sb_code, sb_vars, code, vars) =
            (f("sb.fd"), f("sb-vars.fd"), f("code.fd"), f("vars.fd"));
        let enrolled = ["enrolled-keys", "requires-smm", "secure-boot"];
        std::fs::write(
            sys.join("40-sb.json"),
            descriptor(&sb_code, &sb_vars, &["pc-q35-*"], &enrolled),
        )
        .unwrap();
        std::fs::write(
            sys.join("60-plain.json"),
            descriptor(&code, &vars, &["pc-i440fx-*", "pc-q35-*"], &["acpi-s3"]),
        )
        .unwrap();
        std::fs::write(sys.join("70-broken.json"), "{not json").unwrap();
        let dirs = [sys.clone(), user.clone()];

        let s = select(&dirs, Firmware::Uefi, "x86_64", Some("q35")).unwrap();
        assert_eq!((s.code.clone(), s.requires_smm), (code.clone(), false));
        assert_eq!(s.descriptor, sys.join("60-plain.json"));
        let s = select(&dirs, Firmware::Uefi, "x86_64", None).unwrap();
        assert_eq!(s.vars_template, vars);
        let s = select(&dirs, Firmware::UefiSecure, "x86_64", Some("pc-q35-7.2")).unwrap();
        assert_eq!((s.code, s.requires_smm), (sb_code.clone(), true));

        // Secure Boot on the default i440fx machine: no build fits, and the error says why.
        let err = select(&dirs, Firmware::UefiSecure, "x86_64", Some("pc")).unwrap_err();
        assert!(
            err.contains("machine: q35") && err.contains("ovmf"),
            "{err}"
        );
        assert!(err.contains("40-sb.json: not for x86_64"), "{err}");
        let err = select(&dirs, Firmware::Uefi, "aarch64", Some("virt")).unwrap_err();
        assert!(err.contains("no uefi firmware for aarch64"), "{err}");

        // A user's empty file of the same name hides the system's descriptor.
        std::fs::write(user.join("60-plain.json"), "").unwrap();
        assert!(select(&dirs, Firmware::Uefi, "x86_64", Some("q35")).is_err());
        // A descriptor whose files are gone is skipped.
        std::fs::remove_file(user.join("60-plain.json")).unwrap();
        std::fs::remove_file(&vars).unwrap();
        let err = select(&dirs, Firmware::Uefi, "x86_64", None).unwrap_err();
        assert!(err.contains("its files are missing"), "{err}");
        let err = select(&[], Firmware::Uefi, "x86_64", None).unwrap_err();
        assert!(err.contains("no firmware descriptors"), "{err}");
    }

    #[test]
    fn the_vars_copy_is_private_and_made_once() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let template = tmp.path().join("VARS.fd");
        std::fs::write(&template, b"template").unwrap();
        let dest = vars_path(&tmp.path().join("vm"), Firmware::Uefi);
        let home = tmp.path().join("home");
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        std::fs::write(home.join(".ssh/id_rsa"), b"secret").unwrap();
        let err = ensure_vars(&home.join(".ssh/id_rsa"), &dest, &home).unwrap_err();
        assert!(err.contains(".ssh"), "{err}");
        assert!(!dest.exists());
        assert!(ensure_vars(&template, &dest, &home).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"template");
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The guest's changes are kept: a second start does not copy again.
        std::fs::write(&dest, b"guest wrote").unwrap();
        assert!(!ensure_vars(&template, &dest, &home).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"guest wrote");
        // A missing template leaves nothing behind.
        let other = vars_path(&tmp.path().join("vm"), Firmware::UefiSecure);
        assert!(ensure_vars(&tmp.path().join("gone"), &other, &home).is_err());
        assert_eq!(std::fs::read_dir(tmp.path().join("vm")).unwrap().count(), 1);
    }
}
