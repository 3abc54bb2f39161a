//! Pods that opted in but run without a sidecar.
//!
//! With `failurePolicy: Ignore` (the default) a pod created while the webhook is unreachable is
//! admitted as is. The reconciler counts such pods (`status.sidecars.notInjected`), says so in
//! a `PodsNotInjected` event, and — when the gateway carries `nanogate.io/repair: rollout` —
//! restarts their Deployments the way `kubectl rollout restart` does, so the new pods pass
//! through the webhook again.

use std::collections::BTreeMap;
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
    self, InjectedRecord, Outdated, Scope, belongs, namespace_opted_in, pod_opt_in,
    requested_gateway,
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
    /// Of those, injected pods whose sidecar is not what the injector puts into a new pod now
    /// (another image after an operator upgrade or a changed `--sidecar-image`, or pod settings
    /// of the gateway changed since), sorted by name, each with how it differs.
    pub outdated: Vec<(ObjectMeta, Outdated)>,
}

/// What the injector puts into a gateway's new pods now ([`Census::of`] compares records to it).
#[derive(Clone, Copy, Debug)]
pub struct CurrentSidecar<'a> {
    pub image: &'a str,
    /// [`crate::gateway::InjectionSettings::pod_hash`].
    pub pod_hash: &'a str,
}

impl Census {
    /// Counts `pods` (metadata only) that belong to gateway `name`; with `current` (what the
    /// operator injects for it now; `None` for an invalid gateway), also the outdated ones.
    pub fn of(
        pods: impl IntoIterator<Item = ObjectMeta>,
        name: &str,
        scope: Scope,
        current: Option<CurrentSidecar>,
    ) -> Self {
        let mut census = Self::default();
        for meta in pods {
            if !belongs(&meta, name, scope) {
                continue;
            }
            census.expected = census.expected.saturating_add(1);
            if !is_injected(&meta) {
                census.not_injected.push(meta);
            } else if let Some(now) = current {
                // A record that does not parse is of an unknown (very old) injector.
                let outdated = match InjectedRecord::of(meta.annotations.as_ref()) {
                    Some(record) => record.outdated(now.image, now.pod_hash),
                    None => Some(Outdated::Image(None)),
                };
                if let Some(how) = outdated {
                    census.outdated.push((meta, how));
                }
            }
        }
        census.not_injected.sort_by(|a, b| a.name.cmp(&b.name));
        census.outdated.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        census
    }

    /// `outdated` for the status.
    pub fn outdated_count(&self) -> i32 {
        i32::try_from(self.outdated.len()).unwrap_or(i32::MAX)
    }

    /// The outdated pods, without how.
    pub fn outdated_pods(&self) -> impl Iterator<Item = &ObjectMeta> {
        self.outdated.iter().map(|(meta, _)| meta)
    }

    /// The `SidecarsOutdated` event text: how many, which, how they differ (another image, or
    /// pod settings changed since) and what to do.
    pub fn outdated_note(&self, image: &str, repair_enabled: bool) -> String {
        let (other_image, settings): (Vec<_>, Vec<_>) = self
            .outdated
            .iter()
            .partition(|(_, how)| matches!(how, Outdated::Image(_)));
        let mut parts = Vec::new();
        if let Some((_, Outdated::Image(running))) = other_image.first() {
            let running = running
                .as_deref()
                .unwrap_or("the image an operator before 0.2 injected (its record names none)");
            let pods: Vec<&ObjectMeta> = other_image.iter().map(|(m, _)| m).collect();
            parts.push(format!(
                "{} sidecar(s) run {running} instead of {image}: {}",
                pods.len(),
                named(&pods)
            ));
        }
        if !settings.is_empty() {
            let pods: Vec<&ObjectMeta> = settings.iter().map(|(m, _)| m).collect();
            parts.push(format!(
                "{} sidecar(s) were injected before the gateway's pod settings (spec.sidecar resources, logLevel, adminPort, nativeSidecar; spec.socket; Secrets; spec.tcpListener) changed: {}",
                pods.len(),
                named(&pods)
            ));
        }
        let action = if repair_enabled {
            "the operator restarts their Deployments (nanogate.io/repair: rollout)"
        } else {
            "restart their workloads, or annotate the gateway with nanogate.io/repair=rollout to have the operator do it"
        };
        format!("{}; {action}", parts.join("; "))
    }

