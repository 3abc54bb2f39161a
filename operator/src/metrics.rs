//! Prometheus metrics `nanogate_operator_*`, registered in one registry served on `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
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
    /// Always 1, labelled with the operator's version.
    pub build_info: IntGaugeVec,
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
        let build_info = IntGaugeVec::new(
            Opts::new(
                "nanogate_operator_build_info",
                "Always 1; the label version is the running operator's version",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(leader.clone()),
            Box::new(api_writes.clone()),
            Box::new(build_info.clone()),
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
            build_info,
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

/// `nanogate_operator_gateway_sidecars{gateway_namespace, gateway, state}`: every
/// AgentGateway's `status.sidecars` counts (`state`: `expected`, `not_injected`, `connected`,
/// `healthy`, `current_config`), read from a gateway store at scrape time, so a deleted gateway
/// leaves no series behind. Every replica serves the same values (the status the leader wrote).
/// The labels are not `namespace`: scrape configs set that to the operator's namespace.
pub struct GatewaySidecars {
    gateways: kube::runtime::reflector::Store<crate::crd::AgentGateway>,
    desc: prometheus::core::Desc,
}

impl GatewaySidecars {
    pub const NAME: &'static str = "nanogate_operator_gateway_sidecars";
    const HELP: &'static str = "AgentGateway status.sidecars counts by gateway and state (expected, not_injected, outdated, connected, healthy, current_config)";

    pub fn new(gateways: kube::runtime::reflector::Store<crate::crd::AgentGateway>) -> Self {
        let desc = prometheus::core::Desc::new(
            Self::NAME.into(),
            Self::HELP.into(),
            vec!["gateway_namespace".into(), "gateway".into(), "state".into()],
            Default::default(),
        )
        .expect("valid metric");
        Self { gateways, desc }
    }
}

impl prometheus::core::Collector for GatewaySidecars {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let gauge = IntGaugeVec::new(
            Opts::new(Self::NAME, Self::HELP),
            &["gateway_namespace", "gateway", "state"],
        )
        .expect("valid metric");
        for gw in self.gateways.state() {
            let ns = gw.metadata.namespace.as_deref().unwrap_or_default();
            let name = gw.metadata.name.as_deref().unwrap_or_default();
            let counts = gw
                .status
                .as_ref()
                .and_then(|s| s.sidecars.clone())
                .unwrap_or_default();
            for (state, v) in [
                ("expected", counts.expected),
                ("not_injected", counts.not_injected),
                ("outdated", counts.outdated),
                ("connected", counts.connected),
                ("healthy", counts.healthy),
                ("current_config", counts.current_config),
            ] {
                gauge
                    .with_label_values(&[ns, name, state])
                    .set(i64::from(v));
            }
        }
        prometheus::core::Collector::collect(&gauge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn metric_names_do_not_clash_under_openmetrics() {
        let registry = Registry::new();
        let m = Metrics::new(registry.clone());
        let web = crate::webhook::WebhookMetrics::register(&registry).unwrap();
        let hub = crate::hub::HubMetrics::new(&registry);
        // Vectors without children are not exposed: give each one.
        m.reconcile_errors.with_label_values(&["x"]).inc();
        m.reconcile_duration
            .with_label_values::<&str>(&[])
            .observe(0.0);
        m.write("configmaps", "apply");
        web.requests.with_label_values(&["injected", ""]).inc();
        web.duration.with_label_values(&["mutate"]).observe(0.0);
        hub.auth.with_label_values(&["accept", "ok"]).inc();
        hub.notifications
            .with_label_values(&["heartbeat", "ok"])
            .inc();
        let fams: BTreeMap<String, prometheus::proto::MetricType> = registry
            .gather()
            .iter()
            .map(|mf| (mf.name().to_string(), mf.get_field_type()))
            .collect();
        for (n, t) in &fams {
            assert!(!n.ends_with("_percent"), "{n}: use a 0-1 `_ratio`");
            if *t == prometheus::proto::MetricType::COUNTER {
                let base = n.strip_suffix("_total").unwrap_or(n);
                assert!(!fams.contains_key(base), "{n} and {base} clash");
            }
        }
        assert!(
            fams.contains_key("nanogate_operator_build_info"),
            "{fams:?}"
        );
    }

    #[test]
    fn build_info_carries_the_version() {
        let text = Metrics::default().render();
        let want = format!(
            "nanogate_operator_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&want), "{want} not in:\n{text}");
    }

    #[test]
    fn gateway_sidecars_mirror_each_gateways_status() {
        use crate::crd::AgentGateway;
        use crate::crd::{AgentGatewayStatus, SidecarCounts};
        use kube::runtime::reflector::store::Writer;
        use kube::runtime::watcher::Event;
        let mut writer: Writer<AgentGateway> = Default::default();
        let mut gw: AgentGateway = serde_json::from_value(serde_json::json!({
            "apiVersion": "nanogate.io/v1alpha1", "kind": "AgentGateway",
            "metadata": {"name": "shop", "namespace": "apps"},
            "spec": {"upstream": {"kind": "http", "url": "https://example.com",
                "apiKeySecretRef": {"name": "k"}}}
        }))
        .unwrap();
        let mut counts = SidecarCounts::with_pods(None, 3, 1, 0);
        counts = SidecarCounts::with_fleet(Some(&counts), 2, 2, 1);
        gw.status = Some(AgentGatewayStatus {
            sidecars: Some(counts),
            ..Default::default()
        });
        writer.apply_watcher_event(&Event::Apply(gw));
        let registry = Registry::new();
        registry
            .register(Box::new(GatewaySidecars::new(writer.as_reader())))
            .unwrap();
        let text = {
            let mut buf = Vec::new();
            TextEncoder::new()
                .encode(&registry.gather(), &mut buf)
                .unwrap();
            String::from_utf8(buf).unwrap()
        };
        for (state, v) in [
            ("expected", 3),
            ("not_injected", 1),
            ("connected", 2),
            ("healthy", 2),
            ("current_config", 1),
        ] {
            let line = format!(
                "nanogate_operator_gateway_sidecars{{gateway=\"shop\",gateway_namespace=\"apps\",state=\"{state}\"}} {v}"
            );
            assert!(text.contains(&line), "{line} not in:\n{text}");
        }
    }
}
