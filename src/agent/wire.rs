//! The agent's framing: one JSON object per line, and `0xFF` as the resynchronisation
//! delimiter (never valid in JSON, so it cannot occur inside a reply).

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use super::AgentError;
use crate::lines::Line;

/// The byte that resets the agent's parser (host → guest) and precedes the reply to
/// `guest-sync-delimited` (guest → host).
pub const DELIMITER: u8 = 0xFF;

/// How much of an offending reply goes into errors and logs.
const EXCERPT_BYTES: usize = 200;

/// Discards everything up to and including the next [`DELIMITER`]; `Disconnected` at EOF.
pub async fn skip_to_delimiter<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<(), AgentError> {
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Err(AgentError::Disconnected);
        }
        match buf.iter().position(|&b| b == DELIMITER) {
            Some(at) => {
                reader.consume(at + 1);
                return Ok(());
            }
            None => {
                let len = buf.len();
                reader.consume(len);
            }
        }
    }
}

/// Reads one line without its terminator into `line`, at most `max` bytes. A line that
/// grows past `max` is `TooLarge` (the framing is lost: the caller resynchronises).
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> Result<(), AgentError> {
    match crate::lines::read_line(reader, line, max).await? {
        Line::Complete => Ok(()),
        Line::Eof => Err(AgentError::Disconnected),
        Line::TooLong => Err(AgentError::TooLarge(max)),
    }
}

/// A reply: `{"return": …}` or `{"error": {"class", "desc"}}`. Anything else is a
/// protocol error naming the text.
pub fn parse_reply(line: &[u8], command: &str) -> Result<Value, AgentError> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| AgentError::Protocol(format!("{e}: {}", excerpt(line))))?;
    let Value::Object(mut obj) = value else {
        return Err(AgentError::Protocol(excerpt(line)));
    };
    if let Some(value) = obj.remove("return") {
        return Ok(value);
    }
    if let Some(error) = obj.get("error") {
        let field = |key| {
            error
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        return Err(AgentError::Command {
            command: command.to_owned(),
            class: field("class"),
            desc: field("desc"),
        });
    }
    Err(AgentError::Protocol(excerpt(line)))
}

/// One request, ready for a single write (serde_json never emits a raw newline).
pub fn encode(command: &str, arguments: Option<&Value>) -> Vec<u8> {
    let mut msg = serde_json::json!({ "execute": command });
    if let Some(arguments) = arguments {
        msg["arguments"] = arguments.clone();
    }
    let mut bytes = serde_json::to_vec(&msg).expect("a serde_json::Value always serializes");
    bytes.push(b'\n');
    bytes
}

/// A printable, bounded excerpt for errors.
pub fn excerpt(bytes: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT_BYTES)]);
    if bytes.len() > EXCERPT_BYTES {
        format!("{shown}… ({} bytes)", bytes.len())
    } else {
        shown.into_owned()
    }
}
