//! HTTPS for the webhooks: each connection is its own task on a rustls acceptor whose
//! certificate comes from [`crate::tls::CertResolver`], so a renewal needs no restart.
//! Connections are capped, and a request's headers must arrive within a timeout that runs only
//! while a request is being received (never while a keep-alive connection sits idle).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of the webhook server.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections served at once (256); more wait in the listen backlog.
    pub max_connections: usize,
    /// A request's headers must be complete this long (10 s) after its first byte, and the
    /// first request must come this long after the TLS handshake.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Serve `router` over TLS on `listener` until `shutdown` completes, with the default
/// [`Limits`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Arc<ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(listener, router, tls, Limits::default(), shutdown).await
}

/// Serve `router` over TLS on `listener` until `shutdown` completes. Each connection is its
/// own task; a failed handshake only ends that connection. After `shutdown`, no new
/// connections are accepted; requests in flight finish on their tasks.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    tls: Arc<ServerConfig>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let service = TowerToHyperService::new(router);
    let places = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    tokio::pin!(shutdown);
    loop {
        // At the cap, stop accepting: the kernel's backlog holds new connections meanwhile.
        let place = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            place = places.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => return Ok(()),
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(%error, "webhook: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _place = place;
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%error, %peer, "webhook: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "webhook: TLS handshake timed out");
                    return;
                }
            };
            // Not hyper's header-read timeout: hyper starts it while a keep-alive connection
            // sits idle waiting for the next request, so it would close idle connections under
            // the API server, and a request racing that close fails. Idle connections are the
            // client's to close (the API server's transport does so after its idle timeout);
            // this timeout runs only from a request's first byte to its last header.
            let phase = Arc::new(Mutex::new(Phase::Headers(Instant::now())));
            let io = Watched {
                inner: tls,
                phase: phase.clone(),
            };
            let marks = phase.clone();
            let handler = hyper::service::service_fn(move |req| {
                set(&marks, Phase::Request);
                let (service, marks) = (service.clone(), marks.clone());
                async move {
                    let response = hyper::service::Service::call(&service, req).await;
                    set(&marks, Phase::Idle);
                    response
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(None)
                .serve_connection(TokioIo::new(io), handler);
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %peer, "webhook: connection ended with an error");
                    }
                }
                () = headers_overdue(&phase, header_timeout) => {
                    tracing::debug!(%peer, "webhook: request headers not received in time; closing");
                }
            }
        });
    }
}

/// Where a connection is between requests.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Receiving a request's headers, since its first byte (or since the handshake).
    Headers(Instant),
    /// Headers complete; the request is being handled.
    Request,
    /// Answered; waiting (without a limit) for the next request.
    Idle,
}

fn set(phase: &Mutex<Phase>, to: Phase) {
    *phase.lock().unwrap_or_else(|e| e.into_inner()) = to;
}

fn get(phase: &Mutex<Phase>) -> Phase {
    *phase.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves once a request's headers have taken longer than `timeout`.
async fn headers_overdue(phase: &Mutex<Phase>, timeout: Duration) {
    loop {
        let wait = match get(phase) {
            Phase::Headers(since) => (since + timeout).saturating_duration_since(Instant::now()),
            // Looked at again later; a request starting meanwhile is caught then, late by at
            // most one timeout.
            Phase::Request | Phase::Idle => timeout,
        };
        if wait.is_zero() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// The TLS stream, noting when the first byte of a new request arrives on an idle connection.
struct Watched<T> {
    inner: T,
    phase: Arc<Mutex<Phase>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let mut phase = this.phase.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*phase, Phase::Idle) {
                *phase = Phase::Headers(Instant::now());
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
