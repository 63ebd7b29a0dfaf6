//! The per-process supervisor task: QMP events in, state transitions out, and the exit.
//!
//! Event-driven only: it sleeps on the QMP event channel and the pidfd, nothing else.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use super::process::ExitInfo;
use super::{Runtime, ShutdownEvent, Status, StopIntent, Vm, launch};
use crate::events::{Cause, CoreEvent};
use crate::qmp::QmpEvent;
use crate::time::now_us;

/// How long events still in flight when QEMU died may take to arrive (the socket closes
/// with the process, so this bound is only hit if something is badly wrong).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

pub(super) fn spawn(vm: Arc<Vm>, rt: Arc<Runtime>, mut events: UnboundedReceiver<QmpEvent>) {
    super::guest::spawn_agent(&vm, &rt);
    super::tpm::watch(vm.clone(), rt.clone());
    tokio::spawn(async move {
        let mut events_open = true;
        let exit = loop {
            tokio::select! {
                ev = events.recv(), if events_open => match ev {
                    Some(ev) => handle_event(&vm, &rt, ev).await,
                    None => events_open = false,
                },
                exit = rt.process.wait() => break exit,
            }
        };
        // The SHUTDOWN event (sent just before QEMU exits) decides how the exit reads.
        if events_open {
            let drain = async {
                while let Some(ev) = events.recv().await {
                    handle_event(&vm, &rt, ev).await;
                }
            };
            let _ = tokio::time::timeout(DRAIN_LIMIT, drain).await;
        }
        finish(&vm, &rt, exit).await;
    });
}

async fn handle_event(vm: &Arc<Vm>, rt: &Runtime, ev: QmpEvent) {
    match ev.name.as_str() {
        // A live snapshot stops and resumes the vCPUs itself: not a pause.
        "STOP" if vm.status() == Status::Running && !vm.live_job_active() => {
            let reason = if rt.pause_requested.swap(false, Ordering::SeqCst) {
                "paused by request".to_string()
            } else {
                // Not ours: ask QEMU why (io-error, guest-panicked, debug, …).
                let why = rt
                    .qmp
                    .execute_timeout("query-status", None, Duration::from_secs(5))
                    .await
                    .ok()
                    .and_then(|v| v.get("status").and_then(|s| s.as_str()).map(str::to_string))
                    .unwrap_or_else(|| "unknown".into());
                format!("paused by QEMU (run state: {why})")
            };
            let _ = vm.transition(Status::Paused, &reason, true, |_| {}).await;
        }
        "RESUME" if vm.status() == Status::Paused && !vm.live_job_active() => {
            let _ = vm
                .transition(Status::Running, "resumed", true, |_| {})
                .await;
        }
        "SHUTDOWN" => {
            let guest = ev
                .data
                .get("guest")
                .and_then(|g| g.as_bool())
                .unwrap_or(false);
            let reason = ev
                .data
                .get("reason")
                .and_then(|r| r.as_str())
                .unwrap_or("")
                .to_string();
            *rt.shutdown.lock() = Some(ShutdownEvent { guest, reason });
        }
        "VSERPORT_CHANGE" => vm.agent_port_changed(&ev.data),
        _ => {}
    }
    vm.publish_qmp(&ev.name, &ev.data);
    vm.ctx.sink.emit(CoreEvent::Qmp {
        vm: vm.clone(),
        name: ev.name,
        data_json: ev.data.to_string(),
        timestamp_us: ev.timestamp_us,
    });
}

