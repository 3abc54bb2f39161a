//! Admission latency end to end through the real kube-apiserver (issue 5's bench): 2,000 pod
//! creations that the apiserver sends to our mutating webhook (registered by URL, TLS with the
//! operator's own certificate), next to 2,000 creations of the same pod in a namespace the
//! webhook does not select — the baseline of the same run. The difference is what injection
//! costs a user's `kubectl apply`; the handler's own time comes from its histogram.
//!
//! Run: `cargo bench -p nanogate-e2e --bench admission_apiserver` (starts its own etcd and
//! apiserver; `make setup` first).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use nanogate_e2e::{ControlPlane, TestNamespace};
use nanogate_operator::{ServerOptions, start};
use serde_json::json;

const N: usize = 2_000;
const LABEL: &str = "nanogate.io/e2e-bench";

fn pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "shop"},
                     "annotations": {"nanogate.io/inject": "true"}},
        "spec": {"containers": [{"name": "shop", "image": "python:3.12-slim",
            "env": [{"name": "MODE", "value": "demo"}],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
    }))?)
}

fn line(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    println!(
        "{name:<34} n={:<5} p50={:>8.2?} p99={:>8.2?} max={:>8.2?}",
        samples.len(),
        pct(0.50),
        pct(0.99),
        samples[samples.len() - 1]
    );
    pct(0.99)
}

async fn create_all(pods: &Api<Pod>, prefix: &str, injected: bool) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(N);
    for i in 0..N {
        let pod = pod(&format!("{prefix}-{i}"))?;
        let started = Instant::now();
        let stored = pods.create(&PostParams::default(), &pod).await?;
        samples.push(started.elapsed());
        let has_sidecar = stored
            .spec
            .as_ref()
            .is_some_and(|s| s.containers.iter().any(|c| c.name == "nano-agent"));
        anyhow::ensure!(
            has_sidecar == injected,
            "pod {prefix}-{i}: injected={has_sidecar}"
        );
        if (i + 1) % 500 == 0 {
            eprintln!("[bench] {prefix}: {} of {N} pods created", i + 1);
        }
    }
    Ok(samples)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    nanogate_e2e::install_crd(&cp)?;
    let operator_ns = TestNamespace::create(&client, "bench-op").await?;
    let ns = TestNamespace::create(&client, "bench").await?;
    let plain = TestNamespace::create(&client, "bench-plain").await?;
    let port = nanogate_e2e::free_port()?;
    let config = format!("nanogate-bench-{}", ns.name());
    nanogate_e2e::register_webhooks(&cp, LABEL, ns.name(), &config, port, "Fail")?;
    let registry = prometheus::Registry::new();
    let (_stop, stopped) = nanogate_operator::shutdown::channel();
    start::start(
        client.clone(),
        &ServerOptions {
            operator_namespace: operator_ns.name().into(),
            webhook_addr: Some(format!("127.0.0.1:{port}").parse()?),
            mutating_webhook_configs: vec![config.clone()],
            validating_webhook_configs: vec![config],
            extra_sans: vec!["127.0.0.1".into()],
            ..Default::default()
        },
        None,
        &nanogate_operator::pods::PodWatch::new(client.clone(), None),
        &registry,
        prometheus::IntGauge::new("leader", "bench")?,
        stopped,
    )
    .await?;
    nanogate_e2e::apply_yaml(
        cp.kubeconfig_path(),
        &nanogate_e2e::gateway_yaml(ns.name(), "shop", ""),
    )?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    nanogate_e2e::wait_for_injection(&client, ns.name(), &pod("probe")?).await?;

    // Alternate halves so drift of the machine hits both sides alike.
    let plain_pods: Api<Pod> = Api::namespaced(client.clone(), plain.name());
    let mut baseline = create_all(&plain_pods, "warm", false).await?;
    baseline.truncate(0);
    let injected = create_all(&pods, "inj", true).await?;
    baseline.extend(create_all(&plain_pods, "base", false).await?);

    let families = registry.gather();
    let handler = families
        .iter()
        .find(|f| f.name() == "nanogate_webhook_duration_seconds")
        .context("webhook latency histogram")?;
    let (count, sum) = handler.get_metric().iter().fold((0u64, 0.0), |(c, s), m| {
        let h = m.get_histogram();
        (c + h.get_sample_count(), s + h.get_sample_sum())
    });

    println!("admission through kube-apiserver 1.20 (pod create, server round trip), {N} each:");
    let base_p99 = line("baseline: no webhook", baseline);
    let inj_p99 = line("injected: mutating webhook", injected);
    println!(
        "{:<34} mean={:>8.2?} over {count} reviews (run admission-bench for its p50/p99)",
        "inside the handler",
        Duration::from_secs_f64(sum / count.max(1) as f64)
    );
    println!(
        "webhook adds {:.2?} at p99 (target: end-to-end p99 <= 50ms: {})",
        inj_p99.saturating_sub(base_p99),
        if inj_p99 <= Duration::from_millis(50) {
            "met"
        } else {
            "MISSED"
        }
    );
    Ok(())
}
