//! Desktop notifications: maqetd tells the person at the desktop what they would want to
//! hear (a crash, a guest that powered itself off, a failed start, a finished or failed
//! snapshot) and carries out the notifications' buttons ("Start again", "Show log").
//!
//! Owns maqetd's side of the session's notification server. The signal pump hands it
//! every core event, in order, without waiting ([`Notifier::observe`]); one task sends
//! the notifications and listens to `ActionInvoked`/`NotificationClosed`. An action runs
//! through the access gate with the `ActionInvoked` message as the call: the caller is
//! the notification server's connection (the session user's shell), checked and audited
//! like any D-Bus caller. See docs/desktop.md.

pub mod cards;
pub mod notice;
pub mod server;
pub mod witness;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use zbus::Connection;
use zbus::message::Message;
use zbus::zvariant::Variant;

use crate::access::{Action, ActivityObserver, Gate, Origin, Request};
use crate::error::MaqetError;
use crate::events::CoreEvent;
use crate::manager::Manager;
use crate::outbound::escape;
use crate::settings::Notifications;
use crate::vm::Vm;
use cards::{Card, CardFile, Owner};
use notice::{ACTION_LOG, ACTION_START, Kind, Notice};
use server::{APP_ID, APP_NAME, NotificationsProxy, escape_markup};

/// Notifications maqetd remembers at most (servers that never send
/// `NotificationClosed` must not grow this without bound).
const MAX_OPEN: usize = 64;
/// How long "Show log" waits for its opener to report success before leaving it be
/// (`xdg-open` returns at once; an editor run directly does not).
const OPENER_REPORT: Duration = Duration::from_secs(5);

/// What the notifier needs from the service.
pub struct Deps {
    pub conn: Connection,
    pub gate: Arc<Gate>,
    pub manager: Arc<Manager>,
    /// Told while a notification with buttons is open, so idle exit waits for a click.
    pub activity: Option<Arc<dyn ActivityObserver>>,
}

/// What the task does next, in the core's order.
enum Order {
    Show(Notice),
    /// Close the VM's notifications of these kinds: their situation has ended.
    Withdraw(String, &'static [Kind]),
}

/// The pump's handle: decides at once and queues, never waits.
pub struct Notifier {
    queue: Option<(mpsc::UnboundedSender<Order>, Notifications)>,
}

impl Notifier {
    /// Starts the notifier task (nothing at all when notifications are off). Returns
    /// once it listens for clicks, so a button of a notification an earlier maqetd
    /// sent works from the first moment this one owns its name.
    pub async fn start(deps: Deps, settings: Notifications) -> Notifier {
        if !settings.enabled {
            return Notifier { queue: None };
        }
        let server = match NotificationsProxy::new(&deps.conn).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot set up desktop notifications");
                return Notifier { queue: None };
            }
        };
        // Subscribed once; zbus follows the server's name to whichever process owns it.
        let invoked = server.receive_action_invoked().await.ok();
        let closed = server.receive_notification_closed().await.ok();
        let (tx, rx) = mpsc::unbounded_channel();
        let cards = CardFile::new(deps.manager.ctx().paths.notification_cards());
        let mut task = Task {
            deps: Arc::new(deps),
            settings: settings.clone(),
            shown: BTreeMap::new(),
            warned: false,
            feedback: tx.clone(),
            cards,
            bus_id: String::new(),
            server_owner: None,
            dbus: None,
        };
        task.recall().await;
        tokio::spawn(task.run(server, invoked, closed, rx));
        Notifier {
            queue: Some((tx, settings)),
        }
    }

    /// Queues what `ev` means for the notifications: withdrawing those it made untrue,
    /// and the one it deserves, if any. `seen`: its outcome was seen by whoever caused
    /// it ([`witness::Witnesses::saw`]).
    pub fn observe(&self, ev: &CoreEvent, seen: bool) {
        let Some((tx, settings)) = &self.queue else {
            return;
        };
        if let Some((vm_id, kinds)) = notice::withdrawn_by(ev) {
            let _ = tx.send(Order::Withdraw(vm_id, kinds));
        }
        if let Some(n) = notice::for_event(ev, settings, seen) {
            let _ = tx.send(Order::Show(n));
        }
    }
}