    /// `notInjected` for the status.
    pub fn not_injected_count(&self) -> i32 {
        i32::try_from(self.not_injected.len()).unwrap_or(i32::MAX)
    }

    /// The `PodsNotInjected` event text: how many, which, why, and what to do. A pod the
    /// webhook skipped on purpose carries its reason (`nanogate.io/injection-skipped`); only the
    /// others can have been admitted without the webhook.
    pub fn event_note(&self, repair_enabled: bool) -> String {
        let list = |pods: &[&ObjectMeta]| named(pods);
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
pub async fn census(
    client: &Client,
    ns: &str,
    name: &str,
    current: Option<CurrentSidecar<'_>>,
) -> Result<Census> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pod_metadata(&pods).await.map_err(Error::PodList)?;
    let undecided = || {
        list.iter()
            .filter(|m| m.deletion_timestamp.is_none() && !is_injected(m))
    };
    let mut scope = Scope::default();
    if undecided().any(|m| pod_opt_in(m).is_none()) {
        let namespace = Api::<Namespace>::all(client.clone())
            .get_metadata_opt(ns)
            .await
            .map_err(Error::PodList)?;
        scope.namespace_opted_in =
            namespace_opted_in(namespace.and_then(|n| n.metadata.labels).as_ref());
    }
    let needs_gateways = undecided().any(|m| {
        pod_opt_in(m) != Some(false) && requested_gateway(m.annotations.as_ref()).is_none()
    });
    if needs_gateways {
        let gateways = Api::<AgentGateway>::namespaced(client.clone(), ns)
            .list_metadata(&ListParams::default())
            .await
            .map_err(Error::PodList)?;
        scope.only_gateway = matches!(gateways.items.as_slice(),
            [only] if only.metadata.name.as_deref() == Some(name));
    }
    Ok(Census::of(list, name, scope, current))
}

/// Pods a census lists per request. The apiserver sends each pod with its managed fields
/// (often most of its metadata's bytes); listing a page at a time and dropping them keeps a
/// census of a namespace with thousands of pods to a page of them, not all at once.
const POD_PAGE: u32 = 250;

/// The metadata of every pod `pods` lists, without managed fields, [`POD_PAGE`] at a time
/// (the pages of one list are one consistent snapshot).
async fn pod_metadata(pods: &Api<Pod>) -> Result<Vec<ObjectMeta>, kube::Error> {
    let mut params = ListParams::default().limit(POD_PAGE);
    let mut all = Vec::new();
    loop {
        let page = pods.list_metadata(&params).await?;
        all.extend(page.items.into_iter().map(|pod| ObjectMeta {
            managed_fields: None,
            ..pod.metadata
        }));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(all),
        }
    }
}

/// The first [`NAMED_PODS`] names of `pods`, and how many more.
fn named(pods: &[&ObjectMeta]) -> String {
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
}

/// The sidecar image an injected pod's record names.
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

