//! Access control end to end: identity from the bus, the policy file, polkit, audit.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use common::{Bus, BusOptions, error_name, stderr, stdout, tiny_vm_yaml};

const TEST_USER: &str = "maqet-test";

/// A second, unprivileged user for the tests that need one (root only: creates it,
/// once per test binary, so parallel tests do not race on /etc/passwd); else why not.
fn test_user() -> Result<(u32, u32), String> {
    static USER: std::sync::OnceLock<Result<(u32, u32), String>> = std::sync::OnceLock::new();
    USER.get_or_init(|| {
        common::root("creating a second user")?;
        let useradd = common::program("useradd", "passwd")?;
        let _ = Command::new(useradd)
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                TEST_USER,
            ])
            .output();
        let name = std::ffi::CString::new(TEST_USER).unwrap();
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            return Err(format!("cannot create user {TEST_USER} (useradd failed)"));
        }
        Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
    })
    .clone()
}

/// `busctl` against the test bus, run as `uid`.
fn busctl_as(bus: &Bus, (uid, gid): (u32, u32), args: &[&str]) -> Output {
    Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args(args)
        .uid(uid)
        .gid(gid)
        .env("MAQET_TEST_MARKER", bus.marker())
        .output()
        .unwrap()
}

fn manager_call(bus: &Bus, user: (u32, u32), method: &str, sig_args: &[&str]) -> Output {
    let mut args = vec![
        "call",
        "org.maqet.Maqet1",
        "/org/maqet/Maqet1",
        "org.maqet.Maqet1.Manager",
        method,
    ];
    args.extend_from_slice(sig_args);
    busctl_as(bus, user, &args)
}

