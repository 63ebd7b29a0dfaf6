//! The one error type of the guest agent client.

use std::io;
use std::time::Duration;

/// Why a guest agent operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The socket ended (QEMU exited or closed the channel): connect again.
    #[error("the guest agent channel closed (QEMU exited or dropped the connection)")]
    Disconnected,
    /// No (complete) answer in time: no agent runs in the guest, or it is busy or stuck.
    #[error("the guest agent did not answer within {0:?} (is qemu-ga running in the guest?)")]
    Timeout(Duration),
    /// The guest sent something that is not an agent reply (truncated excerpt).
    #[error("the guest agent sent an invalid reply: {0}")]
    Protocol(String),
    /// A reply longer than the client accepts.
    #[error("the guest agent's reply is larger than {0} bytes")]
    TooLarge(usize),
    /// The agent ran the command and refused it, with its own words.
    #[error("the guest agent refused {command}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// Reading or writing the socket failed.
    #[error("guest agent channel I/O error: {0}")]
    Io(String),
}

impl From<io::Error> for AgentError {
    fn from(err: io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => AgentError::Disconnected,
            _ => AgentError::Io(err.to_string()),
        }
    }
}
