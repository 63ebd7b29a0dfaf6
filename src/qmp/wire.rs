//! QMP on the wire: line framing, message classification, and the public message types.
//!
//! Every QMP message is one JSON object on one line. QEMU ends lines with `\r\n`; a bare
//! `\n` is accepted too.

use serde_json::{Map, Value};
use tokio::io::AsyncBufRead;

use super::QmpError;
use crate::lines::Line;

/// The longest line accepted. Past it the framing is lost, so the connection is closed.
pub(super) const MAX_LINE_BYTES: usize = 64 << 20;

/// How much of an offending message goes into logs and errors.
const EXCERPT_BYTES: usize = 200;

/// An asynchronous QMP event, such as `STOP`, `RESUME` or `SHUTDOWN`.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    /// The event's `data`; an empty object when QEMU sent none.
    pub data: Value,
    /// QEMU's timestamp in microseconds since the Unix epoch (0 if QEMU sent none).
    pub timestamp_us: u64,
}

/// What QEMU announced when the connection opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Greeting {
    /// `major.minor.micro`, e.g. `7.2.22`; empty if QEMU did not say.
    pub version: String,
    /// The distribution's package string, e.g. `Debian 1:7.2+dfsg-7+deb12u18+b3`.
    pub package: String,
    /// Capabilities QEMU offers (e.g. `oob`). The client enables none of them.
    pub capabilities: Vec<String>,
    /// The whole greeting message, as received.
    pub raw: Value,
}

impl Greeting {
    /// Lenient about the details: only the `QMP` object is required, since a missing
    /// version string is no reason to refuse a working monitor.
    fn from_raw(raw: Value) -> Result<Greeting, QmpError> {
        let qmp = raw
            .get("QMP")
            .and_then(Value::as_object)
            .ok_or_else(|| QmpError::Protocol(format!("malformed greeting: {raw}")))?;
        let version = qmp.get("version");
        let part = |key| {
            version
                .and_then(|v| v.pointer(&format!("/qemu/{key}")))
                .and_then(Value::as_u64)
        };
        let version_string = match (part("major"), part("minor"), part("micro")) {
            (Some(major), Some(minor), Some(micro)) => format!("{major}.{minor}.{micro}"),
            _ => String::new(),
        };
        let package = version
            .and_then(|v| v.get("package"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let capabilities = qmp
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|caps| {
                caps.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Greeting {
            version: version_string,
            package,
            capabilities,
            raw,
        })
    }
}

/// One message from QEMU, classified.
#[derive(Debug)]
pub(super) enum Message {
    Greeting(Greeting),
    /// A command's reply. `id` is whatever QEMU echoed (absent if the request had none).
    Reply {
        id: Option<Value>,
        result: Result<Value, QmpError>,
    },
    Event(QmpEvent),
}

/// Reads one line, without its terminator, into `line`. `Ok(false)` at end of stream.
///
/// Not cancellation safe (a partly read line is lost); the client only cancels it when
/// the connection is closing anyway.
pub(super) async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> Result<bool, QmpError> {
    match crate::lines::read_line(reader, line, max).await? {
        Line::Complete => Ok(true),
        Line::Eof => {
            if !line.is_empty() {
                tracing::warn!(text = %excerpt(line), "QMP stream ended inside a message; discarding it");
            }
            Ok(false)
        }
        Line::TooLong => {
            line.truncate(EXCERPT_BYTES);
            Err(QmpError::Protocol(format!(
                "QMP message longer than {max} bytes, starting: {}",
                excerpt(line)
            )))
        }
    }
}

/// Classifies one line. Errors describe the offending text, truncated.
pub(super) fn parse(line: &[u8]) -> Result<Message, QmpError> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|err| QmpError::Protocol(format!("invalid JSON ({err}): {}", excerpt(line))))?;
    let Value::Object(mut obj) = value else {
        return Err(unexpected(line));
    };
    if let Some(name) = obj.get("event") {
        let name = name.as_str().ok_or_else(|| unexpected(line))?.to_owned();
        let data = obj
            .remove("data")
            .unwrap_or_else(|| Value::Object(Map::new()));
        let timestamp_us = timestamp_us(obj.get("timestamp"));
        return Ok(Message::Event(QmpEvent {
            name,
            data,
            timestamp_us,
        }));
    }
    let id = obj.remove("id");
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Reply {
            id,
            result: Ok(value),
        });
    }
    if let Some(error) = obj.remove("error") {
        let field = |key| error.get(key).and_then(Value::as_str).map(str::to_owned);
        let result = match (field("class"), field("desc")) {
            (Some(class), Some(desc)) => Err(QmpError::Command { class, desc }),
            _ => Err(QmpError::Protocol(format!(
                "malformed error reply: {}",
                excerpt(line)
            ))),
        };
        return Ok(Message::Reply { id, result });
    }
    if obj.contains_key("QMP") {
        return Greeting::from_raw(Value::Object(obj)).map(Message::Greeting);
    }
    Err(unexpected(line))
}

