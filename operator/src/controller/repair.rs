//! Pods that opted in but run without a sidecar.
//!
//! With `failurePolicy: Ignore` (the default) a pod created while the webhook is unreachable is
//! admitted as is. The reconciler counts such pods (`status.sidecars.notInjected`), says so in
//! a `PodsNotInjected` event, and — when the gateway carries `nanogate.io/repair: rollout` —
//! restarts their Deployments the way `kubectl rollout restart` does, so the new pods pass
//! through the webhook again.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use super::{Error, Result, build};
use crate::FIELD_MANAGER;
use crate::crd::{AgentGateway, GATEWAY_ANNOTATION, INJECT_ANNOTATION, INJECTED_ANNOTATION};
use crate::webhook::inject::NAMESPACE_INJECTION_LABEL;

/// Gateway annotation that opts into automatic repair; the only value is `rollout`.
pub const REPAIR_ANNOTATION: &str = "nanogate.io/repair";
/// Pod-template annotation the repair sets (the time of the restart, RFC 3339).
pub const RESTARTED_AT_ANNOTATION: &str = "nanogate.io/restartedAt";
/// A Deployment is restarted at most this often: if its new pods are still not injected
/// (webhook down again), restarting faster would only churn the workload.
pub const REPAIR_COOLDOWN: Duration = Duration::from_secs(600);
/// Pods named in the event (the count is always complete).
const NAMED_PODS: usize = 5;

/// The pods of one gateway, as the reconciler sees them.
#[derive(Debug, Default, PartialEq)]
pub struct Census {
    /// Pods injected or opted in for the gateway, not being deleted.
    pub expected: i32,
    /// Of those, pods without our `nanogate.io/injected` annotation, sorted by name.
    pub not_injected: Vec<ObjectMeta>,
}

/// What decides pod membership besides the pod's own annotations.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scope {
    /// The namespace carries `nanogate.io/injection=enabled`.
    pub namespace_opted_in: bool,
    /// The gateway is its namespace's only one (pods naming no gateway get it).
    pub only_gateway: bool,
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(|v| v.trim())
}

