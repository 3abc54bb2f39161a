//! The Helm chart `charts/nanogate` with the real Helm engine (helm-python-sdk, through
//! `e2e/scripts/helm.py`) and the real apiserver: lint, render with default values, with every
//! optional feature on and in local-development mode, server-side dry-run of every rendered
//! object, schema rejections, the CRD copy, the dashboard's metric names, and a real
//! install → upgrade → uninstall that leaves nothing behind but the CRD.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nanogate_e2e::{ControlPlane, TestNamespace, free_port, helm, wait_for, workspace_root};
use serde_json::Value;

const CHART: &str = "charts/nanogate";
const ALL_FEATURES: &str = "e2e/tests/fixtures/chart-all-features.yaml";
const LOCAL_DEVELOPMENT: &str = "e2e/tests/fixtures/chart-local-development.yaml";
/// Kinds whose CRDs (Prometheus Operator, cert-manager) the test apiserver does not serve; the
/// dry-run skips them when their API group is not served and the test checks them by structure.
const OPTIONAL_CRD_KINDS: &[&str] = &[
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
    "Certificate",
    "Issuer",
];
/// The alerting rules: the PrometheusRule's spec, and what promtool tests.
const ALERTS: &str = "charts/nanogate/files/alerts.yaml";
const ALERTS_TEST: &str = "e2e/alerts/alerts_test.yaml";
const PROMTOOL: &str = "/usr/bin/promtool";

fn chart() -> String {
    path_str(&workspace_root().join(CHART))
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

/// A values file: `base` (a fixture, or nothing) with `overrides` merged over it.
struct ValuesFile(PathBuf);

impl ValuesFile {
    fn new(base: Option<&str>, overrides: Value) -> Result<Self> {
        let mut values = match base {
            Some(rel) => {
                let text = std::fs::read_to_string(workspace_root().join(rel))?;
                serde_yaml::from_str::<Value>(&text)?
            }
            None => Value::Object(Default::default()),
        };
        merge(&mut values, overrides);
        let path = std::env::temp_dir().join(format!(
            "nanogate-chart-values-{}-{:08x}.yaml",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&path, serde_yaml::to_string(&values)?)?;
        Ok(Self(path))
    }

    fn path(&self) -> String {
        path_str(&self.0)
    }
}

impl Drop for ValuesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Whether `o` is a `helm test` hook (created by `helm test`, not by install or upgrade).
fn is_test_hook(o: &Value) -> bool {
    o["metadata"]["annotations"]["helm.sh/hook"]
        .as_str()
        .is_some_and(|h| h.split(',').any(|h| h.trim() == "test"))
}

/// Renders the chart; returns every object `helm install` creates (documents in template
/// order; the `helm test` hooks are left out, see [`render_all`]) and NOTES.txt.
fn render(
    kubeconfig: &Path,
    release: &str,
    ns: &str,
    values: &str,
) -> Result<(Vec<Value>, String)> {
    let (objects, notes) = render_all(kubeconfig, release, ns, values)?;
    Ok((
        objects.into_iter().filter(|o| !is_test_hook(o)).collect(),
        notes,
    ))
}

/// [`render`] with the `helm test` hooks.
fn render_all(
    kubeconfig: &Path,
    release: &str,
    ns: &str,
    values: &str,
) -> Result<(Vec<Value>, String)> {
    let out = helm(
        kubeconfig,
        &["render", &chart(), release, ns, "--values", values],
    )?;
    let files = out.as_object().context("render returns a map of files")?;
    let mut objects = Vec::new();
    let mut notes = String::new();
    for (file, text) in files {
        let text = text.as_str().context("rendered file is a string")?;
        if file.ends_with("NOTES.txt") {
            notes = text.to_string();
            continue;
        }
        for doc in split_documents(text) {
            let value: Value =
                serde_yaml::from_str(&doc).with_context(|| format!("parsing {file}"))?;
            if !value.is_null() {
                objects.push(value);
            }
        }
    }
    Ok((objects, notes))
}

/// The documents of a multi-document YAML text (separated by `---` lines).
fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs
}

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or_default()
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

fn find<'a>(objects: &'a [Value], k: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| kind(o) == k).collect()
}

fn one<'a>(objects: &'a [Value], k: &str) -> Result<&'a Value> {
    let found = find(objects, k);
    ensure!(found.len() == 1, "expected one {k}, found {}", found.len());
    Ok(found[0])
}

fn service<'a>(objects: &'a [Value], suffix: &str) -> Result<&'a Value> {
    find(objects, "Service")
        .into_iter()
        .find(|s| name(s).ends_with(suffix))
        .with_context(|| format!("no Service named *{suffix}"))
}

/// Applies the CRD for real (the chart installs it from `crds/`, which rendering skips).
fn apply_crd(kubeconfig: &Path) -> Result<()> {
    let crd = workspace_root().join(CHART).join("crds/agentgateway.yaml");
    nanogate_e2e::apply_yaml_file(kubeconfig, &crd)?;
    nanogate_e2e::run_kubectl(
        kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/agentgateways.nanogate.io",
        ],
    )?;
    Ok(())
}

fn served_api_versions(kubeconfig: &Path) -> Result<BTreeSet<String>> {
    Ok(nanogate_e2e::run_kubectl(kubeconfig, &["api-versions"])?
        .lines()
        .map(str::to_string)
        .collect())
}

/// `podDisruptionBudget.apiVersion` for offline rendering against this apiserver (what
/// `helm template --api-versions` does; a real install discovers it by itself).
fn pdb_api_version(served: &BTreeSet<String>) -> &'static str {
    if served.contains("policy/v1") {
        "policy/v1"
    } else {
        "policy/v1beta1"
    }
}

/// What the render-and-dry-run tests start from: the shared apiserver (its kubeconfig) with
/// the CRD applied, a fresh namespace, and the API versions the apiserver serves.
async fn render_env(prefix: &str) -> Result<(&'static Path, TestNamespace, BTreeSet<String>)> {
    let cp = ControlPlane::shared().await?;
    let ns = TestNamespace::create(&cp.client().await?, prefix).await?;
    let kubeconfig = cp.kubeconfig_path();
    apply_crd(kubeconfig)?;
    Ok((kubeconfig, ns, served_api_versions(kubeconfig)?))
}

/// Overrides that pin the PodDisruptionBudget's API version to what this apiserver serves.
fn pdb_values(served: &BTreeSet<String>) -> Value {
    serde_json::json!({"podDisruptionBudget": {"apiVersion": pdb_api_version(served)}})
}

