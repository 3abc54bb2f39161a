//! The nanogate operator library; `main.rs` only parses flags and calls into it. How the parts
//! fit together is in `docs/architecture.md` ("Operator"). Lower modules first; none imports a
//! module listed above it (`tests/layout.rs` checks there is no cycle):
//!
//! - [`names`]: every annotation, label, environment variable, mount path and ConfigMap key
//!   shared with pods, users and the sidecar.
//! - [`shutdown`]: the one [`shutdown::Shutdown`] every long-running task takes.
//! - [`tls`]: the self-made CA and serving certificate, rotation, `caBundle`, the swappable
//!   rustls certificate the webhook and the hub serve.
//! - [`crd`]: the `AgentGateway` resource, its defaults, status types and [`crd::validate`].
//! - [`gateway`]: pure rules of a gateway — [`gateway::ValidatedGateway`] (validated spec and
//!   everything derived from it: sidecar configuration, injector's view, Secret references) and
//!   pod membership.
//! - [`status`]: which status field each writer owns, and the server-side apply of each part.
//! - [`metrics`], [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`controller`]: the reconciler (validate → dereference → build → apply → status).
//! - [`webhook`]: admission (`/mutate` injects the sidecar, `/validate` checks gateways).
//! - [`hub`]: the control-channel server for the sidecars, the fleet's health index and the
//!   status writer.
//! - [`leader`]: Lease-based leader election; only the leader runs the controller and the
//!   status writer.
//! - [`servers`]: start-up of certificates, webhook and hub, with their flags.
//! - This file: the `run` flags and the run loop (admin server, leader election, controller).

pub mod admin;
pub mod controller;
pub mod crd;
pub mod gateway;
pub mod hub;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod servers;
pub mod shutdown;
pub mod status;
pub mod tls;
pub mod webhook;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use kube::{Client, CustomResourceExt};

use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use controller::{Error, Result};
pub use metrics::Metrics;

