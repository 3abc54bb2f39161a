//! Proves the harness: a real apiserver stores a CRD and a custom resource, and a real
//! controller-manager turns a Deployment into a ReplicaSet and a Pod.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use nanogate_e2e::{ControlPlane, TestNamespace, wait_for};

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.nanogate.io
spec:
  group: smoke.nanogate.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wdg]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
"#;

#[tokio::test]
async fn crd_and_custom_resource_round_trip() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let ns = TestNamespace::create(&client, "smoke-crd").await?;

    nanogate_e2e::apply_yaml(cp.kubeconfig_path(), WIDGET_CRD)?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    wait_for("Widget CRD established", Duration::from_secs(30), || {
        let crds = crds.clone();
        async move {
            let crd = crds.get("widgets.smoke.nanogate.io").await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(established.then_some(()))
        }
    })
    .await?;

    let resource =
        ApiResource::from_gvk(&GroupVersionKind::gvk("smoke.nanogate.io", "v1", "Widget"));
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns.name(), &resource);
    let widget: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "smoke.nanogate.io/v1", "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"size": 3}
    }))?;
    widgets.create(&PostParams::default(), &widget).await?;
    let stored = widgets.get("w1").await?;
    assert_eq!(stored.data["spec"]["size"], 3);

    // The schema is enforced by the real apiserver.
    let invalid: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "smoke.nanogate.io/v1", "kind": "Widget",
        "metadata": {"name": "w2"}, "spec": {"size": 0}
    }))?;
    let error = widgets
        .create(&PostParams::default(), &invalid)
        .await
        .expect_err("size 0 violates minimum");
    assert!(
        error.to_string().contains("spec.size"),
        "unexpected error: {error}"
    );

    let listed = cp.kubectl(&["get", "wdg", "-n", ns.name(), "-o", "name"])?;
    assert_eq!(listed.trim(), "widget.smoke.nanogate.io/w1");
    Ok(())
}

#[tokio::test]
async fn deployment_gets_a_pod_from_the_controller_manager() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let ns = TestNamespace::create(&client, "smoke-deploy").await?;

    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}
            }
        }
    }))?;
    Api::<Deployment>::namespaced(client.clone(), ns.name())
        .create(&PostParams::default(), &deployment)
        .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let found = wait_for("2 pods of Deployment web", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app=web")).await?;
            Ok((list.items.len() == 2).then_some(list.items))
        }
    })
    .await?;
    for pod in &found {
        let owner = pod
            .metadata
            .owner_references
            .as_ref()
            .and_then(|o| o.first())
            .expect("pod has an owner");
        assert_eq!(
            owner.kind, "ReplicaSet",
            "pods are created by the ReplicaSet controller"
        );
    }
    Ok(())
}
