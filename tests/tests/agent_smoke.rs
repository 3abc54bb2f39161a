//! Cross-crate smoke test of the harness the e2e demo uses: the platform test server and the
//! real `nano-agent` binary located with `agent_bin()`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nanogate_tests::agent::{Agent, AgentConfig, agent_bin};
use nanogate_tests::platform::PlatformServer;
use serde_json::json;

fn roundtrip(socket: &std::path::Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = vec![];
    s.read_to_end(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_check_and_auth() {
    let platform = PlatformServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(AgentConfig::for_platform(
        agent_bin(),
        dir.path(),
        &platform,
        &["--flush-interval", "20ms"],
    ))
    .unwrap();
    assert_eq!(
        roundtrip(
            &agent.socket,
            br#"{"msg_type":"publish","data":{"hello":"world"}}"#
        ),
        b""
    );
    assert!(platform.wait_for(1, Duration::from_secs(10)).await);
    assert_eq!(platform.received()[0]["data"], json!({"hello": "world"}));
    platform.queue_for_check(json!({"cmd": "x"}));
    assert_eq!(
        roundtrip(
            &agent.socket,
            br#"{"msg_type":"msg_check","context":{"limit":5}}"#
        ),
        br#"[{"cmd":"x"}]"#
    );
    assert_eq!(
        roundtrip(&agent.socket, br#"{"msg_type":"msg_check"}"#),
        b"204"
    );
    assert_eq!(platform.unauthorized(), 0);
    // The spool's capacity is exported beside its fill, for the "spool filling" alert.
    assert_eq!(
        agent.metric("nanogate_sidecar_spool_max_bytes"),
        Some(256.0 * 1024.0 * 1024.0)
    );
    assert!(agent.metric("nanogate_sidecar_spool_bytes").is_some());

    // A wrong key: the platform refuses with 401. The message stays in the spool and is
    // retried (issue 15: a rotated key must not empty the spool), nothing is dead-lettered,
    // and the log and /healthz say to check the API key Secret.
    let dir2 = tempfile::tempdir().unwrap();
    let wrong = Agent::start(AgentConfig {
        bin: agent_bin(),
        dir: dir2.path().to_owned(),
        upstream_url: platform.url(),
        api_key: "wrong-key".into(),
        extra_args: vec![
            "--flush-interval".into(),
            "20ms".into(),
            "--backoff-max".into(),
            "200ms".into(),
            "--backoff-initial".into(),
            "50ms".into(),
        ],
    })
    .unwrap();
    assert_eq!(
        roundtrip(&wrong.socket, br#"{"msg_type":"publish","data":1}"#),
        b""
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while wrong.metric(r#"nanogate_sidecar_upstream_errors_total{kind="unauthorized"}"#) < Some(3.0)
    {
        assert!(std::time::Instant::now() < deadline, "401 not retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(platform.unauthorized() >= 3);
    assert_eq!(platform.received_count(), 1);
    assert_eq!(
        wrong.metric("nanogate_sidecar_dead_lettered_total"),
        Some(0.0)
    );
    assert_eq!(wrong.metric("nanogate_sidecar_queue_depth"), Some(1.0));
    assert!(!wrong.spool.join("dead-letter.jsonl").exists());
    let (_, health) = wrong.http_get("/healthz").unwrap();
    assert!(
        health.contains(r#""last_error":"unauthorized: HTTP 401"#),
        "{health}"
    );
    assert!(
        wrong.log_text().contains("check the API key Secret"),
        "{}",
        wrong.log_text()
    );
}
