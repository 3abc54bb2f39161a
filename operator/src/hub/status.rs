//! The status writer: turns the health index into each AgentGateway's status — sidecar counts,
//! message totals and rates, upstream state, `UpstreamReachable`, `SidecarsHealthy`, unhealthy
//! sidecars, left-behind totals — at most once per interval per gateway and only when a shown
//! value changed.
//!
//! It applies only the fields it owns, as field manager `nanogate-hub` (which fields are whose:
//! `crate::status`); the reconciler's fields are read (e.g. `sidecars.expected` for the
//! summary) but never written here. Each write is conditional on the `resourceVersion` read:
//! `status.leftBehind` is a running total this writer adds to, so a total read before another
//! write (a previous leader's last pass) must not be written back. A refused write is
//! written in a later pass, once the watch has brought the newer object; nothing is
//! subtracted from the ledger until a write carried it.
//!
//! Gateways are read from a watch-fed store, not listed every pass: a pass costs the API
//! server nothing unless a status changes. A gateway whose object and fleet are both as they
//! were at a pass that found nothing to write is skipped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use prometheus::{IntCounter, IntGauge};
use tracing::{debug, warn};

use super::index::{AgentIdentity, FleetHealth};
use super::{Hub, left_behind};
use crate::crd::{
    AgentGateway, AgentGatewayStatus, LeftBehindStats, MessageStats, SidecarCounts,
    UnhealthySidecar, UpstreamStatus, conditions, parse_duration,
};
use crate::gateway::{SidecarImages, ValidatedGateway};
use crate::names::INJECT_ANNOTATION;
use crate::shutdown::Shutdown;
use crate::status::{self, set_condition};

/// Default pause between status passes (the architecture's "at most every few seconds").
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// A sidecar silent for this many heartbeat intervals counts as disconnected.
pub const SILENT_HEARTBEATS: u32 = 3;

/// `lastHeartbeatTime` alone never causes a write; it is refreshed with other changes or when
/// older than this.
const HEARTBEAT_TIME_REFRESH: i64 = 60;

