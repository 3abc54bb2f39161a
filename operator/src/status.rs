//! Who writes which field of an AgentGateway's status, and how it is written.
//!
//! Two writers share the status, each with its own field manager and server-side apply (each
//! apply carries only the fields its writer owns, with `force`, so neither can put back the
//! other's fields):
//!
//! - the reconciler ([`OPERATOR_MANAGER`]): `observedGeneration`, `configHash`,
//!   `sidecars.expected`, `sidecars.notInjected`, `sidecars.outdated` and the conditions `Ready`, `ConfigValid` and
//!   `UpstreamTLSVerified`;
//! - the hub's status writer ([`HUB_MANAGER`]): the conditions `UpstreamReachable` and
//!   `SidecarsHealthy`, the other `sidecars` counts and `summary`, `messages`, `upstream`,
//!   `lastHeartbeatTime`, `unhealthySidecars` and `leftBehind`.
//!
//! Conditions are the exception: each writer computes its own and applies the whole list (the
//! other's as it read them). `status.conditions` is a list map keyed on `type` in the CRD
//! schema, but the 1.20 apiserver treats it as one atomic list owned by its last writer (seen
//! in e2e: the hub's apply removed the reconciler's `Ready`), so a list without the other's
//! conditions would delete them. Both writers apply with the `resourceVersion` they read, so
//! neither puts back a stale condition; a refused write is retried. A writer that stops
//! applying a field it owns removes it: the hub always applies `unhealthySidecars` (an empty
//! list clears it).
//!
//! Until the hub has written a gateway's status once, the reconciler also writes the hub's
//! fields as it shows them (initial values such as `UpstreamReachable=Unknown` and a zero
//! `leftBehind`, kept as read afterwards), so a new gateway shows them at once; the hub's first
//! forced apply takes them over. Those writes are conditional on the `resourceVersion` read
//! (the reconciler retries a refused one as any failed reconcile), so the reconciler never puts
//! back a value the hub wrote in between — `leftBehind` is a running total the hub adds to.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde_json::{Map, Value, json};

use crate::crd::{AgentGateway, AgentGatewayStatus};

/// Field manager of the reconciler's writes (status and the objects it applies).
pub const OPERATOR_MANAGER: &str = crate::names::FIELD_MANAGER;
/// Field manager of the hub's status writer.
pub const HUB_MANAGER: &str = crate::names::HUB_FIELD_MANAGER;

/// `status.sidecars` fields the reconciler owns (it counts pods).
const OPERATOR_SIDECAR_FIELDS: [&str; 3] = ["expected", "notInjected", "outdated"];
/// `status.sidecars` fields the hub owns (it counts connections).
const HUB_SIDECAR_FIELDS: [&str; 4] = ["connected", "healthy", "currentConfig", "summary"];
/// Top-level status fields the hub owns that the reconciler initialises.
const HUB_INITIALISED_FIELDS: [&str; 3] = ["messages", "upstream", "leftBehind"];
/// Top-level status fields only the hub writes (besides conditions and `sidecars`).
const HUB_FIELDS: [&str; 5] = [
    "messages",
    "upstream",
    "lastHeartbeatTime",
    "unhealthySidecars",
    "leftBehind",
];

/// Whether the hub has written this gateway's status (it then owns its fields).
pub fn hub_has_written(meta: &ObjectMeta) -> bool {
    meta.managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some(HUB_MANAGER))
}

/// The part of `status` the reconciler applies; with `hub_has_written: false` it includes the
/// hub's fields as `status` shows them (apply it conditionally then, see the module comment).
pub fn operator_part(status: &AgentGatewayStatus, hub_has_written: bool) -> Value {
    let full = to_map(status);
    let mut part = Map::new();
    copy(&full, &mut part, &["observedGeneration", "configHash"]);
    let mut sidecar_fields = OPERATOR_SIDECAR_FIELDS.to_vec();
    if !hub_has_written {
        sidecar_fields.extend(HUB_SIDECAR_FIELDS);
        copy(&full, &mut part, &HUB_INITIALISED_FIELDS);
    }
    conditions_and_counts(status, &full, &sidecar_fields, &mut part);
    Value::Object(part)
}

/// The part of `status` the hub applies. `unhealthySidecars` is always there (an empty list
/// clears a stale one).
pub fn hub_part(status: &AgentGatewayStatus) -> Value {
    let full = to_map(status);
    let mut part = Map::new();
    copy(&full, &mut part, &HUB_FIELDS);
    part.insert(
        "unhealthySidecars".into(),
        serde_json::to_value(&status.unhealthy_sidecars).unwrap_or(Value::Array(Vec::new())),
    );
    conditions_and_counts(status, &full, &HUB_SIDECAR_FIELDS, &mut part);
    Value::Object(part)
}

