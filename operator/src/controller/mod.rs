//! The AgentGateway reconciler: dereference → validate → build (pure) → apply (SSA) → status.
//!
//! Every write is preceded by a comparison with what the API server already has, so a
//! reconcile of an unchanged gateway makes no write at all.

pub mod build;
pub mod repair;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::FIELD_MANAGER;
use crate::crd::{AgentGateway, AgentGatewayStatus, conditions, join_errors};
use crate::gateway::membership::{self, Recount};
use crate::gateway::refs::SecretRef;
use crate::gateway::{SidecarImages, ValidatedGateway};
use crate::metrics::Metrics;
use crate::names::{
    MANAGED_BY, MANAGED_BY_LABEL, NAMESPACE_INJECTION_ENABLED, NAMESPACE_INJECTION_LABEL,
};
use crate::pods::{PodMeta, PodWatch};
use crate::status;
use crate::watch::{self, TaskGuard};
use build::{GatewayRef, Verdict};

/// Errors of the reconciler. Each has a metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks a key every stored object has.
    #[error("object is missing {0}")]
    MissingObjectKey(&'static str),
    /// Reading a referenced Secret failed (other than "not found").
    #[error("reading Secret {name}: {source}")]
    SecretGet {
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Reading the derived ConfigMap failed.
    #[error("reading ConfigMap: {0}")]
    ConfigMapGet(#[source] kube::Error),
    /// Applying the derived ConfigMap failed.
    #[error("applying ConfigMap: {0}")]
    ConfigMapApply(#[source] kube::Error),
    /// Listing pods to count sidecars failed.
    #[error("listing pods: {0}")]
    PodList(#[source] kube::Error),
    /// Reading the live status failed.
    #[error("reading status: {0}")]
    StatusGet(#[source] kube::Error),
    /// Writing the status failed.
    #[error("patching status: {0}")]
    StatusPatch(#[source] kube::Error),
}

impl Error {
    /// Label for `nanogate_operator_reconcile_errors_total{error}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::MissingObjectKey(_) => "missing_object_key",
            Self::SecretGet { .. } => "secret_get",
            Self::ConfigMapGet(_) => "configmap_get",
            Self::ConfigMapApply(_) => "configmap_apply",
            Self::PodList(_) => "pod_list",
            Self::StatusGet(_) => "status_get",
            Self::StatusPatch(_) => "status_patch",
        }
    }
}

/// Result of the reconciler.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Requeue interval of a healthy gateway (drift check). It is also when a deleted or emptied
/// Secret of a Ready gateway is noticed: Secrets are not watched (see [`secret_retry`]).
pub const RESYNC: Duration = Duration::from_secs(300);

/// Delay before look number `n` (1-based) at a gateway whose Secret is missing: 2 s doubling to
/// a minute. The operator has no cluster-wide list/watch on Secrets (that would let it read
/// every Secret in the cluster), so it cannot be told when the Secret appears; it looks again
/// with `get` instead, soon after the gateway was created and rarely for one left broken.
pub fn secret_retry(n: u32) -> Duration {
    let secs = 2u64 << n.saturating_sub(1).min(5);
    Duration::from_secs(secs.min(60))
}

/// Shared state of all reconciles.
pub struct Context {
    /// API client.
    pub client: Client,
    /// The one event recorder (events aggregate per object and reason).
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    /// Watch only this namespace (`None`: the whole cluster).
    pub namespace: Option<String>,
    /// PEM of the CA that signed the hub's certificate; written into each gateway's ConfigMap
    /// so injected sidecars can verify the hub (`None` when the hub is off).
    pub hub_ca: Option<String>,
    /// The operator's sidecar image policy: a gateway whose image it refuses is invalid.
    pub sidecar_images: SidecarImages,
    /// The operator's one pod watch, shared with the hub (`None`: [`run`] starts its own).
    pub pods: Option<PodWatch>,
    /// Consecutive failures per gateway, for exponential backoff in [`error_policy`].
    failures: Mutex<HashMap<(String, String), u32>>,
    /// Consecutive reconciles per gateway that found a Secret missing ([`secret_retry`]).
    missing_secrets: Mutex<HashMap<(String, String), u32>>,
}

impl Context {
    /// Build the context; `instance` identifies this replica in events.
    pub fn new(client: Client, metrics: Metrics, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            namespace: None,
            hub_ca: None,
            sidecar_images: SidecarImages::default(),
            pods: None,
            failures: Mutex::new(HashMap::new()),
            missing_secrets: Mutex::new(HashMap::new()),
        }
    }

    /// Check gateways' `spec.sidecar.image` against `images` (default: this release's image
    /// only).
    #[must_use]
    pub fn with_sidecar_images(mut self, images: SidecarImages) -> Self {
        self.sidecar_images = images;
        self
    }

    /// Follow pods through `pods` (shared with the hub) instead of a watch of its own.
    #[must_use]
    pub fn with_pod_watch(mut self, pods: PodWatch) -> Self {
        self.pods = Some(pods);
        self
    }

    /// Publish the hub's CA to sidecars through every gateway's ConfigMap.
    #[must_use]
    pub fn with_hub_ca(mut self, hub_ca: Option<String>) -> Self {
        self.hub_ca = hub_ca;
        self
    }

    /// Restrict the controller to one namespace.
    pub fn with_namespace(mut self, namespace: Option<String>) -> Self {
        self.namespace = namespace;
        self
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    fn reset_failures(&self, ns: &str, name: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(&(ns.to_string(), name.to_string()));
        }
    }

    /// Counts one more look that found a Secret missing (or forgets the count: `missing`
    /// false) and says when to look again.
    fn secret_missing(&self, ns: &str, name: &str, missing: bool) -> Option<Duration> {
        let mut counts = self
            .missing_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (ns.to_string(), name.to_string());
        if !missing {
            counts.remove(&key);
            return None;
        }
        let n = counts.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        Some(secret_retry(*n))
    }
}

fn now() -> Time {
    // Whole seconds: the API server stores conditions with second precision, so comparing
    // what we would write with what we read back stays exact.
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now()))
}

/// Check that every Secret the gateway references exists and has its key(s). `Ok(Some(msg))`
/// when something is missing.
async fn dereference(client: &Client, ns: &str, refs: &[SecretRef]) -> Result<Option<String>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for SecretRef {
        field, name, keys, ..
    } in refs
    {
        let secret = secrets
            .get_opt(name)
            .await
            .map_err(|source| Error::SecretGet {
                name: name.clone(),
                source,
            })?;
        let Some(secret) = secret else {
            return Ok(Some(format!(
                "Secret {ns}/{name} referenced by {field} not found; create it with key {:?}",
                keys.join(", ")
            )));
        };
        for key in keys {
            let has = secret.data.as_ref().is_some_and(|d| d.contains_key(key))
                || secret
                    .string_data
                    .as_ref()
                    .is_some_and(|d| d.contains_key(key));
            if !has {
                return Ok(Some(format!(
                    "Secret {ns}/{name} referenced by {field} has no key {key:?}; add the key to the Secret or change {field}"
                )));
            }
        }
    }
    Ok(None)
}

