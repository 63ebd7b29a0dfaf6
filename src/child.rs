//! How maqetd starts the processes it spawns (QEMU, `qemu-img`, `swtpm`): what runs
//! between `fork` and `exec` (only async-signal-safe calls), and QEMU's own spawn,
//! which needs no `fork` at all ([`spawn_in_session`]).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

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

/// What a process started by [`spawn_in_session`] gets.
pub struct SpawnSpec<'a> {
    /// An absolute path (no `PATH` search).
    pub program: &'a Path,
    pub args: &'a [String],
    /// Variables to set (`Some`) or remove (`None`) in maqetd's environment.
    pub env: &'a [(&'a str, Option<&'a str>)],
    /// Each `(fd, number)`: the fd appears in the new program at that number, without
    /// close-on-exec; 1 and 2 (output) included. Standard input is `/dev/null`.
    pub fds: &'a [(RawFd, RawFd)],
}

/// Starts `spec.program` in a session of its own and returns its pid (unreaped: the
/// caller owns it, e.g. through a pidfd).
///
/// `posix_spawn` rather than `fork`: glibc starts the child with `CLONE_VM |
/// CLONE_VFORK`, so maqetd's page tables are not copied and nothing it writes afterwards
/// takes a copy-on-write fault. With many VMs started at once that copying was about a
/// quarter of maqetd's CPU per Start (docs/benchmarks.md, "Profiling: parallel Starts").
/// The calling thread waits until the child has exec'd (or failed to: the error is
/// returned).
pub fn spawn_in_session(spec: &SpawnSpec<'_>) -> io::Result<u32> {
    let cstr = |s: &[u8]| {
        CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in argument"))
    };
    let program = cstr(spec.program.as_os_str().as_bytes())?;
    let mut argv = vec![program.clone()];
    for a in spec.args {
        argv.push(cstr(a.as_bytes())?);
    }
    let mut envp = Vec::new();
    for (k, v) in environment(std::env::vars_os(), spec.env) {
        let mut kv = k.into_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(cstr(&kv)?);
    }
    // Every source is first duplicated above every target (close-on-exec), so no
    // placement can overwrite a source still to be placed, and none is its own target.
    let above = spec.fds.iter().map(|p| p.1).max().unwrap_or(2).max(2) + 1;
    let mut moved = Vec::with_capacity(spec.fds.len());
    for &(fd, target) in spec.fds {
        // SAFETY: fcntl on a caller-owned fd; the result is a new fd we own.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh fd owned by nobody else.
        moved.push((unsafe { OwnedFd::from_raw_fd(dup) }, target));
    }
    let ptrs = |v: &[CString]| {
        let mut p: Vec<*mut libc::c_char> = v.iter().map(|c| c.as_ptr() as *mut _).collect();
        p.push(std::ptr::null_mut());
        p
    };
    let (argv_p, envp_p) = (ptrs(&argv), ptrs(&envp));
    let dev_null = c"/dev/null";
    let check = |rc: libc::c_int| match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    };
    // SAFETY: the attribute and file-action objects are initialised before use and
    // destroyed on every path; every pointer handed to posix_spawn outlives the call.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        check(libc::posix_spawn_file_actions_init(&mut actions))?;
        if let Err(e) = check(libc::posix_spawnattr_init(&mut attr)) {
            libc::posix_spawn_file_actions_destroy(&mut actions);
            return Err(e);
        }
        let mut run = || -> io::Result<u32> {
            check(libc::posix_spawn_file_actions_addopen(
                &mut actions,
                0,
                dev_null.as_ptr(),
                libc::O_RDONLY,
                0,
            ))?;
            for (fd, target) in &moved {
                check(libc::posix_spawn_file_actions_adddup2(
                    &mut actions,
                    fd.as_raw_fd(),
                    *target,
                ))?;
            }
            // As std's spawn: an empty signal mask, and SIGPIPE (ignored by Rust's
            // runtime) back to its default.
            let mut none: libc::sigset_t = std::mem::zeroed();
            let mut pipe: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigemptyset(&mut pipe);
            libc::sigaddset(&mut pipe, libc::SIGPIPE);
            check(libc::posix_spawnattr_setsigmask(&mut attr, &none))?;
            check(libc::posix_spawnattr_setsigdefault(&mut attr, &pipe))?;
            let flags = libc::POSIX_SPAWN_SETSID as libc::c_int
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(
                &mut attr,
                flags as libc::c_short,
            ))?;
            let mut pid: libc::pid_t = 0;
            check(libc::posix_spawn(
                &mut pid,
                program.as_ptr(),
                &actions,
                &attr,
                argv_p.as_ptr(),
                envp_p.as_ptr(),
            ))?;
            Ok(pid as u32)
        };
        let out = run();
        libc::posix_spawnattr_destroy(&mut attr);
        libc::posix_spawn_file_actions_destroy(&mut actions);
        out
    }
}

/// `vars` with `changes` applied: `Some` sets (or replaces), `None` removes.
fn environment(
    vars: impl Iterator<Item = (OsString, OsString)>,
    changes: &[(&str, Option<&str>)],
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = vars
        .filter(|(k, _)| !changes.iter().any(|(c, _)| OsStr::new(c) == k))
        .collect();
    env.extend(
        changes
            .iter()
            .filter_map(|(k, v)| v.map(|v| (OsString::from(k), OsString::from(v)))),
    );
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_changes_set_replace_and_remove() {
        let vars = [("A", "1"), ("B", "2"), ("C", "3")]
            .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = environment(
            vars.into_iter(),
            &[("B", None), ("C", Some("4")), ("D", Some("5"))],
        );
        let got: Vec<(&str, &str)> = env
            .iter()
            .map(|(k, v)| (k.to_str().unwrap(), v.to_str().unwrap()))
            .collect();
        assert_eq!(got, [("A", "1"), ("C", "4"), ("D", "5")]);
    }

    /// A spawned program finds its fds at their numbers (crossed ones too), /dev/null
    /// on stdin, its own session, and the environment changes.
    #[test]
    fn spawned_program_gets_its_fds_session_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("out");
        let out = std::fs::File::create(&out_path).unwrap();
        let a = std::fs::File::open("/dev/zero").unwrap();
        let script = "readlink /proc/self/fd/0 /proc/self/fd/7; \
            [ \"$(cut -d' ' -f6 /proc/$$/stat)\" = \"$$\" ] && echo own-session; \
            echo \"x=$MAQET_CHILD_TEST y=${HOME:-unset}\"";
        let args = ["-c".to_string(), script.to_string()];
        let pid = spawn_in_session(&SpawnSpec {
            program: Path::new("/bin/sh"),
            args: &args,
            env: &[("MAQET_CHILD_TEST", Some("yes")), ("HOME", None)],
            fds: &[(out.as_raw_fd(), 1), (a.as_raw_fd(), 7)],
        })
        .unwrap();
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(
            unsafe { libc::waitpid(pid as i32, &mut status, 0) },
            pid as i32
        );
        let text = std::fs::read_to_string(&out_path).unwrap();
        assert_eq!(text, "/dev/null\n/dev/zero\nown-session\nx=yes y=unset\n");
    }

    #[test]
    fn a_missing_program_is_an_error_not_a_child() {
        let err = spawn_in_session(&SpawnSpec {
            program: Path::new("/nonexistent/qemu"),
            args: &[],
            env: &[],
            fds: &[],
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

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
