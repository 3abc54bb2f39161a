//! Transports from the agent to the platform. One trait; `http` is the Tendrl platform API,
//! `nats` JetStream, `socketio` the cloud protocol. Retry policy lives in delivery (delivery/mod.rs), not in the
//! transports: a transport makes one attempt and classifies the outcome.
//!
//! [`Upstream`] returns `impl Future` and so cannot be a trait object; [`AnyUpstream`] is the
//! enum the agent runs with, chosen by `upstream_kind`. A new transport adds a variant, a line
//! in `each_upstream!` and an arm in [`AnyUpstream::from_config`].

pub mod api_key;
pub mod http;
pub mod nats;
pub mod socketio;
pub mod tls;

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::{Config, UpstreamKind};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::spool::{PendingBatch, Position, Spool};
use api_key::ApiKey;
use http::HttpUpstream;
use nats::NatsUpstream;
use socketio::{SocketIoOptions, SocketIoUpstream};

/// Outcome of a failed upstream attempt. What delivery does with each (see delivery/mod.rs):
///
/// | variant | HTTP | delivery |
/// |---|---|---|
/// | `Retryable` | 5xx, 429, 408, network, timeout, reset | retry with backoff (≥ `Retry-After`, capped) |
/// | `Unauthorized` | 401, 403 | hold the spool, retry with capped backoff, never dead-letter |
/// | `Redirected` | 3xx (never followed) | retry with backoff |
/// | `TooLarge` | 413 | split the batch; a single message is dead-lettered |
/// | `Rejected` | other 4xx | split the batch; a single message is dead-lettered |
///
/// The `Display` of `Unauthorized` and `Redirected` starts with `unauthorized:` and
/// `redirected:`: it becomes the agent's `last_error`, and the operator reads the prefix for
/// the gateway's `UpstreamReachable` reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Worth retrying (5xx, 429, 408, network, timeout); `retry_after` from the platform.
    #[error("{reason}")]
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The platform refused the credentials (401/403). Retried: a rotated or mistyped key must
    /// not empty the spool.
    #[error(
        "unauthorized: HTTP {status} from {endpoint}; check the API key Secret (mounted as TENDRL_KEY_FILE, re-read within seconds of a change; or TENDRL_KEY / --api-key)"
    )]
    Unauthorized { status: u16, endpoint: &'static str },
    /// A 3xx. Never followed (a POST must not turn into a body-less GET); retried.
    #[error(
        "redirected: HTTP {status} from {endpoint} to {location}; redirects are not followed, check the platform URL (--app-url)"
    )]
    Redirected {
        status: u16,
        endpoint: &'static str,
        /// The `Location` header (at most 256 characters), or `(none)`.
        location: String,
    },
    /// 413: the request is too large. A batch is split; a single message is dead-lettered.
    #[error("too large: HTTP 413: {body}")]
    TooLarge { body: String },
    /// The platform refused the request for good (other 4xx). A batch is split to find the
    /// messages it refuses; a single message is dead-lettered.
    #[error("rejected with HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
}

impl UpstreamError {
    /// Metric label (`upstream_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Retryable { .. } => "retryable",
            Self::Unauthorized { .. } => "unauthorized",
            Self::Redirected { .. } => "redirect",
            Self::TooLarge { .. } => "too_large",
            Self::Rejected { .. } => "rejected",
        }
    }
}

/// A batch as delivery hands it to a transport: the JSON array, and each message's place in
/// it and in the spool (its stable id, see [`Batch::id`]).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The messages as one JSON array.
    pub body: Bytes,
    pub count: u64,
    /// The spool's id: with a message's spool position, its stable id.
    pub spool_id: Arc<str>,
    pub messages: Vec<BatchMessage>,
}

/// One message of a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMessage {
    /// Where the message is in the spool.
    pub at: Position,
    /// The message's JSON in [`Batch::body`].
    pub range: Range<usize>,
}

impl Batch {
    /// The batch read from spool `spool_id`.
    pub fn from_pending(spool_id: &str, pending: &PendingBatch) -> Self {
        let messages = pending
            .records
            .iter()
            .map(|r| BatchMessage {
                at: r.at,
                // +1: the array's opening bracket.
                range: r.start + 1..r.start + 1 + r.len,
            })
            .collect();
        Self {
            body: Bytes::from(pending.json_array()),
            count: pending.count,
            spool_id: Arc::from(spool_id),
            messages,
        }
    }

    /// `message`'s stable id, `<spool id>-<segment>-<offset>`: the same on every retry and
    /// after a restart. Made when asked (NATS de-duplication, dead letters), not for every
    /// message of every batch: an allocation per message cost the musl build measurable CPU.
    pub fn id(&self, message: &BatchMessage) -> String {
        format!("{}-{}-{}", self.spool_id, message.at.seq, message.at.offset)
    }

