//! Property-based fuzzing of the two parsers that take untrusted bytes: the VM config
//! loader (YAML from any D-Bus caller) and the QMP reader (whatever QEMU writes).
//! Bounded: a fixed number of cases per property, run by the normal test command.
//! The property in both: no panic, and a clean answer (a value or a typed error).

use std::path::{Path, PathBuf};
use std::time::Duration;

use maqet::config::{self, ConfigSource, PathUse, ValidationContext};
use maqet::qmp::QmpClient;
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

fn load(text: &str) -> Result<String, String> {
    let check = |p: &Path, _: PathUse| Ok(p.to_path_buf());
    let ctx = ValidationContext {
        home: Path::new("/home/u"),
        path_env: Some(std::ffi::OsStr::new("/usr/bin:/bin")),
        default_arch: "x86_64",
        check_path: &check,
        vm_data_dir: None,
        probe_format: None,
    };
    let src = ConfigSource {
        origin: "<fuzz>".into(),
        text: text.into(),
        base_dir: PathBuf::from("/tmp"),
    };
    config::load(std::slice::from_ref(&src), &ctx)
        .map(|c| c.to_yaml())
        .map_err(|e| e.to_string())
}

/// YAML built from maqet's own vocabulary, so the fuzzer reaches deep into validation
/// instead of stopping at the first unknown key.
fn yamlish() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "name",
        "binary",
        "memory",
        "cpu",
        "display",
        "vga",
        "args",
        "arguments",
        "storage",
        "m",
        "smp",
        "device",
        "drive",
        "netdev",
        "id",
        "file",
        "path",
        "type",
        "size",
        "interface",
        "options",
        "backing_file",
        "uuid",
        "daemonize",
        "kernel",
        "blockdev",
        "qcow2",
        "raw",
        "virtfs",
        "virtio-rng-pci",
        "readonly",
        "mount_tag",
        "x",
    ]);
    let scalar = prop_oneof![
        Just("null".to_string()),
        Just("~".to_string()),
        Just("true".to_string()),
        Just("on".to_string()),
        "-?[0-9]{1,20}(\\.[0-9]{1,3})?[KMGTkmgt]?(i?B)?",
        "[a-z0-9_./~-]{0,12}",
        "\"[^\"\\\\]{0,10}\"",
        Just("'it''s'".to_string()),
        Just("&a x".to_string()),
        Just("*a".to_string()),
        Just("!!binary aGk=".to_string()),
    ];
    let leaf = scalar.prop_map(|s| s);
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5)
                .prop_map(|items| format!("[{}]", items.join(", "))),
            prop::collection::vec((key.clone(), inner), 0..5).prop_map(|kv| {
                let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
                format!("{{{}}}", body.join(", "))
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn config_loader_never_panics_on_bytes(text in "(?s).{0,200}") {
        let _ = load(&text);
    }

    #[test]
    fn config_loader_never_panics_on_yaml_shapes(doc in yamlish()) {
        // A document that loads must round-trip through its stored form.
        if let Ok(stored) = load(&doc) {
            prop_assert_eq!(load(&stored), Ok(stored.clone()));
        }
    }

    #[test]
    fn config_loader_never_panics_on_block_yaml(lines in prop::collection::vec("( {0,4})([a-z_]{1,8}: ?|- )([a-z0-9 :\\[\\]{},\"'-]{0,12})", 0..12)) {
        let _ = load(&lines.join("\n"));
    }
}

/// Runs the QMP client against a peer that sends `script` (after a valid greeting
/// when `greet`), while the client issues one command: nothing may panic or hang.
async fn qmp_session(greet: bool, script: Vec<u8>) {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
    let peer = tokio::spawn(async move {
        if greet {
            let _ = server_end
                .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": []}}\r\n{\"return\": {}}\r\n")
                .await;
        }
        let _ = server_end.write_all(&script).await;
        // Keep the stream open briefly so the client's command is pending while the
        // bytes are read, then hang up (EOF must fail the command, not hang it).
        drop(server_end);
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    match tokio::time::timeout(Duration::from_secs(5), QmpClient::connect(client_end, tx)).await {
        Ok(Ok((client, _))) => {
            let r =
                tokio::time::timeout(Duration::from_secs(5), client.execute("query-status", None))
                    .await;
            assert!(r.is_ok(), "a command hung after the peer hung up");
        }
        Ok(Err(_)) => {}
        Err(_) => panic!("connect hung after the peer hung up"),
    }
    let _ = peer.await;
    let _ = drain.await;
}

fn qmp_lines() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        Just(b"{\"return\": {}, \"id\": 1}".to_vec()),
        Just(b"{\"return\": {\"status\": \"running\"}, \"id\": 0}".to_vec()),
        Just(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}, \"id\": 1}".to_vec()),
        Just(
            b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}".to_vec()
        ),
        Just(b"{\"event\": 5, \"timestamp\": \"soon\"}".to_vec()),
        Just(b"{\"id\": \"x\"}".to_vec()),
        Just(b"[1,2,3]".to_vec()),
        Just(b"{\"QMP\": {}}".to_vec()),
        prop::collection::vec(any::<u8>(), 0..80),
    ];
    prop::collection::vec(line, 0..8).prop_map(|lines| {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(&l);
            out.extend_from_slice(b"\r\n");
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn qmp_reader_survives_any_stream(greet in any::<bool>(), script in qmp_lines()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(qmp_session(greet, script));
    }

    #[test]
    fn qmp_reader_survives_raw_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(qmp_session(false, bytes));
    }
}
