//! The control channel's reconnects against a hub on a real TLS socket: a hub replica that is
//! not the leader refuses every agent with `Bye`, and the agent must back off (growing, with
//! jitter, capped) instead of redialling at once — every attempt costs the hub a TLS handshake
//! and an audit line.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanogate_protocol::control::{FrameDecoder, Heartbeat, Message, encode};
use nanogate_sidecar::control::{self, ControlConfig, ControlHandler};
use rmpv::Value;
use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// The agent side: never asked for anything, since the hub refuses every hello.
struct Refused;

impl ControlHandler for Refused {
    fn heartbeat(&self) -> Heartbeat {
        unreachable!("a refused agent sends no heartbeat")
    }
    fn register_info(&self) -> serde_json::Value {
        unreachable!("a refused agent does not register")
    }
    async fn handle(&self, _: &str, _: Vec<(String, Value)>) -> Result<Value, String> {
        unreachable!("a refused agent serves no request")
    }
}

/// A hub that answers every AgentHello with `Bye{"not the leader; reconnect"}` (what an
/// operator replica that lost the election says) and records when each connection came in.
async fn follower_hub(
    dir: &std::path::Path,
) -> (String, std::path::PathBuf, Arc<Mutex<Vec<Instant>>>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let ca = dir.join("hub-ca.pem");
    std::fs::write(&ca, c.cert.pem()).unwrap();
    let key = PrivateKeyDer::Pkcs8(c.key_pair.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![c.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            seen.lock().unwrap().push(Instant::now());
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut decoder = FrameDecoder::new();
            let mut buf = [0u8; 4096];
            let hello = loop {
                match decoder.next_message() {
                    Ok(Some(message)) => break Some(message),
                    Ok(None) => {}
                    Err(_) => break None,
                }
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => decoder.extend(&buf[..n]),
                }
            };
            assert!(
                matches!(hello, Some(Message::AgentHello { .. })),
                "the agent opens with AgentHello, got {hello:?}"
            );
            let bye = Message::Bye {
                reason: "not the leader; reconnect".into(),
            };
            let _ = tls.write_all(&encode(&bye)).await;
            let _ = tls.shutdown().await;
        }
    });
    (format!("localhost:{port}"), ca, attempts)
}

#[tokio::test]
async fn not_the_leader_is_answered_with_a_growing_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let (hub_addr, ca, attempts) = follower_hub(dir.path()).await;
    let token = dir.path().join("token");
    std::fs::write(&token, "tok").unwrap();
    let mut cfg = ControlConfig::new(&hub_addr, ca, token, "uid-1");
    // Short, so five attempts take about a second.
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_secs(5);
    let initial = cfg.backoff_initial;

    let (_notifier, outbox) = control::outbox();
    let (stop, stopped) = nanogate_sidecar::shutdown::channel();
    let agent = tokio::spawn(control::run(cfg, Arc::new(Refused), outbox, stopped));

    let deadline = Instant::now() + Duration::from_secs(20);
    while attempts.lock().unwrap().len() < 5 {
        assert!(
            Instant::now() < deadline,
            "only {} attempts in 20 s",
            attempts.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.trigger();
    agent.await.unwrap();

    let at = attempts.lock().unwrap().clone();
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        assert!(
            *gap >= initial,
            "attempts {} and {} only {gap:?} apart (minimum backoff {initial:?}); gaps {gaps:?}",
            i + 1,
            i + 2
        );
    }
    assert!(
        gaps[3] > gaps[0],
        "the backoff does not grow: gaps {gaps:?}"
    );
    // Doubling from `initial`: the fourth wait is at least 8 × initial, whatever the jitter.
    assert!(
        gaps[3] >= initial * 8,
        "the fourth wait is {:?}, under 8 × {initial:?}; gaps {gaps:?}",
        gaps[3]
    );
}
