//! `org.maqet.Maqet1.Snapshots`: one per VM. Authorize, check, start the job, publish
//! it, return its path; the job itself runs in [`crate::snapshot`].

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, interface};

use super::options::{bool_option, check_keys};
use super::{Shared, job_iface};
use crate::access::{Action, Request};
use crate::client::SnapshotRow;
use crate::error::MaqetError;
use crate::snapshot::{self, Op};
use crate::vm::Vm;

/// The keys `Create` understands in `options`.
const CREATE_OPTIONS: &[&str] = &["overwrite"];

pub struct SnapshotsIface {
    shared: Arc<Shared>,
    vm: Arc<Vm>,
}

impl SnapshotsIface {
    pub fn new(shared: Arc<Shared>, vm: Arc<Vm>) -> SnapshotsIface {
        SnapshotsIface { shared, vm }
    }

    async fn start(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        action: Action,
        method: &'static str,
        op: Op,
        name: &str,
    ) -> Result<OwnedObjectPath, MaqetError> {
        let req = Request::new(action, method)
            .on_vm(&self.vm)
            .with_args(format!("name={name:?} op={op:?}"));
        let witnesses = &self.shared.witnesses;
        let work = async {
            // Its starter following it to the end sees the outcome (no notification).
            witnesses.job_called(self.vm.id(), hdr.sender().map(|s| s.as_str()));
            let job = snapshot::start(&self.vm, self.shared.manager.jobs(), op, name).await;
            witnesses.job_started(self.vm.id(), job.as_ref().ok().map(|j| j.id()));
            job_iface::publish(conn, &self.shared, job?).await
        };
        self.shared.gate.call(conn, hdr, req, work).await
    }
}

fn overwrite_option(options: &HashMap<String, OwnedVariant>) -> Result<bool, MaqetError> {
    check_keys(options, CREATE_OPTIONS, "snapshot")?;
    bool_option(options, "overwrite")
}

#[interface(name = "org.maqet.Maqet1.Snapshots")]
impl SnapshotsIface {
    /// Every snapshot: (name, VM state size in bytes, date in µs since the epoch, VM
    /// clock in ns), oldest first.
    #[zbus(out_args("snapshots"))]
    async fn list(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<SnapshotRow>, MaqetError> {
        let req = Request::new(Action::Observe, "Snapshots.List").on_vm(&self.vm);
        let work = async {
            Ok(snapshot::list(&self.vm)
                .await?
                .into_iter()
                .map(|s| (s.name, s.vm_state_size, s.date_us, s.vm_clock_ns))
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Starts taking a snapshot; returns the job. `options`: `overwrite` (b) replaces
    /// a snapshot of the same name instead of failing with `AlreadyExists`.
    #[zbus(out_args("job"))]
    async fn create(
        &self,
        name: &str,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, MaqetError> {
        let overwrite = overwrite_option(&options)?;
        let op = Op::Create { overwrite };
        self.start(
            conn,
            &hdr,
            Action::SnapshotCreate,
            "Snapshots.Create",
            op,
            name,
        )
        .await
    }

    /// Starts reverting the VM (running: RAM and disks; stopped: disks) to a snapshot.
    #[zbus(out_args("job"))]
    async fn load(
        &self,
        name: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, MaqetError> {
        self.start(
            conn,
            &hdr,
            Action::SnapshotLoad,
            "Snapshots.Load",
            Op::Load,
            name,
        )
        .await
    }

    /// Starts deleting a snapshot from every disk that has it.
    #[zbus(out_args("job"))]
    async fn delete(
        &self,
        name: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, MaqetError> {
        let op = Op::Delete;
        self.start(
            conn,
            &hdr,
            Action::SnapshotDelete,
            "Snapshots.Delete",
            op,
            name,
        )
        .await
    }
}
