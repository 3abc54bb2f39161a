//! Router tests: captured `AdmissionReview` bodies (tests/fixtures/admission/) posted to the
//! real webhook server over TLS, with a certificate from `tls/`, and a rotation stream.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use nanogate_operator::tls::{self, CertBundle, CertResolver};
use nanogate_operator::webhook::{
    self, InjectionOutcome, InjectorSettings, StaticLookup, WebhookState,
};
use prometheus::Registry;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/admission")
            .join(name),
    )
    .unwrap()
}

fn bundle() -> CertBundle {
    let sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    tls::generate_bundle(
        &sans,
        tls::unix_now(),
        std::time::Duration::from_secs(3600 * 24),
        std::time::Duration::from_secs(3600),
    )
    .unwrap()
}

/// Stand-in for the CRD engineer's `validate()`: `minBatchSize ≤ maxBatchSize`.
fn validator(gw: &Value) -> Result<(), Vec<String>> {
    let b = &gw["spec"]["batching"];
    match (b["minBatchSize"].as_u64(), b["maxBatchSize"].as_u64()) {
        (Some(min), Some(max)) if min > max => Err(vec![format!(
            "spec.batching.minBatchSize ({min}) must not exceed spec.batching.maxBatchSize ({max})"
        )]),
        _ => Ok(()),
    }
}

struct Harness {
    addr: SocketAddr,
    ca: String,
    resolver: Arc<CertResolver>,
    registry: Registry,
    outcomes: Arc<std::sync::Mutex<Vec<InjectionOutcome>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> (Harness, CertBundle) {
    let b = bundle();
    let registry = Registry::new();
    let outcomes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = outcomes.clone();
    let state = WebhookState::new(
        Arc::new(StaticLookup::one_gateway("apps", "telemetry")),
        Arc::new(validator),
        InjectorSettings::new("nanogate-system"),
        &registry,
    )
    .unwrap()
    .with_observer(Arc::new(move |o: &InjectionOutcome| {
        sink.lock().unwrap().push(o.clone())
    }));
    let resolver = Arc::new(CertResolver::from_pem(&b.cert_pem, &b.key_pem).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(webhook::serve(
        listener,
        webhook::router(state),
        tls::tls_config(resolver.clone()),
        async move {
            let _ = stopped.await;
        },
    ));
    (
        Harness {
            addr,
            ca: b.ca_cert_pem.clone(),
            resolver,
            registry,
            outcomes,
            _stop: stop,
        },
        b,
    )
}

fn connector(ca_pem: &str) -> TlsConnector {
    let mut config = tls::client_config(ca_pem).unwrap();
    // Full handshakes only: a resumed session would not show which certificate is served.
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// POST `body` to `path` on a fresh TLS connection; returns status, JSON body and the leaf
/// certificate the server presented.
async fn post(
    addr: SocketAddr,
    tls: &TlsConnector,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Value, CertificateDer<'static>), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let stream = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(Body::new(resp.into_body()), 1 << 20)
        .await
        .map_err(|e| e.to_string())?;
    let json = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&bytes)))?;
    Ok((status, json, leaf))
}

fn uid_of(fixture_body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(fixture_body).unwrap();
    v["request"]["uid"].as_str().unwrap().to_string()
}

/// The patch bytes of a response. kube-core serialises `patch` as a JSON array of bytes
/// (Go's decoder accepts that for `[]byte`); accept a base64 string too.
fn decode_patch(response: &Value) -> Value {
    let bytes: Vec<u8> = match &response["patch"] {
        Value::String(b64) => {
            serde_json::from_value::<k8s_openapi::ByteString>(Value::String(b64.clone()))
                .unwrap()
                .0
        }
        other => {
            serde_json::from_value(other.clone()).unwrap_or_else(|e| panic!("patch {other}: {e}"))
        }
    };
    serde_json::from_slice(&bytes).unwrap()
}

