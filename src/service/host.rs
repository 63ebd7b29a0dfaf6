//! Facts about the host the Manager reports: KVM, QEMU binaries, polkit.

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
            kvm_available: crate::host::kvm_usable(),
            polkit,
        }
    }

    pub fn polkit_available(&self) -> bool {
        self.polkit.load(Ordering::Relaxed)
    }
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