async fn publish(ctx: &Context, gw: &AgentGateway, type_: EventType, reason: &str, note: String) {
    let ev = crate::events::event(type_, reason, "Reconcile", note);
    match ctx.recorder.publish(&ev, &gw.object_ref(&())).await {
        Ok(()) => ctx.metrics.write("events", "create"),
        // Events are best effort; a failed event must not fail the reconcile.
        Err(error) => warn!(%error, reason, "publishing event failed"),
    }
}

/// Reconcile one AgentGateway.
pub async fn reconcile(gw: Arc<AgentGateway>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciles.inc();
    let _timer = ctx
        .metrics
        .reconcile_duration
        .with_label_values(&[] as &[&str])
        .start_timer();
    let ns = gw
        .metadata
        .namespace
        .as_deref()
        .ok_or(Error::MissingObjectKey(".metadata.namespace"))?;
    let name = gw
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingObjectKey(".metadata.name"))?;
    let uid = gw
        .metadata
        .uid
        .as_deref()
        .ok_or(Error::MissingObjectKey(".metadata.uid"))?;
    if gw.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove the ConfigMap.
        ctx.secret_missing(ns, name, false);
        return Ok(Action::await_change());
    }
    let gref = GatewayRef {
        name: name.to_string(),
        namespace: ns.to_string(),
        uid: uid.to_string(),
    };

    // validate → dereference → build → apply
    let checked = ValidatedGateway::checked(&gw, &ctx.sidecar_images);
    // What new pods get now (image, pod settings); sidecars injected otherwise are outdated.
    let injects_now = checked
        .as_ref()
        .ok()
        .map(|v| (v.injection.image.clone(), v.injection.pod_hash()));
    let sidecar_now = injects_now
        .as_ref()
        .map(|(image, pod_hash)| repair::CurrentSidecar { image, pod_hash });
    let verdict = match checked {
        Err(errors) => Verdict::Invalid(join_errors(&errors)),
        Ok(valid) => match dereference(&ctx.client, ns, &valid.secret_refs).await? {
            Some(missing) => Verdict::SecretMissing(missing),
            None => {
                let desired = build::with_hub_ca(
                    build::config_map(&gref, &valid.sidecar_config),
                    ctx.hub_ca.as_deref(),
                );
                let cm_name = build::config_map_name(name);
                let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
                let live = cms.get_opt(&cm_name).await.map_err(Error::ConfigMapGet)?;
                let up_to_date = live
                    .as_ref()
                    .is_some_and(|l| build::config_map_up_to_date(l, &desired));
                if !up_to_date {
                    cms.patch(
                        &cm_name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&desired),
                    )
                    .await
                    .map_err(Error::ConfigMapApply)?;
                    ctx.metrics.write("configmaps", "apply");
                    let (reason, verb) = if live.is_none() {
                        ("Created", "Created")
                    } else {
                        ("ConfigUpdated", "Updated")
                    };
                    info!(%ns, %name, hash = %valid.config_hash, "{verb} ConfigMap {cm_name}");
                    publish(
                        &ctx,
                        &gw,
                        EventType::Normal,
                        reason,
                        format!(
                            "{verb} ConfigMap {cm_name} with sidecar configuration {}",
                            valid.config_hash
                        ),
                    )
                    .await;
                }
                Verdict::Applied {
                    config_map: cm_name,
                    hash: valid.config_hash,
                }
            }
        },
    };

    let census = repair::census(&ctx.client, ns, name, sidecar_now).await?;
    let api: Api<AgentGateway> = Api::namespaced(ctx.client.clone(), ns);
    let desired = |current: Option<&AgentGatewayStatus>| {
        let now = now();
        let mut desired =
            build::desired_status(current, gw.metadata.generation, &verdict, &census, &now);
        build::set_tls_verified(&mut desired, &gw.spec, gw.metadata.generation, &now);
        desired
    };
    // Only the fields this writer applies are compared (see `crate::status`).
    let unchanged = |current: Option<&AgentGatewayStatus>,
                     desired: &AgentGatewayStatus,
                     hub_has_written: bool| {
        current.map(|c| status::operator_part(c, hub_has_written))
            == Some(status::operator_part(desired, hub_has_written))
    };
    let mut current = gw.status.clone();
    let mut new_status = desired(current.as_ref());
    // The cached gateway may predate our previous status write (its watch event is still in
    // flight), so a difference is confirmed on the live object before anything is written.
    if !unchanged(
        current.as_ref(),
        &new_status,
        status::hub_has_written(&gw.metadata),
    ) {
        let live = api.get_status(name).await.map_err(Error::StatusGet)?;
        let hub_has_written = status::hub_has_written(&live.metadata);
        current = live.status;
        new_status = desired(current.as_ref());
        if !unchanged(current.as_ref(), &new_status, hub_has_written) {
            ctx.metrics.write("agentgateways/status", "patch");
            let part = status::operator_part(&new_status, hub_has_written);
            // Only over what it read: the conditions list it applies carries the hub's
            // conditions as read (see `crate::status`), so a hub write in between must refuse
            // it (the reconcile fails and is retried).
            let version = live.metadata.resource_version.as_deref();
            status::apply(&api, name, status::OPERATOR_MANAGER, part, version)
                .await
                .map_err(Error::StatusPatch)?;
            debug!(%ns, %name, "status updated");
        }
    }
    let old_valid = current
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == conditions::CONFIG_VALID)
        })
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
    let new_valid = new_status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::CONFIG_VALID)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));

    if old_valid != new_valid {
        match &verdict {
            Verdict::Invalid(msg) => {
                warn!(%ns, %name, %msg, "invalid spec");
                publish(&ctx, &gw, EventType::Warning, "ConfigInvalid", msg.clone()).await;
            }
            Verdict::SecretMissing(msg) => {
                warn!(%ns, %name, %msg, "secret missing");
                publish(&ctx, &gw, EventType::Warning, "SecretMissing", msg.clone()).await;
            }
            Verdict::Applied { .. } if old_valid.is_some() => {
                publish(
                    &ctx,
                    &gw,
                    EventType::Normal,
                    "ConfigValid",
                    "The spec is valid and all referenced Secrets exist".into(),
                )
                .await;
            }
            Verdict::Applied { .. } => {}
        }
    }

    // Said once per cause: when the gateway turns plain text or unverified, or changes which.
    let tls_verified = |s: Option<&AgentGatewayStatus>| {
        s.and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == conditions::UPSTREAM_TLS_VERIFIED)
        })
        .map(|c| (c.status.clone(), c.reason.clone()))
    };
    let exposed = tls_verified(Some(&new_status)).filter(|(status, _)| status == "False");
    if exposed.is_some()
        && exposed != tls_verified(current.as_ref())
        && let Some((_, reason, message)) = build::upstream_exposure(&gw.spec)
    {
        warn!(%ns, %name, %message, "the upstream is not protected by verified TLS");
        publish(&ctx, &gw, EventType::Warning, reason, message).await;
    }

    let image = injects_now.as_ref().map(|(image, _)| image.as_str());
    report_pods(&ctx, &gw, ns, current.as_ref(), &census, image).await;

    ctx.reset_failures(ns, name);
    let retry = ctx.secret_missing(ns, name, matches!(verdict, Verdict::SecretMissing(_)));
    Ok(match verdict {
        Verdict::Applied { .. } => Action::requeue(RESYNC),
        // Secrets are not watched: look again for the missing one.
        Verdict::SecretMissing(_) => Action::requeue(retry.unwrap_or(RESYNC)),
        // Nothing to retry until the gateway changes.
        Verdict::Invalid(_) => Action::await_change(),
    })
}

