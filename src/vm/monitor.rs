//! What a caller does to a running VM through its monitor: QMP passthrough of classified
//! commands, keys and text, screendumps, device hot-plug, and its serial console.
//!
//! Owns how these are carried out (what is checked before anything is sent, how long
//! each may take, where a screendump is written). Which commands are allowed, and under
//! which action, is [`crate::qmp::classify`]'s business; the D-Bus adapters ask the
//! access gate before calling in here.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use super::VmError;
use super::{QMP_TIMEOUT, REPLY_LIMIT, Vm, next_qmp_event, qmp_error};
use crate::error_kind::ErrorKind;
use crate::qmp::classify::Command;
use crate::qmp::{QmpError, keys};

/// How long `DeviceDel` waits for QEMU's `DEVICE_DELETED`. Linux answers a PCIe
/// attention button after 5 s, so this leaves room for a cooperating guest.
pub const DEVICE_DEL_WAIT: Duration = Duration::from_secs(10);
/// QEMU's own `send-key` default, used when the caller passes 0.
const DEFAULT_HOLD_MS: u32 = 100;
/// The longest a single key may be held.
const MAX_HOLD_MS: u32 = 10_000;
/// How long each typed character is held.
const TYPE_HOLD_MS: u32 = 20;
/// QEMU queues at most 4096 input events and silently drops the rest; a character
/// takes up to 5 (two presses, a delay, two releases), so one call stays well below.
const MAX_TYPE_CHARS: usize = 500;
/// A keys or text call waits until QEMU has released the last key, and must still
/// answer within the bus's reply timeout.
const MAX_KEY_TIME: Duration = Duration::from_secs(15);
/// Screendump files are created under this prefix in the VM's runtime directory.
const SCREENDUMP_PREFIX: &str = "screendump-";

impl Vm {
    /// Sends a classified command and returns QEMU's `return` value.
    pub async fn execute(&self, cmd: Command) -> Result<Value, VmError> {
        let qmp = self.qmp()?;
        // Tell the supervisor these were asked for, so the exit reads as a stop (not a
        // crash) and the pause as requested (not QEMU's doing).
        match cmd.name.as_str() {
            "quit" => self.note_quit_requested(),
            "stop" => {
                if let Some(rt) = self.runtime() {
                    rt.pause_requested.store(true, Ordering::SeqCst);
                }
            }
            _ => {}
        }
        qmp.execute_timeout(&cmd.name, cmd.arguments.map(Value::Object), REPLY_LIMIT)
            .await
            .map_err(|e| qmp_error(&self.name(), e))
    }

