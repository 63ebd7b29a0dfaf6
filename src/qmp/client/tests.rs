//! Client tests: a scripted fake QEMU over `tokio::io::duplex`, plus one real QEMU.

use super::*;
use serde_json::json;
use std::future::Future;
use tokio::io::{AsyncBufReadExt, DuplexStream, ReadHalf, WriteHalf};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "test-pkg"}, "capabilities": ["oob"]}}"#;

/// Generous bound so a broken test fails instead of hanging; never reached when green.
const LIMIT: Duration = Duration::from_secs(10);

async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(LIMIT, future)
        .await
        .expect("test step timed out")
}

/// The QEMU side of a duplex pipe: reads requests, writes canned bytes.
struct FakeQemu {
    reader: BufReader<ReadHalf<DuplexStream>>,
    writer: WriteHalf<DuplexStream>,
}

impl FakeQemu {
    fn new(stream: DuplexStream) -> Self {
        let (reader, writer) = tokio::io::split(stream);
        FakeQemu {
            reader: BufReader::new(reader),
            writer,
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, json: &str) {
        self.send_raw(format!("{json}\r\n").as_bytes()).await;
    }

    /// The next request; asserts it is one `\r\n`-terminated JSON object.
    async fn request(&mut self) -> Value {
        let mut line = String::new();
        within(self.reader.read_line(&mut line)).await.unwrap();
        assert!(
            line.ends_with("\r\n"),
            "request not CRLF-terminated: {line:?}"
        );
        let value: Value = serde_json::from_str(&line).unwrap();
        assert!(value.is_object(), "{value}");
        value
    }

    async fn reply(&mut self, request: &Value, value: Value) {
        let reply = json!({"return": value, "id": request["id"]});
        self.send(&reply.to_string()).await;
    }

    async fn handshake(&mut self) {
        self.send(GREETING).await;
        assert_eq!(self.request().await, json!({"execute": "qmp_capabilities"}));
        self.send(r#"{"return": {}}"#).await;
    }

    /// Whether the client closed its side.
    async fn at_eof(&mut self) -> bool {
        let mut line = String::new();
        within(self.reader.read_line(&mut line)).await.unwrap() == 0
    }
}

fn pipe() -> (DuplexStream, FakeQemu) {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    (ours, FakeQemu::new(theirs))
}

async fn connected_with_limit(
    max_line: usize,
) -> (QmpClient, mpsc::UnboundedReceiver<QmpEvent>, FakeQemu) {
    let (ours, mut fake) = pipe();
    let (events, events_rx) = mpsc::unbounded_channel();
    let (connected, ()) = within(async {
        tokio::join!(
            QmpClient::connect_with_limit(ours, events, max_line, None),
            fake.handshake()
        )
    })
    .await;
    let (client, greeting) = connected.unwrap();
    assert_eq!(greeting.version, "7.2.22");
    (client, events_rx, fake)
}

async fn connected() -> (QmpClient, mpsc::UnboundedReceiver<QmpEvent>, FakeQemu) {
    connected_with_limit(wire::MAX_LINE_BYTES).await
}

/// Connects with `script` playing QEMU, returning what `connect` returned.
async fn connect_against(
    script: impl AsyncFnOnce(&mut FakeQemu),
) -> Result<(QmpClient, Greeting), QmpError> {
    let (ours, mut fake) = pipe();
    let (events, _events_rx) = mpsc::unbounded_channel();
    let (connected, ()) = within(async {
        tokio::join!(QmpClient::connect(ours, events), async {
            script(&mut fake).await;
            drop(fake);
        })
    })
    .await;
    connected
}

#[tokio::test]
async fn greeting_and_capabilities() {
    let (ours, mut fake) = pipe();
    let (events, _events_rx) = mpsc::unbounded_channel();
    let (connected, ()) =
        within(async { tokio::join!(QmpClient::connect(ours, events), fake.handshake()) }).await;
    let (client, greeting) = connected.unwrap();
    assert_eq!(greeting.version, "7.2.22");
    assert_eq!(greeting.package, "test-pkg");
    assert_eq!(greeting.capabilities, ["oob"]);
    assert_eq!(
        greeting.raw,
        serde_json::from_str::<Value>(GREETING).unwrap()
    );
    assert!(client.is_connected());
}

#[tokio::test]
async fn capabilities_error_fails_connect() {
    let result = connect_against(async |fake| {
        fake.send(GREETING).await;
        fake.request().await;
        fake.send(r#"{"error": {"class": "CommandNotFound", "desc": "nope"}}"#)
            .await;
    })
    .await;
    match result {
        Err(QmpError::Command { class, desc }) => {
            assert_eq!((class.as_str(), desc.as_str()), ("CommandNotFound", "nope"));
        }
        other => panic!("expected a command error, got {other:?}"),
    }
}

#[tokio::test]
async fn eof_before_greeting_is_disconnected() {
    let result = connect_against(async |_| {}).await;
    assert!(matches!(result, Err(QmpError::Disconnected)), "{result:?}");
}

#[tokio::test]
async fn eof_after_greeting_is_disconnected() {
    let result = connect_against(async |fake| fake.send(GREETING).await).await;
    assert!(matches!(result, Err(QmpError::Disconnected)), "{result:?}");
}

#[tokio::test]
async fn first_message_must_be_a_greeting() {
    for first in [r#"{"return": {}}"#, "this is not QMP", "[1, 2, 3]"] {
        let result = connect_against(async |fake| fake.send(first).await).await;
        match result {
            Err(QmpError::Protocol(message)) => {
                assert!(message.contains(first), "{message} should quote {first}");
            }
            other => panic!("{first}: expected a protocol error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn concurrent_commands_get_their_own_out_of_order_replies() {
    let (client, _events, mut fake) = connected().await;
    let calls: Vec<_> = ["alpha", "beta", "gamma"]
        .into_iter()
        .map(|name| {
            let client = client.clone();
            tokio::spawn(async move { (name, client.execute(name, None).await) })
        })
        .collect();
    let mut requests = Vec::new();
    for _ in 0..3 {
        requests.push(fake.request().await);
    }
    for request in requests.iter().rev() {
        fake.reply(request, json!({"for": request["execute"]}))
            .await;
    }
    for call in calls {
        let (name, result) = within(call).await.unwrap();
        assert_eq!(result.unwrap(), json!({"for": name}));
    }
    assert_eq!(client.pending_len(), 0);
}

/// A pipe too small for one message: callers write what fits, the writer task the rest,
/// and later commands queue behind it. Every request must still arrive whole and in
/// call order, and an abandoned call must not cut its message short.
#[tokio::test]
async fn messages_larger_than_the_pipe_arrive_whole_and_in_order() {
    let (ours, theirs) = tokio::io::duplex(64);
    let mut fake = FakeQemu::new(theirs);
    let (events, _events) = mpsc::unbounded_channel();
    let (connected, ()) =
        within(async { tokio::join!(QmpClient::connect(ours, events), fake.handshake()) }).await;
    let (client, _) = connected.unwrap();
    let big = "x".repeat(1000);
    let abandoned = tokio::time::timeout(
        Duration::from_millis(1),
        client.execute("abandoned", Some(json!({ "data": big }))),
    );
    assert!(abandoned.await.is_err(), "nothing answers yet");
    let calls = futures_util::future::join_all((0..20).map(|i| {
        let arguments = json!({ "n": i, "data": big });
        let client = client.clone();
        async move { client.execute("echo", Some(arguments)).await }
    }));
    let script = async {
        let first = fake.request().await;
        assert_eq!(first["execute"], "abandoned");
        assert_eq!(
            first["arguments"]["data"].as_str().map(str::len),
            Some(1000)
        );
        for i in 0..20 {
            let request = fake.request().await;
            assert_eq!(request["arguments"]["n"], i, "call order kept");
            assert_eq!(
                request["arguments"]["data"].as_str().map(str::len),
                Some(1000)
            );
            fake.reply(&request, request["arguments"]["n"].clone())
                .await;
        }
    };
    let (results, ()) = within(async { tokio::join!(calls, script) }).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), json!(i));
    }
}

#[tokio::test]
async fn events_interleaved_with_replies_arrive_in_order() {
    let (client, mut events, mut fake) = connected().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute("stop", None).await }
    });
    let request = fake.request().await;
    fake.send(r#"{"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 5}}"#)
        .await;
    fake.reply(&request, json!({})).await;
    fake.send(r#"{"timestamp": {"seconds": 2, "microseconds": 999999}, "event": "BLOCK_JOB_READY", "data": {"device": "d0"}}"#)
        .await;
    assert_eq!(within(call).await.unwrap().unwrap(), json!({}));
    fake.send(r#"{"event": "RESUME", "timestamp": {"seconds": 3, "microseconds": 0}}"#)
        .await;

    let expected = [
        ("STOP", json!({}), 1_700_000_000_000_005),
        ("BLOCK_JOB_READY", json!({"device": "d0"}), 2_999_999),
        ("RESUME", json!({}), 3_000_000),
    ];
    for (name, data, timestamp_us) in expected {
        let event = within(events.recv()).await.unwrap();
        assert_eq!(
            event,
            QmpEvent {
                name: name.into(),
                data,
                timestamp_us
            }
        );
    }
}

#[tokio::test]
async fn error_reply_is_a_command_error() {
    let (client, _events, mut fake) = connected().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute("device_del", Some(json!({"id": "x"}))).await }
    });
    let request = fake.request().await;
    assert_eq!(request["arguments"], json!({"id": "x"}));
    let reply = json!({"error": {"class": "GenericError", "desc": "Device 'x' not found"}, "id": request["id"]});
    fake.send(&reply.to_string()).await;
    let err = within(call).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, QmpError::Command { class, desc } if class == "GenericError" && desc == "Device 'x' not found"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "QMP error GenericError: Device 'x' not found"
    );
    assert!(client.is_connected());
}

