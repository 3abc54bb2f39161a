//! Operator cost against cluster size (issue 18, "operator work scales with our objects"): a
//! real control plane with 200 AgentGateways (20 namespaces × 10) and 5,000 pods that are none
//! of ours (no annotation, namespaces not opted in; no node, so they stay Pending), created
//! in the gateways' own namespaces — the worst case for a pod watch that requeues a
//! namespace's gateways. The real operator binary (webhook and hub on loopback, no webhook
//! registered, so nothing is injected) is measured in three windows:
//!
//! - idle: 60 s with the 200 gateways Ready and no pods,
//! - churn: while the 5,000 pods are created, and 30 s after,
//! - idle with pods: 60 s with the 5,000 pods present.
//!
//! Per window: the operator's CPU seconds per minute (`/proc/<pid>/stat`) and the API
//! requests it made per minute. The requests are counted from the apiserver's audit log: the
//! operator runs as its own ServiceAccount (`default/nanogate-bench`, cluster-admin) and the
//! audit policy records that user only, so the bench's own requests and the
//! controller-manager's are not counted. A watch counts once, when it ends.
//!
//! Before/after in one run: set `NANOGATE_BENCH_BASELINE` to another operator binary (e.g.
//! one built from `main`) and it is measured first, on the same control plane and objects;
//! then this tree's debug binary. Figures only; nothing is asserted on time.
//!
//! Run: `cargo build -p nanogate-operator --bins && cargo bench -p nanogate-e2e --bench
//! operator_scale` (starts its own etcd, apiserver and controller-manager).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use nanogate_e2e::bench::{cpu_seconds, load, namespaces_with_gateways};
use nanogate_e2e::{ControlPlane, Process, TestNamespace, wait_for};
use serde_json::json;

const NAMESPACES: usize = 20;
const GATEWAYS_PER_NAMESPACE: usize = 10;
const PODS: usize = 5_000;
/// Pod creations in flight at once.
const PARALLEL: usize = 48;
const IDLE: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(30);
const SA: &str = "nanogate-bench";
const SA_USER: &str = "system:serviceaccount:default:nanogate-bench";

/// The audit log, read from where the last window ended.
struct Audit {
    path: PathBuf,
    offset: u64,
}

impl Audit {
    /// Skips what is logged so far.
    fn mark(&mut self) {
        self.offset = std::fs::metadata(&self.path).map_or(0, |m| m.len());
    }

    /// The operator's requests since the mark, by "VERB resource".
    fn since_mark(&mut self) -> Result<BTreeMap<String, u64>> {
        let text = std::fs::read(&self.path).unwrap_or_default();
        let new = &text[(self.offset as usize).min(text.len())..];
        self.offset += new.len() as u64;
        let mut counts = BTreeMap::new();
        for line in new.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let event: serde_json::Value = serde_json::from_slice(line)?;
            if event["user"]["username"] != SA_USER || event["stage"] != "ResponseComplete" {
                continue;
            }
            let resource = event["objectRef"]["resource"].as_str().unwrap_or("-");
            let sub = event["objectRef"]["subresource"]
                .as_str()
                .map(|s| format!("/{s}"))
                .unwrap_or_default();
            let verb = event["verb"].as_str().unwrap_or("?");
            *counts.entry(format!("{verb} {resource}{sub}")).or_insert(0) += 1;
        }
        Ok(counts)
    }
}

/// One measured window.
struct Window {
    name: &'static str,
    minutes: f64,
    cpu: f64,
    requests: BTreeMap<String, u64>,
}

impl Window {
    fn print(&self, variant: &str) {
        let total: u64 = self.requests.values().sum();
        println!(
            "{variant:<10} {:<16} {:>6.0} s  cpu {:>7.2} s/min  requests {:>8.1} /min",
            self.name,
            self.minutes * 60.0,
            self.cpu / self.minutes,
            total as f64 / self.minutes
        );
        let mut top: Vec<_> = self.requests.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = top
            .iter()
            .take(5)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("{:<27} top: {}", "", top.join(", "));
    }
}

