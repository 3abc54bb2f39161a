//! The sidecar's configuration file: the contract between the operator, which derives it from
//! an `AgentGateway` and writes it into the gateway's ConfigMap (`<gateway>-agent-config`, key
//! `config.json`, pretty JSON), and nano-agent, which reads it (mounted, and again on every
//! `reload` from the hub). Both sides use these types, so a setting one side writes is a
//! setting the other side reads.
//!
//! Units are in the field names: durations are integer milliseconds (`…_ms`), sizes integer
//! bytes. The file never carries a secret: the API key and the TCP token come from the
//! sidecar's environment, Secrets the injector mounts are named by file path.
//!
//! The format is versioned by its `version` field ([`VERSION`]); a reader refuses any other
//! version, and any field it does not know, with an error that names it (a setting silently
//! ignored would be the drift this type exists to prevent). A new optional setting is left out
//! of the file while unused (`skip_serializing_if`), so the files of gateways that do not use
//! it stay byte for byte the same (and keep their hash); a change an older agent cannot read
//! safely takes a new version.

use serde::{Deserialize, Serialize};

/// The format version this crate writes and reads.
pub const VERSION: u32 = 1;

/// The whole file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// Format version: [`VERSION`].
    pub version: u32,
    /// The platform and how to reach it.
    pub upstream: UpstreamConfig,
    /// Dynamic batching.
    pub batching: BatchingConfig,
    /// Spool and retry.
    pub delivery: DeliveryConfig,
    /// The application socket.
    pub socket: SocketConfig,
    /// Heartbeat interval on the control channel to the operator's hub.
    pub heartbeat_interval_ms: u64,
    /// Log level.
    pub log_level: LogLevel,
    /// The optional TCP listener (absent: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpConfig>,
}

/// Transport to the platform.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// The Tendrl platform HTTP API.
    Http,
    /// Socket.IO v5 over WebSocket (cloud protocol).
    Socketio,
    /// NATS JetStream.
    Nats,
}

/// What the sidecar does when its spool is full.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum OverflowPolicy {
    /// Answer `queue full, try again later` to the sender; nothing accepted is dropped.
    Reject,
    /// Drop the oldest spooled messages to make room for the new ones (counted).
    DropOldest,
}

/// Log level of the sidecar.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// The name each enum has in the file, and comparisons with it (`kind == "nats"`).
macro_rules! wire_names {
    ($($ty:ident { $($variant:ident => $name:literal),* $(,)? })*) => {$(
        impl $ty {
            /// The name in the file.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    )*};
}

wire_names! {
    UpstreamKind { Http => "http", Socketio => "socketio", Nats => "nats" }
    OverflowPolicy { Reject => "reject", DropOldest => "dropOldest" }
    LogLevel { Error => "error", Warn => "warn", Info => "info", Debug => "debug", Trace => "trace" }
}

/// Upstream part of [`SidecarConfig`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Transport.
    pub kind: UpstreamKind,
    /// Endpoint.
    pub url: String,
    /// Timeout of one request (with `socketio`: the wait for a batch's acknowledgement too).
    pub timeout_ms: u64,
    /// Environment variable holding the API key; the injector sets `TENDRL_KEY`, the only one
    /// the agent reads.
    pub api_key_env: String,
    /// PEM CA bundle to trust, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Client certificate chain (mTLS), when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    /// Its private key, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
    /// Do not verify the upstream's certificate.
    pub insecure_skip_verify: bool,
    /// How long an empty `msg_check` answer is repeated locally (0: ask every time).
    pub msg_check_cache_ms: u64,
    /// Socket.IO namespace (`socketio` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socketio_namespace: Option<String>,
    /// Interval of the `heartbeat` event to the platform (`socketio` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socketio_heartbeat_interval_ms: Option<u64>,
    /// Subject template (`nats` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_subject: Option<String>,
    /// JetStream stream (`nats` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_stream: Option<String>,
    /// Durable consumer `msg_check` reads from (`nats` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_durable_consumer: Option<String>,
    /// Inbox subject `msg_check` serves (`nats` only; the operator leaves it to the agent's
    /// default `nanogate-inbox.{namespace}.{gateway}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_inbox_subject: Option<String>,
    /// NATS credentials file (`nats` only), when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_creds_file: Option<String>,
}

/// Batching part of [`SidecarConfig`] (the knobs a reload applies live).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    pub flush_interval_ms: u64,
    pub batch_size: u32,
    pub min_batch_size: u32,
    pub max_batch_size: u32,
    pub scale_factor: f64,
    pub max_queue_size: u32,
    pub target_cpu_percent: f64,
    pub target_mem_percent: f64,
    pub min_batch_interval_ms: u64,
    pub max_batch_interval_ms: u64,
}

/// Batches nano-agent keeps outstanding at once when the file leaves
/// [`DeliveryConfig::max_in_flight`] out (the CRD's `spec.delivery.maxInFlight` unset): four
/// round trips overlap, so a platform 50 ms away no longer caps a pod at one batch per 50 ms.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 4;

/// Delivery part of [`SidecarConfig`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    pub spool_size_limit_bytes: u64,
    pub sync_interval_ms: u64,
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    pub overflow_policy: OverflowPolicy,
    /// Most batches outstanding at once (pipelined delivery; the spool is still acknowledged
    /// in order). Left out while the gateway does not set it: the agent's default,
    /// [`DEFAULT_MAX_IN_FLIGHT`], applies and the file (and its hash) stays as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

/// Socket part of [`SidecarConfig`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    pub path: String,
    pub max_message_size: u32,
    pub max_tags: u32,
}

/// TCP listener part of [`SidecarConfig`]. The token comes from the environment
/// (`NANOGATE_TCP_TOKEN`, from the gateway's Secret), never from this file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// `address:port` to listen on.
    pub listen: String,
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

