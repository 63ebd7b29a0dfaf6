//! The client side of the API: bus names, object paths and typed proxies.
//!
//! Shared by the CLI and the tests (and usable by any Rust program); it holds no service
//! internals, so the CLI never links the service's logic into what it calls.

use std::collections::HashMap;

use zbus::proxy;
use zbus::{ObjectPath, OwnedFd, OwnedObjectPath, Variant};

pub use crate::error::MaqetError;

/// Well-known bus name of the service.
pub const BUS_NAME: &str = "org.maqet.Maqet1";
/// Object path of the manager (and of the ObjectManager).
pub const MANAGER_PATH: &str = "/org/maqet/Maqet1";
/// Parent of every VM object.
pub const VM_PATH_PREFIX: &str = "/org/maqet/Maqet1/vm/";

/// Parent of every job object.
pub const JOB_PATH_PREFIX: &str = "/org/maqet/Maqet1/job/";

pub const MANAGER_INTERFACE: &str = "org.maqet.Maqet1.Manager";
pub const VM_INTERFACE: &str = "org.maqet.Maqet1.VM";
pub const QMP_INTERFACE: &str = "org.maqet.Maqet1.QMP";
pub const SNAPSHOTS_INTERFACE: &str = "org.maqet.Maqet1.Snapshots";
pub const STORAGE_INTERFACE: &str = "org.maqet.Maqet1.Storage";
pub const GUEST_INTERFACE: &str = "org.maqet.Maqet1.Guest";
pub const JOB_INTERFACE: &str = "org.maqet.Maqet1.Job";

/// `/org/maqet/Maqet1/vm/<uuid with - replaced by _>`.
pub fn vm_path(id: &str) -> OwnedObjectPath {
    let mut path = String::new();
    write_vm_path(&mut path, id);
    ObjectPath::try_from(path)
        .expect("a UUID makes a valid object path element")
        .into()
}

/// [`vm_path`] as text, into a buffer the caller reuses (replies that list every VM).
pub fn write_vm_path(out: &mut String, id: &str) {
    out.clear();
    out.push_str(VM_PATH_PREFIX);
    for (i, part) in id.split('-').enumerate() {
        if i > 0 {
            out.push('_');
        }
        out.push_str(part);
    }
}

/// `/org/maqet/Maqet1/job/<n>`.
pub fn job_path(n: u64) -> OwnedObjectPath {
    ObjectPath::try_from(format!("{JOB_PATH_PREFIX}{n}"))
        .expect("a number makes a valid object path element")
        .into()
}

/// The VM id (UUID) encoded in a VM object path.
pub fn id_from_path(path: &ObjectPath<'_>) -> Option<String> {
    path.as_str()
        .strip_prefix(VM_PATH_PREFIX)
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        .map(|rest| rest.replace('_', "-"))
}

/// One row of `ListVMs`: id, name, object path, status.
pub type VmListEntry = (String, String, OwnedObjectPath, String);

/// One row of `Audit`: time (µs), caller uid, caller pid, caller bus name, action,
/// VM id, method, arguments, decision, outcome, message.
pub type AuditEntry = (
    u64,
    u32,
    u32,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
);

/// One row of `Snapshots.List`: name, VM state size (bytes), date (µs since the
/// epoch), VM clock (ns).
pub type SnapshotRow = (String, u64, u64, u64);

/// One row of `Storage.List`: name, format (`qcow2`, `raw`, `virtfs`), path, exists,
/// virtual size, actual size (bytes), created by maqet.
pub type StorageRow = (String, String, String, bool, u64, u64, bool);

/// One row of `VM.History`: time (µs), kind, status, previous status, reason, detail
/// JSON (empty strings where an event has none).
pub type HistoryRow = (u64, String, String, String, String, String);

/// One row of `Storage.Verify`: name, ok, message.
pub type VerifyRow = (String, bool, String);

/// One row of `Images.List`: name, format, virtual size, file size, SHA-256, import
/// date (µs), file path.
pub type ImageRow = (String, String, u64, u64, String, u64, String);

