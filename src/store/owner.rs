//! The database's one owner: a dedicated thread that holds the [`Database`] and runs
//! every request, behind an async handle ([`Store`]).
//!
//! Why a thread: SQLite calls block (a commit's fsync, up to the busy timeout while
//! another process holds a lock). On the two tokio workers they stalled unrelated
//! calls; here they stall only other database requests, never a QMP call, a property
//! read or `ListVMs` (memory answers those).
//!
//! Group commit: the owner takes every request queued meanwhile and writes them in one
//! transaction (`BEGIN IMMEDIATE`, a `SAVEPOINT` per request so a failing request
//! rolls back alone, `COMMIT`). A request is answered after the commit. When the
//! transaction itself cannot be had or committed (locked by another process, disk
//! full, file deleted and not recreatable), every request of the batch fails with
//! that cause.
//!
//! Kept writes are records of what already happened (a QEMU that exited, an audit
//! record of an answered call): if they cannot be written now, they stay queued, in
//! order, and are retried with a backoff until the database takes them. More than
//! [`MAX_KEPT`] waiting are dropped and counted; the count is written as one audit row
//! ("N records lost") once writing works again. Lazy kept writes (denials) wait up to
//! [`LAZY_DELAY`] to share a commit. Both deadlines exist only while something waits:
//! an idle owner sleeps on its queue with no timer.
//!
//! Before each write batch the owner checks that the path still names the file it
//! has open; a deleted database is written anew from the open one (every VM, history
//! and audit row) and the recreation is logged and audited.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

#[cfg(test)]
mod tests;

use super::call_audit::CallAudit;
use super::{AuditDecision, AuditRow, Database, StoreError, StoreOptions, now_us};

/// Most kept writes waiting for the database; more are counted as lost.
pub const MAX_KEPT: usize = 100_000;
/// Longest a lazy write (a denial's audit row) waits for company before it is written.
pub const LAZY_DELAY: Duration = Duration::from_secs(1);
/// Backoff between attempts to write kept records the database refused.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A request answered after the batch it ran in is committed (or not).
trait Request: Send {
    /// Runs inside the request's own savepoint (or alone, for a read); `true` keeps
    /// its changes.
    fn run(&mut self, db: &Database) -> bool;
    /// Answers the caller with the request's result, or the batch's failure.
    fn finish(self: Box<Self>, batch: Result<(), &StoreError>);
}

struct Call<T, F> {
    f: Option<F>,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Request for Call<T, F>
where
    T: Send,
    F: FnOnce(&Database) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, db: &Database) -> bool {
        let f = self.f.take().expect("a request runs once");
        let out = std::panic::catch_unwind(AssertUnwindSafe(|| f(db))).unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "a database request panicked (a bug in maqetd); nothing of it was written".into(),
            ))
        });
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn finish(self: Box<Self>, batch: Result<(), &StoreError>) {
        let out = match (batch, self.out) {
            (_, Some(Err(own))) => Err(own),
            (Err(e), _) => Err(e.duplicate()),
            (Ok(()), Some(ok)) => ok,
            (Ok(()), None) => Err(StoreError::Unavailable("request was not run".into())),
        };
        let _ = self.reply.send(out);
    }
}

type Apply = Box<dyn Fn(&Database) -> Result<(), StoreError> + Send>;

/// A record of something that already happened: written now or later, never dropped
/// silently.
struct Kept {
    what: &'static str,
    apply: Apply,
    /// Told the outcome of the first attempt (the record stays queued on failure).
    ack: Option<oneshot::Sender<Result<(), StoreError>>>,
}

enum Msg {
    Read(Box<dyn Request>),
    Write(Box<dyn Request>),
    Keep {
        kept: Kept,
        lazy: bool,
    },
    /// Answered once everything queued before it had its write attempt.
    Flush(oneshot::Sender<()>),
    Health(oneshot::Sender<Health>),
}

/// What the owner knows about the database, for `maqet doctor`.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// The file at the path is not the one open (deleted, or replaced: see `problem`).
    pub unlinked: bool,
    /// Records waiting for the database to accept writes.
    pub waiting: usize,
    /// Records dropped since the last "records lost" row was written.
    pub lost: u64,
    /// Times the file was recreated since maqetd started.
    pub recreated: u32,
    /// The last write failure, if writes fail now.
    pub problem: Option<String>,
}

