//! `socketio` upstream: the cloud protocol (Socket.IO v5 over WebSocket, mTLS).
//!
//! One Socket.IO v5 / Engine.IO v4 connection over WebSocket (`wss://` with mTLS, or `ws://`)
//! carries everything:
//! - `heartbeat` events every `heartbeat_interval` (the cloud protocol's fields: agent id, CPU %, memory and
//!   disk in GB, uptime, status, ISO-8601 UTC timestamp), the first right after connecting;
//! - batches as `messages` events with an acknowledgement id: the acknowledgement is the
//!   delivery receipt; none within `ack_timeout` (or a connection lost first) is a retryable
//!   error, so delivery retries and nothing is lost; `wait:true` publishes as `message`;
//! - commands from the platform (`flush`, `get_consumption`, `deliver`), validated against
//!   their contracts ([`nanogate_protocol::contract`]) and answered through the
//!   acknowledgement with `{action, correlation_id, status:"ok", …}` or
//!   `{"status":"error","error":"Missing required field: …", action, correlation_id}`;
//!   `deliver` puts a message in a bounded in-memory inbox that `msg_check` reads.
//!
//! The connection is re-established with full-jitter exponential backoff (1 s → 30 s); its
//! state is the `nanogate_sidecar_upstream_connection_state` gauge and `upstream.connection`
//! in `/healthz`.
//!
//! Why no Socket.IO crate: `rust_socketio` (the maintained one) does TLS through native-tls
//! (OpenSSL) only, so no rustls client certificate, and its client cannot answer the server's
//! events through acknowledgements. The part of the protocol an agent needs is a handful of
//! packet types (engine 0 open / 1 close / 2 ping / 3 pong / 4 message; socket 0 CONNECT /
//! 1 DISCONNECT / 2 EVENT / 3 ACK / 4 CONNECT_ERROR), so [`packet`] implements it over
//! tokio-tungstenite with the same rustls configuration as the `http` upstream.

mod commands;
mod connection;
pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};

use super::api_key::ApiKey;
use super::{Upstream, UpstreamError};
use crate::config::Config;
use crate::config::upstream::{SocketIoEndpoint as Endpoint, socketio_endpoint as endpoint};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::ShutdownTrigger;
use crate::spool::Spool;
use commands::{History, sample_history};
use connection::supervise;

/// Event carrying a batch (a JSON array of messages).
pub const BATCH_EVENT: &str = "messages";
/// Event carrying one `wait:true` message; the acknowledgement's argument is relayed.
pub const SINGLE_EVENT: &str = "message";
/// Event of the periodic health report.
pub const HEARTBEAT_EVENT: &str = "heartbeat";
/// Event a command's result is emitted as when the platform asked for no acknowledgement.
pub const RESPONSE_EVENT: &str = "command_response";

/// Values of `nanogate_sidecar_upstream_connection_state`.
pub const STATE_DISCONNECTED: i64 = 0;
pub const STATE_CONNECTING: i64 = 1;
pub const STATE_CONNECTED: i64 = 2;

/// First and largest reconnect delay (full jitter: each delay is uniform in [0, cap]).
const RECONNECT_INITIAL: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// A connection that lasted this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(5);
/// Consumption samples kept for `get_consumption` (one per heartbeat interval: 1 h at 5 s).
const HISTORY: usize = 720;
/// Longest a `flush` command waits for the spool to empty (the command may ask for less).
const FLUSH_MAX_WAIT: Duration = Duration::from_secs(30);
/// Frames queued for the connection's writer.
const OUTBOX: usize = 1024;

