//! `socketio` upstream (the cloud protocol) against a real Socket.IO server: python-socketio + aiohttp
//! (`tests/support/socketio_platform.py`) over TLS that requires a client certificate, driving
//! the real `nano-agent` binary. Certificates (CA, server, client) are made here with rcgen.
//!
//! Needs the virtualenv of `e2e/scripts/setup.sh` (`~/.cache/nanogate/venv` with
//! python-socketio and aiohttp) or `NANOGATE_SOCKETIO_PYTHON`; without it the tests are skipped
//! with a loud message.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{TestPki, free_port, healthz, publish, test_pki};
use nanogate_tests::agent::{Agent, AgentConfig};
use serde_json::{Value, json};

const API_KEY: &str = "sio-test-key-0123";
const CLIENT_CN: &str = "nano-agent-test-client";

/// The Python with python-socketio and aiohttp, or `None` (and a loud message).
fn python() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("NANOGATE_SOCKETIO_PYTHON").map(PathBuf::from),
        std::env::var_os("NANOGATE_CACHE").map(|c| PathBuf::from(c).join("venv/bin/python")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nanogate/venv/bin/python")),
    ];
    let found = candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import socketio, aiohttp"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if found.is_none() {
        eprintln!(
            "\n*** SKIPPED: no Python with python-socketio and aiohttp; run e2e/scripts/setup.sh \
             (or set NANOGATE_SOCKETIO_PYTHON) ***\n"
        );
    }
    found
}

type Certs = TestPki;

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files.
fn make_certs(dir: &Path) -> Certs {
    test_pki(dir, "nanogate socketio test CA", CLIENT_CN)
}

/// Events the platform printed, shared with the thread that reads its stdout.
type Events = Arc<(Mutex<Vec<Value>>, Condvar)>;

/// The Python Socket.IO platform as a child process.
struct Platform {
    child: Child,
    stdin: ChildStdin,
    events: Events,
    next_tag: u64,
}

impl Platform {
    fn start(python: &Path, port: u16, certs: &Certs, extra: &[&str]) -> Platform {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/socketio_platform.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg("--port")
            .arg(port.to_string())
            .arg("--cert")
            .arg(&certs.server_cert)
            .arg("--key")
            .arg(&certs.server_key)
            .arg("--ca")
            .arg(&certs.ca)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the Socket.IO platform");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let events: Events = Arc::default();
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.0.lock().unwrap().push(v);
                    sink.1.notify_all();
                }
            }
        });
        let p = Platform {
            child,
            stdin,
            events,
            next_tag: 0,
        };
        assert!(
            p.wait(Duration::from_secs(20), |e| any(e, "listening")),
            "the Socket.IO platform did not start"
        );
        p
    }

    /// Waits until `pred` holds for the events so far.
    fn wait(&self, limit: Duration, pred: impl Fn(&[Value]) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut events = self.events.0.lock().unwrap();
        loop {
            if pred(&events) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            events = self.events.1.wait_timeout(events, left).unwrap().0;
        }
    }

    fn events(&self, name: &str) -> Vec<Value> {
        self.events
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == name)
            .cloned()
            .collect()
    }

    fn send(&mut self, cmd: Value) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Emits `event` to the agent with an acknowledgement and returns the agent's reply.
    fn call(&mut self, event: &str, data: Value) -> Value {
        self.next_tag += 1;
        let tag = self.next_tag;
        self.send(json!({"op": "call", "tag": tag, "event": event, "data": data}));
        assert!(
            self.wait(Duration::from_secs(15), |e| e
                .iter()
                .any(|e| e["event"] == "reply" && e["tag"] == tag)),
            "no reply to {event}"
        );
        let reply = self
            .events("reply")
            .into_iter()
            .find(|e| e["tag"] == tag)
            .unwrap();
        assert!(reply.get("error").is_none(), "{event}: {reply}");
        reply["reply"].clone()
    }

    /// Ids of every message of every acknowledged-or-not `messages` event seen.
    fn ids(&self) -> Vec<u64> {
        self.events("messages")
            .iter()
            .flat_map(|e| e["ids"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_u64())
            .collect()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.kill();
    }
}

fn any(events: &[Value], name: &str) -> bool {
    events.iter().any(|e| e["event"] == name)
}

