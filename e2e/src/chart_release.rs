//! A Helm release of nanogate's chart whose operator runs in the cluster, on the real node
//! (`e2e/tests/in_cluster.rs`, `e2e/tests/upgrade.rs`): install and upgrade with a values file,
//! the operator pods, the injected app they both deploy, and what to print when a test fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::Value;

use crate::node::{BUSYBOX_IMAGE, HOST_IP};
use crate::{ControlPlane, helm, wait_for};

/// The release's name: the chart's objects are named after it (`_helpers.tpl`).
pub const RELEASE: &str = "nanogate";
/// The operator pods of release [`RELEASE`].
pub const OPERATORS: &str =
    "app.kubernetes.io/instance=nanogate,app.kubernetes.io/component=operator";
/// The label the leader's pod wears (the hub Service selects it).
pub const LEADER_LABEL: &str = "nanogate.io/hub-leader";
/// The gateway the injected app's sidecars serve ([`app_deployment_yaml`]).
pub const GATEWAY: &str = "shop";
/// The label of the injected app's pods ([`app_deployment_yaml`]).
pub const APP_SELECTOR: &str = "app=shop";
/// How long a step of a release test may take.
pub const TIMEOUT: Duration = Duration::from_secs(180);

/// A values file (deleted on drop).
struct ValuesFile(PathBuf);

impl ValuesFile {
    fn new(yaml: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "nanogate-release-values-{}-{:08x}.yaml",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&path, yaml)?;
        Ok(Self(path))
    }
}

impl Drop for ValuesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `helm install` or `helm upgrade` (`action`) of `chart` as release [`RELEASE`] in `ns` with
/// `values` (YAML).
pub fn helm_release(
    cp: &ControlPlane,
    action: &str,
    chart: &Path,
    ns: &str,
    values: &str,
) -> Result<()> {
    let values = ValuesFile::new(values)?;
    let done = helm(
        cp.kubeconfig_path(),
        &[
            action,
            chart.to_str().context("chart path")?,
            RELEASE,
            ns,
            "--values",
            values.0.to_str().context("values path")?,
        ],
    )?;
    ensure!(done.to_string().contains("deployed"), "{action}: {done}");
    Ok(())
}

/// The chart's `image` values for `reference` (`repository:tag`), never pulled.
pub fn operator_image_values(reference: &str) -> Result<String> {
    let (repository, tag) = reference.rsplit_once(':').context("image tag")?;
    Ok(format!(
        "image: {{repository: {repository}, tag: \"{tag}\", pullPolicy: Never}}\n"
    ))
}

/// Values for this tree's chart: `operator_image`, `agent_image` as `sidecar.image` and a 1 s
/// status interval.
pub fn release_values(operator_image: &str, agent_image: &str) -> Result<String> {
    let (repository, tag) = agent_image.rsplit_once(':').context("image tag")?;
    Ok(format!(
        "{}sidecar: {{image: {{repository: {repository}, tag: \"{tag}\"}}}}\nstatusInterval: 1s\n",
        operator_image_values(operator_image)?
    ))
}

/// Ready and not being deleted (a deleted pod stays Ready until its containers stop).
pub fn ready_not_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && crate::pod_ready(pod)
}

pub fn pod_name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// The image the pod's spec gives its nano-agent container. (Its container status would name
/// whichever tag containerd lists first for the image, and one image may have several.)
pub fn sidecar_image(pod: &Pod) -> Option<&str> {
    crate::kubelet::sidecar_container(pod)?.image.as_deref()
}

/// The sum of `metric`'s samples on an operator pod's `/metrics` (the chart's admin port 8080).
pub fn operator_metric(pod: &Pod, metric: &str) -> Result<f64> {
    let ip = crate::pod_ip(pod).with_context(|| format!("{} has no IP", pod_name(pod)))?;
    crate::scrape(&format!("{ip}:8080"), metric)
}

/// Whether the pod wears the hub leader label.
pub fn labelled_leader(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LEADER_LABEL))
        .is_some_and(|v| v == "true")
}

/// Both operator pods Ready (and no other operator pod around); returns them.
pub async fn two_ready_operators(pods: &Api<Pod>) -> Result<Vec<Pod>> {
    wait_for("two Ready operator pods", TIMEOUT, || async {
        let list = pods.list(&ListParams::default().labels(OPERATORS)).await?;
        let all = list.items.len();
        let ready: Vec<Pod> = list
            .items
            .into_iter()
            .filter(ready_not_terminating)
            .collect();
        Ok((ready.len() == 2 && all == 2).then_some(ready))
    })
    .await
}

/// Deployment `shop` in `apps_ns`: one busybox pod annotated for injection (served by
/// [`GATEWAY`], the namespace's only gateway).
pub fn app_deployment_yaml(apps_ns: &str) -> String {
    let containers = format!(
        "      - {{name: app, image: {BUSYBOX_IMAGE}, imagePullPolicy: Never, \
         command: [sleep, \"100000\"]}}\n"
    );
    crate::deployment_yaml(
        apps_ns,
        "shop",
        1,
        false,
        r#"{nanogate.io/inject: "true"}"#,
        &containers,
    )
}

