//! Hub load benchmark: N simulated agents (default 5,000) hold TLS control-channel connections
//! to one hub on loopback and heartbeat every interval. The hub runs in a child process so its
//! CPU and memory are measured alone. Prints hub CPU (cores), RSS, notification handling p99
//! (inside the hub), heartbeat round-trip p50/p99 (agent side: heartbeat + ping → pong), and
//! status writes per gateway per interval as the status writer would make them.
//!
//! `cargo run --release -p nanogate-operator --bin hub-bench -- --agents 5000 --duration 30`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nanogate_operator::bench::{cpu_seconds, status_kib};
use nanogate_operator::hub::{self, AgentIdentity, Authenticator, Denial, Hub, HubConfig};
use nanogate_operator::tls::{CertResolver, tls_config};
use nanogate_protocol::control::{FrameDecoder, Heartbeat, Message, encode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

struct Options {
    agents: usize,
    gateways: usize,
    duration: Duration,
    interval: Duration,
}

fn parse_options() -> Result<(Options, bool)> {
    let mut opts = Options {
        agents: 5_000,
        gateways: 50,
        duration: Duration::from_secs(30),
        interval: Duration::from_secs(5),
    };
    let mut serve = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("flag needs a value");
        match arg.as_str() {
            "--serve" => serve = true,
            "--agents" => opts.agents = value()?.parse()?,
            "--gateways" => opts.gateways = value()?.parse()?,
            "--duration" => opts.duration = Duration::from_secs(value()?.parse()?),
            "--interval" => opts.interval = Duration::from_secs(value()?.parse()?),
            "--help" | "-h" => {
                println!(
                    "hub-bench [--agents N (5000)] [--gateways N (50)] [--duration SECS (30)] [--interval SECS (5)]"
                );
                std::process::exit(0);
            }
            "--bench" => {} // passed by `cargo bench`
            other => bail!("unknown flag {other}; see --help"),
        }
    }
    Ok((opts, serve))
}

fn main() -> Result<()> {
    let (opts, serve) = parse_options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if serve {
        runtime.block_on(serve_hub(opts))
    } else {
        runtime.block_on(drive(opts))
    }
}

/// Accepts `bench-token`; agent `agent-<n>` belongs to gateway `gw-<n mod gateways>`.
struct BenchAuth {
    gateways: usize,
}

impl Authenticator for BenchAuth {
    async fn authenticate(
        &self,
        agent_id: &str,
        credentials: &str,
    ) -> Result<AgentIdentity, Denial> {
        if credentials != "bench-token" {
            return Err(Denial::TokenRejected("bench".into()));
        }
        let n: usize = agent_id.trim_start_matches("agent-").parse().unwrap_or(0);
        Ok(AgentIdentity {
            agent_id: agent_id.into(),
            namespace: "bench".into(),
            pod: format!("pod-{n}"),
            gateway: format!("gw-{}", n % self.gateways),
        })
    }
}

/// Child process: the hub plus a status-writer pass every interval (counting the writes it
/// would send, with the real `fleet_status`/`needs_write` logic). Prints one JSON line of
/// figures to stdout when stdin closes.
async fn serve_hub(opts: Options) -> Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    let cert = params.self_signed(&key)?;
    let resolver = Arc::new(CertResolver::from_pem(&cert.pem(), &key.serialize_pem())?);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config(resolver));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let registry = prometheus::Registry::new();
    let hub = Hub::new(HubConfig::default(), &registry);
    let (_stop, stopped) = nanogate_operator::shutdown::channel();
    println!("{}", listener.local_addr()?.port());
    println!("{}", cert.pem().replace('\n', "|"));
    tokio::spawn(hub::serve(
        listener,
        acceptor,
        hub.clone(),
        Arc::new(BenchAuth {
            gateways: opts.gateways,
        }),
        stopped,
    ));

    let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let passes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (hub, writes, passes) = (hub.clone(), writes.clone(), passes.clone());
        let gateways = opts.gateways;
        let interval = opts.interval;
        tokio::spawn(async move {
            let mut statuses: Vec<Option<nanogate_operator::crd::AgentGatewayStatus>> =
                vec![None; gateways];
            let mut ticker = tokio::time::interval(interval);
            loop {
                ticker.tick().await;
                let now = Instant::now();
                let wall = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                );
                for (g, current) in statuses.iter_mut().enumerate() {
                    let fleet = hub
                        .index
                        .fleet("bench", &format!("gw-{g}"), now, interval * 3);
                    let desired =
                        hub::status::fleet_status(current.as_ref(), &fleet, Some(1), &wall);
                    if hub::status::needs_write(current.as_ref(), &desired) {
                        writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        *current = Some(desired);
                    }
                }
                passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }

    // Wait for the driver to close our stdin, then report.
    let mut stdin = tokio::io::stdin();
    let mut sink = Vec::new();
    let _ = stdin.read_to_end(&mut sink).await;
    let p99 = histogram_quantile(&hub.metrics.handling, 0.99);
    println!(
        "{}",
        serde_json::json!({
            "connected": hub.index.len(),
            "handled": hub.metrics.handling.get_sample_count(),
            "handling_p99_upper_bound_s": p99,
            "status_writes": writes.load(std::sync::atomic::Ordering::Relaxed),
            "status_passes": passes.load(std::sync::atomic::Ordering::Relaxed),
        })
    );
    // Stay up until the driver has stopped its agents and kills us, so no agent sees the hub
    // vanish mid-measurement.
    std::future::pending::<()>().await;
    Ok(())
}

