//! What maqetd does between `fork` and `exec` of the processes it spawns (QEMU,
//! `qemu-img`): only async-signal-safe calls live here.

use std::io;
use std::os::fd::RawFd;

/// Makes `fd` available to the new program as `target`, without close-on-exec.
///
/// # Safety
/// Call only in a `pre_exec` hook, where nothing but async-signal-safe calls may run.
pub unsafe fn place_fd(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: fcntl and dup2 are async-signal-safe and touch only the fd table.
    unsafe {
        if fd == target {
            // dup2 onto itself would keep FD_CLOEXEC: clear it explicitly.
            if libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
        } else if libc::dup2(fd, target) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
