//! The operator's per-gateway configuration file (ConfigMap `<gateway>-agent-config`, key
//! `config.json`, `version: 1`): nested sections with integer milliseconds and bytes. The agent
//! reads it through the same path as its own flat config file by translating it into the
//! agent's option names first, so every value goes through the same parsers and error
//! messages as a flag would.

use serde_yaml::{Mapping, Value};

/// Whether `map` is the operator's format rather than the agent's flat one.
pub fn is_gateway_config(map: &Mapping) -> bool {
    map.contains_key("version") && map.contains_key("batching")
}

/// Translates a `version: 1` gateway config into agent options (`option name → value`).
/// Errors name the field and say what to do.
pub fn flatten(map: &Mapping) -> Result<Mapping, String> {
    let version = map.get("version").and_then(Value::as_u64);
    if version != Some(1) {
        return Err(format!(
            "gateway config version {:?} is not supported by nano-agent {}; upgrade the sidecar image",
            map.get("version"),
            env!("CARGO_PKG_VERSION")
        ));
    }
    let mut out = Mapping::new();
    let section = |name: &str| {
        map.get(name)
            .and_then(Value::as_mapping)
            .cloned()
            .unwrap_or_default()
    };
    let mut put = |key: &str, value: String| {
        out.insert(Value::from(key), Value::from(value));
    };

    let upstream = section("upstream");
    match upstream.get("kind").and_then(Value::as_str) {
        None => {}
        Some(kind @ ("http" | "nats" | "socketio")) => put("upstream_kind", kind.to_string()),
        Some(other) => {
            return Err(format!(
                "upstream.kind {other:?} is not supported by this nano-agent (http, nats or socketio); set spec.upstream.kind to one of them"
            ));
        }
    }
    if upstream
        .get("insecure_skip_verify")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return Err("upstream.insecure_skip_verify is not supported; give the upstream's CA in spec.upstream.tls.caSecretRef instead".into());
    }
    let text = |section: &Mapping, field: &str| {
        section
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let number = |section: &Mapping, field: &str| section.get(field).map(number_text).transpose();
    let millis = |section: &Mapping, field: &str| -> Result<Option<String>, String> {
        Ok(number(section, field)?.map(|ms| format!("{ms}ms")))
    };

    if let Some(url) = text(&upstream, "url") {
        put("app_url", url);
    }
    for (from, to) in [
        ("nats_subject", "nats_subject"),
        ("nats_stream", "nats_stream"),
        ("nats_durable_consumer", "nats_consumer"),
        ("nats_inbox_subject", "nats_inbox_subject"),
        ("nats_creds_file", "nats_creds_file"),
    ] {
        if let Some(v) = text(&upstream, from) {
            put(to, v);
        }
    }
    if let Some(v) = millis(&upstream, "timeout_ms")? {
        put("upstream_timeout", v.clone());
        // For socketio the request timeout is the wait for a batch's acknowledgement.
        if upstream.get("kind").and_then(Value::as_str) == Some("socketio") {
            put("socketio_ack_timeout", v);
        }
    }
    if let Some(v) = text(&upstream, "socketio_namespace") {
        put("socketio_namespace", v);
    }
    for (from, to) in [
        ("msg_check_cache_ms", "msg_check_cache"),
        (
            "socketio_heartbeat_interval_ms",
            "socketio_heartbeat_interval",
        ),
    ] {
        if let Some(v) = millis(&upstream, from)? {
            put(to, v);
        }
    }
    for (from, to) in [
        ("ca_file", "upstream_ca"),
        ("client_cert_file", "upstream_client_cert"),
        ("client_key_file", "upstream_client_key"),
    ] {
        if let Some(v) = text(&upstream, from) {
            put(to, v);
        }
    }

    let batching = section("batching");
    for (from, to) in [
        ("flush_interval_ms", "flush_interval"),
        ("min_batch_interval_ms", "min_batch_interval"),
        ("max_batch_interval_ms", "max_batch_interval"),
    ] {
        if let Some(v) = millis(&batching, from)? {
            put(to, v);
        }
    }
    for field in [
        "batch_size",
        "min_batch_size",
        "max_batch_size",
        "scale_factor",
        "max_queue_size",
        "target_cpu_percent",
        "target_mem_percent",
    ] {
        if let Some(v) = number(&batching, field)? {
            put(field, v);
        }
    }

    let delivery = section("delivery");
    if let Some(v) = number(&delivery, "spool_size_limit_bytes")? {
        put("spool_max_bytes", v);
    }
    for (from, to) in [
        ("sync_interval_ms", "spool_sync_interval"),
        ("retry_initial_backoff_ms", "backoff_initial"),
        ("retry_max_backoff_ms", "backoff_max"),
    ] {
        if let Some(v) = millis(&delivery, from)? {
            put(to, v);
        }
    }
    match delivery.get("overflow_policy").and_then(Value::as_str) {
        None | Some("reject") => {}
        Some(other) => {
            return Err(format!(
                "delivery.overflow_policy {other:?} is not supported by this nano-agent (it never drops accepted messages); use \"reject\""
            ));
        }
    }

    let socket = section("socket");
    if let Some(v) = text(&socket, "path") {
        put("socket_path", v);
    }
    if let Some(v) = number(&socket, "max_message_size")? {
        put("max_message_bytes", v);
    }
    if let Some(v) = number(&socket, "max_tags")? {
        put("max_tags", v);
    }
    if let Some(v) = map
        .get("heartbeat_interval_ms")
        .map(number_text)
        .transpose()?
    {
        put("heartbeat_interval", format!("{v}ms"));
    }
    if let Some(v) = map.get("log_level").and_then(Value::as_str) {
        put("log_level", v.to_string());
    }

    // The TCP listener (absent: off). Its token comes from NANOGATE_TCP_TOKEN, not the file.
    let tcp = section("tcp");
    for (from, to) in [
        ("listen", "tcp_listen"),
        ("tls_cert_file", "tcp_tls_cert"),
        ("tls_key_file", "tcp_tls_key"),
    ] {
        if let Some(v) = text(&tcp, from) {
            put(to, v);
        }
    }
    for (from, to) in [
        ("keepalive_interval_ms", "tcp_keepalive_interval"),
        ("keepalive_timeout_ms", "tcp_keepalive_timeout"),
    ] {
        if let Some(v) = millis(&tcp, from)? {
            put(to, v);
        }
    }
    Ok(out)
}

