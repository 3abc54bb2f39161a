//! nano-agent, the sidecar next to every app: `main.rs` parses flags and calls [`run`]; this
//! file wires the parts together at start and takes them down in order at shutdown.
//!
//! Data path: [`ingest`] (app socket, TCP listener) → [`spool`] (accepted = appended) →
//! [`delivery`] (batches, retries, dead letters, ack) → [`upstream`] (http, nats, socketio).
//! The design in one page: `docs/architecture.md`, part "nano-agent".
//!
//! Modules, lowest first; each uses only modules above it in this list:
//! - [`config`]: flags, environment, config files (the operator's per-gateway file too),
//!   each transport's options, what a reload may change.
//! - [`metrics`]: the Prometheus registry (`nanogate_sidecar_*`).
//! - [`backoff`]: the one retry backoff.
//! - [`health`]: ready, draining, and the upstream circuit breaker.
//! - [`shutdown`]: the one shutdown signal every task stops on.
//! - [`system`]: CPU and memory sampling.
//! - [`spool`]: the durable on-disk queue.
//! - [`backlog`]: whether the spool's backlog keeps growing (delivery slower than ingest), for
//!   heartbeats and metrics.
//! - [`upstream`]: the transports to the platform.
//! - [`ingest`]: where messages enter (app socket, TCP listener).
//! - [`delivery`]: from the spool to the platform, and batch sizing.
//! - [`control`]: the hub connection, and what the hub may ask of the agent.
//! - [`admin`]: the admin HTTP server (`/healthz`, `/readyz`, `/metrics`).
//!
//! Apps, the platform and the hub all send bytes the agent must survive: `unwrap`, `expect`
//! and indexing that can panic are refused outside tests (with `panic = "abort"` one panic
//! would end every connection of the pod).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

// Foundations, used by everything below.
pub mod backlog;
pub mod backoff;
pub mod config;
pub mod health;
pub mod metrics;
pub mod shutdown;
pub mod system;

// Storage and transports.
pub mod spool;
pub mod upstream;

// The agent's tasks.
pub mod admin;
pub mod control;
pub mod delivery;
pub mod ingest;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use nanogate_protocol::app::Limits;
use tokio::sync::watch;

use crate::admin::AdminState;
use crate::config::{Config, LogFormat};
use crate::delivery::{Delivery, Tuning};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::spool::{Spool, SpoolOptions};
use crate::system::Resources;
use crate::upstream::AnyUpstream;
use nanogate_protocol::control::LeftBehind;

/// Installs the global tracing subscriber (stderr, text or JSON).
pub fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: container logs get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when
/// the future is first polled: the agent is ready (and may be sent SIGTERM) before its socket
/// server polls it, and a SIGTERM before the handler exists would kill it without a shutdown.
/// Call it inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (mut term, mut int) = match (term, int) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), Ok(mut int)) => {
                tracing::error!(error = %e, "cannot watch SIGTERM; only SIGINT stops the agent");
                int.recv().await;
                return;
            }
            (_, Err(e)) => {
                tracing::error!(error = %e, "cannot watch SIGINT; falling back to ctrl_c");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    run_until(config, shutdown_signal()).await
}

