//! Transports from the sidecar to the platform (ARCHITECTURE §4). One trait; `http` is the
//! Tendrl platform API. Retry policy lives in the batcher, not in the transports: a transport
//! makes one attempt and classifies the outcome.

pub mod http;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

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

/// A transport to the platform.
pub trait Upstream: Send + Sync + 'static {
    /// Delivers a batch (a JSON array of `count` messages). `Ok` means acknowledged.
    fn send_batch(
        &self,
        body: Bytes,
        count: u64,
    ) -> impl Future<Output = Result<(), UpstreamError>> + Send;

    /// Delivers one message for `wait:true` and returns the platform's reply body.
    fn send_one(&self, body: Bytes) -> impl Future<Output = Result<Bytes, UpstreamError>> + Send;

    /// Fetches up to `limit` messages waiting for this agent (empty when there are none).
    fn check_messages(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<serde_json::Value>, UpstreamError>> + Send;
}
