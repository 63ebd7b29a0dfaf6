//! `org.maqet.Maqet1.QMP`: one object per VM (at the VM's path). Classify, authorize
//! through the gate, forward to the core.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedVariant, Variant, interface};

use super::Shared;
use crate::access::{Action, Request};
use crate::error::MaqetError;
use crate::qmp::classify::{Command, Tier};
use crate::vm::Vm;

pub struct QmpIface {
    shared: Arc<Shared>,
    vm: Arc<Vm>,
}

impl QmpIface {
    pub fn new(shared: Arc<Shared>, vm: Arc<Vm>) -> QmpIface {
        QmpIface { shared, vm }
    }

    /// The request for a command: its tier's action, and the interlock when it needs
    /// `allow_dangerous` and the caller did not pass it (`remedy` says how to).
    /// A command that could not be parsed is checked as a plain execute call.
    fn request(
        &self,
        method: &'static str,
        cmd: &Result<Command, String>,
        allowed_dangerous: bool,
        remedy: &str,
    ) -> Request {
        let Ok(cmd) = cmd else {
            return Request::new(Action::QmpExecute, method).on_vm(&self.vm);
        };
        let tier = cmd.class.tier;
        let mut req = Request::new(tier.action(), method)
            .on_vm(&self.vm)
            .with_args(cmd.summary());
        if tier == Tier::Query {
            req = req.read_only();
        }
        if !allowed_dangerous && let Some(why) = cmd.dangerous_refusal() {
            req = req.interlocked(format!("{why}; {remedy}"));
        }
        req
    }
}

#[interface(name = "org.maqet.Maqet1.QMP")]
impl QmpIface {
    /// Runs a QMP command. `arguments_json`: empty or a JSON object. Dangerous and
    /// memory-dump commands also need `allow_dangerous`. Returns QEMU's `return` value
    /// as JSON; a QMP error is `org.maqet.Maqet1.Error.Qmp` ("Class: description").
    #[zbus(out_args("result_json"))]
    async fn execute(
        &self,
        command: &str,
        arguments_json: &str,
        allow_dangerous: bool,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, MaqetError> {
        let cmd = Command::parse(command, arguments_json);
        let remedy =
            "pass allow_dangerous=true to run it (maqet qmp VM COMMAND ARGS --allow-dangerous)";
        let req = self.request("Execute", &cmd, allow_dangerous, remedy);
        let work = async {
            let cmd = cmd.map_err(MaqetError::InvalidArgument)?;
            Ok(self.vm.execute(cmd).await?.to_string())
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Hot-plugs `driver` as `id`; `properties` (strings, booleans, numbers) become its
    /// QEMU properties, e.g. `bus`.
    async fn device_add(
        &self,
        driver: &str,
        id: &str,
        properties: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let cmd =
            device_properties(properties).and_then(|props| Command::device_add(driver, id, props));
        let remedy = "DeviceAdd has no allow_dangerous flag: use Execute(\"device_add\", …, true) \
                      (maqet qmp VM device_add ARGS --allow-dangerous)";
        let req = self.request("DeviceAdd", &cmd, false, remedy);
        let work = async {
            let cmd = cmd.map_err(MaqetError::InvalidArgument)?;
            Ok(self.vm.execute(cmd).await.map(drop)?)
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Hot-unplugs device `id`; returns once QEMU reports it gone (`DEVICE_DELETED`),
    /// or fails with `Timeout` after 10 s while the removal is still pending in the guest.
    async fn device_del(
        &self,
        id: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), MaqetError> {
        let cmd = Command::device_del(id);
        let req = self.request("DeviceDel", &cmd, false, "");
        let work = async {
            let cmd = cmd.map_err(MaqetError::InvalidArgument)?;
            Ok(self.vm.device_del(id, cmd).await?)
        };
        self.shared
            .gate
            .call::<_, MaqetError, _>(conn, &hdr, req, work)
            .await
    }

    /// Every asynchronous QMP event of the VM; `timestamp` is QEMU's, in µs since the
    /// epoch.
    #[zbus(signal)]
    pub async fn event(
        emitter: &SignalEmitter<'_>,
        name: &str,
        data_json: &str,
        timestamp: u64,
    ) -> zbus::Result<()>;
}

/// `a{sv}` → QMP property values: strings, booleans and numbers.
fn device_properties(props: HashMap<String, OwnedVariant>) -> Result<Map<String, Value>, String> {
    props
        .into_iter()
        .map(|(key, value)| {
            let json = match &*value {
                Variant::Str(s) => Value::from(s.as_str()),
                Variant::Bool(b) => Value::from(*b),
                Variant::U8(n) => Value::from(*n),
                Variant::U16(n) => Value::from(*n),
                Variant::U32(n) => Value::from(*n),
                Variant::U64(n) => Value::from(*n),
                Variant::I16(n) => Value::from(*n),
                Variant::I32(n) => Value::from(*n),
                Variant::I64(n) => Value::from(*n),
                Variant::F64(n) => Value::from(*n),
                other => {
                    return Err(format!(
                        "property '{key}' has D-Bus type '{}': device properties are strings, \
                         booleans or numbers",
                        other.value_signature()
                    ));
                }
            };
            Ok((key, json))
        })
        .collect()
}
