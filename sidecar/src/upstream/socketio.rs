//! `socketio` upstream: the cloud protocol of seed 003 (ARCHITECTURE §4).
//!
//! One Socket.IO v5 / Engine.IO v4 connection over WebSocket (`wss://` with mTLS, or `ws://`)
//! carries everything:
//! - `heartbeat` events every `heartbeat_interval` (seed fields: agent id, CPU %, memory and
//!   disk in GB, uptime, status, ISO-8601 UTC timestamp), the first right after connecting;
//! - batches as `messages` events with an acknowledgement id: the acknowledgement is the
//!   delivery receipt; none within `ack_timeout` (or a connection lost first) is a retryable
//!   error, so the batcher retries and nothing is lost; `wait:true` publishes as `message`;
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

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use nanogate_protocol::contract::{self, Contract, FieldType};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use super::{Upstream, UpstreamError};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::config::upstream::{SocketIoEndpoint as Endpoint, socketio_endpoint as endpoint};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::spool::Spool;

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
    /// Sent as `auth.token` of the CONNECT packet and as `Authorization: Bearer` (never logged).
    pub api_key: String,
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
            api_key: config.api_key.clone(),
            agent_id: config.pod_uid.clone().unwrap_or_else(|| config.source()),
            disk_path: config.spool_dir.clone(),
            tls: Arc::new(tls),
        })
    }
}

/// The Engine.IO v4 / Socket.IO v5 text packets the agent uses. Pure.
pub mod packet {
    use serde_json::Value;

    /// Engine.IO packet of a WebSocket text frame.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Engine<'a> {
        Open(&'a str),
        Close,
        Ping(&'a str),
        Pong(&'a str),
        Message(&'a str),
        Other,
    }

    pub fn engine(text: &str) -> Option<Engine<'_>> {
        let rest = text.get(1..)?;
        Some(match text.as_bytes().first()? {
            b'0' => Engine::Open(rest),
            b'1' => Engine::Close,
            b'2' => Engine::Ping(rest),
            b'3' => Engine::Pong(rest),
            b'4' => Engine::Message(rest),
            b'5' | b'6' => Engine::Other,
            _ => return None,
        })
    }

    /// Socket.IO packet types.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Connect,
        Disconnect,
        Event,
        Ack,
        ConnectError,
        BinaryEvent,
        BinaryAck,
    }

    /// A decoded Socket.IO packet: `<type>[<attachments>-][<nsp>,][<id>][<json>]`.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Packet {
        pub kind: Kind,
        pub nsp: String,
        pub id: Option<u64>,
        pub data: Option<Value>,
    }

    pub fn socket(s: &str) -> Result<Packet, String> {
        let b = s.as_bytes();
        let kind = match b.first() {
            Some(b'0') => Kind::Connect,
            Some(b'1') => Kind::Disconnect,
            Some(b'2') => Kind::Event,
            Some(b'3') => Kind::Ack,
            Some(b'4') => Kind::ConnectError,
            Some(b'5') => Kind::BinaryEvent,
            Some(b'6') => Kind::BinaryAck,
            _ => return Err(format!("unknown Socket.IO packet {:?}", truncate(s))),
        };
        let mut i = 1;
        if matches!(kind, Kind::BinaryEvent | Kind::BinaryAck) {
            // Attachment count; the attachments themselves are binary frames we do not use.
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if b.get(i) != Some(&b'-') {
                return Err("binary packet without attachment count".into());
            }
            i += 1;
        }
        let mut nsp = "/".to_owned();
        if b.get(i) == Some(&b'/') {
            let end = s[i..].find(',').map_or(s.len(), |p| i + p);
            nsp = s[i..end].to_owned();
            i = (end + 1).min(s.len());
        }
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let id = if i > start {
            Some(
                s[start..i]
                    .parse()
                    .map_err(|_| "acknowledgement id out of range".to_string())?,
            )
        } else {
            None
        };
        let data = if i < s.len() {
            Some(
                serde_json::from_str(&s[i..])
                    .map_err(|e| format!("invalid JSON in Socket.IO packet: {e}"))?,
            )
        } else {
            None
        };
        Ok(Packet {
            kind,
            nsp,
            id,
            data,
        })
    }

