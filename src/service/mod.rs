//! The D-Bus face of maqetd: thin adapters over the core ([`crate::manager`],
//! [`crate::vm`]), the signal pump, and the service's start-up and shut-down.
//!
//! Start-up order (clients never see a half-built service): open the database, load the
//! VMs, re-adopt surviving QEMUs, serve the manager and every VM object, serve the
//! ObjectManager, and request the bus name last.

mod all_vms;
mod docstrings;
mod errors;
mod guest_iface;
mod host;
mod idle;
mod images_iface;
mod introspection;
mod job_iface;
mod krunner;
mod manager_iface;
mod manager_served;
mod object_manager;
mod options;
mod properties;
mod properties_iface;
mod pump;
mod qmp_iface;
mod search_provider;
mod shell_search;
mod signals;
mod snapshots_iface;
mod storage_iface;
mod vm_iface;
mod vm_objects;

use std::sync::Arc;
use std::time::Duration;

use zbus::fdo::RequestNameFlags;

use crate::access::Gate;
use crate::client::{BUS_NAME, MANAGER_PATH};
use crate::error::MaqetError;
use crate::events::EventSink;
use crate::manager::Manager;
use crate::notify::{self, Notifier};
use crate::paths::Paths;
use crate::session::SessionLife;
use crate::settings::Settings;
use crate::store::Store;
use crate::vm::Ctx;
use idle::Idle;

pub use guest_iface::GuestIface;
pub use images_iface::ImagesIface;
pub use job_iface::JobIface;
pub use krunner::{KRUNNER_PATH, KRunnerIface};
pub use manager_iface::ManagerIface;
pub use manager_served::ManagerServed;
pub use object_manager::ObjectManagerIface;
pub use qmp_iface::QmpIface;
pub use search_provider::{SEARCH_PROVIDER_PATH, SearchProviderIface};
pub use snapshots_iface::SnapshotsIface;
pub use storage_iface::StorageIface;
pub use vm_iface::VmIface;

/// What every interface object shares.
#[derive(Debug)]
pub struct Shared {
    pub manager: Arc<Manager>,
    pub gate: Arc<Gate>,
    pub host: host::HostInfo,
    /// Finished job objects still on the bus.
    pub retired_jobs: job_iface::Retired,
    /// Outcomes their callers saw (no desktop notification for those).
    pub witnesses: notify::witness::Witnesses,
    /// `ListVMs`' reply body, kept until something listed changes.
    pub vm_list: all_vms::EncodedVmList,
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Take the bus name over from a running maqetd.
    pub replace: bool,
    /// Overrides the settings file's `idle_exit_sec` (0 = never).
    pub idle_exit_sec: Option<u64>,
}

/// Opens the state and serves it on the session bus until the bus goes away or the
/// process is asked to stop.
pub async fn run(opts: Options) -> Result<(), MaqetError> {
    let paths = Paths::from_env().map_err(|e| MaqetError::Internal(e.to_string()))?;
    serve(zbus::connection::Builder::session(), paths, opts).await
}

