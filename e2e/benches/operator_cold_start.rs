//! Operator cold start at 1,000 gateways (issue 20): a real control plane holds N
//! AgentGateways (default 1,000: 10 namespaces × 100, each namespace with the `platform-key`
//! Secret they name) before the operator starts. The real operator binary (webhook and hub on
//! loopback, no webhook registered) is started and the bench prints:
//!
//! - the time from process start until every gateway is `Ready=True`,
//! - the writes it needed: the reconciler's `nanogate_operator_api_writes_total` (by resource
//!   and verb) and the hub status writer's `nanogate_hub_status_writes_total`, per gateway,
//! - the writes of one full resync afterwards: a second operator process (the first one
//!   stopped) reconciles every unchanged gateway again — what the periodic 5-minute requeue
//!   does, without waiting 5 minutes — goal zero.
//!
//! Figures only; nothing is asserted on time.
//!
//! Run: `cargo build -p nanogate-operator --bins && cargo bench --profile dev -p nanogate-e2e
//! --bench operator_cold_start -- --gateways 1000`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::{Api, Client};
use nanogate_e2e::bench::{cpu_seconds, load, namespaces_with_gateways};
use nanogate_e2e::{ControlPlane, Process, TestNamespace, wait_for};

/// Gateways whose `Ready` condition is `True`, and those that also show the hub status
/// writer's part (a `SidecarsHealthy` condition).
async fn ready(client: &Client) -> Result<(usize, usize)> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "nanogate.io",
        "v1alpha1",
        "AgentGateway",
    ));
    let list = Api::<DynamicObject>::all_with(client.clone(), &resource)
        .list(&ListParams::default())
        .await?;
    let has = |g: &DynamicObject, kind: &str, status: Option<&str>| {
        g.data["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == kind && status.is_none_or(|s| c["status"] == s))
        })
    };
    let ready: Vec<&DynamicObject> = list
        .items
        .iter()
        .filter(|g| has(g, "Ready", Some("True")))
        .collect();
    let both = ready
        .iter()
        .filter(|g| has(g, "SidecarsHealthy", None))
        .count();
    Ok((ready.len(), both))
}

/// The `nanogate_operator_api_writes_total` series (`{labels} value`) on the admin /metrics.
fn writes_by_kind(admin: &str) -> Result<Vec<String>> {
    Ok(nanogate_e2e::http_get(admin, "/metrics")?
        .lines()
        .filter_map(|l| l.strip_prefix("nanogate_operator_api_writes_total"))
        .map(str::to_string)
        .collect())
}

struct Operator {
    process: Process,
    admin: String,
}

fn start_operator(cp: &ControlPlane, operator_ns: &str, name: &'static str) -> Result<Operator> {
    let admin = format!("127.0.0.1:{}", nanogate_e2e::free_port()?);
    let hub = nanogate_e2e::free_port()?;
    let args = vec![
        "run".to_string(),
        format!("--admin-addr={admin}"),
        "--leader-elect=false".into(),
        format!("--operator-namespace={operator_ns}"),
        format!("--webhook-addr=127.0.0.1:{}", nanogate_e2e::free_port()?),
        format!("--hub-addr=127.0.0.1:{hub}"),
        format!("--hub-advertise=127.0.0.1:{hub}"),
        "--extra-sans=127.0.0.1".into(),
    ];
    let process = nanogate_e2e::spawn_operator(cp, name, &args, &[("RUST_LOG", "warn".into())])?;
    Ok(Operator { process, admin })
}