/// What every test starts from: the Python, a temporary directory holding the certificates,
/// and a free port for the platform.
struct Setup {
    py: PathBuf,
    dir: tempfile::TempDir,
    certs: Certs,
    port: u16,
}

impl Setup {
    /// `None` (and a loud message) without the Python.
    fn new() -> Option<Setup> {
        let py = python()?;
        let dir = tempfile::tempdir().unwrap();
        let certs = make_certs(dir.path());
        Some(Setup {
            py,
            dir,
            certs,
            port: free_port(),
        })
    }

    fn platform(&self, extra: &[&str]) -> Platform {
        Platform::start(&self.py, self.port, &self.certs, extra)
    }

    /// The agent with the client certificate (mutual TLS), then `extra` flags.
    fn agent(&self, extra: &[&str]) -> Agent {
        let certs = &self.certs;
        let mut args = vec![
            "--upstream-client-cert".to_owned(),
            certs.client_cert.display().to_string(),
            "--upstream-client-key".to_owned(),
            certs.client_key.display().to_string(),
            "--pod-uid".to_owned(),
            "0e1f2a3b-agent".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.agent_without_client_cert(&args)
    }

    /// The agent trusting the test CA but presenting no client certificate, with `extra` flags.
    fn agent_without_client_cert(&self, extra: &[impl AsRef<str>]) -> Agent {
        let mut args = vec![
            "--upstream-kind".to_owned(),
            "socketio".to_owned(),
            "--upstream-ca".to_owned(),
            self.certs.ca.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.as_ref().to_owned()));
        Agent::start(AgentConfig {
            bin: env!("CARGO_BIN_EXE_nano-agent").into(),
            dir: self.dir.path().join("agent"),
            upstream_url: format!("wss://localhost:{}", self.port),
            api_key: API_KEY.into(),
            extra_args: args,
        })
        .expect("starting nano-agent")
    }
}

/// Writes publishes for `ids` on one connection and waits until the agent has handled them
/// (a trailing msg_check is answered only after every earlier message was accepted).
fn send(socket: &Path, ids: std::ops::Range<u64>) {
    let mut s = UnixStream::connect(socket).unwrap();
    let mut buf = String::new();
    for id in ids {
        buf.push_str(&publish(id));
    }
    s.write_all(buf.as_bytes()).unwrap();
    msg_check(&mut s, 1);
}