/// `kubectl apply --dry-run=server` of every object the apiserver can serve; returns the
/// kinds skipped because their API group is not served.
fn dry_run(kubeconfig: &Path, objects: &[Value], served: &BTreeSet<String>) -> Result<Vec<String>> {
    let mut skipped = Vec::new();
    let mut docs = Vec::new();
    for o in objects {
        let api_version = o["apiVersion"].as_str().unwrap_or_default();
        if !served.contains(api_version) {
            ensure!(
                OPTIONAL_CRD_KINDS.contains(&kind(o)),
                "{} {} uses {api_version}, which the apiserver does not serve",
                kind(o),
                name(o)
            );
            skipped.push(kind(o).to_string());
            continue;
        }
        docs.push(serde_yaml::to_string(o)?);
    }
    let file = std::env::temp_dir().join(format!(
        "nanogate-chart-dry-run-{}-{:08x}.yaml",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::write(&file, docs.join("---\n"))?;
    let out = nanogate_e2e::server_dry_run(kubeconfig, &file);
    let _ = std::fs::remove_file(&file);
    let out = out?;
    let accepted = out.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(
        accepted,
        docs.len(),
        "the apiserver accepted {accepted} of {} objects:\n{out}",
        docs.len()
    );
    Ok(skipped)
}

fn args(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn has_arg(args: &[String], arg: &str) -> bool {
    args.iter().any(|a| a == arg)
}

/// Assertions shared by every rendering: webhook settings (`failure_policies` of the pod
/// injector and of the AgentGateway validator), no generated certificate material,
/// least-privilege RBAC.
fn check_common(objects: &[Value], ns: &str, failure_policies: [&str; 2]) -> Result<()> {
    for o in objects {
        let text = serde_json::to_string(o)?;
        ensure!(
            !text.contains("caBundle"),
            "{} {} templates a caBundle",
            kind(o),
            name(o)
        );
        ensure!(
            kind(o) != "Secret",
            "the chart renders Secret {}; the operator creates its own",
            name(o)
        );
    }
    for (k, failure_policy) in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ]
    .into_iter()
    .zip(failure_policies)
    {
        let config = one(objects, k)?;
        let webhooks = config["webhooks"].as_array().context("webhooks")?;
        ensure!(!webhooks.is_empty(), "{k} has no webhooks");
        for w in webhooks {
            assert_eq!(w["sideEffects"], "None", "{k}");
            ensure!(
                w["timeoutSeconds"]
                    .as_i64()
                    .is_some_and(|t| (1..=30).contains(&t)),
                "{k}: timeoutSeconds {}",
                w["timeoutSeconds"]
            );
            assert_eq!(w["failurePolicy"], failure_policy, "{k}");
            assert_eq!(
                w["admissionReviewVersions"],
                serde_json::json!(["v1"]),
                "{k}"
            );
            let exprs = w["namespaceSelector"]["matchExpressions"]
                .as_array()
                .context("namespaceSelector.matchExpressions")?;
            let excluded = exprs
                .iter()
                .find(|e| e["key"] == "kubernetes.io/metadata.name" && e["operator"] == "NotIn")
                .context("a kubernetes.io/metadata.name NotIn expression")?;
            let values = excluded["values"].as_array().context("values")?;
            ensure!(
                values.iter().any(|v| v == "kube-system"),
                "{k} does not exclude kube-system: {values:?}"
            );
            // The injector never calls itself for the operator's own pods; the validator
            // checks AgentGateways in the release namespace too (helm test relies on it).
            let excludes_release = values.iter().any(|v| v == ns);
            ensure!(
                excludes_release == (k == "MutatingWebhookConfiguration"),
                "{k}: release namespace {ns} excluded: {excludes_release} ({values:?})"
            );
        }
    }
    let mutating = one(objects, "MutatingWebhookConfiguration")?;
    let rule = &mutating["webhooks"][0]["rules"][0];
    assert_eq!(rule["operations"], serde_json::json!(["CREATE"]));
    assert_eq!(rule["resources"], serde_json::json!(["pods"]));
    let validating = one(objects, "ValidatingWebhookConfiguration")?;
    assert_eq!(
        validating["webhooks"][0]["rules"][0]["resources"],
        serde_json::json!(["agentgateways"])
    );

    // RBAC: no wildcards; writes to webhook configurations only by name.
    for k in ["ClusterRole", "Role"] {
        for role in find(objects, k) {
            for rule in role["rules"].as_array().context("rules")? {
                let text = rule.to_string();
                ensure!(
                    !text.contains("\"*\""),
                    "{k} {} has a wildcard: {text}",
                    name(role)
                );
                let resources = rule["resources"].to_string();
                if resources.contains("webhookconfigurations") {
                    ensure!(
                        rule["resourceNames"]
                            .as_array()
                            .is_some_and(|n| n.len() == 1),
                        "webhook configuration rule without resourceNames: {text}"
                    );
                }
                let verbs = rule["verbs"].to_string();
                if k == "ClusterRole" && resources.contains("secrets") {
                    ensure!(
                        !verbs.contains("create") && !verbs.contains("update"),
                        "cluster-wide Secret writes: {text}"
                    );
                    // Listing or watching every Secret reads every Secret's data.
                    ensure!(
                        !verbs.contains("\"list\"") && !verbs.contains("\"watch\""),
                        "cluster-wide Secret list/watch: {text}"
                    );
                }
                if k == "ClusterRole" && resources.contains("\"pods\"") {
                    ensure!(!verbs.contains("patch"), "cluster-wide pod patch: {text}");
                }
            }
        }
    }
    for k in ["ClusterRoleBinding", "RoleBinding"] {
        let binding = one(objects, k)?;
        let sa = one(objects, "ServiceAccount")?;
        assert_eq!(
            binding["subjects"][0]["name"], sa["metadata"]["name"],
            "{k}"
        );
        assert_eq!(binding["subjects"][0]["namespace"], ns, "{k}");
    }
    Ok(())
}

/// The Deployment, Services and webhook configurations agree on names with the operator flags.
fn check_deployment(objects: &[Value], ns: &str, replicas: i64) -> Result<()> {
    let deployment = one(objects, "Deployment")?;
    assert_eq!(deployment["spec"]["replicas"], replicas);
    let args = args(deployment);
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    for arg in [
        "--leader-elect=true".to_string(),
        format!("--operator-namespace={ns}"),
        format!("--webhook-service={}", name(service(objects, "-webhook")?)),
        format!(
            "--mutating-webhook-configs={}",
            name(one(objects, "MutatingWebhookConfiguration")?)
        ),
        format!(
            "--validating-webhook-configs={}",
            name(one(objects, "ValidatingWebhookConfiguration")?)
        ),
        format!(
            "--hub-advertise={}.{ns}.svc:7051",
            name(service(objects, "-hub")?)
        ),
    ] {
        ensure!(has_arg(&args, &arg), "missing {arg} in {args:?}");
    }
    ensure!(
        args.iter().any(|a| a.starts_with("--lease-name=")),
        "{args:?}"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    ensure!(
        pod["topologySpreadConstraints"]
            .as_array()
            .is_some_and(|t| !t.is_empty()),
        "no topologySpreadConstraints"
    );
    let container = &pod["containers"][0];
    let sc = &container["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "admin");
    ensure!(
        container["resources"]["requests"].is_object(),
        "no resource requests"
    );
    let env: Vec<&str> = container["env"]
        .as_array()
        .context("env")?
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    ensure!(
        env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"),
        "{env:?}"
    );

    let webhook = service(objects, "-webhook")?;
    assert_eq!(webhook["spec"]["ports"][0]["port"], 443);
    assert_eq!(webhook["spec"]["ports"][0]["targetPort"], "webhook");
    assert_eq!(service(objects, "-hub")?["spec"]["ports"][0]["port"], 7051);
    assert_eq!(
        service(objects, "-metrics")?["spec"]["ports"][0]["targetPort"],
        "admin"
    );
    let mutating = one(objects, "MutatingWebhookConfiguration")?;
    let client = &mutating["webhooks"][0]["clientConfig"]["service"];
    assert_eq!(client["name"], name(webhook));
    assert_eq!(client["namespace"], ns);
    assert_eq!(client["path"], "/mutate");
    Ok(())
}

fn check_dashboard_config_map(objects: &[Value], label_value: &str) -> Result<()> {
    let map = find(objects, "ConfigMap")
        .into_iter()
        .find(|c| name(c).ends_with("-dashboard"))
        .context("no dashboard ConfigMap")?;
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], label_value);
    let shipped: Value = serde_json::from_str(
        map["data"]["nanogate.json"]
            .as_str()
            .context("data.nanogate.json")?,
    )?;
    let file: Value = serde_json::from_str(&std::fs::read_to_string(
        workspace_root()
            .join(CHART)
            .join("dashboards/nanogate.json"),
    )?)?;
    assert_eq!(shipped, file, "the ConfigMap carries the dashboard file");
    Ok(())
}

#[test]
fn chart_lints_clean_with_default_and_all_feature_values() -> Result<()> {
    let kubeconfig = Path::new("/nonexistent"); // lint never contacts a cluster
    for values in [None, Some(ALL_FEATURES), Some(LOCAL_DEVELOPMENT)] {
        let file = ValuesFile::new(values, Value::Object(Default::default()))?;
        let lint = helm(kubeconfig, &["lint", &chart(), "--values", &file.path()])?;
        assert_eq!(lint["errors"], serde_json::json!([]), "{values:?}: {lint}");
        // Severity 1 is informational ("icon is recommended"); warnings and errors fail.
        let serious: Vec<&Value> = lint["messages"]
            .as_array()
            .context("messages")?
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(99) > 1)
            .collect();
        assert!(serious.is_empty(), "{values:?}: {serious:?}");
    }
    Ok(())
}

#[tokio::test]
async fn default_values_render_objects_the_apiserver_accepts() -> Result<()> {
    let (kubeconfig, ns, served) = render_env("chart-default").await?;
    let values = ValuesFile::new(None, pdb_values(&served))?;
    let (objects, notes) = render(kubeconfig, "nanogate", ns.name(), &values.path())?;

    // Pods keep today's Ignore; our own AgentGateways are refused while the validator is down.
    check_common(&objects, ns.name(), ["Ignore", "Fail"])?;
    check_default_webhook_scope(&objects)?;
    check_deployment(&objects, ns.name(), 2)?;
    check_dashboard_config_map(&objects, "1")?;
    let pdb = one(&objects, "PodDisruptionBudget")?;
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    for k in OPTIONAL_CRD_KINDS.iter().chain(&["NetworkPolicy"]) {
        assert!(find(&objects, k).is_empty(), "{k} rendered by default");
    }
    // The default release "nanogate" gets the names the operator uses by default.
    assert_eq!(
        name(one(&objects, "MutatingWebhookConfiguration")?),
        "nanogate-injector"
    );
    assert_eq!(name(service(&objects, "-webhook")?), "nanogate-webhook");
    assert!(
        notes.contains("rollout status deployment/nanogate-operator"),
        "{notes}"
    );
    assert!(notes.contains("kind: AgentGateway"), "{notes}");
    assert!(notes.contains("nanogate.io/injection=enabled"), "{notes}");

    let skipped = dry_run(kubeconfig, &objects, &served)?;
    assert!(skipped.is_empty(), "skipped {skipped:?}");
    Ok(())
}

#[tokio::test]
async fn every_optional_feature_renders_objects_the_apiserver_accepts() -> Result<()> {
    let (kubeconfig, ns, served) = render_env("chart-all").await?;
    let values = ValuesFile::new(Some(ALL_FEATURES), pdb_values(&served))?;
    let (objects, _) = render(kubeconfig, "ng", ns.name(), &values.path())?;
    check_common(&objects, ns.name(), ["Fail", "Fail"])?;
    check_dashboard_config_map(&objects, "nanogate")?;

    let deployment = one(&objects, "Deployment")?;
    assert_eq!(deployment["spec"]["replicas"], 3);
    let args = args(deployment);
    for arg in [
        "--namespace=apps",
        "--native-sidecars=false",
        "--extra-sans=nanogate.example.com",
        "--hub-advertise=hub.example.com:7051",
        "--log-format=text",
        "--status-interval=10s",
        "--lease-namespace=nanogate-system",
    ] {
        assert!(has_arg(&args, arg), "missing {arg} in {args:?}");
    }
    assert_eq!(
        one(&objects, "PodDisruptionBudget")?["spec"]["minAvailable"],
        2
    );
    let policy = one(&objects, "NetworkPolicy")?;
    assert_eq!(policy["spec"]["ingress"].as_array().map(Vec::len), Some(3));

    // cert-manager mode: the Certificate's Secret is what the operator mounts, and cainjector
    // is told to fill caBundle from that Certificate.
    let certificate = one(&objects, "Certificate")?;
    let issuer = one(&objects, "Issuer")?;
    assert_eq!(certificate["spec"]["issuerRef"]["name"], name(issuer));
    let volumes = &deployment["spec"]["template"]["spec"]["volumes"];
    assert_eq!(
        volumes[0]["secret"]["secretName"],
        certificate["spec"]["secretName"]
    );
    let inject_from = format!("{}/{}", ns.name(), name(certificate));
    for k in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        assert_eq!(
            one(&objects, k)?["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            inject_from.as_str()
        );
    }
    let webhook_service = name(service(&objects, "-webhook")?);
    let dns = certificate["spec"]["dnsNames"].to_string();
    assert!(
        dns.contains(&format!("\"{webhook_service}.{}.svc\"", ns.name())),
        "{dns}"
    );
    // The hub serves the same certificate under the names sidecars dial.
    let hub_service = name(service(&objects, "-hub")?);
    for must in [
        format!("\"{hub_service}.{}.svc\"", ns.name()),
        "\"hub.example.com\"".to_string(),
        "\"nanogate.example.com\"".to_string(),
    ] {
        assert!(dns.contains(&must), "{must} missing from {dns}");
    }

    // Prometheus Operator objects select what the chart exposes.
    let monitor = one(&objects, "ServiceMonitor")?;
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let metrics = service(&objects, "-metrics")?;
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("matchLabels")?
    {
        assert_eq!(
            &metrics["metadata"]["labels"][k], v,
            "ServiceMonitor label {k}"
        );
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        metrics["spec"]["ports"][0]["name"]
    );
    let pods = one(&objects, "PodMonitor")?;
    assert_eq!(
        pods["spec"]["podMetricsEndpoints"][0]["port"],
        "nanogate-admin"
    );
    assert_eq!(
        pods["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["targetLabel"],
        "gateway"
    );

    // The PrometheusRule carries files/alerts.yaml as its spec, selected like the monitors.
    let rule = one(&objects, "PrometheusRule")?;
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(rule["metadata"]["namespace"], ns.name());
    assert_eq!(
        rule["spec"],
        alert_rules()?,
        "the PrometheusRule's spec is {ALERTS}"
    );

    // ServiceMonitor, PodMonitor, PrometheusRule, Certificate and Issuer belong to CRDs the test apiserver
    // does not have (Prometheus Operator, cert-manager): dry_run skips them (checked above by
    // structure) and fails on any other unserved kind.
    let mut skipped = dry_run(kubeconfig, &objects, &served)?;
    skipped.sort();
    assert_eq!(
        skipped,
        [
            "Certificate",
            "Issuer",
            "PodMonitor",
            "PrometheusRule",
            "ServiceMonitor"
        ]
    );
    Ok(())
}

/// Today's scope with default values: one injection webhook that every pod CREATE outside the
/// excluded namespaces reaches (no objectSelector), timeouts of 5 s, no reinvocation.
fn check_default_webhook_scope(objects: &[Value]) -> Result<()> {
    let mutating = one(objects, "MutatingWebhookConfiguration")?;
    let webhooks = mutating["webhooks"].as_array().context("webhooks")?;
    assert_eq!(webhooks.len(), 1, "{webhooks:?}");
    let inject = &webhooks[0];
    assert_eq!(inject["name"], "inject.nanogate.io");
    assert!(inject["objectSelector"].is_null(), "{inject}");
    assert_eq!(inject["timeoutSeconds"], 5);
    assert_eq!(inject["reinvocationPolicy"], "Never");
    assert_eq!(inject["failurePolicy"], "Ignore");
    assert!(
        inject["namespaceSelector"]["matchLabels"].is_null(),
        "{inject}"
    );
    assert_eq!(
        inject["namespaceSelector"]["matchExpressions"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let validate = &one(objects, "ValidatingWebhookConfiguration")?["webhooks"][0];
    assert_eq!(validate["timeoutSeconds"], 5);
    assert_eq!(validate["failurePolicy"], "Fail");
    assert!(validate["objectSelector"].is_null(), "{validate}");
    Ok(())
}

/// Every `webhook.*` scope value lands where it belongs: the label-only mode selects pods
/// labelled `nanogate.io/inject: "true"` (and, in a second webhook, the pods of namespaces
/// labelled `nanogate.io/injection=enabled` that lack the label, so both opt-ins still work and
/// no pod is sent twice), the user's selectors are merged with the built-in ones, each webhook
/// has its own failurePolicy and timeout, and the apiserver accepts the result.
#[tokio::test]
async fn webhook_scope_values_render_into_both_configurations() -> Result<()> {
    let (kubeconfig, ns, served) = render_env("chart-scope").await?;
    let tier = serde_json::json!({"key": "tier", "operator": "NotIn", "values": ["batch"]});
    let env = serde_json::json!({"key": "env", "operator": "In", "values": ["prod"]});
    let values = ValuesFile::new(
        None,
        serde_json::json!({
            "podDisruptionBudget": {"apiVersion": pdb_api_version(&served)},
            "webhook": {
                "namespaceSelector": {"matchLabels": {"team": "a"}, "matchExpressions": [env]},
                "inject": {
                    "labelledPodsOnly": true,
                    "objectSelector": {"matchExpressions": [tier]},
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 10,
                    "reinvocationPolicy": "IfNeeded",
                },
                "validate": {"failurePolicy": "Ignore", "timeoutSeconds": 3},
            },
        }),
    )?;
    let (objects, _) = render(kubeconfig, "nanogate", ns.name(), &values.path())?;
    check_common(&objects, ns.name(), ["Fail", "Ignore"])?;
    let excluded = serde_json::json!({
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": ["kube-system", ns.name()],
    });
    let mutating = one(&objects, "MutatingWebhookConfiguration")?;
    let webhooks = mutating["webhooks"].as_array().context("webhooks")?;
    assert_eq!(webhooks.len(), 2, "{webhooks:#?}");
    let (labelled, namespaced) = (&webhooks[0], &webhooks[1]);
    assert_eq!(labelled["name"], "inject.nanogate.io");
    assert_eq!(
        labelled["objectSelector"],
        serde_json::json!({"matchLabels": {"nanogate.io/inject": "true"}, "matchExpressions": [tier]})
    );
    assert_eq!(
        labelled["namespaceSelector"],
        serde_json::json!({"matchLabels": {"team": "a"}, "matchExpressions": [excluded, env]})
    );
    assert_eq!(namespaced["name"], "inject-namespace.nanogate.io");
    assert_eq!(
        namespaced["objectSelector"],
        serde_json::json!({"matchExpressions": [
            {"key": "nanogate.io/inject", "operator": "NotIn", "values": ["true"]},
            tier,
        ]})
    );
    assert_eq!(
        namespaced["namespaceSelector"],
        serde_json::json!({
            "matchLabels": {"nanogate.io/injection": "enabled", "team": "a"},
            "matchExpressions": [excluded, env],
        })
    );
    for w in webhooks {
        assert_eq!(w["timeoutSeconds"], 10);
        assert_eq!(w["reinvocationPolicy"], "IfNeeded");
        assert_eq!(w["clientConfig"], labelled["clientConfig"]);
        assert_eq!(w["rules"], labelled["rules"]);
    }
    let validate = &one(&objects, "ValidatingWebhookConfiguration")?["webhooks"][0];
    assert_eq!(validate["timeoutSeconds"], 3);
    assert_eq!(validate["failurePolicy"], "Ignore");
    assert!(validate["objectSelector"].is_null(), "{validate}");
    let kube_system_only = serde_json::json!({
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": ["kube-system"],
    });
    assert_eq!(
        validate["namespaceSelector"],
        serde_json::json!({"matchLabels": {"team": "a"}, "matchExpressions": [kube_system_only, env]})
    );

    // The former `webhook.failurePolicy` still sets both, over the new values.
    let legacy = ValuesFile::new(
        None,
        serde_json::json!({"webhook": {"failurePolicy": "Ignore", "validate": {"failurePolicy": "Fail"}}}),
    )?;
    let (legacy, _) = render(kubeconfig, "nanogate", ns.name(), &legacy.path())?;
    check_common(&legacy, ns.name(), ["Ignore", "Ignore"])?;

    // An objectSelector without the label-only mode is used as given.
    let own = ValuesFile::new(
        None,
        serde_json::json!({"webhook": {"inject": {"objectSelector": {"matchLabels": {"mesh": "enabled"}}}}}),
    )?;
    let (own, _) = render(kubeconfig, "nanogate", ns.name(), &own.path())?;
    let webhooks = one(&own, "MutatingWebhookConfiguration")?["webhooks"].clone();
    assert_eq!(webhooks.as_array().map(Vec::len), Some(1));
    assert_eq!(
        webhooks[0]["objectSelector"],
        serde_json::json!({"matchLabels": {"mesh": "enabled"}})
    );

    let skipped = dry_run(kubeconfig, &objects, &served)?;
    assert!(skipped.is_empty(), "skipped {skipped:?}");
    Ok(())
}

#[tokio::test]
async fn local_development_values_point_the_webhooks_at_a_url() -> Result<()> {
    let (kubeconfig, ns, served) = render_env("chart-local").await?;
    let values = ValuesFile::new(Some(LOCAL_DEVELOPMENT), Value::Object(Default::default()))?;
    let (objects, notes) = render(kubeconfig, "nanogate", ns.name(), &values.path())?;
    check_common(&objects, ns.name(), ["Ignore", "Fail"])?;
    assert_eq!(one(&objects, "Deployment")?["spec"]["replicas"], 0);
    assert!(find(&objects, "PodDisruptionBudget").is_empty());
    for (k, path) in [
        ("MutatingWebhookConfiguration", "/mutate"),
        ("ValidatingWebhookConfiguration", "/validate"),
    ] {
        let client_config = &one(&objects, k)?["webhooks"][0]["clientConfig"];
        assert_eq!(
            client_config["url"],
            format!("https://127.0.0.1:9443{path}")
        );
        assert!(client_config["service"].is_null(), "{k}: {client_config}");
    }
    assert!(
        has_arg(
            &args(one(&objects, "Deployment")?),
            "--hub-advertise=127.0.0.1:7051"
        ),
        "local hub address"
    );
    assert!(notes.contains("localDevelopment is on"), "{notes}");
    dry_run(kubeconfig, &objects, &served)?;
    Ok(())
}

#[test]
fn schema_rejects_bad_values_with_a_clear_error() -> Result<()> {
    let kubeconfig = Path::new("/nonexistent"); // rendering never contacts a cluster
    for (bad, path, expect) in [
        (
            serde_json::json!({"replicaCount": "two"}),
            "/replicaCount",
            "want integer",
        ),
        (
            serde_json::json!({"webhook": {"failurePolicy": "Maybe"}}),
            "/webhook/failurePolicy",
            "'Ignore', 'Fail'",
        ),
        (
            serde_json::json!({"webhook": {"inject": {"failurePolicy": "Maybe"}}}),
            "/webhook/inject/failurePolicy",
            "'Ignore', 'Fail'",
        ),
        (
            serde_json::json!({"webhook": {"validate": {"failurePolicy": "Never"}}}),
            "/webhook/validate/failurePolicy",
            "'Ignore', 'Fail'",
        ),
        (
            serde_json::json!({"webhook": {"inject": {"timeoutSeconds": 31}}}),
            "/webhook/inject/timeoutSeconds",
            "maximum",
        ),
        (
            serde_json::json!({"webhook": {"validate": {"timeoutSeconds": 0}}}),
            "/webhook/validate/timeoutSeconds",
            "minimum",
        ),
        (
            serde_json::json!({"webhook": {"inject": {"reinvocationPolicy": "Always"}}}),
            "/webhook/inject/reinvocationPolicy",
            "'Never', 'IfNeeded'",
        ),
        (
            serde_json::json!({"webhook": {"inject": {"objectSelector": {"matchLabel": {}}}}}),
            "/webhook/inject/objectSelector",
            "additional properties",
        ),
        (
            serde_json::json!({"webhook": {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}}),
            "/webhook/namespaceSelector/matchExpressions/0/operator",
            "",
        ),
        (
            serde_json::json!({"logFormat": "xml"}),
            "/logFormat",
            "'text', 'json'",
        ),
        (
            serde_json::json!({"statusInterval": "soon"}),
            "/statusInterval",
            "",
        ),
        (
            serde_json::json!({"replicaCont": 2}),
            "replicaCont",
            "additional properties",
        ),
        (
            serde_json::json!({"localDevelopment": {"webhookURL": "http://127.0.0.1:9443"}}),
            "/localDevelopment/webhookURL",
            "",
        ),
    ] {
        let values = ValuesFile::new(None, bad.clone())?;
        let error = match helm(
            kubeconfig,
            &["render", &chart(), "ng", "ns", "--values", &values.path()],
        ) {
            Ok(out) => bail!("{bad} was accepted: {out}"),
            Err(error) => format!("{error:#}"),
        };
        assert!(
            error.contains("schema") && error.contains(path) && error.contains(expect),
            "{bad}: unclear error: {error}"
        );
    }
    // And the documented defaults validate.
    let values = ValuesFile::new(None, Value::Object(Default::default()))?;
    helm(
        kubeconfig,
        &["render", &chart(), "ng", "ns", "--values", &values.path()],
    )?;
    Ok(())
}

#[test]
fn chart_crd_is_identical_to_the_generated_crd() -> Result<()> {
    let generated = std::fs::read(workspace_root().join("crds/agentgateway.yaml"))?;
    let shipped = std::fs::read(workspace_root().join(CHART).join("crds/agentgateway.yaml"))?;
    assert!(
        generated == shipped,
        "charts/nanogate/crds/agentgateway.yaml differs from crds/agentgateway.yaml; \
         copy it: cp crds/agentgateway.yaml charts/nanogate/crds/"
    );
    let chart_crds: Vec<_> = std::fs::read_dir(workspace_root().join(CHART).join("crds"))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    let root_crds: Vec<_> = std::fs::read_dir(workspace_root().join("crds"))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert_eq!(
        chart_crds.len(),
        root_crds.len(),
        "{chart_crds:?} vs {root_crds:?}"
    );
    Ok(())
}

/// Metric names registered in the Rust sources: operator literals `"nanogate_…"`, and sidecar
/// metrics built as `nanogate_sidecar_{n}` from the literals handed to its constructors.
fn metrics_in_source() -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    let mut files = Vec::new();
    for dir in ["operator/src", "sidecar/src"] {
        collect_rs(&workspace_root().join(dir), &mut files)?;
    }
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        for (i, _) in text.match_indices("\"nanogate_") {
            let rest = &text[i + 1..];
            let end = rest.find('"').unwrap_or(0);
            let candidate = &rest[..end];
            if candidate
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !candidate.ends_with('_')
            {
                names.insert(candidate.to_string());
            }
        }
    }
    let sidecar = std::fs::read_to_string(workspace_root().join("sidecar/src/metrics.rs"))?;
    ensure!(
        sidecar.contains("format!(\"nanogate_sidecar_{n}\")"),
        "sidecar/src/metrics.rs no longer builds names as nanogate_sidecar_{{n}}"
    );
    for call in ["name(", "counter(", "gauge(", "Gauge::new(name("] {
        for (i, _) in sidecar.match_indices(call) {
            let rest = sidecar[i + call.len()..].trim_start();
            if let Some(lit) = rest.strip_prefix('"') {
                let end = lit.find('"').unwrap_or(0);
                let n = &lit[..end];
                if !n.is_empty() && n.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    names.insert(format!("nanogate_sidecar_{n}"));
                }
            }
        }
    }
    Ok(names)
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// Every `nanogate_…` identifier in a PromQL expression.
fn metric_tokens(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in expr.match_indices("nanogate_") {
        if i > 0 {
            let prev = expr.as_bytes()[i - 1];
            if prev.is_ascii_alphanumeric() || prev == b'_' {
                continue;
            }
        }
        let token: String = expr[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push(token);
    }
    out
}

fn exists(metric: &str, known: &BTreeSet<String>) -> bool {
    known.contains(metric)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            metric
                .strip_suffix(s)
                .is_some_and(|base| known.contains(base))
        })
}

/// The Grafana dashboard the chart ships.
fn dashboard() -> Result<Value> {
    let text = std::fs::read_to_string(
        workspace_root()
            .join(CHART)
            .join("dashboards/nanogate.json"),
    )?;
    serde_json::from_str(&text).context("dashboard JSON parses")
}

/// Every panel of `dashboard`, those nested in rows included (the rows too), depth first.
fn all_panels(dashboard: &Value) -> Result<Vec<&Value>> {
    let mut stack: Vec<&Value> = dashboard["panels"]
        .as_array()
        .context("panels")?
        .iter()
        .collect();
    let mut all = Vec::new();
    while let Some(panel) = stack.pop() {
        if let Some(children) = panel["panels"].as_array() {
            stack.extend(children);
        }
        all.push(panel);
    }
    Ok(all)
}

#[test]
fn dashboard_queries_use_only_metrics_that_exist() -> Result<()> {
    let known = metrics_in_source()?;
    for expected in [
        "nanogate_operator_reconciles_total",
        "nanogate_webhook_requests_total",
        "nanogate_hub_connected_agents",
        "nanogate_sidecar_received_total",
        "nanogate_sidecar_upstream_circuit_state",
    ] {
        assert!(
            known.contains(expected),
            "{expected} not found in {known:?}"
        );
    }
    let dashboard = dashboard()?;
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());

    let mut exprs = Vec::new();
    let mut panels = 0;
    for panel in all_panels(&dashboard)? {
        if panel["type"] == "row" {
            continue;
        }
        panels += 1;
        let targets = panel["targets"].as_array().context("targets")?;
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().context("expr")?;
            exprs.push((panel["title"].to_string(), expr.to_string()));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .context("templating")?
    {
        if let Some(q) = var["query"]["query"].as_str() {
            exprs.push((format!("variable {}", var["name"]), q.to_string()));
        }
    }
    assert!(panels >= 15, "only {panels} panels");

    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        let tokens = metric_tokens(expr);
        assert!(
            !tokens.is_empty(),
            "{title}: query names no nanogate metric: {expr}"
        );
        for token in tokens {
            assert!(
                exists(&token, &known),
                "{title}: {token} is not a metric in the source ({expr})"
            );
            used.insert(token);
        }
    }
    // The fleet, webhook and operator sections are all there.
    for prefix in [
        "nanogate_sidecar_",
        "nanogate_webhook_",
        "nanogate_operator_",
        "nanogate_hub_",
    ] {
        assert!(
            used.iter().any(|m| m.starts_with(prefix)),
            "no {prefix}* panel"
        );
    }
    Ok(())
}

