//! Connection state machine over in-memory streams with a fixed authenticator; time is paused
//! so keep-alive and hello timeouts run instantly. The real TLS + TokenReview path is covered by
//! the integration and e2e tests.

use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::{self, Trigger};
use nanogate_protocol::control::{AgentStatus, FrameDecoder, Message, encode, to_value};
use prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::index::tests::{heartbeat, identity};
use super::*;

struct FixedTokens;

impl Authenticator for FixedTokens {
    async fn authenticate(
        &self,
        agent_id: &str,
        credentials: &str,
    ) -> Result<AgentIdentity, Denial> {
        match credentials {
            "good" if agent_id == "uid-1" => Ok(identity(1, "gw")),
            "good" => Err(Denial::PodMismatch {
                bound: "uid-1".into(),
                claimed: agent_id.into(),
            }),
            _ => Err(Denial::TokenRejected("bad token".into())),
        }
    }
}

struct Agent {
    stream: DuplexStream,
    decoder: FrameDecoder,
}

impl Agent {
    async fn send(&mut self, message: Message) {
        self.stream.write_all(&encode(&message)).await.unwrap();
    }

    /// The next frame is a `Bye` with `reason`.
    async fn expect_bye(&mut self, reason: &str) {
        let expected = Message::Bye {
            reason: reason.into(),
        };
        assert_eq!(self.recv().await, Some(expected));
    }

    async fn expect_manager_hello(&mut self) {
        let answer = self.recv().await;
        assert!(
            matches!(answer, Some(Message::ManagerHello { .. })),
            "{answer:?}"
        );
    }

    async fn recv(&mut self) -> Option<Message> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(message) = self.decoder.next_message().unwrap() {
                return Some(message);
            }
            let n = self.stream.read(&mut buf).await.unwrap();
            if n == 0 {
                return None;
            }
            self.decoder.extend(&buf[..n]);
        }
    }
}

fn start(hub: &Arc<Hub>) -> (Agent, tokio::task::JoinHandle<Closed>, Trigger) {
    start_with(hub, Arc::new(FixedTokens))
}

fn start_with<A: Authenticator>(
    hub: &Arc<Hub>,
    auth: Arc<A>,
) -> (Agent, tokio::task::JoinHandle<Closed>, Trigger) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (stop, stopped) = shutdown::channel();
    // Taken here, not in the task, so connections queue in the order they were started.
    let handshake = hub.admission.handshake();
    let task = tokio::spawn(connection::serve(
        server,
        "test".into(),
        hub.clone(),
        auth,
        stopped,
        handshake,
    ));
    (
        Agent {
            stream: client,
            decoder: FrameDecoder::new(),
        },
        task,
        stop,
    )
}

/// A connection through the handshake: uid-1 with a good token, answered with `ManagerHello`.
async fn accepted(hub: &Arc<Hub>) -> (Agent, tokio::task::JoinHandle<Closed>, Trigger) {
    accepted_with(hub, Arc::new(FixedTokens)).await
}

async fn accepted_with<A: Authenticator>(
    hub: &Arc<Hub>,
    auth: Arc<A>,
) -> (Agent, tokio::task::JoinHandle<Closed>, Trigger) {
    let (mut agent, task, stop) = start_with(hub, auth);
    agent.send(hello("uid-1", "good")).await;
    agent.expect_manager_hello().await;
    (agent, task, stop)
}

fn hello(id: &str, token: &str) -> Message {
    Message::AgentHello {
        id: id.into(),
        version: "0.1.0".into(),
        credentials: token.into(),
    }
}

fn hub() -> Arc<Hub> {
    Hub::new(HubConfig::default(), &Registry::new())
}

