//! The client against a scripted fake agent on an in-memory stream: resynchronisation,
//! stale replies, garbage, over-long replies, timeouts, EOF, and the typed commands.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

use super::super::{AgentClient, AgentError, Limits};
use super::*;

const SHORT: Duration = Duration::from_millis(300);

/// What the fake agent answers to one request: raw bytes to write (possibly nothing).
type Script = Box<dyn FnMut(&str, &Value) -> Vec<u8> + Send>;

/// The fake agent's record of what it received.
#[derive(Default)]
struct Seen {
    commands: Vec<String>,
    resets: usize,
}

/// Starts a fake agent that answers `guest-sync-delimited` properly unless `script`
/// returns something for it, and every other request as `script` says.
fn fake(mut script: Script) -> (AgentClient, Arc<Mutex<Seen>>) {
    fake_with(Limits::default(), move |c, a| script(c, a))
}

fn fake_with(
    limits: Limits,
    mut script: impl FnMut(&str, &Value) -> Vec<u8> + Send + 'static,
) -> (AgentClient, Arc<Mutex<Seen>>) {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(serve(guest, seen.clone(), move |c, a| script(c, a)));
    (AgentClient::new(host, limits), seen)
}

async fn serve(
    guest: DuplexStream,
    seen: Arc<Mutex<Seen>>,
    mut script: impl FnMut(&str, &Value) -> Vec<u8>,
) {
    let (reader, mut writer) = tokio::io::split(guest);
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
            return;
        }
        // 0xFF resets the agent's parser: whatever came before it is dropped.
        let text = match line.iter().rposition(|&b| b == 0xFF) {
            Some(at) => {
                seen.lock().unwrap().resets += 1;
                &line[at + 1..]
            }
            None => &line[..],
        };
        let Ok(request) = serde_json::from_slice::<Value>(text) else {
            continue;
        };
        let command = request["execute"].as_str().unwrap_or_default().to_owned();
        let args = request.get("arguments").cloned().unwrap_or(Value::Null);
        seen.lock().unwrap().commands.push(command.clone());
        let mut reply = script(&command, &args);
        if reply.is_empty() && command == "guest-sync-delimited" {
            reply = sync_reply(&args);
        }
        if writer.write_all(&reply).await.is_err() {
            return;
        }
    }
}

fn sync_reply(args: &Value) -> Vec<u8> {
    let mut out = vec![0xFF];
    out.extend(format!("{{\"return\": {}}}\n", args["id"]).bytes());
    out
}

fn ok(value: Value) -> Vec<u8> {
    format!("{}\n", json!({ "return": value })).into_bytes()
}

fn count(seen: &Mutex<Seen>, command: &str) -> usize {
    seen.lock()
        .unwrap()
        .commands
        .iter()
        .filter(|c| *c == command)
        .count()
}

#[tokio::test]
async fn first_call_synchronises_then_stays_in_step() {
    let (agent, seen) = fake(Box::new(|c, _| match c {
        "guest-ping" => ok(json!({})),
        _ => vec![],
    }));
    agent.ping().await.unwrap();
    agent.ping().await.unwrap();
    assert_eq!(count(&seen, "guest-sync-delimited"), 1);
    assert_eq!(count(&seen, "guest-ping"), 2);
    assert_eq!(
        seen.lock().unwrap().resets,
        1,
        "the sync is preceded by 0xFF"
    );
}

#[tokio::test]
async fn stale_replies_garbage_and_old_syncs_before_the_sync_reply_are_skipped() {
    let (agent, _) = fake(Box::new(|c, a| match c {
        "guest-sync-delimited" => {
            let mut out = b"{\"return\": {}}\nnot json\n\x00\x01".to_vec();
            out.extend(b"\xff{\"return\": 12345}\n\xffgarbage\n");
            out.extend(sync_reply(a));
            out
        }
        "guest-ping" => ok(json!({})),
        _ => vec![],
    }));
    agent.ping().await.unwrap();
}

