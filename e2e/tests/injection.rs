//! The admission webhook (issue 5) on the real apiserver, registered by URL: the operator's
//! servers run in-process (certificates from its own CA, `caBundle` patched by the operator),
//! and the apiserver calls them for every pod created in the test's namespace.
//!
//! Each test scopes its webhook configurations to its own namespace (a namespace selector on a
//! per-test label), so tests running in parallel on the shared control plane never meet.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{DynamicObject, ListParams, PostParams};
use kube::{Api, Client};
use nanogate_e2e::{ControlPlane, TestNamespace, wait_for};
use nanogate_operator::ServerOptions;
use nanogate_operator::shutdown;
use serde_json::{Value, json};

const SELECTOR_LABEL: &str = "nanogate.io/e2e-webhook";

fn gateway(name: &str, extra_batching: Value) -> Result<DynamicObject> {
    let mut batching = json!({"flushInterval": "250ms"});
    if let (Some(b), Some(extra)) = (batching.as_object_mut(), extra_batching.as_object()) {
        b.extend(extra.clone());
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "nanogate.io/v1alpha1",
        "kind": "AgentGateway",
        "metadata": {"name": name},
        "spec": {
            "upstream": {"kind": "http", "url": "http://127.0.0.1:9", "apiKeySecretRef": {"name": "platform-key", "key": "apiKey"}},
            "batching": batching,
            "heartbeatInterval": "1s"
        }
    }))?)
}

fn app_pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": {"nanogate.io/inject": "true"}, "labels": {"app": "shop"}},
        "spec": {"containers": [{"name": "shop", "image": "python:3.12-slim", "env": [{"name": "MODE", "value": "demo"}]}]}
    }))?)
}

fn sidecar(pod: &Pod) -> Option<&Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == "nano-agent")
}

/// Everything a test needs: namespaces, webhook registered and served, a valid gateway.
/// The sidecar runs as non-root, without privilege escalation, on a read-only root filesystem.
fn assert_non_root_read_only(sc: &k8s_openapi::api::core::v1::SecurityContext) {
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
}

/// Waits up to `secs` (for `what`) for a pod labelled `selector` that `pick` accepts.
async fn wait_pod(
    pods: &Api<Pod>,
    selector: &str,
    what: &str,
    secs: u64,
    pick: impl Fn(&Pod) -> bool,
) -> Result<Pod> {
    wait_for(what, Duration::from_secs(secs), || async {
        let list = pods.list(&ListParams::default().labels(selector)).await?;
        Ok(list.items.into_iter().find(|p| pick(p)))
    })
    .await
}

struct Setup {
    ns: TestNamespace,
    operator_ns: TestNamespace,
    _stop: shutdown::Trigger,
    client: Client,
}

async fn setup(cp: &ControlPlane, prefix: &str) -> Result<Setup> {
    setup_with(cp, prefix, ServerOptions::default().webhook_cert_validity).await
}

/// Labels `ns` for the webhooks' selector and registers webhook configurations (named
/// `nanogate-<ns>`, with `failure_policy`) for it, calling a free loopback port; (port, name).
fn scoped_webhooks(
    cp: &ControlPlane,
    ns: &TestNamespace,
    failure_policy: &str,
) -> Result<(u16, String)> {
    let port = nanogate_e2e::free_port()?;
    let name = format!("nanogate-{}", ns.name());
    nanogate_e2e::register_webhooks(cp, SELECTOR_LABEL, ns.name(), &name, port, failure_policy)?;
    Ok((port, name))
}