/// Restarts the Deployments owning the census's pods without a current sidecar (not injected,
/// or outdated) by stamping their pod template, as `kubectl rollout restart` does. A Deployment
/// restarted less than [`REPAIR_COOLDOWN`] ago is left alone (its rollout may still be under
/// way, or the restart did not help: the webhook is still down) — unless one of its pods was
/// injected after that restart and has turned outdated since: the gateway changed again.
pub async fn rollout(client: &Client, ns: &str, census: &Census) -> kube::Result<Repair> {
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    // Deployment name → the creation times of its outdated pods.
    let mut owners: BTreeMap<String, Vec<Timestamp>> = BTreeMap::new();
    let mut repair = Repair::default();
    let pods = census
        .not_injected
        .iter()
        .map(|meta| (meta, false))
        .chain(census.outdated_pods().map(|meta| (meta, true)));
    for (pod, outdated) in pods {
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
                let created = owners.entry(deployment).or_default();
                if let Some(at) = pod.creation_timestamp.as_ref().filter(|_| outdated) {
                    created.push(at.0);
                }
            }
            None => repair.unmanaged.push(pod_name),
        }
    }
    let now = Timestamp::now();
    for (name, outdated_created) in owners {
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
        if let Some(last) = last {
            let cooling = now.duration_since(last).unsigned_abs() < REPAIR_COOLDOWN;
            // Creation times have whole seconds: a pod the restart made may carry its second.
            let changed_since = outdated_created
                .iter()
                .any(|created| created.as_second() >= last.as_second());
            if cooling && !changed_since {
                continue;
            }
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
        let census = Census::of(pods, "shop", Scope::default(), None);
        assert_eq!(census.expected, 3);
        let names: Vec<_> = census
            .not_injected
            .iter()
            .map(|m| m.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a-plain", "b-plain"]);
        assert_eq!(census.not_injected_count(), 2);
    }

    /// A pod opted in by the `nanogate.io/inject` label alone is counted like an annotated one.
    #[test]
    fn census_counts_pods_opted_in_by_the_label() {
        let mut labelled = pod("labelled", &[("nanogate.io/gateway", "shop")]);
        labelled.labels = Some([("nanogate.io/inject".to_string(), "true".to_string())].into());
        let unlabelled = pod("unlabelled", &[("nanogate.io/gateway", "shop")]);
        let census = Census::of([labelled, unlabelled], "shop", Scope::default(), None);
        assert_eq!(census.expected, 1);
        assert_eq!(census.not_injected[0].name.as_deref(), Some("labelled"));
    }

    #[test]
    fn census_counts_sidecars_injected_with_another_image_as_outdated() {
        let record = |image: Option<&str>| {
            let mut r = serde_json::json!({"gateway": "shop", "generation": 1, "mode": "native"});
            if let Some(image) = image {
                r["image"] = image.into();
            }
            r.to_string()
        };
        let (now, before) = ("reg/nano-agent:0.3.0", "reg/nano-agent:0.2.0");
        let pods = vec![
            pod("current", &[(INJECTED_ANNOTATION, &record(Some(now)))]),
            pod("b-old", &[(INJECTED_ANNOTATION, &record(Some(before)))]),
            pod("a-older-operator", &[(INJECTED_ANNOTATION, &record(None))]),
        ];
        let current = CurrentSidecar {
            image: now,
            pod_hash: "h1",
        };
        let census = Census::of(pods.clone(), "shop", Scope::default(), Some(current));
        let names: Vec<_> = census
            .outdated_pods()
            .map(|m| m.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a-older-operator", "b-old"]);
        assert_eq!((census.expected, census.outdated_count()), (3, 2));
        let note = census.outdated_note(now, false);
        assert!(note.starts_with("2 sidecar(s) run "), "{note}");
        assert!(
            note.contains(now) && note.contains("nanogate.io/repair=rollout"),
            "{note}"
        );
        // An invalid gateway injects nothing now: nothing is outdated.
        assert!(
            Census::of(pods, "shop", Scope::default(), None)
                .outdated
                .is_empty()
        );
    }

    /// Same image, but the gateway's pod settings changed since the injection: outdated (a
    /// restart applies them). Records without a pod hash are judged by their image alone.
    #[test]
    fn census_counts_sidecars_injected_before_the_pod_settings_changed_as_outdated() {
        let image = "reg/nano-agent:0.3.0";
        let record = |pod_hash: Option<&str>| {
            let mut r = serde_json::json!({"gateway": "shop", "generation": 1, "mode": "native",
                "image": image});
            if let Some(h) = pod_hash {
                r["podHash"] = h.into();
            }
            r.to_string()
        };
        let pods = vec![
            pod("current", &[(INJECTED_ANNOTATION, &record(Some("h2")))]),
            pod(
                "before-the-change",
                &[(INJECTED_ANNOTATION, &record(Some("h1")))],
            ),
            pod("no-hash", &[(INJECTED_ANNOTATION, &record(None))]),
        ];
        let current = CurrentSidecar {
            image,
            pod_hash: "h2",
        };
        let census = Census::of(pods, "shop", Scope::default(), Some(current));
        assert_eq!(census.outdated.len(), 1, "{:?}", census.outdated);
        assert_eq!(
            census.outdated[0].0.name.as_deref(),
            Some("before-the-change")
        );
        assert_eq!(census.outdated[0].1, Outdated::PodSettings);
        let note = census.outdated_note(image, false);
        assert!(
            note.starts_with("1 sidecar(s) were injected before the gateway's pod settings"),
            "{note}"
        );
        assert!(
            note.contains("before-the-change") && !note.contains("instead of"),
            "{note}"
        );
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
        let census = Census::of(pods, "shop", Scope::default(), None);
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
        let note = Census::of(pods, "shop", Scope::default(), None).event_note(false);
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
