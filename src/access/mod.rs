//! The choke point every D-Bus method passes through: identify the caller, name the
//! action, decide, audit, then act.
//!
//! Interfaces hold no access logic of their own: they describe the call as a
//! [`Request`] and hand the work to [`Gate::call`]. The caller's identity comes from
//! the bus (`GetConnectionCredentials` on the message's sender), never from an argument.

mod action;
mod audit;
mod denials;
mod origin;
mod peers;
pub mod policy;
mod polkit;

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use zbus::Connection;
use zbus::message::Header;

pub use action::Action;
pub use origin::Origin;
use policy::{Policy, Verdict};
use polkit::Polkit;

use crate::error::MaqetError;
use crate::outbound::Outbound;
use crate::store::call_audit::CallAudit;
use crate::store::{AuditDecision, AuditRow, Store};
use crate::time::now_us;
use audit::{AuditWriter, Record};
use denials::{Admit, Aggregate, Denials, Due};
use peers::Peers;

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
    /// Only the service's own user may make this call, whatever the policy says; the
    /// text says what others should do instead.
    pub own_user_only: Option<&'static str>,
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
            own_user_only: None,
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

    /// Refuses every caller but the service's own user (see [`Request::own_user_only`]).
    pub fn own_user_only(mut self, otherwise: &'static str) -> Request {
        self.own_user_only = Some(otherwise);
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

/// Who may receive a signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipients {
    /// Broadcast: everyone on the bus is admitted.
    Everyone,
    /// A stranger is on the bus: send to each of these unique names instead.
    Only(Vec<String>),
}

pub struct Gate {
    own_uid: u32,
    /// Writes audit records off the reply path (see `audit.rs`).
    auditor: Arc<AuditWriter>,
    /// Keeps a refused caller's denials from flooding the audit log.
    denials: Arc<Denials>,
    /// The bus's connections, and the callers among them identified so far.
    peers: Arc<Peers>,
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
            auditor: Arc::new(AuditWriter::start(store)),
            denials: Arc::new(Denials::default()),
            peers: Arc::new(Peers::default()),
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

    /// Starts following the bus's connections (callers that leave are forgotten; see
    /// `peers.rs`). Returns once the connections already on the bus are known, so no
    /// signal goes out before the service knows who could hear it.
    pub async fn watch_bus(&self, conn: &Connection) {
        self.peers.track(conn).await;
    }

    /// Who may receive a signal about `vm` (id, name), or about no VM in particular:
    /// every connection the policy admits to `org.maqet.vm.observe` (and the service's
    /// own user's). While nobody else is on the bus, that is everyone: broadcast.
    pub async fn signal_recipients(
        &self,
        conn: &Connection,
        vm: Option<(&str, &str)>,
    ) -> Recipients {
        let Some(everyone) = self.peers.everyone(conn).await else {
            return Recipients::Everyone;
        };
        if everyone.iter().all(|(_, uid)| *uid == Some(self.own_uid)) {
            return Recipients::Everyone;
        }
        // A connection the bus would not identify counts as a stranger.
        let (policy, _) = self.policy.current();
        let admitted = |uid: &Option<u32>| uid.is_some_and(|uid| self.observes(&policy, uid, vm));
        if everyone.iter().all(|(_, uid)| admitted(uid)) {
            return Recipients::Everyone;
        }
        Recipients::Only(
            everyone
                .into_iter()
                .filter(|(_, uid)| admitted(uid))
                .map(|(name, _)| name)
                .collect(),
        )
    }

    /// Whether `uid` may see `vm` (or the list of VMs) without asking: the service's own
    /// user always; others when the policy says `yes` to `org.maqet.vm.observe`. Decides
    /// who hears signals and who sees VMs in introspection; never prompts.
    pub fn may_observe(&self, uid: u32, vm: Option<(&str, &str)>) -> bool {
        self.observes(&self.policy.current().0, uid, vm)
    }

    fn observes(&self, policy: &Policy, uid: u32, vm: Option<(&str, &str)>) -> bool {
        uid == self.own_uid
            || policy
                .decide(self.own_uid, uid, Action::Observe, vm)
                .verdict
                == Verdict::Yes
    }

