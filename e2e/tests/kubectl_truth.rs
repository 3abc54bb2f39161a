//! Issue 21, "what kubectl shows is true", on the real apiserver: a gateway that would make
//! pods inadmissible is refused at `kubectl apply` (or, if it got in, is `ConfigValid=False`);
//! injection decisions show on the pod (`kubectl describe pod`: events with the pod's UID, the
//! skip annotation) and to whoever creates it (admission warnings); `Injected` is said only of
//! stored pods; `nanogate.io/inject` understands yes/no words and an opt-out always wins; an
//! updated API key Secret reaches the running sidecar without a restart (point 10); a sidecar
//! image the operator does not allow is refused at apply and never injected (issue 18).
//!
//! The webhook runs in-process (as in `injection.rs`), scoped to each test's namespace by a
//! label; tests run kubectl synchronously, so their runtime has worker threads left to serve it; the reconciler is the real `nanogate-operator` binary restricted to the namespace
//! (build it first: `cargo build -p nanogate-operator -p nanogate-sidecar --bins`).

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::Client;
use nanogate_e2e::{ControlPlane, Process, TestNamespace, wait_for};
use nanogate_operator::ServerOptions;
use nanogate_operator::shutdown;
use serde_json::Value;

const SELECTOR_LABEL: &str = "nanogate.io/e2e-webhook";

/// The in-process webhook for one test namespace; stops when dropped.
struct Webhook {
    _stop: shutdown::Trigger,
    _operator_ns: TestNamespace,
}

/// Registers (failure policy `Fail`) and serves the webhooks for namespace `ns`.
async fn serve_webhook(cp: &ControlPlane, client: &Client, ns: &str) -> Result<Webhook> {
    serve_webhook_allowing(cp, client, ns, &[]).await
}

