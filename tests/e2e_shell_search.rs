//! The desktop shells' launchers, called on the bus as GNOME Shell and KRunner call them:
//! `org.gnome.Shell.SearchProvider2` (GetInitialResultSet, GetSubsearchResultSet,
//! GetResultMetas, ActivateResult) and `org.kde.krunner1` (Actions, Match, Run), against
//! real QEMU VMs.

mod common;

use std::collections::HashMap;

use futures_util::StreamExt;

use common::guest::{self, Behaviour};
use common::{Bus, StatusWatch, tiny_vm_yaml};
use zbus::OwnedVariant;

#[zbus::proxy(
    interface = "org.gnome.Shell.SearchProvider2",
    default_service = "org.maqet.Maqet1",
    default_path = "/org/maqet/Maqet1/SearchProvider"
)]
trait SearchProvider {
    fn get_initial_result_set(&self, terms: &[&str]) -> zbus::Result<Vec<String>>;
    fn get_subsearch_result_set(
        &self,
        previous_results: &[&str],
        terms: &[&str],
    ) -> zbus::Result<Vec<String>>;
    fn get_result_metas(
        &self,
        identifiers: &[&str],
    ) -> zbus::Result<Vec<HashMap<String, OwnedVariant>>>;
    fn activate_result(&self, identifier: &str, terms: &[&str], timestamp: u32)
    -> zbus::Result<()>;
    fn launch_search(&self, terms: &[&str], timestamp: u32) -> zbus::Result<()>;
}

type Match = (
    String,
    String,
    String,
    i32,
    f64,
    HashMap<String, OwnedVariant>,
);

#[zbus::proxy(
    interface = "org.kde.krunner1",
    default_service = "org.maqet.Maqet1",
    default_path = "/org/maqet/Maqet1/krunner"
)]
trait KRunner {
    fn actions(&self) -> zbus::Result<Vec<(String, String, String)>>;
    #[zbus(name = "Match")]
    fn r#match(&self, query: &str) -> zbus::Result<Vec<Match>>;
    fn run(&self, match_id: &str, action_id: &str) -> zbus::Result<()>;
}

fn text(meta: &HashMap<String, OwnedVariant>, key: &str) -> String {
    let v = meta
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {meta:?}"));
    String::try_from(v.try_clone().unwrap()).unwrap()
}

