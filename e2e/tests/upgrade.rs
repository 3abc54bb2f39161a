//! Upgrading from the previous release (issue 19), on the real node, as a platform engineer
//! does it: release 0.1.0 (`nanogate_e2e::previous_release`: its chart, and its two images
//! built from its commit) is installed with `helm install`, serves a gateway and an injected app,
//! then `helm upgrade` moves the release to this tree's chart and images.
//!
//! - 0.1.0's chart installs 0.1.0's CRD (Helm's `crds/`, never upgraded by Helm) and its
//!   operator injects 0.1.0's nano-agent (the image its CRD defaulted every gateway to);
//! - after the upgrade this operator replaces the CRD with its own (`--manage-crd`, the chart's
//!   default): a field this release added persists, and the gateway created under 0.1.0 still
//!   validates (Ready, admitted by the validating webhook);
//! - the running 0.1.0 sidecar reconnects to the new hub (the new leader counts it) and is
//!   counted outdated (status, `kubectl get agw -o wide`, a `SidecarsOutdated` event naming the
//!   pod and the image injected now; 0.1.0 recorded none of its own);
//! - `nanogate.io/repair: rollout` moves it: the app's new pod runs this tree's nano-agent,
//!   connected and current.
//!
//! A process of its own (one test binary): the CRD is cluster-wide, and this control plane must
//! start without this tree's CRD.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use nanogate_e2e::chart_release::{
    GATEWAY, OPERATORS, TIMEOUT, apply_gateway, deploy_app, dump, helm_release, labelled_leader,
    operator_image_values, operator_metric, operators_rolled, release_values, repaired_by_rollout,
    reported_outdated, sidecars_when, two_ready_operators,
};
use nanogate_e2e::node::BUSYBOX_IMAGE;
use nanogate_e2e::previous_release::{self, DEFAULT_AGENT_IMAGE};
use nanogate_e2e::{ControlPlane, Node, TestNamespace, wait_for, workspace_root};
use serde_json::json;

fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

#[tokio::test]
async fn the_previous_release_upgrades_to_this_one() -> Result<()> {
    let started = Instant::now();
    let (previous, images) = tokio::task::spawn_blocking(|| {
        anyhow::Ok((
            previous_release::previous_release()?,
            nanogate_e2e::images::images()?,
        ))
    })
    .await??;
    let operator_image = images.reference("nanogate-operator");
    // This tree's nano-agent carries the version 0.1.0 too (not bumped before a release): on the
    // node it stands under a tag of its own, as a new release's would.
    let agent_image = format!("{}-unreleased", images.reference("nano-agent"));
    nanogate_e2e::podman::podman_ok(&["tag", images.reference("nano-agent"), &agent_image])?;
    let node = Node::shared().await?;
    for image in [
        &previous.operator_image,
        &previous.agent_image,
        operator_image,
        &agent_image,
        BUSYBOX_IMAGE,
    ] {
        node.import_image(image)?;
    }
    // 0.1.0's gateways name its nano-agent by its published reference.
    node.ctr(&[
        "images",
        "tag",
        "--force",
        &previous.agent_image,
        DEFAULT_AGENT_IMAGE,
    ])?;
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let rel = TestNamespace::create(&client, "upgrade").await?;
    let apps = TestNamespace::create(&client, "upgrade-apps").await?;
    let (ns, apps_ns) = (rel.name(), apps.name());
    nanogate_e2e::progress!(
        "[upgrade] images, node and namespaces ready in {:.1}s",
        secs(started)
    );

    let result = upgrade(
        cp,
        &client,
        ns,
        apps_ns,
        &previous,
        operator_image,
        &agent_image,
    )
    .await;
    if result.is_err() {
        dump(cp, ns, apps_ns);
    }
    result?;
    nanogate_e2e::progress!("[upgrade] whole test {:.1}s", secs(started));
    Ok(())
}