    /// The JSON of one message (no copy).
    pub fn payload(&self, message: &BatchMessage) -> Bytes {
        self.body.slice(message.range.clone())
    }

    /// The batch of `messages` (taken from this one): a new JSON array, the same stable ids.
    /// `None` when a message's range is not inside the body (a bug, never expected).
    fn subset(&self, messages: &[BatchMessage]) -> Option<Batch> {
        let mut body =
            Vec::with_capacity(messages.iter().map(|m| m.range.len() + 1).sum::<usize>() + 1);
        body.push(b'[');
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let json = self.body.get(m.range.clone())?;
            if i > 0 {
                body.push(b',');
            }
            let start = body.len();
            body.extend_from_slice(json);
            out.push(BatchMessage {
                at: m.at,
                range: start..body.len(),
            });
        }
        body.push(b']');
        Some(Batch {
            body: Bytes::from(body),
            count: out.len() as u64,
            spool_id: self.spool_id.clone(),
            messages: out,
        })
    }

    /// The two halves of a batch of at least two messages (the first half first), each with
    /// its messages' stable ids. `None` for a single message (or an inconsistent batch).
    pub fn split(&self) -> Option<(Batch, Batch)> {
        if self.messages.len() < 2 {
            return None;
        }
        let (first, second) = self.messages.split_at(self.messages.len() / 2);
        Some((self.subset(first)?, self.subset(second)?))
    }
}

/// A transport to the platform.
pub trait Upstream: Send + Sync + 'static {
    /// Delivers a batch (a JSON array of `count` messages). `Ok` means acknowledged.
    fn send_batch(
        &self,
        body: Bytes,
        count: u64,
    ) -> impl Future<Output = Result<(), UpstreamError>> + Send;

    /// Delivers a batch with its messages' stable ids. `Ok` means every message is
    /// acknowledged. Transports that de-duplicate by id override this; the rest send the body.
    fn deliver(&self, batch: &Batch) -> impl Future<Output = Result<(), UpstreamError>> + Send {
        self.send_batch(batch.body.clone(), batch.count)
    }

    /// Delivers one message for `wait:true` and returns the platform's reply body.
    fn send_one(&self, body: Bytes) -> impl Future<Output = Result<Bytes, UpstreamError>> + Send;

    /// Whether [`Upstream::check_messages`] asks the platform (its outcome then tells whether
    /// the platform is reachable).
    fn checks_call_the_platform(&self) -> bool {
        true
    }

    /// Fetches up to `limit` messages waiting for this agent (empty when there are none).
    fn check_messages(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<serde_json::Value>, UpstreamError>> + Send;

    /// Generation of the API key in use ([`api_key::Key::generation`]); 0 for a transport
    /// whose key never changes.
    fn key_generation(&self) -> u64 {
        0
    }

    /// Resolves once the API key is no longer generation `since`: delivery, refused with 401,
    /// retries as soon as a rotated key arrives instead of at the end of its backoff.
    fn key_changed(&self, since: u64) -> impl Future<Output = ()> + Send {
        let _ = since;
        std::future::pending()
    }
}

/// The transport the agent runs with (see the module documentation).
#[derive(Debug)]
pub enum AnyUpstream {
    Http(HttpUpstream),
    /// Boxed: the JetStream context is large and the enum lives behind an `Arc` anyway.
    Nats(Box<NatsUpstream>),
    Socketio(SocketIoUpstream),
}

/// `match` over every [`AnyUpstream`] variant, binding the transport to `$u`.
macro_rules! each_upstream {
    ($self:expr, $u:ident => $body:expr) => {
        match $self {
            AnyUpstream::Http($u) => $body,
            AnyUpstream::Nats($u) => $body,
            AnyUpstream::Socketio($u) => $body,
        }
    };
}

impl AnyUpstream {
    /// Builds the transport `config.upstream_kind` names. Does not wait for the platform to
    /// be reachable: delivery retries until it is. `socketio` also reports the agent's health
    /// and spool in heartbeats and serves the platform's `flush` from the spool.
    /// `key` is the one API key handle every transport reads (see [`api_key`]).
    pub async fn from_config(
        config: &Config,
        key: &Arc<ApiKey>,
        metrics: Arc<Metrics>,
        health: &Arc<Health>,
        spool: &Arc<Spool>,
    ) -> anyhow::Result<Self> {
        Ok(match config.upstream_kind {
            UpstreamKind::Http => Self::Http(HttpUpstream::new(config, key.clone(), metrics)?),
            UpstreamKind::Nats => Self::Nats(Box::new(
                NatsUpstream::connect(config, key.clone(), metrics, health.clone()).await?,
            )),
            UpstreamKind::Socketio => Self::Socketio(SocketIoUpstream::start(
                SocketIoOptions {
                    api_key: key.clone(),
                    ..SocketIoOptions::from_config(config)?
                },
                metrics,
                health.clone(),
                spool.clone(),
            )?),
        })
    }