/// Pods admitted without a sidecar, and sidecars on an outdated image: a Warning event when
/// their number changes, and the opt-in rollout repair of both.
async fn report_pods(
    ctx: &Context,
    gw: &AgentGateway,
    ns: &str,
    before: Option<&AgentGatewayStatus>,
    census: &repair::Census,
    image: Option<&str>,
) {
    let repair_enabled = repair::repair_enabled(&gw.metadata);
    let known = before.and_then(|s| s.sidecars.as_ref());
    if !census.not_injected.is_empty()
        && known.map_or(0, |s| s.not_injected) != census.not_injected_count()
    {
        let note = census.event_note(repair_enabled);
        warn!(%ns, gateway = %gw.name_any(), %note, "pods without sidecar");
        publish(ctx, gw, EventType::Warning, "PodsNotInjected", note).await;
    }
    if let Some(image) = image.filter(|_| !census.outdated.is_empty())
        && known.map_or(0, |s| s.outdated) != census.outdated_count()
    {
        let note = census.outdated_note(image, repair_enabled);
        info!(%ns, gateway = %gw.name_any(), %note, "outdated sidecars");
        publish(ctx, gw, EventType::Warning, "SidecarsOutdated", note).await;
    }
    if !repair_enabled || (census.not_injected.is_empty() && census.outdated.is_empty()) {
        return;
    }
    match repair::rollout(&ctx.client, ns, census).await {
        Ok(done) => {
            for deployment in done.restarted {
                ctx.metrics.write("deployments", "patch");
                info!(%ns, %deployment, "restarted Deployment to give its pods the current sidecar");
                publish(
                    ctx,
                    gw,
                    EventType::Normal,
                    "RolloutRestarted",
                    format!(
                        "Restarted Deployment {deployment} so its pods get the current sidecar"
                    ),
                )
                .await;
            }
        }
        Err(error) => {
            warn!(%ns, %error, "repair rollout failed");
            publish(
                ctx,
                gw,
                EventType::Warning,
                "RepairFailed",
                format!(
                    "Could not restart the Deployments of pods without the current sidecar: {error}"
                ),
            )
            .await;
        }
    }
}

