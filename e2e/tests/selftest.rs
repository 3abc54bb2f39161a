//! `nanogate-operator selftest` (what the chart's `helm test` pod runs) against the real
//! apiserver and a real operator process: it passes when the operator is ready and its
//! validating webhook answers, and fails with a message naming the cause when the operator
//! does not answer or the gateway it is given is refused.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use nanogate_e2e::{ControlPlane, TestNamespace, wait_for};

/// Runs `nanogate-operator selftest` with `args`; returns (success, stdout + stderr).
fn selftest(cp: &ControlPlane, args: &[String]) -> Result<(bool, String)> {
    let out = Command::new(nanogate_e2e::workspace_binary("nanogate-operator")?)
        .arg("selftest")
        .args(args)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[tokio::test]
async fn selftest_passes_against_a_ready_operator_and_names_what_fails() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    nanogate_e2e::install_crd(cp)?;
    let client = cp.client().await?;
    let ns = TestNamespace::create(&client, "selftest").await?;
    let operator_ns = TestNamespace::create(&client, "selftest-sys").await?;
    // Both webhook configurations, failurePolicy Fail, scoped to this namespace.
    let operator = nanogate_e2e::namespace_operator(
        cp,
        "nanogate.io/e2e-selftest",
        ns.name(),
        operator_ns.name(),
    )?;
    let url = format!("http://127.0.0.1:{}", operator.admin_port);
    let flags = |extra: &[String]| -> Vec<String> {
        let mut a = vec![
            format!("--url={url}"),
            format!("--namespace={}", ns.name()),
            "--timeout=5s".into(),
        ];
        a.extend_from_slice(extra);
        a
    };

    // Nothing answers yet.
    let (ok, out) = selftest(cp, &flags(&[]))?;
    assert!(!ok, "passed without an operator: {out}");
    assert!(
        out.contains("/readyz") && out.contains("does not answer"),
        "{out}"
    );

    let mut process = operator.spawn(
        cp,
        "operator-selftest",
        &["--hub-advertise=127.0.0.1:7051".into()],
    )?;
    let result = async {
        // Passes once the operator is ready (retried: it takes a moment to start).
        let out = wait_for("selftest to pass", Duration::from_secs(60), || async {
            let (ok, out) = selftest(cp, &flags(&[]))?;
            Ok(ok.then_some(out))
        })
        .await?;
        for line in [
            "ok: the operator is ready",
            "ok: an AgentGateway is admitted",
            "ok: the validating webhook validate.nanogate.io answers",
        ] {
            anyhow::ensure!(out.contains(line), "{line:?} missing: {out}");
        }
        // Nothing was stored: the creates were dry runs.
        let stored = cp.kubectl(&["get", "agentgateways", "-n", ns.name(), "-o", "name"])?;
        anyhow::ensure!(stored.trim().is_empty(), "stored: {stored}");

        // A gateway the validator refuses: the message names the webhook and the field.
        let invalid = cp.dir().join(format!("selftest-invalid-{}.yaml", ns.name()));
        std::fs::write(
            &invalid,
            "apiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {name: bad}\nspec:\n  upstream: {kind: http, url: \"http://127.0.0.1:9\", apiKeySecretRef: {name: k, key: k}}\n  sidecar: {image: \"elsewhere.example/agent:1\"}\n",
        )?;
        let (ok, out) = selftest(
            cp,
            &flags(&[format!("--gateway-file={}", invalid.display())]),
        )?;
        anyhow::ensure!(!ok, "an invalid gateway passed: {out}");
        anyhow::ensure!(
            out.contains("was not admitted")
                && out.contains("validate.nanogate.io")
                && out.contains("spec.sidecar.image"),
            "unclear message: {out}"
        );
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", process.log_tail(40));
    }
    process.stop();
    result
}
