//! `nanogate-operator selftest`: what the chart's `helm test` pod runs. Three checks, each
//! printed as one line, the first failure ending the run with a message that says what to look
//! at:
//!
//! 1. the operator answers `GET <url>/readyz` with 200 (the admin server behind the chart's
//!    metrics Service);
//! 2. a valid AgentGateway is admitted: a server-side dry-run create (nothing is stored; it
//!    still needs `create` permission on agentgateways) passes the CRD schema and the
//!    operator's validating webhook;
//! 3. the validating webhook is really called: a dry-run create naming a sidecar image no
//!    operator allows (`--refused-image`) is refused by `validate.nanogate.io` (skipped when
//!    the flag is empty).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kube::Api;
use kube::api::PostParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::crd::AgentGateway;

/// Name of the validating webhook (`charts/nanogate/templates/webhooks.yaml`).
pub const VALIDATING_WEBHOOK: &str = "validate.nanogate.io";
/// Field manager of the dry-run creates.
const FIELD_MANAGER: &str = "nanogate-selftest";

/// Flags of `nanogate-operator selftest`.
#[derive(Clone, Debug, clap::Args)]
pub struct SelftestOptions {
    /// Base URL of the operator's admin server, plain HTTP (e.g.
    /// `http://nanogate-metrics.nanogate-system.svc:8080`); `/readyz` is appended.
    #[arg(long)]
    pub url: String,
    /// Namespace of the dry-run AgentGateway creates (default: `POD_NAMESPACE`, else
    /// `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// An AgentGateway (YAML or JSON) to dry-run create instead of the built-in sample; it
    /// must be admitted.
    #[arg(long)]
    pub gateway_file: Option<PathBuf>,
    /// A sidecar image no operator allows: a dry-run create naming it must be refused by the
    /// validating webhook, which proves the webhook is called ("" skips the check).
    #[arg(long, default_value = "selftest.invalid/not-an-allowed-image:0")]
    pub refused_image: String,
    /// Time each check gets.
    #[arg(long, default_value = "10s", value_parser = crate::crd::parse_duration)]
    pub timeout: Duration,
}

/// The built-in sample: a minimal valid gateway (`generateName`, so it never collides).
pub fn sample_gateway() -> Result<AgentGateway> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "nanogate.io/v1alpha1",
        "kind": "AgentGateway",
        "metadata": {"generateName": "nanogate-selftest-"},
        "spec": {
            "upstream": {
                "kind": "http",
                "url": "https://selftest.invalid/api",
                "apiKeySecretRef": {"name": "nanogate-selftest", "key": "apiKey"}
            }
        }
    }))?)
}

/// Runs the checks, printing one line for each; fails at the first that does not pass.
pub async fn run(opts: &SelftestOptions) -> Result<()> {
    ready(&opts.url, opts.timeout).await?;
    println!("ok: the operator is ready ({}/readyz)", base(&opts.url));
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client (KUBECONFIG or the in-cluster service account)")?;
    let gateway = match &opts.gateway_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not an AgentGateway", path.display()))?
        }
        None => sample_gateway()?,
    };
    admitted(&client, &opts.namespace, &gateway, opts.timeout).await?;
    println!(
        "ok: an AgentGateway is admitted in namespace {} (server-side dry run)",
        opts.namespace
    );
    if !opts.refused_image.is_empty() {
        refused_by_webhook(&client, &opts.namespace, &opts.refused_image, opts.timeout).await?;
        println!(
            "ok: the validating webhook {VALIDATING_WEBHOOK} answers and refuses an invalid gateway"
        );
    }
    Ok(())
}

fn base(url: &str) -> &str {
    url.trim_end_matches('/')
}

