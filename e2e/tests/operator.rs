//! The operator (issue 4) against a real kube-apiserver + controller-manager (v1.20.2).
//!
//! The operator runs as the real binary (`target/debug/nanogate-operator`; build it first with
//! `cargo build -p nanogate-operator`), restricted to each test's namespace with `--namespace`
//! so tests running in parallel do not reconcile each other's gateways.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::{Api, Client};
use nanogate_e2e::{ControlPlane, NamespaceOperator, Process, TestNamespace, wait_for};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

/// One operator process and its admin port.
struct Operator {
    process: Process,
    admin_port: u16,
    identity: String,
}

impl Operator {
    fn start(cp: &ControlPlane, ns: &str, identity: &str, lease_seconds: u64) -> Result<Self> {
        let admin_port = nanogate_e2e::free_port()?;
        let args: Vec<String> = [
            "run",
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
            "--namespace",
            ns,
            "--lease-name",
            "nanogate-operator",
            "--lease-namespace",
            ns,
            "--identity",
            identity,
            "--lease-duration",
            &lease_seconds.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // One log file per replica: `<control-plane dir>/operator-<identity>.log`.
        let log_name: &'static str = Box::leak(format!("operator-{identity}").into_boxed_str());
        let process = nanogate_e2e::spawn_operator(
            cp,
            log_name,
            &args,
            &[
                ("RUST_LOG", "info,kube=warn".into()),
                ("NANOGATE_LOG_FORMAT", "json".into()),
            ],
        )?;
        Ok(Self {
            process,
            admin_port,
            identity: identity.into(),
        })
    }

    /// GET `path` on the admin server.
    fn get(&self, path: &str) -> Result<String> {
        admin_get(self.admin_port, path)
    }

    /// Sum of all samples of metric `name` (0 when absent).
    fn metric(&self, name: &str) -> Result<f64> {
        let body = self.get("/metrics")?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| {
                let rest = &l[name.len()..];
                rest.starts_with(' ') || rest.starts_with('{')
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    fn is_leader(&self) -> bool {
        self.metric("nanogate_operator_leader").unwrap_or(0.0) == 1.0
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.process.pid() as i32),
            signal,
        );
    }

    /// Send SIGTERM (graceful shutdown: the lease is released).
    fn terminate(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// Wait until the process has exited; its exit status.
    async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.exited() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.identity);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// GET `path` on an operator's admin server on loopback `port`; the whole response.
fn admin_get(port: u16, path: &str) -> Result<String> {
    nanogate_e2e::http_get(&format!("127.0.0.1:{port}"), path)
}

static CRD: OnceCell<()> = OnceCell::const_new();

async fn setup() -> Result<(&'static ControlPlane, Client)> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    CRD.get_or_try_init(|| async {
        nanogate_e2e::apply_yaml_file(
            cp.kubeconfig_path(),
            &nanogate_e2e::workspace_root().join("crds/agentgateway.yaml"),
        )?;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        wait_for(
            "AgentGateway CRD established",
            Duration::from_secs(30),
            || {
                let crds = crds.clone();
                async move {
                    let crd = crds.get("agentgateways.nanogate.io").await?;
                    Ok(crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(()))
                }
            },
        )
        .await
    })
    .await?;
    Ok((cp, client))
}

/// [`setup`] and a fresh namespace.
async fn setup_namespace(prefix: &str) -> Result<(&'static ControlPlane, Client, TestNamespace)> {
    let (cp, client) = setup().await?;
    let ns = TestNamespace::create(&client, prefix).await?;
    Ok((cp, client, ns))
}

fn gateways(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "nanogate.io",
        "v1alpha1",
        "AgentGateway",
    ));
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn gateway(name: &str, spec: Value) -> Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "nanogate.io/v1alpha1", "kind": "AgentGateway",
        "metadata": {"name": name}, "spec": spec
    }))?)
}

fn minimal_spec(secret: &str) -> Value {
    json!({"upstream": {"apiKeySecretRef": {"name": secret}}})
}

/// Creates gateway `name` with [`minimal_spec`] naming Secret `secret`.
async fn create_gateway(api: &Api<DynamicObject>, name: &str, secret: &str) -> Result<()> {
    api.create(
        &PostParams::default(),
        &gateway(name, minimal_spec(secret))?,
    )
    .await?;
    Ok(())
}

/// A test namespace `prefix-…` and the operator's own `prefix-sys-…`.
async fn namespaces(client: &Client, prefix: &str) -> Result<(TestNamespace, TestNamespace)> {
    let ns = TestNamespace::create(client, prefix).await?;
    let operator_ns = TestNamespace::create(client, &format!("{prefix}-sys")).await?;
    Ok((ns, operator_ns))
}

