//! A systemd user manager stand-in for tests: owns `org.freedesktop.systemd1` on the
//! private session bus and serves the part of its Manager maqetd uses: records every
//! `StartTransientUnit` (name and properties) and answers `GetUnitByPID` for the pids
//! of the scopes it made; `SystemState` is what the test sets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, interface};

const PATH: &str = "/org/freedesktop/systemd1";

/// One `StartTransientUnit` as received.
#[derive(Debug)]
pub struct Transient {
    pub name: String,
    pub mode: String,
    pub properties: HashMap<String, OwnedVariant>,
}

/// What the stand-in was asked.
#[derive(Debug)]
pub enum Call {
    StartTransientUnit(Transient),
    GetUnitByPid(u32),
}

struct Manager {
    calls: mpsc::UnboundedSender<Call>,
    units: Arc<Mutex<HashMap<u32, String>>>,
    state: Arc<Mutex<String>>,
}

fn unit_path(name: &str) -> OwnedObjectPath {
    let mut p = String::from("/org/freedesktop/systemd1/unit/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            p.push(b as char);
        } else {
            p.push_str(&format!("_{b:02x}"));
        }
    }
    OwnedObjectPath::try_from(p).unwrap()
}

#[interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    fn start_transient_unit(
        &self,
        name: String,
        mode: String,
        properties: Vec<(String, OwnedVariant)>,
        _aux: Vec<(String, Vec<(String, OwnedVariant)>)>,
    ) -> OwnedObjectPath {
        let properties: HashMap<String, OwnedVariant> = properties.into_iter().collect();
        if let Some(pids) = properties.get("PIDs") {
            let pids: Vec<u32> = pids.try_clone().unwrap().try_into().unwrap();
            for pid in pids {
                self.units.lock().unwrap().insert(pid, name.clone());
            }
        }
        let path = unit_path(&name);
        let _ = self.calls.send(Call::StartTransientUnit(Transient {
            name,
            mode,
            properties,
        }));
        path
    }

    #[zbus(name = "GetUnitByPID")]
    fn get_unit_by_pid(&self, pid: u32) -> zbus::fdo::Result<OwnedObjectPath> {
        let _ = self.calls.send(Call::GetUnitByPid(pid));
        // Any other process is in maqetd's own unit, as on a real desktop.
        let unit = self
            .units
            .lock()
            .unwrap()
            .get(&pid)
            .cloned()
            .unwrap_or_else(|| "maqetd.service".into());
        Ok(unit_path(&unit))
    }

    #[zbus(property)]
    fn system_state(&self) -> String {
        self.state.lock().unwrap().clone()
    }
}

pub struct UserManager {
    _conn: Connection,
    pub calls: mpsc::UnboundedReceiver<Call>,
    state: Arc<Mutex<String>>,
}

impl UserManager {
    /// Serves the stand-in on the test bus (before maqetd is activated).
    pub async fn start(bus: &super::Bus) -> UserManager {
        let (tx, calls) = mpsc::unbounded_channel();
        let state = Arc::new(Mutex::new("running".to_string()));
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .serve_at(
                PATH,
                Manager {
                    calls: tx,
                    units: Arc::default(),
                    state: state.clone(),
                },
            )
            .name("org.freedesktop.systemd1")
            .build()
            .await
            .unwrap();
        UserManager {
            _conn: conn,
            calls,
            state,
        }
    }

    /// The next call, within the test timeout.
    pub async fn next(&mut self) -> Call {
        tokio::time::timeout(super::TIMEOUT, self.calls.recv())
            .await
            .expect("no call to the user manager")
            .expect("stand-in gone")
    }

    pub fn set_state(&self, state: &str) {
        *self.state.lock().unwrap() = state.to_string();
    }
}
