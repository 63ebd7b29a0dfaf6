//! `Wait`: conditions on the status or on the VM's QMP events.

use super::*;

impl Vm {
    pub(super) async fn await_status(
        &self,
        wanted: &[Status],
        limit: Duration,
    ) -> Result<(), VmError> {
        let mut rx = self.subscribe_status();
        match tokio::time::timeout(limit, rx.wait_for(|s| wanted.contains(s))).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(VmError::Timeout(format!(
                "VM '{}' did not become {} within {} s (it is {})",
                self.name(),
                wanted
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" or "),
                limit.as_secs(),
                self.status()
            ))),
        }
    }

    /// Waits for a condition; returns what satisfied it (the status, or the event's
    /// data as JSON).
    pub async fn wait(&self, cond: &WaitCondition, limit: Duration) -> Result<String, VmError> {
        let timeout = || {
            VmError::Timeout(format!(
                "VM '{}': condition not met within {} s (status is {})",
                self.name(),
                limit.as_secs(),
                self.status()
            ))
        };
        match cond {
            WaitCondition::Status(states) => {
                let mut rx = self.subscribe_status();
                match tokio::time::timeout(limit, rx.wait_for(|s| states.contains(s))).await {
                    Ok(Ok(s)) => Ok(s.as_str().to_string()),
                    _ => Err(timeout()),
                }
            }
            WaitCondition::Agent(states) => {
                let mut rx = self.subscribe_agent();
                match tokio::time::timeout(limit, rx.wait_for(|s| states.contains(s))).await {
                    Ok(Ok(s)) => Ok(s.as_str().to_string()),
                    _ => Err(timeout()),
                }
            }
            WaitCondition::Event(name) => {
                let mut rx = self.subscribe_qmp();
                let wait = next_qmp_event(&mut rx, |n, _| n == name);
                match tokio::time::timeout(limit, wait).await {
                    Ok(Some(data)) => Ok(data.to_string()),
                    _ => Err(timeout()),
                }
            }
        }
    }
}

/// What `Wait` can wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitCondition {
    /// `status=running` or `status=stopped|crashed`.
    Status(Vec<Status>),
    /// `event=RESUME`: the next QMP event of that name.
    Event(String),
    /// `agent=connected`: the guest agent's state (`GuestAgent`), now or later.
    Agent(Vec<super::guest::AgentState>),
}

impl WaitCondition {
    pub fn parse(s: &str) -> Result<WaitCondition, VmError> {
        let bad = |why: String| {
            VmError::InvalidArgument(format!(
                "bad wait condition '{s}': {why}; use status=<state>[|<state>…], agent=absent|connecting|connected or event=<QMP event name>, e.g. status=running, agent=connected or event=RESUME"
            ))
        };
        let (key, value) = s.split_once('=').ok_or_else(|| bad("missing '='".into()))?;
        match key.trim() {
            "status" => {
                let states = value
                    .split('|')
                    .map(|v| {
                        Status::parse(v.trim()).ok_or_else(|| {
                            bad(format!(
                                "unknown state '{}' (states: {})",
                                v.trim(),
                                Status::ALL.map(|s| s.as_str()).join(", ")
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(WaitCondition::Status(states))
            }
            "agent" => {
                use super::guest::AgentState;
                let states = value
                    .split('|')
                    .map(|v| {
                        AgentState::parse(v.trim()).ok_or_else(|| {
                            bad(format!(
                                "unknown agent state '{}' (states: {})",
                                v.trim(),
                                AgentState::ALL.map(AgentState::as_str).join(", ")
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(WaitCondition::Agent(states))
            }
            "event" => {
                let name = value.trim();
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                {
                    return Err(bad("QMP event names are upper case, like RESUME".into()));
                }
                Ok(WaitCondition::Event(name.to_string()))
            }
            other => Err(bad(format!("unknown condition '{other}'"))),
        }
    }
}

/// The data of the next QMP event `matches` accepts; `None` once no more can come.
pub(super) async fn next_qmp_event(
    rx: &mut broadcast::Receiver<(String, Value)>,
    matches: impl Fn(&str, &Value) -> bool,
) -> Option<Value> {
    loop {
        match rx.recv().await {
            Ok((name, data)) if matches(&name, &data) => return Some(data),
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::guest::AgentState;

    #[test]
    fn agent_conditions_parse_and_name_the_states() {
        assert_eq!(
            WaitCondition::parse("agent=connected").unwrap(),
            WaitCondition::Agent(vec![AgentState::Connected])
        );
        assert_eq!(
            WaitCondition::parse("agent=absent|connecting").unwrap(),
            WaitCondition::Agent(vec![AgentState::Absent, AgentState::Connecting])
        );
        let e = WaitCondition::parse("agent=up").unwrap_err().to_string();
        assert!(e.contains("absent, connecting, connected"), "{e}");
    }
}