#[tokio::test]
async fn eof_fails_pending_commands_and_closes_events() {
    let (client, mut events, mut fake) = connected().await;
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.execute("query-status", None).await })
        })
        .collect();
    fake.request().await;
    fake.request().await;
    fake.send(r#"{"event": "SHUTDOWN", "data": {"guest": false}, "timestamp": {"seconds": 1, "microseconds": 0}}"#)
        .await;
    drop(fake);
    for call in calls {
        let result = within(call).await.unwrap();
        assert!(matches!(result, Err(QmpError::Disconnected)), "{result:?}");
    }
    assert_eq!(within(events.recv()).await.unwrap().name, "SHUTDOWN");
    assert_eq!(within(events.recv()).await, None);
    assert!(!client.is_connected());
    assert_eq!(client.pending_len(), 0);
}

#[tokio::test]
async fn malformed_lines_are_skipped() {
    let (client, _events, mut fake) = connected().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute("query-status", None).await }
    });
    let request = fake.request().await;
    fake.send("this is not json").await;
    fake.send("[1, 2]").await;
    fake.send_raw(b"{\"return\": \"\xff\xfe\"}\r\n").await;
    fake.send("").await;
    fake.send(r#"{"return": "no id"}"#).await;
    fake.send(r#"{"return": "unknown id", "id": 999}"#).await;
    fake.send(r#"{"return": "foreign id", "id": "libvirt-1"}"#)
        .await;
    fake.send(GREETING).await;
    fake.reply(&request, json!({"status": "running"})).await;
    assert_eq!(
        within(call).await.unwrap().unwrap(),
        json!({"status": "running"})
    );

    // The connection is still fully usable.
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute("cont", None).await }
    });
    let request = fake.request().await;
    fake.reply(&request, json!({})).await;
    assert_eq!(within(call).await.unwrap().unwrap(), json!({}));
}

