//! End-to-end: `display: spice | vnc` and `VM.OpenDisplay` (docs/desktop.md, "Seeing the
//! VM"), and `maqet view` with a real remote-viewer under Xvfb. Real QEMU, private bus.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use common::require::{program, programs, require};
use common::{Bus, TIMEOUT, error_name, tiny_vm_yaml};
use futures_util::StreamExt;
use maqet::client::qmp_proxy;

/// The tiny VM with maqet's display server instead of `display: none`; `-nodefaults`
/// leaves it without a graphics device, so maqet adds one.
fn display_vm_yaml(name: &str, server: &str) -> String {
    tiny_vm_yaml(name).replace("display: none", &format!("display: {server}"))
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect()
}

fn read_exact_within(socket: &mut UnixStream, n: usize) -> Vec<u8> {
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = vec![0u8; n];
    socket.read_exact(&mut buf).expect("the display answers");
    buf
}

/// The fd OpenDisplay returns speaks VNC at once: the RFB banner, then (no password on
/// maqet's server) the security handshake offers "None". Each call is a new client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_display_hands_over_a_connected_vnc_client() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "vnc", &display_vm_yaml("vnc", "vnc")).await;
    vm.start().await.unwrap();

    // QEMU got the server on a socket in the VM's private runtime directory, and a screen.
    let args = cmdline(vm.pid().await.unwrap());
    let at = args.iter().position(|a| a == "-vnc").expect("-vnc");
    let socket = args[at + 1].strip_prefix("unix:").expect("a unix socket");
    assert!(socket.starts_with(bus.root().to_str().unwrap()), "{socket}");
    assert!(socket.ends_with("/display.sock"), "{socket}");
    let dir = std::path::Path::new(socket).parent().unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(args.windows(2).any(|w| w == ["-vga", "std"]), "{args:?}");
    assert!(
        args.windows(2).any(|w| w == ["-display", "none"]),
        "{args:?}"
    );

    for _ in 0..2 {
        let fd: OwnedFd = vm.open_display().await.unwrap().into();
        let mut socket = UnixStream::from(fd);
        assert_eq!(read_exact_within(&mut socket, 12), b"RFB 003.008\n");
        socket.write_all(b"RFB 003.008\n").unwrap();
        // RFB 3.8: number of security types, then the types; 1 = None.
        let count = read_exact_within(&mut socket, 1)[0];
        assert!(count >= 1);
        let types = read_exact_within(&mut socket, count.into());
        assert_eq!(types, [1], "maqet's VNC server asks for no password");
    }
    // The screen maqet added is a real one.
    let png: OwnedFd = vm.screendump().await.unwrap().into();
    let mut magic = [0u8; 8];
    std::fs::File::from(png).read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"\x89PNG\r\n\x1a\n");
    vm.stop(true, 0).await.unwrap();
}

/// SPICE: the fd is a SPICE link; a main-channel link request is answered with a link
/// reply (magic `REDQ`), and QEMU reports the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_display_hands_over_a_spice_link() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus
        .add(&conn, "spice", &display_vm_yaml("spice", "spice"))
        .await;
    vm.start().await.unwrap();
    let fd: OwnedFd = vm.open_display().await.unwrap().into();
    let mut socket = UnixStream::from(fd);
    // SpiceLinkHeader (magic, major 2, minor 2, size 18) and SpiceLinkMess for the main
    // channel (connection 0, type 1, id 0, no capabilities, caps offset 18).
    let mut link = b"REDQ".to_vec();
    for v in [2u32, 2, 18, 0] {
        link.extend(v.to_le_bytes());
    }
    link.extend([1u8, 0]);
    for v in [0u32, 0, 18] {
        link.extend(v.to_le_bytes());
    }
    socket.write_all(&link).unwrap();
    let reply = read_exact_within(&mut socket, 16);
    assert_eq!(&reply[..4], b"REDQ");
    assert_eq!(u32::from_le_bytes(reply[4..8].try_into().unwrap()), 2);
    vm.stop(true, 0).await.unwrap();
}

