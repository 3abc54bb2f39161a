//! The chart's operator runs **in** the cluster (issue 16), on the real node
//! (`nanogate_e2e::Node`: kubelet, containerd, kube-proxy, cluster DNS): `helm install` of
//! `charts/nanogate` with the real Helm engine (`e2e/scripts/helm.py`, as `chart.rs`), default
//! values but for the operator image and a 1 s status interval. The operator and nano-agent
//! images are `nanogate_e2e::images`' (what the shipping test builds and checks), imported into
//! the node.
//!
//! - both operator pods (2 replicas) run and are Ready; exactly one holds the leader Lease, wears
//!   the `nanogate.io/hub-leader` label and reports `nanogate_operator_leader 1`;
//! - the apiserver reaches the webhooks through their Service (`clientConfig.service`; routed by
//!   kube-proxy, see `nanogate_e2e::service_network` for why not `--enable-aggregator-routing`):
//!   an invalid AgentGateway is refused by `validate.nanogate.io`, and an annotated Deployment's
//!   pod is injected;
//! - that pod runs the real nano-agent image, which dials the hub through its Service by DNS name
//!   (`nanogate-hub.<ns>.svc:7051`) and shows as connected in the gateway's status;
//! - deleting the leader pod hands the Lease to another pod (the follower or the replacement,
//!   whichever asks first), the hub Service follows the label, and the sidecar reconnects to the
//!   new leader;
//! - `helm upgrade` to a new sidecar image (installed with the agent image under a `-previous`
//!   tag, upgraded to its real reference): the operator pods roll, the running sidecar is
//!   reported outdated (status, `kubectl get agw -o wide`, a `SidecarsOutdated` event naming
//!   both images) and `nanogate.io/repair: rollout` moves it: the new pod runs the new image,
//!   connected and current;
//! - `helm uninstall` leaves nothing behind (see [`leftovers`] for the list): not the chart's
//!   objects, its webhook configurations and cluster-scoped RBAC, nor what the operator created
//!   itself — its certificate Secret and Lease, owned by the release's
//!   MutatingWebhookConfiguration, go with it through the garbage collector — nor the
//!   Services' DNS records and kube-proxy rules on the node. What stays, by design: the CRD (Helm
//!   never deletes CRDs) and with it the AgentGateways and the ConfigMaps the operator derived
//!   from them (owned by their gateway: they go when it is deleted, checked here too), the users'
//!   injected pods, and Events about users' objects until the apiserver's event TTL (1 h).

use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use nanogate_e2e::chart_release::{
    OPERATORS, RELEASE, TIMEOUT, apply_gateway, deploy_app, dump, helm_release, labelled_leader,
    operator_metric, operators_rolled, pod_name, ready_not_terminating, release_values,
    repaired_by_rollout, reported_outdated, two_ready_operators,
};
use nanogate_e2e::node::{BUSYBOX_IMAGE, HOST_IP};
use nanogate_e2e::service_network::{self, CLUSTER_DOMAIN};
use nanogate_e2e::{ControlPlane, Node, TestNamespace, helm, wait_for, workspace_root};

/// The chart's names for release `nanogate` (`_helpers.tpl`).
const LEASE: &str = "nanogate-operator";
const CERT_SECRET: &str = "nanogate-webhook-certs";
const SERVICES: [&str; 3] = ["nanogate-webhook", "nanogate-hub", "nanogate-metrics"];
const CLUSTER_OBJECTS: [&str; 4] = [
    "clusterrole/nanogate-operator",
    "clusterrolebinding/nanogate-operator",
    "mutatingwebhookconfiguration/nanogate-injector",
    "validatingwebhookconfiguration/nanogate-validator",
];

/// The one leader among `operators`: the Lease holder, the only pod labelled hub leader and the
/// only one reporting `nanogate_operator_leader 1`. `None` while they disagree.
async fn the_leader(leases: &Api<Lease>, operators: &[Pod]) -> Result<Option<Pod>> {
    let holder = leases
        .get_opt(LEASE)
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    let labelled: Vec<&Pod> = operators.iter().filter(|p| labelled_leader(p)).collect();
    let mut leading = Vec::new();
    for pod in operators {
        if operator_metric(pod, "nanogate_operator_leader")? == 1.0 {
            leading.push(pod_name(pod));
        }
    }
    match labelled.as_slice() {
        [pod] if pod_name(pod) == holder && leading == [holder.clone()] => Ok(Some((*pod).clone())),
        _ => Ok(None),
    }
}

