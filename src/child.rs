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

/// [`place_fd`] for several fds at once: a source that sits on another pair's target is
/// first moved above every target, so no placement overwrites a fd still to be placed.
///
/// # Safety
/// Call only in a `pre_exec` hook, where nothing but async-signal-safe calls may run.
pub unsafe fn place_fds(pairs: &mut [(RawFd, RawFd)]) -> io::Result<()> {
    let above = pairs.iter().map(|p| p.1).max().unwrap_or(0) + 1;
    for i in 0..pairs.len() {
        let (fd, target) = pairs[i];
        if fd != target && pairs.iter().any(|p| p.1 == fd) {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) is async-signal-safe.
            let moved = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above) };
            if moved < 0 {
                return Err(io::Error::last_os_error());
            }
            pairs[i].0 = moved;
        }
    }
    for &(fd, target) in pairs.iter() {
        // SAFETY: as above; the caller is in a pre_exec hook.
        unsafe { place_fd(fd, target)? };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Swapped fds end up where they belong (run in this process: no exec needed).
    #[test]
    fn crossed_fds_are_placed_without_clobbering() {
        let a = std::fs::File::open("/dev/null").unwrap();
        let b = std::fs::File::open("/proc/self/stat").unwrap();
        let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
        let ino = |fd: RawFd| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
        use std::os::unix::fs::MetadataExt;
        let (ia, ib) = (ino(fa).ino(), ino(fb).ino());
        // a goes where b is and b where a is.
        unsafe { place_fds(&mut [(fa, fb), (fb, fa)]).unwrap() };
        assert_eq!(ino(fb).ino(), ia);
        assert_eq!(ino(fa).ino(), ib);
    }
}
