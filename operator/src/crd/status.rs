//! The `AgentGateway` status: what the reconciler and the hub observe and write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types.
pub mod conditions {
    /// Configuration valid and derived sidecar configuration applied.
    pub const READY: &str = "Ready";
    /// Spec passed validation and every referenced Secret exists with its key.
    pub const CONFIG_VALID: &str = "ConfigValid";
    /// Sidecars report the upstream reachable (written by the hub).
    pub const UPSTREAM_REACHABLE: &str = "UpstreamReachable";
    /// All expected sidecars are connected and healthy (written by the hub).
    pub const SIDECARS_HEALTHY: &str = "SidecarsHealthy";
    /// Sidecars verify the upstream's TLS certificate: `False` (reason `InsecureSkipVerify`)
    /// while `spec.upstream.tls.insecureSkipVerify` is set. Written only for gateways that
    /// have skipped verification (`True` once they stop).
    pub const UPSTREAM_TLS_VERIFIED: &str = "UpstreamTLSVerified";
}

/// Observed state of an AgentGateway.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentGatewayStatus {
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `ConfigValid`, `UpstreamReachable`, `SidecarsHealthy`, and
    /// `UpstreamTLSVerified` for gateways that skip certificate verification. A list map keyed
    /// on `type`: the reconciler and the hub each own the conditions they write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Content hash of the derived sidecar configuration currently applied; injected pods and
    /// sidecars report it so stale configurations can be found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Sidecar counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<SidecarCounts>,
    /// Message totals and rates over all sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<MessageStats>,
    /// Upstream state as reported by the sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamStatus>,
    /// Time of the most recent heartbeat from any sidecar (coarse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Up to 10 sidecars that are not healthy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub unhealthy_sidecars: Vec<UnhealthySidecar>,
    /// Messages sidecars still held undelivered when they shut down, over the gateway's life
    /// (kept when the pods are gone; written by the hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_behind: Option<LeftBehindStats>,
}

/// Sidecar counts. The reconciler writes `expected` and `notInjected`, the hub the others, so
/// none is required.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarCounts {
    /// Pods injected (or opted in) for this gateway that are not being deleted.
    #[serde(default)]
    pub expected: i32,
    /// Of `expected`, pods that opted in but run without a sidecar: they were admitted while
    /// the webhook was unreachable (`failurePolicy: Ignore`). Restart their workloads, or set
    /// the annotation `nanogate.io/repair: rollout` on the gateway to have the operator do it.
    #[serde(default)]
    pub not_injected: i32,
    /// Of `expected`, injected pods whose sidecar is not what the operator injects now: another
    /// image (after an operator upgrade or a changed sidecar image), or pod settings of the
    /// gateway changed since (spec.sidecar resources, logLevel, adminPort, nativeSidecar;
    /// spec.socket; Secrets; spec.tcpListener). Restart their workloads, or set
    /// `nanogate.io/repair: rollout` on the gateway to have the operator do it.
    #[serde(default)]
    pub outdated: i32,
    /// Sidecars holding a control-channel connection.
    #[serde(default)]
    pub connected: i32,
    /// Connected sidecars reporting `ready`.
    #[serde(default)]
    pub healthy: i32,
    /// Connected sidecars running the gateway's current configuration (`status.configHash`).
    #[serde(default)]
    pub current_config: i32,
    /// `connected/expected`, for `kubectl get`.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub summary: String,
}

/// Leaves a field's default out of the schema: the API server refuses the empty string as a
/// default, and the writers always write the field.
fn no_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

impl SidecarCounts {
    /// Counts with a consistent summary.
    pub fn new(expected: i32, connected: i32, healthy: i32) -> Self {
        Self {
            expected,
            not_injected: 0,
            outdated: 0,
            connected,
            healthy,
            current_config: 0,
            summary: format!("{connected}/{expected}"),
        }
    }

    /// The reconciler's view (`expected`, `notInjected`, `outdated`) over the hub's fields of
    /// `current`.
    pub fn with_pods(
        current: Option<&Self>,
        expected: i32,
        not_injected: i32,
        outdated: i32,
    ) -> Self {
        let mut counts = current.cloned().unwrap_or_default();
        counts.expected = expected;
        counts.not_injected = not_injected;
        counts.outdated = outdated;
        counts.summary = format!("{}/{expected}", counts.connected);
        counts
    }

    /// The hub's view (connections, health, configuration) over the reconciler's fields.
    pub fn with_fleet(
        current: Option<&Self>,
        connected: i32,
        healthy: i32,
        current_config: i32,
    ) -> Self {
        let mut counts = current.cloned().unwrap_or_default();
        counts.connected = connected;
        counts.healthy = healthy;
        counts.current_config = current_config;
        counts.summary = format!("{connected}/{}", counts.expected);
        counts
    }
}

/// Message totals and rates.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageStats {
    /// Messages accepted from applications.
    pub received_total: i64,
    /// Messages acknowledged by the upstream.
    pub delivered_total: i64,
    /// Messages rejected, dead-lettered, or dropped to make room in a full spool.
    pub dropped_total: i64,
    /// Of `droppedTotal`, messages dropped undelivered to make room in a full spool
    /// (`spec.delivery.overflowPolicy: dropOldest`).
    #[serde(default)]
    pub dropped_oldest_total: i64,
    /// Messages received per second, averaged over the sidecars' heartbeats of the last 60 s.
    pub received_per_second: f64,
    /// Messages delivered per second, averaged over the last 60 s.
    pub delivered_per_second: f64,
    /// Messages rejected, dead-lettered or dropped per second, averaged over the last 60 s.
    #[serde(default)]
    pub dropped_per_second: f64,
}

/// Messages sidecars left undelivered at their shutdown deadline (each sidecar reports it to
/// the hub as it stops). They stay in the pod's spool volume and are lost unless it survives:
/// the injected `emptyDir` survives a container restart (and the next start delivers them, so
/// they may be counted again if that start is cut short too), not a pod deletion.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeftBehindStats {
    /// Messages left undelivered.
    pub messages_total: i64,
    /// Their bytes in the spools.
    pub bytes_total: i64,
    /// Sidecar shutdowns that left messages behind.
    pub shutdowns_total: i64,
    /// Pod of the most recent such shutdown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pod: Option<String>,
    /// When the hub heard of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_time: Option<Time>,
}

/// Upstream state.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    /// `Reachable` (a sidecar's last call to the platform succeeded), `Unreachable` (every
    /// sidecar's last call failed) or `Unknown` (no call has ended yet, or no sidecar is
    /// connected; the `UpstreamReachable` condition's reason says which).
    pub state: String,
    /// The last error a sidecar met calling the platform, kept after a recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A sidecar that is not healthy.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnhealthySidecar {
    /// Pod name.
    pub pod: String,
    /// Why it is unhealthy.
    pub reason: String,
    /// Since when.
    pub since: Time,
}