/// Serves maqet on the connection `builder` makes (the seam tests and benchmarks use).
///
/// Objects are registered on the builder, so zbus starts dispatching before the name
/// is requested: a call that activated maqetd and is delivered the instant the name is
/// ours is never dropped.
pub async fn serve(
    builder: zbus::connection::Builder<'_>,
    paths: Paths,
    opts: Options,
) -> Result<(), MaqetError> {
    let (settings, problem) = Settings::load(&paths.settings_file());
    if let Some(p) = problem {
        tracing::warn!("{p}");
    }
    let idle_delay = match opts.idle_exit_sec {
        Some(0) => None,
        Some(s) => Some(Duration::from_secs(s)),
        None => settings.idle_exit(),
    };
    // A refused database (corrupt, newer, locked) is left untouched and the service
    // still answers, so every client is told what is wrong and what to do.
    let (store, refusal) = match open_store(&paths) {
        Ok(store) => {
            prune_audit(&store).await;
            (store, None)
        }
        Err(why) => {
            tracing::error!("{why}");
            let empty = Store::open_in_memory().map_err(|e| MaqetError::Storage(e.to_string()))?;
            (Arc::new(empty), Some(why))
        }
    };
    let (sink, events) = EventSink::new();
    let ctx = Arc::new(Ctx {
        paths,
        store: store.clone(),
        sink,
        path_env: std::env::var_os("PATH"),
        default_arch: std::env::consts::ARCH.to_string(),
        listing_epoch: Default::default(),
    });
    let manager = Manager::open(ctx).await?;
    manager.readopt_all().await;

    let idle = Idle::new();
    let policy_file = manager.ctx().paths.policy_file();
    let gate = Gate::new(store, Some(idle.clone()), refusal, policy_file);
    let shared = Arc::new(Shared {
        manager: manager.clone(),
        gate: gate.clone(),
        host: host::HostInfo::probe(),
        retired_jobs: job_iface::Retired::default(),
        witnesses: Default::default(),
        vm_list: Default::default(),
    });
    crate::images::remove_partial_imports(manager.ctx());
    crate::manager::remove_partial_clones(manager.ctx());
    let mut builder = builder
        .serve_at(MANAGER_PATH, ManagerServed::new(shared.clone()))
        .serve_at(MANAGER_PATH, ImagesIface::new(shared.clone()));
    let vms = manager.list();
    for vm in &vms {
        builder = vm_objects::serve_on(builder, &shared, vm);
    }
    // The desktop shells' launchers (docs/desktop.md).
    let builder = builder
        .serve_at(
            SEARCH_PROVIDER_PATH,
            SearchProviderIface::new(shared.clone()),
        )
        .serve_at(KRUNNER_PATH, KRunnerIface::new(shared.clone()));
    let conn = builder
        .serve_at(MANAGER_PATH, ObjectManagerIface::new(shared.clone()))
        .build()
        .await
        .map_err(|e| {
            MaqetError::Internal(format!(
                "cannot serve on the session bus ({e}); is DBUS_SESSION_BUS_ADDRESS set?"
            ))
        })?;
    // Before the name is ours: no caller sees zbus's own introspection, and no signal
    // goes out before the service knows who is on the bus.
    introspection::install(&conn, &shared)
        .await
        .map_err(|e| MaqetError::Internal(format!("cannot guard introspection: {e}")))?;
    gate.watch_bus(&conn).await;
    // Listening for notification clicks before the name is ours: a click on an earlier
    // maqetd's notification may be what activates this one.
    let notifier = Notifier::start(
        notify::Deps {
            conn: conn.clone(),
            gate: gate.clone(),
            manager: manager.clone(),
            activity: Some(idle.clone()),
        },
        settings.notifications.clone(),
    )
    .await;
    // This session's autostart VMs, chosen before any caller can add one.
    let autostart = crate::session::autostart::prepare(&manager);
    let mut flags = RequestNameFlags::DO_NOT_QUEUE | RequestNameFlags::ALLOW_REPLACEMENT;
    if opts.replace {
        flags |= RequestNameFlags::REPLACE_EXISTING;
    }
    conn.request_name_with_flags(BUS_NAME, flags)
        .await
        .map_err(|e| match e {
            zbus::Error::NameTaken => MaqetError::AlreadyExists(format!(
                "another maqetd already owns {BUS_NAME} on this bus; use it (maqet ls), or start this one with --replace to take over"
            )),
            other => MaqetError::Internal(format!("cannot own {BUS_NAME} ({other})")),
        })?;
    let session = SessionLife::start(conn.clone(), manager.clone(), Some(idle.clone()), autostart);
    let pump = tokio::spawn(pump::run(
        conn.clone(),
        shared.clone(),
        events,
        idle.clone(),
        notifier,
        session.clone(),
    ));
    tracing::info!(vms = vms.len(), "maqetd ready on {BUS_NAME}");

    let lost_name = async {
        let Ok(dbus) = zbus::fdo::DBusProxy::new(&conn).await else {
            return std::future::pending().await;
        };
        let Ok(mut lost) = dbus.receive_name_lost().await else {
            return std::future::pending().await;
        };
        use futures_util::StreamExt;
        while let Some(sig) = lost.next().await {
            if sig.args().is_ok_and(|a| a.name() == BUS_NAME) {
                return;
            }
        }
        std::future::pending().await
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| MaqetError::Internal(format!("cannot watch SIGTERM: {e}")))?;
    let idle_exit = async {
        match idle_delay {
            Some(d) => idle.until_idle(&manager, d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = conn.closed() => tracing::info!("session bus connection closed; exiting"),
        _ = idle_exit => tracing::info!("idle (no VM running, no calls); exiting until the next call activates maqetd"),
        _ = term.recv() => {
            session.service_stopping().await;
            tracing::info!("SIGTERM; exiting (running VMs keep running unless on_logout says otherwise)");
        }
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; exiting (running VMs keep running)"),
        _ = lost_name => tracing::info!("another maqetd took over {BUS_NAME}; exiting"),
    }
    let _ = conn.release_name(BUS_NAME).await;
    pump.abort();
    // Everything queued (audit records, denial counts, kept transitions) gets its
    // last write attempt.
    gate.close_audit().await;
    // Give in-flight replies a moment to leave.
    let _ = tokio::time::timeout(Duration::from_millis(200), conn.graceful_shutdown()).await;
    Ok(())
}

fn open_store(paths: &Paths) -> Result<Arc<Store>, String> {
    paths.ensure_data_dir().map_err(|e| e.to_string())?;
    Store::open(&paths.database())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Audit rows are kept 90 days, and at most the newest 100,000 of the service's own
/// user plus, separately, the newest 20,000 of everyone else (docs/security.md): a
/// stranger's flood of denied calls never prunes the owner's records. Pruned once per
/// start, never by a timer.
async fn prune_audit(store: &Store) {
    const KEEP: Duration = Duration::from_secs(90 * 86_400);
    const KEEP_OWN: usize = 100_000;
    const KEEP_STRANGERS: usize = 20_000;
    let cutoff = crate::time::now_us().saturating_sub(KEEP.as_micros() as u64);
    let owner = rustix::process::getuid().as_raw();
    let pruned = store
        .write(move |db| {
            Ok(db.prune_audit(cutoff)? + db.prune_audit_caps(owner, KEEP_OWN, KEEP_STRANGERS)?)
        })
        .await;
    match pruned {
        Ok(n) if n > 0 => tracing::info!(pruned = n, "old audit rows pruned"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot prune the audit log"),
    }
}