    /// The uid of a method call's sender, when the bus can tell.
    pub async fn caller_uid(&self, conn: &Connection, hdr: &Header<'_>) -> Option<u32> {
        self.identify(conn, hdr).await.ok().map(|c| c.uid)
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
        if let Some(c) = self.peers.known(sender.as_str()) {
            return Ok(c);
        }
        let caller = peers::credentials(conn, sender.as_str())
            .await
            .map_err(MaqetError::AccessDenied)?;
        self.peers.remember(&caller);
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
        // A stranger is not told which VM it asked about (nor whether it exists): its
        // answer is the same for every VM, known or not.
        let stranger = !policy.admits(self.own_uid, caller.uid);
        let refused = |because: &str| {
            let on = req
                .vm
                .as_ref()
                .filter(|_| !stranger)
                .map(|v| format!(" on VM '{}'", v.1))
                .unwrap_or_default();
            format!(
                "{} ({}){on} is refused: {because}",
                req.method,
                req.action.id()
            )
        };
        if let Some(otherwise) = req.own_user_only
            && caller.uid != self.own_uid
        {
            return Err(refused(&format!(
                "only uid {} (the user maqetd runs as) may make this call; {otherwise}",
                self.own_uid
            )));
        }
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
                if self.approvals.lock().get(&key).is_some_and(fresh) {
                    return Ok(true);
                }
                match self.polkit.check(caller, req.action).await {
                    Ok(Ok(())) => {
                        let mut approvals = self.approvals.lock();
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
                self.deny(&caller, &req, &why);
                Err(zbus::fdo::Error::AccessDenied(why.outbound()))
            }
        }
    }

    /// Identifies, decides, runs `work` when allowed, and audits. The single path every
    /// D-Bus method goes through, and where a core error (`VmError`, `ManagerError`, …)
    /// becomes its D-Bus error (`service/errors.rs`).
    pub async fn call<T, E, F>(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        req: Request,
        work: F,
    ) -> Result<T, MaqetError>
    where
        T: Outbound,
        E: Into<MaqetError>,
        F: Future<Output = Result<T, E>>,
    {
        let work = async move { work.await.map_err(Into::into) };
        if let Some(a) = &self.activity {
            a.call_started();
        }
        let _guard = CallGuard(self.activity.as_ref());
        if let Some(e) = self.refusal().filter(|_| !req.works_degraded) {
            return Err(e.outbound());
        }
        let caller = self.identify(conn, hdr).await.map_err(Outbound::outbound)?;
        let asked_polkit = match self.decide(&caller, &req).await {
            Ok(asked) => asked,
            Err(why) => {
                self.deny(&caller, &req, &why);
                return Err(MaqetError::AccessDenied(why).outbound());
            }
        };
        self.run(&caller, &req, asked_polkit, work).await.outbound()
    }

    /// Runs an allowed call's work and audits it. A change's record is committed with
    /// its first state change (`store::call_audit`) and completed with the outcome
    /// before the answer; a call that panics is answered with `Internal` (and audited
    /// so), and leaves no lock poisoned behind it (maqetd's locks do not poison).
    async fn run<T, F>(
        &self,
        caller: &Caller,
        req: &Request,
        asked_polkit: bool,
        work: F,
    ) -> Result<T, MaqetError>
    where
        F: Future<Output = Result<T, MaqetError>>,
    {
        let pending = req.audited.then(|| {
            CallAudit::new(
                self.audit_record(caller, req, AuditDecision::Allow, "", "")
                    .row,
            )
        });
        let work = AssertUnwindSafe(work).catch_unwind();
        let result = match &pending {
            Some(p) => p.clone().scope(work).await,
            None => work.await,
        }
        .unwrap_or_else(|panic| Err(panicked(req.method, panic.as_ref())));
        if req.audited || asked_polkit {
            let (outcome, message) = match &result {
                Ok(_) => ("ok", String::new()),
                Err(e) => (e.kind(), e.message()),
            };
            // A change is answered only after its record is committed (audit.rs).
            let record = self.audit_record(caller, req, AuditDecision::Allow, outcome, &message);
            self.auditor.record_durably(record, pending.as_ref()).await;
        }
        result
    }

