//! The serial console's keeper: maqetd stays connected to QEMU's console socket for the
//! whole run, so the guest's output while nobody is attached is kept (the last
//! [`RING_BYTES`]) and shown to the next client first, instead of being dropped by
//! QEMU (`wait=off`). One client at a time gets the live output and sends the input.

use std::collections::VecDeque;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

/// Serial output kept while no client is attached.
pub const RING_BYTES: usize = 256 * 1024;

/// A client handed to the keeper, with whatever must live exactly as long as it.
pub struct Client<G> {
    rx: OwnedReadHalf,
    tx: OwnedWriteHalf,
    /// Dropped last: the console counts as free once both halves are closed.
    _guard: G,
}

impl<G> Client<G> {
    pub fn new(stream: UnixStream, guard: G) -> Client<G> {
        let (rx, tx) = stream.into_split();
        Client {
            rx,
            tx,
            _guard: guard,
        }
    }
}

/// The newest bytes, at most `cap` of them.
#[derive(Debug)]
pub struct Ring {
    bytes: VecDeque<u8>,
    cap: usize,
}

impl Ring {
    pub fn new(cap: usize) -> Ring {
        Ring {
            bytes: VecDeque::new(),
            cap,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(self.cap)..];
        let excess = (self.bytes.len() + data.len()).saturating_sub(self.cap);
        self.bytes.drain(..excess);
        self.bytes.extend(data);
    }

    /// Everything kept, oldest first; the ring is empty afterwards.
    pub fn take(&mut self) -> Vec<u8> {
        self.bytes.drain(..).collect()
    }
}

/// Relays between QEMU's console connection and the attached client until QEMU closes
/// it (the VM stopped) or the last handle to the attach channel goes.
pub async fn keep<G: Send + 'static>(
    qemu: UnixStream,
    mut attach: mpsc::UnboundedReceiver<Client<G>>,
) {
    let (mut qemu_rx, mut qemu_tx) = qemu.into_split();
    let mut ring = Ring::new(RING_BYTES);
    let mut client: Option<Client<G>> = None;
    let (mut out, mut input) = ([0u8; 4096], [0u8; 4096]);
    loop {
        tokio::select! {
            n = qemu_rx.read(&mut out) => {
                let n = match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let delivered = match client.as_mut() {
                    Some(c) => c.tx.write_all(&out[..n]).await.is_ok(),
                    None => false,
                };
                if !delivered {
                    client = None;
                    ring.push(&out[..n]);
                }
            }
            n = read_client(&mut client, &mut input) => match n {
                Some(n) if n > 0 => {
                    if qemu_tx.write_all(&input[..n]).await.is_err() {
                        break;
                    }
                }
                // The client left: the console is free again.
                _ => client = None,
            },
            new = attach.recv() => {
                let Some(mut new) = new else { break };
                let backlog = ring.take();
                if new.tx.write_all(&backlog).await.is_ok() {
                    client = Some(new);
                } else {
                    ring.push(&backlog);
                }
            }
        }
    }
}

/// The next input of the attached client (`None`/`Some(0)`: it left); never ready
/// without a client.
async fn read_client<G>(client: &mut Option<Client<G>>, buf: &mut [u8]) -> Option<usize> {
    match client {
        Some(c) => c.rx.read(buf).await.ok(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_bytes() {
        let mut r = Ring::new(8);
        r.push(b"abc");
        r.push(b"defgh");
        r.push(b"ij");
        assert_eq!(r.take(), b"cdefghij");
        assert!(r.take().is_empty());
        r.push(b"0123456789abc");
        assert_eq!(r.take(), b"56789abc");
    }

    #[tokio::test]
    async fn output_while_detached_reaches_the_next_client_first() {
        let (qemu, mut guest) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(keep::<()>(qemu, rx));
        guest.write_all(b"boot banner\n").await.unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        tx.send(Client::new(ours, ())).unwrap();
        let mut got = vec![0u8; 12];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"boot banner\n");
        theirs.write_all(b"ls\n").await.unwrap();
        let mut typed = [0u8; 3];
        guest.read_exact(&mut typed).await.unwrap();
        assert_eq!(&typed, b"ls\n");
    }
}
