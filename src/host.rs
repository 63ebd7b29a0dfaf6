//! Facts about the host: KVM and the QEMU binaries on `PATH`.

use std::os::unix::fs::PermissionsExt;

/// KVM is usable when this user can open `/dev/kvm` read-write.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Every `qemu-system-*` executable on `PATH`, first occurrence of each name wins.
pub fn qemu_binaries(path_env: Option<&std::ffi::OsStr>) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for dir in std::env::split_paths(path_env.unwrap_or_default()) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut here: Vec<_> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("qemu-system-"))
            .filter(|e| {
                e.metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .collect();
        here.sort_by_key(|e| e.file_name());
        for e in here {
            if names.insert(e.file_name()) {
                found.push(e.path().to_string_lossy().into_owned());
            }
        }
    }
    found
}
