//! The webhook's HTTPS server limits over real TLS on loopback: a request's headers must come
//! within the header timeout, an idle keep-alive connection is never closed by it (the API
//! server reuses them), and connections over the cap wait until one closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use nanogate_operator::tls::{self, CertResolver};
use nanogate_operator::webhook::server::{Limits, serve_with};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

struct Server {
    addr: SocketAddr,
    connector: TlsConnector,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(limits: Limits) -> Server {
    let bundle = tls::generate_bundle(
        &["localhost".to_string()],
        tls::unix_now(),
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    )
    .unwrap();
    let resolver = Arc::new(CertResolver::from_pem(&bundle.cert_pem, &bundle.key_pem).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = Router::new().route("/ping", get(|| async { "pong" }));
    tokio::spawn(serve_with(
        listener,
        router,
        tls::tls_config(resolver),
        limits,
        async move {
            let _ = stopped.await;
        },
    ));
    let config = tls::client_config(&bundle.ca_cert_pem).unwrap();
    Server {
        addr,
        connector: TlsConnector::from(Arc::new(config)),
        _stop: stop,
    }
}

async fn connect(server: &Server) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    server
        .connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

const PING: &[u8] = b"GET /ping HTTP/1.1\r\nhost: localhost\r\n\r\n";

/// Sends one GET /ping and reads its whole response (keep-alive: the connection stays).
async fn ping(stream: &mut TlsStream<TcpStream>) -> String {
    stream.write_all(PING).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&response).ends_with("pong") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&response));
        response.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&response).into_owned()
}

/// How long until the server closes `stream` (reads until EOF or an error), at most `limit`.
async fn closed_within(stream: &mut TlsStream<TcpStream>, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| started.elapsed())
}

fn limits(header_timeout: Duration) -> Limits {
    Limits {
        header_timeout,
        ..Limits::default()
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout() {
    let server = start(limits(Duration::from_millis(500))).await;
    let mut stream = connect(&server).await;
    assert!(ping(&mut stream).await.starts_with("HTTP/1.1 200"));
    // Idle for three header timeouts, as between two admissions from the API server.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(ping(&mut stream).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn headers_that_stall_are_cut_off_at_the_header_timeout() {
    let server = start(limits(Duration::from_millis(500))).await;

    // The first request never completes its headers.
    let mut stream = connect(&server).await;
    stream
        .write_all(b"GET /ping HTTP/1.1\r\nhost: loc")
        .await
        .unwrap();
    let after = closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(
        after.is_some_and(|a| a < Duration::from_secs(2)),
        "{after:?}"
    );

    // Nothing at all after the handshake.
    let mut silent = connect(&server).await;
    let after = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(
        after.is_some_and(|a| a < Duration::from_secs(2)),
        "{after:?}"
    );

    // A later request on a kept-alive connection that stalls half-way.
    let mut reused = connect(&server).await;
    ping(&mut reused).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    reused.write_all(b"GET /ping HTT").await.unwrap();
    let after = closed_within(&mut reused, Duration::from_secs(5)).await;
    assert!(
        after.is_some_and(|a| a < Duration::from_secs(2)),
        "{after:?}"
    );
}

#[tokio::test]
async fn connections_over_the_cap_wait_until_one_closes() {
    let server = start(Limits {
        max_connections: 1,
        ..Limits::default()
    })
    .await;
    let mut first = connect(&server).await;
    ping(&mut first).await;
    // The second connection waits in the backlog: no TLS handshake while the first is open.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut handshake = Box::pin(
        server
            .connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut handshake)
            .await
            .is_err(),
        "served over the cap"
    );
    drop(first);
    let mut second = tokio::time::timeout(Duration::from_secs(5), handshake)
        .await
        .expect("served once the first closed")
        .unwrap();
    assert!(ping(&mut second).await.starts_with("HTTP/1.1 200"));
}