/// [`setup`] with the serving certificate's lifetime.
async fn setup_with(cp: &ControlPlane, prefix: &str, cert_validity: Duration) -> Result<Setup> {
    nanogate_e2e::install_crd(cp)?;
    let client = cp.client().await?;
    let operator_ns = TestNamespace::create(&client, &format!("{prefix}-op")).await?;
    // The namespace's name is random; label it for the webhooks' selector once it exists.
    let ns = TestNamespace::create(&client, prefix).await?;
    let (port, config_name) = scoped_webhooks(cp, &ns, "Fail")?;

    let opts = ServerOptions {
        operator_namespace: operator_ns.name().to_string(),
        webhook_addr: Some(format!("127.0.0.1:{port}").parse()?),
        webhook_service: "nanogate-webhook".into(),
        mutating_webhook_configs: vec![config_name.clone()],
        validating_webhook_configs: vec![config_name],
        extra_sans: vec!["127.0.0.1".into()],
        hub_addr: None,
        hub_advertise: "127.0.0.1:7051".into(),
        status_interval: Duration::from_secs(5),
        native_sidecars: None,
        webhook_cert_dir: None,
        webhook_cert_validity: cert_validity,
        ..ServerOptions::default()
    };
    let stop = nanogate_e2e::start_servers(&client, &opts).await?;

    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "platform-key"},
        "stringData": {"apiKey": "e2e-key"}
    }))?;
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns.name())
        .create(&PostParams::default(), &secret)
        .await?;
    nanogate_e2e::agentgateways(&client, ns.name())
        .create(&PostParams::default(), &gateway("shop", json!({}))?)
        .await?;

    nanogate_e2e::wait_for_injection(&client, ns.name(), &app_pod("probe")?).await?;
    Ok(Setup {
        ns,
        operator_ns,
        _stop: stop,
        client,
    })
}

#[tokio::test]
async fn deployment_pods_are_injected_as_stored_by_the_apiserver() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let s = setup(cp, "inject").await?;
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "shop"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "shop"}},
            "template": {
                "metadata": {"labels": {"app": "shop"}, "annotations": {"nanogate.io/inject": "true", "nanogate.io/gateway": "shop"}},
                "spec": {
                    "initContainers": [{"name": "migrate", "image": "python:3.12-slim"}],
                    "containers": [{"name": "shop", "image": "python:3.12-slim"}]
                }
            }
        }
    }))?;
    Api::<Deployment>::namespaced(s.client.clone(), s.ns.name())
        .create(&PostParams::default(), &deployment)
        .await?;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), s.ns.name());
    let stored = wait_for("2 injected pods", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app=shop")).await?;
            Ok((list.items.len() == 2).then_some(list.items))
        }
    })
    .await?;
    for pod in &stored {
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        assert!(
            annotations.contains_key("nanogate.io/injected"),
            "injected annotation: {annotations:?}"
        );
        let agent = sidecar(pod).context("nano-agent container stored by the apiserver")?;
        let security = agent
            .security_context
            .clone()
            .context("sidecar securityContext")?;
        assert_non_root_read_only(&security);
        assert_eq!(
            security.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(
            security.seccomp_profile.map(|p| p.type_),
            Some("RuntimeDefault".to_string())
        );
        let env = agent.env.clone().unwrap_or_default();
        let key = env
            .iter()
            .find(|e| e.name == "TENDRL_KEY")
            .context("TENDRL_KEY env")?;
        assert!(
            key.value.is_none(),
            "the API key comes from the Secret, never inline"
        );
        // And as a file of a read-only Secret volume holding that one key (rotation).
        let file = env
            .iter()
            .find(|e| e.name == "TENDRL_KEY_FILE")
            .and_then(|e| e.value.clone());
        assert_eq!(file.as_deref(), Some("/etc/nanogate/api-key/api-key"));
        let mount = agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/etc/nanogate/api-key")
            .context("API key mount")?;
        assert_eq!(mount.read_only, Some(true));
        let volume = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .and_then(|v| v.iter().find(|v| v.name == mount.name))
            .and_then(|v| v.secret.clone())
            .context("API key Secret volume")?;
        let items = volume.items.unwrap_or_default();
        assert_eq!(items.len(), 1, "only the API key of the Secret: {items:?}");
        assert_eq!(items[0].path, "api-key");
        let spec = pod.spec.as_ref().context("spec")?;
        // 1.20 has no native sidecars: the agent is a regular container placed first.
        assert_eq!(
            spec.containers[0].name, "nano-agent",
            "legacy mode puts the agent first"
        );
        for app in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .filter(|c| c.name != "nano-agent")
        {
            let app_env = app.env.clone().unwrap_or_default();
            assert!(
                app_env.iter().any(|e| e.name == "TENDRL_SOCKET_PATH"),
                "{} gets TENDRL_SOCKET_PATH",
                app.name
            );
            let mounts = app.volume_mounts.clone().unwrap_or_default();
            assert!(
                mounts.iter().any(|m| m.mount_path == "/var/lib/tendrl"),
                "{} mounts the socket dir",
                app.name
            );
        }
    }
    // The pods had no name at admission, so the decision is recorded on their owner (the
    // ReplicaSet), worded as a decision: the webhook cannot know the apiserver stored them.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(s.client.clone(), s.ns.name());
    let injected = wait_for(
        "InjectionDecided events on the ReplicaSet",
        Duration::from_secs(20),
        || {
            let events = events.clone();
            async move {
                let list = events.list(&ListParams::default()).await?;
                let found: Vec<_> = list
                    .items
                    .into_iter()
                    .filter(|e| e.reason.as_deref() == Some("InjectionDecided"))
                    .filter(|e| {
                        e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("ReplicaSet")
                    })
                    .collect();
                Ok((!found.is_empty()).then_some(found))
            }
        },
    )
    .await?;
    let note = injected[0].note.clone().unwrap_or_default();
    assert!(
        note.contains("will be injected") && note.contains("gateway shop"),
        "event says which gateway: {note}"
    );
    Ok(())
}

