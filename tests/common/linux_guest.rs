//! maqet's Linux test guest: a Debian cloud kernel and a busybox initramfs made by
//! `scripts/build-test-guest` (docs/testing.md), booted under TCG. Its /init reports on
//! the serial console with `MAQET-GUEST-…` markers; a test reads them through the
//! product's own `VM.OpenConsole` and waits for them, never sleeps.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use maqet::client::VmProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use zbus::Connection;

use super::{Bus, TIMEOUT};

/// Printed by /init once every service of the guest runs: acpid (unless disabled), the
/// keyboard echo on tty1, the root shell on ttyS0, qemu-ga when its port exists.
pub const READY: &str = "MAQET-GUEST-READY";
/// The prefix of a line typed on the guest's VGA console, echoed on ttyS0.
pub const TYPED: &str = "MAQET-KBD:";
/// The ACPI power button's action, just before it powers off.
pub const ACPI_POWEROFF: &str = "MAQET-GUEST-POWEROFF acpi";
/// Kernel command-line switch: no acpid, so the guest ignores the power button.
pub const NO_ACPI: &str = "maqet.noacpi";

/// The built kernel and initramfs.
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The public half of the guest's ssh host key (`ssh-ed25519 AAAA…`), made at build.
    pub ssh_host_key: PathBuf,
}

/// Why the guest is not there.
enum Missing {
    /// Its packages cannot be had on this machine (no apt lists, no registry).
    Unavailable(String),
    /// The build failed: a bug to fix, never a skip.
    Failed(String),
}

/// The guest, built once per test binary (the builder caches between runs). `None` after
/// printing `SKIPPED: …` when its packages cannot be had here (no apt package lists, no
/// registry); with `MAQET_TEST_REQUIRE_ALL=1` (CI) that is a failure instead, and so is
/// a failed build everywhere.
pub fn image() -> Option<&'static Image> {
    static IMAGE: OnceLock<Result<Image, Missing>> = OnceLock::new();
    match IMAGE.get_or_init(build) {
        Ok(image) => Some(image),
        Err(Missing::Failed(why)) => panic!("building the Linux test guest failed: {why}"),
        Err(Missing::Unavailable(why))
            if std::env::var("MAQET_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1") =>
        {
            panic!("the Linux test guest is required (MAQET_TEST_REQUIRE_ALL=1): {why}")
        }
        Err(Missing::Unavailable(why)) => {
            eprintln!("SKIPPED: no Linux test guest: {why}");
            None
        }
    }
}

fn build() -> Result<Image, Missing> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-test-guest");
    let t = Instant::now();
    let out = std::process::Command::new(script)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Missing::Failed(format!("cannot run {script}: {e}")))?;
    if !out.status.success() {
        let why = format!("{script}: {}", String::from_utf8_lossy(&out.stderr).trim());
        return Err(match out.status.code() {
            Some(2) => Missing::Unavailable(why),
            _ => Missing::Failed(why),
        });
    }
    let dir = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(dir.lines().last().unwrap_or_default());
    eprintln!(
        "test guest: {} ({:.1} s)",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(Image {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        ssh_host_key: dir.join("ssh_host_ed25519_key.pub"),
    })
}

/// What a test adds to the guest's VM config.
#[derive(Default, Clone, Copy)]
pub struct Setup<'a> {
    /// Kernel command-line words (e.g. [`NO_ACPI`], `maqet.load=vfat`).
    pub append: &'a str,
    /// More `arguments` items, one YAML flow item each (e.g. [`USER_NET`]).
    pub arguments: &'a [&'a str],
    /// More top-level config keys, as YAML lines.
    pub keys: &'a str,
}

/// A user-mode network (no outside access) on a virtio NIC: the guest sets eth0 to
/// 10.0.2.15/24 (the cloud kernel has no e1000 driver).
pub const USER_NET: &[&str] = &[
    "netdev: {user: null, id: net0, restrict: 'on'}",
    "device: {virtio-net-pci: null, netdev: net0}",
];

/// A VM config booting the guest: TCG always (the nested KVM of CI machines cannot run a
/// real kernel), 256 MiB, std VGA (tty1, screendumps), maqet's console on ttyS0. The VM
/// starts paused (`-S`) so a test attaches to the serial console before the guest prints
/// anything: see [`boot`].
pub fn vm_yaml(name: &str, image: &Image, setup: &Setup<'_>) -> String {
    let mut yaml = format!(
        "name: {name}\nbinary: qemu-system-x86_64\ndisplay: none\nmemory: 256\nvga: std\n\
         arguments:\n  - nodefaults\n  - S\n  - machine: pc\n  - accel: tcg\n\
         \x20 - kernel: {}\n  - initrd: {}\n  - append: \"console=ttyS0 {}\"\n",
        image.kernel.display(),
        image.initrd.display(),
        setup.append,
    );
    for item in setup.arguments {
        yaml.push_str(&format!("  - {item}\n"));
    }
    yaml.push_str(setup.keys);
    yaml
}

