//! Prometheus metrics, all named `nanogate_sidecar_*`.
//!
//! Hot-path counters are plain atomics inside the prometheus types; gauges that mirror spool
//! state are refreshed at scrape time instead of on every message.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// Circuit state values of `upstream_circuit_state`.
pub const CIRCUIT_CLOSED: i64 = 0;
pub const CIRCUIT_OPEN: i64 = 1;
pub const CIRCUIT_HALF_OPEN: i64 = 2;

pub struct Metrics {
    pub registry: Registry,
    pub received: IntCounter,
    pub delivered: IntCounter,
    pub rejected: IntCounterVec,
    pub dead_lettered: IntCounter,
    /// Messages dropped by `overflow_policy drop-oldest`.
    pub dropped_oldest: IntCounter,
    pub queue_depth: IntGauge,
    pub spool_bytes: IntGauge,
    pub batch_size: Histogram,
    pub batches: IntCounter,
    pub target_batch_size: IntGauge,
    pub upstream_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub circuit_state: IntGauge,
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    pub msg_check: IntCounter,
    pub msg_check_cached: IntCounter,
    pub publish_wait: IntCounter,
    pub spool_recovered: IntCounter,
    pub spool_torn_bytes: IntCounter,
    /// Set once at shutdown: what the spool still held when the agent stopped delivering.
    pub left_behind_messages: IntGauge,
    pub left_behind_bytes: IntGauge,
    pub cpu_percent: Gauge,
    pub memory_percent: Gauge,
    pub resident_memory_bytes: IntGauge,
    /// `socketio` upstream: connection state (see `upstream::socketio::STATE_*`).
    pub upstream_connection_state: IntGauge,
    pub upstream_reconnects: IntCounter,
    /// The API key file's content changed and the new key is in use (`upstream::api_key`).
    pub api_key_reloads: IntCounter,
    /// Platform commands (`socketio`) by action and result.
    pub commands: IntCounterVec,
}

fn name(n: &str) -> String {
    format!("nanogate_sidecar_{n}")
}

impl Metrics {
    // Metric names and help texts are constants: a failure here is a programming error that
    // every test run would show, never something input can cause.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry
                    .register(Box::new(m.clone()))
                    .expect("unique metric name");
                m
            }};
        }
        let counter = |n: &str, h: &str| IntCounter::new(name(n), h).expect("valid metric");
        let gauge = |n: &str, h: &str| IntGauge::new(name(n), h).expect("valid metric");
        Metrics {
            received: reg!(counter(
                "received_total",
                "Messages accepted from apps (persisted to the spool)."
            )),
            delivered: reg!(counter(
                "delivered_total",
                "Messages acknowledged by the platform."
            )),
            rejected: reg!(
                IntCounterVec::new(
                    Opts::new(
                        name("rejected_total"),
                        "Requests answered with an error, by reason."
                    ),
                    &["reason"]
                )
                .expect("valid metric")
            ),
            dropped_oldest: reg!(counter(
                "dropped_oldest_total",
                "Accepted messages dropped undelivered to make room in a full spool (overflow_policy drop-oldest)."
            )),
            dead_lettered: reg!(counter(
                "dead_lettered_total",
                "Messages the platform rejected (4xx), written to the dead-letter file."
            )),
            queue_depth: reg!(gauge(
                "queue_depth",
                "Messages accepted but not yet acknowledged upstream."
            )),
            spool_bytes: reg!(gauge(
                "spool_bytes",
                "Bytes of undelivered messages in the spool."
            )),
            batch_size: reg!(
                Histogram::with_opts(
                    HistogramOpts::new(name("batch_size"), "Messages per batch sent upstream.")
                        .buckets(vec![
                            1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0
                        ])
                )
                .expect("valid metric")
            ),
            batches: reg!(counter(
                "batches_total",
                "Batches acknowledged by the platform."
            )),
            target_batch_size: reg!(gauge(
                "target_batch_size",
                "Current dynamic batch size target."
            )),
            upstream_duration: reg!(
                HistogramVec::new(
                    HistogramOpts::new(
                        name("upstream_request_duration_seconds"),
                        "Upstream request latency by endpoint."
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
                    ]),
                    &["endpoint"]
                )
                .expect("valid metric")
            ),
            upstream_errors: reg!(
                IntCounterVec::new(
                    Opts::new(
                        name("upstream_errors_total"),
                        "Failed upstream requests by kind."
                    ),
                    &["kind"]
                )
                .expect("valid metric")
            ),
            circuit_state: reg!(gauge(
                "upstream_circuit_state",
                "Upstream circuit: 0 closed (healthy), 1 open (failing, backing off), 2 half-open (probing)."
            )),
            connections: reg!(gauge("connections", "Open app connections.")),
            connections_total: reg!(counter("connections_total", "App connections accepted.")),
            msg_check: reg!(counter("msg_check_total", "msg_check requests served.")),
            msg_check_cached: reg!(counter(
                "msg_check_cached_total",
                "msg_check requests answered 204 from a recent empty platform answer (--msg-check-cache), without a platform request."
            )),
            publish_wait: reg!(counter(
                "publish_wait_total",
                "publish requests with wait:true relayed."
            )),
            spool_recovered: reg!(counter(
                "spool_recovered_messages_total",
                "Undelivered messages found in the spool at start."
            )),
            spool_torn_bytes: reg!(counter(
                "spool_torn_bytes_total",
                "Bytes of torn or corrupt spool records discarded at recovery."
            )),
            left_behind_messages: reg!(gauge(
                "left_behind_messages",
                "Messages still undelivered when the agent stopped (set at its shutdown deadline, 0 while running); they stay in the spool, lost unless its volume outlives the pod."
            )),
            left_behind_bytes: reg!(gauge(
                "left_behind_bytes",
                "Bytes of the messages counted in left_behind_messages."
            )),
            cpu_percent: reg!(
                Gauge::new(name("cpu_percent"), "Sampled CPU use, percent of one core.")
                    .expect("valid metric")
            ),
            memory_percent: reg!(
                Gauge::new(
                    name("memory_percent"),
                    "Sampled memory use, percent of the cgroup limit (or host memory)."
                )
                .expect("valid metric")
            ),
            resident_memory_bytes: reg!(gauge(
                "resident_memory_bytes",
                "Resident set size of nano-agent."
            )),
            upstream_connection_state: reg!(gauge(
                "upstream_connection_state",
                "Persistent upstream connection (socketio, nats): 0 disconnected, 1 connecting, 2 connected."
            )),
            upstream_reconnects: reg!(counter(
                "upstream_reconnects_total",
                "Persistent upstream connections (socketio, nats) lost or refused, each followed by a reconnect."
            )),
            api_key_reloads: reg!(counter(
                "api_key_reloads_total",
                "The API key file (the gateway's mounted Secret) changed and the new key is used from then on."
            )),
            commands: reg!(
                IntCounterVec::new(
                    Opts::new(
                        name("commands_total"),
                        "Platform commands (socketio) by action and result (ok, error)."
                    ),
                    &["action", "result"]
                )
                .expect("valid metric")
            ),
            registry,
        }
    }

    /// Counts a rejected request.
    pub fn reject(&self, reason: &str, n: u64) {
        self.rejected.with_label_values(&[reason]).inc_by(n);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding the metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