/// The status this writer wants, from the current status and the fleet. Rates are rounded to
/// one decimal so noise does not cause writes.
pub fn fleet_status(
    current: Option<&AgentGatewayStatus>,
    fleet: &FleetHealth,
    generation: Option<i64>,
    now: &Time,
) -> AgentGatewayStatus {
    let current_config = current
        .and_then(|s| s.config_hash.as_deref())
        .and_then(config_generation);
    let mut st = current.cloned().unwrap_or_default();
    let expected = st.sidecars.as_ref().map(|s| s.expected).unwrap_or(0);
    let connected = fleet.connected as i32;
    let healthy = fleet.healthy as i32;
    let on_current = current_config
        .and_then(|g| fleet.config_generations.get(&g).copied())
        .map_or(0, |n| n as i32);
    st.sidecars = Some(SidecarCounts::with_fleet(
        st.sidecars.as_ref(),
        connected,
        healthy,
        on_current,
    ));
    st.messages = Some(MessageStats {
        received_total: fleet.received_total as i64,
        delivered_total: fleet.delivered_total as i64,
        dropped_total: fleet.dropped_total as i64,
        dropped_oldest_total: fleet.dropped_oldest_total as i64,
        received_per_second: round1(fleet.received_per_second),
        delivered_per_second: round1(fleet.delivered_per_second),
        dropped_per_second: round1(fleet.dropped_per_second),
    });
    let (upstream_state, upstream_status, upstream_reason, upstream_message) = match fleet
        .upstream_reachable
    {
        Some(true) => (
            "Reachable",
            "True",
            "Delivering",
            "Sidecars deliver to the upstream".to_string(),
        ),
        Some(false) => {
            let (reason, why) = unreachable_reason(fleet.upstream_error.as_deref());
            (
                "Unreachable",
                "False",
                reason,
                format!(
                    "No sidecar can deliver to the upstream ({why}); messages wait in their spools"
                ),
            )
        }
        None if connected > 0 => (
            "Unknown",
            "Unknown",
            "NotTriedYet",
            "No sidecar has called the upstream yet".to_string(),
        ),
        None if expected > 0 => (
            "Unknown",
            "Unknown",
            "NoSidecarConnected",
            format!("None of the {expected} expected sidecars is connected"),
        ),
        None => (
            "Unknown",
            "Unknown",
            "AwaitingSidecars",
            "No pod is injected for this gateway yet".to_string(),
        ),
    };
    // The last error stays visible after a recovery: it says what went wrong last time.
    let last_error = fleet.upstream_error.as_deref().map(bounded);
    st.upstream = Some(UpstreamStatus {
        state: upstream_state.into(),
        last_error,
    });
    set_condition(
        &mut st.conditions,
        conditions::UPSTREAM_REACHABLE,
        upstream_status,
        upstream_reason,
        &upstream_message,
        generation,
        now,
    );

    let (status, reason, message) = if expected == 0 && connected == 0 {
        (
            "Unknown",
            "NoSidecars",
            "No pod is injected for this gateway".to_string(),
        )
    } else if connected < expected {
        (
            "False",
            "SidecarsMissing",
            format!("{connected} of {expected} expected sidecars are connected"),
        )
    } else if healthy < connected {
        (
            "False",
            "SidecarsUnhealthy",
            format!(
                "{} of {connected} connected sidecars are unhealthy",
                connected - healthy
            ),
        )
    } else if fleet.backlogged > 0 {
        ("False", "Backlogged", backlogged_message(fleet, connected))
    } else {
        (
            "True",
            "AllHealthy",
            format!(
                "{healthy} sidecars connected and healthy{}",
                config_note(fleet, current_config)
            ),
        )
    };
    set_condition(
        &mut st.conditions,
        conditions::SIDECARS_HEALTHY,
        status,
        reason,
        &message,
        generation,
        now,
    );

    st.unhealthy_sidecars = fleet
        .unhealthy
        .iter()
        .map(|u| UnhealthySidecar {
            pod: u.pod.clone(),
            reason: u.reason.to_string(),
            since: unix_time(u.since_unix),
        })
        .collect();
    if let Some(unix) = fleet.last_heartbeat_unix {
        st.last_heartbeat_time = Some(unix_time(unix));
    }
    // Zero until a sidecar reports one (the writer adds to it), so `kubectl get` shows 0.
    st.left_behind.get_or_insert_with(LeftBehindStats::default);
    st
}

/// Whether `desired` shows anything in this writer's fields that `current` does not (ignoring a
/// merely newer heartbeat time unless the stored one is stale).
pub fn needs_write(current: Option<&AgentGatewayStatus>, desired: &AgentGatewayStatus) -> bool {
    let Some(current) = current else { return true };
    let stale_heartbeat = match (&current.last_heartbeat_time, &desired.last_heartbeat_time) {
        (None, Some(_)) => true,
        (Some(old), Some(new)) => new.0.as_second() - old.0.as_second() > HEARTBEAT_TIME_REFRESH,
        _ => false,
    };
    let mut without_time = desired.clone();
    without_time.last_heartbeat_time = current.last_heartbeat_time.clone();
    stale_heartbeat || status::hub_part(&without_time) != status::hub_part(current)
}

/// What `SidecarsHealthy` says of backlogged sidecars: how many, which pods (at most
/// [`super::index::MAX_UNHEALTHY`]), how fast their spools grow and which knobs to turn.
fn backlogged_message(fleet: &FleetHealth, connected: i32) -> String {
    let mut pods = fleet.backlogged_pods.join(", ");
    let unnamed = (fleet.backlogged as usize).saturating_sub(fleet.backlogged_pods.len());
    if unnamed > 0 {
        pods.push_str(&format!(" and {unnamed} more"));
    }
    format!(
        "{} of {connected} sidecars are backlogged: delivery is slower than ingest and their spools \
         grew by {} messages/s over the backlog window ({pods}); raise spec.delivery.maxInFlight or \
         spec.batching.batchSize/maxBatchSize, lower spec.batching.minBatchInterval, or fix a slow \
         platform",
        fleet.backlogged,
        round1(fleet.backlog_growth_per_second),
    )
}

/// The config generation sidecars report for a `status.configHash` (its crc32, hex).
pub fn config_generation(config_hash: &str) -> Option<i64> {
    u32::from_str_radix(config_hash, 16).ok().map(i64::from)
}

