//! The health index: what the hub knows about every connected sidecar, and the per-gateway
//! aggregate the status writer turns into `AgentGateway.status`.
//!
//! Records are keyed by agent id (the pod UID), so a sidecar that reconnects replaces its own
//! record and counts never double; a closing connection removes the record only if it is still
//! the connection that owns it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use nanogate_protocol::control::{AgentStatus, Heartbeat};

/// Who a connection authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The pod UID (AgentHello `id`).
    pub agent_id: String,
    pub namespace: String,
    pub pod: String,
    pub gateway: String,
}

#[derive(Debug, Clone)]
struct AgentRecord {
    identity: AgentIdentity,
    connection: u64,
    connected_at: Instant,
    last_seen: Instant,
    heartbeat: Option<Heartbeat>,
    last_heartbeat_unix: Option<i64>,
    /// This agent's counters as its heartbeats reported them over the last [`RATE_WINDOW`],
    /// oldest first: the rates are taken from them.
    samples: VecDeque<Sample>,
    /// When this agent last went from healthy to unhealthy, monotonic and as Unix seconds (the
    /// wall-clock value is taken once so `unhealthySidecars.since` stays stable between writes).
    unhealthy_since: Option<(Instant, i64)>,
}

/// The window the per-second rates in the status average over: long enough to smooth a
/// 5 s heartbeat's jitter, short enough that a stopped app shows 0 within a minute.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// One heartbeat's counters and when it arrived.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    received: u64,
    delivered: u64,
    /// Refused at the socket, dead-lettered, or dropped to make room.
    dropped: u64,
}

impl Sample {
    fn of(heartbeat: &Heartbeat, at: Instant) -> Self {
        Sample {
            at,
            received: heartbeat.received_total,
            delivered: heartbeat.delivered_total,
            dropped: heartbeat.dropped_total(),
        }
    }
}

/// Received, delivered and dropped per second between the oldest and newest sample.
fn rates(samples: &VecDeque<Sample>) -> (f64, f64, f64) {
    let (Some(old), Some(new)) = (samples.front(), samples.back()) else {
        return (0.0, 0.0, 0.0);
    };
    let elapsed = new.at.duration_since(old.at).as_secs_f64();
    if elapsed <= 0.0 {
        return (0.0, 0.0, 0.0);
    }
    let per_second = |new: u64, old: u64| new.saturating_sub(old) as f64 / elapsed;
    (
        per_second(new.received, old.received),
        per_second(new.delivered, old.delivered),
        per_second(new.dropped, old.dropped),
    )
}

/// Aggregate of one gateway's connected sidecars.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetHealth {
    pub connected: u32,
    pub healthy: u32,
    pub received_total: u64,
    pub delivered_total: u64,
    /// [`Heartbeat::dropped_total`] summed.
    pub dropped_total: u64,
    pub dropped_oldest_total: u64,
    /// Averages over [`RATE_WINDOW`].
    pub received_per_second: f64,
    pub delivered_per_second: f64,
    /// Refused at the socket, dead-lettered or dropped to make room, per second.
    pub dropped_per_second: f64,
    /// Most recent heartbeat from any sidecar, as Unix seconds.
    pub last_heartbeat_unix: Option<i64>,
    /// Whether some sidecar's last call to the platform succeeded; `None` until a sidecar has
    /// called it (delivery, `wait:true` or `msg_check`).
    pub upstream_reachable: Option<bool>,
    /// A sidecar's last upstream error, from a failing sidecar when there is one (the first
    /// such pod by name), for the `UpstreamReachable` reason and `status.upstream.lastError`.
    pub upstream_error: Option<String>,
    /// Unhealthy sidecars, longest-unhealthy first, at most [`MAX_UNHEALTHY`].
    pub unhealthy: Vec<UnhealthyAgent>,
    /// How many sidecars run each config generation.
    pub config_generations: BTreeMap<i64, u32>,
    /// Connected sidecars whose last heartbeat said `backlogged` (delivery slower than
    /// ingest), healthy or not.
    pub backlogged: u32,
    /// Their pods, by name, at most [`MAX_UNHEALTHY`].
    pub backlogged_pods: Vec<String>,
    /// Their backlog growth summed, messages per second.
    pub backlog_growth_per_second: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnhealthyAgent {
    pub pod: String,
    pub reason: &'static str,
    /// How long it has been unhealthy.
    pub for_duration: Duration,
    /// When it became unhealthy, as Unix seconds.
    pub since_unix: i64,
}