async fn audit(bus: &Bus) -> Vec<maqet::client::AuditEntry> {
    let conn = bus.conn().await;
    bus.manager(&conn).await.audit("", 0, 0).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_is_refused_until_the_policy_admits_them() {
    let Some(user) = common::require(test_user()) else {
        return;
    };
    let bus = Bus::start_with_options(&BusOptions {
        other_users: true,
        ..BusOptions::default()
    });
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("guarded")).await;
    let path = vm.inner().path().to_string();

    // Reads and writes are both refused, and say why.
    let out = manager_call(&bus, user, "ListVMs", &[]);
    assert!(!out.status.success());
    let msg = stderr(&out);
    assert!(
        msg.contains("org.maqet.vm.observe") && msg.contains("allow_uids"),
        "{msg}"
    );
    // (gdbus, because busctl prints only "Access denied" for this error name.)
    let out = Command::new("gdbus")
        .args([
            "call",
            "--address",
            &bus.address,
            "--dest",
            "org.maqet.Maqet1",
        ])
        .args([
            "--object-path",
            &path,
            "--method",
            "org.freedesktop.DBus.Properties.Get",
        ])
        .args(["org.maqet.Maqet1.VM", "Status"])
        .uid(user.0)
        .gid(user.1)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", stdout(&out));
    let msg = stderr(&out);
    assert!(
        msg.contains("AccessDenied")
            && msg.contains("org.maqet.vm.observe")
            && msg.contains("allow_uids"),
        "{msg}"
    );
    let out = busctl_as(
        &bus,
        user,
        &[
            "call",
            "org.maqet.Maqet1",
            &path,
            "org.maqet.Maqet1.VM",
            "Start",
        ],
    );
    assert!(
        stderr(&out).contains("org.maqet.vm.lifecycle"),
        "{}",
        stderr(&out)
    );
    assert_eq!(vm.status().await.unwrap(), "created");

    // Every denial is in the audit log, with the caller's uid.
    let rows = audit(&bus).await;
    let denied: Vec<_> = rows
        .iter()
        .filter(|r| r.1 == user.0 && r.8 == "deny")
        .collect();
    let methods: Vec<&str> = denied.iter().map(|r| r.6.as_str()).collect();
    for m in ["ListVMs", "Get", "Start"] {
        assert!(methods.contains(&m), "{m} not audited: {methods:?}");
    }
    assert!(denied.iter().all(|r| r.2 > 0 && r.9 == "AccessDenied"));

    // allow_uids admits them; the policy is re-read without a restart.
    bus.write_policy(&format!("allow_uids: [{}]\n", user.0));
    let out = manager_call(&bus, user, "ListVMs", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("guarded"));
    let out = busctl_as(
        &bus,
        user,
        &[
            "get-property",
            "org.maqet.Maqet1",
            &path,
            "org.maqet.Maqet1.VM",
            "Status",
        ],
    );
    assert_eq!(stdout(&out).trim(), "s \"created\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_vm_rule_stops_lifecycle_calls_on_that_vm_only() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let prod = bus.add(&conn, "", &tiny_vm_yaml("prod")).await;
    let dev = bus.add(&conn, "", &tiny_vm_yaml("dev")).await;
    bus.write_policy("vms:\n  prod:\n    org.maqet.vm.lifecycle: no\n");
    let e = prod.start().await.unwrap_err();
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.AccessDenied");
    let m = e.to_string();
    assert!(
        m.contains("org.maqet.vm.lifecycle") && m.contains("policy.yaml says no for VM 'prod'"),
        "{m}"
    );
    assert_eq!(prod.status().await.unwrap(), "created");
    dev.start().await.unwrap();
    dev.stop(true, 0).await.unwrap();
    // Reads of prod still work: only lifecycle is refused.
    assert_eq!(prod.name().await.unwrap(), "prod");
    // The CLI maps the denial to its own exit code.
    let out = bus.maqet(&["start", "prod"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));

    // `maqet audit` shows the denials, filtered by VM, as a table and as JSON.
    let out = bus.maqet(&["--json", "audit", "--vm", "prod", "--since", "1h"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!rows.is_empty());
    let prod_id = prod.id().await.unwrap();
    assert!(rows.iter().all(|r| r["vm_id"] == prod_id.as_str()));
    let starts: Vec<_> = rows.iter().filter(|r| r["method"] == "Start").collect();
    assert_eq!(starts.len(), 2, "{rows:#?}");
    assert!(
        starts
            .iter()
            .all(|r| r["decision"] == "deny" && r["action"] == "org.maqet.vm.lifecycle")
    );
    let table = stdout(&bus.maqet(&["audit", "--vm", "dev"]));
    assert!(
        table.contains("Start") && table.contains("allow"),
        "{table}"
    );
    assert!(!table.contains("deny"), "{table}");
    let out = bus.maqet(&["audit", "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dangerous_qmp_needs_the_flag_and_the_policy() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("danger")).await;
    vm.start().await.unwrap();
    let qmp = maqet::client::QmpProxy::builder(&conn)
        .path(vm.inner().path().clone())
        .build()
        .await
        .unwrap();
    let hmp = r#"{"command-line": "info version"}"#;
    // Without the flag: refused before any policy is asked.
    let e = qmp
        .execute("human-monitor-command", hmp, false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("allow_dangerous=true"), "{e}");
    // With the flag, the shipped policy asks polkit, which this bus does not have.
    let e = qmp
        .execute("human-monitor-command", hmp, true)
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.AccessDenied");
    let m = e.to_string();
    assert!(
        m.contains("polkitd is not reachable") && m.contains("policy.yaml"),
        "{m}"
    );
    // With the flag and a policy that says yes.
    bus.write_policy("actions:\n  org.maqet.qmp.dangerous: yes\n");
    let out = qmp
        .execute("human-monitor-command", hmp, true)
        .await
        .unwrap();
    // It ran in this VM's QEMU: HMP says what QMP's query-version says.
    let expected =
        common::hmp_info_version(&qmp.execute("query-version", "", false).await.unwrap());
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out.as_str().unwrap().trim_end(), expected);
    vm.stop(true, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_policy_keeps_the_last_good_one_and_doctor_says_so() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("steady")).await;
    bus.write_policy("actions:\n  org.maqet.vm.lifecycle: no\n");
    assert!(vm.start().await.is_err());
    // A broken file: the last good policy stays (lifecycle still refused), never "allow all".
    bus.write_policy("actions: [this is not a mapping\n");
    let e = vm.start().await.unwrap_err();
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.AccessDenied");
    let out = bus.maqet(&["--json", "doctor"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let policy = rows.iter().find(|r| r["check"] == "policy").unwrap();
    assert_eq!(policy["status"], "error", "{policy}");
    assert!(
        policy["message"].as_str().unwrap().contains("policy.yaml"),
        "{policy}"
    );
    // Fixed file: in force at once.
    bus.write_policy("actions:\n  org.maqet.vm.lifecycle: yes\n");
    vm.start().await.unwrap();
    vm.stop(true, 0).await.unwrap();
}

#[test]
fn the_polkit_action_file_declares_every_action_with_matching_defaults() {
    let xml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/polkit-1/actions/org.maqet.policy"
    ))
    .unwrap();
    let doc = roxmltree::Document::parse_with_options(
        &xml,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        },
    )
    .unwrap();
    let declared: Vec<(String, String)> = doc
        .descendants()
        .filter(|n| n.has_tag_name("action"))
        .map(|a| {
            let active = a
                .descendants()
                .find(|n| n.has_tag_name("allow_active"))
                .and_then(|n| n.text())
                .unwrap_or("")
                .to_string();
            (a.attribute("id").unwrap().to_string(), active)
        })
        .collect();
    let policy = maqet::access::policy::Policy::shipped();
    for action in maqet::access::Action::ALL {
        let (_, active) = declared
            .iter()
            .find(|(id, _)| id == action.id())
            .unwrap_or_else(|| panic!("{} not declared", action.id()));
        let ours = policy.decide(0, 0, action, None).verdict;
        let want = match ours {
            maqet::access::policy::Verdict::Auth => "auth_self",
            _ => "yes",
        };
        assert_eq!(active, want, "{}", action.id());
    }
    assert_eq!(declared.len(), maqet::access::Action::ALL.len());
}

/// A private system bus with a real polkitd whose rules answer per action.
struct PrivatePolkit {
    bus: std::process::Child,
    polkitd: std::process::Child,
    address: String,
    _dir: tempfile::TempDir,
    installed: Vec<std::path::PathBuf>,
}

impl PrivatePolkit {
    /// The private polkitd, or why there cannot be one here.
    fn start() -> Result<PrivatePolkit, String> {
        common::root("a private polkitd (it reads rules from /etc/polkit-1)")?;
        let polkitd = common::program("polkitd", "polkitd")?;
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = dir.path().join("system.sock");
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
"#, sock.display())).unwrap();
        // polkitd reads actions and rules from the system's directories only.
        let action_file = std::path::PathBuf::from("/usr/share/polkit-1/actions/org.maqet.policy");
        let rules_file = std::path::PathBuf::from("/etc/polkit-1/rules.d/49-maqet-test.rules");
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/data/polkit-1/actions/org.maqet.policy"
            ),
            &action_file,
        )
        .map_err(|e| format!("cannot install {}: {e}", action_file.display()))?;
        std::fs::write(
            &rules_file,
            format!(
                r#"// Written by maqet's tests (tests/e2e_access.rs); removed when they end.
polkit.addRule(function(action, subject) {{
    if (subject.user != "{TEST_USER}") {{ return polkit.Result.NOT_HANDLED; }}
    if (action.id == "org.maqet.vm.manage") {{ return polkit.Result.YES; }}
    if (action.id == "org.maqet.vm.lifecycle") {{ return polkit.Result.NO; }}
}});
"#
            ),
        )
        .map_err(|e| format!("cannot install {}: {e}", rules_file.display()))?;
        let installed = vec![action_file, rules_file];
        let mut bus = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run dbus-daemon: {e}"))?;
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(bus.stdout.take().unwrap())
            .read_line(&mut line)
            .map_err(|e| format!("the private system bus did not start: {e}"))?;
        let address = line.trim().to_string();
        let polkitd = Command::new(&polkitd)
            .arg("--no-debug")
            .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", polkitd.display()))?;
        Ok(PrivatePolkit {
            bus,
            polkitd,
            address,
            _dir: dir,
            installed,
        })
    }

    /// Waits (bounded) until polkitd owns its name on the private bus.
    async fn ready(&self) {
        let conn = zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .unwrap();
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
        let name: zbus::names::BusName<'_> = "org.freedesktop.PolicyKit1".try_into().unwrap();
        let mut owners = dbus
            .receive_name_owner_changed_with_args(&[(0, "org.freedesktop.PolicyKit1")])
            .await
            .unwrap();
        if !dbus.name_has_owner(name).await.unwrap() {
            use futures_util::StreamExt;
            tokio::time::timeout(common::TIMEOUT, owners.next())
                .await
                .expect("polkitd did not start");
        }
    }
}

