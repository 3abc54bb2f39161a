//! Hub cost at fleet scale (issue 20): the real operator binary (hub, status writer and
//! reconciler) on a real control plane, N simulated agents (default 10,000) spread over G
//! gateways (default 100, in 10 namespaces). Every agent has a pod in the apiserver (labelled
//! for its gateway; no node, so it stays Pending) and a service-account token bound to that
//! pod with audience `nanogate-hub`, so each AgentHello goes through the production
//! `TokenReviewAuthenticator` (TokenReview, pod GET, gateway GET) — nothing is stubbed. The
//! tokens are minted with one TokenRequest per namespace and re-signed with the control
//! plane's own key for every other pod (`kubelet::resign_token`; the apiserver checks the
//! bound pod's name and uid), which saves 10,000 TokenRequests.
//!
//! Agents complete the handshake, then heartbeat at the gateways' interval (5 s) with a Ping
//! after every heartbeat; the Pong (answered after the heartbeat was applied, frames are
//! handled in order) times the round trip. Once every agent is connected, one steady-state
//! window is measured:
//!
//! - the operator process's CPU (cores, `/proc/<pid>/stat`) and RSS,
//! - heartbeat handling p50/p99 inside the hub (`nanogate_hub_notification_seconds`, bucket
//!   upper bounds, window delta) and the agent-side round trip p50/p99,
//! - status writes per gateway per 5 s (`nanogate_hub_status_writes_total`, window delta; the
//!   real status writer patching the real apiserver).
//!
//! Figures only; nothing is asserted. Both processes hold one socket per agent: the bench
//! checks the open-file limit (`ulimit -n`) first and says how far to raise it.
//!
//! The operator measured is the shipped configuration, the release build: `--operator PATH`
//! (or `NANOGATE_BENCH_OPERATOR`) names another binary to compare; by default
//! `<target>/release/nanogate-operator`, else the debug one. The header says which.
//!
//! Run: `cargo build --release -p nanogate-operator --bin nanogate-operator && cargo bench
//! --profile dev -p nanogate-e2e --bench hub_fleet -- --agents 10000 --gateways 100 --duration 60`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::PostParams;
use kube::{Api, Client};
use nanogate_e2e::bench::{cpu_seconds, load, status_kib};
use nanogate_e2e::{ControlPlane, TestNamespace, wait_for};
use nanogate_protocol::control::{FrameDecoder, Heartbeat, Message, encode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, watch};

/// Pod creations in flight at once.
const PARALLEL: usize = 48;
/// Agent handshakes in flight at once (below the hub's 256, so none is evicted).
const HANDSHAKES: usize = 128;
const HEARTBEAT: Duration = Duration::from_secs(5);

struct Options {
    agents: usize,
    gateways: usize,
    namespaces: usize,
    duration: Duration,
    /// The operator binary; `None`: the release build if there is one, else the debug build.
    operator: Option<PathBuf>,
}

