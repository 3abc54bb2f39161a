//! Unit tests of the pure pipeline steps over YAML fixtures: defaults, validate, build, status.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use nanogate_operator::controller::build::{
    self, GatewayRef, Verdict, config_map, config_map_up_to_date, desired_status, sidecar_config,
};
use nanogate_operator::controller::repair::Census;
use nanogate_operator::crd::{
    AgentGateway, AgentGatewayStatus, LEGACY_DEFAULT_SIDECAR_IMAGE, validate,
};
use nanogate_operator::gateway::membership::pod_gateway;
use nanogate_operator::gateway::{SidecarImages, ValidatedGateway};

/// A census of `expected` injected pods.
fn pods(expected: i32) -> Census {
    Census {
        expected,
        not_injected: Vec::new(),
        outdated: Vec::new(),
    }
}

fn fixture(name: &str) -> AgentGateway {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("fixture exists");
    serde_yaml::from_str(&text).expect("fixture parses")
}

fn gref(gw: &AgentGateway) -> GatewayRef {
    GatewayRef {
        name: gw.metadata.name.clone().unwrap(),
        namespace: gw.metadata.namespace.clone().unwrap(),
        uid: gw.metadata.uid.clone().unwrap(),
    }
}

fn t(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

#[test]
fn minimal_spec_gets_seed_defaults() {
    let gw = fixture("minimal.yaml");
    let s = &gw.spec;
    assert_eq!(s.upstream.url, "https://app.tendrl.com/api");
    assert_eq!(s.upstream.api_key_secret_ref.key, "apiKey");
    assert_eq!(s.batching.flush_interval, "250ms");
    assert_eq!(s.batching.batch_size, 10);
    assert_eq!(s.batching.min_batch_size, 10);
    assert_eq!(s.batching.max_batch_size, 200);
    assert_eq!(s.batching.scale_factor, 0.5);
    assert_eq!(s.batching.max_queue_size, 1000);
    assert_eq!(s.batching.target_cpu_percent, 70.0);
    assert_eq!(s.batching.target_mem_percent, 80.0);
    assert_eq!(s.batching.min_batch_interval, "100ms");
    assert_eq!(s.batching.max_batch_interval, "1s");
    assert_eq!(s.socket.path, "/var/lib/tendrl/tendrl_agent.sock");
    assert_eq!(s.heartbeat_interval, "5s");
    assert!(validate(s).is_ok());
}

#[test]
fn crd_schema_defaults_equal_rust_defaults() {
    // The apiserver applies the schema defaults; the operator the serde ones. They must agree.
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(AgentGateway::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let gw = fixture("minimal.yaml");
    let rust = serde_json::to_value(&gw.spec).unwrap();
    for field in ["batching", "delivery", "socket", "sidecar"] {
        assert_eq!(
            spec[field]["default"], rust[field],
            "default of spec.{field}"
        );
    }
    assert_eq!(spec["heartbeatInterval"]["default"], "5s");
}

#[test]
fn minimal_config_is_golden() {
    let gw = fixture("minimal.yaml");
    let cfg = sidecar_config(&gw.spec).unwrap();
    // The same file the agent's config reader is tested with: one contract.
    let want: serde_json::Value =
        serde_json::from_str(nanogate_protocol::sidecar_config::DEFAULTS_FILE).unwrap();
    let got: serde_json::Value = serde_json::from_str(&cfg.to_file()).unwrap();
    assert_eq!(got, want);
    // Readable as YAML too (JSON is YAML).
    let as_yaml: serde_json::Value = serde_yaml::from_str(&cfg.to_file()).unwrap();
    assert_eq!(as_yaml, want);
}

#[test]
fn full_config_maps_every_field_and_never_the_key() {
    let gw = fixture("full.yaml");
    let cfg = sidecar_config(&gw.spec).unwrap();
    assert_eq!(cfg.upstream.kind, "nats");
    assert_eq!(cfg.upstream.timeout_ms, 3000);
    assert_eq!(
        cfg.upstream.ca_file.as_deref(),
        Some("/etc/nanogate/upstream-ca/ca.crt")
    );
    assert_eq!(
        cfg.upstream.client_cert_file.as_deref(),
        Some("/etc/nanogate/upstream-client/tls.crt")
    );
    assert_eq!(cfg.upstream.nats_subject.as_deref(), Some("apps.messages"));
    assert_eq!(cfg.upstream.nats_stream.as_deref(), Some("NANOGATE"));
    assert_eq!(
        cfg.upstream.nats_durable_consumer.as_deref(),
        Some("nanogate-{namespace}-{gateway}")
    );
    assert_eq!(
        cfg.upstream.nats_creds_file.as_deref(),
        Some("/etc/nanogate/nats-credentials/user.creds")
    );
    assert_eq!(cfg.batching.max_batch_size, 400);
    assert_eq!(cfg.batching.max_batch_interval_ms, 2000);
    assert_eq!(cfg.delivery.spool_size_limit_bytes, 128 << 20);
    assert_eq!(cfg.delivery.retry_max_backoff_ms, 60_000);
    assert_eq!(cfg.delivery.overflow_policy, "dropOldest");
    assert_eq!(cfg.delivery.max_in_flight, Some(16));
    assert_eq!(cfg.socket.path, "/run/nanogate/agent.sock");
    assert_eq!(cfg.heartbeat_interval_ms, 10_000);
    assert_eq!(cfg.log_level, "debug");
    let file = cfg.to_file();
    assert!(
        !file.contains("nats-creds") && !file.contains("token\""),
        "{file}"
    );
}

#[test]
fn invalid_spec_names_every_field() {
    let gw = fixture("invalid.yaml");
    let errors = validate(&gw.spec).unwrap_err();
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.upstream.url",
            "spec.batching.minBatchSize",
            "spec.batching.minBatchInterval",
            "spec.delivery.retryInitialBackoff",
            "spec.socket.path",
            "spec.heartbeatInterval",
        ]
    );
    assert_eq!(
        errors[1].message,
        "spec.batching.minBatchSize (300) must be ≤ spec.batching.maxBatchSize (200)"
    );
    assert_eq!(
        errors[2].message,
        "spec.batching.minBatchInterval (2s) must be ≤ spec.batching.maxBatchInterval (1s)"
    );
    for e in &errors {
        assert!(
            e.message.starts_with(&e.field),
            "message names the field: {}",
            e.message
        );
    }
    assert!(sidecar_config(&gw.spec).is_err());
}

