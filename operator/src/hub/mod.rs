//! The control-channel hub (the manager side of the RedPepper control channel; its frames and
//! flow are in `docs/architecture.md`, "Control channel"): every injected nano-agent holds
//! one authenticated TLS connection here; heartbeats feed the [`HealthIndex`], from which the
//! status writer reports each gateway's fleet; `reload`/`flush`/`drain`/`status` go back out
//! through [`Hub::request`].

pub mod admission;
pub mod auth;
pub mod connection;
pub mod index;
pub mod jobs;
pub mod left_behind;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rmpv::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::shutdown::Shutdown;

pub use admission::{Admission, Handshake};
pub use auth::{AuthLimits, Authenticator, Bounded, Denial, TokenReviewAuthenticator};
pub use connection::{Closed, OutboundRequest, TOKEN_EXPIRED, ToAgent};
pub use index::{AgentIdentity, FleetHealth, HealthIndex};

/// Keep-alive and admission settings; defaults are the architecture's.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// An agent must say AgentHello within this long (3 s).
    pub hello_timeout: Duration,
    /// The hub pings every agent this often (30 s)…
    pub ping_interval: Duration,
    /// …and closes the connection when the Pong is this late (5 s).
    pub pong_timeout: Duration,
    /// Sustained notifications per second per connection (heartbeats come every 5 s; 5/s leaves
    /// room for bursts after a reconnect while stopping a flooding agent).
    pub notification_rate: f64,
    pub notification_burst: f64,
    /// Sent in ManagerHello.
    pub version: String,
    /// Connections at most, authenticated or not (10000); more are closed at once.
    pub max_connections: usize,
    /// Handshakes in progress at most (256); a new one drops the oldest.
    pub max_handshakes: usize,
    /// TLS, AgentHello and authentication together must be done within this long (10 s).
    pub handshake_timeout: Duration,
    /// Bytes a peer may send before its AgentHello is complete (64 KiB; a hello with a
    /// service-account token is 1–2 KiB).
    pub pre_auth_bytes: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(3),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(5),
            notification_rate: 5.0,
            notification_burst: 20.0,
            version: env!("CARGO_PKG_VERSION").to_string(),
            max_connections: 10_000,
            max_handshakes: 256,
            handshake_timeout: Duration::from_secs(10),
            pre_auth_bytes: 64 * 1024,
        }
    }
}

/// `nanogate_hub_*` metrics.
#[derive(Clone)]
pub struct HubMetrics {
    /// Connection admissions by decision (`accept`/`deny`/`redirect`) and reason; the limits
    /// refuse with `connection_limit`, `handshake_evicted`, `handshake_timeout` and
    /// `pre_auth_bytes`.
    pub auth: IntCounterVec,
    /// Notifications by type and outcome (`ok`, `invalid`, `rate_limited`, `ignored`).
    pub notifications: IntCounterVec,
    /// Agents connected now.
    pub connected: IntGauge,
    /// Time to decode and apply one notification (heartbeats dominate).
    pub handling: Histogram,
    /// Messages sidecars reported left undelivered at shutdown (`left_behind`).
    pub left_behind: IntCounter,
}

impl HubMetrics {
    pub fn new(registry: &Registry) -> Self {
        let auth = IntCounterVec::new(
            Opts::new(
                "nanogate_hub_connections_total",
                "Hub connection admissions by decision and reason",
            ),
            &["decision", "reason"],
        )
        .expect("valid metric");
        let notifications = IntCounterVec::new(
            Opts::new(
                "nanogate_hub_notifications_total",
                "Agent notifications by type and outcome",
            ),
            &["type", "outcome"],
        )
        .expect("valid metric");
        let connected = IntGauge::new(
            "nanogate_hub_connected_agents",
            "Agents connected to this hub",
        )
        .expect("valid metric");
        let handling = Histogram::with_opts(
            HistogramOpts::new(
                "nanogate_hub_notification_seconds",
                "Time to decode and apply one agent notification",
            )
            .buckets(vec![
                5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
            ]),
        )
        .expect("valid metric");
        let left_behind = IntCounter::new(
            "nanogate_hub_left_behind_messages_total",
            "Messages sidecars reported still undelivered when they shut down",
        )
        .expect("valid metric");
        for collector in [
            Box::new(auth.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(notifications.clone()),
            Box::new(connected.clone()),
            Box::new(handling.clone()),
            Box::new(left_behind.clone()),
        ] {
            // Registering twice (a second hub in one process, in tests) is harmless.
            let _ = registry.register(collector);
        }
        Self {
            auth,
            notifications,
            connected,
            handling,
            left_behind,
        }
    }
}

/// Shared state of all hub connections.
pub struct Hub {
    pub config: HubConfig,
    /// The connection and handshake caps.
    pub admission: Arc<Admission>,
    pub index: HealthIndex,
    /// Per-gateway reports of messages sidecars left behind, until the status shows them.
    pub left_behind: left_behind::LeftBehindLedger,
    pub metrics: HubMetrics,
    /// Outbound request channel of each connected agent, with the connection id that owns it.
    agents: Mutex<HashMap<String, (u64, mpsc::Sender<ToAgent>)>>,
    /// Agents sent away because their pod or gateway is gone: their next handshake is
    /// authenticated in full, not from the token cache (see [`Hub::send_away`]).
    sent_away: Mutex<std::collections::HashSet<String>>,
    /// Whether this replica leads. Only the leader's index feeds gateway status, so a follower
    /// sends its agents away (`Bye`) and they reconnect through the Service, which selects the
    /// leader's pod; counts never split between replicas.
    leading: watch::Sender<bool>,
}

/// `Bye` reason a follower gives; agents reconnect (through the Service, to the leader).
pub const NOT_LEADER: &str = "not the leader; reconnect";

impl Hub {
    pub fn new(config: HubConfig, registry: &Registry) -> Arc<Self> {
        Arc::new(Self {
            admission: Admission::new(
                config.max_connections,
                config.max_handshakes,
                config.handshake_timeout,
            ),
            config,
            index: HealthIndex::new(),
            left_behind: Default::default(),
            metrics: HubMetrics::new(registry),
            agents: Mutex::new(HashMap::new()),
            sent_away: Mutex::new(Default::default()),
            leading: watch::channel(true).0,
        })
    }