    fn truncate(s: &str) -> &str {
        let mut end = s.len().min(40);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        &s[..end]
    }

    /// Engine MESSAGE + socket CONNECT, with an optional auth payload.
    pub fn connect(nsp_prefix: &str, auth: Option<&Value>) -> String {
        let mut s = format!("40{nsp_prefix}");
        if let Some(a) = auth {
            s.push_str(&a.to_string());
        }
        s
    }

    /// Engine MESSAGE + socket EVENT `[event, <args_json>]`; `args_json` is already-encoded
    /// JSON (the batch body goes in without being parsed again).
    pub fn event(nsp_prefix: &str, id: Option<u64>, event: &str, args_json: &str) -> String {
        let name = Value::from(event).to_string();
        let mut s = String::with_capacity(args_json.len() + name.len() + nsp_prefix.len() + 24);
        s.push_str("42");
        s.push_str(nsp_prefix);
        if let Some(id) = id {
            s.push_str(&id.to_string());
        }
        s.push('[');
        s.push_str(&name);
        s.push(',');
        s.push_str(args_json);
        s.push(']');
        s
    }

    /// Engine MESSAGE + socket ACK with one argument.
    pub fn ack(nsp_prefix: &str, id: u64, arg: &Value) -> String {
        format!("43{nsp_prefix}{id}[{arg}]")
    }
}

/// Bounded history of this process's CPU and memory for `get_consumption`.
#[derive(Debug, Default)]
struct History {
    samples: VecDeque<(chrono::DateTime<chrono::Utc>, f64, u64)>,
}

impl History {
    fn push(&mut self, at: chrono::DateTime<chrono::Utc>, cpu: f64, rss: u64) {
        if self.samples.len() == HISTORY {
            self.samples.pop_front();
        }
        self.samples.push_back((at, cpu, rss));
    }

