//! Accept loop and per-connection handling.
//!
//! A connection is a stream of JSON values (see `nanogate_protocol::app`). Each read is
//! decoded completely; all `publish` (wait:false) messages of that read are appended to the
//! spool in one write — that is the moment they are accepted — and the replies produced by
//! the read are written back before the next read.
//!
//! Stateless connections (the Tendrl SDKs' way: connect, write one publish, close) take a fast path in
//! the accept loop itself, without a task, a timer or a reactor registration: the loop accepts
//! every pending connection (up to [`BURST`]), reads what each already sent without waiting,
//! and when that is only `publish` wait:false messages it appends all of them — every
//! connection of the burst — to the spool in one write (group commit). Only then are the
//! connections that already sent EOF closed, so a client that half-closes and reads to EOF
//! still learns "accepted" only once its message is in the spool. Anything else (no data
//! yet, `msg_check`, `wait:true`, an error to answer, a spool error, a value still incomplete)
//! goes to a per-connection task exactly as before, with the bytes already read.

use std::io::{self, Read as _, Write as _};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::time::Duration;

use nanogate_protocol::app::{self, AppError, Decoded, Limits, Request, Stamp, StreamDecoder};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::net::unix::WriteHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout, timeout_at};

use super::empty_check::EmptyCheckCache;
use super::stamp;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::{self, Shutdown};
use crate::spool::{AppendError, RecordBuf, Spool};
use crate::upstream::Upstream;

/// How long connections get to finish after shutdown was requested.
const CONNECTION_DRAIN: Duration = Duration::from_secs(5);
/// While stopping, how long a connection may stay quiet before it is closed: what a client
/// already sent is still read and answered, and nothing more is waited for.
const STOP_READ_GRACE: Duration = Duration::from_millis(200);
/// Read size of a busy connection.
const READ_CHUNK: usize = 64 * 1024;
/// First read size: most stateless connections carry one small message, and a small buffer
/// keeps them off the allocator's slow path; a read that fills it switches to `READ_CHUNK`.
const FIRST_READ: usize = 4 * 1024;
/// Most connections the accept loop takes in one burst, committed with one spool write.
const BURST: usize = 64;
/// What the accept loop reads from one connection at most; more goes to the connection's task.
const INLINE_BYTES: usize = 16 * 1024;

/// Everything a connection needs, shared by all of them.
pub struct Shared<U: Upstream> {
    pub limits: Limits,
    pub idle_timeout: Duration,
    pub spool: Arc<Spool>,
    pub upstream: Arc<U>,
    pub metrics: Arc<Metrics>,
    /// Where the outcome of an app's own call to the platform is recorded.
    pub health: Arc<Health>,
    /// `source` stamped on messages.
    pub source: String,
    /// Recent empty `msg_check` answers, repeated without asking the platform.
    pub empty_check: EmptyCheckCache,
}

/// A connection of the current burst whose records wait for the group commit.
struct Held {
    stream: StdUnixStream,
    permit: OwnedSemaphorePermit,
    /// Messages it contributed to the burst's records.
    count: u64,
    /// The peer already half-closed: close once committed.
    eof: bool,
    /// An incomplete value after the committed ones (connection still open).
    rest: Vec<u8>,
}

