//! End-to-end: the QEMU guest agent and port forwards against the real Linux test guest
//! (tests/common/linux_guest.rs, TCG). One boot carries every assertion: the agent
//! connects (with PropertiesChanged), identity and addresses, `maqet exec` / `ip` / `cp`,
//! filesystems frozen around a live snapshot (and thawed after a cancelled one), a
//! refused caller, configured and runtime forwards reaching a listener in the guest,
//! `maqet ssh` into the guest's ssh server, a maqetd restart that keeps every forward,
//! and a `Stop` through `guest-shutdown`.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use futures_util::StreamExt;
use maqet::client::{GuestProxy, JobProxy, SnapshotsProxy, proxy_at};
use tokio::io::AsyncWriteExt;
use zbus::{Connection, OwnedObjectPath};

use common::linux_guest::{self, READY, Serial, Setup, USER_NET};
use common::require::{program, require};
use common::{Bus, TIMEOUT, error_name, stderr, stdout};

/// The printed by the guest's fsfreeze hook (qemu-ga runs it before a freeze and after
/// a thaw).
const FREEZE: &str = "MAQET-GUEST-FSFREEZE freeze";
const THAW: &str = "MAQET-GUEST-FSFREEZE thaw";

/// A job's end state and message, once it has ended.
async fn job_end(conn: &Connection, path: OwnedObjectPath) -> (String, String) {
    let job: JobProxy = proxy_at(conn, path).await.unwrap();
    let mut completed = job.receive_completed().await.unwrap();
    if job.state().await.unwrap() == "running" {
        tokio::time::timeout(TIMEOUT, completed.next())
            .await
            .expect("no Completed signal in time");
    }
    (job.state().await.unwrap(), job.message().await.unwrap())
}

/// The first announced value of a property that `wanted` accepts.
async fn changed_to<T>(
    changes: &mut zbus::proxy::PropertyStream<'_, T>,
    name: &str,
    wanted: impl Fn(&T) -> bool,
) -> T
where
    T: serde::de::DeserializeOwned + zbus::zvariant::Type + Unpin,
{
    let found = tokio::time::timeout(TIMEOUT, async {
        while let Some(change) = changes.next().await {
            let value = change.get().await.unwrap();
            if wanted(&value) {
                return value;
            }
        }
        panic!("the {name} property stream ended");
    })
    .await;
    found.unwrap_or_else(|_| panic!("{name} never changed to the value wanted"))
}

/// The bytes of `disk` as they were in its internal snapshot `name` (read beside the
/// running QEMU with qemu-img's force-share).
fn disk_in_snapshot(disk: &Path, name: &str) -> Vec<u8> {
    let raw = disk.with_extension(format!("{name}.raw"));
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw", "-l"])
        .arg(format!("snapshot.name={name}"))
        .arg(disk)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img convert: {}", stderr(&out));
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What a TCP connection to `port` on the host reads until the peer closes.
async fn read_forward(port: u16) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut out = Vec::new();
    tokio::time::timeout(
        TIMEOUT,
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out),
    )
    .await
    .expect("the forwarded connection ends")?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `maqet ARGS` off the async workers, optionally with `stdin`.
