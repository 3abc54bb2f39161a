//! What the benches share to measure: the machine's load, a process's CPU time, and
//! namespaces filled with gateways before an operator starts.

use anyhow::Result;

use crate::{ControlPlane, TestNamespace};

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), for the figures' context.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A process's CPU time and memory, as `hub-bench` measures them too.
pub use nanogate_operator::bench::{cpu_seconds, status_kib};

/// `count` fresh namespaces (`prefix-…`), each with `per_namespace` gateways `gw-<i>` (and the
/// `platform-key` Secret they name).
pub async fn namespaces_with_gateways(
    cp: &ControlPlane,
    client: &kube::Client,
    prefix: &str,
    count: usize,
    per_namespace: usize,
) -> Result<Vec<TestNamespace>> {
    let mut namespaces = Vec::new();
    for _ in 0..count {
        let ns = TestNamespace::create(client, prefix).await?;
        let yaml: Vec<String> = (0..per_namespace)
            .map(|i| crate::gateway_yaml(ns.name(), &format!("gw-{i}"), ""))
            .collect();
        crate::apply_yaml(cp.kubeconfig_path(), &yaml.join("---\n"))?;
        namespaces.push(ns);
    }
    Ok(namespaces)
}
