//! Newline-framed reading with a size cap, shared by the QMP and guest-agent clients:
//! both read JSON lines from a peer they do not trust (QEMU, a guest), so a line may never
//! grow without bound.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// How one [`read_line`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A whole line is in the buffer, without `\n` (or `\r\n`).
    Complete,
    /// The stream ended; the buffer holds whatever partial line came before.
    Eof,
    /// The line grew past the cap; the buffer holds its first `max` bytes at most, and the
    /// framing is lost (the caller closes or resynchronises).
    TooLong,
}

/// Reads one line into `line` (cleared first), at most `max` bytes.
///
/// Not cancellation safe (a partly read line is lost); callers cancel it only when the
/// connection is closing anyway.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    line.clear();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Line::Eof);
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        if line.len() + chunk.len() > max {
            let room = max - line.len();
            line.extend_from_slice(&chunk[..room]);
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(chunk);
        let used = chunk.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Line::Complete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_framed_capped_and_ended() {
        let mut input: &[u8] = b"one\r\ntwo\nthree-is-long\nfour";
        let mut line = Vec::new();
        assert_eq!(
            read_line(&mut input, &mut line, 8).await.unwrap(),
            Line::Complete
        );
        assert_eq!(line, b"one");
        assert_eq!(
            read_line(&mut input, &mut line, 8).await.unwrap(),
            Line::Complete
        );
        assert_eq!(line, b"two");
        assert_eq!(
            read_line(&mut input, &mut line, 8).await.unwrap(),
            Line::TooLong
        );
        assert_eq!(line, b"three-is");
        let mut rest: &[u8] = b"four";
        assert_eq!(read_line(&mut rest, &mut line, 8).await.unwrap(), Line::Eof);
        assert_eq!(line, b"four");
    }
}
