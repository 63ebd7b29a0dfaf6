//! End-to-end on a real Linux guest (tests/common/linux_guest.rs, booted under TCG):
//! typed text arrives inside the guest, the screen shows it, `maqet console` reaches a
//! shell, and `Stop` powers the guest off through ACPI; a guest that ignores the power
//! button escalates; qemu-ga and the NIC work in the guest. Two boots in all: CI time is
//! precious under TCG.

mod common;

use std::io::{Read, Write};

use common::linux_guest::{self, ACPI_POWEROFF, NO_ACPI, Serial, Setup, TYPED, USER_NET};
use common::{Bus, StatusWatch, TIMEOUT};

/// The distinct RGBA colours of a PNG.
fn colours(png_bytes: &[u8]) -> std::collections::HashSet<[u8; 4]> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a sane PNG size")];
    let info = reader.next_frame(&mut buf).expect("a PNG frame");
    let pixels = &buf[..info.buffer_size()];
    let step = info.color_type.samples();
    assert_eq!(
        info.bit_depth,
        png::BitDepth::Eight,
        "QEMU writes 8-bit PNGs"
    );
    pixels
        .chunks_exact(step)
        .map(|p| {
            let mut c = [0, 0, 0, 255];
            c[..step.min(4)].copy_from_slice(&p[..step.min(4)]);
            c
        })
        .collect()
}

/// A child's output as it comes (a console prints no newline to wait for).
struct ByteStream {
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: std::cell::RefCell<Vec<u8>>,
}

impl ByteStream {
    fn new(mut from: impl Read + Send + 'static) -> ByteStream {
        let (tx, chunks) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        ByteStream {
            chunks,
            seen: Default::default(),
        }
    }

    fn wait_for(&self, want: &str) {
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut seen = self.seen.borrow_mut();
        while !String::from_utf8_lossy(&seen).contains(want) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => seen.extend(chunk),
                Err(_) => panic!("no {want:?}; got {:?}", String::from_utf8_lossy(&seen)),
            }
        }
    }
}

