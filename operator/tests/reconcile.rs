//! Reconciler tests against a mocked API server (`tower_test::mock`): every request the
//! reconciler sends is asserted (method, path, field manager, body) and answered as the API
//! server would. A reconcile that sends a request nobody expects hangs and the 1 s timeout
//! fails the test — which is also how "no write when nothing changed" is proven.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::{Client, Resource};
use nanogate_operator::controller::build::{
    GatewayRef, Verdict, config_map, desired_status, sidecar_config,
};
use nanogate_operator::controller::{Context, Error, error_policy, reconcile};
use nanogate_operator::crd::{AgentGateway, AgentGatewayStatus};
use nanogate_operator::metrics::Metrics;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

const CONFIG_MAP: &str = "/api/v1/namespaces/apps/configmaps/demo-agent-config";

fn status_path(gw: &str) -> String {
    format!("/apis/nanogate.io/v1alpha1/namespaces/apps/agentgateways/{gw}/status")
}

fn fixture(name: &str) -> AgentGateway {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn mock_context() -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context::new(client, Metrics::default(), Some("test".into()));
    (Arc::new(ctx), ApiServerVerifier(handle))
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// A failed call's answer, with its `Status` body.
fn failure(status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                "message": message,"reason":reason,"code":status.as_u16()}),
    )
}

fn not_found(what: &str) -> Response<Body> {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{what} not found"),
    )
}

/// The gateway `gw` in namespace `apps` as the API server returns it, with `extra` fields
/// (e.g. `status`) merged in.
fn gateway_object(gw: &str, extra: Value) -> Value {
    let mut obj = json!({
        "apiVersion":"nanogate.io/v1alpha1","kind":"AgentGateway",
        "metadata":{"name":gw,"namespace":"apps"},"spec":{"upstream":{"apiKeySecretRef":{"name":"x"}}}
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        obj[k] = v.clone();
    }
    obj
}

async fn json_body(req: Request<Body>) -> Value {
    serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap()
}

/// The config map and status of a gateway `demo` in `apps` whose config is applied and whose
/// status was written at a fixed time.
fn in_sync(gw: &AgentGateway) -> (ConfigMap, AgentGatewayStatus) {
    let cfg = sidecar_config(&gw.spec).unwrap();
    let gref = GatewayRef {
        name: "demo".into(),
        namespace: "apps".into(),
        uid: gw.meta().uid.clone().unwrap(),
    };
    let verdict = Verdict::Applied {
        config_map: "demo-agent-config".into(),
        hash: cfg.hash(),
    };
    let status = desired_status(
        None,
        Some(1),
        &verdict,
        &Default::default(),
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap(),
        ),
    );
    (config_map(&gref, &cfg), status)
}

fn query_has(req: &Request<Body>, part: &str) -> bool {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .any(|p| p == part)
}

/// Plays the API server, one expected request at a time.
struct ApiServerVerifier(ApiHandle);

impl ApiServerVerifier {
    async fn next(&mut self) -> (Request<Body>, mock::SendResponse<Response<Body>>) {
        self.0.next_request().await.expect("a request")
    }

