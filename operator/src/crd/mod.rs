//! The `AgentGateway` custom resource (`nanogate.io/v1alpha1`).
//!
//! Defaults live here and only here: every field documents its default, and the documentation
//! becomes the `kubectl explain` description. Defaults follow the Tendrl agent's client
//! configuration (its socket path, batch sizes and intervals). Bounds the schema can express are schema bounds; cross-field rules and
//! string formats are checked by [`validate`], which both the reconciler and the validating
//! webhook call so users see the same message everywhere.

//! Submodules: [`status`] (the observed state), [`units`] (durations and byte sizes),
//! [`validate`] (the rules the schema cannot express), [`upgrade`] (the operator keeping the
//! stored CRD current).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::names::DEFAULT_SOCKET_PATH;

mod status;
mod units;
pub mod upgrade;
mod validate;

pub use status::*;
pub use units::{parse_bytes, parse_duration, parse_quantity};
pub use validate::{FieldError, join_errors, validate, validate_gateway};

/// The CRD as YAML (what `nanogate-operator crd` prints and `crds/agentgateway.yaml` holds).
pub fn crd_yaml() -> anyhow::Result<String> {
    Ok(serde_yaml::to_string(&crd())?)
}

/// The CRD this operator serves, carrying its [`upgrade::SCHEMA_REVISION`].
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let mut crd = AgentGateway::crd();
    for version in &mut crd.spec.versions {
        let status = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("status"));
        // `status` is an `Option`, so the schema says `nullable`; the apiserver (1.20) then
        // publishes it untyped and server-side apply treats everything under it as atomic:
        // `conditions` would be one list owned by its last writer, not a map keyed on `type`
        // (seen in e2e: the hub's apply removed the reconciler's `Ready`). A status is never
        // written as null.
        if let Some(status) = status {
            status.nullable = None;
        }
    }
    crd.metadata.annotations = Some(BTreeMap::from([(
        upgrade::REVISION_ANNOTATION.to_string(),
        upgrade::SCHEMA_REVISION.to_string(),
    )]));
    crd
}

