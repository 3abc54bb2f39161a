//! The app socket protocol against the real binary: Python stdlib clients
//! as in the Tendrl documentation, a persistent client like the Tendrl Python SDK, socat, every message type
//! and error, bad inputs, idle clients, socket file handling.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nanogate_tests::platform::PlatformServer;
use serde_json::json;

/// Runs a Python script (`what`) with the socket path as its argument; asserts it succeeded.
fn run_python(what: &str, script: &str, sock: &str) -> std::process::Output {
    let out = Command::new("python3")
        .args(["-c", script, sock])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_every_message_type() {
    if !python3_available() {
        eprintln!("!!!!! SKIPPING python_clients_every_message_type: python3 not found !!!!!");
        return;
    }
    let (platform, _dir, agent) = setup("--flush-interval 50ms").await;
    let sock = agent.socket.to_str().unwrap().to_owned();

    // 1. The Tendrl documentation's example, verbatim except for the socket path: a request that has a reply.
    platform.queue_for_check(json!({"msg_type": "command", "data": {"cmd": "reload"}}));
    let seed = r#"
import socket, json, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
message = {"msg_type": "msg_check", "context": {"limit": 1}}
sock.sendall(json.dumps(message).encode())
response = sock.recv(4096)
print(response.decode())
sock.close()
"#;
    let out = run_python("the documentation's msg_check example", seed, &sock);
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        reply,
        json!([{"msg_type": "command", "data": {"cmd": "reload"}}])
    );

    // 2. The Tendrl documentation's publish example. wait:false has no reply, so the stateless client
    //    half-closes (or times out its recv) instead of waiting forever.
    let seed_publish = r#"
import socket, json, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
message = {"msg_type": "publish", "data": {"action": "update", "resource": "configuration",
           "details": {"key": "logging_level", "value": "debug"}}}
sock.sendall(json.dumps(message).encode())
sock.shutdown(socket.SHUT_WR)
response = sock.recv(4096)
print(repr(response))
sock.close()
"#;
    let out = run_python("the documentation's publish example", seed_publish, &sock);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "b''");
    assert!(platform.wait_for(1, Duration::from_secs(10)).await);
    let m = &platform.received()[0];
    assert_eq!(m["data"]["details"]["value"], "debug");
    assert_eq!(m["msg_type"], "publish");
    assert_eq!(m["source"], "test-ns/test-pod");
    assert!(chrono::DateTime::parse_from_rfc3339(m["timestamp"].as_str().unwrap()).is_ok());

    // 3. Persistent client like the Tendrl SDK's agent mode: one connection, JSON values back
    //    to back with no delimiter, each reply read with a single recv(1024).
    platform.queue_for_check(json!({"n": 1}));
    platform.queue_for_check(json!({"n": 2}));
    let sdk = r#"
import socket, json, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
def req(m): s.sendall(json.dumps(m).encode())
def reply(): return s.recv(1024)
for i in range(100):
    req({"msg_type": "publish", "data": {"id": i}, "dest": "sensor-7"})
