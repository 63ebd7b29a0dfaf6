//! The choke point every D-Bus method passes through: identify the caller, name the
//! action, decide, audit, then act.
//!
//! Interfaces hold no access logic of their own: they describe the call as a
//! [`Request`] and hand the work to [`Gate::call`]. The caller's identity comes from
//! the bus (`GetConnectionCredentials` on the message's sender), never from an argument.

mod action;
mod audit;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use zbus::Connection;
use zbus::fdo::DBusProxy;
use zbus::message::Header;

pub use action::Action;

use crate::error::MaqetError;
use crate::store::{AuditDecision, AuditRow, Store};
use crate::time::now_us;
use audit::{AuditWriter, Record};

/// Who is calling, as the bus vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The sender's unique bus name (`:1.42`).
    pub unique_name: String,
    pub uid: u32,
    pub pid: Option<u32>,
}

/// One call, described for the decision and the audit log.
#[derive(Debug, Clone)]
pub struct Request {
    pub action: Action,
    /// The D-Bus method name (`Start`, `AddVM`, …).
    pub method: &'static str,
    /// The VM the call is about: (id, name).
    pub vm: Option<(String, String)>,
    /// A summary of the arguments, without secrets (never typed text or key strokes).
    pub args: String,
}

impl Request {
    pub fn new(action: Action, method: &'static str) -> Request {
        Request {
            action,
            method,
            vm: None,
            args: String::new(),
        }
    }

    pub fn on_vm(mut self, vm: &crate::vm::Vm) -> Request {
        self.vm = Some((vm.id().to_string(), vm.name()));
        self
    }

    pub fn with_args(mut self, args: impl Into<String>) -> Request {
        self.args = args.into();
        self
    }
}

/// Told about every call, so the service can tell when it has been idle.
pub trait ActivityObserver: Send + Sync {
    fn call_started(&self);
    fn call_ended(&self);
}

/// Reports a call's end to the observer however the call leaves (including a client
/// that disconnects and drops the call's future).
struct CallGuard<'a>(Option<&'a Arc<dyn ActivityObserver>>);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if let Some(a) = self.0 {
            a.call_ended();
        }
    }
}

pub struct Gate {
    own_uid: u32,
    /// Writes audit records off the reply path (see `audit.rs`).
    auditor: AuditWriter,
    callers: Mutex<HashMap<String, Caller>>,
    activity: Option<Arc<dyn ActivityObserver>>,
    /// Set when the service cannot work at all (its database was refused): every call
    /// gets this answer instead of acting.
    refusal: Option<String>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("own_uid", &self.own_uid)
            .finish()
    }
}

impl Gate {
    pub fn new(
        store: Arc<Store>,
        activity: Option<Arc<dyn ActivityObserver>>,
        refusal: Option<String>,
    ) -> Arc<Gate> {
        Arc::new(Gate {
            own_uid: rustix::process::getuid().as_raw(),
            auditor: AuditWriter::start(store),
            callers: Mutex::new(HashMap::new()),
            activity,
            refusal,
        })
    }

    /// Why the service answers every call with an error, if it does.
    pub fn refusal(&self) -> Option<MaqetError> {
        self.refusal.clone().map(MaqetError::Storage)
    }