/// Runs the agent until `shutdown` completes: then stops accepting, removes the socket,
/// delivers what it can within `shutdown_deadline` and leaves the rest in the spool — counted,
/// logged, and reported to the hub (see [`report_left_behind`]).
pub async fn run_until(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    metrics
        .spool_max_bytes
        .set(i64::try_from(config.spool_max_bytes).unwrap_or(i64::MAX));
    let health = Arc::new(Health::default());

    let spool = Spool::open(SpoolOptions {
        dir: config.spool_dir.clone(),
        max_bytes: config.spool_max_bytes,
        segment_bytes: config.spool_segment_bytes,
        sync_interval: config.spool_sync_interval,
        overflow: match config.overflow_policy {
            config::OverflowPolicy::Reject => spool::Overflow::Reject,
            config::OverflowPolicy::DropOldest => spool::Overflow::DropOldest,
        },
    })
    .with_context(|| {
        format!(
            "spool_dir {}: cannot open the spool",
            config.spool_dir.display()
        )
    })?;
    spool.on_drop(drop_reporter(metrics.clone()));
    let rec = spool.recovery().clone();
    metrics.spool_recovered.inc_by(rec.messages);
    metrics.spool_torn_bytes.inc_by(rec.torn_bytes);
    tracing::info!(messages = rec.messages, bytes = rec.bytes, torn_bytes = rec.torn_bytes,
        segments = rec.segments, dir = %config.spool_dir.display(), "spool recovered");

    // One API key for every transport, re-read from its file while the agent runs.
    let api_key = upstream::api_key::ApiKey::from_config(&config, metrics.clone());
    let upstream = Arc::new(
        AnyUpstream::from_config(&config, &api_key, metrics.clone(), &health, &spool).await?,
    );
    if config.upstream_insecure_skip_verify {
        tracing::warn!(upstream = %config.app_url,
            "upstream TLS certificates are NOT verified (upstream_insecure_skip_verify, spec.upstream.tls.insecureSkipVerify): anyone on the path to the platform can read and change the messages and the API key; give the platform's CA (spec.upstream.tls.caSecretRef) instead");
    }

    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("admin_listen {}: cannot bind", config.admin_listen))?;
    let (listener, socket_file) = ingest::socket_file::bind(&config.socket_path)?;
    // Bound before readiness: ready means every configured listener accepts.
    let tcp_server = ingest::tcp::TcpServer::bind(&config).await?;
    health.ready.store(true, Ordering::Relaxed);
    tracing::info!(socket = %config.socket_path.display(), admin = %admin_listener.local_addr()?,
        upstream = %config.app_url, upstream_kind = upstream.kind(), source = %config.source(), version = env!("CARGO_PKG_VERSION"),
        "nano-agent ready");

    let admin = tokio::spawn({
        let router = admin::router(AdminState {
            metrics: metrics.clone(),
            health: health.clone(),
            spool: spool.clone(),
        });
        async move {
            if let Err(e) = axum::serve(admin_listener, router).await {
                tracing::error!(error = %e, "admin server failed");
            }
        }
    });

    // `stop` ends the background tasks; `drain` tells delivery to empty the spool and return.
    let (stop_tx, stop_rx) = shutdown::channel();
    let (drain_tx, drain_rx) = shutdown::channel();
    tokio::spawn(
        api_key
            .clone()
            .watch(config.api_key_reload_interval, stop_rx.clone()),
    );
    let resources = Arc::new(Resources::default());
    tokio::spawn(system::run_resource_sampler(
        resources.clone(),
        metrics.clone(),
        config.resource_sample_interval,
        stop_rx.clone(),
    ));
    tokio::spawn(backlog::run(
        spool.clone(),
        metrics.clone(),
        config.backlog_window,
        stop_rx.clone(),
    ));
    if !config.spool_sync_interval.is_zero() {
        let spool = spool.clone();
        let every = config.spool_sync_interval;
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.triggered() => return,
                }
                let s = spool.clone();
                match tokio::task::spawn_blocking(move || s.sync()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "spool fsync failed"),
                    Err(e) => tracing::error!(error = %e, "spool fsync task failed"),
                }
            }
        });
    }
    let (tuning_tx, tuning_rx) = watch::channel(Tuning::from_config(&config));
    // `drain` from the hub ends the agent like SIGTERM does. `drain_request` is held to the
    // end of this function: were every trigger dropped (no hub configured), it would fire.
    let (drain_request, drain_requested) = shutdown::channel();
    let mut delivery = tokio::spawn(
        Delivery {
            spool: spool.clone(),
            upstream: upstream.clone(),
            tuning: tuning_rx,
            backoff_initial: config.backoff_initial,
            backoff_max: config.backoff_max,
            metrics: metrics.clone(),
            health: health.clone(),
            resources,
            dead_letter: config.dead_letter_file(),
        }
        .run(drain_rx),
    );

    let shared = Arc::new(ingest::unix::Shared {
        limits: Limits {
            max_message_bytes: config.max_message_bytes,
            max_tags: config.max_tags,
        },
        idle_timeout: config.idle_timeout,
        spool: spool.clone(),
        upstream,
        metrics: metrics.clone(),
        health: health.clone(),
        source: config.source(),
        // socketio's msg_check reads messages already pushed into the agent: nothing to save.
        empty_check: ingest::empty_check::EmptyCheckCache::new(match config.upstream_kind {
            config::UpstreamKind::Socketio => std::time::Duration::ZERO,
            _ => config.msg_check_cache,
        }),
    });
    // Both listeners stop accepting at the same moment, when this fires.
    let (stop_accepting, accepting_stopped) = shutdown::channel();
    let tcp = match tcp_server {
        Some(server) => {
            Some(server.spawn(shared.clone(), &metrics.registry, accepting_stopped.clone())?)
        }
        None => None,
    };
    let control = if let (Some(hub_addr), Some(ca), Some(agent_id)) =
        (&config.hub_addr, &config.hub_ca_file, &config.pod_uid)
    {
        let mut control = control::ControlConfig::new(
            hub_addr,
            ca.clone(),
            config.hub_token_file.clone(),
            agent_id,
        );
        control.heartbeat_interval = config.heartbeat_interval;
        let handler = Arc::new(control::agent::AgentControl {
            config: config.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            spool: spool.clone(),
            tuning: tuning_tx,
            drain: drain_request.clone(),
            started: std::time::Instant::now(),
            generation: std::sync::atomic::AtomicI64::new(config.config_generation),
        });
        tracing::info!(hub = %hub_addr, "control channel enabled");
        let (notifier, outbox) = control::outbox();
        let task = tokio::spawn(control::run(control, handler, outbox, stop_rx.clone()));
        Some((notifier, task))
    } else {
        drop(tuning_tx);
        None
    };
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = drain_requested.triggered() => tracing::info!("drain requested by the hub"),
        }
        stop_accepting.trigger();
    };
    let serve = ingest::unix::run(listener, shared, config.max_connections, accepting_stopped);
    tokio::pin!(serve);
    tokio::select! {
        // Ended on its own (the listener failed): dropping `shutdown` stops the TCP listener.
        () = &mut serve => {}
        () = shutdown => serve.await,
    }
    if let Some(tcp) = tcp {
        tcp.stopped().await;
    }

    health.draining.store(true, Ordering::Relaxed);
    drop(socket_file);
    drain_tx.trigger();
    tracing::info!(pending = spool.pending_msgs(), deadline = ?config.shutdown_deadline,
        "stopped accepting; delivering what is queued");
    let reason = match tokio::time::timeout(config.shutdown_deadline, &mut delivery).await {
        Ok(_) => "delivery ended",
        Err(_) => {
            delivery.abort();
            // Wait until it really stopped: an ack in flight would change the count.
            let _ = (&mut delivery).await;
            "shutdown deadline"
        }
    };
    if let Err(e) = spool.sync() {
        tracing::error!(error = %e, "final spool fsync failed");
    }
    let left = LeftBehind {
        messages: spool.pending_msgs(),
        bytes: spool.pending_bytes(),
        reason: reason.to_string(),
    };
    // Reported while the control channel is still up; it closes with `stop` below.
    report_left_behind(
        &left,
        &config,
        &metrics,
        control.as_ref().map(|(notifier, _)| notifier),
    )
    .await;
    stop_tx.trigger();
    drop(drain_request);
    if let Some((_, task)) = control {
        // The channel says Bye and waits (bounded) for the hub to close; let it finish.
        let bound = control::CLOSE_TIMEOUT + std::time::Duration::from_millis(500);
        let _ = tokio::time::timeout(bound, task).await;
    }
    admin.abort();
    tracing::info!(
        received = metrics.received.get(),
        delivered = metrics.delivered.get(),
        "nano-agent stopped"
    );
    Ok(())
}

