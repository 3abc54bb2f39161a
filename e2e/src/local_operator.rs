//! nanogate installed for pods on the real node, without the Helm chart's operator Deployment:
//! the CRD, the operator namespace, the webhook configurations calling the operator **by URL**,
//! and the operator binary as a local process whose hub listens on the node's bridge address
//! ([`HOST_IP`]), where the injected sidecars reach it. `make demo` (`src/bin/demo.rs`) and the
//! real-pod tests (`tests/real_pods.rs`) use this one setup.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let cp = nanogate_e2e::ControlPlane::shared().await?;
//! let _node = nanogate_e2e::Node::shared().await?; // the bridge the hub binds to
//! let binary = nanogate_e2e::workspace_binary("nanogate-operator")?;
//! let operator = nanogate_e2e::LocalOperator::install(cp, &binary).await?;
//! println!("hub at {}", operator.hub_addr());
//! # Ok(()) }
//! ```
//!
//! The webhooks apply to every namespace but those labelled `nanogate.io/system` (as the
//! chart's), so one operator serves every namespace of its control plane: the demo's, or every
//! test of a test binary. The operator makes its own CA and serving certificate and patches the
//! webhook configurations' `caBundle`; [`LocalOperator::install`] returns once it has.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, bail};
use kube::api::DynamicObject;

use crate::node::HOST_IP;
use crate::{ControlPlane, Process, apply_yaml, free_port, install_crd, wait_for};

/// Where the operator keeps its CA and certificate Secrets and its lease.
pub const OPERATOR_NAMESPACE: &str = "nanogate-system";
/// The sample gateway of `examples/k8s/` (name `shop`), as a user would apply it.
pub const EXAMPLE_GATEWAY: &str = "examples/k8s/agentgateway.yaml";
/// The sample app Deployment of `examples/k8s/`.
pub const EXAMPLE_DEPLOYMENT: &str = "examples/k8s/deployment.yaml";
/// The placeholders of [`EXAMPLE_GATEWAY`] that [`example_gateway_yaml`] fills in.
const EXAMPLE_URL: &str = "https://platform.example/api";
const EXAMPLE_KEY: &str = "replace-me";

/// The operator running on this machine; stopped when dropped.
pub struct LocalOperator {
    process: Mutex<Process>,
    /// Its admission webhook, on loopback (the apiserver calls it by URL).
    pub webhook_port: u16,
    /// Its hub, on [`HOST_IP`] (sidecars in pods connect here).
    pub hub_port: u16,
    /// Its admin server (`/metrics`, `/healthz`), on loopback.
    pub admin_port: u16,
    log: PathBuf,
}

impl LocalOperator {
    /// Installs the CRD, [`OPERATOR_NAMESPACE`] and the webhook configurations, starts
    /// `binary` (`nanogate-operator`) and waits until it has patched the webhooks' `caBundle`.
    /// The node must be running: the hub binds the bridge address.
    pub async fn install(cp: &ControlPlane, binary: &Path) -> Result<LocalOperator> {
        let (webhook_port, hub_port, admin_port) = (free_port()?, free_port()?, free_port()?);
        install_crd(cp)?;
        apply_yaml(cp.kubeconfig_path(), &install_objects(webhook_port))?;
        let args: Vec<String> = vec![
            "run".into(),
            format!("--admin-addr=127.0.0.1:{admin_port}"),
            format!("--operator-namespace={OPERATOR_NAMESPACE}"),
            format!("--lease-namespace={OPERATOR_NAMESPACE}"),
            format!("--webhook-addr=127.0.0.1:{webhook_port}"),
            format!("--hub-addr={HOST_IP}:{hub_port}"),
            format!("--hub-advertise={HOST_IP}:{hub_port}"),
            format!("--extra-sans=127.0.0.1,{HOST_IP}"),
            "--status-interval=2s".into(),
            // Tests' own agent images built into the node (real_pods' held agent).
            "--allowed-sidecar-images=localhost/nanogate-e2e/".into(),
        ];
        let process = Process::spawn_with_env(
            "nanogate-operator",
            binary,
            &args,
            &[
                ("KUBECONFIG", cp.kubeconfig_path().display().to_string()),
                ("RUST_LOG", "info".into()),
            ],
            cp.dir(),
        )?;
        let operator = LocalOperator {
            log: process.log.clone(),
            process: Mutex::new(process),
            webhook_port,
            hub_port,
            admin_port,
        };
        wait_for(
            "the operator to patch the webhook caBundle",
            Duration::from_secs(60),
            || {
                let out = cp.kubectl(&[
                    "get",
                    "mutatingwebhookconfiguration",
                    "nanogate-injector",
                    "-o",
                    "jsonpath={.webhooks[0].clientConfig.caBundle}",
                ]);
                let running = operator.ensure_running();
                async move {
                    running?;
                    Ok(out.ok().filter(|b| !b.is_empty()).map(|_| ()))
                }
            },
        )
        .await
        .map_err(|e| e.context(operator.log_tail(20)))?;
        Ok(operator)
    }

