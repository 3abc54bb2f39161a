//! nano-agent library; `main.rs` only parses flags and calls into it.
//!
//! Data path: app socket ([`socket`]) → spool ([`spool`], accepted = appended) → delivery
//! ([`batcher`]) → platform ([`upstream`]). [`admin`] serves metrics and health.

pub mod admin;
pub mod batcher;
pub mod config;
pub mod control;
pub mod gateway_config;
pub mod metrics;
pub mod socket;
pub mod spool;
pub mod tcp_listener;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use nanogate_protocol::app::Limits;
use tokio::sync::watch;

use crate::admin::{AdminState, Health};
use crate::batcher::{Delivery, Resources, Tuning};
use crate::config::{Config, LogFormat};
use crate::metrics::Metrics;
use crate::spool::{Spool, SpoolOptions};
use crate::upstream::AnyUpstream;

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

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    run_until(config, shutdown_signal()).await
}

/// Runs the agent until `shutdown` completes: then stops accepting, removes the socket,
/// delivers what it can within `shutdown_deadline` and leaves the rest in the spool.
pub async fn run_until(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());

    let spool = Spool::open(SpoolOptions {
        dir: config.spool_dir.clone(),
        max_bytes: config.spool_max_bytes,
        segment_bytes: config.spool_segment_bytes,
        sync_interval: config.spool_sync_interval,
    })
    .with_context(|| {
        format!(
            "spool_dir {}: cannot open the spool",
            config.spool_dir.display()
        )
    })?;
    let rec = spool.recovery().clone();
    metrics.spool_recovered.inc_by(rec.messages);
    metrics.spool_torn_bytes.inc_by(rec.torn_bytes);
    tracing::info!(messages = rec.messages, bytes = rec.bytes, torn_bytes = rec.torn_bytes,
        segments = rec.segments, dir = %config.spool_dir.display(), "spool recovered");

    let upstream =
        Arc::new(AnyUpstream::from_config(&config, metrics.clone(), &health, &spool).await?);

    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("admin_listen {}: cannot bind", config.admin_listen))?;
    let (listener, socket_file) = socket::bind(&config.socket_path)?;
    // Bound before readiness: ready means every configured listener accepts.
    let tcp_server = tcp_listener::TcpServer::bind(&config).await?;
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
    let (stop_tx, stop_rx) = watch::channel(false);
    let (drain_tx, drain_rx) = watch::channel(false);
    let resources = Arc::new(Resources::default());
    tokio::spawn(batcher::run_resource_sampler(
        resources.clone(),
        metrics.clone(),
        config.resource_sample_interval,
        stop_rx.clone(),
    ));
    if !config.spool_sync_interval.is_zero() {
        let spool = spool.clone();
        let every = config.spool_sync_interval;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
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
    // `drain` from the hub ends the agent like SIGTERM does.
    let drain_request = Arc::new(tokio::sync::Notify::new());
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

    let shared = Arc::new(socket::server::Shared {
        limits: Limits {
            max_message_bytes: config.max_message_bytes,
            max_tags: config.max_tags,
        },
        idle_timeout: config.idle_timeout,
        spool: spool.clone(),
        upstream,
        metrics: metrics.clone(),
        source: config.source(),
        // socketio's msg_check reads messages already pushed into the agent: nothing to save.
        empty_check: socket::empty_check::EmptyCheckCache::new(match config.upstream_kind {
            config::UpstreamKind::Socketio => std::time::Duration::ZERO,
            _ => config.msg_check_cache,
        }),
    });
    let tcp = match tcp_server {
        Some(server) => Some(server.spawn(shared.clone(), &metrics.registry)?),
        None => None,
    };
    if let (Some(hub_addr), Some(ca), Some(agent_id)) =
        (&config.hub_addr, &config.hub_ca_file, &config.pod_uid)
    {
        let mut control = control::ControlConfig::new(
            hub_addr,
            ca.clone(),
            config.hub_token_file.clone(),
            agent_id,
        );
        control.heartbeat_interval = config.heartbeat_interval;
        let handler = Arc::new(control::AgentControl {
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
        tokio::spawn(control::run(control, handler, stop_rx.clone()));
    } else {
        drop(tuning_tx);
    }
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = drain_request.notified() => tracing::info!("drain requested by the hub"),
        }
    };
    // The TCP listener stops accepting at the same moment as the socket.
    let tcp_stop = tcp.as_ref().map(tcp_listener::TcpHandle::stop_signal);
    let shutdown = async move {
        shutdown.await;
        if let Some(stop) = tcp_stop {
            stop.notify_one();
        }
    };
    socket::server::run(listener, shared, config.max_connections, shutdown).await;
    if let Some(tcp) = tcp {
        tcp.stop().await;
    }

    health.draining.store(true, Ordering::Relaxed);
    drop(socket_file);
    let _ = drain_tx.send(true);
    tracing::info!(pending = spool.pending_msgs(), deadline = ?config.shutdown_deadline,
        "stopped accepting; delivering what is queued");
    match tokio::time::timeout(config.shutdown_deadline, &mut delivery).await {
        Ok(_) => tracing::info!("spool drained"),
        Err(_) => {
            delivery.abort();
            tracing::warn!(
                pending = spool.pending_msgs(),
                "shutdown deadline reached; undelivered messages stay in the spool for the next start"
            );
        }
    }
    if let Err(e) = spool.sync() {
        tracing::error!(error = %e, "final spool fsync failed");
    }
    let _ = stop_tx.send(true);
    admin.abort();
    tracing::info!(
        received = metrics.received.get(),
        delivered = metrics.delivered.get(),
        "nano-agent stopped"
    );
    Ok(())
}