/// What the agent does with every drop of the spool's oldest messages (`overflow_policy
/// drop-oldest`): counts them (`dropped_oldest_total`, which heartbeats carry to the gateway's
/// status) and logs a warning — at most one per [`DROP_LOG_INTERVAL`], with the counts since
/// the previous one, so a spool that stays full does not flood the log.
fn drop_reporter(metrics: Arc<Metrics>) -> impl Fn(spool::Dropped) + Send + Sync + 'static {
    // (last warning, messages and bytes dropped since it)
    let since = std::sync::Mutex::new((None::<std::time::Instant>, 0u64, 0u64));
    move |dropped| {
        metrics.dropped_oldest.inc_by(dropped.messages);
        let mut since = since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        since.1 += dropped.messages;
        since.2 += dropped.bytes;
        let now = std::time::Instant::now();
        if since
            .0
            .is_none_or(|last| now.duration_since(last) >= DROP_LOG_INTERVAL)
        {
            tracing::warn!(
                messages = since.1,
                bytes = since.2,
                total = metrics.dropped_oldest.get(),
                "spool full: dropped the {} oldest undelivered messages ({} bytes) to accept new ones (overflow_policy drop-oldest); the platform is not keeping up or not reachable",
                since.1,
                since.2
            );
            *since = (Some(now), 0, 0);
        }
    }
}

