//! The `nats` upstream against a real `nats-server -js` (Debian `nats-server`) and the real
//! nano-agent binary: 100,000 messages with the server killed and restarted mid-run, then
//! every message exactly once in the stream; `msg_check` from the durable consumer;
//! `wait:true`; `dest` subjects; bad credentials. Skipped, loudly, without nats-server.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use common::*;
use futures::StreamExt as _;
use nanogate_tests::agent::{Agent, AgentConfig};
use nanogate_tests::nats::{NatsServer, nats_server_bin};

const GATEWAY: &str = "orders";
const SECS_20: Duration = Duration::from_secs(20);
/// `nanogate.{namespace}.{gateway}` with the namespace the test agent runs in.
const SUBJECT: &str = "nanogate.test-ns.orders";
const INBOX: &str = "nanogate-inbox.test-ns.orders";

/// A temporary directory for a test that needs nats-server; `None` (and a loud message)
/// without it.
fn nats_dir() -> Option<tempfile::TempDir> {
    have_nats().then(|| tempfile::tempdir().unwrap())
}

/// [`nats_dir`] with a nats-server in it started with `config`.
fn nats_with_config(config: &str) -> Option<(tempfile::TempDir, NatsServer)> {
    let dir = nats_dir()?;
    let nats = NatsServer::start_with_config(&dir.path().join("nats"), config).unwrap();
    Some((dir, nats))
}

fn have_nats() -> bool {
    if nats_server_bin().is_some() {
        return true;
    }
    eprintln!(
        "SKIPPED: nats-server is not installed (apt-get install -y nats-server; e2e/scripts/setup.sh does it)"
    );
    false
}

fn start_agent(nats: &NatsServer, dir: &Path, extra: &[&str]) -> anyhow::Result<Agent> {
    start_agent_at(&nats.url(), dir, extra)
}

