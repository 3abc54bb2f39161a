//! `make demo`: nanogate end to end on a local, real control plane and a real node.
//!
//! Nothing is played: the demo starts etcd, kube-apiserver, kube-controller-manager and a real
//! node (kubelet, kube-scheduler, containerd, CNI bridge; `e2e/src/node.rs`), builds the
//! images the shipping test builds (nano-agent, operator, the example app; `e2e/src/images.rs`)
//! and imports them into the node, runs the operator (controller, admission webhook, hub) as a
//! local process with the webhooks registered by URL, and applies the samples of
//! `examples/k8s/` as a user would: a gateway and an annotated Deployment whose app runs as
//! UID 10001. The kubelet runs the injected pod; its app publishes through the socket, the
//! platform receiver on this machine gets the messages. Every step prints what it did.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nanogate_e2e::images::images;
use nanogate_e2e::local_operator::{
    EXAMPLE_DEPLOYMENT, apply_in_namespace, example_gateway_yaml, wait_gateway_ready,
    wait_sidecars_connected,
};
use nanogate_e2e::node::HOST_IP;
use nanogate_e2e::{ControlPlane, LocalOperator, Node, wait_for};
use nanogate_tests::platform::PlatformServer;
use serde_json::Value;

const NAMESPACE: &str = "demo";
const API_KEY: &str = "demo-api-key-not-a-secret";
const STEPS: usize = 9;

fn say(step: usize, text: &str) {
    println!("\n==> [{step}/{STEPS}] {text}");
}

fn note(text: &str) {
    println!("    {text}");
}

