//! The choke point every D-Bus method passes through: identify the caller, name the
//! action, decide, audit, then act.
//!
//! Interfaces hold no access logic of their own: they describe the call as a
//! [`Request`] and hand the work to [`Gate::call`]. The caller's identity comes from
//! the bus (`GetConnectionCredentials` on the message's sender), never from an argument.

mod action;
mod audit;
mod origin;
pub mod policy;
mod polkit;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use zbus::Connection;
use zbus::fdo::DBusProxy;
use zbus::message::Header;

pub use action::Action;
pub use origin::Origin;
use policy::{Policy, Verdict};
use polkit::Polkit;

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
    /// Still served while the service refuses everything else (diagnostics).
    pub works_degraded: bool,
    /// Audited when allowed. False for reads, whatever their action (a QMP query is a
    /// `QmpExecute` call that changes nothing).
    pub audited: bool,
    /// A safety interlock the caller did not release (a dangerous QMP command without
    /// `allow_dangerous`): denied before the policy is asked, so nobody is prompted for
    /// a call that cannot run.
    pub interlock: Option<String>,
    /// Where the call came from, if not a plain method call (see [`Origin`]).
    pub origin: Option<Origin>,
}

impl Request {
    pub fn new(action: Action, method: &'static str) -> Request {
        Request {
            action,
            method,
            vm: None,
            args: String::new(),
            works_degraded: false,
            audited: action.is_mutating(),
            interlock: None,
            origin: None,
        }
    }

    /// Marks a call made on the caller's behalf by a notification button or a shell.
    pub fn via(mut self, origin: Origin) -> Request {
        self.origin = Some(origin);
        self
    }

    pub fn even_when_degraded(mut self) -> Request {
        self.works_degraded = true;
        self
    }

    pub fn on_vm(mut self, vm: &crate::vm::Vm) -> Request {
        self.vm = Some((vm.id().to_string(), vm.name()));
        self
    }

    pub fn with_args(mut self, args: impl Into<String>) -> Request {
        self.args = args.into();
        self
    }

    /// Marks a call that only reads state.
    pub fn read_only(mut self) -> Request {
        self.audited = false;
        self
    }

