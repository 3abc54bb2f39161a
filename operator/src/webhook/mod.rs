//! Admission webhooks: `POST /mutate` injects the nano-agent sidecar into pods, `POST /validate`
//! checks AgentGateways. The decision is the pure [`inject::inject`]; this module parses the
//! `AdmissionReview`, asks the injected lookups, and answers; [`server`] serves it over rustls
//! with a hot-swappable certificate.
//!
//! Glue for the operator:
//! ```ignore
//! let state = WebhookState::new(lookup, validator, InjectorSettings::new(&ns), &registry)?;
//! let resolver = Arc::new(tls::CertResolver::from_pem(&cert_pem, &key_pem)?);
//! let tls = tls::tls_config(resolver.clone());
//! server::serve(TcpListener::bind(addr).await?, router(state), tls, shutdown).await?;
//! ```

pub mod cluster;
pub mod events;
pub mod inject;
pub mod server;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Json};
use axum::routing::post;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub use inject::{
    Decision, HubCaSource, Injection, InjectionConfig, InjectorSettings, KeyRef, KeyToPath,
    NativeSidecarMode, SecretMount, SidecarResources, SkipReason, inject, skip_patch,
    supports_native_sidecars,
};
pub use server::serve;

pub use crate::gateway::membership::InjectedRecord;

/// What `/mutate` needs to know about a namespace. The operator backs it with reflector
/// stores (Namespaces and AgentGateways); tests use fixed maps. Calls must be cheap and must
/// not block: they run on the admission path.
pub trait GatewayLookup: Send + Sync + 'static {
    /// Labels of the namespace, or `None` when it is unknown (treated as no labels).
    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>>;
    /// Injection configs of every valid AgentGateway in the namespace (any order).
    fn gateways(&self, namespace: &str) -> Vec<InjectionConfig>;
    /// The namespace's AgentGateways whose spec is invalid, each with its validation messages:
    /// they inject nothing, and a pod asking for one is told why, not that it does not exist.
    fn invalid_gateways(&self, _namespace: &str) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// A lookup from fixed maps, for tests and local runs.
#[derive(Clone, Debug, Default)]
pub struct StaticLookup {
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    pub gateways: BTreeMap<String, Vec<InjectionConfig>>,
    /// Per namespace: invalid gateways and why.
    pub invalid_gateways: BTreeMap<String, Vec<(String, String)>>,
}

impl StaticLookup {
    /// `namespace`, unlabelled, with one gateway, `gateway`: the documented defaults, this
    /// release's image, the API key in Secret `<gateway>-api-key`, key `api-key`.
    pub fn one_gateway(namespace: &str, gateway: &str) -> Self {
        let config = InjectionConfig::with_defaults(
            gateway,
            crate::crd::DEFAULT_SIDECAR_IMAGE,
            KeyRef {
                name: format!("{gateway}-api-key"),
                key: "api-key".into(),
            },
        );
        Self {
            namespace_labels: BTreeMap::from([(namespace.to_string(), BTreeMap::new())]),
            gateways: BTreeMap::from([(namespace.to_string(), vec![config])]),
            ..Self::default()
        }
    }
}

impl GatewayLookup for StaticLookup {
    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.namespace_labels.get(namespace).cloned()
    }

    fn gateways(&self, namespace: &str) -> Vec<InjectionConfig> {
        self.gateways.get(namespace).cloned().unwrap_or_default()
    }

    fn invalid_gateways(&self, namespace: &str) -> Vec<(String, String)> {
        self.invalid_gateways
            .get(namespace)
            .cloned()
            .unwrap_or_default()
    }
}

/// A `NoGateway` skip told truly: the gateway the pod names (or the namespace's only one)
/// may exist but be invalid, which is not the same as missing. `invalid` lists the namespace's
/// invalid gateways with their validation messages; `valid` counts its valid ones.
pub fn refine_skip(reason: SkipReason, invalid: &[(String, String)], valid: usize) -> SkipReason {
    let invalid_one = |name: &str| {
        invalid
            .iter()
            .find(|(n, _)| n == name)
            .map(|(name, why)| SkipReason::InvalidGateway {
                name: name.clone(),
                reason: why.clone(),
            })
    };
    match &reason {
        SkipReason::NoGateway {
            requested: Some(name),
        } => invalid_one(name).unwrap_or(reason),
        SkipReason::NoGateway { requested: None } if valid == 0 => match invalid {
            [(only, _)] => invalid_one(only).unwrap_or(reason),
            _ => reason,
        },
        _ => reason,
    }
}