/// The refusals say what to do: `InvalidState` when stopped, `InvalidArgument` naming
/// the key for a VM without a display server; busctl users get the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_display_refuses_with_the_key_to_set() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let plain = bus.add(&conn, "plain", &tiny_vm_yaml("plain")).await;
    let shown = bus
        .add(&conn, "shown", &display_vm_yaml("shown", "vnc"))
        .await;

    let e = shown.open_display().await.unwrap_err();
    assert_eq!(error_name(&e), "org.maqet.Maqet1.Error.InvalidState", "{e}");

    plain.start().await.unwrap();
    let e = plain.open_display().await.unwrap_err();
    assert_eq!(
        error_name(&e),
        "org.maqet.Maqet1.Error.InvalidArgument",
        "{e}"
    );
    assert!(e.to_string().contains("display: spice"), "{e}");

    let out = bus.busctl(&[
        "call",
        "org.maqet.Maqet1",
        plain.inner().path().as_str(),
        "org.maqet.Maqet1.VM",
        "OpenDisplay",
    ]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("display: spice"),
        "{}",
        common::stderr(&out)
    );

    // The CLI says the same, before looking for a viewer window.
    let out = bus
        .maqet_command(&["view", "plain"])
        .env("MAQET_VIEWER", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("display: spice"),
        "{}",
        common::stderr(&out)
    );

    // A config applied while running: the message says to restart.
    let applied = display_vm_yaml("plain", "spice");
    plain.apply(&applied).await.unwrap();
    let e = plain.open_display().await.unwrap_err();
    assert!(e.to_string().contains("restart"), "{e}");
    plain.stop(true, 0).await.unwrap();
}

/// Without a viewer installed, `maqet view` names what to install.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_without_a_viewer_says_what_to_install() {
    let bus = Bus::start();
    let empty = tempfile::tempdir().unwrap();
    let out = bus
        .maqet_command(&["view", "nothing"])
        .env("PATH", empty.path())
        .env_remove("MAQET_VIEWER")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(
        err.contains("virt-viewer") && err.contains("MAQET_VIEWER"),
        "{err}"
    );
    let out = bus
        .maqet_command(&["view", "nothing"])
        .env("MAQET_VIEWER", "no-such-viewer --flag")
        .output()
        .unwrap();
    assert!(
        common::stderr(&out).contains("no-such-viewer"),
        "{}",
        common::stderr(&out)
    );
}

/// An X server of its own (Xvfb picks a free display and says which when ready).
struct Xvfb {
    child: std::process::Child,
    display: String,
}

impl Xvfb {
    fn start() -> Xvfb {
        Xvfb::start_with(&[])
    }

    /// With extra options (`-fbdir DIR`: the screen as an XWD file there).
    fn start_with(extra: &[&str]) -> Xvfb {
        let mut child = Command::new("Xvfb")
            .args(extra)
            .args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                "1024x768x24",
                "-nolisten",
                "tcp",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Xvfb {
            child,
            display: format!(":{}", line.trim()),
        }
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `maqet view` with a real remote-viewer on Xvfb: its window appears with the VM's
/// name, SPICE connects (QEMU's SPICE_INITIALIZED event, a client in query-spice), and
/// ending maqet view closes the viewer and removes its private socket directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_opens_remote_viewer_connected_over_spice() {
    view_connects("spice").await;
}

/// The same over VNC (QEMU's VNC_INITIALIZED event, a client in query-vnc).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_opens_remote_viewer_connected_over_vnc() {
    view_connects("vnc").await;
}

