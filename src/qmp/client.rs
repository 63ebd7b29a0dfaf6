//! The async QMP client: handshake, id-matched commands, in-order event forwarding.
//!
//! After the handshake a reader task routes replies to their waiting `execute` calls
//! and forwards events. A command is written by its caller when the socket takes it
//! whole at once, without waiting (the usual case: one small message, an empty send
//! buffer); otherwise it goes to a writer task, which sends each queued message whole,
//! and every later message queues behind it. No write awaits in the caller, so a
//! cancelled `execute` can never leave half a message on the wire, and the common
//! path costs no task hop (see `docs/benchmarks.md`, Profiling).
//! The connection ends at EOF, on an I/O or framing error, or when the last
//! [`QmpClient`] handle is dropped; then every pending command fails with
//! [`QmpError::Disconnected`] and the event channel closes.
//!
//! Commands are sent as short as QMP allows: no empty `arguments`, and the smallest id
//! not in use (an abandoned command's id stays in use until its late reply comes, so a
//! reply is never taken for another command's). QEMU 7.2 reads QMP input one byte per
//! poll of its monitor thread, about 1.8 µs a byte, so every byte before the closing
//! brace is latency (see `docs/benchmarks.md`, Profiling: QMP Execute latency).
//!
//! Over a unix socket ([`QmpClient::connect_unix`]) a command can carry a file
//! descriptor (`getfd`): the writer sends that message with `sendmsg` and SCM_RIGHTS on a
//! duplicate of the socket, in its turn, so the fd arrives with its own command.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

use crate::log_limit::LogLimiter;

use super::QmpError;
use super::wire::{self, Greeting, Message, QmpEvent};

#[cfg(test)]
mod tests;

type ReplySender = oneshot::Sender<Result<Value, QmpError>>;
type ReplyReceiver = oneshot::Receiver<Result<Value, QmpError>>;

/// A handle on one QMP connection. Cheap to clone; all clones share the connection,
/// which stays open while at least one clone exists (or until QEMU closes it).
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

/// Owned by the handles only: dropping the last handle drops `outgoing`, which tells the
/// writer task to close the connection.
struct Inner {
    shared: Arc<Shared>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    /// Whether the writer can pass file descriptors (a unix socket).
    passes_fds: bool,
}

/// One whole message for the writer, with the fd it carries, if any.
struct Outgoing {
    bytes: Vec<u8>,
    fd: Option<OwnedFd>,
}

/// The stream's write half, written by callers (whole messages, never waiting) and
/// by the writer task (queued messages).
type WriteHalf = Pin<Box<dyn AsyncWrite + Send>>;

struct Writer {
    /// `None` once the connection has ended.
    half: Option<WriteHalf>,
    /// Messages queued for the writer task and not yet written whole: while there
    /// are any, a new message queues behind them, so the wire keeps the call order.
    queued: usize,
}

/// Shared by the handles and both I/O tasks.
struct Shared {
    pending: Mutex<Pending>,
    writer: Mutex<Writer>,
    /// `true` once the connection has ended; never goes back.
    closed: watch::Sender<bool>,
    /// Messages QEMU sends that answer nothing (e.g. one error per leftover token after
    /// its JSON parser gave up on a huge command) are logged at this rate.
    stray: LogLimiter,
}

struct Pending {
    /// Checked under the same lock as `waiters`, so no command registers after the
    /// drain in `close` and waits forever.
    open: bool,
    /// Every id on the wire without its reply yet.
    waiters: HashMap<u64, Waiter>,
    /// Tells apart the commands that used the same id in turn.
    next_serial: u64,
}

struct Waiter {
    serial: u64,
    /// `None` once the caller gave up (cancelled, timed out): the id stays taken until
    /// QEMU's late reply arrives, then it is free again. (A command QEMU could not even
    /// parse gets no reply with its id, so that id stays taken: a few bytes, never a
    /// reply given to the wrong caller.)
    reply: Option<ReplySender>,
}

