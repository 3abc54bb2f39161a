//! Control-channel client (the agent side of the RedPepper manager/agent protocol): one
//! authenticated TLS connection to the operator hub, kept up with backoff, carrying `register` once per connection, a
//! `heartbeat` every interval, and the hub's `reload`/`flush`/`drain`/`status` requests.
//! Other notifications (`left_behind` at shutdown) go out through a [`Notifier`].

pub mod agent;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use nanogate_protocol::control::{
    FrameDecoder, Heartbeat, Message, encode, response, response_result, to_value,
};
use rmpv::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::shutdown::Shutdown;

/// Where and how to reach the hub. Defaults follow the architecture (3 s hello, 30 s/5 s ping).
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// `host:port` of the hub (the operator's hub Service, port 7051).
    pub hub_addr: String,
    /// Name checked against the hub's certificate (defaults to the host part of `hub_addr`).
    pub server_name: String,
    /// PEM CA that signed the hub's certificate (the operator's CA).
    pub ca_file: PathBuf,
    /// Projected service-account token (audience `nanogate-hub`); re-read on every connect
    /// because the kubelet rotates it.
    pub token_file: PathBuf,
    /// The pod UID.
    pub agent_id: String,
    pub heartbeat_interval: Duration,
    pub hello_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// Reconnect backoff ([`Backoff::spaced`]): no wait is shorter than `backoff_initial`;
    /// waits double while the hub keeps refusing, up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl ControlConfig {
    pub fn new(hub_addr: &str, ca_file: PathBuf, token_file: PathBuf, agent_id: &str) -> Self {
        let server_name = hub_addr
            .rsplit_once(':')
            .map(|(host, _)| host)
            .unwrap_or(hub_addr)
            .to_string();
        Self {
            hub_addr: hub_addr.to_string(),
            server_name,
            ca_file,
            token_file,
            agent_id: agent_id.to_string(),
            heartbeat_interval: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(3),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// What the agent exposes to the hub; implemented by the running agent.
pub trait ControlHandler: Send + Sync + 'static {
    /// The current heartbeat payload.
    fn heartbeat(&self) -> Heartbeat;
    /// Node info and capabilities, sent once per connection as `register`.
    fn register_info(&self) -> serde_json::Value;
    /// Serves a hub request; `Err` is the message sent back with `success: false`.
    fn handle(
        &self,
        method: &str,
        kwargs: Vec<(String, Value)>,
    ) -> impl Future<Output = Result<Value, String>> + Send;
}

/// A frame waiting for the control channel: a notification, whose `written` fires once it
/// has been flushed to a hub connection, or a request, whose `answer` gets the hub's response.
#[derive(Debug)]
enum Outgoing {
    Notification {
        kind: String,
        data: Value,
        written: oneshot::Sender<()>,
    },
    Request {
        method: String,
        kwargs: Vec<(String, Value)>,
        answer: oneshot::Sender<Result<Value, String>>,
    },
}

impl Outgoing {
    /// Whether its caller stopped waiting (it was told the frame did not go out).
    fn abandoned(&self) -> bool {
        match self {
            Outgoing::Notification { written, .. } => written.is_closed(),
            Outgoing::Request { answer, .. } => answer.is_closed(),
        }
    }
}

/// Sends notifications and requests through the running control channel (see [`outbox`]).
#[derive(Debug, Clone)]
pub struct Notifier(mpsc::Sender<Outgoing>);

/// The control channel's end of [`outbox`]: handed to [`run`], it outlives every connection,
/// so a frame queued while the hub is unreachable goes out on the next connection.
#[derive(Debug)]
pub struct Outbox(mpsc::Receiver<Outgoing>);

#[cfg(test)]
impl Outbox {
    /// Takes the next queued request and answers it with `answer`, as a hub would.
    pub(crate) async fn next_request(
        &mut self,
        answer: Result<Value, String>,
    ) -> Option<(String, Vec<(String, Value)>)> {
        loop {
            match self.0.recv().await? {
                Outgoing::Request {
                    method,
                    kwargs,
                    answer: reply,
                } => {
                    let _ = reply.send(answer);
                    return Some((method, kwargs));
                }
                Outgoing::Notification { written, .. } => drop(written),
            }
        }
    }

    /// Takes the next queued notification and marks it written, as a connection would.
    pub(crate) async fn next_written(&mut self) -> Option<(String, Value)> {
        loop {
            match self.0.recv().await? {
                Outgoing::Notification {
                    kind,
                    data,
                    written,
                } => {
                    let _ = written.send(());
                    return Some((kind, data));
                }
                Outgoing::Request { answer, .. } => drop(answer),
            }
        }
    }
}

/// A [`Notifier`] and the [`Outbox`] it feeds.
pub fn outbox() -> (Notifier, Outbox) {
    // A handful: notifications other than heartbeats are rare (one at shutdown).
    let (tx, rx) = mpsc::channel(4);
    (Notifier(tx), Outbox(rx))
}

/// Why a [`Notifier::request`] got no answer it could use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// No hub answered within the timeout: not connected, or every connection it went out on
    /// ended before the answer.
    Unanswered,
    /// The hub answered `success: false` with this text.
    Refused(String),
}

