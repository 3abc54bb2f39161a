//! The operator (issue 4) against a real kube-apiserver + controller-manager (v1.20.2).
//!
//! The operator runs as the real binary (`target/debug/nanogate-operator`; build it first with
//! `cargo build -p nanogate-operator`), restricted to each test's namespace with `--namespace`
//! so tests running in parallel do not reconcile each other's gateways.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use kube::{Api, Client};
use nanogate_e2e::{ControlPlane, Process, TestNamespace, wait_for};
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
        let process = Process::spawn_with_env(
            log_name,
            &nanogate_e2e::workspace_binary("nanogate-operator")?,
            &args,
            &[
                ("KUBECONFIG", cp.kubeconfig_path().display().to_string()),
                ("RUST_LOG", "info,kube=warn".into()),
                ("NANOGATE_LOG_FORMAT", "json".into()),
            ],
            cp.dir(),
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
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
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
    gw.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
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

#[tokio::test]
async fn gateway_gets_config_map_status_columns_and_is_garbage_collected() -> Result<()> {
    let (cp, client) = setup().await?;
    let ns = TestNamespace::create(&client, "op-life").await?;
    let op = Operator::start(cp, ns.name(), "op-life-0", 15)?;
    create_secret(&client, ns.name(), "tendrl-key").await?;
    let api = gateways(&client, ns.name());
    api.create(
        &PostParams::default(),
        &gateway("demo", minimal_spec("tendrl-key"))?,
    )
    .await?;

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
    let (cp, client) = setup().await?;
    let ns = TestNamespace::create(&client, "op-secret").await?;
    let _op = Operator::start(cp, ns.name(), "op-secret-0", 15)?;
    let api = gateways(&client, ns.name());
    api.create(
        &PostParams::default(),
        &gateway("gw", minimal_spec("later"))?,
    )
    .await?;

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
    wait_for("SecretMissing event", Duration::from_secs(10), || async {
        Ok(events_for(&client, ns.name(), "gw")
            .await?
            .contains(&"SecretMissing".to_string())
            .then_some(()))
    })
    .await?;

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
    let (cp, client) = setup().await?;
    let ns = TestNamespace::create(&client, "op-invalid").await?;
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
    wait_for("ConfigInvalid event", Duration::from_secs(10), || async {
        Ok(events_for(&client, ns.name(), "semantic")
            .await?
            .contains(&"ConfigInvalid".to_string())
            .then_some(()))
    })
    .await?;

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
    let (cp, client) = setup().await?;
    let ns = TestNamespace::create(&client, "op-leader").await?;
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
    api.create(
        &PostParams::default(),
        &gateway("before", minimal_spec("k"))?,
    )
    .await?;
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
    api.create(
        &PostParams::default(),
        &gateway("after", minimal_spec("k"))?,
    )
    .await?;
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
    let (cp, client) = setup().await?;
    let ns = TestNamespace::create(&client, "op-scale").await?;
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
    let ns = TestNamespace::create(&client, "op-start").await?;
    let operator_ns = TestNamespace::create(&client, "op-start-sys").await?;
    create_secret(&client, ns.name(), "key").await?;
    gateways(&client, ns.name())
        .create(&PostParams::default(), &gateway("gw", minimal_spec("key"))?)
        .await?;
    let operator = nanogate_e2e::namespace_operator(
        cp,
        "nanogate.io/e2e-webhook",
        ns.name(),
        operator_ns.name(),
    )?;
    let (webhook_port, admin_port) = (operator.webhook_port, operator.admin_port);
    let mut args = operator.args;
    args.push("--hub-advertise=127.0.0.1:7051".into());
    let _operator = Process::spawn_with_env(
        "operator-op-start",
        &nanogate_e2e::workspace_binary("nanogate-operator")?,
        &args,
        &[("KUBECONFIG", cp.kubeconfig_path().display().to_string())],
        cp.dir(),
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
    wait_for("/readyz to say ready", Duration::from_secs(30), || async {
        let out = admin_get(admin_port, "/readyz")?;
        Ok(out.starts_with("HTTP/1.1 200").then_some(()))
    })
    .await?;
    Ok(())
}
