//! The nanogate operator library; `main.rs` only parses flags and calls into it. How the parts
//! fit together is in `docs/architecture.md` ("Operator"). Lower modules first; none imports a
//! module listed above it (`tests/layout.rs` checks there is no cycle):
//!
//! - [`bench`]: what the benches measure of a process (CPU time, memory); not used by the
//!   operator itself.
//! - [`names`]: every annotation, label, environment variable, mount path and ConfigMap key
//!   shared with pods, users and the sidecar.
//! - [`shutdown`]: the one [`shutdown::Shutdown`] every long-running task takes; SIGTERM.
//! - [`watch`]: reflector stores fed by watches that restart on errors.
//! - [`pods`]: the one pod watch (metadata only) the controller and the hub share.
//! - [`events`]: Kubernetes events, said again when their message changes.
//! - [`tls`]: the self-made CA and serving certificate, rotation, `caBundle`, the swappable
//!   rustls certificate the webhook and the hub serve.
//! - [`crd`]: the `AgentGateway` resource, its defaults, status types and [`crd::validate`].
//! - [`gateway`]: pure rules of a gateway — [`gateway::ValidatedGateway`] (validated spec and
//!   everything derived from it: sidecar configuration, injector's view, Secret references) and
//!   pod membership.
//! - [`status`]: which status field each writer owns, and the server-side apply of each part.
//! - [`metrics`], [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`controller`]: the reconciler (validate → dereference → build → apply → status).
//! - [`webhook`]: admission (`/mutate` injects the sidecar, `/validate` checks gateways), its
//!   view of the cluster and its events.
//! - [`hub`]: the control-channel server for the sidecars, the fleet's health index and the
//!   status writer.
//! - [`leader`]: Lease-based leader election; only the leader runs the controller and the
//!   status writer.
//! - [`start`]: start-up of certificates, webhook and hub.
//! - [`cli`]: the flags of `nanogate-operator run` and log set-up.
//! - [`selftest`]: `nanogate-operator selftest`, what the chart's `helm test` hook runs.
//! - This file: the run loop (admin server, leader election, controller).

pub mod admin;
pub mod bench;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod events;
pub mod gateway;
pub mod hub;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod pods;
pub mod selftest;
pub mod shutdown;
pub mod start;
pub mod status;
pub mod tls;
pub mod watch;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use kube::Client;

use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use controller::{Error, Result};
pub use metrics::Metrics;

pub use cli::{LogFormat, RunOptions, ServerOptions, init_logging};
pub use crd::crd_yaml;
pub use names::FIELD_MANAGER;
pub use shutdown::shutdown_signal;

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

