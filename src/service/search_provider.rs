//! `org.gnome.Shell.SearchProvider2` at [`SEARCH_PROVIDER_PATH`]: typing a VM's name in
//! GNOME Shell's overview lists it with its status; activating it starts it. GNOME finds
//! this object through `gnome-shell/search-providers/org.maqet.Maqet1.search-provider.ini`
//! (installed by `maqet setup --user`). Every method goes through the access gate; search
//! terms are never recorded (people type anything into the overview).

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::{Connection, OwnedVariant, Variant, interface};

use super::Shared;
use super::shell_search::{self, ICON};
use crate::access::{Action, Origin, Request};
use crate::error::MaqetError;

/// Where GNOME Shell calls the search provider (the `ObjectPath` of the .ini file).
pub const SEARCH_PROVIDER_PATH: &str = "/org/maqet/Maqet1/SearchProvider";

pub struct SearchProviderIface {
    shared: Arc<Shared>,
}

impl SearchProviderIface {
    pub fn new(shared: Arc<Shared>) -> SearchProviderIface {
        SearchProviderIface { shared }
    }

    /// The ids (VM UUIDs) of the VMs `terms` find, best first, limited to `within` when
    /// given.
    async fn results(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        method: &'static str,
        terms: &[String],
        within: Option<&[String]>,
    ) -> Result<Vec<String>, MaqetError> {
        let req = Request::new(Action::Observe, method)
            .with_args(format!("{} search terms", terms.len()))
            .via(Origin::GnomeSearch);
        let work = async {
            let vms = self.shared.manager.list();
            let found = shell_search::search(&vms, terms);
            Ok(found
                .into_iter()
                .map(|(vm, _)| vm.id().to_string())
                .filter(|id| within.is_none_or(|w| w.contains(id)))
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, hdr, req, work)
            .await
    }
}

fn entry(key: &str, value: Variant<'_>) -> Option<(String, OwnedVariant)> {
    Some((key.to_string(), OwnedVariant::try_from(value).ok()?))
}

#[interface(name = "org.gnome.Shell.SearchProvider2")]
impl SearchProviderIface {
    /// The VMs whose names contain every term (ignoring case): their ids, best first.
    #[zbus(out_args("results"))]
    async fn get_initial_result_set(
        &self,
        terms: Vec<String>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<String>, MaqetError> {
        self.results(conn, &hdr, "GetInitialResultSet", &terms, None)
            .await
    }

    /// The same search, narrowed to the previous results (the user typed more).
    #[zbus(out_args("results"))]
    async fn get_subsearch_result_set(
        &self,
        previous_results: Vec<String>,
        terms: Vec<String>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<String>, MaqetError> {
        self.results(
            conn,
            &hdr,
            "GetSubsearchResultSet",
            &terms,
            Some(&previous_results),
        )
        .await
    }

    /// For each id still naming a VM: `id`, `name`, `description` (its status) and
    /// `gicon` (a themed icon name). Ids of VMs removed meanwhile are left out.
    #[zbus(out_args("metas"))]
    async fn get_result_metas(
        &self,
        identifiers: Vec<String>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<HashMap<String, OwnedVariant>>, MaqetError> {
        let req = Request::new(Action::Observe, "GetResultMetas")
            .with_args(format!("{} results", identifiers.len()))
            .via(Origin::GnomeSearch);
        let work = async {
            let manager = &self.shared.manager;
            Ok(identifiers
                .iter()
                .filter_map(|id| manager.get(id))
                .map(|vm| {
                    vm.with_info(|i| {
                        [
                            entry("id", Variant::from(i.id.clone())),
                            entry("name", Variant::from(i.name.clone())),
                            entry("description", Variant::from(shell_search::describe(i))),
                            entry("gicon", Variant::from(ICON)),
                        ]
                        .into_iter()
                        .flatten()
                        .collect()
                    })
                })
                .collect())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Starts the VM if it is not running (resumes it if paused); a running VM is left
    /// as it is. A VM removed since the search gets `NotFound` saying so.
    async fn activate_result(
        &self,
        identifier: &str,
        terms: Vec<String>,
        timestamp: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let _ = (terms, timestamp);
        let target = shell_search::result_vm(&self.shared.manager, identifier);
        let mut req = Request::new(Action::Lifecycle, "ActivateResult")
            .with_args(format!("result={identifier:?}"))
            .via(Origin::GnomeSearch);
        if let Ok(vm) = &target {
            req = req.on_vm(vm);
        }
        let work = async { shell_search::activate(&target?).await };
        self.shared.gate.call(conn, &hdr, req, work).await
    }

    /// maqet has no window to continue the search in: this does nothing (see
    /// docs/desktop.md).
    async fn launch_search(
        &self,
        terms: Vec<String>,
        timestamp: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let _ = timestamp;
        let req = Request::new(Action::Observe, "LaunchSearch")
            .with_args(format!("{} search terms", terms.len()))
            .via(Origin::GnomeSearch);
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, async { Ok(()) })
            .await
    }
}