    fn summary(
        &self,
        start: chrono::DateTime<chrono::Utc>,
        end: chrono::DateTime<chrono::Utc>,
    ) -> Map<String, Value> {
        let in_period: Vec<_> = self
            .samples
            .iter()
            .filter(|(t, _, _)| *t >= start && *t <= end)
            .collect();
        let n = in_period.len();
        let stats = |values: Vec<f64>| -> Value {
            if values.is_empty() {
                return json!({"avg": null, "max": null});
            }
            let avg = values.iter().sum::<f64>() / values.len() as f64;
            let max = values.iter().copied().fold(f64::MIN, f64::max);
            json!({"avg": round2(avg), "max": round2(max)})
        };
        let mut m = Map::new();
        m.insert(
            "period".into(),
            json!({"start": iso(start), "end": iso(end)}),
        );
        m.insert("samples".into(), n.into());
        let mut cpu = stats(in_period.iter().map(|s| s.1).collect());
        if let Some(cpu) = cpu.as_object_mut() {
            cpu.insert("unit".into(), "percent".into());
        }
        let mut mem = stats(in_period.iter().map(|s| s.2 as f64 / 1048576.0).collect());
        if let Some(mem) = mem.as_object_mut() {
            mem.insert("unit".into(), "MiB".into());
        }
        m.insert("cpu_usage".into(), cpu);
        m.insert("memory_usage".into(), mem);
        m
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A date the contract accepted (`FieldType::Date`), as UTC; no zone means UTC.
fn parse_date(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    let s = s.replace(' ', "T").replace(',', ".");
    for f in ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M%#z"] {
        if let Ok(t) = DateTime::parse_from_str(&s, f) {
            return Some(t.with_timezone(&Utc));
        }
    }
    let s = s.trim_end_matches(['Z', 'z']);
    for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// The commands the agent serves and their contracts (seed 003 "Contract Validation").
pub fn contract_for(action: &str) -> Option<Contract> {
    Some(match action {
        // Deliver what is queued now; `wait` (default true) answers once the spool is empty
        // or `timeout_ms` passed.
        "flush" => Contract::base()
            .field("wait", FieldType::optional(FieldType::Boolean))
            .field("timeout_ms", FieldType::optional(FieldType::Number)),
        // The agent's CPU and memory over a period (`end` defaults to now).
        "get_consumption" => Contract::base().field(
            "period",
            FieldType::Nested(
                Contract::new()
                    .field("start", FieldType::Date)
                    .field("end", FieldType::optional(FieldType::Date)),
            ),
        ),
        // A message for the pod's apps, served by `msg_check`.
        "deliver" => Contract::base()
            .field("data", FieldType::Any)
            .field("dest", FieldType::optional(FieldType::NonEmptyString))
            .field(
                "tags",
                FieldType::optional(FieldType::list(FieldType::String)),
            ),
        _ => return None,
    })
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
    stop: watch::Sender<bool>,
}

impl Drop for SocketIoUpstream {
    fn drop(&mut self) {
        self.stop.send_replace(true);
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
        let (stop_tx, stop) = watch::channel(false);
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

/// A field of a platform request, `null` when absent.
fn field(request: &Value, name: &str) -> Value {
    request.get(name).cloned().unwrap_or(Value::Null)
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

    fn heartbeat(&self) -> Value {
        let (mem_used, mem_total) = memory_gb();
        let (disk_used, disk_total) = disk_gb(&self.opts.disk_path);
        let status = if self.health.draining.load(Ordering::Relaxed) {
            "draining"
        } else {
            "online"
        };
        json!({
            "agent_id": self.opts.agent_id,
            "cpu_usage": round2(self.metrics.cpu_percent.get()),
            "memory_usage": mem_used,
            "memory_total": mem_total,
            "disk_usage": disk_used,
            "disk_total": disk_total,
            "uptime": self.started.elapsed().as_secs(),
            "status": status,
            "timestamp": iso(chrono::Utc::now()),
            "queue_depth": self.spool.pending_msgs(),
            "delivered_total": self.metrics.delivered.get(),
        })
    }

    /// Runs a command and returns its reply (the acknowledgement's argument).
    async fn command(&self, action: &str, request: Value) -> Value {
        let reply = self.command_inner(action, &request).await;
        let result = if reply.get("status").and_then(Value::as_str) == Some("error") {
            "error"
        } else {
            "ok"
        };
        self.metrics
            .commands
            .with_label_values(&[
                if contract_for(action).is_some() {
                    action
                } else {
                    "unknown"
                },
                result,
            ])
            .inc();
        reply
    }

    async fn command_inner(&self, action: &str, request: &Value) -> Value {
        let Some(contract) = contract_for(action) else {
            return contract::error_reply(
                &format!(
                    "Unknown action: {action} (the agent handles flush, get_consumption, deliver)"
                ),
                request,
            );
        };
        if let Err(v) = contract.validate(request) {
            tracing::warn!(action, error = %v, "command refused by its contract");
            return contract::error_reply(&v.to_string(), request);
        }
        let mut out = Map::new();
        match action {
            "flush" => {
                // Delivery sends a partial batch within the flush interval; wait (bounded) for
                // the spool to empty and report what is left, as the hub's flush does.
                let wait = request["wait"].as_bool().unwrap_or(true);
                let limit = request["timeout_ms"]
                    .as_f64()
                    .filter(|ms| *ms >= 0.0)
                    .map_or(FLUSH_MAX_WAIT, |ms| Duration::from_secs_f64(ms / 1000.0))
                    .min(FLUSH_MAX_WAIT);
                let deadline = Instant::now() + limit;
                while wait && self.spool.pending_msgs() > 0 && Instant::now() < deadline {
                    sleep(Duration::from_millis(20)).await;
                }
                out.insert("pending".into(), self.spool.pending_msgs().into());
            }
            "get_consumption" => {
                let now = chrono::Utc::now();
                let period = &request["period"];
                let (Some(start), end) = (
                    period["start"].as_str().and_then(parse_date),
                    period["end"].as_str().map(parse_date),
                ) else {
                    return contract::error_reply(
                        "Invalid field type: period.start (unsupported ISO-8601 form)",
                        request,
                    );
                };
                let end = match end {
                    None => now,
                    Some(Some(e)) => e,
                    Some(None) => {
                        return contract::error_reply(
                            "Invalid field type: period.end (unsupported ISO-8601 form)",
                            request,
                        );
                    }
                };
                out = self
                    .history
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .summary(start, end);
            }
            "deliver" => {
                let mut msg = Map::new();
                msg.insert("msg_type".into(), "message".into());
                msg.insert("data".into(), field(request, "data"));
                if let Some(d) = request.get("dest").filter(|d| !d.is_null()) {
                    msg.insert("dest".into(), d.clone());
                }
                if let Some(t) = request.get("tags").filter(|t| !t.is_null()) {
                    msg.insert("context".into(), json!({ "tags": t }));
                }
                msg.insert("correlation_id".into(), field(request, "correlation_id"));
                msg.insert("timestamp".into(), field(request, "requested_at"));
                let mut inbox = self.inbox.lock().unwrap_or_else(PoisonError::into_inner);
                if inbox.len() >= self.opts.inbox_size {
                    return contract::error_reply(
                        &format!(
                            "Inbox full: {} messages wait for msg_check; retry later",
                            inbox.len()
                        ),
                        request,
                    );
                }
                inbox.push_back(Value::Object(msg));
                out.insert("queued".into(), inbox.len().into());
            }
            _ => unreachable!("contract_for knows only these"),
        }
        contract::ok_reply(request, out)
    }
}

async fn timeout_at<F: std::future::Future>(deadline: Instant, f: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, f).await.ok()
}

/// System memory in GB: (used, total), from the cgroup when limited, else the host.
fn memory_gb() -> (f64, f64) {
    const GB: f64 = 1024.0 * 1024.0 * 1024.0;
    let read = |p: &str| -> Option<f64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    if let (Some(cur), Some(max)) = (
        read("/sys/fs/cgroup/memory.current"),
        read("/sys/fs/cgroup/memory.max"),
    ) {
        return (round2(cur / GB), round2(max / GB));
    }
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> f64 {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
            * 1024.0
    };
    let (total, avail) = (field("MemTotal:"), field("MemAvailable:"));
    (round2((total - avail) / GB), round2(total / GB))
}

/// Disk of `path`'s filesystem in GB: (used, total).
fn disk_gb(path: &std::path::Path) -> (f64, f64) {
    const GB: f64 = 1024.0 * 1024.0 * 1024.0;
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(std::path::Path::new("/"));
    match nix::sys::statvfs::statvfs(existing) {
        Ok(s) => {
            let frag = s.fragment_size() as f64;
            let total = s.blocks() as f64 * frag;
            let free = s.blocks_free() as f64 * frag;
            (round2((total - free) / GB), round2(total / GB))
        }
        Err(_) => (0.0, 0.0),
    }
}

async fn sample_history(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(inner.opts.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let rss = crate::system::rss_bytes().unwrap_or(0);
        let cpu = inner.metrics.cpu_percent.get();
        inner
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(chrono::Utc::now(), cpu, rss);
    }
}

/// Keeps one connection up until `stop` flips: connect, serve, back off, reconnect.
async fn supervise(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
    let mut generation = 0u64;
    loop {
        if *stop.borrow() {
            break;
        }
        generation += 1;
        inner.set_state(STATE_CONNECTING, None);
        let mut connected_at = None;
        let result = session(&inner, generation, &mut stop, &mut connected_at).await;
        // Drop the writer first so no new emit picks it up, then fail the emits still
        // waiting for an acknowledgement on this connection (they are retried).
        inner.conn.send_replace(None);
        inner
            .acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (g, _)| *g != generation);
        let reason = match result {
            Ok(()) => {
                inner.set_state(STATE_DISCONNECTED, None);
                break;
            }
            Err(e) => e,
        };
        inner.set_state(STATE_DISCONNECTED, Some(&format!("socketio: {reason}")));
        if connected_at.is_some_and(|t: Instant| t.elapsed() >= STABLE_CONNECTION) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        inner.metrics.upstream_reconnects.inc();
        tracing::warn!(%reason, url = %inner.opts.url, delay_ms = delay.as_millis() as u64,
            "Socket.IO connection lost or refused; reconnecting");
        tokio::select! {
            _ = sleep(delay) => {}
            _ = stop.changed() => {}
        }
    }
    inner.conn.send_replace(None);
}

/// A byte stream a WebSocket can run over (TCP, or TLS over TCP).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

async fn open(inner: &Inner) -> Result<Ws, String> {
    let ep = &inner.ep;
    let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| format!("connect {}:{}: {e}", ep.host, ep.port))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if ep.tls {
        let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
            .map_err(|e| format!("{}: not a valid TLS server name: {e}", ep.host))?;
        let tls = tokio_rustls::TlsConnector::from(inner.opts.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {}:{}: {e}", ep.host, ep.port))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let mut req = ep
        .request_url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("WebSocket request: {e}"))?;
    if !inner.opts.api_key.is_empty() {
        let v = format!("Bearer {}", inner.opts.api_key)
            .parse()
            .map_err(|_| "the API key is not a valid header value".to_string())?;
        req.headers_mut().insert("authorization", v);
    }
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| format!("WebSocket upgrade: {e}"))?;
    Ok(ws)
}

/// Next text frame, answering nothing: for the handshake phase.
async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            None => return Err("connection closed during the handshake".into()),
            Some(Err(e)) => return Err(format!("WebSocket: {e}")),
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(_))) => return Err("server closed the WebSocket".into()),
            Some(Ok(_)) => {}
        }
    }
}