#[test]
fn more_semantic_rules() {
    let mut gw = fixture("minimal.yaml");
    gw.spec.batching.batch_size = 500;
    gw.spec.batching.max_queue_size = 100;
    gw.spec.upstream.nats = Some(serde_json::from_str("{}").unwrap());
    gw.spec.batching.flush_interval = "0s".into();
    gw.spec.delivery.spool_size_limit = "10Ki".into();
    gw.spec.upstream.msg_check_cache = "30s".into();
    gw.spec.delivery.max_in_flight = Some(0);
    let errs = validate(&gw.spec).unwrap_err();
    let msgs: Vec<_> = errs.iter().map(|e| e.message.as_str()).collect();
    assert!(
        msgs.contains(&"spec.delivery.maxInFlight (0) must be between 1 and 64"),
        "{msgs:?}"
    );
    assert!(msgs.contains(&"spec.batching.batchSize (500) must be between spec.batching.minBatchSize (10) and spec.batching.maxBatchSize (200)"), "{msgs:?}");
    assert!(
        msgs.contains(
            &"spec.batching.maxQueueSize (100) must be ≥ spec.batching.maxBatchSize (200)"
        ),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("spec.upstream.nats is set but spec.upstream.kind is http")),
        "{msgs:?}"
    );
    assert!(
        msgs.contains(&"spec.batching.flushInterval (0s) must be greater than zero"),
        "{msgs:?}"
    );
    assert!(
        msgs.contains(&"spec.delivery.spoolSizeLimit (10Ki) must be at least 1Mi"),
        "{msgs:?}"
    );
    assert!(
        msgs.contains(&"spec.upstream.msgCheckCache (30s) must be at most 10s: inbound messages wait up to this long"),
        "{msgs:?}"
    );

    // `0s` turns the cache off; a socketio heartbeat must stay between 1s and 5m.
    let mut gw = fixture("minimal.yaml");
    gw.spec.upstream.msg_check_cache = "0s".into();
    gw.spec.upstream.kind = nanogate_operator::crd::UpstreamKind::Socketio;
    gw.spec.upstream.url = "wss://cloud.example".into();
    assert_eq!(
        sidecar_config(&gw.spec)
            .unwrap()
            .upstream
            .msg_check_cache_ms,
        0
    );
    let cfg = sidecar_config(&gw.spec).unwrap();
    assert_eq!(
        cfg.upstream.socketio_heartbeat_interval_ms,
        Some(5000),
        "default"
    );
    gw.spec.upstream.socketio =
        Some(serde_json::from_str(r#"{"heartbeatInterval": "500ms"}"#).unwrap());
    let errs = validate(&gw.spec).unwrap_err();
    assert_eq!(
        errs[0].message,
        "spec.upstream.socketio.heartbeatInterval (500ms) must be between 1s and 5m"
    );
    gw.spec.upstream.socketio =
        Some(serde_json::from_str(r#"{"heartbeatInterval": "15s"}"#).unwrap());
    let cfg = sidecar_config(&gw.spec).unwrap();
    assert_eq!(cfg.upstream.socketio_heartbeat_interval_ms, Some(15_000));
    assert_eq!(cfg.upstream.socketio_namespace.as_deref(), Some("/"));
}

#[test]
fn config_map_is_owned_labelled_and_hashed() {
    let gw = fixture("minimal.yaml");
    let cfg = sidecar_config(&gw.spec).unwrap();
    let cm = config_map(&gref(&gw), &cfg);
    assert_eq!(cm.metadata.name.as_deref(), Some("demo-agent-config"));
    assert_eq!(cm.metadata.namespace.as_deref(), Some("apps"));
    let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "AgentGateway");
    assert_eq!(owner.api_version, "nanogate.io/v1alpha1");
    assert_eq!(owner.uid, "1c7a1f36-0c6b-4a43-9d5c-9f2c1c0a0001");
    assert_eq!(owner.controller, Some(true));
    let ann = cm.metadata.annotations.as_ref().unwrap();
    assert_eq!(ann["nanogate.io/config-hash"], cfg.hash());
    assert_eq!(cm.data.as_ref().unwrap()["config.json"], cfg.to_file());
    assert!(config_map_up_to_date(&cm, &cm));

    // Extra labels from others do not count as drift; changed data does.
    let mut live = cm.clone();
    live.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("team".into(), "x".into());
    assert!(config_map_up_to_date(&live, &cm));
    live.data = Some(BTreeMap::from([(
        "config.json".to_string(),
        "{}".to_string(),
    )]));
    assert!(!config_map_up_to_date(&live, &cm));
}

#[test]
fn hash_changes_with_spec() {
    let mut gw = fixture("minimal.yaml");
    let a = sidecar_config(&gw.spec).unwrap().hash();
    gw.spec.batching.max_batch_size = 300;
    let b = sidecar_config(&gw.spec).unwrap().hash();
    assert_ne!(a, b);
    assert_eq!(a.len(), 8);
}

/// The condition `ty` of `st`, if set.
fn condition(st: &AgentGatewayStatus, ty: &str) -> Option<Condition> {
    st.conditions.iter().find(|c| c.type_ == ty).cloned()
}

fn status_reason(c: &Condition) -> (&str, &str) {
    (c.status.as_str(), c.reason.as_str())
}

#[test]
fn status_from_nothing() {
    let gw = fixture("minimal.yaml");
    let verdict = Verdict::Applied {
        config_map: "demo-agent-config".into(),
        hash: "abcd0123".into(),
    };
    let st = desired_status(None, Some(1), &verdict, &pods(3), &t(1000));
    let get = |ty: &str| condition(&st, ty).unwrap();
    assert_eq!(get("Ready").status, "True");
    assert_eq!(get("ConfigValid").status, "True");
    assert_eq!(get("UpstreamReachable").status, "Unknown");
    assert_eq!(get("SidecarsHealthy").status, "Unknown");
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(st.config_hash.as_deref(), Some("abcd0123"));
    let sc = st.sidecars.as_ref().unwrap();
    assert_eq!(
        (sc.expected, sc.connected, sc.summary.as_str()),
        (3, 0, "0/3")
    );
    assert_eq!(st.upstream.as_ref().unwrap().state, "Unknown");
    assert_eq!(st.left_behind.as_ref().unwrap().messages_total, 0);
    let _ = gw;
}

#[test]
fn transition_time_changes_only_on_transition() {
    let applied = Verdict::Applied {
        config_map: "demo-agent-config".into(),
        hash: "h1".into(),
    };
    let first = desired_status(None, Some(1), &applied, &pods(0), &t(1000));
    // Same verdict later: identical status, so the reconciler writes nothing.
    let second = desired_status(Some(&first), Some(1), &applied, &pods(0), &t(2000));
    assert_eq!(first, second);
    // A new generation with the same verdict keeps the transition time.
    let third = desired_status(Some(&second), Some(2), &applied, &pods(0), &t(3000));
    let ready = |s: &AgentGatewayStatus| condition(s, "Ready").unwrap();
    assert_eq!(ready(&third).last_transition_time, t(1000));
    assert_eq!(ready(&third).observed_generation, Some(2));
    // A transition stamps the new time.
    let missing = Verdict::SecretMissing(
        "Secret apps/k referenced by spec.upstream.apiKeySecretRef not found".into(),
    );
    let fourth = desired_status(Some(&third), Some(2), &missing, &pods(0), &t(4000));
    let r = ready(&fourth);
    assert_eq!(status_reason(&r), ("False", "SecretMissing"));
    assert_eq!(r.last_transition_time, t(4000));
    let cv = condition(&fourth, "ConfigValid").unwrap();
    assert_eq!(status_reason(&cv), ("False", "SecretMissing"));
    assert!(cv.message.contains("spec.upstream.apiKeySecretRef"));
    // The last good config hash is kept while invalid (sidecars keep running it).
    assert_eq!(fourth.config_hash.as_deref(), Some("h1"));
}

#[test]
fn hub_owned_fields_are_kept() {
    let applied = Verdict::Applied {
        config_map: "c".into(),
        hash: "h".into(),
    };
    let mut st = desired_status(None, Some(1), &applied, &pods(2), &t(10));
    st.sidecars = Some(nanogate_operator::crd::SidecarCounts::new(2, 2, 1));
    for c in st
        .conditions
        .iter_mut()
        .filter(|c| c.type_ == "UpstreamReachable")
    {
        c.status = "True".into();
        c.reason = "Reported".into();
    }
    let next = desired_status(Some(&st), Some(1), &applied, &pods(5), &t(20));
    let sc = next.sidecars.as_ref().unwrap();
    assert_eq!(
        (sc.expected, sc.connected, sc.healthy, sc.summary.as_str()),
        (5, 2, 1, "2/5")
    );
    let up = condition(&next, "UpstreamReachable").unwrap();
    assert_eq!(status_reason(&up), ("True", "Reported"));
}

#[test]
fn pods_map_to_gateways() {
    let a = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        pod_gateway(&a(&[
            ("nanogate.io/injected", "true"),
            ("nanogate.io/gateway", "g")
        ])),
        Some("g".into())
    );
    assert_eq!(
        pod_gateway(&a(&[
            ("nanogate.io/inject", "true"),
            ("nanogate.io/gateway", "g")
        ])),
        Some("g".into())
    );
    assert_eq!(
        pod_gateway(&a(&[
            ("nanogate.io/inject", "false"),
            ("nanogate.io/gateway", "g")
        ])),
        None
    );
    assert_eq!(pod_gateway(&a(&[("nanogate.io/gateway", "g")])), None);
    assert_eq!(
        pod_gateway(&a(&[(
            "nanogate.io/injected",
            r#"{"gateway":"j","generation":"1"}"#
        )])),
        Some("j".into())
    );
    assert_eq!(
        pod_gateway(&a(&[("nanogate.io/injected", "gateway=k,config=abc")])),
        Some("k".into())
    );
    assert_eq!(
        pod_gateway(&a(&[("nanogate.io/injected", "m/abcd0123")])),
        Some("m".into())
    );
    assert_eq!(pod_gateway(&a(&[])), None);
}

#[test]
fn injection_settings_resolve_defaults() {
    let gw = fixture("minimal.yaml");
    let s = gw.injection_settings(&SidecarImages::default()).unwrap();
    assert_eq!(s.gateway, "demo");
    assert_eq!(s.image, "ghcr.io/nanogate/nano-agent:0.1.0");
    assert_eq!(s.socket_path, "/var/lib/tendrl/tendrl_agent.sock");
    assert_eq!(s.socket_dir, "/var/lib/tendrl");
    assert_eq!(s.config_map_name, "demo-agent-config");
    assert_eq!(s.config_key, build::CONFIG_KEY);
    assert_eq!(s.config_hash, sidecar_config(&gw.spec).unwrap().hash());
    assert_eq!(s.log_level.as_str(), "info");
    let req = s.resources.requests.unwrap();
    assert_eq!(req["cpu"].0, "10m");
    assert_eq!(req["memory"].0, "16Mi");
    assert_eq!(s.resources.limits.unwrap()["memory"].0, "64Mi");
    assert!(
        fixture("invalid.yaml")
            .injection_settings(&SidecarImages::default())
            .is_err()
    );
}

/// The image the injector gets is the operator's choice: `spec.sidecar.image` absent or the old
/// CRD default → the operator's image; an allowed one is kept; any other makes the gateway
/// invalid with the other field errors (validating webhook, reconciler and injector alike).
#[test]
fn the_injected_image_is_the_operators_or_an_allowed_one() {
    let mirror = SidecarImages::new(
        "mirror.local/nano-agent:0.1.0",
        &["registry.example/nano-agent:".into()],
    )
    .unwrap();
    let image = |gw: &AgentGateway, images: &SidecarImages| {
        ValidatedGateway::checked(gw, images).map(|v| v.injection.image)
    };
    let minimal = fixture("minimal.yaml");
    assert_eq!(minimal.spec.sidecar.image, None);
    assert_eq!(
        image(&minimal, &mirror).unwrap(),
        "mirror.local/nano-agent:0.1.0"
    );
    let mut legacy = minimal.clone();
    legacy.spec.sidecar.image = Some(LEGACY_DEFAULT_SIDECAR_IMAGE.into());
    assert_eq!(
        image(&legacy, &mirror).unwrap(),
        "mirror.local/nano-agent:0.1.0"
    );
    // full.yaml asks for registry.example/nano-agent:1.2.3.
    let full = fixture("full.yaml");
    assert_eq!(
        image(&full, &mirror).unwrap(),
        "registry.example/nano-agent:1.2.3"
    );
    let refused = image(&full, &SidecarImages::default()).unwrap_err();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].field, "spec.sidecar.image");
    // With other errors, the image is named too.
    let mut invalid = fixture("invalid.yaml");
    invalid.spec.sidecar.image = Some("evil.example/miner:1".into());
    let errors = ValidatedGateway::checked(&invalid, &mirror).unwrap_err();
    assert!(
        errors.iter().any(|e| e.field == "spec.sidecar.image")
            && errors
                .iter()
                .any(|e| e.field == "spec.batching.minBatchSize"),
        "{errors:?}"
    );
}

