//! Who is on the bus: every connection's unique name and, once asked, its user.
//!
//! Two uses. The gate identifies a caller once per connection (the bus's
//! `GetConnectionCredentials`), and signals about VMs must not reach a stranger: a
//! broadcast signal goes to every connection with a matching match rule, whoever it
//! belongs to, so while a connection of a user the policy does not admit is on the bus,
//! maqetd sends its signals to each admitted connection instead (see
//! [`super::Gate::signal_recipients`]).
//!
//! The list starts from `ListNames` and follows `NameOwnerChanged`. Connections are
//! identified lazily: a joiner is asked for its credentials only when a signal is about
//! to go out (or when it calls), so a bus with nothing to announce costs one map entry
//! per connection and no round trip. Before deciding who gets a signal, the queued
//! `NameOwnerChanged` messages are taken in: a connection the bus announced before the
//! call that causes the signal is always accounted for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::StreamExt;
use tokio::sync::{Notify, watch};
use zbus::fdo::DBusProxy;
use zbus::message::Type;
use zbus::names::BusName;
use zbus::{Connection, MatchRule, Message, MessageStream};

use super::Caller;

pub struct Peers {
    /// Unique name → the caller once identified (`None`: joined, not asked yet).
    names: Mutex<HashMap<String, Option<Caller>>>,
    /// `NameOwnerChanged` as the bus sends it; `None` until tracking starts.
    changes: Mutex<Option<MessageStream>>,
    /// Tells the tracking task to poll again: the waker [`Peers::drain`] leaves on the
    /// stream, so the task wakes only when a message arrives.
    repoll: Arc<Notify>,
    repoll_waker: Waker,
    /// True once the names on the bus are known (or there is no bus to track).
    ready: watch::Sender<bool>,
    own_name: Mutex<Option<String>>,
}

/// Wakes the tracking task (through its `Notify`).
struct RepollWaker(Arc<Notify>);

impl Wake for RepollWaker {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
}