/// The operator's flags for a webhook scoped (by the e2e label) to `ns`, run from
/// `operator_ns`.
fn webhook_operator(
    cp: &ControlPlane,
    ns: &TestNamespace,
    operator_ns: &TestNamespace,
) -> Result<NamespaceOperator> {
    nanogate_e2e::namespace_operator(cp, "nanogate.io/e2e-webhook", ns.name(), operator_ns.name())
}

/// [`NamespaceOperator::spawn`] advertising a hub on 127.0.0.1:7051, with `flag`.
fn spawn_with(
    operator: &NamespaceOperator,
    cp: &ControlPlane,
    name: &'static str,
    flag: String,
) -> Result<Process> {
    operator.spawn(
        cp,
        name,
        &["--hub-advertise=127.0.0.1:7051".to_string(), flag],
    )
}

async fn create_secret(client: &Client, ns: &str, name: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "stringData": {"apiKey": "not-a-real-key"}
    }))?;
    secrets.create(&PostParams::default(), &s).await?;
    Ok(())
}

fn condition(gw: &DynamicObject, ty: &str) -> Option<(String, String, String)> {
    nanogate_e2e::status_condition(&gw.data["status"], ty)
}

async fn wait_condition(
    api: &Api<DynamicObject>,
    name: &str,
    ty: &str,
    status: &str,
) -> Result<DynamicObject> {
    wait_for(
        &format!("{name}: {ty}={status}"),
        Duration::from_secs(30),
        || async {
            let gw = api.get(name).await?;
            Ok(condition(&gw, ty)
                .is_some_and(|(s, _, _)| s == status)
                .then_some(gw))
        },
    )
    .await
}

async fn events_for(client: &Client, ns: &str, name: &str) -> Result<Vec<String>> {
    let events = nanogate_e2e::events_about(client, ns, name).await?;
    Ok(events.into_iter().map(|(reason, _)| reason).collect())
}

/// Waits up to 10 s for a `reason` event about `name`.
async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str) -> Result<()> {
    wait_for(
        &format!("{reason} event"),
        Duration::from_secs(10),
        || async {
            Ok(events_for(client, ns, name)
                .await?
                .iter()
                .any(|r| r == reason)
                .then_some(()))
        },
    )
    .await
}

