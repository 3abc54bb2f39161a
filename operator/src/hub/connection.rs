//! One agent connection, from AgentHello to Bye: TokenReview authentication, keep-alive pings,
//! heartbeats into the index, requests and their responses (flow in `docs/architecture.md`,
//! "Control channel").

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nanogate_protocol::control::{
    FrameDecoder, FrameError, LEFT_BEHIND, LeftBehind, Message, NO_SUCH_METHOD, encode,
    from_kwargs, from_value, response, response_result,
};
use rmpv::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::admission::Handshake;
use super::auth::Authenticator;
use super::index::AgentIdentity;
use super::left_behind::Report;
use super::{Hub, HubMetrics};
use crate::shutdown::Shutdown;

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Room made in a connection's frame buffer before each read; the bytes go straight into it,
/// so a connection keeps no separate read buffer: at 10,000 agents each KiB held per
/// connection is 10 MiB of the hub's memory. A heartbeat is a few hundred bytes; larger frames
/// take a few reads.
const READ_CHUNK: usize = 512;

/// A call from the hub to one agent (`reload`, `flush`, `drain`, `status`).
pub struct OutboundRequest {
    pub method: String,
    pub kwargs: Vec<(String, Value)>,
    pub reply: oneshot::Sender<Result<Value, String>>,
}

/// What the rest of the hub asks of one agent's connection.
pub enum ToAgent {
    /// Boxed: a channel allocates room for 32 of these per connection up front, so the enum
    /// is kept as small as its other variant.
    Request(Box<OutboundRequest>),
    /// End the session with this `Bye` reason (its pod or gateway is gone); the agent
    /// reconnects and is authenticated again.
    SendAway(String),
}

/// `Bye` reason when the session's token expires: the agent reconnects with the token the
/// kubelet has rotated in the meantime.
pub const TOKEN_EXPIRED: &str = "token expired; reconnect with a fresh token";

/// How a connection ended, for logs and metrics.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    HelloTimeout,
    NotHello,
    Denied(String),
    Bye(String),
    PongTimeout,
    Protocol(&'static str),
    PeerClosed,
    Shutdown,
    /// This replica does not lead (any more): the agent was sent to reconnect.
    NotLeader,
    /// Dropped before authentication to make room for a newer handshake (handshake cap).
    Evicted,
    /// TLS, hello and authentication took longer than the handshake timeout.
    HandshakeTimeout,
    /// More than the pre-authentication byte cap came without a complete AgentHello.
    PreAuthBytes,
    /// Closed at once: the hub serves its maximum of connections.
    ConnectionLimit,
    /// The token the session was authenticated with expired.
    TokenExpired,
    /// Sent away by the hub (reason given): the pod or gateway is gone.
    SentAway(String),
}