impl QmpClient {
    /// Reads the greeting, negotiates capabilities, then spawns the I/O tasks.
    ///
    /// Every event, from the handshake on, goes to `events` in arrival order; the channel
    /// is unbounded so the VM supervisor never misses a `STOP` or `SHUTDOWN`. When the
    /// connection ends the sender is dropped, so the receiver sees the channel close.
    ///
    /// Fails with [`QmpError::Disconnected`] on EOF before the greeting (QEMU exited
    /// during start-up), [`QmpError::Protocol`] if the first message is not a greeting,
    /// and [`QmpError::Command`] if QEMU refuses `qmp_capabilities`. There is no built-in
    /// deadline: wrap the call in `tokio::time::timeout` if the peer may hang.
    pub async fn connect<S>(
        stream: S,
        events: mpsc::UnboundedSender<QmpEvent>,
    ) -> Result<(QmpClient, Greeting), QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Self::connect_with_limit(stream, events, wire::MAX_LINE_BYTES, None).await
    }

    /// [`connect`](Self::connect) on a unix socket, which can also pass file descriptors
    /// ([`execute_with_fd`](Self::execute_with_fd)).
    pub async fn connect_unix(
        stream: tokio::net::UnixStream,
        events: mpsc::UnboundedSender<QmpEvent>,
    ) -> Result<(QmpClient, Greeting), QmpError> {
        let fd_socket = stream.as_fd().try_clone_to_owned()?;
        Self::connect_with_limit(stream, events, wire::MAX_LINE_BYTES, Some(fd_socket)).await
    }

    /// `connect` with a custom line cap, so tests can exercise it cheaply.
    async fn connect_with_limit<S>(
        stream: S,
        events: mpsc::UnboundedSender<QmpEvent>,
        max_line: usize,
        fd_socket: Option<OwnedFd>,
    ) -> Result<(QmpClient, Greeting), QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (reader, mut writer) = tokio::io::split(stream);
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();

        let greeting = match next_message(&mut reader, &mut line, max_line).await? {
            Message::Greeting(greeting) => greeting,
            _ => {
                return Err(QmpError::Protocol(format!(
                    "expected the QMP greeting, got: {}",
                    wire::excerpt(&line)
                )));
            }
        };
        tracing::debug!(version = %greeting.version, "QMP greeting received");

        write_message(
            &mut writer,
            &wire::encode(&json!({"execute": "qmp_capabilities"})),
        )
        .await?;
        loop {
            match next_message(&mut reader, &mut line, max_line).await? {
                Message::Reply { result, .. } => {
                    result?;
                    break;
                }
                Message::Event(event) => {
                    let _ = events.send(event);
                }
                Message::Greeting(_) => {
                    return Err(QmpError::Protocol(
                        "second greeting during capabilities negotiation".into(),
                    ));
                }
            }
        }

        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                open: true,
                waiters: HashMap::new(),
                next_serial: 0,
            }),
            writer: Mutex::new(Writer {
                half: Some(Box::pin(writer)),
                queued: 0,
            }),
            closed,
            stray: LogLimiter::new(),
        });
        let fd_socket = fd_socket.map(crate::fdio::writable).transpose()?;
        let passes_fds = fd_socket.is_some();
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        tokio::spawn(read_loop(reader, line, max_line, events, shared.clone()));
        tokio::spawn(write_loop(fd_socket, outgoing_rx, shared.clone()));
        let client = QmpClient {
            inner: Arc::new(Inner {
                shared,
                outgoing,
                passes_fds,
            }),
        };
        Ok((client, greeting))
    }

    /// Runs `command` and returns its `return` value. Any number of calls may be in
    /// flight at once, from any tasks; replies are matched by `id`.
    ///
    /// `arguments` must be a JSON object (else [`QmpError::InvalidArguments`], and
    /// nothing is sent). Dropping the future abandons the command: it may still run in
    /// QEMU, and its late reply is logged and ignored.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.send(command, arguments, None).await
    }

    /// [`execute`](Self::execute), passing `fd` to QEMU with the command (for `getfd`,
    /// `add-fd`). Only on a connection made by [`connect_unix`](Self::connect_unix).
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: OwnedFd,
    ) -> Result<Value, QmpError> {
        if !self.inner.passes_fds {
            return Err(QmpError::InvalidArguments(format!(
                "'{command}' passes a file descriptor, and this QMP connection is not a unix socket"
            )));
        }
        self.send(command, arguments, Some(fd)).await
    }

    async fn send(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
    ) -> Result<Value, QmpError> {
        let mut request = Map::new();
        request.insert("execute".into(), command.into());
        match arguments {
            None => {}
            // QMP reads no `arguments` as empty ones: the bytes are not worth sending.
            Some(Value::Object(arguments)) if arguments.is_empty() => {}
            Some(Value::Object(arguments)) => {
                request.insert("arguments".into(), Value::Object(arguments));
            }
            Some(other) => {
                return Err(QmpError::InvalidArguments(format!(
                    "arguments of '{command}' must be a JSON object, got {other}"
                )));
            }
        }
        let shared = &self.inner.shared;
        let (id, serial, reply) = shared.register()?;
        let _forget_on_drop = PendingGuard { shared, id, serial };
        request.insert("id".into(), id.into());
        tracing::debug!(command, id, "QMP command");
        self.inner
            .submit(wire::encode(&Value::Object(request)), fd)?;
        reply.await.unwrap_or(Err(QmpError::Disconnected))
    }

    /// [`execute`](Self::execute) with a deadline; on expiry the command is abandoned
    /// and [`QmpError::Timeout`] returned.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        tokio::time::timeout(timeout, self.execute(command, arguments))
            .await
            .unwrap_or(Err(QmpError::Timeout(timeout)))
    }

    /// Whether the connection is still open.
    pub fn is_connected(&self) -> bool {
        !*self.inner.shared.closed.borrow()
    }

    /// Resolves once the connection has ended (immediately if it already has).
    pub async fn closed(&self) {
        let mut closed = self.inner.shared.closed.subscribe();
        // The sender lives in `Shared`, which `self` keeps alive: this cannot fail.
        let _ = closed.wait_for(|closed| *closed).await;
    }

    /// Commands whose caller still waits for the reply.
    #[cfg(test)]
    fn pending_len(&self) -> usize {
        let pending = self.inner.shared.lock();
        pending
            .waiters
            .values()
            .filter(|w| w.reply.is_some())
            .count()
    }

    /// Ids on the wire without their reply yet, abandoned ones included.
    #[cfg(test)]
    fn ids_in_use(&self) -> usize {
        self.inner.shared.lock().waiters.len()
    }
}

