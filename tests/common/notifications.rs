//! A notification server for tests: owns `org.freedesktop.Notifications` on the
//! private bus, advertises `actions`, records every `Notify` and `CloseNotification`,
//! and lets the test click (emit `ActionInvoked`) and dismiss (`NotificationClosed`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::mpsc;
use zbus::OwnedVariant;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, interface};

use super::{Bus, TIMEOUT};

const PATH: &str = "/org/freedesktop/Notifications";

/// One `Notify` call as the server received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: u32,
    /// The `replaces_id` argument (0: a new notification).
    pub replaces_id: u32,
    pub app_name: String,
    pub app_icon: String,
    pub summary: String,
    pub body: String,
    pub actions: Vec<String>,
    pub hints: HashMap<String, OwnedVariant>,
    /// Unique bus name of the caller.
    pub sender: String,
}

impl Received {
    /// The action keys (every other element of `actions`).
    pub fn action_keys(&self) -> Vec<&str> {
        self.actions.iter().step_by(2).map(String::as_str).collect()
    }

    pub fn hint_str(&self, key: &str) -> Option<String> {
        self.hints
            .get(key)
            .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
    }
}

struct Server {
    next: AtomicU32,
    capabilities: Vec<String>,
    tx: mpsc::UnboundedSender<Received>,
    closes: mpsc::UnboundedSender<u32>,
}

#[interface(name = "org.freedesktop.Notifications")]
impl Server {
    fn get_capabilities(&self) -> Vec<String> {
        self.capabilities.clone()
    }

    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        app_name: String,
        replaces_id: u32,
        app_icon: String,
        summary: String,
        body: String,
        actions: Vec<String>,
        hints: HashMap<String, OwnedVariant>,
        _expire_timeout: i32,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
    ) -> u32 {
        // The spec: a replacement keeps the id it replaces.
        let id = match replaces_id {
            0 => self.next.fetch_add(1, Ordering::SeqCst),
            old => old,
        };
        let _ = self.tx.send(Received {
            id,
            replaces_id,
            app_name,
            app_icon,
            summary,
            body,
            actions,
            hints,
            sender: hdr.sender().map(|s| s.to_string()).unwrap_or_default(),
        });
        id
    }

    fn close_notification(&self, id: u32) {
        let _ = self.closes.send(id);
    }

    fn get_server_information(&self) -> (String, String, String, String) {
        (
            "maqet-test".into(),
            "maqet".into(),
            "1".into(),
            "1.2".into(),
        )
    }

    #[zbus(signal)]
    async fn action_invoked(emitter: &SignalEmitter<'_>, id: u32, key: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn notification_closed(
        emitter: &SignalEmitter<'_>,
        id: u32,
        reason: u32,
    ) -> zbus::Result<()>;
}

pub struct FakeNotifications {
    pub conn: Connection,
    rx: mpsc::UnboundedReceiver<Received>,
    closes: mpsc::UnboundedReceiver<u32>,
}

impl FakeNotifications {
    /// Serves on `bus` with these capabilities (e.g. `["actions", "body"]`).
    pub async fn start(bus: &Bus, capabilities: &[&str]) -> FakeNotifications {
        let (tx, rx) = mpsc::unbounded_channel();
        let (close_tx, closes) = mpsc::unbounded_channel();
        let server = Server {
            next: AtomicU32::new(1),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            tx,
            closes: close_tx,
        };
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .serve_at(PATH, server)
            .name("org.freedesktop.Notifications")
            .build()
            .await
            .expect("serve the test notification server");
        FakeNotifications { conn, rx, closes }
    }

    /// The id of the next `CloseNotification` call, within [`TIMEOUT`].
    pub async fn next_close(&mut self) -> u32 {
        tokio::time::timeout(TIMEOUT, self.closes.recv())
            .await
            .expect("no CloseNotification within the timeout")
            .expect("notification server gone")
    }

    /// `CloseNotification` calls received so far and not yet taken.
    pub fn closes_so_far(&mut self) -> Vec<u32> {
        std::iter::from_fn(|| self.closes.try_recv().ok()).collect()
    }

    /// The next notification received, within [`TIMEOUT`].
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(TIMEOUT, self.rx.recv())
            .await
            .expect("no notification within the timeout")
            .expect("notification server gone")
    }

    /// Clicks a button: `ActionInvoked(id, key)`, as a server does.
    pub async fn click(&self, id: u32, key: &str) {
        let emitter = SignalEmitter::new(&self.conn, PATH).unwrap();
        Server::action_invoked(&emitter, id, key).await.unwrap();
    }

    /// Dismisses a notification (reason 2: by the user).
    pub async fn dismiss(&self, id: u32) {
        let emitter = SignalEmitter::new(&self.conn, PATH).unwrap();
        Server::notification_closed(&emitter, id, 2).await.unwrap();
    }
}
