//! A platform test server: the three endpoints of the `http` upstream (`docs/architecture.md`,
//! "Upstream"), on 127.0.0.1:0,
//! plain HTTP, with fault injection.
//!
//! - `POST /entities/messages`: JSON array, appended to [`PlatformServer::received`].
//! - `POST /entities/message`: one message, appended too; answers
//!   `{"status":"ok","received":1}` (relayed by the agent to a `wait:true` sender).
//! - `GET /entities/check_messages?limit=N`: pops up to N messages queued with
//!   [`PlatformServer::queue_for_check`]; 204 when none, else 200 `{"messages":[…]}`.
//!
//! Every request must carry `Authorization: Bearer <key>` ([`PlatformServer::api_key`], or
//! the key given to [`PlatformServer::rotate_api_key`]); otherwise 401. The bearer token of
//! every request and of every message delivered is recorded ([`PlatformServer::bearers`],
//! [`PlatformServer::received_with_bearer`]). Faults ([`Faults`]) apply to all three endpoints, checked in this order:
//! down / drop connection, delay, unauthorized (401 while set, as if the key were revoked),
//! redirect (`302 Location: /ok`), 500-style failures, 429 + Retry-After; then on the batch
//! endpoint only: 4xx rejection, 413 over a size limit, 422 for a batch holding a "poison"
//! message, reset mid-body, 200 with a garbage body. `check_messages` honours the garbage
//! body too. `/ok` (the redirect's target) answers 200 to any method and stores nothing: a
//! client that follows the redirect believes it delivered.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// The API key [`PlatformServer::start`] expects.
pub const DEFAULT_API_KEY: &str = "test-api-key-0123456789";