#[test]
fn plain_text_upstreams_are_named_with_what_to_use_instead() {
    let exposure = |yaml: &str| {
        let mut gw = fixture("minimal.yaml");
        gw.spec.upstream = serde_yaml::from_str(yaml).unwrap();
        build::upstream_exposure(&gw.spec)
    };
    let key = "apiKeySecretRef: {name: k}";
    for url in ["https://p.example", "tls://nats:4222"] {
        assert_eq!(exposure(&format!("{{url: '{url}', {key}}}")), None, "{url}");
    }
    let (reason, event, message) =
        exposure(&format!("{{url: 'http://p.example', {key}}}")).unwrap();
    assert_eq!((reason, event), ("PlainText", "PlainTextUpstream"));
    assert!(
        message.contains("http://p.example") && message.contains("https://"),
        "{message}"
    );
    let ws = exposure(&format!("{{kind: socketio, url: 'WS://p.example', {key}}}")).unwrap();
    assert!(ws.2.contains("wss://"), "{}", ws.2);
    let nats = exposure(&format!("{{kind: nats, url: 'nats://n:4222', {key}}}")).unwrap();
    assert!(nats.2.contains("tls://"), "{}", nats.2);
    // A NATS client given a CA requires TLS whatever the scheme.
    assert_eq!(
        exposure(&format!(
            "{{kind: nats, url: 'nats://n:4222', {key}, tls: {{caSecretRef: {{name: ca}}}}}}"
        )),
        None
    );
    // Skipping verification is named first: it is the bigger hole.
    let insecure = exposure(&format!(
        "{{url: 'http://p.example', {key}, tls: {{insecureSkipVerify: true}}}}"
    ))
    .unwrap();
    assert_eq!(insecure.0, "InsecureSkipVerify");
}