/// Everything the upstream needs to know; built from [`Config`] by [`SocketIoOptions::from_config`].
#[derive(Clone)]
pub struct SocketIoOptions {
    /// `wss://host[:port][/path]` (also `ws://`, `https://`, `http://`); path default
    /// `/socket.io/`.
    pub url: String,
    /// Socket.IO namespace, `/` by default.
    pub namespace: String,
    pub heartbeat_interval: Duration,
    pub ack_timeout: Duration,
    pub connect_timeout: Duration,
    /// Messages `deliver` may hold for `msg_check` before it answers "inbox full".
    pub inbox_size: usize,
    /// Sent as `auth.token` of the CONNECT packet and as `Authorization: Bearer` (never
    /// logged); read at each connect, and a new key reconnects.
    pub api_key: Arc<ApiKey>,
    /// `agent_id` of heartbeats and the CONNECT packet.
    pub agent_id: String,
    /// Filesystem whose usage heartbeats report (the spool's).
    pub disk_path: PathBuf,
    pub tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for SocketIoOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The API key is deliberately left out.
        f.debug_struct("SocketIoOptions")
            .field("url", &self.url)
            .field("namespace", &self.namespace)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("ack_timeout", &self.ack_timeout)
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

impl SocketIoOptions {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        crate::config::upstream::check_socketio(config)?;
        let mut tls = super::tls::client_config(config)?;
        // A WebSocket upgrade is an HTTP/1.1 request.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            url: config.app_url.clone(),
            namespace: config.socketio_namespace.clone(),
            heartbeat_interval: config.socketio_heartbeat_interval,
            ack_timeout: config.socketio_ack_timeout,
            connect_timeout: config.upstream_timeout.min(Duration::from_secs(10)),
            inbox_size: config.socketio_inbox_size,
            // The agent replaces it with its shared, reloading handle (`AnyUpstream::from_config`).
            api_key: ApiKey::fixed(&config.api_key),
            agent_id: config.pod_uid.clone().unwrap_or_else(|| config.source()),
            disk_path: config.spool_dir.clone(),
            tls: Arc::new(tls),
        })
    }
}

/// The live connection's writer (frames go out in order) and its generation.
#[derive(Clone)]
struct Conn {
    tx: mpsc::Sender<String>,
    generation: u64,
}

struct Inner {
    opts: SocketIoOptions,
    ep: Endpoint,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    spool: Arc<Spool>,
    started: std::time::Instant,
    conn: watch::Sender<Option<Conn>>,
    /// Waiting emitters by acknowledgement id, tagged with the connection generation: when a
    /// connection ends its entries are dropped, which fails those emits at once (retryable).
    acks: Mutex<HashMap<u64, (u64, oneshot::Sender<Value>)>>,
    next_ack: AtomicU64,
    /// Largest packet the server accepts (`maxPayload` of its OPEN packet).
    max_payload: AtomicU64,
    inbox: Mutex<VecDeque<Value>>,
    history: Mutex<History>,
}

/// The `socketio` transport. The connection runs in a background task that ends (with a
/// Socket.IO DISCONNECT) when this value is dropped.
pub struct SocketIoUpstream {
    inner: Arc<Inner>,
    stop: ShutdownTrigger,
}

impl Drop for SocketIoUpstream {
    fn drop(&mut self) {
        self.stop.trigger();
    }
}

impl std::fmt::Debug for SocketIoUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketIoUpstream")
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

impl SocketIoUpstream {
    pub(super) fn key(&self) -> &Arc<ApiKey> {
        &self.inner.opts.api_key
    }

    /// Starts the connection task (reconnecting until this value is dropped) and the
    /// consumption sampler. Needs a Tokio runtime.
    pub fn start(
        opts: SocketIoOptions,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        spool: Arc<Spool>,
    ) -> anyhow::Result<Self> {
        let ep = endpoint(&opts.url, &opts.namespace).map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(
            !opts.heartbeat_interval.is_zero() && !opts.ack_timeout.is_zero(),
            "socketio heartbeat interval and ack timeout must be greater than 0"
        );
        let inner = Arc::new(Inner {
            ep,
            metrics,
            health,
            spool,
            started: std::time::Instant::now(),
            conn: watch::channel(None).0,
            acks: Mutex::new(HashMap::new()),
            next_ack: AtomicU64::new(1),
            max_payload: AtomicU64::new(1_000_000),
            inbox: Mutex::new(VecDeque::new()),
            history: Mutex::new(History::default()),
            opts,
        });
        inner.set_state(STATE_DISCONNECTED, None);
        let (stop_tx, stop) = crate::shutdown::channel();
        tokio::spawn(sample_history(inner.clone(), stop.clone()));
        tokio::spawn(supervise(inner.clone(), stop));
        Ok(Self {
            inner,
            stop: stop_tx,
        })
    }

    /// Whether the Socket.IO connection is established (namespace joined).
    pub fn connected(&self) -> bool {
        self.inner.conn.borrow().is_some()
    }

