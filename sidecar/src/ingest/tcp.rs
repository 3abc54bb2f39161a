//! The optional TCP listener (SecureAgentMessaging frames; off unless `tcp_listen` is set).
//!
//! Peers send newline-delimited JSON frames (`nanogate_protocol::tcp`). A `data` frame carries
//! an app socket message and goes the socket's way: same validation, same stamping, appended to
//! the same spool (that is the moment it is accepted), then answered with an `ack` — or with an
//! `error` frame carrying the socket's error reply. Frames of one read are committed to the
//! spool in one append, and every reply goes out in frame order.
//!
//! Keep-alive: the listener sends `keepalive` every `tcp_keepalive_interval`; a peer that sent
//! no complete frame for `tcp_keepalive_timeout` is told `close` and dropped. The timer is
//! reset only by the peer's frames, never by what the listener sends, so a peer that stopped
//! reading and writing is detected even while the listener's own keep-alives still fit in the
//! socket buffer.
//!
//! Security: TLS (rustls) when a certificate is configured; with a token configured the first
//! frame must be `{"type":"auth","token":…}` (compared in constant time) and, until then, lines
//! are limited to [`tcp::AUTH_MAX_FRAME`]. Configuration validation refuses a non-loopback
//! address without a token and TLS.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use nanogate_protocol::tcp::{self, Decoded, FrameDecoder, FrameError, FrameKind};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;

use super::unix::Shared;
use crate::config::{Config, Secret};
use crate::metrics::Metrics;
use crate::shutdown::{self, Shutdown};
use crate::spool::{AppendError, RecordBuf, Spool};
use crate::upstream::Upstream;

/// How long connections get to finish after shutdown was requested.
const CONNECTION_DRAIN: Duration = Duration::from_secs(5);
/// Read size.
const READ_CHUNK: usize = 64 * 1024;

/// Frame types counted in `tcp_frames_total{type}` (index = position).
const FRAME_TYPES: [&str; 7] = [
    "data",
    "ping",
    "pong",
    "keepalive",
    "close",
    "auth",
    "invalid",
];

/// Metrics of the TCP listener, registered next to the agent's own (`nanogate_sidecar_tcp_*`).
/// Accepted messages also count in `received_total` and errors in `rejected_total`, as on the
/// socket; these add the transport's view.
pub struct TcpMetrics {
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    /// Data frames accepted (appended to the spool).
    pub received: IntCounter,
    pub rejected: IntCounterVec,
    frames: Vec<IntCounter>,
    pub disconnects: IntCounterVec,
}