    /// The next request, checked to be a GET of `path`.
    async fn next_get(&mut self, path: &str) -> mock::SendResponse<Response<Body>> {
        let (req, send) = self.next().await;
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), path);
        send
    }

    /// The next request, checked to be a forced server-side apply of `path` by the operator:
    /// its body.
    async fn next_apply(&mut self, path: &str) -> (Value, mock::SendResponse<Response<Body>>) {
        let (req, send) = self.next().await;
        assert_eq!(req.method(), Method::PATCH);
        assert_eq!(req.uri().path(), path);
        assert!(
            query_has(&req, "fieldManager=nanogate-operator"),
            "{}",
            req.uri()
        );
        assert!(query_has(&req, "force=true"), "{}", req.uri());
        assert_eq!(
            req.headers()["content-type"],
            "application/apply-patch+yaml"
        );
        (json_body(req).await, send)
    }

    async fn get_secret(&mut self, name: &str, data: Option<Value>) {
        let send = self
            .next_get(&format!("/api/v1/namespaces/apps/secrets/{name}"))
            .await;
        match data {
            Some(data) => send.send_response(json_response(
                StatusCode::OK,
                &json!({"apiVersion":"v1","kind":"Secret",
                        "metadata":{"name":name,"namespace":"apps"},"data":data}),
            )),
            None => send.send_response(not_found("secret")),
        }
    }

    async fn get_config_map(&mut self, live: Option<&ConfigMap>) {
        let send = self.next_get(CONFIG_MAP).await;
        match live {
            Some(cm) => send.send_response(json_response(
                StatusCode::OK,
                &serde_json::to_value(cm).unwrap(),
            )),
            None => send.send_response(not_found("configmap")),
        }
    }

    async fn apply_config_map(&mut self) -> Value {
        let (body, send) = self.next_apply(CONFIG_MAP).await;
        send.send_response(json_response(StatusCode::OK, &body));
        body
    }

    async fn create_event(&mut self, reason: &str) -> Value {
        let (req, send) = self.next().await;
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.uri().path(),
            "/apis/events.k8s.io/v1/namespaces/apps/events"
        );
        let body = json_body(req).await;
        assert_eq!(body["reason"], reason, "{body}");
        assert_eq!(body["regarding"]["kind"], "AgentGateway");
        assert_eq!(body["reportingController"], "nanogate-operator");
        send.send_response(json_response(StatusCode::CREATED, &body));
        body
    }

    async fn list_pods(&mut self, items: Value) {
        let send = self.next_get("/api/v1/namespaces/apps/pods").await;
        send.send_response(json_response(
            StatusCode::OK,
            &json!({"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadataList",
                    "metadata":{"resourceVersion":"1"},"items":items}),
        ));
    }

    /// The reconciler re-reads the live status before writing; answer with `status`.
    async fn get_status(&mut self, gw: &str, status: Option<Value>) {
        let send = self.next_get(&status_path(gw)).await;
        let extra = status.map_or(json!({}), |st| json!({ "status": st }));
        send.send_response(json_response(StatusCode::OK, &gateway_object(gw, extra)));
    }

    /// As [`Self::get_status`], for a gateway whose status the hub has written.
    async fn get_status_written_by_hub(&mut self, gw: &str, status: Value) {
        let (req, send) = self.next().await;
        assert_eq!(req.method(), Method::GET);
        assert!(
            req.uri()
                .path()
                .ends_with(&format!("/agentgateways/{gw}/status"))
        );
        send.send_response(json_response(StatusCode::OK, &json!({
            "apiVersion":"nanogate.io/v1alpha1","kind":"AgentGateway",
            "metadata":{"name":gw,"namespace":"apps","managedFields":[
                {"manager":"nanogate-hub","operation":"Apply","apiVersion":"nanogate.io/v1alpha1",
                 "fieldsType":"FieldsV1","fieldsV1":{"f:status":{"f:messages":{}}}}]},
            "spec":{"upstream":{"apiKeySecretRef":{"name":"x"}}},
            "status": status
        })));
    }

    async fn patch_status(&mut self, gw: &str) -> Value {
        let (body, send) = self.next_apply(&status_path(gw)).await;
        let live = gateway_object(gw, json!({ "status": body["status"].clone() }));
        send.send_response(json_response(StatusCode::OK, &live));
        body
    }
}

fn condition<'a>(status: &'a Value, ty: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == ty)
        .unwrap()
}

async fn run(
    gw: AgentGateway,
    ctx: Arc<Context>,
    script: impl std::future::Future<Output = ()>,
) -> Result<Action, Error> {
    let (result, ()) = tokio::time::timeout(Duration::from_secs(1), async {
        tokio::join!(reconcile(Arc::new(gw), ctx), script)
    })
    .await
    .expect("reconcile finished within 1s without unexpected requests");
    result
}

/// Reconciles `gw` (named `name`), whose spec is invalid: no config is read or written; the
/// status (passed to `check` with the event) is written, a `ConfigInvalid` event is sent and
/// the gateway waits for a change.
async fn assert_flagged_invalid(gw: AgentGateway, name: &str, check: impl FnOnce(&Value, &Value)) {
    let (ctx, mut api) = mock_context();
    let action = run(gw, ctx.clone(), async {
        api.list_pods(json!([])).await;
        api.get_status(name, None).await;
        let patch = api.patch_status(name).await;
        let ev = api.create_event("ConfigInvalid").await;
        check(&patch["status"], &ev);
    })
    .await
    .unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(ctx.metrics.writes_total(), 2, "status + event");
}