/// maqetd's handle on its database: cheap to share (`Arc`), `Send + Sync`, async.
pub struct Store {
    path: PathBuf,
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (see [`Database::open`]) and hands the database to its owner thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with_options(path, &StoreOptions::default())
    }

    pub fn open_with_options(path: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        Store::start(Database::open_with_options(path, options)?)
    }

    /// A fresh database in memory, for a service that must answer calls while its real
    /// database is refused, and for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Store::start(Database::open_in_memory()?)
    }

    /// Starts the owner thread on an open database.
    pub fn start(db: Database) -> Result<Store, StoreError> {
        let path = db.path.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("maqetd-db".into())
            .spawn(move || Owner::new(db).run(&rx))
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Store { path, tx })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn ask<T: Send + 'static>(
        &self,
        wrap: impl FnOnce(Box<dyn Request>) -> Msg,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let call = Box::new(Call {
            f: Some(f),
            out: None,
            reply,
        });
        if self.tx.send(wrap(call)).is_err() {
            return Err(owner_gone());
        }
        answer.await.unwrap_or_else(|_| Err(owner_gone()))
    }

    /// Runs a read on the owner thread, outside any write transaction.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.ask(Msg::Read, f).await
    }

    /// Runs a write in the next group commit; answers once it is committed. A write
    /// that cannot be committed fails with the cause, and nothing of it is kept.
    ///
    /// The first write of an audited call carries the call's audit record
    /// (`call_audit.rs`): both commit together or neither does.
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Some(carried) = CallAudit::carried_by_this_write() else {
            return self.ask(Msg::Write, f).await;
        };
        let carried = std::sync::Arc::new(carried);
        let with = carried.clone();
        let out = self.ask(Msg::Write, move |db| with.with(db, f)).await;
        if out.is_err() {
            carried.put_back();
        }
        out
    }

    /// Writes a record of something that already happened in the next group commit
    /// and returns the outcome of that attempt; on a failure of the place (locked,
    /// full, deleted) the record stays queued and is written when the database takes
    /// writes again. `apply` may therefore run more than once, but commits once.
    pub async fn write_kept(
        &self,
        what: &'static str,
        apply: impl Fn(&Database) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), StoreError> {
        let (ack, answer) = oneshot::channel();
        // The call's audit record goes with it (and stays with it while it waits).
        let apply: Apply = match CallAudit::carried_by_this_write() {
            Some(carried) => Box::new(move |db| carried.with(db, &apply)),
            None => Box::new(apply),
        };
        let kept = Kept {
            what,
            apply,
            ack: Some(ack),
        };
        if self.tx.send(Msg::Keep { kept, lazy: false }).is_err() {
            return Err(owner_gone());
        }
        answer.await.unwrap_or_else(|_| Err(owner_gone()))
    }

    /// Like [`Store::write_kept`] without waiting: written within [`LAZY_DELAY`],
    /// together with whatever else comes meanwhile.
    pub fn write_lazy(
        &self,
        what: &'static str,
        apply: impl Fn(&Database) -> Result<(), StoreError> + Send + 'static,
    ) {
        let kept = Kept {
            what,
            apply: Box::new(apply),
            ack: None,
        };
        if self.tx.send(Msg::Keep { kept, lazy: true }).is_err() {
            tracing::error!(what, "database owner stopped; a record was lost");
        }
    }

    /// Appends a history event (kept: written later if the database refuses it now).
    pub async fn record_event(
        &self,
        vm_id: &str,
        vm_name: &str,
        kind: &'static str,
        reason: String,
        detail: Option<serde_json::Value>,
    ) -> Result<(), StoreError> {
        let (id, name) = (vm_id.to_string(), vm_name.to_string());
        self.write_kept("history event", move |db| {
            db.add_event(&id, &name, kind, &reason, detail.as_ref())
                .map(|_| ())
        })
        .await
    }

    /// Resolves once everything queued before the call had its write attempt.
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.await;
        }
    }

    /// The owner's view of the database; checks that the file is still linked (and
    /// recreates it when it is not).
    pub async fn health(&self) -> Health {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Health(ack)).is_err() {
            return Health {
                problem: Some(owner_gone().to_string()),
                ..Health::default()
            };
        }
        done.await.unwrap_or_default()
    }
}

