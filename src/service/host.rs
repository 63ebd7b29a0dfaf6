//! Facts about the host the Manager reports: KVM, QEMU binaries, polkit.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const POLKIT_NAME: &str = "org.freedesktop.PolicyKit1";

#[derive(Debug, Clone)]
pub struct HostInfo {
    pub kvm_available: bool,
    polkit: Arc<AtomicBool>,
}

impl HostInfo {
    /// Probes KVM now and polkit in the background (the system bus may be slow or absent;
    /// start-up must not wait for it).
    pub fn probe() -> HostInfo {
        let polkit = Arc::new(AtomicBool::new(false));
        let flag = polkit.clone();
        tokio::spawn(async move {
            let found = tokio::time::timeout(Duration::from_secs(2), polkit_on_system_bus())
                .await
                .unwrap_or(false);
            flag.store(found, Ordering::Relaxed);
        });
        HostInfo {
            kvm_available: kvm_usable(),
            polkit,
        }
    }

    pub fn polkit_available(&self) -> bool {
        self.polkit.load(Ordering::Relaxed)
    }
}

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

async fn polkit_on_system_bus() -> bool {
    let Ok(conn) = zbus::Connection::system().await else {
        return false;
    };
    let Ok(dbus) = zbus::fdo::DBusProxy::new(&conn).await else {
        return false;
    };
    let name = POLKIT_NAME.try_into().expect("valid name");
    if dbus.name_has_owner(name).await.unwrap_or(false) {
        return true;
    }
    dbus.list_activatable_names()
        .await
        .map(|names| names.iter().any(|n| n.as_str() == POLKIT_NAME))
        .unwrap_or(false)
}
