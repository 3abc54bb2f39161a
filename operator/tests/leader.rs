//! Lease election rounds against a mocked API server: create, renew, respect a live holder,
//! take over an expired lease, lose a race (409), release.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::client::Body;
use nanogate_operator::leader::{LeaderElector, LeaseConfig, LeaseError, Round};
use nanogate_operator::{Metrics, RunOptions, run_with_client};
use serde_json::{Value, json};
use tokio::time::Instant;
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

/// A failed call's `Status` body.
fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": reason, "code": code})
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
        respond(send, StatusCode::NOT_FOUND, &status(404, "NotFound"));
        let (req, send) = api.next_request().await.unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.uri().path(),
            "/apis/coordination.k8s.io/v1/namespaces/ops/leases"
        );
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
        answer_get(&mut api, lease(Some("other"), 3)).await;
    })
    .await;
    assert_eq!(r, Round::Following(Some("other".into())));
}

/// Answers one GET of the lease with `lease`.
async fn answer_get(api: &mut ApiHandle, lease: Value) {
    let (req, send) = api.next_request().await.unwrap();
    assert_eq!((req.method(), req.uri().path()), (&Method::GET, PATH));
    respond(send, StatusCode::OK, &lease);
}

/// Answers one PUT of the lease with its own body, after `check` on that body.
async fn answer_put(api: &mut ApiHandle, check: impl FnOnce(&Value)) {
    let (req, send) = api.next_request().await.unwrap();
    assert_eq!((req.method(), req.uri().path()), (&Method::PUT, PATH));
    let b = body(req).await;
    check(&b);
    respond(send, StatusCode::OK, &b);
}

/// Answers the takeover PUT, checking it.
async fn answer_takeover(api: &mut ApiHandle, version: &str) {
    answer_put(api, |b| {
        assert_eq!(
            b["metadata"]["resourceVersion"], version,
            "replace carries what we read"
        );
        assert_eq!(b["spec"]["holderIdentity"], "me");
        assert_eq!(b["spec"]["leaseTransitions"], 4);
    })
    .await;
}

/// A round that reads `lease` (resourceVersion 42) and takes it over.
async fn assert_takes_over(el: &mut LeaderElector, api: &mut ApiHandle, lease: Value) {
    let r = round_with(el, async {
        answer_get(api, lease).await;
        answer_takeover(api, "42").await;
    })
    .await;
    assert_eq!(r, Round::Leading);
}

fn with_version(mut lease: Value, version: &str) -> Value {
    lease["metadata"]["resourceVersion"] = json!(version);
    lease
}