/// The injection record of a pod injected with the image the operator injects now.
fn injected_now() -> String {
    json!({"gateway": "demo", "generation": 1, "mode": "native",
           "image": nanogate_operator::crd::DEFAULT_SIDECAR_IMAGE})
    .to_string()
}

/// Pod `name` in `apps` of gateway `gw`, annotated `key: value`.
fn pod(name: &str, key: &str, value: Value, gw: &str) -> Value {
    let annotations = json!({ key: value, "nanogate.io/gateway": gw });
    json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":name,"namespace":"apps","annotations":annotations}})
}

/// Pod `name` of gateway `gw`, injected with the image the operator injects now.
fn injected_pod(name: &str, gw: &str) -> Value {
    pod(name, "nanogate.io/injected", json!(injected_now()), gw)
}

#[tokio::test]
async fn new_gateway_creates_config_map_event_and_status() {
    let (ctx, mut api) = mock_context();
    let gw = fixture("minimal.yaml");
    let action = run(gw, ctx.clone(), async {
        api.get_secret("tendrl-key", Some(json!({"apiKey":"c2VjcmV0"})))
            .await;
        api.get_config_map(None).await;
        let cm = api.apply_config_map().await;
        assert_eq!(cm["apiVersion"], "v1");
        assert_eq!(cm["kind"], "ConfigMap");
        assert_eq!(cm["metadata"]["ownerReferences"][0]["kind"], "AgentGateway");
        assert_eq!(
            cm["metadata"]["ownerReferences"][0]["uid"],
            "1c7a1f36-0c6b-4a43-9d5c-9f2c1c0a0001"
        );
        let file = cm["data"]["config.json"].as_str().unwrap();
        assert!(file.contains("\"max_batch_size\": 200"));
        assert!(!file.contains("c2VjcmV0") && !file.contains("secret"));
        let ev = api.create_event("Created").await;
        assert!(ev["note"].as_str().unwrap().contains("demo-agent-config"));
        api.list_pods(json!([
            injected_pod("a", "demo"),
            pod("b", "nanogate.io/inject", json!("true"), "demo"),
            injected_pod("c", "other"),
            pod("d", "nanogate.io/inject", json!("false"), "demo"),
        ]))
        .await;
        api.get_status("demo", None).await;
        let patch = api.patch_status("demo").await;
        let st = &patch["status"];
        assert_eq!(st["observedGeneration"], 1);
        assert_eq!(condition(st, "Ready")["status"], "True");
        assert_eq!(condition(st, "ConfigValid")["status"], "True");
        assert_eq!(condition(st, "UpstreamReachable")["status"], "Unknown");
        assert_eq!(st["sidecars"]["expected"], 2);
        assert_eq!(st["sidecars"]["summary"], "0/2");
        // Pod b opted in but was admitted without its sidecar: counted and reported.
        assert_eq!(st["sidecars"]["notInjected"], 1);
        let ev = api.create_event("PodsNotInjected").await;
        let note = ev["note"].as_str().unwrap();
        assert!(
            note.starts_with("1 pod(s) opted in but run without a sidecar"),
            "{note}"
        );
        assert!(note.contains(": b;"), "{note}");
    })
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(
        ctx.metrics.writes_total(),
        4,
        "apply + event + status + not-injected event"
    );
}

#[tokio::test]
async fn unchanged_gateway_makes_no_write() {
    let (ctx, mut api) = mock_context();
    let mut gw = fixture("minimal.yaml");
    let (mut live, status) = in_sync(&gw);
    live.metadata.resource_version = Some("7".into());
    gw.status = Some(status);
    let action = run(gw, ctx.clone(), async {
        api.get_secret("tendrl-key", Some(json!({"apiKey":"c2VjcmV0"})))
            .await;
        api.get_config_map(Some(&live)).await;
        api.list_pods(json!([])).await;
    })
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(ctx.metrics.writes_total(), 0);
}