#[tokio::test]
async fn lf_only_framing_is_accepted() {
    let (ours, mut fake) = pipe();
    let (events, mut events_rx) = mpsc::unbounded_channel();
    let script = async {
        fake.send_raw(format!("{GREETING}\n").as_bytes()).await;
        fake.request().await;
        fake.send_raw(b"{\"return\": {}}\n").await;
    };
    let (connected, ()) =
        within(async { tokio::join!(QmpClient::connect(ours, events), script) }).await;
    let (client, greeting) = connected.unwrap();
    assert_eq!(greeting.capabilities, ["oob"]);

    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute("query-name", None).await }
    });
    let request = fake.request().await;
    let reply = json!({"return": {"name": "vm"}, "id": request["id"]});
    fake.send_raw(format!("{{\"event\": \"STOP\"}}\n{reply}\n").as_bytes())
        .await;
    assert_eq!(within(call).await.unwrap().unwrap(), json!({"name": "vm"}));
    assert_eq!(within(events_rx.recv()).await.unwrap().name, "STOP");
}

#[tokio::test]
async fn non_object_arguments_are_refused_without_sending() {
    let (client, _events, mut fake) = connected().await;
    for arguments in [json!([1]), json!("x"), json!(null), json!(3)] {
        let err = client.execute("x", Some(arguments)).await.unwrap_err();
        assert!(matches!(err, QmpError::InvalidArguments(_)), "{err:?}");
    }
    assert_eq!(client.pending_len(), 0);
    // The first thing on the wire is the next valid command.
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute("probe", Some(json!({"n": 1}))).await }
    });
    let request = fake.request().await;
    assert_eq!(request["execute"], "probe");
    assert_eq!(request["arguments"], json!({"n": 1}));
    fake.reply(&request, json!(1)).await;
    assert_eq!(within(call).await.unwrap().unwrap(), json!(1));
}

