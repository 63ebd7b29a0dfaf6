//! Rate-limits the audit rows of denials, so a refused caller cannot flood the audit
//! log (and, through its size cap, push the owner's records out of it).
//!
//! Denials are counted per (caller uid, action). A burst's first [`INDIVIDUAL`] denials
//! are recorded one by one; the rest are only counted, and one aggregate row ("uid 1002:
//! 99995 more denials of Start ...") is written when the burst ends: [`QUIET`] without a
//! denial of that kind, or every [`MAX_WINDOW`] while it goes on. The end is a deadline
//! a timer task sleeps on (one per suppressing burst, none while nothing is denied), and
//! whatever is still counted at shut-down is written then.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Action, Caller};

/// Denials recorded one by one at the start of each burst.
pub const INDIVIDUAL: u32 = 5;
/// A burst ends after this long without a denial of its kind.
pub const QUIET: Duration = Duration::from_secs(5);
/// A burst that goes on gets an aggregate row at least this often.
pub const MAX_WINDOW: Duration = Duration::from_secs(60);

type Key = (u32, Action);

/// Denials of one kind that were counted, not recorded: becomes one audit row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    pub caller: Caller,
    pub action: Action,
    /// Count per method.
    pub methods: BTreeMap<&'static str, u64>,
    /// µs since the epoch of the first and last counted denial.
    pub first_us: u64,
    pub last_us: u64,
}

impl Aggregate {
    pub fn count(&self) -> u64 {
        self.methods.values().sum()
    }

    /// `Start` or `Start, Stop`.
    pub fn method_list(&self) -> String {
        self.methods.keys().copied().collect::<Vec<_>>().join(", ")
    }

    pub fn message(&self) -> String {
        format!(
            "uid {}: {} more denials of {} ({}) from {} to {}, counted rather than recorded one by one",
            self.caller.uid,
            self.count(),
            self.method_list(),
            self.action.id(),
            crate::time::format_us(self.first_us),
            crate::time::format_us(self.last_us),
        )
    }
}

/// What to do with one denial.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Write its row.
    Record,
    /// Counted; nothing to do.
    Counted,
    /// Counted, and the burst now needs a timer: call [`Denials::due`] at this instant.
    CountedStartTimer(Instant),
}

/// What [`Denials::due`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Write this row; the timer is done.
    Write(Aggregate),
    /// Nothing yet: sleep until the instant.
    Wait(Instant),
    /// The burst is gone (flushed at shut-down).
    Done,
}

struct Burst {
    recorded: u32,
    /// Start of the current aggregate window.
    window_start: Instant,
    last_seen: Instant,
    counted: Option<Aggregate>,
    timer: bool,
}

impl Burst {
    fn deadline(&self) -> Instant {
        (self.last_seen + QUIET).min(self.window_start + MAX_WINDOW)
    }
}

#[derive(Default)]
pub struct Denials {
    bursts: Mutex<HashMap<Key, Burst>>,
}

impl Denials {
    /// Accounts for one denial of `method` (`action`) to `caller` at `now` (`now_us`).
    pub fn admit(
        &self,
        caller: &Caller,
        action: Action,
        method: &'static str,
        now: Instant,
        now_us: u64,
    ) -> Admit {
        let mut bursts = self.bursts.lock().unwrap_or_else(|p| p.into_inner());
        let key = (caller.uid, action);
        let burst = bursts.entry(key).or_insert_with(|| Burst {
            recorded: 0,
            window_start: now,
            last_seen: now,
            counted: None,
            timer: false,
        });
        // A burst without counted denials ends silently once it has been quiet.
        if burst.counted.is_none() && now >= burst.last_seen + QUIET {
            burst.recorded = 0;
            burst.window_start = now;
        }
        burst.last_seen = now;
        if burst.recorded < INDIVIDUAL {
            burst.recorded += 1;
            return Admit::Record;
        }
        let agg = burst.counted.get_or_insert_with(|| Aggregate {
            caller: caller.clone(),
            action,
            methods: BTreeMap::new(),
            first_us: now_us,
            last_us: now_us,
        });
        *agg.methods.entry(method).or_default() += 1;
        agg.last_us = now_us;
        // The newest caller details (pid, bus name) describe the row.
        agg.caller = caller.clone();
        if burst.timer {
            Admit::Counted
        } else {
            burst.timer = true;
            Admit::CountedStartTimer(burst.deadline())
        }
    }