impl Inner {
    /// Puts one whole message on the wire in call order: written here and now when
    /// nothing is queued and the socket takes all of it without waiting, else (the
    /// rest of it) queued for the writer task. Never awaits, so it cannot be
    /// cancelled half-way.
    fn submit(&self, bytes: Vec<u8>, fd: Option<OwnedFd>) -> Result<(), QmpError> {
        let mut writer = self.shared.lock_writer();
        let mut written = 0;
        if fd.is_none()
            && writer.queued == 0
            && let Some(half) = writer.half.as_mut()
        {
            let flushed;
            (written, flushed) = write_now(half.as_mut(), &bytes);
            if written == bytes.len() && flushed {
                return Ok(());
            }
        }
        // The rest, or nothing but the flush that did not complete at once.
        let bytes = if written == 0 {
            bytes
        } else {
            bytes[written..].to_vec()
        };
        // Queued under the writer lock, so no caller writes between this and it.
        self.outgoing
            .send(Outgoing { bytes, fd })
            .map_err(|_| QmpError::Disconnected)?;
        writer.queued += 1;
        Ok(())
    }
}

/// Writes as much of `bytes` as the stream takes without waiting: (how much, whether
/// it was all flushed too). An error writes nothing more here: the writer task meets
/// it again and closes the connection.
fn write_now(mut half: Pin<&mut (dyn AsyncWrite + Send)>, bytes: &[u8]) -> (usize, bool) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut written = 0;
    while written < bytes.len() {
        match half.as_mut().poll_write(&mut cx, &bytes[written..]) {
            Poll::Ready(Ok(n)) if n > 0 => written += n,
            _ => return (written, false),
        }
    }
    // A unix socket has nothing to flush; a stream that buffers is flushed by the
    // writer task when it cannot be at once.
    (
        written,
        matches!(half.poll_flush(&mut cx), Poll::Ready(Ok(()))),
    )
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpClient")
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // No code panics while holding the lock; recover rather than cascade if one did.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the smallest free id for a command: (id, serial, where its reply comes).
    fn register(&self) -> Result<(u64, u64, ReplyReceiver), QmpError> {
        let mut pending = self.lock();
        if !pending.open {
            return Err(QmpError::Disconnected);
        }
        // Few commands are in flight at once, so the scan is short.
        let id = (0..)
            .find(|id| !pending.waiters.contains_key(id))
            .expect("fewer than u64::MAX commands in flight");
        let serial = pending.next_serial;
        pending.next_serial += 1;
        let (tx, rx) = oneshot::channel();
        pending.waiters.insert(
            id,
            Waiter {
                serial,
                reply: Some(tx),
            },
        );
        Ok((id, serial, rx))
    }

    /// The caller of command `serial` gave up on it: its id stays taken until the late
    /// reply comes. Nothing to do if the reply came already (the id may be another
    /// command's by now).
    fn abandon(&self, id: u64, serial: u64) {
        if let Some(waiter) = self.lock().waiters.get_mut(&id)
            && waiter.serial == serial
        {
            waiter.reply = None;
        }
    }

    fn complete(&self, id: Option<Value>, result: Result<Value, QmpError>) {
        let Some(id) = id else {
            self.stray.warn("qmp-stray", || {
                tracing::warn!(?result, "QMP reply without id ignored");
            });
            return;
        };
        let waiter = id.as_u64().and_then(|id| self.lock().waiters.remove(&id));
        match waiter.map(|w| w.reply) {
            // The caller may have gone away in the meantime; nothing to do then.
            Some(Some(reply)) => drop(reply.send(result)),
            Some(None) => tracing::debug!(%id, "late QMP reply of an abandoned command ignored"),
            None => self.stray.warn("qmp-stray", || {
                tracing::warn!(%id, "QMP reply for an unknown id ignored");
            }),
        }
    }

    /// Ends the connection once: fails every pending command and wakes `closed()`.
    fn close(&self, reason: &str) {
        let waiters = {
            let mut pending = self.lock();
            if !pending.open {
                return;
            }
            pending.open = false;
            std::mem::take(&mut pending.waiters)
        };
        // The write half goes now (the reader's half goes with the reader task).
        drop(self.lock_writer().half.take());
        tracing::debug!(reason, failed = waiters.len(), "QMP connection closed");
        for reply in waiters.into_values().filter_map(|w| w.reply) {
            let _ = reply.send(Err(QmpError::Disconnected));
        }
        self.closed.send_replace(true);
    }
}

