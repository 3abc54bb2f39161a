//! Accept loop and per-connection handling.
//!
//! A connection is a stream of JSON values (see `nanogate_protocol::app`). Each read is
//! decoded completely; all `publish` (wait:false) messages of that read are appended to the
//! spool in one write — that is the moment they are accepted — and the replies produced by
//! the read are written back before the next read.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nanogate_protocol::app::{self, AppError, Decoded, Limits, Request, StreamDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::net::unix::WriteHalf;
use tokio::sync::{Semaphore, watch};
use tokio::time::timeout;

use crate::metrics::Metrics;
use crate::spool::{AppendError, RecordBuf, Spool};
use crate::upstream::Upstream;

/// How long connections get to finish after shutdown was requested.
const CONNECTION_DRAIN: Duration = Duration::from_secs(5);
/// Read size of a busy connection.
const READ_CHUNK: usize = 64 * 1024;
/// First read size: most stateless connections carry one small message, and a small buffer
/// keeps them off the allocator's slow path; a read that fills it switches to `READ_CHUNK`.
const FIRST_READ: usize = 4 * 1024;

/// Everything a connection needs, shared by all of them.
pub struct Shared<U: Upstream> {
    pub limits: Limits,
    pub idle_timeout: Duration,
    pub spool: Arc<Spool>,
    pub upstream: Arc<U>,
    pub metrics: Arc<Metrics>,
    /// `source` stamped on messages.
    pub source: String,
}

/// Serves `listener` until `shutdown` completes, then stops accepting, tells connections to
/// finish (what they already read is committed to the spool) and waits briefly for them.
pub async fn run<U: Upstream>(
    listener: UnixListener,
    shared: Arc<Shared<U>>,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    // The semaphore caps concurrent connections; further clients wait in the kernel's accept
    // backlog instead of costing memory here.
    let limit = Arc::new(Semaphore::new(max_connections));
    // Connections watch this to stop reading when the agent shuts down.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        shared.metrics.connections_total.inc();
        shared.metrics.connections.inc();
        let shared = shared.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            handle(stream, &shared, stop).await;
            shared.metrics.connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if timeout(CONNECTION_DRAIN, limit.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after shutdown; leaving them");
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn handle<U: Upstream>(
    mut stream: tokio::net::UnixStream,
    shared: &Shared<U>,
    mut stop: watch::Receiver<bool>,
) {
    if *stop.borrow_and_update() {
        return;
    }
    let (mut rd, mut wr) = stream.split();
    let mut dec = StreamDecoder::new(shared.limits);
    let mut recs = RecordBuf::new();
    let mut out = Vec::new();
    let mut chunk = FIRST_READ;
    loop {
        let read = tokio::select! {
            r = timeout(shared.idle_timeout, rd.read_buf(dec.read_buf(chunk))) => r,
            _ = stop.changed() => break,
        };
        let n = match read {
            Err(_) => {
                tracing::debug!("closing idle connection");
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection read failed");
                break;
            }
            Ok(Ok(n)) => n,
        };
        if n >= chunk {
            chunk = READ_CHUNK;
        }
        if n == 0 {
            if let Some(e) = dec.finish() {
                shared.metrics.reject(e.reason(), 1);
                e.write_reply(&mut out);
                let _ = write(&mut wr, &mut out, shared.idle_timeout).await;
            }
            break;
        }
        let close = process(&mut dec, shared, &mut recs, &mut out, &mut wr).await;
        if write(&mut wr, &mut out, shared.idle_timeout).await.is_err() || close {
            break;
        }
    }
}

async fn write(wr: &mut WriteHalf<'_>, out: &mut Vec<u8>, limit: Duration) -> Result<(), ()> {
    if out.is_empty() {
        return Ok(());
    }
    let res = timeout(limit, wr.write_all(out)).await;
    out.clear();
    match res {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Appends the collected records to the spool; on failure every message gets its error.
fn commit<U: Upstream>(shared: &Shared<U>, recs: &mut RecordBuf, out: &mut Vec<u8>) {
    if recs.is_empty() {
        return;
    }
    match shared.spool.append(recs) {
        Ok(()) => shared.metrics.received.inc_by(recs.count()),
        Err(AppendError::Full) => {
            shared.metrics.reject("queue_full", recs.count());
            for _ in 0..recs.count() {
                AppError::QueueFull.write_reply(out);
            }
        }
        Err(AppendError::Io(e)) => {
            tracing::error!(error = %e, "spool append failed");
            shared.metrics.reject("spool_error", recs.count());
            let reply = app::error_reply("spool write failed, try again later");
            for _ in 0..recs.count() {
                out.extend_from_slice(&reply);
            }
        }
    }
    recs.clear();
}

/// Handles every complete value buffered in `dec`. Returns true when the connection must close.
async fn process<U: Upstream>(
    dec: &mut StreamDecoder,
    shared: &Shared<U>,
    recs: &mut RecordBuf,
    out: &mut Vec<u8>,
    wr: &mut WriteHalf<'_>,
) -> bool {
    enum Action {
        Wait(Vec<u8>),
        Check(u32),
        Close,
    }
    let now = now_rfc3339();
    loop {
        // Decide synchronously (the request borrows the decoder's buffer), act afterwards.
        let action = match dec.next() {
            Decoded::NeedMore => break,
            Decoded::Request(Request::Publish(p)) if !p.wait => {
                recs.push_with(|b| p.write_envelope(b, &now, &shared.source));
                continue;
            }
            Decoded::Request(Request::Publish(p)) => {
                Action::Wait(p.to_envelope(&now, &shared.source))
            }
            Decoded::Request(Request::MsgCheck { limit }) => Action::Check(limit),
            Decoded::Rejected(e) => {
                shared.metrics.reject(e.reason(), 1);
                e.write_reply(out);
                continue;
            }
            Decoded::Fatal(e) => {
                shared.metrics.reject(e.reason(), 1);
                e.write_reply(out);
                Action::Close
            }
        };
        commit(shared, recs, out);
        if matches!(action, Action::Close) {
            return true;
        }
        // Replies already due go out before waiting on the platform.
        if write(wr, out, shared.idle_timeout).await.is_err() {
            return true;
        }
        match action {
            Action::Wait(body) => {
                shared.metrics.publish_wait.inc();
                match shared.upstream.send_one(body.into()).await {
                    Ok(reply) if reply.iter().all(u8::is_ascii_whitespace) => {
                        out.extend_from_slice(br#"{"status":"ok"}"#)
                    }
                    Ok(reply) => out.extend_from_slice(&reply),
                    Err(e) => {
                        shared.metrics.reject("upstream", 1);
                        AppError::Upstream(e.to_string()).write_reply(out);
                    }
                }
            }
            Action::Check(limit) => {
                shared.metrics.msg_check.inc();
                match shared.upstream.check_messages(limit).await {
                    Ok(msgs) => out.extend_from_slice(&app::msg_check_reply(&msgs)),
                    Err(e) => {
                        shared.metrics.reject("upstream", 1);
                        AppError::Upstream(e.to_string()).write_reply(out);
                    }
                }
            }
            Action::Close => unreachable!(),
        }
    }
    commit(shared, recs, out);
    false
}
