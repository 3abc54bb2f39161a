//! `make demo`: nanogate end to end on a local, real control plane.
//!
//! Everything is real except the kubelet: the demo starts etcd, kube-apiserver and
//! kube-controller-manager, runs the operator (controller, admission webhook, hub) as a local
//! process, registers the webhook by URL, creates a gateway and an annotated Deployment, and
//! then plays the kubelet for the one container we ship: it runs the pod's injected
//! `nano-agent` locally with the pod's configuration, Secret and service-account token, and
//! talks to it through the pod's socket like an app would. Every step prints what it did.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DynamicObject, ListParams};
use nanogate_e2e::kubelet::{run_sidecar, sidecar_container};
use nanogate_e2e::{ControlPlane, Process, apply_yaml, wait_for};
use nanogate_tests::platform::PlatformServer;
use serde_json::{Value, json};

const NAMESPACE: &str = "demo";
const OPERATOR_NAMESPACE: &str = "nanogate-system";
const API_KEY: &str = "demo-api-key-not-a-secret";

fn say(step: &str, text: &str) {
    println!("\n==> [{step}] {text}");
}

fn note(text: &str) {
    println!("    {text}");
}

#[tokio::main]
async fn main() -> Result<()> {
    let started = Instant::now();
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("demo binary has no directory")?
        .to_path_buf();
    for binary in ["nanogate-operator", "nano-agent"] {
        if !bin_dir.join(binary).exists() {
            bail!(
                "{} is missing next to the demo; run `make demo` (it builds every binary)",
                binary
            );
        }
    }
    let root = nanogate_e2e::workspace_root();

    say(
        "1/8",
        "starting a real control plane (etcd + kube-apiserver + kube-controller-manager)",
    );
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    note(&format!(
        "kubeconfig: {}  (try: KUBECONFIG=… kubectl get agw -A)",
        cp.kubeconfig_path().display()
    ));

    say(
        "2/8",
        "installing nanogate: CRD, namespace, webhook configurations (by URL), operator",
    );
    let (webhook_port, hub_port, admin_port) = (
        nanogate_e2e::free_port()?,
        nanogate_e2e::free_port()?,
        nanogate_e2e::free_port()?,
    );
    nanogate_e2e::install_crd(&cp)?;
    apply_yaml(cp.kubeconfig_path(), &install_objects(webhook_port))?;
    note(
        "CRD agentgateways.nanogate.io, namespace nanogate-system, MutatingWebhookConfiguration nanogate-injector, ValidatingWebhookConfiguration nanogate-validator",
    );
    if root.join("charts/nanogate/Chart.yaml").exists() {
        note(
            "(the Helm chart installs the same objects in a cluster; here the operator runs as a local process)",
        );
    }
    let mut operator = start_operator(&cp, &bin_dir, webhook_port, hub_port, admin_port)?;
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
            let exited = operator.exited();
            async move {
                if let Some(status) = exited {
                    bail!("the operator exited ({status})");
                }
                Ok(out.ok().filter(|b| !b.is_empty()).map(|_| ()))
            }
        },
    )
    .await
    .map_err(|e| e.context(operator.log_tail(20)))?;
    note("operator ready: it made its CA and serving certificate and patched caBundle itself");

    say(
        "3/8",
        "starting a local platform receiver (the Tendrl platform HTTP API)",
    );
    let platform = PlatformServer::start_with_key(API_KEY).await?;
    note(&format!("platform listening at {}", platform.url()));

    say(
        "4/8",
        "creating the app namespace, the API-key Secret and an AgentGateway",
    );
    apply_yaml(cp.kubeconfig_path(), &gateway_objects(&platform.url()))?;
    let gateways = nanogate_e2e::agentgateways(&client, NAMESPACE);
    wait_for("gateway demo Ready", Duration::from_secs(60), || {
        let gateways = gateways.clone();
        async move { Ok(condition(&gateways.get("demo").await?, "Ready").filter(|s| s == "True")) }
    })
    .await?;
    note("AgentGateway demo: Ready=True, ConfigMap demo-agent-config written by the operator");

    say(
        "5/8",
        "creating a Deployment annotated nanogate.io/inject=true",
    );
    apply_yaml(cp.kubeconfig_path(), &deployment())?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let pod = wait_for("the shop pod", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            Ok(pods
                .list(&ListParams::default().labels("app=shop"))
                .await?
                .items
                .into_iter()
                .next())
        }
    })
    .await?;
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let injected = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("nanogate.io/injected"))
        .cloned();
    let containers: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
        .collect();
    note(&format!(
        "pod {pod_name}: containers {containers:?}, nanogate.io/injected={}",
        injected.as_deref().unwrap_or("-")
    ));
    if sidecar_container(&pod).is_none() {
        bail!(
            "the pod was not injected; see the operator log {}",
            operator.log.display()
        );
    }

    say(
        "6/8",
        "running the pod's injected nano-agent as a local process (standing in for the kubelet)",
    );
    let workdir = cp.dir().join("pod-shop");
    let mut agent = run_sidecar(&client, &pod, &bin_dir.join("nano-agent"), &workdir).await?;
    note(&format!(
        "nano-agent pid {}, admin http://{}/metrics, log {}",
        agent.process.pid(),
        agent.admin_addr,
        agent.process.log.display()
    ));
    let socket = agent.socket.clone();
    wait_for("the agent's socket", Duration::from_secs(20), || {
        let (socket, exited) = (socket.clone(), agent.process.exited());
        async move {
            if let Some(status) = exited {
                bail!("nano-agent exited ({status})");
            }
            Ok(UnixStream::connect(&socket).ok().map(|_| ()))
        }
    })
    .await
    .map_err(|e| e.context(agent.process.log_tail(20)))?;
    note(&format!("socket ready: {}", socket.display()));

    say(
        "7/8",
        "apps send messages through the socket (Tendrl protocol)",
    );
    for (i, item) in ["espresso", "croissant", "baguette"].iter().enumerate() {
        let msg = json!({"msg_type": "publish", "data": {"order": i + 1, "item": item}, "context": {"tags": ["orders"]}});
        send(&socket, &msg, false)?;
        note(&format!("publish (wait=false) {msg}"));
    }
    let reply = send(
        &socket,
        &json!({"msg_type": "publish", "data": {"event": "checkout"}, "context": {"wait": true}}),
        true,
    )?;
    note(&format!(
        "publish (wait=true) -> the platform answered {reply}"
    ));
    platform.queue_for_check(json!({"command": "restock", "item": "croissant"}));
    let reply = send(
        &socket,
        &json!({"msg_type": "msg_check", "context": {"limit": 5}}),
        true,
    )?;
    note(&format!("msg_check -> {reply}"));
    let tags: Vec<String> = (0..11).map(|i| format!("t{i}")).collect();
    let reply = send(
        &socket,
        &json!({"msg_type": "publish", "context": {"tags": tags}}),
        true,
    )?;
    note(&format!("publish with 11 tags -> {reply}"));
    let received = wait_for(
        "the platform to receive 4 messages",
        Duration::from_secs(15),
        || {
            let got = platform.received();
            async move { Ok((got.len() >= 4).then_some(got)) }
        },
    )
    .await?;
    note(&format!(
        "the platform received {} messages:",
        received.len()
    ));
    for message in &received {
        note(&format!("  {message}"));
    }
    // An app polling an empty queue (delivery is done, so every platform request now is a
    // msg_check): the agent asks the platform once, then repeats its empty answer for the
    // gateway's spec.upstream.msgCheckCache (default 100 ms) instead of asking on every poll.
    let before = platform.requests();
    let polls = 5;
    let mut replies = Vec::new();
    for _ in 0..polls {
        replies.push(send(&socket, &json!({"msg_type": "msg_check"}), true)?);
    }
    note(&format!(
        "{polls} more msg_checks in a row -> {}; platform requests they caused: {} (the rest answered by the sidecar within spec.upstream.msgCheckCache, 100ms)",
        replies.join(" "),
        platform.requests() - before
    ));

    say(
        "8/8",
        "fleet health, reported by the sidecar to the operator's hub",
    );
    let connected = wait_for(
        "the gateway status to show the sidecar connected",
        Duration::from_secs(30),
        || {
            let gateways = gateways.clone();
            async move {
                let gw = gateways.get("demo").await?;
                let connected = gw.data["status"]["sidecars"]["connected"]
                    .as_i64()
                    .unwrap_or(0);
                Ok((connected >= 1).then_some(gw))
            }
        },
    )
    .await;
    match connected {
        Ok(gw) => note(&format!(
            "status.sidecars = {}",
            gw.data["status"]["sidecars"]
        )),
        Err(error) => note(&format!("the sidecar did not show as connected: {error:#}")),
    }
    note("$ kubectl get agentgateways -n demo");
    for line in cp
        .kubectl(&["get", "agentgateways", "-n", NAMESPACE])?
        .lines()
    {
        note(line);
    }

    agent.process.stop();
    operator.stop();
    println!(
        "\ndemo finished in {:.1}s; control plane stopped and cleaned up",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn condition(gw: &DynamicObject, kind: &str) -> Option<String> {
    gw.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(str::to_string))
}

