//! The access policy: who may call at all, and for each action `yes`, `no` or `auth`.
//!
//! Shipped defaults: the service's own user may do everything, except the actions that
//! reach the host or guest memory (`org.maqet.qmp.dangerous`, `org.maqet.qmp.memory-dump`),
//! which ask polkit (`auth`). `$XDG_CONFIG_HOME/maqet/policy.yaml` overrides them, per
//! action and per VM. This module only evaluates; `Gate` asks polkit and audits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

use super::Action;

/// What the policy says about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Yes,
    No,
    /// Ask polkit (the desktop's agent may prompt).
    Auth,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Yes => "yes",
            Verdict::No => "no",
            Verdict::Auth => "auth",
        }
    }
}

/// Where a verdict came from, for the denial message and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub because: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    allow_uids: BTreeSet<u32>,
    actions: BTreeMap<Action, Verdict>,
    /// VM name or id → per-action verdicts.
    vms: BTreeMap<String, BTreeMap<Action, Verdict>>,
}

/// The built-in verdict of an action for the service's own user.
fn shipped(action: Action) -> Verdict {
    match action {
        Action::QmpDangerous | Action::QmpMemoryDump => Verdict::Auth,
        _ => Verdict::Yes,
    }
}

/// The YAML shape of policy.yaml.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow_uids: Vec<u32>,
    #[serde(default)]
    actions: BTreeMap<String, VerdictValue>,
    #[serde(default)]
    vms: BTreeMap<String, BTreeMap<String, VerdictValue>>,
}

/// `yes`/`no`/`auth`, or YAML booleans (`true`/`false`).
#[derive(Deserialize)]
#[serde(untagged)]
enum VerdictValue {
    Bool(bool),
    Word(String),
}

impl Policy {
    /// The shipped defaults (what applies without a policy file).
    pub fn shipped() -> Policy {
        Policy::default()
    }

    /// Parses policy.yaml; errors name the file, line and column and what to do.
    pub fn parse(text: &str, origin: &Path) -> Result<Policy, String> {
        if text.trim().is_empty() {
            return Ok(Policy::shipped());
        }
        let file: PolicyFile = serde_yaml::from_str(text).map_err(|e| match e.location() {
            Some(l) => format!("{}:{}:{}: {e}", origin.display(), l.line(), l.column()),
            None => format!("{}: {e}", origin.display()),
        })?;
        let mut policy = Policy {
            allow_uids: file.allow_uids.into_iter().collect(),
            ..Policy::default()
        };
        for (id, v) in file.actions {
            policy
                .actions
                .insert(action(&id, origin)?, verdict(v, &id, origin)?);
        }
        for (vm, rules) in file.vms {
            let mut map = BTreeMap::new();
            for (id, v) in rules {
                map.insert(action(&id, origin)?, verdict(v, &id, origin)?);
            }
            policy.vms.insert(vm, map);
        }
        Ok(policy)
    }