async fn view_connects(server: &str) {
    let Some(()) = require(programs(&[
        ("Xvfb", "xvfb"),
        ("remote-viewer", "virt-viewer"),
        ("xdotool", "xdotool"),
    ])) else {
        return;
    };
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus
        .add(&conn, "seen", &display_vm_yaml("seen", server))
        .await;
    vm.start().await.unwrap();
    let qmp = qmp_proxy(&conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    let mut events = qmp.receive_event().await.unwrap();
    let x = Xvfb::start();

    let mut view = bus.maqet_command(&["view", "seen"]);
    view.env("DISPLAY", &x.display)
        .env_remove("MAQET_VIEWER")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut view = view.spawn().unwrap();

    if server == "spice" {
        // The main channel and then the display channel come up.
        let mut channels = Vec::new();
        while !channels.contains(&2) {
            let data = next_event(&mut events, "SPICE_INITIALIZED").await;
            channels.push(data["client"]["channel-type"].as_i64().unwrap());
        }
        assert!(channels.contains(&1), "{channels:?}");
        let spice: serde_json::Value =
            serde_json::from_str(&qmp.execute("query-spice", "{}", false).await.unwrap()).unwrap();
        assert!(
            spice["channels"].as_array().is_some_and(|c| !c.is_empty()),
            "{spice}"
        );
    } else {
        next_event(&mut events, "VNC_INITIALIZED").await;
        let vnc: serde_json::Value =
            serde_json::from_str(&qmp.execute("query-vnc", "{}", false).await.unwrap()).unwrap();
        assert!(
            vnc["clients"].as_array().is_some_and(|c| c.len() == 1),
            "{vnc}"
        );
    }

    // The viewer's window, titled after the VM.
    let found = Command::new("timeout")
        .args([
            "60",
            "xdotool",
            "search",
            "--sync",
            "--name",
            "seen \\(maqet\\)",
        ])
        .env("DISPLAY", &x.display)
        .output()
        .unwrap();
    assert!(found.status.success(), "no viewer window: {found:?}");

    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", view.id()))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse::<u32>().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(children.len(), 1, "one viewer process");
    let private: Vec<_> = std::fs::read_dir(bus.root().join("run"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("maqet-view-"))
        .collect();
    assert_eq!(private.len(), 1);
    if server == "vnc" {
        stranger_is_refused(children[0]).await;
    }

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(view.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = view.wait().unwrap();
    assert!(status.success(), "{status:?}");
    common::process_gone(children[0]).await;
    assert!(!private[0].path().exists());
    vm.stop(true, 0).await.unwrap();
}

/// The data of the next QMP event called `name`.
async fn next_event(
    events: &mut (impl futures_util::Stream<Item = maqet::client::Event> + Unpin),
    name: &str,
) -> serde_json::Value {
    loop {
        let sig = tokio::time::timeout(TIMEOUT, events.next())
            .await
            .unwrap_or_else(|_| panic!("no {name} event"))
            .unwrap();
        let args = sig.args().unwrap();
        if *args.name() == name {
            return serde_json::from_str(args.data_json()).unwrap();
        }
    }
}

/// The VNC bridge listens on a loopback port: a connection from another user's socket
/// is closed without a byte of the display.
async fn stranger_is_refused(viewer: u32) {
    if require(common::require::root("connecting as another user")).is_none() {
        return;
    }
    let args = std::fs::read(format!("/proc/{viewer}/cmdline")).unwrap();
    let address =
        String::from_utf8_lossy(args.split(|b| *b == 0).rfind(|w| !w.is_empty()).unwrap())
            .into_owned();
    let port = address.rsplit(':').next().unwrap().to_owned();
    assert!(address.starts_with("vnc://127.0.0.1:"), "{address}");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "bash",
                "-c",
            ])
            .arg(format!(
                "exec 3<>/dev/tcp/127.0.0.1/{port} && head -c 12 <&3"
            ))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "a stranger read {:?}", out.stdout);
}

