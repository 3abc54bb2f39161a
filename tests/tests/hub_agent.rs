//! The real `nano-agent` binary against the operator's real hub over TLS (issue 6): handshake
//! and register, heartbeats with live counts, `status`, `reload` (accepted and refused with the
//! validation error), `flush` (what was queued is delivered before the answer) and `drain` (the
//! agent delivers and exits 0). The hub runs in this process with the operator's own
//! certificate code; only the TokenReview is replaced by a fixed token, which the e2e tests
//! cover against the real apiserver.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nanogate_operator::hub::{self, AgentIdentity, Authenticator, Denial, Hub, HubConfig};
use nanogate_operator::shutdown;
use nanogate_tests::agent::{Agent, AgentConfig, agent_bin};
use nanogate_tests::platform::PlatformServer;
use tokio::io::AsyncWriteExt;

const TOKEN: &str = "projected-token-of-pod-1";

/// Accepts exactly one pod's token, as a TokenReview would.
struct OnePod;

impl Authenticator for OnePod {
    async fn authenticate(&self, agent_id: &str, token: &str) -> Result<AgentIdentity, Denial> {
        if token != TOKEN {
            return Err(Denial::TokenRejected("unknown token".into()));
        }
        Ok(AgentIdentity {
            agent_id: agent_id.into(),
            namespace: "test-ns".into(),
            pod: "test-pod".into(),
            gateway: "shop".into(),
        })
    }
}

struct TestHub {
    hub: Arc<Hub>,
    addr: std::net::SocketAddr,
    ca_file: std::path::PathBuf,
    _stop: shutdown::Trigger,
}

async fn start_hub(dir: &std::path::Path) -> Result<TestHub> {
    start_hub_with(dir, HubConfig::default()).await
}

async fn start_hub_with(dir: &std::path::Path, config: HubConfig) -> Result<TestHub> {
    let bundle = nanogate_operator::tls::generate_bundle(
        &["127.0.0.1".to_string()],
        nanogate_operator::tls::unix_now(),
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    )?;
    let ca_file = dir.join("hub-ca.crt");
    std::fs::write(&ca_file, &bundle.ca_cert_pem)?;
    let resolver = Arc::new(nanogate_operator::tls::CertResolver::from_pem(
        &bundle.cert_pem,
        &bundle.key_pem,
    )?);
    let tls = tokio_rustls::TlsAcceptor::from(nanogate_operator::tls::tls_config(resolver));
    let hub = Hub::new(config, &prometheus::Registry::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = shutdown::channel();
    tokio::spawn(hub::serve(
        listener,
        tls,
        hub.clone(),
        Arc::new(OnePod),
        stopped,
    ));
    Ok(TestHub {
        hub,
        addr,
        ca_file,
        _stop: stop,
    })
}

/// The agent's flags for `hub`: pod uid `uid-1` of gateway `shop`, 1 s heartbeats.
fn hub_flags(hub: &TestHub, token_file: &std::path::Path) -> Vec<String> {
    vec![
        format!("--hub-addr=127.0.0.1:{}", hub.addr.port()),
        format!("--hub-ca-file={}", hub.ca_file.display()),
        format!("--hub-token-file={}", token_file.display()),
        "--pod-uid=uid-1".into(),
        "--gateway=shop".into(),
        "--heartbeat-interval=1s".into(),
    ]
}

/// A real agent (pod uid `uid-1` of gateway `shop`) on `hub`, whose deliveries all fail (nothing
/// listens on the discard port), with `extra` flags.
fn start_undelivering_agent(dir: &std::path::Path, hub: &TestHub, extra: &[&str]) -> Result<Agent> {
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN)?;
    let mut extra_args = hub_flags(hub, &token_file);
    extra_args.extend(extra.iter().map(|a| a.to_string()));
    Agent::start(AgentConfig {
        bin: agent_bin(),
        dir: dir.join("agent"),
        upstream_url: "http://127.0.0.1:9".into(),
        api_key: "key".into(),
        extra_args,
    })
}