/// Token bucket for notifications: `rate` per second, bursts of `burst`.
struct RateLimit {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl RateLimit {
    fn allow(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, message: &Message) -> std::io::Result<()> {
    writer.write_all(&encode(message)).await?;
    writer.flush().await
}

/// Reads until one frame is complete. Cancel-safe: bytes already read stay in `decoder`.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    decoder: &mut FrameDecoder,
) -> Result<Option<Message>, FrameError> {
    loop {
        if let Some(message) = decoder.next_message()? {
            return Ok(Some(message));
        }
        let buffer = decoder.buffer_mut();
        buffer.reserve(READ_CHUNK);
        match reader.read_buf(buffer).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Like [`read_frame`], but gives up (`Err`) once more than `cap` bytes came without a
/// complete frame: before authentication a peer may not make the hub buffer a full frame.
async fn read_hello<R: AsyncRead + Unpin>(
    reader: &mut R,
    decoder: &mut FrameDecoder,
    cap: usize,
) -> Result<Result<Option<Message>, FrameError>, Closed> {
    let mut received = 0usize;
    loop {
        match decoder.next_message() {
            Ok(Some(message)) => return Ok(Ok(Some(message))),
            Ok(None) => {}
            Err(error) => return Ok(Err(error)),
        }
        if received > cap {
            return Err(Closed::PreAuthBytes);
        }
        // Never read past the cap by more than one byte: that is enough to tell.
        let room = READ_CHUNK.min(cap.saturating_sub(received).saturating_add(1));
        let buffer = decoder.buffer_mut();
        buffer.reserve(room);
        match (&mut *reader).take(room as u64).read_buf(buffer).await {
            Ok(0) | Err(_) => return Ok(Ok(None)),
            Ok(n) => received += n,
        }
    }
}

/// Counts and logs a connection the hub's limits refused before authentication.
pub(crate) fn refused(metrics: &HubMetrics, peer: &str, closed: Closed) -> Closed {
    let reason = match closed {
        Closed::Evicted => "dropped for a newer handshake (handshake limit)",
        Closed::HandshakeTimeout => "handshake not done within the handshake timeout",
        Closed::PreAuthBytes => "too many bytes before AgentHello",
        Closed::ConnectionLimit => "connection limit reached",
        _ => "refused",
    };
    metrics
        .auth
        .with_label_values(&["deny", deny_label(&closed)])
        .inc();
    // Debug, not warn: a flood would otherwise flood the log too; the metric counts them.
    debug!(target: "nanogate::audit", decision = "deny", %peer, %reason, "hub connection");
    closed
}

/// Serves one agent until it leaves, fails keep-alive or `shutdown` fires. `handshake` is its
/// place among the handshakes in progress ([`super::Admission`]), given up once the agent is
/// authenticated.
pub fn serve<S, A>(
    stream: S,
    peer: String,
    hub: Arc<Hub>,
    auth: Arc<A>,
    shutdown: Shutdown,
    handshake: Handshake,
) -> impl Future<Output = Closed> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    A: Authenticator,
{
    // Split before the future is built: a stream passed in would keep its own (TLS-sized) slot
    // in every connection's task for the whole session.
    let (reader, writer) = tokio::io::split(stream);
    serve_split(reader, writer, peer, hub, auth, shutdown, handshake)
}

async fn serve_split<S, A>(
    mut reader: ReadHalf<S>,
    mut writer: WriteHalf<S>,
    peer: String,
    hub: Arc<Hub>,
    auth: Arc<A>,
    shutdown: Shutdown,
    mut handshake: Handshake,
) -> Closed
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    A: Authenticator,
{
    let cfg = hub.config.clone();
    let metrics = &hub.metrics;
    let mut decoder = FrameDecoder::new();

    // 1–3: hello, leadership, authentication, all by the handshake deadline. Boxed: its state
    // holds an API call (a TokenReview), several KiB that would otherwise size every
    // connection's task for the whole session (heaptrack at 10,000 agents: 8.3 KiB a task).
    let greeted = tokio::select! {
        greeted = Box::pin(greet(&mut reader, &mut writer, &mut decoder, &peer, &hub, auth.as_ref())) => greeted,
        closed = handshake.interrupted() => Err(refused(metrics, &peer, closed)),
    };
    drop(handshake);
    let (identity, token_lifetime) = match greeted {
        Ok(greeted) => greeted,
        Err(closed) => return closed,
    };
    if send(
        &mut writer,
        &Message::ManagerHello {
            version: cfg.version.clone(),
        },
    )
    .await
    .is_err()
    {
        return Closed::PeerClosed;
    }
    metrics.auth.with_label_values(&["accept", "ok"]).inc();
    info!(target: "nanogate::audit", decision = "accept", %peer, agent_id = %identity.agent_id,
          namespace = %identity.namespace, pod = %identity.pod, gateway = %identity.gateway, "hub connection");
    // The hello (a service-account token, 1–2 KiB) is decoded: a session's frames are a few
    // hundred bytes, so it does not keep the decoder's hello-sized buffer.
    if decoder.buffered() == 0 {
        decoder = FrameDecoder::new();
    }
    let session = Session {
        identity,
        token_lifetime,
    };
    serve_agent(reader, writer, decoder, peer, hub, session, shutdown).await
}

/// AgentHello, the leader check and authentication: who the agent is and how long its token
/// is valid, or how it ended.
async fn greet<R, W, A>(
    reader: &mut R,
    writer: &mut W,
    decoder: &mut FrameDecoder,
    peer: &str,
    hub: &Hub,
    auth: &A,
) -> Result<(AgentIdentity, Option<Duration>), Closed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    A: Authenticator,
{
    let cfg = &hub.config;
    let metrics = &hub.metrics;
    let peer = peer.to_string();
    // 1. AgentHello within the hello timeout.
    let hello = tokio::time::timeout(
        cfg.hello_timeout,
        read_hello(reader, decoder, cfg.pre_auth_bytes),
    )
    .await;
    let hello = match hello {
        Ok(Err(closed)) => return Err(refused(metrics, &peer, closed)),
        Ok(Ok(frame)) => Ok(frame),
        Err(elapsed) => Err(elapsed),
    };
    let (agent_id, credentials) = match hello {
        Err(_) => {
            return Err(audit_deny(
                metrics,
                &peer,
                None,
                "hello timeout",
                Closed::HelloTimeout,
            ));
        }
        Ok(Ok(Some(Message::AgentHello {
            id, credentials, ..
        }))) => (id, credentials),
        Ok(Ok(Some(other))) => {
            let _ = send(
                &mut *writer,
                &Message::Bye {
                    reason: "expected AgentHello".into(),
                },
            )
            .await;
            return Err(audit_deny(
                metrics,
                &peer,
                None,
                &format!("first frame was {}", other.name()),
                Closed::NotHello,
            ));
        }
        Ok(Err(error)) => {
            return Err(audit_deny(
                metrics,
                &peer,
                None,
                &error.to_string(),
                Closed::Protocol(error.metric_label()),
            ));
        }
        Ok(Ok(None)) => {
            return Err(audit_deny(
                metrics,
                &peer,
                None,
                "closed before hello",
                Closed::PeerClosed,
            ));
        }
    };

    // 2. Only the leader serves agents; a follower sends them back to the Service.
    if !hub.is_leading() {
        let _ = send(
            &mut *writer,
            &Message::Bye {
                reason: super::NOT_LEADER.into(),
            },
        )
        .await;
        metrics
            .auth
            .with_label_values(&["redirect", "not_leader"])
            .inc();
        info!(target: "nanogate::audit", decision = "redirect", %peer, %agent_id,
              reason = "this replica is not the leader", "hub connection");
        return Err(Closed::NotLeader);
    }

    // 3. Authenticate; the token itself is never logged. An agent sent away because its pod
    // or gateway is gone is checked in full, not let back in from the token cache.
    if hub.take_sent_away(&agent_id) {
        auth.forget(&agent_id);
    }
    match auth.authenticate(&agent_id, &credentials).await {
        Ok(identity) => Ok((identity, super::auth::token_lifetime(&credentials))),
        Err(denial) => {
            // Audit first: the decision is on record before the agent hears of it.
            let reason = denial.to_string();
            let closed = audit_deny(
                metrics,
                &peer,
                Some(&agent_id),
                &reason,
                Closed::Denied(reason.clone()),
            );
            let bye = Message::Bye {
                reason: "authentication failed".into(),
            };
            let _ = send(&mut *writer, &bye).await;
            Err(closed)
        }
    }
}

/// Who an authenticated connection serves, and for how long its token is valid (`None`: no
/// expiry could be read, e.g. a test token).
struct Session {
    identity: AgentIdentity,
    token_lifetime: Option<Duration>,
}

/// An authenticated agent, until it leaves, fails keep-alive, its token expires, the hub sends
/// it away or `shutdown` fires.
#[allow(clippy::too_many_arguments)]
async fn serve_agent<R, W>(
    mut reader: R,
    mut writer: W,
    mut decoder: FrameDecoder,
    peer: String,
    hub: Arc<Hub>,
    session: Session,
    mut shutdown: Shutdown,
) -> Closed
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Session {
        identity,
        token_lifetime,
    } = session;
    let cfg = hub.config.clone();
    let metrics = &hub.metrics;
    // 4. Serve until the end.
    let connection = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let (requests_tx, mut requests) = mpsc::channel::<ToAgent>(16);
    hub.index
        .connected(identity.clone(), connection, Instant::now());
    hub.attach(&identity.agent_id, connection, requests_tx);
    metrics.connected.inc();

    let mut pending: HashMap<String, oneshot::Sender<Result<Value, String>>> = HashMap::new();
    let mut next_request = 0u64;
    let mut limiter = RateLimit {
        tokens: cfg.notification_burst,
        rate: cfg.notification_rate,
        burst: cfg.notification_burst,
        last: Instant::now(),
    };
    let mut ping_timer = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.ping_interval,
        cfg.ping_interval,
    );
    let mut outstanding_ping: Option<i64> = None;
    let far_future = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
    // Built once for the session, not once per frame: a timer re-registered and a leadership
    // subscription taken for every heartbeat of every agent add up at fleet scale.
    let session_end = tokio::time::sleep_until(
        token_lifetime.map_or(far_future, |left| tokio::time::Instant::now() + left),
    );
    let pong_deadline = tokio::time::sleep_until(far_future);
    let lost_leadership = hub.lost_leadership();
    let stopping = shutdown.wait();
    tokio::pin!(session_end, pong_deadline, lost_leadership, stopping);

    let closed = loop {
        tokio::select! {
            frame = read_frame(&mut reader, &mut decoder) => {
                let message = match frame {
                    Ok(Some(message)) => message,
                    Ok(None) => break Closed::PeerClosed,
                    Err(error) => {
                        warn!(%error, agent_id = %identity.agent_id, "bad frame; closing");
                        let _ = send(&mut writer, &Message::Bye { reason: error.to_string() }).await;
                        break Closed::Protocol(error.metric_label());
                    }
                };
                let now = Instant::now();
                hub.index.seen(&identity.agent_id, connection, now);
                match message {
                    Message::Ping { data } => {
                        if send(&mut writer, &Message::Pong { data }).await.is_err() { break Closed::PeerClosed; }
                    }
                    Message::Pong { data } => {
                        if outstanding_ping == Some(data) {
                            outstanding_ping = None;
                        }
                    }
                    Message::Bye { reason } => break Closed::Bye(reason),
                    Message::Response { id, success, data } => {
                        if let Some(reply) = pending.remove(&id) {
                            let _ = reply.send(response_result(success, data));
                        }
                    }
                    Message::Notification { kind, data } => {
                        if !limiter.allow(now) {
                            metrics.notifications.with_label_values(&[kind.as_str(), "rate_limited"]).inc();
                            continue;
                        }
                        let started = Instant::now();
                        handle_notification(&hub, &identity, connection, &kind, data, now);
                        metrics.handling.observe(started.elapsed().as_secs_f64());
                    }
                    Message::Request { id, method, kwargs, .. } => {
                        let answer = if method != LEFT_BEHIND {
                            Err(format!("{NO_SUCH_METHOD} {method:?}"))
                        } else if !limiter.allow(now) {
                            metrics.notifications.with_label_values(&[LEFT_BEHIND, "rate_limited"]).inc();
                            Err("rate limited; retry later".to_string())
                        } else {
                            let report = from_kwargs::<LeftBehind>(kwargs).map_err(|e| e.to_string());
                            record_left_behind(&hub, &identity, report)
                        };
                        if send(&mut writer, &response(id, answer.map(Value::from))).await.is_err() { break Closed::PeerClosed; }
                    }
                    Message::AgentHello { .. } | Message::ManagerHello { .. } => {
                        let _ = send(&mut writer, &Message::Bye { reason: "unexpected hello".into() }).await;
                        break Closed::Protocol("unexpected_hello");
                    }
                }
            }
            Some(to_agent) = requests.recv() => match to_agent {
                ToAgent::SendAway(reason) => {
                    let _ = send(&mut writer, &Message::Bye { reason: reason.clone() }).await;
                    break Closed::SentAway(reason);
                }
                ToAgent::Request(request) => {
                    next_request += 1;
                    let id = format!("{connection}-{next_request}");
                    let frame = Message::Request { id: id.clone(), method: request.method, args: Vec::new(), kwargs: request.kwargs };
                    if send(&mut writer, &frame).await.is_err() {
                        let _ = request.reply.send(Err("connection closed".into()));
                        break Closed::PeerClosed;
                    }
                    pending.insert(id, request.reply);
                }
            },
            _ = &mut session_end => {
                let _ = send(&mut writer, &Message::Bye { reason: TOKEN_EXPIRED.into() }).await;
                break Closed::TokenExpired;
            }
            _ = ping_timer.tick() => {
                if outstanding_ping.is_none() {
                    let data = i64::from(rand::random::<u32>() % 1_000_000);
                    if send(&mut writer, &Message::Ping { data }).await.is_err() { break Closed::PeerClosed; }
                    outstanding_ping = Some(data);
                    pong_deadline.as_mut().reset(tokio::time::Instant::now() + cfg.pong_timeout);
                }
            }
            _ = &mut pong_deadline, if outstanding_ping.is_some() => {
                let _ = send(&mut writer, &Message::Bye { reason: "ping timeout".into() }).await;
                break Closed::PongTimeout;
            }
            _ = &mut stopping => {
                let _ = send(&mut writer, &Message::Bye { reason: "hub shutting down".into() }).await;
                break Closed::Shutdown;
            }
            _ = &mut lost_leadership => {
                let _ = send(&mut writer, &Message::Bye { reason: super::NOT_LEADER.into() }).await;
                break Closed::NotLeader;
            }
        }
    };
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err("connection closed before the agent answered".into()));
    }
    hub.detach(&identity.agent_id, connection);
    hub.index.disconnected(&identity.agent_id, connection);
    metrics.connected.dec();
    info!(target: "nanogate::audit", decision = "closed", %peer, agent_id = %identity.agent_id, reason = ?closed, "hub connection");
    closed
}

