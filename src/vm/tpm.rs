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
//! Supervision is that coupling: a thread of maqetd reaps swtpm. After a maqetd restart
//! an adopted VM keeps its swtpm (reaped by the session's subreaper or init), but
//! maqetd does not track that swtpm's pid.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// The fd number swtpm finds its control channel at.
const CTRL_FD: i32 = 3;
/// The id of QEMU's chardev and tpmdev.
pub const TPM_ID: &str = "maqet-tpm";

/// Starts swtpm on `state_dir` (created 0700 if missing). Returns QEMU's end of the
/// control channel.
pub fn start(swtpm: &Path, state_dir: &Path, log: &Path) -> io::Result<OwnedFd> {
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
        .arg(format!(
            "dir={},mode=0600",
            crate::config::escape_commas(&state_dir.to_string_lossy())
        ))
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
    let mut child = cmd.spawn()?;
    drop(theirs);
    let pid = child.id();
    std::thread::Builder::new()
        .name(format!("swtpm-{pid}"))
        .spawn(move || {
            let status = child.wait();
            tracing::debug!(pid, ?status, "swtpm exited");
        })?;
    Ok(OwnedFd::from(ours))
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