/// [`GATEWAY`] in `apps_ns` (its API key Secret too), heartbeats every second; its upstream is
/// this machine's discard port (nothing listens: the sidecars still connect to the hub).
pub fn apply_gateway(cp: &ControlPlane, apps_ns: &str) -> Result<()> {
    crate::apply_yaml(
        cp.kubeconfig_path(),
        &crate::gateway_yaml(apps_ns, GATEWAY, "  heartbeatInterval: 1s\n")
            .replace("http://127.0.0.1:9", &format!("http://{HOST_IP}:9")),
    )?;
    Ok(())
}

/// [`app_deployment_yaml`], created once a dry run of its pod comes back injected (the mutating
/// webhook answers, and the operator's watch knows the gateway); its pod once Ready with its
/// sidecar on `image`.
pub async fn deploy_app(
    cp: &ControlPlane,
    client: &kube::Client,
    apps_ns: &str,
    image: &str,
) -> Result<Pod> {
    let probe: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "probe", "annotations": {"nanogate.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": BUSYBOX_IMAGE}]}
    }))?;
    crate::wait_for_injection(client, apps_ns, &probe).await?;
    crate::apply_yaml(cp.kubeconfig_path(), &app_deployment_yaml(apps_ns))?;
    app_pod_on(client, apps_ns, image).await
}

/// The app's only pod Ready with its sidecar on `image`; returns it.
pub async fn app_pod_on(client: &kube::Client, apps_ns: &str, image: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), apps_ns);
    let what = format!("the app's only pod Ready with its sidecar on {image}");
    wait_for(&what, TIMEOUT, || async {
        let list = pods
            .list(&ListParams::default().labels(APP_SELECTOR))
            .await?
            .items;
        Ok(match list.as_slice() {
            [pod] if ready_not_terminating(pod) && sidecar_image(pod) == Some(image) => {
                Some(pod.clone())
            }
            _ => None,
        })
    })
    .await
}

/// After `helm upgrade`: the operator Deployment rolled out and two pods Ready.
pub async fn operators_rolled(cp: &ControlPlane, client: &kube::Client, ns: &str) -> Result<()> {
    cp.kubectl(&[
        "rollout",
        "status",
        "deployment/nanogate-operator",
        "-n",
        ns,
        "--timeout=180s",
    ])?;
    two_ready_operators(&Api::namespaced(client.clone(), ns)).await?;
    Ok(())
}

/// [`GATEWAY`]'s `status.sidecars` once `check` holds for it.
pub async fn sidecars_when(
    client: &kube::Client,
    apps_ns: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let gateways = crate::agentgateways(client, apps_ns);
    wait_for(what, TIMEOUT, || async {
        let gateway = gateways.get(GATEWAY).await?;
        let sidecars = &gateway.data["status"]["sidecars"];
        Ok(check(sidecars).then(|| sidecars.clone()))
    })
    .await
}

/// The app's only sidecar, connected, reported outdated: in the status, in the `OUTDATED`
/// column of `kubectl get agw -o wide` and by a `SidecarsOutdated` event, whose note is returned.
pub async fn reported_outdated(
    cp: &ControlPlane,
    client: &kube::Client,
    apps_ns: &str,
) -> Result<String> {
    sidecars_when(
        client,
        apps_ns,
        "the running sidecar reported outdated",
        |s| s["outdated"] == 1 && s["connected"] == 1 && s["expected"] == 1,
    )
    .await?;
    let table = cp.kubectl(&["get", "agw", GATEWAY, "-n", apps_ns, "-o", "wide"])?;
    let column = crate::table_cell(&table, "OUTDATED")?;
    ensure!(
        column == "1",
        "kubectl get agw -o wide shows {column:?}:\n{table}"
    );
    crate::wait_for_event(client, apps_ns, GATEWAY, "SidecarsOutdated", TIMEOUT).await
}

/// `nanogate.io/repair=rollout` on [`GATEWAY`]: the app's new pod runs `image`, and its sidecar
/// is counted connected and current. Returns `status.sidecars`.
pub async fn repaired_by_rollout(
    cp: &ControlPlane,
    client: &kube::Client,
    apps_ns: &str,
    image: &str,
) -> Result<Value> {
    cp.kubectl(&[
        "annotate",
        "agentgateway",
        GATEWAY,
        "-n",
        apps_ns,
        "nanogate.io/repair=rollout",
    ])?;
    app_pod_on(client, apps_ns, image).await?;
    sidecars_when(
        client,
        apps_ns,
        "the new sidecar connected and current",
        |s| s["outdated"] == 0 && s["connected"] == 1 && s["expected"] == 1,
    )
    .await
}

/// On failure: what the pods and the operators said.
pub fn dump(cp: &ControlPlane, ns: &str, apps_ns: &str) {
    for args in [
        vec![
            "get",
            "pods,svc,endpoints,leases",
            "-n",
            ns,
            "-o",
            "wide",
            "--show-labels",
        ],
        vec!["get", "pods", "-n", apps_ns, "-o", "wide"],
        vec!["get", "agentgateways", "-n", apps_ns, "-o", "yaml"],
        vec!["logs", "-n", ns, "-l", OPERATORS, "--tail=40", "--prefix"],
        vec![
            "logs",
            "-n",
            apps_ns,
            "-l",
            APP_SELECTOR,
            "-c",
            "nano-agent",
            "--tail=40",
        ],
        vec!["get", "events", "-n", ns],
    ] {
        match cp.kubectl(&args) {
            Ok(out) => eprintln!("$ kubectl {}\n{out}", args.join(" ")),
            Err(error) => eprintln!("$ kubectl {}\n{error:#}", args.join(" ")),
        }
    }
}