#[tokio::test]
async fn missing_secret_flags_status_and_waits() {
    let (ctx, mut api) = mock_context();
    let gw = fixture("minimal.yaml");
    let mut written = Value::Null;
    let action = run(gw, ctx.clone(), async {
        api.get_secret("tendrl-key", None).await;
        api.list_pods(json!([])).await;
        api.get_status("demo", None).await;
        let patch = api.patch_status("demo").await;
        let cv = condition(&patch["status"], "ConfigValid");
        assert_eq!(cv["status"], "False");
        assert_eq!(cv["reason"], "SecretMissing");
        assert!(cv["message"].as_str().unwrap().contains(
            "Secret apps/tendrl-key referenced by spec.upstream.apiKeySecretRef not found"
        ));
        assert_eq!(condition(&patch["status"], "Ready")["status"], "False");
        let ev = api.create_event("SecretMissing").await;
        assert_eq!(ev["type"], "Warning");
        written = patch["status"].clone();
    })
    .await
    .unwrap();
    // No Secret watch (no cluster-wide list/watch on Secrets): the gateway is looked at again
    // soon, then less and less often.
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));

    // Still missing at the next look (status as written: nothing to write): a longer wait.
    let mut gw = fixture("minimal.yaml");
    gw.status = Some(serde_json::from_value(written).unwrap());
    let action = run(gw, ctx.clone(), async {
        api.get_secret("tendrl-key", None).await;
        api.list_pods(json!([])).await;
    })
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(4)));
}

#[test]
fn missing_secret_retry_grows_to_a_minute() {
    use nanogate_operator::controller::secret_retry;
    let delays: Vec<u64> = (1..=8).map(|n| secret_retry(n).as_secs()).collect();
    assert_eq!(delays, [2, 4, 8, 16, 32, 60, 60, 60]);
}