/// "; 2 of 3 on the current configuration" when sidecars run mixed configurations.
fn config_note(fleet: &FleetHealth, current: Option<i64>) -> String {
    let Some(current) = current else {
        return String::new();
    };
    let on_current = fleet.config_generations.get(&current).copied().unwrap_or(0);
    let reporting: u32 = fleet.config_generations.values().sum();
    if reporting == 0 {
        String::new()
    } else {
        format!("; {on_current} of {reporting} on the current configuration")
    }
}

/// The `UpstreamReachable` reason and a short explanation, from a sidecar's last upstream
/// error: the agent starts it with `unauthorized:` for 401/403 (its spool is held until the
/// API key works) and `redirected:` for a 3xx (never followed).
fn unreachable_reason(last_error: Option<&str>) -> (&'static str, &'static str) {
    match last_error {
        Some(e) if e.starts_with("unauthorized:") => (
            "Unauthorized",
            "the platform refuses the API key: check the API key Secret",
        ),
        Some(e) if e.starts_with("redirected:") => (
            "Redirected",
            "the platform answers with a redirect, which is not followed: check the upstream URL",
        ),
        _ => ("DeliveryFailing", "delivery fails"),
    }
}

/// A Warning event for the gateway when its `UpstreamReachable` condition has just turned to
/// a reason that needs a person (a refused API key, a redirect): delivery holds the spool and
/// retries, so nothing else would tell anyone until apps get `queue full`. `None` when the
/// reason did not change or needs no one.
fn upstream_warning(
    before: Option<&AgentGatewayStatus>,
    after: &AgentGatewayStatus,
) -> Option<(String, String)> {
    let reason = |st: &AgentGatewayStatus| {
        st.conditions
            .iter()
            .find(|c| c.type_ == conditions::UPSTREAM_REACHABLE && c.status == "False")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let (now, message) = reason(after)?;
    if !matches!(now.as_str(), "Unauthorized" | "Redirected") {
        return None;
    }
    let was = before.and_then(reason).map(|(r, _)| r);
    (was.as_deref() != Some(now.as_str())).then_some((now, message))
}

/// At most 256 characters of an error for the status.
fn bounded(e: &str) -> String {
    e.chars().take(256).collect()
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn unix_time(seconds: i64) -> Time {
    Time(Timestamp::from_second(seconds).unwrap_or_else(|_| Timestamp::now()))
}

/// Writes fleet health into every gateway's status every `interval` until `shutdown`.
/// `writes` counts status patches (the load benchmark reads it).
/// Only the leader writes (`leader` is the operator's leader gauge, 1 while leading): agents
/// connect to the leader, so another replica's empty index must not zero the counts. For the
/// same reason an operator restricted to `scope` (`--namespace`) writes only there: another
/// operator's gateways are not its to count. A gateway is judged with the operator's image
/// policy (`images`), as the reconciler and the webhook judge it: one they refuse gets no
/// configuration pushed to its sidecars either.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    scope: Option<String>,
    images: SidecarImages,
    hub: Arc<Hub>,
    interval: Duration,
    writes: IntCounter,
    leader: IntGauge,
    mut shutdown: Shutdown,
) {
    let gateways: Api<AgentGateway> = match &scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: crate::FIELD_MANAGER.into(),
            instance: None,
        },
    );
    // Stops with this writer (the guard is dropped when it returns).
    let (store, _watch) = crate::watch::store(
        gateways,
        watcher::Config::default().any_semantic(),
        "status writer: gateways",
    );
    let mut ticker = tokio::time::interval(interval);
    let (mut reloads, mut orphans_warned) = (Reloads::default(), HashSet::new());
    // Per gateway, its resourceVersion and fleet at the last pass that found nothing to write.
    let mut unchanged: HashMap<(String, String), (Option<String>, FleetHealth)> = HashMap::new();
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait() => return,
        }
        // Before the first list an empty store would look like every gateway deleted
        // (orphan events, sessions ended, ledgers forgotten).
        if leader.get() != 1 || store.wait_until_ready().now_or_never().is_none() {
            continue;
        }
        let gateways_now = store.state();
        let now_instant = Instant::now();
        let now = Time(
            Timestamp::from_second(Timestamp::now().as_second())
                .unwrap_or_else(|_| Timestamp::now()),
        );
        let keys: HashSet<(String, String)> = gateways_now
            .iter()
            .map(|g| (g.namespace().unwrap_or_default(), g.name_any()))
            .collect();
        let exists = |ns: &str, name: &str| keys.contains(&(ns.to_string(), name.to_string()));
        warn_orphans(&hub, exists, &recorder, &mut orphans_warned).await;
        hub.left_behind.forget_deleted(exists);
        unchanged.retain(|(ns, name), _| exists(ns, name));
        let mut pending = Vec::new();
        for shared in &gateways_now {
            let gateway = &**shared;
            let (Some(namespace), name) = (gateway.namespace(), gateway.name_any()) else {
                continue;
            };
            let valid = ValidatedGateway::checked(gateway, &images).ok();
            // An invalid spec leaves its sidecars on their last valid configuration; its
            // heartbeat interval is still the best guess of theirs.
            let heartbeat = valid.as_ref().map_or_else(
                || {
                    parse_duration(&gateway.spec.heartbeat_interval)
                        .unwrap_or(Duration::from_secs(5))
                },
                |v| v.heartbeat_interval,
            );
            let fleet = hub.index.fleet(
                &namespace,
                &name,
                now_instant,
                heartbeat * SILENT_HEARTBEATS,
            );
            if let Some(valid) = &valid {
                push_config(&hub, valid, &namespace, &name, &mut reloads);
            }
            left_behind::announce(&recorder, &hub.left_behind, gateway).await;
            let left = hub.left_behind.unwritten(&namespace, &name);
            let key = (namespace.clone(), name.clone());
            let version = gateway.metadata.resource_version.clone();
            if left.is_empty()
                && unchanged
                    .get(&key)
                    .is_some_and(|(v, f)| *v == version && *f == fleet)
            {
                continue;
            }
            let mut desired = fleet_status(
                gateway.status.as_ref(),
                &fleet,
                gateway.metadata.generation,
                &now,
            );
            left_behind::add_to_status(&mut desired, &left);
            if !needs_write(gateway.status.as_ref(), &desired) {
                unchanged.insert(key, (version, fleet));
                continue;
            }
            unchanged.remove(&key);
            pending.push(Write {
                gateway: shared.clone(),
                namespace,
                name,
                desired,
                left,
                connected: fleet.connected,
                healthy: fleet.healthy,
            });
        }
        // The pass's writes go out together, a few at a time: one at a time, a pass over 100
        // gateways took longer than the interval on a loaded apiserver.
        let mut results = futures::stream::iter(pending)
            .map(|write| {
                let api: Api<AgentGateway> = Api::namespaced(client.clone(), &write.namespace);
                async move {
                    let result = status::apply(
                        &api,
                        &write.name,
                        status::HUB_MANAGER,
                        status::hub_part(&write.desired),
                        write.gateway.metadata.resource_version.as_deref(),
                    )
                    .await;
                    (write, result)
                }
            })
            .buffer_unordered(WRITES_IN_FLIGHT);
        while let Some((write, result)) = results.next().await {
            let Write {
                gateway,
                namespace,
                name,
                desired,
                left,
                connected,
                healthy,
            } = write;
            match result {
                Ok(()) => {
                    writes.inc();
                    if let Some((reason, note)) =
                        upstream_warning(gateway.status.as_ref(), &desired)
                    {
                        let event = crate::events::event(
                            kube::runtime::events::EventType::Warning,
                            format!("Upstream{reason}"),
                            "Deliver",
                            note,
                        );
                        if let Err(error) = recorder.publish(&event, &gateway.object_ref(&())).await
                        {
                            warn!(%error, %namespace, %name, "publishing the upstream event failed");
                        }
                    }
                    hub.left_behind.written(&namespace, &name, &left);
                    debug!(%namespace, %name, connected, healthy, "fleet status written");
                }
                // Changed since read (the reconciler wrote): a later pass writes from the
                // newer object the watch brings.
                Err(error) if status::is_conflict(&error) => {
                    debug!(%namespace, %name, "status changed since read; writing next pass");
                }
                Err(error) => warn!(%error, %namespace, %name, "status writer: patch failed"),
            }
        }
    }
}