impl Notifier {
    /// Sends notification `kind` with `data` and waits until it has been flushed to the hub,
    /// at most `timeout`. A connection that breaks before the frame is written gets it again
    /// on the next connection; one still queued when `timeout` passes is dropped unsent.
    /// Returns whether the frame was flushed to a hub connection — not that the hub read it:
    /// what must arrive goes as a [`request`](Self::request).
    pub async fn notify(&self, kind: &str, data: Value, timeout: Duration) -> bool {
        let frame = |written| Outgoing::Notification {
            kind: kind.to_string(),
            data: data.clone(),
            written,
        };
        self.until_taken(frame, timeout).await.is_some()
    }

    /// Sends request `method` with `kwargs` to the hub and waits for its answer, at most
    /// `timeout`. A connection that ends before the answer came sends it again on the next
    /// one, so a hub may see it twice (it handled the first but could not answer).
    pub async fn request(
        &self,
        method: &str,
        kwargs: Vec<(String, Value)>,
        timeout: Duration,
    ) -> Result<Value, RequestError> {
        let frame = |answer| Outgoing::Request {
            method: method.to_string(),
            kwargs: kwargs.clone(),
            answer,
        };
        match self.until_taken(frame, timeout).await {
            Some(answer) => answer.map_err(RequestError::Refused),
            None => Err(RequestError::Unanswered),
        }
    }

    /// Queues `frame(reply)` until a connection fires `reply`, at most `timeout`; a connection
    /// that ends first drops it, and it is queued again for the next one. `None`: timed out,
    /// or the control channel has stopped.
    async fn until_taken<T>(
        &self,
        frame: impl Fn(oneshot::Sender<T>) -> Outgoing,
        timeout: Duration,
    ) -> Option<T> {
        let attempts = async {
            loop {
                let (reply, replied) = oneshot::channel();
                self.0.send(frame(reply)).await.ok()?;
                if let Ok(value) = replied.await {
                    return Some(value);
                }
            }
        };
        tokio::time::timeout(timeout, attempts).await.ok().flatten()
    }
}

/// Why one connection ended.
#[derive(Debug)]
pub enum Ended {
    /// The hub said `Bye`: in place of ManagerHello (a refusal) or later in the session.
    Bye {
        reason: String,
        after_hello: bool,
    },
    Shutdown,
}

/// Keeps a hub connection up until `shutdown` fires.
pub async fn run<H: ControlHandler>(
    cfg: ControlConfig,
    handler: Arc<H>,
    mut outbox: Outbox,
    shutdown: Shutdown,
) {
    // Spaced: a hub that refuses at once (not the leader, authentication failed) is redialled
    // no sooner than `backoff_initial`, and ever more slowly while it keeps refusing.
    let mut backoff = Backoff::spaced(cfg.backoff_initial, cfg.backoff_max);
    loop {
        let result = tokio::select! {
            result = connect_and_serve(&cfg, handler.clone(), &mut outbox, shutdown.clone()) => result,
            _ = shutdown.triggered() => return,
        };
        match result {
            Ok(Ended::Shutdown) => return,
            Ok(Ended::Bye {
                reason,
                after_hello,
            }) => {
                warn!(%reason, hub = %cfg.hub_addr, "hub closed the control channel");
                // Only a session the hub accepted counts as success. A `Bye` in place of
                // ManagerHello ("not the leader; reconnect" from a follower, "authentication
                // failed") is a refusal: resetting on it made every sidecar redial every
                // 0–500 ms for as long as no replica led.
                if after_hello {
                    backoff.reset();
                }
            }
            Err(error) => {
                warn!(error = %format!("{error:#}"), hub = %cfg.hub_addr, "control channel failed")
            }
        }
        let delay = backoff.next_delay();
        debug!(?delay, "reconnecting to the hub");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.triggered() => return,
        }
    }
}

