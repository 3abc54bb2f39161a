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
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (stop, stopped) = shutdown::channel();
    let task = tokio::spawn(connection::serve(
        server,
        "test".into(),
        hub.clone(),
        Arc::new(FixedTokens),
        stopped,
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
    let (mut agent, task, _stop) = start(&hub);
    agent.send(hello("uid-1", "good")).await;
    assert!(matches!(
        agent.recv().await,
        Some(Message::ManagerHello { .. })
    ));

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
        assert_eq!(
            agent.recv().await,
            Some(Message::Bye {
                reason: "authentication failed".into()
            })
        );
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
    assert_eq!(
        agent.recv().await,
        Some(Message::Bye {
            reason: "expected AgentHello".into()
        })
    );
    assert_eq!(task.await.unwrap(), Closed::NotHello);
}

#[tokio::test(start_paused = true)]
async fn unanswered_ping_closes_the_connection() {
    let hub = hub();
    let (mut agent, task, _stop) = start(&hub);
    agent.send(hello("uid-1", "good")).await;
    agent.recv().await;
    // The hub pings after 30 s; we never answer.
    assert!(matches!(agent.recv().await, Some(Message::Ping { .. })));
    assert_eq!(
        agent.recv().await,
        Some(Message::Bye {
            reason: "ping timeout".into()
        })
    );
    assert_eq!(task.await.unwrap(), Closed::PongTimeout);
}

#[tokio::test(start_paused = true)]
async fn notification_flood_is_rate_limited() {
    let hub = hub();
    let (mut agent, _task, _stop) = start(&hub);
    agent.send(hello("uid-1", "good")).await;
    agent.recv().await;
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
    let (mut agent, task, _stop) = start(&hub);
    agent.send(hello("uid-1", "good")).await;
    agent.recv().await;
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
    let (mut agent, task, _stop) = start(&hub);
    agent.send(hello("uid-1", "good")).await;
    assert!(matches!(
        agent.recv().await,
        Some(Message::ManagerHello { .. })
    ));
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
