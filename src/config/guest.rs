//! The guest-facing keys: `guest_agent`, `forwards`, `ssh_user`. None of them is
//! required, and a config without them compiles to exactly the argv it did before.
//!
//! `forwards` need a user-mode (slirp) network: the config's own `-netdev user,id=…`
//! (named by a forward's `netdev:`, or the only one there is), else one maqet adds
//! (`-netdev user,id=maqet-net` on a `virtio-net-pci` NIC). maqetd installs the forwards
//! through QMP when the VM starts, the same way `VM.AddForward` does at run time.

use std::fmt;
use std::net::Ipv4Addr;

use super::validate::Cx;
use super::yaml::{Entry, Node, Value};

/// The netdev maqet adds when forwards need a user network and the config has none.
pub const OWN_NETDEV_ID: &str = "maqet-net";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    fn parse(text: &str) -> Option<Proto> {
        match text {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// One host → guest port forward on a user-mode network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Forward {
    pub proto: Proto,
    /// Host address the forward listens on; 127.0.0.1 unless the config says otherwise.
    pub bind: Ipv4Addr,
    pub host: u16,
    pub guest: u16,
}

impl Forward {
    /// `[tcp:|udp:][BIND:]HOST:GUEST`, e.g. `2222:22`, `udp:5353:53`,
    /// `0.0.0.0:8080:80`. What `VM.AddForward`/`RemoveForward` take.
    pub fn parse(spec: &str) -> Result<Forward, String> {
        let usage = "write a forward as [tcp:|udp:][BIND:]HOST:GUEST, e.g. `2222:22` or `udp:127.0.0.1:5353:53`";
        let mut parts: Vec<&str> = spec.split(':').collect();
        let proto = match parts.first().and_then(|p| Proto::parse(p)) {
            Some(proto) => {
                parts.remove(0);
                proto
            }
            None => Proto::Tcp,
        };
        let (bind, host, guest) = match parts.as_slice() {
            [host, guest] => ("127.0.0.1", *host, *guest),
            [bind, host, guest] => (*bind, *host, *guest),
            _ => return Err(format!("invalid forward `{spec}`: {usage}")),
        };
        let bind = bind
            .parse()
            .map_err(|_| format!("invalid forward `{spec}`: `{bind}` is not an IPv4 address"))?;
        Ok(Forward {
            proto,
            bind,
            host: port(host).map_err(|e| format!("invalid forward `{spec}`: {e}"))?,
            guest: port(guest).map_err(|e| format!("invalid forward `{spec}`: {e}"))?,
        })
    }

    /// The rule as QEMU's `hostfwd_add` takes it.
    pub fn hostfwd_rule(&self) -> String {
        format!(
            "{}:{}:{}-:{}",
            self.proto.as_str(),
            self.bind,
            self.host,
            self.guest
        )
    }

    /// The rule's key as QEMU's `hostfwd_remove` takes it.
    pub fn hostfwd_key(&self) -> String {
        format!("{}:{}:{}", self.proto.as_str(), self.bind, self.host)
    }
}

impl fmt::Display for Forward {
    /// The canonical spec, which [`Forward::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.proto.as_str(),
            self.bind,
            self.host,
            self.guest
        )
    }
}

fn port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("`{text}` is not a port (1-65535)")),
        Ok(p) => Ok(p),
    }
}

/// What the guest keys compiled to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestKeys {
    pub guest_agent: bool,
    pub forwards: Vec<Forward>,
    /// The user-mode netdev the forwards live on (`None` when there are none).
    pub forward_netdev: Option<String>,
    pub ssh_user: Option<String>,
    /// The NoCloud seed's contents (`cloud_init` and its convenience keys).
    pub cloud_init: Option<super::cloud_init::CloudInit>,
}

/// `guest_agent: true|false`.
pub(crate) fn guest_agent(entry: &mut Entry, cx: &mut Cx) -> bool {
    match entry.value.value {
        Value::Bool(b) => b,
        _ => {
            let message = format!(
                "`guest_agent` must be true or false, found {}",
                entry.value.kind_name()
            );
            cx.diags.error(&entry.value.loc, message);
            false
        }
    }
}

/// `ssh_user: NAME`: a user name, never something `ssh` would read as an option.
pub(crate) fn ssh_user(entry: &mut Entry, cx: &mut Cx) -> Option<String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
    };
    match &entry.value.value {
        Value::Str(s) if ok(s) => Some(s.clone()),
        _ => {
            let found = entry
                .value
                .scalar_text()
                .unwrap_or_else(|| entry.value.kind_name().into());
            cx.diags.error_hint(
                &entry.value.loc,
                format!("invalid `ssh_user` `{found}`"),
                "a user name in the guest: letters, digits, `.`, `_`, `@` or `-`, not starting with `-`",
            );
            None
        }
    }
}