/// Fault injection knobs. All take effect on the next request.
#[derive(Debug, Default)]
pub struct Faults {
    fail_next: AtomicU32,
    fail_status: AtomicU16,
    rate_limit_next: AtomicU32,
    retry_after_secs: AtomicU64,
    reject_next: AtomicU32,
    reject_status: AtomicU16,
    drop_next: AtomicU32,
    delay_ms: AtomicU64,
    ack_delay_ms: AtomicU64,
    down: AtomicBool,
    unauthorized: AtomicBool,
    redirect: AtomicBool,
    max_batch_messages: AtomicU64,
    max_batch_bytes: AtomicU64,
    poison: AtomicBool,
    reset_next: AtomicU32,
    garbage: AtomicBool,
    slow_ack_armed: AtomicBool,
    slow_ack_id: AtomicU64,
    slow_ack_ms: AtomicU64,
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl Faults {
    /// The next `n` requests fail with `status` (e.g. 500, 503, 408).
    pub fn fail_next(&self, n: u32, status: u16) {
        self.fail_status.store(status, Ordering::SeqCst);
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` requests get 429 with `Retry-After: <secs>`.
    pub fn rate_limit_next(&self, n: u32, retry_after: Duration) {
        self.retry_after_secs
            .store(retry_after.as_secs(), Ordering::SeqCst);
        self.rate_limit_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` batches are refused for good with `status` (a 4xx other than 408/429).
    pub fn reject_next(&self, n: u32, status: u16) {
        self.reject_status.store(status, Ordering::SeqCst);
        self.reject_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` requests see their connection closed without a response.
    pub fn drop_next(&self, n: u32) {
        self.drop_next.store(n, Ordering::SeqCst);
    }

    /// Every response is delayed by `d` (zero to turn off).
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Batches are stored at once but their response is delayed by `d` (zero to turn off):
    /// killing the agent meanwhile leaves a delivered batch unacknowledged.
    pub fn set_ack_delay(&self, d: Duration) {
        self.ack_delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// The next batch holding a message whose `data.id` is `id` is stored at once but
    /// answered only after `d` (on top of any other delay), while other batches go at the
    /// normal pace: later batches finish first.
    pub fn slow_ack_holding(&self, id: u64, d: Duration) {
        self.slow_ack_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
        self.slow_ack_id.store(id, Ordering::SeqCst);
        self.slow_ack_armed.store(true, Ordering::SeqCst);
    }

    /// While down, every connection is closed before any response (new and kept-alive ones).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// While set, every request is answered 401 (a revoked or rotated key), even one with the
    /// right key.
    pub fn set_unauthorized(&self, on: bool) {
        self.unauthorized.store(on, Ordering::SeqCst);
    }

    /// While set, every request to `/entities/…` is answered `302 Location: /ok`; `/ok` answers
    /// 200 to anything and stores nothing.
    pub fn set_redirect(&self, on: bool) {
        self.redirect.store(on, Ordering::SeqCst);
    }

    /// Batches of more than `n` messages are answered 413 (0 turns it off).
    pub fn set_max_batch_messages(&self, n: u64) {
        self.max_batch_messages.store(n, Ordering::SeqCst);
    }

    /// Batches whose body is longer than `n` bytes are answered 413 (0 turns it off).
    pub fn set_max_batch_bytes(&self, n: u64) {
        self.max_batch_bytes.store(n, Ordering::SeqCst);
    }

    /// While set, a batch holding a message whose `data.poison` is true is refused with 422
    /// (and nothing of it is stored), as a platform validating each message would.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::SeqCst);
    }

    /// The next `n` batches are read but not stored; the answer is `200` with a
    /// `Content-Length` longer than what is sent, then the connection is closed mid-body.
    pub fn reset_next(&self, n: u32) {
        self.reset_next.store(n, Ordering::SeqCst);
    }

    /// While set, batches are stored and answered 200 with a body that is not JSON, and
    /// `check_messages` answers 200 with the same garbage.
    pub fn set_garbage(&self, on: bool) {
        self.garbage.store(on, Ordering::SeqCst);
    }

    /// Turns every fault off.
    pub fn clear(&self) {
        for c in [
            &self.fail_next,
            &self.rate_limit_next,
            &self.reject_next,
            &self.drop_next,
            &self.reset_next,
        ] {
            c.store(0, Ordering::SeqCst);
        }
        self.set_delay(Duration::ZERO);
        self.set_ack_delay(Duration::ZERO);
        self.set_down(false);
        self.set_unauthorized(false);
        self.set_redirect(false);
        self.set_max_batch_messages(0);
        self.set_max_batch_bytes(0);
        self.set_poison(false);
        self.set_garbage(false);
        self.slow_ack_armed.store(false, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct State {
    api_key: String,
    /// The key accepted instead of `api_key` once the platform rotated it.
    rotated_key: Mutex<Option<String>>,
    /// Keys accepted besides the current one.
    also_accepted: Mutex<Vec<String>>,
    received: Mutex<Vec<Value>>,
    /// The bearer token each message of `received` came with (same order).
    received_bearers: Mutex<Vec<String>>,
    /// The bearer token of every request (empty: none), in arrival order.
    bearers: Mutex<Vec<String>>,
    check_queue: Mutex<VecDeque<Value>>,
    faults: Faults,
    batches: AtomicU64,
    requests: AtomicU64,
    unauthorized: AtomicU64,
    /// Method and path of every request, in arrival order.
    log: Mutex<Vec<String>>,
    /// Batch requests (`POST /entities/messages`) being handled now, and the most at once.
    batches_in_flight: AtomicU64,
    peak_batches_in_flight: AtomicU64,
    /// While set, batches are counted (in `discarded`) but not stored: benches at high rates.
    discard: AtomicBool,
    discarded: AtomicU64,
}

/// Counts one batch request in flight while it lives.
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn new(state: &'a State) -> Self {
        let now = state.batches_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state
            .peak_batches_in_flight
            .fetch_max(now, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.batches_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The platform test server. Dropping it stops the server.
pub struct PlatformServer {
    state: Arc<State>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PlatformServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PlatformServer {
    /// Binds 127.0.0.1:0 and serves plain HTTP, expecting [`DEFAULT_API_KEY`].
    pub async fn start() -> anyhow::Result<PlatformServer> {
        Self::start_with_key(DEFAULT_API_KEY).await
    }

    /// Like [`PlatformServer::start`] with another expected API key.
    pub async fn start_with_key(api_key: &str) -> anyhow::Result<PlatformServer> {
        Self::start_on("127.0.0.1:0", api_key).await
    }

    /// Binds `addr` (e.g. the real node's bridge address, where pods reach this machine)
    /// and serves plain HTTP, expecting `api_key`.
    pub async fn start_on(addr: &str, api_key: &str) -> anyhow::Result<PlatformServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            api_key: api_key.to_owned(),
            ..State::default()
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(PlatformServer { state, addr, task })
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT` (the agent appends `/entities/…`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The API key this server expects.
    pub fn api_key(&self) -> &str {
        &self.state.api_key
    }

    /// From now on only `key` is accepted (the platform rotated the key; the old one is 401).
    pub fn rotate_api_key(&self, key: &str) {
        *self.state.rotated_key.lock().expect("lock") = Some(key.to_owned());
        self.state.also_accepted.lock().expect("lock").clear();
    }

    /// Accepts `key` too, besides the current one (a rotation with an overlap: both work
    /// until [`PlatformServer::rotate_api_key`] retires the old one).
    pub fn also_accept(&self, key: &str) {
        self.state
            .also_accepted
            .lock()
            .expect("lock")
            .push(key.to_owned());
    }

    /// The bearer token of every request so far (empty string: none), in arrival order.
    pub fn bearers(&self) -> Vec<String> {
        self.state.bearers.lock().expect("lock").clone()
    }

    /// Every message delivered so far with the bearer token of the request that delivered it.
    pub fn received_with_bearer(&self) -> Vec<(String, Value)> {
        let bearers = self.state.received_bearers.lock().expect("lock").clone();
        bearers.into_iter().zip(self.received()).collect()
    }

    /// Every message delivered so far (batches and single messages), in arrival order.
    pub fn received(&self) -> Vec<Value> {
        self.state.received.lock().expect("lock").clone()
    }

    /// Number of messages delivered so far (stored, and counted while discarding).
    pub fn received_count(&self) -> usize {
        self.state.received.lock().expect("lock").len()
            + self.state.discarded.load(Ordering::SeqCst) as usize
    }

    /// While `on`, batches are acknowledged and counted in [`Self::received_count`] but their
    /// messages are not parsed into values nor kept (benches at hundreds of thousands of
    /// messages per second).
    pub fn set_discard(&self, on: bool) {
        self.state.discard.store(on, Ordering::SeqCst);
    }

    /// Batch requests (`POST /entities/messages`) being handled right now, answered or not.
    pub fn batches_in_flight(&self) -> u64 {
        self.state.batches_in_flight.load(Ordering::SeqCst)
    }

    /// The most batch requests that were being handled at the same time so far.
    pub fn peak_batches_in_flight(&self) -> u64 {
        self.state.peak_batches_in_flight.load(Ordering::SeqCst)
    }

    /// Batches accepted so far.
    pub fn batches(&self) -> u64 {
        self.state.batches.load(Ordering::SeqCst)
    }

    /// Requests that carried a wrong or no API key.
    pub fn unauthorized(&self) -> u64 {
        self.state.unauthorized.load(Ordering::SeqCst)
    }

    /// All requests seen (including failed ones).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// `METHOD /path` of every request seen, in arrival order.
    pub fn request_log(&self) -> Vec<String> {
        self.state.log.lock().expect("lock").clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// Queues a message to be served by `check_messages` (and so by the agent's `msg_check`).
    pub fn queue_for_check(&self, msg: Value) {
        self.state.check_queue.lock().expect("lock").push_back(msg);
    }

    /// Waits until at least `n` messages arrived; false on timeout.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.received_count() < n {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Stores delivered messages with the bearer token they came with (one lock order: bearers
/// first, so [`PlatformServer::received_with_bearer`] never pairs a message with another's).
fn record(state: &State, bearer: &str, msgs: Vec<Value>) {
    let mut bearers = state.received_bearers.lock().expect("lock");
    bearers.extend(std::iter::repeat_n(bearer.to_owned(), msgs.len()));
    state.received.lock().expect("lock").extend(msgs);
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if state.faults.is_down() {
            drop(stream);
            continue;
        }
        let state = state.clone();
        tokio::spawn(async move {
            // A handler that wants the connection gone without a response notifies this.
            let kill = Arc::new(Notify::new());
            let svc = {
                let kill = kill.clone();
                service_fn(move |req| handle(req, state.clone(), kill.clone()))
            };
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = kill.notified() => {}
            }
        });
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn json(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .expect("valid response")
}

/// What the garbage mode answers with status 200.
pub const GARBAGE_BODY: &str = "<html><body>Bad gateway? {\"mess";

/// A body that sends `chunk` and then fails, so the server closes the connection before the
/// promised `Content-Length` is complete.
struct Truncated {
    chunk: Option<Bytes>,
}

impl hyper::body::Body for Truncated {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        std::task::Poll::Ready(Some(match self.chunk.take() {
            Some(chunk) => Ok(hyper::body::Frame::data(chunk)),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected reset mid-body",
            )),
        }))
    }
}

fn is_poison(msg: &Value) -> bool {
    msg.get("data")
        .and_then(|d| d.get("poison"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    kill: Arc<Notify>,
) -> Result<Response<Body>, Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let _in_flight = (req.method() == hyper::Method::POST
        && req.uri().path() == "/entities/messages")
        .then(|| InFlight::new(&state));
    state
        .log
        .lock()
        .expect("lock")
        .push(format!("{} {}", req.method(), req.uri().path()));
    let f = &state.faults;
    if f.is_down() || take(&f.drop_next) {
        kill.notify_one();
        std::future::pending::<()>().await;
    }
    let delay = f.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    state.bearers.lock().expect("lock").push(bearer.clone());
    let authorized = match state.rotated_key.lock().expect("lock").as_deref() {
        Some(key) => bearer == key,
        None => bearer == state.api_key,
    } || state.also_accepted.lock().expect("lock").contains(&bearer);
    if !authorized || f.unauthorized.load(Ordering::SeqCst) {
        state.unauthorized.fetch_add(1, Ordering::SeqCst);
        return Ok(json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid API key"}),
        ));
    }
    if req.uri().path() == "/ok" {
        return Ok(json(StatusCode::OK, serde_json::json!({"status": "ok"})));
    }
    if f.redirect.load(Ordering::SeqCst) {
        let mut r = json(StatusCode::FOUND, serde_json::json!({"error": "moved"}));
        r.headers_mut()
            .insert("location", "/ok".parse().expect("header value"));
        return Ok(r);
    }
    if take(&f.fail_next) {
        let status = StatusCode::from_u16(f.fail_status.load(Ordering::SeqCst))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(json(
            status,
            serde_json::json!({"error": "injected failure"}),
        ));
    }
    if take(&f.rate_limit_next) {
        let mut r = json(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({"error": "slow down"}),
        );
        let secs = f.retry_after_secs.load(Ordering::SeqCst).to_string();
        r.headers_mut()
            .insert("retry-after", secs.parse().expect("header value"));
        return Ok(r);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "body"}),
            ));
        }
    };
    match (method.as_str(), path.as_str()) {
        ("POST", "/entities/messages") if state.discard.load(Ordering::SeqCst) => {
            let Ok(msgs) = serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&body) else {
                return Ok(json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "expected a JSON array"}),
                ));
            };
            state
                .discarded
                .fetch_add(msgs.len() as u64, Ordering::SeqCst);
            state.batches.fetch_add(1, Ordering::SeqCst);
            Ok(json(
                StatusCode::OK,
                serde_json::json!({"status": "ok", "received": msgs.len()}),
            ))
        }
        ("POST", "/entities/messages") => {
            let Ok(Value::Array(msgs)) = serde_json::from_slice::<Value>(&body) else {
                return Ok(json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "expected a JSON array"}),
                ));
            };
            if take(&f.reject_next) {
                let status = StatusCode::from_u16(f.reject_status.load(Ordering::SeqCst))
                    .unwrap_or(StatusCode::BAD_REQUEST);
                return Ok(json(
                    status,
                    serde_json::json!({"error": "injected rejection"}),
                ));
            }
            let max_msgs = f.max_batch_messages.load(Ordering::SeqCst);
            let max_bytes = f.max_batch_bytes.load(Ordering::SeqCst);
            if (max_msgs > 0 && msgs.len() as u64 > max_msgs)
                || (max_bytes > 0 && body.len() as u64 > max_bytes)
            {
                return Ok(json(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    serde_json::json!({"error": "payload too large"}),
                ));
            }
            if f.poison.load(Ordering::SeqCst) && msgs.iter().any(is_poison) {
                return Ok(json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    serde_json::json!({"error": "invalid message: poison"}),
                ));
            }
            if take(&f.reset_next) {
                let r = Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .header("content-length", "64")
                    .body(
                        Truncated {
                            chunk: Some(Bytes::from_static(b"{\"status\":\"o")),
                        }
                        .boxed(),
                    )
                    .expect("valid response");
                return Ok(r);
            }
            let n = msgs.len();
            let slow_id = f.slow_ack_id.load(Ordering::SeqCst);
            let slow = f.slow_ack_armed.load(Ordering::SeqCst)
                && msgs.iter().any(|m| {
                    m.get("data")
                        .and_then(|d| d.get("id"))
                        .and_then(Value::as_u64)
                        == Some(slow_id)
                })
                && f.slow_ack_armed.swap(false, Ordering::SeqCst);
            record(&state, &bearer, msgs);
            state.batches.fetch_add(1, Ordering::SeqCst);
            let mut ack_delay = f.ack_delay_ms.load(Ordering::SeqCst);
            if slow {
                ack_delay += f.slow_ack_ms.load(Ordering::SeqCst);
            }
            if ack_delay > 0 {
                tokio::time::sleep(Duration::from_millis(ack_delay)).await;
            }
            if f.garbage.load(Ordering::SeqCst) {
                return Ok(Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(full(GARBAGE_BODY))
                    .expect("valid response"));
            }
            Ok(json(
                StatusCode::OK,
                serde_json::json!({"status": "ok", "received": n}),
            ))
        }
        ("POST", "/entities/message") => {
            let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
                return Ok(json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "invalid JSON"}),
                ));
            };
            record(&state, &bearer, vec![msg]);
            Ok(json(
                StatusCode::OK,
                serde_json::json!({"status": "ok", "received": 1}),
            ))
        }
        ("GET", "/entities/check_messages") if f.garbage.load(Ordering::SeqCst) => {
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(full(GARBAGE_BODY))
                .expect("valid response"))
        }
        ("GET", "/entities/check_messages") => {
            let limit = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("limit="))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(1);
            let mut q = state.check_queue.lock().expect("lock");
            let n = limit.min(q.len());
            let msgs: Vec<Value> = q.drain(..n).collect();
            if msgs.is_empty() {
                Ok(Response::builder()
                    .status(StatusCode::NO_CONTENT)
                    .body(full(Bytes::new()))
                    .expect("valid response"))
            } else {
                Ok(json(
                    StatusCode::OK,
                    serde_json::json!({ "messages": msgs }),
                ))
            }
        }
        _ => Ok(json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "no such endpoint"}),
        )),
    }
}