#[test]
fn metrics_reference_documents_every_metric() -> Result<()> {
    let doc = std::fs::read_to_string(workspace_root().join("docs/metrics.md"))?;
    // Family prefixes such as `nanogate_hub_*` are prose, not metric names.
    let documented: BTreeSet<String> = metric_tokens(&doc)
        .into_iter()
        .filter(|m| !m.ends_with('_'))
        .collect();
    for metric in metrics_in_source()? {
        assert!(
            doc.contains(&format!("`{metric}`")),
            "docs/metrics.md does not document {metric}"
        );
    }
    let known = metrics_in_source()?;
    for metric in documented {
        assert!(
            exists(&metric, &known),
            "docs/metrics.md names {metric}, which the source lacks"
        );
    }
    Ok(())
}

/// `charts/nanogate/files/alerts.yaml`, parsed.
fn alert_rules() -> Result<Value> {
    let text = std::fs::read_to_string(workspace_root().join(ALERTS))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {ALERTS}"))
}

/// Every alerting rule of [`ALERTS`]: (name, expression, rule).
fn alerts() -> Result<Vec<(String, String, Value)>> {
    let mut out = Vec::new();
    for group in alert_rules()?["groups"].as_array().context("groups")? {
        for rule in group["rules"].as_array().context("rules")? {
            let name = rule["alert"].as_str().context("alert name")?;
            let expr = rule["expr"].as_str().context("expr")?;
            out.push((name.to_string(), expr.to_string(), rule.clone()));
        }
    }
    Ok(out)
}