impl Drop for PrivatePolkit {
    fn drop(&mut self) {
        let _ = self.polkitd.kill();
        let _ = self.polkitd.wait();
        let _ = self.bus.kill();
        let _ = self.bus.wait();
        for f in &self.installed {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polkit_decides_auth_actions_for_the_calling_process() {
    let Some(user) = common::require(test_user()) else {
        return;
    };
    let Some(polkit) = common::require(PrivatePolkit::start()) else {
        return;
    };
    polkit.ready().await;
    let bus = Bus::start_with_options(&BusOptions {
        other_users: true,
        system_bus: Some(&polkit.address),
        ..BusOptions::default()
    });
    bus.write_policy(&format!(
        "allow_uids: [{}]\nactions:\n  org.maqet.vm.manage: auth\n  org.maqet.vm.lifecycle: auth\n",
        user.0
    ));
    // polkit's rule says yes to org.maqet.vm.manage for this user: AddVM works.
    let yaml = tiny_vm_yaml("judged");
    let out = manager_call(&bus, user, "AddVM", &["ss", "", &yaml]);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = stdout(&out)
        .trim()
        .trim_start_matches("o ")
        .trim_matches('"')
        .to_string();
    // ...and no to org.maqet.vm.lifecycle: Start is refused, saying polkit said no.
    let out = busctl_as(
        &bus,
        user,
        &[
            "call",
            "org.maqet.Maqet1",
            &path,
            "org.maqet.Maqet1.VM",
            "Start",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("polkit says no"), "{}", stderr(&out));
    // Both decisions were polkit's, and both are audited.
    let rows = audit(&bus).await;
    let mine: Vec<_> = rows.iter().filter(|r| r.1 == user.0).collect();
    assert!(
        mine.iter().any(|r| r.6 == "AddVM" && r.8 == "allow"),
        "{mine:?}"
    );
    assert!(
        mine.iter().any(|r| r.6 == "Start" && r.8 == "deny"),
        "{mine:?}"
    );
}

/// A bus connection of `user`, made in this process: a thread takes the user's
/// credentials (per thread on Linux, with the raw system calls), connects the bus
/// socket and ends. The bus knows a connection by the credentials of its `connect`.
async fn connect_as(bus: &Bus, (uid, gid): (u32, u32)) -> zbus::Connection {
    let socket = bus
        .address
        .strip_prefix("unix:path=")
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("not a unix:path address: {}", bus.address))
        .to_string();
    let stream = std::thread::spawn(move || {
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        std::os::unix::net::UnixStream::connect(socket).expect("connect to the bus socket")
    })
    .join()
    .unwrap();
    zbus::connection::Builder::unix_stream(stream)
        .user_id(uid)
        .build()
        .await
        .expect("authenticate as the other user")
}

async fn introspect(conn: &zbus::Connection, path: &str) -> String {
    zbus::fdo::IntrospectableProxy::builder(conn)
        .destination("org.maqet.Maqet1")
        .path(path)
        .build()
        .await
        .unwrap()
        .introspect()
        .await
        .unwrap_or_else(|e| panic!("Introspect {path}: {e}"))
}

/// The text of a failed call's error (its name and message).
async fn refusal(call: impl std::future::Future<Output = zbus::Result<zbus::Message>>) -> String {
    match call.await {
        Ok(reply) => panic!("not refused: {reply:?}"),
        Err(zbus::Error::MethodError(name, msg, _)) => {
            format!("{name}: {}", msg.unwrap_or_default())
        }
        Err(zbus::Error::FDO(e)) => e.to_string(),
        Err(e) => panic!("unexpected failure: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_learns_nothing_about_vms() {
    let Some(user) = common::require(test_user()) else {
        return;
    };
    let bus = Bus::start_with_options(&BusOptions {
        other_users: true,
        ..BusOptions::default()
    });
    let conn = bus.conn().await;
    // A VM with a disk, so a snapshot job (an object that names the VM) exists too.
    let disk = bus.root().join("secret.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "1M"])
        .status()
        .unwrap();
    assert!(made.success());
    let yaml = format!(
        "{}storage:\n  - {{type: qcow2, file: '{}'}}\n",
        tiny_vm_yaml("secretvm"),
        disk.display()
    );
    let vm = bus.add(&conn, "", &yaml).await;
    let path = vm.inner().path().to_string();
    let id = vm.id().await.unwrap();
    let node = path.rsplit('/').next().unwrap().to_string();
    let snapshots: maqet::client::SnapshotsProxy =
        maqet::client::proxy_at(&conn, vm.inner().path().to_owned().into())
            .await
            .unwrap();
    let job = snapshots
        .create("s1", std::collections::HashMap::new())
        .await
        .unwrap()
        .to_string();
    let job_node = format!("<node name=\"{}\"", job.rsplit('/').next().unwrap());
    assert!(
        introspect(&conn, "/org/maqet/Maqet1/job")
            .await
            .contains(&job_node)
    );
    let stranger = connect_as(&bus, user).await;
    assert!(
        !introspect(&stranger, "/org/maqet/Maqet1/job")
            .await
            .contains(&job_node)
    );
    let job_vm = refusal(stranger.call_method(
        Some("org.maqet.Maqet1"),
        job.as_str(),
        Some("org.freedesktop.DBus.Properties"),
        "Get",
        &("org.maqet.Maqet1.Job", "VM"),
    ))
    .await;

    // The owner sees the VM's node; the stranger sees the way to the manager, no VM.
    let vm_node = format!("<node name=\"{node}\"");
    assert!(
        introspect(&conn, "/org/maqet/Maqet1/vm")
            .await
            .contains(&vm_node)
    );
    assert!(
        introspect(&conn, "/org/maqet/Maqet1")
            .await
            .contains("<node name=\"vm\"")
    );
    for p in [
        "/",
        "/org",
        "/org/maqet",
        "/org/maqet/Maqet1",
        "/org/maqet/Maqet1/vm",
    ] {
        let xml = introspect(&stranger, p).await;
        assert!(
            !xml.contains(&node)
                && !xml.contains("<node name=\"vm\"")
                && !xml.contains("<node name=\"job\"")
                && !xml.contains("secretvm"),
            "{p}: {xml}"
        );
    }
    // The manager's own interfaces are still described to everyone.
    assert!(
        introspect(&stranger, "/org/maqet/Maqet1")
            .await
            .contains("org.maqet.Maqet1.Manager")
    );
    // busctl (as the stranger) walks the tree by introspection: no VM on it.
    let out = busctl_as(&bus, user, &["tree", "org.maqet.Maqet1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("/org/maqet/Maqet1") && !stdout(&out).contains(&node),
        "{}",
        stdout(&out)
    );

    // GetManagedObjects: refused, without naming anything.
    let managed = refusal(stranger.call_method(
        Some("org.maqet.Maqet1"),
        "/org/maqet/Maqet1",
        Some("org.freedesktop.DBus.ObjectManager"),
        "GetManagedObjects",
        &(),
    ))
    .await;
    assert!(managed.contains("AccessDenied"), "{managed}");

    // A VM that exists and one that does not get the same answer, which names neither.
    let remove = |name: &'static str| {
        let stranger = stranger.clone();
        async move {
            refusal(stranger.call_method(
                Some("org.maqet.Maqet1"),
                "/org/maqet/Maqet1",
                Some("org.maqet.Maqet1.Manager"),
                "RemoveVM",
                &(name, true, false),
            ))
            .await
        }
    };
    let known = remove("secretvm").await;
    let unknown = remove("nosuchvm").await;
    assert_eq!(known, unknown);
    let start = refusal(stranger.call_method(
        Some("org.maqet.Maqet1"),
        path.as_str(),
        Some("org.maqet.Maqet1.VM"),
        "Start",
        &(),
    ))
    .await;
    let config = refusal(stranger.call_method(
        Some("org.maqet.Maqet1"),
        path.as_str(),
        Some("org.freedesktop.DBus.Properties"),
        "Get",
        &("org.maqet.Maqet1.VM", "Config"),
    ))
    .await;
    // The same with an empty interface name (as qdbus asks).
    let name = refusal(stranger.call_method(
        Some("org.maqet.Maqet1"),
        path.as_str(),
        Some("org.freedesktop.DBus.Properties"),
        "Get",
        &("", "Name"),
    ))
    .await;
    for msg in [&managed, &known, &start, &config, &name, &job_vm] {
        assert!(
            msg.contains("AccessDenied") && !msg.contains("secretvm") && !msg.contains(&id),
            "{msg}"
        );
    }
    // So does the CLI, by name.
    let cli = |name: &str| {
        let out = bus
            .maqet_command(&["start", name])
            .uid(user.0)
            .gid(user.1)
            .output()
            .unwrap();
        assert!(!out.status.success());
        stderr(&out).replace(name, "<name>")
    };
    assert_eq!(cli("secretvm"), cli("nosuchvm"));
    assert_eq!(vm.status().await.unwrap(), "created");
}

/// Every signal a connection receives, as "member args" lines.
fn signals(conn: &zbus::Connection) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let conn = conn.clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        // An ordinary subscription (no eavesdropping): what any client can ask for.
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .build()
            .unwrap();
        let mut stream = zbus::MessageStream::for_match_rule(rule, &conn, None)
            .await
            .unwrap();
        ready_tx.send(()).unwrap();
        while let Some(Ok(msg)) = stream.next().await {
            let hdr = msg.header();
            let member = hdr.member().map(|m| m.to_string()).unwrap_or_default();
            let body = format!("{:?}", msg.body().deserialize::<zbus::Structure>());
            if tx.send(format!("{member} {body}")).is_err() {
                return;
            }
        }
    });
    ready.recv().unwrap();
    rx
}

/// Waits for a signal line containing every one of `words`; returns the lines before.
async fn until_signal(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    words: &[&str],
) -> Vec<String> {
    let mut before = Vec::new();
    tokio::time::timeout(common::TIMEOUT, async {
        while let Some(line) = rx.recv().await {
            if words.iter().all(|w| line.contains(w)) {
                return;
            }
            before.push(line);
        }
        panic!("signal stream ended");
    })
    .await
    .unwrap_or_else(|_| panic!("no signal with {words:?}; saw {before:#?}"));
    before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_about_vms_do_not_reach_a_stranger() {
    let Some(user) = common::require(test_user()) else {
        return;
    };
    let bus = Bus::start_with_options(&BusOptions {
        other_users: true,
        ..BusOptions::default()
    });
    let conn = bus.conn().await;
    // Activate maqetd first: the subscriptions below are then of a running service.
    bus.manager(&conn).await.list_vms().await.unwrap();
    let stranger = connect_as(&bus, user).await;
    let mut theirs = signals(&stranger);
    let mut mine = signals(&conn);

    let vm = bus.add(&conn, "", &tiny_vm_yaml("whisper")).await;
    vm.start().await.unwrap();
    // The owner hears all of it, even with a stranger on the bus...
    until_signal(&mut mine, &["InterfacesAdded", "whisper"]).await;
    until_signal(&mut mine, &["VMAdded", "whisper"]).await;
    until_signal(&mut mine, &["StatusChanged", "running"]).await;

    // ...and once the policy admits the stranger, so does it: the first thing it hears
    // is about the VM added after that, nothing about the one before.
    bus.write_policy(&format!("allow_uids: [{}]\n", user.0));
    bus.add(&conn, "", &tiny_vm_yaml("welcome")).await;
    let before = until_signal(&mut theirs, &["VMAdded", "welcome"]).await;
    let leaked: Vec<_> = before
        .iter()
        .filter(|l| !l.contains("welcome"))
        .filter(|l| {
            l.contains("whisper")
                || [
                    "VMAdded",
                    "InterfacesAdded",
                    "StatusChanged",
                    "PropertiesChanged",
                ]
                .iter()
                .any(|m| l.starts_with(m))
        })
        .collect();
    assert!(leaked.is_empty(), "the stranger heard {leaked:#?}");
    vm.stop(true, 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_denials_is_a_few_audit_rows_and_one_count() {
    let Some(user) = common::require(test_user()) else {
        return;
    };
    let bus = Bus::start_with_options(&BusOptions {
        other_users: true,
        ..BusOptions::default()
    });
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &tiny_vm_yaml("target")).await;
    let path = vm.inner().path().to_string();
    let stranger = connect_as(&bus, user).await;
    const CALLS: usize = 10_000;
    for _ in 0..CALLS {
        let r = stranger
            .call_method(
                Some("org.maqet.Maqet1"),
                path.as_str(),
                Some("org.maqet.Maqet1.VM"),
                "Start",
                &(),
            )
            .await;
        assert!(r.is_err());
    }
    // The count is written when the burst ends, or (here) when maqetd exits.
    let daemon = bus.marked_processes("maqetd")[0];
    unsafe { libc::kill(daemon as i32, libc::SIGTERM) };
    common::process_gone(daemon).await;

    let rows = audit(&bus).await;
    let theirs: Vec<_> = rows.iter().filter(|r| r.1 == user.0).collect();
    assert!(theirs.len() <= 10, "{} rows for one flood", theirs.len());
    let individual = theirs.iter().filter(|r| r.7.is_empty()).count();
    let counted: usize = theirs
        .iter()
        .filter_map(|r| r.7.strip_prefix("count="))
        .map(|n| n.parse::<usize>().unwrap())
        .sum();
    assert_eq!(individual + counted, CALLS, "{theirs:#?}");
    let aggregate = theirs
        .iter()
        .find(|r| r.7.starts_with("count="))
        .expect("an aggregate row");
    assert_eq!(
        (aggregate.6.as_str(), aggregate.8.as_str()),
        ("Start", "deny")
    );
    assert!(
        aggregate
            .10
            .starts_with(&format!("uid {}: {counted} more denials of Start", user.0)),
        "{}",
        aggregate.10
    );
    // The owner's own rows are all there.
    assert!(rows.iter().any(|r| r.1 != user.0 && r.6 == "AddVM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_denials_is_counted_when_it_ends() {
    let Some(user) = common::require(test_user()) else {
        return;
    };
    let bus = Bus::start_with_options(&BusOptions {
        other_users: true,
        ..BusOptions::default()
    });
    let conn = bus.conn().await;
    let manager = bus.manager(&conn).await;
    let stranger = connect_as(&bus, user).await;
    // 5 recorded one by one, 3 counted (ListVMs and FindVM are both observe).
    for method in ["ListVMs", "ListVMs", "ListVMs", "ListVMs", "ListVMs"] {
        refusal(stranger.call_method(
            Some("org.maqet.Maqet1"),
            "/org/maqet/Maqet1",
            Some("org.maqet.Maqet1.Manager"),
            method,
            &(),
        ))
        .await;
    }
    for _ in 0..3 {
        refusal(stranger.call_method(
            Some("org.maqet.Maqet1"),
            "/org/maqet/Maqet1",
            Some("org.maqet.Maqet1.Manager"),
            "FindVM",
            &("x",),
        ))
        .await;
    }
    // No call ends the burst: its quiet period does, and then the count is in the log.
    let aggregate = tokio::time::timeout(common::TIMEOUT, async {
        loop {
            let rows = manager.audit("", 0, 0).await.unwrap();
            if let Some(r) = rows.into_iter().find(|r| r.7.starts_with("count=")) {
                return r;
            }
            // The row appears about 5 s after the last denial; look again shortly.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the count of the burst is written when it ends");
    assert_eq!(
        (aggregate.1, aggregate.6.as_str(), aggregate.7.as_str()),
        (user.0, "FindVM", "count=3")
    );
    assert!(
        aggregate.10.starts_with(&format!(
            "uid {}: 3 more denials of FindVM (org.maqet.vm.observe)",
            user.0
        )),
        "{}",
        aggregate.10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_make_maqetd_read_a_file() {
    let bus = Bus::start_with_options(&BusOptions {
        other_users: true,
        ..BusOptions::default()
    });
    let Some(user) = common::require(test_user()) else {
        return;
    };
    // Admitted for everything: reading files by path is still only for maqetd's own user.
    bus.write_policy(&format!("allow_uids: [{}]\n", user.0));
    let out = manager_call(
        &bus,
        user,
        "AddVMFromFiles",
        &["sas", "", "1", "/etc/shadow"],
    );
    assert!(!out.status.success());
    let msg = stderr(&out);
    assert!(
        msg.contains("is refused") && msg.contains("AddVMFromFds"),
        "{msg}"
    );
    // Nothing of the file reached the caller or the audit log.
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let rows = format!("{:?}", audit(&bus).await);
    for line in shadow.lines().filter(|l| l.len() > 8) {
        assert!(
            !msg.contains(line) && !rows.contains(line),
            "leaked {line:?}"
        );
    }
    let audited = audit(&bus).await;
    assert!(
        audited
            .iter()
            .any(|r| r.1 == user.0 && r.6 == "AddVMFromFiles" && r.9 == "AccessDenied"),
        "the denial is audited: {rows}"
    );
}