#[proxy(
    interface = "org.maqet.Maqet1.Manager",
    default_service = "org.maqet.Maqet1",
    default_path = "/org/maqet/Maqet1"
)]
pub trait Manager {
    #[zbus(name = "AddVM")]
    fn add_vm(&self, name: &str, yaml: &str) -> Result<OwnedObjectPath, MaqetError>;

    #[zbus(name = "AddVMFromFiles")]
    fn add_vm_from_files(&self, name: &str, paths: &[&str]) -> Result<OwnedObjectPath, MaqetError>;

    #[zbus(name = "AddVMFromFds")]
    fn add_vm_from_fds(
        &self,
        name: &str,
        files: &[zbus::Fd<'_>],
    ) -> Result<OwnedObjectPath, MaqetError>;

    /// Options: `full` (b). Returns (the clone's path, its job: `/` for a linked
    /// clone, made within the call).
    #[zbus(name = "CloneVM")]
    fn clone_vm(
        &self,
        source: &str,
        new_name: &str,
        options: HashMap<&str, zbus::Variant<'_>>,
    ) -> Result<(OwnedObjectPath, OwnedObjectPath), MaqetError>;

    /// Returns (the files the export will hold, its job).
    #[zbus(name = "ExportVM")]
    fn export_vm(
        &self,
        vm: &str,
        directory: zbus::Fd<'_>,
    ) -> Result<(Vec<String>, OwnedObjectPath), MaqetError>;

    #[zbus(name = "RemoveVM")]
    fn remove_vm(&self, vm: &str, force: bool, delete_storage: bool) -> Result<(), MaqetError>;

    #[zbus(name = "FindVM")]
    fn find_vm(&self, name_or_id: &str) -> Result<OwnedObjectPath, MaqetError>;

    #[zbus(name = "ListVMs")]
    fn list_vms(&self) -> Result<Vec<VmListEntry>, MaqetError>;

    /// (path, former VM name, size): disks maqet created whose VM is gone.
    #[zbus(name = "OrphanedStorage")]
    fn orphaned_storage(&self) -> Result<Vec<(String, String, u64)>, MaqetError>;

    fn doctor(&self, fix: bool) -> Result<Vec<(String, String, String, String)>, MaqetError>;

    fn audit(&self, vm: &str, since: u64, limit: u32) -> Result<Vec<AuditEntry>, MaqetError>;

    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn kvm_available(&self) -> zbus::Result<bool>;

    #[zbus(property)]
    fn polkit_available(&self) -> zbus::Result<bool>;

    #[zbus(property)]
    fn qemu_binaries(&self) -> zbus::Result<Vec<String>>;

    #[zbus(signal, name = "VMAdded")]
    fn vm_added(&self, vm: ObjectPath<'_>, name: &str) -> zbus::Result<()>;

    #[zbus(signal, name = "VMRemoved")]
    fn vm_removed(&self, vm: ObjectPath<'_>, name: &str) -> zbus::Result<()>;
}

#[proxy(
    interface = "org.maqet.Maqet1.VM",
    default_service = "org.maqet.Maqet1",
    default_path = "/org/maqet/Maqet1"
)]
pub trait Vm {
    fn start(&self) -> Result<(), MaqetError>;
    /// `Start` with options: `environment` (a{ss}) = the caller's graphical session.
    fn start_with_options(
        &self,
        options: std::collections::HashMap<&str, zbus::zvariant::Variant<'_>>,
    ) -> Result<(), MaqetError>;
    fn stop(&self, force: bool, timeout_sec: u32) -> Result<(), MaqetError>;
    fn restart(&self) -> Result<(), MaqetError>;
    fn reset(&self) -> Result<(), MaqetError>;
    fn pause(&self) -> Result<(), MaqetError>;
    fn resume(&self) -> Result<(), MaqetError>;
    fn apply(&self, yaml: &str) -> Result<Vec<String>, MaqetError>;
    fn wait(&self, condition: &str, timeout_sec: u32) -> Result<String, MaqetError>;
    /// Key combinations such as `ctrl-alt-delete`, each held `hold_ms` (0: 100 ms).
    fn send_keys(&self, keys: &[&str], hold_ms: u32) -> Result<(), MaqetError>;
    fn type_text(&self, text: &str) -> Result<(), MaqetError>;
    /// A readable fd holding a PNG of the display.
    fn screendump(&self) -> Result<OwnedFd, MaqetError>;
    /// Lifecycle history since `since` µs (0: all), the newest `limit` (0: all).
    fn history(&self, since: u64, limit: u32) -> Result<Vec<HistoryRow>, MaqetError>;
    /// QEMU's log of the VM, read-only.
    fn open_log(&self) -> Result<OwnedFd, MaqetError>;
    /// A connected socket to the VM's serial console.
    fn open_console(&self) -> Result<OwnedFd, MaqetError>;
    /// A socket connected to the VM's SPICE or VNC server (one per SPICE channel).
    fn open_display(&self) -> Result<OwnedFd, MaqetError>;
    /// `[tcp:|udp:][BIND:]HOST:GUEST`.
    fn add_forward(&self, spec: &str) -> Result<(), MaqetError>;
    fn remove_forward(&self, spec: &str) -> Result<(), MaqetError>;
    #[zbus(property)]
    fn forwards(&self) -> zbus::Result<Vec<String>>;

    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn status_reason(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn pid(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn config(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn created_at(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn started_at(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn stopped_at(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn exit_status(&self) -> zbus::Result<i32>;

    /// `StatusChanged` (named so it does not clash with the `Status` property's stream).
    #[zbus(signal, name = "StatusChanged")]
    fn vm_status_changed(&self, status: &str, previous: &str, reason: &str) -> zbus::Result<()>;
}

#[proxy(
    interface = "org.maqet.Maqet1.QMP",
    default_service = "org.maqet.Maqet1",
    default_path = "/org/maqet/Maqet1"
)]
pub trait Qmp {
    /// Runs a QMP command (arguments: empty or a JSON object); returns QEMU's `return`
    /// as JSON.
    fn execute(
        &self,
        command: &str,
        arguments_json: &str,
        allow_dangerous: bool,
    ) -> Result<String, MaqetError>;
    fn device_add(
        &self,
        driver: &str,
        id: &str,
        properties: HashMap<&str, Variant<'_>>,
    ) -> Result<(), MaqetError>;
    /// Returns once QEMU has removed the device; `Timeout` while removal is pending.
    fn device_del(&self, id: &str) -> Result<(), MaqetError>;

    /// Every asynchronous QMP event of the VM, with QEMU's timestamp (µs).
    #[zbus(signal)]
    fn event(&self, name: &str, data_json: &str, timestamp: u64) -> zbus::Result<()>;
}

#[proxy(
    interface = "org.maqet.Maqet1.Snapshots",
    default_service = "org.maqet.Maqet1",
    default_path = "/org/maqet/Maqet1"
)]
pub trait Snapshots {
    fn list(&self) -> Result<Vec<SnapshotRow>, MaqetError>;
    fn create(
        &self,
        name: &str,
        options: std::collections::HashMap<&str, zbus::zvariant::Variant<'_>>,
    ) -> Result<OwnedObjectPath, MaqetError>;
    fn load(&self, name: &str) -> Result<OwnedObjectPath, MaqetError>;
    fn delete(&self, name: &str) -> Result<OwnedObjectPath, MaqetError>;
}

#[proxy(
    interface = "org.maqet.Maqet1.Storage",
    default_service = "org.maqet.Maqet1",
    default_path = "/org/maqet/Maqet1"
)]
pub trait Storage {
    fn list(&self) -> Result<Vec<StorageRow>, MaqetError>;
    fn verify(&self) -> Result<Vec<VerifyRow>, MaqetError>;
    fn resize(
        &self,
        disk: &str,
        bytes: u64,
        options: HashMap<&str, zbus::Variant<'_>>,
    ) -> Result<(), MaqetError>;
    fn attach(
        &self,
        source: &str,
        options: HashMap<&str, zbus::Variant<'_>>,
    ) -> Result<String, MaqetError>;
    fn detach(&self, disk: &str) -> Result<(), MaqetError>;
}

#[proxy(
    interface = "org.maqet.Maqet1.Images",
    default_service = "org.maqet.Maqet1",
    default_path = "/org/maqet/Maqet1"
)]
pub trait Images {
    /// Options: `format` (s).
    fn import(
        &self,
        file: zbus::Fd<'_>,
        name: &str,
        options: HashMap<&str, zbus::Variant<'_>>,
    ) -> Result<OwnedObjectPath, MaqetError>;
    fn list(&self) -> Result<Vec<ImageRow>, MaqetError>;
    fn remove(&self, name: &str) -> Result<(), MaqetError>;
}