fn promtool(args: &[&str]) -> Result<String> {
    ensure!(
        Path::new(PROMTOOL).exists(),
        "{PROMTOOL} not found: apt-get install prometheus (Debian package; e2e/scripts/setup.sh \
         installs it)"
    );
    let out = std::process::Command::new(PROMTOOL)
        .args(args)
        .current_dir(workspace_root())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

/// `promtool check rules` and the unit tests of every alert (`make alerts-test` runs the same).
#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() -> Result<()> {
    promtool(&["check", "rules", ALERTS])?;
    promtool(&["test", "rules", ALERTS_TEST])?;
    // Every alert has a test that sees it fire.
    let tests = std::fs::read_to_string(workspace_root().join(ALERTS_TEST))?;
    for (name, _, _) in alerts()? {
        assert!(
            tests.contains(&format!(
                "alertname: {name}\n        exp_alerts:\n          - exp_labels"
            )),
            "{ALERTS_TEST} has no firing case for {name}"
        );
    }
    Ok(())
}

/// Every alert uses metrics that exist, waits (`for`), has a severity, says what to do and
/// links a section of docs/metrics.md that exists.
#[test]
fn alerts_use_existing_metrics_and_link_their_runbook() -> Result<()> {
    let known = metrics_in_source()?;
    let doc = std::fs::read_to_string(workspace_root().join("docs/metrics.md"))?;
    let anchors: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| {
            h.to_ascii_lowercase()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect()
        })
        .collect();
    let alerts = alerts()?;
    assert!(alerts.len() >= 12, "only {} alerts", alerts.len());
    for (name, expr, rule) in &alerts {
        let tokens = metric_tokens(expr);
        assert!(!tokens.is_empty(), "{name}: no nanogate metric in {expr}");
        for token in tokens {
            assert!(
                exists(&token, &known),
                "{name}: {token} is not a metric in the source ({expr})"
            );
        }
        assert!(rule["for"].is_string(), "{name}: no `for`");
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["warning", "critical"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for a in ["summary", "description"] {
            assert!(
                rule["annotations"][a]
                    .as_str()
                    .is_some_and(|t| t.len() > 20),
                "{name}: no {a}"
            );
        }
        let runbook = rule["annotations"]["runbook_url"]
            .as_str()
            .with_context(|| format!("{name}: no runbook_url"))?;
        let anchor = runbook
            .strip_prefix("https://github.com/nanogate/nanogate/blob/main/docs/metrics.md#")
            .with_context(|| format!("{name}: runbook_url {runbook} is not in docs/metrics.md"))?;
        assert_eq!(anchor, name.to_ascii_lowercase(), "{name}: runbook anchor");
        assert!(
            anchors.contains(anchor),
            "{name}: docs/metrics.md has no section `### {name}`"
        );
        assert!(
            doc.contains(&format!("| [`{name}`](#{anchor}) |")),
            "{name}: missing from the alerts table of docs/metrics.md"
        );
    }
    Ok(())
}

fn operator_binary() -> Result<PathBuf> {
    built_binary("nanogate-operator", "nanogate-operator")
}

/// `target/debug/<name>`, built by `cargo build -p <package>`.
fn built_binary(name: &str, package: &str) -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("debug").join(name);
    ensure!(
        bin.exists(),
        "{} not found; build it first: cargo build -p {package}",
        bin.display()
    );
    Ok(bin)
}