/// Connections kube-proxy's rules sent to the endpoints of Service `ns/service` so far: the
/// packet counters of its `KUBE-SVC-*` → `KUBE-SEP-*` jumps (the nat table sees the first packet
/// of each connection only).
fn service_connections(ns: &str, service: &str) -> Result<u64> {
    let out = std::process::Command::new("iptables-save")
        .args(["-c", "-t", "nat"])
        .stderr(std::process::Stdio::null())
        .output()?;
    let comment = format!("\"{ns}/{service}:");
    let mut total = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((counters, rule)) = line.split_once(' ') else {
            continue;
        };
        if rule.starts_with("-A KUBE-SVC-")
            && rule.contains(&comment)
            && rule.contains("-j KUBE-SEP-")
        {
            let packets = counters
                .trim_start_matches('[')
                .split(':')
                .next()
                .context("iptables counters")?;
            total += packets.parse::<u64>()?;
        }
    }
    Ok(total)
}

/// `kubectl get <what> -o name` (empty lines dropped).
fn names(cp: &ControlPlane, args: &[&str]) -> Result<Vec<String>> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend(["-o", "name", "--ignore-not-found"]);
    Ok(cp
        .kubectl(&all)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

/// What a release `nanogate` in `ns` left behind:
/// - in `ns`: Deployments, ReplicaSets, Pods, Services, Endpoints, EndpointSlices,
///   ServiceAccounts, ConfigMaps, Secrets (Helm's release records, the ServiceAccount's token, the
///   operator's certificate Secret), Roles, RoleBindings, PodDisruptionBudgets, NetworkPolicies,
///   Leases — all but what every namespace has (`default` ServiceAccount and token,
///   `kube-root-ca.crt`);
/// - in `ns`, Events the operator reported (`reportingController` nanogate-*);
/// - cluster-scoped, by the release's label and by the chart's names: ClusterRoles,
///   ClusterRoleBindings, Mutating- and ValidatingWebhookConfigurations;
/// - on the node: DNS records of the chart's Services, kube-proxy rules naming `ns`.
fn leftovers(cp: &ControlPlane, ns: &str) -> Result<Vec<String>> {
    let mut left: Vec<String> = names(
        cp,
        &[
            "deployments,replicasets,pods,services,endpoints,endpointslices.discovery.k8s.io,\
             serviceaccounts,configmaps,secrets,roles,rolebindings,poddisruptionbudgets,\
             networkpolicies,leases",
            "-n",
            ns,
        ],
    )?
    .into_iter()
    .filter(|n| {
        n != "serviceaccount/default"
            && n != "configmap/kube-root-ca.crt"
            && !n.starts_with("secret/default-token-")
    })
    .collect();
    let events = cp.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        ns,
        "-o",
        "jsonpath={range .items[*]}{.reportingController} {.metadata.name}{\"\\n\"}{end}",
    ])?;
    left.extend(
        events
            .lines()
            .filter(|l| l.starts_with("nanogate"))
            .map(|l| format!("event {l}")),
    );
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    left.extend(names(
        cp,
        &[
            "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,\
             validatingwebhookconfigurations",
            "-l",
            &selector,
        ],
    )?);
    for object in CLUSTER_OBJECTS {
        left.extend(names(cp, &[object])?);
    }
    for service in SERVICES {
        let fqdn = format!("{service}.{ns}.svc.{CLUSTER_DOMAIN}");
        if let Some(ip) = service_network::resolve(&fqdn)? {
            left.push(format!("DNS record {fqdn} → {ip}"));
        }
    }
    let nat = std::process::Command::new("iptables-save")
        .args(["-t", "nat"])
        .stderr(std::process::Stdio::null())
        .output()?;
    let marker = format!("{ns}/");
    left.extend(
        String::from_utf8_lossy(&nat.stdout)
            .lines()
            .filter(|l| l.contains(&marker))
            .map(|l| format!("kube-proxy rule {l}")),
    );
    left.sort();
    left.dedup();
    Ok(left)
}

fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