/// Abandons an `execute` call's command when the call ends before its reply, by
/// cancellation or timeout.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
    serial: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.abandon(self.id, self.serial);
    }
}

/// The next non-blank message during the handshake, where anything unexpected is fatal.
async fn next_message<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max_line: usize,
) -> Result<Message, QmpError> {
    loop {
        if !wire::read_line(reader, line, max_line).await? {
            return Err(QmpError::Disconnected);
        }
        if !line.trim_ascii().is_empty() {
            return wire::parse(line);
        }
    }
}

async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
) -> Result<(), QmpError> {
    writer.write_all(bytes).await?;
    writer.flush().await?;
    Ok(())
}

async fn read_loop<R: AsyncBufRead + Unpin>(
    mut reader: R,
    mut line: Vec<u8>,
    max_line: usize,
    events: mpsc::UnboundedSender<QmpEvent>,
    shared: Arc<Shared>,
) {
    let mut closed = shared.closed.subscribe();
    let reason = loop {
        let read = tokio::select! {
            biased;
            _ = closed.wait_for(|closed| *closed) => return,
            read = wire::read_line(&mut reader, &mut line, max_line) => read,
        };
        match read {
            Ok(true) => route(&line, &events, &shared),
            Ok(false) => break "end of stream".to_owned(),
            Err(err) => {
                tracing::warn!(%err, "QMP connection lost");
                break err.to_string();
            }
        }
    };
    // Close before `events` drops, so a receiver that sees the channel end also sees
    // `is_connected() == false`.
    shared.close(&reason);
}

