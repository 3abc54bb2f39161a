//! What the benches share to measure: the machine's load, a process's CPU time, and
//! namespaces filled with gateways before an operator starts.

use anyhow::{Context, Result};

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

/// CPU seconds (user + system) the process `pid` has used.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("no ')' in stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / clock_ticks())
}

/// The kernel's clock ticks per second (`USER_HZ`), 100 when `getconf` cannot say.
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

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