/// A stand-in for ssh that runs the remote command here, on the test's bus, with the
/// freshly built `maqet` first on PATH (the far side's maqet).
fn fake_ssh(dir: &std::path::Path, bus_address: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let bin = std::path::Path::new(common::maqet_bin()).parent().unwrap();
    let script = dir.join("fake-ssh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nwhile [ \"$1\" != -- ]; do shift; done; shift 2\n\
             export DBUS_SESSION_BUS_ADDRESS='{bus_address}'\n\
             PATH='{}':\"$PATH\" exec /bin/sh -c \"$*\"\n",
            bin.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script.display().to_string()
}

/// `maqet --host H view VM`: the display is opened on H by `maqet display-stdio` and
/// carried over ssh, one ssh per SPICE channel; the refusals come first, in words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_over_host_forwards_each_channel_through_ssh() {
    let Some(()) = require(programs(&[
        ("Xvfb", "xvfb"),
        ("remote-viewer", "virt-viewer"),
        ("systemd-stdio-bridge", "systemd"),
    ])) else {
        return;
    };
    let bus = Bus::start();
    let conn = bus.conn().await;
    let dir = tempfile::tempdir().unwrap();
    let ssh = fake_ssh(dir.path(), &bus.address);
    let remote = |args: &[&str]| {
        let mut all = vec!["--host", "far"];
        all.extend(args);
        let mut cmd = bus.maqet_command(&all);
        cmd.env("MAQET_SSH", &ssh)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("MAQET_VIEWER");
        cmd
    };
    let vm = bus
        .add(&conn, "seen", &display_vm_yaml("seen", "spice"))
        .await;
    let plain = bus.add(&conn, "plain", &tiny_vm_yaml("plain")).await;

    let out = remote(&["view", "seen"]).output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("start it first"),
        "{}",
        common::stderr(&out)
    );
    plain.start().await.unwrap();
    let out = remote(&["view", "plain"]).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("display: spice"),
        "{}",
        common::stderr(&out)
    );

    vm.start().await.unwrap();
    let qmp = qmp_proxy(&conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    let mut events = qmp.receive_event().await.unwrap();
    let x = Xvfb::start();
    let mut view = remote(&["view", "seen"]);
    view.env("DISPLAY", &x.display).stdout(Stdio::null());
    let mut view = view.spawn().unwrap();
    let mut channels = Vec::new();
    while !(channels.contains(&1) && channels.contains(&2)) {
        let data = next_event(&mut events, "SPICE_INITIALIZED").await;
        channels.push(data["client"]["channel-type"].as_i64().unwrap());
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(view.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(view.wait().unwrap().success());
    vm.stop(true, 0).await.unwrap();
}

/// Sends WM_DELETE_WINDOW to `window`, as a window manager's close button does (Xvfb has
/// no window manager; python3's ctypes on libX11, so no extra package).
const CLOSE_WINDOW_PY: &str = r#"
import ctypes, sys
x = ctypes.cdll.LoadLibrary("libX11.so.6")
x.XOpenDisplay.restype = ctypes.c_void_p
x.XOpenDisplay.argtypes = [ctypes.c_char_p]
x.XInternAtom.restype = ctypes.c_ulong
x.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
class ClientMessage(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
                ("display", ctypes.c_void_p), ("window", ctypes.c_ulong),
                ("message_type", ctypes.c_ulong), ("format", ctypes.c_int), ("l", ctypes.c_long * 5)]
class Event(ctypes.Union):
    _fields_ = [("xclient", ClientMessage), ("pad", ctypes.c_long * 24)]
x.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long, ctypes.POINTER(Event)]
x.XFlush.argtypes = [ctypes.c_void_p]
d = x.XOpenDisplay(None)
assert d, "no display"
for w in sys.argv[1:]:
    ev = Event()
    ev.xclient.type = 33
    ev.xclient.window = int(w)
    ev.xclient.message_type = x.XInternAtom(d, b"WM_PROTOCOLS", 0)
    ev.xclient.format = 32
    ev.xclient.l[0] = x.XInternAtom(d, b"WM_DELETE_WINDOW", 0)
    x.XSendEvent(d, int(w), 0, 0, ctypes.byref(ev))
x.XFlush(d)
"#;

/// `display: gtk`: `maqet start` passes this session's DISPLAY, so QEMU's window opens
/// here although maqetd has no DISPLAY at all; closing the window is recorded as the
/// user's doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gtk_window_opens_on_the_callers_display_and_closing_it_is_recorded() {
    let Some(()) = require(programs(&[
        ("Xvfb", "xvfb"),
        ("xdotool", "xdotool"),
        ("python3", "python3"),
    ])) else {
        return;
    };
    let gtk = std::path::Path::new("/usr/lib/x86_64-linux-gnu/qemu/ui-gtk.so").exists();
    let Some(_) = require(gtk.then_some(()).ok_or_else(|| {
        "QEMU's GTK display is not installed (Debian: apt-get install qemu-system-gui)".to_owned()
    })) else {
        return;
    };
    let bus = Bus::start();
    let conn = bus.conn().await;
    let vm = bus.add(&conn, "win", &display_vm_yaml("win", "gtk")).await;
    let x = Xvfb::start();
    let out = bus
        .maqet_command(&["start", "win"])
        .env("DISPLAY", &x.display)
        .env("XDG_SESSION_TYPE", "x11")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let pid = vm.pid().await.unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    assert!(environ.contains(&format!("DISPLAY={}", x.display).as_bytes()));
    assert!(environ.contains(&b"XDG_SESSION_TYPE=x11".as_slice()));

    let found = Command::new("timeout")
        .args([
            "60",
            "xdotool",
            "search",
            "--sync",
            "--name",
            "QEMU \\(win\\)",
        ])
        .env("DISPLAY", &x.display)
        .output()
        .unwrap();
    assert!(found.status.success(), "no QEMU window: {found:?}");
    let windows: Vec<String> = String::from_utf8_lossy(&found.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();

    let mut watch = common::StatusWatch::new(&vm).await;
    let sent = Command::new("python3")
        .arg("-c")
        .arg(CLOSE_WINDOW_PY)
        .args(&windows)
        .env("DISPLAY", &x.display)
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    let (_, _, reason) = watch.until("stopped").await;
    assert_eq!(reason, "window closed by the user");
}

/// `maqet doctor` compares maqetd's graphical environment with the caller's: a
/// different screen is reported as stale, with the command that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_a_stale_graphical_environment() {
    let bus = Bus::start();
    let out = bus
        .maqet_command(&["--json", "doctor"])
        .env("DISPLAY", ":42")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["check"] == "display-env")
        .unwrap_or_else(|| panic!("no display-env row: {rows}"));
    assert_eq!(row["status"], "warning", "{row}");
    let message = row["message"].as_str().unwrap();
    assert!(
        message.contains("this session has DISPLAY=:42"),
        "{message}"
    );
    assert!(row["hint"].as_str().unwrap().contains("import-environment"));
}