/// Duration strings: one or more `<number><unit>` groups, units `ms`, `s`, `m`, `h`
/// (e.g. `250ms`, `5s`, `1m30s`).
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// An AgentGateway describes one upstream message platform and how the nano-agent sidecars
/// injected for it batch, spool and deliver messages.
// Several `printcolumn(...)` entries repeat `type_ = "string"`; that is not a mistake.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "nanogate.io",
    version = "v1alpha1",
    kind = "AgentGateway",
    plural = "agentgateways",
    singular = "agentgateway",
    shortname = "agw",
    category = "nanogate",
    namespaced,
    status = "AgentGatewayStatus",
    derive = "PartialEq",
    doc = "An AgentGateway gives the pods that opt in a local nano-agent sidecar delivering their messages to one upstream platform.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the gateway's configuration is valid and applied"
    ),
    printcolumn(
        name = "Sidecars",
        type_ = "string",
        json_path = ".status.sidecars.summary",
        description = "Connected / expected sidecars"
    ),
    printcolumn(
        name = "Received/s",
        type_ = "number",
        json_path = ".status.messages.receivedPerSecond",
        description = "Messages received per second by all sidecars (60 s average)"
    ),
    printcolumn(
        name = "Dropped",
        type_ = "integer",
        json_path = ".status.messages.droppedTotal",
        description = "Messages rejected, dead-lettered or dropped from a full spool"
    ),
    printcolumn(
        name = "Left-Behind",
        type_ = "integer",
        json_path = ".status.leftBehind.messagesTotal",
        description = "Messages sidecars still held undelivered when they shut down"
    ),
    printcolumn(
        name = "Upstream",
        type_ = "string",
        json_path = ".status.upstream.state",
        description = "Upstream reachability as reported by the sidecars"
    ),
    // `-o wide` only (priority 1).
    printcolumn(
        name = "Healthy",
        type_ = "integer",
        json_path = ".status.sidecars.healthy",
        description = "Connected sidecars that are healthy",
        priority = 1
    ),
    printcolumn(
        name = "Delivered/s",
        type_ = "number",
        json_path = ".status.messages.deliveredPerSecond",
        description = "Messages the platform acknowledged per second (60 s average)",
        priority = 1
    ),
    printcolumn(
        name = "Config",
        type_ = "string",
        json_path = ".status.configHash",
        description = "Hash of the sidecar configuration the reconciler applied",
        priority = 1
    ),
    printcolumn(
        name = "On-Config",
        type_ = "integer",
        json_path = ".status.sidecars.currentConfig",
        description = "Connected sidecars running that configuration",
        priority = 1
    ),
    printcolumn(
        name = "Outdated",
        type_ = "integer",
        json_path = ".status.sidecars.outdated",
        description = "Injected pods whose sidecar (image or pod settings) is not what the operator injects now",
        priority = 1
    ),
    printcolumn(
        name = "Last-Report",
        type_ = "date",
        json_path = ".status.lastHeartbeatTime",
        description = "When a sidecar last reported",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentGatewaySpec {
    /// The upstream message platform the sidecars deliver to.
    pub upstream: UpstreamSpec,
    /// Dynamic batch sizing. Defaults follow the Tendrl client configuration.
    #[serde(default)]
    pub batching: BatchingSpec,
    /// Durable spool and retry policy between the queue and the upstream.
    #[serde(default)]
    pub delivery: DeliverySpec,
    /// The application-facing Unix socket inside each pod.
    #[serde(default)]
    pub socket: SocketSpec,
    /// The injected nano-agent container.
    #[serde(default)]
    pub sidecar: SidecarSpec,
    /// How often each sidecar reports its health to the operator. Default `5s`; between `1s`
    /// and `5m`.
    #[serde(default = "default_heartbeat_interval")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub heartbeat_interval: String,
    /// A TCP listener in each sidecar for clients outside the pod (newline-delimited JSON
    /// frames `data`/`ping`/`pong`/`keepalive`/`close`, as in SecureAgentMessaging). Off when
    /// absent. It listens
    /// on all interfaces, so it always requires TLS and a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_listener: Option<TcpListenerSpec>,
}

/// The sidecar's optional TCP listener.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpListenerSpec {
    /// Container port. Default `7070`.
    #[serde(default = "default_tcp_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,
    /// The sidecar sends `keepalive` this often. Default `10s`.
    #[serde(default = "default_tcp_keepalive_interval")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub keepalive_interval: String,
    /// A peer silent for this long (counted from its last frame) is dropped. Default `30s`;
    /// must exceed `keepaliveInterval`.
    #[serde(default = "default_tcp_keepalive_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub keepalive_timeout: String,
    /// Secret and key holding the token clients present in their first frame
    /// (`{"type":"auth","token":…}`). Required.
    pub token_secret_ref: TokenSecretKeySelector,
    /// Secret of type `kubernetes.io/tls` (`tls.crt`, `tls.key`) the listener serves. Required.
    pub tls_secret_ref: SecretReference,
}

/// Which transport the sidecars use to reach the platform.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// The Tendrl platform HTTP API (default).
    #[default]
    Http,
    /// Socket.IO v5 over WebSocket (cloud protocol).
    Socketio,
    /// NATS JetStream.
    Nats,
}

impl UpstreamKind {
    /// The lower-case name used in the spec and the sidecar configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Socketio => "socketio",
            Self::Nats => "nats",
        }
    }
}

/// The upstream message platform.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// Transport: `http` (default), `socketio` or `nats`.
    #[serde(default)]
    pub kind: UpstreamKind,
    /// Endpoint of the platform. Default `https://app.tendrl.com/api`. Scheme `http(s)://` for
    /// `http`; `http(s)://` or `ws(s)://` for `socketio`; `nats://` or `tls://` for `nats`.
    /// A plain-text URL (`http://`, `ws://`, `nats://` without `tls`) is allowed, but the API
    /// key then crosses the network in clear: the gateway shows `UpstreamTLSVerified=False`
    /// (reason `PlainText`) and a Warning event.
    #[serde(default = "default_upstream_url")]
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Secret (same namespace) and key holding the platform API key. Only the sidecar gets it:
    /// mounted as a file it re-reads (a rotated key applies without a restart), and in its
    /// environment for images before that; it never appears in the ConfigMap or status.
    pub api_key_secret_ref: SecretKeySelector,
    /// TLS settings for the upstream connection. Default: system roots, no client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// Timeout of one upstream request. Default `10s`.
    #[serde(default = "default_upstream_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub timeout: String,
    /// How long a sidecar repeats the platform's empty `msg_check` answer before asking it
    /// again: apps polling an empty inbox then cost the platform one request per window, not
    /// one per poll, and a message arriving meanwhile waits at most this long. `0s` asks on
    /// every poll. Not used with `kind: socketio`, whose messages are pushed to the sidecar.
    /// Default `100ms`, at most `10s`.
    #[serde(default = "default_msg_check_cache")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub msg_check_cache: String,
    /// Options for `kind: socketio`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socketio: Option<SocketIoOptions>,
    /// Options for `kind: nats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsOptions>,
}