    /// An error (with the end of its log) if the operator has exited.
    pub fn ensure_running(&self) -> Result<()> {
        let status = self.lock().exited();
        match status {
            Some(status) => bail!("the operator exited ({status}):\n{}", self.log_tail(20)),
            None => Ok(()),
        }
    }

    /// The hub's address as sidecars dial it.
    pub fn hub_addr(&self) -> String {
        format!("{HOST_IP}:{}", self.hub_port)
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.lock().log_tail(lines)
    }

    /// SIGTERM, then SIGKILL if it does not exit.
    pub fn stop(&self) {
        self.lock().stop();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Process> {
        self.process.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// [`EXAMPLE_GATEWAY`] with the platform's URL and API key filled in.
pub fn example_gateway_yaml(platform_url: &str, api_key: &str) -> Result<String> {
    let yaml = std::fs::read_to_string(crate::workspace_root().join(EXAMPLE_GATEWAY))?;
    if !yaml.contains(EXAMPLE_URL) || !yaml.contains(EXAMPLE_KEY) {
        bail!("{EXAMPLE_GATEWAY} no longer has the placeholders {EXAMPLE_URL} and {EXAMPLE_KEY}");
    }
    Ok(yaml
        .replace(EXAMPLE_URL, platform_url)
        .replace(EXAMPLE_KEY, api_key))
}

/// `kubectl apply -n <ns> -f <file>` of `yaml`, as a user applies the examples.
pub fn apply_in_namespace(cp: &ControlPlane, ns: &str, yaml: &str) -> Result<String> {
    let file = cp
        .dir()
        .join(format!("apply-{ns}-{:08x}.yaml", rand::random::<u32>()));
    std::fs::write(&file, yaml)?;
    let out = cp.kubectl(&["apply", "-n", ns, "-f", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    out
}

/// The status (`"True"`, `"False"`, …) of condition `kind` of a gateway.
pub fn condition(gw: &DynamicObject, kind: &str) -> Option<String> {
    gw.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(str::to_string))
}

/// Waits until gateway `name` of `ns` is `Ready=True`.
pub async fn wait_gateway_ready(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    wait_gateway(client, ns, name, "Ready", |gw| {
        condition(gw, "Ready").is_some_and(|s| s == "True")
    })
    .await
}

/// Waits until gateway `name` of `ns` counts `n` sidecars connected to the hub
/// (`status.sidecars.connected`).
pub async fn wait_sidecars_connected(
    client: &kube::Client,
    ns: &str,
    name: &str,
    n: i64,
) -> Result<()> {
    wait_gateway(client, ns, name, &format!("{n} sidecars connected"), |gw| {
        gw.data["status"]["sidecars"]["connected"] == n
    })
    .await
}

async fn wait_gateway(
    client: &kube::Client,
    ns: &str,
    name: &str,
    what: &str,
    done: impl Fn(&DynamicObject) -> bool,
) -> Result<()> {
    let gateways = crate::agentgateways(client, ns);
    let (gateways, done) = (&gateways, &done);
    wait_for(
        &format!("gateway {ns}/{name}: {what}"),
        Duration::from_secs(60),
        || async move { Ok(done(&gateways.get(name).await?).then_some(())) },
    )
    .await
}

/// What the Helm chart installs besides the operator Deployment, with the webhooks registered
/// by URL (the operator runs on this machine, not behind a Service): every namespace but those
/// labelled `nanogate.io/system`, failures ignored, as the chart's.
fn install_objects(webhook_port: u16) -> String {
    let webhooks = crate::webhook_configurations_for(
        ["nanogate-injector", "nanogate-validator"],
        "matchExpressions: [{key: nanogate.io/system, operator: DoesNotExist}]",
        webhook_port,
        "Ignore",
    );
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {OPERATOR_NAMESPACE}}}\n---\n{webhooks}"
    )
}