/// Prints a command as a user would type it, then its output, indented.
fn show(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains(|c: char| " {}\"'$*?".contains(c)) {
                format!("'{a}'")
            } else {
                a.to_string()
            }
        })
        .collect();
    note(&format!("$ kubectl {}", quoted.join(" ")));
    let out = cp.kubectl(args)?;
    for line in out.lines() {
        note(&format!("  {line}"));
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<()> {
    let started = Instant::now();
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("demo binary has no directory")?
        .to_path_buf();
    for binary in ["nanogate-operator", "nanogate-node-reaper"] {
        if !bin_dir.join(binary).exists() {
            bail!(
                "{} is missing next to the demo; run `make demo` (it builds every binary)",
                binary
            );
        }
    }
    let root = nanogate_e2e::workspace_root();

    say(
        1,
        "starting a real control plane (etcd, kube-apiserver, kube-controller-manager) and a real node (kubelet, kube-scheduler, containerd)",
    );
    let cp = ControlPlane::start().await?;
    let node = Node::start(&cp).await?;
    let client = cp.client().await?;
    note(&format!(
        "kubeconfig: {}  (try: KUBECONFIG=… kubectl get nodes,pods,agw -A)",
        cp.kubeconfig_path().display()
    ));
    show(&cp, &["get", "nodes", "-o", "wide"])?;
    let outcome = run(&cp, &node, &client, &bin_dir, root).await;
    // The node goes first: its pods are deleted through the kubelet, then the control plane.
    drop(node);
    drop(cp);
    outcome?;
    println!(
        "\ndemo finished in {:.1}s; node and control plane stopped and cleaned up",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn run(
    cp: &ControlPlane,
    node: &Node,
    client: &kube::Client,
    bin_dir: &Path,
    root: &Path,
) -> Result<()> {
    say(
        2,
        "building the images (build/Dockerfile, examples/Dockerfile; cached after the first build) and importing them into the node",
    );
    let images = images()?;
    let agent_image = images.reference("nano-agent");
    for image in [agent_image, images.app.as_str()] {
        node.import_image(image)?;
        note(&format!("{image}: in the node's containerd"));
    }

    say(
        3,
        "installing nanogate: CRD, namespace, webhook configurations (by URL), operator",
    );
    let operator = LocalOperator::install(cp, &bin_dir.join("nanogate-operator")).await?;
    note(
        "CRD agentgateways.nanogate.io, namespace nanogate-system, MutatingWebhookConfiguration nanogate-injector, ValidatingWebhookConfiguration nanogate-validator",
    );
    note(
        "(the Helm chart installs the same objects and runs the operator as pods; here it is a local process, which the node's pods reach at the bridge address)",
    );
    note(&format!(
        "operator: webhook 127.0.0.1:{}, hub {}, metrics http://127.0.0.1:{}/metrics, log {}",
        operator.webhook_port,
        operator.hub_addr(),
        operator.admin_port,
        operator.log().display()
    ));
    note("operator ready: it made its CA and serving certificate and patched caBundle itself");

    say(
        4,
        "starting a platform receiver (the Tendrl platform HTTP API) where pods reach this machine",
    );
    let platform = PlatformServer::start_on(&format!("{HOST_IP}:0"), API_KEY).await?;
    note(&format!("platform listening at {}", platform.url()));

    say(
        5,
        "kubectl apply -n demo -f examples/k8s/agentgateway.yaml (platform URL and API key filled in)",
    );
    cp.kubectl(&["create", "namespace", NAMESPACE])?;
    apply_in_namespace(
        cp,
        NAMESPACE,
        &example_gateway_yaml(&platform.url(), API_KEY)?,
    )?;
    wait_gateway_ready(client, NAMESPACE, "shop").await?;
    note("AgentGateway shop: Ready=True, ConfigMap shop-agent-config written by the operator");

    say(
        6,
        "kubectl apply -n demo -f examples/k8s/deployment.yaml (annotated nanogate.io/inject; the app runs as UID 10001, no fsGroup)",
    );
    let deployment_yaml = std::fs::read_to_string(root.join(EXAMPLE_DEPLOYMENT))?;
    apply_in_namespace(cp, NAMESPACE, &deployment_yaml)?;
    let pod_name = wait_for(
        "the shop-orders pod 2/2 Running and Ready",
        Duration::from_secs(120),
        || {
            let out = cp.kubectl(&[
                "get", "pods", "-n", NAMESPACE, "-l", "app=shop-orders", "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.status.containerStatuses[*].ready}{\"\\n\"}{end}",
            ]);
            let running = operator.ensure_running();
            async move {
                running?;
                Ok(out?.lines().find_map(|line| {
                    let mut words = line.split_whitespace();
                    let name = words.next()?;
                    let running = words.next() == Some("Running");
                    let ready: Vec<&str> = words.collect();
                    (running && ready.len() == 2 && ready.iter().all(|r| *r == "true"))
                        .then(|| name.to_string())
                }))
            }
        },
    )
    .await
    .map_err(|e| {
        let pods = cp
            .kubectl(&["get", "pods", "-n", NAMESPACE, "-o", "wide"])
            .unwrap_or_default();
        let events = cp
            .kubectl(&["get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp"])
            .unwrap_or_default();
        e.context(format!("pods:\n{pods}\nevents:\n{events}\noperator log:\n{}", operator.log_tail(20)))
    })?;
    show(cp, &["get", "pods", "-n", NAMESPACE, "-o", "wide"])?;
    show(
        cp,
        &[
            "get",
            "pod",
            "-n",
            NAMESPACE,
            &pod_name,
            "-o",
            "jsonpath={.metadata.annotations.nanogate\\.io/injected}",
        ],
    )?;

    say(
        7,
        "the app publishes through the socket; the platform receives",
    );
    let from_app = wait_for(
        "the platform to receive 3 messages from the app",
        Duration::from_secs(60),
        || {
            let got = platform.received();
            async move {
                let app: Vec<Value> = got
                    .into_iter()
                    .filter(|m| message_data(m)["app"] == "example-app")
                    .collect();
                Ok((app.len() >= 3).then_some(app))
            }
        },
    )
    .await?;
    for message in from_app.iter().take(3) {
        note(&format!("platform received: {message}"));
    }
    let uid = &message_data(&from_app[0])["uid"];
    note(&format!(
        "sent by the app container as uid {uid}, not the sidecar's 65532"
    ));
    show(
        cp,
        &["logs", "-n", NAMESPACE, &pod_name, "-c", "app", "--tail=3"],
    )?;
    show(
        cp,
        &[
            "logs",
            "-n",
            NAMESPACE,
            &pod_name,
            "-c",
            "nano-agent",
            "--tail=3",
        ],
    )?;

    say(
        8,
        "kubectl exec into the app container: publish with the shell example",
    );
    let before = platform.received_count();
    show(
        cp,
        &[
            "exec",
            "-n",
            NAMESPACE,
            &pod_name,
            "-c",
            "app",
            "--",
            "sh",
            "/usr/local/bin/nanogate.sh",
            "publish",
            r#"{"by":"kubectl exec"}"#,
        ],
    )?;
    let by_hand = wait_for(
        "the platform to receive the message published by hand",
        Duration::from_secs(30),
        || {
            let got = platform.received();
            async move {
                Ok(got
                    .into_iter()
                    .skip(before)
                    .find(|m| message_data(m)["by"] == "kubectl exec"))
            }
        },
    )
    .await?;
    note(&format!("platform received: {by_hand}"));

    say(
        9,
        "fleet health, reported by the sidecar to the operator's hub",
    );
    wait_sidecars_connected(client, NAMESPACE, "shop", 1).await?;
    show(cp, &["get", "agentgateways", "-n", NAMESPACE])?;

    cp.kubectl(&[
        "delete",
        "deployment",
        "-n",
        NAMESPACE,
        "shop-orders",
        "--wait=false",
    ])?;
    operator.stop();
    Ok(())
}

/// The app's `data` of a message the platform received.
fn message_data(message: &Value) -> &Value {
    &message["data"]
}
