//! Control-channel frames are byte-compatible with RedPepper (redpepper-common 0.3.4).
//!
//! `CASES` holds frames captured from RedPepper's own definitions with
//! `protocol/tests/redpepper_reference.py`; the live test regenerates them with that script in
//! the virtualenv of `e2e/scripts/setup.sh` and compares again, so a change on either side shows.

use std::collections::BTreeMap;

use nanogate_protocol::control::{FrameDecoder, Message, decode_body, encode};
use rmpv::Value;

fn cases() -> Vec<(&'static str, Message, &'static str)> {
    let map = |pairs: Vec<(&str, Value)>| {
        Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Value::from(k), v))
                .collect(),
        )
    };
    vec![
        (
            "agent_hello",
            Message::AgentHello {
                id: "0b6c1f3e-uid".into(),
                version: "0.1.0".into(),
                credentials: "eyJhbGciOi.token".into(),
            },
            "0000003f84a1740aa26964ac30623663316633652d756964a776657273696f6ea5302e312e30ab63726564656e7469616c73b065794a68624763694f692e746f6b656e",
        ),
        (
            "manager_hello",
            Message::ManagerHello {
                version: "0.1.0".into(),
            },
            "0000001282a1740ba776657273696f6ea5302e312e30",
        ),
        (
            "ping",
            Message::Ping { data: 123_456 },
            "0000000e82a1740ca464617461ce0001e240",
        ),
        (
            "ping_small",
            Message::Ping { data: 7 },
            "0000000a82a1740ca46461746107",
        ),
        (
            "pong",
            Message::Pong { data: 123_456 },
            "0000000e82a1740da464617461ce0001e240",
        ),
        (
            "bye",
            Message::Bye {
                reason: "authentication failed".into(),
            },
            "0000002182a1740ea6726561736f6eb561757468656e7469636174696f6e206661696c6564",
        ),
        (
            "request",
            Message::Request {
                id: "r1".into(),
                method: "reload".into(),
                args: vec!["now".into()],
                kwargs: vec![("generation".into(), Value::from(3))],
            },
            "0000003685a17414a26964a27231a66d6574686f64a672656c6f6164a46172677391a36e6f77a66b776172677381aa67656e65726174696f6e03",
        ),
        (
            "response_ok",
            Message::Response {
                id: "r1".into(),
                success: true,
                data: map(vec![("generation", Value::from(3))]),
            },
            "0000002584a17415a26964a27231a773756363657373c3a46461746181aa67656e65726174696f6e03",
        ),
        (
            "response_err",
            Message::Response {
                id: "r2".into(),
                success: false,
                data: Value::from("spec.batching.maxBatchSize: must be >= 1"),
            },
            "0000004284a17415a26964a27232a773756363657373c2a464617461d928737065632e6261746368696e672e6d6178426174636853697a653a206d757374206265203e3d2031",
        ),
        (
            "notification",
            Message::Notification {
                kind: "heartbeat".into(),
                data: map(vec![
                    ("agent_id", Value::from("x")),
                    ("queue_depth", Value::from(0)),
                    ("cpu_usage", Value::F64(1.5)),
                ]),
            },
            "0000004483a17416a474797065a9686561727462656174a46461746183a86167656e745f6964a178ab71756575655f646570746800a96370755f7573616765cb3ff8000000000000",
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn encoding_matches_captured_redpepper_bytes() {
    for (name, message, expected) in cases() {
        assert_eq!(
            hex(&encode(&message)),
            expected,
            "{name}: encoded bytes differ from RedPepper's"
        );
    }
}

#[test]
fn captured_redpepper_bytes_decode_to_the_same_messages() {
    let mut decoder = FrameDecoder::new();
    for (name, message, captured) in cases() {
        let bytes: Vec<u8> = (0..captured.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&captured[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(decode_body(&bytes[4..]).as_ref(), Ok(&message), "{name}");
        decoder.extend(&bytes);
        assert_eq!(
            decoder.next_message(),
            Ok(Some(message)),
            "{name} via the stream decoder"
        );
    }
}

/// Runs RedPepper's definitions (Python) and compares with our encoder, byte for byte.
#[test]
fn encoding_matches_live_redpepper_reference() {
    let home = std::env::var("HOME").unwrap_or_default();
    let cache = std::env::var("NANOGATE_CACHE").unwrap_or(format!("{home}/.cache/nanogate"));
    let python = format!("{cache}/venv/bin/python");
    let messages_py = format!("{cache}/redpepper-common-0.3.4/redpepper/common/messages.py");
    if !std::path::Path::new(&messages_py).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{messages_py} missing in CI: e2e/scripts/setup.sh must run first"
        );
        eprintln!(
            "SKIPPED encoding_matches_live_redpepper_reference: run `bash e2e/scripts/setup.sh` to fetch the reference"
        );
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/redpepper_reference.py");
    let output = std::process::Command::new(python)
        .args([script, &messages_py])
        .output()
        .expect("running the reference script");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reference: BTreeMap<String, String> =
        serde_json::from_slice(&output.stdout).expect("JSON from the reference script");
    let ours = cases();
    assert_eq!(
        reference.len(),
        ours.len(),
        "the script and this test must list the same cases"
    );
    for (name, message, _) in ours {
        assert_eq!(
            hex(&encode(&message)),
            reference[name],
            "{name}: differs from live RedPepper output"
        );
    }
}