/// Semantic validation of an AgentGateway for `/validate`; the object is the gateway as JSON.
/// `Err` carries messages shown to the user (the reconciler's messages). Any
/// `Fn(&serde_json::Value) -> Result<(), Vec<String>>` is one.
pub trait GatewayValidator: Send + Sync + 'static {
    fn validate(&self, gateway: &serde_json::Value) -> Result<(), Vec<String>>;
}

impl<F> GatewayValidator for F
where
    F: Fn(&serde_json::Value) -> Result<(), Vec<String>> + Send + Sync + 'static,
{
    fn validate(&self, gateway: &serde_json::Value) -> Result<(), Vec<String>> {
        self(gateway)
    }
}

/// One `/mutate` decision, handed to the [`AdmissionObserver`] (to emit events once the pod
/// exists, or on its owner when the pod has no name yet).
#[derive(Clone, Debug)]
pub struct InjectionOutcome {
    pub namespace: String,
    /// `metadata.name`, or `metadata.generateName` for pods created by controllers.
    pub pod_name: String,
    /// Whether `pod_name` is only the `generateName` prefix: the apiserver names (and gives a
    /// UID to) such a pod after admission, so the webhook cannot find it afterwards.
    pub generated_name: bool,
    /// The controller owner (e.g. the ReplicaSet), if any.
    pub owner: Option<OwnerReference>,
    pub dry_run: bool,
    pub result: Result<InjectedSummary, SkipReason>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectedSummary {
    pub gateway: String,
    pub config_generation: i64,
    pub native: bool,
}

/// Receives every `/mutate` decision. Must not block (spawn for API calls).
pub trait AdmissionObserver: Send + Sync + 'static {
    fn observe(&self, outcome: &InjectionOutcome);
}

impl<F> AdmissionObserver for F
where
    F: Fn(&InjectionOutcome) + Send + Sync + 'static,
{
    fn observe(&self, outcome: &InjectionOutcome) {
        self(outcome)
    }
}

/// `nanogate_webhook_*` metrics.
#[derive(Clone)]
pub struct WebhookMetrics {
    /// `result`: injected | skipped | allowed | denied | invalid | error; `reason`: the skip
    /// reason's metric label or a fixed word.
    pub requests: IntCounterVec,
    /// By `webhook`: mutate | validate.
    pub duration: HistogramVec,
}

impl WebhookMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "nanogate_webhook_requests_total",
                "Admission requests by result and reason",
            ),
            &["result", "reason"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "nanogate_webhook_duration_seconds",
                "Time to answer an admission request, from body received to response built",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
            ]),
            &["webhook"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self { requests, duration })
    }

    fn count(&self, result: &str, reason: &str) {
        self.requests.with_label_values(&[result, reason]).inc();
    }
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct WebhookState {
    lookup: Arc<dyn GatewayLookup>,
    validator: Arc<dyn GatewayValidator>,
    observer: Option<Arc<dyn AdmissionObserver>>,
    settings: Arc<InjectorSettings>,
    metrics: WebhookMetrics,
}

impl WebhookState {
    pub fn new(
        lookup: Arc<dyn GatewayLookup>,
        validator: Arc<dyn GatewayValidator>,
        settings: InjectorSettings,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        Ok(Self {
            lookup,
            validator,
            observer: None,
            settings: Arc::new(settings),
            metrics: WebhookMetrics::register(registry)?,
        })
    }

    #[must_use]
    pub fn with_observer(mut self, observer: Arc<dyn AdmissionObserver>) -> Self {
        self.observer = Some(observer);
        self
    }
}

/// The webhook routes: `POST /mutate`, `POST /validate`.
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/mutate", post(mutate_handler))
        .route("/validate", post(validate_handler))
        .with_state(state)
}

async fn mutate_handler(State(state): State<WebhookState>, body: Bytes) -> impl IntoResponse {
    Json(timed(&state, "mutate", || {
        review_json(&mutate(&state, &body))
    }))
}

