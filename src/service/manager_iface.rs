//! `org.maqet.Maqet1.Manager`: defining, finding and listing VMs.

use std::path::PathBuf;
use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, ObjectPath, OwnedObjectPath, interface};

use super::all_vms::VmList;
use super::options::{bool_option, check_keys};
use super::{Shared, job_iface};
use crate::access::{Action, Request};
use crate::client::{AuditEntry, vm_path};
use crate::config::ConfigSource;
use crate::error::MaqetError;
use crate::manager::{Cloned, INLINE_ORIGIN, Manager};
use crate::outbound::Outbound;
use crate::vm::Vm;

pub struct ManagerIface {
    shared: Arc<Shared>,
}

impl ManagerIface {
    pub fn new(shared: Arc<Shared>) -> ManagerIface {
        ManagerIface { shared }
    }

    /// A host fact behind the gate's `org.maqet.vm.observe` check.
    async fn host_fact<T>(
        &self,
        conn: &Connection,
        hdr: Option<Header<'_>>,
        fact: impl FnOnce(&Shared) -> T,
    ) -> zbus::fdo::Result<T>
    where
        T: Outbound,
    {
        self.shared
            .gate
            .check_read(conn, hdr.as_ref(), None)
            .await?;
        Ok(fact(&self.shared).outbound())
    }

    /// Answers an added VM's path once the event pump has served and announced it.
    async fn published(vm: &Arc<Vm>) -> OwnedObjectPath {
        vm.wait_announced(ANNOUNCE_WAIT).await;
        vm_path(vm.id())
    }
}

/// `CloneVM`'s `options`: only `full` (b).
fn clone_mode(
    options: &std::collections::HashMap<String, zbus::OwnedVariant>,
) -> Result<crate::manager::CloneMode, MaqetError> {
    check_keys(options, &["full"], "clone")?;
    Ok(if bool_option(options, "full")? {
        crate::manager::CloneMode::Full
    } else {
        crate::manager::CloneMode::Linked
    })
}

/// The job path of a call that needed none.
fn no_job() -> OwnedObjectPath {
    OwnedObjectPath::try_from("/").expect("a valid path")
}

