//! What the desktop shells' launchers share (GNOME Shell's search provider, KDE's
//! KRunner): which VMs a query finds and in what order, how a result is described, and
//! what activating one does. docs/desktop.md explains the choices.

use std::sync::Arc;

use crate::error::MaqetError;
use crate::manager::Manager;
use crate::vm::{Status, Vm, VmInfo};

/// The icon both shells show next to a VM (the themed icon `maqet setup --user`
/// installs).
pub const ICON: &str = "org.maqet.Maqet";

/// How well a VM's name answers a query; higher is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fit {
    /// Every term is somewhere in the name.
    Contains,
    /// The name starts with the first term.
    Prefix,
    /// The name is the whole query.
    Exact,
}

/// How `name` answers `terms` (each term must occur in the name, ignoring case), or
/// `None`. An empty query finds nothing: the shells never list everything.
pub fn fit(name: &str, terms: &[String]) -> Option<Fit> {
    let terms: Vec<String> = terms
        .iter()
        .map(|t| t.trim().to_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let name = name.to_lowercase();
    if terms.is_empty() || !terms.iter().all(|t| name.contains(t.as_str())) {
        return None;
    }
    Some(if name == terms.join(" ") {
        Fit::Exact
    } else if name.starts_with(terms[0].as_str()) {
        Fit::Prefix
    } else {
        Fit::Contains
    })
}

/// The VMs `terms` find, best first (then by name), with how well each fits.
pub fn search<'a>(
    vms: impl IntoIterator<Item = &'a Arc<Vm>>,
    terms: &[String],
) -> Vec<(Arc<Vm>, Fit)> {
    let mut found: Vec<(Arc<Vm>, Fit, String)> = vms
        .into_iter()
        .filter_map(|vm| {
            let name = vm.name();
            fit(&name, terms).map(|f| (vm.clone(), f, name))
        })
        .collect();
    found.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.2.cmp(&b.2)));
    found.into_iter().map(|(vm, f, _)| (vm, f)).collect()
}

/// The words under the VM's name: its status, and for a VM that crashed or failed,
/// why (the first line, shortened: a launcher shows one line).
pub fn describe(info: &VmInfo) -> String {
    let status = info.status.as_str();
    let reason = info.reason.lines().next().unwrap_or("").trim();
    if matches!(info.status, Status::Crashed | Status::Failed) && !reason.is_empty() {
        const MAX: usize = 80;
        let short: String = reason.chars().take(MAX).collect();
        let more = if reason.chars().count() > MAX {
            "…"
        } else {
            ""
        };
        format!("{status}: {short}{more}")
    } else {
        status.to_string()
    }
}

/// A result id the shell hands back (the VM's UUID), or a clear answer when the VM has
/// been removed since the search.
pub fn result_vm(manager: &Manager, id: &str) -> Result<Arc<Vm>, MaqetError> {
    manager.get(id).ok_or_else(|| {
        MaqetError::NotFound(format!(
            "the VM of this search result (id {id}) no longer exists: it was removed after the search; search again, or `maqet ls`"
        ))
    })
}

/// What activating a result does: a VM that is not running is started (a paused one
/// resumed); a running one is left as it is (opening its display is a later feature).
pub async fn activate(vm: &Arc<Vm>) -> Result<(), MaqetError> {
    let done = match vm.status() {
        Status::Created | Status::Stopped | Status::Crashed | Status::Failed => vm.start().await,
        Status::Paused => vm.resume().await,
        Status::Starting | Status::Running | Status::Stopping => Ok(()),
    };
    Ok(done?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_term_must_occur_and_case_is_ignored() {
        assert_eq!(fit("web-server", &terms(&["WEB"])), Some(Fit::Prefix));
        assert_eq!(fit("web-server", &terms(&["serv"])), Some(Fit::Contains));
        assert_eq!(fit("web-server", &terms(&["web", "srv"])), None);
        assert_eq!(
            fit("web-server", &terms(&["server", "web"])),
            Some(Fit::Contains)
        );
        assert_eq!(fit("Web", &terms(&["web"])), Some(Fit::Exact));
        assert_eq!(fit("web", &terms(&[])), None);
        assert_eq!(fit("web", &terms(&["  ", ""])), None);
    }

    #[test]
    fn exact_beats_prefix_beats_contains() {
        assert!(Fit::Exact > Fit::Prefix && Fit::Prefix > Fit::Contains);
    }
}