/// The sidecar image and the hub limits are chart values that reach the operator's flags; by
/// default they are the flags' own defaults (issue 18).
#[test]
fn sidecar_image_and_hub_limits_render_into_the_operator_args() -> Result<()> {
    let kubeconfig = Path::new("/nonexistent"); // rendering never contacts a cluster
    let flags = nanogate_operator::ServerOptions::default();
    let duration = |d: Duration| -> String {
        // The chart writes "10s", "5m": compare what the operator would parse.
        format!("{}ms", d.as_millis())
    };
    let parsed = |args: &[String], flag: &str| -> Result<String> {
        let value = args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .with_context(|| format!("no {flag} in {args:?}"))?;
        Ok(match nanogate_operator::crd::parse_duration(value) {
            Ok(d) if value.ends_with(['s', 'm', 'h']) => duration(d),
            _ => value.to_string(),
        })
    };
    let expect = |args: &[String], wanted: &[(&str, String)]| -> Result<()> {
        for (flag, value) in wanted {
            let got = parsed(args, flag)?;
            ensure!(&got == value, "{flag}: {got} ≠ {value} in {args:?}");
        }
        Ok(())
    };

    let file = ValuesFile::new(None, Value::Object(Default::default()))?;
    let (objects, _) = render(kubeconfig, "nanogate", "nanogate-system", &file.path())?;
    let rendered = args(one(&objects, "Deployment")?);
    expect(
        &rendered,
        &[
            ("--sidecar-image", flags.sidecar_image.clone()),
            (
                "--hub-max-connections",
                flags.hub_max_connections.to_string(),
            ),
            ("--hub-max-handshakes", flags.hub_max_handshakes.to_string()),
            (
                "--hub-handshake-timeout",
                duration(flags.hub_handshake_timeout),
            ),
            ("--hub-pre-auth-bytes", flags.hub_pre_auth_bytes.to_string()),
            (
                "--hub-token-review-timeout",
                duration(flags.hub_token_review_timeout),
            ),
            (
                "--hub-token-review-concurrency",
                flags.hub_token_review_concurrency.to_string(),
            ),
            ("--hub-token-cache-ttl", duration(flags.hub_token_cache_ttl)),
        ],
    )?;
    // The chart's default image is this release's (the flag's default).
    assert_eq!(
        flags.sidecar_image,
        nanogate_operator::crd::DEFAULT_SIDECAR_IMAGE
    );
    ensure!(
        !rendered
            .iter()
            .any(|a| a.starts_with("--allowed-sidecar-images")),
        "nothing else allowed by default: {rendered:?}"
    );

    let file = ValuesFile::new(Some(ALL_FEATURES), Value::Object(Default::default()))?;
    let (objects, _) = render(kubeconfig, "nanogate", "nanogate-system", &file.path())?;
    let rendered = args(one(&objects, "Deployment")?);
    expect(
        &rendered,
        &[
            (
                "--sidecar-image",
                "registry.example:5000/mirror/nano-agent@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            ),
            (
                "--allowed-sidecar-images",
                "registry.example:5000/mirror/nano-agent:,ghcr.io/acme/".into(),
            ),
            ("--hub-max-connections", "2000000".into()),
            ("--hub-max-handshakes", "64".into()),
            ("--hub-handshake-timeout", "3000ms".into()),
            ("--hub-pre-auth-bytes", "8192".into()),
            ("--hub-token-review-timeout", "2000ms".into()),
            ("--hub-token-review-concurrency", "4".into()),
            ("--hub-token-cache-ttl", "60000ms".into()),
        ],
    )?;

    // Only the tag changed: repository:tag.
    let file = ValuesFile::new(
        None,
        serde_json::json!({"sidecar": {"image": {"tag": "9.9.9"}}}),
    )?;
    let (objects, _) = render(kubeconfig, "nanogate", "nanogate-system", &file.path())?;
    expect(
        &args(one(&objects, "Deployment")?),
        &[(
            "--sidecar-image",
            "ghcr.io/nanogate/nano-agent:9.9.9".into(),
        )],
    )?;
    Ok(())
}

#[test]
fn rendered_operator_arguments_are_accepted_by_the_operator_binary() -> Result<()> {
    let kubeconfig = Path::new("/nonexistent"); // rendering never contacts a cluster
    let bin = operator_binary()?;
    for values in [None, Some(ALL_FEATURES), Some(LOCAL_DEVELOPMENT)] {
        let file = ValuesFile::new(values, Value::Object(Default::default()))?;
        let (objects, _) = render(kubeconfig, "nanogate", "nanogate-system", &file.path())?;
        let args: Vec<String> = args(one(&objects, "Deployment")?);
        // clap parses and validates every argument before it acts on --help, so exit 0 means
        // the binary accepts each flag and value the chart passes.
        let out = std::process::Command::new(&bin)
            .args(&args)
            .arg("--help")
            .output()?;
        assert!(
            out.status.success(),
            "{values:?}: nanogate-operator rejects {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `helm uninstall`, then wait until no object of the release is left.
/// `helm install` or `helm upgrade` (`verb`) of the chart as `release` in `ns` with `values`.
fn helm_release(
    kubeconfig: &Path,
    verb: &str,
    release: &str,
    ns: &str,
    values: &ValuesFile,
) -> Result<Value> {
    helm(
        kubeconfig,
        &[verb, &chart(), release, ns, "--values", &values.path()],
    )
}

/// Whether the ServiceAccount `ns`/`sa` may do `args` (`kubectl auth can-i --as …`).
fn can_i(kubeconfig: &Path, ns: &str, sa: &str, args: &[&str]) -> Result<bool> {
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let out = nanogate_e2e::kubectl_command(kubeconfig)
        .args(["auth", "can-i", "--as", &user])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
}

/// `kubectl get KIND NAME [-n NS] -o jsonpath=PATH`.
fn get_jsonpath(
    cp: &ControlPlane,
    kind: &str,
    name: &str,
    ns: Option<&str>,
    path: &str,
) -> Result<String> {
    let mut args = vec!["get", kind, name];
    args.extend(ns.map(|ns| ["-n", ns]).into_iter().flatten());
    let jsonpath = format!("jsonpath={path}");
    args.extend(["-o", &jsonpath]);
    cp.kubectl(&args)
}

/// The release's operator Deployment's `spec.replicas`.
fn operator_replicas(cp: &ControlPlane, ns: &str) -> Result<String> {
    get_jsonpath(
        cp,
        "deployment",
        "nanogate-operator",
        Some(ns),
        "{.spec.replicas}",
    )
}

async fn uninstall_and_wait(
    kubeconfig: &Path,
    release: &str,
    ns: &str,
    timeout: Duration,
) -> Result<()> {
    helm(kubeconfig, &["uninstall", release, ns])?;
    wait_for("the release's objects to be gone", timeout, || async move {
        let left = release_leftovers(kubeconfig, release, ns)?;
        if left.is_empty() {
            Ok(Some(()))
        } else {
            bail!("still present: {left:?}")
        }
    })
    .await
}

/// Objects of the release still present, as `kind/name` (namespaced ones in `ns`).
fn release_leftovers(kubeconfig: &Path, release: &str, ns: &str) -> Result<Vec<String>> {
    let selector = format!("app.kubernetes.io/instance={release}");
    let mut left: Vec<String> = Vec::new();
    for (kinds, namespaced) in [
        (
            "deployments,replicasets,pods,services,serviceaccounts,configmaps,secrets,roles,rolebindings,poddisruptionbudgets,networkpolicies",
            true,
        ),
        (
            "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,validatingwebhookconfigurations",
            false,
        ),
    ] {
        let mut a = vec!["get", kinds, "-l", &selector, "-o", "name"];
        if namespaced {
            a.extend(["-n", ns]);
        }
        left.extend(
            nanogate_e2e::run_kubectl(kubeconfig, &a)?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    // Helm's release records and the token Secrets of the chart's ServiceAccount.
    for line in
        nanogate_e2e::run_kubectl(kubeconfig, &["get", "secrets", "-n", ns, "-o", "name"])?.lines()
    {
        if line.contains("sh.helm.release") || line.contains("-operator-token-") {
            left.push(line.to_string());
        }
    }
    Ok(left)
}

#[tokio::test]
async fn helm_install_upgrade_uninstall_leaves_only_the_crd() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let kubeconfig = cp.kubeconfig_path();
    let ns = TestNamespace::create(&client, "chart-install").await?;
    let release = "nanogate";
    // Nothing listens on 127.0.0.1:1: with failurePolicy Ignore every pod is admitted, and
    // every AgentGateway too (the validator's default Fail would refuse the gateways of the
    // other tests sharing this apiserver while the release is installed).
    let local = ValuesFile::new(
        Some(LOCAL_DEVELOPMENT),
        serde_json::json!({
            "localDevelopment": {"webhookURL": "https://127.0.0.1:1"},
            "webhook": {"validate": {"failurePolicy": "Ignore"}},
        }),
    )?;
    let installed = helm_release(kubeconfig, "install", release, ns.name(), &local)?;
    assert!(installed.to_string().contains("deployed"), "{installed}");
    // Helm installed the CRD from crds/.
    cp.kubectl(&["get", "crd", "agentgateways.nanogate.io"])?;
    let url = get_jsonpath(
        cp,
        "mutatingwebhookconfiguration",
        "nanogate-injector",
        None,
        "{.webhooks[0].clientConfig.url}",
    )?;
    assert_eq!(url, "https://127.0.0.1:1/mutate");
    let replicas = operator_replicas(cp, ns.name())?;
    assert_eq!(replicas, "0");
    // The operator's ServiceAccount may do what it needs, and not more.
    let can = |args: &[&str]| can_i(kubeconfig, ns.name(), "nanogate-operator", args);
    assert!(can(&[
        "patch",
        "agentgateways.nanogate.io",
        "--subresource=status",
        "-A"
    ])?);
    assert!(can(&["create", "tokenreviews.authentication.k8s.io"])?);
    assert!(can(&[
        "update",
        "leases.coordination.k8s.io/nanogate-operator",
        "-n",
        ns.name()
    ])?);
    assert!(can(&[
        "update",
        "secrets/nanogate-webhook-certs",
        "-n",
        ns.name()
    ])?);
    assert!(can(&[
        "patch",
        "mutatingwebhookconfigurations/nanogate-injector"
    ])?);
    assert!(!can(&[
        "patch",
        "mutatingwebhookconfigurations/someone-elses"
    ])?);
    assert!(!can(&["update", "secrets/anything", "-n", "kube-system"])?);
    assert!(!can(&["list", "secrets", "-A"])?);
    assert!(!can(&["watch", "secrets", "-A"])?);
    assert!(!can(&["list", "secrets", "-n", ns.name()])?);
    assert!(can(&["get", "secrets/api-key", "-n", "default"])?);
    assert!(!can(&["patch", "pods", "-n", "default"])?);
    assert!(!can(&["delete", "pods", "-A"])?);

    // Upgrade to the in-cluster mode: 2 replicas, Service-backed webhooks, and a
    // PodDisruptionBudget whose API version Helm picks from what this apiserver serves.
    let cluster = ValuesFile::new(
        None,
        serde_json::json!({"webhook": {"failurePolicy": "Ignore"}}),
    )?;
    let upgraded = helm_release(kubeconfig, "upgrade", release, ns.name(), &cluster)?;
    assert!(upgraded.to_string().contains("deployed"), "{upgraded}");
    let service = get_jsonpath(
        cp,
        "mutatingwebhookconfiguration",
        "nanogate-injector",
        None,
        "{.webhooks[0].clientConfig.service.name}",
    )?;
    assert_eq!(service, "nanogate-webhook");
    let replicas = operator_replicas(cp, ns.name())?;
    assert_eq!(replicas, "2");
    cp.kubectl(&[
        "get",
        "poddisruptionbudget",
        "nanogate-operator",
        "-n",
        ns.name(),
    ])?;

    uninstall_and_wait(kubeconfig, release, ns.name(), Duration::from_secs(90)).await?;
    // Helm keeps CRDs (and with them every AgentGateway) on uninstall, by design.
    cp.kubectl(&["get", "crd", "agentgateways.nanogate.io"])?;
    Ok(())
}

/// Sum of the samples of `metric` on the operator's admin server (0 when absent).
fn scrape(admin_port: u16, metric: &str) -> Result<f64> {
    nanogate_e2e::scrape(&format!("127.0.0.1:{admin_port}"), metric)
}

/// A kubeconfig that authenticates as the chart's ServiceAccount (its token Secret, which
/// Kubernetes 1.20 creates), so the local operator runs with exactly the chart's RBAC.
async fn service_account_kubeconfig(cp: &ControlPlane, ns: &str, sa: &str) -> Result<PathBuf> {
    use base64::Engine as _;
    let secret = wait_for(
        "the ServiceAccount's token Secret",
        Duration::from_secs(30),
        || async move {
            let name = cp.kubectl(&[
                "get",
                "serviceaccount",
                sa,
                "-n",
                ns,
                "-o",
                "jsonpath={.secrets[0].name}",
            ])?;
            Ok((!name.is_empty()).then_some(name))
        },
    )
    .await?;
    let token = cp.kubectl(&[
        "get",
        "secret",
        &secret,
        "-n",
        ns,
        "-o",
        "jsonpath={.data.token}",
    ])?;
    let token = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(token.trim())?)?;
    let ca = base64::engine::general_purpose::STANDARD.encode(cp.ca_pem());
    let path = cp.dir().join(format!("kubeconfig-{sa}-{ns}"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: {sa}\n  user:\n    token: {token}\ncontexts:\n- name: {sa}\n  context: {{cluster: e2e, user: {sa}}}\ncurrent-context: {sa}\n",
            cp.server()
        ),
    )?;
    Ok(path)
}

/// Helm installs the chart in local-development mode; the operator binary runs as a local
/// process with the arguments the chart renders (listen addresses moved to loopback) and the
/// chart's ServiceAccount token, so every API call it makes goes through the chart's RBAC.
/// It patches caBundle into the Helm-installed webhook configurations, takes the Lease,
/// validates and reconciles a gateway, and injects a pod through the chart's webhook. The
/// pod's nano-agent then runs locally (stand-in kubelet) against a local platform, and a real
/// Prometheus scraping operator and agent answers every dashboard query. After
/// `helm uninstall` only the CRD and what the operator itself created (its certificate Secret
/// and Lease, which are not part of the release) remain.
#[tokio::test]
async fn helm_installed_chart_serves_a_local_operator_under_the_charts_rbac() -> Result<()> {
    let bin = operator_binary()?;
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let kubeconfig = cp.kubeconfig_path();
    let ns = TestNamespace::create(&client, "chart-flow").await?;
    let apps = TestNamespace::create(&client, "chart-apps").await?;
    let (webhook_port, hub_port, admin_port) = (free_port()?, free_port()?, free_port()?);
    let release = "flow";
    let values = ValuesFile::new(
        Some(LOCAL_DEVELOPMENT),
        serde_json::json!({
            "leaderElection": {"enabled": true},
            "statusInterval": "1s",
            "webhook": {"extraSANs": ["127.0.0.1"], "failurePolicy": "Fail"},
            "localDevelopment": {
                "webhookURL": format!("https://127.0.0.1:{webhook_port}"),
                "hubAdvertise": format!("127.0.0.1:{hub_port}"),
            },
        }),
    )?;
    helm_release(kubeconfig, "install", release, ns.name(), &values)?;
    let (objects, _) = render(kubeconfig, release, ns.name(), &values.path())?;
    let mutating = name(one(&objects, "MutatingWebhookConfiguration")?).to_string();
    let validating = name(one(&objects, "ValidatingWebhookConfiguration")?).to_string();
    let args: Vec<String> = args(one(&objects, "Deployment")?)
        .into_iter()
        .map(|a| match a.split_once('=') {
            Some(("--admin-addr", _)) => format!("--admin-addr=127.0.0.1:{admin_port}"),
            Some(("--webhook-addr", _)) => format!("--webhook-addr=127.0.0.1:{webhook_port}"),
            Some(("--hub-addr", _)) => format!("--hub-addr=127.0.0.1:{hub_port}"),
            _ => a,
        })
        .collect();
    let sa = name(one(&objects, "ServiceAccount")?).to_string();
    let sa_kubeconfig = service_account_kubeconfig(cp, ns.name(), &sa).await?;
    let mut operator = nanogate_e2e::Process::spawn_with_env(
        "operator-chart-flow",
        &bin,
        &args,
        &[
            ("KUBECONFIG", sa_kubeconfig.display().to_string()),
            ("POD_NAMESPACE", ns.name().to_string()),
            ("POD_NAME", "flow-local".into()),
            ("RUST_LOG", "info,kube=warn".into()),
        ],
        cp.dir(),
    )?;
    let result = flow(
        cp,
        &client,
        &ns,
        &apps,
        &mutating,
        &validating,
        admin_port,
        hub_port,
    )
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", operator.log_tail(60));
    }
    operator.stop();
    result?;
    // Least privilege is also enough privilege: RBAC never refused the operator anything.
    // An RBAC refusal reads `… is forbidden: User "…" cannot <verb> resource …`; other 403s
    // (an event into another test's namespace that is being terminated) are not RBAC's.
    let log = std::fs::read_to_string(&operator.log)?;
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("forbidden") && l.contains(" cannot ")
        })
        .collect();
    assert!(
        refused.is_empty(),
        "the chart's RBAC refused the operator: {refused:#?}"
    );

    uninstall_and_wait(kubeconfig, release, ns.name(), Duration::from_secs(60)).await?;
    // What the operator created itself (its certificate Secret and its Lease) is not part of
    // the release, but it is owned by the release's MutatingWebhookConfiguration, so the
    // garbage collector removes it too: only the CRD stays.
    let (kc, ns_name) = (kubeconfig.to_path_buf(), ns.name().to_string());
    wait_for(
        "the operator's Secret and Lease to be collected",
        Duration::from_secs(60),
        || {
            let (kc, ns_name) = (kc.clone(), ns_name.clone());
            async move {
                let secrets = nanogate_e2e::run_kubectl(
                    &kc,
                    &["get", "secrets", "-n", &ns_name, "-o", "name"],
                )?;
                let leases = nanogate_e2e::run_kubectl(
                    &kc,
                    &["get", "leases", "-n", &ns_name, "-o", "name"],
                )?;
                let left: Vec<String> = secrets
                    .lines()
                    .chain(leases.lines())
                    .filter(|l| !l.trim().is_empty() && !l.contains("default-token-"))
                    .map(str::to_string)
                    .collect();
                if left.is_empty() {
                    Ok(Some(()))
                } else {
                    bail!("still present: {left:?}")
                }
            }
        },
    )
    .await?;
    cp.kubectl(&["get", "crd", "agentgateways.nanogate.io"])?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn flow(
    cp: &ControlPlane,
    client: &kube::Client,
    ns: &TestNamespace,
    apps: &TestNamespace,
    mutating: &str,
    validating: &str,
    admin_port: u16,
    hub_port: u16,
) -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::Api;
    use kube::api::PostParams;

    // Certificates: the operator created its CA and patched caBundle into both webhook
    // configurations that Helm installed without one.
    for (k, n) in [
        ("mutatingwebhookconfiguration", mutating),
        ("validatingwebhookconfiguration", validating),
    ] {
        wait_for(
            &format!("caBundle in {k} {n}"),
            Duration::from_secs(60),
            || async move {
                let ca = cp.kubectl(&[
                    "get",
                    k,
                    n,
                    "-o",
                    "jsonpath={.webhooks[0].clientConfig.caBundle}",
                ])?;
                Ok((ca.len() > 100).then_some(()))
            },
        )
        .await?;
    }
    // Leader election through the Role's Lease rules.
    wait_for("the local operator to lead", Duration::from_secs(60), || async move {
        Ok((scrape(admin_port, "nanogate_operator_leader")? == 1.0).then_some(()))
    })
    .await?;

    // A gateway: validated by the chart's ValidatingWebhookConfiguration, reconciled into a
    // ConfigMap and a Ready condition. Its upstream is a local platform receiver.
    let platform = nanogate_tests::platform::PlatformServer::start_with_key("e2e-key").await?;
    nanogate_e2e::apply_yaml(
        cp.kubeconfig_path(),
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: platform-key, namespace: {ns}}}\nstringData: {{apiKey: e2e-key}}\n---\napiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {{name: shop, namespace: {ns}}}\nspec:\n  upstream: {{kind: http, url: '{url}', apiKeySecretRef: {{name: platform-key, key: apiKey}}}}\n  heartbeatInterval: 1s\n  batching: {{flushInterval: 100ms}}\n",
            ns = apps.name(),
            url = platform.url()
        ),
    )?;
    let denied = nanogate_e2e::apply_yaml(
        cp.kubeconfig_path(),
        &format!(
            "apiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {{name: bad, namespace: {}}}\nspec:\n  upstream: {{kind: http, url: 'http://127.0.0.1:9', apiKeySecretRef: {{name: platform-key, key: apiKey}}}}\n  batching: {{minBatchSize: 300, maxBatchSize: 200}}\n",
            apps.name()
        ),
    );
    let error = format!(
        "{:#}",
        denied.err().context("an invalid gateway was accepted")?
    );
    assert!(error.contains("validate.nanogate.io"), "{error}");
    let apps_name = apps.name().to_string();
    wait_for("gateway shop to be Ready", Duration::from_secs(60), || {
        let apps_name = apps_name.clone();
        async move {
            let ready = cp.kubectl(&[
                "get",
                "agentgateway",
                "shop",
                "-n",
                &apps_name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])?;
            Ok((ready == "True").then_some(()))
        }
    })
    .await?;
    let maps = cp.kubectl(&[
        "get",
        "configmaps",
        "-n",
        apps.name(),
        "-l",
        "app.kubernetes.io/managed-by=nanogate-operator",
        "-o",
        "name",
    ])?;
    assert!(!maps.trim().is_empty(), "no sidecar ConfigMap");
    // Events go through the chart's events.k8s.io rule.
    let events = cp.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        apps.name(),
        "-o",
        "name",
    ])?;
    assert!(!events.trim().is_empty(), "the operator recorded no event");

    // A pod opted in is injected through the chart's MutatingWebhookConfiguration and told to
    // dial the hub address the chart configured.
    let pods: Api<Pod> = Api::namespaced(client.clone(), apps.name());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "shop", "annotations": {"nanogate.io/inject": "true"}},
        "spec": {"containers": [{"name": "shop", "image": "python:3.12-slim"}]}
    }))?;
    let injected = wait_for(
        "the webhook to inject a pod",
        Duration::from_secs(30),
        || {
            let (pods, pod) = (pods.clone(), pod.clone());
            async move {
                let params = PostParams {
                    dry_run: true,
                    ..Default::default()
                };
                let dry = pods.create(&params, &pod).await?;
                let injected = dry.spec.as_ref().is_some_and(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                        .any(|c| c.name == "nano-agent")
                });
                Ok(injected.then_some(()))
            }
        },
    );
    injected.await?;
    let stored = pods.create(&PostParams::default(), &pod).await?;
    let spec = stored.spec.clone().context("pod spec")?;
    let agent = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == "nano-agent")
        .context("nano-agent injected")?;
    let hub = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NANOGATE_HUB_ADDR")
        .and_then(|e| e.value.clone());
    assert_eq!(hub, Some(format!("127.0.0.1:{hub_port}")));
    assert!(scrape(admin_port, "nanogate_webhook_requests_total")? >= 1.0);

    // Stand in for the kubelet: run the pod's injected nano-agent locally, and send messages
    // through its socket, one upstream failure (retried) and one platform rejection
    // (dead-lettered) included, so every dashboard series exists.
    // The agent takes its upstream from the gateway's ConfigMap and dials the hub with the CA
    // from it, exactly as injected.
    let mut agent = nanogate_e2e::kubelet::run_sidecar(
        client,
        &stored,
        &built_binary("nano-agent", "nanogate-sidecar")?,
        &cp.dir().join(format!("pod-{}", apps.name())),
    )
    .await?;
    let result = fleet_and_dashboard(cp, apps, &platform, &agent, admin_port, hub_port).await;
    if result.is_err() {
        eprintln!("nano-agent log:\n{}", agent.process.log_tail(40));
    }
    agent.process.stop();
    result?;
    // Nothing in the operator's own namespace is injected, opted in or not (the chart's
    // namespaceSelector on >= 1.21; on 1.20 the call arrives and the operator skips it).
    let own: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let mut probe = pod.clone();
    probe.metadata.namespace = Some(ns.name().to_string());
    let created = own.create(&params, &probe).await?;
    let spec = created.spec.context("pod spec")?;
    assert!(
        !spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == "nano-agent"),
        "a pod in the operator's namespace was injected"
    );
    Ok(())
}