async fn upgrade(
    cp: &ControlPlane,
    client: &kube::Client,
    ns: &str,
    apps_ns: &str,
    previous: &previous_release::PreviousRelease,
    operator_image: &str,
    agent_image: &str,
) -> Result<()> {
    let version = previous_release::VERSION;
    let operators: Api<Pod> = Api::namespaced(client.clone(), ns);

    // helm install of release 0.1.0, with its defaults but for its image and a 1 s status
    // interval.
    let step = Instant::now();
    let values = format!(
        "{}statusInterval: 1s\n",
        operator_image_values(&previous.operator_image)?
    );
    helm_release(cp, "install", &previous.chart(), ns, &values)?;
    two_ready_operators(&operators).await?;
    nanogate_e2e::progress!(
        "[upgrade] release {version} installed, 2/2 operator pods Ready in {:.1}s",
        secs(step)
    );

    // A gateway and an annotated app as 0.1.0's README has them. 0.1.0's CRD stores its default
    // sidecar image into the gateway.
    let step = Instant::now();
    apply_gateway(cp, apps_ns)?;
    let gateways = nanogate_e2e::agentgateways(client, apps_ns);
    let stored = gateways.get(GATEWAY).await?.data["spec"]["sidecar"]["image"].clone();
    ensure!(
        stored == DEFAULT_AGENT_IMAGE,
        "release {version}'s CRD defaulted spec.sidecar.image to {stored}"
    );
    let old_pod = deploy_app(cp, client, apps_ns, DEFAULT_AGENT_IMAGE).await?;
    let old_name = old_pod.metadata.name.unwrap_or_default();
    let connected = sidecars_when(client, apps_ns, "the 0.1.0 sidecar connected", |s| {
        s["connected"] == 1 && s["expected"] == 1
    })
    .await?;
    nanogate_e2e::progress!(
        "[upgrade] release {version}: app pod {old_name} injected with {DEFAULT_AGENT_IMAGE}, \
         connected in {:.1}s: {connected}",
        secs(step)
    );

    // helm upgrade to this tree's chart, with this tree's images.
    let step = Instant::now();
    let chart = workspace_root().join("charts/nanogate");
    let values = release_values(operator_image, agent_image)?;
    helm_release(cp, "upgrade", &chart, ns, &values)?;
    operators_rolled(cp, client, ns).await?;
    nanogate_e2e::progress!(
        "[upgrade] helm upgrade: operator pods rolled in {:.1}s",
        secs(step)
    );

    // The CRD is this release's: a field it added (`spec.delivery.maxInFlight`) persists instead
    // of being pruned, and the gateway created under 0.1.0 is Ready and admitted as it is.
    let step = Instant::now();
    wait_for("spec.delivery.maxInFlight to persist", TIMEOUT, || async {
        let patch = json!({"spec": {"delivery": {"maxInFlight": 8}}});
        let gateway = gateways
            .patch(GATEWAY, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok((gateway.data["spec"]["delivery"]["maxInFlight"] == 8).then_some(()))
    })
    .await?;
    let ready = wait_for("the gateway Ready under this release", TIMEOUT, || async {
        let gateway = gateways.get(GATEWAY).await?;
        let status = &gateway.data["status"];
        let observed = status["observedGeneration"].as_i64() == gateway.metadata.generation;
        Ok(match nanogate_e2e::status_condition(status, "Ready") {
            Some((ready, _, message)) if ready == "True" && observed => Some(message),
            _ => None,
        })
    })
    .await?;
    // An update of the gateway as it is, before the validating webhook (a dry run).
    let gateway = gateways.get(GATEWAY).await?;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    gateways
        .replace(GATEWAY, &dry_run, &gateway)
        .await
        .context("the validating webhook refused the 0.1.0 gateway as it is")?;
    nanogate_e2e::progress!(
        "[upgrade] this release's CRD in place: a new field persists, the 0.1.0 gateway is \
         Ready ({ready}) and admitted, in {:.1}s",
        secs(step)
    );

    // The 0.1.0 sidecar reconnects to the new hub (every operator pod is new since the upgrade)
    // and is counted outdated.
    let step = Instant::now();
    wait_for(
        "the new leader's hub to hold the 0.1.0 sidecar",
        TIMEOUT,
        || async {
            let list = operators
                .list(&ListParams::default().labels(OPERATORS))
                .await?
                .items;
            Ok(match list.iter().find(|p| labelled_leader(p)) {
                Some(leader) => {
                    (operator_metric(leader, "nanogate_hub_connected_agents")? == 1.0).then_some(())
                }
                None => None,
            })
        },
    )
    .await?;
    let event = reported_outdated(cp, client, apps_ns).await?;
    // 0.1.0's injection record names no image: the event says whose it is, and names the pod
    // and the image injected now.
    ensure!(
        event.contains("the image an operator before 0.2 injected")
            && event.contains(&format!("instead of {agent_image}: {old_name}")),
        "the event names the image that runs, the one injected now and the pod: {event}"
    );
    nanogate_e2e::progress!(
        "[upgrade] the 0.1.0 sidecar reconnected to the new hub, reported outdated in {:.1}s: \
         {event}",
        secs(step)
    );

    // The rollout repair moves it.
    let step = Instant::now();
    let current = repaired_by_rollout(cp, client, apps_ns, agent_image).await?;
    nanogate_e2e::progress!(
        "[upgrade] rollout repair: the app pod runs {agent_image}, connected and current, in \
         {:.1}s: {current}",
        secs(step)
    );
    Ok(())
}
