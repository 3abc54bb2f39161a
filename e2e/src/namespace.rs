//! A fresh, labelled namespace per test, deleted when the test ends (pass or fail).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// Label on every namespace the harness creates, so leftovers are easy to find
/// (`kubectl get ns -l nanogate.io/e2e=true`).
pub const E2E_LABEL: &str = "nanogate.io/e2e";

pub struct TestNamespace {
    name: String,
    kubeconfig: Option<PathBuf>,
}

impl TestNamespace {
    /// Creates `e2e-<prefix>-<random>` labelled `nanogate.io/e2e=true` plus `labels`.
    pub async fn create(client: &Client, prefix: &str) -> Result<Self> {
        Self::create_labelled(client, prefix, &[]).await
    }

    pub async fn create_labelled(
        client: &Client,
        prefix: &str,
        labels: &[(&str, &str)],
    ) -> Result<Self> {
        let name = format!("e2e-{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let mut all_labels: std::collections::BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all_labels.insert(E2E_LABEL.into(), "true".into());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(all_labels),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        // The ServiceAccount admission plugin refuses pods until the namespace's default
        // ServiceAccount has its token (1.20); the controller-manager makes both in ~1 s.
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        crate::wait_for(
            "the default ServiceAccount token",
            Duration::from_secs(30),
            || {
                let accounts = accounts.clone();
                async move {
                    let ready = accounts
                        .get_opt("default")
                        .await?
                        .is_some_and(|sa| !sa.secrets.unwrap_or_default().is_empty());
                    Ok(ready.then_some(()))
                }
            },
        )
        .await?;
        // Deletion happens in Drop, which cannot await; it goes through kubectl against the
        // shared control plane's kubeconfig when there is one.
        let kubeconfig =
            crate::ControlPlane::shared_if_started().map(|cp| cp.kubeconfig_path().to_path_buf());
        Ok(Self { name, kubeconfig })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("NANOGATE_E2E_KEEP").is_some() {
            crate::progress!(
                "[e2e] keeping namespace {} (NANOGATE_E2E_KEEP is set)",
                self.name
            );
            return;
        }
        if let Some(kubeconfig) = &self.kubeconfig {
            let _ = crate::kubectl_command(kubeconfig)
                .args([
                    "delete",
                    "namespace",
                    &self.name,
                    "--wait=false",
                    "--ignore-not-found",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}