/// One connection: Engine.IO open, namespace CONNECT, then serve until it ends. `Ok` only
/// when `stop` ended it.
async fn session(
    inner: &Arc<Inner>,
    generation: u64,
    stop: &mut watch::Receiver<bool>,
    connected_at: &mut Option<Instant>,
) -> Result<(), String> {
    let handshake = async {
        let mut ws = open(inner).await?;
        // Engine.IO OPEN: {"sid","upgrades","pingInterval","pingTimeout","maxPayload"}.
        let text = next_text(&mut ws).await?;
        let Some(packet::Engine::Open(json)) = packet::engine(&text) else {
            return Err(format!(
                "expected the Engine.IO open packet, got {text:.40}"
            ));
        };
        let open: Value =
            serde_json::from_str(json).map_err(|e| format!("Engine.IO open packet: {e}"))?;
        let ms = |k: &str, d: u64| {
            Duration::from_millis(open.get(k).and_then(Value::as_u64).unwrap_or(d))
        };
        let liveness = ms("pingInterval", 25_000) + ms("pingTimeout", 20_000);
        if let Some(max) = open.get("maxPayload").and_then(Value::as_u64) {
            inner.max_payload.store(max, Ordering::Relaxed);
        }
        let mut auth = Map::new();
        auth.insert("agent_id".into(), inner.opts.agent_id.clone().into());
        if !inner.opts.api_key.is_empty() {
            auth.insert("token".into(), inner.opts.api_key.clone().into());
        }
        let auth = Value::Object(auth);
        ws.send(Message::text(packet::connect(
            &inner.ep.nsp_prefix,
            Some(&auth),
        )))
        .await
        .map_err(|e| format!("WebSocket: {e}"))?;
        loop {
            let text = next_text(&mut ws).await?;
            match packet::engine(&text) {
                Some(packet::Engine::Ping(d)) => ws
                    .send(Message::text(format!("3{d}")))
                    .await
                    .map_err(|e| format!("WebSocket: {e}"))?,
                Some(packet::Engine::Message(m)) => {
                    let p = packet::socket(m)?;
                    match p.kind {
                        packet::Kind::Connect => return Ok((ws, liveness)),
                        packet::Kind::ConnectError => {
                            return Err(format!(
                                "namespace {} refused the connection: {}",
                                inner.opts.namespace,
                                p.data.map_or_else(String::new, |d| d
                                    .get("message")
                                    .and_then(Value::as_str)
                                    .map_or_else(|| d.to_string(), str::to_owned))
                            ));
                        }
                        _ => {}
                    }
                }
                Some(packet::Engine::Close) => return Err("server closed the session".into()),
                _ => {}
            }
        }
    };
    let (mut ws, liveness) = tokio::select! {
        r = timeout(inner.opts.connect_timeout, handshake) => match r {
            Ok(r) => r?,
            Err(_) => return Err(format!("no Socket.IO handshake within {:?}", inner.opts.connect_timeout)),
        },
        _ = stop.changed() => return Ok(()),
    };

    let (tx, mut outbox) = mpsc::channel::<String>(OUTBOX);
    inner.conn.send_replace(Some(Conn {
        tx: tx.clone(),
        generation,
    }));
    *connected_at = Some(Instant::now());
    inner.set_state(STATE_CONNECTED, None);
    tracing::info!(url = %inner.opts.url, namespace = %inner.opts.namespace, "Socket.IO connected");

    // The first heartbeat goes out right away (the seed starts the emitter on `connect`).
    let mut heartbeat = tokio::time::interval(inner.opts.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let ws_err = |e: tokio_tungstenite::tungstenite::Error| format!("WebSocket: {e}");
    loop {
        tokio::select! {
            _ = stop.changed() => {
                let _ = ws.send(Message::text(format!("41{}", inner.ep.nsp_prefix))).await;
                let _ = ws.close(None).await;
                return Ok(());
            }
            frame = outbox.recv() => {
                let Some(frame) = frame else { return Err("writer closed".into()) };
                ws.feed(Message::text(frame)).await.map_err(ws_err)?;
                // Coalesce what is already queued into one flush.
                let mut n = 0;
                while n < 256 {
                    let Ok(more) = outbox.try_recv() else { break };
                    ws.feed(Message::text(more)).await.map_err(ws_err)?;
                    n += 1;
                }
                ws.flush().await.map_err(ws_err)?;
            }
            _ = heartbeat.tick() => {
                let hb = inner.heartbeat().to_string();
                ws.send(Message::text(packet::event(&inner.ep.nsp_prefix, None, HEARTBEAT_EVENT, &hb)))
                    .await
                    .map_err(ws_err)?;
                tracing::debug!("heartbeat sent");
            }
            _ = sleep_until(last_heard + liveness) => {
                return Err(format!("nothing heard from the server for {liveness:?} (Engine.IO ping timeout)"));
            }
            msg = ws.next() => {
                let text = match msg {
                    None => return Err("server closed the connection".into()),
                    Some(Err(e)) => return Err(ws_err(e)),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) => return Err("server closed the WebSocket".into()),
                    Some(Ok(_)) => continue,
                };
                last_heard = Instant::now();
                match packet::engine(text.as_str()) {
                    Some(packet::Engine::Ping(d)) => {
                        ws.send(Message::text(format!("3{d}"))).await.map_err(ws_err)?;
                    }
                    Some(packet::Engine::Close) => return Err("server closed the session".into()),
                    Some(packet::Engine::Message(m)) => on_packet(inner, m, &tx)?,
                    _ => {}
                }
            }
        }
    }
}

