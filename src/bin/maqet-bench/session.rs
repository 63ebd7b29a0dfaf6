//! A client session on one private bus: the typed proxies, raw calls for timing, and
//! waiting for a VM's `StatusChanged` signals.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use maqet::client::{
    BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH, ManagerProxy, StatusChangedStream, VmProxy, vm_proxy,
};
use zbus::{Connection, Message, OwnedObjectPath};

use crate::bare::tiny_vm_yaml;
use crate::fixture::{Bus, Run};

/// Errors are reported, not handled: a section that fails says why and the run goes on.
pub type Res<T> = Result<T, String>;

pub trait Context<T> {
    fn ctx(self, what: &str) -> Res<T>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// Bound for anything a VM does here; far above every figure, so only a hang hits it.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub struct Session {
    pub bus: Bus,
    pub conn: Connection,
    pub manager: ManagerProxy<'static>,
}

impl Session {
    /// A fresh bus, connected, with maqetd activated.
    pub async fn new(run: &Run) -> Res<Session> {
        let bus = run.bus().ctx("starting a private dbus-daemon")?;
        let conn = bus.conn().await.ctx("connecting to the private bus")?;
        let manager = ManagerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .ctx("manager proxy")?;
        manager
            .version()
            .await
            .ctx("activating maqetd (is the release maqetd built?)")?;
        Ok(Session { bus, conn, manager })
    }

    pub async fn add_tiny(&self, name: &str) -> Res<VmProxy<'static>> {
        let path = self
            .manager
            .add_vm(name, &tiny_vm_yaml(name))
            .await
            .ctx(&format!("AddVM {name}"))?;
        self.vm(path).await
    }

    pub async fn vm(&self, path: OwnedObjectPath) -> Res<VmProxy<'static>> {
        vm_proxy(&self.conn, path).await.ctx("VM proxy")
    }

    pub async fn maqetd_pid(&self) -> Res<u32> {
        self.bus.maqetd_pid(&self.conn).await.ctx("maqetd's pid")
    }

    /// One method call to maqetd, timed from send to reply (the reply is not decoded).
    pub async fn timed_call<B>(
        &self,
        path: &str,
        iface: &str,
        method: &str,
        body: &B,
    ) -> zbus::Result<(Duration, Message)>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        let t0 = Instant::now();
        let reply = self
            .conn
            .call_method(Some(BUS_NAME), path, Some(iface), method, body)
            .await?;
        Ok((t0.elapsed(), reply))
    }

    /// `Get(Manager, Version)`: the cheapest call maqet itself answers.
    pub async fn version_call(&self) -> zbus::Result<Duration> {
        self.timed_call(
            MANAGER_PATH,
            "org.freedesktop.DBus.Properties",
            "Get",
            &(MANAGER_INTERFACE, "Version"),
        )
        .await
        .map(|(d, _)| d)
    }
}

/// A VM's `StatusChanged` stream; subscribe first, then act.
pub struct Watch {
    stream: StatusChangedStream,
}

impl Watch {
    pub async fn new(vm: &VmProxy<'_>) -> Res<Watch> {
        Ok(Watch {
            stream: vm
                .receive_vm_status_changed()
                .await
                .ctx("subscribing to StatusChanged")?,
        })
    }

    /// Waits for `StatusChanged(want)`; returns when it arrived.
    pub async fn until(&mut self, want: &str) -> Res<Instant> {
        let wait = async {
            while let Some(sig) = self.stream.next().await {
                let at = Instant::now();
                if let Ok(a) = sig.args()
                    && *a.status() == want
                {
                    return Ok(at);
                }
            }
            Err(format!("signal stream ended before status {want}"))
        };
        tokio::time::timeout(TIMEOUT, wait)
            .await
            .map_err(|_| format!("no StatusChanged({want}) within {TIMEOUT:?}"))?
    }
}

/// Calls `act` and waits for `StatusChanged(want)`, concurrently; returns the time to
/// the signal.
pub async fn act_until<F>(watch: &mut Watch, want: &str, act: F) -> Res<Duration>
where
    F: std::future::Future<Output = Result<(), maqet::error::MaqetError>>,
{
    let t0 = Instant::now();
    let (reply, seen) = futures_util::future::join(act, watch.until(want)).await;
    reply.ctx(&format!("the call expected to reach {want}"))?;
    Ok(seen?.duration_since(t0))
}