#[tokio::test]
async fn secret_without_key_is_reported() {
    let (ctx, mut api) = mock_context();
    let gw = fixture("minimal.yaml");
    run(gw, ctx, async {
        api.get_secret("tendrl-key", Some(json!({"other":"eA=="})))
            .await;
        api.list_pods(json!([])).await;
        api.get_status("demo", None).await;
        let patch = api.patch_status("demo").await;
        let msg = condition(&patch["status"], "ConfigValid")["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(msg.contains("has no key \"apiKey\""), "{msg}");
        api.create_event("SecretMissing").await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn invalid_spec_is_flagged_without_touching_config() {
    let gw = fixture("invalid.yaml");
    assert_flagged_invalid(gw, "broken", |st, ev| {
        let cv = condition(st, "ConfigValid");
        assert_eq!(cv["reason"], "InvalidSpec");
        assert!(cv["message"].as_str().unwrap().contains(
            "spec.batching.minBatchSize (300) must be ≤ spec.batching.maxBatchSize (200)"
        ));
        assert_eq!(st["observedGeneration"], 2);
        assert!(ev["note"].as_str().unwrap().contains("spec.upstream.url"));
    })
    .await;
}

/// A gateway whose image the operator does not allow (it got in while the webhook was down) is
/// invalid: `ConfigValid=False` naming the field, no ConfigMap, so nothing to inject.
#[tokio::test]
async fn an_image_the_operator_does_not_allow_is_flagged_without_touching_config() {
    let mut gw = fixture("minimal.yaml");
    gw.spec.sidecar.image = Some("evil.example/miner:1".into());
    assert_flagged_invalid(gw, "demo", |st, _| {
        let cv = condition(st, "ConfigValid");
        assert_eq!(cv["status"], "False");
        assert_eq!(cv["reason"], "InvalidSpec");
        let message = cv["message"].as_str().unwrap();
        assert!(
            message.contains("spec.sidecar.image (\"evil.example/miner:1\")")
                && message.contains("--allowed-sidecar-images"),
            "{message}"
        );
    })
    .await;
}

#[tokio::test]
async fn api_failure_is_an_error_with_label_and_backoff() {
    let (ctx, mut api) = mock_context();
    let gw = fixture("minimal.yaml");
    let result = run(gw.clone(), ctx.clone(), async {
        let (_req, send) = api.next().await;
        send.send_response(failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "etcd unavailable",
        ));
    })
    .await;
    let err = result.unwrap_err();
    assert_eq!(err.metric_label(), "secret_get");
    let gw = Arc::new(gw);
    assert_eq!(
        error_policy(gw.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        error_policy(gw.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(
        error_policy(gw, &err, ctx.clone()),
        Action::requeue(Duration::from_secs(4))
    );
    assert!(
        ctx.metrics
            .render()
            .contains("nanogate_operator_reconcile_errors_total{error=\"secret_get\"} 3")
    );
}

#[tokio::test]
async fn gateway_without_namespace_is_an_error_not_a_panic() {
    let (ctx, _api) = mock_context();
    let mut gw = fixture("minimal.yaml");
    gw.metadata.namespace = None;
    let err = reconcile(Arc::new(gw), ctx).await.unwrap_err();
    assert_eq!(err.metric_label(), "missing_object_key");
}

#[tokio::test]
async fn stale_cache_does_not_cause_a_second_status_write() {
    // The cached gateway predates our last status write; the live status already matches.
    let (ctx, mut api) = mock_context();
    let gw = fixture("minimal.yaml");
    let (live_cm, live_status) = in_sync(&gw);
    run(gw, ctx.clone(), async {
        api.get_secret("tendrl-key", Some(json!({"apiKey":"c2VjcmV0"})))
            .await;
        api.get_config_map(Some(&live_cm)).await;
        api.list_pods(json!([])).await;
        api.get_status("demo", Some(serde_json::to_value(&live_status).unwrap()))
            .await;
    })
    .await
    .unwrap();
    assert_eq!(ctx.metrics.writes_total(), 0);
}

#[tokio::test]
async fn skipping_tls_verification_is_a_warning_condition_and_event() {
    let (ctx, mut api) = mock_context();
    let mut gw = fixture("minimal.yaml");
    gw.spec.upstream.tls =
        Some(serde_json::from_value(json!({"insecureSkipVerify": true})).unwrap());
    let action = run(gw, ctx.clone(), async {
        api.get_secret("tendrl-key", Some(json!({"apiKey":"c2VjcmV0"})))
            .await;
        api.get_config_map(None).await;
        let cm = api.apply_config_map().await;
        let file = cm["data"]["config.json"].as_str().unwrap();
        assert!(file.contains("\"insecure_skip_verify\": true"), "{file}");
        api.create_event("Created").await;
        api.list_pods(json!([])).await;
        api.get_status("demo", None).await;
        let patch = api.patch_status("demo").await;
        let st = &patch["status"];
        assert_eq!(condition(st, "Ready")["status"], "True");
        let tls = condition(st, "UpstreamTLSVerified");
        assert_eq!(tls["status"], "False");
        assert_eq!(tls["reason"], "InsecureSkipVerify");
        let ev = api.create_event("InsecureUpstreamTLS").await;
        assert_eq!(ev["type"], "Warning");
        assert!(ev["note"].as_str().unwrap().contains("caSecretRef"), "{ev}");
    })
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

#[tokio::test]
async fn the_reconciler_applies_only_its_fields_once_the_hub_wrote() {
    let (ctx, mut api) = mock_context();
    let gw = fixture("minimal.yaml");
    let hub_wrote = json!({
        "conditions":[{"type":"UpstreamReachable","status":"True","reason":"Delivering",
                       "message":"m","lastTransitionTime":"2024-01-01T00:00:00Z"}],
        "sidecars":{"expected":0,"connected":3,"healthy":3,"currentConfig":3,"summary":"3/0"},
        "messages":{"receivedTotal":5,"deliveredTotal":5,"droppedTotal":0,
                    "receivedPerSecond":0.0,"deliveredPerSecond":0.0},
        "leftBehind":{"messagesTotal":7,"bytesTotal":70,"shutdownsTotal":1}
    });
    run(gw, ctx, async {
        api.get_secret("tendrl-key", Some(json!({"apiKey":"c2VjcmV0"})))
            .await;
        api.get_config_map(None).await;
        api.apply_config_map().await;
        api.create_event("Created").await;
        api.list_pods(json!([injected_pod("a", "demo")])).await;
        api.get_status_written_by_hub("demo", hub_wrote.clone())
            .await;
        let patch = api.patch_status("demo").await;
        let st = &patch["status"];
        let mut types: Vec<&str> = st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        types.sort_unstable();
        // Its own conditions, the hub's exactly as read (the list may be atomic), and the
        // starting value of a hub condition the hub has not written yet.
        assert_eq!(
            types,
            vec![
                "ConfigValid",
                "Ready",
                "SidecarsHealthy",
                "UpstreamReachable"
            ]
        );
        let hub_condition = st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "UpstreamReachable")
            .unwrap();
        assert_eq!(hub_condition, &hub_wrote["conditions"][0]);
        assert_eq!(
            st["sidecars"],
            json!({"expected": 1, "notInjected": 0, "outdated": 0})
        );
        for hub_field in ["messages", "upstream", "leftBehind", "unhealthySidecars"] {
            assert!(st.get(hub_field).is_none(), "{hub_field} in {st}");
        }
    })
    .await
    .unwrap();
}
