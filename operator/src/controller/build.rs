//! Pure steps of the reconciler: the ConfigMap that carries a validated gateway's sidecar
//! configuration, and the desired status. No client here; everything is unit-tested from YAML
//! fixtures.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;

use crate::crd::{
    AgentGateway, AgentGatewaySpec, AgentGatewayStatus, LeftBehindStats, MessageStats,
    SidecarCounts, UpstreamKind, UpstreamStatus, conditions,
};
use crate::status::set_condition;

pub use crate::names::{CONFIG_DIR, CONFIG_KEY, config_map_name};
use crate::names::{
    CONFIG_HASH_ANNOTATION, GATEWAY_ANNOTATION, HUB_CA_KEY, MANAGED_BY, MANAGED_BY_LABEL,
};

pub use crate::gateway::sidecar_config::{SidecarConfig, sidecar_config};

/// Identity of the gateway a child is built for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRef {
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

impl GatewayRef {
    fn owner_reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: AgentGateway::api_version(&()).into_owned(),
            kind: AgentGateway::kind(&()).into_owned(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }
}

/// Labels on everything the operator creates for a gateway.
pub fn child_labels(gateway: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (GATEWAY_ANNOTATION.to_string(), gateway.to_string()),
    ])
}

/// The ConfigMap carrying the sidecar configuration, owned by the gateway (deleting the
/// gateway garbage-collects it). Built as a server-side-apply body.
pub fn config_map(gw: &GatewayRef, cfg: &SidecarConfig) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(&gw.name)),
            namespace: Some(gw.namespace.clone()),
            labels: Some(child_labels(&gw.name)),
            annotations: Some(BTreeMap::from([(
                CONFIG_HASH_ANNOTATION.to_string(),
                cfg.hash(),
            )])),
            owner_references: Some(vec![gw.owner_reference()]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), cfg.to_file())])),
        ..Default::default()
    }
}

/// Adds the hub's CA (PEM) under [`HUB_CA_KEY`]; the injector mounts that key
/// into the sidecar (`/etc/nanogate-hub-ca/ca.crt`).
pub fn with_hub_ca(mut cm: ConfigMap, hub_ca: Option<&str>) -> ConfigMap {
    if let Some(pem) = hub_ca {
        cm.data
            .get_or_insert_with(BTreeMap::new)
            .insert(HUB_CA_KEY.to_string(), pem.to_string());
    }
    cm
}

/// Whether the live ConfigMap already carries everything `desired` sets (our SSA would be a
/// no-op). Extra labels/annotations added by others are ignored.
pub fn config_map_up_to_date(live: &ConfigMap, desired: &ConfigMap) -> bool {
    let subset = |have: &Option<BTreeMap<String, String>>,
                  want: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let owners_ok = desired.metadata.owner_references.iter().flatten().all(|o| {
        live.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|l| l == o)
    });
    live.data == desired.data
        && subset(&live.metadata.labels, &desired.metadata.labels)
        && subset(&live.metadata.annotations, &desired.metadata.annotations)
        && owners_ok
}

/// What dereference + validation concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Valid; the configuration with this hash is applied to the named ConfigMap.
    Applied { config_map: String, hash: String },
    /// A referenced Secret or key is missing.
    SecretMissing(String),
    /// The spec failed semantic validation.
    Invalid(String),
}

/// Message for conditions/events, bounded to the API's 32 KiB condition message limit.
fn bounded(msg: &str) -> String {
    const MAX: usize = 4096;
    if msg.len() <= MAX {
        return msg.to_string();
    }
    let mut end = MAX;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &msg[..end])
}