/// One msg_check on `s`: the reply (`204` or a JSON array).
fn msg_check(s: &mut UnixStream, limit: u32) -> Vec<u8> {
    s.write_all(format!(r#"{{"msg_type":"msg_check","context":{{"limit":{limit}}}}}"#).as_bytes())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn wait_metric(agent: &Agent, sample: &str, want: f64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if agent.metric(sample) == Some(want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Heartbeats with the default interval arrive every 5 s ± 10% and carry the cloud protocol's fields;
/// the connection is mutual TLS (the server saw the client certificate) and authenticated.
#[test]
fn heartbeats_every_five_seconds_with_the_seed_fields_over_mtls() {
    let Some(t) = Setup::new() else { return };
    let platform = t.platform(&["--ping-interval", "2", "--ping-timeout", "2"]);
    let agent = t.agent(&[]);
    assert!(
        platform.wait(Duration::from_secs(30), |e| e
            .iter()
            .filter(|e| e["event"] == "heartbeat")
            .count()
            >= 4),
        "fewer than 4 heartbeats; agent log:\n{}",
        agent.log_text()
    );
    let connect = &platform.events("connect")[0];
    assert_eq!(connect["client_cn"], CLIENT_CN, "{connect}");
    assert_eq!(connect["auth"]["token"], API_KEY);
    assert_eq!(connect["auth"]["agent_id"], "0e1f2a3b-agent");

    let beats = platform.events("heartbeat");
    let times: Vec<f64> = beats.iter().map(|b| b["t"].as_f64().unwrap()).collect();
    let intervals: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = intervals.iter().sum::<f64>() / intervals.len() as f64;
    let (min, max) = intervals
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    println!(
        "heartbeat intervals (s): {intervals:.3?}; mean {mean:.3}, min {min:.3}, max {max:.3}"
    );
    for i in &intervals {
        assert!(
            (4.5..=5.5).contains(i),
            "interval {i:.3}s outside 5 s ± 10%: {intervals:?}"
        );
    }
    let hb = &beats.last().unwrap()["data"];
    assert_eq!(hb["agent_id"], "0e1f2a3b-agent");
    assert_eq!(hb["status"], "online");
    for f in [
        "cpu_usage",
        "memory_usage",
        "memory_total",
        "disk_usage",
        "disk_total",
        "uptime",
    ] {
        assert!(hb[f].is_number(), "{f} in {hb}");
    }
    assert!(hb["memory_total"].as_f64().unwrap() > 0.0, "{hb}");
    assert!(hb["disk_total"].as_f64().unwrap() > 0.0, "{hb}");
    assert!(hb["uptime"].as_u64().unwrap() >= 10, "{hb}");
    let ts = hb["timestamp"].as_str().unwrap();
    assert!(
        ts.ends_with('Z') && nanogate_protocol::contract::is_iso8601(ts),
        "{ts}"
    );
    // Engine.IO pings every 2 s were answered: still one connection.
    assert_eq!(platform.events("connect").len(), 1);
    assert_eq!(
        agent.metric("nanogate_sidecar_upstream_connection_state"),
        Some(2.0)
    );
    let health = healthz(&agent);
    assert_eq!(health["upstream"]["connection"], "connected", "{health}");
}

/// Batches are delivered as acknowledged events (split under the server's 20 kB maxPayload);
/// `wait:true` relays the acknowledgement; each command is answered through its
/// acknowledgement, every contract violation with the right error; `deliver` reaches an app
/// through `msg_check`.
#[test]
fn batches_acknowledged_commands_answered_and_contracts_enforced() {
    let Some(t) = Setup::new() else { return };
    let mut platform = t.platform(&["--max-payload", "20000"]);
    let agent = t.agent(&[
        "--flush-interval",
        "50ms",
        "--socketio-heartbeat-interval",
        "1s",
    ]);
    assert!(platform.wait(Duration::from_secs(15), |e| any(e, "connect")));

    send(&agent.socket, 0..500);
    assert!(
        wait_metric(
            &agent,
            "nanogate_sidecar_delivered_total",
            500.0,
            Duration::from_secs(20)
        ),
        "delivered {:?}; log:\n{}",
        agent.metric("nanogate_sidecar_delivered_total"),
        agent.log_text()
    );
    let got: BTreeSet<u64> = platform.ids().into_iter().collect();
    assert_eq!(got, (0..500).collect());
    // 500 messages of ~250 bytes with a 20 kB maxPayload: several events, no oversize packet
    // (the server would have closed the connection).
    let events = platform.events("messages");
    let counts: Vec<u64> = events
        .iter()
        .map(|e| e["count"].as_u64().unwrap())
        .collect();
    println!("messages per acknowledged event under a 20 kB maxPayload: {counts:?}");
    // A message is ~200 bytes here, so at most ~100 fit; unsplit batches would be 200.
    assert!(
        counts.iter().all(|&c| c <= 110),
        "batch over maxPayload: {counts:?}"
    );
    assert_eq!(
        agent.metric("nanogate_sidecar_upstream_reconnects_total"),
        Some(0.0)
    );

    // wait:true: the acknowledgement's argument is the reply.
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    s.write_all(br#"{"msg_type":"publish","data":{"id":9999},"context":{"wait":true}}"#)
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    let reply: Value = serde_json::from_slice(&buf[..n]).unwrap();
    assert_eq!(reply, json!({"status": "ok", "received": 1}));

    let now = chrono::Utc::now();
    let base = |action: &str, id: u64| {
        json!({"correlation_id": id, "action": action,
               "requested_at": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)})
    };
    let with = |mut v: Value, k: &str, x: Value| {
        v[k] = x;
        v
    };
    let without = |mut v: Value, k: &str| {
        v.as_object_mut().unwrap().remove(k);
        v
    };

    // Valid commands.
    let r = platform.call("flush", base("flush", 1));
    assert_eq!(
        r,
        json!({"action": "flush", "correlation_id": 1, "status": "ok", "pending": 0})
    );
    let r = platform.call(
        "get_consumption",
        with(
            base("get_consumption", 2),
            "period",
            json!({"start": (now - chrono::Duration::minutes(5)).to_rfc3339()}),
        ),
    );
    assert_eq!(
        (
            r["action"].clone(),
            r["correlation_id"].clone(),
            r["status"].clone()
        ),
        (json!("get_consumption"), json!(2), json!("ok")),
        "{r}"
    );
    assert!(r["samples"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["cpu_usage"]["unit"], "percent", "{r}");
    assert!(r["memory_usage"]["max"].as_f64().unwrap() > 0.0, "{r}");
    let r = platform.call(
        "deliver",
        with(
            with(base("deliver", 3), "data", json!({"text": "hello app"})),
            "tags",
            json!(["greeting"]),
        ),
    );
    assert_eq!(
        r,
        json!({"action": "deliver", "correlation_id": 3, "status": "ok", "queued": 1})
    );

    // The delivered message reaches an app through msg_check, once.
    let mut app = UnixStream::connect(&agent.socket).unwrap();
    let reply: Value = serde_json::from_slice(&msg_check(&mut app, 5)).unwrap();
    assert_eq!(reply.as_array().unwrap().len(), 1, "{reply}");
    assert_eq!(reply[0]["data"], json!({"text": "hello app"}));
    assert_eq!(reply[0]["context"]["tags"], json!(["greeting"]));
    assert_eq!(reply[0]["correlation_id"], 3);
    assert_eq!(msg_check(&mut app, 5), b"204");

    // Every kind of violation, answered through the acknowledgement.
    let deliver = with(base("deliver", 10), "data", json!("x"));
    let consumption = with(
        base("get_consumption", 11),
        "period",
        json!({"start": "2025-11-20"}),
    );
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "flush",
            without(base("flush", 4), "correlation_id"),
            "Missing required field: correlation_id",
        ),
        (
            "flush",
            without(base("flush", 5), "action"),
            "Missing required field: action",
        ),
        (
            "flush",
            without(base("flush", 6), "requested_at"),
            "Missing required field: requested_at",
        ),
        (
            "deliver",
            without(deliver.clone(), "data"),
            "Missing required field: data",
        ),
        (
            "get_consumption",
            without(consumption.clone(), "period"),
            "Missing required field: period",
        ),
        (
            "get_consumption",
            with(consumption.clone(), "period", json!({"end": "2025-11-20"})),
            "Missing required field: period.start",
        ),
        // number
        (
            "flush",
            with(base("flush", 0), "correlation_id", json!("12")),
            "Invalid field type: correlation_id (expected number, got string)",
        ),
        // string
        (
            "flush",
            with(base("flush", 7), "action", json!(12)),
            "Invalid field type: action (expected string, got number)",
        ),
        // ISO date
        (
            "flush",
            with(base("flush", 8), "requested_at", json!("last tuesday")),
            "Invalid field type: requested_at (expected ISO-8601 date, got string)",
        ),
        (
            "flush",
            with(base("flush", 8), "requested_at", json!(1700000000)),
            "Invalid field type: requested_at (expected ISO-8601 date, got number)",
        ),
        // boolean
        (
            "flush",
            with(base("flush", 9), "wait", json!("yes")),
            "Invalid field type: wait (expected boolean, got string)",
        ),
        // optional (present, wrong type)
        (
            "flush",
            with(base("flush", 9), "timeout_ms", json!("100")),
            "Invalid field type: timeout_ms (expected number, got string)",
        ),
        // non-empty string
        (
            "deliver",
            with(deliver.clone(), "dest", json!("")),
            "Invalid field type: dest (expected non-empty string, got empty string)",
        ),
        // list, and a list element
        (
            "deliver",
            with(deliver.clone(), "tags", json!("a,b")),
            "Invalid field type: tags (expected list of string, got string)",
        ),
        (
            "deliver",
            with(deliver.clone(), "tags", json!(["a", 2])),
            "Invalid field type: tags[1] (expected string, got number)",
        ),
        // nested, and a field inside it
        (
            "get_consumption",
            with(consumption.clone(), "period", json!("last hour")),
            "Invalid field type: period (expected object, got string)",
        ),
        (
            "get_consumption",
            with(
                consumption.clone(),
                "period",
                json!({"start": "2025-11-20", "end": false}),
            ),
            "Invalid field type: period.end (expected ISO-8601 date, got boolean)",
        ),
        // not an object at all
        (
            "flush",
            json!(["flush"]),
            "Invalid field type: payload (expected object, got list)",
        ),
        // unknown command
        (
            "delete_orchestrator",
            base("delete_orchestrator", 12),
            "Unknown action: delete_orchestrator",
        ),
    ];
    for (event, payload, error) in cases {
        let r = platform.call(event, payload.clone());
        assert_eq!(r["status"], "error", "{event} {payload}: {r}");
        assert!(
            r["error"].as_str().unwrap().starts_with(error),
            "{event} {payload}: got {r}, want {error}"
        );
        assert_eq!(
            r["action"],
            payload.get("action").cloned().unwrap_or(Value::Null)
        );
        assert_eq!(
            r["correlation_id"],
            payload
                .get("correlation_id")
                .cloned()
                .unwrap_or(Value::Null)
        );
    }
    // The invalid deliver put nothing in the inbox.
    assert_eq!(msg_check(&mut app, 5), b"204");
    assert!(
        agent
            .metric(r#"nanogate_sidecar_commands_total{action="deliver",result="ok"}"#)
            .is_some_and(|v| v == 1.0)
    );
}

/// The platform acknowledges nothing for a while: batches time out and are retried, then
/// delivered once acknowledgements come back.
#[test]
fn missing_acknowledgements_are_retried() {
    let Some(t) = Setup::new() else { return };
    let mut platform = t.platform(&[]);
    platform.send(json!({"op": "ack_mode", "mode": "none"}));
    assert!(platform.wait(Duration::from_secs(5), |e| any(e, "ack_mode")));
    let agent = t.agent(&[
        "--flush-interval",
        "50ms",
        "--socketio-ack-timeout",
        "500ms",
        "--backoff-max",
        "500ms",
    ]);
    send(&agent.socket, 0..20);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.metric("nanogate_sidecar_delivered_total"), Some(0.0));
    let retries = agent
        .metric(r#"nanogate_sidecar_upstream_errors_total{kind="retryable"}"#)
        .unwrap_or(0.0);
    assert!(retries >= 2.0, "retries {retries}");
    platform.send(json!({"op": "ack_mode", "mode": "ok"}));
    assert!(wait_metric(
        &agent,
        "nanogate_sidecar_delivered_total",
        20.0,
        Duration::from_secs(10)
    ));
    assert_eq!(agent.metric("nanogate_sidecar_queue_depth"), Some(0.0));
}

/// The server is killed mid-load and started again on the same port: the agent reconnects and
/// every accepted message reaches the platform (counted by id; duplicates only from batches
/// whose acknowledgement was lost).
#[test]
fn server_killed_mid_load_reconnect_and_nothing_lost() {
    let Some(t) = Setup::new() else { return };
    let mut first = t.platform(&[]);
    let agent = t.agent(&[
        "--flush-interval",
        "50ms",
        "--socketio-ack-timeout",
        "2s",
        "--backoff-max",
        "1s",
    ]);
    assert!(first.wait(Duration::from_secs(15), |e| any(e, "connect")));

    // Steady load: 4,000 messages over ~4 s on one connection.
    let socket = agent.socket.clone();
    let total = 4000u64;
    let sender = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&socket).unwrap();
        for chunk in 0..(total / 10) {
            let mut buf = String::new();
            for id in chunk * 10..chunk * 10 + 10 {
                buf.push_str(&publish(id));
            }
            s.write_all(buf.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        msg_check(&mut s, 1)
    });
    std::thread::sleep(Duration::from_secs(1));
    first.kill();
    let before = first.ids();
    std::thread::sleep(Duration::from_millis(1500));
    let second = t.platform(&[]);
    let restarted = Instant::now();
    assert!(
        second.wait(Duration::from_secs(40), |e| any(e, "connect")),
        "no reconnect"
    );
    let reconnect = restarted.elapsed();
    let replies = sender.join().unwrap();
    assert_eq!(replies, b"204", "a publish was refused");
    assert!(
        wait_all(&second, &before, total),
        "only {} of {total} ids arrived; agent log:\n{}",
        before
            .iter()
            .copied()
            .chain(second.ids())
            .collect::<BTreeSet<u64>>()
            .len(),
        agent.log_text()
    );
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for id in before.iter().chain(second.ids().iter()) {
        *counts.entry(*id).or_default() += 1;
    }
    let dups: usize = counts.values().map(|c| c - 1).sum();
    println!(
        "server killed after {} ids, down 1.5 s, agent reconnected {:.2} s after the restart; \
         received {} unique of {total}, {dups} duplicates",
        before.len(),
        reconnect.as_secs_f64(),
        counts.len()
    );
    assert_eq!(counts.len() as u64, total);
    assert!(
        agent
            .metric("nanogate_sidecar_upstream_reconnects_total")
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        agent.metric("nanogate_sidecar_upstream_connection_state"),
        Some(2.0)
    );
    assert!(wait_metric(
        &agent,
        "nanogate_sidecar_queue_depth",
        0.0,
        Duration::from_secs(5)
    ));
}

fn wait_all(second: &Platform, before: &[u64], total: u64) -> bool {
    let before: BTreeSet<u64> = before.iter().copied().collect();
    second.wait(Duration::from_secs(30), |events| {
        let mut ids = before.clone();
        for e in events.iter().filter(|e| e["event"] == "messages") {
            ids.extend(
                e["ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64),
            );
        }
        ids.len() as u64 == total
    })
}

/// Mutual TLS is enforced end to end: an agent without a client certificate is refused by the
/// platform's TLS, stays disconnected, keeps every message spooled and says why in `/healthz`.
#[test]
fn without_a_client_certificate_the_platform_refuses_the_agent() {
    let Some(t) = Setup::new() else { return };
    let platform = t.platform(&[]);
    let agent =
        t.agent_without_client_cert(&["--flush-interval", "50ms", "--socketio-ack-timeout", "1s"]);
    send(&agent.socket, 0..5);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        platform.events("connect").is_empty(),
        "the platform let an agent without a client certificate in"
    );
    assert_ne!(
        agent.metric("nanogate_sidecar_upstream_connection_state"),
        Some(2.0)
    );
    assert!(
        agent
            .metric("nanogate_sidecar_upstream_reconnects_total")
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(agent.metric("nanogate_sidecar_delivered_total"), Some(0.0));
    assert_eq!(agent.metric("nanogate_sidecar_queue_depth"), Some(5.0));
    let health = healthz(&agent);
    let error = health["upstream"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains("socketio") || error.contains("Socket.IO"),
        "{health}"
    );
    println!("refused agent's last_error: {error}");
}

/// The API key is re-read from its file: a new key ends the live connection and the next
/// CONNECT carries it, with no restart of the agent (issue 21: key rotation).
#[test]
fn a_rotated_key_file_reconnects_with_the_new_key() {
    let Some(t) = Setup::new() else { return };
    let platform = t.platform(&[]);
    let key_file = t.dir.path().join("api-key");
    std::fs::write(&key_file, "file-key-1\n").unwrap();
    let key_arg = key_file.display().to_string();
    let agent = t.agent(&[
        "--api-key-file",
        &key_arg,
        "--api-key-reload-interval",
        "200ms",
    ]);
    let tokens = |p: &Platform| -> Vec<String> {
        p.events("connect")
            .iter()
            .filter_map(|c| c["auth"]["token"].as_str().map(str::to_owned))
            .collect()
    };
    assert!(
        platform.wait(Duration::from_secs(30), |e| any(e, "connect")),
        "no connect; agent log:\n{}",
        agent.log_text()
    );
    assert_eq!(
        tokens(&platform),
        ["file-key-1"],
        "the file wins over TENDRL_KEY"
    );

    // Replaced the way the kubelet does it: a new file renamed over the old one.
    let tmp = t.dir.path().join("api-key.tmp");
    std::fs::write(&tmp, "file-key-2").unwrap();
    std::fs::rename(&tmp, &key_file).unwrap();
    let rotated = Instant::now();
    assert!(
        platform
            .wait(Duration::from_secs(20), |e| e.iter().any(|c| c["event"]
                == "connect"
                && c["auth"]["token"] == "file-key-2")),
        "no connect with the new key; agent log:\n{}",
        agent.log_text()
    );
    println!(
        "reconnected with the rotated key {:.1}s after the file changed",
        rotated.elapsed().as_secs_f64()
    );
    assert_eq!(tokens(&platform), ["file-key-1", "file-key-2"]);
    assert_eq!(
        agent.metric("nanogate_sidecar_api_key_reloads_total"),
        Some(1.0)
    );
    let log = agent.log_text();
    assert!(log.contains("API key reloaded"), "{log}");
    assert!(!log.contains("file-key-"), "a key in the log: {log}");
}