/// The operator binary to measure and what it is (`release`, `debug` or `given`).
fn operator_binary(given: Option<PathBuf>) -> Result<(PathBuf, &'static str)> {
    if let Some(path) =
        given.or_else(|| std::env::var_os("NANOGATE_BENCH_OPERATOR").map(PathBuf::from))
    {
        if !path.exists() {
            bail!("operator binary {} not found", path.display());
        }
        return Ok((path, "given"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| nanogate_e2e::workspace_root().join("target"));
    for profile in ["release", "debug"] {
        let path = target.join(profile).join("nanogate-operator");
        if path.exists() {
            return Ok((path, profile));
        }
    }
    bail!(
        "no nanogate-operator in {}; build the shipped configuration first: \
         cargo build --release -p nanogate-operator --bin nanogate-operator",
        target.display()
    )
}

fn options() -> Result<Options> {
    let mut opts = Options {
        agents: 10_000,
        gateways: 100,
        namespaces: 10,
        duration: Duration::from_secs(60),
        operator: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("flag needs a value");
        match arg.as_str() {
            "--agents" => opts.agents = value()?.parse()?,
            "--gateways" => opts.gateways = value()?.parse()?,
            "--namespaces" => opts.namespaces = value()?.parse()?,
            "--duration" => opts.duration = Duration::from_secs(value()?.parse()?),
            "--operator" => opts.operator = Some(value()?.into()),
            "--bench" => {} // passed by `cargo bench`
            "--help" | "-h" => {
                println!(
                    "hub_fleet [--agents N (10000)] [--gateways G (100)] [--namespaces M (10)] [--duration SECS (60)] \
                     [--operator PATH (NANOGATE_BENCH_OPERATOR; default target/release/nanogate-operator, else debug)]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}; see --help"),
        }
    }
    if opts.gateways == 0 || opts.namespaces == 0 || !opts.gateways.is_multiple_of(opts.namespaces)
    {
        bail!("--gateways must be a positive multiple of --namespaces");
    }
    Ok(opts)
}

/// The soft open-file limit of this process (children inherit it).
fn open_file_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What the bench reads off the operator's /metrics at one moment.
struct Scrape {
    /// `nanogate_hub_notification_seconds` cumulative buckets: upper bound → count.
    buckets: BTreeMap<String, f64>,
    status_writes: f64,
    connected: f64,
}

fn scrape(admin: &str) -> Result<Scrape> {
    let body = nanogate_e2e::http_get(admin, "/metrics")?;
    let mut scrape = Scrape {
        buckets: BTreeMap::new(),
        status_writes: 0.0,
        connected: 0.0,
    };
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if let Some(le) = name
            .strip_prefix("nanogate_hub_notification_seconds_bucket{le=\"")
            .and_then(|rest| rest.strip_suffix("\"}"))
        {
            scrape.buckets.insert(le.to_string(), value);
        } else if name == "nanogate_hub_status_writes_total" {
            scrape.status_writes = value;
        } else if name == "nanogate_hub_connected_agents" {
            scrape.connected = value;
        }
    }
    Ok(scrape)
}

/// The `q` quantile's bucket upper bound (seconds) of the observations between two scrapes.
fn quantile(before: &Scrape, after: &Scrape, q: f64) -> f64 {
    let mut deltas: Vec<(f64, f64)> = after
        .buckets
        .iter()
        .map(|(le, n)| {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            (bound, n - before.buckets.get(le).copied().unwrap_or(0.0))
        })
        .collect();
    deltas.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = deltas.last().map_or(0.0, |d| d.1);
    deltas
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(f64::NAN, |d| d.0)
}

fn pod(name: &str, gateway: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {
            "app": "fleet", nanogate_operator::names::INJECTED_GATEWAY_LABEL: gateway}},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]}
    }))?)
}

/// One simulated agent: its pod's uid (the agent id), token and gateway, and the
/// configuration generation it reports (its gateway's current one, set before it connects).
struct Agent {
    id: String,
    token: String,
    namespace: String,
    gateway: String,
    generation: i64,
}

/// Creates the agents' pods (agent `i` belongs to gateway `gw-{i / namespaces % per_ns}` of
/// namespace `i % namespaces`) and mints their tokens.
async fn make_agents(
    cp: &ControlPlane,
    client: &Client,
    namespaces: &[String],
    opts: &Options,
) -> Result<Vec<Agent>> {
    let per_ns = opts.gateways / opts.namespaces;
    let semaphore = Arc::new(Semaphore::new(PARALLEL));
    let mut tasks = tokio::task::JoinSet::new();
    let mut pods: Vec<Option<Pod>> = vec![None; opts.agents];
    for i in 0..opts.agents {
        let permit = semaphore.clone().acquire_owned().await?;
        let ns = &namespaces[i % namespaces.len()];
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let gateway = format!("gw-{}", (i / namespaces.len()) % per_ns);
        tasks.spawn(async move {
            let _permit = permit;
            let made = api
                .create(
                    &PostParams::default(),
                    &pod(&format!("agent-{i}"), &gateway)?,
                )
                .await?;
            anyhow::Ok((i, made))
        });
        while let Some(done) = tasks.try_join_next() {
            let (i, made) = done??;
            pods[i] = Some(made);
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (i, made) = done??;
        pods[i] = Some(made);
    }
    let pods: Vec<Pod> = pods.into_iter().map(|p| p.expect("every pod")).collect();
    // One real TokenRequest per namespace, bound to its first pod; the others are that token
    // re-signed with another pod's name and uid.
    let mut templates = BTreeMap::new();
    for (i, ns) in namespaces.iter().enumerate() {
        let token = nanogate_e2e::kubelet::token_for_pod(
            client,
            &pods[i],
            Some(nanogate_operator::names::HUB_TOKEN_AUDIENCE),
            Some(6 * 3600),
        )
        .await?;
        templates.insert(ns.clone(), token);
    }
    let mut agents = Vec::with_capacity(pods.len());
    for pod in &pods {
        let ns = pod.metadata.namespace.clone().context("namespace")?;
        let name = pod.metadata.name.clone().context("name")?;
        let uid = pod.metadata.uid.clone().context("uid")?;
        let gateway = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(nanogate_operator::names::INJECTED_GATEWAY_LABEL))
            .cloned()
            .context("gateway label")?;
        let token = nanogate_e2e::kubelet::resign_token(cp.dir(), &templates[&ns], |claims| {
            claims["kubernetes.io"]["pod"] = json!({"name": name, "uid": uid});
        })?;
        agents.push(Agent {
            id: uid,
            token,
            namespace: ns,
            gateway,
            generation: 0,
        });
    }
    Ok(agents)
}