/// The status the reconciler wants, starting from the current one. Fields owned by the hub
/// (connected/healthy counts, messages, upstream, `UpstreamReachable`, `SidecarsHealthy`) are
/// kept as they are, and only initialised when absent.
pub fn desired_status(
    current: Option<&AgentGatewayStatus>,
    generation: Option<i64>,
    verdict: &Verdict,
    pods: &super::repair::Census,
    now: &Time,
) -> AgentGatewayStatus {
    let mut st = current.cloned().unwrap_or_default();
    st.observed_generation = generation;
    let (valid, reason, message) = match verdict {
        Verdict::Applied { .. } => (
            true,
            "Valid",
            "The spec is valid and all referenced Secrets exist".to_string(),
        ),
        Verdict::SecretMissing(m) => (false, "SecretMissing", bounded(m)),
        Verdict::Invalid(m) => (false, "InvalidSpec", bounded(m)),
    };
    let c = &mut st.conditions;
    set_condition(
        c,
        conditions::CONFIG_VALID,
        if valid { "True" } else { "False" },
        reason,
        &message,
        generation,
        now,
    );
    match verdict {
        Verdict::Applied { config_map, hash } => {
            set_condition(
                c,
                conditions::READY,
                "True",
                "ConfigApplied",
                &format!("Sidecar configuration {hash} applied to ConfigMap {config_map}"),
                generation,
                now,
            );
            st.config_hash = Some(hash.clone());
        }
        _ => set_condition(
            c,
            conditions::READY,
            "False",
            reason,
            &message,
            generation,
            now,
        ),
    }
    for t in [conditions::UPSTREAM_REACHABLE, conditions::SIDECARS_HEALTHY] {
        if !c.iter().any(|x| x.type_ == t) {
            set_condition(
                c,
                t,
                "Unknown",
                "AwaitingSidecars",
                "No sidecar has reported yet",
                generation,
                now,
            );
        }
    }
    st.sidecars = Some(SidecarCounts::with_pods(
        st.sidecars.as_ref(),
        pods.expected,
        pods.not_injected_count(),
        pods.outdated_count(),
    ));
    if st.messages.is_none() {
        st.messages = Some(MessageStats::default());
    }
    if st.upstream.is_none() {
        st.upstream = Some(UpstreamStatus {
            state: "Unknown".into(),
            last_error: None,
        });
    }
    // Zero until a sidecar reports (the hub adds to it), so `kubectl get` shows 0, not <none>.
    if st.left_behind.is_none() {
        st.left_behind = Some(LeftBehindStats::default());
    }
    st
}

/// Message of `UpstreamTLSVerified=False` and of the `InsecureUpstreamTLS` event.
pub const INSECURE_TLS_MESSAGE: &str = "spec.upstream.tls.insecureSkipVerify is true: sidecars accept any certificate from the upstream, so anyone on the path can read and change the messages and the API key; give the upstream's CA in spec.upstream.tls.caSecretRef and set insecureSkipVerify to false";

/// Why the sidecars' traffic to the upstream is not protected by verified TLS, if it is not:
/// `(condition reason, event reason, message)`. Both are allowed (a platform inside the
/// cluster, a test bench), but never silently: the API key travels with every request.
pub fn upstream_exposure(spec: &AgentGatewaySpec) -> Option<(&'static str, &'static str, String)> {
    let u = &spec.upstream;
    let tls = u.tls.as_ref();
    if tls.is_some_and(|t| t.insecure_skip_verify) {
        return Some((
            "InsecureSkipVerify",
            "InsecureUpstreamTLS",
            INSECURE_TLS_MESSAGE.into(),
        ));
    }
    let scheme = u
        .url
        .split("://")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    // A NATS client given a CA or client certificate requires TLS whatever the scheme.
    let nats_tls =
        tls.is_some_and(|t| t.ca_secret_ref.is_some() || t.client_cert_secret_ref.is_some());
    let plain = match scheme.as_str() {
        "http" | "ws" => true,
        "nats" => !nats_tls,
        _ => false,
    };
    plain.then(|| {
        (
            "PlainText",
            "PlainTextUpstream",
            format!(
                "spec.upstream.url {:?} is plain text: the API key and every message cross the network unencrypted; use {} for the upstream",
                u.url,
                match u.kind {
                    UpstreamKind::Nats => "tls:// or give spec.upstream.tls.caSecretRef",
                    UpstreamKind::Socketio => "https:// or wss://",
                    UpstreamKind::Http => "https://",
                }
            ),
        )
    })
}

/// Sets `UpstreamTLSVerified` from the spec: `False` while the upstream is plain text (reason
/// `PlainText`) or its certificate is not verified (`InsecureSkipVerify`); `True` once neither
/// holds; left out for gateways that never had either (their status is unchanged).
pub fn set_tls_verified(
    status: &mut AgentGatewayStatus,
    spec: &AgentGatewaySpec,
    generation: Option<i64>,
    now: &Time,
) {
    let c = &mut status.conditions;
    if let Some((reason, _, message)) = upstream_exposure(spec) {
        set_condition(
            c,
            conditions::UPSTREAM_TLS_VERIFIED,
            "False",
            reason,
            &message,
            generation,
            now,
        );
    } else if c
        .iter()
        .any(|x| x.type_ == conditions::UPSTREAM_TLS_VERIFIED)
    {
        set_condition(
            c,
            conditions::UPSTREAM_TLS_VERIFIED,
            "True",
            "Verified",
            "Sidecars verify the upstream's certificate",
            generation,
            now,
        );
    }
}