/// `GET <url>/readyz` must answer 200.
pub async fn ready(url: &str, timeout: Duration) -> Result<()> {
    let target = format!("{}/readyz", base(url));
    let status = tokio::time::timeout(timeout, get_status(&target))
        .await
        .map_err(|_| anyhow::anyhow!("GET {target}: no answer within {timeout:?}"))?
        .with_context(|| format!("GET {target}: the operator does not answer (is it running, is its metrics Service up?)"))?;
    ensure!(
        status == 200,
        "GET {target}: status {status}, the operator is not ready (see its logs and `kubectl describe` of its pods)"
    );
    Ok(())
}

/// The status code of a plain-HTTP GET of `url` (`http://host[:port]/path`).
async fn get_status(url: &str) -> Result<u16> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut stream = tokio::net::TcpStream::connect(&addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {:?}", line.lines().next()))?;
    Ok(status)
}

/// A server-side dry-run create of `gateway` in `ns` must pass.
pub async fn admitted(
    client: &kube::Client,
    ns: &str,
    gateway: &AgentGateway,
    timeout: Duration,
) -> Result<()> {
    match dry_run_create(client, ns, gateway, timeout).await? {
        Ok(()) => Ok(()),
        Err(e) => bail!(
            "the AgentGateway was not admitted in namespace {ns} (server-side dry run): {} ({})",
            e.message,
            e.reason
        ),
    }
}

/// A dry-run create naming `image` must be refused by the validating webhook.
pub async fn refused_by_webhook(
    client: &kube::Client,
    ns: &str,
    image: &str,
    timeout: Duration,
) -> Result<()> {
    let mut gateway = sample_gateway()?;
    gateway.spec.sidecar.image = Some(image.to_string());
    match dry_run_create(client, ns, &gateway, timeout).await? {
        Ok(()) => bail!(
            "an AgentGateway naming sidecar image {image:?} was admitted: the validating webhook \
             {VALIDATING_WEBHOOK} was not called (is its ValidatingWebhookConfiguration installed, \
             does its namespaceSelector select {ns}, is its failurePolicy Ignore while the operator is down?)"
        ),
        Err(e) if e.message.contains(VALIDATING_WEBHOOK) && e.message.contains("denied") => Ok(()),
        Err(e) => bail!(
            "an AgentGateway naming sidecar image {image:?} was refused, but not by the validating webhook {VALIDATING_WEBHOOK}: {}",
            e.message
        ),
    }
}

/// `Ok(Ok(()))` when admitted, `Ok(Err(status))` when the apiserver refused it.
async fn dry_run_create(
    client: &kube::Client,
    ns: &str,
    gateway: &AgentGateway,
    timeout: Duration,
) -> Result<Result<(), Box<kube::core::Status>>> {
    let api: Api<AgentGateway> = Api::namespaced(client.clone(), ns);
    let params = PostParams {
        dry_run: true,
        field_manager: Some(FIELD_MANAGER.into()),
    };
    let mut gateway = gateway.clone();
    gateway.metadata.namespace = None;
    gateway.metadata.resource_version = None;
    match tokio::time::timeout(timeout, api.create(&params, &gateway)).await {
        Err(_) => bail!("dry-run create of an AgentGateway in {ns}: no answer within {timeout:?}"),
        Ok(Ok(_)) => Ok(Ok(())),
        Ok(Err(kube::Error::Api(status))) => Ok(Err(status)),
        Ok(Err(e)) => {
            Err(anyhow::Error::new(e).context(format!("dry-run create of an AgentGateway in {ns}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_gateway_is_valid() {
        let gateway = sample_gateway().unwrap();
        assert!(crate::crd::validate(&gateway.spec).is_ok());
    }

    #[tokio::test]
    async fn ready_reads_the_status_of_a_plain_http_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /readyz HTTP/1.1"));
                s.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let url = format!("http://{addr}/");
        ready(&url, Duration::from_secs(5)).await.unwrap();
        let error = ready(&url, Duration::from_secs(5)).await.unwrap_err();
        assert!(format!("{error:#}").contains("status 503"), "{error:#}");
        server.await.unwrap();
        let error = ready("https://x:1", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(format!("{error:#}").contains("only http://"), "{error:#}");
    }
}
