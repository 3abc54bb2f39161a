//! The Helm chart `charts/nanogate` with the real Helm engine (helm-python-sdk, through
//! `e2e/scripts/helm.py`) and the real apiserver: lint, render with default values, with every
//! optional feature on and in local-development mode, server-side dry-run of every rendered
//! object, schema rejections, the CRD copy, the dashboard's metric names, and a real
//! install → upgrade → uninstall that leaves nothing behind but the CRD.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nanogate_e2e::{ControlPlane, TestNamespace, helm, wait_for, workspace_root};
use serde_json::Value;

const CHART: &str = "charts/nanogate";
const ALL_FEATURES: &str = "e2e/tests/fixtures/chart-all-features.yaml";
const LOCAL_DEVELOPMENT: &str = "e2e/tests/fixtures/chart-local-development.yaml";
/// Kinds whose CRDs (Prometheus Operator, cert-manager) the test apiserver does not serve; the
/// dry-run skips them when their API group is not served and the test checks them by structure.
const OPTIONAL_CRD_KINDS: &[&str] = &["ServiceMonitor", "PodMonitor", "Certificate", "Issuer"];

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

/// Renders the chart; returns every object (documents in template order) and NOTES.txt.
fn render(
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
    let out = nanogate_e2e::run_kubectl(
        kubeconfig,
        &[
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-o",
            "name",
            "-f",
            &path_str(&file),
        ],
    );
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

/// Assertions shared by every rendering: webhook settings, no generated certificate material,
/// least-privilege RBAC.
fn check_common(objects: &[Value], ns: &str, failure_policy: &str) -> Result<()> {
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
    for k in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        let config = one(objects, k)?;
        let webhooks = config["webhooks"].as_array().context("webhooks")?;
        ensure!(!webhooks.is_empty(), "{k} has no webhooks");
        for w in webhooks {
            assert_eq!(w["sideEffects"], "None", "{k}");
            assert_eq!(w["timeoutSeconds"], 5, "{k}");
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
            for must in ["kube-system", ns] {
                ensure!(
                    values.iter().any(|v| v == must),
                    "{k} does not exclude namespace {must}: {values:?}"
                );
            }
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
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let kubeconfig = cp.kubeconfig_path();
    let ns = TestNamespace::create(&client, "chart-default").await?;
    apply_crd(kubeconfig)?;
    let served = served_api_versions(kubeconfig)?;
    let values = ValuesFile::new(
        None,
        serde_json::json!({"podDisruptionBudget": {"apiVersion": pdb_api_version(&served)}}),
    )?;
    let (objects, notes) = render(kubeconfig, "nanogate", ns.name(), &values.path())?;

    check_common(&objects, ns.name(), "Ignore")?;
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
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let kubeconfig = cp.kubeconfig_path();
    let ns = TestNamespace::create(&client, "chart-all").await?;
    apply_crd(kubeconfig)?;
    let served = served_api_versions(kubeconfig)?;
    let values = ValuesFile::new(
        Some(ALL_FEATURES),
        serde_json::json!({"podDisruptionBudget": {"apiVersion": pdb_api_version(&served)}}),
    )?;
    let (objects, _) = render(kubeconfig, "ng", ns.name(), &values.path())?;
    check_common(&objects, ns.name(), "Fail")?;
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

    // ServiceMonitor, PodMonitor, Certificate and Issuer belong to CRDs the test apiserver
    // does not have (Prometheus Operator, cert-manager): dry_run skips them (checked above by
    // structure) and fails on any other unserved kind.
    let mut skipped = dry_run(kubeconfig, &objects, &served)?;
    skipped.sort();
    assert_eq!(
        skipped,
        ["Certificate", "Issuer", "PodMonitor", "ServiceMonitor"]
    );
    Ok(())
}

#[tokio::test]
async fn local_development_values_point_the_webhooks_at_a_url() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let kubeconfig = cp.kubeconfig_path();
    let ns = TestNamespace::create(&client, "chart-local").await?;
    apply_crd(kubeconfig)?;
    let served = served_api_versions(kubeconfig)?;
    let values = ValuesFile::new(Some(LOCAL_DEVELOPMENT), Value::Object(Default::default()))?;
    let (objects, notes) = render(kubeconfig, "nanogate", ns.name(), &values.path())?;
    check_common(&objects, ns.name(), "Ignore")?;
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
    let text = std::fs::read_to_string(
        workspace_root()
            .join(CHART)
            .join("dashboards/nanogate.json"),
    )?;
    let dashboard: Value = serde_json::from_str(&text).context("dashboard JSON parses")?;
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());

    let mut exprs = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"]
        .as_array()
        .context("panels")?
        .iter()
        .collect();
    let mut panels = 0;
    while let Some(panel) = stack.pop() {
        if let Some(children) = panel["panels"].as_array() {
            stack.extend(children);
        }
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
    // Nothing listens on 127.0.0.1:1: with failurePolicy Ignore every pod is admitted.
    let local = ValuesFile::new(
        Some(LOCAL_DEVELOPMENT),
        serde_json::json!({"localDevelopment": {"webhookURL": "https://127.0.0.1:1"}}),
    )?;
    let installed = helm(
        kubeconfig,
        &[
            "install",
            &chart(),
            release,
            ns.name(),
            "--values",
            &local.path(),
        ],
    )?;
    assert!(installed.to_string().contains("deployed"), "{installed}");
    // Helm installed the CRD from crds/.
    cp.kubectl(&["get", "crd", "agentgateways.nanogate.io"])?;
    let url = cp.kubectl(&[
        "get",
        "mutatingwebhookconfiguration",
        "nanogate-injector",
        "-o",
        "jsonpath={.webhooks[0].clientConfig.url}",
    ])?;
    assert_eq!(url, "https://127.0.0.1:1/mutate");
    let replicas = cp.kubectl(&[
        "get",
        "deployment",
        "nanogate-operator",
        "-n",
        ns.name(),
        "-o",
        "jsonpath={.spec.replicas}",
    ])?;
    assert_eq!(replicas, "0");
    // The operator's ServiceAccount may do what it needs, and not more.
    let operator = format!("system:serviceaccount:{}:nanogate-operator", ns.name());
    let can = |args: &[&str]| -> Result<bool> {
        let out = nanogate_e2e::kubectl_command(kubeconfig)
            .args(["auth", "can-i", "--as", &operator])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
    };
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
    let upgraded = helm(
        kubeconfig,
        &[
            "upgrade",
            &chart(),
            release,
            ns.name(),
            "--values",
            &cluster.path(),
        ],
    )?;
    assert!(upgraded.to_string().contains("deployed"), "{upgraded}");
    let service = cp.kubectl(&[
        "get",
        "mutatingwebhookconfiguration",
        "nanogate-injector",
        "-o",
        "jsonpath={.webhooks[0].clientConfig.service.name}",
    ])?;
    assert_eq!(service, "nanogate-webhook");
    let replicas = cp.kubectl(&[
        "get",
        "deployment",
        "nanogate-operator",
        "-n",
        ns.name(),
        "-o",
        "jsonpath={.spec.replicas}",
    ])?;
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

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
    helm(
        kubeconfig,
        &[
            "install",
            &chart(),
            release,
            ns.name(),
            "--values",
            &values.path(),
        ],
    )?;
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
    // Least privilege is also enough privilege: the operator was never refused anything.
    let log = std::fs::read_to_string(&operator.log)?;
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("forbidden"))
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
    let text = std::fs::read_to_string(
        workspace_root()
            .join(CHART)
            .join("dashboards/nanogate.json"),
    )?;
    let dashboard: Value = serde_json::from_str(&text)?;
    let fill = |q: &str| {
        q.replace("$__rate_interval", rate_interval)
            .replace("$namespace", ".*")
            .replace("$gateway", ".*")
    };
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"]
        .as_array()
        .context("panels")?
        .iter()
        .collect();
    while let Some(panel) = stack.pop() {
        if let Some(children) = panel["panels"].as_array() {
            stack.extend(children);
        }
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
    for i in 0..5 {
        send(
            &socket,
            &serde_json::json!({"msg_type": "publish", "data": {"n": i}}),
            false,
        )?;
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
    send(
        &socket,
        &serde_json::json!({"msg_type": "publish", "data": {"n": "refused"}}),
        false,
    )?;
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
        send(
            &socket,
            &serde_json::json!({"msg_type": "publish", "data": {"n": i}}),
            false,
        )?;
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
            "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\nscrape_configs:\n- job_name: nanogate-operator\n  static_configs:\n  - targets: ['127.0.0.1:{admin_port}']\n    labels: {{namespace: nanogate-system, pod: nanogate-operator-local}}\n- job_name: nanogate-sidecars\n  static_configs:\n  - targets: ['{agent}']\n    labels: {{namespace: {ns}, pod: shop, gateway: shop}}\n",
            agent = agent.admin_addr,
            ns = apps.name()
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
    let result = evaluate_dashboard(&addr).await;
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