/// `helm install` or `helm upgrade` (`action`) of this tree's chart in `ns`, with
/// `operator_image`, `agent_image` as the chart's `sidecar.image`, a 1 s status interval and the
/// validator on Ignore.
fn release(
    cp: &ControlPlane,
    action: &str,
    ns: &str,
    operator_image: &str,
    agent_image: &str,
) -> Result<()> {
    // The validator on Ignore: until the operator is ready it would refuse the AgentGateways
    // of the other tests sharing this apiserver.
    let values = format!(
        "{}webhook: {{validate: {{failurePolicy: Ignore}}}}\n",
        release_values(operator_image, agent_image)?
    );
    let chart = workspace_root().join("charts/nanogate");
    helm_release(cp, action, &chart, ns, &values)
}

#[tokio::test]
async fn the_chart_runs_the_operator_in_the_cluster() -> Result<()> {
    let started = Instant::now();
    // The operator and nano-agent images the shipping test builds and checks.
    let images = tokio::task::spawn_blocking(nanogate_e2e::images::images).await??;
    let operator_image = images.reference("nanogate-operator");
    let agent_image = images.reference("nano-agent");
    // The release is installed with this tag as its sidecar image and upgraded to the real one
    // (same bits, another reference: what the upgrade moves is the reference).
    let previous_agent = format!("{agent_image}-previous");
    nanogate_e2e::podman::podman_ok(&["tag", agent_image, &previous_agent])?;
    nanogate_e2e::progress!("[in-cluster] images ready in {:.1}s", secs(started));
    let node = Node::shared().await?;
    for image in [operator_image, agent_image, &previous_agent, BUSYBOX_IMAGE] {
        node.import_image(image)?;
    }
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let rel = TestNamespace::create(&client, "in-cluster").await?;
    let apps = TestNamespace::create(&client, "in-cluster-apps").await?;
    let ns = rel.name();
    nanogate_e2e::progress!(
        "[in-cluster] node, images and namespaces ready in {:.1}s",
        secs(started)
    );

    // helm install: the chart's defaults (2 replicas, leader election, Service-backed webhooks,
    // hub behind its Service), with the images in the node (the sidecar's under its previous
    // reference). The validator gets Ignore instead of its default Fail: until the operator is
    // ready it would refuse the AgentGateways of the other tests sharing this apiserver.
    let step = Instant::now();
    release(cp, "install", ns, operator_image, &previous_agent)?;
    nanogate_e2e::progress!("[in-cluster] helm install in {:.1}s", secs(step));

    let installed = Installed {
        cp,
        client: &client,
        ns,
        apps_ns: apps.name(),
        operator_image,
        previous_agent: &previous_agent,
    };
    let mut result = in_cluster(&installed).await;
    if result.is_ok() {
        result = upgrade(&installed, agent_image).await;
    }
    if result.is_err() {
        dump(cp, ns, apps.name());
    }
    result?;

    // helm test, as a user runs it after installing: the hook pod (operator image, Pod Security
    // restricted, its own least-privilege ServiceAccount) finds the operator ready through its
    // Service and has an AgentGateway admitted (dry run) and an invalid one refused.
    let step = Instant::now();
    let tested = helm(cp.kubeconfig_path(), &["test", RELEASE, ns])?.to_string();
    for line in [
        "ok: the operator is ready",
        "ok: an AgentGateway is admitted",
    ] {
        ensure!(
            tested.contains(line),
            "helm test did not say {line:?}: {tested}"
        );
    }
    nanogate_e2e::progress!("[in-cluster] helm test passed in {:.1}s", secs(step));

    // helm uninstall leaves nothing behind — what `leftovers` looks for is there first.
    let before = leftovers(cp, ns)?;
    for trace in [
        "deployment.apps/nanogate-operator".to_string(),
        format!("secret/{CERT_SECRET}"),
        format!("lease.coordination.k8s.io/{LEASE}"),
        "clusterrole.rbac.authorization.k8s.io/nanogate-operator".to_string(),
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/nanogate-injector".to_string(),
        format!("DNS record nanogate-hub.{ns}.svc.{CLUSTER_DOMAIN}"),
        "kube-proxy rule -A KUBE-SERVICES -d".to_string(),
    ] {
        ensure!(
            before.iter().any(|l| l.starts_with(&trace)),
            "{trace:?} is not among the release's traces before uninstall: {before:#?}"
        );
    }
    let step = Instant::now();
    helm(cp.kubeconfig_path(), &["uninstall", RELEASE, ns])?;
    let gone = wait_for("nothing left of the release", TIMEOUT, || async {
        let left = leftovers(cp, ns)?;
        if left.is_empty() {
            Ok(Some(()))
        } else {
            bail!("still present: {left:#?}")
        }
    })
    .await;
    if gone.is_err() {
        dump(cp, ns, apps.name());
    }
    gone?;
    nanogate_e2e::progress!(
        "[in-cluster] helm uninstall: nothing left after {:.1}s",
        secs(step)
    );
    // By design: the CRD stays, and with it the gateway; its derived ConfigMap is the gateway's
    // and goes with it.
    cp.kubectl(&["get", "crd", "agentgateways.nanogate.io"])?;
    let managed = "app.kubernetes.io/managed-by=nanogate-operator";
    ensure!(
        !names(cp, &["configmaps", "-n", apps.name(), "-l", managed])?.is_empty(),
        "the gateway's ConfigMap went before the gateway"
    );
    cp.kubectl(&["delete", "agentgateway", "shop", "-n", apps.name()])?;
    wait_for("the gateway's ConfigMap to go with it", TIMEOUT, || async {
        Ok(
            names(cp, &["configmaps", "-n", apps.name(), "-l", managed])?
                .is_empty()
                .then_some(()),
        )
    })
    .await?;
    nanogate_e2e::progress!("[in-cluster] whole test {:.1}s", secs(started));
    Ok(())
}