#[tokio::test]
async fn a_missing_reply_times_out_and_the_late_reply_is_not_taken_for_the_next() {
    let late = Arc::new(Mutex::new(false));
    let l = late.clone();
    let (agent, seen) = fake(Box::new(move |c, a| match c {
        "guest-info" => {
            *l.lock().unwrap() = true;
            vec![]
        }
        // The late answer to guest-info arrives only now, before the sync's reply.
        "guest-sync-delimited" if *l.lock().unwrap() => {
            let mut out = ok(json!({"version": "stale"}));
            out.extend(sync_reply(a));
            out
        }
        "guest-get-host-name" => ok(json!({"host-name": "fresh"})),
        _ => vec![],
    }));
    let err = agent.execute("guest-info", None, SHORT).await.unwrap_err();
    assert!(matches!(err, AgentError::Timeout(_)), "{err:?}");
    let reply = agent
        .execute("guest-get-host-name", None, SHORT)
        .await
        .unwrap();
    assert_eq!(reply["host-name"], "fresh", "the reply to this request");
    assert_eq!(count(&seen, "guest-sync-delimited"), 2, "resynchronised");
}

#[tokio::test]
async fn garbage_is_a_protocol_error_and_the_next_call_resynchronises() {
    let n = Arc::new(Mutex::new(0));
    let m = n.clone();
    let (agent, seen) = fake(Box::new(move |c, _| match c {
        "guest-ping" => {
            let mut n = m.lock().unwrap();
            *n += 1;
            if *n == 1 {
                b"\x00\x01{{{ not json\n".to_vec()
            } else {
                ok(json!({}))
            }
        }
        _ => vec![],
    }));
    let err = agent.ping().await.unwrap_err();
    assert!(matches!(err, AgentError::Protocol(_)), "{err:?}");
    agent.ping().await.unwrap();
    assert_eq!(count(&seen, "guest-sync-delimited"), 2);
}

#[tokio::test]
async fn non_object_and_unknown_replies_are_protocol_errors() {
    for reply in ["[1,2]\n", "42\n", "{\"hello\": 1}\n", "\"x\"\n"] {
        let (agent, _) = fake(Box::new(move |c, _| match c {
            "guest-ping" => reply.as_bytes().to_vec(),
            _ => vec![],
        }));
        let err = agent.ping().await.unwrap_err();
        assert!(matches!(err, AgentError::Protocol(_)), "{reply}: {err:?}");
    }
}

#[tokio::test]
async fn an_over_long_reply_is_refused_and_the_stream_recovers() {
    let n = Arc::new(Mutex::new(0));
    let m = n.clone();
    let (agent, _) = fake_with(Limits { max_reply: 1000 }, move |c, _| match c {
        "guest-ping" => {
            let mut n = m.lock().unwrap();
            *n += 1;
            if *n == 1 {
                ok(json!({ "junk": "x".repeat(5000) }))
            } else {
                ok(json!({}))
            }
        }
        _ => vec![],
    });
    let err = agent.ping().await.unwrap_err();
    assert!(matches!(err, AgentError::TooLarge(1000)), "{err:?}");
    agent.ping().await.unwrap();
}

#[tokio::test]
async fn a_refusal_carries_the_guests_words_and_keeps_the_stream_in_step() {
    let (agent, seen) = fake(Box::new(|c, _| match c {
        "guest-file-open" => {
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"No such file\"}}\n".to_vec()
        }
        "guest-ping" => ok(json!({})),
        _ => vec![],
    }));
    let err = agent.read_file("/nope", 10).await.unwrap_err();
    match err {
        AgentError::Command { command, desc, .. } => {
            assert_eq!(command, "guest-file-open");
            assert_eq!(desc, "No such file");
        }
        other => panic!("{other:?}"),
    }
    agent.ping().await.unwrap();
    assert_eq!(count(&seen, "guest-sync-delimited"), 1);
}

#[tokio::test]
async fn eof_is_disconnected_for_this_and_every_later_call() {
    let (agent, _) = fake(Box::new(|c, _| match c {
        "guest-ping" => panic!("the fake agent goes away"),
        _ => vec![],
    }));
    let err = agent.ping().await.unwrap_err();
    assert!(matches!(err, AgentError::Disconnected), "{err:?}");
    assert!(agent.is_closed().await);
    let err = agent.sync(SHORT).await.unwrap_err();
    assert!(matches!(err, AgentError::Disconnected), "{err:?}");
}