async fn finish(vm: &Arc<Vm>, rt: &Runtime, exit: ExitInfo) {
    let intent = *rt.intent.lock();
    let shutdown = rt.shutdown.lock().clone();
    let restarting = rt.restarting.load(Ordering::SeqCst);
    let window = vm
        .stored_config()
        .is_ok_and(|c| super::window::opens_window(&c.qemu_args()));
    let (status, mut reason, cause) = classify(exit, intent, shutdown.as_ref(), restarting, window);
    if status == Status::Crashed && matches!(exit, ExitInfo::Code(c) if c != 0) {
        let tail = launch::log_tail(&vm.log_file(), rt.log_offset);
        if let Some(last) = tail.lines().last() {
            reason.push_str(": ");
            reason.push_str(last);
        }
    }
    launch::log_run_end(&vm.log_file(), status.as_str(), &reason);
    // Before the VM reads stopped: its swtpm is gone with it.
    if let Some(tpm) = &rt.tpm {
        vm.end_tpm(tpm).await;
    }
    *vm.runtime.lock() = None;
    let _ = vm
        .transition_because(status, &reason, true, cause, |t| {
            t.pid = Some(None);
            t.pid_start_time = Some(None);
            t.stopped_at = Some(now_us());
            t.exit_status = Some(exit.as_property());
        })
        .await;
    vm.cleanup_runtime_dir();
    rt.exited.send_replace(true);
}

/// Tells a stop from a crash: what we asked for, what QEMU announced, how it ended.
/// The cause says whether the guest did it on its own (a power-off nobody asked for).
/// `window`: QEMU had a window of its own (`display: gtk|sdl`).
fn classify(
    exit: ExitInfo,
    intent: StopIntent,
    shutdown: Option<&ShutdownEvent>,
    restarting: bool,
    window: bool,
) -> (Status, String, Cause) {
    if restarting {
        return (Status::Stopped, "restarting".into(), Cause::Restart);
    }
    if let Some(sd) = shutdown.filter(|s| s.guest) {
        // Answering our ACPI power-down is doing what was asked.
        let cause = if matches!(intent, StopIntent::Powerdown | StopIntent::AgentShutdown) {
            Cause::Other
        } else {
            Cause::Guest
        };
        let (status, reason) = match sd.reason.as_str() {
            "guest-shutdown" if intent == StopIntent::Powerdown => (
                Status::Stopped,
                "guest powered off after an ACPI power-down request".into(),
            ),
            "guest-shutdown" if intent == StopIntent::AgentShutdown => (
                Status::Stopped,
                "guest powered off after a guest-agent shutdown request".into(),
            ),
            "guest-shutdown" => (Status::Stopped, "guest powered off".into()),
            "guest-panic" => (Status::Crashed, "guest panicked".into()),
            "guest-reset" => (Status::Stopped, "guest rebooted (-no-reboot)".into()),
            other => (Status::Stopped, format!("guest shut down ({other})")),
        };
        return (status, reason, cause);
    }
    let (status, reason) = classify_host(exit, intent, shutdown, window);
    (status, reason, Cause::Other)
}

