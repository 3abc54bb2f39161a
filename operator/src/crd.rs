//! The `AgentGateway` custom resource (`nanogate.io/v1alpha1`).
//!
//! Defaults live here and only here: every field documents its default, and the documentation
//! becomes the `kubectl explain` description. Defaults follow the Tendrl agent's client
//! configuration (its socket path, batch sizes and intervals). Bounds the schema can express are schema bounds; cross-field rules and
//! string formats are checked by [`validate`], which both the reconciler and the validating
//! webhook call so users see the same message everywhere.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::names::DEFAULT_SOCKET_PATH;

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
    pub token_secret_ref: SecretKeySelector,
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
    #[serde(default = "default_upstream_url")]
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Secret (same namespace) and key holding the platform API key. The key is only ever
    /// placed in the sidecar's environment; it never appears in the ConfigMap or status.
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

/// A key in a Secret in the gateway's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret. Default `apiKey`.
    #[serde(default = "default_api_key_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
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
    pub ca_secret_ref: Option<SecretKeySelector>,
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
    pub credentials_secret_ref: Option<SecretKeySelector>,
}

/// What a NATS option names, for [`nats_name_problem`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum NatsName {
    Subject,
    Stream,
    Consumer,
}

/// Why `value` is not usable as a NATS subject template, stream or consumer name (the same
/// rules the sidecar applies at start), or `None`.
fn nats_name_problem(value: &str, kind: NatsName) -> Option<&'static str> {
    let filled = if kind == NatsName::Stream {
        value.to_string()
    } else {
        ["{namespace}", "{gateway}", "{pod}"]
            .iter()
            .fold(value.to_string(), |v, p| v.replace(p, "x"))
    };
    if filled.contains(['{', '}']) {
        return Some(if kind == NatsName::Stream {
            "must be a plain name (no placeholders)"
        } else {
            "has an unknown placeholder; use {namespace}, {gateway} or {pod}"
        });
    }
    let bad_char = |c: char| c.is_whitespace() || c == '*' || c == '>';
    match kind {
        NatsName::Subject if filled.split('.').any(str::is_empty) || filled.contains(bad_char) => {
            Some("must be dot-separated tokens without spaces or wildcards (* and >)")
        }
        NatsName::Stream | NatsName::Consumer
            if filled.is_empty()
                || filled.contains(|c| bad_char(c) || matches!(c, '.' | '/' | '\\')) =>
        {
            Some("must be a name without '.', '*', '>', '/' or spaces")
        }
        _ => None,
    }
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
    /// telemetry pipeline that prefers fresh data does during a long outage. The batch being
    /// delivered is never dropped. Dropped messages are counted (sidecar metric
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
    /// batch being delivered), counted in `status.messages.droppedOldestTotal` and the sidecar
    /// metric `nanogate_sidecar_dropped_oldest_total`, and logged as warnings. Choose
    /// `dropOldest` when fresh data matters more than old data (metrics, status), `reject` when
    /// every message must arrive or be refused to its sender.
    #[serde(default)]
    pub overflow_policy: OverflowPolicy,
}

impl Default for DeliverySpec {
    fn default() -> Self {
        Self {
            spool_size_limit: default_spool_size_limit(),
            sync_interval: default_sync_interval(),
            retry_initial_backoff: default_retry_initial_backoff(),
            retry_max_backoff: default_retry_max_backoff(),
            overflow_policy: OverflowPolicy::default(),
        }
    }
}