/// Adds and boots a guest VM: start (paused), attach to the serial console, resume, wait
/// for [`READY`]. Returns the VM and its console.
pub async fn boot(
    bus: &Bus,
    conn: &Connection,
    name: &str,
    image: &Image,
    setup: &Setup<'_>,
) -> (VmProxy<'static>, Serial) {
    let vm = bus.add(conn, "", &vm_yaml(name, image, setup)).await;
    vm.start().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "paused", "-S starts it paused");
    let mut serial = Serial::attach(&vm).await;
    let t = Instant::now();
    vm.resume().await.unwrap();
    serial.wait_for(READY).await;
    eprintln!(
        "test guest {name}: {READY} {:.1} s after resume",
        t.elapsed().as_secs_f64()
    );
    (vm, serial)
}

/// The guest's serial console through `VM.OpenConsole`: what it printed since attaching,
/// and a way to type into it. Dropping it detaches.
pub struct Serial {
    reader: tokio::task::JoinHandle<()>,
    chunks: mpsc::UnboundedReceiver<Vec<u8>>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// Everything received since the last [`Serial::wait_for`] match.
    seen: Vec<u8>,
    /// Everything received since attaching.
    pub log: Vec<u8>,
}

impl Serial {
    pub async fn attach(vm: &VmProxy<'_>) -> Serial {
        let fd = OwnedFd::from(vm.open_console().await.expect("OpenConsole"));
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream.set_nonblocking(true).unwrap();
        let (mut reader, writer) = tokio::net::UnixStream::from_std(stream)
            .unwrap()
            .into_split();
        let (tx, chunks) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Serial {
            reader,
            chunks,
            writer,
            seen: Vec::new(),
            log: Vec::new(),
        }
    }

    /// Waits until the console has printed `marker` (since the previous match) and
    /// returns the text up to and including it. Fails after [`TIMEOUT`], showing what came.
    pub async fn wait_for(&mut self, marker: &str) -> String {
        self.wait_for_within(marker, TIMEOUT).await
    }

    pub async fn wait_for_within(&mut self, marker: &str, limit: Duration) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(at) = find(&self.seen, marker.as_bytes()) {
                let end = at + marker.len();
                let upto = String::from_utf8_lossy(&self.seen[..end]).into_owned();
                self.seen.drain(..end);
                return upto;
            }
            match tokio::time::timeout_at(deadline, self.chunks.recv()).await {
                Ok(Some(chunk)) => {
                    self.seen.extend_from_slice(&chunk);
                    self.log.extend_from_slice(&chunk);
                }
                Ok(None) => panic!(
                    "the console closed before {marker:?}; it printed:\n{}",
                    String::from_utf8_lossy(&self.log)
                ),
                Err(_) => panic!(
                    "no {marker:?} on the guest's console within {limit:?}; it printed:\n{}",
                    String::from_utf8_lossy(&self.log)
                ),
            }
        }
    }

    /// Everything the console prints until it closes (the VM stopped).
    pub async fn read_to_end(&mut self) -> String {
        loop {
            match tokio::time::timeout(TIMEOUT, self.chunks.recv()).await {
                Ok(Some(chunk)) => {
                    self.seen.extend_from_slice(&chunk);
                    self.log.extend_from_slice(&chunk);
                }
                Ok(None) => return String::from_utf8_lossy(&self.seen).into_owned(),
                Err(_) => panic!("the guest's console did not close within {TIMEOUT:?}"),
            }
        }
    }

    /// Detaches and waits until maqetd has let go (it closes its end after ours: the
    /// console is then free for the next client, e.g. `maqet console`).
    pub async fn detach(mut self) {
        self.writer.shutdown().await.unwrap();
        self.read_to_end().await;
    }

    /// Runs `command` in the guest's root shell on the serial console and returns its
    /// exit status and what the console showed meanwhile (the echoed command line, then
    /// the command's output).
    pub async fn run(&mut self, command: &str) -> (i32, String) {
        // `\055` is `-`: the echoed command line never contains the marker, its output does.
        self.send(format!("{command}; printf 'MAQET\\055RC=%s.\\n' $?\n").as_bytes())
            .await;
        let shown = self.wait_for("MAQET-RC=").await;
        let status = self.wait_for(".").await;
        let status = status.trim_end_matches('.').parse().unwrap_or_else(|e| {
            panic!("bad exit status {status:?} after {command:?}: {e}\n{shown}")
        });
        (status, shown)
    }

    /// Types into the serial console (the guest's shell on ttyS0 reads it).
    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }
}

impl Drop for Serial {
    /// Closes both directions at once, so maqetd sees the client leave and the console is
    /// free for the next one (`maqet console`).
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