#[tokio::test]
async fn no_agent_at_all_is_a_timeout_on_sync() {
    let (host, _guest) = tokio::io::duplex(1024);
    let agent = AgentClient::new(host, Limits::default());
    let err = agent.sync(SHORT).await.unwrap_err();
    assert!(matches!(err, AgentError::Timeout(_)), "{err:?}");
}

#[tokio::test]
async fn exec_polls_status_and_decodes_output_and_exit_code() {
    let polls = Arc::new(Mutex::new(0));
    let p = polls.clone();
    let (agent, _) = fake(Box::new(move |c, a| match c {
        "guest-exec" => {
            assert_eq!(a["path"], "sh");
            assert_eq!(a["arg"], json!(["-c", "x"]));
            assert_eq!(a["capture-output"], true);
            assert_eq!(a["input-data"], "aW4=");
            ok(json!({"pid": 7}))
        }
        "guest-exec-status" => {
            assert_eq!(a["pid"], 7);
            let mut n = p.lock().unwrap();
            *n += 1;
            if *n < 3 {
                ok(json!({"exited": false}))
            } else {
                ok(
                    json!({"exited": true, "exitcode": 3, "out-data": "b3V0Cg==", "err-data": "ZXJyCg=="}),
                )
            }
        }
        _ => vec![],
    }));
    let argv = ["sh", "-c", "x"].map(String::from);
    let out = agent
        .exec(&argv, b"in", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 3);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(*polls.lock().unwrap(), 3);
}

#[tokio::test]
async fn exec_reports_signals_like_a_shell_and_refuses_bad_base64() {
    let (agent, _) = fake(Box::new(|c, a| match c {
        "guest-exec" => ok(json!({"pid": 1})),
        "guest-exec-status" if a["pid"] == 1 => ok(json!({"exited": true, "signal": 9})),
        _ => vec![],
    }));
    let argv = ["x".to_owned()];
    let out = agent
        .exec(&argv, b"", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 137);

    let (agent, _) = fake(Box::new(|c, _| match c {
        "guest-exec" => ok(json!({"pid": 1})),
        "guest-exec-status" => ok(json!({"exited": true, "exitcode": 0, "out-data": "!!"})),
        _ => vec![],
    }));
    let err = agent
        .exec(&argv, b"", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Protocol(_)), "{err:?}");
    let err = agent
        .exec(&[], b"", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn exec_that_never_finishes_times_out() {
    let (agent, _) = fake(Box::new(|c, _| match c {
        "guest-exec" => ok(json!({"pid": 1})),
        "guest-exec-status" => ok(json!({"exited": false})),
        _ => vec![],
    }));
    let err = agent
        .exec(&["sleep".to_owned()], b"", SHORT)
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Timeout(_)), "{err:?}");
}

/// A fake guest file system of one file, read in chunks.
fn file_agent(content: Vec<u8>) -> impl FnMut(&str, &Value) -> Vec<u8> + Send + 'static {
    let mut offset = 0usize;
    move |c, a| match c {
        "guest-file-open" => ok(json!(42)),
        "guest-file-read" => {
            let count = a["count"].as_u64().unwrap() as usize;
            let end = (offset + count).min(content.len());
            let chunk = &content[offset..end];
            offset = end;
            ok(
                json!({"count": chunk.len(), "buf-b64": base64::encode(chunk), "eof": end == content.len()}),
            )
        }
        "guest-file-close" => {
            assert_eq!(a["handle"], 42);
            ok(json!({}))
        }
        _ => vec![],
    }
}

#[tokio::test]
async fn read_file_reads_every_chunk_and_closes() {
    let content: Vec<u8> = (0..3 * FILE_CHUNK + 5).map(|i| i as u8).collect();
    let (agent, seen) = fake_with(Limits::default(), file_agent(content.clone()));
    let data = agent.read_file("/f", u64::MAX).await.unwrap();
    assert_eq!(data, content);
    assert_eq!(count(&seen, "guest-file-close"), 1);
}