    /// Audits a denial: the first few of a burst one by one, the rest as one count
    /// (see `denials.rs`).
    fn deny(&self, caller: &Caller, req: &Request, why: &str) {
        match self
            .denials
            .admit(caller, req.action, req.method, Instant::now(), now_us())
        {
            Admit::Record => self.audit(caller, req, AuditDecision::Deny, "AccessDenied", why),
            Admit::Counted => {}
            Admit::CountedStartTimer(at) => {
                let (denials, auditor) = (self.denials.clone(), self.auditor.clone());
                let (uid, action) = (caller.uid, req.action);
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return; // No runtime: written at shut-down.
                };
                rt.spawn(async move {
                    let mut at = at;
                    loop {
                        tokio::time::sleep_until(at.into()).await;
                        match denials.due(uid, action, Instant::now()) {
                            Due::Write(agg) => return record_aggregate(&auditor, agg),
                            Due::Wait(next) => at = next,
                            Due::Done => return,
                        }
                    }
                });
            }
        }
    }

    /// Queues a denial's record (written within a second, batched).
    fn audit(
        &self,
        caller: &Caller,
        req: &Request,
        decision: AuditDecision,
        outcome: &str,
        message: &str,
    ) {
        let record = self.audit_record(caller, req, decision, outcome, message);
        self.auditor.record(record);
    }

    fn audit_record(
        &self,
        caller: &Caller,
        req: &Request,
        decision: AuditDecision,
        outcome: &str,
        message: &str,
    ) -> Record {
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
        Record {
            row,
            vm_name: req.vm.as_ref().map(|v| v.1.clone()),
        }
    }

    /// Waits until every audit record of the calls answered so far is written (denials
    /// still being counted are written when their burst ends).
    pub async fn flush_audit(&self) {
        self.auditor.flush().await;
    }

    /// At shut-down: writes the denials still being counted, then everything queued.
    pub async fn close_audit(&self) {
        for agg in self.denials.drain() {
            record_aggregate(&self.auditor, agg);
        }
        self.auditor.flush().await;
    }
}

/// The answer to a call whose work panicked (a bug in maqetd): said so, logged with
/// the panic's message.
fn panicked(method: &str, panic: &(dyn std::any::Any + Send)) -> MaqetError {
    let what = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    tracing::error!(method, panic = what, "a call panicked: a bug in maqetd");
    MaqetError::Internal(format!(
        "maqetd hit a bug while running {method}: the call did not complete (what it had \
         done by then stays done); maqetd keeps running. The details are in maqetd's log \
         (journalctl --user -t maqetd, or maqetd's stderr when not run by systemd); \
         please report it"
    ))
}