fn metric(registry: &Registry, result: &str, reason: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "nanogate_webhook_requests_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            let labels: BTreeMap<_, _> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            labels.get("result") == Some(&result) && labels.get("reason") == Some(&reason)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// Posts the fixture `file` to `/mutate`: answered 200, for that request, allowed. The request
/// body and the review.
async fn mutate_allowed(h: &Harness, tls: &TlsConnector, file: &str) -> (Vec<u8>, Value) {
    let body = fixture(file);
    let (status, review, _) = post(h.addr, tls, "/mutate", body.clone()).await.unwrap();
    assert_eq!(status, 200, "{file}");
    let resp = &review["response"];
    assert_eq!(resp["uid"], uid_of(&body), "{file}");
    assert_eq!(resp["allowed"], true, "{file}");
    (body, review)
}

#[tokio::test]
async fn mutate_injects_a_pod_and_the_patch_applies() {
    let (h, _) = start().await;
    let tls = connector(&h.ca);
    let (body, review) = mutate_allowed(&h, &tls, "pod-create.json").await;
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let resp = &review["response"];
    assert_eq!(resp["patchType"], "JSONPatch");
    assert!(
        resp["patch"].is_string(),
        "patch is base64 as the API documents"
    );
    // The patch applies to the pod exactly as the apiserver sent it.
    let mut pod = serde_json::from_slice::<Value>(&body).unwrap()["request"]["object"].clone();
    let patch: json_patch::Patch = serde_json::from_value(decode_patch(resp)).unwrap();
    json_patch::patch(&mut pod, &patch).unwrap();
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "nano-agent");
    assert_eq!(
        pod["spec"]["containers"][0]["volumeMounts"][1]["mountPath"],
        "/var/lib/tendrl"
    );
    assert_eq!(
        pod["spec"]["volumes"].as_array().unwrap().len(),
        4,
        "service-account volume kept"
    );
    assert_eq!(metric(&h.registry, "injected", ""), 1);
    let outcomes = h.outcomes.lock().unwrap();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].owner.as_ref().unwrap().kind, "ReplicaSet");
    assert_eq!(outcomes[0].result.as_ref().unwrap().gateway, "telemetry");
}

