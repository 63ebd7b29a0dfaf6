//! `maqet --host`: the CLI against a session bus reached over ssh (zbus's `unixexec`
//! transport running ssh, `systemd-stdio-bridge` on the far side).
//!
//! The real thing: a private sshd on localhost (its own host key, an authorized test key,
//! a free high port) that accepts `DBUS_SESSION_BUS_ADDRESS` from the client, so the far
//! side's bridge lands on the private test bus. Where no sshd can run, that test says
//! why and is skipped (fails with `MAQET_TEST_REQUIRE_ALL=1`). A stand-in `ssh` (runs the remote command locally) checks the
//! bridge's address logic and the messages for a missing bridge or ssh everywhere.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Bus, ChildLines, tiny_vm_yaml};

struct Sshd {
    _server: ChildLines,
    _dir: tempfile::TempDir,
    /// `MAQET_SSH` for this server.
    ssh: String,
}

fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", common::stderr(&out)))
    }
}

/// A private sshd on 127.0.0.1, or why there cannot be one here.
fn start_sshd(bus_address: &str) -> Result<Sshd, String> {
    let sshd = common::program("sshd", "openssh-server")?;
    let keygen = common::program("ssh-keygen", "openssh-client")?;
    common::program("ssh", "openssh-client")?;
    common::program("systemd-stdio-bridge", "systemd")?;
    // sshd insists on its privilege separation directory, which only root can make.
    if !Path::new("/run/sshd").is_dir() {
        std::fs::create_dir_all("/run/sshd").map_err(|e| {
            format!("/run/sshd is missing and cannot be created ({e}); run as root")
        })?;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for key in ["host_key", "client_key"] {
        run(Command::new(&keygen)
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(d.join(key)))?;
    }
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let config = d.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
             AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nUsePAM no\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nAcceptEnv DBUS_SESSION_BUS_ADDRESS\n",
            d = d.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&sshd);
    cmd.args(["-D", "-e", "-f"]).arg(&config);
    let server = ChildLines::spawn(cmd);
    let first = server.next_matching(&|_| true);
    if !first.contains("Server listening") {
        return Err(format!("sshd did not start: {first}"));
    }
    let ssh = format!(
        "ssh -F /dev/null -p {port} -i {d}/client_key -o IdentitiesOnly=yes -o BatchMode=yes \
         -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
         -o SetEnv=DBUS_SESSION_BUS_ADDRESS={bus_address}",
        d = d.display()
    );
    Ok(Sshd {
        _server: server,
        _dir: dir,
        ssh,
    })
}

/// `maqet --host HOST args…` with `MAQET_SSH`, and no local session bus at all.
fn remote(bus: &Bus, ssh: &str, host: &str, args: &[&str]) -> Output {
    let mut all = vec!["--host", host];
    all.extend(args);
    bus.maqet_command(&all)
        .env("MAQET_SSH", ssh)
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_a_remote_session_bus_over_a_real_sshd() {
    let bus = Bus::start();
    let Some(sshd) = common::require(
        start_sshd(&bus.address).map_err(|why| format!("no sshd for the --host test: {why}")),
    ) else {
        return;
    };
    let conn = bus.conn().await;
    bus.add(&conn, "", &tiny_vm_yaml("far")).await;
    let host = "127.0.0.1";

    let ls = remote(&bus, &sshd.ssh, host, &["ls"]);
    assert!(ls.status.success(), "{}", common::stderr(&ls));
    assert!(common::stdout(&ls).contains("far"));
    let start = remote(&bus, &sshd.ssh, host, &["start", "far"]);
    assert!(start.status.success(), "{}", common::stderr(&start));
    let status = remote(&bus, &sshd.ssh, host, &["--json", "status", "far"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["status"], "running");
    let version = remote(&bus, &sshd.ssh, host, &["--version"]);
    assert!(common::stdout(&version).contains(&format!("maqetd {}", env!("CARGO_PKG_VERSION"))));

    // File descriptors do not cross ssh: said plainly, not a hang or a bus error.
    let console = remote(&bus, &sshd.ssh, host, &["console", "far"]);
    assert_eq!(console.status.code(), Some(4));
    assert!(common::stderr(&console).contains("cannot cross ssh"));
    let stop = remote(&bus, &sshd.ssh, host, &["stop", "far", "--force"]);
    assert!(stop.status.success(), "{}", common::stderr(&stop));

    // add -c reads the local file and sends its text; several files cannot be merged there.
    let local = bus.root().join("local.yaml");
    std::fs::write(&local, tiny_vm_yaml("sent")).unwrap();
    let local = local.to_str().unwrap();
    let add = remote(&bus, &sshd.ssh, host, &["add", "-c", local]);
    assert!(add.status.success(), "{}", common::stderr(&add));
    assert!(common::stdout(&add).contains("added sent"));
    let two = remote(&bus, &sshd.ssh, host, &["add", "-c", local, "-c", local]);
    assert!(!two.status.success());
    assert!(
        common::stderr(&two).contains("one config file"),
        "{}",
        common::stderr(&two)
    );
}

/// A stand-in for ssh: runs the remote command here, with `PATH` set to `path`.
fn fake_ssh(dir: &Path, path: &str) -> String {
    let script = dir.join("fake-ssh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# Options up to --, then the host, then the remote command.\n\
             while [ \"$1\" != -- ]; do shift; done; shift 2\n\
             export DBUS_SESSION_BUS_ADDRESS=\"$FAKE_REMOTE_BUS\"\n\
             PATH={path} exec /bin/sh -c \"$*\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_command_and_clear_errors_when_a_piece_is_missing() {
    let bus = Bus::start();
    let dir = tempfile::tempdir().unwrap();
    let with_env = |ssh: &str, args: &[&str]| {
        let mut all = vec!["--host", "somewhere"];
        all.extend(args);
        bus.maqet_command(&all)
            .env("MAQET_SSH", ssh)
            .env("FAKE_REMOTE_BUS", &bus.address)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .output()
            .unwrap()
    };

    // The far side's command reaches its session bus through the bridge.
    let ok = fake_ssh(dir.path(), &std::env::var("PATH").unwrap());
    let out = with_env(&ok, &["ls"]);
    assert!(out.status.success(), "{}", common::stderr(&out));

    // No bridge over there.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for t in ["sh", "hostname", "id"] {
        std::os::unix::fs::symlink(tool(t).unwrap(), bare.join(t)).unwrap();
    }
    let dir2 = tempfile::tempdir().unwrap();
    let no_bridge = fake_ssh(dir2.path(), bare.to_str().unwrap());
    let out = with_env(&no_bridge, &["ls"]);
    assert_eq!(out.status.code(), Some(7));
    let err = common::stderr(&out);
    assert!(
        err.contains("systemd-stdio-bridge is not installed on"),
        "{err}"
    );
    assert!(
        err.contains("cannot reach the session bus of somewhere over ssh"),
        "{err}"
    );

    // No ssh here.
    let out = with_env("/nonexistent/ssh", &["ls"]);
    assert_eq!(out.status.code(), Some(7));
    assert!(common::stderr(&out).contains("cannot run /nonexistent/ssh"));

    // Option injection through the host name.
    let out = bus.maqet(&["--host=-oProxyCommand=touch /tmp/x", "ls"]);
    assert_eq!(out.status.code(), Some(4), "{}", common::stderr(&out));
}
