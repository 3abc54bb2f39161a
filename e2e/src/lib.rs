//! End-to-end harness: a real control plane (etcd + kube-apiserver + kube-controller-manager)
//! on free loopback ports, with its own CA, admin kubeconfig and service-account signing key.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let cp = nanogate_e2e::ControlPlane::shared().await?;
//! let client = cp.client().await?;
//! let ns = nanogate_e2e::TestNamespace::create(&client, "smoke").await?;
//! # Ok(()) }
//! ```
//!
//! With [`Node`] (module [`node`]) the control plane gets a real node — kubelet, kube-scheduler, a
//! private containerd and a CNI bridge — on which pods really run:
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let node = nanogate_e2e::Node::shared().await?; // and ControlPlane::shared()
//! node.import_image(nanogate_e2e::node::BUSYBOX_IMAGE)?;
//! # Ok(()) }
//! ```
//!
//! Clean-up is layered so that no etcd or apiserver outlives a test run, however it ends:
//! - every process is started through `setpriv --pdeathsig KILL` from a thread that lives as
//!   long as the test process, so the kernel kills it when the test process dies (even on
//!   `kill -9` or a panic that aborts);
//! - `ControlPlane::drop` stops its processes and removes its directory;
//! - each run directory records its owner's pid; [`ControlPlane::start`] removes directories
//!   (and any processes still running from them) whose owner is gone.
//!
//! A node also changes the host (mounts, cgroups, a bridge, sysctls, `/var/log/pods`) and its
//! containers' shims outlive any parent; it records what it found, and its teardown — on drop,
//! by its reaper process when the test process exits, or by the next run — undoes it (see
//! [`node`]). One node runs per machine at a time (a lock file; a second starter waits).
//!
//! [`LocalOperator`] (module [`local_operator`]) installs nanogate for the node's pods as
//! `make demo` does: webhooks by URL, the operator as a local process, its hub on the bridge.
//! [`chart_release`] installs the chart instead, its operator running as pods on the node;
//! [`previous_release`] builds release 0.1.0's chart and images for the upgrade test.

/// Progress line on the real stderr: the test harness captures `eprintln!`, but how long setup
/// took and where the binaries came from should show on every run.
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod assets;
pub mod bench;
pub mod chart_release;
mod cluster;
pub mod images;
pub mod kubelet;
pub mod local_operator;
mod namespace;
pub mod node;
pub mod podman;
pub mod previous_release;
pub mod process;
pub mod service_network;

pub use assets::k8s_assets;
pub use cluster::ControlPlane;
pub use local_operator::LocalOperator;
pub use namespace::TestNamespace;
pub use node::Node;
pub use process::Process;

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The workspace root (where `Cargo.toml`, `crds/` and `charts/` live).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent directory")
}

/// Polls `probe` every 100 ms until it yields `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(error) => bail!("timed out after {timeout:?} waiting for {what}: {error:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `kubectl apply --server-side` of a YAML file (one or many documents) against `kubeconfig`.
pub fn apply_yaml_file(kubeconfig: &Path, file: &Path) -> Result<String> {
    run_kubectl(
        kubeconfig,
        &[
            "apply",
            "--server-side",
            "--field-manager=nanogate-e2e",
            "-f",
            &file.display().to_string(),
        ],
    )
}

/// `kubectl apply --server-side` of YAML text.
pub fn apply_yaml(kubeconfig: &Path, yaml: &str) -> Result<String> {
    let file = write_temp_file("apply", yaml)?;
    let out = apply_yaml_file(kubeconfig, &file);
    let _ = std::fs::remove_file(&file);
    out
}

/// Runs kubectl with `args` against `kubeconfig`; returns stdout, or an error with stderr.
pub fn run_kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let output = kubectl_command(kubeconfig)
        .args(args)
        .output()
        .context("running kubectl (is it installed? .ci/run installs it)")?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `kubectl apply --dry-run=server --validate=strict -o name -f file`: the objects the
/// apiserver would accept, a line each.
pub fn server_dry_run(kubeconfig: &Path, file: &Path) -> Result<String> {
    let file = file.to_str().context("utf-8 path")?;
    run_kubectl(
        kubeconfig,
        &[
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-o",
            "name",
            "-f",
            file,
        ],
    )
}