/// The pod's own opt-in: `Some(true/false)` from `nanogate.io/inject`, `None` when the
/// namespace label decides.
fn pod_opt_in(meta: &ObjectMeta) -> Option<bool> {
    match annotation(meta, INJECT_ANNOTATION) {
        Some(v) if v.eq_ignore_ascii_case("true") => Some(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

fn is_injected(meta: &ObjectMeta) -> bool {
    annotation(meta, INJECTED_ANNOTATION).is_some()
}

/// Whether the pod expects a sidecar of gateway `name` — the webhook's decision, replayed.
pub fn belongs(meta: &ObjectMeta, name: &str, scope: Scope) -> bool {
    if meta.deletion_timestamp.is_some() {
        return false;
    }
    if is_injected(meta) {
        return meta
            .annotations
            .as_ref()
            .and_then(build::pod_gateway)
            .is_some_and(|g| g == name);
    }
    if !pod_opt_in(meta).unwrap_or(scope.namespace_opted_in) {
        return false;
    }
    match annotation(meta, GATEWAY_ANNOTATION).filter(|g| !g.is_empty()) {
        Some(gateway) => gateway == name,
        None => scope.only_gateway,
    }
}

impl Census {
    /// Counts `pods` (metadata only) that belong to gateway `name`.
    pub fn of(pods: impl IntoIterator<Item = ObjectMeta>, name: &str, scope: Scope) -> Self {
        let mut census = Self::default();
        for meta in pods {
            if !belongs(&meta, name, scope) {
                continue;
            }
            census.expected = census.expected.saturating_add(1);
            if !is_injected(&meta) {
                census.not_injected.push(meta);
            }
        }
        census.not_injected.sort_by(|a, b| a.name.cmp(&b.name));
        census
    }

    /// `notInjected` for the status.
    pub fn not_injected_count(&self) -> i32 {
        i32::try_from(self.not_injected.len()).unwrap_or(i32::MAX)
    }

    /// The `PodsNotInjected` event text: how many, which, and what to do.
    pub fn event_note(&self, repair_enabled: bool) -> String {
        let names: Vec<&str> = self
            .not_injected
            .iter()
            .take(NAMED_PODS)
            .filter_map(|m| m.name.as_deref())
            .collect();
        let more = self.not_injected.len().saturating_sub(names.len());
        let list = if more > 0 {
            format!("{} and {more} more", names.join(", "))
        } else {
            names.join(", ")
        };
        let action = if repair_enabled {
            "the operator restarts their Deployments (nanogate.io/repair: rollout)"
        } else {
            "restart their workloads, or annotate the gateway with nanogate.io/repair=rollout to have the operator do it"
        };
        format!(
            "{} pod(s) opted in but run without a sidecar, probably admitted while the webhook was unreachable: {list}; {action}",
            self.not_injected.len()
        )
    }
}

/// Lists the metadata of the namespace's pods and counts those of gateway `name`. The
/// namespace's label and its other gateways are read only when some pod's membership depends
/// on them (a pod without `nanogate.io/inject`, or without `nanogate.io/gateway`).
pub async fn census(client: &Client, ns: &str, name: &str) -> Result<Census> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list_metadata(&ListParams::default())
        .await
        .map_err(Error::PodList)?;
    let undecided = || {
        list.items
            .iter()
            .map(|p| &p.metadata)
            .filter(|m| m.deletion_timestamp.is_none() && !is_injected(m))
    };
    let mut scope = Scope::default();
    if undecided().any(|m| pod_opt_in(m).is_none()) {
        let namespace = Api::<Namespace>::all(client.clone())
            .get_metadata_opt(ns)
            .await
            .map_err(Error::PodList)?;
        scope.namespace_opted_in = namespace
            .and_then(|n| n.metadata.labels)
            .and_then(|l| l.get(NAMESPACE_INJECTION_LABEL).cloned())
            .is_some_and(|v| v == "enabled");
    }
    let needs_gateways = undecided().any(|m| {
        pod_opt_in(m) != Some(false) && annotation(m, GATEWAY_ANNOTATION).is_none_or(str::is_empty)
    });
    if needs_gateways {
        let gateways = Api::<AgentGateway>::namespaced(client.clone(), ns)
            .list_metadata(&ListParams::default())
            .await
            .map_err(Error::PodList)?;
        scope.only_gateway = matches!(gateways.items.as_slice(),
            [only] if only.metadata.name.as_deref() == Some(name));
    }
    Ok(Census::of(
        list.items.into_iter().map(|p| p.metadata),
        name,
        scope,
    ))
}

/// Whether the gateway asked for automatic repair.
pub fn repair_enabled(gateway: &ObjectMeta) -> bool {
    gateway
        .annotations
        .as_ref()
        .and_then(|a| a.get(REPAIR_ANNOTATION))
        .is_some_and(|v| v == "rollout")
}

/// What a repair pass did, for events.
#[derive(Debug, Default, PartialEq)]
pub struct Repair {
    /// Deployments restarted now.
    pub restarted: Vec<String>,
    /// Pods whose owner is not a Deployment (bare pods, StatefulSets, Jobs…): left alone.
    pub unmanaged: Vec<String>,
}

/// Restarts the Deployments owning `census.not_injected` (each at most once per
/// [`REPAIR_COOLDOWN`]) by stamping their pod template, as `kubectl rollout restart` does.
pub async fn rollout(client: &Client, ns: &str, census: &Census) -> kube::Result<Repair> {
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let mut owners = BTreeSet::new();
    let mut repair = Repair::default();
    for pod in &census.not_injected {
        let pod_name = pod.name.clone().unwrap_or_default();
        let Some(rs) = controller_of(pod, "ReplicaSet") else {
            repair.unmanaged.push(pod_name);
            continue;
        };
        let rs = replica_sets.get_opt(&rs).await?;
        match rs
            .as_ref()
            .and_then(|rs| controller_of(&rs.metadata, "Deployment"))
        {
            Some(deployment) => {
                owners.insert(deployment);
            }
            None => repair.unmanaged.push(pod_name),
        }
    }
    let now = Timestamp::now();
    for name in owners {
        let Some(deployment) = deployments.get_opt(&name).await? else {
            continue;
        };
        let last = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(RESTARTED_AT_ANNOTATION))
            .and_then(|t| t.parse::<Timestamp>().ok());
        let cooling =
            last.is_some_and(|t| now.duration_since(t).unsigned_abs().lt(&REPAIR_COOLDOWN));
        if cooling {
            continue;
        }
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {
            RESTARTED_AT_ANNOTATION: now.to_string()
        }}}}});
        deployments
            .patch(
                &name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            )
            .await?;
        repair.restarted.push(name);
    }
    Ok(repair)
}