/// A `maqet start` in a graphical session sends `StartWithOptions` (with `DISPLAY`); a
/// failure it printed in the terminal raises no desktop card: the person saw it. The
/// witness is the next notification: another VM's start nobody watched (KRunner's)
/// fails, and its card is the first the server receives (the notifier keeps the core's
/// order, so a card for the terminal's start would have come first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_graphical_start_seen_in_the_terminal_raises_no_card() {
    let Some(_) = require(program("Xvfb", "xvfb")) else {
        return;
    };
    let bus = Bus::start();
    let mut server =
        common::notifications::FakeNotifications::start(&bus, &["actions", "body"]).await;
    let conn = bus.conn().await;
    let bad = format!("{}args: [-no-such-option]\n", tiny_vm_yaml("broken"));
    bus.add(&conn, "", &bad).await;
    let unwatched = bad.replace("broken", "unwatched");
    let unwatched_id = bus.add(&conn, "", &unwatched).await.id().await.unwrap();
    let x = Xvfb::start();

    let out = bus
        .maqet_command(&["start", "broken"])
        .env("DISPLAY", &x.display)
        .env("XDG_SESSION_TYPE", "x11")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(
        err.contains("no-such-option"),
        "QEMU's error is printed: {err}"
    );
    let _ = conn
        .call_method(
            Some("org.maqet.Maqet1"),
            "/org/maqet/Maqet1/krunner",
            Some("org.kde.krunner1"),
            "Run",
            &(unwatched_id.as_str(), "start"),
        )
        .await;
    let n = server.next().await;
    assert_eq!(n.summary, "VM 'unwatched' failed to start", "{n:?}");
    assert!(server.closes_so_far().is_empty());
    // The terminal's start was StartWithOptions with the session's variables (audited
    // by name, queued when the call ended, long before the card above).
    let db = rusqlite::Connection::open(bus.database()).unwrap();
    let args: String = db
        .query_row(
            "SELECT arguments FROM audit WHERE method = 'Start' ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        args.starts_with("environment: ") && args.contains("DISPLAY"),
        "{args}"
    );
}

/// How a picture shows the colour guest: pixels of its red and its blue, and the mean
/// row of each. Coarse on purpose: a viewer scales, adds a toolbar and a border.
#[derive(Debug)]
struct RedOverBlue {
    red: u64,
    blue: u64,
    red_y: f64,
    blue_y: f64,
}

impl RedOverBlue {
    fn of(pixels: impl Iterator<Item = (u32, [u8; 3])>) -> RedOverBlue {
        let (mut red, mut blue, mut red_y, mut blue_y) = (0u64, 0u64, 0f64, 0f64);
        for (y, [r, g, b]) in pixels {
            if r > 120 && g < 60 && b < 60 {
                red += 1;
                red_y += f64::from(y);
            } else if b > 120 && r < 60 && g < 60 {
                blue += 1;
                blue_y += f64::from(y);
            }
        }
        RedOverBlue {
            red,
            blue,
            red_y: red_y / red.max(1) as f64,
            blue_y: blue_y / blue.max(1) as f64,
        }
    }

    /// The guest's screen: a large red area above a blue one of about its size.
    fn shows_the_guest(&self) -> bool {
        let ratio = self.red as f64 / self.blue.max(1) as f64;
        self.red > 50_000
            && self.blue > 50_000
            && self.red_y < self.blue_y
            && (0.8..1.25).contains(&ratio)
    }
}