/// A `kubectl` command pointed at `kubeconfig`; `NANOGATE_KUBECTL` overrides the binary.
pub fn kubectl_command(kubeconfig: &Path) -> std::process::Command {
    let bin = std::env::var("NANOGATE_KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let mut cmd = std::process::Command::new(bin);
    cmd.env("KUBECONFIG", kubeconfig);
    cmd
}

fn write_temp_file(prefix: &str, contents: &str) -> Result<std::path::PathBuf> {
    let path = std::env::temp_dir().join(format!(
        "nanogate-{prefix}-{}-{}.yaml",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The Python of the virtualenv made by `e2e/scripts/setup.sh` (holds `helm-python-sdk`).
pub fn venv_python() -> std::path::PathBuf {
    let cache = std::env::var_os("NANOGATE_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/nanogate")
        });
    cache.join("venv/bin/python")
}

/// Runs `e2e/scripts/helm.py <args>` (the real Helm engine) against `kubeconfig`; returns its
/// JSON output. Fails with a hint when the virtualenv is missing.
pub fn helm(kubeconfig: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let python = venv_python();
    if !python.exists() {
        bail!(
            "{} is missing: run `bash e2e/scripts/setup.sh` (make test does)",
            python.display()
        );
    }
    let output = std::process::Command::new(&python)
        .arg(workspace_root().join("e2e/scripts/helm.py"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()?;
    if !output.status.success() {
        bail!(
            "helm {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// A free TCP port on loopback (bound and released; good enough for local test servers).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A binary of this workspace from the debug target directory (honours `CARGO_TARGET_DIR`).
/// `make test` builds every binary before the tests run.
pub fn workspace_binary(name: &str) -> Result<std::path::PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("debug").join(name);
    if !bin.exists() {
        bail!(
            "{} not found; build it first: cargo build --workspace --bins",
            bin.display()
        );
    }
    Ok(bin)
}

/// Applies `crds/agentgateway.yaml` and waits until the apiserver serves it.
pub fn install_crd(cp: &ControlPlane) -> Result<()> {
    install_crd_from(cp, "crds/agentgateway.yaml")
}

/// Applies the AgentGateway CRD in `path` (relative to the workspace) and waits until it is
/// established.
pub fn install_crd_from(cp: &ControlPlane, path: &str) -> Result<()> {
    apply_yaml_file(cp.kubeconfig_path(), &workspace_root().join(path))?;
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/agentgateways.nanogate.io",
        "--timeout=30s",
    ])?;
    Ok(())
}

/// A Mutating (pods) and a Validating (AgentGateways) webhook configuration named `name`,
/// calling the operator on loopback `port` by URL, for namespaces labelled `label=ns` only —
/// so tests sharing one control plane never call each other's webhooks.
pub fn webhook_configurations(
    label: &str,
    name: &str,
    ns: &str,
    port: u16,
    failure_policy: &str,
) -> String {
    webhook_configurations_for(
        [name, name],
        &format!("matchLabels: {{{label}: {ns}}}"),
        port,
        failure_policy,
    )
}

/// An operator for one test namespace, not yet started: its ports and `nanogate-operator run`
/// flags (admin server and webhook on loopback, no leader election, the certificate Secret in
/// the operator namespace). Callers add the hub's flags.
pub struct NamespaceOperator {
    pub webhook_port: u16,
    pub admin_port: u16,
    pub args: Vec<String>,
}

/// Starts this build's `nanogate-operator` with `args` against `cp` (`KUBECONFIG` set, plus
/// `env`); `name` labels its log. It stops when the returned process is dropped.
pub fn spawn_operator(
    cp: &ControlPlane,
    name: &'static str,
    args: &[String],
    env: &[(&str, String)],
) -> Result<Process> {
    let mut all_env = vec![("KUBECONFIG", cp.kubeconfig_path().display().to_string())];
    all_env.extend(env.iter().cloned());
    Process::spawn_with_env(
        name,
        &workspace_binary("nanogate-operator")?,
        args,
        &all_env,
        cp.dir(),
    )
}

impl NamespaceOperator {
    /// Starts `nanogate-operator` with these flags and `extra` (`name` labels its log); it stops
    /// when the returned process is dropped.
    pub fn spawn(
        &self,
        cp: &ControlPlane,
        name: &'static str,
        extra: &[String],
    ) -> Result<Process> {
        let args: Vec<String> = self.args.iter().chain(extra).cloned().collect();
        spawn_operator(cp, name, &args, &[])
    }

    /// Waits up to `timeout` until its `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: std::time::Duration) -> Result<()> {
        let addr = format!("127.0.0.1:{}", self.admin_port);
        wait_for("the operator's /readyz to answer 200", timeout, || async {
            let response = http_get(&addr, "/readyz").unwrap_or_default();
            Ok(response.starts_with("HTTP/1.1 200").then_some(()))
        })
        .await
    }
}

/// Labels namespace `ns` `label=ns` and registers [`webhook_configurations`] `name` for the
/// namespaces so labelled, calling loopback `port` with `failure_policy`.
pub fn register_webhooks(
    cp: &ControlPlane,
    label: &str,
    ns: &str,
    name: &str,
    port: u16,
    failure_policy: &str,
) -> Result<()> {
    cp.kubectl(&[
        "label",
        "--overwrite",
        "namespace",
        ns,
        &format!("{label}={ns}"),
    ])?;
    apply_yaml(
        cp.kubeconfig_path(),
        &webhook_configurations(label, name, ns, port, failure_policy),
    )?;
    Ok(())
}

/// Labels `ns` with `label=<ns>`, registers both webhook configurations (`nanogate-<ns>`) for
/// it alone with `failurePolicy: Fail`, calling loopback ports picked here, and returns the
/// flags of an operator serving them.
pub fn namespace_operator(
    cp: &ControlPlane,
    label: &str,
    ns: &str,
    operator_ns: &str,
) -> Result<NamespaceOperator> {
    let (webhook_port, admin_port) = (free_port()?, free_port()?);
    let config = format!("nanogate-{ns}");
    register_webhooks(cp, label, ns, &config, webhook_port, "Fail")?;
    let args = vec![
        "run".into(),
        format!("--admin-addr=127.0.0.1:{admin_port}"),
        format!("--namespace={ns}"),
        "--leader-elect=false".into(),
        format!("--operator-namespace={operator_ns}"),
        format!("--webhook-addr=127.0.0.1:{webhook_port}"),
        format!("--mutating-webhook-configs={config}"),
        format!("--validating-webhook-configs={config}"),
        "--extra-sans=127.0.0.1".into(),
    ];
    Ok(NamespaceOperator {
        webhook_port,
        admin_port,
        args,
    })
}

/// A Mutating (pods) and a Validating (AgentGateways) webhook configuration named `names`
/// (mutating, validating), calling the operator on loopback `port` by URL, for the namespaces
/// `namespace_selector` (one line of YAML, e.g. `matchLabels: {a: b}`) selects.
pub fn webhook_configurations_for(
    [mutating, validating]: [&str; 2],
    namespace_selector: &str,
    port: u16,
    failure_policy: &str,
) -> String {
    // One webhook of `kind` named `webhook` on `path` for `rule` (operations, group, version,
    // resources as YAML flow lists), with what both have in common.
    let configuration = |kind: &str, name: &str, webhook: &str, path: &str, rule: [&str; 4]| {
        let [operations, group, version, resources] = rule;
        format!(
            r#"apiVersion: admissionregistration.k8s.io/v1
kind: {kind}
metadata:
  name: {name}
webhooks:
- name: {webhook}
  clientConfig:
    url: https://127.0.0.1:{port}/{path}
  rules:
  - operations: {operations}
    apiGroups: {group}
    apiVersions: {version}
    resources: {resources}
  namespaceSelector:
    {namespace_selector}
  failurePolicy: {failure_policy}
  sideEffects: None
  timeoutSeconds: 5
  admissionReviewVersions: ["v1"]
"#
        )
    };
    let pods = [r#"["CREATE"]"#, r#"[""]"#, r#"["v1"]"#, r#"["pods"]"#];
    let gateways = [
        r#"["CREATE", "UPDATE"]"#,
        r#"["nanogate.io"]"#,
        r#"["v1alpha1"]"#,
        r#"["agentgateways"]"#,
    ];
    format!(
        "{}  reinvocationPolicy: Never\n---\n{}",
        configuration(
            "MutatingWebhookConfiguration",
            mutating,
            "inject.nanogate.io",
            "mutate",
            pods
        ),
        configuration(
            "ValidatingWebhookConfiguration",
            validating,
            "validate.nanogate.io",
            "validate",
            gateways
        ),
    )
}

/// Starts the operator's webhook (and certificates) in-process with `opts`, as `start::start`
/// does in the binary; they stop when the returned trigger is fired or dropped.
pub async fn start_servers(
    client: &kube::Client,
    opts: &nanogate_operator::ServerOptions,
) -> Result<nanogate_operator::shutdown::Trigger> {
    let (stop, stopped) = nanogate_operator::shutdown::channel();
    let leader = prometheus::IntGauge::new("leader", "test").context("gauge")?;
    nanogate_operator::start::start(
        client.clone(),
        opts,
        None,
        &nanogate_operator::pods::PodWatch::new(client.clone(), None),
        &prometheus::Registry::new(),
        leader,
        stopped,
    )
    .await?;
    Ok(stop)
}

/// AgentGateways of namespace `ns`, untyped (tests see exactly what the apiserver stores).
pub fn agentgateways(client: &kube::Client, ns: &str) -> kube::Api<kube::api::DynamicObject> {
    let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "nanogate.io",
        "v1alpha1",
        "AgentGateway",
    ));
    kube::Api::namespaced_with(client.clone(), ns, &resource)
}

/// Creates pod `name` (one `app` container, `nanogate.io/inject: "true"`) once the webhook
/// injects it: the webhook learns about gateways through a watch, so a server-side dry run is
/// retried until it comes back with the sidecar.
pub async fn create_injected_pod(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<k8s_openapi::api::core::v1::Pod> {
    let pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": {"nanogate.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "python:3.12-slim"}]}
    }))?;
    create_injected(client, ns, pod).await
}