    /// The API key handle the transport reads.
    fn key(&self) -> &Arc<ApiKey> {
        match self {
            Self::Http(u) => u.key(),
            Self::Nats(u) => u.key(),
            Self::Socketio(u) => u.key(),
        }
    }

    /// `http`, `nats`, … for logs and registration.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Nats(_) => "nats",
            Self::Socketio(_) => "socketio",
        }
    }
}

impl Upstream for AnyUpstream {
    async fn send_batch(&self, body: Bytes, count: u64) -> Result<(), UpstreamError> {
        each_upstream!(self, u => u.send_batch(body, count).await)
    }

    async fn deliver(&self, batch: &Batch) -> Result<(), UpstreamError> {
        each_upstream!(self, u => u.deliver(batch).await)
    }

    async fn send_one(&self, body: Bytes) -> Result<Bytes, UpstreamError> {
        each_upstream!(self, u => u.send_one(body).await)
    }

    async fn check_messages(&self, limit: u32) -> Result<Vec<serde_json::Value>, UpstreamError> {
        each_upstream!(self, u => u.check_messages(limit).await)
    }

    fn checks_call_the_platform(&self) -> bool {
        each_upstream!(self, u => u.checks_call_the_platform())
    }

    fn key_generation(&self) -> u64 {
        self.key().generation()
    }

    async fn key_changed(&self, since: u64) {
        self.key().changed(since).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::RecordBuf;

    fn batch_of(n: usize) -> (tempfile::TempDir, Batch) {
        let dir = tempfile::tempdir().unwrap();
        let spool = crate::delivery::test_spool(dir.path());
        let mut r = RecordBuf::new();
        for i in 0..n {
            r.push(format!("{{\"i\":{i},\"s\":\"{}\"}}", "x".repeat(i)).as_bytes());
        }
        spool.append(&r).unwrap();
        let mut pending = PendingBatch::default();
        spool.reader().read_into(&mut pending, n as u64).unwrap();
        let batch = Batch::from_pending(spool.id(), &pending);
        (dir, batch)
    }

    fn values(b: &Batch) -> Vec<serde_json::Value> {
        serde_json::from_slice(&b.body).unwrap()
    }

    #[test]
    fn split_halves_keep_order_ids_and_payloads() {
        let (_dir, batch) = batch_of(5);
        assert_eq!(batch.count, 5);
        let (a, b) = batch.split().unwrap();
        assert_eq!((a.count, b.count), (2, 3));
        let all: Vec<_> = values(&a).into_iter().chain(values(&b)).collect();
        assert_eq!(all, values(&batch));
        let ids: Vec<_> = (a.messages.iter().map(|m| a.id(m)))
            .chain(b.messages.iter().map(|m| b.id(m)))
            .collect();
        let orig: Vec<_> = batch.messages.iter().map(|m| batch.id(m)).collect();
        assert_eq!(ids, orig, "stable ids survive the split");
        for part in [&a, &b] {
            for (m, v) in part.messages.iter().zip(values(part)) {
                let p: serde_json::Value = serde_json::from_slice(&part.payload(m)).unwrap();
                assert_eq!(p, v);
            }
        }
        // Down to single messages; a single message does not split.
        let (c, d) = a.split().unwrap();
        assert_eq!((c.count, d.count), (1, 1));
        assert!(c.split().is_none());
        assert_eq!(values(&c), vec![values(&batch)[0].clone()]);
    }

    #[test]
    fn inconsistent_batch_does_not_split() {
        let (_dir, mut batch) = batch_of(3);
        if let Some(m) = batch.messages.last_mut() {
            m.range = 0..batch.body.len() + 10;
        }
        assert!(batch.split().is_none());
    }

    #[test]
    fn error_display_carries_the_operator_prefixes() {
        let e = UpstreamError::Unauthorized {
            status: 401,
            endpoint: "messages",
        };
        assert!(e.to_string().starts_with("unauthorized:"), "{e}");
        assert!(e.to_string().contains("API key Secret"), "{e}");
        let e = UpstreamError::Redirected {
            status: 302,
            endpoint: "messages",
            location: "/ok".into(),
        };
        assert!(e.to_string().starts_with("redirected:"), "{e}");
        assert!(e.to_string().contains("/ok"), "{e}");
        assert_eq!(e.kind(), "redirect");
    }
}
