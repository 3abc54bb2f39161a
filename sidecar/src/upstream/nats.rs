//! `nats` upstream: NATS JetStream.
//!
//! - A batch is delivered when JetStream acknowledged every one of its messages. Each message
//!   is published with `Nats-Msg-Id` = its stable spool id, so a batch retried after a lost
//!   ack, a server restart or an agent restart is stored once (within the stream's duplicate
//!   window).
//! - Subject: the template (`nanogate.{namespace}.{gateway}`), then the message's `dest` split
//!   on `.` and `/` into further tokens; every substituted token is made subject-safe.
//! - `msg_check` pulls from a durable pull consumer filtered on the inbox subject and acks
//!   what it hands to the app; `wait:true` publishes one message and relays the ack as JSON.
//! - Errors: connection loss and timeouts are retryable; a permissions violation, an invalid
//!   subject or a message over the server's `max_payload` is rejected (dead letter).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use async_nats::{ConnectOptions, ServerAddr};
use bytes::Bytes;
use futures::StreamExt as _;

use super::api_key::ApiKey;
use super::{Batch, Upstream, UpstreamError};
use crate::config::Config;
use crate::config::upstream::NatsNames;
use crate::health::Health;
use crate::metrics::Metrics;

/// How recent a server error must be to explain a failed publish.
const ERROR_MEMORY: Duration = Duration::from_secs(60);
/// Most JetStream acks awaited at once (the context allows 5,000 in flight).
const ACK_WINDOW: usize = 4096;
/// Longest wait for the messages of one `msg_check` pull.
const PULL_WAIT: Duration = Duration::from_millis(500);

/// Whether NATS subject pattern `pattern` (with `*` and `>`) matches `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether the stream's subjects cover `wanted` (a literal subject or `x.>`).
fn covered(stream_subjects: &[String], wanted: &str) -> bool {
    stream_subjects.iter().any(|p| {
        if let Some(prefix) = wanted.strip_suffix(".>") {
            // `x.>` is covered by a pattern that matches any `x.<anything>`: test a token no
            // pattern names literally, and make sure the pattern ends in `>`.
            p.ends_with('>') && subject_matches(p, &format!("{prefix}.\u{1}"))
        } else {
            subject_matches(p, wanted)
        }
    })
}

fn read_secret(path: &Path, field: &str) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("{field}: cannot read {}", path.display()))?;
    let s = s.trim().to_string();
    anyhow::ensure!(!s.is_empty(), "{field}: {} is empty", path.display());
    Ok(s)
}

/// What the connection reported: the last server or client error (to explain failed
/// publishes) and whether it was ever connected.
#[derive(Debug, Default)]
struct ConnectionEvents {
    last_error: Mutex<Option<(Instant, String)>>,
    ever_connected: AtomicBool,
}

impl ConnectionEvents {
    fn connected(&self) {
        self.ever_connected.store(true, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
    fn ever_connected(&self) -> bool {
        self.ever_connected.load(Ordering::Relaxed)
    }
    fn set(&self, text: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), text));
    }
    fn recent(&self) -> Option<String> {
        let g = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        g.as_ref()
            .filter(|(at, _)| at.elapsed() < ERROR_MEMORY)
            .map(|(_, t)| t.clone())
    }
}

pub struct NatsUpstream {
    client: async_nats::Client,
    js: jetstream::Context,
    names: NatsNames,
    create_stream: bool,
    duplicate_window: Duration,
    metrics: Arc<Metrics>,
    events: Arc<ConnectionEvents>,
    first_connect_wait: Duration,
    /// Whether the connection uses TLS (for error hints).
    tls: bool,
    /// Set once the stream is known to exist; cleared when a publish finds no stream. The
    /// async mutex makes concurrent callers wait for one check instead of racing to create.
    stream_ready: tokio::sync::Mutex<bool>,
    consumer: tokio::sync::Mutex<Option<consumer::PullConsumer>>,
    /// Held while one window of publishes is sent and its acks awaited. Delivery has several
    /// batches in flight at once (`max_in_flight`); without it, their windows would share the
    /// context's 5,000 in-flight permits and each wait for permits the others hold (a
    /// deadlock). One window of up to [`ACK_WINDOW`] acks already keeps the server busy.
    publish_window: tokio::sync::Mutex<()>,
    key: Arc<ApiKey>,
    /// Ends [`reconnect_on_new_key`] with this value.
    _reconnect_stop: crate::shutdown::ShutdownTrigger,
}