/// Log, count, and back off exponentially per gateway (1 s, 2 s, 4 s … 5 min).
pub fn error_policy(gw: Arc<AgentGateway>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.metric_label()])
        .inc();
    let key = (gw.namespace().unwrap_or_default(), gw.name_any());
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = backoff(n);
    warn!(%error, ns = %key.0, name = %key.1, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Delay before retry number `n` (1-based).
pub fn backoff(n: u32) -> Duration {
    let secs = 1u64 << n.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300))
}

/// The gateways to requeue for a change of `pod`: its own gateway when it names or was
/// injected for one, the gateways of its namespace when it opted in naming none, and none
/// when neither it nor its namespace (`namespace_opted_in`) opted in — most pods of a cluster,
/// which thus cost no reconcile. `gateways` gives the gateway store's content, read only when
/// needed.
pub fn gateways_to_requeue(
    pod: &ObjectMeta,
    namespace_opted_in: bool,
    gateways: impl FnOnce() -> Vec<Arc<AgentGateway>>,
) -> Vec<ObjectRef<AgentGateway>> {
    let ns = pod.namespace.as_deref().unwrap_or_default();
    match membership::to_recount(pod, namespace_opted_in) {
        Recount::Gateway(gateway) => vec![ObjectRef::<AgentGateway>::new(&gateway).within(ns)],
        Recount::Nothing => Vec::new(),
        Recount::Namespace => gateways()
            .iter()
            .filter(|gw| gw.namespace().as_deref() == Some(ns))
            .map(|gw| ObjectRef::from_obj(&**gw))
            .collect(),
    }
}