/// How long AddVM/RemoveVM wait for the event pump to (un)serve the VM's objects.
const ANNOUNCE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[interface(name = "org.maqet.Maqet1.Manager")]
impl ManagerIface {
    /// Defines a VM from one YAML document. `name` empty: the config's `name`, else a
    /// generated one. Relative paths resolve against the VM's data directory.
    #[zbus(name = "AddVM", out_args("vm"))]
    async fn add_vm(
        &self,
        name: &str,
        yaml: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, MaqetError> {
        let req = Request::new(Action::Manage, "AddVM")
            .with_args(format!("name={name:?}, {} bytes of YAML", yaml.len()));
        let work = async {
            let source = ConfigSource {
                origin: INLINE_ORIGIN.into(),
                text: yaml.to_string(),
                // Empty: the manager fills in the new VM's own data directory.
                base_dir: PathBuf::new(),
            };
            let vm = self.shared.manager.add(name, vec![source]).await?;
            Ok(Self::published(&vm).await)
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Defines a VM from several YAML files merged in order (later wins), read by
    /// maqetd: only for callers running as maqetd's own user (others pass open files to
    /// `AddVMFromFds`). Each file: a regular file of at most 1 MiB; relative paths in it
    /// resolve against its directory.
    #[zbus(name = "AddVMFromFiles", out_args("vm"))]
    async fn add_vm_from_files(
        &self,
        name: &str,
        paths: Vec<String>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, MaqetError> {
        let req = Request::new(Action::Manage, "AddVMFromFiles")
            .with_args(format!("name={name:?}, files={paths:?}"))
            .own_user_only(
                "maqetd does not read files for other users: open them yourself and pass them to AddVMFromFds (maqet add -c does)",
            );
        let work = async {
            let sources = Manager::sources_from_files(paths.clone()).await?;
            let vm = self.shared.manager.add(name, sources).await?;
            Ok(Self::published(&vm).await)
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Like `AddVMFromFiles`, from files the caller opened and passes as descriptors
    /// (merged in order, same limits). Relative paths in a file resolve against the
    /// directory of the path `/proc/self/fd` shows for it when that path still names
    /// the same file; otherwise relative paths in it are refused.
    #[zbus(name = "AddVMFromFds", out_args("vm"))]
    async fn add_vm_from_fds(
        &self,
        name: &str,
        files: Vec<zbus::OwnedFd>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, MaqetError> {
        let req = Request::new(Action::Manage, "AddVMFromFds")
            .with_args(format!("name={name:?}, {} files", files.len()));
        let work = async {
            let fds = files.into_iter().map(std::os::fd::OwnedFd::from).collect();
            let sources = Manager::sources_from_fds(fds).await?;
            let vm = self.shared.manager.add(name, sources).await?;
            Ok(Self::published(&vm).await)
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Removes a VM. Refused while running unless `force`; `delete_storage` deletes only
    /// the disk images maqet created.
    #[zbus(name = "RemoveVM")]
    async fn remove_vm(
        &self,
        vm: &str,
        force: bool,
        delete_storage: bool,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let target = self.shared.manager.find(vm);
        let mut req = Request::new(Action::Manage, "RemoveVM").with_args(format!(
            "vm={vm:?} force={force} delete_storage={delete_storage}"
        ));
        if let Ok(t) = &target {
            req = req.on_vm(t);
        }
        let work = async {
            let vm = target?;
            let deleted = self
                .shared
                .manager
                .remove(&vm, force, delete_storage)
                .await?;
            for d in &deleted {
                tracing::info!(vm = %vm.name(), file = %d.display(), "deleted disk image");
            }
            vm.wait_announced(ANNOUNCE_WAIT).await;
            Ok(())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Defines `new_name` as a clone of the stopped VM `source` (name or id): new
    /// UUID, fresh UEFI variables and TPM state, no shared writable file. `options`:
    /// `full` (b): copy the disks (standalone) instead of making qcow2 overlays on
    /// them (linked: the source then stays stopped while the clone exists). Returns the
    /// clone's path and a job: a linked clone is made within the call (`job` is `/`); a
    /// full copy runs as a job (progress, `Cancel`) and the VM at `vm` exists once it
    /// has completed (on failure or cancel nothing of the clone is left).
    #[zbus(name = "CloneVM", out_args("vm", "job"))]
    async fn clone_vm(
        &self,
        source: &str,
        new_name: &str,
        options: std::collections::HashMap<String, zbus::OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(OwnedObjectPath, OwnedObjectPath), MaqetError> {
        let target = self.shared.manager.find(source);
        let mut req = Request::new(Action::Manage, "CloneVM").with_args(format!(
            "source={source:?} new_name={new_name:?} options={:?}",
            options.keys()
        ));
        if let Ok(t) = &target {
            req = req.on_vm(t);
        }
        let work = async {
            let mode = clone_mode(&options)?;
            match self
                .shared
                .manager
                .clone_vm(&target?, new_name, mode)
                .await?
            {
                Cloned::Done(vm) => Ok((Self::published(&vm).await, no_job())),
                Cloned::Job { id, job } => Ok((
                    vm_path(&id),
                    job_iface::publish(conn, &self.shared, job).await?,
                )),
            }
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Starts writing the stopped VM `vm` (name or id) into the empty directory open
    /// at `directory`: `config.yaml` and a standalone copy of each disk, named relative
    /// to it (define it elsewhere with `AddVMFromFds` of that config). Returns the
    /// files the export will hold and its job (progress, `Cancel`); the files appear
    /// only when the job completes, and a failed or cancelled export leaves none.
    #[zbus(name = "ExportVM", out_args("files", "job"))]
    async fn export_vm(
        &self,
        vm: &str,
        directory: zbus::OwnedFd,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(Vec<String>, OwnedObjectPath), MaqetError> {
        let target = self.shared.manager.find(vm);
        let mut req = Request::new(Action::Manage, "ExportVM").with_args(format!("vm={vm:?}"));
        if let Ok(t) = &target {
            req = req.on_vm(t);
        }
        let work = async {
            let (files, job) = self
                .shared
                .manager
                .export_vm(&target?, std::os::fd::OwnedFd::from(directory))
                .await?;
            Ok((files, job_iface::publish(conn, &self.shared, job).await?))
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// The object path of a VM, by name or id.
    #[zbus(name = "FindVM", out_args("vm"))]
    async fn find_vm(
        &self,
        name_or_id: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, MaqetError> {
        let req = Request::new(Action::Observe, "FindVM").with_args(name_or_id.to_string());
        let work = async { Ok(vm_path(self.shared.manager.find(name_or_id)?.id())) };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Every VM: (id, name, object path, status), sorted by name.
    #[zbus(name = "ListVMs", out_args("vms"))]
    async fn list_vms(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<VmList, MaqetError> {
        // `ManagerServed` answers ListVMs from a kept body; this method gives the
        // interface its introspection and refuses a call with arguments.
        let req = Request::new(Action::Observe, "ListVMs");
        let work = async { Ok(VmList(self.shared.manager.list_shared())) };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Disk images maqet created whose VM is gone (removed without `delete_storage`):
    /// (path, the removed VM's name or "", size in bytes), sorted by path. Nothing is
    /// deleted: `rm` them yourself once you are sure.
    #[zbus(name = "OrphanedStorage", out_args("files"))]
    async fn orphaned_storage(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String, u64)>, MaqetError> {
        let req = Request::new(Action::Observe, "OrphanedStorage");
        let work = async {
            Ok::<_, crate::manager::ManagerError>(
                self.shared
                    .manager
                    .orphaned_storage()
                    .await?
                    .into_iter()
                    .map(|o| (o.path.to_string_lossy().into_owned(), o.former_vm, o.size))
                    .collect::<Vec<_>>(),
            )
        };
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// Checks maqetd's health (QEMU, KVM, database, runtime directory, VMs whose state
    /// and process disagree, stale sockets); with `fix`, repairs what is safe.
    /// Returns (check, ok|warning|error|fixed, finding, what to do).
    #[zbus(out_args("findings"))]
    async fn doctor(
        &self,
        fix: bool,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String, String, String)>, MaqetError> {
        let action = if fix { Action::Manage } else { Action::Observe };
        let req = Request::new(action, "Doctor")
            .with_args(format!("fix={fix}"))
            .even_when_degraded();
        let work = async {
            let gate = &self.shared.gate;
            let (refusal, policy) = (gate.refusal_message(), gate.policy_problem());
            Ok(
                crate::doctor::run(&self.shared.manager, refusal, policy, fix)
                    .await
                    .into_iter()
                    .map(|f| {
                        (
                            f.check.to_string(),
                            f.health.as_str().to_string(),
                            f.message,
                            f.hint,
                        )
                    })
                    .collect(),
            )
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// The audit log, oldest first: every denial and every changing call. `vm` (name or
    /// id) filters by VM ("" = all), `since` (µs since the epoch, 0 = all), `limit` the
    /// newest rows (0 = 1000). Rows: (time, caller uid, caller pid, caller bus name,
    /// action, VM id, method, arguments, decision, outcome, message).
    #[zbus(out_args("rows"))]
    async fn audit(
        &self,
        vm: &str,
        since: u64,
        limit: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<AuditEntry>, MaqetError> {
        let req = Request::new(Action::Observe, "Audit").with_args(format!("vm={vm:?}"));
        let work = async {
            // Records of calls answered so far may still be queued: write them first.
            self.shared.gate.flush_audit().await;
            let vm_id = match vm {
                "" => None,
                v => Some(self.shared.manager.find(v)?.id().to_string()),
            };
            let limit = if limit == 0 { 1000 } else { limit as usize };
            let since = (since > 0).then_some(since);
            let rows = self
                .shared
                .manager
                .ctx()
                .store
                .read(move |db| db.audit(vm_id.as_deref(), since, limit))
                .await
                .map_err(crate::vm::store_error)?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    (
                        r.time,
                        r.caller_uid.unwrap_or(u32::MAX),
                        r.caller_pid.unwrap_or(0),
                        r.caller_name.unwrap_or_default(),
                        r.action,
                        r.vm_id.unwrap_or_default(),
                        r.method.unwrap_or_default(),
                        r.arguments.unwrap_or_default(),
                        r.decision.as_str().to_string(),
                        r.outcome.unwrap_or_default(),
                        r.message.unwrap_or_default(),
                    )
                })
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Readable by anyone who can reach the service, so a client can tell "wrong
    /// version" from "not allowed".
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// Whether /dev/kvm can be used here (false: VMs fall back to TCG, much slower).
    #[zbus(property(emits_changed_signal = "false"), name = "KvmAvailable")]
    async fn kvm_available(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<bool> {
        self.host_fact(conn, hdr, |s| s.host.kvm_available).await
    }

    /// Whether polkit answers on the system bus (policy rules of `auth` need it).
    #[zbus(property(emits_changed_signal = "false"))]
    async fn polkit_available(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<bool> {
        self.host_fact(conn, hdr, |s| s.host.polkit_available())
            .await
    }

    /// Paths of the `qemu-system-*` binaries on the service's PATH.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn qemu_binaries(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<Vec<String>> {
        self.host_fact(conn, hdr, |s| {
            crate::host::qemu_binaries(s.manager.ctx().path_env.as_deref())
        })
        .await
    }

    /// A VM was defined: its object path and name.
    #[zbus(signal, name = "VMAdded")]
    pub async fn vm_added(
        emitter: &SignalEmitter<'_>,
        vm: ObjectPath<'_>,
        name: &str,
    ) -> zbus::Result<()>;

    /// A VM was removed: its former object path and name.
    #[zbus(signal, name = "VMRemoved")]
    pub async fn vm_removed(
        emitter: &SignalEmitter<'_>,
        vm: ObjectPath<'_>,
        name: &str,
    ) -> zbus::Result<()>;
}