#[tokio::test]
async fn gateway_gets_config_map_status_columns_and_is_garbage_collected() -> Result<()> {
    let (cp, client, ns) = setup_namespace("op-life").await?;
    let op = Operator::start(cp, ns.name(), "op-life-0", 15)?;
    create_secret(&client, ns.name(), "tendrl-key").await?;
    let api = gateways(&client, ns.name());
    create_gateway(&api, "demo", "tendrl-key").await?;

    let gw = wait_condition(&api, "demo", "Ready", "True").await?;
    assert_eq!(condition(&gw, "ConfigValid").unwrap().0, "True");
    // The apiserver applied the schema defaults.
    assert_eq!(gw.data["spec"]["batching"]["maxBatchSize"], 200);
    assert_eq!(gw.data["spec"]["heartbeatInterval"], "5s");
    assert_eq!(gw.data["status"]["observedGeneration"], 1);

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let cm = cms.get("demo-agent-config").await?;
    let file: Value = serde_json::from_str(&cm.data.unwrap_or_default()["config.json"])?;
    assert_eq!(file["batching"]["max_batch_size"], 200);
    assert_eq!(file["socket"]["path"], "/var/lib/tendrl/tendrl_agent.sock");
    let owner = &cm.metadata.owner_references.unwrap_or_default()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("AgentGateway", "demo")
    );
    assert!(
        cm.metadata
            .managed_fields
            .unwrap_or_default()
            .iter()
            .any(|m| {
                m.manager.as_deref() == Some("nanogate-operator")
                    && m.operation.as_deref() == Some("Apply")
            })
    );
    assert!(
        events_for(&client, ns.name(), "demo")
            .await?
            .contains(&"Created".to_string())
    );

    // Pods annotated for the gateway are counted (pods are stored, never run: no kubelet).
    cp.kubectl(&[
        "-n",
        ns.name(),
        "run",
        "app",
        "--image=busybox",
        "--restart=Never",
        "--annotations=nanogate.io/inject=true",
        "--annotations=nanogate.io/gateway=demo",
    ])?;
    wait_for("sidecars.expected = 1", Duration::from_secs(30), || async {
        let gw = api.get("demo").await?;
        Ok((gw.data["status"]["sidecars"]["expected"] == 1).then_some(()))
    })
    .await?;

    // kubectl shows the printer columns.
    let table = cp.kubectl(&["-n", ns.name(), "get", "agw"])?;
    println!("{table}");
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "READY",
            "SIDECARS",
            "RECEIVED/S",
            "DROPPED",
            "LEFT-BEHIND",
            "UPSTREAM",
            "AGE"
        ]
    );
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(&row[..7], ["demo", "True", "0/1", "0", "0", "0", "Unknown"]);
    // `kubectl explain` shows the documented defaults.
    // (1.20 publishes OpenAPI v2 only, a few seconds after the CRD is established.)
    let explain = wait_for("kubectl explain", Duration::from_secs(60), || async {
        let out = cp.kubectl(&[
            "explain",
            "--output=plaintext-openapiv2",
            "agw.spec.batching.flushInterval",
        ])?;
        Ok(Some(out))
    })
    .await?;
    assert!(explain.contains("Default `250ms`"), "{explain}");

    // Admin endpoints and structured (JSON) logs.
    assert!(op.get("/healthz")?.starts_with("HTTP/1.1 200"));
    assert!(op.get("/readyz")?.starts_with("HTTP/1.1 200"));
    assert!(op.metric("nanogate_operator_reconciles_total")? >= 1.0);
    assert_eq!(op.metric("nanogate_operator_leader")?, 1.0);
    let log = std::fs::read_to_string(&op.process.log)?;
    let first: Value = serde_json::from_str(log.lines().next().unwrap_or(""))
        .with_context(|| format!("log is JSON lines: {log}"))?;
    assert_eq!(first["level"], "INFO", "{first}");

    // Category and short name work too.
    assert!(
        cp.kubectl(&["-n", ns.name(), "get", "nanogate"])?
            .contains("demo")
    );

    // A spec change updates the ConfigMap.
    cp.kubectl(&[
        "-n",
        ns.name(),
        "patch",
        "agw",
        "demo",
        "--type=merge",
        "-p",
        r#"{"spec":{"batching":{"maxBatchSize":300}}}"#,
    ])?;
    wait_for("ConfigMap updated", Duration::from_secs(30), || async {
        let cm = cms.get("demo-agent-config").await?;
        let file: Value = serde_json::from_str(&cm.data.unwrap_or_default()["config.json"])?;
        Ok((file["batching"]["max_batch_size"] == 300).then_some(()))
    })
    .await?;

    // Deleting the gateway garbage-collects the ConfigMap (kube-controller-manager's GC).
    api.delete("demo", &DeleteParams::default()).await?;
    wait_for(
        "ConfigMap garbage-collected",
        Duration::from_secs(60),
        || async {
            Ok(cms
                .get_opt("demo-agent-config")
                .await?
                .is_none()
                .then_some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn missing_secret_is_reported_then_fixed_by_creating_it() -> Result<()> {
    let (cp, client, ns) = setup_namespace("op-secret").await?;
    let _op = Operator::start(cp, ns.name(), "op-secret-0", 15)?;
    let api = gateways(&client, ns.name());
    create_gateway(&api, "gw", "later").await?;

    let gw = wait_condition(&api, "gw", "ConfigValid", "False").await?;
    let (_, reason, message) = condition(&gw, "ConfigValid").unwrap();
    assert_eq!(reason, "SecretMissing");
    assert!(
        message.contains("spec.upstream.apiKeySecretRef"),
        "{message}"
    );
    assert_eq!(condition(&gw, "Ready").unwrap().0, "False");
    let generation = gw.metadata.generation;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    assert!(cms.get_opt("gw-agent-config").await?.is_none());
    wait_event(&client, ns.name(), "gw", "SecretMissing").await?;

    // Creating the Secret alone (the gateway is not touched) makes it Ready.
    create_secret(&client, ns.name(), "later").await?;
    let created = Instant::now();
    let gw = wait_condition(&api, "gw", "Ready", "True").await?;
    // Secrets are not watched: the operator's next look (2 s doubling to 60 s) finds it.
    eprintln!(
        "[op-secret] Ready {:.1}s after the Secret was created",
        created.elapsed().as_secs_f64()
    );
    assert_eq!(
        gw.metadata.generation, generation,
        "the gateway spec was not touched"
    );
    assert!(cms.get_opt("gw-agent-config").await?.is_some());
    Ok(())
}

#[tokio::test]
async fn invalid_specs_are_rejected_by_schema_or_flagged_in_status() -> Result<()> {
    let (cp, client, ns) = setup_namespace("op-invalid").await?;
    let _op = Operator::start(cp, ns.name(), "op-invalid-0", 15)?;
    create_secret(&client, ns.name(), "k").await?;
    let api = gateways(&client, ns.name());

    // Schema: bounds, enums and duration patterns are enforced by the apiserver.
    for (name, spec, field) in [
        (
            "zero-batch",
            json!({"upstream": {"apiKeySecretRef": {"name": "k"}}, "batching": {"batchSize": 0}}),
            "spec.batching.batchSize",
        ),
        (
            "bad-kind",
            json!({"upstream": {"kind": "ftp", "apiKeySecretRef": {"name": "k"}}}),
            "spec.upstream.kind",
        ),
        (
            "bad-duration",
            json!({"upstream": {"apiKeySecretRef": {"name": "k"}}, "heartbeatInterval": "5 seconds"}),
            "spec.heartbeatInterval",
        ),
        (
            "no-secret-ref",
            json!({"upstream": {"url": "https://x"}}),
            "spec.upstream.apiKeySecretRef",
        ),
    ] {
        let err = api
            .create(&PostParams::default(), &gateway(name, spec)?)
            .await
            .expect_err(name);
        let text = err.to_string();
        println!("{name}: {text}");
        assert!(text.contains(field), "{name}: {text}");
    }

    // Semantic: minBatchSize > maxBatchSize passes the schema and is flagged in status.
    let spec = json!({"upstream": {"apiKeySecretRef": {"name": "k"}},
                      "batching": {"minBatchSize": 300, "maxBatchSize": 200}});
    api.create(&PostParams::default(), &gateway("semantic", spec)?)
        .await?;
    let gw = wait_condition(&api, "semantic", "ConfigValid", "False").await?;
    let (_, reason, message) = condition(&gw, "ConfigValid").unwrap();
    assert_eq!(reason, "InvalidSpec");
    assert!(
        message.contains(
            "spec.batching.minBatchSize (300) must be ≤ spec.batching.maxBatchSize (200)"
        ),
        "{message}"
    );
    wait_event(&client, ns.name(), "semantic", "ConfigInvalid").await?;

    // Fixing the spec makes it Ready.
    cp.kubectl(&[
        "-n",
        ns.name(),
        "patch",
        "agw",
        "semantic",
        "--type=merge",
        "-p",
        r#"{"spec":{"batching":{"minBatchSize":10}}}"#,
    ])?;
    wait_condition(&api, "semantic", "Ready", "True").await?;
    Ok(())
}

#[tokio::test]
async fn two_operators_elect_exactly_one_leader_and_hand_over() -> Result<()> {
    const LEASE: u64 = 6;
    let (cp, client, ns) = setup_namespace("op-leader").await?;
    create_secret(&client, ns.name(), "k").await?;
    let a = Operator::start(cp, ns.name(), "replica-a", LEASE)?;
    let b = Operator::start(cp, ns.name(), "replica-b", LEASE)?;

    let leases: Api<Lease> = Api::namespaced(client.clone(), ns.name());
    let holder = wait_for("a lease holder", Duration::from_secs(30), || async {
        let lease = leases.get_opt("nanogate-operator").await?;
        Ok(lease.and_then(|l| l.spec?.holder_identity))
    })
    .await?;
    // Both stay ready; exactly one leads, for several renewal periods.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let leaders = [a.is_leader(), b.is_leader()];
        assert_eq!(leaders.iter().filter(|l| **l).count(), 1, "{leaders:?}");
        assert!(a.get("/readyz")?.starts_with("HTTP/1.1 200"));
        assert!(b.get("/readyz")?.starts_with("HTTP/1.1 200"));
    }
    let (mut leader, mut follower) = if a.identity == holder { (a, b) } else { (b, a) };
    assert!(leader.is_leader());

    // The leader reconciles.
    let api = gateways(&client, ns.name());
    create_gateway(&api, "before", "k").await?;
    wait_condition(&api, "before", "Ready", "True").await?;

    // Kill the leader without a chance to release the lease.
    let killed = Instant::now();
    leader.signal(nix::sys::signal::Signal::SIGKILL);
    leader.wait_exit(Duration::from_secs(5)).await?;
    let f = &follower;
    wait_for(
        "follower takes over",
        Duration::from_secs(LEASE * 3),
        || async { Ok(f.is_leader().then_some(())) },
    )
    .await?;
    let handover = killed.elapsed();
    println!(
        "leader killed -> {} leading after {handover:?} (lease duration {LEASE}s)",
        follower.identity
    );
    assert!(
        handover <= Duration::from_secs(LEASE + 2),
        "handover took {handover:?}, lease is {LEASE}s"
    );
    let lease = leases.get("nanogate-operator").await?;
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(follower.identity.as_str())
    );
    create_gateway(&api, "after", "k").await?;
    wait_condition(&api, "after", "Ready", "True").await?;

    // SIGTERM releases the lease for an immediate handover.
    follower.terminate();
    wait_for("lease released", Duration::from_secs(15), || async {
        let lease = leases.get("nanogate-operator").await?;
        Ok(lease
            .spec
            .and_then(|s| s.holder_identity)
            .is_none()
            .then_some(()))
    })
    .await?;
    let status = follower.wait_exit(Duration::from_secs(15)).await?;
    assert!(status.success(), "graceful exit after SIGTERM: {status:?}");
    Ok(())
}

/// Cold start of 200 gateways: prints time to all Ready and the API writes; then a restarted
/// operator re-reconciles all of them and must write nothing.
#[tokio::test]
async fn cold_start_200_gateways() -> Result<()> {
    const N: usize = 200;
    let (cp, client, ns) = setup_namespace("op-scale").await?;
    create_secret(&client, ns.name(), "k").await?;
    let api = gateways(&client, ns.name());
    for i in 0..N {
        api.create(
            &PostParams::default(),
            &gateway(&format!("gw-{i:03}"), minimal_spec("k"))?,
        )
        .await
        .with_context(|| format!("creating gw-{i:03}"))?;
    }

    let started = Instant::now();
    let mut op = Operator::start(cp, ns.name(), "scale-0", 15)?;
    let ready_count = || async {
        let list = api.list(&ListParams::default()).await?;
        Ok::<_, anyhow::Error>(
            list.items
                .iter()
                .filter(|g| condition(g, "Ready").is_some_and(|(s, _, _)| s == "True"))
                .count(),
        )
    };
    wait_for("all gateways Ready", Duration::from_secs(300), || async {
        Ok((ready_count().await? == N).then_some(()))
    })
    .await?;
    let elapsed = started.elapsed();
    // Let follow-up reconciles (triggered by our own writes) finish before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = op.metric("nanogate_operator_api_writes_total")?;
    let reconciles = op.metric("nanogate_operator_reconciles_total")?;
    let by_kind: Vec<String> = op
        .get("/metrics")?
        .lines()
        .filter(|l| l.starts_with("nanogate_operator_api_writes_total{"))
        .map(str::to_string)
        .collect();
    println!(
        "COLD START: {N} gateways Ready in {:.2}s (process start to all Ready); \
         {} API writes ({:.2}/gateway), {reconciles} reconciles\n  {}",
        elapsed.as_secs_f64(),
        writes as u64,
        writes / N as f64,
        by_kind.join("\n  ")
    );
    op.terminate();
    op.wait_exit(Duration::from_secs(15)).await?;

    // Second pass: a fresh operator reconciles every gateway again; nothing changed.
    let op2 = Operator::start(cp, ns.name(), "scale-1", 15)?;
    let second = Instant::now();
    wait_for(
        "second pass reconciled all",
        Duration::from_secs(120),
        || async {
            Ok((op2.metric("nanogate_operator_reconciles_total")? >= N as f64).then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes2 = op2.metric("nanogate_operator_api_writes_total")?;
    let reconciles2 = op2.metric("nanogate_operator_reconciles_total")?;
    println!(
        "SECOND PASS: {reconciles2} reconciles in {:.2}s, {} API writes",
        second.elapsed().as_secs_f64(),
        writes2 as u64
    );
    assert_eq!(
        writes2, 0.0,
        "a pass over unchanged gateways must not write"
    );
    Ok(())
}

/// Issue 18: the webhook answers only from listed caches. The operator starts with a gateway
/// already there and an opted-in pod is created the moment its webhook listens: the pod is
/// injected (`/mutate` waits for the first list instead of seeing no gateway), and `/readyz`
/// turns ready once the caches are synced.
#[tokio::test]
async fn a_pod_created_as_the_operator_starts_is_injected() -> Result<()> {
    let (cp, client) = setup().await?;
    let (ns, operator_ns) = namespaces(&client, "op-start").await?;
    create_secret(&client, ns.name(), "key").await?;
    create_gateway(&gateways(&client, ns.name()), "gw", "key").await?;
    let operator = webhook_operator(cp, &ns, &operator_ns)?;
    let webhook_port = operator.webhook_port;
    let _operator = operator.spawn(
        cp,
        "operator-op-start",
        &["--hub-advertise=127.0.0.1:7051".into()],
    )?;
    // The moment the webhook listens (its certificate and caBundle are in place by then).
    wait_for("the webhook to listen", Duration::from_secs(60), || async {
        Ok(TcpStream::connect(("127.0.0.1", webhook_port))
            .is_ok()
            .then_some(()))
    })
    .await?;
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "early", "annotations": {"nanogate.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "app"}]}
    }))?;
    let created = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns.name())
        .create(&PostParams::default(), &pod)
        .await?;
    assert!(
        nanogate_e2e::kubelet::sidecar_container(&created).is_some(),
        "the pod created as the operator started was not injected"
    );
    // Ready once synced.
    operator.wait_ready(Duration::from_secs(30)).await?;
    Ok(())
}

/// Pod watches the apiserver holds open, whatever their scope: `apiserver_longrunning_gauge`
/// (`apiserver_longrunning_requests` from v1.23 on) of `resource="pods", verb="WATCH"`, summed.
async fn open_pod_watches(client: &Client) -> Result<f64> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_longrunning_gauge{")
                || l.starts_with("apiserver_longrunning_requests{")
        })
        .filter(|l| l.contains(r#"resource="pods""#) && l.contains(r#"verb="WATCH""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The operator watches pods once, metadata only, and shares that watch between the
/// controller (which gateway a pod belongs to) and the hub (sessions of deleted pods,
/// run-to-completion sidecars): a second pod watch would double what the apiserver sends
/// it for every pod of the cluster. On a control plane of its own, so no other operator's
/// watches count.
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_watches_pods_once() -> Result<()> {
    let cp = ControlPlane::start().await?;
    nanogate_e2e::install_crd(&cp)?;
    let client = cp.client().await?;
    let (ns, operator_ns) = namespaces(&client, "one-watch").await?;
    let before = open_pod_watches(&client).await?;
    let operator = webhook_operator(&cp, &ns, &operator_ns)?;
    let hub_port = nanogate_e2e::free_port()?;
    let _operator = operator.spawn(
        &cp,
        "operator-one-watch",
        &[
            format!("--hub-addr=127.0.0.1:{hub_port}"),
            format!("--hub-advertise=127.0.0.1:{hub_port}"),
        ],
    )?;
    operator.wait_ready(Duration::from_secs(60)).await?;
    // Controller and hub both started; give every watch they open time to be counted.
    let mut counts = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        counts.push(open_pod_watches(&client).await? - before);
    }
    assert!(
        counts.iter().all(|&n| n == 1.0),
        "pod watches the operator held open, every 0.5 s after it was ready (expected 1): {counts:?}"
    );
    Ok(())
}

/// Issue 19: after an upgrade (here the operator restarted with another `--sidecar-image`, as
/// `helm upgrade` does with a new `sidecar.image`), a gateway counts the pods still running the
/// previous sidecar image (`sidecars.outdated`, a `SidecarsOutdated` event naming both images);
/// with `nanogate.io/repair: rollout` the operator restarts their Deployment, the new pod gets
/// the new image and the count returns to 0. The same for a changed pod setting of the gateway
/// (its log level), with the event saying so.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_reports_outdated_sidecars_and_the_rollout_repair_moves_them() -> Result<()> {
    const OLD: &str = "registry.example/nano-agent:0.2.0";
    const NEW: &str = "registry.example/nano-agent:0.3.0";
    let (cp, client) = setup().await?;
    let (ns, operator_ns) = namespaces(&client, "outdated").await?;
    create_secret(&client, ns.name(), "key").await?;
    let api = gateways(&client, ns.name());
    create_gateway(&api, "gw", "key").await?;
    let operator = webhook_operator(cp, &ns, &operator_ns)?;
    let start = |image: &str| {
        spawn_with(
            &operator,
            cp,
            "operator-outdated",
            format!("--sidecar-image={image}"),
        )
    };
    let ready = || operator.wait_ready(Duration::from_secs(60));
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns.name());
    // The live pods' sidecars: image and log level (`NANOGATE_LOG_LEVEL`).
    let sidecars = || async {
        let list = pods.list(&ListParams::default()).await?;
        Ok::<_, anyhow::Error>(
            list.items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| {
                    let sidecar = nanogate_e2e::kubelet::sidecar_container(p);
                    let level = sidecar
                        .and_then(|c| c.env.as_ref())
                        .and_then(|env| env.iter().find(|e| e.name == "NANOGATE_LOG_LEVEL"))
                        .and_then(|e| e.value.clone());
                    let image = sidecar.and_then(|c| c.image.clone());
                    (image.unwrap_or_default(), level.unwrap_or_default())
                })
                .collect::<Vec<_>>(),
        )
    };
    let sidecar_images = || async {
        Ok::<_, anyhow::Error>(
            sidecars()
                .await?
                .into_iter()
                .map(|(image, _)| image)
                .collect::<Vec<_>>(),
        )
    };

    let annotate = |annotation: &str| {
        cp.kubectl(&[
            "-n",
            ns.name(),
            "annotate",
            "agentgateway",
            "gw",
            annotation,
        ])
    };
    // Waits up to `secs` (for `what`) until the live pods' sidecars run `image` (one pod).
    let images_become = |what: &'static str, image: &'static str, secs: u64| {
        let sidecar_images = &sidecar_images;
        async move {
            wait_for(what, Duration::from_secs(secs), || async {
                Ok((sidecar_images().await? == [image]).then_some(()))
            })
            .await
        }
    };

    let mut old_operator = start(OLD)?;
    ready().await?;
    // No kubelet runs these pods: `Recreate` lets the rollout replace a pod that never becomes
    // ready (an unscheduled pod is deleted at once).
    nanogate_e2e::apply_yaml(
        cp.kubeconfig_path(),
        &nanogate_e2e::deployment_yaml(
            ns.name(),
            "app",
            1,
            true,
            r#"{nanogate.io/inject: "true"}"#,
            "      - {name: app, image: app}\n",
        ),
    )?;
    images_become("the pod injected with the old image", OLD, 60).await?;

    // The upgrade.
    old_operator.stop();
    let _new_operator = start(NEW)?;
    ready().await?;
    let outdated = |n: i64| {
        let api = api.clone();
        async move {
            wait_for(
                &format!("sidecars.outdated == {n}"),
                Duration::from_secs(60),
                || async {
                    let gw = api.get("gw").await?;
                    let sidecars = &gw.data["status"]["sidecars"];
                    Ok((sidecars["outdated"].as_i64() == Some(n)
                        && sidecars["expected"].as_i64() == Some(1))
                    .then_some(()))
                },
            )
            .await
        }
    };
    outdated(1).await?;
    let event = nanogate_e2e::wait_for_event(
        &client,
        ns.name(),
        "gw",
        "SidecarsOutdated",
        Duration::from_secs(30),
    )
    .await?;
    assert!(
        event.contains(OLD) && event.contains(NEW) && event.contains("nanogate.io/repair=rollout"),
        "the event names what runs, what should, and what to do: {event}"
    );

    annotate("nanogate.io/repair=rollout")?;
    images_become("the pod replaced with the new image", NEW, 90).await?;
    outdated(0).await?;

    // A pod setting of the gateway changes (log level: in the pod's spec, so only a restart
    // applies it): the same image, still outdated, and rolled the same way.
    annotate("nanogate.io/repair-")?;
    api.patch(
        "gw",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"sidecar": {"logLevel": "debug"}}})),
    )
    .await?;
    outdated(1).await?;
    let note = wait_for(
        "a SidecarsOutdated event about the pod settings",
        Duration::from_secs(30),
        || async {
            Ok(nanogate_e2e::events_about(&client, ns.name(), "gw")
                .await?
                .into_iter()
                .find(|(reason, note)| {
                    reason == "SidecarsOutdated" && note.contains("pod settings")
                })
                .map(|(_, note)| note))
        },
    )
    .await?;
    assert!(
        note.contains("logLevel") && !note.contains("instead of"),
        "the event says the pod settings changed, not the image: {note}"
    );
    annotate("nanogate.io/repair=rollout")?;
    wait_for(
        "the pod replaced with the debug log level",
        Duration::from_secs(90),
        || async {
            Ok((sidecars().await? == [(NEW.to_string(), "debug".to_string())]).then_some(()))
        },
    )
    .await?;
    outdated(0).await?;
    Ok(())
}

