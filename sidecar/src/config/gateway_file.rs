//! The operator's per-gateway file (ConfigMap `<gateway>-agent-config`, key `config.json`):
//! [`SidecarConfig`] from `nanogate-protocol`, the type the operator writes it with. The agent
//! reads it typed ([`read`]) and builds its [`Config`] from it ([`apply`]): each setting fills
//! the agent option it stands for, unless a flag or the environment set that option — the
//! same precedence as the agent's own config file.

use std::path::PathBuf;
use std::time::Duration;

use nanogate_protocol::sidecar_config::{self as file, SidecarConfig};

use super::{Config, OverflowPolicy, UpstreamKind};

/// Whether a config file's top-level keys are the operator's format (it has a `version`; the
/// agent's own flat format has no such option).
pub fn is_gateway_config(keys: &serde_yaml::Mapping) -> bool {
    keys.contains_key("version")
}

/// Reads the operator's file from its text: JSON as the operator writes it (errors with line
/// and column), or the same content as YAML.
pub fn read(text: &str) -> Result<SidecarConfig, file::ReadError> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(_) => SidecarConfig::from_json(text),
        Err(json_error) => match serde_yaml::from_str::<serde_json::Value>(text) {
            Ok(value) => SidecarConfig::from_value(value),
            Err(_) => Err(json_error.into()),
        },
    }
}