/// Keeps maqetd from its idle exit while held (a call that lasts until dropped).
struct Hold {
    activity: Arc<dyn ActivityObserver>,
    until: Instant,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.activity.call_ended();
    }
}

/// A notification of ours, still on the screen as far as we know.
struct Shown {
    vm_id: String,
    kind: Kind,
    /// While it has buttons: keeps maqetd from its idle exit.
    hold: Option<Hold>,
}

struct Task {
    deps: Arc<Deps>,
    settings: Notifications,
    /// By server id (ids grow, so the first is the oldest); at most one per VM and kind.
    shown: BTreeMap<u32, Shown>,
    /// The "no notification server" warning was logged since the last success.
    warned: bool,
    /// For feedback on failed actions.
    feedback: mpsc::UnboundedSender<Order>,
    /// `shown` as the next maqetd will find it.
    cards: CardFile,
    bus_id: String,
    /// The notification server's unique name that handed out the ids in `shown`.
    server_owner: Option<String>,
    dbus: Option<zbus::fdo::DBusProxy<'static>>,
}

type Signals<T> = Option<T>;

impl Task {
    async fn run(
        mut self,
        server: NotificationsProxy<'static>,
        mut invoked: Signals<server::ActionInvokedStream>,
        mut closed: Signals<server::NotificationClosedStream>,
        mut orders: mpsc::UnboundedReceiver<Order>,
    ) {
        loop {
            let expiry = self
                .shown
                .values()
                .filter_map(|o| o.hold.as_ref().map(|h| h.until))
                .min();
            tokio::select! {
                o = orders.recv() => match o {
                    Some(Order::Show(n)) => self.send(&server, n).await,
                    Some(Order::Withdraw(vm_id, kinds)) => self.withdraw(&server, &vm_id, kinds).await,
                    None => break,
                },
                Some(sig) = next_or_pending(&mut invoked) => {
                    if let Ok(args) = sig.args() {
                        self.invoked(sig.message(), args.id, args.action_key);
                    }
                }
                Some(sig) = next_or_pending(&mut closed) => {
                    if let Ok(args) = sig.args()
                        && self.shown.remove(&args.id).is_some()
                    {
                        self.remember();
                    }
                }
                _ = sleep_until_some(expiry) => self.release_expired(),
            }
        }
    }

