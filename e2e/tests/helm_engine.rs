//! Proves the Helm side of the harness: the real Helm engine (helm-python-sdk in the venv)
//! installs, upgrades and uninstalls a chart on the real apiserver.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use nanogate_e2e::{ControlPlane, TestNamespace, helm, wait_for};

#[tokio::test]
async fn helm_installs_upgrades_and_uninstalls_a_chart() -> anyhow::Result<()> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let ns = TestNamespace::create(&client, "helm").await?;
    let chart = nanogate_e2e::workspace_root().join("e2e/tests/fixtures/hello-chart");
    let chart = chart.to_str().expect("utf-8 path");
    let kubeconfig = cp.kubeconfig_path();

    let lint = helm(kubeconfig, &["lint", chart])?;
    assert_eq!(lint["errors"], serde_json::json!([]), "lint: {lint}");

    helm(kubeconfig, &["install", chart, "hi", ns.name()])?;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let installed = maps.get("hi-greeting").await?;
    assert_eq!(installed.data.unwrap_or_default()["greeting"], "hello");

    let values = std::env::temp_dir().join(format!("hello-values-{}.yaml", std::process::id()));
    std::fs::write(&values, "greeting: bonjour\n")?;
    helm(
        kubeconfig,
        &[
            "upgrade",
            chart,
            "hi",
            ns.name(),
            "--values",
            values.to_str().unwrap_or_default(),
        ],
    )?;
    let _ = std::fs::remove_file(&values);
    let upgraded = maps.get("hi-greeting").await?;
    assert_eq!(upgraded.data.unwrap_or_default()["greeting"], "bonjour");

    helm(kubeconfig, &["uninstall", "hi", ns.name()])?;
    wait_for("hi-greeting to be deleted", Duration::from_secs(20), || {
        let maps = maps.clone();
        async move { Ok(maps.get_opt("hi-greeting").await?.is_none().then_some(())) }
    })
    .await?;
    Ok(())
}