fn histogram_quantile(h: &prometheus::Histogram, q: f64) -> f64 {
    use prometheus::core::Collector;
    let families = h.collect();
    let Some(metric) = families.first().and_then(|f| f.get_metric().first()) else {
        return f64::NAN;
    };
    let hist = metric.get_histogram();
    let total = hist.get_sample_count() as f64;
    for bucket in hist.get_bucket() {
        if bucket.cumulative_count() as f64 >= q * total {
            return bucket.upper_bound();
        }
    }
    f64::INFINITY
}

async fn drive(opts: Options) -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(&exe)
        .args([
            "--serve",
            "--gateways",
            &opts.gateways.to_string(),
            "--interval",
            &opts.interval.as_secs().to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("hub child pid")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let port: u16 = lines.next_line().await?.context("hub port")?.parse()?;
    let ca_pem = lines
        .next_line()
        .await?
        .context("hub cert")?
        .replace('|', "\n");

    let tls = nanogate_operator::tls::client_config(&ca_pem)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));

    println!(
        "hub-bench: {} agents, {} gateways, heartbeat every {:?}, steady state {:?}",
        opts.agents, opts.gateways, opts.interval, opts.duration
    );
    let connect_started = Instant::now();
    let (rtt_tx, mut rtt_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let (stop_tx, stop_rx) = watch::channel(false);
    let connected = Arc::new(tokio::sync::Semaphore::new(0));
    let retries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for n in 0..opts.agents {
        let (connector, rtt_tx, mut stop_rx, connected, retries) = (
            connector.clone(),
            rtt_tx.clone(),
            stop_rx.clone(),
            connected.clone(),
            retries.clone(),
        );
        let interval = opts.interval;
        tokio::spawn(async move {
            let result = agent(
                n,
                port,
                connector,
                interval,
                rtt_tx,
                &mut stop_rx,
                &connected,
                &retries,
            )
            .await;
            // Errors after the stop signal are the hub exiting, not failures.
            if let Err(error) = result
                && !*stop_rx.borrow()
            {
                eprintln!("agent {n}: {error:#}");
            }
        });
        if n % 200 == 199 {
            // Pace connection setup so the accept backlog never overflows.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _all = connected.acquire_many(opts.agents as u32).await?;
    println!(
        "  {} agents connected in {:.1}s ({} handshakes shed by the hub's cap and retried)",
        opts.agents,
        connect_started.elapsed().as_secs_f64(),
        retries.load(std::sync::atomic::Ordering::Relaxed)
    );

    // Steady state: measure the hub process alone.
    while rtt_rx.try_recv().is_ok() {}
    let cpu_before = cpu_seconds(pid)?;
    let wall_before = Instant::now();
    let mut rtts = Vec::new();
    let deadline = tokio::time::Instant::now() + opts.duration;
    while let Ok(Some(rtt)) = tokio::time::timeout_at(deadline, rtt_rx.recv()).await {
        rtts.push(rtt);
    }
    let cpu_after = cpu_seconds(pid)?;
    let wall = wall_before.elapsed().as_secs_f64();
    let (rss, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    // Report first (while every agent is still connected), then stop the agents.
    drop(child.stdin.take());
    let report: serde_json::Value =
        serde_json::from_str(&lines.next_line().await?.context("hub report")?)?;
    let _ = stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = child.kill().await;

    rtts.sort();
    let pct = |q: f64| {
        rtts.get(((rtts.len() as f64 * q) as usize).min(rtts.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let cores = (cpu_after - cpu_before) / wall;
    let passes = report["status_passes"].as_f64().unwrap_or(1.0).max(1.0);
    let writes_per_gateway_per_pass =
        report["status_writes"].as_f64().unwrap_or(0.0) / passes / opts.gateways as f64;
    println!("  {:<44} {:>12}   target", "figure", "measured");
    println!(
        "  {:<44} {:>12.3}   < 0.5",
        "hub CPU (cores, steady state)", cores
    );
    println!(
        "  {:<44} {:>9.1} MiB   < 256 MiB",
        "hub RSS (end of steady state)",
        rss / 1024.0
    );
    println!("  {:<44} {:>9.1} MiB", "hub RSS peak", hwm / 1024.0);
    println!(
        "  {:<44} {:>10.0} µs   (bucket bound)",
        "heartbeat handling p99 inside the hub",
        report["handling_p99_upper_bound_s"]
            .as_f64()
            .unwrap_or(f64::NAN)
            * 1e6
    );
    println!(
        "  {:<44} {:>10.0} µs",
        "heartbeat+ping round trip p50 (agent side)",
        pct(0.50).as_secs_f64() * 1e6
    );
    println!(
        "  {:<44} {:>10.0} µs",
        "heartbeat+ping round trip p99 (agent side)",
        pct(0.99).as_secs_f64() * 1e6
    );
    println!("  {:<44} {:>12}", "heartbeats measured", rtts.len());
    println!(
        "  {:<44} {:>12.2}   ≤ 1 per gateway per {:?}",
        "status writes per gateway per pass", writes_per_gateway_per_pass, opts.interval
    );
    println!(
        "  {:<44} {:>12}",
        "agents connected at the end (hub index)", report["connected"]
    );
    Ok(())
}

type Stream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// TLS and AgentHello until ManagerHello.
async fn handshake(
    id: &str,
    port: u16,
    connector: &tokio_rustls::TlsConnector,
) -> Result<(Stream, FrameDecoder)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut stream = connector.connect(name, tcp).await?;
    stream
        .write_all(&encode(&Message::AgentHello {
            id: id.into(),
            version: "bench".into(),
            credentials: "bench-token".into(),
        }))
        .await?;
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(message) = decoder.next_message()? {
            if !matches!(message, Message::ManagerHello { .. }) {
                bail!("expected ManagerHello, got {}", message.name());
            }
            return Ok((stream, decoder));
        }
        let read = stream.read(&mut buf).await?;
        if read == 0 {
            bail!("hub closed during hello");
        }
        decoder.extend(&buf[..read]);
    }
}

#[allow(clippy::too_many_arguments)]
async fn agent(
    n: usize,
    port: u16,
    connector: tokio_rustls::TlsConnector,
    interval: Duration,
    rtt_tx: tokio::sync::mpsc::UnboundedSender<Duration>,
    stop: &mut watch::Receiver<bool>,
    connected: &tokio::sync::Semaphore,
    retries: &std::sync::atomic::AtomicUsize,
) -> Result<()> {
    let id = format!("agent-{n}");
    // The hub sheds handshakes beyond its cap (oldest first) during the connect burst; like
    // nano-agent, try again after a pause that grows (0.2 s to 3.2 s, spread by agent).
    let mut attempt = 0u32;
    let (mut stream, mut decoder) = loop {
        match handshake(&id, port, &connector).await {
            Ok(connection) => break connection,
            Err(error) if attempt >= 20 => return Err(error.context("20 handshake retries")),
            Err(_) => {
                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let base = 200u64 << attempt.min(4);
                let jitter = (n as u64 * 7919) % base;
                tokio::time::sleep(Duration::from_millis(base + jitter)).await;
                attempt += 1;
            }
        }
    };
    let mut buf = vec![0u8; 4096];
    connected.add_permits(1);
    // Spread the agents over the interval as real pods would be.
    let offset = interval.mul_f64((n as f64 * 0.618_034) % 1.0);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
    let mut received_total = 0u64;
    let mut ping = 0i64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        received_total += 50;
        ping += 1;
        let heartbeat = Heartbeat::ready(id.as_str(), received_total, 1);
        let mut frames = encode(&Message::Notification {
            kind: "heartbeat".into(),
            data: heartbeat.to_data()?,
        });
        frames.extend(encode(&Message::Ping { data: ping }));
        let sent = Instant::now();
        stream.write_all(&frames).await?;
        loop {
            match decoder.next_message()? {
                Some(Message::Pong { data }) if data == ping => break,
                Some(Message::Ping { data }) => {
                    stream.write_all(&encode(&Message::Pong { data })).await?
                }
                Some(_) => {}
                None => {
                    let read = stream.read(&mut buf).await?;
                    if read == 0 {
                        bail!("hub closed the connection");
                    }
                    decoder.extend(&buf[..read]);
                }
            }
        }
        let _ = rtt_tx.send(sent.elapsed());
    }
}