/// After its `Bye` at shutdown, how long the agent waits for the hub to close the connection.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

async fn connect_and_serve<H: ControlHandler>(
    cfg: &ControlConfig,
    handler: Arc<H>,
    outbox: &mut Outbox,
    shutdown: Shutdown,
) -> anyhow::Result<Ended> {
    let token = std::fs::read_to_string(&cfg.token_file)
        .with_context(|| format!("reading the hub token {}", cfg.token_file.display()))?;
    let connector = tls_connector(&cfg.ca_file)?;
    let server_name = rustls::pki_types::ServerName::try_from(cfg.server_name.clone())
        .with_context(|| format!("hub server name {:?}", cfg.server_name))?;
    let tcp = tokio::time::timeout(cfg.hello_timeout, TcpStream::connect(&cfg.hub_addr))
        .await
        .context("connecting to the hub timed out")?
        .with_context(|| format!("connecting to the hub at {}", cfg.hub_addr))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(cfg.hello_timeout, connector.connect(server_name, tcp))
        .await
        .context("TLS handshake with the hub timed out")?
        .context("TLS handshake with the hub")?;
    serve(stream, cfg, token.trim(), handler, outbox, shutdown).await
}

fn tls_connector(ca_file: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let config = crate::upstream::tls::trusting_only("hub_ca_file", ca_file)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, message: &Message) -> anyhow::Result<()> {
    writer.write_all(&encode(message)).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads until a frame is complete; `Ok(None)` on end of stream. Cancel-safe.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    decoder: &mut FrameDecoder,
    buf: &mut [u8],
) -> anyhow::Result<Option<Message>> {
    loop {
        if let Some(message) = decoder.next_message()? {
            return Ok(Some(message));
        }
        let n = reader.read(buf).await?;
        if n == 0 {
            return Ok(None);
        }
        decoder.extend(buf.get(..n).unwrap_or_default());
    }
}

