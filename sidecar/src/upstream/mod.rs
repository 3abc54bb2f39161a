//! Transports from the sidecar to the platform (ARCHITECTURE §4). One trait; `http` is the
//! Tendrl platform API, `nats` JetStream. Retry policy lives in the batcher, not in the
//! transports: a transport makes one attempt and classifies the outcome.
//!
//! [`Upstream`] returns `impl Future` and so cannot be a trait object; [`AnyUpstream`] is the
//! enum the agent runs with, chosen by `upstream_kind`. A new transport adds a variant, a line
//! in `each_upstream!` and an arm in [`AnyUpstream::from_config`].

pub mod http;
pub mod nats;
pub mod socketio;

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::admin::Health;
use crate::config::{Config, UpstreamKind};
use crate::metrics::Metrics;
use crate::spool::{PendingBatch, Spool};
use http::HttpUpstream;
use nats::NatsUpstream;
use socketio::{SocketIoOptions, SocketIoUpstream};

/// Outcome of a failed upstream attempt.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Worth retrying (5xx, 429, 408, network, timeout); `retry_after` from the platform.
    #[error("{reason}")]
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The platform refused the request for good (other 4xx): dead-letter it.
    #[error("rejected with HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
}

impl UpstreamError {
    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Retryable { .. } => "retryable",
            Self::Rejected { .. } => "rejected",
        }
    }
}

/// A batch as delivery hands it to a transport: the JSON array, and each message's stable id
/// and place in it.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The messages as one JSON array.
    pub body: Bytes,
    pub count: u64,
    pub messages: Vec<BatchMessage>,
}

/// One message of a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMessage {
    /// Stable id (spool id, segment, offset): the same on every retry and after a restart.
    pub id: String,
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
                id: format!("{spool_id}-{}-{}", r.at.seq, r.at.offset),
                // +1: the array's opening bracket.
                range: r.start + 1..r.start + 1 + r.len,
            })
            .collect();
        Self {
            body: Bytes::from(pending.json_array()),
            count: pending.count,
            messages,
        }
    }

    /// The JSON of one message (no copy).
    pub fn payload(&self, message: &BatchMessage) -> Bytes {
        self.body.slice(message.range.clone())
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

    /// Fetches up to `limit` messages waiting for this agent (empty when there are none).
    fn check_messages(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<serde_json::Value>, UpstreamError>> + Send;
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
    pub async fn from_config(
        config: &Config,
        metrics: Arc<Metrics>,
        health: &Arc<Health>,
        spool: &Arc<Spool>,
    ) -> anyhow::Result<Self> {
        Ok(match config.upstream_kind {
            UpstreamKind::Http => Self::Http(HttpUpstream::new(config, metrics)?),
            UpstreamKind::Nats => Self::Nats(Box::new(
                NatsUpstream::connect(config, metrics, health.clone()).await?,
            )),
            UpstreamKind::Socketio => Self::Socketio(SocketIoUpstream::start(
                SocketIoOptions::from_config(config)?,
                metrics,
                health.clone(),
                spool.clone(),
            )?),
        })
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
}