fn tls_connector(ca_pem: &str) -> Result<tokio_rustls::TlsConnector> {
    let config = nanogate_operator::tls::client_config(ca_pem)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

type Stream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// TLS + AgentHello until ManagerHello; `None` on Bye or a dropped connection (retried).
async fn handshake(
    port: u16,
    connector: &tokio_rustls::TlsConnector,
    agent: &Agent,
) -> Result<Option<(Stream, FrameDecoder)>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let Ok(mut stream) = connector.connect(name, tcp).await else {
        return Ok(None);
    };
    stream
        .write_all(&encode(&Message::AgentHello {
            id: agent.id.clone(),
            version: "bench".into(),
            credentials: agent.token.clone(),
        }))
        .await?;
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        match decoder.next_message()? {
            Some(Message::ManagerHello { .. }) => return Ok(Some((stream, decoder))),
            Some(_) => return Ok(None),
            None => {}
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => decoder.extend(&buf[..n]),
        }
    }
}

/// Every gateway's configuration generation (from `status.configHash`), once all have one.
async fn generations(
    client: &Client,
    gateways: usize,
) -> Result<Option<BTreeMap<(String, String), i64>>> {
    let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
        "nanogate.io",
        "v1alpha1",
        "AgentGateway",
    ));
    let list = Api::<kube::api::DynamicObject>::all_with(client.clone(), &resource)
        .list(&kube::api::ListParams::default())
        .await?;
    let found: BTreeMap<(String, String), i64> = list
        .items
        .iter()
        .filter_map(|g| {
            let hash = g.data["status"]["configHash"].as_str()?;
            Some((
                (g.metadata.namespace.clone()?, g.metadata.name.clone()?),
                nanogate_operator::hub::status::config_generation(hash)?,
            ))
        })
        .collect();
    Ok((found.len() == gateways).then_some(found))
}

struct Shared {
    port: u16,
    connector: tokio_rustls::TlsConnector,
    handshakes: Semaphore,
    connected: AtomicUsize,
    reconnects: AtomicUsize,
    /// Requests (`reload`) the hub sent; zero when every agent reports the current generation.
    requests: AtomicUsize,
    rtt: mpsc::UnboundedSender<Duration>,
}