fn dbus_error(e: &zbus::Error) -> (String, String) {
    match e {
        zbus::Error::MethodError(name, msg, _) => {
            (name.to_string(), msg.clone().unwrap_or_default())
        }
        other => panic!("not a D-Bus error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gnome_search_finds_vms_shows_status_and_activation_starts_them() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let img = guest::write_image(bus.root(), Behaviour::AcpiAware);
    let web = bus.add(&conn, "", &guest::vm_yaml("web-alpha", &img)).await;
    let db = bus.add(&conn, "", &tiny_vm_yaml("db-web")).await;
    bus.add(&conn, "", &tiny_vm_yaml("mail")).await;
    let (web_id, db_id) = (web.id().await.unwrap(), db.id().await.unwrap());
    let search = SearchProviderProxy::new(&conn).await.unwrap();

    // Every term must occur, case ignored; a name that starts with the term comes first.
    let found = search.get_initial_result_set(&["WEB"]).await.unwrap();
    assert_eq!(found, [web_id.clone(), db_id.clone()]);
    assert!(
        search
            .get_initial_result_set(&["nothing"])
            .await
            .unwrap()
            .is_empty()
    );
    let prev: Vec<&str> = found.iter().map(String::as_str).collect();
    let narrowed = search
        .get_subsearch_result_set(&prev, &["web", "alp"])
        .await
        .unwrap();
    assert_eq!(narrowed, [web_id.as_str()]);

    // Metas: name, status, icon; an id that names no VM is left out.
    let metas = search
        .get_result_metas(&[&web_id, "00000000-0000-0000-0000-000000000000"])
        .await
        .unwrap();
    assert_eq!(metas.len(), 1, "{metas:?}");
    assert_eq!(text(&metas[0], "id"), web_id);
    assert_eq!(text(&metas[0], "name"), "web-alpha");
    assert_eq!(text(&metas[0], "description"), "created");
    assert_eq!(text(&metas[0], "gicon"), "org.maqet.Maqet");

    // Activating a VM that is not running starts it; activating it again changes nothing.
    search.activate_result(&web_id, &["web"], 0).await.unwrap();
    assert_eq!(web.status().await.unwrap(), "running");
    let pid = web.pid().await.unwrap();
    search.activate_result(&web_id, &["web"], 0).await.unwrap();
    assert_eq!(web.pid().await.unwrap(), pid, "a running VM is left alone");
    let metas = search.get_result_metas(&[&web_id]).await.unwrap();
    assert_eq!(text(&metas[0], "description"), "running");
    search.launch_search(&["web"], 0).await.unwrap();

    // A VM removed between the search and the activation: a clear answer.
    let found = search.get_initial_result_set(&["mail"]).await.unwrap();
    let out = bus.maqet(&["rm", "mail"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let e = search
        .activate_result(&found[0], &["mail"], 0)
        .await
        .unwrap_err();
    let (name, msg) = dbus_error(&e);
    assert_eq!(name, "org.maqet.Maqet1.Error.NotFound");
    assert!(msg.contains("removed after the search"), "{msg}");

    // The audit names the origin of the activation.
    let out = bus.maqet(&["--json", "audit", "--vm", "web-alpha"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let act = rows
        .iter()
        .find(|r| r["method"] == "ActivateResult")
        .unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!(act["via"], "gnome-search");
    assert_eq!(act["vm"], "web-alpha");
    assert_eq!(act["outcome"], "ok");
    web.stop(true, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn krunner_matches_vms_with_the_actions_their_state_allows_and_runs_them() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let img = guest::write_image(bus.root(), Behaviour::AcpiAware);
    let vm = bus.add(&conn, "", &guest::vm_yaml("builder", &img)).await;
    bus.add(&conn, "", &tiny_vm_yaml("builder-two")).await;
    let id = vm.id().await.unwrap();
    let runner = KRunnerProxy::new(&conn).await.unwrap();

    let actions: Vec<String> = runner
        .actions()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.0)
        .collect();
    assert_eq!(actions, ["start", "stop"]);

    let matches = runner.r#match("builder").await.unwrap();
    assert_eq!(matches.len(), 2, "{matches:?}");
    let (mid, name, icon, kind, relevance, props) = &matches[0];
    assert_eq!(
        (mid, name.as_str(), icon.as_str()),
        (&id, "builder", "org.maqet.Maqet")
    );
    assert_eq!(*kind, 100, "the exact name is an exact match");
    assert!(*relevance > matches[1].4);
    assert_eq!(text(props, "subtext"), "created");
    let offered = |p: &HashMap<String, OwnedVariant>| -> Vec<String> {
        Vec::<String>::try_from(p["actions"].try_clone().unwrap()).unwrap()
    };
    assert_eq!(offered(props), ["start"]);
    assert!(runner.r#match("nope").await.unwrap().is_empty());

    let qmp = maqet::client::qmp_proxy(&conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    let mut events = qmp.receive_event().await.unwrap();
    runner.run(&id, "start").await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "running");
    // The guest announces it listens for the power button with an RTC change.
    let up = async {
        while let Some(sig) = events.next().await {
            if sig.args().unwrap().name() == &"RTC_CHANGE" {
                return;
            }
        }
    };
    tokio::time::timeout(common::TIMEOUT, up)
        .await
        .expect("the guest came up");
    let matches = runner.r#match("builder").await.unwrap();
    assert_eq!(text(&matches[0].5, "subtext"), "running");
    assert_eq!(offered(&matches[0].5), ["stop"]);

    // Stop powers the guest off through ACPI, like `maqet stop`.
    let mut watch = StatusWatch::new(&vm).await;
    runner.run(&id, "stop").await.unwrap();
    let (_, _, reason) = watch.until("stopped").await;
    assert_eq!(reason, "guest powered off after an ACPI power-down request");

    // Choosing the match itself starts a stopped VM.
    runner.run(&id, "").await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "running");
    let e = runner.run(&id, "explode").await.unwrap_err();
    assert_eq!(dbus_error(&e).0, "org.maqet.Maqet1.Error.InvalidArgument");
    vm.stop(true, 0).await.unwrap();
    let out = bus.maqet(&["rm", "builder"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let e = runner.run(&id, "start").await.unwrap_err();
    assert_eq!(dbus_error(&e).0, "org.maqet.Maqet1.Error.NotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_caller_gets_access_denied_from_both_shells() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("guarded")).await;
    let id = vm.id().await.unwrap();
    let search = SearchProviderProxy::new(&conn).await.unwrap();
    let runner = KRunnerProxy::new(&conn).await.unwrap();
    assert_eq!(
        search.get_initial_result_set(&["guarded"]).await.unwrap(),
        [id.as_str()]
    );

    // Starting is refused: activation and Run are denied and the VM stays as it was.
    bus.write_policy("vms:\n  guarded:\n    org.maqet.vm.lifecycle: no\n");
    let denied = "org.maqet.Maqet1.Error.AccessDenied";
    let e = search
        .activate_result(&id, &["guarded"], 0)
        .await
        .unwrap_err();
    assert_eq!(dbus_error(&e).0, denied);
    let e = runner.run(&id, "start").await.unwrap_err();
    assert_eq!(dbus_error(&e).0, denied);
    assert_eq!(vm.status().await.unwrap(), "created");

    // Reading is refused: searching is denied too.
    bus.write_policy("actions:\n  org.maqet.vm.observe: no\n");
    let e = search
        .get_initial_result_set(&["guarded"])
        .await
        .unwrap_err();
    assert_eq!(dbus_error(&e).0, denied);
    let e = search.get_result_metas(&[&id]).await.unwrap_err();
    assert_eq!(dbus_error(&e).0, denied);
    let e = runner.r#match("guarded").await.unwrap_err();
    assert_eq!(dbus_error(&e).0, denied);

    // The denials are on record with their origin, without the search terms.
    bus.write_policy("");
    let out = bus.maqet(&["--json", "audit"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let via = |method: &str| {
        rows.iter()
            .find(|r| r["method"] == method && r["decision"] == "deny")
            .unwrap_or_else(|| panic!("no denied {method}: {rows:#?}"))["via"]
            .clone()
    };
    assert_eq!(via("ActivateResult"), "gnome-search");
    assert_eq!(via("Run"), "krunner");
    assert_eq!(via("Match"), "krunner");
    for r in rows.iter().filter(|r| r["method"] == "Match") {
        assert!(!r["arguments"].as_str().unwrap().contains("guarded"), "{r}");
    }
}

/// `maqet setup --user` registers both shells' launchers where they look.
#[test]
fn setup_installs_the_search_provider_and_krunner_files() {
    let bus = Bus::start_unactivated();
    let out = bus.maqet(&["setup", "--user"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let root = bus.root();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
    let ini = read("data/gnome-shell/search-providers/org.maqet.Maqet1.search-provider.ini");
    for line in [
        "[Shell Search Provider]",
        "DesktopId=org.maqet.Maqet.desktop",
        "BusName=org.maqet.Maqet1",
        "ObjectPath=/org/maqet/Maqet1/SearchProvider",
        "Version=2",
    ] {
        assert!(ini.lines().any(|l| l == line), "{line} missing from {ini}");
    }
    let runner = read("data/krunner/dbusplugins/org.maqet.Maqet1.desktop");
    for line in [
        "X-Plasma-API=DBus",
        "X-Plasma-DBusRunner-Service=org.maqet.Maqet1",
        "X-Plasma-DBusRunner-Path=/org/maqet/Maqet1/krunner",
    ] {
        assert!(
            runner.lines().any(|l| l == line),
            "{line} missing from {runner}"
        );
    }
    // GNOME Shell ignores a search provider whose application entry is hidden.
    let entry = read("data/applications/org.maqet.Maqet.desktop");
    assert!(!entry.contains("NoDisplay=true"), "{entry}");
    if let Some(validate) = common::require(common::program(
        "desktop-file-validate",
        "desktop-file-utils",
    )) {
        for file in [
            "data/applications/org.maqet.Maqet.desktop",
            "data/krunner/dbusplugins/org.maqet.Maqet1.desktop",
        ] {
            let out = std::process::Command::new(&validate)
                .arg(root.join(file))
                .output()
                .unwrap();
            assert!(
                out.status.success() && out.stdout.is_empty(),
                "{file}: {}{}",
                common::stdout(&out),
                common::stderr(&out)
            );
        }
    }
    for size in [16, 22, 24, 32, 48, 64, 128, 256] {
        let png = std::fs::read(root.join(format!(
            "data/icons/hicolor/{size}x{size}/apps/org.maqet.Maqet.png"
        )))
        .unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let (w, h) = (
            u32::from_be_bytes(png[16..20].try_into().unwrap()),
            u32::from_be_bytes(png[20..24].try_into().unwrap()),
        );
        assert_eq!((w, h), (size, size));
    }
    let out = bus.maqet(&["setup", "--user", "--uninstall"]);
    assert!(out.status.success());
    assert!(
        !root
            .join("data/gnome-shell/search-providers/org.maqet.Maqet1.search-provider.ini")
            .exists()
    );
    assert!(
        !root
            .join("data/krunner/dbusplugins/org.maqet.Maqet1.desktop")
            .exists()
    );
    assert!(
        !root
            .join("data/icons/hicolor/48x48/apps/org.maqet.Maqet.png")
            .exists()
    );
}