async fn maqet(bus: &Bus, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let mut cmd = bus.maqet_command(args);
    let stdin = stdin.map(<[u8]>::to_vec);
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = tokio::process::Command::from(cmd)
        .spawn()
        .expect("run maqet");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(&bytes).await.unwrap();
        drop(pipe);
    }
    tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .expect("maqet finishes")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_and_forwards_reach_inside_a_real_guest() {
    let Some(image) = linux_guest::image() else {
        return;
    };
    let bus = Bus::start();
    let conn = bus.conn().await;
    let port = free_port();
    let disk = bus.root().join("agent-data.qcow2");
    let keys = format!(
        "guest_agent: true\nssh_user: root\nforwards: [{{host: {port}, guest: 8080}}]\n\
         storage:\n  - {{name: data, type: qcow2, file: '{}', size: 64M}}\n",
        disk.display()
    );
    let setup = Setup {
        arguments: USER_NET,
        keys: &keys,
        ..Setup::default()
    };
    let vm = bus
        .add(&conn, "", &linux_guest::vm_yaml("agent", image, &setup))
        .await;
    let path = bus.manager(&conn).await.find_vm("agent").await.unwrap();
    let guest: GuestProxy = proxy_at(&conn, path.clone()).await.unwrap();
    assert_eq!(guest.guest_agent().await.unwrap(), "absent", "not running");
    // Property streams need a caching proxy.
    let watcher = GuestProxy::builder(&conn)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let mut agent_changes = watcher.receive_guest_agent_changed().await;
    let mut info_changes = watcher.receive_guest_info_changed().await;
    let mut address_changes = watcher.receive_addresses_changed().await;

    vm.start().await.unwrap();
    let mut serial = Serial::attach(&vm).await;
    vm.resume().await.unwrap();
    serial.wait_for("MAQET-GUEST-AGENT started").await;
    serial.wait_for(READY).await;

    // GuestAgent: connecting → connected, announced with PropertiesChanged.
    changed_to(&mut agent_changes, "GuestAgent", |s| s == "connected").await;
    guest.ping().await.unwrap();

    // Identity, then addresses, follow `connected`, each with its own PropertiesChanged.
    let info = changed_to(&mut info_changes, "GuestInfo", |i| !i.is_empty()).await;
    assert_eq!(
        info.get("hostname").map(String::as_str),
        Some("maqet-guest"),
        "{info:?}"
    );
    assert!(
        info.get("agent-version").is_some_and(|v| !v.is_empty()),
        "{info:?}"
    );
    let addresses = changed_to(&mut address_changes, "Addresses", |a| !a.is_empty()).await;
    assert_eq!(guest.addresses().await.unwrap(), addresses);
    assert!(
        addresses.contains(&("eth0".into(), "ipv4".into(), "10.0.2.15".into())),
        "{addresses:?}"
    );
    let ip = maqet(&bus, &["ip", "agent"], None).await;
    assert!(ip.status.success(), "{}", stderr(&ip));
    assert!(
        stdout(&ip).contains("eth0\tipv4\t10.0.2.15"),
        "{}",
        stdout(&ip)
    );

    // exec: exit code, stdout and stderr pass through; stdin is forwarded.
    let out = maqet(
        &bus,
        &[
            "exec",
            "agent",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");
    let out = maqet(
        &bus,
        &["exec", "agent", "--", "tr", "a-z", "A-Z"],
        Some(b"piped in\n"),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "PIPED IN\n");

    // cp both ways, with binary content and the mode kept.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("up.bin");
    let content: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&local, &content).unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o640)).unwrap();
    let up = maqet(
        &bus,
        &["cp", local.to_str().unwrap(), "agent:/tmp/up.bin"],
        None,
    )
    .await;
    assert!(up.status.success(), "{}", stderr(&up));
    let mode = maqet(
        &bus,
        &["exec", "agent", "--", "stat", "-c", "%a %s", "/tmp/up.bin"],
        None,
    )
    .await;
    assert_eq!(stdout(&mode), "640 70000\n", "{}", stderr(&mode));
    let back = dir.path().join("down.bin");
    let down = maqet(
        &bus,
        &["cp", "agent:/tmp/up.bin", back.to_str().unwrap()],
        None,
    )
    .await;
    assert!(down.status.success(), "{}", stderr(&down));
    assert_eq!(std::fs::read(&back).unwrap(), content);
    let missing = maqet(
        &bus,
        &["cp", "agent:/no/such/file", back.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(missing.status.code(), Some(4), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("No such file"),
        "{}",
        stderr(&missing)
    );
    assert!(
        guest
            .read_file("relative", 0)
            .await
            .is_err_and(|e| error_name(&e).ends_with("InvalidArgument")),
        "guest paths must be absolute"
    );

    // A live snapshot freezes the guest's filesystems around the save. An ext2 disk
    // with periodic writeback off: data written without `sync` reaches the disk only
    // through the freeze's sync, so finding it in the snapshot proves the freeze came
    // before the save, and the thaw hook after it.
    let (rc, shown) = serial
        .run(
            "echo 0 >/proc/sys/vm/dirty_writeback_centisecs && mke2fs -q /dev/vda && \
             mkdir -p /mnt/data && mount /dev/vda /mnt/data",
        )
        .await;
    assert_eq!(rc, 0, "{shown}");
    let (rc, shown) = serial
        .run("echo maqet-unsynced-$((6 * 7)) >/mnt/data/note")
        .await;
    assert_eq!(rc, 0, "{shown}");
    let snaps: SnapshotsProxy = proxy_at(&conn, path.clone()).await.unwrap();
    let job = snaps.create("frozen", HashMap::new()).await.unwrap();
    serial.wait_for(FREEZE).await;
    serial.wait_for(THAW).await;
    let (state, message) = job_end(&conn, job).await;
    assert_eq!(state, "completed", "{message}");
    assert!(
        contains(&disk_in_snapshot(&disk, "frozen"), b"maqet-unsynced-42\n"),
        "the unsynced file is not in the snapshot: the filesystem was not frozen before the save"
    );
    // Thawed: the agent runs commands again (a frozen qemu-ga refuses guest-exec).
    let out = maqet(
        &bus,
        &["exec", "agent", "--", "cat", "/mnt/data/note"],
        None,
    )
    .await;
    assert_eq!(stdout(&out), "maqet-unsynced-42\n", "{}", stderr(&out));

    // A save cancelled while the freeze is under way still thaws: the guest's hook holds
    // the freeze until the cancel has been asked for.
    let (rc, shown) = serial.run(": >/run/fsfreeze.hold").await;
    assert_eq!(rc, 0, "{shown}");
    let job = snaps.create("cancelled", HashMap::new()).await.unwrap();
    serial.wait_for(FREEZE).await;
    let job_proxy: JobProxy = proxy_at(&conn, job.clone()).await.unwrap();
    job_proxy.cancel().await.unwrap();
    let (rc, shown) = serial.run("rm /run/fsfreeze.hold").await;
    assert_eq!(rc, 0, "{shown}");
    serial.wait_for(THAW).await;
    let (state, message) = job_end(&conn, job).await;
    assert_eq!(state, "cancelled", "{message}");
    let names: Vec<String> = snaps
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(names, ["frozen"]);
    // A frozen filesystem would block this write (and the wait for its status fail).
    let (rc, shown) = serial
        .run("echo thawed >/mnt/data/after && sync && cat /mnt/data/after")
        .await;
    assert_eq!(rc, 0, "{shown}");
    let out = maqet(&bus, &["exec", "agent", "--", "true"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));

    // A caller the policy refuses cannot exec or read files; the refusal is audited.
    bus.write_policy("actions:\n  org.maqet.guest.exec: no\n  org.maqet.guest.files: no\n");
    let refused = maqet(&bus, &["exec", "agent", "--", "true"], None).await;
    assert_eq!(refused.status.code(), Some(6), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("org.maqet.guest.exec"),
        "{}",
        stderr(&refused)
    );
    let e = guest.read_file("/etc/hostname", 0).await.unwrap_err();
    assert!(error_name(&e).ends_with("AccessDenied"), "{e}");
    bus.write_policy("");
    let audit = maqet(&bus, &["--json", "audit", "--vm", "agent"], None).await;
    assert!(
        stdout(&audit).contains("org.maqet.guest.exec"),
        "{}",
        stdout(&audit)
    );

    // The configured forward reaches a listener in the guest (restrict=on allows it).
    let (rc, shown) = serial
        .run("{ nc -ll -p 8080 -e echo maqet-forward-ok </dev/null >/dev/null 2>&1 & }")
        .await;
    assert_eq!(rc, 0, "{shown}");
    let vm_forwards = vm.forwards().await.unwrap();
    assert_eq!(vm_forwards, [format!("tcp:127.0.0.1:{port}:8080")]);
    // Inside the guest, wait until the listener is up (its state, not a delay).
    let (rc, shown) = serial
        .run("while ! netstat -ltn | grep -q ':8080 '; do usleep 20000; done")
        .await;
    assert_eq!(rc, 0, "{shown}");
    let reply = read_forward(port).await.unwrap();
    assert!(reply.contains("maqet-forward-ok"), "{reply:?}");

    // A runtime forward is added, works, and is removed.
    let extra = free_port();
    let spec = format!("127.0.0.1:{extra}:8080");
    let vm_watcher = maqet::client::VmProxy::builder(&conn)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let mut forward_changes = vm_watcher.receive_forwards_changed().await;
    vm.add_forward(&spec).await.unwrap();
    assert!(
        vm.forwards()
            .await
            .unwrap()
            .contains(&format!("tcp:{spec}"))
    );
    tokio::time::timeout(TIMEOUT, forward_changes.next())
        .await
        .expect("Forwards PropertiesChanged");
    assert!(
        read_forward(extra)
            .await
            .unwrap()
            .contains("maqet-forward-ok")
    );
    let twice = vm.add_forward(&spec).await.unwrap_err();
    assert!(error_name(&twice).ends_with("AlreadyExists"), "{twice}");
    vm.remove_forward(&spec).await.unwrap();
    assert!(
        !vm.forwards()
            .await
            .unwrap()
            .iter()
            .any(|f| f.contains(&extra.to_string()))
    );
    assert!(
        read_forward(extra).await.is_err(),
        "the removed forward still answers"
    );
    let gone = vm.remove_forward(&spec).await.unwrap_err();
    assert!(error_name(&gone).ends_with("NotFound"), "{gone}");

    // The agent restarts inside the guest: maqetd sees the port close and reopen
    // (VSERPORT_CHANGE), resynchronises, and the agent answers again.
    let (rc, shown) = serial.run("kill $(pidof qemu-ga)").await;
    assert_eq!(rc, 0, "{shown}");
    let mut seen = Vec::new();
    let back = tokio::time::timeout(TIMEOUT, async {
        while let Some(change) = agent_changes.next().await {
            seen.push(change.get().await.unwrap());
            if seen.ends_with(&["connecting".to_owned(), "connected".to_owned()]) {
                return;
            }
        }
    })
    .await;
    assert!(
        back.is_ok(),
        "GuestAgent after the agent restarted: {seen:?}"
    );
    guest.ping().await.unwrap();
    let out = maqet(&bus, &["exec", "agent", "--", "hostname"], None).await;
    assert_eq!(stdout(&out), "maqet-guest\n", "{}", stderr(&out));

    // `maqet ssh` reaches the guest's ssh server (dropbear) through a forward to port 22
    // it adds, as ssh_user, with a key the test makes; the host key is the one made when
    // the guest was built.
    let ssh_dir = tempfile::tempdir().unwrap();
    let ssh = ssh_client(ssh_dir.path(), &image.ssh_host_key);
    if let Some(ssh) = &ssh {
        let up = maqet(
            &bus,
            &[
                "cp",
                ssh.public_key.to_str().unwrap(),
                "agent:/root/.ssh/authorized_keys",
            ],
            None,
        )
        .await;
        assert!(up.status.success(), "{}", stderr(&up));
        let out = ssh.run(&bus, &["--", "echo", "hello", "over", "ssh"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out), "hello over ssh\n");
        let out = ssh.run(&bus, &["--", "true"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let out = ssh.run(&bus, &["--", "sh", "-c", "'exit 7'"]).await;
        assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    }
    let ssh_forward = vm
        .forwards()
        .await
        .unwrap()
        .into_iter()
        .find(|f| f.starts_with("tcp:127.0.0.1:") && f.ends_with(":22"));
    assert_eq!(ssh_forward.is_some(), ssh.is_some(), "a forward to port 22");

    // One more runtime forward, to see it survive a maqetd restart.
    let kept = free_port();
    vm.add_forward(&format!("udp:{kept}:5353")).await.unwrap();
    let mut before = vm.forwards().await.unwrap();
    before.sort();

    // maqetd killed and re-activated: it re-adopts the VM and reconnects to the agent.
    let daemons = bus.marked_processes("maqetd");
    assert_eq!(daemons.len(), 1);
    drop(serial);
    unsafe { libc::kill(daemons[0] as i32, libc::SIGKILL) };
    common::process_gone(daemons[0]).await;
    let list = bus.manager(&conn).await.list_vms().await.unwrap();
    assert_eq!(list[0].3, "running", "re-adopted");
    let watcher = GuestProxy::builder(&conn)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let mut agent_changes = watcher.receive_guest_agent_changed().await;
    if watcher.guest_agent().await.unwrap() != "connected" {
        // After re-adoption.
        changed_to(&mut agent_changes, "GuestAgent", |s| s == "connected").await;
    }
    guest.ping().await.unwrap();
    // Every forward is listed again, the runtime ones too (read back from QEMU).
    let mut after = vm.forwards().await.unwrap();
    after.sort();
    assert_eq!(after, before);
    assert!(after.contains(&format!("tcp:127.0.0.1:{port}:8080")));
    assert!(after.contains(&format!("udp:127.0.0.1:{kept}:5353")));
    vm.remove_forward(&format!("udp:{kept}:5353"))
        .await
        .unwrap();
    if let Some(ssh) = &ssh {
        // The forward to port 22 is found again, not added twice.
        let out = ssh.run(&bus, &["--", "hostname"]).await;
        assert_eq!(stdout(&out), "maqet-guest\n", "{}", stderr(&out));
        let mut now = vm.forwards().await.unwrap();
        now.sort();
        before.retain(|f| !f.starts_with("udp:"));
        assert_eq!(now, before);
    }
    let mut serial = Serial::attach(&vm).await;

    // Stop goes through the agent first, and says so.
    vm.stop(false, 60).await.unwrap();
    let rest = serial.read_to_end().await;
    assert!(rest.contains("MAQET-GUEST-POWEROFF agent"), "{rest}");
    assert_eq!(vm.status().await.unwrap(), "stopped");
    let reason = vm.status_reason().await.unwrap();
    assert!(reason.contains("guest-agent"), "{reason}");
    assert_eq!(guest.guest_agent().await.unwrap(), "absent");
    assert!(vm.forwards().await.unwrap().is_empty());
    let e = guest.ping().await.unwrap_err();
    assert!(error_name(&e).ends_with("InvalidState"), "{e}");
}

/// A forward's host port already taken: the start is refused, naming the port, and no
/// QEMU runs. No guest boots for this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_to_a_taken_host_port_refuses_the_start() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let yaml = format!(
        "{}forwards: [{{host: {port}, guest: 22}}]\n",
        common::tiny_vm_yaml("fwd")
    );
    let vm = bus.add(&conn, "", &yaml).await;
    let e = vm.start().await.unwrap_err();
    assert!(error_name(&e).ends_with("InvalidArgument"), "{e}");
    assert!(e.to_string().contains(&format!("host port {port}")), "{e}");
    assert_eq!(vm.status().await.unwrap(), "created");
    drop(taken);
}

/// Without `guest_agent: true` there is no channel: `GuestAgent` stays `absent` while
/// the VM runs, and `maqet exec` says what to change (exit 5, InvalidState).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_without_an_agent_channel_says_how_to_get_one() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "", &common::tiny_vm_yaml("plain")).await;
    vm.start().await.unwrap();
    let path = bus.manager(&conn).await.find_vm("plain").await.unwrap();
    let guest: GuestProxy = proxy_at(&conn, path).await.unwrap();
    assert_eq!(guest.guest_agent().await.unwrap(), "absent");
    let out = maqet(&bus, &["exec", "plain", "--", "true"], None).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("guest_agent: true"),
        "{}",
        stderr(&out)
    );
    let e = guest.read_file("/etc/hostname", 0).await.unwrap_err();
    assert!(error_name(&e).ends_with("InvalidState"), "{e}");
    vm.stop(true, 0).await.unwrap();
}