req({"msg_type": "msg_check", "context": {"limit": 5}})
assert json.loads(reply()) == [{"n": 1}, {"n": 2}]
req({"msg_type": "msg_check"})
r = reply()
assert r == b"204", r
req({"data": "string payload", "context": {"wait": True, "tags": ["a"]}, "msg_type": "publish"})
assert json.loads(reply()) == {"status": "ok", "received": 1}
req({"msg_type": "bogus"})
assert json.loads(reply()) == {"status": "error", "message": "unknown msg_type: bogus"}
req({"data": {}})
assert json.loads(reply()) == {"status": "error", "message": "missing msg_type"}
req({"msg_type": "publish", "context": {"tags": [str(i) for i in range(11)]}})
assert json.loads(reply()) == {"status": "error", "message": "too many tags provided; maximum is 10"}
req({"msg_type": "msg_check"})
assert reply() == b"204"
s.sendall(b"{not json")
assert json.loads(reply())["message"].startswith("invalid JSON"), "invalid json"
assert reply() == b"", "connection must close after invalid JSON"
print("ok")
"#;
    // The persistent client's asserts run in Python: a failure is a non-zero exit.
    run_python("persistent client", sdk, &sock);
    assert!(platform.wait_for(102, Duration::from_secs(10)).await);
    let got = platform.received();
    let batch_ids: Vec<u64> = got
        .iter()
        .filter(|m| m["dest"] == "sensor-7")
        .map(|m| m["data"]["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        batch_ids,
        (0..100).collect::<Vec<_>>(),
        "order within one connection is kept"
    );
    assert!(got.iter().any(|m| m["data"] == "string payload"));
    assert_eq!(platform.unauthorized(), 0);

    // The errors were counted.
    for reason in ["unknown_msg_type", "too_many_tags", "invalid_json"] {
        assert_eq!(rejected(&agent, reason), Some(1.0), "{reason}");
    }
    assert_eq!(agent.metric("nanogate_sidecar_received_total"), Some(101.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socat_client() {
    if !socat_available() {
        eprintln!(
            "!!!!! SKIPPING socat_client: socat not installed (apt-get install -y socat) !!!!!"
        );
        return;
    }
    let (platform, _dir, agent) = setup("--flush-interval 50ms").await;
    let target = format!("UNIX-CONNECT:{}", agent.socket.display());
    let run = |input: &str| {
        let mut socat = Command::new("socat");
        socat.args(["-t", "5", "-", &target]);
        String::from_utf8(feed(socat, input.as_bytes()).stdout).unwrap()
    };
    assert_eq!(run(r#"{"msg_type":"msg_check"}"#), "204");
    assert_eq!(run(&format!("{}\n{}\n", publish(1), publish(2))), "");
    let relayed = run(r#"{"msg_type":"publish","data":{"x":1},"context":{"wait":true}}"#);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&relayed).unwrap(),
        json!({"status":"ok","received":1})
    );
    assert_eq!(
        run(r#"{"msg_type":"nope"}"#),
        r#"{"status":"error","message":"unknown msg_type: nope"}"#
    );
    assert!(platform.wait_for(3, Duration::from_secs(10)).await);
    let mut got = ids(&platform.received());
    got.sort();
    assert_eq!(got, vec![1, 2]);
}

/// Bad inputs, one connection each: the documented reply (and close where documented), and
/// the agent keeps serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_table() {
    let (_platform, _dir, agent) = setup("--idle-timeout 1s").await;

    let eleven = r#"{"msg_type":"publish","context":{"tags":["1","2","3","4","5","6","7","8","9","10","11"]}}"#;
    let mut huge = br#"{"msg_type":"publish","data":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', 2 << 20));
    huge.extend(br#""}"#);
    let check = br#"{"msg_type":"msg_check"}"#;
    let err = |m: &str| format!(r#"{{"status":"error","message":"{m}"}}"#);
    // (name, input, expected reply prefix, then a msg_check on the same connection answers 204)
    let cases: Vec<(&str, Vec<u8>, String, bool)> = vec![
        (
            "invalid JSON",
            b"{msg_type: publish}".to_vec(),
            err("invalid JSON: key must be a string").replace("\"}", ""),
            false,
        ),
        (
            "truncated JSON",
            br#"{"msg_type":"publish","data":{"a":"#.to_vec(),
            err("invalid JSON: connection closed in the middle of a message"),
            false,
        ),
        (
            "huge message",
            huge,
            err(&format!(
                "message too large: {} bytes exceeds the limit of 1048576 bytes",
                0
            ))
            .split(": ")
            .next()
            .unwrap()
            .to_owned(),
            false,
        ),
        (
            "11 tags",
            eleven.as_bytes().to_vec(),
            err("too many tags provided; maximum is 10"),
            true,
        ),
        (
            "unknown msg_type",
            br#"{"msg_type":"subscribe"}"#.to_vec(),
            err("unknown msg_type: subscribe"),
            true,
        ),
        (
            "missing msg_type",
            br#"{"data":{"a":1}}"#.to_vec(),
            err("missing msg_type"),
            true,
        ),
        (
            "msg_type not a string",
            br#"{"msg_type":42}"#.to_vec(),
            err("invalid message: invalid type: integer `42`, expected a string"),
            true,
        ),
        (
            "not an object",
            br#"[1,2,3]"#.to_vec(),
            err("invalid message: expected a JSON object"),
            true,
        ),
        (
            "non-UTF-8 bytes",
            b"{\"msg_type\":\"publish\",\"data\":\"\xff\xfe\"}".to_vec(),
            err("invalid message: not valid UTF-8 at byte 30; JSON text is UTF-8"),
            true,
        ),
        (
            "a number beyond a 64-bit float",
            br#"{"msg_type":"publish","data":{"t":1e400}}"#.to_vec(),
            err("invalid message: a number is beyond the range of a 64-bit float")
                .replace("\"}", ""),
            true,
        ),
        (
            "binary garbage",
            vec![0, 159, 146, 150, 1, 2, 3, 255],
            err("invalid JSON: expected value").replace("\"}", ""),
            false,
        ),
    ];
    for (name, input, want, stays_open) in cases {
        let mut s = UnixStream::connect(&agent.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut input = input;
        if stays_open {
            input.extend_from_slice(check);
        }
        // Write from a thread: the agent may close before reading a huge input.
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&input);
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        writer.join().unwrap();
        let out = String::from_utf8_lossy(&out).into_owned();
        assert!(
            out.starts_with(&want),
            "{name}: got {out:?}, want prefix {want:?}"
        );
        if stays_open {
            assert!(
                out.ends_with("}204"),
                "{name}: connection must stay usable, got {out:?}"
            );
        } else {
            assert_eq!(
                out.matches("\"status\":\"error\"").count(),
                1,
                "{name}: one error then close: {out:?}"
            );
        }
    }

    // A client that connects and sends nothing is closed after the idle timeout.
    let mut idle = UnixStream::connect(&agent.socket).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(idle.read(&mut buf).unwrap(), 0);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    // The agent keeps serving.
    assert_eq!(oneshot(&agent.socket, check), b"204");
    for reason in ["too_large", "truncated"] {
        assert_eq!(rejected(&agent, reason), Some(1.0), "{reason}");
    }
}

/// An app polling `msg_check` in a loop costs the platform one request per
/// `--msg-check-cache` window; a message queued meanwhile is handed out after the window, and
/// a non-empty answer ends the window at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_msg_check_asks_the_platform_once_per_window() {
    let platform = PlatformServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let window = Duration::from_secs(2);
    let agent = start_agent(&platform, dir.path(), &["--msg-check-cache", "2s"]);
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    let mut buf = [0u8; 1024];
    let mut check = || {
        s.write_all(br#"{"msg_type":"msg_check","context":{"limit":5}}"#)
            .unwrap();
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let before = platform.requests();
    assert_eq!(check(), "204");
    let empty_at = Instant::now();
    for _ in 0..500 {
        assert_eq!(check(), "204");
    }
    platform.queue_for_check(json!({"n": 1}));
    assert_eq!(check(), "204", "still inside the window");
    assert!(
        empty_at.elapsed() < window,
        "502 local polls took {:?}",
        empty_at.elapsed()
    );
    assert_eq!(platform.requests() - before, 1, "one platform request");
    assert_eq!(
        agent.metric("nanogate_sidecar_msg_check_cached_total"),
        Some(501.0)
    );
    assert_eq!(
        agent.metric("nanogate_sidecar_msg_check_total"),
        Some(502.0)
    );

    std::thread::sleep(window.saturating_sub(empty_at.elapsed()));
    assert_eq!(check(), r#"[{"n":1}]"#, "asked again after the window");
    assert_eq!(check(), "204", "the platform was asked: its queue is empty");
    assert_eq!(platform.requests() - before, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_file_lifecycle_and_key_hygiene() {
    let platform = PlatformServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A stale socket from a "previous run": bound, then abandoned.
    let stale = dir.path().join("agent.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut agent = start_agent(&platform, dir.path(), &["--log-format", "json"]);
    let md = std::fs::metadata(&agent.socket).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o666);
    assert_eq!(
        oneshot(&agent.socket, br#"{"msg_type":"msg_check"}"#),
        b"204"
    );

    // A second agent on the same socket refuses to start instead of stealing it.
    let out = Command::new(env!("CARGO_BIN_EXE_nano-agent"))
        .arg("--socket-path")
        .arg(&agent.socket)
        .arg("--spool-dir")
        .arg(dir.path().join("spool2"))
        .args(["--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another agent is listening"));

    let (code, body) = agent.http_get("/healthz").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("\"state\":\"closed\""), "{body}");

    let status = agent.terminate().unwrap();
    assert!(status.success(), "{status}");
    assert!(!agent.socket.exists(), "socket removed on exit");
    let log = agent.log_text();
    assert!(
        !log.contains(platform.api_key()),
        "API key leaked into the log"
    );
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "json logs: {log}"
    );
}

#[test]
fn invalid_config_fails_naming_the_field() {
    let bin = env!("CARGO_BIN_EXE_nano-agent");
    let out = Command::new(bin)
        .args(["--batch-size", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("batch_size"));
    let out = Command::new(bin)
        .args(["--flush-interval", "soon"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--flush-interval"));
    let out = Command::new(bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for knob in [
        "--flush-interval",
        "[default: 250ms]",
        "--max-batch-size",
        "[default: 200]",
        "TENDRL_KEY",
        "--spool-max-bytes",
        "[default: 127.0.0.1:9091]",
    ] {
        assert!(help.contains(knob), "--help lacks {knob}");
    }
    let out = Command::new(bin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("nano-agent "));
}

/// Issue 15, defect 1: one message the envelope could not re-parse (a lone surrogate with an
/// app `source`) aborted the agent and every connection with it. It is now answered, on the
/// socket and the agent alike, and the next message is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_json_parsers_refuse_is_answered_and_the_agent_lives_on() {
    let (platform, _dir, mut agent) = setup("--flush-interval 50ms").await;
    let deep = format!(
        r#"{{"msg_type":"publish","source":"x","data":{}0{}}}"#,
        "[".repeat(300),
        "]".repeat(300)
    );
    for bad in [
        br#"{"msg_type":"publish","source":"x","data":"\udc00"}"#.to_vec(),
        br#"{"msg_type":"publish","data":{"k":"\ud800"},"timestamp":null}"#.to_vec(),
        deep.into_bytes(),
    ] {
        let reply = oneshot(&agent.socket, &bad);
        let reply: serde_json::Value = serde_json::from_slice(&reply)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&reply)));
        assert_eq!(reply["status"], "error", "{reply}");
    }
    assert!(
        agent.child_running(),
        "the agent died:\n{}",
        agent.log_text()
    );
    assert_eq!(oneshot(&agent.socket, publish(1).as_bytes()), b"");
    assert!(platform.wait_for(1, Duration::from_secs(10)).await);
    assert_eq!(ids(&platform.received()), [1]);
    assert_eq!(
        agent.metric("nanogate_sidecar_rejected_total{reason=\"invalid_message\"}"),
        Some(3.0)
    );
}

/// Issue 15, defect 2: 200,000 telemetry messages with floats on one connection, as JSON lines
/// and back to back. A read boundary after `21.` used to cut the stream ("invalid number").
/// Every message is accepted, none is answered with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_of_floats_is_never_cut() {
    const N: usize = 200_000;
    let (_platform, _dir, agent) = setup("--spool-max-bytes 512MiB --flush-interval 1h").await;
    for (round, sep) in [(0usize, "\n"), (1, "")] {
        let mut text = String::new();
        for i in 0..N {
            text.push_str(&format!(
                r#"{{"msg_type":"publish","data":{{"sensor":"s{i}","value":{}.{},"scale":-1.5e-3}}}}{sep}"#,
                i % 97,
                i % 10 + 1,
            ));
        }
        let socket = agent.socket.clone();
        let reply = tokio::task::spawn_blocking(move || {
            let mut s = UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            // Odd-sized writes move every read boundary to a new place in the numbers.
            for chunk in text.as_bytes().chunks(4093) {
                s.write_all(chunk).unwrap();
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).unwrap();
            reply
        })
        .await
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&reply),
            "",
            "round {round}: the agent answered an error"
        );
        assert_eq!(
            agent.metric("nanogate_sidecar_received_total"),
            Some(((round + 1) * N) as f64)
        );
    }
}

/// A client that trickles one message a byte at a time cannot hold a connection slot for
/// longer than the idle timeout: the timeout applies to the whole message.
#[test]
fn a_message_must_arrive_whole_within_the_idle_timeout() {
    let platform = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(PlatformServer::start())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&platform, dir.path(), &["--idle-timeout", "1s"]);
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    let started = Instant::now();
    let mut closed = None;
    for b in br#"{"msg_type":"publish","data":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"# {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(&[*b]).is_err() {
            closed = Some(started.elapsed());
            break;
        }
    }
    let closed = closed.expect("the agent let a trickling client hold its connection");
    assert!(closed < Duration::from_secs(4), "closed after {closed:?}");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(
        String::from_utf8_lossy(&reply).contains("not completed within 1s"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
}

/// Stopping answers what it cut short: a client in the middle of a message when SIGTERM comes
/// is told `shutting down, try again later` (it cannot otherwise know the message was not
/// accepted), and a whole message sent before it is accepted and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_a_half_sent_message() {
    let (platform, _dir, mut agent) = setup("--flush-interval 20ms").await;
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    s.write_all(publish(7).as_bytes()).unwrap();
    s.write_all(br#"{"msg_type":"publish","data":{"id":8,"half":"#)
        .unwrap();
    // The agent has read both (the second is incomplete) before it is told to stop.
    std::thread::sleep(Duration::from_millis(300));
    let status = agent.terminate().unwrap();
    assert!(status.success(), "{status:?}");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert_eq!(
        String::from_utf8_lossy(&reply),
        r#"{"status":"error","message":"shutting down, try again later"}"#
    );
    assert!(platform.wait_for(1, Duration::from_secs(5)).await);
    assert_eq!(ids(&platform.received()), [7]);
}