#[tokio::test]
async fn the_same_pod_created_twice_is_identical_and_reinjection_is_a_no_op() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let s = setup(cp, "idem").await?;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), s.ns.name());
    let first = pods
        .create(&PostParams::default(), &app_pod("twin-a")?)
        .await?;
    let second = pods
        .create(&PostParams::default(), &app_pod("twin-b")?)
        .await?;
    let spec = |p: &Pod| serde_json::to_value(&p.spec).unwrap_or_default();
    assert_eq!(
        spec(&first),
        spec(&second),
        "identical input pods give identical stored pods"
    );

    // Feeding the stored (already injected) pod back through the webhook changes nothing.
    let mut again = first.clone();
    again.metadata = kube::api::ObjectMeta {
        name: Some("twin-c".into()),
        annotations: first.metadata.annotations.clone(),
        labels: first.metadata.labels.clone(),
        ..Default::default()
    };
    let third = pods.create(&PostParams::default(), &again).await?;
    assert_eq!(spec(&third), spec(&first), "re-injection is a no-op");
    let containers = third
        .spec
        .as_ref()
        .map(|s| s.containers.len())
        .unwrap_or_default();
    assert_eq!(containers, 2, "still exactly one sidecar");
    Ok(())
}

#[tokio::test]
async fn opted_out_pods_are_left_alone_and_invalid_gateways_are_denied() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let s = setup(cp, "optout").await?;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), s.ns.name());
    let mut pod = app_pod("opted-out")?;
    pod.metadata.annotations =
        Some([("nanogate.io/inject".to_string(), "false".to_string())].into());
    let stored = pods.create(&PostParams::default(), &pod).await?;
    assert!(sidecar(&stored).is_none());

    let bad = gateway("bad", json!({"minBatchSize": 300, "maxBatchSize": 200}))?;
    let error = nanogate_e2e::agentgateways(&s.client, s.ns.name())
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("minBatchSize > maxBatchSize is refused");
    let text = error.to_string();
    assert!(
        text.contains("minBatchSize"),
        "the message names the field: {text}"
    );
    Ok(())
}

