//! Prometheus metrics, all named `nanogate_sidecar_*`.
//!
//! Hot-path counters are plain atomics inside the prometheus types; gauges that mirror spool
//! state are refreshed at scrape time instead of on every message.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
    /// The spool's capacity (`--spool-max-bytes`), set at start.
    pub spool_max_bytes: IntGauge,
    pub batch_size: Histogram,
    pub batches: IntCounter,
    pub target_batch_size: IntGauge,
    pub batches_in_flight: IntGauge,
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
    /// Sampled CPU use as a ratio of one core (1 = one full core).
    pub cpu_ratio: Gauge,
    /// Sampled memory use as a ratio of the cgroup limit (or host memory), 0–1.
    pub memory_ratio: Gauge,
    pub resident_memory_bytes: IntGauge,
    /// `socketio` upstream: connection state (see `upstream::socketio::STATE_*`).
    pub upstream_connection_state: IntGauge,
    pub upstream_reconnects: IntCounter,
    /// The API key file's content changed and the new key is in use (`upstream::api_key`).
    pub api_key_reloads: IntCounter,
    /// Platform commands (`socketio`) by action and result.
    pub commands: IntCounterVec,
    /// 1 while the backlog has grown over the backlog window (`backlog.rs`), else 0.
    pub backlogged: IntGauge,
    /// While backlogged: the backlog's growth over the window, messages per second.
    pub backlog_growth: Gauge,
    /// Always 1, labelled with the agent's version.
    pub build_info: IntGaugeVec,
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
            spool_max_bytes: reg!(gauge(
                "spool_max_bytes",
                "Capacity of the spool (--spool-max-bytes): at spool_bytes near it, new messages are refused (queue_full) or the oldest dropped (drop-oldest)."
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
            batches_in_flight: reg!(gauge(
                "batches_in_flight",
                "Batches sent or being retried and not yet acknowledged to the spool."
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
            connections: reg!(gauge("open_connections", "Open app connections.")),
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
            cpu_ratio: reg!(
                Gauge::new(
                    name("cpu_ratio"),
                    "Sampled CPU use as a ratio of one core (1 = one full core)."
                )
                .expect("valid metric")
            ),
            memory_ratio: reg!(
                Gauge::new(
                    name("memory_ratio"),
                    "Sampled memory use as a ratio (0-1) of the cgroup limit (or host memory)."
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
            backlogged: reg!(gauge(
                "backlogged",
                "1 while delivery is slower than ingest: the backlog (queue_depth) grew over the last --backlog-window and has not drained back since; 0 otherwise."
            )),
            backlog_growth: reg!(
                Gauge::new(
                    name("backlog_growth_messages_per_second"),
                    "While backlogged: how fast the backlog grew over the last --backlog-window, messages per second (0 when not backlogged)."
                )
                .expect("valid metric")
            ),
            build_info: {
                let b = reg!(
                    IntGaugeVec::new(
                        Opts::new(
                            name("build_info"),
                            "Always 1; the label version is the running nano-agent's version."
                        ),
                        &["version"]
                    )
                    .expect("valid metric")
                );
                b.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
                b
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Family name → type of every family the registry exposes.
    fn families(registry: &Registry) -> BTreeMap<String, prometheus::proto::MetricType> {
        registry
            .gather()
            .iter()
            .map(|mf| (mf.name().to_string(), mf.get_field_type()))
            .collect()
    }

    /// Under OpenMetrics a counter `x_total` is the family `x`: no other metric may be named
    /// `x`. Ratios are 0–1 (`_ratio`), never `_percent` (Prometheus naming conventions).
    fn assert_openmetrics_names(registry: &Registry) {
        let fams = families(registry);
        for (n, t) in &fams {
            assert!(!n.ends_with("_percent"), "{n}: use a 0-1 `_ratio`");
            if *t == prometheus::proto::MetricType::COUNTER {
                let base = n.strip_suffix("_total").unwrap_or(n);
                assert!(
                    !fams.contains_key(base),
                    "counter {n} and metric {base} are one family under OpenMetrics"
                );
            }
        }
    }

    #[test]
    fn metric_names_do_not_clash_under_openmetrics() {
        let m = Metrics::new();
        crate::ingest::tcp::TcpMetrics::register(&m.registry).unwrap();
        assert_openmetrics_names(&m.registry);
        let fams = families(&m.registry);
        for n in [
            "nanogate_sidecar_open_connections",
            "nanogate_sidecar_connections_total",
            "nanogate_sidecar_tcp_open_connections",
            "nanogate_sidecar_tcp_connections_total",
            "nanogate_sidecar_cpu_ratio",
            "nanogate_sidecar_memory_ratio",
            "nanogate_sidecar_backlogged",
            "nanogate_sidecar_backlog_growth_messages_per_second",
        ] {
            assert!(fams.contains_key(n), "{n} missing: {fams:?}");
        }
    }

    #[test]
    fn build_info_carries_the_version() {
        let text = Metrics::new().render();
        let want = format!(
            "nanogate_sidecar_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&want), "{want} not in:\n{text}");
    }
}