#[tokio::main]
async fn main() -> Result<()> {
    let (mut gateways, mut namespaces) = (1_000usize, 10usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--gateways" => gateways = args.next().context("--gateways N")?.parse()?,
            "--namespaces" => namespaces = args.next().context("--namespaces N")?.parse()?,
            "--bench" => {}
            other => bail!("unknown flag {other}; flags: --gateways N (1000) --namespaces M (10)"),
        }
    }
    if namespaces == 0 || !gateways.is_multiple_of(namespaces) {
        bail!("--gateways must be a multiple of --namespaces");
    }
    let per_ns = gateways / namespaces;
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    nanogate_e2e::install_crd(&cp)?;
    let operator_ns = TestNamespace::create(&client, "cold-op").await?;
    let made = Instant::now();
    let made_ns = namespaces_with_gateways(&cp, &client, "cold", namespaces, per_ns).await?;
    eprintln!(
        "[bench] {gateways} gateways in {namespaces} namespaces created in {:.0?} (load {})",
        made.elapsed(),
        load()
    );

    let started = Instant::now();
    let first = start_operator(&cp, operator_ns.name(), "operator-cold")?;
    let last = std::sync::atomic::AtomicUsize::new(0);
    wait_for(
        "every gateway Ready",
        Duration::from_secs(1_200),
        || async {
            let (now, _) = ready(&client).await?;
            if now / 100 != last.swap(now, std::sync::atomic::Ordering::Relaxed) / 100 {
                eprintln!("[bench] {now} Ready after {:.0?}", started.elapsed());
            }
            Ok((now == gateways).then_some(()))
        },
    )
    .await
    .map_err(|e| e.context(first.process.log_tail(20)))?;
    let cold = started.elapsed();
    let cold_load = load();
    let cpu_cold = cpu_seconds(first.process.pid())?;
    // The hub's status writer adds its part after the reconciler (one PATCH at a time);
    // the resync below must start from gateways both writers are done with.
    wait_for(
        "every gateway with the hub's SidecarsHealthy",
        Duration::from_secs(1_200),
        || async { Ok((ready(&client).await?.1 == gateways).then_some(())) },
    )
    .await?;
    let both = started.elapsed();
    // The hub's writer also fills in its other fields (messages, leftBehind) one PATCH at a
    // time: wait until a whole 5 s pass wrote nothing (three scrapes 5 s apart agree).
    let mut seen = Vec::new();
    loop {
        seen.push(nanogate_e2e::scrape(
            &first.admin,
            "nanogate_hub_status_writes_total",
        )?);
        if seen.len() >= 3 && seen[seen.len() - 3] == seen[seen.len() - 1] {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let settled = started.elapsed();
    let writes = nanogate_e2e::scrape(&first.admin, "nanogate_operator_api_writes_total")?;
    let status_writes = nanogate_e2e::scrape(&first.admin, "nanogate_hub_status_writes_total")?;
    let reconciles = nanogate_e2e::scrape(&first.admin, "nanogate_operator_reconciles_total")?;
    let by_kind = writes_by_kind(&first.admin)?;
    drop(first);

    // One resync: a fresh operator reconciles every gateway again; nothing changed.
    let resync_started = Instant::now();
    let second = start_operator(&cp, operator_ns.name(), "operator-resync")?;
    wait_for(
        "the second operator reconciled every gateway",
        Duration::from_secs(600),
        || async {
            let done = nanogate_e2e::scrape(&second.admin, "nanogate_operator_reconciles_total")
                .unwrap_or(0.0);
            Ok((done >= gateways as f64).then_some(()))
        },
    )
    .await
    .map_err(|e| e.context(second.process.log_tail(20)))?;
    let resync = resync_started.elapsed();
    tokio::time::sleep(Duration::from_secs(10)).await;
    // (+ 0.0: an empty sum is -0.0.)
    let writes2 = nanogate_e2e::scrape(&second.admin, "nanogate_operator_api_writes_total")? + 0.0;
    let status_writes2 =
        nanogate_e2e::scrape(&second.admin, "nanogate_hub_status_writes_total")? + 0.0;
    let by_kind2 = writes_by_kind(&second.admin)?;
    drop(second);

    println!(
        "\noperator cold start: {gateways} gateways in {namespaces} namespaces, debug binary ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  all Ready after {:.1} s (process start; goal ≤ 30 s), operator CPU {cpu_cold:.1} s, load {cold_load}",
        cold.as_secs_f64()
    );
    println!(
        "  every gateway also with the hub's SidecarsHealthy after {:.1} s",
        both.as_secs_f64()
    );
    println!(
        "  the hub's status writer done (no write for 10 s) after {:.1} s",
        settled.as_secs_f64()
    );
    println!(
        "  reconciler writes {writes:.0} ({:.2}/gateway), hub status writes {status_writes:.0} ({:.2}/gateway), {reconciles:.0} reconciles",
        writes / gateways as f64,
        status_writes / gateways as f64
    );
    for line in &by_kind {
        println!("    writes{line}");
    }
    println!(
        "  resync (fresh operator, every gateway reconciled in {:.1} s): reconciler writes {writes2:.0}, hub status writes {status_writes2:.0} (goal 0), load {}",
        resync.as_secs_f64(),
        load()
    );
    for line in &by_kind2 {
        println!("    writes{line}");
    }
    drop(made_ns);
    Ok(())
}