impl TcpMetrics {
    pub fn register(registry: &Registry) -> anyhow::Result<Self> {
        let n = |s: &str| format!("nanogate_sidecar_tcp_{s}");
        let frames_vec = IntCounterVec::new(
            Opts::new(n("frames_total"), "Frames received by type."),
            &["type"],
        )?;
        let m = TcpMetrics {
            connections: IntGauge::new(n("open_connections"), "Open TCP listener connections.")?,
            connections_total: IntCounter::new(
                n("connections_total"),
                "TCP listener connections accepted.",
            )?,
            received: IntCounter::new(
                n("received_total"),
                "Messages accepted through the TCP listener (persisted to the spool).",
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    n("rejected_total"),
                    "TCP frames answered with an error, by reason.",
                ),
                &["reason"],
            )?,
            frames: FRAME_TYPES
                .iter()
                .map(|t| frames_vec.with_label_values(&[t]))
                .collect(),
            disconnects: IntCounterVec::new(
                Opts::new(
                    n("disconnects_total"),
                    "TCP listener connections ended, by reason.",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.connections_total.clone()))?;
        registry.register(Box::new(m.received.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(frames_vec))?;
        registry.register(Box::new(m.disconnects.clone()))?;
        Ok(m)
    }

    fn frame(&self, kind: &FrameKind<'_>) {
        let i = match kind {
            FrameKind::Data(_) => 0,
            FrameKind::Ping => 1,
            FrameKind::Pong => 2,
            FrameKind::Keepalive => 3,
            FrameKind::Close => 4,
            FrameKind::Auth { .. } => 5,
        };
        if let Some(c) = self.frames.get(i) {
            c.inc();
        }
    }

    /// Counts a frame that was refused (the last label of `FRAME_TYPES`).
    fn frame_error(&self) {
        if let Some(c) = self.frames.last() {
            c.inc();
        }
    }
}

/// Listener settings taken from [`Config`].
#[derive(Debug, Clone)]
pub struct TcpSettings {
    pub token: Option<Secret>,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub max_connections: usize,
}

/// What the listener shares with the app socket: data frames are validated with the same
/// limits, stamped with the same `source`, appended to the same spool and counted in the same
/// metrics. (No upstream: `msg_check` and `wait:true` are not served over TCP.)
pub struct Ingest {
    pub limits: nanogate_protocol::app::Limits,
    pub spool: Arc<Spool>,
    pub metrics: Arc<Metrics>,
    pub source: String,
}

impl<U: Upstream> From<&Shared<U>> for Ingest {
    fn from(shared: &Shared<U>) -> Self {
        Ingest {
            limits: shared.limits,
            spool: shared.spool.clone(),
            metrics: shared.metrics.clone(),
            source: shared.source.clone(),
        }
    }
}

/// A bound TCP listener, not serving yet.
pub struct TcpServer {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    settings: TcpSettings,
}

/// A serving TCP listener; it stops when the [`Shutdown`] it was spawned with fires.
pub struct TcpHandle {
    task: JoinHandle<()>,
}

impl TcpHandle {
    /// Waits until the listener has stopped: after its shutdown fired, it stops accepting,
    /// tells connections to close and waits briefly for them.
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// Loads the listener's certificate and key (PEM).
fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<TlsAcceptor> {
    let pem = std::fs::read(cert)
        .with_context(|| format!("tcp_tls_cert {}: cannot read", cert.display()))?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("tcp_tls_cert {}: not PEM", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!(
            "tcp_tls_cert {}: no certificate in the file",
            cert.display()
        );
    }
    let pem = std::fs::read(key)
        .with_context(|| format!("tcp_tls_key {}: cannot read", key.display()))?;
    let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("tcp_tls_key {}: not PEM", key.display()))?
        .with_context(|| format!("tcp_tls_key {}: no private key in the file", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .context("tcp_tls_cert/tcp_tls_key: the key does not fit the certificate")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl TcpServer {
    /// Binds `tcp_listen` and loads TLS material; `None` when the listener is off.
    pub async fn bind(config: &Config) -> anyhow::Result<Option<TcpServer>> {
        let Some(addr) = config.tcp_listen else {
            return Ok(None);
        };
        let tls = match (&config.tcp_tls_cert, &config.tcp_tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("tcp_listen {addr}: cannot bind"))?;
        tracing::info!(tcp = %listener.local_addr()?, tls = tls.is_some(),
            token = config.tcp_token.is_some(), keepalive_interval = ?config.tcp_keepalive_interval,
            keepalive_timeout = ?config.tcp_keepalive_timeout, "TCP listener bound");
        Ok(Some(TcpServer {
            listener,
            tls,
            settings: TcpSettings {
                token: config.tcp_token.clone(),
                keepalive_interval: config.tcp_keepalive_interval,
                keepalive_timeout: config.tcp_keepalive_timeout,
                max_connections: config.max_connections,
            },
        }))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves in a background task, publishing through `shared` (the app socket's own), until
    /// `shutdown` fires.
    pub fn spawn<U: Upstream>(
        self,
        shared: Arc<Shared<U>>,
        registry: &Registry,
        shutdown: Shutdown,
    ) -> anyhow::Result<TcpHandle> {
        let metrics = Arc::new(TcpMetrics::register(registry)?);
        let ingest = Arc::new(Ingest::from(&*shared));
        let task = tokio::spawn(self.run(ingest, metrics, shutdown));
        Ok(TcpHandle { task })
    }

    /// Serves until `shutdown` fires, then stops accepting, tells connections to close
    /// (what they already read is committed to the spool) and waits briefly for them.
    pub async fn run(self, shared: Arc<Ingest>, metrics: Arc<TcpMetrics>, shutdown: Shutdown) {
        let TcpServer {
            listener,
            tls,
            settings,
        } = self;
        let settings = Arc::new(settings);
        let limit = Arc::new(Semaphore::new(settings.max_connections));
        // Connections watch this to say `close` and end when the agent shuts down.
        let (stop_tx, stop_rx) = shutdown::channel();
        let shutdown = shutdown.triggered();
        tokio::pin!(shutdown);
        loop {
            let Some(permit) = super::connection_slot(&limit, shutdown.as_mut()).await else {
                break;
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            // Acks are small and latency matters more than packet count.
            let _ = stream.set_nodelay(true);
            metrics.connections_total.inc();
            metrics.connections.inc();
            let conn = Connection {
                shared: shared.clone(),
                metrics: metrics.clone(),
                settings: settings.clone(),
                peer,
            };
            let tls = tls.clone();
            let stop = stop_rx.clone();
            tokio::spawn(async move {
                let reason = match tls {
                    None => conn.serve(stream, stop).await,
                    Some(acceptor) => {
                        match timeout(conn.settings.keepalive_timeout, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => conn.serve(s, stop).await,
                            Ok(Err(e)) => {
                                tracing::info!(%peer, error = %e, "TCP listener: TLS handshake failed");
                                "tls_handshake"
                            }
                            Err(_) => "tls_handshake",
                        }
                    }
                };
                conn.metrics.disconnects.with_label_values(&[reason]).inc();
                conn.metrics.connections.dec();
                drop(permit);
            });
        }
        drop(listener);
        stop_tx.trigger();
        let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
        if timeout(CONNECTION_DRAIN, limit.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("TCP connections still open after shutdown; leaving them");
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Ids of the data frames collected for the next spool append, in order.
#[derive(Default)]
struct PendingAcks {
    ids: Vec<u8>,
    spans: Vec<Option<(usize, usize)>>,
}

impl PendingAcks {
    fn push(&mut self, id: Option<&[u8]>) {
        self.spans.push(id.map(|id| {
            let start = self.ids.len();
            self.ids.extend_from_slice(id);
            (start, self.ids.len())
        }));
    }

    fn drain(&mut self, mut each: impl FnMut(Option<&[u8]>)) {
        for span in &self.spans {
            each(span.map(|(a, b)| self.ids.get(a..b).unwrap_or_default()));
        }
        self.ids.clear();
        self.spans.clear();
    }
}

/// What one read asked for.
struct Step {
    /// Complete lines received (valid or not): the peer is alive.
    frames: usize,
    /// Close after writing the replies, counted under this reason.
    close: Option<&'static str>,
    /// The peer authenticated in this read.
    authenticated: bool,
}

struct Connection {
    shared: Arc<Ingest>,
    metrics: Arc<TcpMetrics>,
    settings: Arc<TcpSettings>,
    peer: SocketAddr,
}

impl Connection {
    /// Serves one connection; returns why it ended (`disconnects_total{reason}`).
    async fn serve<S>(&self, stream: S, stop: Shutdown) -> &'static str
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut dec = FrameDecoder::new(self.shared.limits);
        let full_frame = dec.max_frame();
        let mut authed = self.settings.token.is_none();
        if !authed {
            dec.set_max_frame(tcp::AUTH_MAX_FRAME);
        }
        let mut recs = RecordBuf::new();
        let mut acks = PendingAcks::default();
        let mut out = Vec::new();
        let interval = self.settings.keepalive_interval;
        let dead_after = self.settings.keepalive_timeout;
        let mut keepalive = tokio::time::interval_at(Instant::now() + interval, interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Reset only when the peer's frames arrive (dead-peer detection).
        let dead = tokio::time::sleep(dead_after);
        tokio::pin!(dead);
        let reason = loop {
            if stop.is_triggered() {
                tcp::write_close(&mut out, None, "shutting down", now_ms());
                break "shutdown";
            }
            tokio::select! {
                r = rd.read_buf(dec.input.read_buf(READ_CHUNK)) => match r {
                    Ok(0) => break "eof",
                    Ok(_) => {
                        let step = self.process(&mut dec, &mut authed, &mut recs, &mut acks, &mut out);
                        if step.authenticated {
                            dec.set_max_frame(full_frame);
                        }
                        if step.frames > 0 {
                            dead.as_mut().reset(Instant::now() + dead_after);
                        }
                        if let Some(reason) = step.close {
                            break reason;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(peer = %self.peer, error = %e, "TCP read failed");
                        break "read_error";
                    }
                },
                _ = keepalive.tick() => tcp::write_keepalive(&mut out, now_ms()),
                _ = &mut dead => {
                    tracing::info!(peer = %self.peer, timeout = ?dead_after,
                        "TCP peer sent nothing within the keep-alive timeout; closing");
                    let why = format!("keep-alive timeout: no frame from the peer for {dead_after:?}");
                    tcp::write_close(&mut out, None, &why, now_ms());
                    break "keepalive_timeout";
                }
                _ = stop.triggered() => {
                    tcp::write_close(&mut out, None, "shutting down", now_ms());
                    break "shutdown";
                }
            }
            if !self.write(&mut wr, &mut out).await {
                break "write_error";
            }
        };
        if self.write(&mut wr, &mut out).await {
            // TLS close_notify / FIN, bounded like every write.
            let _ = timeout(dead_after, wr.shutdown()).await;
        }
        tracing::debug!(peer = %self.peer, reason, "TCP connection closed");
        reason
    }

    /// Writes `out` (bounded by the keep-alive timeout: a peer that does not read is dead too).
    async fn write<S: AsyncWrite>(&self, wr: &mut WriteHalf<S>, out: &mut Vec<u8>) -> bool {
        if out.is_empty() {
            return true;
        }
        let res = timeout(self.settings.keepalive_timeout, async {
            wr.write_all(out).await?;
            wr.flush().await
        })
        .await;
        out.clear();
        matches!(res, Ok(Ok(())))
    }

    /// Appends the collected records to the spool and answers each data frame.
    fn commit(&self, recs: &mut RecordBuf, acks: &mut PendingAcks, out: &mut Vec<u8>) {
        if recs.is_empty() {
            return;
        }
        let ts = now_ms();
        match self.shared.spool.append(recs) {
            Ok(()) => {
                self.shared.metrics.received.inc_by(recs.count());
                self.metrics.received.inc_by(recs.count());
                acks.drain(|id| tcp::write_ack(out, id, ts));
            }
            Err(e) => {
                let (reason, message) = match e {
                    AppendError::Full => ("queue_full", "queue full, try again later"),
                    AppendError::Io(e) => {
                        tracing::error!(error = %e, "spool append failed");
                        ("spool_error", "spool write failed, try again later")
                    }
                };
                self.shared.metrics.reject(reason, recs.count());
                self.metrics
                    .rejected
                    .with_label_values(&[reason])
                    .inc_by(recs.count());
                acks.drain(|id| tcp::write_error(out, id, message, ts));
            }
        }
        recs.clear();
    }

    fn reject(&self, error: &FrameError, id: Option<&[u8]>, out: &mut Vec<u8>) {
        self.shared.metrics.reject(error.reason(), 1);
        self.metrics
            .rejected
            .with_label_values(&[error.reason()])
            .inc();
        tcp::write_error(out, id, &error.to_string(), now_ms());
    }

    /// Handles every complete frame buffered in `dec`; replies go to `out` in frame order.
    fn process(
        &self,
        dec: &mut FrameDecoder,
        authed: &mut bool,
        recs: &mut RecordBuf,
        acks: &mut PendingAcks,
        out: &mut Vec<u8>,
    ) -> Step {
        let mut step = Step {
            frames: 0,
            close: None,
            authenticated: false,
        };
        let stamp = super::stamp(&self.shared.source);
        loop {
            match dec.next() {
                Decoded::NeedMore => break,
                Decoded::Frame(frame) => {
                    step.frames += 1;
                    self.metrics.frame(&frame.kind);
                    if let FrameKind::Data(p) = &frame.kind
                        && *authed
                    {
                        recs.push_with(|b| p.write_stamped(b, &stamp));
                        acks.push(frame.id);
                        continue;
                    }
                    // Every other answer follows the acks of the data frames before it.
                    self.commit(recs, acks, out);
                    let ts = now_ms();
                    match frame.kind {
                        FrameKind::Auth { token } if self.token_ok(token.as_str()) => {
                            if !*authed {
                                *authed = true;
                                step.authenticated = true;
                                tracing::debug!(peer = %self.peer, "TCP peer authenticated");
                            }
                            tcp::write_auth_ok(out, frame.id, ts);
                        }
                        _ if !*authed => {
                            tracing::warn!(peer = %self.peer, "TCP peer refused: missing or wrong token");
                            self.reject(&FrameError::Unauthorized, frame.id, out);
                            step.close = Some("unauthorized");
                            break;
                        }
                        FrameKind::Auth { .. } => {
                            tracing::warn!(peer = %self.peer, "TCP peer refused: wrong token");
                            self.reject(&FrameError::Unauthorized, frame.id, out);
                            step.close = Some("unauthorized");
                            break;
                        }
                        FrameKind::Data(_) => unreachable!("handled above when authenticated"),
                        FrameKind::Ping => tcp::write_pong(out, frame.id, ts),
                        FrameKind::Pong | FrameKind::Keepalive => {}
                        FrameKind::Close => {
                            tcp::write_close(out, frame.id, "closed at the peer's request", ts);
                            step.close = Some("peer_close");
                            break;
                        }
                    }
                }
                Decoded::Rejected { id, error } => {
                    step.frames += 1;
                    self.metrics.frame_error();
                    self.commit(recs, acks, out);
                    if !*authed {
                        tracing::warn!(peer = %self.peer, "TCP peer refused: first frame is not auth");
                        self.reject(&FrameError::Unauthorized, id, out);
                        step.close = Some("unauthorized");
                        break;
                    }
                    self.reject(&error, id, out);
                }
                Decoded::Fatal(error) => {
                    self.metrics.frame_error();
                    self.commit(recs, acks, out);
                    self.reject(&error, None, out);
                    step.close = Some(error.reason());
                    break;
                }
            }
        }
        self.commit(recs, acks, out);
        step
    }

    fn token_ok(&self, presented: &str) -> bool {
        match &self.settings.token {
            None => true,
            Some(t) => tcp::token_matches(t.expose().as_bytes(), presented.as_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SpoolOptions;
    use serde_json::Value;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, Lines, ReadHalf};

    fn connection(dir: &std::path::Path, token: Option<&str>) -> Connection {
        let spool = Spool::open(SpoolOptions {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
            segment_bytes: 1 << 16,
            sync_interval: Duration::from_secs(1),
            overflow: crate::spool::Overflow::Reject,
        })
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        Connection {
            metrics: Arc::new(TcpMetrics::register(&metrics.registry).unwrap()),
            shared: Arc::new(Ingest {
                limits: Default::default(),
                spool,
                metrics,
                source: "ns/pod".into(),
            }),
            settings: Arc::new(TcpSettings {
                token: token.map(Secret::new),
                keepalive_interval: Duration::from_secs(10),
                keepalive_timeout: Duration::from_secs(30),
                max_connections: 1,
            }),
            peer: "127.0.0.1:1".parse().unwrap(),
        }
    }

    type Reader = Lines<BufReader<ReadHalf<DuplexStream>>>;

    /// Serves `conn` over an in-memory stream: (frames from the agent, writer to it, stop,
    /// the task returning the disconnect reason).
    fn serve(
        conn: Connection,
    ) -> (
        Reader,
        WriteHalf<DuplexStream>,
        shutdown::ShutdownTrigger,
        JoinHandle<&'static str>,
    ) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (stop_tx, stop_rx) = shutdown::channel();
        let task = tokio::spawn(async move { conn.serve(server, stop_rx).await });
        let (rd, wr) = tokio::io::split(client);
        (BufReader::new(rd).lines(), wr, stop_tx, task)
    }

    async fn frame(r: &mut Reader) -> Option<Value> {
        r.next_line()
            .await
            .unwrap()
            .map(|l| serde_json::from_str(&l).unwrap())
    }

    /// Keep-alive timing on tokio's paused clock with the default 10 s / 30 s: the agent's
    /// keep-alives go out every 10 s, do not keep the peer alive, and the peer's own frame
    /// moves the deadline to 30 s after it.
    #[tokio::test(start_paused = true)]
    async fn dead_peer_is_measured_from_the_peers_last_frame() {
        let dir = tempfile::tempdir().unwrap();
        let (mut rd, mut wr, _stop, task) = serve(connection(dir.path(), None));
        let start = Instant::now();
        wr.write_all(b"{\"type\":\"ping\",\"id\":1}\n")
            .await
            .unwrap();
        let pong = frame(&mut rd).await.unwrap();
        assert_eq!(
            (pong["type"].as_str(), pong["id"].as_u64()),
            (Some("pong"), Some(1))
        );
        for at in [10, 20] {
            assert_eq!(frame(&mut rd).await.unwrap()["type"], "keepalive");
            assert_eq!(start.elapsed(), Duration::from_secs(at));
        }
        // The peer speaks at t=20 s: it now has until t=50 s.
        wr.write_all(b"{\"type\":\"keepalive\"}\n").await.unwrap();
        let close = loop {
            let f = frame(&mut rd).await.expect("a close frame before EOF");
            if f["type"] == "close" {
                break f;
            }
            assert_eq!(f["type"], "keepalive");
            assert_eq!(start.elapsed().as_secs() % 10, 0);
        };
        assert_eq!(start.elapsed(), Duration::from_secs(50));
        assert_eq!(
            close["payload"]["reason"],
            "keep-alive timeout: no frame from the peer for 30s"
        );
        assert!(
            frame(&mut rd).await.is_none(),
            "closed after the close frame"
        );
        assert_eq!(task.await.unwrap(), "keepalive_timeout");
    }

    #[tokio::test]
    async fn token_is_required_first_and_data_is_acked_after_the_append() {
        let dir = tempfile::tempdir().unwrap();
        let data =
            b"{\"type\":\"data\",\"id\":\"d\",\"payload\":{\"msg_type\":\"publish\",\"data\":1}}\n";

        // Data before auth: refused, closed, nothing spooled.
        let conn = connection(&dir.path().join("a"), Some("s3cret"));
        let spool = conn.shared.spool.clone();
        let (mut rd, mut wr, _stop, task) = serve(conn);
        wr.write_all(data).await.unwrap();
        let e = frame(&mut rd).await.unwrap();
        assert_eq!(
            (e["type"].as_str(), e["id"].as_str()),
            (Some("error"), Some("d"))
        );
        assert!(frame(&mut rd).await.is_none());
        assert_eq!(task.await.unwrap(), "unauthorized");
        assert_eq!(spool.pending_msgs(), 0);

        // Wrong token: refused.
        let (mut rd, mut wr, _stop, task) =
            serve(connection(&dir.path().join("b"), Some("s3cret")));
        wr.write_all(b"{\"type\":\"auth\",\"token\":\"s3creT\"}\n")
            .await
            .unwrap();
        assert_eq!(frame(&mut rd).await.unwrap()["type"], "error");
        assert_eq!(task.await.unwrap(), "unauthorized");

        // Right token, then data in the same write: auth ok, ack, one message spooled.
        let conn = connection(&dir.path().join("c"), Some("s3cret"));
        let spool = conn.shared.spool.clone();
        let (mut rd, mut wr, stop, task) = serve(conn);
        let mut both = b"{\"type\":\"auth\",\"id\":0,\"token\":\"s3cret\"}\n".to_vec();
        both.extend_from_slice(data);
        wr.write_all(&both).await.unwrap();
        let ok = frame(&mut rd).await.unwrap();
        assert_eq!(
            (ok["type"].as_str(), ok["id"].as_u64()),
            (Some("auth"), Some(0))
        );
        assert_eq!(frame(&mut rd).await.unwrap()["type"], "ack");
        assert_eq!(spool.pending_msgs(), 1);

        // Shutdown: close "shutting down".
        stop.trigger();
        let close = frame(&mut rd).await.unwrap();
        assert_eq!(close["payload"]["reason"], "shutting down");
        assert_eq!(task.await.unwrap(), "shutdown");
    }
}