/// `(exit code, stdout, stderr)` of `Guest.Exec`.
pub type ExecResult = (i32, Vec<u8>, Vec<u8>);

#[proxy(
    interface = "org.maqet.Maqet1.Guest",
    default_service = "org.maqet.Maqet1",
    default_path = "/org/maqet/Maqet1"
)]
pub trait Guest {
    fn ping(&self) -> Result<(), MaqetError>;
    /// Options: `timeout` (u, seconds).
    fn exec(
        &self,
        argv: &[&str],
        stdin: &[u8],
        options: HashMap<&str, zbus::Variant<'_>>,
    ) -> Result<ExecResult, MaqetError>;
    fn read_file(&self, path: &str, max: u64) -> Result<Vec<u8>, MaqetError>;
    fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<(), MaqetError>;
    fn refresh_addresses(&self) -> Result<(), MaqetError>;
    #[zbus(property)]
    fn guest_agent(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn guest_info(&self) -> zbus::Result<HashMap<String, String>>;
    #[zbus(property)]
    fn addresses(&self) -> zbus::Result<Vec<(String, String, String)>>;
}

#[proxy(
    interface = "org.maqet.Maqet1.Job",
    default_service = "org.maqet.Maqet1",
    default_path = "/org/maqet/Maqet1"
)]
pub trait Job {
    fn cancel(&self) -> Result<(), MaqetError>;