async fn validate_handler(State(state): State<WebhookState>, body: Bytes) -> impl IntoResponse {
    Json(timed(&state, "validate", || validate(&state, &body)))
}

/// Runs `review` and records how long it took in the duration histogram under `kind`.
fn timed<T>(state: &WebhookState, kind: &str, review: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = review();
    state
        .metrics
        .duration
        .with_label_values(&[kind])
        .observe(start.elapsed().as_secs_f64());
    out
}

/// The review as JSON, with `response.patch` base64-encoded as the AdmissionReview API
/// documents for `[]byte` (kube-core serialises the bytes as a JSON array of numbers,
/// kube-rs/kube#1781).
pub fn review_json(review: &AdmissionReview<DynamicObject>) -> serde_json::Value {
    let mut value = serde_json::to_value(review).unwrap_or_else(|error| {
        // Unreachable in practice (plain data); answer something the apiserver can read.
        tracing::error!(%error, "AdmissionReview does not serialise");
        serde_json::json!({})
    });
    let patch = review.response.as_ref().and_then(|r| r.patch.clone());
    if let (Some(bytes), Some(slot)) = (patch, value.pointer_mut("/response/patch")) {
        *slot = serde_json::to_value(k8s_openapi::ByteString(bytes)).expect("base64 string");
    }
    value
}

/// Parse a review body; on failure, an `invalid` response that still carries the request's
/// uid and apiVersion when the body is JSON enough to have them.
fn parse(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, Box<AdmissionResponse>> {
    let invalid = |message: String| {
        let mut resp = AdmissionResponse::invalid(message);
        if let Ok(raw) = serde_json::from_slice::<serde_json::Value>(body) {
            if let Some(uid) = raw.pointer("/request/uid").and_then(|u| u.as_str()) {
                resp.uid = uid.to_string();
            }
            if let Some(v) = raw.get("apiVersion").and_then(|v| v.as_str()) {
                resp.types.api_version = v.to_string();
            }
        }
        Box::new(resp)
    };
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("malformed AdmissionReview: {e}")))?;
    review
        .try_into()
        .map_err(|e| invalid(format!("malformed AdmissionReview: {e}")))
}

/// The `/mutate` logic, independent of HTTP (also used by the admission bench).
pub fn mutate(state: &WebhookState, body: &[u8]) -> AdmissionReview<DynamicObject> {
    let req = match parse(body) {
        Ok(req) => req,
        Err(resp) => {
            state.metrics.count("invalid", "malformed_review");
            tracing::warn!(message = %resp.result.message, "mutate: malformed AdmissionReview");
            return (*resp).into_review();
        }
    };
    let resp = AdmissionResponse::from(&req);
    let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod" && req.sub_resource.is_none();
    if !is_pod || req.operation != Operation::Create {
        state.metrics.count("allowed", "not_a_pod_create");
        return resp.into_review();
    }
    let Some(object) = req.object.as_ref() else {
        state.metrics.count("allowed", "no_object");
        return resp.into_review();
    };
    // The webhook must never block pod creation because of a pod it cannot read: allow as is.
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(pod) => pod,
        Err(error) => {
            state.metrics.count("error", "unreadable_pod");
            tracing::warn!(%error, uid = %req.uid, "mutate: pod does not parse; admitted without injection");
            return resp.into_review();
        }
    };
    let namespace = req
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    let labels = state
        .lookup
        .namespace_labels(&namespace)
        .unwrap_or_default();
    let gateways = state.lookup.gateways(&namespace);
    let decision = match inject(&pod, &namespace, &labels, &gateways, &state.settings) {
        Decision::Skip(reason @ SkipReason::NoGateway { .. }) => Decision::Skip(refine_skip(
            reason,
            &state.lookup.invalid_gateways(&namespace),
            gateways.len(),
        )),
        decision => decision,
    };

    let pod_name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    let (review, result) = match decision {
        Decision::Skip(reason) => {
            state.metrics.count("skipped", reason.metric_label());
            if reason.is_notable() {
                tracing::info!(%namespace, pod = %pod_name, reason = reason.metric_label(), "injection skipped: {reason}");
            } else {
                tracing::debug!(%namespace, pod = %pod_name, reason = reason.metric_label(), "injection skipped");
            }
            if !reason.is_notable() {
                (resp.into_review(), Err(reason))
            } else {
                // The pod asked for a sidecar: say why it gets none, to whoever creates it
                // (a warning) and on the pod itself (an annotation `kubectl describe` shows).
                let warning = format!("nanogate: sidecar not injected: {reason}");
                match resp.clone().with_patch(inject::skip_patch(&pod, &reason)) {
                    Ok(mut patched) => {
                        patched.warnings = Some(vec![warning]);
                        (patched.into_review(), Err(reason))
                    }
                    Err(error) => {
                        tracing::error!(%error, "mutate: skip annotation does not serialise");
                        let mut warned = resp;
                        warned.warnings = Some(vec![warning]);
                        (warned.into_review(), Err(reason))
                    }
                }
            }
        }
        Decision::Inject(injection) => {
            let summary = InjectedSummary {
                gateway: injection.gateway.clone(),
                config_generation: injection.config_generation,
                native: injection.native,
            };
            match resp.clone().with_patch(injection.patch) {
                Ok(mut patched) => {
                    if !injection.warnings.is_empty() {
                        patched.warnings = Some(injection.warnings);
                    }
                    state.metrics.count("injected", "");
                    tracing::info!(%namespace, pod = %pod_name, gateway = %summary.gateway, native = summary.native, "injected");
                    (patched.into_review(), Ok(summary))
                }
                Err(error) => {
                    state.metrics.count("error", "patch_serialization");
                    tracing::error!(%error, "mutate: patch does not serialise; admitted without injection");
                    return resp.into_review();
                }
            }
        }
    };
    if let Some(observer) = &state.observer {
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .cloned();
        observer.observe(&InjectionOutcome {
            namespace,
            pod_name,
            generated_name: pod.metadata.name.is_none(),
            owner,
            dry_run: req.dry_run,
            result,
        });
    }
    review
}

