//! `maqet --version`: this CLI's version and the service's (D-Bus activation starts
//! maqetd when needed), with a warning when they differ. Exits 0 whatever the service
//! says: the CLI's own version is always known.

use std::time::Duration;

use serde_json::json;

use super::ExitCode;
use super::output::print_json;
use super::session::Session;
use crate::error::MaqetError;

/// Activation included; a service that takes longer is reported as unreachable.
const LIMIT: Duration = Duration::from_secs(10);

pub async fn run(json: bool, host: Option<&str>) -> ExitCode {
    let cli = env!("CARGO_PKG_VERSION");
    let asked = async {
        let s = Session::connect(json, host).await?;
        Ok::<_, MaqetError>(s.manager.version().await?)
    };
    let service = match tokio::time::timeout(LIMIT, asked).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.message()),
        Err(_) => Err(format!("no answer within {} s", LIMIT.as_secs())),
    };
    let differs = service.as_ref().is_ok_and(|v| v != cli);
    if json {
        let (version, error) = match &service {
            Ok(v) => (Some(v.as_str()), None),
            Err(e) => (None, Some(e.as_str())),
        };
        print_json(&json!({
            "cli": cli,
            "service": version,
            "service_error": error,
            "host": host,
            "differ": differs,
        }));
    } else {
        println!("maqet {cli}");
        match &service {
            Ok(v) => println!("maqetd {v}"),
            Err(e) => println!("maqetd: not reachable ({e})"),
        }
    }
    if let (true, Ok(v)) = (differs, &service) {
        eprintln!(
            "maqet: warning: maqetd is version {v} and this CLI {cli}: restart maqetd after an upgrade (systemctl --user restart maqetd), or run the maqet that came with it"
        );
    }
    ExitCode::Ok
}