/// One app message to the agent's socket; the reply when one is expected.
fn send(socket: &Path, message: &Value, expect_reply: bool) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(message.to_string().as_bytes())?;
    if !expect_reply {
        return Ok(String::new());
    }
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every PromQL query of the dashboard (panel targets and `label_values` variables) as
/// (what, query, label the result must carry), with the dashboard variables substituted.
fn dashboard_queries(rate_interval: &str) -> Result<Vec<(String, String, Option<String>)>> {
    let dashboard = dashboard()?;
    let fill = |q: &str| {
        q.replace("$__rate_interval", rate_interval)
            .replace("$namespace", ".*")
            .replace("$gateway", ".*")
    };
    let mut out = Vec::new();
    for panel in all_panels(&dashboard)? {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().context("expr")?;
            out.push((
                format!("panel {} {}", panel["title"], t["refId"]),
                fill(expr),
                None,
            ));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .context("templating")?
    {
        let Some(q) = var["query"]["query"].as_str() else {
            continue;
        };
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .with_context(|| format!("variable query {q}"))?;
        let (selector, label) = inner
            .rsplit_once(',')
            .context("label_values(selector, label)")?;
        out.push((
            format!("variable {}", var["name"]),
            fill(selector.trim()),
            Some(label.trim().to_string()),
        ));
    }
    Ok(out)
}

/// The fleet through the chart's hub and the operator's status, then a real Prometheus
/// scraping the operator and the sidecar evaluates every dashboard query.
async fn fleet_and_dashboard(
    cp: &ControlPlane,
    apps: &TestNamespace,
    platform: &nanogate_tests::platform::PlatformServer,
    agent: &nanogate_e2e::kubelet::LocalSidecar,
    admin_port: u16,
    hub_port: u16,
) -> Result<()> {
    let socket = agent.socket.clone();
    wait_for("the agent's socket", Duration::from_secs(30), || {
        let socket = socket.clone();
        async move {
            Ok(std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(|_| ()))
        }
    })
    .await?;
    platform.faults().fail_next(1, 500);
    let publish = |data: Value| {
        send(
            &socket,
            &serde_json::json!({"msg_type": "publish", "data": data}),
            false,
        )
    };
    for i in 0..5 {
        publish(serde_json::json!({"n": i}))?;
    }
    let admin = agent.admin_addr.clone();
    let at_least = |metric: &'static str, n: f64| {
        let admin = admin.clone();
        async move {
            wait_for(&format!("{metric} >= {n}"), Duration::from_secs(30), || {
                let admin = admin.clone();
                async move { Ok((nanogate_e2e::scrape(&admin, metric)? >= n).then_some(())) }
            })
            .await
        }
    };
    // The first batch fails once with 500 and is retried.
    at_least("nanogate_sidecar_delivered_total", 5.0).await?;
    // The next one is refused for good and dead-lettered.
    platform.faults().reject_next(1, 400);
    publish(serde_json::json!({"n": "refused"}))?;
    at_least("nanogate_sidecar_dead_lettered_total", 1.0).await?;
    let reply = send(
        &socket,
        &serde_json::json!({"data": {"no": "msg_type"}}),
        true,
    )?;
    ensure!(
        reply.contains("error"),
        "no error for a message without msg_type: {reply}"
    );
    for i in 5..10 {
        publish(serde_json::json!({"n": i}))?;
    }
    at_least("nanogate_sidecar_delivered_total", 10.0).await?;
    ensure!(
        platform.received_count() >= 10,
        "the platform holds {} messages",
        platform.received_count()
    );

    // The sidecar does not dial the hub yet (sidecar/src/control.rs is not started by
    // main.rs), so status.sidecars stays empty and no agent notification reaches the hub.
    // A client that is not an agent still exercises the hub the chart points sidecars at:
    // it is denied, and counted.
    {
        use std::io::Write;
        let mut stranger = std::net::TcpStream::connect(("127.0.0.1", hub_port))?;
        stranger.write_all(b"GET / HTTP/1.1\r\n\r\n")?;
    }
    wait_for(
        "the hub to count a denied connection",
        Duration::from_secs(30),
        || async move {
            Ok((scrape(admin_port, "nanogate_hub_connections_total")? >= 1.0).then_some(()))
        },
    )
    .await?;

    // A real Prometheus scrapes both, labelled as the chart's PodMonitor/ServiceMonitor do.
    let prometheus = Path::new("/usr/bin/prometheus");
    ensure!(
        prometheus.exists(),
        "{} not found: apt-get install prometheus (Debian package)",
        prometheus.display()
    );
    let port = free_port()?;
    let dir = cp.dir().join(format!("prometheus-{}", apps.name()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\nrule_files: ['{rules}']\nscrape_configs:\n- job_name: nanogate-operator\n  static_configs:\n  - targets: ['127.0.0.1:{admin_port}']\n    labels: {{namespace: nanogate-system, pod: nanogate-operator-local}}\n- job_name: nanogate-sidecars\n  static_configs:\n  - targets: ['{agent}']\n    labels: {{namespace: {ns}, pod: shop, gateway: shop}}\n",
            agent = agent.admin_addr,
            ns = apps.name(),
            rules = workspace_root().join(ALERTS).display(),
        ),
    )?;
    let mut server = nanogate_e2e::Process::spawn(
        "prometheus-chart",
        prometheus,
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ],
        cp.dir(),
    )?;
    let addr = format!("127.0.0.1:{port}");
    let mut result = evaluate_dashboard(&addr).await;
    if result.is_ok() {
        result = evaluate_alerts(&addr).await;
    }
    if result.is_err() {
        eprintln!("prometheus log:\n{}", server.log_tail(20));
    }
    server.stop();
    result
}