#[tokio::test]
async fn read_file_past_max_is_an_error_not_a_truncation_and_still_closes() {
    let (agent, seen) = fake_with(Limits::default(), file_agent(vec![b'x'; 11]));
    let err = agent.read_file("/f", 10).await.unwrap_err();
    assert!(
        matches!(&err, AgentError::Command { desc, .. } if desc.contains("larger than 10")),
        "{err:?}"
    );
    assert_eq!(count(&seen, "guest-file-close"), 1);
    let (agent, _) = fake_with(Limits::default(), file_agent(vec![b'x'; 10]));
    assert_eq!(agent.read_file("/f", 10).await.unwrap().len(), 10);
}

#[tokio::test]
async fn write_file_sends_chunks_flushes_and_closes() {
    let written = Arc::new(Mutex::new(Vec::new()));
    let w = written.clone();
    let (agent, seen) = fake(Box::new(move |c, a| match c {
        "guest-file-open" => {
            assert_eq!(a["mode"], "w");
            ok(json!(5))
        }
        "guest-file-write" => {
            let bytes = base64::decode(a["buf-b64"].as_str().unwrap()).unwrap();
            w.lock().unwrap().extend_from_slice(&bytes);
            ok(json!({"count": bytes.len(), "eof": false}))
        }
        "guest-file-flush" | "guest-file-close" => ok(json!({})),
        _ => vec![],
    }));
    let data: Vec<u8> = (0..FILE_CHUNK + 3).map(|i| (i * 7) as u8).collect();
    agent.write_file("/f", &data).await.unwrap();
    assert_eq!(*written.lock().unwrap(), data);
    assert_eq!(count(&seen, "guest-file-write"), 2);
    assert_eq!(count(&seen, "guest-file-flush"), 1);
    assert_eq!(count(&seen, "guest-file-close"), 1);
}

#[tokio::test]
async fn addresses_skip_loopback_and_junk() {
    let (agent, _) = fake(Box::new(|c, _| match c {
        "guest-network-get-interfaces" => ok(json!([
            {"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
            {"name": "eth0", "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24},
                {"ip-address-type": "ipv6", "ip-address": "fec0::5054:ff:fe12:3456", "prefix": 64},
                {"ip-address": "not an address"},
                {"ip-address": 17},
            ]},
            {"name": "eth1"},
            "junk",
        ])),
        _ => vec![],
    }));
    let addrs = agent.addresses().await.unwrap();
    let got: Vec<_> = addrs
        .iter()
        .map(|a| (a.interface.as_str(), a.family.as_str(), a.address.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("eth0", "ipv4", "10.0.2.15"),
            ("eth0", "ipv6", "fec0::5054:ff:fe12:3456")
        ]
    );
}

#[tokio::test]
async fn guest_info_tolerates_agents_without_osinfo() {
    let (agent, _) = fake(Box::new(|c, _| match c {
        "guest-info" => ok(json!({"version": "7.2.0"})),
        "guest-get-osinfo" => {
            b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no\"}}\n".to_vec()
        }
        "guest-get-host-name" => ok(json!({"host-name": "box"})),
        _ => vec![],
    }));
    let info = agent.guest_info().await.unwrap();
    assert_eq!(info.agent_version, "7.2.0");
    assert_eq!(info.hostname, "box");
    assert_eq!(info.os_name, "");
}

#[tokio::test]
async fn shutdown_expects_no_reply_and_the_next_call_resynchronises() {
    let (agent, seen) = fake(Box::new(|c, _| match c {
        "guest-ping" => ok(json!({})),
        _ => vec![],
    }));
    agent.shutdown().await.unwrap();
    agent.ping().await.unwrap();
    assert_eq!(count(&seen, "guest-shutdown"), 1);
    assert_eq!(count(&seen, "guest-sync-delimited"), 2);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever bytes the guest sends, calls end in a value or an error, never a panic.
        #[test]
        fn arbitrary_replies_never_panic(reply in proptest::collection::vec(any::<u8>(), 0..300)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut reply = reply;
                reply.push(b'\n');
                let (agent, _) = fake(Box::new(move |c, _| match c {
                    "guest-sync-delimited" => vec![],
                    _ => reply.clone(),
                }));
                let _ = agent.guest_info().await;
                let _ = tokio::time::timeout(Duration::from_secs(2), agent.exec(&["x".to_owned()], b"", Duration::from_millis(50))).await;
                let _ = agent.addresses().await;
            });
        }
    }
}