fn start_operator(
    cp: &ControlPlane,
    bin_dir: &Path,
    webhook: u16,
    hub: u16,
    admin: u16,
) -> Result<Process> {
    let args: Vec<String> = vec![
        "run".into(),
        format!("--admin-addr=127.0.0.1:{admin}"),
        format!("--operator-namespace={OPERATOR_NAMESPACE}"),
        format!("--lease-namespace={OPERATOR_NAMESPACE}"),
        format!("--webhook-addr=127.0.0.1:{webhook}"),
        format!("--hub-addr=127.0.0.1:{hub}"),
        format!("--hub-advertise=127.0.0.1:{hub}"),
        "--extra-sans=127.0.0.1".into(),
        "--status-interval=2s".into(),
    ];
    let process = Process::spawn_with_env(
        "nanogate-operator",
        &bin_dir.join("nanogate-operator"),
        &args,
        &[
            ("KUBECONFIG", cp.kubeconfig_path().display().to_string()),
            ("RUST_LOG", "info".into()),
        ],
        cp.dir(),
    )?;
    note(&format!(
        "operator: webhook 127.0.0.1:{webhook}, hub 127.0.0.1:{hub}, metrics http://127.0.0.1:{admin}/metrics, log {}",
        process.log.display()
    ));
    Ok(process)
}