/// Waits up to 10 s until the hub's index knows the agent.
async fn wait_connected(hub: &TestHub, agent: &Agent) -> Result<()> {
    let connected = Instant::now();
    while hub.hub.index.identities("test-ns", "shop").is_empty() {
        anyhow::ensure!(
            connected.elapsed() < Duration::from_secs(10),
            "agent never connected: {}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn publish(socket: &std::path::Path, n: usize) -> Result<()> {
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    for i in 0..n {
        stream
            .write_all(format!(r#"{{"msg_type":"publish","data":{{"i":{i}}}}}"#).as_bytes())
            .await?;
    }
    stream.shutdown().await?;
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest).await?;
    anyhow::ensure!(
        rest.is_empty(),
        "publish answered {}",
        String::from_utf8_lossy(&rest)
    );
    Ok(())
}

fn field<'a>(map: &'a rmpv::Value, key: &str) -> Option<&'a rmpv::Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// The configuration generation the agent reports (`status`, the same as its heartbeats).
async fn reported_generation(hub: &TestHub) -> Result<i64> {
    let status = hub
        .hub
        .request("uid-1", "status", Vec::new(), Duration::from_secs(5))
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(
        nanogate_protocol::control::from_value::<nanogate_protocol::control::Heartbeat>(status)?
            .config_generation,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agent_and_real_hub_handshake_report_reload_flush_and_drain() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(dir.path()).await?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN)?;
    let platform = PlatformServer::start().await?;
    // Slow batches so `flush` has something to wait for.
    let start_file = dir.path().join("agent.yaml");
    std::fs::write(
        &start_file,
        "flush_interval: 3s\nbatch_size: 1000\nmin_batch_size: 1000\nmax_batch_size: 1000\n",
    )?;
    let mut agent = Agent::start(AgentConfig {
        bin: agent_bin(),
        dir: dir.path().join("agent"),
        upstream_url: platform.url(),
        api_key: platform.api_key().to_string(),
        extra_args: [
            hub_flags(&hub, &token_file),
            // In a file, as in a pod, so a reload can change them (flags would win over it).
            vec![format!("--config={}", start_file.display())],
        ]
        .concat(),
    })?;

    // Handshake → the index knows the agent; heartbeats carry its counts.
    wait_connected(&hub, &agent).await?;
    publish(&agent.socket, 25).await?;
    let status = hub
        .hub
        .request("uid-1", "status", Vec::new(), Duration::from_secs(5))
        .await
        .map_err(anyhow::Error::msg)?;
    let status: nanogate_protocol::control::Heartbeat =
        nanogate_protocol::control::from_value(status)?;
    assert_eq!(
        (
            status.received_total,
            status.pod.as_str(),
            status.agent_id.as_str()
        ),
        (25, "test-ns/test-pod", "uid-1")
    );

    // flush: answered once what was queued has been delivered (the flush interval is 3 s).
    let started = Instant::now();
    let flushed = hub
        .hub
        .request("uid-1", "flush", Vec::new(), Duration::from_secs(15))
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(field(&flushed, "pending").and_then(|v| v.as_u64()), Some(0));
    assert_eq!(
        platform.received_count(),
        25,
        "delivered before flush answered"
    );
    eprintln!(
        "[hub-agent] flush answered after {:.2}s with 25 delivered",
        started.elapsed().as_secs_f64()
    );

    // reload: a valid change is applied; an invalid one is refused with the validation error.
    // The hub always sends the whole file; transport and socket stay, so no restart is needed.
    let full_config = format!(
        "app_url: {}\nsocket_path: {}\nflush_interval: 100ms\n",
        platform.url(),
        agent.socket.display()
    );
    // A reload request to the agent with the whole file `config`: the reply or the refusal.
    let reload = |config: &str| {
        let kwargs = vec![("config".to_string(), rmpv::Value::from(config.to_string()))];
        hub.hub
            .request("uid-1", "reload", kwargs, Duration::from_secs(5))
    };
    let applied = reload(&full_config).await.map_err(anyhow::Error::msg)?;
    assert!(
        field(&applied, "restart_needed").is_some_and(|v| v.as_bool() == Some(false)),
        "{applied}"
    );
    let applied_generation = reported_generation(&hub).await?;
    assert_eq!(
        Some(applied_generation),
        field(&applied, "generation").and_then(|v| v.as_i64()),
        "a reload applied in full is the generation the agent reports"
    );
    // A socket limit is set up once: the reply names it, the batching part still applies,
    // and the agent keeps reporting the generation it really runs.
    let pending = reload(&format!("{full_config}max_tags: 3\n"))
        .await
        .map_err(anyhow::Error::msg)?;
    assert!(
        field(&pending, "restart_needed").is_some_and(|v| v.as_bool() == Some(true)),
        "{pending}"
    );
    assert_eq!(
        field(&pending, "pending_fields")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>()),
        Some(vec!["max_tags"]),
        "{pending}"
    );
    assert_eq!(
        reported_generation(&hub).await?,
        applied_generation,
        "a reload that needs a restart does not count as running the new configuration"
    );
    let refused = reload("max_batch_size: 0\n")
        .await
        .expect_err("an invalid configuration is refused");
    assert!(
        refused.contains("max_batch_size"),
        "names the field: {refused}"
    );
    // The applied 100 ms flush interval is live: a new message arrives quickly.
    publish(&agent.socket, 1).await?;
    let sent = Instant::now();
    while platform.received_count() < 26 {
        anyhow::ensure!(
            sent.elapsed() < Duration::from_secs(2),
            "reloaded flush interval not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // drain: the agent delivers what it holds and exits 0.
    publish(&agent.socket, 4).await?;
    hub.hub
        .request("uid-1", "drain", Vec::new(), Duration::from_secs(5))
        .await
        .map_err(anyhow::Error::msg)?;
    let exit = agent
        .wait_exit(Duration::from_secs(20))
        .context("agent exit")?;
    assert!(exit.success(), "drained agent exits 0: {exit}");
    assert_eq!(
        platform.received_count(),
        30,
        "everything delivered before exit"
    );
    Ok(())
}

/// Issue 15: a pod deleted while the platform is down. What the agent still holds at its
/// shutdown deadline is counted: the agent logs the number and reports it to the hub before
/// its Bye, and the hub keeps it for the gateway after the agent is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_left_at_the_shutdown_deadline_reach_the_hub_before_the_agent_exits() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let hub = start_hub(dir.path()).await?;
    let mut agent = start_undelivering_agent(dir.path(), &hub, &["--shutdown-deadline=1s"])?;
    wait_connected(&hub, &agent).await?;
    let sent = 40;
    publish(&agent.socket, sent).await?;
    anyhow::ensure!(
        hub.hub.left_behind.unwritten("test-ns", "shop").is_empty(),
        "nothing is reported while the agent runs"
    );

    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.pid().context("pid")?)?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let exit = agent.wait_exit(Duration::from_secs(10))?;
    assert!(exit.success(), "exits 0 after the deadline: {exit}");

    // The report reached the hub before the agent exited (it waits for the hub to close
    // after its Bye), and the hub keeps it although the agent has left the index.
    let left = hub.hub.left_behind.unwritten("test-ns", "shop");
    assert_eq!(
        (left.messages, left.shutdowns),
        (sent as u64, 1),
        "{}",
        agent.log_text()
    );
    assert!(left.bytes > 0);
    assert_eq!(left.last.map(|(pod, _)| pod), Some("test-pod".into()));
    assert!(hub.hub.index.identities("test-ns", "shop").is_empty());
    let log = agent.log_text();
    let line = format!(
        "shutdown deadline: {sent} messages ({} bytes) left undelivered in the spool",
        left.bytes
    );
    assert!(log.contains(&line), "the log names the numbers: {log}");
    assert!(
        log.contains("left-behind messages reported to the hub"),
        "{log}"
    );
    eprintln!("[hub-agent] {line}; the hub counted {sent} for test-ns/shop");
    Ok(())
}

/// Issue 18: silent connections beyond the hub's caps are dropped (counted), and neither a
/// flood before the agent connects nor one while it is connected keeps the hub from serving
/// the real agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_connections_leaves_the_hub_serving_a_real_agent() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let hub = start_hub_with(
        dir.path(),
        HubConfig {
            max_connections: 64,
            max_handshakes: 8,
            ..HubConfig::default()
        },
    )
    .await?;
    // 100 connections that never say anything, held open: more than both caps.
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(tokio::net::TcpStream::connect(hub.addr).await?);
    }
    let agent = start_undelivering_agent(dir.path(), &hub, &[])?;
    wait_connected(&hub, &agent)
        .await
        .map_err(|e| e.context("through the flood"))?;
    let denied = |reason: &str| {
        hub.hub
            .metrics
            .auth
            .with_label_values(&["deny", reason])
            .get()
    };
    let refused =
        denied("connection_limit") + denied("handshake_evicted") + denied("hello_timeout");
    anyhow::ensure!(
        refused >= 92,
        "at most 8 flood connections may still wait; refused {refused}"
    );
    anyhow::ensure!(
        hub.hub.admission.handshakes() <= 8,
        "handshakes in progress over the cap"
    );

    // A second flood while the agent is connected: it keeps answering.
    let addr = hub.addr;
    let flooding = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..500 {
            if let Ok(c) = tokio::net::TcpStream::connect(addr).await {
                held.push(c);
            }
        }
        held
    });
    for _ in 0..5 {
        hub.hub
            .request("uid-1", "status", Vec::new(), Duration::from_secs(5))
            .await
            .map_err(anyhow::Error::msg)?;
    }
    drop(flooding.await?);
    drop(flood);
    Ok(())
}