/// [`start_agent`] with the server URL given (e.g. `tls://…`).
fn start_agent_at(url: &str, dir: &Path, extra: &[&str]) -> anyhow::Result<Agent> {
    let mut args: Vec<String> = [
        "--upstream-kind",
        "nats",
        "--gateway",
        GATEWAY,
        "--backoff-max",
        "1s",
        "--upstream-timeout",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Agent::start(AgentConfig {
        bin: env!("CARGO_BIN_EXE_nano-agent").into(),
        dir: dir.to_owned(),
        upstream_url: url.to_string(),
        api_key: String::new(),
        extra_args: args,
    })
}

/// Writes `ids` as publishes on one connection and half-closes: an empty answer means every
/// one was accepted (queued in the spool).
fn send(socket: &Path, ids: std::ops::Range<u64>) -> Vec<u8> {
    let mut buf = String::new();
    for id in ids {
        buf.push_str(&publish(id));
    }
    oneshot(socket, buf.as_bytes())
}

/// One request on its own connection; the reply (the agent answers and the client closes).
fn request(socket: &Path, msg: &str) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(msg.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// [`request`] off the async runtime.
async fn request_async(socket: &Path, msg: &str) -> String {
    let (socket, msg) = (socket.to_owned(), msg.to_owned());
    tokio::task::spawn_blocking(move || request(&socket, &msg))
        .await
        .unwrap()
}

/// The agent as NATS user `agent` with the password in the file `pw`, then `extra` flags.
fn start_with_password(nats: &NatsServer, dir: &Path, pw: &Path, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--nats-user",
        "agent",
        "--nats-password-file",
        pw.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    start_agent(nats, dir, &args).unwrap()
}

/// Waits up to `timeout` until the agent's counter `name` reaches `want`.
async fn wait_counter(agent: &Agent, name: &str, want: f64, timeout: Duration) {
    wait_until(agent, timeout, &format!("{name} >= {want}"), || {
        agent.metric(name).unwrap_or(0.0) >= want
    })
    .await
}

/// Messages the server reported as duplicates of stored ones (the agent logs them per batch).
fn dedup_hits(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("de-duplicated"))
        .filter_map(|l| l.split("duplicates=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<usize>().ok())
        .sum()
}

async fn js(nats: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(nats.url()).await.unwrap())
}

/// Every message of `stream`, in order, through an ordered consumer: (subject, msg id, payload).
async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<(String, String, Vec<u8>)> {
    let mut stream = js.get_stream(stream).await.unwrap();
    let total = stream.info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::with_capacity(total as usize);
    while (out.len() as u64) < total {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("reading the stream stalled")
            .expect("stream ended")
            .expect("message");
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        out.push((m.subject.to_string(), id, m.payload.to_vec()));
    }
    out
}

/// The acceptance run: 100,000 messages through the app socket, nats-server killed (-9) and
/// restarted on the same store mid-delivery, then every message present exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_messages_exactly_once_across_a_server_restart() {
    if !have_nats() {
        return;
    }
    const TOTAL: u64 = 100_000;
    const CHUNK: u64 = 5_000;
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start(&dir.path().join("nats")).unwrap();
    let agent = start_agent(
        &nats,
        &dir.path().join("agent"),
        &[
            "--batch-size",
            "500",
            "--min-batch-size",
            "100",
            "--max-batch-size",
            "1000",
            "--max-queue-size",
            "10000",
            "--min-batch-interval",
            "0s",
            "--flush-interval",
            "50ms",
        ],
    )
    .unwrap();

    // Senders: chunks of 5,000 on fresh connections, paced so that sending spans the restart.
    let socket = agent.socket.clone();
    let sender = std::thread::spawn(move || {
        let mut refused = 0;
        for k in 0..TOTAL / CHUNK {
            let reply = send(&socket, k * CHUNK..(k + 1) * CHUNK);
            if !reply.is_empty() {
                refused += 1;
                eprintln!("chunk {k} got {}", String::from_utf8_lossy(&reply));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        refused
    });

    // Kill the server once a fair share is delivered, while batches are in flight.
    let delivered = |a: &Agent| a.metric("nanogate_sidecar_delivered_total").unwrap_or(0.0) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered(&agent) < 20_000 {
        assert!(
            Instant::now() < deadline,
            "no delivery: {}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_kill = delivered(&agent);
    nats.kill9();
    // Longer than the ack timeout (2 s): the batch in flight fails and is retried, and what
    // the client had buffered reaches the restarted server too — the same ids, twice.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during_outage = delivered(&agent);
    nats.restart().unwrap();
    let restarted_at = started.elapsed();

    assert_eq!(sender.join().unwrap(), 0, "some publishes were refused");
    let deadline = Instant::now() + Duration::from_secs(90);
    while delivered(&agent) < TOTAL {
        assert!(
            Instant::now() < deadline,
            "only {} of {TOTAL} delivered; log:\n{}",
            delivered(&agent),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered_total = delivered(&agent);
    let reconnects = agent
        .metric("nanogate_sidecar_upstream_reconnects_total")
        .unwrap_or(0.0);
    let spool_retries = agent
        .metric("nanogate_sidecar_upstream_errors_total{kind=\"retryable\"}")
        .unwrap_or(0.0);

    // Read the stream back: ids, payloads, duplicates.
    let js = js(&nats).await;
    let stored = read_stream(&js, "NANOGATE").await;
    let mut by_data_id: HashMap<u64, usize> = HashMap::new();
    let mut by_msg_id: HashMap<String, usize> = HashMap::new();
    for (subject, msg_id, payload) in &stored {
        assert_eq!(subject, SUBJECT);
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let id = v["data"]["id"].as_u64().expect("data.id");
        assert_eq!(
            v["data"]["payload"],
            "the quick brown fox jumps over the lazy dog"
        );
        assert_eq!(v["source"], "test-ns/test-pod");
        *by_data_id.entry(id).or_default() += 1;
        *by_msg_id.entry(msg_id.clone()).or_default() += 1;
    }
    let duplicates: usize = by_data_id.values().map(|c| c - 1).sum();
    let missing = (0..TOTAL).filter(|i| !by_data_id.contains_key(i)).count();
    let dedup_hits = dedup_hits(&agent.log_text());
    println!(
        "nats acceptance: sent {TOTAL}, delivered (agent) {delivered_total}, in stream {}, distinct ids {}, \
         duplicates {duplicates}, missing {missing}, distinct Nats-Msg-Id {}, server-side de-duplicated \
         retries {dedup_hits}; killed at {at_kill} delivered ({during_outage} during the outage), \
         restarted at {:.1}s, retryable upstream errors {spool_retries}, reconnects {reconnects}, total {:.1}s",
        stored.len(),
        by_data_id.len(),
        by_msg_id.len(),
        restarted_at.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(missing, 0);
    assert_eq!(duplicates, 0);
    assert_eq!(stored.len() as u64, TOTAL);
    assert_eq!(
        by_msg_id.len() as u64,
        TOTAL,
        "every message has its own Nats-Msg-Id"
    );
    assert!(
        reconnects >= 1.0,
        "the agent should have seen the connection drop"
    );
    assert!(
        spool_retries >= 1.0,
        "the restart should have forced at least one retry"
    );
}

/// `msg_check` pulls what the platform published to the inbox subject (durable consumer,
/// each message handed out once); `wait:true` relays the JetStream ack; `dest` becomes
/// subject tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_check_wait_and_dest() {
    let Some(dir) = nats_dir() else { return };
    let nats = NatsServer::start(&dir.path().join("nats")).unwrap();
    // A 2 s window so the cached answer below does not depend on how fast this machine is.
    let agent = start_agent(
        &nats,
        &dir.path().join("agent"),
        &["--msg-check-cache", "2s"],
    )
    .unwrap();
    let req = |m: &'static str| request_async(&agent.socket, m);

    // Empty inbox: the Tendrl `204` (and the stream and consumer now exist).
    assert_eq!(req(r#"{"msg_type":"msg_check"}"#).await, "204");
    let empty_at = Instant::now();
    assert_eq!(
        agent.metric("nanogate_sidecar_upstream_connection_state"),
        Some(2.0)
    );
    assert!(
        agent
            .http_get("/healthz")
            .unwrap()
            .1
            .contains("\"connection\":\"connected\""),
        "{:?}",
        agent.http_get("/healthz")
    );

    let js = js(&nats).await;
    for i in 0..3 {
        js.publish(INBOX, format!(r#"{{"command":"reboot","n":{i}}}"#).into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // Within --msg-check-cache of the empty answer the agent repeats it without a pull.
    assert_eq!(req(r#"{"msg_type":"msg_check"}"#).await, "204");
    assert_eq!(
        agent.metric("nanogate_sidecar_msg_check_cached_total"),
        Some(1.0)
    );
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(empty_at.elapsed())).await;
    let reply = req(r#"{"msg_type":"msg_check","context":{"limit":10}}"#).await;
    let got: Vec<serde_json::Value> =
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply}"));
    let ns: Vec<u64> = got.iter().map(|m| m["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, vec![0, 1, 2]);
    // Acknowledged: not handed out again.
    assert_eq!(req(r#"{"msg_type":"msg_check"}"#).await, "204");

    // wait:true publishes at once and relays the ack.
    let reply =
        req(r#"{"msg_type":"publish","data":{"x":1},"context":{"wait":true},"dest":"eu/berlin"}"#)
            .await;
    let ack: serde_json::Value =
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply}"));
    assert_eq!(ack["status"], "ok", "{reply}");
    assert_eq!(ack["stream"], "NANOGATE");
    assert_eq!(ack["subject"], format!("{SUBJECT}.eu.berlin"));
    let seq = ack["seq"].as_u64().unwrap();
    let stored = js
        .get_stream("NANOGATE")
        .await
        .unwrap()
        .get_raw_message(seq)
        .await
        .unwrap();
    assert_eq!(stored.subject.as_str(), format!("{SUBJECT}.eu.berlin"));
    println!("wait:true ack: {reply}");
}

/// Wrong password: the agent starts (the spool still accepts), says why nothing is delivered,
/// and `wait:true` answers an error that names the cause. A missing credentials file stops
/// the agent at start with the option's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_a_clear_error() {
    let Some(dir) = nats_dir() else { return };
    let nats =
        NatsServer::start_with_auth(&dir.path().join("nats"), Some(("agent", "s3cret"))).unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, "wrong\n").unwrap();
    let agent = start_with_password(&nats, &dir.path().join("agent"), &pw, &[]);
    // Accepted into the spool even though the upstream refuses us.
    assert!(send(&agent.socket, 0..10).is_empty());
    // The first connection attempt may still be under way: ask until it has failed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let reply = request_async(
            &agent.socket,
            r#"{"msg_type":"publish","data":{"x":1},"context":{"wait":true}}"#,
        )
        .await;
        if reply.contains("authorization") || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("wait:true with a wrong password: {reply}");
    assert!(reply.contains("\"status\":\"error\""), "{reply}");
    assert!(reply.contains("authorization violation"), "{reply}");
    assert!(reply.contains("check the credentials"), "{reply}");
    assert_eq!(
        agent
            .metric("nanogate_sidecar_delivered_total")
            .unwrap_or(0.0),
        0.0
    );

    // The right password later: the spooled messages go out.
    drop(agent);
    std::fs::write(&pw, "s3cret").unwrap();
    let agent = start_with_password(&nats, &dir.path().join("agent"), &pw, &[]);
    wait_counter(&agent, "nanogate_sidecar_delivered_total", 10.0, SECS_20).await;

    // A credentials file that does not exist: refuses to start, naming the option.
    let e = start_agent(
        &nats,
        &dir.path().join("agent2"),
        &["--nats-creds-file", "/nonexistent/user.creds"],
    )
    .err()
    .expect("the agent must not start")
    .to_string();
    assert!(e.contains("nats_creds_file"), "{e}");
}

/// A subject the server's permissions forbid: the batch is rejected and dead-lettered (not
/// retried forever), and delivery goes on with the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_subject_is_dead_lettered() {
    let Some((dir, nats)) = nats_with_config(
        r#"authorization {
  users = [
    { user: agent, password: pw, permissions: {
        publish: { allow: ["$JS.API.>", "nanogate.test-ns.orders", "nanogate.test-ns.orders.ok.>"] }
        subscribe: { allow: ["_INBOX.>"] } } }
  ]
}"#,
    ) else {
        return;
    };
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pw").unwrap();
    let agent = start_with_password(
        &nats,
        &dir.path().join("agent"),
        &pw,
        &["--flush-interval", "20ms"],
    );
    let wait_for = |name: &'static str, want: f64| wait_counter(&agent, name, want, SECS_20);
    let one = |dest: &str| format!(r#"{{"msg_type":"publish","data":{{"x":1}},"dest":"{dest}"}}"#);
    assert!(oneshot(&agent.socket, one("ok/1").as_bytes()).is_empty());
    wait_for("nanogate_sidecar_delivered_total", 1.0).await;
    assert!(oneshot(&agent.socket, one("secret").as_bytes()).is_empty());
    wait_for("nanogate_sidecar_dead_lettered_total", 1.0).await;
    assert!(oneshot(&agent.socket, one("ok/2").as_bytes()).is_empty());
    wait_for("nanogate_sidecar_delivered_total", 2.0).await;
    let dead = std::fs::read_to_string(agent.spool.join("dead-letter.jsonl")).unwrap();
    println!("dead letter: {}", dead.trim());
    assert!(
        dead.contains("Permissions Violation for Publish to") && dead.contains("\"secret\""),
        "{dead}"
    );
    assert_eq!(dead.lines().count(), 1);
}

/// The agent killed (-9) mid-delivery and restarted on the same spool: the batch that was in
/// flight is sent again with the same `Nats-Msg-Id`s and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kill9_and_restart_keeps_every_message_once() {
    const TOTAL: u64 = 30_000;
    let Some(dir) = nats_dir() else { return };
    let nats = NatsServer::start(&dir.path().join("nats")).unwrap();
    let mut agent = start_agent(
        &nats,
        &dir.path().join("agent"),
        // Large batches: a publish takes long enough that the kill lands in one; and larger
        // than the client's 5,000 acks in flight, which the upstream must publish in windows.
        &[
            "--batch-size",
            "6000",
            "--max-batch-size",
            "6000",
            "--min-batch-interval",
            "0s",
        ],
    )
    .unwrap();
    assert!(send(&agent.socket, 0..TOTAL).is_empty());
    let delivered = || {
        agent
            .metric("nanogate_sidecar_delivered_total")
            .unwrap_or(0.0)
    };
    let (timeout, poll) = (Duration::from_secs(30), Duration::from_millis(2));
    wait_until_every(&agent, timeout, poll, "5,000 delivered", || {
        delivered() >= 5_000.0
    })
    .await;
    // Into the next batch (6,000 messages take a while): part of it is stored, none acked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.restart().unwrap(); // kill -9, then start on the same spool
    let recovered = agent
        .metric("nanogate_sidecar_spool_recovered_messages_total")
        .unwrap_or(0.0) as u64;
    let js = js(&nats).await;
    wait_until(&agent, Duration::from_secs(60), "an empty queue", || {
        agent
            .metric("nanogate_sidecar_queue_depth")
            .is_some_and(|d| d <= 0.0)
    })
    .await;
    let stored = read_stream(&js, "NANOGATE").await;
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for (_, _, payload) in &stored {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        *seen.entry(v["data"]["id"].as_u64().unwrap()).or_default() += 1;
    }
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    println!(
        "agent kill -9: {recovered} messages recovered from the spool and re-sent (of {TOTAL}), {} of them already stored and de-duplicated by the server; stream holds {} ({} distinct, {duplicates} duplicates)",
        dedup_hits(&agent.log_text()),
        stored.len(),
        seen.len()
    );
    assert_eq!(seen.len() as u64, TOTAL);
    assert_eq!(duplicates, 0);
}

/// TLS with a client certificate (mTLS) against a server that verifies it: the CA and the
/// client certificate come from files (the Secrets the injector mounts); without the client
/// certificate the server refuses the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_from_files() {
    let Some(dir) = nats_dir() else { return };
    let TestPki {
        ca,
        server_cert: cert,
        server_key: key,
        client_cert: client,
        client_key,
    } = test_pki(dir.path(), "nanogate nats test CA", "nano-agent");
    let nats = NatsServer::start_with_config(
        &dir.path().join("nats"),
        &format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 2 }}",
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string()
        ),
    )
    .unwrap();
    let url = nats.url().replace("nats://", "tls://");
    let path = |p: &std::path::PathBuf| p.to_str().unwrap().to_string();
    let wait_publish = r#"{"msg_type":"publish","data":{"x":1},"context":{"wait":true}}"#;

    let agent = start_agent_at(
        &url,
        &dir.path().join("agent"),
        &[
            "--upstream-ca",
            &path(&ca),
            "--upstream-client-cert",
            &path(&client),
            "--upstream-client-key",
            &path(&client_key),
        ],
    )
    .unwrap();
    let reply = request_async(&agent.socket, wait_publish).await;
    println!("mTLS wait:true: {reply}");
    assert!(
        reply.contains("\"status\":\"ok\""),
        "{reply}\n{}",
        agent.log_text()
    );
    drop(agent);

    let agent = start_agent_at(
        &url,
        &dir.path().join("agent-no-cert"),
        &["--upstream-ca", &path(&ca)],
    )
    .unwrap();
    let reply = request_async(&agent.socket, wait_publish).await;
    println!("TLS without a client certificate: {reply}");
    assert!(reply.contains("\"status\":\"error\""), "{reply}");
    assert!(reply.contains("check TLS"), "{reply}");
}

/// The API key (the NATS token when no NATS credentials are configured) is read at every
/// connect from its file: a wrong key is refused, the rotated one in the file is used by the
/// next attempt, and the spooled messages go out, with no restart of the agent (issue 21).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_file_is_the_token_of_the_next_connect() {
    let Some((dir, nats)) = nats_with_config("authorization { token: \"nats-key-2\" }\n") else {
        return;
    };
    let key = dir.path().join("api-key");
    std::fs::write(&key, "nats-key-1\n").unwrap();
    let agent = start_agent(
        &nats,
        &dir.path().join("agent"),
        &[
            "--api-key-file",
            key.to_str().unwrap(),
            "--api-key-reload-interval",
            "200ms",
        ],
    )
    .unwrap();
    assert!(send(&agent.socket, 0..10).is_empty());
    // Refused with the old key for a while: nothing delivered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        agent
            .metric("nanogate_sidecar_delivered_total")
            .unwrap_or(0.0),
        0.0,
        "delivered with a key the server refuses"
    );
    let tmp = dir.path().join("api-key.tmp");
    std::fs::write(&tmp, "nats-key-2").unwrap();
    std::fs::rename(&tmp, &key).unwrap();
    let rotated = Instant::now();
    // Delivered with the rotated key.
    wait_counter(&agent, "nanogate_sidecar_delivered_total", 10.0, SECS_20).await;
    println!(
        "delivered with the rotated key {:.1}s after the file changed",
        rotated.elapsed().as_secs_f64()
    );
    assert_eq!(
        agent.metric("nanogate_sidecar_api_key_reloads_total"),
        Some(1.0)
    );
    let log = agent.log_text();
    assert!(!log.contains("nats-key-"), "a key in the log: {log}");
}