#[tokio::test]
async fn mutate_skips_with_named_reasons() {
    let (h, _) = start().await;
    let tls = connector(&h.ca);
    for (file, reason, asked) in [
        ("pod-create-not-opted-in.json", "not_opted_in", false),
        ("pod-create-host-network.json", "host_network", true),
    ] {
        let (body, review) = mutate_allowed(&h, &tls, file).await;
        let resp = &review["response"];
        assert_eq!(metric(&h.registry, "skipped", reason), 1, "{file}");
        if !asked {
            assert!(resp.get("patch").is_none(), "{file}");
            assert!(resp.get("warnings").is_none(), "{file}");
            continue;
        }
        // A pod that asked for a sidecar is told why it gets none (a warning), and the reason
        // is written on it; nothing else changes.
        let warning = resp["warnings"][0].as_str().unwrap_or_default();
        assert!(
            warning.starts_with("nanogate: sidecar not injected: ")
                && warning.contains("hostNetwork"),
            "{file}: {resp}"
        );
        let mut pod = serde_json::from_slice::<Value>(&body).unwrap()["request"]["object"].clone();
        let before = pod.clone();
        let patch: json_patch::Patch = serde_json::from_value(decode_patch(resp)).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
        let skipped = pod["metadata"]["annotations"]["nanogate.io/injection-skipped"]
            .as_str()
            .unwrap_or_default();
        assert!(skipped.contains("hostNetwork"), "{file}: {pod}");
        pod["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove("nanogate.io/injection-skipped");
        if before["metadata"].get("annotations").is_none() {
            pod["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("annotations");
        }
        assert_eq!(pod, before, "{file}: only the annotation is added");
    }
}

#[tokio::test]
async fn non_pod_is_allowed_without_patch() {
    let (h, _) = start().await;
    let tls = connector(&h.ca);
    let (_, review) = mutate_allowed(&h, &tls, "configmap-create.json").await;
    let resp = &review["response"];
    assert!(resp.get("patch").is_none() && resp.get("patchType").is_none());
    assert_eq!(metric(&h.registry, "allowed", "not_a_pod_create"), 1);
}

#[tokio::test]
async fn malformed_bodies_are_invalid() {
    let (h, _) = start().await;
    let tls = connector(&h.ca);
    for path in ["/mutate", "/validate"] {
        let (status, review, _) = post(h.addr, &tls, path, fixture("malformed-truncated.json"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}");
        assert_eq!(review["response"]["allowed"], false, "{path}");
        assert_eq!(
            review["response"]["status"]["reason"], "InvalidRequest",
            "{path}"
        );
        assert!(
            review["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("malformed AdmissionReview")
        );

        // JSON but without a request: still invalid, and the apiVersion is echoed.
        let (_, review, _) = post(h.addr, &tls, path, fixture("review-without-request.json"))
            .await
            .unwrap();
        assert_eq!(review["response"]["allowed"], false);
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    }
    assert_eq!(metric(&h.registry, "invalid", "malformed_review"), 4);
}

#[tokio::test]
async fn validate_calls_the_validator() {
    let (h, _) = start().await;
    let tls = connector(&h.ca);
    let ok = fixture("agentgateway-create-valid.json");
    let (_, review, _) = post(h.addr, &tls, "/validate", ok.clone()).await.unwrap();
    assert_eq!(review["response"]["uid"], uid_of(&ok));
    assert_eq!(review["response"]["allowed"], true);

    let bad = fixture("agentgateway-create-invalid.json");
    let (_, review, _) = post(h.addr, &tls, "/validate", bad.clone()).await.unwrap();
    assert_eq!(review["response"]["uid"], uid_of(&bad));
    assert_eq!(review["response"]["allowed"], false);
    assert_eq!(
        review["response"]["status"]["message"],
        "spec.batching.minBatchSize (500) must not exceed spec.batching.maxBatchSize (200)"
    );
    // A non-gateway object is not ours to judge.
    let (_, review, _) = post(h.addr, &tls, "/validate", fixture("configmap-create.json"))
        .await
        .unwrap();
    assert_eq!(review["response"]["allowed"], true);
}

#[tokio::test]
async fn untrusted_client_fails_the_handshake_but_the_server_keeps_serving() {
    let (h, _) = start().await;
    let other = bundle();
    let err = post(
        h.addr,
        &connector(&other.ca_cert_pem),
        "/mutate",
        fixture("pod-create.json"),
    )
    .await;
    assert!(err.unwrap_err().starts_with("handshake"));
    post(
        h.addr,
        &connector(&h.ca),
        "/mutate",
        fixture("pod-create.json"),
    )
    .await
    .unwrap();
}

/// 200 admissions, each on a new TLS connection, while the certificate is swapped back and
/// forth as fast as possible: no request may fail, and both certificates must be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_during_a_stream_of_admissions_has_zero_failures() {
    let (h, first) = start().await;
    let tls = connector(&h.ca);
    let second = tls::renew_serving(
        &first,
        &first.sans,
        tls::unix_now(),
        std::time::Duration::from_secs(3600),
    )
    .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (resolver, done) = (h.resolver.clone(), done.clone());
        let (a, b) = (first.clone(), second.clone());
        tokio::spawn(async move {
            let mut swaps = 0u64;
            while !done.load(Ordering::Relaxed) {
                let c = if swaps.is_multiple_of(2) { &b } else { &a };
                resolver.set_pem(&c.cert_pem, &c.key_pem).unwrap();
                swaps += 1;
                tokio::time::sleep(std::time::Duration::from_micros(500)).await;
            }
            swaps
        })
    };
    let body = fixture("pod-create.json");
    let mut failures = Vec::new();
    let mut leaves = BTreeSet::new();
    for _ in 0..200 {
        match post(h.addr, &tls, "/mutate", body.clone()).await {
            Ok((200, review, leaf)) if review["response"]["allowed"] == true => {
                leaves.insert(leaf.to_vec());
            }
            other => failures.push(format!("{:?}", other.map(|(s, v, _)| (s, v)))),
        }
    }
    done.store(true, Ordering::Relaxed);
    let swaps = swapper.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} failures: {failures:?}",
        failures.len()
    );
    assert!(swaps > 10, "only {swaps} swaps");
    assert_eq!(leaves.len(), 2, "both certificates served");
    println!("rotation: 200 admissions, {swaps} certificate swaps, 0 failures");
}