/// Records an agent's `left_behind` report (request or notification) in the gateway's ledger,
/// counted by outcome; the answer for a request: what was done, or why it was refused.
fn record_left_behind(
    hub: &Hub,
    identity: &AgentIdentity,
    report: Result<LeftBehind, String>,
) -> Result<String, String> {
    let count = |outcome| {
        hub.metrics
            .notifications
            .with_label_values(&[LEFT_BEHIND, outcome])
            .inc();
    };
    match report {
        Ok(left) if left.messages > 0 => {
            count("ok");
            hub.metrics.left_behind.inc_by(left.messages);
            warn!(agent_id = %identity.agent_id, namespace = %identity.namespace,
                  pod = %identity.pod, gateway = %identity.gateway, messages = left.messages,
                  bytes = left.bytes, reason = %left.reason,
                  "sidecar left messages undelivered at shutdown");
            let messages = left.messages;
            hub.left_behind.record(
                &identity.namespace,
                &identity.gateway,
                Report {
                    pod: identity.pod.clone(),
                    messages,
                    bytes: left.bytes,
                    reason: left.reason,
                    at_unix: unix_now(),
                },
            );
            Ok(format!("recorded {messages} messages left behind"))
        }
        Ok(_) => {
            // Agents report only when something is left; nothing to count.
            count("ignored");
            Ok("nothing left behind; nothing recorded".into())
        }
        Err(error) => {
            count("invalid");
            warn!(%error, agent_id = %identity.agent_id, "invalid left_behind report");
            Err(format!("invalid left_behind report: {error}"))
        }
    }
}