    /// Reads policy.yaml; a missing file means the shipped defaults.
    pub fn load(path: &Path) -> Result<Policy, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Policy::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Policy::shipped()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Whether `caller_uid` is one of the users this service serves at all (its own user,
    /// or one in `allow_uids`). Everyone else is a stranger: refused every call, told
    /// nothing about any VM, sent no signal.
    pub fn admits(&self, owner_uid: u32, caller_uid: u32) -> bool {
        caller_uid == owner_uid || self.allow_uids.contains(&caller_uid)
    }

    /// The verdict for `caller_uid` doing `action` on `vm` (id, name), in a service run
    /// by `owner_uid`. Order: other users need `allow_uids`; then a per-VM rule (by id,
    /// then by name); then the file's action default; then the shipped default.
    pub fn decide(
        &self,
        owner_uid: u32,
        caller_uid: u32,
        action: Action,
        vm: Option<(&str, &str)>,
    ) -> Decision {
        if !self.admits(owner_uid, caller_uid) {
            return Decision {
                verdict: Verdict::No,
                because: format!(
                    "this maqetd serves uid {owner_uid} and uid {caller_uid} is not in allow_uids of policy.yaml"
                ),
            };
        }
        if let Some((id, name)) = vm {
            for key in [id, name] {
                if let Some(v) = self.vms.get(key).and_then(|r| r.get(&action)) {
                    return Decision {
                        verdict: *v,
                        because: format!("policy.yaml says {} for VM '{key}'", v.as_str()),
                    };
                }
            }
        }
        if let Some(v) = self.actions.get(&action) {
            return Decision {
                verdict: *v,
                because: format!("policy.yaml says {}", v.as_str()),
            };
        }
        let v = shipped(action);
        Decision {
            verdict: v,
            because: format!("the shipped policy says {}", v.as_str()),
        }
    }
}

fn action(id: &str, origin: &Path) -> Result<Action, String> {
    Action::from_id(id).ok_or_else(|| {
        let known: Vec<&str> = Action::ALL.iter().map(|a| a.id()).collect();
        let close = known
            .iter()
            .filter(|k| strsim::levenshtein(k, id) <= 3)
            .min_by_key(|k| strsim::levenshtein(k, id));
        match close {
            Some(k) => format!(
                "{}: unknown action `{id}` (did you mean `{k}`?)",
                origin.display()
            ),
            None => format!(
                "{}: unknown action `{id}`; actions: {}",
                origin.display(),
                known.join(", ")
            ),
        }
    })
}

fn verdict(v: VerdictValue, id: &str, origin: &Path) -> Result<Verdict, String> {
    match v {
        VerdictValue::Bool(true) => Ok(Verdict::Yes),
        VerdictValue::Bool(false) => Ok(Verdict::No),
        VerdictValue::Word(w) => match w.as_str() {
            "yes" => Ok(Verdict::Yes),
            "no" => Ok(Verdict::No),
            "auth" => Ok(Verdict::Auth),
            other => Err(format!(
                "{}: `{id}: {other}` is not a verdict; use yes, no or auth",
                origin.display()
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u32 = 1000;
    const OTHER: u32 = 1001;

    fn parse(text: &str) -> Result<Policy, String> {
        Policy::parse(text, Path::new("policy.yaml"))
    }

    #[test]
    fn shipped_defaults() {
        let p = Policy::shipped();
        for a in Action::ALL {
            let want = match a {
                Action::QmpDangerous | Action::QmpMemoryDump => Verdict::Auth,
                _ => Verdict::Yes,
            };
            assert_eq!(p.decide(ME, ME, a, None).verdict, want, "{}", a.id());
            assert_eq!(
                p.decide(ME, OTHER, a, None).verdict,
                Verdict::No,
                "{}",
                a.id()
            );
        }
    }

    #[test]
    fn the_table_of_the_issue() {
        let p = parse(
            "allow_uids: [1001]\nactions:\n  org.maqet.qmp.dangerous: yes\nvms:\n  prod:\n    org.maqet.vm.lifecycle: no\n",
        )
        .unwrap();
        let prod = Some(("0b4a…", "prod"));
        let dev = Some(("77c1…", "dev"));
        let d = p.decide(ME, ME, Action::Lifecycle, prod);
        assert_eq!(d.verdict, Verdict::No);
        assert!(d.because.contains("VM 'prod'"), "{}", d.because);
        assert_eq!(
            p.decide(ME, ME, Action::Lifecycle, dev).verdict,
            Verdict::Yes
        );
        assert_eq!(
            p.decide(ME, ME, Action::QmpDangerous, dev).verdict,
            Verdict::Yes
        );
        assert_eq!(
            p.decide(ME, ME, Action::QmpMemoryDump, dev).verdict,
            Verdict::Auth
        );
        // An allowed other user gets the same rules as the owner.
        assert_eq!(
            p.decide(ME, OTHER, Action::Observe, dev).verdict,
            Verdict::Yes
        );
        assert_eq!(
            p.decide(ME, OTHER, Action::Lifecycle, prod).verdict,
            Verdict::No
        );
        assert_eq!(
            p.decide(ME, 1002, Action::Observe, dev).verdict,
            Verdict::No
        );
    }

    #[test]
    fn vm_rules_match_by_id_before_name() {
        let p =
            parse("vms:\n  abc: {org.maqet.vm.manage: auth}\n  web: {org.maqet.vm.manage: no}\n")
                .unwrap();
        assert_eq!(
            p.decide(ME, ME, Action::Manage, Some(("abc", "web")))
                .verdict,
            Verdict::Auth
        );
        assert_eq!(
            p.decide(ME, ME, Action::Manage, Some(("zzz", "web")))
                .verdict,
            Verdict::No
        );
    }

    #[test]
    fn booleans_and_words() {
        let p = parse("actions: {org.maqet.vm.console: false, org.maqet.snapshot.load: auth}\n")
            .unwrap();
        assert_eq!(p.decide(ME, ME, Action::Console, None).verdict, Verdict::No);
        assert_eq!(
            p.decide(ME, ME, Action::SnapshotLoad, None).verdict,
            Verdict::Auth
        );
    }

    #[test]
    fn mistakes_are_named() {
        let e = parse("actions: {org.maqet.vm.lifecycel: no}\n").unwrap_err();
        assert!(e.contains("did you mean `org.maqet.vm.lifecycle`"), "{e}");
        let e = parse("actions: {org.maqet.vm.console: maybe}\n").unwrap_err();
        assert!(e.contains("yes, no or auth"), "{e}");
        let e = parse("allow_uid: [1]\n").unwrap_err();
        assert!(e.contains("policy.yaml") && e.contains("allow_uids"), "{e}");
        let e = parse("allow_uids: [one]\n").unwrap_err();
        assert!(e.contains("policy.yaml"), "{e}");
    }
}