async fn evaluate_dashboard(addr: &str) -> Result<()> {
    let addr: std::net::SocketAddr = addr.parse()?;
    // Prometheus evaluates a query within its own timeout; allow it that long.
    let http_get = |path: &str| nanogate_tests::http::http_get(addr, path, Duration::from_secs(10));
    wait_for(
        "Prometheus to be ready",
        Duration::from_secs(30),
        || async move {
            Ok(http_get("/-/ready")
                .ok()
                .filter(|(c, _)| *c == 200)
                .map(|_| ()))
        },
    )
    .await?;
    let queries = dashboard_queries("20s")?;
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    // Every query must return at least one series (rates need two scrapes in the window).
    let missing = wait_for(
        "every dashboard query to return series",
        Duration::from_secs(60),
        || {
            let queries = queries.clone();
            async move {
                let mut missing = Vec::new();
                for (what, query, label) in &queries {
                    let (code, body) =
                        http_get(&format!("/api/v1/query?query={}", url_encode(query)))?;
                    ensure!(code == 200, "{what}: HTTP {code} for {query}: {body}");
                    let answer: Value = serde_json::from_str(&body)?;
                    ensure!(answer["status"] == "success", "{what}: {query}: {body}");
                    let series = answer["data"]["result"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let ok = match label {
                        Some(l) => series.iter().any(|s| s["metric"][l].is_string()),
                        None => !series.is_empty(),
                    };
                    if !ok {
                        missing.push(format!("{what}: {query}"));
                    }
                }
                if missing.is_empty() {
                    Ok(Some(()))
                } else {
                    bail!("{} queries return no series: {missing:#?}", missing.len())
                }
            }
        },
    );
    missing.await
}

/// The chart's alerting rules, loaded into the same Prometheus: every rule evaluates with
/// health `ok` and no error, and every metric an alert expression names has series there (a
/// renamed metric would leave an alert silently empty).
async fn evaluate_alerts(addr: &str) -> Result<()> {
    let addr: std::net::SocketAddr = addr.parse()?;
    let http_get = |path: &str| nanogate_tests::http::http_get(addr, path, Duration::from_secs(10));
    let alerts = alerts()?;
    let names: BTreeSet<String> = alerts.iter().map(|(n, _, _)| n.clone()).collect();
    wait_for(
        "every alerting rule to evaluate with health ok",
        Duration::from_secs(60),
        || {
            let names = names.clone();
            async move {
                let (code, body) = http_get("/api/v1/rules?type=alert")?;
                ensure!(code == 200, "HTTP {code} for /api/v1/rules: {body}");
                let answer: Value = serde_json::from_str(&body)?;
                let mut seen = BTreeSet::new();
                let mut unhealthy = Vec::new();
                for group in answer["data"]["groups"].as_array().into_iter().flatten() {
                    for rule in group["rules"].as_array().into_iter().flatten() {
                        let name = rule["name"].as_str().unwrap_or_default().to_string();
                        let error = rule["lastError"].as_str().unwrap_or_default();
                        if rule["health"] != "ok" || !error.is_empty() {
                            unhealthy.push(format!("{name}: {} {error}", rule["health"]));
                        }
                        seen.insert(name);
                    }
                }
                ensure!(
                    seen == names,
                    "Prometheus loaded {seen:?}, the file has {names:?}"
                );
                if unhealthy.is_empty() {
                    Ok(Some(()))
                } else {
                    bail!("rules not ok: {unhealthy:#?}")
                }
            }
        },
    )
    .await?;
    let mut missing = Vec::new();
    for (name, expr, _) in &alerts {
        for token in metric_tokens(expr) {
            let query = format!("count({{__name__=\"{token}\"}})");
            let (code, body) = http_get(&format!("/api/v1/query?query={}", url_encode(&query)))?;
            ensure!(code == 200, "{name}: HTTP {code} for {query}: {body}");
            let answer: Value = serde_json::from_str(&body)?;
            if answer["data"]["result"]
                .as_array()
                .is_none_or(Vec::is_empty)
            {
                missing.push(format!("{name}: {token}"));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "alert expressions name metrics Prometheus never scraped: {missing:#?}"
    );
    Ok(())
}

/// Walks `values` beside `schema`: every key must be declared, with a description.
fn check_documented(values: &Value, schema: &Value, path: &str, missing: &mut Vec<String>) {
    let Some(map) = values.as_object() else {
        return;
    };
    let Some(props) = schema["properties"].as_object() else {
        return; // a free-form map (resources, nodeSelector, …)
    };
    for (key, value) in map {
        let here = format!("{path}.{key}");
        match props.get(key) {
            None => missing.push(format!("{here}: not in values.schema.json")),
            Some(s) => {
                if s["description"].as_str().is_none_or(str::is_empty) {
                    missing.push(format!("{here}: no description in values.schema.json"));
                }
                check_documented(value, s, &here, missing);
            }
        }
    }
}

#[test]
fn every_value_is_typed_and_documented() -> Result<()> {
    let dir = workspace_root().join(CHART);
    let values: Value = serde_yaml::from_str(&std::fs::read_to_string(dir.join("values.yaml"))?)?;
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("values.schema.json"))?)?;
    let mut missing = Vec::new();
    check_documented(&values, &schema, "", &mut missing);
    assert!(missing.is_empty(), "{missing:#?}");
    // values.yaml explains each top-level value in a comment right above it.
    let text = std::fs::read_to_string(dir.join("values.yaml"))?;
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let top_level_key = line
            .split_once(':')
            .is_some_and(|(k, _)| !k.is_empty() && !k.starts_with([' ', '#', '-']));
        if top_level_key {
            let previous = lines[..i].iter().rev().find(|l| !l.trim().is_empty());
            let documented = previous.is_some_and(|p| p.trim_start().starts_with('#'))
                || values[line.split(':').next().unwrap_or_default()].is_object();
            assert!(
                documented,
                "values.yaml line {}: `{line}` has no comment",
                i + 1
            );
        }
    }
    Ok(())
}