/// The application-facing Unix socket.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SocketSpec {
    /// Absolute path of the socket in every container. Default
    /// `/var/lib/tendrl/tendrl_agent.sock`; its directory is the shared volume's mount point.
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
    /// Container image of the nano-agent. Default `ghcr.io/nanogate/nano-agent:0.1.0`.
    #[serde(default = "default_sidecar_image")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,
    /// Compute resources of the sidecar. Default requests `cpu: 10m`, `memory: 16Mi`;
    /// limits `memory: 64Mi`. Pods may override with `nanogate.io/sidecar-*` annotations.
    #[serde(default = "default_sidecar_resources")]
    pub resources: ResourceRequirements,
    /// Log level: `error`, `warn`, `info` (default), `debug`, `trace`.
    #[serde(default)]
    pub log_level: LogLevel,
    /// Native sidecar mode: `auto` (default; native on clusters ≥ 1.29), `always`, `never`.
    #[serde(default)]
    pub native_sidecar: NativeSidecar,
}

impl Default for SidecarSpec {
    fn default() -> Self {
        Self {
            image: default_sidecar_image(),
            resources: default_sidecar_resources(),
            log_level: LogLevel::default(),
            native_sidecar: NativeSidecar::default(),
        }
    }
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
    "apiKey".into()
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
/// Default nano-agent image.
pub const DEFAULT_SIDECAR_IMAGE: &str = "ghcr.io/nanogate/nano-agent:0.1.0";
fn default_sidecar_image() -> String {
    DEFAULT_SIDECAR_IMAGE.into()
}
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

// ---------------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------------

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
            connected,
            healthy,
            current_config: 0,
            summary: format!("{connected}/{expected}"),
        }
    }

    /// The reconciler's view (`expected`, `notInjected`) over the hub's fields of `current`.
    pub fn with_pods(current: Option<&Self>, expected: i32, not_injected: i32) -> Self {
        let mut counts = current.cloned().unwrap_or_default();
        counts.expected = expected;
        counts.not_injected = not_injected;
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
    /// `Reachable`, `Unreachable` or `Unknown`.
    pub state: String,
    /// Most recent delivery error, if any.
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

// ---------------------------------------------------------------------------------------------
// Durations and quantities
// ---------------------------------------------------------------------------------------------

/// Parse a Kubernetes/Go-style duration (`250ms`, `5s`, `1m30s`, `1.5h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("is empty; use a duration such as \"250ms\" or \"5s\"".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{s:?} has no unit; use ms, s, m or h (e.g. \"5s\")"))?;
        if num_len == 0 {
            return Err(format!(
                "{s:?} is not a duration such as \"250ms\" or \"5s\""
            ));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("{s:?} is not a duration such as \"250ms\" or \"5s\""))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "{s:?} has unknown unit {other:?}; use ms, s, m or h"
                ));
            }
        };
        total += value * factor;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > 1e9 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parse a byte quantity such as `64Mi`, `1G` or `1048576`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let value: u64 = s[..split]
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as \"64Mi\""))?;
    let factor: u64 = match &s[split..] {
        "" => 1,
        "k" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => {
            return Err(format!(
                "{s:?} has unknown suffix {other:?}; use Ki, Mi or Gi"
            ));
        }
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// One problem with a spec, naming the field (`spec.batching.maxBatchSize`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field, e.g. `spec.batching.minBatchSize`.
    pub field: String,
    /// Human-readable message that names the field and says what is allowed.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Join field errors into one message (for conditions, events and admission responses).
pub fn join_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn fail(&mut self, field: &str, message: String) {
        self.errors.push(FieldError {
            field: field.to_string(),
            message,
        });
    }

    fn duration(&mut self, field: &str, value: &str) -> Option<Duration> {
        match parse_duration(value) {
            Ok(d) if d.is_zero() => {
                self.fail(
                    field,
                    format!("{field} ({value}) must be greater than zero"),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.fail(field, format!("{field}: {e}"));
                None
            }
        }
    }

    fn range<T: PartialOrd + fmt::Display>(&mut self, field: &str, v: T, min: T, max: T) {
        if v < min || v > max {
            self.fail(
                field,
                format!("{field} ({v}) must be between {min} and {max}"),
            );
        }
    }

    fn secret_key(&mut self, field: &str, sel: &SecretKeySelector) {
        if !is_dns_subdomain(&sel.name) {
            self.fail(
                &format!("{field}.name"),
                format!(
                    "{field}.name ({:?}) must be a valid Secret name (lower-case DNS subdomain)",
                    sel.name
                ),
            );
        }
        if sel.key.is_empty() {
            self.fail(
                &format!("{field}.key"),
                format!("{field}.key must not be empty"),
            );
        }
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Semantic validation the schema cannot express (cross-field rules, formats). Shared by the
/// reconciler (condition `ConfigValid=False`) and the validating webhook (denial).
pub fn validate(spec: &AgentGatewaySpec) -> Result<(), Vec<FieldError>> {
    let mut c = Checker { errors: Vec::new() };

    // upstream
    let u = &spec.upstream;
    let allowed: &[&str] = match u.kind {
        UpstreamKind::Http => &["http://", "https://"],
        UpstreamKind::Socketio => &["http://", "https://", "ws://", "wss://"],
        UpstreamKind::Nats => &["nats://", "tls://"],
    };
    let scheme_ok = allowed.iter().any(|p| {
        u.url
            .get(..p.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(p))
            && u.url.len() > p.len()
    });
    if !scheme_ok {
        c.fail(
            "spec.upstream.url",
            format!(
                "spec.upstream.url ({:?}) must start with {} for kind {}",
                u.url,
                allowed.join(" or "),
                u.kind.as_str()
            ),
        );
    } else if u.url.chars().any(char::is_whitespace) {
        c.fail(
            "spec.upstream.url",
            format!(
                "spec.upstream.url ({:?}) must not contain whitespace",
                u.url
            ),
        );
    }
    c.secret_key("spec.upstream.apiKeySecretRef", &u.api_key_secret_ref);
    if let Some(tls) = &u.tls {
        if let Some(ca) = &tls.ca_secret_ref {
            c.secret_key("spec.upstream.tls.caSecretRef", ca);
        }
        if let Some(cert) = &tls.client_cert_secret_ref
            && !is_dns_subdomain(&cert.name)
        {
            c.fail(
                "spec.upstream.tls.clientCertSecretRef.name",
                format!(
                    "spec.upstream.tls.clientCertSecretRef.name ({:?}) must be a valid Secret name",
                    cert.name
                ),
            );
        }
    }
    if let Some(t) = c.duration("spec.upstream.timeout", &u.timeout)
        && t > Duration::from_secs(600)
    {
        c.fail(
            "spec.upstream.timeout",
            format!("spec.upstream.timeout ({}) must be at most 10m", u.timeout),
        );
    }
    match parse_duration(&u.msg_check_cache) {
        Ok(window) if window > Duration::from_secs(10) => c.fail(
            "spec.upstream.msgCheckCache",
            format!(
                "spec.upstream.msgCheckCache ({}) must be at most 10s: inbound messages wait up to this long",
                u.msg_check_cache
            ),
        ),
        Ok(_) => {}
        Err(e) => c.fail(
            "spec.upstream.msgCheckCache",
            format!("spec.upstream.msgCheckCache: {e}"),
        ),
    }
    if let Some(o) = &u.socketio
        && let Some(hb) = c.duration(
            "spec.upstream.socketio.heartbeatInterval",
            &o.heartbeat_interval,
        )
        && !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&hb)
    {
        c.fail(
            "spec.upstream.socketio.heartbeatInterval",
            format!(
                "spec.upstream.socketio.heartbeatInterval ({}) must be between 1s and 5m",
                o.heartbeat_interval
            ),
        );
    }
    if u.socketio.is_some() && u.kind != UpstreamKind::Socketio {
        c.fail(
            "spec.upstream.socketio",
            format!(
                "spec.upstream.socketio is set but spec.upstream.kind is {}; set kind: socketio or remove it",
                u.kind.as_str()
            ),
        );
    }
    if let Some(creds) = u
        .nats
        .as_ref()
        .and_then(|n| n.credentials_secret_ref.as_ref())
    {
        c.secret_key("spec.upstream.nats.credentialsSecretRef", creds);
    }
    if let Some(n) = &u.nats {
        for (field, value, kind) in [
            ("spec.upstream.nats.subject", &n.subject, NatsName::Subject),
            ("spec.upstream.nats.stream", &n.stream, NatsName::Stream),
            (
                "spec.upstream.nats.durableConsumer",
                &n.durable_consumer,
                NatsName::Consumer,
            ),
        ] {
            if let Some(problem) = nats_name_problem(value, kind) {
                c.fail(field, format!("{field} ({value:?}) {problem}"));
            }
        }
    }
    if u.nats.is_some() && u.kind != UpstreamKind::Nats {
        c.fail(
            "spec.upstream.nats",
            format!(
                "spec.upstream.nats is set but spec.upstream.kind is {}; set kind: nats or remove it",
                u.kind.as_str()
            ),
        );
    }

    // batching
    let b = &spec.batching;
    c.duration("spec.batching.flushInterval", &b.flush_interval);
    c.range("spec.batching.minBatchSize", b.min_batch_size, 1, 10000);
    c.range("spec.batching.maxBatchSize", b.max_batch_size, 1, 10000);
    c.range("spec.batching.scaleFactor", b.scale_factor, 0.0, 1.0);
    c.range(
        "spec.batching.targetCPUPercent",
        b.target_cpu_percent,
        1.0,
        100.0,
    );
    c.range(
        "spec.batching.targetMemPercent",
        b.target_mem_percent,
        1.0,
        100.0,
    );
    if b.min_batch_size > b.max_batch_size {
        c.fail(
            "spec.batching.minBatchSize",
            format!(
                "spec.batching.minBatchSize ({}) must be ≤ spec.batching.maxBatchSize ({})",
                b.min_batch_size, b.max_batch_size
            ),
        );
    } else if b.batch_size < b.min_batch_size || b.batch_size > b.max_batch_size {
        c.fail(
            "spec.batching.batchSize",
            format!(
                "spec.batching.batchSize ({}) must be between spec.batching.minBatchSize ({}) and spec.batching.maxBatchSize ({})",
                b.batch_size, b.min_batch_size, b.max_batch_size
            ),
        );
    }
    if b.max_queue_size < b.max_batch_size {
        c.fail(
            "spec.batching.maxQueueSize",
            format!(
                "spec.batching.maxQueueSize ({}) must be ≥ spec.batching.maxBatchSize ({})",
                b.max_queue_size, b.max_batch_size
            ),
        );
    }
    let min_iv = c.duration("spec.batching.minBatchInterval", &b.min_batch_interval);
    let max_iv = c.duration("spec.batching.maxBatchInterval", &b.max_batch_interval);
    if let (Some(min), Some(max)) = (min_iv, max_iv)
        && min > max
    {
        c.fail(
            "spec.batching.minBatchInterval",
            format!(
                "spec.batching.minBatchInterval ({}) must be ≤ spec.batching.maxBatchInterval ({})",
                b.min_batch_interval, b.max_batch_interval
            ),
        );
    }

    // delivery
    let d = &spec.delivery;
    match parse_bytes(&d.spool_size_limit) {
        Ok(n) if n < 1 << 20 => c.fail(
            "spec.delivery.spoolSizeLimit",
            format!(
                "spec.delivery.spoolSizeLimit ({}) must be at least 1Mi",
                d.spool_size_limit
            ),
        ),
        Ok(_) => {}
        Err(e) => c.fail(
            "spec.delivery.spoolSizeLimit",
            format!("spec.delivery.spoolSizeLimit: {e}"),
        ),
    }
    c.duration("spec.delivery.syncInterval", &d.sync_interval);
    let ib = c.duration(
        "spec.delivery.retryInitialBackoff",
        &d.retry_initial_backoff,
    );
    let mb = c.duration("spec.delivery.retryMaxBackoff", &d.retry_max_backoff);
    if let (Some(ib), Some(mb)) = (ib, mb)
        && ib > mb
    {
        c.fail(
            "spec.delivery.retryInitialBackoff",
            format!(
                "spec.delivery.retryInitialBackoff ({}) must be ≤ spec.delivery.retryMaxBackoff ({})",
                d.retry_initial_backoff, d.retry_max_backoff
            ),
        );
    }

    // socket
    let s = &spec.socket;
    let dir_ok = s
        .path
        .rsplit_once('/')
        .is_some_and(|(dir, file)| !dir.is_empty() && !file.is_empty());
    if !s.path.starts_with('/') || !dir_ok || s.path.contains("//") || s.path.contains("/../") {
        c.fail(
            "spec.socket.path",
            format!(
                "spec.socket.path ({:?}) must be an absolute file path inside a directory, e.g. {DEFAULT_SOCKET_PATH}",
                s.path
            ),
        );
    } else if s.path.len() > 107 {
        c.fail(
            "spec.socket.path",
            format!(
                "spec.socket.path is {} bytes; Unix socket paths must be at most 107 bytes",
                s.path.len()
            ),
        );
    }
    c.range("spec.socket.maxTags", s.max_tags, 1, 100);
    c.range(
        "spec.socket.maxMessageSize",
        s.max_message_size,
        1024,
        16 << 20,
    );

    // sidecar
    let img = &spec.sidecar.image;
    if img.is_empty() || img.chars().any(char::is_whitespace) {
        c.fail(
            "spec.sidecar.image",
            format!(
                "spec.sidecar.image ({img:?}) must be a container image reference without spaces"
            ),
        );
    }

    if let Some(hb) = c.duration("spec.heartbeatInterval", &spec.heartbeat_interval)
        && (hb < Duration::from_secs(1) || hb > Duration::from_secs(300))
    {
        c.fail(
            "spec.heartbeatInterval",
            format!(
                "spec.heartbeatInterval ({}) must be between 1s and 5m",
                spec.heartbeat_interval
            ),
        );
    }

    if let Some(tcp) = &spec.tcp_listener {
        let interval = c.duration(
            "spec.tcpListener.keepaliveInterval",
            &tcp.keepalive_interval,
        );
        let timeout = c.duration("spec.tcpListener.keepaliveTimeout", &tcp.keepalive_timeout);
        if let (Some(interval), Some(timeout)) = (interval, timeout)
            && timeout <= interval
        {
            c.fail(
                "spec.tcpListener.keepaliveTimeout",
                format!(
                    "spec.tcpListener.keepaliveTimeout ({}) must be longer than keepaliveInterval ({})",
                    tcp.keepalive_timeout, tcp.keepalive_interval
                ),
            );
        }
    }

    if c.errors.is_empty() {
        Ok(())
    } else {
        Err(c.errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn nats_names_follow_the_sidecar_rules() {
        assert_eq!(
            nats_name_problem("nanogate.{namespace}.{gateway}", NatsName::Subject),
            None
        );
        assert_eq!(
            nats_name_problem("nanogate-{namespace}-{gateway}", NatsName::Consumer),
            None
        );
        assert_eq!(nats_name_problem("NANOGATE", NatsName::Stream), None);
        for (value, kind) in [
            ("a..b", NatsName::Subject),
            ("a.*", NatsName::Subject),
            ("a b", NatsName::Subject),
            ("a.{cluster}", NatsName::Subject),
            ("A.B", NatsName::Stream),
            ("S-{gateway}", NatsName::Stream),
            ("c.d", NatsName::Consumer),
            ("", NatsName::Consumer),
        ] {
            assert!(nats_name_problem(value, kind).is_some(), "{value}");
        }
    }

    #[test]
    fn bytes_parse() {
        assert_eq!(parse_bytes("64Mi").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("1Ti").is_err());
    }
}
