//! Admission latency bench: 2,000 `AdmissionReview`s of a realistic pod (the captured
//! `tests/fixtures/admission/pod-create.json`, as sent by the ReplicaSet controller).
//!
//! Prints p50/p99/max of
//! 1. `inside`: parse → decide → patch → serialise the response (what the handler does),
//! 2. `https keep-alive`: POST /mutate through the real rustls server on one connection,
//! 3. `https new conn`: the same with a TCP + TLS handshake per request.
//!
//! Run: `cargo run --release -p nanogate-operator --bin admission-bench`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use nanogate_operator::tls::{self, CertResolver};
use nanogate_operator::webhook::{self, InjectorSettings, StaticLookup, WebhookState};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

const REVIEW: &str = include_str!("../../tests/fixtures/admission/pod-create.json");
const N: usize = 2_000;

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    println!(
        "{name:<18} n={:<5} p50={:>9.1?} p99={:>9.1?} max={:>9.1?}",
        samples.len(),
        pct(0.50),
        pct(0.99),
        samples[samples.len() - 1]
    );
}

fn state() -> WebhookState {
    WebhookState::new(
        Arc::new(StaticLookup::one_gateway("apps", "telemetry")),
        Arc::new(|_: &serde_json::Value| Ok(())),
        InjectorSettings::new("nanogate-system"),
        &prometheus::Registry::new(),
    )
    .expect("metrics register")
}

async fn post(
    sender: &mut hyper::client::conn::http1::SendRequest<Body>,
) -> Result<(), Box<dyn std::error::Error>> {
    let req = hyper::Request::post("/mutate")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Body::from(REVIEW))?;
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let body = axum::body::to_bytes(Body::new(resp.into_body()), 1 << 20).await?;
    if !body.windows(14).any(|w| w == b"\"allowed\":true") {
        return Err("not allowed".into());
    }
    Ok(())
}

async fn connect(
    addr: std::net::SocketAddr,
    tls: &TlsConnector,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, Box<dyn std::error::Error>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tls.connect(ServerName::try_from("localhost")?, tcp).await?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let state = state();

    // 1. Inside the server.
    let review = webhook::mutate(&state, REVIEW.as_bytes());
    assert!(
        review
            .response
            .as_ref()
            .is_some_and(|r| r.allowed && r.patch.is_some()),
        "fixture must inject"
    );
    for _ in 0..200 {
        let review = webhook::review_json(&webhook::mutate(&state, REVIEW.as_bytes()));
        std::hint::black_box(serde_json::to_vec(&review)?);
    }
    let mut inside = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        let review = webhook::review_json(&webhook::mutate(&state, REVIEW.as_bytes()));
        std::hint::black_box(serde_json::to_vec(&review)?);
        inside.push(t.elapsed());
    }

    // 2./3. Through the rustls server on loopback.
    let sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let bundle = tls::generate_bundle(
        &sans,
        tls::unix_now(),
        Duration::from_secs(86_400),
        Duration::from_secs(3_600),
    )?;
    let resolver = Arc::new(CertResolver::from_pem(&bundle.cert_pem, &bundle.key_pem)?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(webhook::serve(
        listener,
        webhook::router(state.clone()),
        tls::tls_config(resolver),
        std::future::pending(),
    ));
    let mut client = tls::client_config(&bundle.ca_cert_pem)?;
    client.resumption = rustls::client::Resumption::disabled();
    let tls = TlsConnector::from(Arc::new(client));

    let mut sender = connect(addr, &tls).await?;
    for _ in 0..200 {
        post(&mut sender).await?;
    }
    let mut keep_alive = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        post(&mut sender).await?;
        keep_alive.push(t.elapsed());
    }

    let mut new_conn = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        let mut sender = connect(addr, &tls).await?;
        post(&mut sender).await?;
        new_conn.push(t.elapsed());
    }

    println!(
        "admission-bench: {N} AdmissionReviews of a {}-byte pod CREATE ({} build)",
        REVIEW.len(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    summary("inside", inside);
    summary("https keep-alive", keep_alive);
    summary("https new conn", new_conn);
    Ok(())
}