/// A real ssh client for `maqet ssh` (through `MAQET_SSH_CLIENT`: a wrapper that adds
/// the test's own ssh_config, since ssh reads ~/.ssh of the passwd entry, not $HOME).
struct SshClient {
    wrapper: std::path::PathBuf,
    public_key: std::path::PathBuf,
}

impl SshClient {
    async fn run(&self, bus: &Bus, args: &[&str]) -> std::process::Output {
        let mut all = vec!["ssh", "agent"];
        all.extend_from_slice(args);
        let mut cmd = bus.maqet_command(&all);
        cmd.env("MAQET_SSH_CLIENT", &self.wrapper);
        tokio::time::timeout(
            TIMEOUT,
            tokio::task::spawn_blocking(move || cmd.output().unwrap()),
        )
        .await
        .expect("maqet ssh finishes")
        .unwrap()
    }
}

/// A key pair, a known_hosts naming the guest's build-time host key under the alias
/// `maqet ssh` uses, and the wrapper. `None` (skipped, or failed under
/// MAQET_TEST_REQUIRE_ALL) without ssh and ssh-keygen.
fn ssh_client(dir: &Path, host_key: &Path) -> Option<SshClient> {
    let ssh = require(program("ssh", "openssh-client"))?;
    let keygen = require(program("ssh-keygen", "openssh-client"))?;
    let key = dir.join("id_ed25519");
    let out = std::process::Command::new(keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-keygen: {}", stderr(&out));
    let host_key = std::fs::read_to_string(host_key).unwrap();
    let known = dir.join("known_hosts");
    std::fs::write(&known, format!("maqet-agent {}", host_key.trim())).unwrap();
    let config = dir.join("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  \
             GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n",
            key.display(),
            known.display()
        ),
    )
    .unwrap();
    let wrapper = dir.join("ssh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} -F {} \"$@\"\n",
            ssh.display(),
            config.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(SshClient {
        wrapper,
        public_key: key.with_extension("pub"),
    })
}

/// The text the guest printed for seed file `name` (between its markers).
fn seed_file(console: &str, name: &str) -> String {
    let start = format!("MAQET-SEED-FILE {name}");
    let end = format!("MAQET-SEED-END {name}");
    let from = console
        .find(&start)
        .unwrap_or_else(|| panic!("no {name} in the seed:\n{console}"));
    let rest = &console[from + start.len()..];
    rest[..rest.find(&end).expect("the end marker")].replace('\r', "")
}

/// Every file named `name` under `dir`.
fn find_named(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(find_named(&path, name));
        } else if entry.file_name() == name {
            found.push(path);
        }
    }
    found
}

