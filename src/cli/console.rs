//! `maqet console VM`: this terminal on the VM's serial port, through the connected
//! socket `VM.OpenConsole` hands over.
//!
//! A terminal is put in raw mode (every key goes to the guest, Ctrl-C included) and
//! restored on every way out: the detach key, the console closing (the VM stopped),
//! SIGTERM/SIGHUP, an error, a panic. Ctrl-] detaches, as in telnet. Without a terminal
//! (a pipe) bytes are copied as they are, and the end of input also detaches, once the
//! guest has answered: after [`ANSWER_QUIET`] without output (waiting at most
//! [`ANSWER_WAIT`] for the first byte).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use rustix::termios::{self, OptionalActions, Termios};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::session::{Session, vm};
use crate::error::MaqetError;

/// Ctrl-] (GS), telnet's escape.
pub const DETACH_KEY: u8 = 0x1d;
/// After the end of piped input: how long the guest has to start answering…
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// …and how long a pause in its output ends the answer.
const ANSWER_QUIET: std::time::Duration = std::time::Duration::from_millis(500);

pub(super) async fn run(s: &Session, name: &str) -> Result<(), MaqetError> {
    if s.json {
        return Err(MaqetError::InvalidArgument(
            "console is interactive: --json does not apply".into(),
        ));
    }
    s.need_fd_passing("console")?;
    let (_, proxy) = vm(s, name).await?;
    let fd: OwnedFd = proxy.open_console().await?.into();
    let socket = std::os::unix::net::UnixStream::from(fd);
    let socket = socket
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(socket))
        .map_err(|e| io_error("cannot use the console socket", e))?;
    attach(socket, name).await
}

async fn attach(socket: tokio::net::UnixStream, name: &str) -> Result<(), MaqetError> {
    eprintln!("maqet: connected to the serial console of {name}; Ctrl-] detaches");
    let raw = RawMode::enter();
    let (mut from_vm, mut to_vm) = socket.into_split();
    let mut keys = stdin_reader();
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut buf = [0u8; 4096];
    // Set once the input ended: detach when the guest's answer is over.
    let mut answer_by: Option<tokio::time::Instant> = None;
    let why = loop {
        tokio::select! {
            n = from_vm.read(&mut buf) => {
                let n = n.map_err(|e| io_error("reading the console", e))?;
                if n == 0 {
                    break "the console closed (the VM stopped?)";
                }
                if answer_by.is_some() {
                    answer_by = Some(tokio::time::Instant::now() + ANSWER_QUIET);
                }
                let mut out = std::io::stdout().lock();
                out.write_all(&buf[..n])
                    .and_then(|()| out.flush())
                    .map_err(|e| io_error("writing to the terminal", e))?;
            }
            _ = sleep_until_some(answer_by) => break "end of input",
            chunk = keys.recv(), if answer_by.is_none() => {
                let Some(chunk) = chunk else {
                    answer_by = Some(tokio::time::Instant::now() + ANSWER_WAIT);
                    continue;
                };
                let (send, detach) = match chunk.iter().position(|b| *b == DETACH_KEY) {
                    Some(i) => (&chunk[..i], true),
                    None => (&chunk[..], false),
                };
                to_vm
                    .write_all(send)
                    .await
                    .map_err(|e| io_error("writing to the console", e))?;
                if detach {
                    break "detached";
                }
            }
            _ = term.recv() => break "terminated",
            _ = hup.recv() => break "hung up",
        }
    };
    drop(raw);
    eprintln!("\r\nmaqet: {why} ({name})");
    Ok(())
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn signal(
    kind: tokio::signal::unix::SignalKind,
) -> Result<tokio::signal::unix::Signal, MaqetError> {
    tokio::signal::unix::signal(kind).map_err(|e| io_error("cannot watch signals", e))
}

fn io_error(what: &str, e: std::io::Error) -> MaqetError {
    MaqetError::Internal(format!("{what}: {e}"))
}

/// Standard input, read on a thread of its own (a blocking read; setting O_NONBLOCK on a
/// terminal the shell shares would leak into the shell).
fn stdin_reader() -> mpsc::UnboundedReceiver<Vec<u8>> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// The terminal in raw mode until dropped (nothing when stdin is not a terminal).
struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        raw.make_raw();
        if termios::tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw).is_err() {
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), OptionalActions::Now, saved);
        }
    }
}