/// [`serve_webhook`] with `--allowed-sidecar-images` set to `allowed_images`.
async fn serve_webhook_allowing(
    cp: &ControlPlane,
    client: &Client,
    ns: &str,
    allowed_images: &[&str],
) -> Result<Webhook> {
    let operator_ns = TestNamespace::create(client, "truth-op").await?;
    let port = nanogate_e2e::free_port()?;
    let config_name = format!("nanogate-{ns}");
    nanogate_e2e::register_webhooks(cp, SELECTOR_LABEL, ns, &config_name, port, "Fail")?;
    let opts = ServerOptions {
        operator_namespace: operator_ns.name().to_string(),
        webhook_addr: Some(format!("127.0.0.1:{port}").parse()?),
        mutating_webhook_configs: vec![config_name.clone()],
        validating_webhook_configs: vec![config_name],
        extra_sans: vec!["127.0.0.1".into()],
        hub_advertise: "127.0.0.1:7051".into(),
        allowed_sidecar_images: allowed_images.iter().map(|s| s.to_string()).collect(),
        ..ServerOptions::default()
    };
    let stop = nanogate_e2e::start_servers(client, &opts).await?;
    // Served once the apiserver trusts the certificate (the operator patches the caBundle) and
    // both webhooks answer: a server-side dry run of a plain pod and of a valid gateway.
    let probes = [
        pod_yaml(ns, "webhook-probe", &[]),
        nanogate_e2e::gateway_yaml(ns, "webhook-probe", ""),
    ];
    wait_for(
        "the webhooks to answer",
        Duration::from_secs(60),
        || async {
            for probe in &probes {
                let out = kubectl(cp, &["apply", "--dry-run=server", "-f", "-"], probe)?;
                if !out.ok {
                    println!("webhook not answering yet: {}", out.stderr.trim());
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    Ok(Webhook {
        _stop: stop,
        _operator_ns: operator_ns,
    })
}

/// The real operator binary reconciling namespace `ns` only (no webhook, no hub).
fn reconciler(cp: &ControlPlane, ns: &str) -> Result<Process> {
    let port = nanogate_e2e::free_port()?;
    let args: Vec<String> =
        format!("run --admin-addr 127.0.0.1:{port} --namespace {ns} --lease-namespace {ns}")
            .split(' ')
            .map(str::to_string)
            .collect();
    let env = [("RUST_LOG", "info,kube=warn".into())];
    nanogate_e2e::spawn_operator(cp, "operator-truth", &args, &env)
}

/// What kubectl printed: exit success, stdout, stderr (where warnings go).
struct Kubectl {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs kubectl with `args`, feeding `stdin`.
fn kubectl(cp: &ControlPlane, args: &[&str], stdin: &str) -> Result<Kubectl> {
    let mut child = nanogate_e2e::kubectl_command(cp.kubeconfig_path())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    child
        .stdin
        .take()
        .context("kubectl stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(Kubectl {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn pod_yaml(ns: &str, name: &str, annotations: &[(&str, &str)]) -> String {
    let annotations: Vec<String> = annotations
        .iter()
        .map(|(k, v)| format!("{k}: {v:?}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{{}}}\nspec:\n  containers: [{{name: app, image: python:3.12-slim}}]\n",
        annotations.join(", ")
    )
}

/// The image of the injected nano-agent in a pod as kubectl printed it (JSON).
fn sidecar_image(pod_json: &str) -> Result<Option<String>> {
    let pod: Value = serde_json::from_str(pod_json).context("pod JSON")?;
    Ok(["containers", "initContainers"]
        .iter()
        .flat_map(|field| pod["spec"][field].as_array().cloned().unwrap_or_default())
        .find(|c| c["name"] == "nano-agent")
        .and_then(|c| c["image"].as_str().map(str::to_string)))
}

/// Whether a pod as kubectl printed it (JSON) carries the sidecar.
fn has_sidecar(pod_json: &str) -> Result<bool> {
    let pod: Value = serde_json::from_str(pod_json).context("pod JSON")?;
    let names = |field: &str| -> Vec<String> {
        pod["spec"][field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    };
    Ok(names("containers")
        .iter()
        .chain(names("initContainers").iter())
        .any(|n| n == "nano-agent"))
}

/// A server-side dry-run create of `yaml`.
fn dry_run(cp: &ControlPlane, yaml: &str) -> Result<Kubectl> {
    kubectl(
        cp,
        &["create", "--dry-run=server", "-o", "json", "-f", "-"],
        yaml,
    )
}

/// Waits until a dry-run of `yaml` is injected (the webhook's gateway store has caught up).
async fn wait_injecting(cp: &ControlPlane, yaml: &str) -> Result<()> {
    wait_for(
        "the webhook to inject a dry-run pod",
        Duration::from_secs(30),
        || async {
            let out = dry_run(cp, yaml)?;
            Ok((out.ok && has_sidecar(&out.stdout)?).then_some(()))
        },
    )
    .await
}

/// The shared apiserver with the CRD installed, a client, and a fresh namespace.
async fn crd_and_namespace(prefix: &str) -> Result<(&'static ControlPlane, Client, TestNamespace)> {
    let cp = ControlPlane::shared().await?;
    nanogate_e2e::install_crd(cp)?;
    let client = cp.client().await?;
    let ns = TestNamespace::create(&client, prefix).await?;
    Ok((cp, client, ns))
}

/// `kubectl apply -f -` of `yaml`.
fn apply(cp: &ControlPlane, yaml: &str) -> Result<Kubectl> {
    kubectl(cp, &["apply", "-f", "-"], yaml)
}

/// `kubectl apply` of [`nanogate_e2e::gateway_yaml`] (`spec` lines under `spec:`).
fn apply_gateway(cp: &ControlPlane, ns: &str, name: &str, spec: &str) -> Result<Kubectl> {
    apply(cp, &nanogate_e2e::gateway_yaml(ns, name, spec))
}

/// Gateway `name` of `ns` as `kubectl get -o json` prints it (null when that fails).
fn get_gateway(cp: &ControlPlane, ns: &str, name: &str) -> Result<Value> {
    let out = kubectl(cp, &["-n", ns, "get", "agw", name, "-o", "json"], "")?;
    Ok(serde_json::from_str(&out.stdout).unwrap_or_default())
}

/// Waits (for `what`) until a dry-run of `pod` is warned that its gateway is invalid; the
/// dry-run's output.
async fn wait_invalid_warning(cp: &ControlPlane, what: &str, pod: &str) -> Result<Kubectl> {
    wait_for(what, Duration::from_secs(30), || async {
        let out = dry_run(cp, pod)?;
        Ok(out.stderr.contains("is invalid").then_some(out))
    })
    .await
}

/// Waits (for `what`) until `kubectl describe pod` shows `needle`; the description.
async fn wait_describe(
    cp: &ControlPlane,
    ns: &str,
    pod: &str,
    what: &str,
    needle: &str,
) -> Result<String> {
    wait_for(what, Duration::from_secs(30), || async {
        let out = kubectl(cp, &["-n", ns, "describe", "pod", pod], "")?;
        Ok(out.stdout.contains(needle).then_some(out.stdout))
    })
    .await
}

/// A namespace served by the webhooks, with the Secret and a valid gateway `shop`.
async fn namespace_with_gateway(
    prefix: &str,
) -> Result<(&'static ControlPlane, Client, TestNamespace, Webhook)> {
    let (cp, client, ns) = crd_and_namespace(prefix).await?;
    let webhook = serve_webhook(cp, &client, ns.name()).await?;
    let out = apply_gateway(cp, ns.name(), "shop", "")?;
    if !out.ok {
        bail!("applying gateway shop: {}", out.stderr);
    }
    Ok((cp, client, ns, webhook))
}

/// Waits for gateway `name` to turn `ConfigValid=False`; the condition's message.
async fn config_invalid_message(cp: &ControlPlane, ns: &str, name: &str) -> Result<String> {
    wait_for(
        &format!("{name}: ConfigValid=False"),
        Duration::from_secs(30),
        || async {
            let gw = get_gateway(cp, ns, name)?;
            Ok(condition(&gw, "ConfigValid")
                .filter(|(status, _)| status == "False")
                .map(|(_, message)| message))
        },
    )
    .await
}

/// Condition `ty` of a gateway as (status, message).
fn condition(gw: &Value, ty: &str) -> Option<(String, String)> {
    nanogate_e2e::status_condition(&gw["status"], ty).map(|(status, _, message)| (status, message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_would_make_pods_inadmissible_is_refused_at_apply_naming_the_field()
-> Result<()> {
    let (cp, client, ns) = crd_and_namespace("truth-refuse").await?;
    let _webhook = serve_webhook(cp, &client, ns.name()).await?;
    for (name, spec, field) in [
        (
            "banana",
            "  sidecar: {resources: {requests: {cpu: banana}}}\n",
            "spec.sidecar.resources.requests.cpu",
        ),
        (
            "inverted",
            "  sidecar: {resources: {requests: {memory: 1Gi}, limits: {memory: 64Mi}}}\n",
            "spec.sidecar.resources.requests.memory",
        ),
        (
            "tiny-flush",
            "  batching: {flushInterval: 0.0001ms}\n",
            "spec.batching.flushInterval",
        ),
        (
            "tiny-sync",
            "  delivery: {syncInterval: 0.5ms}\n",
            "spec.delivery.syncInterval",
        ),
        (
            "admin-port",
            "  tcpListener: {port: 9091, tokenSecretRef: {name: t, key: token}, tlsSecretRef: {name: c}}\n",
            "spec.tcpListener.port",
        ),
        (
            "moved-admin-port",
            "  sidecar: {adminPort: 7443}\n  tcpListener: {port: 7443, tokenSecretRef: {name: t, key: token}, tlsSecretRef: {name: c}}\n",
            "spec.tcpListener.port",
        ),
        // Mounted into every app container: outside nanogate's own directories it would hide
        // the app's files (issue 18).
        (
            "hide-bin",
            "  socket: {path: /usr/local/bin/agent.sock}\n",
            "spec.socket.path",
        ),
    ] {
        let out = apply_gateway(cp, ns.name(), name, spec)?;
        println!("{name}: {}", out.stderr.trim());
        assert!(!out.ok, "{name} was accepted: {}", out.stdout);
        assert!(
            out.stderr.contains("denied the request") && out.stderr.contains(field),
            "{name}: {}",
            out.stderr
        );
    }
    // The same gateway with sane values is accepted.
    let out = apply_gateway(
        cp,
        ns.name(),
        "sane",
        "  sidecar: {resources: {requests: {memory: 32Mi}, limits: {memory: 64Mi}}}\n  batching: {flushInterval: 1ms}\n",
    )?;
    assert!(out.ok, "{}", out.stderr);
    Ok(())
}

/// A gateway that got in while the webhook was down: `ConfigValid=False` naming the field; a
/// pod asking for it is told (warning, annotation, event on the pod with its UID) that the
/// gateway is invalid, and `PodsNotInjected` does not blame an unreachable webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_gateway_that_got_in_is_flagged_and_named_invalid_to_its_pods() -> Result<()> {
    let (cp, client, ns) = crd_and_namespace("truth-invalid").await?;
    let _operator = reconciler(cp, ns.name())?;
    // No validating webhook yet: the apiserver's schema alone lets it in.
    let out = apply_gateway(
        cp,
        ns.name(),
        "shop",
        "  sidecar: {resources: {requests: {memory: 1Gi}, limits: {memory: 64Mi}}}\n",
    )?;
    assert!(out.ok, "{}", out.stderr);
    let message = config_invalid_message(cp, ns.name(), "shop").await?;
    assert!(
        message.contains("spec.sidecar.resources.requests.memory (1Gi)"),
        "{message}"
    );

    let _webhook = serve_webhook(cp, &client, ns.name()).await?;
    let pod = pod_yaml(ns.name(), "app", &[("nanogate.io/inject", "true")]);
    // The webhook learns gateways through a watch: wait until it names this one invalid.
    let warned = wait_invalid_warning(cp, "the webhook to call the gateway invalid", &pod).await?;
    assert!(!has_sidecar(&warned.stdout)?);
    let created = kubectl(cp, &["create", "-f", "-"], &pod)?;
    println!("create: {}", created.stderr.trim());
    assert!(created.ok, "{}", created.stderr);
    assert!(
        created
            .stderr
            .contains("Warning: nanogate: sidecar not injected")
            && created
                .stderr
                .contains("\"shop\" is invalid (spec.sidecar.resources.requests.memory")
            && !created.stderr.contains("does not exist"),
        "{}",
        created.stderr
    );
    let describe = wait_describe(
        cp,
        ns.name(),
        "app",
        "an InjectionSkipped event on the pod",
        "InjectionSkipped",
    )
    .await?;
    println!("{describe}");
    assert!(
        describe.contains("nanogate.io/injection-skipped") && describe.contains("is invalid"),
        "{describe}"
    );

    let note = nanogate_e2e::wait_for_event(
        &client,
        ns.name(),
        "shop",
        "PodsNotInjected",
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        note.contains("skipped by the webhook") && !note.contains("unreachable"),
        "{note}"
    );
    Ok(())
}

/// `Injected` is recorded on the stored pod (with its UID), never for a pod the apiserver
/// refused after the webhook injected it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_is_said_only_of_pods_the_apiserver_stored() -> Result<()> {
    let (cp, client, ns, _webhook) = namespace_with_gateway("truth-injected").await?;
    let good = pod_yaml(ns.name(), "stored", &[("nanogate.io/inject", "true")]);
    wait_injecting(cp, &good).await?;

    // Injected by the webhook, then refused by the apiserver's validation (bad container name).
    let refused = pod_yaml(ns.name(), "refused", &[("nanogate.io/inject", "true")])
        .replace("name: app", "name: Not_A_Name");
    let out = kubectl(cp, &["create", "-f", "-"], &refused)?;
    assert!(!out.ok, "the invalid pod was stored");
    let out = kubectl(cp, &["create", "-f", "-"], &good)?;
    assert!(out.ok, "{}", out.stderr);

    let uid = kubectl(
        cp,
        &[
            "-n",
            ns.name(),
            "get",
            "pod",
            "stored",
            "-o",
            "jsonpath={.metadata.uid}",
        ],
        "",
    )?
    .stdout;
    let describe = wait_describe(
        cp,
        ns.name(),
        "stored",
        "an Injected event on the stored pod",
        "Injected",
    )
    .await?;
    assert!(
        describe.contains("nano-agent injected for gateway shop"),
        "{describe}"
    );
    let events = kubectl(cp, &["-n", ns.name(), "get", "events", "-o", "json"], "")?;
    let events: Value = serde_json::from_str(&events.stdout)?;
    let items = events["items"].as_array().cloned().unwrap_or_default();
    let about = |name: &str| -> Vec<&Value> {
        items
            .iter()
            .filter(|e| e["involvedObject"]["name"] == name)
            .collect()
    };
    assert!(
        about("stored")
            .iter()
            .any(|e| e["reason"] == "Injected" && e["involvedObject"]["uid"] == uid.as_str()),
        "{items:#?}"
    );
    // The webhook gives up on a pod that never appears; wait out its search to be sure.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let events = nanogate_e2e::events_about(&client, ns.name(), "refused").await?;
    assert!(events.is_empty(), "events about a refused pod: {events:?}");
    Ok(())
}

/// `nanogate.io/inject` understands yes/no words in any case; an explicit opt-out wins over the
/// namespace label; a value it does not understand is warned about and not injected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_annotation_values_and_opt_out_over_the_namespace_label() -> Result<()> {
    let (cp, _, ns, _webhook) = namespace_with_gateway("truth-values").await?;
    wait_injecting(
        cp,
        &pod_yaml(ns.name(), "probe", &[("nanogate.io/inject", "true")]),
    )
    .await?;

    for yes in ["true", "YES", "Enabled", "on"] {
        let out = dry_run(
            cp,
            &pod_yaml(ns.name(), "p", &[("nanogate.io/inject", yes)]),
        )?;
        assert!(out.ok && has_sidecar(&out.stdout)?, "{yes}: {}", out.stderr);
    }
    cp.kubectl(&[
        "label",
        "--overwrite",
        "namespace",
        ns.name(),
        "nanogate.io/injection=enabled",
    ])?;
    wait_injecting(cp, &pod_yaml(ns.name(), "probe", &[])).await?;
    for no in ["false", "no", "No", "DISABLED", "off"] {
        let out = dry_run(cp, &pod_yaml(ns.name(), "p", &[("nanogate.io/inject", no)]))?;
        assert!(out.ok, "{no}: {}", out.stderr);
        assert!(!has_sidecar(&out.stdout)?, "{no} was injected");
        assert!(!out.stderr.contains("Warning"), "{no}: {}", out.stderr);
    }
    let out = dry_run(
        cp,
        &pod_yaml(ns.name(), "p", &[("nanogate.io/inject", "maybe")]),
    )?;
    assert!(out.ok, "{}", out.stderr);
    assert!(!has_sidecar(&out.stdout)?, "\"maybe\" was injected");
    if !out.stderr.contains(
        "Warning: nanogate: sidecar not injected: nanogate.io/inject: \"maybe\" is not understood",
    ) {
        bail!("no warning for \"maybe\": {}", out.stderr);
    }
    Ok(())
}

/// An event whose cause moved on is said again with the new message: the API key's Secret is
/// first missing, then present without the key. (kube's event recorder folds repeats of one
/// reason into a series that keeps its first note, so without care `kubectl describe` would
/// keep telling users to create a Secret that exists.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_cause_changed_is_said_again_with_the_new_message() -> Result<()> {
    let (cp, client, ns) = crd_and_namespace("truth-events").await?;
    // The gateway without its Secret (gateway_yaml's first document is the Secret).
    let yaml = nanogate_e2e::gateway_yaml(ns.name(), "shop", "");
    let gateway = yaml.split("\n---\n").nth(1).context("gateway document")?;
    let out = apply(cp, gateway)?;
    assert!(out.ok, "{}", out.stderr);
    let _operator = reconciler(cp, ns.name())?;
    let notes = |reason: &'static str, text: &'static str| {
        let client = client.clone();
        let ns = ns.name().to_string();
        move || {
            let (client, ns) = (client.clone(), ns.clone());
            async move {
                let events = nanogate_e2e::events_about(&client, &ns, "shop").await?;
                Ok(events
                    .iter()
                    .any(|(r, note)| r == reason && note.contains(text))
                    .then_some(events))
            }
        }
    };
    wait_for(
        "a SecretMissing event saying the Secret is not found",
        Duration::from_secs(30),
        notes("SecretMissing", "not found; create it"),
    )
    .await?;
    // Now the Secret exists, but without the key the gateway names.
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: platform-key, namespace: {}}}\nstringData: {{token: e2e-key}}\n",
        ns.name()
    );
    let out = apply(cp, &secret)?;
    assert!(out.ok, "{}", out.stderr);
    let events = wait_for(
        "a SecretMissing event naming the missing key",
        Duration::from_secs(90),
        notes("SecretMissing", "has no key \"apiKey\""),
    )
    .await?;
    // The first event keeps its own message: it is history, not the current cause.
    assert!(
        events
            .iter()
            .any(|(r, note)| r == "SecretMissing" && note.contains("not found")),
        "{events:?}"
    );
    Ok(())
}

/// A plain-text upstream (here `http://`) is allowed but visible: `UpstreamTLSVerified=False`
/// with reason `PlainText` and a Warning event, both saying what to use instead; switching to
/// `https://` turns the condition `True`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_text_upstream_is_allowed_but_flagged() -> Result<()> {
    let (cp, client, ns) = crd_and_namespace("truth-plain").await?;
    let out = apply_gateway(cp, ns.name(), "shop", "")?;
    assert!(out.ok, "{}", out.stderr);
    let _operator = reconciler(cp, ns.name())?;
    let gateway = || async { get_gateway(cp, ns.name(), "shop") };
    let reason = |gw: &Value| -> Option<(String, String)> {
        nanogate_e2e::status_condition(&gw["status"], "UpstreamTLSVerified")
            .map(|(status, reason, _)| (status, reason))
    };
    wait_for(
        "UpstreamTLSVerified=False PlainText",
        Duration::from_secs(30),
        || async {
            let gw = gateway().await?;
            Ok((reason(&gw) == Some(("False".into(), "PlainText".into()))).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        condition(&gateway().await?, "Ready")
            .map(|(s, _)| s)
            .as_deref(),
        Some("True"),
        "allowed: the gateway still works"
    );
    let note = nanogate_e2e::wait_for_event(
        &client,
        ns.name(),
        "shop",
        "PlainTextUpstream",
        Duration::from_secs(30),
    )
    .await?;
    assert!(
        note.contains("http://127.0.0.1:9") && note.contains("https://"),
        "{note}"
    );

    let out = kubectl(
        cp,
        &[
            "-n",
            ns.name(),
            "patch",
            "agw",
            "shop",
            "--type=merge",
            "-p",
            r#"{"spec":{"upstream":{"url":"https://127.0.0.1:9"}}}"#,
        ],
        "",
    )?;
    assert!(out.ok, "{}", out.stderr);
    wait_for(
        "UpstreamTLSVerified=True",
        Duration::from_secs(30),
        || async {
            let gw = gateway().await?;
            Ok((reason(&gw) == Some(("True".into(), "Verified".into()))).then_some(()))
        },
    )
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Issue 21, point 10: a rotated API key reaches running sidecars without a restart.

/// The sidecar's `nanogate_sidecar_api_key_reloads_total`.
fn api_key_reloads(admin_addr: &str) -> Result<f64> {
    nanogate_e2e::scrape(admin_addr, "nanogate_sidecar_api_key_reloads_total")
}

/// One `publish` of `{"n": n}` through the agent's socket.
fn publish(socket: &std::path::Path, n: u64) -> Result<()> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    let message = serde_json::json!({"msg_type": "publish", "data": {"n": n}});
    stream.write_all(message.to_string().as_bytes())?;
    Ok(())
}

/// Sets the API key in the gateway's Secret to `key`; the stand-in kubelet refreshes the
/// agent's volume (the kubelet's periodic sync).
async fn rotate_key(
    cp: &ControlPlane,
    client: &Client,
    ns: &str,
    agent: &nanogate_e2e::kubelet::LocalSidecar,
    key: &str,
) -> Result<()> {
    let patch = format!("{{\"stringData\":{{\"apiKey\":\"{key}\"}}}}");
    cp.kubectl(&["-n", ns, "patch", "secret", "platform-key", "-p", &patch])?;
    agent.resync_secrets(client).await
}

/// The gateway's API key Secret is updated (and the platform accepts only the new key): the
/// running sidecar's next messages carry the new key, with no restart. The apiserver, the
/// webhook that injects the pod and the reconciler that writes its configuration are real; the
/// sidecar runs under the stand-in kubelet (`nanogate_e2e::kubelet`), whose Secret volume
/// refresh (the kubelet's periodic sync) the test triggers right after the update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_api_key_reaches_the_running_sidecar_without_a_restart() -> Result<()> {
    const OLD: &str = "key-before-rotation";
    const NEW: &str = "key-after-rotation";
    const NEWER: &str = "key-after-the-second-rotation";
    let (cp, client, ns) = crd_and_namespace("rotate").await?;
    let _webhook = serve_webhook(cp, &client, ns.name()).await?;
    let mut operator = reconciler(cp, ns.name())?;
    let platform = nanogate_tests::platform::PlatformServer::start_with_key(OLD).await?;
    let gateway = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: platform-key, namespace: {ns}}}\nstringData: {{apiKey: {OLD}}}\n---\napiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {{name: shop, namespace: {ns}}}\nspec:\n  upstream: {{kind: http, url: \"{url}\", apiKeySecretRef: {{name: platform-key, key: apiKey}}}}\n",
        ns = ns.name(),
        url = platform.url()
    );
    let out = apply(cp, &gateway)?;
    if !out.ok {
        bail!("applying gateway shop: {}", out.stderr);
    }
    wait_for(
        "the reconciler to write the gateway's ConfigMap",
        Duration::from_secs(60),
        || async {
            let maps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
                kube::Api::namespaced(client.clone(), ns.name());
            Ok(maps.get_opt("shop-agent-config").await?.map(|_| ()))
        },
    )
    .await
    .map_err(|e| e.context(operator.log_tail(20)))?;
    let pod = nanogate_e2e::create_injected_pod(&client, ns.name(), "app").await?;
    let mut agent = nanogate_e2e::kubelet::run_sidecar(
        &client,
        &pod,
        &nanogate_e2e::workspace_binary("nano-agent")?,
        &cp.dir().join(format!("pod-{}", ns.name())),
    )
    .await?;
    let key_file = agent
        .container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "TENDRL_KEY_FILE")
        .and_then(|e| e.value.clone());
    assert_eq!(
        key_file.as_deref(),
        Some("/etc/nanogate/api-key/api-key"),
        "the injector mounts the key as a file"
    );
    let pid = agent.process.pid();
    let result = async {
        let socket = agent.socket.clone();
        wait_for("the agent's socket", Duration::from_secs(30), || {
            let socket = socket.clone();
            async move { Ok(std::os::unix::net::UnixStream::connect(&socket).ok().map(|_| ())) }
        })
        .await?;
        publish(&agent.socket, 1)?;
        let arrived = |n: u64| {
            let platform = &platform;
            move || async move {
                Ok(platform
                    .received_with_bearer()
                    .into_iter()
                    .find(|(_, m)| m["data"]["n"] == n)
                    .map(|(bearer, _)| bearer))
            }
        };
        let bearer = wait_for("message 1 at the platform", Duration::from_secs(30), arrived(1)).await?;
        assert_eq!(bearer, OLD, "message 1 came with the key of the time");

        // Rotation: the platform takes the new key only, the Secret is updated, the volume
        // refreshed (the stand-in's kubelet sync).
        platform.rotate_api_key(NEW);
        rotate_key(cp, &client, ns.name(), &agent, NEW).await?;
        let rotated = std::time::Instant::now();
        publish(&agent.socket, 2)?;
        let bearer = wait_for(
            "message 2 at the platform, sent after the rotation",
            Duration::from_secs(30),
            arrived(2),
        )
        .await?;
        let took = rotated.elapsed();
        assert_eq!(bearer, NEW, "message 2 came with the rotated key");
        assert!(agent.process.exited().is_none(), "the agent kept running");
        assert_eq!(agent.process.pid(), pid, "the same agent process");
        let log = std::fs::read_to_string(&agent.process.log)?;
        assert!(log.contains("API key reloaded"), "{log}");
        assert!(
            !log.contains(OLD) && !log.contains(NEW),
            "an API key in the agent's log"
        );
        assert_eq!(api_key_reloads(&agent.admin_addr)?, 1.0);
        let refused = platform.bearers().iter().filter(|b| b.as_str() == OLD).count();
        eprintln!(
            "[rotate] revoked: the rotated key was used {:.1}s after the volume changed; requests with the old key after the rotation refused: {}",
            took.as_secs_f64(),
            refused.saturating_sub(1)
        );

        // A rotation with an overlap (the platform takes both keys for a while): no 401 tells
        // the agent, its periodic re-read (every 5 s by default) finds the new key.
        platform.also_accept(NEWER);
        rotate_key(cp, &client, ns.name(), &agent, NEWER).await?;
        let rotated = std::time::Instant::now();
        let unauthorized = platform.unauthorized();
        let mut n = 2;
        let bearer = wait_for(
            "a message with the newer key, the old one still accepted",
            Duration::from_secs(20),
            || {
                n += 1;
                let sent = publish(&agent.socket, n);
                let platform = &platform;
                async move {
                    sent?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(platform
                        .received_with_bearer()
                        .into_iter()
                        .any(|(bearer, _)| bearer == NEWER)
                        .then_some(()))
                }
            },
        )
        .await;
        bearer?;
        let took = rotated.elapsed();
        assert_eq!(
            platform.unauthorized(),
            unauthorized,
            "nothing was refused: the periodic re-read found the key"
        );
        assert!(
            took < Duration::from_secs(8),
            "the newer key was used only after {took:?} (re-read every 5 s)"
        );
        assert_eq!(api_key_reloads(&agent.admin_addr)?, 2.0);
        assert!(agent.process.exited().is_none(), "the agent kept running");
        eprintln!(
            "[rotate] overlapping: the newer key was used {:.1}s after the volume changed (periodic re-read, no 401)",
            took.as_secs_f64()
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if result.is_err() {
        eprintln!("nano-agent log:\n{}", agent.process.log_tail(30));
    }
    agent.process.stop();
    operator.stop();
    result
}

/// Issue 18: whoever may edit a gateway cannot choose what runs next to every pod. An image the
/// operator does not allow is refused at `kubectl apply` naming `spec.sidecar.image`; one that
/// got in while the webhook was down is `ConfigValid=False` and injects nothing; an allowed
/// image, the operator's own and none at all are accepted, and each pod gets the image its
/// gateway resolves to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_image_the_operator_does_not_allow_is_refused_and_never_injected() -> Result<()> {
    let (cp, client, ns) = crd_and_namespace("truth-image").await?;
    let evil = "  sidecar: {image: \"evil.example/miner:1\"}\n";
    // The reconciler binary with its default policy: this release's image only.
    let _operator = reconciler(cp, ns.name())?;
    let out = apply_gateway(cp, ns.name(), "sneaked", evil)?;
    assert!(
        out.ok,
        "no webhook yet, the schema lets it in: {}",
        out.stderr
    );
    let message = config_invalid_message(cp, ns.name(), "sneaked").await?;
    assert!(
        message.contains("spec.sidecar.image (\"evil.example/miner:1\")"),
        "{message}"
    );

    let allowed = "registry.example/acme/nano-agent:";
    let _webhook = serve_webhook_allowing(cp, &client, ns.name(), &[allowed]).await?;
    // The gateway that got in injects nothing; its pods are told why.
    let pod = pod_yaml(
        ns.name(),
        "app",
        &[
            ("nanogate.io/inject", "true"),
            ("nanogate.io/gateway", "sneaked"),
        ],
    );
    let warned = wait_invalid_warning(cp, "the webhook to call sneaked invalid", &pod).await?;
    println!("sneaked pod: {}", warned.stderr.trim());
    assert!(
        warned.stderr.contains("spec.sidecar.image"),
        "{}",
        warned.stderr
    );
    assert_eq!(sidecar_image(&warned.stdout)?, None);

    // Refused at apply, naming the field and what to do.
    let out = apply_gateway(cp, ns.name(), "refused", evil)?;
    println!("refused: {}", out.stderr.trim());
    assert!(!out.ok, "accepted: {}", out.stdout);
    assert!(
        out.stderr.contains("denied the request")
            && out
                .stderr
                .contains("spec.sidecar.image (\"evil.example/miner:1\")")
            && out.stderr.contains("remove the field")
            && out.stderr.contains("--allowed-sidecar-images"),
        "{}",
        out.stderr
    );

    // Accepted: an allowed image, the operator's own, none. Each pod gets its gateway's image.
    let own = nanogate_operator::crd::DEFAULT_SIDECAR_IMAGE;
    for (name, spec, injected) in [
        (
            "mirrored",
            "  sidecar: {image: \"registry.example/acme/nano-agent:2.0\"}\n".to_string(),
            "registry.example/acme/nano-agent:2.0",
        ),
        ("own", format!("  sidecar: {{image: {own:?}}}\n"), own),
        ("plain", String::new(), own),
    ] {
        let out = apply_gateway(cp, ns.name(), name, &spec)?;
        assert!(out.ok, "{name}: {}", out.stderr);
        let pod = pod_yaml(
            ns.name(),
            &format!("app-{name}"),
            &[
                ("nanogate.io/inject", "true"),
                ("nanogate.io/gateway", name),
            ],
        );
        let image = wait_for(
            &format!("a dry-run pod of {name} to be injected"),
            Duration::from_secs(30),
            || async {
                let out = dry_run(cp, &pod)?;
                Ok(if out.ok {
                    sidecar_image(&out.stdout)?
                } else {
                    None
                })
            },
        )
        .await?;
        assert_eq!(image, injected, "{name}");
    }
    Ok(())
}