/// References to one key of a Secret in the gateway's namespace, each its own type so that its
/// key defaults to what that Secret usually holds (`kubectl explain` shows each default).
macro_rules! secret_key_refs {
    ($($(#[$doc:meta])* $name:ident: $default:literal, $default_fn:literal, $key_doc:literal;)*) => {$(
        $(#[$doc])*
        #[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            /// Name of the Secret.
            #[schemars(length(min = 1, max = 253))]
            pub name: String,
            #[doc = $key_doc]
            #[serde(default = $default_fn)]
            #[schemars(length(min = 1, max = 253))]
            pub key: String,
        }

        impl $name {
            /// The key this reference uses when none is given.
            pub const DEFAULT_KEY: &'static str = $default;
        }
    )*};
}

secret_key_refs! {
    /// The Secret and key holding the platform API key.
    SecretKeySelector: "apiKey", "default_api_key_key", "Key within the Secret. Default `apiKey`.";
    /// The Secret and key holding a PEM CA bundle.
    CaSecretKeySelector: "ca.crt", "default_ca_key", "Key within the Secret. Default `ca.crt`.";
    /// The Secret and key holding the TCP listener's client token.
    TokenSecretKeySelector: "token", "default_token_key", "Key within the Secret. Default `token`.";
    /// The Secret and key holding a NATS credentials file.
    CredentialsSecretKeySelector: "nats.creds", "default_credentials_key",
        "Key within the Secret. Default `nats.creds`.";
}

/// A Secret in the gateway's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// TLS towards the upstream.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTls {
    /// Secret and key holding a PEM CA bundle to trust instead of the system roots.
    /// Default: none (system roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<CaSecretKeySelector>,
    /// Secret of type `kubernetes.io/tls` (`tls.crt`, `tls.key`) presented as the client
    /// certificate (mTLS). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretReference>,
    /// Skip verification of the upstream's certificate: the sidecars accept any certificate
    /// for any name, so the connection is encrypted but anyone on the path can read and change
    /// the messages and the API key. Default `false`. For test platforms with self-signed
    /// certificates; give their CA in `caSecretRef` instead where you can. While it is set the
    /// gateway has the condition `UpstreamTLSVerified=False` (reason `InsecureSkipVerify`), the
    /// operator records a Warning event `InsecureUpstreamTLS`, and every sidecar logs a warning
    /// at start.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// Socket.IO options.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SocketIoOptions {
    /// Socket.IO namespace. Default `/`.
    #[serde(default = "default_socketio_namespace")]
    pub namespace: String,
    /// Interval of the sidecar's `heartbeat` event to the platform. Default `5s`, between
    /// `1s` and `5m`. (A batch's acknowledgement is awaited for `spec.upstream.timeout`.)
    #[serde(default = "default_socketio_heartbeat_interval")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub heartbeat_interval: String,
}

/// NATS JetStream options.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsOptions {
    /// Subject template messages are published to: `{namespace}` and `{gateway}` are
    /// replaced by the gateway's (and `{pod}` by the pod's); a message's `dest` is appended as
    /// further tokens. Default `nanogate.{namespace}.{gateway}`.
    #[serde(default = "default_nats_subject")]
    pub subject: String,
    /// JetStream stream name; the sidecar creates it when missing. Default `NANOGATE`.
    #[serde(default = "default_nats_stream")]
    pub stream: String,
    /// Durable pull consumer `msg_check` reads from (placeholders as in `subject`); it is
    /// filtered on the gateway's inbox subject `nanogate-inbox.{namespace}.{gateway}`.
    /// Default `nanogate-{namespace}-{gateway}`.
    #[serde(default = "default_nats_consumer")]
    pub durable_consumer: String,
    /// Secret and key holding a NATS credentials file (`.creds`: JWT and NKey seed), mounted
    /// into the sidecar. Default: none; the API key is then sent as a NATS token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<CredentialsSecretKeySelector>,
}

