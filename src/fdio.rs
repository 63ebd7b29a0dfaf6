//! Putting a raw fd (pidfd, inotify) on the tokio reactor, in one place.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Watches `fd` for readability; the returned value owns it.
pub fn readable(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns `fd`, which stays open and unchanged for its lifetime.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(Into::into)
}

/// Watches `fd` for writability (sending on a socket's duplicate); the value owns it.
pub fn writable(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: as in `readable`.
    unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) }.map_err(Into::into)
}
