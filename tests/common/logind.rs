//! A logind stand-in for tests: a private *system* bus (its own `dbus-daemon`) on which
//! the test owns `org.freedesktop.login1` and serves the part of its Manager maqetd uses:
//! `Inhibit` (the fd handed out is a pipe's write end; the stand-in keeps the read end
//! and sees the caller release it as end-of-file), and the signals `PrepareForSleep` /
//! `PrepareForShutdown`, which the test emits.

use std::io::Read;
use std::process::{Child, Command, Stdio};

use tokio::sync::watch;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, interface};

use super::TIMEOUT;

const PATH: &str = "/org/freedesktop/login1";

/// Inhibitors held, per `what` (`sleep`, `shutdown`): taken minus released.
type Held = watch::Sender<Vec<(String, String)>>;

struct Manager {
    held: Held,
}

#[interface(name = "org.freedesktop.login1.Manager")]
impl Manager {
    fn inhibit(
        &self,
        what: String,
        who: String,
        _why: String,
        mode: String,
    ) -> zbus::fdo::Result<zbus::OwnedFd> {
        let (mut read, write) =
            std::io::pipe().map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
        let entry = (what, format!("{who}/{mode}"));
        self.held.send_modify(|h| h.push(entry.clone()));
        let held = self.held.clone();
        // Released when every copy of the write end is closed: the read sees EOF.
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while matches!(read.read(&mut buf), Ok(n) if n > 0) {}
            held.send_modify(|h| {
                if let Some(i) = h.iter().position(|e| *e == entry) {
                    h.remove(i);
                }
            });
        });
        Ok(zbus::OwnedFd::from(std::os::fd::OwnedFd::from(write)))
    }

    #[zbus(signal)]
    async fn prepare_for_sleep(emitter: &SignalEmitter<'_>, start: bool) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn prepare_for_shutdown(emitter: &SignalEmitter<'_>, start: bool) -> zbus::Result<()>;
}

pub struct Logind {
    bus: Child,
    pub address: String,
    conn: Connection,
    held: watch::Receiver<Vec<(String, String)>>,
    _dir: tempfile::TempDir,
}

impl Logind {
    pub async fn start() -> Logind {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("system.conf");
        std::fs::write(&conf, format!(r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#, dir.path().join("system.sock").display())).unwrap();
        let mut bus = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon must be installed");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(bus.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line.trim().to_string();
        let (held, rx) = watch::channel(Vec::new());
        let conn = zbus::connection::Builder::address(address.as_str())
            .serve_at(PATH, Manager { held })
            .name("org.freedesktop.login1")
            .build()
            .await
            .unwrap();
        Logind {
            bus,
            address,
            conn,
            held: rx,
            _dir: dir,
        }
    }

    fn count(&self, what: &str) -> usize {
        self.held.borrow().iter().filter(|(w, _)| w == what).count()
    }

    /// Waits until exactly `n` inhibitors for `what` are held; every one taken was a
    /// `maqet` `delay` lock.
    pub async fn until_held(&self, what: &str, n: usize) {
        let mut rx = self.held.clone();
        tokio::time::timeout(
            TIMEOUT,
            rx.wait_for(|h| h.iter().filter(|(w, _)| w == what).count() == n),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what} inhibitors: {} held, waited for {n}",
                self.count(what)
            )
        })
        .unwrap();
        for (_, how) in self.held.borrow().iter() {
            assert_eq!(how, "maqet/delay");
        }
    }

    pub async fn prepare_for_sleep(&self, start: bool) {
        let emitter = SignalEmitter::new(&self.conn, PATH).unwrap();
        Manager::prepare_for_sleep(&emitter, start).await.unwrap();
    }

    pub async fn prepare_for_shutdown(&self, start: bool) {
        let emitter = SignalEmitter::new(&self.conn, PATH).unwrap();
        Manager::prepare_for_shutdown(&emitter, start)
            .await
            .unwrap();
    }
}

impl Drop for Logind {
    fn drop(&mut self) {
        let _ = self.bus.kill();
        let _ = self.bus.wait();
    }
}