/// Creates `pod` once the webhook injects it (see [`create_injected_pod`]).
pub async fn create_injected(
    client: &kube::Client,
    ns: &str,
    pod: k8s_openapi::api::core::v1::Pod,
) -> Result<k8s_openapi::api::core::v1::Pod> {
    wait_for_injection(client, ns, &pod).await?;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), ns);
    Ok(pods.create(&Default::default(), &pod).await?)
}

/// Waits until a server-side dry run of `pod` comes back injected: the webhook learns about
/// gateways through a watch, so right after a gateway is created it may not know it yet.
pub async fn wait_for_injection(
    client: &kube::Client,
    ns: &str,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::PostParams;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), ns);
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    wait_for(
        "the webhook to inject a dry-run pod",
        Duration::from_secs(30),
        || {
            let (pods, pod, dry_run) = (pods.clone(), pod.clone(), dry_run.clone());
            async move {
                let dry = pods.create(&dry_run, &pod).await?;
                Ok(kubelet::sidecar_container(&dry).map(|_| ()))
            }
        },
    )
    .await
}

/// Says AgentHello with `token` to the hub on loopback `port` over TLS (trusting `ca_pem`)
/// and returns the hub's answer: ManagerHello, or Bye with the reason.
pub async fn hub_hello(
    port: u16,
    ca_pem: &str,
    agent_id: &str,
    token: &str,
) -> Result<nanogate_protocol::control::Message> {
    use nanogate_protocol::control::{FrameDecoder, Message, encode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = nanogate_operator::tls::client_config(ca_pem)?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await?;
    let frame = Message::AgentHello {
        id: agent_id.into(),
        version: "e2e".into(),
        credentials: token.into(),
    };
    stream.write_all(&encode(&frame)).await?;
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(message) = decoder.next_message()? {
            return Ok(message);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("hub closed without answering");
        }
        decoder.extend(&buf[..n]);
    }
}