/// Why a file is not a readable [`SidecarConfig`]. Each message names the field and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No `version` number.
    #[error(
        "sidecar config has no numeric `version`; it is the file the operator writes (version {VERSION})"
    )]
    NoVersion,
    /// A version this reader does not know.
    #[error(
        "sidecar config version {0} is not supported by this nano-agent (it reads version {VERSION}); upgrade the sidecar image (spec.sidecar.image) to the operator's version"
    )]
    UnsupportedVersion(u64),
    /// Not a version-1 file: unknown field, missing field, wrong type or value. Between the
    /// operator's own writer and reader only version skew does that.
    #[error(
        "sidecar config version {VERSION}: {0}; the operator and this nano-agent disagree on the file: use the sidecar image of the operator's release (spec.sidecar.image)"
    )]
    Invalid(#[from] serde_json::Error),
}

impl SidecarConfig {
    /// Reads a file given as a JSON value (a YAML reader can produce one too). The version is
    /// checked first, so a newer file is refused as such, not for its new fields.
    pub fn from_value(value: serde_json::Value) -> Result<Self, ReadError> {
        match value.get("version").map(serde_json::Value::as_u64) {
            None | Some(None) => Err(ReadError::NoVersion),
            Some(Some(v)) if v != u64::from(VERSION) => Err(ReadError::UnsupportedVersion(v)),
            Some(Some(_)) => Ok(serde_json::from_value(value)?),
        }
    }

    /// Reads the file's JSON text (errors carry the line and column).
    pub fn from_json(text: &str) -> Result<Self, ReadError> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        Self::from_value(value)?;
        Ok(serde_json::from_str(text)?)
    }

    /// The file's text: pretty JSON, fields in declaration order (stable, so its hash is).
    pub fn to_file(&self) -> String {
        // Plain structs of strings, numbers and enums without maps: serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Content hash (crc32 of [`Self::to_file`], 8 hex digits): the "config generation" the
    /// operator records on injected pods, the ConfigMap and `status.configHash`, and the agent
    /// reports (it computes the same crc32 over the file it read).
    pub fn hash(&self) -> String {
        format!("{:08x}", crc32fast::hash(self.to_file().as_bytes()))
    }
}

/// The file the operator writes for a gateway with every default: tests on both sides pin it
/// (the operator's in `operator/tests/pipeline.rs`, the agent's in its config reader).
#[doc(hidden)]
pub const DEFAULTS_FILE: &str = r#"{
  "version": 1,
  "upstream": {"kind": "http", "url": "https://app.tendrl.com/api", "timeout_ms": 10000, "msg_check_cache_ms": 100,
               "api_key_env": "TENDRL_KEY", "insecure_skip_verify": false},
  "batching": {"flush_interval_ms": 250, "batch_size": 10, "min_batch_size": 10,
               "max_batch_size": 200, "scale_factor": 0.5, "max_queue_size": 1000,
               "target_cpu_percent": 70.0, "target_mem_percent": 80.0,
               "min_batch_interval_ms": 100, "max_batch_interval_ms": 1000},
  "delivery": {"spool_size_limit_bytes": 67108864, "sync_interval_ms": 1000,
               "retry_initial_backoff_ms": 250, "retry_max_backoff_ms": 30000,
               "overflow_policy": "reject"},
  "socket": {"path": "/var/lib/tendrl/tendrl_agent.sock", "max_message_size": 1048576, "max_tags": 10},
  "heartbeat_interval_ms": 5000,
  "log_level": "info"
}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_reads_and_writes_back_the_same() {
        let file = SidecarConfig::from_json(DEFAULTS_FILE).unwrap();
        assert_eq!(file.upstream.kind, "http");
        assert_eq!(file.delivery.overflow_policy, OverflowPolicy::Reject);
        assert_eq!(file.log_level, LogLevel::Info);
        let again = SidecarConfig::from_json(&file.to_file()).unwrap();
        assert_eq!(again, file);
        assert_eq!(again.hash(), file.hash());
        assert_eq!(file.hash().len(), 8);
        let every_enum = DEFAULTS_FILE
            .replace(r#""kind": "http""#, r#""kind": "socketio""#)
            .replace(r#""reject""#, r#""dropOldest""#)
            .replace(r#""info""#, r#""trace""#);
        let file = SidecarConfig::from_json(&every_enum).unwrap();
        assert_eq!(
            (
                file.upstream.kind,
                file.delivery.overflow_policy,
                file.log_level
            ),
            (
                UpstreamKind::Socketio,
                OverflowPolicy::DropOldest,
                LogLevel::Trace
            )
        );
    }

    #[test]
    fn other_versions_and_unknown_settings_are_refused_by_name() {
        let error = |text: &str| SidecarConfig::from_json(text).unwrap_err().to_string();
        let e = error(&DEFAULTS_FILE.replace(r#""version": 1"#, r#""version": 2"#));
        assert!(e.contains("version 2") && e.contains("upgrade"), "{e}");
        let e = error(&DEFAULTS_FILE.replace(r#""version": 1,"#, ""));
        assert!(e.contains("`version`"), "{e}");
        let e =
            error(&DEFAULTS_FILE.replace(r#""max_tags": 10"#, r#""max_tags": 10, "max_tagz": 1"#));
        assert!(e.contains("max_tagz"), "{e}");
        let e = error(&DEFAULTS_FILE.replace(r#""reject""#, r#""dropNewest""#));
        assert!(e.contains("dropNewest") && e.contains("dropOldest"), "{e}");
        let e = error(&DEFAULTS_FILE.replace(r#""heartbeat_interval_ms": 5000,"#, ""));
        assert!(e.contains("heartbeat_interval_ms"), "{e}");
    }
}
