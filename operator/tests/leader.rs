//! Lease election rounds against a mocked API server: create, renew, respect a live holder,
//! take over an expired lease, lose a race (409), release.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::client::Body;
use nanogate_operator::leader::{LeaderElector, LeaseConfig, Round};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/nanogate-operator";

fn elector() -> (LeaderElector, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let cfg = LeaseConfig {
        name: "nanogate-operator".into(),
        namespace: "ops".into(),
        identity: "me".into(),
        lease_duration: Duration::from_secs(15),
        owner: None,
    };
    (
        LeaderElector::new(Client::new(service, "default"), cfg),
        handle,
    )
}

fn respond(send: mock::SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn lease(holder: Option<&str>, renewed_secs_ago: i64) -> Value {
    let renew = Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago);
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "nanogate-operator", "namespace": "ops", "resourceVersion": "42"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                 "leaseTransitions": 3}
    })
}

async fn body(req: Request<Body>) -> Value {
    serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap()
}

async fn round_with(
    el: &mut LeaderElector,
    script: impl std::future::Future<Output = ()>,
) -> Round {
    let (r, ()) = tokio::time::timeout(Duration::from_secs(1), async {
        tokio::join!(el.try_acquire_or_renew(), script)
    })
    .await
    .expect("round finished without unexpected requests");
    r.unwrap()
}

#[tokio::test]
async fn creates_missing_lease() {
    let (mut el, mut api) = elector();
    let r = round_with(&mut el, async {
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!((req.method(), req.uri().path()), (&Method::GET, PATH));
        respond(send, StatusCode::NOT_FOUND, &json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","reason":"NotFound","code":404}));
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri().path(), "/apis/coordination.k8s.io/v1/namespaces/ops/leases");
        let b = body(req).await;
        assert_eq!(b["spec"]["holderIdentity"], "me");
        assert_eq!(b["spec"]["leaseDurationSeconds"], 15);
        respond(send, StatusCode::CREATED, &b);
    })
    .await;
    assert_eq!(r, Round::Leading);
}

#[tokio::test]
async fn live_lease_of_another_is_respected_without_writing() {
    let (mut el, mut api) = elector();
    let r = round_with(&mut el, async {
        let (_req, send) = api.next_request().await.unwrap();
        respond(send, StatusCode::OK, &lease(Some("other"), 3));
    })
    .await;
    assert_eq!(r, Round::Following(Some("other".into())));
}

#[tokio::test]
async fn expired_lease_is_taken_over_with_optimistic_concurrency() {
    let (mut el, mut api) = elector();
    let r = round_with(&mut el, async {
        let (_req, send) = api.next_request().await.unwrap();
        respond(send, StatusCode::OK, &lease(Some("other"), 20));
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!((req.method(), req.uri().path()), (&Method::PUT, PATH));
        let b = body(req).await;
        assert_eq!(
            b["metadata"]["resourceVersion"], "42",
            "replace carries what we read"
        );
        assert_eq!(b["spec"]["holderIdentity"], "me");
        assert_eq!(b["spec"]["leaseTransitions"], 4);
        respond(send, StatusCode::OK, &b);
    })
    .await;
    assert_eq!(r, Round::Leading);
}

#[tokio::test]
async fn losing_the_race_means_following() {
    let (mut el, mut api) = elector();
    let r = round_with(&mut el, async {
        let (_req, send) = api.next_request().await.unwrap();
        respond(send, StatusCode::OK, &lease(None, 100));
        let (_req, send) = api.next_request().await.unwrap();
        respond(send, StatusCode::CONFLICT, &json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","reason":"Conflict","code":409}));
    })
    .await;
    assert_eq!(r, Round::Following(None));
}

#[tokio::test]
async fn holder_renews_and_releases() {
    let (mut el, mut api) = elector();
    let r = round_with(&mut el, async {
        let (_req, send) = api.next_request().await.unwrap();
        respond(send, StatusCode::OK, &lease(Some("me"), 5));
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!(req.method(), Method::PUT);
        let b = body(req).await;
        assert_eq!(b["spec"]["holderIdentity"], "me");
        assert_eq!(
            b["spec"]["leaseTransitions"], 3,
            "a renewal is not a transition"
        );
        respond(send, StatusCode::OK, &b);
    })
    .await;
    assert_eq!(r, Round::Leading);
    assert!(el.last_renew().is_some());

    let release = async {
        let (_req, send) = api.next_request().await.unwrap();
        respond(send, StatusCode::OK, &lease(Some("me"), 1));
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!(req.method(), Method::PUT);
        let b = body(req).await;
        assert!(
            b["spec"].get("holderIdentity").is_none_or(Value::is_null),
            "{b}"
        );
        respond(send, StatusCode::OK, &b);
    };
    tokio::time::timeout(Duration::from_secs(1), async {
        tokio::join!(el.release(), release)
    })
    .await
    .unwrap();
    assert!(el.last_renew().is_none());
}