    /// Presses each combo (`ctrl-alt-f2`) in turn, each held `hold_ms` (0: QEMU's
    /// default). Every combo is checked before the first is sent. Returns once QEMU has
    /// released the last key.
    pub async fn send_keys(&self, combos: &[String], hold_ms: u32) -> Result<(), VmError> {
        let hold = if hold_ms == 0 {
            DEFAULT_HOLD_MS
        } else {
            hold_ms
        };
        if hold > MAX_HOLD_MS {
            return Err(VmError::InvalidArgument(format!(
                "hold time {hold} ms is too long: at most {MAX_HOLD_MS} ms"
            )));
        }
        if combos.is_empty() {
            return Err(VmError::InvalidArgument(
                "no keys given: pass one or more key combinations such as ctrl-alt-delete".into(),
            ));
        }
        let parsed = combos
            .iter()
            .enumerate()
            .map(|(i, c)| {
                keys::parse_combo(c).map_err(|e| {
                    VmError::InvalidArgument(format!("key combination {} ('{c}'): {e}", i + 1))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.press(&parsed, hold).await
    }

    /// Types `text` on a US layout (shift, newline and tab included). Every character is
    /// checked before the first key is sent. Returns once the text has been typed.
    pub async fn type_text(&self, text: &str) -> Result<(), VmError> {
        let count = text.chars().count();
        if count > MAX_TYPE_CHARS {
            return Err(VmError::InvalidArgument(format!(
                "text of {count} characters is too long: type at most {MAX_TYPE_CHARS} per call \
                 (QEMU drops keys beyond its input queue)"
            )));
        }
        let combos =
            keys::text_to_combos(text).map_err(|e| VmError::InvalidArgument(e.to_string()))?;
        self.press(&combos, TYPE_HOLD_MS).await
    }

    /// Sends `send-key` per combo, then waits for QEMU to work through them: it queues
    /// the keys and plays each combo's hold time in turn.
    async fn press(&self, combos: &[Vec<String>], hold_ms: u32) -> Result<(), VmError> {
        let typing = Duration::from_millis(u64::from(hold_ms)) * combos.len() as u32;
        if typing > MAX_KEY_TIME {
            return Err(VmError::InvalidArgument(format!(
                "{} key presses held {hold_ms} ms each take {} s; one call may take at most {} s",
                combos.len(),
                typing.as_secs(),
                MAX_KEY_TIME.as_secs()
            )));
        }
        let qmp = self.qmp()?;
        for combo in combos {
            let arguments = keys::send_key_arguments(combo, Some(hold_ms));
            qmp.execute_timeout("send-key", Some(arguments), QMP_TIMEOUT)
                .await
                .map_err(|e| qmp_error(&self.name(), e))?;
        }
        tokio::time::sleep(typing).await;
        Ok(())
    }

    /// A PNG of the VM's display, as an open file that no longer has a name.
    ///
    /// QEMU opens the target by path in its own process, so maqet creates an owner-only
    /// file in the VM's 0700 runtime directory, has QEMU write it, opens it and removes
    /// the name before returning (on every path; stale ones go with the directory).
    pub async fn screendump(&self) -> Result<File, VmError> {
        let qmp = self.qmp()?;
        let dir = self.ctx.paths.vm_runtime_dir(&self.id);
        let target = ScreendumpFile::create(&dir)?;
        let filename = target.path.to_str().ok_or_else(|| {
            VmError::Internal(format!(
                "the runtime directory {} is not UTF-8; QMP cannot name it",
                dir.display()
            ))
        })?;
        let arguments = json!({"filename": filename, "format": "png"});
        qmp.execute_timeout("screendump", Some(arguments), REPLY_LIMIT)
            .await
            .map_err(|e| screendump_error(&self.name(), e))?;
        let file = File::open(&target.path).map_err(|e| {
            VmError::Internal(format!("cannot open the screendump QEMU wrote: {e}"))
        })?;
        drop(target);
        Ok(file)
    }

    /// A connection to the VM's serial console (the socket maqet gave the first serial
    /// port, see [`super::launch`]) for one client at a time.
    ///
    /// The caller gets one end of a socket pair; the other end goes to the console's
    /// keeper ([`super::console`]), which first sends what the guest printed while
    /// nobody was attached, then relays. So maqetd knows the moment a client goes (its
    /// end closes), and a second client while one is attached is refused rather than
    /// left queued in silence.
    pub async fn open_console(&self) -> Result<std::os::unix::net::UnixStream, VmError> {
        self.qmp()?;
        let name = self.name();
        let rt = self
            .runtime()
            .ok_or_else(|| VmError::InvalidState(format!("VM '{name}' has no process")))?;
        let keeper = self.keep_console(&rt).await?;
        let attached = ConsoleAttached::claim(rt.clone()).ok_or_else(|| {
            VmError::InvalidState(format!(
                "the console of VM '{name}' is in use by another client (one at a time); \
                 detach that one first (Ctrl-])"
            ))
        })?;
        let failed = |e: std::io::Error| {
            VmError::Internal(format!("console of VM '{name}': socket pair: {e}"))
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(failed)?;
        ours.set_nonblocking(true).map_err(failed)?;
        let ours = tokio::net::UnixStream::from_std(ours).map_err(failed)?;
        keeper
            .send(super::console::Client::new(ours, attached))
            .map_err(|_| {
                VmError::InvalidState(format!(
                    "the console of VM '{name}' closed (the VM stopped?)"
                ))
            })?;
        Ok(theirs)
    }

    /// The console's keeper of this run, connected to QEMU's console socket now if it
    /// is not yet (a run maqetd started or re-adopted connects at once, so output is
    /// kept from the first byte).
    pub(super) async fn keep_console(
        &self,
        rt: &std::sync::Arc<super::Runtime>,
    ) -> Result<tokio::sync::mpsc::UnboundedSender<super::console::Client<ConsoleAttached>>, VmError>
    {
        if let Some(tx) = rt
            .console_keeper
            .lock()
            .as_ref()
            .filter(|tx| !tx.is_closed())
        {
            return Ok(tx.clone());
        }
        let name = self.name();
        let path = self.ctx.paths.console_socket(&self.id);
        if !path.exists() {
            return Err(VmError::NotFound(format!(
                "VM '{name}' has no maqet console: its config chooses its own serial port \
                 (-serial, -nographic or an isa-serial device), or it was started by an older \
                 maqet (restart it)"
            )));
        }
        let qemu = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
            VmError::Internal(format!(
                "console of VM '{name}': cannot connect to {}: {e}",
                path.display()
            ))
        })?;
        let mut slot = rt.console_keeper.lock();
        // Another call may have connected meanwhile: keep the first keeper.
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return Ok(tx.clone());
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(super::console::keep(qemu, rx));
        *slot = Some(tx.clone());
        Ok(tx)
    }

    /// Hot-unplugs a device and waits for QEMU's `DEVICE_DELETED`. Past
    /// [`DEVICE_DEL_WAIT`] the removal is still pending (the guest has not released the
    /// device): that is a `Timeout`, and the event may still come later.
    pub async fn device_del(&self, id: &str, cmd: Command) -> Result<(), VmError> {
        // Subscribe before sending: a device without a guest to ask goes at once.
        let mut events = self.subscribe_qmp();
        self.execute(cmd).await?;
        let deleted = next_qmp_event(&mut events, |name, data| {
            // `id` is a device id or, for a device without one, its QOM path.
            name == "DEVICE_DELETED"
                && (data.get("device").and_then(Value::as_str) == Some(id)
                    || data.get("path").and_then(Value::as_str) == Some(id))
        });
        let mut status = self.subscribe_status();
        let outcome = tokio::time::timeout(DEVICE_DEL_WAIT, async {
            tokio::select! {
                data = deleted => data.is_some(),
                _ = status.wait_for(|s| !s.has_process()) => false,
            }
        });
        match outcome.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(VmError::InvalidState(format!(
                "VM '{}' stopped before QEMU removed device '{id}'",
                self.name()
            ))),
            Err(_) => Err(VmError::Timeout(format!(
                "VM '{}': QEMU accepted the removal of device '{id}' but has not completed it \
                 within {} s; it stays pending until the guest releases the device (PCI \
                 hot-unplug needs a guest OS that handles it). Watch for the DEVICE_DELETED \
                 event (maqet events {0}) or look in qom-list /machine/peripheral",
                self.name(),
                DEVICE_DEL_WAIT.as_secs()
            ))),
        }
    }
}

/// QEMU's answer for a VM without a display, with what to do about it.
fn screendump_error(vm: &str, e: QmpError) -> VmError {
    match &e {
        QmpError::Command { class, desc } if desc.contains("no console") => VmError::Monitor {
            kind: ErrorKind::Qmp,
            message: format!(
                "{class}: {desc}. VM '{vm}' has no display device: add one to its config \
                 (e.g. `vga: std`) and restart it"
            ),
            source: e,
        },
        _ => qmp_error(vm, e),
    }
}

/// A screendump target whose name is removed when this is dropped.
struct ScreendumpFile {
    path: PathBuf,
}

impl ScreendumpFile {
    /// Created by maqetd, exclusive and owner-only, so the name cannot be someone
    /// else's file and nobody else can read what QEMU writes into it.
    fn create(dir: &Path) -> Result<ScreendumpFile, VmError> {
        let path = dir.join(format!(
            "{SCREENDUMP_PREFIX}{}.png",
            uuid::Uuid::new_v4().simple()
        ));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                VmError::Internal(format!(
                    "cannot create a screendump file in {}: {e}",
                    dir.display()
                ))
            })?;
        Ok(ScreendumpFile { path })
    }
}

impl Drop for ScreendumpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Marks a QEMU's console as attached until dropped.
pub(super) struct ConsoleAttached(std::sync::Arc<super::Runtime>);

impl ConsoleAttached {
    fn claim(rt: std::sync::Arc<super::Runtime>) -> Option<ConsoleAttached> {
        (!rt.console_attached.swap(true, Ordering::SeqCst)).then_some(ConsoleAttached(rt))
    }
}

impl Drop for ConsoleAttached {
    fn drop(&mut self) {
        self.0.console_attached.store(false, Ordering::SeqCst);
    }
}