/// Serves `listener` until `shutdown` fires, then stops accepting, tells connections to
/// finish (what they already read is committed to the spool) and waits briefly for them.
pub async fn run<U: Upstream>(
    listener: UnixListener,
    shared: Arc<Shared<U>>,
    max_connections: usize,
    shutdown: Shutdown,
) {
    // The accept loop reads stateless connections itself without registering them with the
    // reactor, so it accepts on the std listener (non-blocking) behind an `AsyncFd`.
    // `AsyncFd::new` is deprecated for inner types that might not own their descriptor; a std
    // `UnixListener` owns it for as long as the `AsyncFd` lives, which is what `register`
    // (unsafe, forbidden here) asks the caller to promise.
    #[allow(deprecated)]
    let listener = match listener.into_std().and_then(AsyncFd::new) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the socket listener");
            return;
        }
    };
    let limit = Arc::new(Semaphore::new(max_connections));
    // Connections watch this to stop reading when the agent shuts down.
    let (stop_tx, stop_rx) = shutdown::channel();
    let mut inline = Inline::new(shared.limits);
    let shutdown = shutdown.triggered();
    tokio::pin!(shutdown);
    loop {
        let Some(permit) = super::connection_slot(&limit, shutdown.as_mut()).await else {
            break;
        };
        let mut guard = tokio::select! {
            r = listener.readable() => match r {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "waiting on the listener failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let mut permit = Some(permit);
        let mut failed = false;
        for _ in 0..BURST {
            let Some(p) = permit
                .take()
                .or_else(|| limit.clone().try_acquire_owned().ok())
            else {
                break;
            };
            match guard.try_io(|l| l.get_ref().accept()) {
                Ok(Ok((stream, _))) => {
                    shared.metrics.connections_total.inc();
                    shared.metrics.connections.inc();
                    if let Some((stream, dec, out, p)) = inline.take(stream, p, &shared) {
                        spawn(stream, dec, out, p, &shared, &stop_rx);
                    }
                }
                Ok(Err(e)) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    failed = true;
                    break;
                }
                Err(_would_block) => break, // readiness cleared by try_io
            }
        }
        drop(guard);
        inline.commit(&shared, &stop_rx);
        if failed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(listener);
    stop_tx.trigger();
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if timeout(CONNECTION_DRAIN, limit.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after shutdown; leaving them");
    }
}

/// The accept loop's fast path for stateless connections (see the module documentation).
struct Inline {
    limits: Limits,
    /// Reused for every connection; replaced when a connection leaves it unclean.
    dec: StreamDecoder,
    buf: Box<[u8]>,
    recs: RecordBuf,
    held: Vec<Held>,
    /// The burst's stamp, made when its first publish needs it.
    now: Option<Stamp>,
}

/// A connection for a task: stream, decoder holding what was read, replies due, permit.
type Handoff = (StdUnixStream, StreamDecoder, Vec<u8>, OwnedSemaphorePermit);

enum ReadState {
    /// The peer half-closed.
    Eof,
    /// Nothing more right now (or the inline limit reached).
    Open,
}

impl Inline {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            dec: StreamDecoder::new(limits),
            buf: vec![0; INLINE_BYTES].into_boxed_slice(),
            recs: RecordBuf::new(),
            held: Vec::with_capacity(BURST),
            now: None,
        }
    }

    /// Reads what the connection already sent without waiting.
    fn read(&mut self, stream: &mut StdUnixStream) -> io::Result<(usize, ReadState)> {
        let mut len = 0;
        while len < self.buf.len() {
            let Some(free) = self.buf.get_mut(len..) else {
                break;
            };
            match stream.read(free) {
                Ok(0) => return Ok((len, ReadState::Eof)),
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((len, ReadState::Open))
    }

    /// Takes a freshly accepted connection: holds it for the group commit, closes it (a read
    /// error), or returns it for a task with what was read.
    fn take<U: Upstream>(
        &mut self,
        mut stream: StdUnixStream,
        permit: OwnedSemaphorePermit,
        shared: &Shared<U>,
    ) -> Option<Handoff> {
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::debug!(error = %e, "connection setup failed");
            shared.metrics.connections.dec();
            return None;
        }
        let (len, state) = match self.read(&mut stream) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "connection read failed");
                shared.metrics.connections.dec();
                return None;
            }
        };
        let eof = matches!(state, ReadState::Eof);
        if len == 0 && !eof {
            // Nothing sent yet: a task waits for it.
            return Some((stream, StreamDecoder::new(self.limits), Vec::new(), permit));
        }
        let mark = self.recs.mark();
        let read = self.buf.get(..len).unwrap_or_default();
        self.dec.input.feed(read);
        let mut plain = true;
        loop {
            match self.dec.next() {
                Decoded::NeedMore => break,
                Decoded::Request(Request::Publish(p)) if !p.wait => {
                    let stamp = self.now.get_or_insert_with(|| stamp(&shared.source));
                    self.recs.push_with(|b| p.write_stamped(b, stamp));
                }
                _ => {
                    plain = false;
                    break;
                }
            }
        }
        let rest = self.dec.input.buffered();
        if plain && eof && rest > 0 {
            // A truncated value at EOF is answered by the task (`finish`).
            plain = false;
        }
        if !plain || len == self.buf.len() {
            // Not a plain stateless publish (or more to read): the task decodes it all again;
            // nothing of it was committed.
            self.recs.truncate(mark);
            self.dec = StreamDecoder::new(self.limits);
            let mut dec = StreamDecoder::new(self.limits);
            dec.input.feed(read);
            return Some((stream, dec, Vec::new(), permit));
        }
        let rest = if rest > 0 {
            // Keep the incomplete tail for the task; the shared decoder starts clean.
            self.dec = StreamDecoder::new(self.limits);
            read.get(len - rest..).unwrap_or_default().to_vec()
        } else {
            Vec::new()
        };
        self.held.push(Held {
            stream,
            permit,
            count: self.recs.count() - mark.1,
            eof,
            rest,
        });
        None
    }

    /// Appends the burst's records in one write, then closes the connections that sent EOF
    /// and hands the others to tasks. On a spool error every message gets its error reply.
    fn commit<U: Upstream>(&mut self, shared: &Arc<Shared<U>>, stop: &Shutdown) {
        self.now = None;
        if self.held.is_empty() {
            return;
        }
        let res = if self.recs.is_empty() {
            Ok(())
        } else {
            shared.spool.append(&self.recs)
        };
        let reply = match res {
            Ok(()) => {
                shared.metrics.received.inc_by(self.recs.count());
                None
            }
            Err(AppendError::Full) => {
                shared.metrics.reject("queue_full", self.recs.count());
                Some(AppError::QueueFull.reply())
            }
            Err(AppendError::Io(e)) => {
                tracing::error!(error = %e, "spool append failed");
                shared.metrics.reject("spool_error", self.recs.count());
                Some(app::error_reply("spool write failed, try again later"))
            }
        };
        self.recs.clear();
        for h in self.held.drain(..) {
            let mut out = Vec::new();
            if let Some(r) = &reply {
                for _ in 0..h.count {
                    out.extend_from_slice(r);
                }
                // A small reply to a fresh socket fits its buffer; whatever does not is left
                // to the task.
                match (&h.stream).write(&out) {
                    Ok(n) => {
                        out.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        shared.metrics.connections.dec();
                        continue;
                    }
                }
            }
            if h.eof && out.is_empty() {
                drop(h.stream); // EOF to the client: its messages are accepted (or answered)
                shared.metrics.connections.dec();
                continue;
            }
            let mut dec = StreamDecoder::new(self.limits);
            if !h.rest.is_empty() {
                dec.input.feed(&h.rest);
            }
            spawn(h.stream, dec, out, h.permit, shared, stop);
        }
    }
}