/// The release as installed: where it runs and the images it was installed with.
#[derive(Clone, Copy)]
struct Installed<'a> {
    cp: &'a ControlPlane,
    client: &'a kube::Client,
    /// The release's namespace.
    ns: &'a str,
    /// The namespace of the injected apps.
    apps_ns: &'a str,
    operator_image: &'a str,
    /// The sidecar image the release was installed with (the upgrade moves off it).
    previous_agent: &'a str,
}

impl<'a> Installed<'a> {
    /// Where it runs: control plane, client, the release's and the apps' namespaces.
    fn cluster(&self) -> (&'a ControlPlane, &'a kube::Client, &'a str, &'a str) {
        (self.cp, self.client, self.ns, self.apps_ns)
    }
}

async fn in_cluster(installed: &Installed<'_>) -> Result<()> {
    let (cp, client, ns, apps_ns) = installed.cluster();
    let (operator_image, agent_image) = (installed.operator_image, installed.previous_agent);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);

    // Both operator pods Running and Ready, exactly one leader.
    let step = Instant::now();
    let operators = two_ready_operators(&pods).await?;
    nanogate_e2e::progress!(
        "[in-cluster] 2/2 operator pods Ready {:.1}s after install",
        secs(step)
    );
    for pod in &operators {
        let status = pod.status.as_ref().context("status")?;
        ensure!(
            status.phase.as_deref() == Some("Running"),
            "{}",
            pod_name(pod)
        );
        let image = status
            .container_statuses
            .iter()
            .flatten()
            .map(|c| c.image.clone())
            .collect::<Vec<_>>();
        ensure!(image == [operator_image], "{}: {image:?}", pod_name(pod));
    }
    let leader = wait_for("exactly one leader", TIMEOUT, || async {
        let operators = pods
            .list(&ListParams::default().labels(OPERATORS))
            .await?
            .items;
        the_leader(&leases, &operators).await
    })
    .await?;
    let follower = operators
        .iter()
        .find(|p| pod_name(p) != pod_name(&leader))
        .context("a follower")?
        .clone();
    nanogate_e2e::progress!(
        "[in-cluster] leader {} (follower {}) {:.1}s after install",
        pod_name(&leader),
        pod_name(&follower),
        secs(step)
    );

    // The webhooks are called through their Service, never a URL.
    for kind in [
        "mutatingwebhookconfiguration/nanogate-injector",
        "validatingwebhookconfiguration/nanogate-validator",
    ] {
        let config = cp.kubectl(&[
            "get",
            kind,
            "-o",
            "jsonpath={.webhooks[0].clientConfig.service.namespace}/{.webhooks[0].clientConfig.service.name} {.webhooks[0].clientConfig.url}",
        ])?;
        ensure!(
            config.trim() == format!("{ns}/nanogate-webhook"),
            "{kind}: {config}"
        );
    }
    // The validating webhook through the Service: an invalid gateway is refused by the operator.
    let step = Instant::now();
    let invalid = format!(
        "apiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {{name: bad, namespace: {apps_ns}}}\nspec:\n  upstream: {{kind: http, url: 'http://{HOST_IP}:9', apiKeySecretRef: {{name: platform-key, key: apiKey}}}}\n  batching: {{minBatchSize: 300, maxBatchSize: 200}}\n"
    );
    let refused = wait_for("the validating webhook to refuse", TIMEOUT, || async {
        match nanogate_e2e::apply_yaml(cp.kubeconfig_path(), &invalid) {
            Ok(_) => {
                // Admitted while no webhook answered (failurePolicy Ignore): try again.
                cp.kubectl(&["delete", "agentgateway", "bad", "-n", apps_ns])?;
                Ok(None)
            }
            Err(error) => Ok(Some(format!("{error:#}"))),
        }
    })
    .await?;
    ensure!(refused.contains("validate.nanogate.io"), "{refused}");
    // Only the apiserver calls the webhook Service: kube-proxy's rules carried those calls.
    let calls = service_connections(ns, "nanogate-webhook")?;
    ensure!(
        calls >= 1,
        "kube-proxy routed no connection to the webhook Service"
    );
    nanogate_e2e::progress!(
        "[in-cluster] the apiserver reached the validating webhook through its Service in {:.1}s \
         ({calls} connections through kube-proxy's rules)",
        secs(step)
    );

    // A gateway whose sidecars run the operator's nano-agent image (the chart's
    // `sidecar.image`).
    apply_gateway(cp, apps_ns)?;
    // An annotated Deployment (the mutating webhook through its Service).
    let step = Instant::now();
    let app = deploy_app(cp, client, apps_ns, agent_image).await?;
    let statuses = app
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    ensure!(
        statuses.len() == 2 && statuses.iter().all(|c| c.ready),
        "{statuses:?}"
    );
    let hub_addr = nanogate_e2e::kubelet::sidecar_container(&app)
        .into_iter()
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == "NANOGATE_HUB_ADDR")
        .and_then(|e| e.value.clone());
    ensure!(
        hub_addr.as_deref() == Some(format!("nanogate-hub.{ns}.svc:7051").as_str()),
        "{hub_addr:?}"
    );
    nanogate_e2e::progress!(
        "[in-cluster] app pod {} injected and 2/2 Ready in {:.1}s",
        pod_name(&app),
        secs(step)
    );

    // The sidecar reached the hub through its Service: the gateway's status counts it.
    let step = Instant::now();
    let gateways = nanogate_e2e::agentgateways(client, apps_ns);
    let connected = |gateways: kube::Api<kube::api::DynamicObject>| async move {
        let gateway = gateways.get("shop").await?;
        let sidecars = &gateway.data["status"]["sidecars"];
        Ok((sidecars["connected"] == 1 && sidecars["expected"] == 1).then(|| sidecars.to_string()))
    };
    let sidecars = wait_for(
        "the gateway's status to count the sidecar connected",
        TIMEOUT,
        || connected(gateways.clone()),
    )
    .await?;
    ensure!(
        operator_metric(&leader, "nanogate_hub_connected_agents")? == 1.0,
        "the leader's hub has no agent"
    );
    let dials = service_connections(ns, "nanogate-hub")?;
    ensure!(
        dials >= 1,
        "kube-proxy routed no connection to the hub Service"
    );
    nanogate_e2e::progress!(
        "[in-cluster] sidecar connected to the hub through its Service in {:.1}s ({dials} \
         connections through kube-proxy's rules): {sidecars}",
        secs(step)
    );

    // Hand-over: the leader pod goes (and releases the Lease on SIGTERM); another pod takes the
    // Lease and the label — the follower, or the Deployment's replacement pod when its first
    // round comes before the follower's next retry (every 2 s) — the hub Service follows, the
    // sidecar reconnects, and two pods are Ready again with exactly one leader.
    let step = Instant::now();
    pods.delete(&pod_name(&leader), &DeleteParams::default())
        .await?;
    let new_leader = wait_for("another pod to take over", TIMEOUT, || async {
        let operators: Vec<Pod> = pods
            .list(&ListParams::default().labels(OPERATORS))
            .await?
            .items
            .into_iter()
            .filter(|p| {
                pod_name(p) != pod_name(&leader)
                    && nanogate_e2e::pod_ip(p).is_some()
                    && ready_not_terminating(p)
            })
            .collect();
        the_leader(&leases, &operators).await
    })
    .await?;
    let took_over = secs(step);
    wait_for(
        "the sidecar to reconnect to the new leader",
        TIMEOUT,
        || async {
            let agents = operator_metric(&new_leader, "nanogate_hub_connected_agents")?;
            Ok((agents == 1.0).then_some(()))
        },
    )
    .await?;
    let reconnected = secs(step);
    // The old leader's container exits at once (SIGTERM); when its pod leaves the API is the
    // kubelet's business (seen: 5 s, sometimes 45 s on a busy machine). Both are reported.
    let old = pod_name(&leader);
    let exited = std::sync::Mutex::new(None::<f64>);
    wait_for("the old leader's pod to leave the API", TIMEOUT, || {
        let (pods, old) = (pods.clone(), old.clone());
        let exited = &exited;
        async move {
            let Some(pod) = pods.get_opt(&old).await? else {
                return Ok(Some(()));
            };
            let running = pod
                .status
                .and_then(|s| s.container_statuses)
                .unwrap_or_default()
                .iter()
                .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
            let mut exited = exited.lock().expect("lock");
            if !running && exited.is_none() {
                *exited = Some(secs(step));
            }
            Ok(None)
        }
    })
    .await?;
    let gone = secs(step);
    if gone > 20.0 {
        // What the kubelet did with the pod meanwhile.
        let log = std::fs::read_to_string(Node::shared().await?.dir().join("kubelet.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(&old)).collect();
        nanogate_e2e::progress!(
            "[in-cluster] the old leader's pod left the API only {gone:.1}s after its deletion; \
             the kubelet's last lines about it:\n{}",
            lines[lines.len().saturating_sub(15)..].join("\n")
        );
    }
    let operators = two_ready_operators(&pods).await?;
    ensure!(
        !operators.iter().any(|p| pod_name(p) == pod_name(&leader)),
        "the old leader is still listed"
    );
    let again = the_leader(&leases, &operators)
        .await?
        .context("not exactly one leader after the hand-over")?;
    ensure!(
        pod_name(&again) == pod_name(&new_leader),
        "{}",
        pod_name(&again)
    );
    wait_for("the status to count the sidecar again", TIMEOUT, || {
        connected(gateways.clone())
    })
    .await?;
    nanogate_e2e::progress!(
        "[in-cluster] leader pod deleted: {} ({}) took over in {took_over:.1}s, the sidecar \
         reconnected at {reconnected:.1}s; the old leader's container stopped by {}, its pod \
         left the API at {gone:.1}s; 2/2 Ready again at {:.1}s",
        pod_name(&new_leader),
        if pod_name(&new_leader) == pod_name(&follower) {
            "the follower"
        } else {
            "the replacement pod"
        },
        exited
            .into_inner()
            .expect("lock")
            .map_or("its removal".to_string(), |t| format!("{t:.1}s")),
        secs(step)
    );
    Ok(())
}

/// `helm upgrade` to a new sidecar image, as a release upgrade does: the operator pods roll, the
/// running sidecar (injected with `previous_agent`) is reported outdated (status, `-o wide`, a
/// `SidecarsOutdated` event naming both images) until `nanogate.io/repair: rollout` has the
/// operator restart its Deployment; the new pod runs `agent_image`, connected and current.
async fn upgrade(installed: &Installed<'_>, agent_image: &str) -> Result<()> {
    let (cp, client, ns, apps_ns) = installed.cluster();
    let (operator_image, previous_agent) = (installed.operator_image, installed.previous_agent);
    let step = Instant::now();
    release(cp, "upgrade", ns, operator_image, agent_image)?;
    operators_rolled(cp, client, ns).await?;
    nanogate_e2e::progress!(
        "[in-cluster] helm upgrade: operator pods rolled in {:.1}s",
        secs(step)
    );

    let step = Instant::now();
    let event = reported_outdated(cp, client, apps_ns).await?;
    ensure!(
        event.contains(&format!("run {previous_agent} instead of {agent_image}:")),
        "the event names the image that runs and the one injected now: {event}"
    );
    nanogate_e2e::progress!(
        "[in-cluster] the sidecar on the previous image reported outdated in {:.1}s: {event}",
        secs(step)
    );

    let step = Instant::now();
    let current = repaired_by_rollout(cp, client, apps_ns, agent_image).await?;
    nanogate_e2e::progress!(
        "[in-cluster] rollout repair: the app pod runs {agent_image}, connected, in {:.1}s: {current}",
        secs(step)
    );
    Ok(())
}
