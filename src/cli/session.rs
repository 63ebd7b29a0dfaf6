//! The CLI's connection to maqetd and the lookups every command shares.

use std::io::Read;
use std::time::{Duration, Instant};

use zbus::{Connection, OwnedObjectPath};

use super::output::VmView;
use crate::client::{BUS_NAME, ManagerProxy, QmpProxy, VM_INTERFACE, VmProxy, proxy_at, qmp_proxy};
use crate::error::MaqetError;

/// Keep each blocking call well under the bus's default 25 s reply timeout.
pub const CALL_CHUNK: Duration = Duration::from_secs(20);

pub struct Session {
    pub conn: Connection,
    pub manager: ManagerProxy<'static>,
    pub json: bool,
    /// Another machine's bus over ssh (`--host`): no file descriptors pass.
    pub remote: bool,
}

impl Session {
    /// This session's bus, or `host`'s over ssh.
    pub async fn connect(json: bool, host: Option<&str>) -> Result<Session, MaqetError> {
        let conn = match host {
            None => Connection::session().await?,
            Some(h) => super::remote::connect(h).await?,
        };
        let manager = ManagerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        Ok(Session {
            conn,
            manager,
            json,
            remote: host.is_some(),
        })
    }

    /// Refuses, with a clear reason, a call that hands over a file descriptor when
    /// the connection cannot carry one.
    pub fn need_fd_passing(&self, what: &str) -> Result<(), MaqetError> {
        if self.remote {
            return Err(MaqetError::InvalidArgument(format!(
                "{what} hands over a file descriptor, which cannot cross ssh: run it on that machine (ssh -t HOST maqet …)"
            )));
        }
        Ok(())
    }
}

pub async fn vm(
    s: &Session,
    name: &str,
) -> Result<(OwnedObjectPath, VmProxy<'static>), MaqetError> {
    vm_object(s, name).await
}

/// A VM's object path and a proxy of one of its interfaces (`SnapshotsProxy`, …).
pub async fn vm_object<P>(s: &Session, name: &str) -> Result<(OwnedObjectPath, P), MaqetError>
where
    P: From<zbus::Proxy<'static>> + zbus::proxy::Defaults,
{
    let path = s.manager.find_vm(name).await?;
    let proxy = proxy_at(&s.conn, path.clone()).await?;
    Ok((path, proxy))
}

/// The QMP interface of a VM, by name or id.
pub async fn qmp(s: &Session, name: &str) -> Result<QmpProxy<'static>, MaqetError> {
    let path = s.manager.find_vm(name).await?;
    Ok(qmp_proxy(&s.conn, path).await?)
}

/// All properties of one VM in one round trip.
pub async fn view(s: &Session, name: &str) -> Result<VmView, MaqetError> {
    let (path, _) = vm(s, name).await?;
    let props = zbus::fdo::PropertiesProxy::builder(&s.conn)
        .destination(BUS_NAME)
        .path(path)
        .build()
        .await?
        .get_all(VM_INTERFACE.try_into().expect("valid interface name"))
        .await
        .map_err(zbus::Error::from)?;
    Ok(VmView::from_properties(&props))
}

pub fn read_input(file: &str) -> Result<String, MaqetError> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| MaqetError::InvalidArgument(format!("cannot read stdin: {e}")))?;
        Ok(text)
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| MaqetError::InvalidArgument(format!("cannot read {file}: {e}")))
    }
}

/// `Wait` in chunks that each fit the bus's reply timeout.
pub async fn wait_chunked(
    proxy: &VmProxy<'_>,
    condition: &str,
    limit: Duration,
) -> Result<String, MaqetError> {
    let deadline = Instant::now() + limit;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let chunk = remaining.min(CALL_CHUNK);
        // Whole seconds, rounded up: truncating made `--timeout N` wait N-1 s (the
        // deadline is already microseconds in the past when the first call goes out).
        let secs = chunk.as_secs() + u64::from(chunk.subsec_nanos() > 0);
        match proxy.wait(condition, secs as u32).await {
            Err(MaqetError::Timeout(_)) if remaining > chunk => continue,
            other => return other,
        }
    }
}