fn handle_notification(
    hub: &Hub,
    identity: &AgentIdentity,
    connection: u64,
    kind: &str,
    data: Value,
    now: Instant,
) {
    match kind {
        "heartbeat" => match from_value(data) {
            Ok(heartbeat) => {
                hub.metrics
                    .notifications
                    .with_label_values(&["heartbeat", "ok"])
                    .inc();
                hub.index
                    .heartbeat(&identity.agent_id, connection, heartbeat, now);
            }
            Err(error) => {
                hub.metrics
                    .notifications
                    .with_label_values(&["heartbeat", "invalid"])
                    .inc();
                warn!(%error, agent_id = %identity.agent_id, "invalid heartbeat");
            }
        },
        // Agents before 0.2 send their report as a notification (nothing answers it).
        LEFT_BEHIND => {
            let _ = record_left_behind(
                hub,
                identity,
                from_value::<LeftBehind>(data).map_err(|e| e.to_string()),
            );
        }
        "register" => {
            hub.metrics
                .notifications
                .with_label_values(&["register", "ok"])
                .inc();
            debug!(agent_id = %identity.agent_id, register = %data, "agent registered");
        }
        _ => {
            hub.metrics
                .notifications
                .with_label_values(&["unknown", "ignored"])
                .inc();
        }
    }
}

fn audit_deny(
    metrics: &HubMetrics,
    peer: &str,
    agent_id: Option<&str>,
    reason: &str,
    closed: Closed,
) -> Closed {
    metrics
        .auth
        .with_label_values(&["deny", deny_label(&closed)])
        .inc();
    warn!(target: "nanogate::audit", decision = "deny", %peer, agent_id = agent_id.unwrap_or("-"), %reason, "hub connection");
    closed
}

fn deny_label(closed: &Closed) -> &'static str {
    match closed {
        Closed::HelloTimeout => "hello_timeout",
        Closed::Evicted => "handshake_evicted",
        Closed::HandshakeTimeout => "handshake_timeout",
        Closed::PreAuthBytes => "pre_auth_bytes",
        Closed::ConnectionLimit => "connection_limit",
        Closed::NotHello => "not_hello",
        Closed::Denied(_) => "authentication_failed",
        Closed::Protocol(label) => label,
        _ => "closed",
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}