impl Default for Peers {
    fn default() -> Peers {
        let repoll = Arc::new(Notify::new());
        Peers {
            names: Mutex::new(HashMap::new()),
            changes: Mutex::new(None),
            repoll_waker: Waker::from(Arc::new(RepollWaker(repoll.clone()))),
            repoll,
            ready: watch::Sender::new(false),
            own_name: Mutex::new(None),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The bus's word on who owns `name`.
pub async fn credentials(conn: &Connection, name: &str) -> Result<Caller, String> {
    let dbus = DBusProxy::new(conn)
        .await
        .map_err(|e| format!("the bus cannot identify caller {name}: {e}"))?;
    let bus_name = BusName::try_from(name).map_err(|e| format!("{name}: {e}"))?;
    let creds = dbus
        .get_connection_credentials(bus_name)
        .await
        .map_err(|e| format!("the bus cannot identify caller {name}: {e}"))?;
    Ok(Caller {
        unique_name: name.to_string(),
        uid: creds
            .unix_user_id()
            .ok_or_else(|| format!("the bus does not know the uid of caller {name}"))?,
        pid: creds.process_id(),
    })
}

impl Peers {
    /// A caller identified before (and still on the bus).
    pub fn known(&self, name: &str) -> Option<Caller> {
        lock(&self.names).get(name).cloned().flatten()
    }

    pub fn remember(&self, caller: &Caller) {
        lock(&self.names).insert(caller.unique_name.clone(), Some(caller.clone()));
    }

    /// Starts following the bus's connections. Returns once the current ones are known.
    pub async fn track(self: &Arc<Self>, conn: &Connection) {
        let Some(own) = conn.unique_name().map(|n| n.to_string()) else {
            // Peer to peer: the only connection is the peer.
            self.ready.send_replace(true);
            return;
        };
        *lock(&self.own_name) = Some(own.clone());
        // Subscribe first, then list: a connection that comes or goes in between is seen
        // by both, and joining and leaving are idempotent (unique names are never reused).
        let rule = MatchRule::builder()
            .msg_type(Type::Signal)
            .sender("org.freedesktop.DBus")
            .interface("org.freedesktop.DBus")
            .member("NameOwnerChanged")
            .build();
        let stream = match rule {
            Ok(rule) => MessageStream::for_match_rule(rule, conn, None).await,
            Err(e) => Err(e),
        };
        let listed = match DBusProxy::new(conn).await {
            Ok(dbus) => dbus.list_names().await.map_err(zbus::Error::from),
            Err(e) => Err(e),
        };
        match (stream, listed) {
            (Ok(stream), Ok(names)) => {
                {
                    let mut map = lock(&self.names);
                    for n in names {
                        let n = n.as_str();
                        if n.starts_with(':') && n != own {
                            map.entry(n.to_string()).or_insert(None);
                        }
                    }
                }
                *lock(&self.changes) = Some(stream);
                tokio::spawn(follow(self.clone()));
            }
            (Err(e), _) | (_, Err(e)) => {
                // Without the list, every signal would have to be withheld or risked:
                // say so loudly and keep broadcasting (the pre-tracking behaviour).
                tracing::error!(error = %e, "cannot follow the bus's connections; signals are broadcast to everyone on the bus");
            }
        }
        self.ready.send_replace(true);
    }

    /// Takes in every `NameOwnerChanged` queued so far. The stream keeps a waker for
    /// the tracking task, so this costs it no wake-up.
    fn drain(&self) {
        let mut changes = lock(&self.changes);
        let Some(stream) = changes.as_mut() else {
            return;
        };
        let mut cx = Context::from_waker(&self.repoll_waker);
        while let Poll::Ready(Some(msg)) = stream.poll_next_unpin(&mut cx) {
            if let Ok(msg) = msg {
                self.changed(&msg);
            }
        }
    }

    fn changed(&self, msg: &Message) {
        let body = msg.body();
        let Ok((name, old, new)) = body.deserialize::<(&str, &str, &str)>() else {
            return;
        };
        if !name.starts_with(':') {
            return;
        }
        let mut map = lock(&self.names);
        if new.is_empty() {
            map.remove(name);
        } else if old.is_empty() && lock(&self.own_name).as_deref() != Some(name) {
            map.entry(name.to_string()).or_insert(None);
        }
    }

    /// Every connection on the bus (unique name, uid), asking the bus about the ones not
    /// identified yet; a uid the bus would not tell is `None`. `None`: not tracking
    /// (everyone may listen).
    pub async fn everyone(&self, conn: &Connection) -> Option<Vec<(String, Option<u32>)>> {
        let _ = self.ready.subscribe().wait_for(|r| *r).await;
        if lock(&self.changes).is_none() {
            return None;
        }
        self.drain();
        let unknown: Vec<String> = lock(&self.names)
            .iter()
            .filter(|(_, c)| c.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        if !unknown.is_empty() {
            let answers =
                futures_util::future::join_all(unknown.iter().map(|n| credentials(conn, n))).await;
            let mut map = lock(&self.names);
            for (name, answer) in unknown.iter().zip(answers) {
                // On failure the connection stays unidentified (and is treated as a
                // stranger); if it left, its NameOwnerChanged removes it.
                if let (Ok(caller), Some(slot)) = (answer, map.get_mut(name)) {
                    *slot = Some(caller);
                }
            }
        }
        Some(
            lock(&self.names)
                .iter()
                .map(|(name, c)| (name.clone(), c.as_ref().map(|c| c.uid)))
                .collect(),
        )
    }
}

/// Follows `NameOwnerChanged` while nothing else is happening (sleeps on the stream).
async fn follow(peers: Arc<Peers>) {
    loop {
        let next = std::future::poll_fn(|cx| match lock(&peers.changes).as_mut() {
            Some(s) => s.poll_next_unpin(cx),
            None => Poll::Ready(None),
        });
        tokio::select! {
            msg = next => match msg {
                Some(Ok(msg)) => peers.changed(&msg),
                Some(Err(_)) => {}
                None => return,
            },
            _ = peers.repoll.notified() => {}
        }
    }
}