/// The status shows at most this many unhealthy sidecars.
pub const MAX_UNHEALTHY: usize = 10;

#[derive(Debug, Default)]
pub struct HealthIndex {
    agents: RwLock<Agents>,
}

/// A gateway: `(namespace, name)`.
type GatewayKey = (String, String);

/// The records grouped by gateway, so one gateway's aggregate (taken for every gateway every
/// status pass) reads only that gateway's agents, not the whole fleet.
#[derive(Debug, Default)]
struct Agents {
    /// Never holds an empty group.
    by_gateway: HashMap<GatewayKey, HashMap<String, AgentRecord>>,
    /// The gateway each agent's record is filed under.
    gateway_of: HashMap<String, GatewayKey>,
}

impl Agents {
    fn record_mut(&mut self, agent_id: &str, connection: u64) -> Option<&mut AgentRecord> {
        let key = self.gateway_of.get(agent_id)?;
        self.by_gateway
            .get_mut(key)?
            .get_mut(agent_id)
            .filter(|r| r.connection == connection)
    }

    fn remove(&mut self, agent_id: &str) {
        let Some(key) = self.gateway_of.remove(agent_id) else {
            return;
        };
        if let Some(group) = self.by_gateway.get_mut(&key) {
            group.remove(agent_id);
            if group.is_empty() {
                self.by_gateway.remove(&key);
            }
        }
    }

    fn group(&self, namespace: &str, gateway: &str) -> impl Iterator<Item = &AgentRecord> {
        self.by_gateway
            .get(&(namespace.to_string(), gateway.to_string()))
            .into_iter()
            .flat_map(|group| group.values())
    }
}