/// A store of the namespaces that opt their pods in (`nanogate.io/injection=enabled`; metadata
/// only, selected by the API server), fed by a task that ends when the returned guard drops.
fn opted_in_namespaces(client: Client) -> (Store<PartialObjectMeta<Namespace>>, TaskGuard) {
    let selector = format!("{NAMESPACE_INJECTION_LABEL}={NAMESPACE_INJECTION_ENABLED}");
    watch::store(
        Api::<PartialObjectMeta<Namespace>>::all(client),
        watcher::Config::default().labels(&selector),
        "opted-in namespaces",
    )
}

/// A hash of what a gateway's reconcile reads from the object itself: its identity, spec
/// (`generation`), labels, annotations (`nanogate.io/repair`) and deletion. Not its status:
/// the hub writes that about once per gateway every 5 s (and the reconciler its own part), and
/// each run lists the metadata of the namespace's pods — at fleet scale the re-runs were most
/// of the operator's work. What the status says is looked at again every [`RESYNC`].
fn reconcile_inputs(gw: &AgentGateway) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let meta = &gw.metadata;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    meta.uid.hash(&mut hasher);
    meta.generation.hash(&mut hasher);
    meta.labels.hash(&mut hasher);
    meta.annotations.hash(&mut hasher);
    meta.deletion_timestamp.is_some().hash(&mut hasher);
    Some(hasher.finish())
}