/// Measures the operator `pid` while `work` runs.
async fn window<F: std::future::Future<Output = Result<()>>>(
    name: &'static str,
    pid: u32,
    audit: &mut Audit,
    work: F,
) -> Result<Window> {
    audit.mark();
    let (cpu0, started) = (cpu_seconds(pid)?, Instant::now());
    work.await?;
    let (cpu, minutes) = (
        cpu_seconds(pid)? - cpu0,
        started.elapsed().as_secs_f64() / 60.0,
    );
    // The audit backend writes as requests complete; give the last ones a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(Window {
        name,
        minutes,
        cpu,
        requests: audit.since_mark()?,
    })
}

fn unrelated_pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "unrelated"}},
        "spec": {"containers": [{"name": "app", "image": "busybox",
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}
    }))?)
}

async fn create_pods(client: &Client, namespaces: &[String]) -> Result<()> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..PODS {
        let permit = semaphore.clone().acquire_owned().await?;
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespaces[i % namespaces.len()]);
        tasks.spawn(async move {
            let _permit = permit;
            api.create(
                &PostParams::default(),
                &unrelated_pod(&format!("unrelated-{i}"))?,
            )
            .await?;
            anyhow::Ok(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

async fn delete_pods(cp: &ControlPlane, client: &Client, namespaces: &[String]) -> Result<()> {
    for ns in namespaces {
        cp.kubectl(&["delete", "pods", "--all", "-n", ns, "--wait=false"])?;
    }
    let pods: Api<Pod> = Api::all(client.clone());
    wait_for("the pods deleted", Duration::from_secs(300), || async {
        let left = pods.list_metadata(&ListParams::default().limit(1)).await?;
        Ok((left.items.is_empty()).then_some(()))
    })
    .await
}

/// A kubeconfig for the ServiceAccount the operator runs as (its requests are the audited ones).
fn operator_kubeconfig(cp: &ControlPlane, dir: &Path) -> Result<PathBuf> {
    use base64::Engine as _;
    cp.kubectl(&["create", "serviceaccount", SA, "-n", "default"])?;
    cp.kubectl(&[
        "create",
        "clusterrolebinding",
        SA,
        "--clusterrole=cluster-admin",
        &format!("--serviceaccount=default:{SA}"),
    ])?;
    let token = cp.kubectl(&["create", "token", SA, "-n", "default", "--duration=6h"])?;
    let ca = base64::engine::general_purpose::STANDARD.encode(cp.ca_pem());
    let path = dir.join("operator.kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: op\n  user:\n    token: {}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: op, namespace: default}}\ncurrent-context: e2e\n",
            cp.server(),
            token.trim()
        ),
    )?;
    Ok(path)
}

/// Whether every gateway shows both writers' parts: the reconciler's `configHash` and the
/// hub's `SidecarsHealthy` condition.
async fn all_ready(client: &Client) -> Result<Option<()>> {
    let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "nanogate.io",
        "v1alpha1",
        "AgentGateway",
    ));
    let list = Api::<kube::api::DynamicObject>::all_with(client.clone(), &resource)
        .list(&ListParams::default())
        .await?;
    let ready = list
        .items
        .iter()
        .filter(|g| {
            let status = &g.data["status"];
            status["configHash"].is_string()
                && status["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "SidecarsHealthy"))
        })
        .count();
    Ok((ready == NAMESPACES * GATEWAYS_PER_NAMESPACE).then_some(()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut variants = Vec::new();
    if let Some(baseline) = std::env::var_os("NANOGATE_BENCH_BASELINE") {
        let baseline = PathBuf::from(baseline);
        if !baseline.exists() {
            bail!(
                "NANOGATE_BENCH_BASELINE={} does not exist",
                baseline.display()
            );
        }
        variants.push(("baseline", baseline));
    }
    variants.push((
        "this tree",
        nanogate_e2e::workspace_binary("nanogate-operator")?,
    ));

    let dir = std::env::temp_dir().join(format!("nanogate-scale-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let policy = dir.join("audit-policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\nrules:\n- level: Metadata\n  users: [\"{SA_USER}\"]\n- level: None\n"
        ),
    )?;
    let audit_log = dir.join("audit.log");
    let cp = ControlPlane::start_with(&[
        &format!("--audit-policy-file={}", policy.display()),
        &format!("--audit-log-path={}", audit_log.display()),
    ])
    .await?;
    let client = cp.client().await?;
    nanogate_e2e::install_crd(&cp)?;
    let kubeconfig = operator_kubeconfig(&cp, &dir)?;
    let operator_ns = TestNamespace::create(&client, "scale-op").await?;
    let namespaces =
        namespaces_with_gateways(&cp, &client, "scale", NAMESPACES, GATEWAYS_PER_NAMESPACE).await?;
    let names: Vec<String> = namespaces.iter().map(|n| n.name().to_string()).collect();
    eprintln!(
        "[bench] {} gateways in {NAMESPACES} namespaces",
        NAMESPACES * GATEWAYS_PER_NAMESPACE
    );
    let mut audit = Audit {
        path: audit_log,
        offset: 0,
    };

    let mut results = Vec::new();
    for (variant, binary) in &variants {
        let (webhook, hub, admin) = (
            nanogate_e2e::free_port()?,
            nanogate_e2e::free_port()?,
            nanogate_e2e::free_port()?,
        );
        let args = vec![
            "run".to_string(),
            format!("--admin-addr=127.0.0.1:{admin}"),
            "--leader-elect=false".into(),
            format!("--operator-namespace={}", operator_ns.name()),
            format!("--webhook-addr=127.0.0.1:{webhook}"),
            format!("--hub-addr=127.0.0.1:{hub}"),
            format!("--hub-advertise=127.0.0.1:{hub}"),
            "--extra-sans=127.0.0.1".into(),
        ];
        let operator = Process::spawn_with_env(
            "nanogate-operator",
            binary,
            &args,
            &[
                ("KUBECONFIG", kubeconfig.display().to_string()),
                ("RUST_LOG", "warn".into()),
            ],
            cp.dir(),
        )?;
        let started = Instant::now();
        wait_for(
            "all gateways Ready with the hub's status",
            Duration::from_secs(600),
            || all_ready(&client),
        )
        .await
        .map_err(|e| e.context(operator.log_tail(20)))?;
        eprintln!(
            "[bench] {variant}: all gateways ready after {:.0?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        let pid = operator.pid();
        let idle = window("idle", pid, &mut audit, async {
            tokio::time::sleep(IDLE).await;
            Ok(())
        })
        .await?;
        idle.print(variant);
        let churn = window("5,000 pods made", pid, &mut audit, async {
            let made = Instant::now();
            create_pods(&client, &names).await?;
            eprintln!(
                "[bench] {variant}: {PODS} pods created in {:.0?}",
                made.elapsed()
            );
            tokio::time::sleep(SETTLE).await;
            Ok(())
        })
        .await?;
        churn.print(variant);
        let crowded = window("idle, 5,000 pods", pid, &mut audit, async {
            tokio::time::sleep(IDLE).await;
            Ok(())
        })
        .await?;
        crowded.print(variant);
        drop(operator);
        delete_pods(&cp, &client, &names).await?;
        results.push((variant, [idle, churn, crowded]));
    }

    println!(
        "\noperator cost, {} gateways and {PODS} unrelated pods ({} cores, load {})",
        NAMESPACES * GATEWAYS_PER_NAMESPACE,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load()
    );
    for (variant, windows) in &results {
        for w in windows {
            w.print(variant);
        }
    }
    drop(namespaces);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