/// Handles a Socket.IO packet of the live connection.
fn on_packet(inner: &Arc<Inner>, text: &str, tx: &mpsc::Sender<String>) -> Result<(), String> {
    let p = match packet::socket(text) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an undecodable Socket.IO packet");
            return Ok(());
        }
    };
    if p.nsp != inner.opts.namespace && !(p.nsp == "/" && inner.ep.nsp_prefix.is_empty()) {
        return Ok(());
    }
    match p.kind {
        packet::Kind::Ack => {
            if let Some(id) = p.id {
                let waiter = inner
                    .acks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                if let Some((_, w)) = waiter {
                    let _ = w.send(p.data.unwrap_or(Value::Array(vec![])));
                }
            }
        }
        packet::Kind::Event => {
            let mut args = match p.data {
                Some(Value::Array(a)) => a.into_iter(),
                _ => return Ok(()),
            };
            let Some(Value::String(action)) = args.next() else {
                return Ok(());
            };
            let request = args.next().unwrap_or(Value::Null);
            let inner = inner.clone();
            let tx = tx.clone();
            // Commands run on their own task: a `flush` waits for deliveries whose
            // acknowledgements this connection's loop must keep reading.
            tokio::spawn(async move {
                let reply = inner.command(&action, request).await;
                let frame = match p.id {
                    Some(id) => packet::ack(&inner.ep.nsp_prefix, id, &reply),
                    None => packet::event(
                        &inner.ep.nsp_prefix,
                        None,
                        RESPONSE_EVENT,
                        &reply.to_string(),
                    ),
                };
                let _ = tx.send(frame).await;
            });
        }
        packet::Kind::Disconnect => return Err("server disconnected the namespace".into()),
        packet::Kind::ConnectError => {
            return Err(format!(
                "server error: {}",
                p.data.map(|d| d.to_string()).unwrap_or_default()
            ));
        }
        packet::Kind::BinaryEvent | packet::Kind::BinaryAck => {
            tracing::warn!("ignoring a binary Socket.IO packet (the agent speaks JSON only)");
        }
        packet::Kind::Connect => {}
    }
    Ok(())
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

    #[test]
    fn engine_packets() {
        use packet::Engine;
        assert_eq!(
            packet::engine(r#"0{"sid":"x"}"#),
            Some(Engine::Open(r#"{"sid":"x"}"#))
        );
        assert_eq!(packet::engine("2"), Some(Engine::Ping("")));
        assert_eq!(packet::engine("3probe"), Some(Engine::Pong("probe")));
        assert_eq!(
            packet::engine("42[\"a\"]"),
            Some(Engine::Message("2[\"a\"]"))
        );
        assert_eq!(packet::engine("1"), Some(Engine::Close));
        assert_eq!(packet::engine(""), None);
        assert_eq!(packet::engine("x"), None);
    }

    #[test]
    fn socket_packets_decode() {
        use packet::{Kind, Packet, socket};
        assert_eq!(
            socket(r#"0{"sid":"abc"}"#).unwrap(),
            Packet {
                kind: Kind::Connect,
                nsp: "/".into(),
                id: None,
                data: Some(json!({"sid":"abc"}))
            }
        );
        assert_eq!(
            socket(r#"2/cloud,12["flush",{"a":1}]"#).unwrap(),
            Packet {
                kind: Kind::Event,
                nsp: "/cloud".into(),
                id: Some(12),
                data: Some(json!(["flush", {"a": 1}]))
            }
        );
        assert_eq!(
            socket("37[]").unwrap(),
            Packet {
                kind: Kind::Ack,
                nsp: "/".into(),
                id: Some(7),
                data: Some(json!([]))
            }
        );
        assert_eq!(socket("1/cloud,").unwrap().kind, Kind::Disconnect);
        assert_eq!(
            socket(r#"4{"message":"Not authorized"}"#).unwrap().data,
            Some(json!({"message": "Not authorized"}))
        );
        let bin = socket(r#"51-3["up",{"_placeholder":true,"num":0}]"#).unwrap();
        assert_eq!((bin.kind, bin.id), (Kind::BinaryEvent, Some(3)));
        assert!(socket("2[oops").is_err());
        assert!(socket("9").is_err());
        assert!(socket("299999999999999999999999[]").is_err());
    }

    #[test]
    fn socket_packets_encode() {
        assert_eq!(packet::connect("", None), "40");
        assert_eq!(
            packet::connect("/cloud,", Some(&json!({"token": "t"}))),
            r#"40/cloud,{"token":"t"}"#
        );
        assert_eq!(
            packet::event("", Some(5), "messages", "[1,2]"),
            r#"425["messages",[1,2]]"#
        );
        assert_eq!(
            packet::event("/cloud,", None, "heartbeat", "{}"),
            r#"42/cloud,["heartbeat",{}]"#
        );
        assert_eq!(
            packet::ack("", 12, &json!({"ok": true})),
            r#"4312[{"ok":true}]"#
        );
        // What we encode decodes to the same thing.
        let p = packet::socket(&packet::event("/cloud,", Some(9), "e\"v", r#"{"x":[1]}"#)[1..])
            .unwrap();
        assert_eq!((p.nsp.as_str(), p.id), ("/cloud", Some(9)));
        assert_eq!(p.data, Some(json!(["e\"v", {"x": [1]}])));
    }

    #[test]
    fn command_contracts_cover_every_type_kind() {
        for action in ["flush", "get_consumption", "deliver"] {
            let c = contract_for(action).unwrap();
            let e = c.validate(&json!({})).unwrap_err().to_string();
            assert_eq!(e, "Missing required field: correlation_id");
        }
        let base =
            json!({"correlation_id": 1, "action": "x", "requested_at": "2025-11-20T20:30:45"});
        assert!(contract_for("delete_device").is_none());
        let deliver = contract_for("deliver").unwrap();
        let mut m = base.clone();
        m["data"] = json!({"text": "hi"});
        assert_eq!(deliver.validate(&m), Ok(()));
        m["tags"] = json!(["a", 2]);
        assert!(
            deliver
                .validate(&m)
                .unwrap_err()
                .to_string()
                .contains("tags[1]")
        );
    }

    #[test]
    fn dates_parse_in_every_accepted_form() {
        for s in [
            "2025-11-20",
            "2025-11-20T20:30",
            "2025-11-20T20:30:45",
            "2025-11-20T20:30:45.123456",
            "2025-11-20T20:30:45Z",
            "2025-11-20 20:30:45,5+02:00",
            "2024-02-29T00:00:00-0130",
            "2025-12-31T23:59:59+05",
        ] {
            assert!(contract::is_iso8601(s), "{s}");
            assert!(parse_date(s).is_some(), "{s}");
        }
        assert_eq!(
            parse_date("2025-11-20T22:30:00+02:00"),
            parse_date("2025-11-20T20:30")
        );
    }

    #[test]
    fn consumption_summary() {
        let mut h = History::default();
        let t0 = parse_date("2025-11-20T20:00:00Z").unwrap();
        for i in 0..10 {
            h.push(
                t0 + chrono::Duration::seconds(5 * i),
                i as f64,
                (i as u64 + 1) << 20,
            );
        }
        let s = h.summary(
            t0 + chrono::Duration::seconds(10),
            t0 + chrono::Duration::seconds(20),
        );
        assert_eq!(s["samples"], 3);
        assert_eq!(
            s["cpu_usage"],
            json!({"avg": 3.0, "max": 4.0, "unit": "percent"})
        );
        assert_eq!(s["memory_usage"]["max"], 5.0);
        let s = h.summary(
            t0 - chrono::Duration::hours(2),
            t0 - chrono::Duration::hours(1),
        );
        assert_eq!(s["samples"], 0);
        assert_eq!(s["cpu_usage"]["avg"], Value::Null);
    }

    #[test]
    fn reconnect_backoff_is_one_to_thirty_seconds() {
        let mut b = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
        let caps: Vec<u64> = (0..8)
            .map(|_| {
                let cap = b.cap();
                assert!(b.next_delay() <= cap);
                cap.as_secs()
            })
            .collect();
        assert_eq!(caps, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

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
        let spool = Spool::open(crate::spool::SpoolOptions {
            dir: spool_dir,
            max_bytes: 1 << 20,
            segment_bytes: 1 << 20,
            sync_interval: Duration::from_secs(1),
            overflow: crate::spool::Overflow::Reject,
        })
        .unwrap();
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
