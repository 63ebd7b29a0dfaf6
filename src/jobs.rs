//! Long-running operations as jobs: an id, what they do, progress, an outcome, and a
//! way to ask them to stop.
//!
//! Owns the job's state and nothing else: the work itself (e.g. [`crate::snapshot`])
//! runs on its own task and reports here; the D-Bus layer watches [`Job::subscribe`]
//! to serve `org.maqet.Maqet1.Job` objects and signal changes. A job runs to its end
//! whether or not anyone is watching.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, watch};

use crate::error_kind::ErrorKind;

/// Why a job refused a request.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A cancel came after the job's outcome was decided (`InvalidState`).
    #[error("{0}")]
    NothingToCancel(String),
}

impl JobError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            JobError::NothingToCancel(_) => ErrorKind::InvalidState,
        }
    }
}

/// Where a job is. The string forms are the D-Bus `State` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        self != JobState::Running
    }
}

/// A job's changing part, published as one value so observers see consistent states.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    pub state: JobState,
    /// 0..=1.
    pub progress: f64,
    pub message: String,
}

#[derive(Debug)]
pub struct Job {
    id: u64,
    operation: &'static str,
    vm_id: String,
    status: watch::Sender<JobStatus>,
    cancel: watch::Sender<bool>,
    /// Set once the work's outcome is fixed ([`Job::seal`]): from then on a cancel is
    /// refused, never accepted and then ignored.
    sealed: Mutex<bool>,
    running: Arc<Running>,
}

/// How many jobs are unfinished, and a wake-up when one finishes (idle exit must not
/// cut a job off, e.g. an offline snapshot of a stopped VM).
#[derive(Debug, Default)]
pub struct Running {
    count: AtomicUsize,
    finished: Notify,
}

impl Running {
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// While jobs run, resolves at the next job's end and returns true; returns false
    /// at once when none runs. (Registered before counting, so no end is missed.)
    pub async fn wait_next_finish(&self) -> bool {
        let notified = self.finished.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.count() == 0 {
            return false;
        }
        notified.await;
        true
    }
}

impl Job {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// E.g. `snapshot-create`.
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    pub fn status(&self) -> JobStatus {
        self.status.borrow().clone()
    }

    /// Every change (intermediate values may be coalesced; the final one never is).
    pub fn subscribe(&self) -> watch::Receiver<JobStatus> {
        self.status.subscribe()
    }

    /// Asks the job to stop. The outcome (cancelled, or completed when the work was
    /// already past the point of no return) is reported through the status.
    pub fn cancel(&self) -> Result<(), JobError> {
        let sealed = self.sealed.lock().unwrap_or_else(PoisonError::into_inner);
        let state = self.status.borrow().state;
        if state.is_finished() {
            return Err(JobError::NothingToCancel(format!(
                "job {} has already {}; there is nothing to cancel",
                self.id,
                state.as_str()
            )));
        }
        if *sealed {
            return Err(JobError::NothingToCancel(format!(
                "job {} is finishing (its outcome is decided); there is nothing to cancel",
                self.id
            )));
        }
        self.cancel.send_replace(true);
        Ok(())
    }

    /// For the work: its outcome is decided, so later cancels are refused. Returns
    /// whether a cancel was accepted before, which the work must then honour.
    pub fn seal(&self) -> bool {
        let mut sealed = self.sealed.lock().unwrap_or_else(PoisonError::into_inner);
        *sealed = true;
        *self.cancel.borrow()
    }

    /// For the work: turns true once cancellation was requested.
    pub fn cancel_receiver(&self) -> watch::Receiver<bool> {
        self.cancel.subscribe()
    }

    pub fn cancel_requested(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Progress of a running job (clamped to 0..=1; ignored once finished).
    pub fn set_progress(&self, progress: f64, message: &str) {
        self.status.send_if_modified(|s| {
            let progress = progress.clamp(0.0, 1.0);
            if s.state.is_finished() || (s.progress == progress && s.message == message) {
                return false;
            }
            s.progress = progress;
            s.message = message.to_owned();
            true
        });
    }

    /// The outcome; only the first call counts.
    pub fn finish(&self, state: JobState, message: &str) {
        let first = self.status.send_if_modified(|s| {
            if s.state.is_finished() {
                return false;
            }
            s.state = state;
            if state == JobState::Completed {
                s.progress = 1.0;
            }
            s.message = message.to_owned();
            true
        });
        if first {
            self.running.count.fetch_sub(1, Ordering::SeqCst);
            self.running.finished.notify_waiters();
        }
    }
}

/// Hands out job ids (1, 2, … per service run) and counts unfinished jobs.
#[derive(Debug, Default)]
pub struct JobRegistry {
    last: AtomicU64,
    running: Arc<Running>,
}

impl JobRegistry {
    pub fn running(&self) -> &Running {
        &self.running
    }

    pub fn new_job(&self, operation: &'static str, vm_id: &str, message: &str) -> Arc<Job> {
        let id = self.last.fetch_add(1, Ordering::Relaxed) + 1;
        let (status, _) = watch::channel(JobStatus {
            state: JobState::Running,
            progress: 0.0,
            message: message.to_owned(),
        });
        let (cancel, _) = watch::channel(false);
        self.running.count.fetch_add(1, Ordering::SeqCst);
        Arc::new(Job {
            id,
            operation,
            vm_id: vm_id.to_owned(),
            status,
            cancel,
            sealed: Mutex::new(false),
            running: self.running.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_finishes_once_and_cancel_after_the_end_is_refused() {
        let reg = JobRegistry::default();
        let job = reg.new_job("snapshot-create", "vm", "starting");
        assert_eq!(reg.running().count(), 1);
        assert_eq!(job.id(), 1);
        assert_eq!(reg.new_job("x", "vm", "").id(), 2);
        job.set_progress(1.5, "half");
        assert_eq!(job.status().progress, 1.0);
        job.cancel().unwrap();
        assert!(job.cancel_requested());
        job.finish(JobState::Cancelled, "stopped");
        job.finish(JobState::Completed, "late");
        assert_eq!(reg.running().count(), 1, "the second job still runs");
        let s = job.status();
        assert_eq!(
            (s.state, s.message.as_str()),
            (JobState::Cancelled, "stopped")
        );
        job.set_progress(0.2, "ignored");
        assert_eq!(job.status().message, "stopped");
        assert_eq!(job.cancel().unwrap_err().kind().as_str(), "InvalidState");
    }

    #[test]
    fn a_sealed_job_refuses_cancels_and_reports_the_ones_before() {
        let reg = JobRegistry::default();
        let quiet = reg.new_job("snapshot-create", "vm", "");
        assert!(!quiet.seal(), "no cancel was asked for");
        let e = quiet.cancel().unwrap_err();
        assert_eq!(e.kind().as_str(), "InvalidState");
        assert!(e.to_string().contains("finishing"), "{}", e.to_string());
        assert!(!quiet.cancel_requested());
        let asked = reg.new_job("snapshot-create", "vm", "");
        asked.cancel().unwrap();
        assert!(asked.seal(), "the cancel before the seal must be honoured");
    }
}