/// A QEMU guest agent client on a chardev socket (issue 12 moves this into maqetd).
struct Agent {
    stream: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Agent {
    /// Connects and synchronises: `guest-sync-delimited` answers after a 0xFF byte, so
    /// whatever came before (a stale reply) is skipped.
    fn connect(path: &std::path::Path) -> Agent {
        let stream = std::os::unix::net::UnixStream::connect(path).expect("agent socket");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut agent = Agent {
            stream: std::io::BufReader::new(stream),
        };
        agent
            .stream
            .get_mut()
            .write_all(br#"{"execute": "guest-sync-delimited", "arguments": {"id": 4242}}"#)
            .unwrap();
        let mut skipped = Vec::new();
        use std::io::BufRead;
        agent
            .stream
            .read_until(0xff, &mut skipped)
            .expect("the guest agent answers");
        let reply = agent.line();
        assert_eq!(reply["return"], 4242, "{reply}");
        agent
    }

    fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.stream.read_line(&mut line).expect("an agent reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    fn call(&mut self, request: &str) -> serde_json::Value {
        self.stream.get_mut().write_all(request.as_bytes()).unwrap();
        self.line()
    }
}

/// The line the guest echoes for text typed on its VGA console.
async fn typed_line(serial: &mut Serial, expect: &str) {
    let marker = format!("{TYPED}{expect}\r\n");
    serial.wait_for(&marker).await;
}

/// One booted guest, several assertions: keys and text typed through QMP reach the
/// guest's tty1 (shift, punctuation, Tab, Enter), the screendump shows the console,
/// `maqet console` runs a command in the guest's shell, and `Stop` powers it off through
/// ACPI with nothing to escalate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_guest_types_shows_runs_commands_and_powers_off_by_acpi() {
    let Some(image) = linux_guest::image() else {
        return;
    };
    let bus = Bus::start();
    let conn = bus.conn().await;
    let (vm, mut serial) = linux_guest::boot(&bus, &conn, "linux", image, &Setup::default()).await;
    let log = String::from_utf8_lossy(&serial.log).into_owned();
    assert!(log.contains("MAQET-GUEST-ACPI on"), "{log}");

    // TypeText: a US layout with shift for capitals and symbols, Tab and Enter.
    vm.type_text("Hello, World! <a@b.c>\t~ok\n").await.unwrap();
    typed_line(&mut serial, "Hello, World! <a@b.c>\t~ok").await;
    // SendKeys: combos, shift held with the key, Enter as `ret`.
    vm.send_keys(
        &["shift-m", "a", "q", "e", "t", "shift-1", "tab", "x", "ret"],
        0,
    )
    .await
    .unwrap();
    typed_line(&mut serial, "Maqet!\tx").await;

    // The VGA console shows the banner and the typed lines: more than one colour.
    let fd = vm.screendump().await.unwrap();
    let mut png_bytes = Vec::new();
    std::fs::File::from(std::os::fd::OwnedFd::from(fd))
        .read_to_end(&mut png_bytes)
        .unwrap();
    let seen = colours(&png_bytes);
    assert!(seen.len() > 1, "a blank screen: only {seen:?}");

    // `maqet console` (the CLI, stdin a pipe) reaches the guest's root shell on ttyS0.
    serial.detach().await; // one console client at a time
    let mut cli = bus
        .maqet_command(&["console", "linux"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let err = ByteStream::new(cli.stderr.take().unwrap());
    let out = ByteStream::new(cli.stdout.take().unwrap());
    err.wait_for("Ctrl-] detaches");
    let mut stdin = cli.stdin.take().unwrap();
    // The shell expands the arithmetic: the answer proves a shell ran it, not an echo.
    stdin
        .write_all(b"echo guest-says-$((6*7)) $(cat /proc/sys/kernel/hostname)\n")
        .unwrap();
    stdin.flush().unwrap();
    out.wait_for("guest-says-42 maqet-guest");
    drop(stdin); // end of input detaches
    assert!(cli.wait().unwrap().success());

    // Stop: ACPI power-down, answered by the guest's acpid; no quit, no signal.
    let mut serial = Serial::attach(&vm).await;
    let (status, shown) = serial.run("pidof acpid").await;
    assert_eq!(status, 0, "acpid runs in the guest: {shown}");
    let mut watch = StatusWatch::new(&vm).await;
    vm.stop(false, 50).await.unwrap();
    let (_, previous, reason) = watch.until("stopped").await;
    assert_eq!(previous, "stopping");
    assert_eq!(
        reason, "guest powered off after an ACPI power-down request",
        "the guest powered itself off; no escalation"
    );
    assert_eq!(vm.status_reason().await.unwrap(), reason);
    assert_eq!(vm.exit_status().await.unwrap(), 0);
    let rest = serial.read_to_end().await;
    assert!(rest.contains(ACPI_POWEROFF), "{rest}");
    let qemu_log = std::fs::read_to_string(
        bus.root()
            .join("state/maqet/logs")
            .join(format!("{}.log", vm.id().await.unwrap())),
    )
    .unwrap_or_default();
    assert!(
        !qemu_log.contains("terminating on signal"),
        "QEMU was not signalled: {qemu_log}"
    );
}

/// A guest without a power-button handler ignores ACPI: `Stop` escalates to QMP `quit`
/// after its timeout, as docs/lifecycle.md says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_guest_that_ignores_the_power_button_is_quit_after_the_timeout() {
    let Some(image) = linux_guest::image() else {
        return;
    };
    let bus = Bus::start();
    let conn = bus.conn().await;
    // On the same boot, the guest's side of issue 12's agent and network: a NIC the
    // guest configures, and qemu-ga on a guest-agent port (here a channel of the config's
    // own, on a socket of the test's).
    let agent_socket = bus.root().join("qga.sock");
    let agent_args = [
        "device: {virtio-serial-pci: null, id: vser0}".to_string(),
        format!(
            "chardev: {{socket: null, id: qga0, path: {}, server: 'on', wait: 'off'}}",
            agent_socket.display()
        ),
        "device: {virtserialport: null, chardev: qga0, name: org.qemu.guest_agent.0}".into(),
    ];
    let arguments: Vec<&str> = USER_NET
        .iter()
        .copied()
        .chain(agent_args.iter().map(String::as_str))
        .collect();
    let setup = Setup {
        append: NO_ACPI,
        arguments: &arguments,
        ..Setup::default()
    };
    let (vm, mut serial) = linux_guest::boot(&bus, &conn, "deaf-linux", image, &setup).await;
    let log = String::from_utf8_lossy(&serial.log).into_owned();
    assert!(log.contains("MAQET-GUEST-ACPI off"), "{log}");
    let (status, shown) = serial.run("pidof acpid").await;
    assert_eq!(status, 1, "no acpid in this guest: {shown}");
    assert!(log.contains("MAQET-GUEST-NET eth0 10.0.2.15/24"), "{log}");
    assert!(log.contains("MAQET-GUEST-AGENT started"), "{log}");
    let mut agent = Agent::connect(&agent_socket);
    let os = agent.call(r#"{"execute": "guest-get-osinfo"}"#);
    assert_eq!(os["return"]["id"], "maqet-test-guest", "{os}");
    let nics = agent.call(r#"{"execute": "guest-network-get-interfaces"}"#);
    assert!(nics.to_string().contains("\"10.0.2.15\""), "{nics}");
    drop(agent);
    let mut watch = StatusWatch::new(&vm).await;
    let t = std::time::Instant::now();
    vm.stop(false, 2).await.unwrap();
    let (_, _, reason) = watch.until("stopped").await;
    assert_eq!(reason, "stopped by request (QMP quit)");
    assert!(t.elapsed().as_secs_f64() >= 2.0, "the guest had its 2 s");
    let rest = serial.read_to_end().await;
    assert!(!rest.contains(ACPI_POWEROFF), "{rest}");
}