#[tokio::test(start_paused = true)]
async fn handshake_heartbeat_request_and_bye() {
    let hub = hub();
    let (mut agent, task, _stop) = accepted(&hub).await;

    let data = to_value(&heartbeat(42, AgentStatus::Ready, "closed")).unwrap();
    agent
        .send(Message::Notification {
            kind: "heartbeat".into(),
            data,
        })
        .await;
    agent.send(Message::Ping { data: 9 }).await;
    assert_eq!(agent.recv().await, Some(Message::Pong { data: 9 }));
    let fleet = hub.index.fleet(
        "ns",
        "gw",
        std::time::Instant::now(),
        Duration::from_secs(15),
    );
    assert_eq!(
        (fleet.connected, fleet.healthy, fleet.received_total),
        (1, 1, 42)
    );

    // The hub calls the agent; the agent answers.
    let hub2 = hub.clone();
    let call = tokio::spawn(async move {
        hub2.request("uid-1", "flush", Vec::new(), Duration::from_secs(5))
            .await
    });
    let Some(Message::Request { id, method, .. }) = agent.recv().await else {
        panic!("expected a request")
    };
    assert_eq!(method, "flush");
    agent
        .send(Message::Response {
            id,
            success: true,
            data: rmpv::Value::from("flushed 3"),
        })
        .await;
    assert_eq!(call.await.unwrap(), Ok(rmpv::Value::from("flushed 3")));

    agent
        .send(Message::Bye {
            reason: "draining".into(),
        })
        .await;
    assert_eq!(task.await.unwrap(), Closed::Bye("draining".into()));
    assert!(hub.index.is_empty(), "a closed connection leaves the index");
    assert_eq!(
        hub.metrics.auth.with_label_values(&["accept", "ok"]).get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn refusals_say_bye_and_are_counted() {
    let hub = hub();
    for (token, id) in [("bad", "uid-1"), ("good", "uid-other")] {
        let (mut agent, task, _stop) = start(&hub);
        agent.send(hello(id, token)).await;
        agent.expect_bye("authentication failed").await;
        assert!(matches!(task.await.unwrap(), Closed::Denied(_)));
    }
    assert_eq!(
        hub.metrics
            .auth
            .with_label_values(&["deny", "authentication_failed"])
            .get(),
        2
    );
    assert!(hub.index.is_empty());
}

#[tokio::test(start_paused = true)]
async fn silent_client_is_dropped_after_the_hello_timeout() {
    let hub = hub();
    let (_agent, task, _stop) = start(&hub);
    let closed = tokio::time::timeout(Duration::from_secs(4), task)
        .await
        .expect("closed within 3 s")
        .unwrap();
    assert_eq!(closed, Closed::HelloTimeout);
    assert_eq!(
        hub.metrics
            .auth
            .with_label_values(&["deny", "hello_timeout"])
            .get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn first_frame_must_be_hello() {
    let hub = hub();
    let (mut agent, task, _stop) = start(&hub);
    agent.send(Message::Ping { data: 1 }).await;
    agent.expect_bye("expected AgentHello").await;
    assert_eq!(task.await.unwrap(), Closed::NotHello);
}

#[tokio::test(start_paused = true)]
async fn unanswered_ping_closes_the_connection() {
    let hub = hub();
    let (mut agent, task, _stop) = accepted(&hub).await;
    // The hub pings after 30 s; we never answer.
    assert!(matches!(agent.recv().await, Some(Message::Ping { .. })));
    agent.expect_bye("ping timeout").await;
    assert_eq!(task.await.unwrap(), Closed::PongTimeout);
}

#[tokio::test(start_paused = true)]
async fn notification_flood_is_rate_limited() {
    let hub = hub();
    let (mut agent, _task, _stop) = accepted(&hub).await;
    for _ in 0..100 {
        agent
            .send(Message::Notification {
                kind: "register".into(),
                data: rmpv::Value::Nil,
            })
            .await;
    }
    agent.send(Message::Ping { data: 5 }).await;
    assert_eq!(agent.recv().await, Some(Message::Pong { data: 5 }));
    let limited = hub
        .metrics
        .notifications
        .with_label_values(&["register", "rate_limited"])
        .get();
    assert!(
        limited >= 70,
        "expected most of the flood to be limited, got {limited}"
    );
}

#[tokio::test(start_paused = true)]
async fn oversized_frame_is_refused() {
    let hub = hub();
    let (mut agent, task, _stop) = accepted(&hub).await;
    agent
        .stream
        .write_all(&(2u32 << 20).to_be_bytes())
        .await
        .unwrap();
    assert!(matches!(agent.recv().await, Some(Message::Bye { .. })));
    assert_eq!(task.await.unwrap(), Closed::Protocol("too_large"));
}

#[tokio::test(start_paused = true)]
async fn left_behind_reports_outlive_the_connection_and_empty_ones_are_not_counted() {
    use nanogate_protocol::control::LeftBehind;
    let hub = hub();
    let (mut agent, task, _stop) = accepted(&hub).await;
    let left = |messages: u64| Message::Notification {
        kind: "left_behind".into(),
        data: to_value(&LeftBehind {
            messages,
            bytes: messages * 100,
            reason: "shutdown deadline".into(),
        })
        .unwrap(),
    };
    agent.send(left(0)).await;
    agent.send(left(12)).await;
    agent
        .send(Message::Notification {
            kind: "left_behind".into(),
            data: rmpv::Value::from("twelve"),
        })
        .await;
    agent
        .send(Message::Bye {
            reason: "agent shutting down".into(),
        })
        .await;
    assert_eq!(
        task.await.unwrap(),
        Closed::Bye("agent shutting down".into())
    );

    // The pod is gone from the index; its report stays with its gateway.
    assert!(hub.index.is_empty());
    let unwritten = hub.left_behind.unwritten("ns", "gw");
    assert_eq!(
        (unwritten.messages, unwritten.bytes, unwritten.shutdowns),
        (12, 1200, 1)
    );
    assert_eq!(unwritten.last.map(|(pod, _)| pod), Some("pod-1".into()));
    let reports = hub.left_behind.take_unannounced("ns", "gw");
    assert_eq!(reports.len(), 1);
    assert!(
        reports[0]
            .note()
            .starts_with("pod pod-1 left 12 messages (1200 bytes) undelivered at shutdown"),
        "{}",
        reports[0].note()
    );
    assert_eq!(hub.metrics.left_behind.get(), 12);
    let count = |outcome: &str| {
        hub.metrics
            .notifications
            .with_label_values(&["left_behind", outcome])
            .get()
    };
    assert_eq!((count("ok"), count("ignored"), count("invalid")), (1, 1, 1));
}

/// A report sent as a request is answered once it is recorded (the agent then knows it
/// arrived); an invalid one is refused with the reason; other methods are refused by name.
#[tokio::test(start_paused = true)]
async fn left_behind_requests_are_answered_once_recorded() {
    use nanogate_protocol::control::{LeftBehind, to_kwargs};
    let hub = hub();
    let (mut agent, _task, _stop) = accepted(&hub).await;
    let request = |id: &str, method: &str, kwargs| Message::Request {
        id: id.into(),
        method: method.into(),
        args: Vec::new(),
        kwargs,
    };
    let report = to_kwargs(&LeftBehind {
        messages: 10,
        bytes: 420,
        reason: "shutdown deadline".into(),
    })
    .unwrap();
    agent.send(request("agent-1", "left_behind", report)).await;
    let Some(Message::Response { id, success, data }) = agent.recv().await else {
        panic!("no response");
    };
    assert_eq!((id.as_str(), success), ("agent-1", true), "{data}");
    // Recorded before the answer went out.
    assert_eq!(hub.left_behind.unwritten("ns", "gw").messages, 10);

    let mistyped = vec![("messages".to_string(), rmpv::Value::from("ten"))];
    agent
        .send(request("agent-2", "left_behind", mistyped))
        .await;
    let Some(Message::Response { id, success, data }) = agent.recv().await else {
        panic!("no response");
    };
    assert_eq!((id.as_str(), success), ("agent-2", false));
    assert!(
        data.as_str()
            .unwrap()
            .starts_with("invalid left_behind report"),
        "{data}"
    );

    agent.send(request("agent-3", "reboot", Vec::new())).await;
    let Some(Message::Response { success, data, .. }) = agent.recv().await else {
        panic!("no response");
    };
    assert!(!success);
    assert_eq!(data.as_str(), Some("the hub serves no method \"reboot\""));
    assert_eq!(hub.left_behind.unwritten("ns", "gw").messages, 10);
    assert_eq!(hub.metrics.left_behind.get(), 10);
}

fn denied(hub: &Hub, reason: &str) -> u64 {
    hub.metrics.auth.with_label_values(&["deny", reason]).get()
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_silent_handshakes_evicts_the_oldest_and_a_real_agent_gets_through() {
    let hub = Hub::new(
        HubConfig {
            max_handshakes: 4,
            ..HubConfig::default()
        },
        &Registry::new(),
    );
    let flood: Vec<_> = (0..20).map(|_| start(&hub)).collect();
    let (_agent, _task, _stop) = accepted(&hub).await;
    // 21 handshakes through 4 places: the 17 oldest were dropped at once, not timed out.
    let mut evicted = 0;
    let mut still_open = Vec::new();
    for (peer, task, stop) in flood {
        if tokio::time::timeout(Duration::from_millis(1), task)
            .await
            .is_ok_and(|closed| closed.is_ok_and(|c| c == Closed::Evicted))
        {
            evicted += 1;
        }
        // Kept open: a closed peer would leave the count by itself.
        still_open.push((peer, stop));
    }
    assert_eq!(evicted, 17);
    assert_eq!(denied(&hub, "handshake_evicted"), 17);
    assert_eq!(
        hub.admission.handshakes(),
        3,
        "the accepted agent left the count"
    );
    assert_eq!(hub.index.identities("ns", "gw")[0].agent_id, "uid-1");
}

#[tokio::test(start_paused = true)]
async fn bytes_before_hello_are_capped() {
    let hub = Hub::new(
        HubConfig {
            pre_auth_bytes: 1024,
            ..HubConfig::default()
        },
        &Registry::new(),
    );
    let (mut peer, task, _stop) = start(&hub);
    // A frame that claims 512 KiB (under the 1 MiB frame limit) and keeps coming.
    peer.stream
        .write_all(&(512u32 << 10).to_be_bytes())
        .await
        .unwrap();
    let _ = peer.stream.write_all(&[0u8; 4096]).await;
    assert_eq!(task.await.unwrap(), Closed::PreAuthBytes);
    assert_eq!(denied(&hub, "pre_auth_bytes"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_handshake_that_trickles_ends_at_the_handshake_deadline() {
    let hub = Hub::new(
        HubConfig {
            hello_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            ..HubConfig::default()
        },
        &Registry::new(),
    );
    let (_peer, task, _stop) = start(&hub);
    let closed = tokio::time::timeout(Duration::from_secs(11), task)
        .await
        .expect("ended by the 10 s deadline")
        .unwrap();
    assert_eq!(closed, Closed::HandshakeTimeout);
    assert_eq!(denied(&hub, "handshake_timeout"), 1);
}

/// Answers "good" at once and never answers "hang"; counts the calls.
#[derive(Default)]
struct Hanging {
    calls: std::sync::atomic::AtomicUsize,
}

impl Authenticator for Hanging {
    async fn authenticate(
        &self,
        agent_id: &str,
        credentials: &str,
    ) -> Result<AgentIdentity, Denial> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if credentials == "hang" {
            std::future::pending::<()>().await;
        }
        FixedTokens.authenticate(agent_id, credentials).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_token_review_that_hangs_does_not_block_other_handshakes() {
    // A handshake deadline well after the TokenReview timeouts, so only those end them.
    let hub = Hub::new(
        HubConfig {
            handshake_timeout: Duration::from_secs(30),
            ..HubConfig::default()
        },
        &Registry::new(),
    );
    let limits = AuthLimits {
        timeout: Duration::from_secs(5),
        concurrency: 2,
        ..AuthLimits::default()
    };
    let auth = Arc::new(Bounded::new(Hanging::default(), limits));
    // Three hang, one more than there are turns.
    let mut hung = Vec::new();
    for i in 0..3 {
        let (mut peer, task, stop) = start_with(&hub, auth.clone());
        peer.send(hello(&format!("uid-h{i}"), "hang")).await;
        hung.push((peer, task, stop));
    }
    let started = tokio::time::Instant::now();
    let (_agent, _task, _stop) = accepted_with(&hub, auth.clone()).await;
    // It waited at most for the hung ones' timeout, not for ever.
    assert!(
        started.elapsed() <= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The two that had turns were refused at their 5 s timeout; the third got its turn then
    // and was refused 5 s later. None stays for ever.
    for (_peer, task, _stop) in hung {
        let closed = task.await.unwrap();
        assert!(
            matches!(&closed, Closed::Denied(r) if r.contains("no answer within 5s")),
            "{closed:?}"
        );
    }
    assert_eq!(started.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn an_accepted_token_is_cached_until_the_ttl() {
    let hub = hub();
    let limits = AuthLimits {
        cache_ttl: Duration::from_secs(60),
        ..AuthLimits::default()
    };
    let auth = Arc::new(Bounded::new(Hanging::default(), limits));
    let calls =
        |auth: &Bounded<Hanging>| auth.inner().calls.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..3 {
        let (_agent, _task, _stop) = accepted_with(&hub, auth.clone()).await;
    }
    assert_eq!(calls(&auth), 1, "one TokenReview for three connections");
    // Another token for the same agent is checked.
    let (mut agent, _task, _stop) = start_with(&hub, auth.clone());
    agent.send(hello("uid-1", "bad")).await;
    assert!(matches!(agent.recv().await, Some(Message::Bye { .. })));
    assert_eq!(calls(&auth), 2);
    tokio::time::advance(Duration::from_secs(61)).await;
    let (_agent, _task, _stop) = accepted_with(&hub, auth.clone()).await;
    assert_eq!(calls(&auth), 3, "checked again after the TTL");
}

/// Accepts any token for uid-1 (the expiry is what is under test).
struct AnyToken;

impl Authenticator for AnyToken {
    async fn authenticate(&self, _: &str, _: &str) -> Result<AgentIdentity, Denial> {
        Ok(identity(1, "gw"))
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_ends_when_its_token_expires() {
    use base64::Engine as _;
    let hub = Hub::new(
        HubConfig {
            // No keep-alive traffic in the way.
            ping_interval: Duration::from_secs(24 * 3600),
            ..HubConfig::default()
        },
        &Registry::new(),
    );
    let (mut agent, task, _stop) = start_with(&hub, Arc::new(AnyToken));
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 90;
    let part = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let token = format!(
        "{}.{}.sig",
        part(serde_json::json!({"alg": "RS256"})),
        part(serde_json::json!({"exp": exp}))
    );
    let started = tokio::time::Instant::now();
    agent.send(hello("uid-1", &token)).await;
    agent.expect_manager_hello().await;
    agent.expect_bye(TOKEN_EXPIRED).await;
    assert_eq!(task.await.unwrap(), Closed::TokenExpired);
    let lasted = started.elapsed();
    assert!(
        (Duration::from_secs(88)..=Duration::from_secs(91)).contains(&lasted),
        "{lasted:?}"
    );
    assert!(hub.index.is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_agent_whose_pod_or_gateway_is_gone_is_sent_away() {
    let hub = hub();
    let (mut agent, task, _stop) = accepted(&hub).await;
    hub.send_away("uid-2", "pod deleted"); // not connected: nothing happens
    hub.send_away("uid-1", "gateway deleted");
    agent.expect_bye("gateway deleted").await;
    assert_eq!(
        task.await.unwrap(),
        Closed::SentAway("gateway deleted".into())
    );
    assert!(hub.index.is_empty());
}

/// An agent sent away because its pod or gateway is gone is authenticated in full on its next
/// connection (the token cache would otherwise let it straight back in), so it is refused while
/// they are gone and accepted once they are back.
#[tokio::test(start_paused = true)]
async fn an_agent_sent_away_is_checked_again_not_let_in_from_the_token_cache() {
    let hub = hub();
    let auth = Arc::new(Bounded::new(Hanging::default(), AuthLimits::default()));
    let calls =
        |auth: &Bounded<Hanging>| auth.inner().calls.load(std::sync::atomic::Ordering::SeqCst);
    let (mut agent, task, _stop) = accepted_with(&hub, auth.clone()).await;
    hub.send_away("uid-1", "gateway deleted");
    assert!(matches!(agent.recv().await, Some(Message::Bye { .. })));
    task.await.unwrap();
    // The reconnect, with the same token, goes through the authenticator again.
    let (_again, _task, _stop) = accepted_with(&hub, auth.clone()).await;
    assert_eq!(
        calls(&auth),
        2,
        "the reconnect after a send-away was checked again"
    );
    // And is cached again after that check.
    let (_third, _task, _stop) = accepted_with(&hub, auth.clone()).await;
    assert_eq!(calls(&auth), 2);
}