#[tokio::test]
async fn closed_resolves_on_eof() {
    let (client, _events, fake) = connected().await;
    assert!(client.is_connected());
    drop(fake);
    within(client.closed()).await;
    assert!(!client.is_connected());
    // Already closed: resolves at once, and commands fail without waiting.
    within(client.closed()).await;
    let result = client.execute("query-status", None).await;
    assert!(matches!(result, Err(QmpError::Disconnected)), "{result:?}");
}

#[tokio::test]
async fn cancelled_execute_leaves_no_pending_entry() {
    let (client, _events, mut fake) = connected().await;
    let request = {
        let call = client.execute("query-status", None);
        tokio::pin!(call);
        let request = tokio::select! {
            result = &mut call => panic!("no reply was sent, got {result:?}"),
            request = fake.request() => request,
        };
        assert_eq!(client.pending_len(), 1);
        request
    };
    assert_eq!(client.pending_len(), 0);
    // Its id stays taken until the late reply comes.
    assert_eq!(client.ids_in_use(), 1);

    // The late reply is ignored, and the connection goes on.
    fake.reply(&request, json!("late")).await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute("query-name", None).await }
    });
    let request = fake.request().await;
    fake.reply(&request, json!("on time")).await;
    assert_eq!(within(call).await.unwrap().unwrap(), json!("on time"));
    assert_eq!(client.ids_in_use(), 0);
}

/// QEMU 7.2 reads QMP input a byte at a time: no empty `arguments`, and the id of an
/// answered command is used again, so a command in a long-lived connection stays short.
#[tokio::test]
async fn commands_go_out_short_and_reuse_answered_ids() {
    let (client, _events, mut fake) = connected().await;
    for _ in 0..3 {
        let call = tokio::spawn({
            let client = client.clone();
            async move { client.execute("query-status", Some(json!({}))).await }
        });
        let request = fake.request().await;
        assert_eq!(request, json!({"execute": "query-status", "id": 0}));
        fake.reply(&request, json!({"status": "running"})).await;
        assert_eq!(within(call).await.unwrap().unwrap()["status"], "running");
    }
}

/// An abandoned command's id is not given to another command until its late reply has
/// come, so that reply can never be taken for the other command's.
#[tokio::test]
async fn an_abandoned_id_is_reused_only_after_its_late_reply() {
    let (client, _events, mut fake) = connected().await;
    let abandoned = {
        let call = client.execute("slow", None);
        tokio::pin!(call);
        tokio::select! {
            result = &mut call => panic!("no reply was sent, got {result:?}"),
            request = fake.request() => request,
        }
    };
    assert_eq!(abandoned["id"], 0);

    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute("next", None).await }
    });
    let next = fake.request().await;
    assert_eq!(next["id"], 1, "id 0 is still the abandoned command's");
    // The late reply comes first; it must not answer `next`.
    fake.reply(&abandoned, json!("late")).await;
    fake.reply(&next, json!("mine")).await;
    assert_eq!(within(call).await.unwrap().unwrap(), json!("mine"));

    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute("after", None).await }
    });
    let after = fake.request().await;
    assert_eq!(after["id"], 0, "free again once the late reply came");
    fake.reply(&after, json!({})).await;
    within(call).await.unwrap().unwrap();
    assert_eq!(client.ids_in_use(), 0);
}

#[tokio::test]
async fn execute_timeout_gives_up_and_forgets() {
    let (client, _events, mut fake) = connected().await;
    let timeout = Duration::from_millis(20);
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute_timeout("query-status", None, timeout).await }
    });
    fake.request().await;
    let result = within(call).await.unwrap();
    assert!(
        matches!(result, Err(QmpError::Timeout(t)) if t == timeout),
        "{result:?}"
    );
    assert_eq!(client.pending_len(), 0);
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection() {
    let (client, mut events, mut fake) = connected().await;
    let clone = client.clone();
    drop(client);
    assert!(clone.is_connected());
    drop(clone);
    assert!(fake.at_eof().await);
    assert_eq!(within(events.recv()).await, None);
}