/// Status patches of one pass in flight at once.
const WRITES_IN_FLIGHT: usize = 8;

/// One gateway's status patch, decided in a pass.
struct Write {
    gateway: Arc<AgentGateway>,
    namespace: String,
    name: String,
    desired: AgentGatewayStatus,
    left: left_behind::Unwritten,
    connected: u32,
    healthy: u32,
}

/// When each agent was last sent a `reload`, so a slow agent is not flooded.
#[derive(Default)]
struct Reloads(std::collections::HashMap<String, Instant>);

/// Sidecars of a gateway that no longer exists keep serving their apps with the configuration
/// they have (the kubelet keeps a deleted ConfigMap's files in the pod) until their pods are
/// replaced: stopping them would break apps that still write to the socket, and the gateway
/// may be re-created (its sidecars reconnect and are reloaded). Each such pod gets one Warning
/// event saying so, and its control session is ended; `warned` holds the agents told,
/// forgotten once they are gone or their gateway is back.
async fn warn_orphans(
    hub: &Arc<Hub>,
    exists: impl Fn(&str, &str) -> bool,
    recorder: &kube::runtime::events::Recorder,
    warned: &mut HashSet<String>,
) {
    let mut orphans = Vec::new();
    for (namespace, name) in hub.index.gateways() {
        if !exists(&namespace, &name) {
            orphans.extend(hub.index.identities(&namespace, &name));
        }
    }
    warned.retain(|agent| orphans.iter().any(|o| &o.agent_id == agent));
    for orphan in orphans {
        if warned.contains(&orphan.agent_id) {
            continue;
        }
        let AgentIdentity {
            agent_id,
            namespace,
            pod,
            gateway,
        } = &orphan;
        warn!(%namespace, %pod, %gateway, "gateway deleted; its sidecar keeps serving until the pod is replaced");
        let note = format!(
            "AgentGateway {namespace}/{gateway} was deleted: this pod's nano-agent keeps serving \
             its apps with its last configuration until the pod is replaced. Re-create the \
             gateway to manage it again, or remove the {INJECT_ANNOTATION} annotation from the \
             pod template and roll the workload out to remove the sidecar."
        );
        let event = crate::events::event(
            kube::runtime::events::EventType::Warning,
            "GatewayDeleted",
            "Orphan",
            note,
        );
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(namespace.clone()),
            name: Some(pod.clone()),
            uid: Some(agent_id.clone()),
            ..ObjectReference::default()
        };
        match recorder.publish(&event, &reference).await {
            Ok(()) => {
                warned.insert(agent_id.clone());
            }
            // The namespace is being deleted (403) or gone (404): no later pass can say it
            // either, and trying every pass would only repeat this warning.
            Err(kube::Error::Api(response)) if matches!(response.code, 403 | 404) => {
                debug!(%namespace, %pod, reason = %response.reason, "no GatewayDeleted event: the pod's namespace is going");
                warned.insert(agent_id.clone());
            }
            Err(error) => {
                warn!(%error, %namespace, %pod, "publishing the GatewayDeleted event failed")
            }
        }
        // Its session ends too: there is no gateway to report to; its reconnects are refused
        // (with backoff) until the gateway is back.
        hub.send_away(agent_id, "gateway deleted");
    }
}