/// The one row that stands for a burst's counted denials. `arguments` holds
/// `count=<n>` for tools; the message says it in words.
fn record_aggregate(auditor: &AuditWriter, agg: Aggregate) {
    let row = AuditRow {
        seq: 0,
        time: agg.last_us,
        caller_uid: Some(agg.caller.uid),
        caller_pid: agg.caller.pid,
        caller_name: Some(agg.caller.unique_name.clone()),
        action: agg.action.id().to_string(),
        vm_id: None,
        method: Some(agg.method_list()),
        arguments: Some(format!("count={}", agg.count())),
        decision: AuditDecision::Deny,
        outcome: Some("AccessDenied".to_string()),
        message: Some(agg.message()),
    };
    auditor.record(Record { row, vm_name: None });
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
        let mut state = self.state.lock();
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
        let rows = store.read(|db| db.audit(None, None, 0)).await.unwrap();
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

    fn gate_on(store: &Arc<Store>) -> Arc<Gate> {
        Gate::new(
            store.clone(),
            None,
            None,
            PathBuf::from("/nonexistent/policy.yaml"),
        )
    }

    fn owner() -> Caller {
        Caller {
            unique_name: ":1.9".into(),
            uid: rustix::process::getuid().as_raw(),
            pid: Some(9),
        }
    }

    fn vm_record() -> crate::store::VmRecord {
        let id = uuid::Uuid::new_v4().to_string();
        crate::store::VmRecord::new(id, "web".into(), String::new(), "created", 1)
    }

    async fn audit_rows(store: &Store) -> Vec<AuditRow> {
        store.read(|db| db.audit(None, None, 0)).await.unwrap()
    }

    /// A change and its audit record are one commit: inside the call, right after the
    /// state change is committed, the record is already there (pending); the answer
    /// completes that same row.
    #[tokio::test]
    async fn a_change_commits_with_its_audit_record() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let gate = gate_on(&store);
        let req = Request::new(Action::Manage, "AddVM").with_args("name=web");
        let (s, seen) = (store.clone(), Arc::new(Mutex::new(Vec::new())));
        let seen_in = seen.clone();
        let out: Result<(), MaqetError> = gate
            .run(&owner(), &req, false, async move {
                let rec = vm_record();
                let id = rec.id.clone();
                s.write(move |db| db.insert_vm(&rec))
                    .await
                    .map_err(|e| MaqetError::Storage(e.to_string()))?;
                *seen_in.lock() = audit_rows(&s).await;
                // A second change of the same call carries no second record.
                s.write(move |db| db.update_config(&id, "web", "x: 1"))
                    .await
                    .unwrap();
                Ok(())
            })
            .await;
        out.unwrap();
        let during = seen.lock().clone();
        assert_eq!(during.len(), 1, "{during:?}");
        assert_eq!(
            during[0].outcome.as_deref(),
            Some(crate::store::call_audit::PENDING)
        );
        assert_eq!(during[0].method.as_deref(), Some("AddVM"));
        let after = audit_rows(&store).await;
        assert_eq!(after.len(), 1, "{after:?}");
        assert_eq!(after[0].seq, during[0].seq);
        assert_eq!(after[0].outcome.as_deref(), Some("ok"));
        assert_eq!(after[0].message.as_deref(), Some(""));
    }

    /// A kept change (one that must work on a full disk: a stop beginning, a removal)
    /// carries the record too.
    #[tokio::test]
    async fn a_kept_change_commits_with_its_audit_record() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let gate = gate_on(&store);
        let req = Request::new(Action::Lifecycle, "Stop");
        let s = store.clone();
        let during: Result<Vec<AuditRow>, MaqetError> = gate
            .run(&owner(), &req, false, async move {
                let rec = vm_record();
                s.write_kept("VM", move |db| db.insert_vm(&rec))
                    .await
                    .unwrap();
                Ok(audit_rows(&s).await)
            })
            .await;
        let during = during.unwrap();
        assert_eq!(during.len(), 1, "{during:?}");
        assert_eq!(
            during[0].outcome.as_deref(),
            Some(crate::store::call_audit::PENDING)
        );
        let after = audit_rows(&store).await;
        assert_eq!(after.len(), 1, "{after:?}");
        assert_eq!(
            (after[0].seq, after[0].outcome.as_deref()),
            (during[0].seq, Some("ok"))
        );
    }

    /// A state change the database refuses takes no record with it: the call's one
    /// record is written at its end, with the error.
    #[tokio::test]
    async fn a_refused_change_leaves_the_record_to_the_answer() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let gate = gate_on(&store);
        let req = Request::new(Action::Manage, "Apply");
        let s = store.clone();
        let out: Result<(), MaqetError> = gate
            .run(&owner(), &req, false, async move {
                let refused = s
                    .write(|db| db.update_config("no-such-vm", "web", "x: 1"))
                    .await;
                assert!(refused.is_err());
                assert!(audit_rows(&s).await.is_empty());
                Err(MaqetError::NotFound("no VM".into()))
            })
            .await;
        assert!(matches!(out, Err(MaqetError::NotFound(_))));
        let after = audit_rows(&store).await;
        assert_eq!(after.len(), 1, "{after:?}");
        assert_eq!(after[0].outcome.as_deref(), Some("NotFound"));
    }

    /// A panic in a call's work answers that call with `Internal` (saying it is a bug,
    /// that the call did not complete, and where the log is), is audited so, and the
    /// next call runs normally: nothing it held stays poisoned.
    #[tokio::test]
    async fn a_panicking_call_is_answered_internal_and_the_next_call_works() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let gate = gate_on(&store);
        let lock = Arc::new(Mutex::new(0u32));
        let req = Request::new(Action::Lifecycle, "Start");
        let held = lock.clone();
        let s = store.clone();
        let out: Result<u32, MaqetError> = gate
            .run(&owner(), &req, false, async move {
                let rec = vm_record();
                s.write(move |db| db.insert_vm(&rec)).await.unwrap();
                assert_eq!(audit_rows(&s).await.len(), 1, "carried by the change");
                let _guard = held.lock();
                panic!("a bug");
            })
            .await;
        let Err(MaqetError::Internal(msg)) = out else {
            panic!("expected Internal, got {out:?}");
        };
        assert!(
            msg.contains("bug") && msg.contains("did not complete"),
            "{msg}"
        );
        assert!(msg.contains("journalctl --user -t maqetd"), "{msg}");
        let rows = audit_rows(&store).await;
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].outcome.as_deref(), Some("Internal"));
        // The lock the panicking call held is usable by the next call.
        let held = lock.clone();
        let next: Result<u32, MaqetError> = gate
            .run(&owner(), &req, false, async move {
                *held.lock() += 1;
                Ok(*held.lock())
            })
            .await;
        assert_eq!(next.unwrap(), 1);
    }
}
