//! The rules of a gateway spec the schema cannot express (cross-field rules, formats).
//! Shared by the reconciler (`ConfigValid=False`) and the validating webhook (denial).

use std::fmt;
use std::time::Duration;

use super::*;

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
