//! Writes audit records off the reply path.
//!
//! A call's outcome is known before its reply leaves; writing its row there (an SQLite
//! commit of ~30 µs, now and then a WAL checkpoint with an fsync) and its log line put
//! ~50 µs of CPU and the odd millisecond on the reply path of every non-read call. So
//! the gate queues the record and one thread writes whatever has queued up, oldest
//! first, in one transaction (a burst of calls costs ~7 µs a row instead of ~30).
//! Records keep call order; [`AuditWriter::flush`] waits until everything queued so
//! far is written (at shut-down, and before anything reads the audit table). A maqetd
//! killed outright loses at most the records of its last few microseconds. The thread
//! sleeps on its queue: an idle maqetd has no wakeups from it.

use std::sync::Arc;
use std::sync::mpsc;

use crate::store::{AuditRow, Store};

/// One audited decision: the row, plus the VM's name for the log line.
pub struct Record {
    pub row: AuditRow,
    pub vm_name: Option<String>,
}

enum Item {
    Record(Box<Record>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

pub struct AuditWriter {
    /// `None` when the thread could not be started: records are written inline.
    queue: Option<mpsc::Sender<Item>>,
    store: Arc<Store>,
}

impl AuditWriter {
    pub fn start(store: Arc<Store>) -> AuditWriter {
        let (tx, rx) = mpsc::channel();
        let writer_store = store.clone();
        let spawned = std::thread::Builder::new()
            .name("maqetd-audit".into())
            .spawn(move || run(&writer_store, &rx));
        let queue = match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "no audit writer thread; auditing inline");
                None
            }
        };
        AuditWriter { queue, store }
    }

    pub fn record(&self, rec: Record) {
        let item = Item::Record(Box::new(rec));
        let item = match &self.queue {
            Some(q) => match q.send(item) {
                Ok(()) => return,
                Err(mpsc::SendError(item)) => item,
            },
            None => item,
        };
        // The writer thread is gone (it panicked): write here rather than lose the record.
        if let Item::Record(rec) = item {
            write(&self.store, vec![*rec]);
        }
    }

    /// Resolves once every record queued before the call is written.
    pub async fn flush(&self) {
        let Some(q) = &self.queue else {
            return;
        };
        let (ack, done) = tokio::sync::oneshot::channel();
        if q.send(Item::Flush(ack)).is_ok() {
            let _ = done.await;
        }
    }
}

fn run(store: &Store, rx: &mpsc::Receiver<Item>) {
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::new();
        let mut acks = Vec::new();
        for item in std::iter::once(first).chain(rx.try_iter()) {
            match item {
                Item::Record(r) => batch.push(*r),
                Item::Flush(ack) => acks.push(ack),
            }
        }
        if !batch.is_empty() {
            write(store, batch);
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

fn write(store: &Store, batch: Vec<Record>) {
    for Record { row, vm_name } in &batch {
        // One structured record per decision, in the journal and in the database.
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
    }
    let rows: Vec<AuditRow> = batch.into_iter().map(|r| r.row).collect();
    if let Err(e) = store.insert_audits(&rows) {
        tracing::error!(error = %e, rows = rows.len(), "cannot write audit rows");
    }
}