/// At most one warning about dropped messages this often.
const DROP_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the agent waits at shutdown for its `left_behind` notification to reach the hub.
const LEFT_BEHIND_NOTIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What is still undelivered when the agent stops is counted where an operator sees it: an
/// error log line with the numbers, the `left_behind_*` gauges, and a `left_behind`
/// notification to the hub (which counts it in the gateway's status and records an event).
/// The messages stay in the spool directory; whether that survives is up to its volume (the
/// injected `emptyDir` survives a container restart, not the pod's deletion), which the agent
/// cannot know. Nothing is reported when nothing is left.
pub async fn report_left_behind(
    left: &LeftBehind,
    config: &Config,
    metrics: &Metrics,
    notifier: Option<&control::Notifier>,
) {
    if left.messages == 0 {
        tracing::info!("spool drained; nothing left behind");
        return;
    }
    metrics.left_behind_messages.set(gauge(left.messages));
    metrics.left_behind_bytes.set(gauge(left.bytes));
    tracing::error!(
        messages = left.messages,
        bytes = left.bytes,
        reason = %left.reason,
        spool = %config.spool_dir.display(),
        "{}: {} messages ({} bytes) left undelivered in the spool; they are lost unless the spool's volume outlives this pod (an emptyDir survives a container restart, not a pod deletion)",
        left.reason,
        left.messages,
        left.bytes,
    );
    let Some(notifier) = notifier else { return };
    use nanogate_protocol::control::{LEFT_BEHIND, NO_SUCH_METHOD, to_kwargs, to_value};
    let kwargs = match to_kwargs(left) {
        Ok(kwargs) => kwargs,
        Err(e) => {
            tracing::error!(error = %e, "encoding the left_behind report failed");
            return;
        }
    };
    match notifier
        .request(LEFT_BEHIND, kwargs, LEFT_BEHIND_NOTIFY_TIMEOUT)
        .await
    {
        Ok(_) => tracing::info!(
            messages = left.messages,
            "left-behind messages reported to the hub (it acknowledged them)"
        ),
        // A hub from before 0.2 takes the report as a notification only.
        Err(control::RequestError::Refused(why)) if why.starts_with(NO_SUCH_METHOD) => {
            let flushed = match to_value(left) {
                Ok(data) => {
                    notifier
                        .notify(LEFT_BEHIND, data, LEFT_BEHIND_NOTIFY_TIMEOUT)
                        .await
                }
                Err(_) => false,
            };
            tracing::info!(
                messages = left.messages,
                flushed,
                "left-behind messages sent to a hub that does not acknowledge reports (unconfirmed)"
            );
        }
        Err(control::RequestError::Refused(why)) => tracing::warn!(
            messages = left.messages,
            refusal = %why,
            "the hub refused the left-behind report; this log line and the agent's metrics are the only record"
        ),
        Err(control::RequestError::Unanswered) => tracing::warn!(
            messages = left.messages,
            timeout = ?LEFT_BEHIND_NOTIFY_TIMEOUT,
            "the hub did not acknowledge the left-behind report in time (not connected, or the connection ended); this log line and the agent's metrics are the only record"
        ),
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn left(messages: u64) -> LeftBehind {
        LeftBehind {
            messages,
            bytes: messages * 100,
            reason: "shutdown deadline".into(),
        }
    }

    fn config() -> Config {
        Config::load_from([
            "nano-agent",
            "--socket-path=/tmp/a.sock",
            "--spool-dir=/tmp/s",
        ])
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_left_is_counted_and_sent_to_the_hub() {
        let (metrics, config) = (Metrics::new(), config());
        let (notifier, mut outbox) = control::outbox();
        let twelve = left(12);
        let ((), sent) = tokio::join!(
            report_left_behind(&twelve, &config, &metrics, Some(&notifier)),
            outbox.next_request(Ok("recorded".into()))
        );
        let (method, kwargs) = sent.unwrap();
        assert_eq!(method, "left_behind");
        assert_eq!(
            nanogate_protocol::control::from_kwargs::<LeftBehind>(kwargs).unwrap(),
            left(12)
        );
        assert_eq!(metrics.left_behind_messages.get(), 12);
        assert_eq!(metrics.left_behind_bytes.get(), 1200);
        assert!(
            metrics
                .render()
                .contains("nanogate_sidecar_left_behind_messages 12")
        );
    }

    /// A hub from before acknowledged reports answers "no such method": the report goes out
    /// as the notification it understands.
    #[tokio::test(start_paused = true)]
    async fn a_hub_without_the_method_gets_the_report_as_a_notification() {
        let (metrics, config) = (Metrics::new(), config());
        let (notifier, mut outbox) = control::outbox();
        let five = left(5);
        let old_hub = async {
            let refusal = format!(
                "{} \"left_behind\"",
                nanogate_protocol::control::NO_SUCH_METHOD
            );
            outbox.next_request(Err(refusal)).await.unwrap();
            outbox.next_written().await
        };
        let ((), sent) = tokio::join!(
            report_left_behind(&five, &config, &metrics, Some(&notifier)),
            old_hub
        );
        let (kind, data) = sent.unwrap();
        assert_eq!(kind, "left_behind");
        assert_eq!(
            nanogate_protocol::control::from_value::<LeftBehind>(data).unwrap(),
            left(5)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_hub_delays_the_exit_by_the_notify_timeout_only() {
        let (metrics, config) = (Metrics::new(), config());
        let (notifier, _outbox) = control::outbox(); // nothing serves it: no connection
        let started = tokio::time::Instant::now();
        report_left_behind(&left(3), &config, &metrics, Some(&notifier)).await;
        assert_eq!(started.elapsed(), LEFT_BEHIND_NOTIFY_TIMEOUT);
        assert_eq!(metrics.left_behind_messages.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_left_reports_nothing() {
        let metrics = Metrics::new();
        let (notifier, _outbox) = control::outbox();
        let started = tokio::time::Instant::now();
        report_left_behind(&left(0), &config(), &metrics, Some(&notifier)).await;
        assert_eq!(started.elapsed(), std::time::Duration::ZERO, "no wait");
        assert_eq!(metrics.left_behind_messages.get(), 0);
    }
}