/// Applies `gw` to `config`: every setting of the file fills its agent option, except those
/// for which `set_elsewhere(option)` holds (a flag or environment variable gave them). Returns
/// the options the file sets (for the reload rules: each is live or needs a restart). Errors
/// name the file's field and say what to do.
pub fn apply(
    gw: &SidecarConfig,
    config: &mut Config,
    set_elsewhere: impl Fn(&str) -> bool,
) -> Result<Vec<&'static str>, String> {
    let mut applied = Vec::new();
    // `fill!(option = value)`: the file's value for the agent's `option`.
    macro_rules! fill {
        ($option:ident = $value:expr) => {{
            let value = $value;
            if !set_elsewhere(stringify!($option)) {
                config.$option = value;
            }
            applied.push(stringify!($option));
        }};
    }
    let path = |p: &String| Some(PathBuf::from(p));
    let ms = Duration::from_millis;

    let u = &gw.upstream;
    let kind = match u.kind {
        file::UpstreamKind::Http => UpstreamKind::Http,
        file::UpstreamKind::Socketio => UpstreamKind::Socketio,
        file::UpstreamKind::Nats => UpstreamKind::Nats,
    };
    fill!(upstream_kind = kind);
    fill!(app_url = u.url.clone());
    fill!(upstream_timeout = ms(u.timeout_ms));
    if kind == UpstreamKind::Socketio {
        // For socketio the request timeout is the wait for a batch's acknowledgement.
        fill!(socketio_ack_timeout = ms(u.timeout_ms));
    }
    if u.api_key_env != "TENDRL_KEY" {
        return Err(format!(
            "upstream.api_key_env {:?}: this nano-agent reads the API key from TENDRL_KEY only; use the sidecar image of the operator's release (spec.sidecar.image)",
            u.api_key_env
        ));
    }
    if let Some(v) = &u.ca_file {
        fill!(upstream_ca = path(v));
    }
    if let Some(v) = &u.client_cert_file {
        fill!(upstream_client_cert = path(v));
    }
    if let Some(v) = &u.client_key_file {
        fill!(upstream_client_key = path(v));
    }
    fill!(upstream_insecure_skip_verify = u.insecure_skip_verify);
    fill!(msg_check_cache = ms(u.msg_check_cache_ms));
    if let Some(v) = &u.socketio_namespace {
        fill!(socketio_namespace = v.clone());
    }
    if let Some(v) = u.socketio_heartbeat_interval_ms {
        fill!(socketio_heartbeat_interval = ms(v));
    }
    if let Some(v) = &u.nats_subject {
        fill!(nats_subject = v.clone());
    }
    if let Some(v) = &u.nats_stream {
        fill!(nats_stream = v.clone());
    }
    if let Some(v) = &u.nats_durable_consumer {
        fill!(nats_consumer = v.clone());
    }
    if let Some(v) = &u.nats_inbox_subject {
        fill!(nats_inbox_subject = v.clone());
    }
    if let Some(v) = &u.nats_creds_file {
        fill!(nats_creds_file = path(v));
    }

    let b = &gw.batching;
    fill!(flush_interval = ms(b.flush_interval_ms));
    fill!(batch_size = b.batch_size as usize);
    fill!(min_batch_size = b.min_batch_size as usize);
    fill!(max_batch_size = b.max_batch_size as usize);
    fill!(scale_factor = b.scale_factor);
    fill!(max_queue_size = b.max_queue_size as usize);
    fill!(target_cpu_percent = b.target_cpu_percent);
    fill!(target_mem_percent = b.target_mem_percent);
    fill!(min_batch_interval = ms(b.min_batch_interval_ms));
    fill!(max_batch_interval = ms(b.max_batch_interval_ms));

    let d = &gw.delivery;
    fill!(spool_max_bytes = d.spool_size_limit_bytes);
    fill!(spool_sync_interval = ms(d.sync_interval_ms));
    fill!(backoff_initial = ms(d.retry_initial_backoff_ms));
    fill!(backoff_max = ms(d.retry_max_backoff_ms));
    fill!(
        overflow_policy = match d.overflow_policy {
            file::OverflowPolicy::Reject => OverflowPolicy::Reject,
            file::OverflowPolicy::DropOldest => OverflowPolicy::DropOldest,
        }
    );
    if let Some(n) = d.max_in_flight {
        fill!(max_in_flight = n as usize);
    }

    let s = &gw.socket;
    fill!(socket_path = PathBuf::from(&s.path));
    fill!(max_message_bytes = s.max_message_size as usize);
    fill!(max_tags = s.max_tags as usize);
    fill!(heartbeat_interval = ms(gw.heartbeat_interval_ms));
    fill!(log_level = gw.log_level.as_str().to_string());

    // The TCP listener (absent: off). Its token comes from NANOGATE_TCP_TOKEN, not the file.
    if let Some(t) = &gw.tcp {
        let listen = t.listen.parse().map_err(|e| {
            format!(
                "tcp.listen {:?} is not an address:port (e.g. 0.0.0.0:7070): {e}",
                t.listen
            )
        })?;
        fill!(tcp_listen = Some(listen));
        fill!(tcp_tls_cert = path(&t.tls_cert_file));
        fill!(tcp_tls_key = path(&t.tls_key_file));
        fill!(tcp_keepalive_interval = ms(t.keepalive_interval_ms));
        fill!(tcp_keepalive_timeout = ms(t.keepalive_timeout_ms));
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file the operator writes for a gateway with defaults.
    const MINIMAL: &str = nanogate_protocol::sidecar_config::DEFAULTS_FILE;

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

    /// The agent's defaults with `file` applied (no validation), and the options it set.
    fn applied(file: &str) -> Result<(Config, Vec<&'static str>), String> {
        let mut config = Config::load_from(["nano-agent"]).unwrap();
        let gw = read(file).map_err(|e| e.to_string())?;
        let set = apply(&gw, &mut config, |_| false)?;
        Ok((config, set))
    }

    /// The agent started with `file` as its config file and `flags`.
    fn load(file: &str, flags: &[&str]) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, file).unwrap();
        let mut args = vec!["nano-agent".to_string(), "--config".into()];
        args.push(path.display().to_string());
        args.extend(flags.iter().map(|f| f.to_string()));
        Config::load_from(args)
    }

    #[test]
    fn every_setting_of_the_file_is_either_live_or_needs_a_restart() {
        use super::super::reload::{LIVE_FIELDS, RESTART_FIELDS};
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
            )
            .replace(
                r#""overflow_policy": "reject""#,
                r#""overflow_policy": "reject", "max_in_flight": 8"#,
            );
        let (_, keys) = applied(&with_tcp(&file)).unwrap();
        assert!(keys.len() >= 39, "the sample covers the file: {keys:?}");
        for key in keys {
            assert!(
                LIVE_FIELDS.contains(&key) || RESTART_FIELDS.contains(&key),
                "`{key}` can arrive in a reload: list it in LIVE_FIELDS (and apply it) or in \
                 restart_fields! (sidecar/src/config/reload.rs)"
            );
        }
    }

    #[test]
    fn operator_file_becomes_agent_options() {
        let map: serde_yaml::Mapping = serde_yaml::from_str(MINIMAL).unwrap();
        assert!(is_gateway_config(&map));
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.app_url, "https://app.tendrl.com/api");
        assert_eq!(c.flush_interval, Duration::from_millis(250));
        assert_eq!(c.max_batch_size, 200);
        assert_eq!(c.scale_factor, 0.5);
        assert_eq!(c.spool_max_bytes, 67108864);
        assert_eq!(c.backoff_max, Duration::from_millis(30000));
        assert_eq!(c.max_message_bytes, 1048576);
        assert_eq!(c.heartbeat_interval, Duration::from_millis(5000));
        assert_eq!(c.msg_check_cache, Duration::from_millis(100));
        assert_eq!(
            c.socket_path,
            std::path::Path::new("/var/lib/tendrl/tendrl_agent.sock")
        );
        // Flags keep their precedence over the file.
        let c = load(MINIMAL, &["--max-batch-size=300"]).unwrap();
        assert_eq!((c.max_batch_size, c.min_batch_size), (300, 10));
    }

    #[test]
    fn tcp_listener_section_becomes_a_valid_tcp_listener_config() {
        // The token comes from the Secret through NANOGATE_TCP_TOKEN in a pod.
        let config = load(&with_tcp(MINIMAL), &["--tcp-token=from-the-secret"])
            .expect("valid with TLS and token");
        assert_eq!(config.tcp_listen, Some("0.0.0.0:7070".parse().unwrap()));
        assert_eq!(config.tcp_keepalive_timeout, Duration::from_secs(30));
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
        let (c, _) = applied(&file).unwrap();
        assert_eq!(c.upstream_kind, UpstreamKind::Nats);
        assert_eq!(c.app_url, "tls://nats.platform:4222");
        assert_eq!(c.nats_subject, "acme.{namespace}.{gateway}");
        assert_eq!(c.nats_stream, "ACME");
        assert_eq!(c.nats_consumer, "acme-{gateway}");
        assert_eq!(
            c.nats_creds_file.as_deref(),
            Some(std::path::Path::new("/etc/nanogate/nats/user.creds"))
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
        let (flat, _) = applied(&file).unwrap();
        assert_eq!(flat.upstream_kind, UpstreamKind::Socketio);
        assert_eq!(flat.app_url, "wss://cloud.example:8443");
        assert_eq!(flat.socketio_ack_timeout, Duration::from_millis(4000));
        assert_eq!(
            flat.upstream_client_cert.as_deref(),
            Some(std::path::Path::new(
                "/etc/nanogate/upstream-client/tls.crt"
            ))
        );
        // The agent's own parser accepts the result.
        let c = load(&file, &[]).unwrap();
        assert_eq!(c.upstream_kind, UpstreamKind::Socketio);
        assert_eq!(c.socketio_namespace, "/agents");
        assert_eq!(c.socketio_ack_timeout, std::time::Duration::from_secs(4));
        assert_eq!(
            c.socketio_heartbeat_interval,
            std::time::Duration::from_secs(2)
        );
    }

    #[test]
    fn insecure_skip_verify_turns_verification_off() {
        let file = MINIMAL.replace(
            r#""insecure_skip_verify": false"#,
            r#""insecure_skip_verify": true"#,
        );
        assert!(load(&file, &[]).unwrap().upstream_insecure_skip_verify);
        assert!(!load(MINIMAL, &[]).unwrap().upstream_insecure_skip_verify);
    }

    #[test]
    fn max_in_flight_from_the_file_or_the_default() {
        assert_eq!(
            load(MINIMAL, &[]).unwrap().max_in_flight,
            file::DEFAULT_MAX_IN_FLIGHT as usize
        );
        let file = MINIMAL.replace(
            r#""overflow_policy": "reject""#,
            r#""overflow_policy": "reject", "max_in_flight": 16"#,
        );
        assert_eq!(load(&file, &[]).unwrap().max_in_flight, 16);
        let (_, keys) = applied(&file).unwrap();
        assert!(keys.contains(&"max_in_flight"), "{keys:?}");
        // A flag keeps its precedence over the file.
        assert_eq!(
            load(&file, &["--max-in-flight=2"]).unwrap().max_in_flight,
            2
        );
        let zero = MINIMAL.replace(
            r#""overflow_policy": "reject""#,
            r#""overflow_policy": "reject", "max_in_flight": 0"#,
        );
        let e = format!("{:#}", load(&zero, &[]).unwrap_err());
        assert!(e.contains("max_in_flight"), "{e}");
    }

    #[test]
    fn drop_oldest_becomes_the_overflow_policy() {
        let file = MINIMAL.replace(r#""reject""#, r#""dropOldest""#);
        assert_eq!(
            load(&file, &[]).unwrap().overflow_policy,
            OverflowPolicy::DropOldest
        );
        assert_eq!(
            load(MINIMAL, &[]).unwrap().overflow_policy,
            OverflowPolicy::Reject
        );
    }

    #[test]
    fn unsupported_settings_are_refused_with_a_way_out() {
        for (patch, needle) in [
            (r#""kind": "http""#, r#""kind": "carrier-pigeon""#),
            (r#""max_tags": 10"#, r#""max_tags": 10, "max_tagz": 1"#),
            (r#""TENDRL_KEY""#, r#""PLATFORM_KEY""#),
        ] {
            let error = applied(&MINIMAL.replace(patch, needle)).unwrap_err();
            assert!(error.contains("spec.") || error.contains("use"), "{error}");
        }
        let error = load(&MINIMAL.replace(r#""version": 1"#, r#""version": 2"#), &[]).unwrap_err();
        assert!(format!("{error:#}").contains("upgrade"), "{error:#}");
    }
}
