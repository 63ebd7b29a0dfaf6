//! Writes audit records through the database owner.
//!
//! A change (an allowed, audited call) is answered only after its record is committed.
//! The record goes in with the call's first state change (`store::call_audit`), and
//! [`AuditWriter::record_durably`] completes it with the outcome (or, for a call that
//! changed nothing, inserts it) and waits for the owner's group commit, which batches it
//! with whatever else is queued (a burst of calls shares one commit). Denials are
//! written lazily ([`AuditWriter::record`]): within [`LAZY_DELAY`](crate::store::LAZY_DELAY) of the first one,
//! in one commit, so a flood of refused calls costs no commit each. Either way a record
//! the database refuses (locked, full) stays queued in the owner and is written when it
//! can be, in call order. What SIGKILL can lose is in docs/security.md.

use std::sync::Arc;

use crate::store::call_audit::CallAudit;
use crate::store::{AuditRow, Store};

/// One audited decision: the row, plus the VM's name for the log line.
pub struct Record {
    pub row: AuditRow,
    pub vm_name: Option<String>,
}

pub struct AuditWriter {
    store: Arc<Store>,
}

impl AuditWriter {
    pub fn start(store: Arc<Store>) -> AuditWriter {
        AuditWriter { store }
    }

    /// Queues a record to be written within [`LAZY_DELAY`](crate::store::LAZY_DELAY) (denials).
    pub fn record(&self, rec: Record) {
        let row = log(rec);
        self.store
            .write_lazy("audit record", move |db| db.insert_audit(&row).map(|_| ()));
    }

    /// Writes a record and returns once it is committed, or once the database refused
    /// it (it then stays queued: the call is not held up by a locked or full disk).
    /// `with_change`: the call's record as its state change carried it, to complete
    /// rather than insert anew.
    pub async fn record_durably(&self, rec: Record, with_change: Option<&Arc<CallAudit>>) {
        let row = log(rec);
        let written = match with_change {
            Some(call) => {
                self.store
                    .write_kept("audit record", call.finish(row))
                    .await
            }
            None => {
                self.store
                    .write_kept("audit record", move |db| db.insert_audit(&row).map(|_| ()))
                    .await
            }
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "audit record not written yet; kept until the database takes it");
        }
    }

    /// Resolves once every record queued before the call had its write attempt.
    pub async fn flush(&self) {
        self.store.flush().await;
    }
}

/// One structured line per decision, in the journal; returns the row for the database.
fn log(Record { row, vm_name }: Record) -> AuditRow {
    tracing::info!(
        caller_uid = row.caller_uid,
        caller_pid = row.caller_pid,
        caller = row.caller_name.as_deref().unwrap_or(""),
        action = %row.action,
        method = row.method.as_deref().unwrap_or(""),
        vm = vm_name.as_deref(),
        decision = row.decision.as_str(),
        outcome = row.outcome.as_deref().unwrap_or(""),
        "audit"
    );
    row
}