pub use names::FIELD_MANAGER;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `nanogate-operator run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    /// Address of the admin server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "NANOGATE_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, env = "NANOGATE_LEASE_NAME", default_value = "nanogate-operator")]
    pub lease_name: String,
    /// Namespace of the leader-election Lease (default: `POD_NAMESPACE`, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Identity of this replica in the Lease (default: `POD_NAME`, else hostname and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Lease duration in seconds; a dead leader is replaced after at most this long.
    #[arg(long, default_value_t = 15)]
    pub lease_duration: u64,
    /// Run for leadership (disable only for a single replica in tests).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Reconcile gateways of this namespace only (default: all namespaces).
    #[arg(long, env = "NANOGATE_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Log format.
    #[arg(long, value_enum, env = "NANOGATE_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Webhook, hub and certificates.
    #[command(flatten)]
    pub servers: servers::ServerOptions,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lease_name: "nanogate-operator".into(),
            lease_namespace: "default".into(),
            identity: None,
            lease_duration: 15,
            leader_elect: true,
            namespace: None,
            log_format: LogFormat::Text,
            servers: servers::ServerOptions::default(),
        }
    }
}

/// The CRD as YAML (what `nanogate-operator crd` prints and `crds/agentgateway.yaml` holds).
pub fn crd_yaml() -> anyhow::Result<String> {
    let mut crd = crd::AgentGateway::crd();
    for version in &mut crd.spec.versions {
        let status = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("status"));
        // `status` is an `Option`, so the schema says `nullable`; the apiserver (1.20) then
        // publishes it untyped and server-side apply treats everything under it as atomic:
        // `conditions` would be one list owned by its last writer, not a map keyed on `type`
        // (seen in e2e: the hub's apply removed the reconciler's `Ready`). A status is never
        // written as null.
        if let Some(status) = status {
            status.nullable = None;
        }
    }
    Ok(serde_yaml::to_string(&crd)?)
}

/// Initialise tracing (`RUST_LOG`, default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutdown requested");
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "nanogate-operator".into());
    format!("{host}_{}", std::process::id())
}

/// Run the operator with the default client (`KUBECONFIG` or in-cluster).
pub async fn run(
    opts: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (set KUBECONFIG or run in a cluster)")?;
    run_with_client(client, opts, Metrics::default(), shutdown).await
}

/// A running controller task and the switch that stops it.
struct Running {
    stop: shutdown::Trigger,
    task: JoinHandle<()>,
}

impl Running {
    fn start(ctx: Arc<controller::Context>) -> Self {
        let (stop, stopped) = shutdown::channel();
        let task = tokio::spawn(controller::run(ctx, stopped.fired()));
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.fire();
        let mut task = self.task;
        // The controller drains in-flight reconciles; do not wait forever for a stuck one.
        if tokio::time::timeout(Duration::from_secs(10), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Run the operator with `client` until `shutdown`: the admin server on every replica, the
/// controller only while this replica holds the lease (or always with `leader_elect: false`).
/// `metrics` lets callers (tests, benches) read counters such as API writes.
pub async fn run_with_client(
    client: Client,
    opts: RunOptions,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let identity = opts.identity.clone().unwrap_or_else(default_identity);
    let ready = Arc::new(AtomicBool::new(false));
    let listener = admin::bind(opts.admin_addr)
        .await
        .with_context(|| format!("binding admin address {}", opts.admin_addr))?;
    info!(addr = %listener.local_addr()?, %identity, "admin server listening");
    let (admin_stop, admin_stopped) = shutdown::channel();
    let admin = tokio::spawn(admin::serve(
        listener,
        admin::AdminState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        admin_stopped.fired(),
    ));
    ready.store(true, Ordering::Relaxed);

    // Webhook and hub serve on every replica; they stop when `servers_stop` flips.
    let (servers_stop, servers_stopped) = shutdown::channel();
    let (hub_ca, owner, hub) = if opts.servers.enabled() {
        let started = servers::start(
            client.clone(),
            &opts.servers,
            &metrics.registry,
            metrics.leader.clone(),
            servers_stopped,
        )
        .await?;
        (Some(started.ca_pem), started.owner, started.hub)
    } else {
        (None, None, None)
    };
    let set_hub_leading = |leading: bool| {
        if let Some(hub) = &hub {
            hub.set_leading(leading);
        }
    };

    let ctx = Arc::new(
        controller::Context::new(client.clone(), metrics.clone(), Some(identity.clone()))
            .with_namespace(opts.namespace.clone())
            .with_hub_ca(hub_ca),
    );
    let mut shutdown = std::pin::pin!(shutdown);

    if !opts.leader_elect {
        metrics.leader.set(1);
        if let (Some(pod), Some(_)) = (&opts.identity, &hub) {
            leader::LeaderPodLabel::new(client.clone(), &opts.lease_namespace, pod)
                .sync(true)
                .await;
        }
        let running = Running::start(ctx);
        shutdown.as_mut().await;
        running.stop().await;
    } else {
        let cfg = leader::LeaseConfig {
            name: opts.lease_name.clone(),
            namespace: opts.lease_namespace.clone(),
            identity: identity.clone(),
            lease_duration: Duration::from_secs(opts.lease_duration.max(1)),
            owner: owner.clone(),
        };
        // Sidecars follow the leader: it labels its pod for the hub Service (in a pod only).
        let mut pod_label = opts
            .identity
            .as_ref()
            .filter(|_| hub.is_some())
            .map(|pod| leader::LeaderPodLabel::new(client.clone(), &opts.lease_namespace, pod));
        set_hub_leading(false);
        let mut elector = leader::LeaderElector::new(client, cfg.clone());
        let mut running: Option<Running> = None;
        loop {
            let leading = match elector.try_acquire_or_renew().await {
                Ok(leader::Round::Leading) => true,
                Ok(leader::Round::Following(_)) => false,
                Err(error) => {
                    // Keep leading only while the lease we hold is certainly still ours.
                    let still = running.is_some()
                        && elector
                            .last_renew()
                            .is_some_and(|t| t.elapsed() < cfg.renew_deadline());
                    warn!(%error, still_leading = still, "lease round failed");
                    still
                }
            };
            match (leading, running.take()) {
                (true, None) => {
                    info!(%identity, "became leader; starting controller");
                    metrics.leader.set(1);
                    set_hub_leading(true);
                    running = Some(Running::start(ctx.clone()));
                }
                (false, Some(r)) => {
                    warn!(%identity, "lost leadership; stopping controller");
                    metrics.leader.set(0);
                    set_hub_leading(false);
                    r.stop().await;
                }
                (_, r) => running = r,
            }
            if let Some(label) = pod_label.as_mut() {
                label.sync(running.is_some()).await;
            }
            let wait = if running.is_some() {
                cfg.renew_interval()
            } else {
                cfg.retry_interval()
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.as_mut() => break,
            }
        }
        if let Some(r) = running.take() {
            set_hub_leading(false);
            if let Some(label) = pod_label.as_mut() {
                label.sync(false).await;
            }
            r.stop().await;
            elector.release().await;
        }
        metrics.leader.set(0);
    }
    servers_stop.fire();
    admin_stop.fire();
    let _ = admin.await;
    info!("operator stopped");
    Ok(())
}