/// One message from the running connection: a bad one is logged and skipped, never fatal.
fn route(line: &[u8], events: &mpsc::UnboundedSender<QmpEvent>, shared: &Shared) {
    if line.trim_ascii().is_empty() {
        return;
    }
    match wire::parse(line) {
        Ok(Message::Event(event)) => {
            tracing::debug!(event = %event.name, "QMP event");
            // A dropped receiver only means nobody listens for events; replies still matter.
            let _ = events.send(event);
        }
        Ok(Message::Reply { id, result }) => shared.complete(id, result),
        Ok(Message::Greeting(_)) => shared.stray.warn("qmp-stray", || {
            tracing::warn!("unexpected QMP greeting ignored");
        }),
        Err(err) => shared.stray.warn("qmp-stray", || {
            tracing::warn!(%err, "malformed QMP message ignored");
        }),
    }
}

async fn write_loop(
    fd_socket: Option<AsyncFd<OwnedFd>>,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut closed = shared.closed.subscribe();
    loop {
        let message = tokio::select! {
            biased;
            _ = closed.wait_for(|closed| *closed) => return,
            message = outgoing.recv() => message,
        };
        let Some(message) = message else {
            shared.close("every QmpClient handle was dropped");
            return;
        };
        // A peer that stops reading must not keep this task alive after the close.
        let written = tokio::select! {
            biased;
            _ = closed.wait_for(|closed| *closed) => return,
            written = write_outgoing(&shared, fd_socket.as_ref(), message) => written,
        };
        if let Err(err) = written {
            tracing::warn!(%err, "QMP write failed");
            shared.close(&err.to_string());
            return;
        }
        shared.lock_writer().queued -= 1;
    }
}

/// Writes and flushes a queued message through the shared write half, taking its lock
/// only while polling (callers see `queued` and wait their turn meanwhile).
async fn write_queued(shared: &Shared, bytes: &[u8]) -> Result<(), QmpError> {
    let mut written = 0;
    std::future::poll_fn(|cx| {
        let mut writer = shared.lock_writer();
        let Some(half) = writer.half.as_mut() else {
            return Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe)));
        };
        while written < bytes.len() {
            match half.as_mut().poll_write(cx, &bytes[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero)));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        half.as_mut().poll_flush(cx)
    })
    .await?;
    Ok(())
}

/// Writes one message; one carrying an fd goes out with `sendmsg` on the socket's
/// duplicate (the writer half buffers nothing, so the order on the wire is kept).
async fn write_outgoing(
    shared: &Shared,
    fd_socket: Option<&AsyncFd<OwnedFd>>,
    message: Outgoing,
) -> Result<(), QmpError> {
    let (Some(fd), Some(socket)) = (message.fd, fd_socket) else {
        return write_queued(shared, &message.bytes).await;
    };
    let sent = loop {
        let mut ready = socket.writable().await?;
        match ready.try_io(|s| send_with_fd(s.get_ref(), &message.bytes, &fd)) {
            Ok(sent) => break sent?,
            Err(_would_block) => continue,
        }
    };
    // The fd went with the first byte; a short send leaves the rest to the plain path.
    if sent < message.bytes.len() {
        write_queued(shared, &message.bytes[sent..]).await?;
    }
    Ok(())
}

fn send_with_fd(socket: &OwnedFd, bytes: &[u8], fd: &OwnedFd) -> io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd.as_fd()];
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let iov = [io::IoSlice::new(bytes)];
    Ok(sendmsg(socket, &iov, &mut control, SendFlags::NOSIGNAL)?)
}
