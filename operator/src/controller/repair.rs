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

use super::{Error, Result};
use crate::FIELD_MANAGER;
use crate::crd::AgentGateway;
use crate::gateway::membership::{
    self, Scope, belongs, namespace_opted_in, pod_opt_in, requested_gateway,
};
use crate::names::{INJECTION_SKIPPED_ANNOTATION, REPAIR_ANNOTATION, RESTARTED_AT_ANNOTATION};

fn is_injected(meta: &ObjectMeta) -> bool {
    membership::is_injected(meta.annotations.as_ref())
}
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

    /// The `PodsNotInjected` event text: how many, which, why, and what to do. A pod the
    /// webhook skipped on purpose carries its reason (`nanogate.io/injection-skipped`); only the
    /// others can have been admitted without the webhook.
    pub fn event_note(&self, repair_enabled: bool) -> String {
        let list = |pods: &[&ObjectMeta]| {
            let names: Vec<&str> = pods
                .iter()
                .take(NAMED_PODS)
                .filter_map(|m| m.name.as_deref())
                .collect();
            let more = pods.len().saturating_sub(names.len());
            if more > 0 {
                format!("{} and {more} more", names.join(", "))
            } else {
                names.join(", ")
            }
        };
        let skip_reason = |m: &ObjectMeta| {
            m.annotations
                .as_ref()
                .and_then(|a| a.get(INJECTION_SKIPPED_ANNOTATION))
                .cloned()
        };
        let (skipped, unseen): (Vec<&ObjectMeta>, Vec<&ObjectMeta>) = self
            .not_injected
            .iter()
            .partition(|m| skip_reason(m).is_some());
        let mut parts = Vec::new();
        if let Some(first) = skipped.first().and_then(|m| skip_reason(m)) {
            parts.push(format!(
                "{} skipped by the webhook, each for the reason in its {INJECTION_SKIPPED_ANNOTATION} annotation (first: {first}): {}",
                skipped.len(),
                list(&skipped)
            ));
        }
        if !unseen.is_empty() {
            parts.push(format!(
                "{} admitted without the webhook's decision (it was unreachable or not yet installed): {}",
                unseen.len(),
                list(&unseen)
            ));
        }
        let action = if repair_enabled {
            "the operator restarts their Deployments (nanogate.io/repair: rollout)"
        } else {
            "once the cause is fixed, restart their workloads, or annotate the gateway with nanogate.io/repair=rollout to have the operator do it"
        };
        format!(
            "{} pod(s) opted in but run without a sidecar: {}; {action}",
            self.not_injected.len(),
            parts.join("; ")
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
    if undecided().any(|m| pod_opt_in(m.annotations.as_ref()).is_none()) {
        let namespace = Api::<Namespace>::all(client.clone())
            .get_metadata_opt(ns)
            .await
            .map_err(Error::PodList)?;
        scope.namespace_opted_in =
            namespace_opted_in(namespace.and_then(|n| n.metadata.labels).as_ref());
    }
    let needs_gateways = undecided().any(|m| {
        pod_opt_in(m.annotations.as_ref()) != Some(false)
            && requested_gateway(m.annotations.as_ref()).is_none()
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
    use crate::gateway::membership::test_pod as pod;
    use crate::names::INJECTED_ANNOTATION;

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
        assert!(
            note.contains("admitted without the webhook's decision"),
            "{note}"
        );
    }

    #[test]
    fn pods_the_webhook_skipped_are_not_blamed_on_an_unreachable_webhook() {
        let pods = [pod(
            "skipped",
            &[
                ("nanogate.io/inject", "true"),
                ("nanogate.io/gateway", "shop"),
                (
                    INJECTION_SKIPPED_ANNOTATION,
                    "the AgentGateway \"shop\" is invalid (…)",
                ),
            ],
        )];
        let note = Census::of(pods, "shop", Scope::default()).event_note(false);
        assert!(note.contains("1 skipped by the webhook"), "{note}");
        assert!(note.contains("is invalid"), "{note}");
        assert!(!note.contains("unreachable"), "{note}");
    }

    #[test]
    fn repair_needs_the_exact_annotation() {
        let gw = |v: &str| pod("gw", &[(REPAIR_ANNOTATION, v)]);
        assert!(repair_enabled(&gw("rollout")));
        assert!(!repair_enabled(&gw("true")));
        assert!(!repair_enabled(&ObjectMeta::default()));
    }
}
