//! `tpm: true`: an emulated TPM 2.0 for a VM, served by an `swtpm` child of maqetd.
//!
//! maqetd makes a socket pair: one end becomes swtpm's control channel
//! (`--ctrl type=unixio,clientfd=3`), the other QEMU's `-chardev socket,fd=N` behind
//! `-tpmdev emulator` (QEMU passes swtpm its data channel over it). No socket file
//! exists, so nothing else can talk to the TPM. swtpm runs with `--terminate`: when QEMU
//! exits (or never starts) its end closes and swtpm exits too, so the TPM lives exactly
//! as long as the VM. Its state (`tpm2-00.permall`) is kept in the VM's data directory
//! (`<data>/vms/<id>/tpm/`, 0700), deleted with the VM's storage.
//!
//! Supervision, like QEMU's: swtpm is held by its pidfd ([`Process`]) and its pid and
//! start time are recorded (`tpm_processes`) as soon as it is spawned. A maqetd that
//! re-adopts the VM takes swtpm back after checking it is really this VM's (start
//! time, and `--tpmstate dir=<this VM's tpm dir>` on its command line), or finds it by
//! that mark when the record is missing or names another process. When QEMU ends
//! ([`end`]), swtpm gets [`EXIT_WAIT`] to end by itself, then SIGKILL through its
//! pidfd. An swtpm that dies while QEMU runs leaves the guest without a working TPM:
//! [`watch`] reports it (log, history, the VM's reason) and the VM keeps running.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustix::process::Signal;

use super::process::{Mark, Process};
use super::{Runtime, Vm};

/// The fd number swtpm finds its control channel at.
const CTRL_FD: i32 = 3;
/// The id of QEMU's chardev and tpmdev.
pub const TPM_ID: &str = "maqet-tpm";

/// How long swtpm may take to end after its QEMU did (it ends at once when its control
/// channel closes); then it is killed.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// How long QEMU may take to be seen gone after its swtpm ended: swtpm sees its
/// channel close while QEMU is still exiting, which is no TPM failure.
const QEMU_EXIT_GRACE: Duration = Duration::from_secs(3);

/// The VM's TPM state directory.
pub fn state_dir(vm_data_dir: &Path) -> PathBuf {
    vm_data_dir.join("tpm")
}

/// swtpm's `--tpmstate` argument for `state_dir`: also what marks it as this VM's.
fn state_arg(state_dir: &Path) -> String {
    format!(
        "dir={},mode=0600",
        crate::config::escape_commas(&state_dir.to_string_lossy())
    )
}

/// Starts swtpm on `state_dir` (created 0700 if missing). Returns QEMU's end of the
/// control channel and swtpm, held by its pidfd.
// swtpm is reaped through its pidfd (`Process`), not through `Child`.
#[allow(clippy::zombie_processes)]
pub fn start(swtpm: &Path, state_dir: &Path, log: &Path) -> io::Result<(OwnedFd, Process)> {
    crate::paths::create_private_dir(state_dir).map_err(io::Error::other)?;
    let (ours, theirs) = UnixStream::pair()?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(swtpm);
    cmd.arg("socket")
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(state_arg(state_dir))
        .arg("--ctrl")
        .arg(format!("type=unixio,clientfd={CTRL_FD}"))
        .arg("--terminate")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let mut pairs = [(theirs.as_raw_fd(), CTRL_FD)];
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            crate::child::place_fds(&mut pairs)
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    let process = match Process::from_child(child.id()) {
        Ok(p) => p,
        Err(e) => {
            // Not watchable: it ends with its channel, which goes with this error.
            drop(ours);
            let mut child = child;
            let _ = child.wait();
            return Err(e);
        }
    };
    Ok((OwnedFd::from(ours), process))
}

/// Re-finds the swtpm of a re-adopted VM: the recorded one if it is still this VM's,
/// else one that carries this VM's mark (a record lost, or naming a process that reused
/// the pid: that process is never touched). Err says why there is none.
pub fn readopt(recorded: Option<(u32, u64)>, state_dir: &Path) -> Result<Process, String> {
    let arg = state_arg(state_dir);
    let mark = Mark {
        flag: "--tpmstate",
        value: &arg,
    };
    let refused = match recorded {
        Some((pid, start)) => match Process::adopt_marked(pid, start, mark) {
            Ok(p) => return Ok(p),
            Err(e) => Some(e.to_string()),
        },
        None => None,
    };
    let found = super::process::find_marked(mark)
        .map(|(pid, start)| Process::adopt_marked(pid, start, mark));
    match (found, refused) {
        (Some(Ok(p)), _) => Ok(p),
        (Some(Err(e)), _) => Err(e.to_string()),
        (None, Some(why)) => Err(why),
        (None, None) => Err("no swtpm of this VM runs".into()),
    }
}