/// Runs a connection in its own task, starting with `out` (replies due) and what `dec` holds.
fn spawn<U: Upstream>(
    stream: StdUnixStream,
    dec: StreamDecoder,
    out: Vec<u8>,
    permit: OwnedSemaphorePermit,
    shared: &Arc<Shared<U>>,
    stop: &Shutdown,
) {
    let stream = match tokio::net::UnixStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register a connection");
            shared.metrics.connections.dec();
            return;
        }
    };
    let shared = shared.clone();
    let stop = stop.clone();
    tokio::spawn(async move {
        handle(stream, &shared, stop, dec, out).await;
        shared.metrics.connections.dec();
        drop(permit);
    });
}

async fn handle<U: Upstream>(
    mut stream: tokio::net::UnixStream,
    shared: &Shared<U>,
    stop: Shutdown,
    mut dec: StreamDecoder,
    mut out: Vec<u8>,
) {
    let (mut rd, mut wr) = stream.split();
    let mut recs = RecordBuf::new();
    // What the accept loop already read and the replies it left are dealt with first, even
    // when the agent is stopping: those bytes were taken from the client, so it gets its
    // answers (its publishes go to the spool, which delivery drains or keeps).
    if write(&mut wr, &mut out, shared.idle_timeout).await.is_err() {
        return;
    }
    if dec.input.buffered() > 0 {
        let close = process(&mut dec, shared, &mut recs, &mut out, &mut wr).await;
        if write(&mut wr, &mut out, shared.idle_timeout).await.is_err() || close {
            return;
        }
    }
    enum Read {
        Done(io::Result<usize>),
        /// Nothing arrived in time.
        Idle,
        Stop,
    }
    let mut chunk = FIRST_READ;
    let mut stopping = stop.is_triggered();
    // The idle timeout runs between messages from the last read, and within a message from
    // its first byte, so a client trickling one message cannot hold its slot forever.
    let mut message = (dec.values_begun(), Instant::now());
    loop {
        let now = Instant::now();
        if dec.values_begun() != message.0 {
            message = (dec.values_begun(), now);
        }
        let deadline = if stopping {
            // Stopping: take what the client already sent, then close.
            now + STOP_READ_GRACE
        } else if dec.in_value() {
            message.1 + shared.idle_timeout
        } else {
            now + shared.idle_timeout
        };
        let read = tokio::select! {
            r = timeout_at(deadline, rd.read_buf(dec.input.read_buf(chunk))) => r.map_or(Read::Idle, Read::Done),
            _ = stop.triggered(), if !stopping => Read::Stop,
        };
        let n = match read {
            Read::Done(Ok(n)) => n,
            Read::Stop => {
                stopping = true;
                continue;
            }
            Read::Idle => {
                // A message half received is answered, never dropped silently.
                let error = if stopping {
                    AppError::ShuttingDown
                } else {
                    AppError::Incomplete(shared.idle_timeout)
                };
                if dec.in_value() {
                    shared.metrics.reject(error.reason(), 1);
                    error.write_reply(&mut out);
                    let _ = write(&mut wr, &mut out, shared.idle_timeout).await;
                }
                tracing::debug!(reason = error.reason(), "closing the connection");
                break;
            }
            Read::Done(Err(e)) => {
                tracing::debug!(error = %e, "connection read failed");
                break;
            }
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
    // Made when the first publish of this read needs it (msg_check never does).
    let mut now: Option<Stamp> = None;
    loop {
        // Decide synchronously (the request borrows the decoder's buffer), act afterwards.
        let action = match dec.next() {
            Decoded::NeedMore => break,
            Decoded::Request(Request::Publish(p)) if !p.wait => {
                let stamp = now.get_or_insert_with(|| stamp(&shared.source));
                recs.push_with(|b| p.write_stamped(b, stamp));
                continue;
            }
            Decoded::Request(Request::Publish(p)) => {
                let stamp = now.get_or_insert_with(|| stamp(&shared.source));
                let mut body = Vec::with_capacity(p.raw.len() + 80);
                p.write_stamped(&mut body, stamp);
                Action::Wait(body)
            }
            Decoded::Request(Request::MsgCheck { limit }) => {
                shared.metrics.msg_check.inc();
                if shared.empty_check.is_fresh() {
                    // The platform said "nothing" moments ago: answer like it without asking.
                    shared.metrics.msg_check_cached.inc();
                    out.extend_from_slice(&app::msg_check_reply(&[]));
                    continue;
                }
                Action::Check(limit)
            }
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
                let sent = shared.upstream.send_one(body.into()).await;
                shared.health.record(&shared.metrics, &sent);
                match sent {
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
                let checked = shared.upstream.check_messages(limit).await;
                // socketio answers from messages the platform already pushed: not a call.
                if shared.upstream.checks_call_the_platform() {
                    shared.health.record(&shared.metrics, &checked);
                }
                match checked {
                    Ok(msgs) => {
                        shared.empty_check.record(msgs.is_empty());
                        out.extend_from_slice(&app::msg_check_reply(&msgs))
                    }
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
