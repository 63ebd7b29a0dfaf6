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
        let runtime = Runtime::new(process, qmp, log_offset);
        *self.runtime.lock() = Some(runtime.clone());
        let _ = self
            .transition(status, "re-adopted after a maqetd restart", true, |t| {
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

    /// Records that the QEMU a record names is gone (it ended while maqetd was down).
    async fn mark_gone(self: &Arc<Self>, was: Status, why: String) {
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