/// After QEMU ended: swtpm gets [`EXIT_WAIT`] to end by itself (it normally does at
/// once), then SIGKILL through its pidfd, which can only hit this swtpm.
pub async fn end(tpm: &Process) {
    if tokio::time::timeout(EXIT_WAIT, tpm.wait()).await.is_ok() {
        return;
    }
    tracing::warn!(
        pid = tpm.pid(),
        "swtpm did not end within {} s of its QEMU; killing it",
        EXIT_WAIT.as_secs()
    );
    let _ = tpm.signal(Signal::KILL);
    tpm.wait().await;
}

/// Watches the running VM's swtpm: if it dies while QEMU runs, the guest's TPM stops
/// answering. maqet keeps the VM running (stopping it could lose the guest's work) and
/// says so in the log, the history and the VM's reason; a restart of the VM brings the
/// TPM back.
pub(super) fn watch(vm: Arc<Vm>, rt: Arc<Runtime>) {
    let Some(tpm) = rt.tpm.clone() else {
        return;
    };
    tokio::spawn(async move {
        let exit = tpm.wait().await;
        if rt.wait_exited(QEMU_EXIT_GRACE).await || rt.process.try_reap().is_some() {
            return;
        }
        let name = vm.name();
        let reason = format!(
            "its TPM is gone: swtpm (pid {}) {}; the guest's TPM no longer answers; restart the VM to get it back",
            tpm.pid(),
            exit.describe()
        );
        tracing::error!(vm = %name, "{reason}");
        vm.forget_tpm().await;
        let detail = serde_json::json!({ "pid": tpm.pid(), "exit": exit.as_property() });
        if let Err(e) = vm
            .ctx
            .store
            .record_event(&vm.id, &name, "tpm", reason.clone(), Some(detail))
            .await
        {
            tracing::warn!(vm = %name, error = %e, "cannot record the TPM's end in history");
        }
        let status = vm.status();
        if status.has_process() {
            vm.explain(status, &reason).await;
        }
    });
}

impl Vm {
    /// Records the VM's swtpm so a later maqetd can find it again.
    pub(super) async fn record_tpm(&self, tpm: &Process) {
        let (id, pid, start) = (self.id.clone(), tpm.pid(), tpm.start_time());
        let recorded = self
            .ctx
            .store
            .write(move |db| db.record_tpm_process(&id, pid, start))
            .await;
        if let Err(e) = recorded {
            tracing::warn!(vm = %self.name(), pid, error = %e, "cannot record the swtpm's pid");
        }
    }

    /// Forgets the VM's swtpm record (it ended).
    pub(super) async fn forget_tpm(&self) {
        let id = self.id.clone();
        if let Err(e) = self
            .ctx
            .store
            .write(move |db| db.forget_tpm_process(&id))
            .await
        {
            tracing::warn!(vm = %self.name(), error = %e, "cannot forget the swtpm's pid");
        }
    }

    /// The recorded swtpm of this VM, if any.
    pub(super) async fn recorded_tpm(&self) -> Option<(u32, u64)> {
        let id = self.id.clone();
        self.ctx
            .store
            .read(move |db| db.tpm_process(&id))
            .await
            .ok()
            .flatten()
    }

    /// Ends the swtpm of a QEMU that ended ([`end`]) and forgets it.
    pub(super) async fn end_tpm(&self, tpm: &Process) {
        end(tpm).await;
        self.forget_tpm().await;
    }
}

/// QEMU's options for the TPM whose control channel QEMU finds at fd `n`: a TIS device,
/// which both `pc` and `q35` machines take.
pub fn qemu_args(n: i32) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id={TPM_ID},fd={n}"),
        "-tpmdev".into(),
        format!("emulator,id={TPM_ID}0,chardev={TPM_ID}"),
        "-device".into(),
        format!("tpm-tis,tpmdev={TPM_ID}0"),
    ]
}