/// YAML for a Secret `platform-key` (key `apiKey`) and an `http` AgentGateway `name` in `ns`
/// that uses it, pointing at the discard port; `spec_extra` lines go under `spec:` (e.g.
/// `"  heartbeatInterval: 1s\n"`).
pub fn gateway_yaml(ns: &str, name: &str, spec_extra: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: platform-key, namespace: {ns}}}
stringData: {{apiKey: e2e-key}}
---
apiVersion: nanogate.io/v1alpha1
kind: AgentGateway
metadata: {{name: {name}, namespace: {ns}}}
spec:
  upstream: {{kind: http, url: "http://127.0.0.1:9", apiKeySecretRef: {{name: platform-key, key: apiKey}}}}
{spec_extra}"#
    )
}

/// A Deployment `name` in `ns` of `replicas` pods labelled `app: <name>`, with `pod_annotations`
/// (a YAML flow map, `{}` for none) and `containers` (the pod spec's containers, YAML indented
/// six spaces). `Recreate` when `recreate` (pods that never turn ready, with no kubelet, are
/// replaced without waiting); pods get 1 s to terminate.
pub fn deployment_yaml(
    ns: &str,
    name: &str,
    replicas: u32,
    recreate: bool,
    pod_annotations: &str,
    containers: &str,
) -> String {
    let strategy = if recreate {
        "  strategy: {type: Recreate}\n"
    } else {
        ""
    };
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: {replicas}
{strategy}  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata:
      labels: {{app: {name}}}
      annotations: {pod_annotations}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
{containers}"#
    )
}