/// `failurePolicy: Ignore` with the webhook down: the pod is admitted without a sidecar. Once
/// the operator runs, the gateway's status counts it (`notInjected`) and an event names it;
/// `nanogate.io/repair: rollout` on the gateway restarts its Deployment, whose new pod is
/// injected.
#[tokio::test]
async fn webhook_down_with_ignore_admits_uninjected_pods_which_are_reported_and_repaired()
-> Result<()> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    nanogate_e2e::install_crd(cp)?;
    let operator_ns = TestNamespace::create(&client, "down-op").await?;
    let ns = TestNamespace::create(&client, "down").await?;
    // Nothing listens on this port yet.
    let (port, name) = scoped_webhooks(cp, &ns, "Ignore")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let stored = pods
        .create(&PostParams::default(), &app_pod("unserved")?)
        .await?;
    assert!(sidecar(&stored).is_none(), "admitted, not injected");
    pods.delete("unserved", &Default::default()).await?;
    nanogate_e2e::apply_yaml(
        cp.kubeconfig_path(),
        &format!(
            "{}---\n{}",
            nanogate_e2e::gateway_yaml(ns.name(), "shop", ""),
            nanogate_e2e::deployment_yaml(
                ns.name(),
                "web",
                1,
                true,
                r#"{nanogate.io/inject: "true"}"#,
                "      - {name: web, image: \"python:3.12-slim\"}\n",
            )
        ),
    )?;
    let first = wait_for("the Deployment's pod", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app=web")).await?;
            Ok(list.items.into_iter().next())
        }
    })
    .await?;
    assert!(
        sidecar(&first).is_none(),
        "created while the webhook was down"
    );
    let first_name = first.metadata.name.clone().context("pod name")?;

    // The operator comes up (controller + webhook on the registered port).
    let operator = nanogate_e2e::spawn_operator(
        cp,
        "nanogate-operator",
        &[
            "run".into(),
            format!("--admin-addr=127.0.0.1:{}", nanogate_e2e::free_port()?),
            format!("--namespace={}", ns.name()),
            "--leader-elect=false".into(),
            format!("--operator-namespace={}", operator_ns.name()),
            format!("--webhook-addr=127.0.0.1:{port}"),
            format!("--mutating-webhook-configs={name}"),
            format!("--validating-webhook-configs={name}"),
            "--extra-sans=127.0.0.1".into(),
        ],
        &[],
    )?;
    let gateways = nanogate_e2e::agentgateways(&client, ns.name());
    let counts = wait_for(
        "the uninjected pod counted in the gateway status",
        Duration::from_secs(30),
        || {
            let gateways = gateways.clone();
            async move {
                let sidecars = gateways.get("shop").await?.data["status"]["sidecars"].clone();
                Ok((sidecars["notInjected"] == 1).then_some(sidecars))
            }
        },
    )
    .await
    .map_err(|e| e.context(operator.log_tail(20)))?;
    assert_eq!(counts["expected"], 1, "{counts}");
    let note = nanogate_e2e::wait_for_event(
        &client,
        ns.name(),
        "shop",
        "PodsNotInjected",
        Duration::from_secs(20),
    )
    .await?;
    assert!(note.contains(&first_name), "names the pod: {note}");
    assert!(
        note.contains("nanogate.io/repair=rollout"),
        "says what to do: {note}"
    );

    // Opt in to repair: the operator restarts the Deployment; its new pod gets the sidecar.
    cp.kubectl(&[
        "annotate",
        "agw",
        "shop",
        "-n",
        ns.name(),
        "nanogate.io/repair=rollout",
    ])?;
    let replacement = wait_pod(&pods, "app=web", "an injected replacement pod", 60, |p| {
        sidecar(p).is_some()
    })
    .await
    .map_err(|e| e.context(operator.log_tail(20)))?;
    let restarted = nanogate_e2e::events_about(&client, ns.name(), "shop")
        .await?
        .into_iter()
        .find(|(reason, _)| reason == "RolloutRestarted")
        .context("a RolloutRestarted event")?;
    assert!(restarted.1.contains("Deployment web"), "{}", restarted.1);
    let template = Api::<Deployment>::namespaced(client.clone(), ns.name())
        .get("web")
        .await?
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    assert!(
        template.contains_key("nanogate.io/restartedAt"),
        "{template:?}"
    );
    wait_for("notInjected back to 0", Duration::from_secs(30), || {
        let gateways = gateways.clone();
        async move {
            let sidecars = gateways.get("shop").await?.data["status"]["sidecars"].clone();
            Ok((sidecars["notInjected"] == 0 && sidecars["expected"] == 1).then_some(()))
        }
    })
    .await?;
    eprintln!(
        "[injection] {first_name} admitted without sidecar → reported → Deployment restarted → {} injected",
        replacement.metadata.name.unwrap_or_default()
    );
    Ok(())
}