/// Connects (retrying until accepted), then heartbeats every 5 s, answers the hub's pings and
/// reports each heartbeat's round trip; reconnects if the hub drops it.
async fn run_agent(n: usize, agent: Agent, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut received_total = 0u64;
    let mut first = true;
    loop {
        let session = {
            let _turn = shared.handshakes.acquire().await;
            handshake(shared.port, &shared.connector, &agent).await
        };
        let Ok(Some((mut stream, mut decoder))) = session else {
            if *stop.borrow() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if first {
            first = false;
        } else {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        shared.connected.fetch_add(1, Ordering::Relaxed);
        // Spread the agents over the interval as real pods would be.
        let offset = HEARTBEAT.mul_f64((n as f64 * 0.618_034) % 1.0);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, HEARTBEAT);
        let mut buf = [0u8; 4096];
        let (mut ping, mut sent) = (0i64, None::<Instant>);
        let ended = loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = ticker.tick() => {
                    received_total += 50;
                    ping += 1;
                    let Ok(data) = Heartbeat::ready(agent.id.as_str(), received_total, agent.generation).to_data() else { return };
                    let mut frames = encode(&Message::Notification { kind: "heartbeat".into(), data });
                    frames.extend(encode(&Message::Ping { data: ping }));
                    sent = Some(Instant::now());
                    if stream.write_all(&frames).await.is_err() {
                        break "write failed";
                    }
                }
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break "closed",
                    Ok(n) => decoder.extend(&buf[..n]),
                },
            }
            let mut pong = Vec::new();
            loop {
                match decoder.next_message() {
                    Ok(Some(Message::Pong { data })) if data == ping => {
                        if let Some(at) = sent.take() {
                            let _ = shared.rtt.send(at.elapsed());
                        }
                    }
                    Ok(Some(Message::Ping { data })) => {
                        pong.extend(encode(&Message::Pong { data }))
                    }
                    // A real agent would apply a `reload`; it already runs the current one.
                    Ok(Some(Message::Request { id, .. })) => {
                        shared.requests.fetch_add(1, Ordering::Relaxed);
                        pong.extend(encode(&Message::Response {
                            id,
                            success: true,
                            data: rmpv::Value::Nil,
                        }));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            if !pong.is_empty() && stream.write_all(&pong).await.is_err() {
                break "write failed";
            }
        };
        shared.connected.fetch_sub(1, Ordering::Relaxed);
        if *stop.borrow() {
            return;
        }
        eprintln!("[bench] agent {n}: {ended}; reconnecting");
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let opts = options()?;
    let limit = open_file_limit();
    if (limit as usize) < opts.agents + 1_000 {
        bail!(
            "open-file limit {limit} is too low for {} agents (one socket each in this process \
             and in the operator): run `ulimit -n {}` first",
            opts.agents,
            opts.agents + 1_000
        );
    }
    let (binary, build) = operator_binary(opts.operator.clone())?;
    eprintln!(
        "[bench] operator: {} ({build} build); start (load {})",
        binary.display(),
        load()
    );
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    nanogate_e2e::install_crd(&cp)?;
    let operator_ns = TestNamespace::create(&client, "fleet-op").await?;
    let per_ns = opts.gateways / opts.namespaces;
    let mut namespaces = Vec::new();
    for _ in 0..opts.namespaces {
        let ns = TestNamespace::create(&client, "fleet").await?;
        let yaml: Vec<String> = (0..per_ns)
            .map(|i| nanogate_e2e::gateway_yaml(ns.name(), &format!("gw-{i}"), ""))
            .collect();
        nanogate_e2e::apply_yaml(cp.kubeconfig_path(), &yaml.join("---\n"))?;
        namespaces.push(ns);
    }
    let names: Vec<String> = namespaces.iter().map(|n| n.name().to_string()).collect();
    let made = Instant::now();
    let mut agents = make_agents(&cp, &client, &names, &opts).await?;
    eprintln!(
        "[bench] {} gateways, {} pods and tokens in {:.0?} (load {})",
        opts.gateways,
        agents.len(),
        made.elapsed(),
        load()
    );

    let (hub, admin) = (nanogate_e2e::free_port()?, nanogate_e2e::free_port()?);
    let args = vec![
        "run".to_string(),
        format!("--admin-addr=127.0.0.1:{admin}"),
        "--leader-elect=false".into(),
        format!("--operator-namespace={}", operator_ns.name()),
        format!("--webhook-addr=127.0.0.1:{}", nanogate_e2e::free_port()?),
        format!("--hub-addr=127.0.0.1:{hub}"),
        format!("--hub-advertise=127.0.0.1:{hub}"),
        format!("--hub-max-connections={}", opts.agents + 100),
        "--extra-sans=127.0.0.1".into(),
    ];
    let operator = nanogate_e2e::process::Process::spawn_with_env(
        "nanogate-operator",
        &binary,
        &args,
        &[
            ("KUBECONFIG", cp.kubeconfig_path().display().to_string()),
            ("RUST_LOG", "warn".into()),
        ],
        cp.dir(),
    )?;
    let admin = format!("127.0.0.1:{admin}");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &names[0]);
    let ca_pem = wait_for(
        "the gateway ConfigMap with the hub CA",
        Duration::from_secs(120),
        || async {
            Ok(maps
                .get_opt("gw-0-agent-config")
                .await?
                .and_then(|m| m.data)
                .and_then(|mut d| d.remove("hub-ca.crt")))
        },
    )
    .await
    .map_err(|e| e.context(operator.log_tail(20)))?;

    let generations = wait_for(
        "every gateway's configHash",
        Duration::from_secs(300),
        || generations(&client, opts.gateways),
    )
    .await?;
    for agent in &mut agents {
        agent.generation = generations[&(agent.namespace.clone(), agent.gateway.clone())];
    }
    let (rtt_tx, mut rtt_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        port: hub,
        connector: tls_connector(&ca_pem)?,
        handshakes: Semaphore::new(HANDSHAKES),
        connected: AtomicUsize::new(0),
        reconnects: AtomicUsize::new(0),
        requests: AtomicUsize::new(0),
        rtt: rtt_tx,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let connecting = Instant::now();
    let total = agents.len();
    for (n, agent) in agents.into_iter().enumerate() {
        tokio::spawn(run_agent(n, agent, shared.clone(), stop_rx.clone()));
    }
    wait_for(
        "every agent connected",
        Duration::from_secs(1_800),
        || async {
            let now = shared.connected.load(Ordering::Relaxed);
            Ok((now == total).then_some(()))
        },
    )
    .await
    .map_err(|e| {
        e.context(format!(
            "{} of {total} connected; {}",
            shared.connected.load(Ordering::Relaxed),
            operator.log_tail(20)
        ))
    })?;
    let connect_time = connecting.elapsed();
    eprintln!(
        "[bench] {total} agents connected in {connect_time:.0?} (load {})",
        load()
    );
    // Two status passes to settle (the first after everyone connected writes every gateway).
    tokio::time::sleep(HEARTBEAT * 2).await;

    let pid = operator.pid();
    while rtt_rx.try_recv().is_ok() {}
    let reconnects_before = shared.reconnects.load(Ordering::Relaxed);
    let requests_before = shared.requests.load(Ordering::Relaxed);
    let (before, cpu0, started) = (scrape(&admin)?, cpu_seconds(pid)?, Instant::now());
    let mut rtts = Vec::new();
    let deadline = tokio::time::Instant::now() + opts.duration;
    while let Ok(Some(rtt)) = tokio::time::timeout_at(deadline, rtt_rx.recv()).await {
        rtts.push(rtt);
    }
    let (after, cpu1, wall) = (
        scrape(&admin)?,
        cpu_seconds(pid)?,
        started.elapsed().as_secs_f64(),
    );
    let (rss, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let window_load = load();
    let _ = stop_tx.send(true);

    rtts.sort();
    let pct = |q: f64| {
        rtts.get(((rtts.len() as f64 * q) as usize).min(rtts.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3
    };
    let handled = after.buckets.get("+Inf").copied().unwrap_or(0.0)
        - before.buckets.get("+Inf").copied().unwrap_or(0.0);
    let writes = after.status_writes - before.status_writes;
    let passes = wall / HEARTBEAT.as_secs_f64();
    println!(
        "\nhub fleet: {total} agents, {} gateways in {} namespaces, heartbeat {HEARTBEAT:?}, \
         TokenReview authentication; operator = {build} binary {} ({} cores, load {window_load}, \
         open-file limit {limit})",
        opts.gateways,
        opts.namespaces,
        binary.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!("  {:<50} {:>12}   target", "figure", "measured");
    println!(
        "  {:<50} {:>10.1} s",
        "all agents connected (handshake + TokenReview)",
        connect_time.as_secs_f64()
    );
    println!(
        "  {:<50} {:>12.3}   < 0.5",
        format!("operator CPU, cores ({wall:.0} s steady state)"),
        (cpu1 - cpu0) / wall
    );
    println!(
        "  {:<50} {:>8.1} MiB   < 256 MiB",
        "operator RSS (end of window)",
        rss / 1024.0
    );
    println!("  {:<50} {:>8.1} MiB", "operator RSS peak", hwm / 1024.0);
    println!("  {:<50} {:>12}", "operator open fds", fds);
    println!(
        "  {:<50} {:>9.0} µs   (bucket upper bound)",
        "heartbeat handling p50 inside the hub",
        quantile(&before, &after, 0.5) * 1e6
    );
    println!(
        "  {:<50} {:>9.0} µs   (bucket upper bound)",
        "heartbeat handling p99 inside the hub",
        quantile(&before, &after, 0.99) * 1e6
    );
    println!(
        "  {:<50} {:>12.0}",
        "notifications handled in window", handled
    );
    println!(
        "  {:<50} {:>9.2} ms",
        "heartbeat+ping round trip p50 (agent side)",
        pct(0.5)
    );
    println!(
        "  {:<50} {:>9.2} ms",
        "heartbeat+ping round trip p99 (agent side)",
        pct(0.99)
    );
    println!("  {:<50} {:>12}", "round trips measured", rtts.len());
    println!(
        "  {:<50} {:>12.2}   ≤ 1",
        "status writes per gateway per 5 s",
        writes / opts.gateways as f64 / passes
    );
    println!(
        "  {:<50} {:>12}",
        "agents connected (hub gauge, end)", after.connected
    );
    println!(
        "  {:<50} {:>12}",
        "reconnects during the window",
        shared.reconnects.load(Ordering::Relaxed) - reconnects_before
    );
    println!(
        "  {:<50} {:>12}",
        "hub requests (reload) during the window",
        shared.requests.load(Ordering::Relaxed) - requests_before
    );
    drop(operator);
    drop(namespaces);
    Ok(())
}