/// Adds to `part` every condition and the `sidecars` fields named.
fn conditions_and_counts(
    status: &AgentGatewayStatus,
    full: &Map<String, Value>,
    sidecar_fields: &[&str],
    part: &mut Map<String, Value>,
) {
    // Every condition, not only `condition_types`: the owner's are fresh, the others as read
    // (each writer computes its status from the stored one). Where the apiserver treats the
    // list as atomic (1.20 publishes a CRD's status schema without list types, seen in e2e),
    // the last writer owns the whole list, and a list without the other's conditions would
    // delete them; both writers apply with the resourceVersion they read, so neither can put
    // back a stale one.
    let conditions = status
        .conditions
        .iter()
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    part.insert("conditions".into(), Value::Array(conditions));
    if let Some(Value::Object(sidecars)) = full.get("sidecars") {
        let mut owned = Map::new();
        copy(sidecars, &mut owned, sidecar_fields);
        part.insert("sidecars".into(), Value::Object(owned));
    }
}

fn to_map(status: &AgentGatewayStatus) -> Map<String, Value> {
    match serde_json::to_value(status) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

fn copy(from: &Map<String, Value>, to: &mut Map<String, Value>, keys: &[&str]) {
    for key in keys {
        if let Some(value) = from.get(*key) {
            to.insert((*key).to_string(), value.clone());
        }
    }
}

/// Applies `part` (from [`operator_part`] or [`hub_part`]) to the status of gateway `name` as
/// `manager`, forcing ownership of those fields. With `resource_version` the write is
/// conditional: it fails with a conflict if the gateway changed since it was read.
pub async fn apply(
    api: &Api<AgentGateway>,
    name: &str,
    manager: &str,
    part: Value,
    resource_version: Option<&str>,
) -> Result<(), kube::Error> {
    let mut metadata = json!({ "name": name });
    if let Some(version) = resource_version {
        metadata["resourceVersion"] = Value::from(version);
    }
    let body = json!({
        "apiVersion": AgentGateway::api_version(&()),
        "kind": AgentGateway::kind(&()),
        "metadata": metadata,
        "status": part,
    });
    api.patch_status(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(drop)
}

/// The API server refused a conditional write because the object changed since it was read.
pub fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_conflict())
}

/// Set a condition, changing `lastTransitionTime` only when the status flips.
pub fn set_condition(
    conds: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.clone();
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => conds.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: now.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{LeftBehindStats, SidecarCounts, UnhealthySidecar, conditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    fn time() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap())
    }

    /// Conditions the reconciler computes.
    const OPERATOR_CONDITIONS: [&str; 3] = [
        conditions::READY,
        conditions::CONFIG_VALID,
        conditions::UPSTREAM_TLS_VERIFIED,
    ];
    /// Conditions the hub computes.
    const HUB_CONDITIONS: [&str; 2] =
        [conditions::UPSTREAM_REACHABLE, conditions::SIDECARS_HEALTHY];
    fn status() -> AgentGatewayStatus {
        let mut st = AgentGatewayStatus {
            observed_generation: Some(3),
            config_hash: Some("abcd0123".into()),
            sidecars: Some(SidecarCounts::new(2, 1, 1)),
            left_behind: Some(LeftBehindStats::default()),
            ..Default::default()
        };
        for t in OPERATOR_CONDITIONS.iter().chain(&HUB_CONDITIONS) {
            set_condition(&mut st.conditions, t, "True", "R", "m", Some(3), &time());
        }
        st
    }

    fn types(part: &Value) -> Vec<&str> {
        part["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["type"].as_str())
            .collect()
    }

    #[test]
    fn each_writer_applies_only_its_fields() {
        let st = status();
        let op = operator_part(&st, true);
        // Every condition: its own fresh, the hub's as read (an atomic list keeps both).
        let all = vec![
            "Ready",
            "ConfigValid",
            "UpstreamTLSVerified",
            "UpstreamReachable",
            "SidecarsHealthy",
        ];
        assert_eq!(types(&op), all);
        assert_eq!(
            op["sidecars"],
            json!({"expected": 2, "notInjected": 0, "outdated": 0})
        );
        assert_eq!(op["observedGeneration"], 3);
        assert!(op.get("leftBehind").is_none() && op.get("messages").is_none());

        let hub = hub_part(&st);
        assert_eq!(types(&hub), all);
        assert_eq!(
            hub["sidecars"],
            json!({"connected": 1, "healthy": 1, "currentConfig": 0, "summary": "1/2"})
        );
        assert!(hub.get("observedGeneration").is_none() && hub.get("configHash").is_none());
        assert_eq!(hub["unhealthySidecars"], json!([]), "an empty list clears");
        assert!(hub.get("leftBehind").is_some());
    }

    #[test]
    fn the_reconciler_initialises_the_hubs_fields_until_the_hub_writes() {
        let st = status();
        let op = operator_part(&st, false);
        assert_eq!(types(&op).len(), 5);
        assert_eq!(op["sidecars"]["summary"], "1/2");
        assert!(op.get("leftBehind").is_some(), "zero until the hub writes");
        assert!(op.get("unhealthySidecars").is_none());

        let mut meta = ObjectMeta::default();
        assert!(!hub_has_written(&meta));
        meta.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(HUB_MANAGER.into()),
            ..Default::default()
        }]);
        assert!(hub_has_written(&meta));
    }

    #[test]
    fn unhealthy_sidecars_are_applied_as_a_whole() {
        let mut st = status();
        st.unhealthy_sidecars = vec![UnhealthySidecar {
            pod: "p".into(),
            reason: "Degraded".into(),
            since: time(),
        }];
        assert_eq!(hub_part(&st)["unhealthySidecars"][0]["pod"], "p");
    }
}
