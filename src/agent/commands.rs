//! The agent's commands maqet uses, as typed calls. Every field the guest sends is
//! optional here: a missing or mistyped one becomes empty or an error, never a panic.

use std::time::Duration;

use serde_json::{Value, json};

use super::{AgentClient, AgentError, base64};

/// How long one ordinary request may take (a TCG guest under load is slow).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The chunk size of file reads and writes: well under the reply cap once base64'd.
const FILE_CHUNK: usize = 1 << 20;

/// What the guest says about itself; empty strings where it does not say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestInfo {
    pub os_name: String,
    pub os_version: String,
    pub hostname: String,
    pub agent_version: String,
}

/// One address of a guest interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Address {
    pub interface: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// The address without prefix length, e.g. `10.0.2.15`.
    pub address: String,
}

/// A finished command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit code, or 128 + the signal number when a signal ended it (like a shell).
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

fn str_field(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn protocol(what: &str, value: &Value) -> AgentError {
    let text = value.to_string();
    AgentError::Protocol(format!("{what}: {}", super::wire::excerpt(text.as_bytes())))
}

impl AgentClient {
    /// `guest-ping`: an agent answers.
    pub async fn ping(&self) -> Result<(), AgentError> {
        self.execute("guest-ping", None, REQUEST_TIMEOUT)
            .await
            .map(drop)
    }

    /// `guest-info`, `guest-get-osinfo` and `guest-get-host-name`. Only the first is
    /// required: older or restricted agents lack the others.
    pub async fn guest_info(&self) -> Result<GuestInfo, AgentError> {
        let info = self.execute("guest-info", None, REQUEST_TIMEOUT).await?;
        let mut out = GuestInfo {
            agent_version: str_field(&info, "version"),
            ..GuestInfo::default()
        };
        match self
            .execute("guest-get-osinfo", None, REQUEST_TIMEOUT)
            .await
        {
            Ok(os) => {
                out.os_name = str_field(&os, "name");
                if out.os_name.is_empty() {
                    out.os_name = str_field(&os, "pretty-name");
                }
                out.os_version = str_field(&os, "version");
                if out.os_version.is_empty() {
                    out.os_version = str_field(&os, "kernel-release");
                }
            }
            Err(AgentError::Command { .. }) => {}
            Err(e) => return Err(e),
        }
        match self
            .execute("guest-get-host-name", None, REQUEST_TIMEOUT)
            .await
        {
            Ok(host) => out.hostname = str_field(&host, "host-name"),
            Err(AgentError::Command { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(out)
    }

    /// `guest-network-get-interfaces`, without loopback addresses (never reachable from
    /// the host), sorted.
    pub async fn addresses(&self) -> Result<Vec<Address>, AgentError> {
        let reply = self
            .execute("guest-network-get-interfaces", None, REQUEST_TIMEOUT)
            .await?;
        let interfaces = reply
            .as_array()
            .ok_or_else(|| protocol("interfaces are not a list", &reply))?;
        let mut out = Vec::new();
        for iface in interfaces {
            let name = str_field(iface, "name");
            let Some(addrs) = iface.get("ip-addresses").and_then(Value::as_array) else {
                continue;
            };
            for addr in addrs {
                let address = str_field(addr, "ip-address");
                let Ok(ip) = address.parse::<std::net::IpAddr>() else {
                    continue;
                };
                if ip.is_loopback() {
                    continue;
                }
                let family = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
                out.push(Address {
                    interface: name.clone(),
                    family: family.to_owned(),
                    address: ip.to_string(),
                });
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Runs `argv` in the guest (`guest-exec`, searched in the agent's PATH) with `stdin`,
    /// and waits up to `timeout` for it to finish. The agent has no completion event, so
    /// this asks `guest-exec-status`, from every 20 ms up to every 500 ms, while the call
    /// lasts (never when nothing runs). On timeout the command keeps running in the guest.
    pub async fn exec(
        &self,
        argv: &[String],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let (path, args) = argv
            .split_first()
            .ok_or_else(|| AgentError::Protocol("empty command line".into()))?;
        let mut arguments = json!({ "path": path, "arg": args, "capture-output": true });
        if !stdin.is_empty() {
            arguments["input-data"] = json!(base64::encode(stdin));
        }
        let started = self
            .execute("guest-exec", Some(arguments), REQUEST_TIMEOUT)
            .await?;
        let pid = started
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| protocol("guest-exec returned no pid", &started))?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout(timeout));
            }
            let status = self
                .execute(
                    "guest-exec-status",
                    Some(json!({ "pid": pid })),
                    left.min(REQUEST_TIMEOUT),
                )
                .await?;
            if status.get("exited").and_then(Value::as_bool) == Some(true) {
                return exec_output(&status);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Reads a guest file, at most `max` bytes; a longer file is an error rather than a
    /// silent truncation.
    pub async fn read_file(&self, path: &str, max: u64) -> Result<Vec<u8>, AgentError> {
        let handle = self.open(path, "r").await?;
        let result = async {
            let mut data = Vec::new();
            loop {
                // One byte past `max` tells a longer file from one of exactly `max` bytes.
                let count = (max - data.len() as u64)
                    .saturating_add(1)
                    .min(FILE_CHUNK as u64);
                let chunk = self
                    .execute(
                        "guest-file-read",
                        Some(json!({ "handle": handle, "count": count })),
                        REQUEST_TIMEOUT,
                    )
                    .await?;
                let bytes = str_field(&chunk, "buf-b64");
                let bytes = base64::decode(&bytes)
                    .ok_or_else(|| protocol("guest-file-read: bad base64", &chunk))?;
                data.extend_from_slice(&bytes);
                if data.len() as u64 > max {
                    return Err(AgentError::Command {
                        command: "guest-file-read".into(),
                        class: "TooLarge".into(),
                        desc: format!("{path} is larger than {max} bytes"),
                    });
                }
                let eof = chunk.get("eof").and_then(Value::as_bool).unwrap_or(true);
                if eof || bytes.is_empty() {
                    return Ok(data);
                }
            }
        }
        .await;
        self.close(handle).await;
        result
    }

    /// Writes (creates or truncates) a guest file.
    pub async fn write_file(&self, path: &str, data: &[u8]) -> Result<(), AgentError> {
        let handle = self.open(path, "w").await?;
        let result = async {
            for chunk in data.chunks(FILE_CHUNK) {
                let reply = self
                    .execute(
                        "guest-file-write",
                        Some(json!({ "handle": handle, "buf-b64": base64::encode(chunk) })),
                        REQUEST_TIMEOUT,
                    )
                    .await?;
                let written = reply.get("count").and_then(Value::as_u64);
                if written != Some(chunk.len() as u64) {
                    return Err(protocol("guest-file-write wrote short", &reply));
                }
            }
            self.execute(
                "guest-file-flush",
                Some(json!({ "handle": handle })),
                REQUEST_TIMEOUT,
            )
            .await
            .map(drop)
        }
        .await;
        self.close(handle).await;
        result
    }

    /// `guest-shutdown` (power off). The agent answers nothing when it works.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.send_only(
            "guest-shutdown",
            Some(json!({ "mode": "powerdown" })),
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// `guest-set-time` with `ns` since the epoch: the guest sets its clock (and a Linux
    /// agent then its hardware clock, `hwclock -w`). A time is given rather than letting
    /// the guest read its hardware clock: Windows' agent requires one, and a guest whose
    /// hardware clock is wrong too (set through the agent, kept in local time) is fixed.
    pub async fn set_time(&self, ns: i64) -> Result<(), AgentError> {
        self.execute(
            "guest-set-time",
            Some(json!({ "time": ns })),
            REQUEST_TIMEOUT,
        )
        .await
        .map(|_| ())
    }

    /// Freezes the guest's filesystems; returns how many.
    pub async fn fsfreeze(&self) -> Result<u64, AgentError> {
        let n = self
            .execute("guest-fsfreeze-freeze", None, REQUEST_TIMEOUT)
            .await?;
        Ok(n.as_u64().unwrap_or(0))
    }

    /// Thaws them again.
    pub async fn fsthaw(&self) -> Result<u64, AgentError> {
        let n = self
            .execute("guest-fsfreeze-thaw", None, REQUEST_TIMEOUT)
            .await?;
        Ok(n.as_u64().unwrap_or(0))
    }

    async fn open(&self, path: &str, mode: &str) -> Result<i64, AgentError> {
        let handle = self
            .execute(
                "guest-file-open",
                Some(json!({ "path": path, "mode": mode })),
                REQUEST_TIMEOUT,
            )
            .await?;
        handle
            .as_i64()
            .ok_or_else(|| protocol("guest-file-open returned no handle", &handle))
    }

    /// Best effort: a handle left open costs the agent little, and the error that
    /// matters is the one already being returned.
    async fn close(&self, handle: i64) {
        if let Err(e) = self
            .execute(
                "guest-file-close",
                Some(json!({ "handle": handle })),
                REQUEST_TIMEOUT,
            )
            .await
        {
            tracing::debug!(error = %e, "guest-file-close failed");
        }
    }
}

fn exec_output(status: &Value) -> Result<ExecOutput, AgentError> {
    let data = |key| -> Result<Vec<u8>, AgentError> {
        match status.get(key).and_then(Value::as_str) {
            None => Ok(Vec::new()),
            Some(text) => base64::decode(text).ok_or_else(|| {
                protocol(&format!("guest-exec-status: bad base64 in {key}"), status)
            }),
        }
    };
    let exit_code = match (
        status.get("exitcode").and_then(Value::as_i64),
        status.get("signal").and_then(Value::as_i64),
    ) {
        (Some(code), _) => code.clamp(i32::MIN.into(), i32::MAX.into()) as i32,
        (None, Some(signal)) => 128 + signal.clamp(0, 127) as i32,
        (None, None) => return Err(protocol("guest-exec-status: no exit code", status)),
    };
    Ok(ExecOutput {
        exit_code,
        stdout: data("out-data")?,
        stderr: data("err-data")?,
    })
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
