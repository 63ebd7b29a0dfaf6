//! Stopping and restarting: the escalation of ARCHITECTURE §3 (ACPI power-down, wait,
//! QMP quit, SIGTERM, SIGKILL), run on its own task so it finishes if the caller leaves.

use super::*;

use tokio::time::Instant;

/// The longest graceful wait a `Stop` may ask for (1 hour: long enough for a guest
/// installing updates on its way down; a VM is never left `stopping` for longer).
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(3600);

impl Vm {
    /// Stops the VM: ACPI power-down, wait up to `timeout` (at most
    /// [`MAX_STOP_TIMEOUT`]), then QMP `quit`, SIGTERM, SIGKILL (`force` starts at
    /// `quit`). The escalation runs on its own task, so it finishes even if the caller
    /// goes away; the call returns when the VM has stopped, or after [`REPLY_LIMIT`]
    /// with the VM still `stopping`. A `Stop` while one is running takes over when it
    /// asks for less: its timeout (counted from now) or `force` ends the graceful wait
    /// sooner, never later.
    pub async fn stop(self: &Arc<Self>, force: bool, timeout: Duration) -> Result<(), VmError> {
        if timeout > MAX_STOP_TIMEOUT {
            return Err(VmError::InvalidArgument(format!(
                "a stop timeout of {} s is above the maximum of {} s; pass a shorter one, or force=true to stop now",
                timeout.as_secs(),
                MAX_STOP_TIMEOUT.as_secs()
            )));
        }
        let deadline = Instant::now() + if force { Duration::ZERO } else { timeout };
        let runtime = {
            let _op = self.op_lock.lock().await;
            let status = self.check(Operation::Stop)?;
            let Some(rt) = self.runtime() else {
                return Err(VmError::Internal(format!(
                    "VM '{}' is {status} but maqetd holds no process for it",
                    self.name()
                )));
            };
            if status == Status::Stopping {
                rt.stop_deadline.send_modify(|d| {
                    *d = Some(d.map_or(deadline, |current| current.min(deadline)));
                });
            } else {
                let graceful = !force && status == Status::Running;
                let reason = if force {
                    "forced stop requested"
                } else {
                    "stop requested"
                };
                self.transition(Status::Stopping, reason, true, |_| {})
                    .await?;
                rt.stop_deadline.send_replace(Some(deadline));
                tokio::spawn(escalate(self.clone(), rt.clone(), graceful));
            }
            rt
        };
        runtime.wait_exited(REPLY_LIMIT).await;
        Ok(())
    }

    /// Restart: a new QEMU process with the current config (so applied changes take
    /// effect). A running VM is told to `quit` (then killed if it does not); a VM that
    /// is not running is started.
    pub async fn restart(self: &Arc<Self>) -> Result<(), VmError> {
        let _op = self.op_lock.lock().await;
        let status = self.check(Operation::Restart)?;
        if status.has_process() {
            let rt = self.runtime().ok_or_else(|| {
                VmError::Internal(format!("VM '{}' has no process to restart", self.name()))
            })?;
            rt.restarting.store(true, Ordering::SeqCst);
            self.transition(Status::Stopping, "restart requested", true, |_| {})
                .await?;
            rt.set_intent(StopIntent::Quit);
            let _ = rt.qmp.execute_timeout("quit", None, QMP_TIMEOUT).await;
            if !rt.wait_exited(QUIT_WAIT).await {
                rt.set_intent(StopIntent::Kill);
                let _ = rt.process.signal(Signal::KILL);
                rt.wait_exited(REPLY_LIMIT).await;
            }
        }
        self.start_locked().await
    }

    /// Kills the process for a forced removal and waits until it is gone.
    pub(crate) async fn kill_for_removal(self: &Arc<Self>) {
        if let Some(rt) = self.runtime() {
            if self.status() != Status::Stopping {
                let _ = self
                    .transition(Status::Stopping, "forced removal", true, |_| {})
                    .await;
            }
            rt.set_intent(StopIntent::Kill);
            let _ = rt.process.signal(Signal::KILL);
            rt.wait_exited(REPLY_LIMIT).await;
        }
    }
}

/// The stop escalation of ARCHITECTURE §3; runs detached from the caller. `graceful`:
/// power down first and wait until `rt.stop_deadline`.
async fn escalate(vm: Arc<Vm>, rt: Arc<Runtime>, graceful: bool) {
    let name = vm.name();
    // A connected guest agent first: it powers off even a guest without ACPI handling.
    // It gets half the graceful wait; ACPI the rest.
    if graceful && vm.agent_shutdown(&rt).await {
        let deadline = *rt.stop_deadline.borrow();
        let half = deadline
            .map(|d| d.saturating_duration_since(Instant::now()) / 2)
            .unwrap_or_default();
        if rt.wait_exited(half).await {
            return;
        }
        tracing::info!(vm = %name, "guest did not power off through its agent; trying ACPI");
    }
    if graceful {
        rt.set_intent(StopIntent::Powerdown);
        match rt
            .qmp
            .execute_timeout("system_powerdown", None, QMP_TIMEOUT)
            .await
        {
            Ok(_) => {
                wait_for_exit_or_deadline(&rt).await;
                if *rt.exited.borrow() {
                    return;
                }
                tracing::info!(vm = %name, "guest did not power off in time; escalating to quit");
            }
            Err(e) => tracing::warn!(vm = %name, error = %e, "system_powerdown failed; escalating"),
        }
    }
    rt.set_intent(StopIntent::Quit);
    if rt
        .qmp
        .execute_timeout("quit", None, QMP_TIMEOUT)
        .await
        .is_ok()
        && rt.wait_exited(QUIT_WAIT).await
    {
        return;
    }
    rt.set_intent(StopIntent::Terminate);
    tracing::warn!(vm = %name, "QEMU did not quit; sending SIGTERM");
    let _ = rt.process.signal(Signal::TERM);
    if rt.wait_exited(TERM_WAIT).await {
        return;
    }
    rt.set_intent(StopIntent::Kill);
    tracing::warn!(vm = %name, "QEMU ignored SIGTERM; sending SIGKILL");
    let _ = rt.process.signal(Signal::KILL);
}

/// Waits for QEMU to exit or for the stop deadline, following a deadline that a later
/// `Stop` moves (no polling: the deadline is a watch).
async fn wait_for_exit_or_deadline(rt: &Runtime) {
    let mut exited = rt.exited.subscribe();
    let mut deadline = rt.stop_deadline.subscribe();
    loop {
        let until = deadline.borrow_and_update().unwrap_or_else(Instant::now);
        tokio::select! {
            _ = exited.wait_for(|e| *e) => return,
            _ = tokio::time::sleep_until(until) => return,
            changed = deadline.changed() => if changed.is_err() { return },
        }
    }
}