/// Dynamic batch sizing (Tendrl client configuration).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchingSpec {
    /// Interval for flushing message batches. Default `250ms`.
    #[serde(default = "default_flush_interval")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub flush_interval: String,
    /// Default number of messages per batch. Default `10`; between `minBatchSize` and
    /// `maxBatchSize`.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: i32,
    /// Minimum number of messages per batch. Default `10`; must be ≤ `maxBatchSize`.
    #[serde(default = "default_min_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub min_batch_size: i32,
    /// Maximum number of messages per batch. Default `200`.
    #[serde(default = "default_max_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_batch_size: i32,
    /// Queue scaling factor for dynamic batch sizing. Default `0.5`; between `0` and `1`.
    #[serde(default = "default_scale_factor")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub scale_factor: f64,
    /// Maximum in-memory message queue size. Default `1000`; must be ≥ `maxBatchSize`.
    #[serde(default = "default_max_queue_size")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_queue_size: i32,
    /// Target CPU usage percentage for dynamic batch sizing. Default `70`.
    #[serde(default = "default_target_cpu_percent")]
    #[serde(rename = "targetCPUPercent")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub target_cpu_percent: f64,
    /// Target memory usage percentage for dynamic batch sizing. Default `80`.
    #[serde(default = "default_target_mem_percent")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub target_mem_percent: f64,
    /// Minimum time between batch sends. Default `100ms`; must be ≤ `maxBatchInterval`.
    #[serde(default = "default_min_batch_interval")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub min_batch_interval: String,
    /// Maximum time between batch sends. Default `1s`.
    #[serde(default = "default_max_batch_interval")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub max_batch_interval: String,
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self {
            flush_interval: default_flush_interval(),
            batch_size: default_batch_size(),
            min_batch_size: default_min_batch_size(),
            max_batch_size: default_max_batch_size(),
            scale_factor: default_scale_factor(),
            max_queue_size: default_max_queue_size(),
            target_cpu_percent: default_target_cpu_percent(),
            target_mem_percent: default_target_mem_percent(),
            min_batch_interval: default_min_batch_interval(),
            max_batch_interval: default_max_batch_interval(),
        }
    }
}

/// What the sidecar does when its spool is full.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum OverflowPolicy {
    /// Answer `queue full, try again later` to the sender (default): nothing accepted is
    /// lost, the application decides what to do.
    #[default]
    Reject,
    /// Keep accepting: drop the oldest undelivered messages to make room for new ones, as a
    /// telemetry pipeline that prefers fresh data does during a long outage. The batches being
    /// delivered are never dropped. Dropped messages are counted (sidecar metric
    /// `nanogate_sidecar_dropped_oldest_total`, `status.messages.droppedOldestTotal` and
    /// `droppedTotal`) and logged as warnings.
    DropOldest,
}

