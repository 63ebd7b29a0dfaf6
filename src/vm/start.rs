//! Starting a VM: disks first, then QEMU with its fd-passed monitor, racing the
//! monitor handshake against QEMU's exit so a refused option fails the start with QEMU's
//! own words.

use super::*;

impl Vm {
    /// Starts QEMU and returns once its monitor is ready (status `running`, or `paused`
    /// for a config with `-S`).
    pub async fn start(self: &Arc<Self>) -> Result<(), VmError> {
        let _op = self.op_lock.lock().await;
        self.check(Operation::Start)?;
        self.start_locked().await
    }

    /// [`Vm::start`] with QEMU's window on the caller's graphical session; kept for
    /// later starts of this VM that carry none (`window`).
    pub async fn start_with_env(
        self: &Arc<Self>,
        env: super::window::GraphicalEnv,
    ) -> Result<(), VmError> {
        let _op = self.op_lock.lock().await;
        self.check(Operation::Start)?;
        if env.is_set() {
            *self.graphical_env.lock() = env;
        }
        self.start_locked().await
    }

    pub(super) async fn start_locked(self: &Arc<Self>) -> Result<(), VmError> {
        let name = self.name();
        let config = self.stored_config()?;
        let binary = match config.resolve_binary(self.ctx.path_env.as_deref()) {
            Ok(b) => b,
            Err(why) => {
                let msg = format!("cannot start VM '{name}': {why}");
                self.transition(Status::Failed, &msg, false, |_| {}).await?;
                return Err(VmError::QemuFailed(msg));
            }
        };
        forward::check_host_ports(&config.guest().forwards)?;
        self.refuse_if_base_of_linked_clones(&config).await?;
        self.transition(Status::Starting, "start requested", false, |_| {})
            .await?;
        if let Err(e) = self.create_missing_disks(&config).await {
            let msg = format!("cannot start VM '{name}': {e}");
            self.transition(Status::Failed, &msg, false, |_| {}).await?;
            return Err(VmError::Storage(msg));
        }
        // Opened after creation and after the stored paths were checked again: QEMU
        // gets these fds, never the names (docs/storage.md).
        let opened = match crate::storage::hostfiles::open_for_qemu(&config, &self.ctx.paths.home) {
            Ok(mut files) => match self.attach_seed(&config, &mut files).await {
                Ok(()) => match self.attach_firmware(&config, &mut files).await {
                    Ok(()) => self
                        .attach_tpm(&config, &mut files)
                        .await
                        .map(|tpm| (files, tpm)),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
            Err(e) => Err(e.into()),
        };
        let (files, tpm) = match opened {
            Ok(files) => files,
            Err(e) => {
                let msg = format!("cannot start VM '{name}': {e}");
                self.transition(Status::Failed, &msg, false, |_| {}).await?;
                return Err(VmError::Storage(msg));
            }
        };
        match self
            .launch(&name, &config, &files, &binary, tpm.clone())
            .await
        {
            Ok((runtime, events, status)) => {
                let pid = runtime.process.pid();
                *self.runtime.lock() = Some(runtime.clone());
                let reason = if status == Status::Paused {
                    "started paused (-S)"
                } else {
                    "started"
                };
                self.transition(status, reason, true, |t| {
                    t.pid = Some(Some(pid));
                    t.started_at = Some(now_us());
                    t.exit_status = Some(-1);
                })
                .await?;
                supervisor::spawn(self.clone(), runtime.clone(), events);
                // Keep the serial output from the first byte (a VM without maqet's console has none).
                let _ = self.keep_console(&runtime).await;
                self.set_forwards(config.guest().forwards.clone());
                Ok(())
            }
            Err(failure) => {
                if let Some(tpm) = &tpm {
                    // Its channel closes with QEMU's copy: swtpm ends by itself.
                    drop(files);
                    self.end_tpm(tpm).await;
                }
                let msg = failure.message;
                launch::log_run_end(&self.log_file(), Status::Failed.as_str(), &msg);
                self.transition(Status::Failed, &msg, true, |t| {
                    t.pid = Some(None);
                    t.pid_start_time = Some(None);
                    t.stopped_at = Some(now_us());
                    t.exit_status = Some(failure.exit.map(|e| e.as_property()).unwrap_or(-1));
                })
                .await?;
                self.cleanup_runtime_dir();
                Err(VmError::QemuFailed(msg))
            }
        }
    }

    /// A linked clone's disks are overlays on this VM's disks: writing them would
    /// change the clones' disks under them, so this VM no longer starts
    /// (docs/storage.md, "Clones").
    async fn refuse_if_base_of_linked_clones(&self, config: &VmConfig) -> Result<(), VmError> {
        let mine: Vec<std::path::PathBuf> = config
            .storage()
            .iter()
            .filter(|e| e.kind.is_disk() && !e.readonly)
            .map(|e| e.path.clone())
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        let records = self
            .ctx
            .store
            .read(|db| db.load_vms())
            .await
            .map_err(store_error)?;
        let mut clones = Vec::new();
        for rec in records.iter().filter(|r| r.id != self.id) {
            let Ok(other) = self.ctx.load_stored_config(&rec.config) else {
                continue;
            };
            for e in other.storage() {
                if e.backing_file.as_ref().is_some_and(|b| mine.contains(b)) {
                    clones.push(format!("{} (disk '{}')", rec.name, e.name));
                }
            }
        }
        if clones.is_empty() {
            return Ok(());
        }
        let name = self.name();
        Err(VmError::InvalidState(format!(
            "VM '{name}' is the base of linked clone {}: starting it would change their disks under them; remove the clones (maqet rm --delete-storage) to use it again, and clone with --full for copies that stay independent",
            clones.join(", ")
        )))
    }

    /// Creates every declared disk image that does not exist yet (race-free, mode
    /// 0600, after a free-space check) and records it as maqet's, and every missing
    /// share directory (not recorded: maqet never deletes a share). An existing file,
    /// or anything else at the path, is used as is.
    async fn create_missing_disks(&self, config: &VmConfig) -> Result<(), VmError> {
        for e in config.storage().iter().filter(|e| !e.kind.is_disk()) {
            if std::fs::symlink_metadata(&e.path).is_err() {
                crate::storage::create::create_share_dir(&e.path, &self.ctx.paths.home)?;
            }
        }
        let mut qemu_img = None;
        for e in config.storage().iter().filter(|e| e.kind.is_disk()) {
            if std::fs::symlink_metadata(&e.path).is_ok() {
                continue;
            }
            let img = match &qemu_img {
                Some(img) => img,
                None => {
                    qemu_img.insert(crate::storage::QemuImg::find(self.ctx.path_env.as_deref())?)
                }
            };
            // `from: IMAGE`: an overlay on the stored image, named relative to the disk.
            let overlay = match &e.from {
                Some(image) => {
                    Some(crate::images::overlay(&self.ctx, image, &e.path, e.size).await?)
                }
                None => None,
            };
            let (backing, size) = match &overlay {
                Some(o) => (Some((o.backing.as_path(), "qcow2")), Some(o.size)),
                None => (
                    e.backing_file.as_deref().zip(e.backing_format.as_deref()),
                    e.size,
                ),
            };
            let spec = crate::storage::create::NewImage {
                path: &e.path,
                kind: e.kind,
                size,
                backing,
            };
            let outcome =
                crate::storage::create::create_image(img, &spec, &self.ctx.paths.home).await?;
            if outcome != crate::storage::create::Outcome::Created {
                continue;
            }
            let (id, name) = (self.id.clone(), self.name());
            let (path, format) = (e.path.clone(), e.kind.as_str());
            let owner = id.clone();
            self.ctx
                .store
                .write(move |db| db.record_created_file(&owner, &path, format))
                .await
                .map_err(store_error)?;
            let reason = format!(
                "created {} disk image '{}' at {}",
                e.kind.as_str(),
                e.name,
                e.path.display()
            );
            let detail = serde_json::json!({ "disk": e.name, "path": e.path, "format": e.kind.as_str(), "size": size, "from": e.from });
            let recorded = self
                .ctx
                .store
                .record_event(&id, &name, "storage", reason, Some(detail));
            if let Err(err) = recorded.await {
                tracing::warn!(vm = %name, error = %err, "cannot record disk creation in history");
            }
            tracing::info!(vm = %name, disk = %e.name, path = %e.path.display(), "created disk image");
        }
        Ok(())
    }

    /// `firmware: uefi…`: finds the build through QEMU's descriptors, makes the VM's
    /// variable store on first start (recorded as maqet's, so `--delete-storage` removes
    /// it) and hands both to QEMU as pflash fd sets.
    async fn attach_firmware(
        &self,
        config: &VmConfig,
        files: &mut crate::storage::hostfiles::OpenedFiles,
    ) -> Result<(), VmError> {
        use crate::storage::firmware;
        let kind = config.firmware();
        if kind == crate::config::Firmware::Bios {
            return Ok(());
        }
        let paths = &self.ctx.paths;
        let xdg_config = paths.config_dir.parent().unwrap_or(&paths.config_dir);
        let binary = config.binary();
        let arch = binary
            .rsplit('/')
            .next()
            .and_then(|b| b.strip_prefix("qemu-system-"))
            .unwrap_or(std::env::consts::ARCH);
        let machine = config.machine_type();
        let selected = firmware::select(
            &firmware::descriptor_dirs(xdg_config),
            kind,
            arch,
            machine.as_deref(),
        )
        .map_err(VmError::Storage)?;
        let vars = firmware::vars_path(&paths.vm_data_dir(&self.id), kind);
        if firmware::ensure_vars(&selected.vars_template, &vars, &paths.home)
            .map_err(VmError::Storage)?
        {
            let (owner, path) = (self.id.clone(), vars.clone());
            let format = selected.vars_format.clone();
            // Recorded before QEMU runs: a failed start still leaves it deletable.
            self.ctx
                .store
                .write(move |db| db.record_created_file(&owner, &path, &format))
                .await
                .map_err(store_error)?;
            tracing::info!(vm = %self.name(), path = %vars.display(), template = %selected.vars_template.display(), "created UEFI variable store");
        }
        firmware::attach(&selected, &vars, &paths.home, files).map_err(VmError::Storage)
    }

    /// `cloud_init` and its convenience keys: writes the NoCloud seed in the VM's data
    /// directory from the current config at every start (so it always matches it;
    /// recorded as maqet's the first time, so `--delete-storage` removes it) and attaches
    /// it read-only as a virtio disk.
    async fn attach_seed(
        &self,
        config: &VmConfig,
        files: &mut crate::storage::hostfiles::OpenedFiles,
    ) -> Result<(), VmError> {
        use crate::storage::seed;
        let Some(cloud_init) = &config.guest().cloud_init else {
            return Ok(());
        };
        let dest = seed::seed_path(&self.ctx.paths.vm_data_dir(&self.id));
        let new = std::fs::symlink_metadata(&dest).is_err();
        let docs = seed::compose(cloud_init, &self.id).map_err(VmError::InvalidArgument)?;
        seed::write_iso(&docs, &dest, self.ctx.path_env.as_deref()).map_err(VmError::Storage)?;
        if new {
            let (owner, path) = (self.id.clone(), dest.clone());
            self.ctx
                .store
                .write(move |db| db.record_created_file(&owner, &path, "raw"))
                .await
                .map_err(store_error)?;
        }
        let set = files
            .add_block_file(&dest, crate::config::Access::Read)
            .map_err(VmError::Storage)?;
        files.args.extend([
            "-drive".to_owned(),
            format!("if=none,id=maqet-cidata,format=raw,readonly=on,file={set}"),
            "-device".to_owned(),
            "virtio-blk-pci,drive=maqet-cidata".to_owned(),
        ]);
        tracing::info!(vm = %self.name(), path = %dest.display(), "wrote the cloud-init seed");
        Ok(())
    }

    /// `tpm: true`: starts the VM's swtpm (`vm::tpm`), records it, and adds its device.
    async fn attach_tpm(
        &self,
        config: &VmConfig,
        files: &mut crate::storage::hostfiles::OpenedFiles,
    ) -> Result<Option<Arc<Process>>, VmError> {
        if !config.tpm() {
            return Ok(None);
        }
        let swtpm =
            crate::config::find_binary("swtpm", self.ctx.path_env.as_deref()).map_err(|e| {
                VmError::Storage(format!(
                    "`tpm: true` needs swtpm: {} (install the swtpm package)",
                    e.message
                ))
            })?;
        let paths = &self.ctx.paths;
        paths
            .ensure_log_dir()
            .map_err(|e| VmError::Storage(format!("log directory: {e}")))?;
        let state = super::tpm::state_dir(&paths.vm_data_dir(&self.id));
        let log = paths.log_dir().join(format!("{}.swtpm.log", self.id));
        let (fd, tpm) = super::tpm::start(&swtpm, &state, &log)
            .map_err(|e| VmError::Storage(format!("cannot start swtpm: {e}")))?;
        self.record_tpm(&tpm).await;
        let n = files.pass_fd(fd, "swtpm control channel");
        files.args.extend(super::tpm::qemu_args(n));
        Ok(Some(Arc::new(tpm)))
    }

    async fn launch(
        self: &Arc<Self>,
        name: &str,
        config: &VmConfig,
        files: &crate::storage::hostfiles::OpenedFiles,
        binary: &std::path::Path,
        tpm: Option<Arc<Process>>,
    ) -> Result<
        (
            Arc<Runtime>,
            tokio::sync::mpsc::UnboundedReceiver<crate::qmp::QmpEvent>,
            Status,
        ),
        LaunchFailure,
    > {
        let paths = &self.ctx.paths;
        let setup = |what: &str, e: &dyn std::fmt::Display| LaunchFailure {
            message: format!("cannot start VM '{name}': {what}: {e}"),
            exit: None,
        };
        paths
            .ensure_vm_runtime_dir(&self.id)
            .map_err(|e| setup("runtime directory", &e))?;
        paths
            .ensure_log_dir()
            .map_err(|e| setup("log directory", &e))?;
        let socket = paths.qmp_socket(&self.id);
        let console = paths.console_socket(&self.id);
        let agent = paths.agent_socket(&self.id);
        let wants_agent = config.guest().guest_agent;
        let display_socket = paths.display_socket(&self.id);
        let display_args = match config.display() {
            Some(display) => {
                // QEMU binds this path itself; a stale one from a dead QEMU goes first.
                let _ = std::fs::remove_file(&display_socket);
                super::display::qemu_args(display, &display_socket)
            }
            None => Vec::new(),
        };
        let log_file = paths.vm_log(&self.id);
        let graphical_env = self.graphical_env.lock().clone();
        let args = &files.args;
        let placements = files.placements();
        let spawned = launch::spawn(&launch::LaunchSpec {
            binary,
            uuid: &self.id,
            name,
            user_args: args,
            qmp_socket: &socket,
            console_socket: launch::wants_console(args).then_some(console.as_path()),
            agent_socket: wants_agent.then_some(agent.as_path()),
            display_args: &display_args,
            graphical_env: &graphical_env,
            log_file: &log_file,
            files: &placements,
            file_notes: &files.notes,
        })
        .map_err(|e| setup(&format!("spawning {}", binary.display()), &e))?;
        let process = spawned.process;
        let pid = process.pid();
        // Record the pid before anything can fail: a row never claims no process while
        // one exists.
        if let Err(e) = self
            .transition(Status::Starting, "QEMU spawned", false, |t| {
                t.pid = Some(Some(pid));
                t.pid_start_time = Some(Some(process.start_time()));
            })
            .await
        {
            let _ = process.signal(Signal::KILL);
            process.wait().await;
            return Err(setup("recording the process", &e));
        }

        let failure = |exit: Option<ExitInfo>, why: String| {
            let tail = launch::log_tail(&log_file, spawned.log_offset);
            let mut message = format!("QEMU for VM '{name}' {why}");
            if !tail.is_empty() {
                message.push_str(": ");
                message.push_str(&tail);
            }
            message.push_str(&format!(" (full log: {})", log_file.display()));
            LaunchFailure { message, exit }
        };
        let (qmp, rx) = tokio::select! {
            res = connect_monitor(&socket) => match res {
                Ok(connected) => connected,
                Err(QmpError::Timeout(_)) => {
                    let _ = process.signal(Signal::KILL);
                    process.wait().await;
                    return Err(failure(None, format!("did not open its monitor within {} s and was killed", MONITOR_READY_TIMEOUT.as_secs())));
                }
                Err(e) => {
                    // Usually QEMU exited during start-up; let its exit speak.
                    let exit = tokio::time::timeout(Duration::from_secs(5), process.wait()).await.ok();
                    if exit.is_none() {
                        let _ = process.signal(Signal::KILL);
                        process.wait().await;
                    }
                    let why = match exit {
                        Some(x) => format!("{} during start-up", x.describe()),
                        None => format!("did not complete the monitor handshake ({e})"),
                    };
                    return Err(failure(exit, why));
                }
            },
            exit = process.wait() => {
                return Err(failure(Some(exit), format!("{} during start-up", exit.describe())));
            }
        };
        let status = match qmp.execute_timeout("query-status", None, QMP_TIMEOUT).await {
            Ok(v) => qmp_run_state(&v),
            Err(e) => {
                let _ = process.signal(Signal::KILL);
                let exit = process.wait().await;
                return Err(failure(
                    Some(exit),
                    format!("failed its first status query ({e})"),
                ));
            }
        };
        // The ports were checked free before the spawn; one taken since fails the start.
        if let Err(e) = forward::install(name, &qmp, config).await {
            let _ = process.signal(Signal::KILL);
            let exit = process.wait().await;
            return Err(failure(
                Some(exit),
                format!("was stopped: its forwards could not be set up ({})", e),
            ));
        }
        let runtime = Runtime::new(process, tpm, qmp, spawned.log_offset);
        Ok((runtime, rx, status))
    }
}

struct LaunchFailure {
    message: String,
    exit: Option<ExitInfo>,
}

/// `query-status` → our status: a QEMU that is not executing vCPUs is `paused`.
pub(super) fn qmp_run_state(v: &Value) -> Status {
    if v.get("running").and_then(Value::as_bool).unwrap_or(false) {
        Status::Running
    } else {
        Status::Paused
    }
}