/// `webhook.inject.labelledPodsOnly` is what spares the other pods: with the webhook down
/// (its URL points at a port nobody listens on) and `failurePolicy: Fail`, the chart's
/// rendered MutatingWebhookConfiguration, applied to the real apiserver and scoped to this
/// test's namespace with `webhook.namespaceSelector`, refuses every pod with today's default
/// scope, while in the label-only mode a pod without the label (even one annotated
/// `nanogate.io/inject: "true"`) is created and only the labelled pod is refused — until the
/// namespace itself opts in (`nanogate.io/injection=enabled`), whose pods the second webhook
/// takes.
#[tokio::test]
async fn label_only_injection_spares_unlabelled_pods_while_the_webhook_is_down() -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, DeleteParams, PostParams};

    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let kubeconfig = cp.kubeconfig_path();
    let release = TestNamespace::create(&client, "scope-rel").await?;
    let apps = TestNamespace::create(&client, "scope-apps").await?;
    const SCOPE_LABEL: &str = "nanogate.io/e2e-scope";
    cp.kubectl(&[
        "label",
        "namespace",
        apps.name(),
        &format!("{SCOPE_LABEL}={}", apps.name()),
    ])?;
    let dead = free_port()?; // nothing listens here: the webhook is down
    let mutating = |labelled_pods_only: bool| -> Result<(String, String)> {
        let values = ValuesFile::new(
            Some(LOCAL_DEVELOPMENT),
            serde_json::json!({
                "localDevelopment": {"webhookURL": format!("https://127.0.0.1:{dead}")},
                "webhook": {
                    "namespaceSelector": {"matchLabels": {SCOPE_LABEL: apps.name()}},
                    "inject": {"labelledPodsOnly": labelled_pods_only, "failurePolicy": "Fail"},
                },
            }),
        )?;
        let (objects, _) = render(kubeconfig, release.name(), release.name(), &values.path())?;
        let config = one(&objects, "MutatingWebhookConfiguration")?;
        Ok((name(config).to_string(), serde_yaml::to_string(config)?))
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), apps.name());
    fn pod(name: &str, labels: Value, annotations: Value) -> Result<Pod> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "python:3.12-slim"}]}
        }))?)
    }
    let labelled = pod(
        "labelled",
        serde_json::json!({"nanogate.io/inject": "true"}),
        serde_json::json!({}),
    )?;
    let plain = pod(
        "plain",
        serde_json::json!({"app": "other"}),
        serde_json::json!({}),
    )?;
    let annotated = pod(
        "annotated",
        serde_json::json!({}),
        serde_json::json!({"nanogate.io/inject": "true"}),
    )?;
    // Refused by the webhook call (retried until the apiserver has picked the configuration
    // up); returns the message.
    let refused = |pod: &Pod| {
        let (pods, pod) = (pods.clone(), pod.clone());
        async move {
            wait_for(
                "the apiserver to call the dead webhook",
                Duration::from_secs(30),
                || {
                    let (pods, pod) = (pods.clone(), pod.clone());
                    async move {
                        match pods.create(&PostParams::default(), &pod).await {
                            Ok(p) => {
                                let name = p.metadata.name.unwrap_or_default();
                                pods.delete(&name, &DeleteParams::default().grace_period(0))
                                    .await?;
                                Ok(None)
                            }
                            Err(kube::Error::Api(e))
                                if e.message.contains("failed calling webhook") =>
                            {
                                Ok(Some(e.message))
                            }
                            Err(e) => Err(e.into()),
                        }
                    }
                },
            )
            .await
        }
    };

    // Today's default scope: every pod CREATE reaches the dead webhook, and Fail refuses all.
    let (config, yaml) = mutating(false)?;
    let result = async {
        nanogate_e2e::apply_yaml(kubeconfig, &yaml)?;
        let message = refused(&plain).await?;
        ensure!(message.contains("\"inject.nanogate.io\""), "{message}");

        // The label-only mode: only the labelled pod meets the webhook. The apiserver picks
        // an updated configuration up a moment later (the old one refused every pod), so the
        // first unlabelled pod is retried until the new scope is in force; from then on no
        // unlabelled pod may meet the webhook.
        let (same, yaml) = mutating(true)?;
        ensure!(same == config, "{same} != {config}");
        nanogate_e2e::apply_yaml(kubeconfig, &yaml)?;
        wait_for(
            "the apiserver to apply the label-only scope",
            Duration::from_secs(30),
            || async {
                match pods.create(&PostParams::default(), &plain).await {
                    Ok(_) => Ok(Some(())),
                    Err(kube::Error::Api(e)) if e.message.contains("failed calling webhook") => {
                        Ok(None)
                    }
                    Err(e) => Err(e.into()),
                }
            },
        )
        .await?;
        let created = pods.create(&PostParams::default(), &annotated).await;
        ensure!(
            created.is_ok(),
            "a pod without the label was sent to the webhook: {created:?}"
        );
        let message = refused(&labelled).await?;
        ensure!(message.contains("\"inject.nanogate.io\""), "{message}");
        // The namespace opts in: its unlabelled pods now go to the second webhook
        // (inject-namespace.nanogate.io), down too.
        cp.kubectl(&[
            "label",
            "namespace",
            apps.name(),
            "nanogate.io/injection=enabled",
        ])?;
        let mut unlabelled = plain.clone();
        unlabelled.metadata.name = Some("plain-in-opted-in-namespace".into());
        let message = refused(&unlabelled).await?;
        ensure!(
            message.contains("inject-namespace.nanogate.io"),
            "{message}"
        );
        Ok(())
    }
    .await;
    let _ = cp.kubectl(&[
        "delete",
        "mutatingwebhookconfiguration",
        &config,
        "--ignore-not-found",
    ]);
    result
}

/// `helm test`: a ServiceAccount, a Role that may only create AgentGateways in the release
/// namespace, its RoleBinding and a Pod Security "restricted" pod running
/// `nanogate-operator selftest` from the operator image against the metrics Service — all test
/// hooks, so `helm install` creates none of them — and the apiserver accepts them.
#[tokio::test]
async fn helm_test_hook_runs_the_selftest_with_least_privilege() -> Result<()> {
    let (kubeconfig, ns, served) = render_env("chart-test-hook").await?;
    let values = ValuesFile::new(None, pdb_values(&served))?;
    let (all, _) = render_all(kubeconfig, "nanogate", ns.name(), &values.path())?;
    let hooks: Vec<Value> = all.iter().filter(|o| is_test_hook(o)).cloned().collect();
    let mut kinds: Vec<&str> = hooks.iter().map(kind).collect();
    kinds.sort();
    assert_eq!(kinds, ["Pod", "Role", "RoleBinding", "ServiceAccount"]);
    for h in &hooks {
        assert_eq!(h["metadata"]["namespace"], ns.name(), "{}", kind(h));
        assert_eq!(name(h), "nanogate-selftest", "{}", kind(h));
        assert_eq!(
            h["metadata"]["annotations"]["helm.sh/hook-delete-policy"],
            "before-hook-creation,hook-succeeded"
        );
    }
    let role = one(&hooks, "Role")?;
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": ["nanogate.io"], "resources": ["agentgateways"], "verbs": ["create"]}]),
        "least privilege: create AgentGateways (dry run), nothing else"
    );
    let binding = one(&hooks, "RoleBinding")?;
    assert_eq!(binding["roleRef"]["name"], "nanogate-selftest");
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "nanogate-selftest", "namespace": ns.name()}])
    );
    let pod = one(&hooks, "Pod")?;
    let spec = &pod["spec"];
    assert_eq!(spec["serviceAccountName"], "nanogate-selftest");
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &spec["containers"][0];
    let deployment = one(&all, "Deployment")?;
    assert_eq!(
        container["image"], deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "the operator image"
    );
    assert_eq!(
        container["args"],
        serde_json::json!([
            "selftest",
            format!("--url=http://nanogate-metrics.{}.svc:8080", ns.name()),
            format!("--namespace={}", ns.name()),
            "--timeout=10s",
        ])
    );
    let sc = &container["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    ensure!(
        container["resources"]["limits"]["memory"].is_string(),
        "no memory limit"
    );
    // The metrics Service the URL names exists and targets the admin port (/readyz).
    let metrics = service(&all, "-metrics")?;
    assert_eq!(name(metrics), "nanogate-metrics");
    // `helm install` creates none of them, and the deploy/ manifest has none either.
    let (installed, _) = render(kubeconfig, "nanogate", ns.name(), &values.path())?;
    assert!(
        !installed.iter().any(|o| name(o) == "nanogate-selftest"),
        "a test hook is rendered for install"
    );
    // The pod's admission looks its ServiceAccount up: create that one for real.
    nanogate_e2e::apply_yaml(
        kubeconfig,
        &serde_yaml::to_string(one(&hooks, "ServiceAccount")?)?,
    )?;
    let skipped = dry_run(kubeconfig, &hooks, &served)?;
    assert!(skipped.is_empty(), "skipped {skipped:?}");
    // With the Role and RoleBinding created for real, the ServiceAccount may create
    // AgentGateways in the release namespace, and nothing else.
    for k in ["Role", "RoleBinding"] {
        nanogate_e2e::apply_yaml(kubeconfig, &serde_yaml::to_string(one(&hooks, k)?)?)?;
    }
    let can = |args: &[&str]| can_i(kubeconfig, ns.name(), "nanogate-selftest", args);
    assert!(can(&[
        "create",
        "agentgateways.nanogate.io",
        "-n",
        ns.name()
    ])?);
    for denied in [
        &["create", "agentgateways.nanogate.io", "-n", "default"][..],
        &["get", "agentgateways.nanogate.io", "-n", ns.name()],
        &["delete", "agentgateways.nanogate.io", "-n", ns.name()],
        &["update", "agentgateways.nanogate.io", "-n", ns.name()],
        &["list", "pods", "-n", ns.name()],
        &["get", "secrets", "-n", ns.name()],
    ] {
        assert!(!can(denied)?, "the selftest may {denied:?}");
    }

    // tests.enabled: false renders no hook; rbac.create: false no Role.
    for (overrides, expect) in [
        (serde_json::json!({"tests": {"enabled": false}}), vec![]),
        (
            serde_json::json!({"rbac": {"create": false}}),
            vec!["Pod", "ServiceAccount"],
        ),
    ] {
        let values = ValuesFile::new(None, overrides.clone())?;
        let (all, _) = render_all(kubeconfig, "nanogate", ns.name(), &values.path())?;
        let mut kinds: Vec<&str> = all.iter().filter(|o| is_test_hook(o)).map(kind).collect();
        kinds.sort();
        assert_eq!(kinds, expect, "{overrides}");
    }
    Ok(())
}