/// Durable spool and retry policy.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// Size cap of the on-disk spool, as a Kubernetes quantity. Default `64Mi`.
    #[serde(default = "default_spool_size_limit")]
    #[schemars(pattern(r"^[0-9]+(Ki|Mi|Gi|k|M|G)?$"))]
    pub spool_size_limit: String,
    /// How often the spool is synced to disk. Default `1s`.
    #[serde(default = "default_sync_interval")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub sync_interval: String,
    /// First retry delay after a failed delivery (full-jitter exponential backoff).
    /// Default `250ms`; must be ≤ `retryMaxBackoff`.
    #[serde(default = "default_retry_initial_backoff")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub retry_initial_backoff: String,
    /// Upper bound of the retry delay. Default `30s`.
    #[serde(default = "default_retry_max_backoff")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub retry_max_backoff: String,
    /// What to do when the spool (`spoolSizeLimit`) is full: `reject` (default) answers
    /// `queue full, try again later` to the sender and loses nothing it accepted;
    /// `dropOldest` accepts the new message and drops the oldest undelivered ones (never the
    /// batches being delivered), counted in `status.messages.droppedOldestTotal` and the sidecar
    /// metric `nanogate_sidecar_dropped_oldest_total`, and logged as warnings. Choose
    /// `dropOldest` when fresh data matters more than old data (metrics, status), `reject` when
    /// every message must arrive or be refused to its sender.
    #[serde(default)]
    pub overflow_policy: OverflowPolicy,
    /// Most batches the sidecar has outstanding with the platform at once (pipelined
    /// delivery). Default `4` when unset; between `1` and `64`; `1` sends one batch at a time.
    /// The spool is still acknowledged in order (a batch only once every earlier one is
    /// delivered or dead-lettered), so a restart never loses an accepted message; it resends
    /// at most the batches that were in flight. While the platform fails, the sidecar sends one
    /// batch at a time and opens up again, doubling, as batches succeed. Raise it when the
    /// platform is far away (throughput is about `maxInFlight × batch size / round trip`);
    /// each outstanding batch holds up to its batch's bytes in the sidecar's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_in_flight: Option<i32>,
}

impl Default for DeliverySpec {
    fn default() -> Self {
        Self {
            spool_size_limit: default_spool_size_limit(),
            sync_interval: default_sync_interval(),
            retry_initial_backoff: default_retry_initial_backoff(),
            retry_max_backoff: default_retry_max_backoff(),
            overflow_policy: OverflowPolicy::default(),
            max_in_flight: None,
        }
    }
}

/// The application-facing Unix socket.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SocketSpec {
    /// Absolute path of the socket in every container. Default
    /// `/var/lib/tendrl/tendrl_agent.sock`; its directory is the shared volume's mount point,
    /// so it must be in `/var/lib/tendrl` or `/run/nanogate` (or below): anywhere else the
    /// mount would hide the app's own files.
    #[serde(default = "default_socket_path")]
    #[schemars(length(min = 2, max = 107))]
    pub path: String,
    /// Largest accepted message in bytes. Default `1048576` (1 MiB).
    #[serde(default = "default_max_message_size")]
    #[schemars(range(min = 1024, max = 16777216))]
    pub max_message_size: i32,
    /// Most tags per message. Default `10`.
    #[serde(default = "default_max_tags")]
    #[schemars(range(min = 1, max = 100))]
    pub max_tags: i32,
}

impl Default for SocketSpec {
    fn default() -> Self {
        Self {
            path: default_socket_path(),
            max_message_size: default_max_message_size(),
            max_tags: default_max_tags(),
        }
    }
}

/// Sidecar log level.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Default.
    #[default]
    Info,
    /// Verbose.
    Debug,
    /// Very verbose.
    Trace,
}

impl LogLevel {
    /// The lower-case name (also a valid `RUST_LOG` level).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// Whether the sidecar is injected as a native sidecar (init container with
/// `restartPolicy: Always`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum NativeSidecar {
    /// Native when the cluster is ≥ 1.29 (default).
    #[default]
    Auto,
    /// Always native.
    Always,
    /// Never native: a regular container placed first.
    Never,
}

/// The injected nano-agent container.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Container image of the nano-agent. Absent: the operator's image (its
    /// `--sidecar-image`). Set, it must be the operator's image or one its administrator allows
    /// (`--allowed-sidecar-images`); any other is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// Compute resources of the sidecar. Default requests `cpu: 10m`, `memory: 16Mi`;
    /// limits `memory: 64Mi`. Pods may override with `nanogate.io/sidecar-*` annotations.
    #[serde(default = "default_sidecar_resources")]
    pub resources: ResourceRequirements,
    /// Log level: `error`, `warn`, `info` (default), `debug`, `trace`. A pod may override it
    /// with the `nanogate.io/sidecar-log-level` annotation.
    #[serde(default)]
    pub log_level: LogLevel,
    /// Port of the sidecar's admin server (`/metrics`, `/healthz`, `/readyz`; the container
    /// port named `nanogate-admin`, which the probes and the PodMonitor use). Default `9091`;
    /// between 1024 and 65535, and not `spec.tcpListener.port`. Change it when apps listen on
    /// 9091; a pod may override it with the `nanogate.io/sidecar-admin-port` annotation. A pod
    /// whose app container declares the same port is not injected (the reason is on the pod).
    #[serde(default = "default_admin_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub admin_port: i32,
    /// Native sidecar mode: `auto` (default; native on clusters ≥ 1.29), `always`, `never`.
    #[serde(default)]
    pub native_sidecar: NativeSidecar,
}