    /// Starts forgetting callers that leave the bus. (A unique name is never reused on
    /// a bus, so an entry cached before this runs is stale at worst, never wrong.)
    pub fn watch_departures(self: &Arc<Self>, conn: &Connection) {
        let gate = self.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            let Ok(dbus) = DBusProxy::new(&conn).await else {
                return;
            };
            // arg2 == "" : a name lost its owner, i.e. a client disconnected.
            let Ok(mut changes) = dbus.receive_name_owner_changed_with_args(&[(2, "")]).await
            else {
                return;
            };
            while let Some(change) = changes.next().await {
                if let Ok(args) = change.args() {
                    gate.callers.lock().unwrap().remove(args.name().as_str());
                }
            }
        });
    }

    /// The caller of a method call, from the bus's credentials of its sender (cached per
    /// unique name until the name leaves the bus).
    pub async fn identify(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
    ) -> Result<Caller, MaqetError> {
        let Some(sender) = hdr.sender() else {
            // Peer-to-peer connection: the peer is whoever is on the socket.
            let creds = conn
                .peer_creds()
                .await
                .map_err(|e| MaqetError::AccessDenied(format!("cannot identify the peer: {e}")))?;
            return Ok(Caller {
                unique_name: String::new(),
                uid: creds
                    .unix_user_id()
                    .ok_or_else(|| MaqetError::AccessDenied("the peer's uid is unknown".into()))?,
                pid: creds.process_id(),
            });
        };
        let name = sender.as_str().to_string();
        if let Some(c) = self.callers.lock().unwrap().get(&name) {
            return Ok(c.clone());
        }
        let dbus = DBusProxy::new(conn).await?;
        let creds = dbus
            .get_connection_credentials(sender.to_owned().into())
            .await
            .map_err(|e| {
                MaqetError::AccessDenied(format!("the bus cannot identify caller {name}: {e}"))
            })?;
        let caller = Caller {
            unique_name: name.clone(),
            uid: creds.unix_user_id().ok_or_else(|| {
                MaqetError::AccessDenied(format!("the bus does not know the uid of caller {name}"))
            })?,
            pid: creds.process_id(),
        };
        self.callers.lock().unwrap().insert(name, caller.clone());
        Ok(caller)
    }

    /// Decides whether `caller` may do `req`.
    pub fn decide(&self, caller: &Caller, req: &Request) -> Result<(), String> {
        if caller.uid != self.own_uid {
            return Err(format!(
                "{} ({}) is refused: this maqetd serves uid {} and the caller is uid {}",
                req.method,
                req.action.id(),
                self.own_uid,
                caller.uid
            ));
        }
        Ok(())
    }

    /// Identifies, decides, runs `work` when allowed, and audits. The single path every
    /// D-Bus method goes through.
    pub async fn call<T, F>(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        req: Request,
        work: F,
    ) -> Result<T, MaqetError>
    where
        F: Future<Output = Result<T, MaqetError>>,
    {
        if let Some(a) = &self.activity {
            a.call_started();
        }
        let _guard = CallGuard(self.activity.as_ref());
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        let caller = self.identify(conn, hdr).await?;
        if let Err(why) = self.decide(&caller, &req) {
            self.audit(&caller, &req, AuditDecision::Deny, "AccessDenied", &why);
            return Err(MaqetError::AccessDenied(why));
        }
        let result = work.await;
        if req.action.is_mutating() {
            let (outcome, message) = match &result {
                Ok(_) => ("ok", String::new()),
                Err(e) => (e.kind(), e.message()),
            };
            self.audit(&caller, &req, AuditDecision::Allow, outcome, &message);
        }
        result
    }

    fn audit(
        &self,
        caller: &Caller,
        req: &Request,
        decision: AuditDecision,
        outcome: &str,
        message: &str,
    ) {
        let row = AuditRow {
            seq: 0,
            time: now_us(),
            caller_uid: Some(caller.uid),
            caller_pid: caller.pid,
            caller_name: Some(caller.unique_name.clone()),
            action: req.action.id().to_string(),
            vm_id: req.vm.as_ref().map(|v| v.0.clone()),
            method: Some(req.method.to_string()),
            arguments: Some(req.args.clone()),
            decision,
            outcome: Some(outcome.to_string()),
            message: Some(message.to_string()),
        };
        self.auditor.record(Record {
            row,
            vm_name: req.vm.as_ref().map(|v| v.1.clone()),
        });
    }

    /// Waits until every audit record of the calls answered so far is written.
    pub async fn flush_audit(&self) {
        self.auditor.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn audit_records_are_written_in_call_order_by_flush() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let gate = Gate::new(store.clone(), None, None);
        let caller = Caller {
            unique_name: ":1.7".into(),
            uid: 1000,
            pid: Some(42),
        };
        for (i, method) in ["Start", "Stop", "AddVM"].into_iter().enumerate() {
            let req = Request::new(Action::Lifecycle, method).with_args(format!("n={i}"));
            let decision = if i == 1 {
                AuditDecision::Deny
            } else {
                AuditDecision::Allow
            };
            gate.audit(&caller, &req, decision, "ok", "");
        }
        gate.flush_audit().await;
        let rows = store.audit(None, None, 0).unwrap();
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.method.as_deref().unwrap(), r.decision))
            .collect();
        assert_eq!(
            got,
            [
                ("Start", AuditDecision::Allow),
                ("Stop", AuditDecision::Deny),
                ("AddVM", AuditDecision::Allow)
            ]
        );
        assert_eq!(rows[0].caller_name.as_deref(), Some(":1.7"));
        assert_eq!(rows[2].arguments.as_deref(), Some("n=2"));
    }
}
