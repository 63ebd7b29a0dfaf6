//! Asking polkitd (on the system bus) about an `auth` action.
//!
//! The subject is the caller's process (pid, start time, uid, from the bus's
//! credentials), never maqetd itself: polkit must judge the person asking, and
//! interaction is allowed so the desktop's agent can prompt them.

use std::collections::HashMap;

use tokio::sync::Mutex;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use super::{Action, Caller};

/// A lazily opened connection to polkitd; reconnects after the system bus went away.
#[derive(Default)]
pub struct Polkit {
    authority: Mutex<Option<AuthorityProxy<'static>>>,
}

impl std::fmt::Debug for Polkit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Polkit")
    }
}

/// Tells the user how to get past a missing polkit.
pub const NO_POLKIT_HINT: &str = "install and run polkitd, or set this action to yes or no in $XDG_CONFIG_HOME/maqet/policy.yaml";

impl Polkit {
    async fn authority(&self) -> Result<AuthorityProxy<'static>, String> {
        let mut slot = self.authority.lock().await;
        if let Some(a) = slot
            .as_ref()
            .filter(|a| !a.inner().connection().is_closed())
        {
            return Ok(a.clone());
        }
        let conn = zbus::connection::Builder::system()
            .build()
            .await
            .map_err(|e| {
                format!("polkitd is not reachable (no system bus: {e}); {NO_POLKIT_HINT}")
            })?;
        let proxy = AuthorityProxy::new(&conn)
            .await
            .map_err(|e| format!("polkitd is not reachable ({e}); {NO_POLKIT_HINT}"))?;
        *slot = Some(proxy.clone());
        Ok(proxy)
    }

    /// Whether polkit authorizes `caller` for `action`. `Err` says why it could not be
    /// asked (no system bus, no polkitd, no pid for the caller).
    pub async fn check(
        &self,
        caller: &Caller,
        action: Action,
    ) -> Result<Result<(), String>, String> {
        let pid = caller.pid.ok_or_else(|| {
            "the bus did not tell the caller's pid, which polkit needs".to_string()
        })?;
        let subject = Subject::new_for_pid(pid, None, Some(caller.uid))
            .map_err(|e| format!("cannot describe caller pid {pid} to polkit: {e}"))?;
        let authority = self.authority().await?;
        let details: HashMap<&str, &str> = HashMap::new();
        let result = authority
            .check_authorization(
                &subject,
                action.id(),
                &details,
                CheckAuthorizationFlags::ALLOW_USER_INTERACTION,
                "",
            )
            .await
            .map_err(|e| match e {
                zbus::Error::MethodError(name, ..)
                    if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown"
                        || name.as_str() == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
                {
                    format!("polkitd is not running on the system bus; {NO_POLKIT_HINT}")
                }
                other => format!("polkit could not decide ({other}); {NO_POLKIT_HINT}"),
            })?;
        Ok(if result.is_authorized {
            Ok(())
        } else if result.details.contains_key("polkit.dismissed") {
            Err("polkit: the authentication dialog was dismissed".into())
        } else if result.is_challenge {
            Err("polkit wants authentication but no polkit agent answered (is one running in your session?)".into())
        } else {
            Err("polkit says no".into())
        })
    }
}