impl HealthIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a freshly authenticated connection; replaces an older connection's record.
    pub fn connected(&self, identity: AgentIdentity, connection: u64, now: Instant) {
        let record = AgentRecord {
            identity: identity.clone(),
            connection,
            connected_at: now,
            last_seen: now,
            heartbeat: None,
            last_heartbeat_unix: None,
            samples: VecDeque::new(),
            unhealthy_since: None,
        };
        let key = (identity.namespace, identity.gateway);
        let mut agents = self.write();
        // A reconnect replaces the old record, wherever it was filed.
        agents.remove(&identity.agent_id);
        agents
            .gateway_of
            .insert(identity.agent_id.clone(), key.clone());
        agents
            .by_gateway
            .entry(key)
            .or_default()
            .insert(identity.agent_id, record);
    }

    /// Applies a heartbeat from `agent_id` on `connection`. Ignored if that connection no longer
    /// owns the record.
    pub fn heartbeat(&self, agent_id: &str, connection: u64, heartbeat: Heartbeat, now: Instant) {
        let mut agents = self.write();
        let Some(record) = agents.record_mut(agent_id, connection) else {
            return;
        };
        record.samples.push_back(Sample::of(&heartbeat, now));
        while record
            .samples
            .front()
            .is_some_and(|s| now.duration_since(s.at) > RATE_WINDOW)
        {
            record.samples.pop_front();
        }
        record.last_seen = now;
        record.last_heartbeat_unix = Some(unix_now());
        record.heartbeat = Some(heartbeat);
    }

    /// Any frame from the agent proves it is alive.
    pub fn seen(&self, agent_id: &str, connection: u64, now: Instant) {
        if let Some(record) = self.write().record_mut(agent_id, connection) {
            record.last_seen = now;
        }
    }

    /// Removes the record if `connection` still owns it.
    pub fn disconnected(&self, agent_id: &str, connection: u64) {
        let mut agents = self.write();
        if agents.record_mut(agent_id, connection).is_some() {
            agents.remove(agent_id);
        }
    }

    /// Number of connected agents (all gateways).
    pub fn len(&self) -> usize {
        self.read().gateway_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The agents connected for `namespace/gateway`.
    pub fn identities(&self, namespace: &str, gateway: &str) -> Vec<AgentIdentity> {
        self.read()
            .group(namespace, gateway)
            .map(|r| r.identity.clone())
            .collect()
    }

    /// Agents of `namespace/gateway` whose last heartbeat reported a config generation other
    /// than `generation` (they need a `reload`).
    pub fn stale_agents(&self, namespace: &str, gateway: &str, generation: i64) -> Vec<String> {
        self.read()
            .group(namespace, gateway)
            .filter(|r| {
                r.heartbeat
                    .as_ref()
                    .is_some_and(|hb| hb.config_generation != generation)
            })
            .map(|r| r.identity.agent_id.clone())
            .collect()
    }

    /// Gateways that have at least one connected agent, as `(namespace, gateway)`.
    pub fn gateways(&self) -> Vec<(String, String)> {
        let mut keys: Vec<_> = self.read().by_gateway.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// The aggregate for one gateway. An agent silent for longer than `silence_limit`
    /// (3 heartbeat intervals) counts as disconnected.
    pub fn fleet(
        &self,
        namespace: &str,
        gateway: &str,
        now: Instant,
        silence_limit: Duration,
    ) -> FleetHealth {
        let mut agents = self.write();
        let mut fleet = FleetHealth::default();
        let mut reachable = 0u32;
        let mut tried = 0u32;
        let mut unhealthy = Vec::new();
        let mut upstream_errors: Vec<(bool, String, String)> = Vec::new();
        let group = agents
            .by_gateway
            .get_mut(&(namespace.to_string(), gateway.to_string()));
        for record in group.into_iter().flat_map(|g| g.values_mut()) {
            if now.duration_since(record.last_seen) > silence_limit {
                continue;
            }
            fleet.connected += 1;
            let reason = match &record.heartbeat {
                None if now.duration_since(record.connected_at) > silence_limit => {
                    Some("NoHeartbeat")
                }
                None => Some("Starting"),
                Some(hb) => {
                    fleet.received_total += hb.received_total;
                    fleet.delivered_total += hb.delivered_total;
                    fleet.dropped_total += hb.dropped_total();
                    fleet.dropped_oldest_total += hb.dropped_oldest_total;
                    let (received, delivered, dropped) = rates(&record.samples);
                    fleet.received_per_second += received;
                    fleet.delivered_per_second += delivered;
                    fleet.dropped_per_second += dropped;
                    fleet.last_heartbeat_unix =
                        fleet.last_heartbeat_unix.max(record.last_heartbeat_unix);
                    *fleet
                        .config_generations
                        .entry(hb.config_generation)
                        .or_default() += 1;
                    if hb.backlogged {
                        fleet.backlogged += 1;
                        fleet.backlogged_pods.push(record.identity.pod.clone());
                        fleet.backlog_growth_per_second += hb.backlog_growth_per_second.max(0.0);
                    }
                    // `untried`: no call to the platform has ended yet; `closed`: the last
                    // succeeded; anything else (`failing`, `open`, `half_open`): it failed.
                    let untried = hb.upstream.state == "untried";
                    let delivering = hb.upstream.state == "closed";
                    tried += u32::from(!untried);
                    reachable += u32::from(delivering);
                    if let Some(e) = &hb.upstream.last_error {
                        // A failing sidecar's error first: it explains the state shown.
                        upstream_errors.push((delivering, record.identity.pod.clone(), e.clone()));
                    }
                    match hb.status {
                        AgentStatus::Ready if delivering || untried => None,
                        AgentStatus::Ready => Some("UpstreamUnreachable"),
                        AgentStatus::Starting => Some("Starting"),
                        AgentStatus::Degraded => Some("Degraded"),
                        AgentStatus::Draining => Some("Draining"),
                    }
                }
            };
            match reason {
                None => {
                    fleet.healthy += 1;
                    record.unhealthy_since = None;
                }
                Some(reason) => {
                    let (since, since_unix) =
                        *record.unhealthy_since.get_or_insert((now, unix_now()));
                    unhealthy.push(UnhealthyAgent {
                        pod: record.identity.pod.clone(),
                        reason,
                        for_duration: now.duration_since(since),
                        since_unix,
                    });
                }
            }
        }
        // Unknown until some sidecar has called the platform.
        if tried > 0 {
            fleet.upstream_reachable = Some(reachable > 0);
        }
        fleet.upstream_error = upstream_errors.into_iter().min().map(|(_, _, e)| e);
        unhealthy.sort_by(|a, b| {
            b.for_duration
                .cmp(&a.for_duration)
                .then_with(|| a.pod.cmp(&b.pod))
        });
        unhealthy.truncate(MAX_UNHEALTHY);
        fleet.unhealthy = unhealthy;
        fleet.backlogged_pods.sort();
        fleet.backlogged_pods.truncate(MAX_UNHEALTHY);
        fleet
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Agents> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.agents.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Agents> {
        self.agents.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nanogate_protocol::control::UpstreamHealth;

    pub(crate) fn identity(n: u32, gateway: &str) -> AgentIdentity {
        AgentIdentity {
            agent_id: format!("uid-{n}"),
            namespace: "ns".into(),
            pod: format!("pod-{n}"),
            gateway: gateway.into(),
        }
    }

    pub(crate) fn heartbeat(received: u64, status: AgentStatus, circuit: &str) -> Heartbeat {
        Heartbeat {
            gateway: "gw".into(),
            pod: "p".into(),
            status,
            cpu_usage: 0.1,
            memory_usage: 1 << 20,
            rejected_total: 1,
            upstream: UpstreamHealth {
                state: circuit.into(),
                last_error: None,
                last_success: None,
            },
            ..Heartbeat::ready("x", received, 2)
        }
    }

    const SILENCE: Duration = Duration::from_secs(15);

    /// As the connection calls it: every frame marks the agent seen before a heartbeat is
    /// applied, so the rate cannot be taken from `last_seen` (it was always 0).
    #[test]
    fn rates_are_averaged_over_the_window_whatever_else_the_agent_sent() {
        let index = HealthIndex::new();
        let t0 = Instant::now();
        index.connected(identity(1, "gw"), 1, t0);
        let mut hb = heartbeat(0, AgentStatus::Ready, "closed");
        for step in 0..=30u64 {
            let at = t0 + Duration::from_secs(5 * step);
            // 50 msgs/s received, 40 delivered, 1 rejected and 1 dead-lettered every 5 s.
            hb.received_total = 250 * step;
            hb.delivered_total = 200 * step;
            hb.rejected_total = step;
            hb.dead_lettered_total = step;
            index.seen("uid-1", 1, at - Duration::from_millis(1));
            index.seen("uid-1", 1, at);
            index.heartbeat("uid-1", 1, hb.clone(), at);
        }
        let fleet = index.fleet("ns", "gw", t0 + Duration::from_secs(151), SILENCE);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(fleet.received_per_second, 50.0), "{fleet:?}");
        assert!(close(fleet.delivered_per_second, 40.0), "{fleet:?}");
        assert!(close(fleet.dropped_per_second, 0.4), "{fleet:?}");
        // A burst shows within the window, then fades out of it.
        hb.received_total += 6000;
        index.heartbeat("uid-1", 1, hb.clone(), t0 + Duration::from_secs(155));
        let fleet = index.fleet("ns", "gw", t0 + Duration::from_secs(156), SILENCE);
        assert!(
            close(fleet.received_per_second, (250.0 * 11.0 + 6000.0) / 60.0),
            "{fleet:?}"
        );
        for step in 32..=50u64 {
            index.heartbeat("uid-1", 1, hb.clone(), t0 + Duration::from_secs(5 * step));
        }
        let fleet = index.fleet("ns", "gw", t0 + Duration::from_secs(251), SILENCE);
        assert!(close(fleet.received_per_second, 0.0), "{fleet:?}");
    }

    #[test]
    fn aggregates_per_gateway_with_rates_and_unhealthy_reasons() {
        let index = HealthIndex::new();
        let t0 = Instant::now();
        index.connected(identity(1, "gw"), 1, t0);
        index.connected(identity(2, "gw"), 2, t0);
        index.connected(identity(3, "other"), 3, t0);
        index.heartbeat("uid-1", 1, heartbeat(100, AgentStatus::Ready, "closed"), t0);
        index.heartbeat(
            "uid-1",
            1,
            heartbeat(150, AgentStatus::Ready, "closed"),
            t0 + Duration::from_secs(5),
        );
        index.heartbeat(
            "uid-2",
            2,
            heartbeat(10, AgentStatus::Ready, "open"),
            t0 + Duration::from_secs(5),
        );

        let fleet = index.fleet("ns", "gw", t0 + Duration::from_secs(6), SILENCE);
        assert_eq!((fleet.connected, fleet.healthy), (2, 1));
        assert_eq!(fleet.received_total, 160);
        assert_eq!(fleet.dropped_total, 2);
        assert!(
            (fleet.received_per_second - 10.0).abs() < 1e-9,
            "{}",
            fleet.received_per_second
        );
        assert_eq!(fleet.upstream_reachable, Some(true));
        assert_eq!(fleet.unhealthy.len(), 1);
        assert_eq!(
            (fleet.unhealthy[0].pod.as_str(), fleet.unhealthy[0].reason),
            ("pod-2", "UpstreamUnreachable")
        );
        assert_eq!(fleet.config_generations, BTreeMap::from([(2, 2)]));
    }

    #[test]
    fn backlogged_sidecars_are_counted_and_named_whatever_their_health() {
        let index = HealthIndex::new();
        let t0 = Instant::now();
        for (n, backlogged, status) in [
            (1, true, AgentStatus::Ready),
            (2, false, AgentStatus::Ready),
            (3, true, AgentStatus::Degraded),
        ] {
            index.connected(identity(n, "gw"), n.into(), t0);
            let mut hb = heartbeat(10, status, "closed");
            hb.backlogged = backlogged;
            hb.backlog_growth_per_second = if backlogged { 2.5 } else { 0.0 };
            index.heartbeat(&format!("uid-{n}"), n.into(), hb, t0);
        }
        let fleet = index.fleet("ns", "gw", t0, SILENCE);
        assert_eq!(fleet.backlogged, 2);
        assert_eq!(fleet.backlogged_pods, ["pod-1", "pod-3"]);
        assert_eq!(fleet.backlog_growth_per_second, 5.0);
        assert_eq!(index.fleet("ns", "other", t0, SILENCE).backlogged, 0);
    }

    #[test]
    fn agents_on_an_old_configuration_are_found() {
        let index = HealthIndex::new();
        let t0 = Instant::now();
        index.connected(identity(1, "gw"), 1, t0);
        index.connected(identity(2, "gw"), 2, t0);
        index.connected(identity(3, "gw"), 3, t0); // no heartbeat yet: unknown, not stale
        index.heartbeat("uid-1", 1, heartbeat(1, AgentStatus::Ready, "closed"), t0);
        let mut newer = heartbeat(1, AgentStatus::Ready, "closed");
        newer.config_generation = 7;
        index.heartbeat("uid-2", 2, newer, t0);
        assert_eq!(index.stale_agents("ns", "gw", 7), vec!["uid-1".to_string()]);
        assert!(index.stale_agents("ns", "other", 7).is_empty());
    }

    #[test]
    fn silent_agents_count_as_disconnected() {
        let index = HealthIndex::new();
        let t0 = Instant::now();
        index.connected(identity(1, "gw"), 1, t0);
        index.heartbeat("uid-1", 1, heartbeat(1, AgentStatus::Ready, "closed"), t0);
        assert_eq!(index.fleet("ns", "gw", t0 + SILENCE, SILENCE).connected, 1);
        assert_eq!(
            index
                .fleet("ns", "gw", t0 + SILENCE + Duration::from_millis(1), SILENCE)
                .connected,
            0
        );
    }

    #[test]
    fn reconnect_never_doubles_and_stale_close_keeps_the_new_record() {
        let index = HealthIndex::new();
        let t0 = Instant::now();
        index.connected(identity(1, "gw"), 1, t0);
        index.connected(identity(1, "gw"), 2, t0);
        index.disconnected("uid-1", 1); // the old connection closes late
        assert_eq!(index.fleet("ns", "gw", t0, SILENCE).connected, 1);
        index.heartbeat("uid-1", 1, heartbeat(5, AgentStatus::Ready, "closed"), t0); // stale: ignored
        assert_eq!(index.fleet("ns", "gw", t0, SILENCE).received_total, 0);
        index.disconnected("uid-1", 2);
        assert!(index.is_empty());
    }

    /// Records are filed by gateway: an agent that comes back for another gateway (its pod
    /// was relabelled) moves, and a gateway whose last agent left is no longer listed.
    #[test]
    fn a_reconnect_for_another_gateway_moves_the_record() {
        let index = HealthIndex::new();
        let t0 = Instant::now();
        index.connected(identity(1, "gw"), 1, t0);
        index.connected(identity(2, "gw"), 2, t0);
        index.connected(identity(1, "other"), 3, t0);
        assert_eq!(index.len(), 2);
        assert_eq!(index.fleet("ns", "gw", t0, SILENCE).connected, 1);
        assert_eq!(index.identities("ns", "other"), vec![identity(1, "other")]);
        index.disconnected("uid-1", 1); // the old connection: owns nothing any more
        assert_eq!(index.fleet("ns", "other", t0, SILENCE).connected, 1);
        index.disconnected("uid-2", 2);
        assert_eq!(
            index.gateways(),
            vec![("ns".to_string(), "other".to_string())]
        );
        index.disconnected("uid-1", 3);
        assert!(index.is_empty() && index.gateways().is_empty());
    }

    #[test]
    fn unhealthy_list_is_capped_and_keeps_its_since() {
        let index = HealthIndex::new();
        let t0 = Instant::now();
        for n in 0..15 {
            index.connected(identity(n, "gw"), u64::from(n), t0);
            index.heartbeat(
                &format!("uid-{n}"),
                u64::from(n),
                heartbeat(0, AgentStatus::Degraded, "closed"),
                t0,
            );
        }
        let first = index.fleet("ns", "gw", t0, SILENCE);
        assert_eq!(first.unhealthy.len(), MAX_UNHEALTHY);
        let later = index.fleet("ns", "gw", t0 + Duration::from_secs(4), SILENCE);
        assert_eq!(later.unhealthy[0].for_duration, Duration::from_secs(4));
    }

    #[test]
    fn the_error_of_an_unreachable_sidecar_is_kept() {
        let index = HealthIndex::new();
        let t0 = Instant::now();
        for n in 1..=3 {
            index.connected(identity(n, "gw"), n.into(), t0);
        }
        let failing = |n: u32, e: &str| {
            let mut hb = heartbeat(1, AgentStatus::Degraded, "open");
            hb.upstream.last_error = Some(e.into());
            index.heartbeat(&format!("uid-{n}"), n.into(), hb, t0);
        };
        failing(2, "unauthorized: HTTP 401");
        failing(3, "HTTP 503 from messages");
        let mut ok = heartbeat(1, AgentStatus::Ready, "closed");
        ok.upstream.last_error = Some("old error".into());
        index.heartbeat("uid-1", 1, ok, t0);
        let fleet = index.fleet("ns", "gw", t0, SILENCE);
        assert_eq!(
            fleet.upstream_error.as_deref(),
            Some("unauthorized: HTTP 401")
        );
        assert_eq!(fleet.upstream_reachable, Some(true));
    }

    /// Reachability comes from calls that ended: none yet is unknown (and healthy); one failed
    /// call (`failing`, circuit still closed) is unreachable, and its error is kept.
    #[test]
    fn the_upstream_is_unknown_until_a_call_ended_and_a_failed_call_counts() {
        let index = HealthIndex::new();
        let t0 = Instant::now();
        index.connected(identity(1, "gw"), 1, t0);
        index.heartbeat("uid-1", 1, heartbeat(0, AgentStatus::Ready, "untried"), t0);
        let fleet = index.fleet("ns", "gw", t0, SILENCE);
        assert_eq!(fleet.upstream_reachable, None, "nothing tried yet");
        assert_eq!(
            fleet.healthy, 1,
            "an agent that has not called the platform is healthy"
        );

        let mut failed = heartbeat(1, AgentStatus::Ready, "failing");
        failed.upstream.last_error = Some("connect refused".into());
        index.heartbeat("uid-1", 1, failed, t0 + Duration::from_secs(1));
        let fleet = index.fleet("ns", "gw", t0 + Duration::from_secs(1), SILENCE);
        assert_eq!(fleet.upstream_reachable, Some(false));
        assert_eq!(fleet.healthy, 0);
        assert_eq!(fleet.upstream_error.as_deref(), Some("connect refused"));
    }
}