#[test]
fn skipping_tls_verification_is_a_warning_condition_until_turned_off() {
    let applied = Verdict::Applied {
        config_map: "demo-agent-config".into(),
        hash: "h1".into(),
    };
    let mut gw = fixture("minimal.yaml");
    let mut st = desired_status(None, Some(1), &applied, &pods(0), &t(10));
    build::set_tls_verified(&mut st, &gw.spec, Some(1), &t(10));
    let cond = condition;
    assert_eq!(
        cond(&st, "UpstreamTLSVerified"),
        None,
        "absent while verifying"
    );

    gw.spec.upstream.tls = Some(serde_json::from_str(r#"{"insecureSkipVerify": true}"#).unwrap());
    assert!(validate(&gw.spec).is_ok());
    build::set_tls_verified(&mut st, &gw.spec, Some(2), &t(20));
    let c = cond(&st, "UpstreamTLSVerified").unwrap();
    assert_eq!(status_reason(&c), ("False", "InsecureSkipVerify"));
    assert!(c.message.contains("caSecretRef"), "{}", c.message);
    assert_eq!(
        cond(&st, "Ready").unwrap().status,
        "True",
        "the gateway still works"
    );

    gw.spec.upstream.tls = None;
    build::set_tls_verified(&mut st, &gw.spec, Some(3), &t(30));
    let c = cond(&st, "UpstreamTLSVerified").unwrap();
    assert_eq!(status_reason(&c), ("True", "Verified"));
    assert_eq!(c.last_transition_time, t(30));
}