/// The `/validate` logic, independent of HTTP.
pub fn validate(state: &WebhookState, body: &[u8]) -> AdmissionReview<DynamicObject> {
    let req = match parse(body) {
        Ok(req) => req,
        Err(resp) => {
            state.metrics.count("invalid", "malformed_review");
            return (*resp).into_review();
        }
    };
    let resp = AdmissionResponse::from(&req);
    let is_gateway = req.kind.group == crate::names::GROUP && req.kind.kind == "AgentGateway";
    let object = match (&req.object, req.operation) {
        (Some(object), Operation::Create | Operation::Update) if is_gateway => object,
        _ => {
            state.metrics.count("allowed", "not_validated");
            return resp.into_review();
        }
    };
    let value = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => {
            state.metrics.count("denied", "unreadable");
            return resp
                .deny(format!("the AgentGateway could not be read: {e}"))
                .into_review();
        }
    };
    match state.validator.validate(&value) {
        Ok(()) => {
            state.metrics.count("allowed", "valid");
            resp.into_review()
        }
        Err(messages) => {
            state.metrics.count("denied", "invalid_spec");
            tracing::info!(namespace = ?req.namespace, name = %req.name, ?messages, "AgentGateway denied");
            resp.deny(messages.join("; ")).into_review()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_gateway_that_exists_but_is_invalid_is_called_invalid() {
        let invalid = vec![(
            "shop".to_string(),
            "spec.batching.flushInterval …".to_string(),
        )];
        let named = SkipReason::NoGateway {
            requested: Some("shop".into()),
        };
        let refined = refine_skip(named, &invalid, 1);
        assert_eq!(refined.metric_label(), "invalid_gateway");
        assert!(
            refined
                .to_string()
                .contains("\"shop\" is invalid (spec.batching.flushInterval"),
            "{refined}"
        );
        let unnamed = SkipReason::NoGateway { requested: None };
        assert_eq!(
            refine_skip(unnamed.clone(), &invalid, 0).metric_label(),
            "invalid_gateway"
        );
        let other = SkipReason::NoGateway {
            requested: Some("other".into()),
        };
        assert_eq!(refine_skip(other.clone(), &invalid, 0), other);
        assert_eq!(refine_skip(unnamed.clone(), &[], 0), unnamed);
    }
}
