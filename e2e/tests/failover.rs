//! Two operator replicas (issue 6): sidecars report to the leader only and follow it through a
//! failover; the gateway's counts never double.
//!
//! Real parts: two `nanogate-operator` processes electing a leader on the real apiserver, one
//! Pod object per replica (as the Deployment would have), a real injected pod whose real
//! `nano-agent` dials the hub "Service". The Service is played by a small TCP forwarder that
//! routes each new connection to the replica whose pod carries `nanogate.io/hub-leader=true`
//! — the chart's hub Service selector — read from the apiserver at connect time, as kube-proxy
//! follows endpoints.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use nanogate_e2e::kubelet::run_sidecar;
use nanogate_e2e::{ControlPlane, Process, TestNamespace, wait_for};
use serde_json::json;

const LEADER_LABEL: &str = "nanogate.io/hub-leader";

struct Replica {
    pod: String,
    hub_port: u16,
    process: Process,
}

fn start_replica(
    cp: &ControlPlane,
    operator_ns: &str,
    app_ns: &str,
    pod: &str,
    webhook_port: u16,
    advertise: u16,
    config: &str,
) -> Result<Replica> {
    let hub_port = nanogate_e2e::free_port()?;
    let args: Vec<String> = vec![
        "run".into(),
        format!("--admin-addr=127.0.0.1:{}", nanogate_e2e::free_port()?),
        format!("--namespace={app_ns}"),
        "--leader-elect=true".into(),
        "--lease-duration=4".into(),
        format!("--identity={pod}"),
        format!("--lease-namespace={operator_ns}"),
        format!("--operator-namespace={operator_ns}"),
        format!("--webhook-addr=127.0.0.1:{webhook_port}"),
        format!("--hub-addr=127.0.0.1:{hub_port}"),
        format!("--hub-advertise=127.0.0.1:{advertise}"),
        format!("--mutating-webhook-configs={config}"),
        format!("--validating-webhook-configs={config}"),
        "--extra-sans=127.0.0.1".into(),
        "--status-interval=1s".into(),
    ];
    let process = nanogate_e2e::spawn_operator(cp, "nanogate-operator", &args, &[])?;
    Ok(Replica {
        pod: pod.into(),
        hub_port,
        process,
    })
}

/// Pods of `ns` carrying the leader label.
async fn labelled_leaders(client: &Client, ns: &str) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods
        .list_metadata(&ListParams::default().labels(&format!("{LEADER_LABEL}=true")))
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect())
}