    /// The heartbeat payload as sent now.
    pub fn heartbeat(&self) -> Value {
        self.inner.heartbeat()
    }
}

fn retryable(reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Retryable {
        reason: reason.into(),
        retry_after: None,
    }
}

impl Inner {
    fn set_state(&self, state: i64, error: Option<&str>) {
        self.metrics.upstream_connection_state.set(state);
        let name = match state {
            STATE_CONNECTED => "connected",
            STATE_CONNECTING => "connecting",
            _ => "disconnected",
        };
        self.health.set_connection(name);
        if let Some(e) = error {
            self.health.set_error(e.to_owned());
        }
    }

    /// Waits (at most the ack timeout) for a connection, emits `event` with an
    /// acknowledgement id and returns the acknowledgement's arguments.
    async fn emit_acked(&self, event: &str, args_json: &str) -> Result<Value, UpstreamError> {
        let mut rx = self.conn.subscribe();
        let conn = match timeout(self.opts.ack_timeout, rx.wait_for(Option::is_some)).await {
            Ok(Ok(c)) => c.clone(),
            _ => None,
        };
        let conn = match conn {
            Some(c) => c,
            None => {
                return Err(retryable(format!(
                    "not connected to the Socket.IO server {} within {:?}",
                    self.opts.url, self.opts.ack_timeout
                )));
            }
        };
        let id = self.next_ack.fetch_add(1, Ordering::Relaxed);
        let (tx, ack) = oneshot::channel();
        self.acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, (conn.generation, tx));
        let frame = packet::event(&self.ep.nsp_prefix, Some(id), event, args_json);
        let start = std::time::Instant::now();
        // The acknowledgement gets the whole timeout, however long the connection took.
        let deadline = Instant::now() + self.opts.ack_timeout;
        let sent = timeout(
            deadline.saturating_duration_since(Instant::now()),
            conn.tx.send(frame),
        )
        .await;
        let result = match sent {
            Ok(Ok(())) => match timeout_at(deadline, ack).await {
                Some(Ok(args)) => Ok(args),
                Some(Err(_)) => Err(retryable(
                    "Socket.IO connection lost before the acknowledgement",
                )),
                None => Err(retryable(format!(
                    "no acknowledgement of `{event}` within {:?}",
                    self.opts.ack_timeout
                ))),
            },
            Ok(Err(_)) => Err(retryable("Socket.IO connection closed")),
            Err(_) => Err(retryable("Socket.IO connection too slow to write")),
        };
        self.acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        self.metrics
            .upstream_duration
            .with_label_values(&[event])
            .observe(start.elapsed().as_secs_f64());
        result
    }
}

async fn timeout_at<F: std::future::Future>(deadline: Instant, f: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, f).await.ok()
}

/// An acknowledgement's first argument `{"status":"error",…}` refuses the batch for good.
fn check_ack(args: &Value) -> Result<(), UpstreamError> {
    let first = args.get(0).unwrap_or(&Value::Null);
    if first.get("status").and_then(Value::as_str) == Some("error") {
        return Err(UpstreamError::Rejected {
            status: 422,
            body: first.to_string(),
        });
    }
    Ok(())
}

impl Upstream for SocketIoUpstream {
    async fn send_batch(&self, body: Bytes, _count: u64) -> Result<(), UpstreamError> {
        let text = String::from_utf8_lossy(&body);
        let max = self.inner.max_payload.load(Ordering::Relaxed) as usize;
        if text.len() + 64 <= max {
            let args = self.inner.emit_acked(BATCH_EVENT, &text).await?;
            return check_ack(&args);
        }
        // Over the server's maxPayload: split into several acknowledged events, each under it.
        let msgs: Vec<&serde_json::value::RawValue> =
            serde_json::from_str(&text).map_err(|e| UpstreamError::Rejected {
                status: 400,
                body: format!("batch is not a JSON array: {e}"),
            })?;
        let mut chunk = String::from("[");
        for m in msgs {
            let m = m.get();
            if m.len() + 66 > max {
                return Err(UpstreamError::Rejected {
                    status: 413,
                    body: format!(
                        "a message of {} bytes exceeds the server's maxPayload of {max} bytes",
                        m.len()
                    ),
                });
            }
            if chunk.len() + m.len() + 66 > max {
                chunk.push(']');
                check_ack(&self.inner.emit_acked(BATCH_EVENT, &chunk).await?)?;
                chunk = String::from("[");
            }
            if chunk.len() > 1 {
                chunk.push(',');
            }
            chunk.push_str(m);
        }
        if chunk.len() > 1 {
            chunk.push(']');
            check_ack(&self.inner.emit_acked(BATCH_EVENT, &chunk).await?)?;
        }
        Ok(())
    }