/// An end the guest did not ask for: ours, or the host's.
fn classify_host(
    exit: ExitInfo,
    intent: StopIntent,
    shutdown: Option<&ShutdownEvent>,
    window: bool,
) -> (Status, String) {
    match intent {
        StopIntent::Powerdown | StopIntent::AgentShutdown | StopIntent::Quit => {
            return (Status::Stopped, "stopped by request (QMP quit)".into());
        }
        StopIntent::Terminate => {
            return (
                Status::Stopped,
                "stopped by request with SIGTERM (QEMU did not quit)".into(),
            );
        }
        StopIntent::Kill => {
            return (Status::Stopped, "stopped by request with SIGKILL".into());
        }
        StopIntent::None => {}
    }
    match shutdown.map(|s| s.reason.as_str()) {
        // The user closed QEMU's own window: `host-ui` (SDL; GTK since QEMU 8), or
        // `host-qmp-quit` from QEMU 7.2's GTK window, whose close button and built-in
        // monitor are the only quitters besides maqet's own monitor.
        Some("host-ui") => {
            return (Status::Stopped, "window closed by the user".into());
        }
        Some("host-qmp-quit") if window => {
            return (Status::Stopped, "window closed by the user".into());
        }
        Some("host-qmp-quit") => {
            return (
                Status::Stopped,
                "QEMU was told to quit on a monitor maqet does not control".into(),
            );
        }
        Some("host-signal") => {
            return (
                Status::Crashed,
                "QEMU was terminated by a signal from outside maqet".into(),
            );
        }
        _ => {}
    }
    match exit {
        ExitInfo::Code(0) => (Status::Stopped, "QEMU exited".into()),
        ExitInfo::Code(c) => (Status::Crashed, format!("QEMU exited with status {c}")),
        ExitInfo::Signal(s) => (
            Status::Crashed,
            format!(
                "QEMU was killed by signal {s} ({})",
                super::process::signal_name(s)
            ),
        ),
        ExitInfo::Unknown => (
            Status::Crashed,
            "QEMU ended unexpectedly (no exit status: it was re-adopted after a maqetd restart)"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd(guest: bool, reason: &str) -> ShutdownEvent {
        ShutdownEvent {
            guest,
            reason: reason.into(),
        }
    }

    #[test]
    fn a_kill_from_outside_is_a_crash() {
        let (s, r, _) = classify(ExitInfo::Signal(9), StopIntent::None, None, false, false);
        assert_eq!(s, Status::Crashed);
        assert!(r.contains("SIGKILL"), "{r}");
    }

    #[test]
    fn our_kill_is_a_stop() {
        let (s, _, cause) = classify(ExitInfo::Signal(9), StopIntent::Kill, None, false, false);
        assert_eq!((s, cause), (Status::Stopped, Cause::Other));
    }

    #[test]
    fn guest_poweroff_is_a_stop_with_its_reason() {
        let (s, r, cause) = classify(
            ExitInfo::Code(0),
            StopIntent::None,
            Some(&sd(true, "guest-shutdown")),
            false,
            false,
        );
        assert_eq!(
            (s, r.as_str(), cause),
            (Status::Stopped, "guest powered off", Cause::Guest)
        );
        let (_, r, cause) = classify(
            ExitInfo::Code(0),
            StopIntent::Powerdown,
            Some(&sd(true, "guest-shutdown")),
            false,
            false,
        );
        assert!(r.contains("ACPI"), "{r}");
        assert_eq!(
            cause,
            Cause::Other,
            "a requested power-down is not the guest's idea"
        );
    }

    #[test]
    fn quit_is_a_stop_and_outside_signals_are_crashes() {
        let quit = sd(false, "host-qmp-quit");
        assert_eq!(
            classify(
                ExitInfo::Code(0),
                StopIntent::Quit,
                Some(&quit),
                false,
                false
            )
            .0,
            Status::Stopped
        );
        let sig = sd(false, "host-signal");
        assert_eq!(
            classify(
                ExitInfo::Code(0),
                StopIntent::None,
                Some(&sig),
                false,
                false
            )
            .0,
            Status::Crashed
        );
        assert_eq!(
            classify(ExitInfo::Code(1), StopIntent::None, None, false, false).0,
            Status::Crashed
        );
        let (s, _, cause) = classify(ExitInfo::Signal(9), StopIntent::None, None, true, false);
        assert_eq!((s, cause), (Status::Stopped, Cause::Restart));
    }

    #[test]
    fn a_closed_window_is_the_users_stop() {
        let ui = sd(false, "host-ui");
        assert_eq!(
            classify(ExitInfo::Code(0), StopIntent::None, Some(&ui), false, false),
            (
                Status::Stopped,
                "window closed by the user".to_owned(),
                Cause::Other
            )
        );
        let quit = sd(false, "host-qmp-quit");
        let (_, r, _) = classify(
            ExitInfo::Code(0),
            StopIntent::None,
            Some(&quit),
            false,
            true,
        );
        assert_eq!(r, "window closed by the user");
        let (_, r, _) = classify(
            ExitInfo::Code(0),
            StopIntent::None,
            Some(&quit),
            false,
            false,
        );
        assert!(r.contains("monitor maqet does not control"), "{r}");
    }
}