fn owner_gone() -> StoreError {
    StoreError::Unavailable(
        "maqetd's database thread has stopped (a bug; see the log): nothing was written; \
         restart maqetd"
            .into(),
    )
}

struct Owner {
    db: Database,
    /// Kept writes not yet committed, oldest first.
    kept: VecDeque<Kept>,
    /// When the oldest lazy write arrived (it is due [`LAZY_DELAY`] later).
    lazy_since: Option<Instant>,
    /// When to try the kept writes again after a failure.
    retry_at: Option<Instant>,
    retry_delay: Duration,
    lost: u64,
    recreated: u32,
    problem: Option<String>,
}

impl Owner {
    fn new(db: Database) -> Owner {
        Owner {
            db,
            kept: VecDeque::new(),
            lazy_since: None,
            retry_at: None,
            retry_delay: RETRY_FIRST,
            lost: 0,
            recreated: 0,
            problem: None,
        }
    }

    /// When the owner must wake without a request: only while records wait.
    fn deadline(&self) -> Option<Instant> {
        if self.kept.is_empty() {
            return None;
        }
        let lazy = self.lazy_since.map(|t| t + LAZY_DELAY);
        match (lazy, self.retry_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    fn run(mut self, rx: &mpsc::Receiver<Msg>) {
        loop {
            // Sleep on the queue; a deadline exists only while records wait.
            let first = match self.deadline() {
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                },
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut reads = Vec::new();
            let mut writes = Vec::new();
            let mut flushes = Vec::new();
            let mut healths = Vec::new();
            let mut urgent = false;
            // An explicit flush tries the kept records now, backoff or not.
            let mut forced = false;
            for msg in first.into_iter().chain(rx.try_iter()) {
                match msg {
                    Msg::Read(r) => reads.push(r),
                    Msg::Write(w) => {
                        writes.push(w);
                        urgent = true;
                    }
                    Msg::Keep { kept, lazy } => {
                        if lazy {
                            self.lazy_since.get_or_insert_with(Instant::now);
                        } else {
                            urgent = true;
                        }
                        self.keep(kept);
                    }
                    Msg::Flush(ack) => {
                        flushes.push(ack);
                        forced = true;
                    }
                    Msg::Health(ack) => {
                        healths.push(ack);
                        urgent = true;
                    }
                }
            }
            let now = Instant::now();
            let lazy_due = self
                .lazy_since
                .is_some_and(|t| now >= t + LAZY_DELAY && self.retry_at.is_none());
            let retry_due = self.retry_at.is_some_and(|t| now >= t);
            // A refused batch is not retried before its backoff, even by new writes,
            // so a long lock costs one busy timeout per backoff step, not per call.
            let blocked = !self.kept.is_empty() && self.retry_at.is_some_and(|t| now < t);
            if !writes.is_empty()
                || (!self.kept.is_empty() && (urgent || forced || lazy_due || retry_due))
            {
                if blocked && writes.is_empty() && !retry_due && !forced {
                    // Only kept records: they wait for the backoff, and whoever waits
                    // for one hears now why it is not written yet.
                    let why = self.problem.clone().unwrap_or_default();
                    for k in self.kept.iter_mut() {
                        if let Some(ack) = k.ack.take() {
                            let _ = ack.send(Err(StoreError::Unavailable(why.clone())));
                        }
                    }
                } else {
                    self.batch(writes);
                }
            }
            for mut r in reads {
                r.run(&self.db);
                r.finish(Ok(()));
            }
            for ack in healths {
                let _ = ack.send(self.health());
            }
            for ack in flushes {
                let _ = ack.send(());
            }
        }
        // The service is going away: one last attempt for what waits.
        if !self.kept.is_empty() {
            self.batch(Vec::new());
        }
        if !self.kept.is_empty() || self.lost > 0 {
            tracing::error!(
                waiting = self.kept.len(),
                lost = self.lost,
                "maqetd stops with records its database would not take; they are lost"
            );
        }
    }

    fn keep(&mut self, mut kept: Kept) {
        if self.kept.len() >= MAX_KEPT {
            self.lost += 1;
            if let Some(ack) = kept.ack.take() {
                let _ = ack.send(Err(StoreError::Unavailable(format!(
                    "{MAX_KEPT} records already wait for the database; this one is lost"
                ))));
            }
            return;
        }
        self.kept.push_back(kept);
    }

    fn health(&mut self) -> Health {
        let mut unlinked = false;
        match self.ensure_file() {
            Ok(()) => {}
            Err(e) => {
                unlinked = true;
                self.problem = Some(e.to_string());
            }
        }
        Health {
            unlinked,
            waiting: self.kept.len(),
            lost: self.lost,
            recreated: self.recreated,
            problem: self.problem.clone(),
        }
    }

    /// Makes sure writes land in the file at the path: recreates a deleted one.
    fn ensure_file(&mut self) -> Result<(), StoreError> {
        if self.db.file_is_linked()? {
            return Ok(());
        }
        let path = self.db.path.display().to_string();
        tracing::error!(
            path,
            "the database file was deleted while maqetd runs; writing it anew from the open one"
        );
        self.db.recreate()?;
        self.recreated += 1;
        tracing::warn!(
            path,
            "database recreated: every VM, history and audit record maqetd had is in it"
        );
        let row = service_row(
            "RecreateDatabase",
            "recreated",
            format!("{path} was deleted while maqetd ran; recreated from the open database"),
        );
        self.db.insert_audit(&row)?;
        Ok(())
    }

    /// One group commit: kept records first (they happened first), then the new writes.
    fn batch(&mut self, writes: Vec<Box<dyn Request>>) {
        let mut writes = writes;
        let kept_n = self.kept.len();
        let outcome = self.try_batch(&mut writes);
        match &outcome {
            Ok(results) => {
                // Per-record results: failures of the place stay queued, others are
                // the record's own fault (its VM is gone...) and are dropped with a log.
                let mut still = VecDeque::new();
                for (mut k, res) in self.kept.drain(..kept_n).zip(results.iter()) {
                    match res {
                        Ok(()) => {
                            if let Some(ack) = k.ack.take() {
                                let _ = ack.send(Ok(()));
                            }
                        }
                        // Alone in its savepoint, only a failure of the place is worth
                        // another try; anything else (a bug, a panic) would fail forever.
                        Err(e)
                            if e.is_transient()
                                && !matches!(
                                    e,
                                    StoreError::Sqlite(_) | StoreError::Unavailable(_)
                                ) =>
                        {
                            if let Some(ack) = k.ack.take() {
                                let _ = ack.send(Err(e.duplicate()));
                            }
                            still.push_back(k);
                        }
                        Err(e) => {
                            tracing::error!(what = k.what, error = %e, "record refused by the database; dropped");
                            if let Some(ack) = k.ack.take() {
                                let _ = ack.send(Err(e.duplicate()));
                            }
                        }
                    }
                }
                // Records kept during this batch (none: single thread) keep their order.
                still.extend(self.kept.drain(..));
                self.kept = still;
                for w in writes {
                    w.finish(Ok(()));
                }
                if self.kept.is_empty() {
                    self.problem = None;
                    self.retry_at = None;
                    self.retry_delay = RETRY_FIRST;
                    self.lazy_since = None;
                    self.write_lost_count();
                } else {
                    self.schedule_retry();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, waiting = self.kept.len(), "database write batch failed");
                self.problem = Some(e.to_string());
                for k in self.kept.iter_mut() {
                    if let Some(ack) = k.ack.take() {
                        let _ = ack.send(Err(e.duplicate()));
                    }
                }
                for w in writes {
                    w.finish(Err(e));
                }
                self.schedule_retry();
            }
        }
    }

    fn schedule_retry(&mut self) {
        if self.kept.is_empty() {
            // A failed batch of requests only: their callers were told; nothing to retry.
            self.retry_at = None;
            self.retry_delay = RETRY_FIRST;
            self.lazy_since = None;
            return;
        }
        self.retry_at = Some(Instant::now() + self.retry_delay);
        self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
        self.lazy_since = None;
    }

    /// Runs the batch; `Ok` holds the kept records' own results (the new writes
    /// carry theirs), `Err` the failure of the whole transaction.
    fn try_batch(
        &mut self,
        writes: &mut [Box<dyn Request>],
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.ensure_file()?;
        self.db.execute_batch("BEGIN IMMEDIATE")?;
        let res = self.run_batch(writes);
        if res.is_err() && !self.db.is_autocommit() {
            let _ = self.db.execute_batch("ROLLBACK");
        }
        res
    }

    fn run_batch(
        &mut self,
        writes: &mut [Box<dyn Request>],
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let mut results = Vec::with_capacity(self.kept.len());
        let aborted = |db: &Database| {
            db.is_autocommit().then(|| {
                StoreError::Unavailable(format!(
                    "database {}: SQLite rolled the whole transaction back (see the log); \
                     nothing of this batch was written",
                    db.path.display()
                ))
            })
        };
        for k in &self.kept {
            let res = in_savepoint(&self.db, |db| {
                std::panic::catch_unwind(AssertUnwindSafe(|| (k.apply)(db))).unwrap_or_else(|_| {
                    Err(StoreError::InvalidArgument(
                        "the record's write panicked".into(),
                    ))
                })
            });
            if let Some(e) = aborted(&self.db) {
                return Err(first_cause(res.err(), e));
            }
            results.push(res);
        }
        for w in writes.iter_mut() {
            let res = in_savepoint(&self.db, |db| {
                if w.run(db) {
                    Ok(())
                } else {
                    Err(StoreError::Unavailable(String::new()))
                }
            });
            if let Some(e) = aborted(&self.db) {
                return Err(first_cause(res.err(), e));
            }
        }
        self.db.execute_batch("COMMIT")?;
        Ok(results)
    }

    /// Records dropped while the database refused writes become one audit row.
    fn write_lost_count(&mut self) {
        if self.lost == 0 {
            return;
        }
        let row = service_row(
            "RecordsLost",
            "lost",
            format!(
                "{} audit/history records lost: the database refused writes (locked, full \
                 or deleted) while more than {MAX_KEPT} records waited",
                self.lost
            ),
        );
        match self.db.insert_audit(&row) {
            Ok(_) => {
                tracing::error!(
                    lost = self.lost,
                    "records lost while the database refused writes"
                );
                self.lost = 0;
            }
            Err(e) => tracing::warn!(error = %e, "cannot record the count of lost records yet"),
        }
    }
}

/// `f` in a savepoint of its own: its changes stay if it succeeds, vanish if not.
fn in_savepoint(
    db: &Database,
    f: impl FnOnce(&Database) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    db.execute_batch("SAVEPOINT request")?;
    let res = f(db);
    let end = if res.is_ok() {
        "RELEASE request"
    } else {
        "ROLLBACK TO request; RELEASE request"
    };
    // The outer transaction may be gone (SQLite rolled it back): the caller checks.
    if !db.is_autocommit() {
        db.execute_batch(end)?;
    }
    res
}

/// A classified SQLite failure names the cause better than "rolled back".
fn first_cause(own: Option<StoreError>, fallback: StoreError) -> StoreError {
    match own {
        Some(e) if e.is_transient() && !matches!(e, StoreError::Unavailable(_)) => e,
        _ => fallback,
    }
}

/// An audit row maqetd writes about itself (no caller).
fn service_row(method: &str, outcome: &str, message: String) -> AuditRow {
    AuditRow {
        seq: 0,
        time: now_us(),
        caller_uid: None,
        caller_pid: None,
        caller_name: None,
        action: "org.maqet.service".into(),
        vm_id: None,
        method: Some(method.into()),
        arguments: None,
        decision: AuditDecision::Allow,
        outcome: Some(outcome.into()),
        message: Some(message),
    }
}