/// The name of `meta`'s controlling owner of `kind`.
fn controller_of(meta: &ObjectMeta, kind: &str) -> Option<String> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == kind && o.controller == Some(true))
        .map(|o| o.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pod(name: &str, annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn census_separates_injected_from_merely_opted_in_pods() {
        let pods = vec![
            pod(
                "b-plain",
                &[
                    ("nanogate.io/inject", "true"),
                    ("nanogate.io/gateway", "shop"),
                ],
            ),
            pod(
                "a-injected",
                &[(INJECTED_ANNOTATION, r#"{"gateway":"shop"}"#)],
            ),
            pod(
                "c-other-gw",
                &[
                    ("nanogate.io/inject", "true"),
                    ("nanogate.io/gateway", "other"),
                ],
            ),
            pod(
                "d-opted-out",
                &[
                    ("nanogate.io/inject", "false"),
                    ("nanogate.io/gateway", "shop"),
                ],
            ),
            pod(
                "a-plain",
                &[
                    ("nanogate.io/inject", "true"),
                    ("nanogate.io/gateway", "shop"),
                ],
            ),
        ];
        let census = Census::of(pods, "shop", Scope::default());
        assert_eq!(census.expected, 3);
        let names: Vec<_> = census
            .not_injected
            .iter()
            .map(|m| m.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a-plain", "b-plain"]);
        assert_eq!(census.not_injected_count(), 2);
    }

    #[test]
    fn namespace_label_and_only_gateway_decide_like_the_webhook() {
        let plain = pod("plain", &[]);
        let opted = pod("opted", &[("nanogate.io/inject", "TRUE")]);
        let out = pod("out", &[("nanogate.io/inject", "false")]);
        let elsewhere = pod("elsewhere", &[("nanogate.io/gateway", "other")]);
        let both = Scope {
            namespace_opted_in: true,
            only_gateway: true,
        };
        assert!(belongs(&plain, "shop", both));
        assert!(!belongs(
            &plain,
            "shop",
            Scope {
                namespace_opted_in: false,
                ..both
            }
        ));
        assert!(!belongs(
            &plain,
            "shop",
            Scope {
                only_gateway: false,
                ..both
            }
        ));
        assert!(belongs(
            &opted,
            "shop",
            Scope {
                namespace_opted_in: false,
                ..both
            }
        ));
        assert!(!belongs(&out, "shop", both));
        assert!(!belongs(&elsewhere, "shop", both));
        let mut gone = opted.clone();
        gone.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::now(),
        ));
        assert!(!belongs(&gone, "shop", both));
    }

    #[test]
    fn event_note_names_pods_and_says_what_to_do() {
        let pods = (0..7).map(|i| {
            pod(
                &format!("p{i}"),
                &[
                    ("nanogate.io/inject", "true"),
                    ("nanogate.io/gateway", "shop"),
                ],
            )
        });
        let census = Census::of(pods, "shop", Scope::default());
        let note = census.event_note(false);
        assert!(
            note.starts_with("7 pod(s) opted in but run without a sidecar"),
            "{note}"
        );
        assert!(note.contains("p0, p1, p2, p3, p4 and 2 more"), "{note}");
        assert!(note.contains("nanogate.io/repair=rollout"), "{note}");
        assert!(
            census
                .event_note(true)
                .contains("the operator restarts their Deployments")
        );
    }

    #[test]
    fn repair_needs_the_exact_annotation() {
        let gw = |v: &str| pod("gw", &[(REPAIR_ANNOTATION, v)]);
        assert!(repair_enabled(&gw("rollout")));
        assert!(!repair_enabled(&gw("true")));
        assert!(!repair_enabled(&ObjectMeta::default()));
    }
}
