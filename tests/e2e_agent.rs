//! End-to-end: the QEMU guest agent and port forwards against the real Linux test guest
//! (tests/common/linux_guest.rs, TCG). One boot carries every assertion: the agent
//! connects (with PropertiesChanged), identity and addresses, `maqet exec` / `ip` / `cp`,
//! a refused caller, configured and runtime forwards reaching a listener in the guest,
//! and a `Stop` through `guest-shutdown`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use futures_util::StreamExt;
use maqet::client::{GuestProxy, proxy_at};
use tokio::io::AsyncWriteExt;

use common::linux_guest::{self, READY, Serial, Setup, USER_NET};
use common::{Bus, TIMEOUT, error_name, stderr, stdout};

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
    let keys =
        format!("guest_agent: true\nssh_user: root\nforwards: [{{host: {port}, guest: 8080}}]\n");
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

    vm.start().await.unwrap();
    let mut serial = Serial::attach(&vm).await;
    vm.resume().await.unwrap();
    serial.wait_for("MAQET-GUEST-AGENT started").await;
    serial.wait_for(READY).await;

    // GuestAgent: connecting → connected, announced with PropertiesChanged.
    let connected = tokio::time::timeout(TIMEOUT, async {
        while let Some(change) = agent_changes.next().await {
            if change.get().await.unwrap() == "connected" {
                return;
            }
        }
        panic!("the property stream ended");
    })
    .await;
    assert!(connected.is_ok(), "GuestAgent never became connected");
    guest.ping().await.unwrap();

    let info = guest.guest_info().await.unwrap();
    assert_eq!(
        info.get("hostname").map(String::as_str),
        Some("maqet-guest"),
        "{info:?}"
    );
    assert!(
        info.get("agent-version").is_some_and(|v| !v.is_empty()),
        "{info:?}"
    );
    let addresses = guest.addresses().await.unwrap();
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

    // `maqet ssh` finds the guest's port 22 through a forward it adds, as ssh_user
    // (an `echo` stands in for ssh: the guest runs no sshd).
    let mut cmd = bus.maqet_command(&["ssh", "agent", "--", "uname", "-a"]);
    cmd.env("MAQET_SSH_CLIENT", "echo");
    let ssh = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(ssh.status.success(), "{}", stderr(&ssh));
    let ssh_port = vm
        .forwards()
        .await
        .unwrap()
        .iter()
        .find_map(|f| {
            f.strip_prefix("tcp:127.0.0.1:")?
                .strip_suffix(":22")
                .map(str::to_owned)
        })
        .expect("a forward to port 22");
    assert_eq!(
        stdout(&ssh),
        format!("-p {ssh_port} -o HostKeyAlias=maqet-agent -l root 127.0.0.1 uname -a\n")
    );

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
        let back = tokio::time::timeout(TIMEOUT, async {
            while let Some(change) = agent_changes.next().await {
                if change.get().await.unwrap() == "connected" {
                    return;
                }
            }
        })
        .await;
        assert!(
            back.is_ok(),
            "the agent did not reconnect after re-adoption"
        );
    }
    guest.ping().await.unwrap();
    assert_eq!(
        vm.forwards().await.unwrap(),
        [format!("tcp:127.0.0.1:{port}:8080")]
    );
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