    async fn send_one(&self, body: Bytes) -> Result<Bytes, UpstreamError> {
        let args = self
            .inner
            .emit_acked(SINGLE_EVENT, &String::from_utf8_lossy(&body))
            .await?;
        Ok(match args.get(0) {
            None | Some(Value::Null) => Bytes::from_static(br#"{"status":"ok"}"#),
            Some(v) => Bytes::from(v.to_string()),
        })
    }

    fn checks_call_the_platform(&self) -> bool {
        false
    }

    async fn check_messages(&self, limit: u32) -> Result<Vec<Value>, UpstreamError> {
        let mut inbox = self
            .inner
            .inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = inbox.len().min(limit as usize);
        Ok(inbox.drain(..n).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Commands, the inbox and heartbeats work without a platform; a batch without a
    /// connection is a retryable error after the ack timeout.
    #[tokio::test]
    async fn commands_inbox_and_heartbeat_without_a_connection() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let config = Config::load_from([
            "nano-agent",
            "--upstream-kind",
            "socketio",
            "--app-url",
            "ws://127.0.0.1:9",
            "--socketio-inbox-size",
            "1",
            "--socketio-ack-timeout",
            "100ms",
            "--pod-uid",
            "uid-1",
            "--spool-dir",
            spool_dir.to_str().unwrap(),
        ])
        .unwrap();
        let spool = crate::delivery::test_spool(&spool_dir);
        let metrics = Arc::new(Metrics::new());
        let up = SocketIoUpstream::start(
            SocketIoOptions::from_config(&config).unwrap(),
            metrics.clone(),
            Arc::new(Health::default()),
            spool,
        )
        .unwrap();
        assert!(!up.connected());

        let deliver = json!({"correlation_id": 1, "action": "deliver",
            "requested_at": "2025-11-20T20:30:45", "data": {"x": 1}, "dest": "app"});
        let r = up.inner.command("deliver", deliver.clone()).await;
        assert_eq!(
            r,
            json!({"action": "deliver", "correlation_id": 1, "status": "ok", "queued": 1})
        );
        let r = up.inner.command("deliver", deliver).await;
        assert!(
            r["error"].as_str().unwrap().starts_with("Inbox full"),
            "{r}"
        );
        let msgs = up.check_messages(5).await.unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            (msgs[0]["data"].clone(), msgs[0]["dest"].clone()),
            (json!({"x": 1}), json!("app"))
        );
        assert!(up.check_messages(5).await.unwrap().is_empty());

        let flush = json!({"correlation_id": 2, "action": "flush", "requested_at": "2025-11-20"});
        let r = up.inner.command("flush", flush).await;
        assert_eq!(
            r,
            json!({"action": "flush", "correlation_id": 2, "status": "ok", "pending": 0})
        );
        assert_eq!(
            metrics
                .commands
                .with_label_values(&["deliver", "error"])
                .get(),
            1
        );

        let hb = up.heartbeat();
        assert_eq!(
            (hb["agent_id"].as_str(), hb["status"].as_str()),
            (Some("uid-1"), Some("online"))
        );
        assert!(hb["memory_total"].as_f64().unwrap() > 0.0);

        let e = up
            .send_batch(Bytes::from_static(b"[{}]"), 1)
            .await
            .unwrap_err();
        assert!(matches!(e, UpstreamError::Retryable { .. }), "{e}");
        assert!(e.to_string().contains("not connected"), "{e}");
    }

    #[test]
    fn error_acks_reject_and_others_deliver() {
        assert!(check_ack(&json!([])).is_ok());
        assert!(check_ack(&json!([{"status": "ok"}])).is_ok());
        assert!(matches!(
            check_ack(&json!([{"status": "error", "error": "bad"}])),
            Err(UpstreamError::Rejected { status: 422, .. })
        ));
    }
}