/// Reconnects `client` whenever the API key (its token) is reloaded, until `stop`: a rotated key
/// must not wait for the connection to drop on its own.
async fn reconnect_on_new_key(
    client: async_nats::Client,
    key: Arc<ApiKey>,
    stop: crate::shutdown::Shutdown,
) {
    let mut seen = key.generation();
    loop {
        tokio::select! {
            _ = key.changed(seen) => {}
            _ = stop.triggered() => return,
        }
        seen = key.generation();
        tracing::info!("reconnecting to NATS with the reloaded API key");
        if let Err(e) = client.force_reconnect().await {
            tracing::warn!(error = %e, "NATS reconnect with the reloaded API key failed");
        }
    }
}

impl std::fmt::Debug for NatsUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials are deliberately left out.
        f.debug_struct("NatsUpstream")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl NatsUpstream {
    /// Connects in the background: returns at once; publishes fail (retryably) until the
    /// server is reachable. Credential and TLS files are read now, so a missing file is a
    /// start-up error naming the option.
    /// `key` authenticates (as a token) when no NATS credentials are configured: read at each
    /// (re)connect, and a reloaded key reconnects at once.
    pub async fn connect(
        config: &Config,
        key: Arc<ApiKey>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> anyhow::Result<Self> {
        let names = NatsNames::from_config(config)?;
        let events = Arc::new(ConnectionEvents::default());
        // The connection's state, as for the other persistent transport (socketio).
        let state = {
            let (metrics, health) = (metrics.clone(), health);
            move |value: i64, name: &'static str| {
                metrics.upstream_connection_state.set(value);
                health.set_connection(name);
            }
        };
        state(1, "connecting");
        let (initial, max) = (config.backoff_initial, config.backoff_max);
        let own_credentials = config.nats_creds_file.is_some()
            || (config.nats_user.is_some() && config.nats_password_file.is_some())
            || config.nats_token_file.is_some();
        let opts = if own_credentials {
            ConnectOptions::new()
        } else {
            // The API key as the token, read at every connect (not copied once).
            let key = key.clone();
            ConnectOptions::with_auth_callback(move |_nonce| {
                let current = key.current();
                async move {
                    let mut auth = async_nats::Auth::new();
                    if !current.secret.is_empty() {
                        auth.token = Some(current.secret.to_string());
                    }
                    Ok(auth)
                }
            })
        };
        let mut opts = opts
            .name(format!("nano-agent {}", config.source()))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(config.upstream_timeout.min(Duration::from_secs(5)))
            .request_timeout(Some(config.upstream_timeout))
            .reconnect_delay_callback(move |attempts| {
                // Full-jitter exponential backoff, as for HTTP retries.
                let cap = initial.saturating_mul(1u32 << attempts.min(20)).min(max);
                cap.mul_f64(rand::random::<f64>())
            })
            .event_callback({
                let (events, metrics, key) = (events.clone(), metrics.clone(), key.clone());
                move |event| {
                    let (events, metrics, state) = (events.clone(), metrics.clone(), state.clone());
                    let key = key.clone();
                    async move {
                        match &event {
                            async_nats::Event::Connected => {
                                tracing::info!("NATS connected");
                                events.connected();
                                state(2, "connected");
                            }
                            async_nats::Event::Disconnected => {
                                tracing::warn!("NATS disconnected; reconnecting");
                                events.set("disconnected".into());
                                metrics.upstream_reconnects.inc();
                                state(1, "connecting");
                            }
                            async_nats::Event::ServerError(e) => {
                                if e.to_string().contains("authorization") {
                                    // Perhaps a rotated key: look at its file now.
                                    key.recheck_soon();
                                }
                                tracing::error!(error = %e, "NATS server error");
                                events.set(e.to_string());
                            }
                            async_nats::Event::ClientError(e) => {
                                tracing::warn!(error = %e, "NATS connection error");
                                events.set(e.to_string());
                            }
                            other => tracing::info!(event = %other, "NATS event"),
                        }
                    }
                }
            });
        if let Some(creds) = &config.nats_creds_file {
            opts = opts.credentials_file(creds).await.with_context(|| {
                format!(
                    "nats_creds_file: cannot use {} (a NATS .creds file)",
                    creds.display()
                )
            })?;
        } else if let (Some(user), Some(pw)) = (&config.nats_user, &config.nats_password_file) {
            opts = opts.user_and_password(user.clone(), read_secret(pw, "nats_password_file")?);
        } else if let Some(token) = &config.nats_token_file {
            opts = opts.token(read_secret(token, "nats_token_file")?);
        }
        let mut tls = names.servers.iter().any(|s| s.starts_with("tls://"));
        if let Some(ca) = &config.upstream_ca {
            std::fs::metadata(ca)
                .with_context(|| format!("upstream_ca: cannot read {}", ca.display()))?;
            opts = opts.add_root_certificates(ca.clone());
            tls = true;
        }
        if let (Some(cert), Some(key)) = (&config.upstream_client_cert, &config.upstream_client_key)
        {
            for (field, p) in [("upstream_client_cert", cert), ("upstream_client_key", key)] {
                std::fs::metadata(p)
                    .with_context(|| format!("{field}: cannot read {}", p.display()))?;
            }
            opts = opts.add_client_certificate(cert.clone(), key.clone());
            tls = true;
        }
        if tls {
            opts = opts.require_tls(true);
        }
        if config.upstream_insecure_skip_verify {
            // The agent's own TLS configuration (it carries the client certificate too):
            // async-nats has no switch of its own to skip verification.
            let mut client = super::tls::client_config(config)?;
            client.alpn_protocols.clear();
            opts = opts.tls_client_config(client);
        }
        let addrs: Vec<ServerAddr> = names
            .servers
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()
            .context("app_url: not a NATS server URL")?;
        let client = opts.connect(addrs).await.context("connecting to NATS")?;
        let (reconnect_stop, stopped) = crate::shutdown::channel();
        if !own_credentials {
            tokio::spawn(reconnect_on_new_key(client.clone(), key.clone(), stopped));
        }
        let js = jetstream::context::ContextBuilder::new()
            .timeout(config.upstream_timeout)
            .ack_timeout(config.upstream_timeout)
            .build(client.clone());
        Ok(Self {
            client,
            js,
            names,
            create_stream: config.nats_create_stream,
            duplicate_window: config.nats_duplicate_window,
            metrics,
            events,
            first_connect_wait: config.upstream_timeout.min(Duration::from_secs(2)),
            tls,
            stream_ready: tokio::sync::Mutex::new(false),
            consumer: tokio::sync::Mutex::new(None),
            publish_window: tokio::sync::Mutex::new(()),
            key,
            _reconnect_stop: reconnect_stop,
        })
    }

    pub(super) fn key(&self) -> &Arc<ApiKey> {
        &self.key
    }

    pub fn names(&self) -> &NatsNames {
        &self.names
    }

    /// Why nothing works when the client is not connected.
    fn not_connected(&self, what: &str) -> UpstreamError {
        let mut reason = format!("NATS not connected ({what})");
        if let Some(e) = self.events.recent() {
            reason.push_str(": ");
            reason.push_str(&e);
            if e.contains("authorization") || e.contains("authentication") {
                reason.push_str(
                    " — check the credentials (nats_creds_file, nats_user/nats_password_file, nats_token_file or the API key)",
                );
            } else if self.tls && (e.contains("TLS") || e.contains("IO error")) {
                // A refused handshake (e.g. no or an untrusted client certificate) surfaces
                // as an I/O error of the connection.
                reason.push_str(
                    " — check TLS: upstream_ca, upstream_client_cert/upstream_client_key and what the server requires",
                );
            }
        }
        UpstreamError::Retryable {
            reason,
            retry_after: None,
        }
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Right after start the first connection is usually a few milliseconds away: an app's
    /// `msg_check` or `wait:true` then waits for it (bounded) instead of failing.
    async fn connected_soon(&self) -> bool {
        let deadline = Instant::now() + self.first_connect_wait;
        while !self.connected() {
            if self.events.ever_connected() || Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Makes sure the stream exists and captures our subjects (creating or extending it when
    /// allowed). Cheap after the first success.
    async fn ensure_stream(&self) -> Result<(), UpstreamError> {
        let mut ready = self.stream_ready.lock().await;
        if *ready {
            return Ok(());
        }
        if !self.connected_soon().await {
            return Err(self.not_connected("stream check"));
        }
        let retry = |reason: String| UpstreamError::Retryable {
            reason,
            retry_after: None,
        };
        let name = &self.names.stream;
        let wanted = self.names.stream_subjects();
        match self.js.get_stream(name).await {
            Ok(mut s) => {
                let info = s
                    .info()
                    .await
                    .map_err(|e| retry(format!("NATS stream {name} info: {e}")))?;
                let have = info.config.subjects.clone();
                let missing: Vec<String> = wanted
                    .iter()
                    .filter(|w| !covered(&have, w))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    if !self.create_stream {
                        return Err(retry(format!(
                            "NATS stream {name} does not capture {missing:?}; add them to the stream or enable nats_create_stream"
                        )));
                    }
                    let mut config = info.config.clone();
                    config.subjects.extend(missing.iter().cloned());
                    self.js.update_stream(config).await.map_err(|e| {
                        retry(format!(
                            "NATS stream {name}: adding subjects {missing:?}: {e}"
                        ))
                    })?;
                    tracing::info!(stream = %name, subjects = ?missing, "NATS stream extended");
                }
            }
            Err(e) => {
                let not_found = matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND);
                if !not_found {
                    return Err(retry(format!("NATS stream {name}: {e}")));
                }
                if !self.create_stream {
                    return Err(retry(format!(
                        "NATS stream {name} does not exist; create it (subjects {wanted:?}) or enable nats_create_stream"
                    )));
                }
                self.js
                    .create_stream(stream::Config {
                        name: name.clone(),
                        subjects: wanted.to_vec(),
                        storage: stream::StorageType::File,
                        duplicate_window: self.duplicate_window,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| retry(format!("NATS stream {name}: cannot create it: {e}")))?;
                tracing::info!(stream = %name, subjects = ?wanted, duplicate_window = ?self.duplicate_window,
                    "NATS stream created");
            }
        }
        *ready = true;
        Ok(())
    }

    async fn forget_stream(&self) {
        *self.stream_ready.lock().await = false;
        *self.consumer.lock().await = None;
    }

    /// Classifies a failed publish to `subject`.
    fn publish_error(&self, e: &jetstream::context::PublishError, subject: &str) -> UpstreamError {
        use jetstream::context::PublishErrorKind as K;
        let recent = self.events.recent().unwrap_or_default();
        // A denied publish gets no reply, only an asynchronous `-ERR` naming the subject; the
        // ack then times out.
        if recent.contains(&format!(
            "Permissions Violation for Publish to \"{subject}\""
        )) {
            return UpstreamError::Rejected {
                status: 403,
                body: format!("NATS refused the publish: {recent}"),
            };
        }
        match e.kind() {
            K::MaxPayloadExceeded => UpstreamError::Rejected {
                status: 413,
                body: format!("NATS: {e}"),
            },
            K::StreamNotFound => UpstreamError::Retryable {
                reason: format!(
                    "NATS: no stream captures the subject (stream {}): {e}",
                    self.names.stream
                ),
                retry_after: None,
            },
            K::Other => {
                // A JetStream error reply: 4xx (other than 408/429) is about the message.
                let code = std::error::Error::source(e)
                    .and_then(|s| s.downcast_ref::<jetstream::Error>())
                    .map(|j| j.code());
                match code {
                    Some(c) if (400..500).contains(&c) && c != 408 && c != 429 => {
                        UpstreamError::Rejected {
                            status: c as u16,
                            body: format!("JetStream: {e}"),
                        }
                    }
                    _ => UpstreamError::Retryable {
                        reason: format!("NATS publish: {e}"),
                        retry_after: None,
                    },
                }
            }
            _ if !self.connected() => self.not_connected(&e.to_string()),
            _ => {
                let mut reason = format!("NATS publish: {e}");
                if !recent.is_empty() {
                    reason.push_str(&format!(" (last NATS error: {recent})"));
                }
                UpstreamError::Retryable {
                    reason,
                    retry_after: None,
                }
            }
        }
    }

    /// Publishes `(subject, payload, id)` messages and waits for every acknowledgement.
    /// Returns the acks in order.
    async fn publish_all(
        &self,
        messages: impl Iterator<Item = (String, Bytes, Option<String>)>,
    ) -> Result<Vec<jetstream::publish::PublishAck>, UpstreamError> {
        self.ensure_stream().await?;
        let start = Instant::now();
        let mut acks = Vec::new();
        let mut worst: Option<UpstreamError> = None;
        let mut pending = Vec::new();
        let mut subjects = Vec::new();
        // Collected first: the iterator's closures need not live across the awaits below.
        let mut messages = messages.collect::<Vec<_>>().into_iter();
        loop {
            // At most ACK_WINDOW acks outstanding: each holds one of the context's in-flight
            // permits, so a batch larger than the permits would otherwise wait on itself.
            let window: Vec<_> = messages.by_ref().take(ACK_WINDOW).collect();
            if window.is_empty() {
                break;
            }
            // One window at a time across concurrent batches (see `publish_window`).
            let _window = self.publish_window.lock().await;
            for (subject, payload, id) in window {
                let mut publish = PublishMessage::build().payload(payload);
                if let Some(id) = id {
                    publish = publish.message_id(id);
                }
                match self.js.send_publish(subject.clone(), publish).await {
                    Ok(ack) => pending.push(ack.into_future()),
                    Err(e) => return Err(self.publish_error(&e, &subject)),
                }
                subjects.push(subject);
            }
            let results = futures::future::join_all(pending.drain(..)).await;
            for (r, subject) in results.into_iter().zip(subjects.drain(..)) {
                match r {
                    Ok(ack) => acks.push(ack),
                    Err(e) => {
                        if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                            self.forget_stream().await;
                        }
                        let err = self.publish_error(&e, &subject);
                        // One rejection decides the batch; otherwise keep the first reason.
                        if worst.is_none() || matches!(err, UpstreamError::Rejected { .. }) {
                            worst = Some(err);
                        }
                    }
                }
            }
            if worst.is_some() {
                break;
            }
        }
        self.metrics
            .upstream_duration
            .with_label_values(&["nats_publish"])
            .observe(start.elapsed().as_secs_f64());
        match worst {
            Some(e) => Err(e),
            None => Ok(acks),
        }
    }

    async fn pull_consumer(&self) -> Result<consumer::PullConsumer, UpstreamError> {
        self.ensure_stream().await?;
        let mut slot = self.consumer.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let stream =
            self.js
                .get_stream(&self.names.stream)
                .await
                .map_err(|e| UpstreamError::Retryable {
                    reason: format!("NATS stream {}: {e}", self.names.stream),
                    retry_after: None,
                })?;
        let c: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &self.names.consumer,
                consumer::pull::Config {
                    durable_name: Some(self.names.consumer.clone()),
                    filter_subject: self.names.inbox.clone(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| UpstreamError::Retryable {
                reason: format!("NATS consumer {}: {e}", self.names.consumer),
                retry_after: None,
            })?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

/// The `dest` of a stamped message, if any.
fn dest_of(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Dest {
        #[serde(default)]
        dest: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Dest>(payload).ok()?.dest? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Upstream for NatsUpstream {
    async fn send_batch(&self, body: Bytes, count: u64) -> Result<(), UpstreamError> {
        // Without ids (only reached when called directly): split the array and publish.
        let items: Vec<serde_json::Value> =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::Rejected {
                status: 400,
                body: format!("batch is not a JSON array: {e}"),
            })?;
        debug_assert_eq!(items.len() as u64, count);
        let messages = items.iter().map(|v| {
            // Re-serialising a parsed JSON value cannot fail; `null` would be the fallback.
            let payload = Bytes::from(serde_json::to_vec(v).unwrap_or_else(|_| b"null".to_vec()));
            (
                self.names.subject_for(dest_of(&payload).as_deref()),
                payload,
                None,
            )
        });
        self.publish_all(messages).await.map(|_| ())
    }

    async fn deliver(&self, batch: &Batch) -> Result<(), UpstreamError> {
        let messages = batch.messages.iter().map(|m| {
            let payload = batch.payload(m);
            let subject = self.names.subject_for(dest_of(&payload).as_deref());
            (subject, payload, Some(batch.id(m)))
        });
        let acks = self.publish_all(messages).await?;
        let duplicates = acks.iter().filter(|a| a.duplicate).count();
        if duplicates > 0 {
            tracing::info!(
                duplicates,
                count = batch.count,
                "NATS de-duplicated messages of a retried batch"
            );
        }
        Ok(())
    }

    async fn send_one(&self, body: Bytes) -> Result<Bytes, UpstreamError> {
        let subject = self.names.subject_for(dest_of(&body).as_deref());
        let acks = self
            .publish_all(std::iter::once((subject.clone(), body, None)))
            .await?;
        let ack = acks.first().ok_or_else(|| UpstreamError::Retryable {
            reason: "NATS returned no acknowledgement".into(),
            retry_after: None,
        })?;
        let reply = serde_json::json!({
            "status": "ok",
            "stream": ack.stream,
            "seq": ack.sequence,
            "duplicate": ack.duplicate,
            "subject": subject,
        });
        Ok(Bytes::from(reply.to_string()))
    }

    async fn check_messages(&self, limit: u32) -> Result<Vec<serde_json::Value>, UpstreamError> {
        if !self.connected_soon().await {
            return Err(self.not_connected("msg_check"));
        }
        let consumer = self.pull_consumer().await?;
        let start = Instant::now();
        let fetched = consumer
            .fetch()
            .max_messages(limit.max(1) as usize)
            .expires(PULL_WAIT)
            .messages()
            .await;
        let mut batch = match fetched {
            Ok(b) => b,
            Err(e) => {
                *self.consumer.lock().await = None;
                return Err(UpstreamError::Retryable {
                    reason: format!("NATS pull from {}: {e}", self.names.consumer),
                    retry_after: None,
                });
            }
        };
        let mut out = Vec::new();
        while let Ok(Some(next)) =
            tokio::time::timeout(PULL_WAIT + Duration::from_millis(500), batch.next()).await
        {
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "NATS pull ended");
                    break;
                }
            };
            // Acked (and confirmed) before the app sees it: handed over exactly once.
            if let Err(e) = msg.double_ack().await {
                tracing::warn!(error = %e, "NATS ack of a pulled message failed; it will be redelivered");
                continue;
            }
            out.push(serde_json::from_slice(&msg.payload).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&msg.payload).into_owned())
            }));
        }
        self.metrics
            .upstream_duration
            .with_label_values(&["nats_pull"])
            .observe(start.elapsed().as_secs_f64());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_coverage() {
        let have = vec!["nanogate.>".to_string(), "inbox.*".to_string()];
        assert!(covered(&have, "nanogate.a.b"));
        assert!(covered(&have, "nanogate.a.b.>"));
        assert!(covered(&have, "inbox.x"));
        assert!(!covered(&have, "inbox.x.y"));
        assert!(!covered(&have, "other"));
        let exact = vec!["nanogate.a.b".to_string()];
        assert!(covered(&exact, "nanogate.a.b"));
        assert!(!covered(&exact, "nanogate.a.b.>"));
    }

    #[test]
    fn dest_is_read_from_the_message() {
        assert_eq!(
            dest_of(br#"{"msg_type":"publish","dest":"eu/1","data":{}}"#),
            Some("eu/1".into())
        );
        assert_eq!(dest_of(br#"{"msg_type":"publish","data":{}}"#), None);
        assert_eq!(dest_of(br#"{"dest":7}"#), Some("7".into()));
    }
}