/// Issue 19: the CRD upgrades with the operator. Helm installs a chart's `crds/` once and never
/// upgrades them; an operator started with `--manage-crd` (the chart's default) replaces the
/// stored CRD of the previous release (the fixture is release 0.1.0's, from before schema
/// revisions) with its own. Before, the apiserver prunes the fields this release added (a
/// user's `spec.delivery.maxInFlight`, the reconciler's `status.sidecars.outdated`); after,
/// they persist, and the gateway created under the old CRD still validates. On a control plane of its own: a CRD is cluster-wide.
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_upgrades_the_previous_releases_crd() -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let cp = ControlPlane::start().await?;
    nanogate_e2e::install_crd_from(&cp, "e2e/tests/fixtures/agentgateway-crd-0.1.0.yaml")?;
    let client = cp.client().await?;
    let (ns, operator_ns) = namespaces(&client, "crd-upgrade").await?;
    create_secret(&client, ns.name(), "key").await?;
    let api = gateways(&client, ns.name());
    create_gateway(&api, "old", "key").await?;
    let operator = webhook_operator(&cp, &ns, &operator_ns)?;
    let start = |manage_crd: bool| {
        let flag = format!("--manage-crd={manage_crd}");
        spawn_with(&operator, &cp, "operator-crd-upgrade", flag)
    };
    let sidecars = || async {
        let gw = wait_condition(&api, "old", "Ready", "True").await?;
        Ok::<_, anyhow::Error>(gw.data["status"]["sidecars"].clone())
    };

    // A spec field this release added (`spec.delivery.maxInFlight`), set by a user.
    let set_max_in_flight = || async {
        let patch = json!({"spec": {"delivery": {"maxInFlight": 8}}});
        let gw = api
            .patch("old", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok::<_, anyhow::Error>(gw.data["spec"]["delivery"].get("maxInFlight").cloned())
    };

    // This release's operator on the old CRD: the fields this release added are pruned.
    let mut without = start(false)?;
    let before = sidecars().await?;
    assert_eq!(
        set_max_in_flight().await?,
        None,
        "the old CRD prunes maxInFlight"
    );
    assert!(
        before.get("expected").is_some() && before.get("outdated").is_none(),
        "the old CRD prunes status.sidecars.outdated: {before}"
    );
    without.stop();

    let _with = start(true)?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    wait_for("the CRD upgraded", Duration::from_secs(60), || async {
        let crd = crds.get("agentgateways.nanogate.io").await?;
        let revision = crd
            .metadata
            .annotations
            .unwrap_or_default()
            .get("nanogate.io/schema-revision")
            .cloned();
        Ok(
            (revision == Some(nanogate_operator::crd::upgrade::SCHEMA_REVISION.to_string()))
                .then_some(()),
        )
    })
    .await?;
    wait_for(
        "status.sidecars.outdated to persist",
        Duration::from_secs(60),
        || async {
            let after = sidecars().await?;
            Ok((after.get("outdated") == Some(&json!(0))).then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// Issue 20: a status write (the hub's, about one per gateway every 5 s at fleet scale) does not
/// re-run the gateway's reconcile — each run lists the metadata of the namespace's pods, so at
/// 10,000 sidecars the re-runs made the operator's memory grow with the fleet — while a change
/// of what the reconcile reads (here an annotation) still does.
#[tokio::test]
async fn status_writes_do_not_rerun_the_reconciler() -> Result<()> {
    let (cp, client) = setup().await?;
    let ns = TestNamespace::create(&client, "status-only").await?;
    create_secret(&client, ns.name(), "k").await?;
    let api = gateways(&client, ns.name());
    api.create(&PostParams::default(), &gateway("gw", minimal_spec("k"))?)
        .await?;
    let op = Operator::start(cp, ns.name(), "status-only", 15)?;
    wait_for("the gateway Ready", Duration::from_secs(60), || async {
        let gw = api.get("gw").await?;
        Ok(condition(&gw, "Ready")
            .is_some_and(|(s, _, _)| s == "True")
            .then_some(()))
    })
    .await?;
    // Let the reconciles of the operator's own first writes finish.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = op.metric("nanogate_operator_reconciles_total")?;
    for connected in 0..10 {
        api.patch_status(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"sidecars": {"connected": connected}}})),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = op.metric("nanogate_operator_reconciles_total")?;
    assert_eq!(
        after - before,
        0.0,
        "10 status-only writes re-ran the reconciler {} time(s)",
        after - before
    );
    cp.kubectl(&["-n", ns.name(), "annotate", "agentgateway", "gw", "e2e=1"])?;
    wait_for(
        "an annotation to re-run the reconciler",
        Duration::from_secs(30),
        || async { Ok((op.metric("nanogate_operator_reconciles_total")? > after).then_some(())) },
    )
    .await?;
    Ok(())
}

/// Issue 20: a gateway's census lists its namespace's pods a page (250) at a time, dropping
/// each pod's managed fields as it goes, so a namespace of thousands of pods never sits in the
/// operator's memory whole; every page counts. 260 opted-in pods created while no webhook runs
/// (so none is injected) span two pages: all 260 are expected and reported not injected.
#[tokio::test]
async fn the_census_counts_every_page_of_a_large_namespace() -> Result<()> {
    const PODS: usize = 260;
    let (cp, client, ns) = setup_namespace("op-census").await?;
    create_secret(&client, ns.name(), "key").await?;
    let pods: Vec<String> = (0..PODS)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: app-{i}, namespace: {ns}, \
                 annotations: {{nanogate.io/inject: \"true\"}}}}\n\
                 spec: {{containers: [{{name: app, image: app}}]}}\n",
                ns = ns.name()
            )
        })
        .collect();
    nanogate_e2e::apply_yaml(cp.kubeconfig_path(), &pods.join("---\n"))?;
    let api = gateways(&client, ns.name());
    create_gateway(&api, "gw", "key").await?;
    let op = Operator::start(cp, ns.name(), "op-census-0", 15)?;
    let counted = wait_for("all 260 pods counted", Duration::from_secs(60), || async {
        let gw = api.get("gw").await?;
        let sidecars = gw.data["status"]["sidecars"].clone();
        Ok((sidecars["expected"] == PODS).then_some(sidecars))
    })
    .await
    .map_err(|e| e.context(op.process.log_tail(20)))?;
    assert_eq!(counted["notInjected"], PODS, "{counted}");
    Ok(())
}
