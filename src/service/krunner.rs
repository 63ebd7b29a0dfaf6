//! `org.kde.krunner1` at [`KRUNNER_PATH`]: KDE's launcher (KRunner, the Plasma search)
//! lists VMs by name with their status, and runs Start and Stop on them. Plasma finds
//! this object through `krunner/dbusplugins/org.maqet.Maqet1.desktop` (installed by
//! `maqet setup --user`). Every method goes through the access gate; queries are never
//! recorded.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::{Connection, OwnedVariant, Variant, interface};

use super::Shared;
use super::shell_search::{self, Fit, ICON};
use super::vm_iface::DEFAULT_STOP_TIMEOUT;
use crate::access::{Action, Origin, Request};
use crate::error::MaqetError;
use crate::vm::Status;

/// Where KRunner calls the runner (`X-Plasma-DBusRunner-Path` of the .desktop file).
pub const KRUNNER_PATH: &str = "/org/maqet/Maqet1/krunner";

/// (id, text, icon) of the actions a match can offer.
const ACTIONS: [(&str, &str, &str); 2] = [
    (ACTION_START, "Start", "media-playback-start"),
    (ACTION_STOP, "Stop", "media-playback-stop"),
];
const ACTION_START: &str = "start";
const ACTION_STOP: &str = "stop";

/// One match: (id, text, icon, category relevance, relevance, properties).
type Match = (
    String,
    String,
    String,
    i32,
    f64,
    HashMap<String, OwnedVariant>,
);

/// KRunner's category relevance (Plasma 5's `QueryMatch::Type`, the same numbers as
/// Plasma 6's `CategoryRelevance`): an exact name, or a possible match.
fn category(fit: Fit) -> (i32, f64) {
    match fit {
        Fit::Exact => (100, 1.0),
        Fit::Prefix => (30, 0.8),
        Fit::Contains => (30, 0.6),
    }
}

/// The actions that make sense in `status` (KRunner shows only these).
fn actions_for(status: Status) -> Vec<String> {
    let ids: &[&str] = match status {
        Status::Created | Status::Stopped | Status::Crashed | Status::Failed => &[ACTION_START],
        Status::Paused => &[ACTION_START, ACTION_STOP],
        Status::Starting | Status::Running => &[ACTION_STOP],
        Status::Stopping => &[],
    };
    ids.iter().map(|s| s.to_string()).collect()
}

pub struct KRunnerIface {
    shared: Arc<Shared>,
}

impl KRunnerIface {
    pub fn new(shared: Arc<Shared>) -> KRunnerIface {
        KRunnerIface { shared }
    }
}

#[interface(name = "org.kde.krunner1")]
impl KRunnerIface {
    /// The actions matches can offer: (id, text, icon name).
    #[zbus(out_args("matches"))]
    async fn actions(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String, String)>, MaqetError> {
        let req = Request::new(Action::Observe, "Actions").via(Origin::KRunner);
        let work = async {
            Ok(ACTIONS
                .iter()
                .map(|(id, text, icon)| (id.to_string(), text.to_string(), icon.to_string()))
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// The VMs whose names contain every word of `query`: (VM id, name, icon, category
    /// relevance, relevance, {subtext: status, actions: the ids that apply}).
    #[zbus(out_args("matches"))]
    async fn r#match(
        &self,
        query: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<Match>, MaqetError> {
        let terms: Vec<String> = query.split_whitespace().map(str::to_string).collect();
        let req = Request::new(Action::Observe, "Match")
            .with_args(format!("{} search terms", terms.len()))
            .via(Origin::KRunner);
        let work = async {
            let vms = self.shared.manager.list();
            Ok(shell_search::search(&vms, &terms)
                .into_iter()
                .map(|(vm, fit)| {
                    let (kind, relevance) = category(fit);
                    vm.with_info(|i| {
                        let props = [
                            ("subtext", Variant::from(shell_search::describe(i))),
                            ("actions", Variant::from(actions_for(i.status))),
                        ]
                        .into_iter()
                        .filter_map(|(k, v)| Some((k.to_string(), OwnedVariant::try_from(v).ok()?)))
                        .collect();
                        (
                            i.id.clone(),
                            i.name.clone(),
                            ICON.to_string(),
                            kind,
                            relevance,
                            props,
                        )
                    })
                })
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Runs `action_id` on the VM `match_id`: `start` (resumes a paused VM), `stop`
    /// (ACPI power-down, escalating like `VM.Stop`), or "" (the match itself was chosen:
    /// like GNOME's ActivateResult, start it unless it runs).
    async fn run(
        &self,
        match_id: &str,
        action_id: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let target = shell_search::result_vm(&self.shared.manager, match_id);
        let mut req = Request::new(Action::Lifecycle, "Run")
            .with_args(format!("match={match_id:?} action={action_id:?}"))
            .via(Origin::KRunner);
        if let Ok(vm) = &target {
            req = req.on_vm(vm);
        }
        let work = async {
            let vm = target?;
            match action_id {
                "" => shell_search::activate(&vm).await,
                ACTION_START if vm.status() == Status::Paused => Ok(vm.resume().await?),
                ACTION_START => Ok(vm.start().await?),
                ACTION_STOP => Ok(vm.stop(false, DEFAULT_STOP_TIMEOUT).await?),
                other => Err(MaqetError::InvalidArgument(format!(
                    "unknown KRunner action '{other}'; maqet offers: start, stop"
                ))),
            }
        };
        self.shared.gate.call(conn, &hdr, req, work).await
    }
}