#[tokio::test]
async fn oversized_line_closes_the_connection() {
    let (client, mut events, mut fake) = connected_with_limit(1024).await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.execute("query-status", None).await }
    });
    fake.request().await;
    fake.send_raw(&[b'x'; 2000]).await;
    let result = within(call).await.unwrap();
    assert!(matches!(result, Err(QmpError::Disconnected)), "{result:?}");
    assert_eq!(within(events.recv()).await, None);
    assert!(!client.is_connected());
}

/// Kills QEMU when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next event other than ones QEMU may emit on its own (e.g. `RTC_CHANGE`).
async fn next_event(events: &mut mpsc::UnboundedReceiver<QmpEvent>, name: &str) -> QmpEvent {
    loop {
        let event = within(events.recv())
            .await
            .unwrap_or_else(|| panic!("event channel closed while waiting for {name}"));
        if event.name == name {
            return event;
        }
        eprintln!("skipping unrelated event {event:?}");
    }
}

/// Against the real thing. We listen and QEMU connects (`-qmp unix:PATH`, client mode),
/// like maqetd's pre-created socket: nothing waits for a socket file to appear.
#[tokio::test]
async fn real_qemu_status_stop_cont_quit() {
    const QEMU: &str = "qemu-system-x86_64";
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("q.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let spawned = std::process::Command::new(QEMU)
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-accel",
            "tcg",
        ])
        .arg("-qmp")
        .arg(format!("unix:{}", socket.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn();
    let spawned = match spawned {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "{QEMU} is not installed (Debian: apt-get install qemu-system-x86, or scripts/setup-deps)"
        )),
        Err(err) => panic!("cannot start {QEMU}: {err}"),
        Ok(child) => Ok(child),
    };
    let Some(child) = crate::require::require(spawned) else {
        return;
    };
    let _qemu = KillOnDrop(child);
    let (stream, _) = within(listener.accept()).await.unwrap();

    let (events, mut events_rx) = mpsc::unbounded_channel();
    let (client, greeting) = within(QmpClient::connect(stream, events)).await.unwrap();
    assert!(
        greeting.version.starts_with(|c: char| c.is_ascii_digit()),
        "{greeting:?}"
    );

    let status = within(client.execute("query-status", None)).await.unwrap();
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["running"], true);

    within(client.execute("stop", None)).await.unwrap();
    let stop = next_event(&mut events_rx, "STOP").await;
    assert!(stop.timestamp_us > 1_600_000_000_000_000, "{stop:?}");
    let status = within(client.execute("query-status", None)).await.unwrap();
    assert_eq!(status["status"], "paused", "{status}");

    within(client.execute("cont", None)).await.unwrap();
    next_event(&mut events_rx, "RESUME").await;

    // QEMU may close the socket before or after its reply to `quit`.
    let quit = within(client.execute("quit", None)).await;
    assert!(
        matches!(quit, Ok(_) | Err(QmpError::Disconnected)),
        "{quit:?}"
    );
    let shutdown = next_event(&mut events_rx, "SHUTDOWN").await;
    assert_eq!(shutdown.data["guest"], false, "{shutdown:?}");
    while let Some(event) = within(events_rx.recv()).await {
        eprintln!("event after SHUTDOWN: {event:?}");
    }
    within(client.closed()).await;
    assert!(!client.is_connected());
}

/// The log of a test, as text.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_flood_of_stray_replies_is_logged_at_a_bounded_rate() {
    let log = LogBuf::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // Current-thread runtime: the client's tasks log through this default.
    let _guard = tracing::subscriber::set_default(subscriber);
    let (client, _events, mut fake) = connected().await;
    // What QEMU does after its JSON parser gives up on a huge command: an error per
    // leftover token, none with an id.
    let stray =
        r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#;
    for _ in 0..2000 {
        fake.send(stray).await;
    }
    let (reply, ()) = within(async {
        tokio::join!(client.execute("query-status", None), async {
            let req = fake.request().await;
            fake.reply(&req, json!({"status": "running"})).await;
        })
    })
    .await;
    assert_eq!(reply.unwrap()["status"], "running");
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines = text.matches("QMP reply without id ignored").count();
    assert_eq!(lines as u32, crate::log_limit::BURST, "{text}");
}