/// One request on its own connection, as the seed's Python example does; reads one reply when
/// `expect_reply`.
fn send(socket: &PathBuf, message: &Value, expect_reply: bool) -> Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(message.to_string().as_bytes())?;
    if !expect_reply {
        return Ok(String::new());
    }
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// What the Helm chart installs besides the operator Deployment, with the webhooks registered
/// by URL (the operator runs on this machine, not behind a Service).
fn install_objects(webhook_port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {OPERATOR_NAMESPACE}
---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: nanogate-injector
webhooks:
- name: inject.nanogate.io
  clientConfig:
    url: https://127.0.0.1:{webhook_port}/mutate
  rules:
  - operations: ["CREATE"]
    apiGroups: [""]
    apiVersions: ["v1"]
    resources: ["pods"]
  namespaceSelector:
    matchExpressions:
    - {{key: nanogate.io/system, operator: DoesNotExist}}
  failurePolicy: Ignore
  sideEffects: None
  timeoutSeconds: 5
  admissionReviewVersions: ["v1"]
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  name: nanogate-validator
webhooks:
- name: validate.nanogate.io
  clientConfig:
    url: https://127.0.0.1:{webhook_port}/validate
  rules:
  - operations: ["CREATE", "UPDATE"]
    apiGroups: ["nanogate.io"]
    apiVersions: ["v1alpha1"]
    resources: ["agentgateways"]
  failurePolicy: Ignore
  sideEffects: None
  timeoutSeconds: 5
  admissionReviewVersions: ["v1"]
"#
    )
}

fn gateway_objects(platform_url: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
---
apiVersion: v1
kind: Secret
metadata:
  name: platform-api-key
  namespace: {NAMESPACE}
stringData:
  api-key: {API_KEY}
---
apiVersion: nanogate.io/v1alpha1
kind: AgentGateway
metadata:
  name: demo
  namespace: {NAMESPACE}
spec:
  upstream:
    kind: http
    url: {platform_url}
    apiKeySecretRef: {{name: platform-api-key, key: api-key}}
  batching:
    flushInterval: 250ms
  heartbeatInterval: 2s
"#
    )
}

fn deployment() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop
  namespace: {NAMESPACE}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: shop}}
  template:
    metadata:
      labels: {{app: shop}}
      annotations:
        nanogate.io/inject: "true"
        nanogate.io/gateway: demo
    spec:
      containers:
      - name: shop
        image: python:3.12-slim
        command: ["python", "-c", "print('writes to $TENDRL_SOCKET_PATH')"]
"#
    )
}