impl Default for SidecarSpec {
    fn default() -> Self {
        Self {
            image: None,
            resources: default_sidecar_resources(),
            log_level: LogLevel::default(),
            admin_port: default_admin_port(),
            native_sidecar: NativeSidecar::default(),
        }
    }
}

fn default_admin_port() -> i32 {
    i32::from(crate::names::SIDECAR_ADMIN_PORT)
}

fn default_heartbeat_interval() -> String {
    "5s".into()
}
fn default_tcp_port() -> i32 {
    7070
}
fn default_tcp_keepalive_interval() -> String {
    "10s".into()
}
fn default_tcp_keepalive_timeout() -> String {
    "30s".into()
}
fn default_upstream_url() -> String {
    "https://app.tendrl.com/api".into()
}
fn default_api_key_key() -> String {
    SecretKeySelector::DEFAULT_KEY.into()
}
fn default_ca_key() -> String {
    CaSecretKeySelector::DEFAULT_KEY.into()
}
fn default_token_key() -> String {
    TokenSecretKeySelector::DEFAULT_KEY.into()
}
fn default_credentials_key() -> String {
    CredentialsSecretKeySelector::DEFAULT_KEY.into()
}
fn default_upstream_timeout() -> String {
    "10s".into()
}
fn default_socketio_namespace() -> String {
    "/".into()
}
impl Default for SocketIoOptions {
    fn default() -> Self {
        Self {
            namespace: default_socketio_namespace(),
            heartbeat_interval: default_socketio_heartbeat_interval(),
        }
    }
}
fn default_socketio_heartbeat_interval() -> String {
    "5s".into()
}
fn default_msg_check_cache() -> String {
    "100ms".into()
}
fn default_nats_subject() -> String {
    "nanogate.{namespace}.{gateway}".into()
}
fn default_nats_stream() -> String {
    "NANOGATE".into()
}
fn default_nats_consumer() -> String {
    "nanogate-{namespace}-{gateway}".into()
}
fn default_flush_interval() -> String {
    "250ms".into()
}
fn default_batch_size() -> i32 {
    10
}
fn default_min_batch_size() -> i32 {
    10
}
fn default_max_batch_size() -> i32 {
    200
}
fn default_scale_factor() -> f64 {
    0.5
}
fn default_max_queue_size() -> i32 {
    1000
}
fn default_target_cpu_percent() -> f64 {
    70.0
}
fn default_target_mem_percent() -> f64 {
    80.0
}
fn default_min_batch_interval() -> String {
    "100ms".into()
}
fn default_max_batch_interval() -> String {
    "1s".into()
}
fn default_spool_size_limit() -> String {
    "64Mi".into()
}
fn default_sync_interval() -> String {
    "1s".into()
}
fn default_retry_initial_backoff() -> String {
    "250ms".into()
}
fn default_retry_max_backoff() -> String {
    "30s".into()
}
fn default_socket_path() -> String {
    DEFAULT_SOCKET_PATH.into()
}
fn default_max_message_size() -> i32 {
    1024 * 1024
}
fn default_max_tags() -> i32 {
    10
}
/// This release's nano-agent image: the default of `--sidecar-image`.
pub const DEFAULT_SIDECAR_IMAGE: &str = "ghcr.io/nanogate/nano-agent:0.1.0";
/// The value the CRD used to default `spec.sidecar.image` to; stored gateways still carry it.
/// It was never chosen by the gateway's editor, so it stands for the operator's image.
pub const LEGACY_DEFAULT_SIDECAR_IMAGE: &str = "ghcr.io/nanogate/nano-agent:0.1.0";
fn default_sidecar_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("10m".into())),
            ("memory".to_string(), Quantity("16Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("64Mi".into()),
        )])),
        ..Default::default()
    }
}