fn number_text(value: &Value) -> Result<String, String> {
    match value {
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!("expected a number, got {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file the operator writes for a gateway with defaults (operator/tests/pipeline.rs
    /// pins the same content on the operator side).
    const MINIMAL: &str = r#"{
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

    /// `file` with the `tcp` section the operator writes for `spec.tcpListener`.
    fn with_tcp(file: &str) -> String {
        file.replace(
            r#""log_level": "info""#,
            r#""log_level": "info",
      "tcp": {"listen": "0.0.0.0:7070", "keepalive_interval_ms": 10000,
              "keepalive_timeout_ms": 30000, "tls_cert_file": "/etc/nanogate/tcp-tls/tls.crt",
              "tls_key_file": "/etc/nanogate/tcp-tls/tls.key"}"#,
        )
    }

    #[test]
    fn every_setting_of_the_file_is_either_live_or_needs_a_restart() {
        use crate::control::{LIVE_FIELDS, RESTART_FIELDS};
        // MINIMAL plus every optional field and section the operator can write.
        let file = MINIMAL
            .replace(r#""kind": "http""#, r#""kind": "socketio""#)
            .replace(
                r#""insecure_skip_verify": false}"#,
                r#""insecure_skip_verify": false,
                   "ca_file": "/ca.pem", "client_cert_file": "/c.crt", "client_key_file": "/c.key",
                   "socketio_heartbeat_interval_ms": 5000, "socketio_namespace": "/agents",
                   "nats_subject": "a.b", "nats_stream": "S", "nats_durable_consumer": "c",
                   "nats_inbox_subject": "i.n", "nats_creds_file": "/u.creds"}"#,
            );
        let flat = flatten(&serde_yaml::from_str(&with_tcp(&file)).unwrap()).unwrap();
        let keys: Vec<&str> = flat.keys().filter_map(|k| k.as_str()).collect();
        assert!(keys.len() >= 39, "the sample covers the file: {keys:?}");
        for key in keys {
            assert!(
                LIVE_FIELDS.contains(&key) || RESTART_FIELDS.contains(&key),
                "`{key}` can arrive in a reload: list it in LIVE_FIELDS (and apply it) or in \
                 restart_fields! (sidecar/src/control.rs)"
            );
        }
    }

    #[test]
    fn operator_file_becomes_agent_options() {
        let map: Mapping = serde_yaml::from_str(MINIMAL).unwrap();
        assert!(is_gateway_config(&map));
        let flat = flatten(&map).unwrap();
        let get = |k: &str| {
            flat.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(get("app_url"), "https://app.tendrl.com/api");
        assert_eq!(get("flush_interval"), "250ms");
        assert_eq!(get("max_batch_size"), "200");
        assert_eq!(get("scale_factor"), "0.5");
        assert_eq!(get("spool_max_bytes"), "67108864");
        assert_eq!(get("backoff_max"), "30000ms");
        assert_eq!(get("max_message_bytes"), "1048576");
        assert_eq!(get("heartbeat_interval"), "5000ms");
        assert_eq!(get("msg_check_cache"), "100ms");
        assert_eq!(get("socket_path"), "/var/lib/tendrl/tendrl_agent.sock");
    }

    #[test]
    fn tcp_listener_section_becomes_a_valid_tcp_listener_config() {
        let file = with_tcp(MINIMAL);
        let flat = flatten(&serde_yaml::from_str(&file).unwrap()).unwrap();
        let mut args = vec!["nano-agent".to_string()];
        for (k, v) in &flat {
            args.push(format!(
                "--{}={}",
                k.as_str().unwrap().replace('_', "-"),
                v.as_str().unwrap()
            ));
        }
        // The token comes from the Secret through NANOGATE_TCP_TOKEN in a pod.
        args.push("--tcp-token=from-the-secret".into());
        let config = crate::config::Config::load_from(args).expect("valid with TLS and token");
        assert_eq!(config.tcp_listen, Some("0.0.0.0:7070".parse().unwrap()));
        assert_eq!(
            config.tcp_keepalive_timeout,
            std::time::Duration::from_secs(30)
        );
        assert_eq!(
            config.tcp_tls_key.as_deref(),
            Some(std::path::Path::new("/etc/nanogate/tcp-tls/tls.key"))
        );
    }

    #[test]
    fn nats_gateway_becomes_nats_options() {
        let file = MINIMAL.replace(
            r#""kind": "http", "url": "https://app.tendrl.com/api","#,
            r#""kind": "nats", "url": "tls://nats.platform:4222",
               "nats_subject": "acme.{namespace}.{gateway}", "nats_stream": "ACME",
               "nats_durable_consumer": "acme-{gateway}",
               "nats_creds_file": "/etc/nanogate/nats/user.creds","#,
        );
        let flat = flatten(&serde_yaml::from_str(&file).unwrap()).unwrap();
        let get = |k: &str| flat.get(k).and_then(Value::as_str).map(str::to_string);
        assert_eq!(get("upstream_kind").as_deref(), Some("nats"));
        assert_eq!(get("app_url").as_deref(), Some("tls://nats.platform:4222"));
        assert_eq!(
            get("nats_subject").as_deref(),
            Some("acme.{namespace}.{gateway}")
        );
        assert_eq!(get("nats_stream").as_deref(), Some("ACME"));
        assert_eq!(get("nats_consumer").as_deref(), Some("acme-{gateway}"));
        assert_eq!(
            get("nats_creds_file").as_deref(),
            Some("/etc/nanogate/nats/user.creds")
        );
    }

    #[test]
    fn socketio_gateway_becomes_socketio_options() {
        // What the operator writes for `kind: socketio` with a client certificate Secret.
        let file = MINIMAL.replace(
            r#""kind": "http", "url": "https://app.tendrl.com/api", "timeout_ms": 10000,"#,
            r#""kind": "socketio", "url": "wss://cloud.example:8443", "timeout_ms": 4000,
               "socketio_namespace": "/agents", "socketio_heartbeat_interval_ms": 2000,
               "client_cert_file": "/etc/nanogate/upstream-client/tls.crt",
               "client_key_file": "/etc/nanogate/upstream-client/tls.key","#,
        );
        let flat = flatten(&serde_yaml::from_str(&file).unwrap()).unwrap();
        let get = |k: &str| flat.get(k).and_then(Value::as_str).map(str::to_string);
        assert_eq!(get("upstream_kind").as_deref(), Some("socketio"));
        assert_eq!(get("app_url").as_deref(), Some("wss://cloud.example:8443"));
        assert_eq!(get("socketio_namespace").as_deref(), Some("/agents"));
        assert_eq!(get("socketio_ack_timeout").as_deref(), Some("4000ms"));
        assert_eq!(
            get("socketio_heartbeat_interval").as_deref(),
            Some("2000ms")
        );
        assert_eq!(
            get("upstream_client_cert").as_deref(),
            Some("/etc/nanogate/upstream-client/tls.crt")
        );
        // The agent's own parser accepts the result.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, &file).unwrap();
        let c = crate::config::Config::load_from([
            "nano-agent".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
        ])
        .unwrap();
        assert_eq!(c.upstream_kind, crate::config::UpstreamKind::Socketio);
        assert_eq!(c.socketio_namespace, "/agents");
        assert_eq!(c.socketio_ack_timeout, std::time::Duration::from_secs(4));
        assert_eq!(
            c.socketio_heartbeat_interval,
            std::time::Duration::from_secs(2)
        );
    }

    #[test]
    fn unsupported_settings_are_refused_with_a_way_out() {
        for (patch, needle) in [
            (r#""kind": "http""#, r#""kind": "carrier-pigeon""#),
            (
                r#""overflow_policy": "reject""#,
                r#""overflow_policy": "dropOldest""#,
            ),
            (
                r#""insecure_skip_verify": false"#,
                r#""insecure_skip_verify": true"#,
            ),
        ] {
            let map: Mapping = serde_yaml::from_str(&MINIMAL.replace(patch, needle)).unwrap();
            let error = flatten(&map).unwrap_err();
            assert!(error.contains("spec.") || error.contains("use"), "{error}");
        }
        let map: Mapping =
            serde_yaml::from_str(&MINIMAL.replace(r#""version": 1"#, r#""version": 2"#)).unwrap();
        assert!(flatten(&map).unwrap_err().contains("upgrade"));
    }
}