    /// Takes over the cards an earlier maqetd left on this server's screen, so they are
    /// withdrawn and replaced like our own (their buttons' keep-alive ended with it).
    async fn recall(&mut self) {
        // No property cache: nothing to subscribe to or fetch for two plain calls.
        let Ok(dbus) = zbus::fdo::DBusProxy::builder(&self.deps.conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
        else {
            return;
        };
        self.bus_id = dbus
            .get_id()
            .await
            .map(|id| id.to_string())
            .unwrap_or_default();
        self.dbus = Some(dbus);
        self.server_owner = self.current_server().await;
        let Some(server) = self.server_owner.clone() else {
            return;
        };
        let owner = Owner {
            bus: self.bus_id.clone(),
            server,
        };
        for card in self.cards.load(&owner) {
            self.shown.insert(
                card.id,
                Shown {
                    vm_id: card.vm,
                    kind: card.kind,
                    hold: None,
                },
            );
        }
        if !self.shown.is_empty() {
            tracing::info!(
                cards = self.shown.len(),
                "notification cards of an earlier maqetd taken over"
            );
        }
    }

    /// The unique name of whoever serves notifications now.
    async fn current_server(&self) -> Option<String> {
        let dbus = self.dbus.as_ref()?;
        let name = zbus::names::BusName::try_from(server::SERVER_NAME).ok()?;
        dbus.get_name_owner(name).await.ok().map(|o| o.to_string())
    }

    /// Writes `shown` down for the next maqetd.
    fn remember(&self) {
        let Some(server) = self.server_owner.clone() else {
            return;
        };
        let owner = Owner {
            bus: self.bus_id.clone(),
            server,
        };
        let cards = self
            .shown
            .iter()
            .map(|(id, s)| Card {
                id: *id,
                vm: s.vm_id.clone(),
                kind: s.kind,
            })
            .collect();
        // A few hundred bytes on the runtime tmpfs: written in place of a blocking task.
        self.cards.save(&owner, cards);
    }

    /// The id of the VM's notification of this kind on the screen, if any.
    fn shown_id(&self, vm_id: &str, kind: Kind) -> Option<u32> {
        self.shown
            .iter()
            .find(|(_, s)| s.vm_id == vm_id && s.kind == kind)
            .map(|(id, _)| *id)
    }

    async fn withdraw(&mut self, server: &NotificationsProxy<'_>, vm_id: &str, kinds: &[Kind]) {
        let ids: Vec<u32> = self
            .shown
            .iter()
            .filter(|(_, s)| s.vm_id == vm_id && kinds.contains(&s.kind))
            .map(|(id, _)| *id)
            .collect();
        if !ids.is_empty() {
            for id in &ids {
                self.shown.remove(id);
            }
            self.remember();
        }
        for id in ids {
            if let Err(e) = server.close_notification(id).await {
                tracing::debug!(id, error = %e, "cannot withdraw a notification");
            } else {
                tracing::info!(vm = %vm_id, id, "desktop notification withdrawn");
            }
        }
    }

    async fn send(&mut self, server: &NotificationsProxy<'_>, n: Notice) {
        let caps = match server.get_capabilities().await {
            Ok(c) => c,
            Err(e) => return self.unavailable(&e),
        };
        // Ids belong to the server that gave them: one that restarted (or another that
        // took the name) knows none of ours, and would close someone else's card.
        let owner = self.current_server().await;
        if owner.is_some() && owner != self.server_owner {
            self.shown.clear();
            self.server_owner = owner;
        }
        let has = |cap: &str| caps.iter().any(|c| c == cap);
        let with_actions = self.settings.actions && has("actions") && !n.actions.is_empty();
        let keys: Vec<String> = n
            .actions
            .iter()
            .map(|(verb, _)| notice::action_key(verb, &n.vm_id))
            .collect();
        let actions: Vec<&str> = if with_actions {
            keys.iter()
                .zip(&n.actions)
                .flat_map(|(k, (_, label))| [k.as_str(), *label])
                .collect()
        } else {
            Vec::new()
        };
        // The reason may hold QEMU's or a guest's text: escaped like every string sent.
        let body = escape(&n.body);
        let body = if has("body-markup") {
            escape_markup(&body)
        } else {
            body.into_owned()
        };
        let summary = escape(&n.summary);
        let mut hints = HashMap::new();
        hints.insert("desktop-entry", Variant::from(APP_ID));
        hints.insert("urgency", Variant::from(n.urgency as u8));
        // One notification per VM and kind: a new one takes the old one's place.
        let replaces = self.shown_id(&n.vm_id, n.kind);
        let sent = server
            .notify(
                APP_NAME,
                replaces.unwrap_or(0),
                APP_ID,
                &summary,
                &body,
                &actions,
                hints,
                -1,
            )
            .await;
        let id = match sent {
            Ok(id) => id,
            Err(e) => return self.unavailable(&e),
        };
        self.warned = false;
        tracing::info!(vm = %n.vm_name, kind = ?n.kind, id, replaces, "desktop notification: {}", n.summary);
        if let Some(old) = replaces {
            self.shown.remove(&old);
        }
        let keep = Duration::from_secs(self.settings.action_keep_alive_sec);
        let hold = self
            .deps
            .activity
            .clone()
            .filter(|_| with_actions && !keep.is_zero())
            .map(|activity| {
                activity.call_started();
                Hold {
                    activity,
                    until: Instant::now() + keep,
                }
            });
        self.shown.insert(
            id,
            Shown {
                vm_id: n.vm_id,
                kind: n.kind,
                hold,
            },
        );
        while self.shown.len() > MAX_OPEN {
            self.shown.pop_first();
        }
        self.remember();
    }

    /// No server (or a broken one): say so once, then carry on without.
    fn unavailable(&mut self, e: &zbus::Error) {
        if self.warned {
            tracing::debug!(error = %e, "desktop notification not sent");
        } else {
            self.warned = true;
            tracing::warn!(error = %e, "no notification server answers on the session bus; carrying on without desktop notifications");
        }
    }

    fn release_expired(&mut self) {
        let now = Instant::now();
        for o in self.shown.values_mut() {
            if o.hold.as_ref().is_some_and(|h| h.until <= now) {
                o.hold = None;
            }
        }
    }

    /// A button of ours was clicked: run it through the gate, on its own task. The key
    /// says what to do to which VM, so a notification an earlier maqetd sent works too.
    fn invoked(&mut self, msg: &Message, id: u32, key: &str) {
        // Other applications' keys, and `default` (a click on the notification itself).
        let Some((key, vm_id)) = notice::parse_action_key(key) else {
            return;
        };
        if let Some(shown) = self.shown.get_mut(&id) {
            // The button did what it was there for: idle exit need not wait any longer.
            shown.hold = None;
        }
        let Some(vm) = self.deps.manager.get(vm_id) else {
            tracing::info!(vm = %vm_id, action = key, "notification button of a VM that no longer exists");
            let _ = self.feedback.send(Order::Show(notice::vm_gone(vm_id)));
            return;
        };
        tokio::spawn(act(
            self.deps.clone(),
            self.feedback.clone(),
            msg.clone(),
            vm,
            key,
            self.settings.log_opener.clone(),
        ));
    }
}

/// Carries out one action as the notification server's caller.
async fn act(
    deps: Arc<Deps>,
    feedback: mpsc::UnboundedSender<Order>,
    msg: Message,
    vm: Arc<Vm>,
    key: &'static str,
    opener: Vec<String>,
) {
    let hdr = msg.header();
    let name = vm.name();
    let (result, what) = match key {
        ACTION_START => {
            let req = Request::new(Action::Lifecycle, "Start")
                .on_vm(&vm)
                .with_args("notification action \"Start again\"")
                .via(Origin::Notification);
            let r = deps.gate.call(&deps.conn, &hdr, req, vm.start()).await;
            (r, format!("Cannot start VM '{name}'"))
        }
        ACTION_LOG => {
            let mut req = Request::new(Action::Observe, "ShowLog")
                .on_vm(&vm)
                .with_args(format!("notification action \"Show log\": {opener:?}"))
                .via(Origin::Notification);
            // It starts a program on the desktop: on the record, unlike other reads.
            req.audited = true;
            let r = deps
                .gate
                .call(&deps.conn, &hdr, req, show_log(&vm, &opener))
                .await;
            (r, format!("Cannot show the log of VM '{name}'"))
        }
        _ => return,
    };
    if let Err(e) = result {
        tracing::warn!(vm = %name, action = key, caller = ?hdr.sender().map(|s| s.as_str()), error = %e, "notification action failed");
        // A start that failed in QEMU has its own "failed to start" notification.
        if !matches!(e, MaqetError::QemuFailed(_) | MaqetError::Storage(_)) {
            let n = notice::action_failed(vm.id(), &name, &what, &e.message());
            let _ = feedback.send(Order::Show(n));
        }
    }
}

/// Opens the VM's QEMU log with the configured opener (`xdg-open` by default).
async fn show_log(vm: &Vm, opener: &[String]) -> Result<(), MaqetError> {
    let log = vm.log_file();
    if !log.exists() {
        return Err(MaqetError::NotFound(format!(
            "VM '{}' has no QEMU log yet ({} does not exist)",
            vm.name(),
            log.display()
        )));
    }
    let Some((program, args)) = opener.split_first() else {
        return Err(MaqetError::InvalidConfig(
            "notifications.log_opener in maqetd.yaml is empty".into(),
        ));
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .arg(&log)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| {
            MaqetError::Internal(format!(
                "cannot run {program} (notifications.log_opener): {e}"
            ))
        })?;
    match tokio::time::timeout(OPENER_REPORT, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(MaqetError::Internal(format!(
            "{program} {} failed ({status})",
            log.display()
        ))),
        Ok(Err(e)) => Err(MaqetError::Internal(format!("waiting for {program}: {e}"))),
        Err(_) => {
            // Still running (an editor itself): let it be, and reap it when it ends.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            Ok(())
        }
    }
}

async fn next_or_pending<S: futures_util::Stream + Unpin>(s: &mut Option<S>) -> Option<S::Item> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
