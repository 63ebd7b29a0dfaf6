//! `maqet logs VM [-f]`: the VM's lifecycle history and QEMU's log, read through maqetd
//! (`VM.History`, `VM.OpenLog`: the CLI never opens maqet's files by path).
//!
//! Following waits on events only: inotify on the log's fd for new output, the VM's
//! `StatusChanged` for new history (and for the new log file a start may rotate in).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use futures_util::StreamExt;
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use serde_json::json;
use tokio::io::unix::AsyncFd;

use super::output::print_json_line;
use super::session::{Session, vm};
use crate::client::{HistoryRow, VmProxy};
use crate::error::MaqetError;
use crate::time::{format_local_us, format_us, now_us};

pub(super) async fn run(
    s: &Session,
    name: &str,
    follow: bool,
    lines: usize,
) -> Result<(), MaqetError> {
    let (_, proxy) = vm(s, name).await?;
    let vm_name = proxy.name().await?;
    // Subscribed before reading, so a change in between is not missed.
    let mut changes = if follow {
        Some(proxy.receive_vm_status_changed().await?)
    } else {
        None
    };
    for row in proxy.history(0, lines as u32).await? {
        print_history(s.json, &vm_name, &row);
    }
    if s.remote {
        eprintln!(
            "maqet: QEMU's log is handed over as a file descriptor, which cannot cross ssh; run `maqet logs` on that machine to see it"
        );
    }
    let mut log = if s.remote {
        None
    } else {
        match open(&proxy).await {
            Ok(mut log) => {
                log.print_tail(s.json, lines)?;
                Some(log)
            }
            // Never started: there is history, but no log yet.
            Err(MaqetError::NotFound(why)) => {
                if !s.json {
                    eprintln!("maqet: {why}");
                }
                None
            }
            Err(e) => return Err(e),
        }
    };
    let Some(changes) = changes.as_mut() else {
        return Ok(());
    };
    loop {
        tokio::select! {
            sig = changes.next() => {
                let Some(sig) = sig else { return Ok(()) };
                let Ok(a) = sig.args() else { continue };
                let row = (now_us(), "status".to_string(), a.status().to_string(), a.previous().to_string(), a.reason().to_string(), String::new());
                print_history(s.json, &vm_name, &row);
                // A first start creates the log, a later one may rotate it: pick up the
                // file QEMU writes now (from its beginning), once it is there.
                let stale = log.as_ref().map_or(!s.remote, |l| l.moved);
                if stale && let Ok(mut new) = open(&proxy).await {
                    new.print_tail(s.json, 0)?;
                    log = Some(new);
                }
            }
            more = wait_for_more(&mut log) => {
                more?;
                if let Some(l) = log.as_mut() {
                    l.print_new(s.json)?;
                }
            }
        }
    }
}

fn print_history(json: bool, vm: &str, row: &HistoryRow) {
    let (time, kind, status, previous, reason, detail) = row;
    if json {
        let detail: serde_json::Value = serde_json::from_str(detail).unwrap_or_default();
        print_json_line(&json!({
            "type": "history", "vm": vm, "time": format_us(*time), "time_us": time,
            "kind": kind, "status": status, "previous": previous, "reason": reason, "detail": detail,
        }));
    } else if kind == "status" && !previous.is_empty() && previous != status {
        println!(
            "== {} {vm}: {previous} → {status} ({reason})",
            format_local_us(*time)
        );
    } else if kind == "status" {
        println!("== {} {vm}: {status} ({reason})", format_local_us(*time));
    } else {
        println!("== {} {vm}: {kind}: {reason}", format_local_us(*time));
    }
}

/// QEMU's log as the CLI holds it: the fd maqetd handed over, where we have read up to,
/// and an inotify watch on it while following.
struct Log {
    file: File,
    offset: u64,
    watch: Option<AsyncFd<OwnedFd>>,
    /// The file was renamed away (rotated at a start): the next start brings a new one.
    moved: bool,
    /// A partial last line, held back in JSON mode until its newline arrives.
    pending: Vec<u8>,
}