/// `forwards:` items: `{host: PORT, guest: PORT, proto: tcp|udp, bind: IPV4, netdev: ID}`
/// (only `host` and `guest` required). Returns the forwards and the netdev each names.
pub(crate) fn forwards(items: &mut [Node], cx: &mut Cx) -> Vec<(Forward, Option<String>)> {
    const KEYS: &[&str] = &["host", "guest", "proto", "bind", "netdev"];
    let hint = "e.g. `forwards: [{host: 2222, guest: 22}]`";
    let mut out = Vec::new();
    for item in items {
        let Value::Map(entries) = &item.value else {
            let message = format!("a forward must be a mapping, found {}", item.kind_name());
            cx.diags.error_hint(&item.loc, message, hint);
            continue;
        };
        let mut fwd = Forward {
            proto: Proto::Tcp,
            bind: Ipv4Addr::LOCALHOST,
            host: 0,
            guest: 0,
        };
        let mut netdev = None;
        let mut ok = true;
        for e in entries {
            let text = e.value.scalar_text().unwrap_or_default();
            let result = match e.key.as_str() {
                "host" => port(&text).map(|p| fwd.host = p),
                "guest" => port(&text).map(|p| fwd.guest = p),
                "proto" => Proto::parse(&text)
                    .map(|p| fwd.proto = p)
                    .ok_or_else(|| format!("`proto` must be tcp or udp, found `{text}`")),
                "bind" => text
                    .parse()
                    .map(|a| fwd.bind = a)
                    .map_err(|_| format!("`bind` must be an IPv4 address, found `{text}`")),
                "netdev" if !text.is_empty() => {
                    netdev = Some(text);
                    Ok(())
                }
                "netdev" => Err("`netdev` must name a `-netdev user` id".to_owned()),
                other => Err(format!(
                    "unknown forward key `{other}`{}",
                    super::diag::suggest(other, KEYS)
                        .map(|s| format!(" (did you mean `{s}`?)"))
                        .unwrap_or_default()
                )),
            };
            if let Err(message) = result {
                cx.diags.error(&e.value.loc, message);
                ok = false;
            }
        }
        if ok && (fwd.host == 0 || fwd.guest == 0) {
            cx.diags.error_hint(
                &item.loc,
                "a forward needs both `host` and `guest` ports",
                hint,
            );
            ok = false;
        }
        if ok {
            if let Some((earlier, _)) = out
                .iter()
                .find(|(f, _): &&(Forward, Option<String>)| f.hostfwd_key() == fwd.hostfwd_key())
            {
                let message = format!(
                    "host port {} is forwarded twice (also `{earlier}`)",
                    fwd.host
                );
                cx.diags.error(&item.loc, message);
                continue;
            }
            out.push((fwd, netdev));
        }
    }
    out
}

/// The ids of the `-netdev user,…` networks in an argv.
pub fn user_netdevs(argv: &[String]) -> Vec<String> {
    argv.windows(2)
        .filter(|w| matches!(w[0].as_str(), "-netdev" | "--netdev"))
        .filter_map(|w| {
            let mut parts = w[1].split(',');
            (parts.next() == Some("user")).then_some(())?;
            parts.find_map(|p| p.strip_prefix("id=")).map(str::to_owned)
        })
        .collect()
}

/// Picks the netdev for the forwards (reporting at `loc` when it cannot) and, when maqet
/// must provide the network, the argv that adds it.
pub(crate) fn forward_network(
    forwards: &[(Forward, Option<String>)],
    argv: &[String],
    loc: &super::yaml::Loc,
    cx: &mut Cx,
) -> (Option<String>, Vec<String>) {
    if forwards.is_empty() {
        return (None, Vec::new());
    }
    let netdevs = user_netdevs(argv);
    let mut named: Vec<&String> = forwards.iter().filter_map(|(_, n)| n.as_ref()).collect();
    named.sort();
    named.dedup();
    match (named.as_slice(), netdevs.as_slice()) {
        ([], []) => (
            Some(OWN_NETDEV_ID.to_owned()),
            vec![
                "-netdev".into(),
                format!("user,id={OWN_NETDEV_ID}"),
                "-device".into(),
                format!("virtio-net-pci,netdev={OWN_NETDEV_ID}"),
            ],
        ),
        ([], [only]) => (Some(only.clone()), Vec::new()),
        ([], _) => {
            cx.diags.error_hint(
                loc,
                format!(
                    "the config has several user networks ({}); which one do the forwards use?",
                    netdevs.join(", ")
                ),
                "add `netdev: ID` to the forwards",
            );
            (None, Vec::new())
        }
        ([one], _) if netdevs.contains(one) => (Some((*one).clone()), Vec::new()),
        ([one], _) => {
            cx.diags.error_hint(
                loc,
                format!("forwards name netdev `{one}`, which is no `-netdev user` of this config"),
                "add `{netdev: {user: null, id: ID}}` to `arguments`, or drop `netdev:` to let maqet add a user network",
            );
            (None, Vec::new())
        }
        _ => {
            cx.diags.error_hint(
                loc,
                "the forwards name different networks; maqet forwards on one user network",
                "give every forward the same `netdev:` (or none)",
            );
            (None, Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_canonically() {
        let f = Forward::parse("2222:22").unwrap();
        assert_eq!(f.to_string(), "tcp:127.0.0.1:2222:22");
        assert_eq!(f.hostfwd_rule(), "tcp:127.0.0.1:2222-:22");
        assert_eq!(f.hostfwd_key(), "tcp:127.0.0.1:2222");
        let f = Forward::parse("udp:0.0.0.0:5353:53").unwrap();
        assert_eq!(f.to_string(), "udp:0.0.0.0:5353:53");
        assert_eq!(Forward::parse(&f.to_string()).unwrap(), f);
        for bad in [
            "",
            "22",
            "0:22",
            "22:0",
            "x:1:2:3:4",
            "tcp:1.2.3:1:2",
            "70000:22",
            "sctp:1:2",
            "::1:22:22",
        ] {
            assert!(Forward::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_netdevs_are_found_by_id() {
        let argv: Vec<String> = [
            "-netdev",
            "user,id=a,restrict=on",
            "-netdev",
            "tap,id=b",
            "-device",
            "user,id=c",
        ]
        .map(String::from)
        .into();
        assert_eq!(user_netdevs(&argv), ["a"]);
    }
}
