//! Prometheus metrics `nanogate_operator_*`, registered in one registry served on `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The operator's metrics. Cheap to clone (all handles are `Arc`s inside).
#[derive(Clone)]
pub struct Metrics {
    /// Registry everything is registered in (the webhook may register into it too).
    pub registry: Registry,
    /// Reconciles started.
    pub reconciles: IntCounter,
    /// Reconcile failures by error label (`Error::metric_label`).
    pub reconcile_errors: IntCounterVec,
    /// Reconcile duration.
    pub reconcile_duration: HistogramVec,
    /// 1 while this replica holds the lease.
    pub leader: IntGauge,
    /// Writes sent to the API server by resource and verb.
    pub api_writes: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(Registry::new())
    }
}

impl Metrics {
    /// Create the metrics and register them in `registry`.
    pub fn new(registry: Registry) -> Self {
        let reconciles = IntCounter::with_opts(Opts::new(
            "nanogate_operator_reconciles_total",
            "AgentGateway reconciles started",
        ))
        .expect("valid metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "nanogate_operator_reconcile_errors_total",
                "AgentGateway reconciles that failed, by error",
            ),
            &["error"],
        )
        .expect("valid metric");
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "nanogate_operator_reconcile_duration_seconds",
                "Duration of AgentGateway reconciles",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            &[],
        )
        .expect("valid metric");
        let leader = IntGauge::with_opts(Opts::new(
            "nanogate_operator_leader",
            "1 while this replica holds the leader lease",
        ))
        .expect("valid metric");
        let api_writes = IntCounterVec::new(
            Opts::new(
                "nanogate_operator_api_writes_total",
                "Write requests sent to the Kubernetes API by the reconciler",
            ),
            &["resource", "verb"],
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(leader.clone()),
            Box::new(api_writes.clone()),
        ] {
            // Registering the same names twice in one registry is a programming error.
            registry.register(c).expect("metrics registered once");
        }
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            leader,
            api_writes,
        }
    }

    /// Count one write.
    pub fn write(&self, resource: &str, verb: &str) {
        self.api_writes.with_label_values(&[resource, verb]).inc();
    }

    /// Total writes so far (all resources and verbs).
    pub fn writes_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.api_writes
            .collect()
            .iter()
            .flat_map(|mf| mf.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// Text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