/// How long in-flight reconciles may finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Pause before a leader retries a lease round that failed (see the run loop).
const RETRY_AFTER_FAILED_RENEWAL: Duration = Duration::from_millis(100);

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

    /// Stops the controller, letting in-flight reconciles finish for up to `grace`.
    async fn stop(self, grace: Duration) {
        self.stop.fire();
        let mut task = self.task;
        // Do not wait forever for a stuck reconcile.
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// Brings the stored CRD up to this operator's schema ([`crd::upgrade`]); a failure is logged
/// and the operator runs on (with the fields the stored schema knows).
async fn upgrade_crd(client: &Client) {
    use crd::upgrade::{CRD_NAME, Outcome, SCHEMA_REVISION};
    match crd::upgrade::upgrade(client).await {
        Ok(Outcome::Upgraded { from }) => {
            info!(
                crd = CRD_NAME,
                from,
                to = SCHEMA_REVISION,
                "upgraded the CRD's schema"
            )
        }
        Ok(Outcome::Current) => info!(crd = CRD_NAME, revision = SCHEMA_REVISION, "CRD is current"),
        Ok(Outcome::Newer(revision)) => warn!(
            crd = CRD_NAME,
            revision,
            ours = SCHEMA_REVISION,
            "the CRD is of a newer schema than this operator; left alone (is an older operator still running?)"
        ),
        Ok(Outcome::Missing) => warn!(
            crd = CRD_NAME,
            "the CRD is not installed: install it with the chart or `nanogate-operator crd | kubectl apply -f -`"
        ),
        Err(error) => warn!(
            crd = CRD_NAME,
            %error,
            "cannot upgrade the CRD (needs get/update on it: the chart's crds.manage); fields this version added are pruned until `kubectl apply -f crds/`"
        ),
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
    // A bad image policy stops the operator before it serves anything.
    let images = opts.servers.sidecar_images()?;
    if opts.manage_crd {
        upgrade_crd(&client).await;
    }
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

    // The one pod watch, shared by the hub (every replica) and the controller (the leader).
    let pods = pods::PodWatch::new(client.clone(), opts.namespace.as_deref());
    // Webhook and hub serve on every replica; they stop when `servers_stop` flips.
    let (servers_stop, servers_stopped) = shutdown::channel();
    let (hub_ca, owner, hub) = if opts.servers.enabled() {
        let started = start::start(
            client.clone(),
            &opts.servers,
            opts.namespace.as_deref(),
            &pods,
            &metrics.registry,
            metrics.leader.clone(),
            servers_stopped,
        )
        .await?;
        // Ready once the webhook can answer from listed caches (at once without a webhook).
        let (ready, synced) = (ready.clone(), started.webhook_synced.clone());
        tokio::spawn(async move {
            synced.ready().await;
            ready.store(true, Ordering::Relaxed);
        });
        (Some(started.ca_pem), started.owner, started.hub)
    } else {
        ready.store(true, Ordering::Relaxed);
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
            .with_hub_ca(hub_ca)
            .with_sidecar_images(images)
            .with_pod_watch(pods),
    );
    let mut shutdown = std::pin::pin!(shutdown);

    if !opts.leader_elect {
        metrics.leader.set(1);
        if let (Some(pod), Some(_)) = (&opts.identity, &hub) {
            leader::LeaderPodLabel::new(client.clone(), &opts.lease_namespace, pod)
                .sync(true, Duration::from_secs(10))
                .await;
        }
        let running = Running::start(ctx);
        shutdown.as_mut().await;
        running.stop(SHUTDOWN_GRACE).await;
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
        // A leader that steps down lets reconciles finish for a moment only: the next leader
        // may start once the lease expires, a third of the lease after the renew deadline.
        let step_down_grace = cfg.lease_duration / 10;
        loop {
            let mut failed = false;
            let leading = match elector.try_acquire_or_renew().await {
                Ok(leader::Round::Leading) => true,
                Ok(leader::Round::Following(_)) => false,
                Err(error) => {
                    failed = true;
                    // Keep leading only while the lease we hold is certainly still ours.
                    let still =
                        running.is_some() && elector.time_left().is_some_and(|l| !l.is_zero());
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
                    r.stop(step_down_grace).await;
                }
                (_, r) => running = r,
            }
            if let Some(label) = pod_label.as_mut() {
                // Not past the renew deadline either.
                let budget = elector
                    .time_left()
                    .map_or(cfg.round_timeout(), |l| l.min(cfg.round_timeout()));
                label.sync(running.is_some(), budget).await;
            }
            // A leader whose round failed tries again at once (a pause keeps an instantly
            // failing API server from being hammered): the deadline leaves room for one more.
            let mut wait = if running.is_some() && failed {
                RETRY_AFTER_FAILED_RENEWAL
            } else {
                cfg.retry_interval()
            };
            // A leader looks again before its deadline, so it steps down by it.
            if let (Some(_), Some(left)) = (&running, elector.time_left()) {
                wait = wait.min(left);
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.as_mut() => break,
            }
        }
        if let Some(r) = running.take() {
            set_hub_leading(false);
            if let Some(label) = pod_label.as_mut() {
                label.sync(false, cfg.round_timeout()).await;
            }
            r.stop(SHUTDOWN_GRACE).await;
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