    #[zbus(property)]
    fn operation(&self) -> zbus::Result<String>;
    #[zbus(property, name = "VM")]
    fn vm(&self) -> zbus::Result<OwnedObjectPath>;
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<f64>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn message(&self) -> zbus::Result<String>;

    #[zbus(signal)]
    fn completed(&self, success: bool, message: &str) -> zbus::Result<()>;
}

/// Builds a proxy of `P` for an object path, without property caching.
pub async fn proxy_at<'a, P>(conn: &zbus::Connection, path: OwnedObjectPath) -> zbus::Result<P>
where
    P: From<zbus::Proxy<'a>> + zbus::proxy::Defaults,
{
    zbus::proxy::Builder::<P>::new(conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

/// Builds a VM proxy for an object path, without property caching (a CLI reads once).
pub async fn vm_proxy<'a>(
    conn: &zbus::Connection,
    path: OwnedObjectPath,
) -> zbus::Result<VmProxy<'a>> {
    proxy_at(conn, path).await
}

/// Builds a QMP proxy for a VM object path.
pub async fn qmp_proxy<'a>(
    conn: &zbus::Connection,
    path: OwnedObjectPath,
) -> zbus::Result<QmpProxy<'a>> {
    proxy_at(conn, path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_paths_round_trip() {
        let id = "3f2b8c1e-1234-4abc-9def-0123456789ab";
        let p = vm_path(id);
        assert_eq!(
            p.as_str(),
            "/org/maqet/Maqet1/vm/3f2b8c1e_1234_4abc_9def_0123456789ab"
        );
        assert_eq!(id_from_path(&p).as_deref(), Some(id));
        assert_eq!(
            id_from_path(&ObjectPath::try_from("/org/maqet/Maqet1").unwrap()),
            None
        );
    }
}