/// The pixels (row, RGB) of the VM's own screendump (a PNG).
fn screendump_pixels(png_file: std::fs::File) -> Vec<(u32, [u8; 3])> {
    let mut decoder = png::Decoder::new(std::io::BufReader::new(png_file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    assert!(channels >= 3, "{:?}", info.color_type);
    let mut out = Vec::new();
    for y in 0..info.height {
        let row = &buf[y as usize * info.line_size..][..info.line_size];
        for px in row.chunks_exact(channels) {
            out.push((y, [px[0], px[1], px[2]]));
        }
    }
    out
}

/// The pixels (row, RGB) of an X screen Xvfb keeps as an XWD file (`-fbdir`): a
/// big-endian header, a colour map, then 32-bit ZPixmap rows.
fn xwd_pixels(file: &std::path::Path) -> Vec<(u32, [u8; 3])> {
    let data = std::fs::read(file).unwrap();
    let word = |i: usize| u32::from_be_bytes(data[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(word(1), 7, "an XWD version 7 file");
    let (header, width, height) = (word(0) as usize, word(4), word(5));
    let (byte_order, bits_per_pixel, bytes_per_line) = (word(7), word(11), word(12) as usize);
    let masks = [word(14), word(15), word(16)];
    let colours = word(19) as usize;
    assert_eq!(bits_per_pixel, 32, "a 24-bit screen");
    let start = header + colours * 12;
    let mut out = Vec::with_capacity((width * height) as usize);
    for y in 0..height {
        let row = &data[start + y as usize * bytes_per_line..];
        for x in 0..width as usize {
            let b: [u8; 4] = row[x * 4..x * 4 + 4].try_into().unwrap();
            let v = if byte_order == 0 {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            };
            let channel = |m: u32| ((v & m) >> m.trailing_zeros()) as u8;
            out.push((y, masks.map(channel)));
        }
    }
    out
}

/// `maqet view` shows the guest's screen: the colour guest paints red over blue, the
/// VM's own screendump shows that, and so does the X screen remote-viewer draws on
/// (Xvfb's framebuffer), in the same layout and proportion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_shows_what_the_vms_screendump_shows() {
    let Some(()) = require(programs(&[
        ("Xvfb", "xvfb"),
        ("remote-viewer", "virt-viewer"),
        ("xdotool", "xdotool"),
    ])) else {
        return;
    };
    let bus = Bus::start();
    let conn = bus.conn().await;
    let img = common::guest::write_colour_image(bus.root());
    let yaml = common::guest::vm_yaml("painted", &img).replace("display: none", "display: spice");
    let vm = bus.add(&conn, "", &yaml).await;
    let qmp = qmp_proxy(&conn, vm.inner().path().to_owned().into())
        .await
        .unwrap();
    let mut events = qmp.receive_event().await.unwrap();
    vm.start().await.unwrap();
    // The guest announces it has painted.
    next_event(&mut events, "RTC_CHANGE").await;
    let png: OwnedFd = vm.screendump().await.unwrap().into();
    let own = RedOverBlue::of(screendump_pixels(std::fs::File::from(png)).into_iter());
    assert!(own.shows_the_guest(), "the VM's screendump: {own:?}");

    let fb = tempfile::tempdir().unwrap();
    // -br: a black root window, so nothing but the viewer is red or blue.
    let x = Xvfb::start_with(&["-fbdir", fb.path().to_str().unwrap(), "-br"]);
    let mut view = bus.maqet_command(&["view", "painted"]);
    view.env("DISPLAY", &x.display)
        .env_remove("MAQET_VIEWER")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut view = view.spawn().unwrap();
    let found = Command::new("timeout")
        .args([
            "60",
            "xdotool",
            "search",
            "--sync",
            "--name",
            "painted \\(maqet\\)",
        ])
        .env("DISPLAY", &x.display)
        .output()
        .unwrap();
    assert!(found.status.success(), "no viewer window: {found:?}");
    // Nothing announces that the viewer has drawn the guest's picture: read the screen
    // until it shows it, within the timeout.
    let screen = fb.path().join("Xvfb_screen0");
    let deadline = std::time::Instant::now() + TIMEOUT;
    let seen = loop {
        let seen = RedOverBlue::of(xwd_pixels(&screen).into_iter());
        if seen.shows_the_guest() || std::time::Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(
        seen.shows_the_guest(),
        "the viewer's screen: {seen:?}, the VM's: {own:?}"
    );

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(view.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(view.wait().unwrap().success());
    vm.stop(true, 0).await.unwrap();
}
