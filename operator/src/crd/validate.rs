//! The rules of a gateway spec the schema cannot express (cross-field rules, formats).
//! Shared by the reconciler (`ConfigValid=False`) and the validating webhook (denial).

use std::fmt;
use std::time::Duration;

use super::*;

/// Where a socket may be: its directory is mounted into every app container, so it must be
/// one only nanogate uses — anywhere else (`/usr/local/bin`, `/etc/ssl`) the mount would hide
/// the app's own files, and whoever may edit a gateway could break or subvert every app.
pub const SOCKET_DIR_ROOTS: [&str; 2] = ["/var/lib/tendrl", "/run/nanogate"];

/// The longest gateway name: it becomes the value of the pod label
/// `nanogate.io/injected-gateway`, and label values are at most 63 characters.
const MAX_GATEWAY_NAME: usize = 63;

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

    /// A duration that must be > 0. The sidecar receives whole milliseconds, so a value that
    /// rounds down to 0 ms (`0.1ms`) would reach it as 0.
    fn duration(&mut self, field: &str, value: &str) -> Option<Duration> {
        match parse_duration(value) {
            Ok(d) if d.is_zero() => {
                self.fail(
                    field,
                    format!("{field} ({value}) must be greater than zero"),
                );
                None
            }
            Ok(d) if d.as_millis() == 0 => {
                self.fail(
                    field,
                    format!(
                        "{field} ({value}) rounds to 0ms; the sidecar counts whole milliseconds, so use at least 1ms"
                    ),
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

    fn secret_key(&mut self, field: &str, name: &str, key: &str) {
        self.secret_name(field, name);
        if !is_config_key(key) {
            self.fail(
                &format!("{field}.key"),
                format!(
                    "{field}.key ({key:?}) must be a valid Secret key (letters, digits, '-', '_' or '.')"
                ),
            );
        }
    }

    fn secret_name(&mut self, field: &str, name: &str) {
        if !is_dns_subdomain(name) {
            self.fail(
                &format!("{field}.name"),
                format!(
                    "{field}.name ({name:?}) must be a valid Secret name (lower-case DNS subdomain)"
                ),
            );
        }
    }

    /// `spec.sidecar.resources`, as the API server will check the injected container: only
    /// `cpu` and `memory` (the injector copies nothing else), valid non-negative quantities,
    /// and each request at most its limit.
    fn resources(&mut self, r: &ResourceRequirements) {
        const FIELD: &str = "spec.sidecar.resources";
        let mut parsed = |section: &str, map: &Option<BTreeMap<String, Quantity>>| {
            let mut values = BTreeMap::new();
            for (name, q) in map.iter().flatten() {
                let field = format!("{FIELD}.{section}.{name}");
                if name != "cpu" && name != "memory" {
                    self.fail(
                        &field,
                        format!("{field}: only cpu and memory can be set for the sidecar"),
                    );
                    continue;
                }
                match parse_quantity(&q.0) {
                    Ok(v) if v < 0.0 => {
                        self.fail(&field, format!("{field} ({}) must not be negative", q.0))
                    }
                    Ok(v) => {
                        values.insert(name.clone(), (v, q.0.clone()));
                    }
                    Err(e) => self.fail(&field, format!("{field}: {e}")),
                }
            }
            values
        };
        let requests = parsed("requests", &r.requests);
        let limits = parsed("limits", &r.limits);
        for (name, (request, request_text)) in &requests {
            if let Some((limit, limit_text)) = limits.get(name)
                && request > limit
            {
                let field = format!("{FIELD}.requests.{name}");
                self.fail(
                    &field,
                    format!(
                        "{field} ({request_text}) must be less than or equal to {FIELD}.limits.{name} ({limit_text})"
                    ),
                );
            }
        }
        if r.claims.as_ref().is_some_and(|c| !c.is_empty()) {
            self.fail(
                &format!("{FIELD}.claims"),
                format!("{FIELD}.claims: resource claims are not supported for the sidecar"),
            );
        }
    }
}

/// A Secret or ConfigMap key as the API server accepts it (also the file name it is mounted as).
fn is_config_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether a label value of `s` is valid (at most 63 characters, alphanumerics at the ends).
fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && (s.is_empty()
            || (s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())))
}

/// [`validate`] plus the rules on the gateway's name: it is written into every injected pod
/// (label `nanogate.io/injected-gateway`) and names its ConfigMap. The validating webhook and
/// the reconciler both call this.
pub fn validate_gateway(gateway: &AgentGateway) -> Result<(), Vec<FieldError>> {
    let mut errors = validate(&gateway.spec).err().unwrap_or_default();
    let name = gateway.metadata.name.as_deref().unwrap_or_default();
    if !is_label_value(name) || name.len() > MAX_GATEWAY_NAME {
        errors.push(FieldError {
            field: "metadata.name".into(),
            message: format!(
                "metadata.name ({name:?}) must be at most {MAX_GATEWAY_NAME} characters: it becomes the value of the pod label nanogate.io/injected-gateway"
            ),
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
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
    c.secret_key(
        "spec.upstream.apiKeySecretRef",
        &u.api_key_secret_ref.name,
        &u.api_key_secret_ref.key,
    );
    if let Some(tls) = &u.tls {
        if let Some(ca) = &tls.ca_secret_ref {
            c.secret_key("spec.upstream.tls.caSecretRef", &ca.name, &ca.key);
        }
        if let Some(cert) = &tls.client_cert_secret_ref {
            c.secret_name("spec.upstream.tls.clientCertSecretRef", &cert.name);
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
        c.secret_key(
            "spec.upstream.nats.credentialsSecretRef",
            &creds.name,
            &creds.key,
        );
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
    if let Some(n) = d.max_in_flight {
        c.range("spec.delivery.maxInFlight", n, 1, 64);
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
    } else if !s.path.rsplit_once('/').is_some_and(|(dir, _)| {
        SOCKET_DIR_ROOTS
            .iter()
            .any(|root| dir == *root || dir.strip_prefix(root).is_some_and(|r| r.starts_with('/')))
    }) {
        c.fail(
            "spec.socket.path",
            format!(
                "spec.socket.path ({:?}) must be in {} or a directory below one: its directory is mounted into every app container, and elsewhere it would hide the app's own files",
                s.path,
                SOCKET_DIR_ROOTS.join(" or ")
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
    c.resources(&spec.sidecar.resources);
    // Whether the operator allows the image is its configuration (`gateway::image`).
    if let Some(img) = &spec.sidecar.image
        && (img.is_empty() || img.chars().any(char::is_whitespace))
    {
        c.fail(
            "spec.sidecar.image",
            format!(
                "spec.sidecar.image ({img:?}) must be a container image reference without spaces"
            ),
        );
    }

    let admin_port = spec.sidecar.admin_port;
    c.range("spec.sidecar.adminPort", admin_port, 1024, 65535);

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
        c.secret_key(
            "spec.tcpListener.tokenSecretRef",
            &tcp.token_secret_ref.name,
            &tcp.token_secret_ref.key,
        );
        c.secret_name("spec.tcpListener.tlsSecretRef", &tcp.tls_secret_ref.name);
        if !(1024..=65535).contains(&tcp.port) {
            c.fail(
                "spec.tcpListener.port",
                format!(
                    "spec.tcpListener.port ({}) must be between 1024 and 65535",
                    tcp.port
                ),
            );
        } else if tcp.port == admin_port {
            c.fail(
                "spec.tcpListener.port",
                format!(
                    "spec.tcpListener.port ({}) is the sidecar's admin port (spec.sidecar.adminPort); choose another",
                    tcp.port
                ),
            );
        }
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

    fn gateway(yaml_spec: &str) -> AgentGateway {
        serde_yaml::from_str(&format!(
            "apiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {{name: shop}}\nspec:\n  upstream: {{url: 'https://p.example/api', apiKeySecretRef: {{name: key}}}}\n{yaml_spec}"
        ))
        .expect("test gateway parses")
    }

    fn fields(yaml_spec: &str) -> Vec<String> {
        match validate_gateway(&gateway(yaml_spec)) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn the_default_gateway_is_valid() {
        assert_eq!(fields(""), Vec::<String>::new());
    }

    #[test]
    fn sidecar_resources_are_checked_as_the_api_server_will() {
        assert_eq!(
            fields("  sidecar: {resources: {requests: {cpu: banana}}}\n"),
            ["spec.sidecar.resources.requests.cpu"]
        );
        assert_eq!(
            fields("  sidecar: {resources: {requests: {memory: 1Gi}, limits: {memory: 64Mi}}}\n"),
            ["spec.sidecar.resources.requests.memory"]
        );
        assert_eq!(
            fields("  sidecar: {resources: {limits: {ephemeral-storage: 1Gi, cpu: '-1'}}}\n"),
            [
                "spec.sidecar.resources.limits.cpu",
                "spec.sidecar.resources.limits.ephemeral-storage"
            ]
        );
        assert_eq!(
            fields(
                "  sidecar: {resources: {requests: {cpu: 100m, memory: 64Mi}, limits: {cpu: '0.1', memory: 64Mi}}}\n"
            ),
            Vec::<String>::new()
        );
        let errors = validate_gateway(&gateway(
            "  sidecar: {resources: {requests: {memory: 1Gi}, limits: {memory: 64Mi}}}\n",
        ))
        .unwrap_err();
        assert!(
            errors[0]
                .message
                .contains("spec.sidecar.resources.requests.memory (1Gi)")
                && errors[0].message.contains("limits.memory (64Mi)"),
            "{errors:?}"
        );
    }

    #[test]
    fn every_positive_duration_must_be_at_least_one_millisecond() {
        let spec = "  heartbeatInterval: 0.5ms\n  batching: {flushInterval: 0.0001ms, minBatchInterval: 0.1ms, maxBatchInterval: 0.9ms}\n  delivery: {syncInterval: 0.3ms, retryInitialBackoff: 0.3ms, retryMaxBackoff: 0.3ms}\n  tcpListener: {keepaliveInterval: 0.1ms, keepaliveTimeout: 0.2ms, tokenSecretRef: {name: t}, tlsSecretRef: {name: c}}\n";
        let mut got = fields(spec);
        got.sort();
        got.dedup();
        assert_eq!(
            got,
            [
                "spec.batching.flushInterval",
                "spec.batching.maxBatchInterval",
                "spec.batching.minBatchInterval",
                "spec.delivery.retryInitialBackoff",
                "spec.delivery.retryMaxBackoff",
                "spec.delivery.syncInterval",
                "spec.heartbeatInterval",
                "spec.tcpListener.keepaliveInterval",
                "spec.tcpListener.keepaliveTimeout",
            ]
        );
        assert_eq!(
            fields("  batching: {flushInterval: 1ms}\n"),
            Vec::<String>::new()
        );
        let upstream = gateway("").spec.upstream;
        let mut spec = gateway("").spec;
        spec.upstream = UpstreamSpec {
            kind: UpstreamKind::Socketio,
            timeout: "0.01ms".into(),
            socketio: Some(SocketIoOptions::default()),
            ..upstream
        };
        let errors = validate(&spec).unwrap_err();
        assert_eq!(errors[0].field, "spec.upstream.timeout");
        assert!(errors[0].message.contains("rounds to 0ms"), "{errors:?}");
    }

    use crate::names::{
        CONFIG_DIR, HUB_CA_DIR, NATS_CREDENTIALS_DIR, TCP_TLS_DIR, TOKEN_DIR, UPSTREAM_CA_DIR,
        UPSTREAM_CLIENT_CERT_DIR,
    };

    /// The directories the injector mounts into the sidecar besides the socket's: no socket
    /// directory may be one of them, nor inside or above one (the API server refuses a container
    /// with two mounts at one path, and a nested mount would hide the other) — which the
    /// [`SOCKET_DIR_ROOTS`] guarantee (tested).
    const SIDECAR_MOUNT_DIRS: [&str; 7] = [
        CONFIG_DIR,
        TOKEN_DIR,
        HUB_CA_DIR,
        UPSTREAM_CA_DIR,
        UPSTREAM_CLIENT_CERT_DIR,
        NATS_CREDENTIALS_DIR,
        TCP_TLS_DIR,
    ];

    /// Whether directories `a` and `b` are the same, or one contains the other.
    fn dirs_overlap(a: &str, b: &str) -> bool {
        let (a, b) = (a.trim_end_matches('/'), b.trim_end_matches('/'));
        let inside = |inner: &str, outer: &str| {
            inner == outer
                || inner
                    .strip_prefix(outer)
                    .is_some_and(|r| r.starts_with('/'))
        };
        inside(a, b) || inside(b, a)
    }

    #[test]
    fn socket_directories_never_meet_the_sidecars_own_mounts() {
        for root in SOCKET_DIR_ROOTS {
            for dir in SIDECAR_MOUNT_DIRS {
                assert!(!dirs_overlap(root, dir), "{root} and {dir}");
            }
        }
    }

    #[test]
    fn the_sidecar_admin_port_is_checked() {
        assert_eq!(gateway("").spec.sidecar.admin_port, 9091, "the default");
        assert!(fields("  sidecar: {adminPort: 9191, logLevel: debug}\n").is_empty());
        assert_eq!(
            fields("  sidecar: {adminPort: 80}\n"),
            ["spec.sidecar.adminPort"]
        );
        assert_eq!(
            fields("  sidecar: {adminPort: 65536}\n"),
            ["spec.sidecar.adminPort"]
        );
        // The TCP listener may use 9091 once the admin server moved, not the admin port.
        let tcp = "  tcpListener: {port: PORT, tokenSecretRef: {name: t, key: token}, tlsSecretRef: {name: tls}}\n";
        assert!(
            fields(&format!(
                "  sidecar: {{adminPort: 9191}}\n{}",
                tcp.replace("PORT", "9091")
            ))
            .is_empty()
        );
        assert_eq!(
            fields(&format!(
                "  sidecar: {{adminPort: 7443}}\n{}",
                tcp.replace("PORT", "7443")
            )),
            ["spec.tcpListener.port"]
        );
    }

    #[test]
    fn names_ports_and_paths_copied_into_the_pod_are_checked() {
        assert_eq!(
            fields(
                "  tcpListener: {port: 9091, tokenSecretRef: {name: T, key: 'a b'}, tlsSecretRef: {name: 'x y'}}\n"
            ),
            [
                "spec.tcpListener.tokenSecretRef.name",
                "spec.tcpListener.tokenSecretRef.key",
                "spec.tcpListener.tlsSecretRef.name",
                "spec.tcpListener.port",
            ]
        );
        assert_eq!(
            fields("  socket: {path: /etc/nanogate/agent/a.sock}\n"),
            ["spec.socket.path"]
        );
        assert_eq!(
            fields("  socket: {path: /etc/a.sock}\n"),
            ["spec.socket.path"]
        );
        // Only directories nanogate owns: a mount elsewhere would hide the app's files.
        for outside in [
            "/run/app/a.sock",
            "/usr/local/bin/a.sock",
            "/var/lib/tendrlx/a.sock",
        ] {
            assert_eq!(
                fields(&format!("  socket: {{path: {outside}}}\n")),
                ["spec.socket.path"],
                "{outside}"
            );
        }
        for inside in [
            "/var/lib/tendrl/a.sock",
            "/run/nanogate/a.sock",
            "/run/nanogate/shop/a.sock",
        ] {
            assert_eq!(
                fields(&format!("  socket: {{path: {inside}}}\n")),
                Vec::<String>::new(),
                "{inside}"
            );
        }
        let mut long = gateway("");
        long.metadata.name = Some("a".repeat(64));
        let errors = validate_gateway(&long).unwrap_err();
        assert_eq!(errors[0].field, "metadata.name");
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
}