/// Serializes an outgoing message with its line terminator, ready for a single write.
pub(super) fn encode(message: &Value) -> Vec<u8> {
    // Compact serde_json output never contains a raw newline, so framing is safe.
    let mut bytes = serde_json::to_vec(message).expect("a serde_json::Value always serializes");
    bytes.extend_from_slice(b"\r\n");
    bytes
}

/// A printable, bounded excerpt of a message for logs and errors.
pub(super) fn excerpt(bytes: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT_BYTES)]);
    if bytes.len() > EXCERPT_BYTES {
        format!("{shown}… ({} bytes)", bytes.len())
    } else {
        shown.into_owned()
    }
}

fn unexpected(line: &[u8]) -> QmpError {
    QmpError::Protocol(format!("unexpected QMP message: {}", excerpt(line)))
}

/// `{"seconds": S, "microseconds": U}` → µs since the epoch; absent or negative → 0.
fn timestamp_us(timestamp: Option<&Value>) -> u64 {
    let field = |key| {
        timestamp
            .and_then(|t| t.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    field("seconds")
        .saturating_mul(1_000_000)
        .saturating_add(field("microseconds"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn greeting_fields() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2"}, "capabilities": ["oob"]}}"#;
        let Ok(Message::Greeting(g)) = parse(line) else {
            panic!("not a greeting")
        };
        assert_eq!(g.version, "7.2.22");
        assert_eq!(g.package, "Debian 1:7.2");
        assert_eq!(g.capabilities, ["oob"]);
        assert_eq!(g.raw["QMP"]["version"]["qemu"]["major"], 7);
    }

    #[test]
    fn event_without_data_gets_empty_object_and_timestamp() {
        let line =
            br#"{"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 123456}}"#;
        let Ok(Message::Event(ev)) = parse(line) else {
            panic!("not an event")
        };
        assert_eq!(ev.name, "STOP");
        assert_eq!(ev.data, json!({}));
        assert_eq!(ev.timestamp_us, 1_700_000_000_123_456);
    }

    #[test]
    fn malformed_error_reply_is_a_protocol_error_for_the_waiter() {
        let Ok(Message::Reply { id, result }) = parse(br#"{"error": {"desc": "x"}, "id": 4}"#)
        else {
            panic!("not a reply")
        };
        assert_eq!(id, Some(json!(4)));
        assert!(matches!(result, Err(QmpError::Protocol(_))));
    }

    #[test]
    fn non_objects_and_unknown_objects_are_protocol_errors() {
        for line in [
            &b"[1, 2]"[..],
            b"42",
            b"{\"hello\": 1}",
            b"{\"event\": 3}",
            b"not json",
        ] {
            assert!(
                matches!(parse(line), Err(QmpError::Protocol(_))),
                "{line:?}"
            );
        }
    }

    #[test]
    fn excerpt_is_bounded() {
        let long = vec![b'x'; 1000];
        let text = excerpt(&long);
        assert!(text.len() < 260, "{text}");
        assert!(text.ends_with("(1000 bytes)"));
    }

    #[test]
    fn encode_ends_with_crlf_and_has_no_other_newline() {
        let bytes = encode(&json!({"execute": "x", "arguments": {"s": "a\nb"}}));
        assert!(bytes.ends_with(b"\r\n"));
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
    }
}