/// cloud-init's NoCloud seed: the real guest finds the volume labelled `cidata`, mounts
/// it (ISO 9660, read-only) and prints its files; a changed config gives a new seed at
/// the next start (read on the host: no second boot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_init_seed_reaches_the_guest_and_follows_the_config() {
    let Some(image) = linux_guest::image() else {
        return;
    };
    let bus = Bus::start();
    let conn = bus.conn().await;
    let keys = |host: &str| {
        format!(
            "hostname: {host}\nuser: alice\n\
             ssh_authorized_keys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 alice@laptop']\n\
             cloud_init:\n  user_data: {{packages: [htop], runcmd: [[touch, /ok]]}}\n\
             \x20 network_config: {{version: 2, ethernets: {{eth0: {{dhcp4: true}}}}}}\n"
        )
    };
    let first = keys("seeded-web");
    let setup = Setup {
        append: "maqet.seed maqet.load=isofs",
        keys: &first,
        ..Setup::default()
    };
    let (vm, mut serial) = linux_guest::boot(&bus, &conn, "seeded", image, &setup).await;
    let console = String::from_utf8_lossy(&serial.log).into_owned();
    assert!(
        console.contains("MAQET-SEED-MOUNTED /dev/vda iso9660"),
        "{console}"
    );
    let user = seed_file(&console, "user-data");
    assert!(user.starts_with("\n#cloud-config\n"), "{user}");
    for want in ["hostname: seeded-web", "- htop", "name: alice", "- touch"] {
        assert!(user.contains(want), "{want:?} not in user-data:\n{user}");
    }
    let meta = seed_file(&console, "meta-data");
    for want in [
        "local-hostname: seeded-web",
        "instance-id: maqet-",
        "- ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 alice@laptop",
    ] {
        assert!(meta.contains(want), "{want:?} not in meta-data:\n{meta}");
    }
    let net = seed_file(&console, "network-config");
    assert!(net.contains("dhcp4: true"), "{net}");
    // Attached read-only: the guest's block layer says so.
    let (rc, shown) = serial.run("cat /sys/block/vda/ro").await;
    assert_eq!(rc, 0, "{shown}");
    assert!(shown.contains("\n1\r\n"), "{shown}");
    drop(serial);
    vm.stop(true, 0).await.unwrap();

    // The config changes: the next start writes a new seed, with a new instance-id.
    let isos = find_named(bus.root(), "cidata.iso");
    assert_eq!(isos.len(), 1, "{isos:?}");
    let read = || maqet::storage::seed::read_iso(&std::fs::read(&isos[0]).unwrap()).unwrap();
    let file = |files: &[(String, Vec<u8>)], name: &str| {
        let (_, data) = files.iter().find(|(n, _)| n == name).unwrap();
        String::from_utf8(data.clone()).unwrap()
    };
    let (label, before) = read();
    assert_eq!(label, "cidata");
    let second = keys("seeded-db");
    let changed = linux_guest::vm_yaml(
        "seeded",
        image,
        &Setup {
            keys: &second,
            ..setup
        },
    );
    vm.apply(&changed).await.unwrap();
    vm.start().await.unwrap(); // paused (-S): the seed is written before QEMU runs
    let (_, after) = read();
    assert!(file(&after, "meta-data").contains("local-hostname: seeded-db"));
    assert!(file(&after, "user-data").contains("hostname: seeded-db"));
    let id = |files: &[(String, Vec<u8>)]| {
        file(files, "meta-data")
            .lines()
            .find(|l| l.starts_with("instance-id:"))
            .unwrap()
            .to_owned()
    };
    assert_ne!(id(&before), id(&after));
    vm.stop(true, 0).await.unwrap();
}