#[tokio::test(start_paused = true)]
async fn expired_lease_is_taken_over_with_optimistic_concurrency() {
    let (mut el, mut api) = elector();
    // Its renewTime is 20 s old by our clock, but our clock is not the holder's: it counts
    // only once we have seen the lease unchanged for its duration.
    let stale = lease(Some("other"), 20);
    let r = round_with(&mut el, answer_get(&mut api, stale.clone())).await;
    assert_eq!(r, Round::Following(Some("other".into())));
    tokio::time::advance(Duration::from_secs(15)).await;
    assert_takes_over(&mut el, &mut api, stale).await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_from_a_clock_ahead_of_ours_still_expires() {
    let (mut el, mut api) = elector();
    // The holder's clock runs an hour ahead and it died right after renewing.
    let ahead = lease(Some("other"), -3600);
    let r = round_with(&mut el, answer_get(&mut api, ahead.clone())).await;
    assert_eq!(r, Round::Following(Some("other".into())));
    tokio::time::advance(Duration::from_secs(14)).await;
    let r = round_with(&mut el, answer_get(&mut api, ahead.clone())).await;
    assert_eq!(r, Round::Following(Some("other".into())), "14 s < 15 s");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_takes_over(&mut el, &mut api, ahead).await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_that_keeps_changing_is_never_taken() {
    let (mut el, mut api) = elector();
    // Its renewTime looks ancient by our clock, yet the holder keeps renewing it.
    for version in ["42", "43", "44", "45"] {
        let renewed = with_version(lease(Some("other"), 100), version);
        let r = round_with(&mut el, answer_get(&mut api, renewed)).await;
        assert_eq!(r, Round::Following(Some("other".into())));
        tokio::time::advance(Duration::from_secs(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_round_without_an_answer_ends_at_the_round_timeout() {
    let (mut el, mut api) = elector();
    let started = tokio::time::Instant::now();
    let (r, _held) = tokio::join!(el.try_acquire_or_renew(), async {
        // Take the request and never answer it.
        api.next_request().await
    });
    assert!(matches!(r, Err(LeaseError::Timeout(_))), "{r:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(3), "15 s / 5");
}

#[tokio::test]
async fn losing_the_race_means_following() {
    let (mut el, mut api) = elector();
    let r = round_with(&mut el, async {
        answer_get(&mut api, lease(None, 100)).await;
        let (_req, send) = api.next_request().await.unwrap();
        respond(send, StatusCode::CONFLICT, &status(409, "Conflict"));
    })
    .await;
    assert_eq!(r, Round::Following(None));
}

#[tokio::test]
async fn holder_renews_and_releases() {
    let (mut el, mut api) = elector();
    let r = round_with(&mut el, async {
        answer_get(&mut api, lease(Some("me"), 5)).await;
        answer_put(&mut api, |b| {
            assert_eq!(b["spec"]["holderIdentity"], "me");
            assert_eq!(
                b["spec"]["leaseTransitions"], 3,
                "a renewal is not a transition"
            );
        })
        .await;
    })
    .await;
    assert_eq!(r, Round::Leading);
    assert!(el.last_renew().is_some());

    let release = async {
        answer_get(&mut api, lease(Some("me"), 1)).await;
        answer_put(&mut api, |b| {
            assert!(
                b["spec"].get("holderIdentity").is_none_or(Value::is_null),
                "{b}"
            );
        })
        .await;
    };
    tokio::time::timeout(Duration::from_secs(1), async {
        tokio::join!(el.release(), release)
    })
    .await
    .unwrap();
    assert!(el.last_renew().is_none());
}

/// The operator's run loop in the background against a mocked API server with 3 s leases:
/// renew every 0.43 s, step down 2 s after the last renewal, rounds of 0.6 s at most.
struct RunLoop {
    metrics: Metrics,
    stop: tokio::sync::oneshot::Sender<()>,
    operator: tokio::task::JoinHandle<anyhow::Result<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl RunLoop {
    /// Starts the run loop and, as its API server, [`lease_server`] with `hold` and `on_write`.
    fn start(
        hold: impl FnMut(&Method, u32, bool) -> bool + Send + 'static,
        on_write: impl Fn() + Send + 'static,
    ) -> RunLoop {
        let (service, api) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let metrics = Metrics::default();
        let opts = RunOptions {
            lease_namespace: "ops".into(),
            identity: Some("me".into()),
            lease_duration: 3,
            ..RunOptions::default()
        };
        let server = lease_server(api, hold, on_write);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let operator = tokio::spawn(run_with_client(client, opts, metrics.clone(), async {
            let _ = stopped.await;
        }));
        RunLoop {
            metrics,
            stop,
            operator,
            server,
        }
    }

    /// Waits until the leader gauge is `want`; panics with `what` after `deadline`.
    async fn wait_leader(&self, want: i64, deadline: Instant, what: &str) {
        while self.metrics.leader.get() != want {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(15), self.operator).await;
        self.server.abort();
    }
}

/// Plays the API server in the background: answers lease calls (404 until the lease is
/// written, then the last write, stored with a new resourceVersion; `on_write` after each)
/// unless `hold(method, writes so far, whether the lease exists)` says to hold the call
/// forever. Any other call is held.
fn lease_server(
    mut api: ApiHandle,
    mut hold: impl FnMut(&Method, u32, bool) -> bool + Send + 'static,
    on_write: impl Fn() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut stored: Option<Value> = None;
        let mut writes = 0;
        while let Some((req, send)) = api.next_request().await {
            let lease_call = req.uri().path().starts_with("/apis/coordination.k8s.io/");
            if !lease_call || hold(req.method(), writes, stored.is_some()) {
                held.push(send);
                continue;
            }
            match (req.method().clone(), stored.clone()) {
                (Method::GET, None) => {
                    respond(send, StatusCode::NOT_FOUND, &status(404, "NotFound"))
                }
                (Method::GET, Some(lease)) => respond(send, StatusCode::OK, &lease),
                (_, _) => {
                    let mut b = body(req).await;
                    writes += 1;
                    b["metadata"]["resourceVersion"] = json!(writes.to_string());
                    stored = Some(b.clone());
                    respond(send, StatusCode::OK, &b);
                    on_write();
                }
            }
        }
    })
}

/// The run loop against an API server that answers the first lease rounds and then stops
/// answering anything: the leader stops leading by its renew deadline, not whenever the hung
/// call returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_api_server_stops_answering_steps_down_by_the_renew_deadline() {
    let last_answer: Arc<Mutex<Option<Instant>>> = Arc::default();
    let seen = last_answer.clone();
    // Creates the lease, answers one renewal, then holds every request.
    let run = RunLoop::start(
        |_, writes, _| writes >= 2,
        move || *seen.lock().unwrap() = Some(Instant::now()),
    );
    // Leading after the first write …
    let deadline = Instant::now() + Duration::from_secs(5);
    run.wait_leader(1, deadline, "never became leader").await;
    // … and no longer leading within the renew deadline of the last renewal.
    let deadline = deadline + Duration::from_secs(5);
    run.wait_leader(0, deadline, "never stepped down").await;
    let stepped_down = Instant::now();
    let renewed = last_answer.lock().unwrap().expect("the lease was written");
    let after = stepped_down.duration_since(renewed);
    assert!(
        after <= Duration::from_millis(2_400),
        "stepped down {after:?} after the last renewal; the deadline is 2 s"
    );
    assert!(
        after >= Duration::from_millis(1_500),
        "{after:?}: too early"
    );
    run.stop().await;
}

/// The run loop against an API server that leaves one lease call unanswered and answers every
/// other: one hung call (an etcd stall, a dropped connection) is retried within the renew
/// deadline, so the leader keeps leading — stepping down drops every sidecar's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_rides_out_one_hung_lease_call() {
    // The first renewal's read after the lease exists is held forever.
    let mut hung_one = false;
    let run = RunLoop::start(
        move |method, writes, exists| {
            let hang = *method == Method::GET && exists && writes >= 2 && !hung_one;
            hung_one |= hang;
            hang
        },
        || {},
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    run.wait_leader(1, deadline, "never became leader").await;
    // Three lease durations, the hung call among them: leading throughout.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(9) {
        assert_eq!(
            run.metrics.leader.get(),
            1,
            "stepped down {:?} into the run after one hung lease call",
            watched.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.stop().await;
}
