//! The sidecar's configuration file derived from a gateway's spec: durations and sizes
//! resolved, the files of mounted Secrets at their mount paths, the API key's environment
//! variable. The format is `nanogate_protocol::sidecar_config`, which nano-agent reads. Pure;
//! called once per gateway by [`super::validated::ValidatedGateway::new`].

use crate::crd::{AgentGatewaySpec, FieldError, parse_bytes, parse_duration, validate};
use crate::names::{
    API_KEY_ENV, NATS_CREDENTIALS_DIR, TCP_TLS_DIR, UPSTREAM_CA_DIR, UPSTREAM_CLIENT_CERT_DIR,
};

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
            // Unset: left out of the file, the agent's default applies (and the file of a
            // gateway that does not set it stays byte for byte as before).
            max_in_flight: d.max_in_flight.map(|n| u32::try_from(n).unwrap_or(1)),
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