/// The hub "Service": forwards each connection to the hub of the labelled pod.
async fn service(
    listener: tokio::net::TcpListener,
    client: Client,
    ns: String,
    ports: BTreeMap<String, u16>,
) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        let leaders = labelled_leaders(&client, &ns).await.unwrap_or_default();
        let Some(port) = leaders.first().and_then(|pod| ports.get(pod)).copied() else {
            continue; // no endpoint: the connection is refused (dropped)
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test]
async fn sidecars_follow_the_leader_and_counts_never_double() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    nanogate_e2e::install_crd(cp)?;
    let operator_ns = TestNamespace::create(&client, "failover-op").await?;
    let ns = TestNamespace::create(&client, "failover").await?;
    let label = "nanogate.io/e2e-failover";
    cp.kubectl(&[
        "label",
        "namespace",
        ns.name(),
        &format!("{label}={}", ns.name()),
    ])?;
    let config = format!("nanogate-failover-{}", ns.name());
    let webhook_port = nanogate_e2e::free_port()?;
    nanogate_e2e::apply_yaml(
        cp.kubeconfig_path(),
        &nanogate_e2e::webhook_configurations(label, &config, ns.name(), webhook_port, "Fail"),
    )?;
    // The replicas' own pods, as their Deployment would have created them.
    let pods: Api<Pod> = Api::namespaced(client.clone(), operator_ns.name());
    for name in ["operator-a", "operator-b"] {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "nanogate"}},
            "spec": {"containers": [{"name": "operator", "image": "nanogate-operator"}]}
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    let service_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let service_port = service_listener.local_addr()?.port();
    // Only replica a serves the webhook (one URL); both run hub and election.
    let a = start_replica(
        cp,
        operator_ns.name(),
        ns.name(),
        "operator-a",
        webhook_port,
        service_port,
        &config,
    )?;
    let leader = wait_for("replica a to lead", Duration::from_secs(30), || {
        let client = client.clone();
        let ns = operator_ns.name().to_string();
        async move { Ok(labelled_leaders(&client, &ns).await?.first().cloned()) }
    })
    .await
    .map_err(|e| e.context(a.process.log_tail(20)))?;
    assert_eq!(
        leader, "operator-a",
        "the only replica leads and labels its pod"
    );
    let b = start_replica(
        cp,
        operator_ns.name(),
        ns.name(),
        "operator-b",
        nanogate_e2e::free_port()?,
        service_port,
        &config,
    )?;
    let ports = BTreeMap::from([(a.pod.clone(), a.hub_port), (b.pod.clone(), b.hub_port)]);
    tokio::spawn(service(
        service_listener,
        client.clone(),
        operator_ns.name().to_string(),
        ports,
    ));

    nanogate_e2e::apply_yaml(
        cp.kubeconfig_path(),
        &nanogate_e2e::gateway_yaml(ns.name(), "shop", "  heartbeatInterval: 1s\n"),
    )?;
    let gateways = nanogate_e2e::agentgateways(&client, ns.name());
    wait_for("the gateway ConfigMap", Duration::from_secs(60), || {
        let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(client.clone(), ns.name());
        async move { Ok(maps.get_opt("shop-agent-config").await?.map(|_| ())) }
    })
    .await?;
    let pod = nanogate_e2e::create_injected_pod(&client, ns.name(), "app-1").await?;
    let mut agent = run_sidecar(
        &client,
        &pod,
        &nanogate_e2e::workspace_binary("nano-agent")?,
        &cp.dir().join(format!("{}-app-1", ns.name())),
    )
    .await?;

    // Watch `connected` all along: it must never exceed the one sidecar there is.
    let most_connected = Arc::new(AtomicI64::new(0));
    let watcher = tokio::spawn({
        let (gateways, most) = (gateways.clone(), most_connected.clone());
        async move {
            loop {
                if let Ok(gw) = gateways.get("shop").await {
                    let n = gw.data["status"]["sidecars"]["connected"]
                        .as_i64()
                        .unwrap_or(0);
                    most.fetch_max(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let connected = |want: i64| {
        let gateways = gateways.clone();
        move || {
            let gateways = gateways.clone();
            async move {
                let gw = gateways.get("shop").await?;
                Ok((gw.data["status"]["sidecars"]["connected"] == want).then_some(()))
            }
        }
    };
    wait_for(
        "the sidecar connected through the leader",
        Duration::from_secs(20),
        connected(1),
    )
    .await
    .map_err(|e| e.context(agent.process.log_tail(15)))?;

    // A follower sends agents away instead of counting them where nobody reports them.
    let token =
        nanogate_e2e::kubelet::token_for_pod(&client, &pod, Some("nanogate-hub"), Some(600))
            .await?;
    let uid = pod.metadata.uid.clone().context("uid")?;
    let ca = wait_for("the hub CA", Duration::from_secs(10), || {
        let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(client.clone(), ns.name());
        async move {
            Ok(maps
                .get_opt("shop-agent-config")
                .await?
                .and_then(|m| m.data?.get("hub-ca.crt").cloned()))
        }
    })
    .await?;
    let answer = nanogate_e2e::hub_hello(b.hub_port, &ca, &uid, &token).await?;
    assert_eq!(
        answer,
        nanogate_protocol::control::Message::Bye {
            reason: "not the leader; reconnect".into()
        },
        "the follower redirects"
    );

    // Kill the leader outright: no release, its label stays on its pod until b takes over.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.process.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let killed = Instant::now();
    wait_for(
        "replica b to lead and own the label",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let ns = operator_ns.name().to_string();
            async move {
                let leaders = labelled_leaders(&client, &ns).await?;
                Ok((leaders == ["operator-b"]).then_some(()))
            }
        },
    )
    .await
    .map_err(|e| e.context(b.process.log_tail(20)))?;
    let took_over = killed.elapsed();
    // The agent's connection died with the leader; it reconnects through the Service to b.
    wait_for(
        "the sidecar reconnected to the new leader",
        Duration::from_secs(45),
        || {
            let gateways = gateways.clone();
            let log = std::fs::read_to_string(&b.process.log).unwrap_or_default();
            async move {
                let gw = gateways.get("shop").await?;
                let accepted =
                    log.contains("decision=\"accept\"") || log.contains("\"decision\":\"accept\"");
                Ok((accepted && gw.data["status"]["sidecars"]["connected"] == 1).then_some(()))
            }
        },
    )
    .await
    .map_err(|e| {
        e.context(agent.process.log_tail(15))
            .context(b.process.log_tail(15))
    })?;
    let reconnected = killed.elapsed();
    watcher.abort();
    let most = most_connected.load(Ordering::Relaxed);
    eprintln!(
        "[failover] leader killed → b labelled after {:.1}s, sidecar reported by b after {:.1}s; most connected ever shown: {most}",
        took_over.as_secs_f64(),
        reconnected.as_secs_f64()
    );
    assert_eq!(most, 1, "one sidecar is never counted twice");
    assert!(agent.process.exited().is_none(), "the agent kept running");
    agent.process.stop();
    Ok(())
}