    /// The timer of the burst of (`uid`, `action`) fired at `now`.
    pub fn due(&self, uid: u32, action: Action, now: Instant) -> Due {
        let mut bursts = self.bursts.lock().unwrap_or_else(|p| p.into_inner());
        let key = (uid, action);
        let Some(burst) = bursts.get_mut(&key) else {
            return Due::Done;
        };
        if burst.counted.is_none() {
            burst.timer = false;
            return Due::Done;
        }
        if now < burst.deadline() {
            return Due::Wait(burst.deadline());
        }
        if now >= burst.last_seen + QUIET {
            // The burst is over: the next denial starts a new one, recorded again.
            let agg = bursts.remove(&key).and_then(|b| b.counted);
            return agg.map(Due::Write).unwrap_or(Due::Done);
        }
        // Still going after MAX_WINDOW: write what was counted and keep counting; the
        // next counted denial starts the timer again.
        burst.window_start = now;
        burst.timer = false;
        burst.counted.take().map(Due::Write).unwrap_or(Due::Done)
    }

    /// Everything counted and not yet written (at shut-down).
    pub fn drain(&self) -> Vec<Aggregate> {
        let mut bursts = self.bursts.lock().unwrap_or_else(|p| p.into_inner());
        bursts
            .values_mut()
            .filter_map(|b| {
                b.timer = false;
                b.counted.take()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32) -> Caller {
        Caller {
            unique_name: format!(":1.{uid}"),
            uid,
            pid: Some(7),
        }
    }

    #[test]
    fn a_flood_is_a_few_rows_and_one_count() {
        let d = Denials::default();
        let t0 = Instant::now();
        let stranger = caller(1002);
        let mut recorded = 0;
        let mut timers = Vec::new();
        for i in 0..100_000u64 {
            let now = t0 + Duration::from_micros(i * 100);
            match d.admit(&stranger, Action::Lifecycle, "Start", now, i) {
                Admit::Record => recorded += 1,
                Admit::Counted => {}
                Admit::CountedStartTimer(at) => timers.push(at),
            }
        }
        assert_eq!(recorded, INDIVIDUAL);
        assert_eq!(timers.len(), 1, "one timer per burst");
        // 10 s of calls: the timer first finds the burst still going.
        let last = t0 + Duration::from_micros(99_999 * 100);
        assert_eq!(
            d.due(1002, Action::Lifecycle, timers[0]),
            Due::Wait(last + QUIET)
        );
        match d.due(1002, Action::Lifecycle, last + QUIET) {
            Due::Write(agg) => {
                assert_eq!(agg.count(), 100_000 - u64::from(INDIVIDUAL));
                let msg = agg.message();
                assert!(
                    msg.starts_with(
                        "uid 1002: 99995 more denials of Start (org.maqet.vm.lifecycle)"
                    ),
                    "{msg}"
                );
            }
            other => panic!("{other:?}"),
        }
        // After the quiet end, the next denial is recorded again.
        let later = last + QUIET + Duration::from_secs(1);
        assert_eq!(
            d.admit(&stranger, Action::Lifecycle, "Start", later, 0),
            Admit::Record
        );
    }

    #[test]
    fn kinds_and_users_are_counted_apart_and_drained_at_exit() {
        let d = Denials::default();
        let t0 = Instant::now();
        for uid in [1002, 1003] {
            for _ in 0..INDIVIDUAL + 3 {
                d.admit(&caller(uid), Action::Lifecycle, "Stop", t0, 1);
            }
        }
        for _ in 0..INDIVIDUAL {
            assert_eq!(
                d.admit(&caller(1002), Action::Manage, "AddVM", t0, 1),
                Admit::Record
            );
        }
        let mut drained: Vec<(u32, u64)> = d
            .drain()
            .iter()
            .map(|a| (a.caller.uid, a.count()))
            .collect();
        drained.sort();
        assert_eq!(drained, [(1002, 3), (1003, 3)]);
        assert!(d.drain().is_empty());
        assert_eq!(d.due(1002, Action::Lifecycle, t0 + QUIET), Due::Done);
    }

    #[test]
    fn an_endless_flood_gets_a_row_per_window() {
        let d = Denials::default();
        let t0 = Instant::now();
        let c = caller(1002);
        let mut timer = None;
        let mut rows = 0;
        let mut counted = 0;
        // One denial a second for five minutes.
        for s in 0..300u64 {
            let now = t0 + Duration::from_secs(s);
            if let Some(at) = timer.filter(|at| *at <= now) {
                timer = None;
                match d.due(1002, Action::Console, at) {
                    Due::Write(a) => {
                        rows += 1;
                        counted += a.count();
                    }
                    Due::Wait(next) => timer = Some(next),
                    Due::Done => {}
                }
            }
            match d.admit(&c, Action::Console, "SendKeys", now, s) {
                Admit::Record => rows += 1,
                Admit::Counted => {}
                Admit::CountedStartTimer(at) => timer = Some(at),
            }
        }
        counted += d.drain().iter().map(Aggregate::count).sum::<u64>();
        assert_eq!(counted + u64::from(INDIVIDUAL), 300);
        assert!(rows <= INDIVIDUAL as usize + 6, "{rows} rows");
    }
}