/// Run the controller until `shutdown` resolves. Watches gateways, owned ConfigMaps and pods
/// (sidecar counts). Secrets are not watched: that needs list/watch on every Secret in the
/// cluster; a gateway whose Secret is missing is looked at again ([`secret_retry`]), a Ready
/// one every [`RESYNC`].
///
/// Pods come from the operator's one pod watch ([`crate::pods`], metadata only, no store):
/// annotations and the `nanogate.io/inject` label decide membership. A pod event requeues only
/// the gateways its membership may change ([`gateways_to_requeue`]): unrelated pods, however
/// many, requeue nothing. The label `nanogate.io/injected-gateway` cannot select them
/// server-side: a pod that opted in but was admitted while the webhook was down carries no
/// label, and the reconciler must see it (`sidecars.notInjected`, repair).
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let gateways: Api<AgentGateway> = ctx.api();
    if let Err(error) = gateways.list(&ListParams::default().limit(1)).await {
        warn!(%error, "cannot list AgentGateways; is the CRD installed? (nanogate-operator crd | kubectl apply -f -)");
    }
    let (gateway_store, writer) = reflector::store();
    let gateway_events = watcher(gateways, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(reconcile_inputs, Default::default());
    let controller = Controller::for_stream(gateway_events, gateway_store.clone());
    let (namespaces, _namespace_watch) = opted_in_namespaces(ctx.client.clone());
    let namespace_gateways = gateway_store.clone();
    let opted_in = format!("{NAMESPACE_INJECTION_LABEL}={NAMESPACE_INJECTION_ENABLED}");
    let pods = ctx
        .pods
        .clone()
        .unwrap_or_else(|| PodWatch::new(ctx.client.clone(), ctx.namespace.as_deref()));
    let mut events = pods.subscribe();
    let pod_events = futures::stream::poll_fn(move |cx| events.poll_recv(cx))
        .map(|event| Ok(Arc::unwrap_or_clone(event.pod().clone())));
    controller
        .owns(
            ctx.api::<ConfigMap>(),
            watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
        )
        // A namespace that opts in or out changes the membership of its pods without a pod
        // event; this also covers a pod event mapped before the store saw the new label.
        .watches(
            Api::<PartialObjectMeta<Namespace>>::all(ctx.client.clone()),
            watcher::Config::default().labels(&opted_in),
            move |namespace: PartialObjectMeta<Namespace>| {
                let ns = namespace.metadata.name.unwrap_or_default();
                namespace_gateways
                    .state()
                    .iter()
                    .filter(|gw| gw.namespace().as_deref() == Some(ns.as_str()))
                    .map(|gw| ObjectRef::from_obj(&**gw))
                    .collect::<Vec<_>>()
            },
        )
        .watches_stream(pod_events, move |pod: PodMeta| {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let opted_in = namespaces.get(&ObjectRef::new(&ns)).is_some();
            gateways_to_requeue(&pod.metadata, opted_in, || gateway_store.state())
        })
        .with_config(controller::Config::default().debounce(Duration::from_millis(200)))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => debug!(gateway = %obj, "reconciled"),
                Err(error) => debug!(%error, "reconcile failed"),
            }
        })
        .await;
    info!("controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(ns: &str, name: &str) -> Arc<AgentGateway> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "nanogate.io/v1alpha1", "kind": "AgentGateway",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"upstream": {"kind": "http", "url": "https://example.com",
                    "apiKeySecretRef": {"name": "k"}}}
            }))
            .unwrap(),
        )
    }

    fn pod(ns: &str, annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            ..membership::test_pod("p", annotations)
        }
    }

    fn names(refs: Vec<ObjectRef<AgentGateway>>) -> Vec<String> {
        let mut names: Vec<String> = refs
            .iter()
            .map(|r| format!("{}/{}", r.namespace.as_deref().unwrap_or(""), r.name))
            .collect();
        names.sort();
        names
    }

    /// The hub's and the reconciler's status writes leave the hash alone; what the reconcile
    /// reads from the object (spec, annotations, labels, deletion, identity) changes it.
    #[test]
    fn only_what_the_reconcile_reads_changes_its_inputs() {
        let base = (*gateway("shop", "a")).clone();
        let hash = |gw: &AgentGateway| reconcile_inputs(gw);
        let mut status_only = base.clone();
        status_only.status = Some(AgentGatewayStatus {
            config_hash: Some("abc".into()),
            ..Default::default()
        });
        status_only.metadata.resource_version = Some("42".into());
        assert_eq!(hash(&status_only), hash(&base));
        let changes: [fn(&mut AgentGateway); 5] = [
            |gw| gw.metadata.generation = Some(2),
            |gw| {
                gw.metadata.annotations =
                    Some([("nanogate.io/repair".into(), "rollout".into())].into())
            },
            |gw| gw.metadata.labels = Some([("team".into(), "a".into())].into()),
            |gw| gw.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH)),
            |gw| gw.metadata.uid = Some("other".into()),
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut changed = base.clone();
            change(&mut changed);
            assert_ne!(hash(&changed), hash(&base), "change {i}");
        }
    }

    #[test]
    fn a_pod_requeues_only_the_gateways_it_may_belong_to() {
        let gateways = [
            gateway("shop", "a"),
            gateway("shop", "b"),
            gateway("other", "c"),
        ];
        let requeue = |meta: &ObjectMeta, opted_in: bool| {
            names(gateways_to_requeue(meta, opted_in, || gateways.to_vec()))
        };
        assert!(
            requeue(&pod("shop", &[]), false).is_empty(),
            "an unrelated pod requeues nothing"
        );
        assert!(requeue(&pod("shop", &[("app", "x")]), false).is_empty());
        let injected = pod("shop", &[("nanogate.io/injected", r#"{"gateway":"b"}"#)]);
        assert_eq!(requeue(&injected, false), ["shop/b"]);
        assert_eq!(requeue(&injected, true), ["shop/b"]);
        assert!(requeue(&pod("shop", &[("nanogate.io/inject", "off")]), true).is_empty());
        // Opted in, naming none: any gateway of its own namespace may be its one.
        assert_eq!(requeue(&pod("shop", &[]), true), ["shop/a", "shop/b"]);
        assert_eq!(
            requeue(&pod("shop", &[("nanogate.io/inject", "true")]), false),
            ["shop/a", "shop/b"]
        );
        // The label opts in like the annotation (the chart's label-only webhook mode).
        let mut labelled = pod("shop", &[]);
        labelled.labels = Some([("nanogate.io/inject".to_string(), "true".to_string())].into());
        assert_eq!(requeue(&labelled, false), ["shop/a", "shop/b"]);
        let mut labelled_out = pod("shop", &[]);
        labelled_out.labels =
            Some([("nanogate.io/inject".to_string(), "false".to_string())].into());
        assert!(requeue(&labelled_out, true).is_empty());
    }
}
