//! The audit record of the call in progress, committed in the same transaction as the
//! call's first state change.
//!
//! The access gate opens a [`CallAudit`] around an audited call's work
//! ([`CallAudit::scope`], a task-local). The first database write the work makes on its
//! own task ([`Store::write`](super::Store::write) or
//! [`Store::write_kept`](super::Store::write_kept): a transition, an added VM, a new
//! config) takes the record along, in the same savepoint, with the outcome
//! [`PENDING`]; when the call ends, the gate fills in the outcome
//! ([`CallAudit::finish`]) and answers only after that is committed. A call that changes
//! nothing in the database gets its whole record then. So no committed change lacks its
//! record, whatever kills maqetd when; a record still `pending` names a call maqetd
//! did not live to answer.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::Mutex;

use super::{AuditRow, Database, StoreError};

/// The outcome of a record written with its call's change, until the call ends.
pub const PENDING: &str = "pending";
const PENDING_MESSAGE: &str = "the change was made; maqetd stopped before it could answer the call";

tokio::task_local! {
    static CALL_AUDIT: Arc<CallAudit>;
}

/// One audited call's record: not yet written, or written under a sequence number.
pub struct CallAudit {
    /// The record, until a write takes it along (put back if that write fails).
    row: Mutex<Option<AuditRow>>,
    /// The row's `seq` once written; 0 while not. Set on the owner thread by the write
    /// that carried it, in that write's own savepoint.
    seq: Arc<AtomicI64>,
}

/// A record a write carries: inserted after the write's own change.
pub(super) struct Carried {
    call: Arc<CallAudit>,
    row: AuditRow,
}

impl Carried {
    /// Runs `change`, then inserts the record, in the caller's savepoint. May run more
    /// than once (a kept write retried): the last run is the one that counts, so a run
    /// that fails leaves no sequence number behind.
    pub(super) fn with<T>(
        &self,
        db: &Database,
        change: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.call.seq.store(0, Ordering::SeqCst);
        let out = change(db)?;
        self.insert(db)?;
        Ok(out)
    }

    fn insert(&self, db: &Database) -> Result<(), StoreError> {
        let seq = db.insert_audit(&self.row)?;
        self.call.seq.store(seq, Ordering::SeqCst);
        Ok(())
    }

    /// The write failed and nothing of it was committed: the next write (or the end of
    /// the call) carries the record instead.
    pub(super) fn put_back(&self) {
        self.call.seq.store(0, Ordering::SeqCst);
        *self.call.row.lock() = Some(self.row.clone());
    }
}

impl CallAudit {
    /// `row` is the call's record as it will read if the call never ends; its outcome
    /// and message are replaced by [`CallAudit::finish`].
    pub fn new(mut row: AuditRow) -> Arc<CallAudit> {
        row.outcome = Some(PENDING.into());
        row.message = Some(PENDING_MESSAGE.into());
        Arc::new(CallAudit {
            row: Mutex::new(Some(row)),
            seq: Arc::new(AtomicI64::new(0)),
        })
    }

    /// Runs `work` with this record attached to its database writes.
    pub async fn scope<F: Future>(self: Arc<Self>, work: F) -> F::Output {
        CALL_AUDIT.scope(self, work).await
    }

    /// The record for a write made now, if the current task runs an audited call whose
    /// record no write has taken yet.
    pub(super) fn carried_by_this_write() -> Option<Carried> {
        CALL_AUDIT
            .try_with(|call| {
                let row = call.row.lock().take()?;
                Some(Carried {
                    call: call.clone(),
                    row,
                })
            })
            .ok()
            .flatten()
    }

    /// The write that completes the record with the call's `outcome` and `message`:
    /// fills in the row written with the change, or (no change carried it, or that
    /// change was finally refused) inserts the whole record. Runs on the owner thread
    /// after the carrying write (kept writes keep their order), so it sees that
    /// write's last run.
    pub fn finish(
        self: &Arc<Self>,
        full: AuditRow,
    ) -> impl Fn(&Database) -> Result<(), StoreError> + Send + 'static {
        let seq = self.seq.clone();
        move |db| {
            let written = seq.load(Ordering::SeqCst);
            if written > 0
                && db.finish_audit(
                    written,
                    full.outcome.as_deref().unwrap_or(""),
                    full.message.as_deref().unwrap_or(""),
                )?
            {
                return Ok(());
            }
            db.insert_audit(&full).map(|_| ())
        }
    }
}