    /// Denies the call with `why` (see [`Request::interlock`]).
    pub fn interlocked(mut self, why: String) -> Request {
        self.interlock = Some(why);
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
    policy: PolicySource,
    polkit: Polkit,
    /// Recent polkit approvals, so a burst of calls does not prompt again and again.
    approvals: Mutex<HashMap<ApprovalKey, Instant>>,
}

/// (caller's unique name, action, VM id).
type ApprovalKey = (String, Action, Option<String>);

/// How long a polkit approval is reused for the same caller, action and VM.
pub const APPROVAL_TTL: Duration = Duration::from_secs(10);

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
        policy_file: PathBuf,
    ) -> Arc<Gate> {
        Arc::new(Gate {
            own_uid: rustix::process::getuid().as_raw(),
            auditor: AuditWriter::start(store),
            callers: Mutex::new(HashMap::new()),
            activity,
            refusal,
            policy: PolicySource::new(policy_file),
            polkit: Polkit::default(),
            approvals: Mutex::new(HashMap::new()),
        })
    }

    /// The problem with policy.yaml, if its last version could not be used.
    pub fn policy_problem(&self) -> Option<String> {
        self.policy.current().1
    }

    /// Why the service answers every call with an error, if it does.
    pub fn refusal(&self) -> Option<MaqetError> {
        self.refusal.clone().map(MaqetError::Storage)
    }

    pub fn refusal_message(&self) -> Option<&str> {
        self.refusal.as_deref()
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

    /// Decides whether `caller` may do `req`: the safety interlock, then the policy,
    /// then (for `auth`) polkit. `Ok(true)` means polkit was consulted.
    pub async fn decide(&self, caller: &Caller, req: &Request) -> Result<bool, String> {
        if let Some(why) = &req.interlock {
            return Err(why.clone());
        }
        let (policy, _) = self.policy.current();
        let vm = req
            .vm
            .as_ref()
            .map(|(id, name)| (id.as_str(), name.as_str()));
        let decision = policy.decide(self.own_uid, caller.uid, req.action, vm);
        let refused = |because: &str| {
            let on = req
                .vm
                .as_ref()
                .map(|v| format!(" on VM '{}'", v.1))
                .unwrap_or_default();
            format!(
                "{} ({}){on} is refused: {because}",
                req.method,
                req.action.id()
            )
        };
        match decision.verdict {
            Verdict::Yes => Ok(false),
            Verdict::No => Err(refused(&decision.because)),
            Verdict::Auth => {
                let key = (
                    caller.unique_name.clone(),
                    req.action,
                    req.vm.as_ref().map(|v| v.0.clone()),
                );
                let fresh = |t: &Instant| t.elapsed() < APPROVAL_TTL;
                if self.approvals.lock().unwrap().get(&key).is_some_and(fresh) {
                    return Ok(true);
                }
                match self.polkit.check(caller, req.action).await {
                    Ok(Ok(())) => {
                        let mut approvals = self.approvals.lock().unwrap();
                        approvals.retain(|_, t| fresh(t));
                        approvals.insert(key, Instant::now());
                        Ok(true)
                    }
                    Ok(Err(no)) => Err(refused(&format!("{}; {no}", decision.because))),
                    Err(unavailable) => Err(refused(&format!(
                        "{} (ask polkit), but {unavailable}",
                        decision.because
                    ))),
                }
            }
        }
    }

    /// The access check of a property read (`org.maqet.vm.observe`). Property reads are
    /// not audited when allowed.
    pub async fn check_read(
        &self,
        conn: &Connection,
        hdr: Option<&Header<'_>>,
        vm: Option<&crate::vm::Vm>,
    ) -> zbus::fdo::Result<()> {
        // No header: maqetd itself reads (ObjectManager, signals).
        let Some(hdr) = hdr else {
            return Ok(());
        };
        let mut req = Request::new(Action::Observe, "Get");
        if let Some(vm) = vm {
            req = req.on_vm(vm);
        }
        let caller = self
            .identify(conn, hdr)
            .await
            .map_err(|e| zbus::fdo::Error::AccessDenied(e.message()))?;
        match self.decide(&caller, &req).await {
            Ok(_) => Ok(()),
            Err(why) => {
                self.audit(&caller, &req, AuditDecision::Deny, "AccessDenied", &why);
                Err(zbus::fdo::Error::AccessDenied(why))
            }
        }
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
        if let Some(e) = self.refusal().filter(|_| !req.works_degraded) {
            return Err(e);
        }
        let caller = self.identify(conn, hdr).await?;
        let asked_polkit = match self.decide(&caller, &req).await {
            Ok(asked) => asked,
            Err(why) => {
                self.audit(&caller, &req, AuditDecision::Deny, "AccessDenied", &why);
                return Err(MaqetError::AccessDenied(why));
            }
        };
        let result = work.await;
        if req.audited || asked_polkit {
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
            arguments: Some(Origin::record(req.origin, &req.args)),
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

/// policy.yaml, re-read whenever it changes (checked with one `stat` per decision: no
/// watcher, no timer). A file that does not parse is reported and the last good policy
/// (at start: the shipped one) stays in force; never "allow all".
struct PolicySource {
    path: PathBuf,
    state: Mutex<LoadedPolicy>,
}

struct LoadedPolicy {
    policy: Arc<Policy>,
    /// (mtime, inode, size) of the file the policy came from; `None`: no file.
    stamp: Option<(i64, i64, u64, u64)>,
    problem: Option<String>,
}

fn stamp(path: &std::path::Path) -> Option<(i64, i64, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.mtime(), m.mtime_nsec(), m.ino(), m.size()))
}

impl PolicySource {
    fn new(path: PathBuf) -> PolicySource {
        let source = PolicySource {
            path,
            state: Mutex::new(LoadedPolicy {
                policy: Arc::new(Policy::shipped()),
                stamp: None,
                problem: None,
            }),
        };
        let (_, problem) = source.current();
        if let Some(p) = problem {
            tracing::warn!("{p}");
        }
        source
    }

    /// The policy in force, and the problem with the file if it was refused.
    fn current(&self) -> (Arc<Policy>, Option<String>) {
        let now = stamp(&self.path);
        let mut state = self.state.lock().unwrap();
        if now != state.stamp {
            state.stamp = now;
            match Policy::load(&self.path) {
                Ok(p) => {
                    tracing::info!(path = %self.path.display(), "access policy loaded");
                    state.policy = Arc::new(p);
                    state.problem = None;
                }
                Err(e) => {
                    let msg = format!("{e}; keeping the previous policy");
                    tracing::warn!("{msg}");
                    state.problem = Some(msg);
                }
            }
        }
        (state.policy.clone(), state.problem.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn audit_records_are_written_in_call_order_by_flush() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let gate = Gate::new(
            store.clone(),
            None,
            None,
            PathBuf::from("/nonexistent/policy.yaml"),
        );
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
