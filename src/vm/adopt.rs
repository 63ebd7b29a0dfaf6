//! Re-adoption: taking back a QEMU that outlived a previous maqetd, or one the record
//! lost track of, after checking it really is this VM's (pid, start time, `-uuid`).

use super::*;

impl Vm {
    /// Takes over a QEMU that runs this VM although its record says otherwise (found by
    /// `maqet doctor`): record the process, then re-adopt it like after a restart.
    pub(crate) async fn adopt_orphan(self: &Arc<Self>, pid: u32, start_time: u64) {
        let _op = self.op_lock.lock().await;
        if self.status().has_process() {
            return;
        }
        let noted = self
            .transition(Status::Starting, "found running QEMU", true, |t| {
                t.pid = Some(Some(pid));
                t.pid_start_time = Some(Some(start_time));
            })
            .await;
        if noted.is_ok() {
            self.readopt().await;
        }
    }

    /// Re-attaches to a QEMU that outlived a previous maqetd (see docs/architecture.md).
    pub(crate) async fn readopt(self: &Arc<Self>) {
        let info = self.info();
        if !info.status.has_process() {
            return;
        }
        let recorded = match (info.pid, info.pid_start_time) {
            (Some(pid), Some(start)) => Some((pid, start)),
            _ => process::find_by_uuid(&self.id),
        };
        let Some((pid, start)) = recorded else {
            self.mark_gone(info.status, "no process was recorded".into())
                .await;
            return;
        };
        let process = match Process::adopt(pid, start, &self.id) {
            Ok(p) => p,
            Err(e) => {
                self.mark_gone(info.status, e.to_string()).await;
                return;
            }
        };
        let socket = self.ctx.paths.qmp_socket(&self.id);
        let (qmp, rx) = match connect_monitor(&socket).await {
            Ok(connected) => connected,
            Err(e) => {
                let why = match e {
                    QmpError::Timeout(d) => format!("no QMP greeting within {} s", d.as_secs()),
                    other => other.to_string(),
                };
                tracing::error!(vm = %info.name, pid, error = %why, "cannot reconnect to the monitor of a surviving QEMU");
                // Alive but unmanageable: end it through the pidfd (never by bare pid)
                // rather than leave a VM nobody can control.
                let _ = process.signal(Signal::KILL);
                self.mark_gone(
                    info.status,
                    format!(
                        "its monitor at {} was unreachable ({why}), so maqetd killed it",
                        socket.display()
                    ),
                )
                .await;
                return;
            }
        };
        let status = match qmp.execute_timeout("query-status", None, QMP_TIMEOUT).await {
            Ok(v) => qmp_run_state(&v),
            Err(_) => info.status,
        };
        let log_offset = std::fs::metadata(self.log_file()).map_or(0, |m| m.len());
        let (tpm, tpm_lost) = self.readopt_tpm(&info.name).await;
        let runtime = Runtime::new(process, tpm, qmp, log_offset);
        *self.runtime.lock() = Some(runtime.clone());
        let reason = tpm_lost.unwrap_or_else(|| "re-adopted after a maqetd restart".into());
        let _ = self
            .transition(status, &reason, true, |t| {
                t.pid = Some(Some(pid));
                t.pid_start_time = Some(Some(start));
                if info.started_at == 0 {
                    t.started_at = Some(now_us());
                }
            })
            .await;
        supervisor::spawn(self.clone(), runtime.clone(), rx);
        // Keep the serial output from the first byte (a VM without maqet's console has none).
        let _ = self.keep_console(&runtime).await;
        // QEMU kept every forward, configured or added at run time: list them again.
        self.reread_forwards().await;
        tracing::info!(vm = %info.name, pid, "re-adopted running QEMU");
    }

    /// Takes back the swtpm of a re-adopted QEMU (`tpm::readopt`), recording it again if
    /// it was found by its mark. A VM that should have one and has none keeps running
    /// without a working TPM: the second value is the reason that says so.
    async fn readopt_tpm(&self, name: &str) -> (Option<Arc<Process>>, Option<String>) {
        let recorded = self.recorded_tpm().await;
        let wants = self.stored_config().is_ok_and(|c| c.tpm());
        if recorded.is_none() && !wants {
            return (None, None);
        }
        let state = tpm::state_dir(&self.ctx.paths.vm_data_dir(&self.id));
        match tpm::readopt(recorded, &state) {
            Ok(p) => {
                if recorded != Some((p.pid(), p.start_time())) {
                    self.record_tpm(&p).await;
                }
                tracing::info!(vm = %name, pid = p.pid(), "re-adopted swtpm");
                (Some(Arc::new(p)), None)
            }
            Err(why) => {
                self.forget_tpm().await;
                let reason = format!(
                    "its TPM is gone: swtpm ended while maqetd was not running ({why}); the guest's TPM no longer answers; restart the VM to get it back"
                );
                tracing::error!(vm = %name, "{reason}");
                (None, Some(reason))
            }
        }
    }

    /// Ends the recorded swtpm of a QEMU that is gone (normally it ended with QEMU).
    async fn end_orphan_tpm(&self) {
        let Some(recorded) = self.recorded_tpm().await else {
            return;
        };
        let state = tpm::state_dir(&self.ctx.paths.vm_data_dir(&self.id));
        if let Ok(p) = tpm::readopt(Some(recorded), &state) {
            self.end_tpm(&p).await;
        } else {
            self.forget_tpm().await;
        }
    }

    /// Records that the QEMU a record names is gone (it ended while maqetd was down).
    async fn mark_gone(self: &Arc<Self>, was: Status, why: String) {
        self.end_orphan_tpm().await;
        let reason = format!("QEMU ended while maqetd was not running ({why})");
        let status = if was == Status::Stopping {
            Status::Stopped
        } else {
            Status::Crashed
        };
        let _ = self
            .transition(status, &reason, true, |t| {
                t.pid = Some(None);
                t.pid_start_time = Some(None);
                t.stopped_at = Some(now_us());
                t.exit_status = Some(-1);
            })
            .await;
        self.cleanup_runtime_dir();
    }
}