async fn open(proxy: &VmProxy<'_>) -> Result<Log, MaqetError> {
    let fd: OwnedFd = proxy.open_log().await?.into();
    Ok(Log {
        file: File::from(fd),
        offset: 0,
        watch: None,
        moved: false,
        pending: Vec::new(),
    })
}

impl Log {
    /// Prints the last `lines` lines (0: all) and starts watching for more. The watch is
    /// set before reading, so output written in between is not lost.
    fn print_tail(&mut self, json: bool, lines: usize) -> Result<(), MaqetError> {
        self.watch = Some(watch(&self.file)?);
        let mut text = Vec::new();
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.read_to_end(&mut text))
            .map_err(read_error)?;
        self.offset = text.len() as u64;
        let start = if lines == 0 {
            0
        } else {
            // The start of the `lines`-th line from the end (a final newline ends a line).
            let body = text.strip_suffix(b"\n").unwrap_or(&text);
            body.iter()
                .enumerate()
                .rev()
                .filter(|(_, b)| **b == b'\n')
                .nth(lines - 1)
                .map_or(0, |(i, _)| i + 1)
        };
        self.emit(json, &text[start..])
    }

    /// Prints what was appended since the last read.
    fn print_new(&mut self, json: bool) -> Result<(), MaqetError> {
        let mut text = Vec::new();
        self.file
            .seek(SeekFrom::Start(self.offset))
            .and_then(|_| self.file.read_to_end(&mut text))
            .map_err(read_error)?;
        self.offset += text.len() as u64;
        self.emit(json, &text)
    }

    fn emit(&mut self, json: bool, bytes: &[u8]) -> Result<(), MaqetError> {
        if !json {
            return super::output::write_out(bytes);
        }
        self.pending.extend_from_slice(bytes);
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            print_json_line(&json!({"type": "log", "line": text}));
        }
        Ok(())
    }
}

fn read_error(e: std::io::Error) -> MaqetError {
    MaqetError::Internal(format!("cannot read the QEMU log: {e}"))
}

/// inotify on the file behind `file` (through /proc/self/fd: we have no path, and need
/// none).
fn watch(file: &File) -> Result<AsyncFd<OwnedFd>, MaqetError> {
    let fail = |e: std::io::Error| MaqetError::Internal(format!("cannot watch the QEMU log: {e}"));
    let ino =
        inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).map_err(|e| fail(e.into()))?;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    inotify::add_watch(
        &ino,
        path.as_str(),
        WatchFlags::MODIFY | WatchFlags::MOVE_SELF | WatchFlags::DELETE_SELF,
    )
    .map_err(|e| fail(e.into()))?;
    crate::fdio::readable(ino).map_err(fail)
}

/// Resolves when the log has new data (or moved); never while there is no log.
async fn wait_for_more(log: &mut Option<Log>) -> Result<(), MaqetError> {
    let Some(l) = log.as_mut() else {
        return std::future::pending().await;
    };
    let Some(watch) = l.watch.as_ref() else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = watch
            .readable()
            .await
            .map_err(|e| MaqetError::Internal(format!("watching the QEMU log: {e}")))?;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
        let mut reader = inotify::Reader::new(guard.get_inner().as_fd(), &mut buf);
        let mut any = false;
        loop {
            match reader.next() {
                Ok(ev) => {
                    any = true;
                    if ev
                        .events()
                        .intersects(ReadFlags::MOVE_SELF | ReadFlags::DELETE_SELF)
                    {
                        l.moved = true;
                    }
                }
                Err(rustix::io::Errno::AGAIN) => {
                    guard.clear_ready();
                    break;
                }
                Err(e) => {
                    return Err(MaqetError::Internal(format!("watching the QEMU log: {e}")));
                }
            }
        }
        if any {
            return Ok(());
        }
    }
}