/// The RedPepper agent flow over an established stream (generic so tests can use memory pipes).
pub async fn serve<S, H>(
    stream: S,
    cfg: &ControlConfig,
    token: &str,
    handler: Arc<H>,
    outbox: &mut Outbox,
    shutdown: Shutdown,
) -> anyhow::Result<Ended>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: ControlHandler,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];

    let hello = Message::AgentHello {
        id: cfg.agent_id.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        credentials: token.to_string(),
    };
    send(&mut writer, &hello).await?;
    match tokio::time::timeout(
        cfg.hello_timeout,
        read_frame(&mut reader, &mut decoder, &mut buf),
    )
    .await
    {
        Err(_) => bail!("no ManagerHello within {:?}", cfg.hello_timeout),
        Ok(Ok(Some(Message::ManagerHello { version }))) => {
            info!(hub = %cfg.hub_addr, %version, "connected to the hub")
        }
        Ok(Ok(Some(Message::Bye { reason }))) => {
            return Ok(Ended::Bye {
                reason,
                after_hello: false,
            });
        }
        Ok(Ok(Some(other))) => {
            let _ = send(
                &mut writer,
                &Message::Bye {
                    reason: "expected ManagerHello".into(),
                },
            )
            .await;
            bail!("hub answered {} instead of ManagerHello", other.name());
        }
        Ok(Ok(None)) => bail!("hub closed the connection during the handshake"),
        Ok(Err(error)) => return Err(error),
    }
    let register = to_value(&handler.register_info())?;
    send(
        &mut writer,
        &Message::Notification {
            kind: "register".into(),
            data: register,
        },
    )
    .await?;

    // Requests are served concurrently (a `flush` may take a while); answers come back here.
    let (answers_tx, mut answers) = mpsc::channel::<Message>(16);
    let mut heartbeat = tokio::time::interval(cfg.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.ping_interval,
        cfg.ping_interval,
    );
    let mut outstanding_ping: Option<(i64, tokio::time::Instant)> = None;
    let far_future = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
    // The agent's own requests waiting for the hub's answer, by id. Dropped with the
    // connection: their callers ask again on the next one.
    let mut awaiting: HashMap<String, oneshot::Sender<Result<Value, String>>> = HashMap::new();
    let mut next_request = 0u64;

    loop {
        let pong_deadline = outstanding_ping.map(|(_, at)| at).unwrap_or(far_future);
        tokio::select! {
            frame = read_frame(&mut reader, &mut decoder, &mut buf) => match frame? {
                None => bail!("hub closed the connection"),
                Some(Message::Ping { data }) => send(&mut writer, &Message::Pong { data }).await?,
                Some(Message::Pong { data }) => {
                    if outstanding_ping.is_some_and(|(sent, _)| sent == data) {
                        outstanding_ping = None;
                    }
                }
                Some(Message::Bye { reason }) => return Ok(Ended::Bye { reason, after_hello: true }),
                Some(Message::Response { id, success, data }) => {
                    if let Some(answer) = awaiting.remove(&id) {
                        let _ = answer.send(response_result(success, data));
                    }
                }
                Some(Message::Request { id, method, kwargs, .. }) => {
                    let (handler, answers_tx) = (handler.clone(), answers_tx.clone());
                    tokio::spawn(async move {
                        let answer = response(id, handler.handle(&method, kwargs).await);
                        let _ = answers_tx.send(answer).await;
                    });
                }
                Some(other) => debug!(kind = other.name(), "ignoring frame from the hub"),
            },
            Some(answer) = answers.recv() => send(&mut writer, &answer).await?,
            Some(out) = outbox.0.recv() => {
                if out.abandoned() {
                    continue; // its sender gave up waiting and was told it was not sent
                }
                match out {
                    Outgoing::Notification { kind, data, written } => {
                        send(&mut writer, &Message::Notification { kind, data }).await?;
                        let _ = written.send(());
                    }
                    Outgoing::Request { method, kwargs, answer } => {
                        next_request += 1;
                        let id = format!("agent-{next_request}");
                        let frame = Message::Request { id: id.clone(), method, args: Vec::new(), kwargs };
                        send(&mut writer, &frame).await?;
                        awaiting.insert(id, answer);
                    }
                }
            }
            _ = heartbeat.tick() => {
                let data = handler.heartbeat().to_data()?;
                send(&mut writer, &Message::Notification { kind: "heartbeat".into(), data }).await?;
            }
            _ = ping.tick() => {
                if outstanding_ping.is_none() {
                    let data = i64::from(rand::random::<u32>() % 1_000_000);
                    send(&mut writer, &Message::Ping { data }).await?;
                    outstanding_ping = Some((data, tokio::time::Instant::now() + cfg.pong_timeout));
                }
            }
            _ = tokio::time::sleep_until(pong_deadline) => {
                let _ = send(&mut writer, &Message::Bye { reason: "ping timeout".into() }).await;
                bail!("hub did not answer a ping within {:?}", cfg.pong_timeout);
            }
            _ = shutdown.triggered() => {
                if send(&mut writer, &Message::Bye { reason: "agent shutting down".into() }).await.is_ok() {
                    // Wait (briefly) for the hub to close in answer: it then has read every
                    // frame before the Bye, e.g. a `left_behind` sent just before. Closing
                    // first could also reset the connection and lose them in its buffers.
                    let closed = async {
                        let _ = writer.shutdown().await;
                        while let Ok(Some(_)) = read_frame(&mut reader, &mut decoder, &mut buf).await {}
                    };
                    if tokio::time::timeout(CLOSE_TIMEOUT, closed).await.is_err() {
                        debug!(hub = %cfg.hub_addr, "hub did not close within {CLOSE_TIMEOUT:?} after Bye");
                    }
                }
                return Ok(Ended::Shutdown);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanogate_protocol::control::from_value;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::time::Instant;

    struct Fake {
        flushes: AtomicU32,
    }

    impl ControlHandler for Fake {
        fn heartbeat(&self) -> Heartbeat {
            Heartbeat {
                gateway: "gw".into(),
                pod: "ns/pod".into(),
                ..Heartbeat::ready("uid-1", 7, 1)
            }
        }
        fn register_info(&self) -> serde_json::Value {
            serde_json::json!({"capabilities": ["reload", "flush", "drain", "status"]})
        }
        async fn handle(
            &self,
            method: &str,
            _kwargs: Vec<(String, Value)>,
        ) -> Result<Value, String> {
            match method {
                "flush" => {
                    self.flushes.fetch_add(1, Ordering::Relaxed);
                    Ok(Value::from("flushed"))
                }
                other => Err(format!("unknown method {other}")),
            }
        }
    }

    struct Hub {
        stream: tokio::io::DuplexStream,
        decoder: FrameDecoder,
    }

    impl Hub {
        async fn recv(&mut self) -> Option<Message> {
            let mut buf = [0u8; 4096];
            read_frame(&mut self.stream, &mut self.decoder, &mut buf)
                .await
                .unwrap()
        }
        async fn send(&mut self, message: Message) {
            self.stream.write_all(&encode(&message)).await.unwrap();
        }
    }

    /// The agent `uid-1` serving the control channel with `token` over an in-memory pipe of
    /// `capacity` bytes, in the background: the hub's end, the agent's handler, the task.
    fn start(
        capacity: usize,
        token: &'static str,
        mut outbox: Outbox,
        stopped: crate::shutdown::Shutdown,
    ) -> (
        Hub,
        Arc<Fake>,
        tokio::task::JoinHandle<anyhow::Result<Ended>>,
    ) {
        let (agent_side, hub_side) = tokio::io::duplex(capacity);
        let cfg = ControlConfig::new("hub:7051", "ca".into(), "token".into(), "uid-1");
        let handler = Arc::new(Fake {
            flushes: AtomicU32::new(0),
        });
        let h = handler.clone();
        let agent =
            tokio::spawn(
                async move { serve(agent_side, &cfg, token, h, &mut outbox, stopped).await },
            );
        let hub = Hub {
            stream: hub_side,
            decoder: FrameDecoder::new(),
        };
        (hub, handler, agent)
    }

    #[tokio::test(start_paused = true)]
    async fn hello_register_heartbeats_requests_and_shutdown() {
        let (stop, stopped) = crate::shutdown::channel();
        let (_notifier, outbox) = outbox();
        let (mut hub, handler, agent) = start(64 * 1024, "tok", outbox, stopped);

        let Some(Message::AgentHello {
            id, credentials, ..
        }) = hub.recv().await
        else {
            panic!("hello first")
        };
        assert_eq!((id.as_str(), credentials.as_str()), ("uid-1", "tok"));
        hub.send(Message::ManagerHello {
            version: "0.1.0".into(),
        })
        .await;
        assert!(
            matches!(hub.recv().await, Some(Message::Notification { kind, .. }) if kind == "register")
        );
        let Some(Message::Notification { kind, data }) = hub.recv().await else {
            panic!("heartbeat")
        };
        assert_eq!(kind, "heartbeat");
        assert_eq!(from_value::<Heartbeat>(data).unwrap().received_total, 7);

        for (id, method) in [("r1", "flush"), ("r2", "nope")] {
            hub.send(Message::Request {
                id: id.into(),
                method: method.into(),
                args: vec![],
                kwargs: vec![],
            })
            .await;
        }
        let mut answers = Vec::new();
        while answers.len() < 2 {
            match hub.recv().await {
                Some(Message::Response { id, success, .. }) => answers.push((id, success)),
                Some(_) => {}
                None => panic!("closed"),
            }
        }
        answers.sort();
        assert_eq!(
            answers,
            vec![("r1".to_string(), true), ("r2".to_string(), false)]
        );
        assert_eq!(handler.flushes.load(Ordering::Relaxed), 1);

        // Next heartbeat arrives one interval later (time is paused, so exactly).
        let before = tokio::time::Instant::now();
        loop {
            if let Some(Message::Notification { kind, .. }) = hub.recv().await
                && kind == "heartbeat"
            {
                break;
            }
        }
        assert!(tokio::time::Instant::now() - before <= Duration::from_secs(5));

        stop.trigger();
        assert_eq!(
            hub.recv().await,
            Some(Message::Bye {
                reason: "agent shutting down".into()
            })
        );
        assert!(matches!(agent.await.unwrap(), Ok(Ended::Shutdown)));
    }

    #[tokio::test(start_paused = true)]
    async fn refused_hello_ends_with_bye() {
        let (_stop, stopped) = crate::shutdown::channel();
        let (_notifier, outbox) = outbox();
        let (mut hub, _, agent) = start(4096, "bad", outbox, stopped);
        hub.recv().await;
        hub.send(Message::Bye {
            reason: "authentication failed".into(),
        })
        .await;
        assert!(
            matches!(agent.await.unwrap(), Ok(Ended::Bye { reason, after_hello: false }) if reason == "authentication failed")
        );
    }

    fn left_behind(messages: u64) -> Value {
        to_value(&nanogate_protocol::control::LeftBehind {
            messages,
            bytes: messages * 40,
            reason: "shutdown deadline".into(),
        })
        .unwrap()
    }

    /// Connects `hub` and answers the handshake; returns once `register` arrived.
    async fn handshake(hub: &mut Hub) {
        assert!(matches!(hub.recv().await, Some(Message::AgentHello { .. })));
        hub.send(Message::ManagerHello {
            version: "0.1.0".into(),
        })
        .await;
        assert!(
            matches!(hub.recv().await, Some(Message::Notification { kind, .. }) if kind == "register")
        );
    }

    /// Frames until the next notification of `kind` (heartbeats come in between).
    async fn next_notification(hub: &mut Hub, kind: &str) -> Value {
        loop {
            match hub.recv().await {
                Some(Message::Notification { kind: k, data }) if k == kind => return data,
                Some(_) => {}
                None => panic!("closed before a {kind} notification"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_notification_goes_out_before_the_bye_and_the_agent_waits_for_the_hub_to_close() {
        let (stop, stopped) = crate::shutdown::channel();
        let (notifier, outbox) = outbox();
        let (mut hub, _, agent) = start(64 * 1024, "tok", outbox, stopped);
        handshake(&mut hub).await;

        let notified = tokio::spawn(async move {
            notifier
                .notify("left_behind", left_behind(7), Duration::from_secs(2))
                .await
        });
        assert_eq!(
            next_notification(&mut hub, "left_behind").await,
            left_behind(7)
        );
        assert!(notified.await.unwrap(), "reported as flushed");

        stop.trigger();
        loop {
            match hub.recv().await {
                Some(Message::Bye { reason }) => {
                    assert_eq!(reason, "agent shutting down");
                    break;
                }
                Some(_) => {}
                None => panic!("closed without Bye"),
            }
        }
        // The agent lingers until the hub closes (it has then read everything)…
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!agent.is_finished(), "waits for the hub to close");
        let closing = tokio::time::Instant::now();
        drop(hub);
        assert!(matches!(agent.await.unwrap(), Ok(Ended::Shutdown)));
        // …and no longer.
        assert!(closing.elapsed() < CLOSE_TIMEOUT);
    }

    /// Frames until the next request (heartbeats come in between): its id, method and kwargs.
    async fn next_request(hub: &mut Hub) -> (String, String, Vec<(String, Value)>) {
        loop {
            match hub.recv().await {
                Some(Message::Request {
                    id, method, kwargs, ..
                }) => return (id, method, kwargs),
                Some(_) => {}
                None => panic!("closed before a request"),
            }
        }
    }

    fn report_kwargs(messages: u64) -> Vec<(String, Value)> {
        nanogate_protocol::control::to_kwargs(&nanogate_protocol::control::LeftBehind {
            messages,
            bytes: messages * 40,
            reason: "shutdown deadline".into(),
        })
        .unwrap()
    }

    /// A frame flushed into a connection is not a frame the hub handled: a hub that sends the
    /// agent away at that moment (its pod deleted, leadership lost) closes without reading it.
    /// A report counts as made only once the hub answers it; unanswered, it is not.
    #[tokio::test(start_paused = true)]
    async fn a_report_the_hub_read_but_never_answered_is_not_reported() {
        let (notifier, outbox) = outbox();
        let (_stop, stopped) = crate::shutdown::channel();
        let (mut hub, _, agent) = start(64 * 1024, "tok", outbox, stopped);
        handshake(&mut hub).await;
        let reported = tokio::spawn(async move {
            notifier
                .request("left_behind", report_kwargs(7), Duration::from_secs(2))
                .await
        });
        // The hub takes the frame off the wire, then goes away without handling it.
        let (_, method, kwargs) = next_request(&mut hub).await;
        assert_eq!((method.as_str(), kwargs), ("left_behind", report_kwargs(7)));
        drop(hub);
        let _ = agent.await;
        assert_eq!(
            reported.await.unwrap(),
            Err(RequestError::Unanswered),
            "a report no hub answered was called reported"
        );
    }

    /// The hub's answer is the request's result, matched by id; a refusal carries its text.
    #[tokio::test(start_paused = true)]
    async fn requests_get_the_answer_with_their_id() {
        let (notifier, outbox) = outbox();
        let (_stop, stopped) = crate::shutdown::channel();
        let (mut hub, _, _agent) = start(64 * 1024, "tok", outbox, stopped);
        handshake(&mut hub).await;
        let ask = |messages| {
            let notifier = notifier.clone();
            tokio::spawn(async move {
                notifier
                    .request(
                        "left_behind",
                        report_kwargs(messages),
                        Duration::from_secs(2),
                    )
                    .await
            })
        };
        let (first, second) = (ask(1), ask(2));
        let (id_a, _, kwargs_a) = next_request(&mut hub).await;
        let (id_b, _, _) = next_request(&mut hub).await;
        assert_ne!(id_a, id_b);
        // Answered in the other order: each caller still gets its own answer.
        let (ok_id, refused_id) = if kwargs_a == report_kwargs(1) {
            (id_a, id_b)
        } else {
            (id_b, id_a)
        };
        hub.send(Message::Response {
            id: refused_id,
            success: false,
            data: Value::from("rate limited"),
        })
        .await;
        hub.send(Message::Response {
            id: ok_id,
            success: true,
            data: Value::from("recorded"),
        })
        .await;
        // An answer to no request of ours is ignored.
        hub.send(Message::Response {
            id: "agent-999".into(),
            success: true,
            data: Value::Nil,
        })
        .await;
        assert_eq!(first.await.unwrap(), Ok(Value::from("recorded")));
        assert_eq!(
            second.await.unwrap(),
            Err(RequestError::Refused("rate limited".into()))
        );
    }

    /// A hub on a real TLS socket that answers every AgentHello with `Bye{"not the leader;
    /// reconnect"}` (what an operator replica that lost the election says); returns its
    /// address, its CA file and when each connection came in.
    async fn follower_hub(
        dir: &std::path::Path,
    ) -> (String, PathBuf, Arc<std::sync::Mutex<Vec<Instant>>>) {
        let (acceptor, ca_pem) = crate::upstream::tls::self_signed_acceptor("localhost");
        let ca = dir.join("hub-ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = attempts.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                seen.lock().unwrap().push(Instant::now());
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = [0u8; 4096];
                let hello = read_frame(&mut tls, &mut FrameDecoder::new(), &mut buf).await;
                assert!(
                    matches!(hello, Ok(Some(Message::AgentHello { .. }))),
                    "the agent opens with AgentHello, got {hello:?}"
                );
                let bye = Message::Bye {
                    reason: "not the leader; reconnect".into(),
                };
                let _ = send(&mut tls, &bye).await;
                let _ = tls.shutdown().await;
            }
        });
        (format!("localhost:{port}"), ca, attempts)
    }

    /// A refused hello is no session: the agent must not redial at once (every attempt costs
    /// the hub a TLS handshake and an audit line) but back off, ever longer, never under
    /// `backoff_initial`. Real time and sockets: the waits are short.
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
        let handler = Arc::new(Fake {
            flushes: AtomicU32::new(0),
        });
        let (_notifier, outbox) = outbox();
        let (stop, stopped) = crate::shutdown::channel();
        let agent = tokio::spawn(run(cfg, handler, outbox, stopped));

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

    #[tokio::test(start_paused = true)]
    async fn a_notification_waits_for_the_next_connection_within_its_timeout() {
        let (notifier, outbox) = outbox();
        // Not connected: the notification waits, then the caller gives up after its timeout.
        let started = tokio::time::Instant::now();
        assert!(
            !notifier
                .notify("left_behind", left_behind(3), Duration::from_secs(2))
                .await
        );
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        // Queued while disconnected, it goes out once a connection is up.
        let queued = tokio::spawn({
            let notifier = notifier.clone();
            async move {
                notifier
                    .notify("left_behind", left_behind(5), Duration::from_secs(10))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_stop, stopped) = crate::shutdown::channel();
        let (mut hub, _, _agent) = start(64 * 1024, "tok", outbox, stopped);
        handshake(&mut hub).await;
        // The one given up on is dropped (its sender was told it was not sent); the queued
        // one goes out.
        assert_eq!(
            next_notification(&mut hub, "left_behind").await,
            left_behind(5)
        );
        assert!(queued.await.unwrap());
    }
}
