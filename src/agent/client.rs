//! One connection to a guest agent: serialised requests, resynchronisation, deadlines.
//!
//! Requests go one at a time (a lock around the stream): the protocol has no ids, so the
//! next reply on the stream belongs to the request just sent, *if* the stream is in step.
//! It is in step after a successful `guest-sync-delimited` and stays so while every
//! request completes. A timeout, a cancelled call, garbage or an over-long reply marks it
//! out of step, and the next request resynchronises first: send `0xFF` (resets the
//! agent's parser), then `guest-sync-delimited` with a fresh random id, and discard
//! everything until the `0xFF`-prefixed reply carrying that id. A restarted agent (its
//! port closed and reopened inside the guest) is handled the same way.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

use super::AgentError;
use super::wire;

/// What the client accepts from the guest.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The longest reply line. qemu-ga caps `guest-exec` output at 16 MiB per stream,
    /// which base64 makes about 22 MiB each; 64 MiB holds both with room.
    pub max_reply: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_reply: 64 << 20,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<S: AsyncRead + AsyncWrite + Send + Unpin> Stream for S {}

struct Conn {
    stream: BufReader<Box<dyn Stream>>,
    /// The next reply on the stream answers the next request.
    in_step: bool,
    /// The stream ended; every later call fails with `Disconnected`.
    closed: bool,
    line: Vec<u8>,
}

/// A guest agent connection. Cheap to share behind an `Arc`; calls are serialised.
pub struct AgentClient {
    conn: Mutex<Conn>,
    limits: Limits,
}

impl AgentClient {
    /// Wraps a connected stream (the host end of the agent's channel). No I/O yet: the
    /// first call synchronises.
    pub fn new<S>(stream: S, limits: Limits) -> AgentClient
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        AgentClient {
            conn: Mutex::new(Conn {
                stream: BufReader::new(Box::new(stream)),
                in_step: false,
                closed: false,
                line: Vec::new(),
            }),
            limits,
        }
    }

    /// Synchronises now (even when in step): proves an agent answers. Used on connect
    /// and when the guest reopens the agent's port.
    pub async fn sync(&self, timeout: Duration) -> Result<(), AgentError> {
        let mut conn = self.conn.lock().await;
        if conn.closed {
            return Err(AgentError::Disconnected);
        }
        conn.in_step = false;
        let result = tokio::time::timeout(timeout, resync(&mut conn, self.limits)).await;
        settle(&mut conn, result, timeout)
    }

    /// Sends `command` and returns its `return` value. The whole call, including a
    /// resynchronisation, has `timeout`.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let mut conn = self.conn.lock().await;
        if conn.closed {
            return Err(AgentError::Disconnected);
        }
        let limits = self.limits;
        let result = tokio::time::timeout(timeout, async {
            send(&mut conn, command, arguments.as_ref(), limits).await?;
            let conn = &mut *conn;
            wire::read_line(&mut conn.stream, &mut conn.line, limits.max_reply).await?;
            let reply = wire::parse_reply(&conn.line, command);
            // A refusal is a well-formed reply: the stream is still in step.
            if matches!(reply, Ok(_) | Err(AgentError::Command { .. })) {
                conn.in_step = true;
            }
            reply
        })
        .await;
        settle(&mut conn, result, timeout)
    }

    /// Sends a command that answers nothing when it succeeds (`guest-shutdown`). The
    /// stream stays out of step afterwards (an error reply may still come).
    pub async fn send_only(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let mut conn = self.conn.lock().await;
        if conn.closed {
            return Err(AgentError::Disconnected);
        }
        let result = tokio::time::timeout(
            timeout,
            send(&mut conn, command, arguments.as_ref(), self.limits),
        )
        .await;
        settle(&mut conn, result, timeout)
    }

    /// Whether the stream has ended (then only a new connection helps).
    pub async fn is_closed(&self) -> bool {
        self.conn.lock().await.closed
    }
}

/// Resynchronises when needed, then writes one request, leaving the stream out of step
/// until its reply is read.
async fn send(
    conn: &mut Conn,
    command: &str,
    arguments: Option<&Value>,
    limits: Limits,
) -> Result<(), AgentError> {
    if !conn.in_step {
        resync(conn, limits).await?;
    }
    conn.in_step = false;
    let request = wire::encode(command, arguments);
    conn.stream.get_mut().write_all(&request).await?;
    Ok(())
}

/// Maps an elapsed deadline to `Timeout` and records an ended stream.
fn settle<T>(
    conn: &mut Conn,
    result: Result<Result<T, AgentError>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> Result<T, AgentError> {
    let result = result.unwrap_or(Err(AgentError::Timeout(timeout)));
    if matches!(result, Err(AgentError::Disconnected)) {
        conn.closed = true;
    }
    result
}

/// `0xFF`, then `guest-sync-delimited` with a random id; skip to each `0xFF` in the
/// stream until the reply carrying that id (older syncs' replies are skipped).
async fn resync(conn: &mut Conn, limits: Limits) -> Result<(), AgentError> {
    let id = random_id();
    let mut request = vec![wire::DELIMITER];
    request.extend(wire::encode(
        "guest-sync-delimited",
        Some(&json!({ "id": id })),
    ));
    conn.stream.get_mut().write_all(&request).await?;
    loop {
        wire::skip_to_delimiter(&mut conn.stream).await?;
        match wire::read_line(&mut conn.stream, &mut conn.line, limits.max_reply).await {
            Ok(()) => {}
            // Junk after a stray 0xFF: keep looking for our reply.
            Err(AgentError::TooLarge(_)) => continue,
            Err(e) => return Err(e),
        }
        match wire::parse_reply(&conn.line, "guest-sync-delimited") {
            Ok(value) if value.as_i64() == Some(id) => {
                conn.in_step = true;
                return Ok(());
            }
            Ok(_) | Err(AgentError::Protocol(_)) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A fresh id per sync, so a late reply to an earlier sync is never mistaken for ours.
/// Kept below 2^53: some agents pass numbers through doubles.
fn random_id() -> i64 {
    (uuid::Uuid::new_v4().as_u64_pair().0 & ((1 << 53) - 1)) as i64
}
