//! Rate limits for log lines about one cause, so a misbehaving peer (a QEMU answering a
//! flood of bad input, a broken bus) cannot fill the journal.
//!
//! Each call site owns a [`LogLimiter`]: at most [`BURST`] lines per [`WINDOW`]; lines
//! beyond that are counted, and the first line let through after the window says how
//! many similar ones were suppressed ("N similar messages suppressed"). No timers: the
//! count is reported when the cause speaks again, so an idle service never wakes for it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines let through per window.
pub const BURST: u32 = 10;
/// The window length.
pub const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct LogLimiter {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new() -> LogLimiter {
        LogLimiter {
            state: Mutex::new(State {
                window_start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were suppressed
    /// since the last one; `None` when this one is suppressed.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            s.window_start = Some(now);
            s.logged = 0;
        }
        if s.logged >= BURST {
            s.suppressed += 1;
            return None;
        }
        s.logged += 1;
        Some(std::mem::take(&mut s.suppressed))
    }

    /// Runs `log` when the limiter admits a line, after a warning with the number of
    /// lines suppressed before it (if any). `cause` names the kind of line.
    pub fn warn(&self, cause: &str, log: impl FnOnce()) {
        match self.admit() {
            None => {}
            Some(0) => log(),
            Some(n) => {
                tracing::warn!(cause, suppressed = n, "{n} similar messages suppressed");
                log();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_count() {
        let l = LogLimiter::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.admit_at(t0), Some(0));
        }
        for _ in 0..99_990 {
            assert_eq!(l.admit_at(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(l.admit_at(t0 + WINDOW), Some(99_990));
        assert_eq!(l.admit_at(t0 + WINDOW), Some(0));
    }
}