    /// Follows this replica's leadership (a hub leads until told otherwise).
    pub fn set_leading(&self, leading: bool) {
        self.leading.send_if_modified(|current| {
            let changed = *current != leading;
            *current = leading;
            changed
        });
    }

    /// Whether this replica's hub currently serves agents.
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Resolves once this replica stops leading.
    pub(crate) async fn lost_leadership(&self) {
        let mut leading = self.leading.subscribe();
        let _ = leading.wait_for(|l| !*l).await;
    }

    /// Calls `method` on a connected agent and waits up to `timeout` for its Response.
    pub async fn request(
        &self,
        agent_id: &str,
        method: &str,
        kwargs: Vec<(String, Value)>,
        timeout: Duration,
    ) -> Result<Value, String> {
        let sender = self
            .agents_lock()
            .get(agent_id)
            .map(|(_, tx)| tx.clone())
            .ok_or_else(|| format!("agent {agent_id} is not connected"))?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(ToAgent::Request(Box::new(OutboundRequest {
                method: method.to_string(),
                kwargs,
                reply,
            })))
            .await
            .map_err(|_| format!("agent {agent_id} disconnected"))?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(format!("agent {agent_id} disconnected")),
            Err(_) => Err(format!(
                "agent {agent_id} did not answer {method} within {timeout:?}"
            )),
        }
    }

    /// Ends `agent_id`'s session with `Bye(reason)`, if it is connected: its pod or gateway is
    /// gone. (A reconnect is authenticated again, and refused while they are gone.)
    pub fn send_away(&self, agent_id: &str, reason: &str) {
        let sender = self.agents_lock().get(agent_id).map(|(_, tx)| tx.clone());
        let Some(sender) = sender else {
            return;
        };
        // Its token is still valid and cached: without this its reconnect would be let in
        // unchecked. Only connected agents are remembered, so the set stays small.
        self.sent_away
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(agent_id.to_string());
        if sender
            .try_send(ToAgent::SendAway(reason.to_string()))
            .is_err()
        {
            debug!(%agent_id, "agent connection busy or closing; not sent away");
        }
    }

    /// Whether `agent_id` was sent away since its last handshake (and forgets it).
    fn take_sent_away(&self, agent_id: &str) -> bool {
        self.sent_away
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(agent_id)
    }

    fn attach(&self, agent_id: &str, connection: u64, sender: mpsc::Sender<ToAgent>) {
        self.agents_lock()
            .insert(agent_id.to_string(), (connection, sender));
    }

    fn detach(&self, agent_id: &str, connection: u64) {
        let mut agents = self.agents_lock();
        if agents
            .get(agent_id)
            .is_some_and(|(owner, _)| *owner == connection)
        {
            agents.remove(agent_id);
        }
    }

    fn agents_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (u64, mpsc::Sender<ToAgent>)>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Accepts TLS connections on `listener` until `shutdown` flips to true; each connection is
/// served on its own task.
pub async fn serve<A: Authenticator>(
    listener: TcpListener,
    tls: TlsAcceptor,
    hub: Arc<Hub>,
    auth: Arc<A>,
    mut shutdown: Shutdown,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    warn!(%error, "hub accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        // The caps are checked before any work is spent on the peer.
        let Some(permit) = hub.admission.connection() else {
            connection::refused(&hub.metrics, &peer.to_string(), Closed::ConnectionLimit);
            drop(tcp);
            continue;
        };
        let mut handshake = hub.admission.handshake();
        let _ = tcp.set_nodelay(true);
        let (tls, hub, auth, shutdown) = (tls.clone(), hub.clone(), auth.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // The TLS handshake counts against the hello timeout: a silent peer is dropped too.
            let accepted = tokio::select! {
                accepted = tokio::time::timeout(hub.config.hello_timeout, tls.accept(tcp)) => accepted,
                closed = handshake.interrupted() => {
                    connection::refused(&hub.metrics, &peer.to_string(), closed);
                    return;
                }
            };
            let stream = match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    hub.metrics.auth.with_label_values(&["deny", "tls"]).inc();
                    warn!(target: "nanogate::audit", decision = "deny", %peer,
                          reason = %format!("TLS handshake failed: {error}"), "hub connection");
                    return;
                }
                Err(_) => {
                    hub.metrics
                        .auth
                        .with_label_values(&["deny", "hello_timeout"])
                        .inc();
                    warn!(target: "nanogate::audit", decision = "deny", %peer,
                          reason = "no TLS handshake within the hello timeout", "hub connection");
                    return;
                }
            };
            connection::serve(stream, peer.to_string(), hub, auth, shutdown, handshake).await;
        });
    }
}

#[cfg(test)]
mod tests;