/// Whether the pod's `Ready` condition is `True`.
pub fn pod_ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod's IP, once it has one.
pub fn pod_ip(pod: &k8s_openapi::api::core::v1::Pod) -> Option<&str> {
    pod.status.as_ref()?.pod_ip.as_deref()
}

/// The cell of `column` in the first row of a `kubectl get` table. kubectl aligns every cell
/// under its header, so the cell is read between its header's offset and the next one's (an
/// empty cell, e.g. a condition not set yet, would shift a whitespace split).
pub fn table_cell(table: &str, column: &str) -> Result<String> {
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    let row = lines.next().unwrap_or_default();
    let start = header
        .match_indices(column)
        .map(|(i, _)| i)
        .find(|&i| i == 0 || header.get(..i).is_some_and(|h| h.ends_with(' ')))
        .with_context(|| format!("no {column} column:\n{table}"))?;
    // The next header begins where the spaces after this one end.
    let after = start + column.len();
    let end = header
        .get(after..)
        .unwrap_or_default()
        .find(|c: char| c != ' ')
        .map_or(usize::MAX, |gap| after + gap);
    let cell = row.get(start..end.min(row.len())).unwrap_or_default();
    Ok(cell.trim().to_string())
}

/// Condition `ty` of a gateway's `status` as (status, reason, message), an absent field as
/// an empty string; `None` when the status has no such condition.
pub fn status_condition(status: &serde_json::Value, ty: &str) -> Option<(String, String, String)> {
    let c = status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)?;
    let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    Some((text("status"), text("reason"), text("message")))
}

/// One request to an agent's app socket: writes `message`, closes the writing half and
/// returns the agent's whole reply (empty when it has nothing to say).
pub fn app_request(socket: &Path, message: &[u8]) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let mut c = std::os::unix::net::UnixStream::connect(socket)?;
    c.write_all(message)?;
    c.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    c.read_to_end(&mut reply)?;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// `GET path` on `addr` (e.g. an admin address) over plain HTTP/1.1: the whole response,
/// status line first.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    Ok(response)
}

/// The sum of `metric`'s samples (all label sets) on the `/metrics` page of `addr` (an admin
/// address): 0 when it is not exported.
pub fn scrape(addr: &str, metric: &str) -> Result<f64> {
    let body = http_get(addr, "/metrics")?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(metric))
        .filter(|l| matches!(l.as_bytes().get(metric.len()), Some(b' ' | b'{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Waits up to `timeout` for an event of `reason` about object `name` in `ns`; its note.
pub async fn wait_for_event(
    client: &kube::Client,
    ns: &str,
    name: &str,
    reason: &str,
    timeout: std::time::Duration,
) -> Result<String> {
    wait_for(
        &format!("a {reason} event about {name}"),
        timeout,
        || async {
            Ok(events_about(client, ns, name)
                .await?
                .into_iter()
                .find(|(r, _)| r == reason)
                .map(|(_, note)| note))
        },
    )
    .await
}

/// Reasons and notes of the events about object `name` in `ns` (events.k8s.io/v1).
pub async fn events_about(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<Vec<(String, String)>> {
    use k8s_openapi::api::events::v1::Event;
    let events: kube::Api<Event> = kube::Api::namespaced(client.clone(), ns);
    Ok(events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect())
}

#[cfg(test)]
mod table_tests {
    /// An empty cell (no Ready condition yet) must not shift the cells after it.
    #[test]
    fn table_cell_reads_under_the_header_even_after_an_empty_cell() {
        let table = "NAME   READY   SIDECARS   RECEIVED/S   LEFT-BEHIND   AGE\n\
                     shop           1/1        47.2         10            18s\n";
        let cell = |c| super::table_cell(table, c).unwrap();
        assert_eq!(cell("READY"), "");
        assert_eq!(cell("RECEIVED/S"), "47.2");
        assert_eq!(cell("LEFT-BEHIND"), "10");
        assert_eq!(cell("AGE"), "18s");
        assert!(super::table_cell(table, "DROPPED").is_err());
    }
}
