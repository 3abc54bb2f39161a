//! Pure steps of the pipeline: the derived sidecar configuration, the ConfigMap that carries
//! it, and the desired status. No client here; everything is unit-tested from YAML fixtures.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;

use crate::crd::{
    AgentGateway, AgentGatewaySpec, AgentGatewayStatus, FieldError, LeftBehindStats, MessageStats,
    SidecarCounts, UpstreamStatus, conditions, parse_bytes, parse_duration, validate,
};
use crate::status::set_condition;

use crate::names::{
    API_KEY_ENV, CONFIG_HASH_ANNOTATION, GATEWAY_ANNOTATION, HUB_CA_KEY, MANAGED_BY,
    MANAGED_BY_LABEL, NATS_CREDENTIALS_DIR, TCP_TLS_DIR, UPSTREAM_CA_DIR, UPSTREAM_CLIENT_CERT_DIR,
};
pub use crate::names::{CONFIG_DIR, CONFIG_KEY, config_map_name};

use nanogate_protocol::sidecar_config::{self as file, LogLevel, OverflowPolicy, UpstreamKind};
/// The sidecar's configuration file and its parts: one definition shared with nano-agent,
/// which reads what [`sidecar_config`] derives (see `nanogate_protocol::sidecar_config`).
pub use nanogate_protocol::sidecar_config::{
    BatchingConfig, DeliveryConfig, SidecarConfig, SocketConfig, TcpConfig, UpstreamConfig,
};

fn ms(s: &str) -> u64 {
    parse_duration(s).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn u32_of(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// Derive the sidecar configuration. Validates first, so every duration parses.
pub fn sidecar_config(spec: &AgentGatewaySpec) -> Result<SidecarConfig, Vec<FieldError>> {
    validate(spec)?;
    let u = &spec.upstream;
    let b = &spec.batching;
    let d = &spec.delivery;
    let tls = u.tls.clone().unwrap_or_default();
    let kind = match u.kind {
        crate::crd::UpstreamKind::Http => UpstreamKind::Http,
        crate::crd::UpstreamKind::Socketio => UpstreamKind::Socketio,
        crate::crd::UpstreamKind::Nats => UpstreamKind::Nats,
    };
    // Socket.IO settings (with their defaults) only for `kind: socketio`.
    let socketio = (u.kind == crate::crd::UpstreamKind::Socketio)
        .then(|| u.socketio.clone().unwrap_or_default());
    Ok(SidecarConfig {
        version: file::VERSION,
        upstream: UpstreamConfig {
            kind,
            url: u.url.clone(),
            timeout_ms: ms(&u.timeout),
            api_key_env: API_KEY_ENV.into(),
            ca_file: tls
                .ca_secret_ref
                .as_ref()
                .map(|s| format!("{UPSTREAM_CA_DIR}/{}", s.key)),
            client_cert_file: tls
                .client_cert_secret_ref
                .as_ref()
                .map(|_| format!("{UPSTREAM_CLIENT_CERT_DIR}/tls.crt")),
            client_key_file: tls
                .client_cert_secret_ref
                .as_ref()
                .map(|_| format!("{UPSTREAM_CLIENT_CERT_DIR}/tls.key")),
            insecure_skip_verify: tls.insecure_skip_verify,
            msg_check_cache_ms: ms(&u.msg_check_cache),
            socketio_heartbeat_interval_ms: socketio.as_ref().map(|o| ms(&o.heartbeat_interval)),
            socketio_namespace: socketio.as_ref().map(|o| o.namespace.clone()),
            nats_subject: u.nats.as_ref().map(|o| o.subject.clone()),
            nats_stream: u.nats.as_ref().map(|o| o.stream.clone()),
            nats_durable_consumer: u.nats.as_ref().map(|o| o.durable_consumer.clone()),
            nats_inbox_subject: None,
            nats_creds_file: u
                .nats
                .as_ref()
                .and_then(|o| o.credentials_secret_ref.as_ref())
                .map(|s| format!("{NATS_CREDENTIALS_DIR}/{}", s.key)),
        },
        batching: BatchingConfig {
            flush_interval_ms: ms(&b.flush_interval),
            batch_size: u32_of(b.batch_size),
            min_batch_size: u32_of(b.min_batch_size),
            max_batch_size: u32_of(b.max_batch_size),
            scale_factor: b.scale_factor,
            max_queue_size: u32_of(b.max_queue_size),
            target_cpu_percent: b.target_cpu_percent,
            target_mem_percent: b.target_mem_percent,
            min_batch_interval_ms: ms(&b.min_batch_interval),
            max_batch_interval_ms: ms(&b.max_batch_interval),
        },
        delivery: DeliveryConfig {
            spool_size_limit_bytes: parse_bytes(&d.spool_size_limit).unwrap_or(0),
            sync_interval_ms: ms(&d.sync_interval),
            retry_initial_backoff_ms: ms(&d.retry_initial_backoff),
            retry_max_backoff_ms: ms(&d.retry_max_backoff),
            overflow_policy: match d.overflow_policy {
                crate::crd::OverflowPolicy::Reject => OverflowPolicy::Reject,
                crate::crd::OverflowPolicy::DropOldest => OverflowPolicy::DropOldest,
            },
        },
        socket: SocketConfig {
            path: spec.socket.path.clone(),
            max_message_size: u32_of(spec.socket.max_message_size),
            max_tags: u32_of(spec.socket.max_tags),
        },
        heartbeat_interval_ms: ms(&spec.heartbeat_interval),
        log_level: match spec.sidecar.log_level {
            crate::crd::LogLevel::Error => LogLevel::Error,
            crate::crd::LogLevel::Warn => LogLevel::Warn,
            crate::crd::LogLevel::Info => LogLevel::Info,
            crate::crd::LogLevel::Debug => LogLevel::Debug,
            crate::crd::LogLevel::Trace => LogLevel::Trace,
        },
        tcp: spec.tcp_listener.as_ref().map(|t| TcpConfig {
            listen: format!("0.0.0.0:{}", t.port),
            keepalive_interval_ms: ms(&t.keepalive_interval),
            keepalive_timeout_ms: ms(&t.keepalive_timeout),
            tls_cert_file: format!("{TCP_TLS_DIR}/tls.crt"),
            tls_key_file: format!("{TCP_TLS_DIR}/tls.key"),
        }),
    })
}

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

/// Sets `UpstreamTLSVerified` from the spec: `False` (reason `InsecureSkipVerify`) while the
/// sidecars skip certificate verification; `True` once they stop; left out for gateways that
/// never skipped it (their status is unchanged).
pub fn set_tls_verified(
    status: &mut AgentGatewayStatus,
    spec: &AgentGatewaySpec,
    generation: Option<i64>,
    now: &Time,
) {
    let insecure = spec
        .upstream
        .tls
        .as_ref()
        .is_some_and(|t| t.insecure_skip_verify);
    let c = &mut status.conditions;
    if insecure {
        set_condition(
            c,
            conditions::UPSTREAM_TLS_VERIFIED,
            "False",
            "InsecureSkipVerify",
            INSECURE_TLS_MESSAGE,
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