/// The serving certificate rotates (every ~4 s here: 156 s validity, 5 min backdated, renewed
/// at two thirds) while 200 pods are created through the apiserver with `failurePolicy: Fail`:
/// every creation succeeds and is injected.
#[tokio::test]
async fn certificate_rotation_during_200_pod_creations_fails_none() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let s = setup_with(cp, "rotate", Duration::from_secs(156)).await?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(s.client.clone(), s.operator_ns.name());
    // Record every serving certificate the operator writes while the pods are created.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let recorder = tokio::spawn({
        let (secrets, seen) = (secrets.clone(), seen.clone());
        async move {
            loop {
                if let Ok(Some(secret)) = secrets.get_opt("nanogate-webhook-certs").await
                    && let Some(cert) = secret.data.and_then(|d| d.get("tls.crt").cloned())
                {
                    seen.lock().unwrap().insert(cert.0);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), s.ns.name());
    let started = std::time::Instant::now();
    let (mut failures, mut uninjected) = (Vec::new(), 0);
    for i in 0..200 {
        match pods
            .create(&PostParams::default(), &app_pod(&format!("rot-{i}"))?)
            .await
        {
            Ok(pod) if sidecar(&pod).is_some() => {}
            Ok(_) => uninjected += 1,
            Err(error) => failures.push(format!("rot-{i}: {error}")),
        }
        // ~15 s in all: several rotations happen in the middle of the stream.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let elapsed = started.elapsed();
    recorder.abort();
    let certificates = seen.lock().unwrap().len();
    eprintln!(
        "[injection] 200 pods in {:.1}s across {certificates} serving certificates: {} failed, {uninjected} uninjected",
        elapsed.as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "failed admissions: {failures:?}");
    assert_eq!(uninjected, 0);
    assert!(
        certificates >= 3,
        "the certificate rotated at least twice during the stream (saw {certificates})"
    );
    Ok(())
}

/// The Pod Security "restricted" rules, enforced by the apiserver itself. Kubernetes 1.20 has
/// no Pod Security admission yet (1.23+), so this control plane runs the admission plugin of
/// its time, PodSecurityPolicy, with the upstream "restricted" policy: non-root, no privilege
/// escalation, all capabilities dropped, RuntimeDefault seccomp, safe volume types only. Its
/// validation runs after mutating webhooks, so it judges the pod with our sidecar in it.
#[tokio::test]
async fn injected_pods_pass_the_restricted_policy_enforced_by_the_apiserver() -> Result<()> {
    let cp = ControlPlane::start_with(&["--enable-admission-plugins=PodSecurityPolicy"]).await?;
    nanogate_e2e::apply_yaml(
        cp.kubeconfig_path(),
        r#"apiVersion: policy/v1beta1
kind: PodSecurityPolicy
metadata:
  name: restricted
  annotations:
    seccomp.security.alpha.kubernetes.io/allowedProfileNames: runtime/default
    seccomp.security.alpha.kubernetes.io/defaultProfileName: runtime/default
spec:
  privileged: false
  allowPrivilegeEscalation: false
  requiredDropCapabilities: [ALL]
  volumes: [configMap, emptyDir, projected, secret, downwardAPI, persistentVolumeClaim]
  hostNetwork: false
  hostIPC: false
  hostPID: false
  runAsUser: {rule: MustRunAsNonRoot}
  seLinux: {rule: RunAsAny}
  supplementalGroups: {rule: MustRunAs, ranges: [{min: 1, max: 65535}]}
  fsGroup: {rule: MustRunAs, ranges: [{min: 1, max: 65535}]}
"#,
    )?;
    let s = setup(&cp, "restricted").await?;
    cp.kubectl(&[
        "label",
        "namespace",
        s.ns.name(),
        "pod-security.kubernetes.io/enforce=restricted",
    ])?;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), s.ns.name());
    // The policy is enforced: a privileged container is refused.
    let privileged: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "privileged", "annotations": {"nanogate.io/inject": "false"}},
        "spec": {"containers": [{"name": "x", "image": "busybox",
                                  "securityContext": {"privileged": true}}]}
    }))?;
    let refused = pods
        .create(&PostParams::default(), &privileged)
        .await
        .expect_err("a privileged pod violates the restricted policy");
    assert!(
        refused.to_string().contains("PodSecurityPolicy"),
        "{refused}"
    );
    // Our injected pod is admitted with its sidecar, under that policy.
    let stored = pods
        .create(&PostParams::default(), &app_pod("restricted-app")?)
        .await?;
    let sidecar = sidecar(&stored).context("admitted with the sidecar")?;
    let policy = stored
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("kubernetes.io/psp"))
        .cloned();
    assert_eq!(
        policy.as_deref(),
        Some("restricted"),
        "admitted by the restricted policy"
    );
    let sc = sidecar
        .security_context
        .as_ref()
        .context("securityContext")?;
    assert_non_root_read_only(sc);
    eprintln!(
        "[injection] restricted policy: privileged pod refused, injected pod admitted ({})",
        stored.metadata.name.unwrap_or_default()
    );
    Ok(())
}