/// Agents still reporting an older configuration than the gateway's get a `reload` with the
/// current configuration file (the same bytes the ConfigMap holds), at most every 30 s each.
fn push_config(
    hub: &Arc<Hub>,
    gateway: &ValidatedGateway,
    namespace: &str,
    name: &str,
    reloads: &mut Reloads,
) {
    const COOLDOWN: Duration = Duration::from_secs(30);
    let config = &gateway.sidecar_config;
    let Some(generation) = config_generation(&gateway.config_hash) else {
        return;
    };
    let now = Instant::now();
    for agent in hub.index.stale_agents(namespace, name, generation) {
        if reloads
            .0
            .get(&agent)
            .is_some_and(|at| now.duration_since(*at) < COOLDOWN)
        {
            continue;
        }
        reloads.0.insert(agent.clone(), now);
        let (hub, file) = (hub.clone(), config.to_file());
        tokio::spawn(async move {
            let kwargs = vec![("config".to_string(), rmpv::Value::from(file))];
            match hub
                .request(&agent, "reload", kwargs, Duration::from_secs(10))
                .await
            {
                Ok(_) => debug!(%agent, generation, "sidecar reloaded"),
                Err(error) => warn!(%agent, %error, "sidecar reload failed"),
            }
        });
    }
    reloads
        .0
        .retain(|_, at| now.duration_since(*at) < COOLDOWN * 4);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::index::UnhealthyAgent;

    fn time(s: i64) -> Time {
        unix_time(s)
    }

    fn fleet(connected: u32, healthy: u32) -> FleetHealth {
        FleetHealth {
            connected,
            healthy,
            received_total: 100,
            delivered_total: 90,
            dropped_total: 3,
            dropped_oldest_total: 0,
            received_per_second: 12.345,
            delivered_per_second: 11.0,
            dropped_per_second: 0.5,
            last_heartbeat_unix: Some(1_000),
            upstream_reachable: Some(true),
            upstream_error: None,
            unhealthy: Vec::new(),
            config_generations: Default::default(),
            backlogged: 0,
            backlogged_pods: Vec::new(),
            backlog_growth_per_second: 0.0,
        }
    }

    fn sidecars_healthy(st: &AgentGatewayStatus) -> (String, String, String) {
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::SIDECARS_HEALTHY)
            .unwrap();
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn backlogged_sidecars_are_named_with_the_knobs_to_raise_and_cleared_when_drained() {
        let mut f = fleet(3, 3);
        f.backlogged = 2;
        f.backlogged_pods = vec!["app-1".into(), "app-2".into()];
        f.backlog_growth_per_second = 41.27;
        let stored = fleet_status(Some(&with_expected(3)), &f, Some(1), &time(1_000));
        let (status, reason, message) = sidecars_healthy(&stored);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Backlogged"));
        for want in [
            "2 of 3 sidecars are backlogged",
            "41.3 messages/s",
            "(app-1, app-2)",
            "spec.delivery.maxInFlight",
            "spec.batching.batchSize/maxBatchSize",
            "spec.batching.minBatchInterval",
            "slow platform",
        ] {
            assert!(message.contains(want), "{want:?} not in {message:?}");
        }
        // The counts still say they are healthy (connected, heartbeating, delivering).
        assert_eq!(stored.sidecars, Some(SidecarCounts::new(3, 3, 3)));
        // More than the list holds: counted, not named.
        f.backlogged = 14;
        let st = fleet_status(Some(&with_expected(3)), &f, Some(1), &time(1_000));
        assert!(
            sidecars_healthy(&st)
                .2
                .contains("(app-1, app-2 and 12 more)")
        );
        // Drained: the condition clears, and that is a write.
        let healed = fleet_status(Some(&stored), &fleet(3, 3), Some(1), &time(1_010));
        assert_eq!(sidecars_healthy(&healed).1, "AllHealthy");
        assert!(needs_write(Some(&stored), &healed));
    }

    /// A missing or unhealthy sidecar is worse than a slow one: those reasons win.
    #[test]
    fn missing_and_unhealthy_sidecars_take_precedence_over_a_backlog() {
        let mut f = one_degraded();
        f.backlogged = 1;
        f.backlogged_pods = vec!["p1".into()];
        let st = fleet_status(Some(&with_expected(3)), &f, Some(1), &time(1_000));
        assert_eq!(sidecars_healthy(&st).1, "SidecarsMissing");
        let st = fleet_status(Some(&with_expected(1)), &f, Some(1), &time(1_000));
        assert_eq!(sidecars_healthy(&st).1, "SidecarsUnhealthy");
        let mut f = fleet(2, 2);
        f.backlogged = 1;
        f.backlogged_pods = vec!["p2".into()];
        let st = fleet_status(Some(&with_expected(2)), &f, Some(1), &time(1_000));
        assert_eq!(sidecars_healthy(&st).1, "Backlogged");
    }

    fn with_expected(expected: i32) -> AgentGatewayStatus {
        AgentGatewayStatus {
            sidecars: Some(SidecarCounts::new(expected, 0, 0)),
            ..Default::default()
        }
    }

    #[test]
    fn messages_dropped_from_a_full_spool_count_as_dropped_and_on_their_own() {
        let mut f = fleet(2, 2);
        // As the index sums them: `Heartbeat::dropped_total` includes the dropped-oldest.
        f.dropped_oldest_total = 5;
        f.dropped_total += 5;
        let st = fleet_status(Some(&with_expected(2)), &f, Some(1), &time(1_000));
        let messages = st.messages.unwrap();
        assert_eq!(
            (messages.dropped_total, messages.dropped_oldest_total),
            (8, 5)
        );
    }

    #[test]
    fn healthy_fleet_reads_true_with_totals() {
        let st = fleet_status(Some(&with_expected(2)), &fleet(2, 2), Some(1), &time(1_000));
        assert_eq!(st.sidecars, Some(SidecarCounts::new(2, 2, 2)));
        let messages = st.messages.clone().unwrap();
        assert_eq!(
            (
                messages.received_total,
                messages.dropped_total,
                messages.received_per_second
            ),
            (100, 3, 12.3)
        );
        let cond = |t: &str| {
            st.conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| (c.status.clone(), c.reason.clone()))
                .unwrap()
        };
        assert_eq!(
            cond(conditions::SIDECARS_HEALTHY),
            ("True".into(), "AllHealthy".into())
        );
        assert_eq!(
            cond(conditions::UPSTREAM_REACHABLE),
            ("True".into(), "Delivering".into())
        );
        assert_eq!(st.upstream.unwrap().state, "Reachable");
    }

    /// One connected sidecar, degraded: pod `p1` since 997.
    fn one_degraded() -> FleetHealth {
        let mut f = fleet(1, 0);
        f.unhealthy = vec![UnhealthyAgent {
            pod: "p1".into(),
            reason: "Degraded",
            for_duration: Duration::from_secs(3),
            since_unix: 997,
        }];
        f
    }

    #[test]
    fn missing_and_unhealthy_sidecars_are_named() {
        let f = one_degraded();
        let st = fleet_status(Some(&with_expected(3)), &f, Some(1), &time(1_000));
        let healthy = st
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::SIDECARS_HEALTHY)
            .unwrap();
        assert_eq!(
            (healthy.status.as_str(), healthy.reason.as_str()),
            ("False", "SidecarsMissing")
        );
        assert_eq!(healthy.message, "1 of 3 expected sidecars are connected");
        assert_eq!(
            st.unhealthy_sidecars,
            vec![UnhealthySidecar {
                pod: "p1".into(),
                reason: "Degraded".into(),
                since: time(997)
            }]
        );
    }

    #[test]
    fn second_pass_with_the_same_fleet_writes_nothing() {
        let first = fleet_status(Some(&with_expected(2)), &fleet(2, 2), Some(1), &time(1_000));
        assert!(needs_write(Some(&with_expected(2)), &first));
        // Same fleet later, only the heartbeat time moved: no write, transition times unchanged.
        let mut later_fleet = fleet(2, 2);
        later_fleet.last_heartbeat_unix = Some(1_030);
        let second = fleet_status(Some(&first), &later_fleet, Some(1), &time(1_030));
        assert!(!needs_write(Some(&first), &second));
        // …until the stored heartbeat time is more than a minute old.
        later_fleet.last_heartbeat_unix = Some(1_100);
        let third = fleet_status(Some(&first), &later_fleet, Some(1), &time(1_100));
        assert!(needs_write(Some(&first), &third));
        assert_eq!(
            third.conditions, first.conditions,
            "lastTransitionTime changes only on a transition"
        );
    }

    #[test]
    fn a_stale_unhealthy_list_is_cleared_once() {
        let stored = fleet_status(
            Some(&with_expected(1)),
            &one_degraded(),
            Some(1),
            &time(1_000),
        );
        let healed = fleet_status(Some(&stored), &fleet(1, 1), Some(1), &time(1_005));
        assert!(needs_write(Some(&stored), &healed));
        // The apply carries an empty list, which clears the stored one…
        assert_eq!(
            crate::status::hub_part(&healed)["unhealthySidecars"],
            serde_json::json!([])
        );
        // …after which nothing is written again.
        let next = fleet_status(Some(&healed), &fleet(1, 1), Some(1), &time(1_010));
        assert!(!needs_write(Some(&healed), &next));
    }

    #[test]
    fn changed_counts_write() {
        let first = fleet_status(Some(&with_expected(2)), &fleet(2, 2), Some(1), &time(1_000));
        let second = fleet_status(Some(&first), &fleet(1, 1), Some(1), &time(1_005));
        assert!(needs_write(Some(&first), &second));
    }

    fn upstream(st: &AgentGatewayStatus) -> (String, String, Option<String>) {
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::UPSTREAM_REACHABLE)
            .unwrap();
        (
            c.status.clone(),
            c.reason.clone(),
            st.upstream.as_ref().and_then(|u| u.last_error.clone()),
        )
    }

    #[test]
    fn unreachable_reason_follows_the_sidecars_last_error() {
        let unreachable = |error: Option<&str>| {
            let mut f = fleet(2, 0);
            f.upstream_reachable = Some(false);
            f.upstream_error = error.map(str::to_string);
            fleet_status(Some(&with_expected(2)), &f, Some(1), &time(1_000))
        };
        let e401 = "unauthorized: HTTP 401 from messages; check the API key Secret (TENDRL_KEY / --api-key)";
        let st = unreachable(Some(e401));
        assert_eq!(
            upstream(&st),
            ("False".into(), "Unauthorized".into(), Some(e401.into()))
        );
        let cond = st
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::UPSTREAM_REACHABLE)
            .unwrap();
        assert!(cond.message.contains("API key Secret"), "{}", cond.message);
        let e302 = "redirected: HTTP 302 from messages to /ok; redirects are not followed";
        assert_eq!(
            upstream(&unreachable(Some(e302))).1,
            "Redirected".to_string()
        );
        assert_eq!(
            upstream(&unreachable(Some("HTTP 503 from messages"))).1,
            "DeliveryFailing".to_string()
        );
        assert_eq!(
            upstream(&unreachable(None)).1,
            "DeliveryFailing".to_string()
        );
        // A Warning event when the reason turns to one that needs a person, once.
        let refused = unreachable(Some(e401));
        let warning = upstream_warning(Some(&with_expected(2)), &refused);
        assert_eq!(warning.as_ref().map(|w| w.0.as_str()), Some("Unauthorized"));
        assert!(warning.is_some_and(|w| w.1.contains("API key Secret")));
        assert_eq!(upstream_warning(Some(&refused), &refused), None);
        let failing = unreachable(Some("HTTP 503 from messages"));
        assert_eq!(upstream_warning(Some(&with_expected(2)), &failing), None);
        assert_eq!(
            upstream_warning(Some(&refused), &unreachable(Some(e302))).map(|w| w.0),
            Some("Redirected".into())
        );
        // A long error is bounded; a reachable fleet still shows the last one.
        let long = format!("unauthorized: {}", "x".repeat(1000));
        assert_eq!(
            upstream(&unreachable(Some(&long)))
                .2
                .map(|e| e.chars().count()),
            Some(256)
        );
        let mut f = fleet(2, 2);
        f.upstream_error = Some(e401.into());
        let st = fleet_status(Some(&with_expected(2)), &f, Some(1), &time(1_000));
        assert_eq!(
            upstream(&st),
            ("True".into(), "Delivering".into(), Some(e401.into()))
        );
    }

    /// Unknown says why: nothing tried yet, every sidecar gone, or no pod injected.
    #[test]
    fn an_unknown_upstream_names_its_cause() {
        let unknown = |connected: u32, expected: i32| {
            let mut f = fleet(connected, connected);
            f.upstream_reachable = None;
            f.upstream_error = None;
            let st = fleet_status(Some(&with_expected(expected)), &f, Some(1), &time(1_000));
            let (status, reason, _) = upstream(&st);
            assert_eq!(status, "Unknown");
            assert_eq!(
                st.upstream.as_ref().map(|u| u.state.as_str()),
                Some("Unknown")
            );
            reason
        };
        assert_eq!(unknown(1, 1), "NotTriedYet");
        assert_eq!(unknown(0, 2), "NoSidecarConnected");
        assert_eq!(unknown(0, 0), "AwaitingSidecars");
    }
}
