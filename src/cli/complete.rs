//! Shell completion that knows the VMs: clap_complete's dynamic engine. The shell's
//! registration script (`maqet completions bash|zsh|fish`, installed by `maqet setup
//! --user`) runs `maqet` itself with `MAQET_COMPLETE=<shell>` on every Tab; maqet then
//! answers from its argument definitions, and for a VM argument asks maqetd for the
//! names (`ListVMs`), bounded by a short timeout so a missing service never hangs a Tab.

use std::time::Duration;

use clap::CommandFactory;
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use clap_complete::env::{Bash, CompleteEnv, EnvCompleter, Fish, Zsh};

use super::Cli;
use crate::client::ManagerProxy;

/// The variable that switches `maqet` into completion mode (not clap's generic
/// `COMPLETE`, which other programs' environments may set).
pub const VAR: &str = "MAQET_COMPLETE";

/// How long a Tab waits for maqetd (activating it included).
const SERVICE_WAIT: Duration = Duration::from_secs(3);

/// Answers a completion request and exits, when the shell's script asked for one.
pub fn answer_if_asked() {
    CompleteEnv::with_factory(Cli::command).var(VAR).complete();
}

/// The shells whose registration completes VM names.
pub fn dynamic_shell(shell: clap_complete::Shell) -> Option<&'static dyn EnvCompleter> {
    match shell {
        clap_complete::Shell::Bash => Some(&Bash),
        clap_complete::Shell::Zsh => Some(&Zsh),
        clap_complete::Shell::Fish => Some(&Fish),
        _ => None,
    }
}

/// The script that registers completion for `maqet` in `shell`, calling back
/// `completer` (the path of this maqet).
pub fn registration(shell: &dyn EnvCompleter, completer: &str) -> Vec<u8> {
    let mut script = Vec::new();
    // Writing into memory cannot fail.
    let _ = shell.write_registration(VAR, "maqet", "maqet", completer, &mut script);
    script
}

/// The completion source of every VM argument.
pub fn vm() -> ArgValueCandidates {
    ArgValueCandidates::new(vm_names)
}

/// VM names with their status as help, or nothing when maqetd cannot be asked.
fn vm_names() -> Vec<CompletionCandidate> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    rt.block_on(async {
        let ask = async {
            let conn = zbus::Connection::session().await.ok()?;
            let manager = ManagerProxy::new(&conn).await.ok()?;
            manager.list_vms().await.ok()
        };
        tokio::time::timeout(SERVICE_WAIT, ask)
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
            .into_iter()
            .map(|(_, name, _, status)| CompletionCandidate::new(name).help(Some(status.into())))
            .collect()
    })
}