/// The README's opt-in of an existing workload: `kubectl patch deployment … -p` with the
/// annotation, or with the label `nanogate.io/inject: "true"` alone (what the chart's
/// `webhook.inject.labelledPodsOnly` selects), starts a rollout whose new pod is injected.
#[tokio::test]
async fn patching_a_deployments_pod_template_with_the_annotation_or_the_label_injects_it()
-> Result<()> {
    let cp = ControlPlane::shared().await?;
    let s = setup(cp, "patch").await?;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), s.ns.name());
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), s.ns.name());
    for (app, patch) in [
        (
            "by-annotation",
            r#"{"spec":{"template":{"metadata":{"annotations":{"nanogate.io/inject":"true"}}}}}"#,
        ),
        (
            "by-label",
            r#"{"spec":{"template":{"metadata":{"labels":{"nanogate.io/inject":"true"}}}}}"#,
        ),
    ] {
        let deployment: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": app},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": app}},
                "template": {
                    "metadata": {"labels": {"app": app}},
                    "spec": {"containers": [{"name": "app", "image": "python:3.12-slim"}]}
                }
            }
        }))?;
        deployments
            .create(&PostParams::default(), &deployment)
            .await?;
        let selector = format!("app={app}");
        let first = wait_pod(&pods, &selector, "the Deployment's first pod", 30, |_| true).await?;
        assert!(sidecar(&first).is_none(), "{app}: not opted in yet");
        cp.kubectl(&["patch", "deployment", app, "-n", s.ns.name(), "-p", patch])?;
        let injected = wait_pod(
            &pods,
            &selector,
            "an injected pod of the rollout",
            60,
            |p| sidecar(p).is_some(),
        )
        .await?;
        let annotations = injected.metadata.annotations.clone().unwrap_or_default();
        assert!(
            annotations.contains_key("nanogate.io/injected"),
            "{app}: {annotations:?}"
        );
    }
    Ok(())
}

/// Per-pod overrides through the real apiserver: a pod annotated with another admin port and
/// log level gets them in its stored sidecar (container port, probes, env); a pod whose app
/// declares the admin port gets no sidecar, and the annotation on it says which to set.
#[tokio::test]
async fn per_pod_admin_port_and_log_level_reach_the_sidecar_and_a_port_clash_is_told() -> Result<()>
{
    let cp = ControlPlane::shared().await?;
    let s = setup(cp, "adminport").await?;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), s.ns.name());
    let app_on_9091 = |name: &str, annotations: Value| -> Result<Pod> {
        let mut annotations = annotations;
        annotations["nanogate.io/inject"] = json!("true");
        Ok(serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"containers": [{"name": "shop", "image": "python:3.12-slim",
                "ports": [{"name": "metrics", "containerPort": 9091}]}]}
        }))?)
    };

    let moved = pods
        .create(
            &PostParams::default(),
            &app_on_9091(
                "moved",
                json!({"nanogate.io/sidecar-admin-port": "9095", "nanogate.io/sidecar-log-level": "debug"}),
            )?,
        )
        .await?;
    let agent = sidecar(&moved).context("the annotated pod got a sidecar")?;
    let env = |name: &str| {
        agent
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(env("NANOGATE_ADMIN_PORT").as_deref(), Some("9095"));
    assert_eq!(env("NANOGATE_LOG_LEVEL").as_deref(), Some("debug"));
    let ports: Vec<_> = agent
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(ports, [("nanogate-admin".to_string(), 9095)]);
    // A startup probe exists in native mode only (the control plane's version decides).
    let startup = agent.startup_probe.as_ref().map(|_| &agent.startup_probe);
    for (kind, probe) in [
        ("liveness", &agent.liveness_probe),
        ("readiness", &agent.readiness_probe),
    ]
    .into_iter()
    .chain(startup.map(|p| ("startup", p)))
    {
        let port = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|h| h.port.clone());
        assert_eq!(
            port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9095)),
            "{kind} probe"
        );
    }

    let clash = pods
        .create(&PostParams::default(), &app_on_9091("clash", json!({}))?)
        .await?;
    assert!(
        sidecar(&clash).is_none(),
        "no sidecar next to an app on 9091"
    );
    let why = clash
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("nanogate.io/injection-skipped"))
        .cloned()
        .unwrap_or_default();
    assert!(
        why.contains("declares port 9091")
            && why.contains("nanogate.io/sidecar-admin-port: \"9092\""),
        "the pod is told what to do: {why:?}"
    );
    Ok(())
}
