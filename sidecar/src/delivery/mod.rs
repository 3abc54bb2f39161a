//! Delivery: reads the spool in order, forms batches ([`sizing`] decides how large and how
//! often), sends them upstream, retries with backoff, splits refused batches, dead-letters
//! what the platform refuses for good, and acks the spool only once a batch is done.
//!
//! Pipelined: up to `max_in_flight` batches are outstanding at once (the next one is sent
//! while earlier ones wait for their answers), so throughput is no longer one batch per round
//! trip. The spool is still acknowledged in order: a batch's ack waits until every earlier
//! batch is done (delivered or dead-lettered), because an ack is a position and would cover
//! them; a kill -9 therefore resends at most the batches in flight, never loses one. Each
//! batch keeps its own retries, backoff, `Retry-After`, splitting and dead-lettering.
//!
//! The window of batches that may be attempted ([`Window`]) shrinks to one when an attempt
//! fails at the transport (an error, 401, a redirect: the platform is not taking batches), so
//! a failing platform sees only the oldest batch retried, as before pipelining, not a
//! stampede of every batch in flight; each success doubles it back, up to `max_in_flight`.
//! A refusal of the content (413, other 4xx) is an answer, not a failure: it does not shrink it.
//!
//! What each upstream error leads to is tabled at [`UpstreamError`].

pub mod sizing;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};

use crate::backoff::Backoff;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::spool::{PendingBatch, Position, Spool};
use crate::system::Resources;
use crate::upstream::{Batch, Upstream, UpstreamError};
pub use sizing::Tuning;

/// Longest `Retry-After` honoured, whatever `backoff_max` is; beyond it the platform is
/// probably misconfigured. In practice the cap is `min(backoff_max, MAX_RETRY_AFTER)` (see
/// [`retry_delay`]).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The wait before the next attempt: the backoff's jittered delay, or the platform's
/// `Retry-After` when longer, but never more than `backoff_max` (30 s by default) nor
/// [`MAX_RETRY_AFTER`]: a huge or hostile `Retry-After` must not stall delivery for hours,
/// and `backoff_max` is the longest pause the operator configured.
fn retry_delay(jitter: Duration, retry_after: Option<Duration>, backoff_max: Duration) -> Duration {
    let cap = backoff_max.min(MAX_RETRY_AFTER);
    retry_after
        .map_or(jitter, |ra| ra.max(jitter))
        .min(cap.max(jitter))
}

/// How one part of a batch ended.
enum PartOutcome {
    /// Delivered, or dead-lettered (a single message refused for good).
    Done,
    /// Refused (413 or another 4xx) with more than one message: try its halves.
    Split,
}

/// Which batches may be attempted: batch `seq` (numbered in spool order) only while
/// `seq < oldest + limit`, `oldest` being the oldest batch not yet done. The oldest batch may
/// always go. `limit` is `max` while the platform takes batches, 1 after a failed attempt,
/// and doubles with each success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    oldest: u64,
    limit: u64,
    max: u64,
}

impl Window {
    fn new(max: usize) -> Self {
        let max = max.max(1) as u64;
        Self {
            oldest: 0,
            limit: max,
            max,
        }
    }

    fn admits(&self, seq: u64) -> bool {
        seq < self.oldest + self.limit
    }

    /// A new `max_in_flight` (a reload): an open window follows it, a shrunk one stays
    /// shrunk (within it).
    fn set_max(&mut self, max: usize) -> bool {
        let max = max.max(1) as u64;
        if max == self.max {
            return false;
        }
        self.limit = if self.limit == self.max {
            max
        } else {
            self.limit.min(max)
        };
        self.max = max;
        true
    }

    /// An attempt failed at the transport: only the oldest batch goes on trying.
    fn failed(&mut self) -> bool {
        std::mem::replace(&mut self.limit, 1) != 1
    }

    /// The platform answered: open up again, doubling.
    fn answered(&mut self) -> bool {
        let limit = (self.limit * 2).min(self.max);
        std::mem::replace(&mut self.limit, limit) != limit
    }
}

/// What a finished batch acknowledges in the spool.
struct Ack {
    end: Option<Position>,
    count: u64,
    bytes: u64,
}

/// One batch's place in the [`Window`].
struct Turn<'a> {
    seq: u64,
    window: &'a watch::Sender<Window>,
}

impl Turn<'_> {
    /// Waits until the batch may be attempted.
    async fn wait(&self) {
        let seq = self.seq;
        if self.window.borrow().admits(seq) {
            return;
        }
        let mut rx = self.window.subscribe();
        // The sender lives as long as the delivery loop, which polls this future.
        let _ = rx.wait_for(|w| w.admits(seq)).await;
    }

    fn failed(&self) {
        self.window.send_if_modified(Window::failed);
    }

    fn answered(&self) {
        self.window.send_if_modified(Window::answered);
    }
}

/// The delivery loop and its dependencies.
pub struct Delivery<U: Upstream> {
    pub spool: Arc<Spool>,
    pub upstream: Arc<U>,
    /// Read at every batch, so a reload applies from the next batch on.
    pub tuning: watch::Receiver<Tuning>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub resources: Arc<Resources>,
    pub dead_letter: PathBuf,
}

impl<U: Upstream> Delivery<U> {
    /// Runs until `drain` fires, the spool is empty and no batch is in flight. While
    /// draining, partial batches go out at once. The caller bounds draining with its shutdown
    /// deadline.
    pub async fn run(self, drain: Shutdown) {
        let mut reader = self.spool.reader();
        let mut batch = PendingBatch::default();
        let mut first_seen: Option<Instant> = None;
        let mut last_send: Option<Instant> = None;
        let mut draining = false;
        let window = watch::Sender::new(Window::new(self.tuning.borrow().max_in_flight));
        // Batches in flight, in spool order: their outcomes come out in that order too, so
        // acking each as it comes out acks the spool in order.
        let mut in_flight = FuturesOrdered::new();
        let mut next_seq: u64 = 0;
        loop {
            // Ack whatever is done already (in order).
            while let Some(Some(ack)) = in_flight.next().now_or_never() {
                self.finish(ack, &window);
            }
            self.metrics.batches_in_flight.set(in_flight.len() as i64);
            draining = draining || drain.is_triggered();
            let tuning = self.tuning.borrow().clone();
            window.send_if_modified(|w| w.set_max(tuning.max_in_flight));
            if !window.borrow().admits(next_seq) {
                // No room for another batch: wait for the oldest.
                if let Some(ack) = in_flight.next().await {
                    self.finish(ack, &window);
                }
                continue;
            }
            let plan = tuning.sizer.plan(
                self.spool.pending_msgs(),
                self.resources.cpu_percent(),
                self.resources.mem_percent(),
            );
            self.metrics.target_batch_size.set(plan.target as i64);
            let want = (plan.target as u64).saturating_sub(batch.count);
            if want > 0
                && let Err(e) = reader.read_bounded(&mut batch, want, plan.max_bytes)
            {
                tracing::error!(error = %e, "reading the spool failed; retrying in 1s");
                sleep(Duration::from_secs(1)).await;
                continue;
            }
            if batch.count == 0 {
                if draining && in_flight.is_empty() {
                    return;
                }
                tokio::select! {
                    Some(ack) = in_flight.next(), if !in_flight.is_empty() => {
                        self.finish(ack, &window);
                    }
                    _ = self.spool.appended() => {}
                    _ = drain.triggered(), if !draining => { draining = true; }
                }
                continue;
            }
            let first = *first_seen.get_or_insert_with(Instant::now);
            if !draining {
                let wait_until = if batch.count < plan.target as u64 {
                    Some(first + tuning.flush_interval)
                } else {
                    last_send.map(|last| last + plan.spacing)
                };
                if let Some(deadline) = wait_until
                    && Instant::now() < deadline
                {
                    let partial = batch.count < plan.target as u64;
                    tokio::select! {
                        // More may fit: read again.
                        _ = self.spool.appended(), if partial => continue,
                        Some(ack) = in_flight.next(), if !in_flight.is_empty() => {
                            self.finish(ack, &window);
                            continue;
                        }
                        _ = sleep_until(deadline) => {}
                        _ = drain.triggered(), if !draining => { draining = true; continue; }
                    }
                }
            }
            // Send it: the outcome comes back through `in_flight`, in order.
            let whole = Batch::from_pending(self.spool.id(), &batch);
            let ack = Ack {
                end: batch.end,
                count: batch.count,
                bytes: batch.bytes,
            };
            // The batch's bytes live on in `whole` alone.
            batch = PendingBatch::default();
            in_flight.push_back(self.deliver_in_window(next_seq, whole, ack, &window));
            next_seq += 1;
            self.metrics.batches_in_flight.set(in_flight.len() as i64);
            first_seen = None;
            last_send = Some(Instant::now());
        }
    }

    /// The oldest batch in flight is done: ack the spool up to its end.
    fn finish(&self, ack: Ack, window: &watch::Sender<Window>) {
        if let Some(end) = ack.end
            && let Err(e) = self.spool.ack(end, ack.count, ack.bytes)
        {
            // The batch is delivered; failing to record it only risks a duplicate.
            tracing::error!(error = %e, "writing the spool ack failed");
        }
        window.send_modify(|w| w.oldest += 1);
    }

    /// [`Self::deliver`] for batch `seq`, each attempt within the window; returns its ack.
    async fn deliver_in_window(
        &self,
        seq: u64,
        whole: Batch,
        ack: Ack,
        window: &watch::Sender<Window>,
    ) -> Ack {
        self.deliver(whole, &Turn { seq, window }).await;
        ack
    }

    /// Delivers one batch read from the spool: returns once every message of it is delivered
    /// or dead-lettered (only then may the caller ack the spool). A batch the platform refuses
    /// (413 or another 4xx) is split in halves, recursively; a single message it still refuses
    /// is dead-lettered alone. Every other failure is retried with backoff, forever.
    async fn deliver(&self, whole: Batch, turn: &Turn<'_>) {
        // Built once: every retry and every split part carries the same stable message ids.
        // Parts still to send, the next one last (so the batch's order is kept).
        let mut todo = vec![whole];
        while let Some(part) = todo.pop() {
            match self.deliver_part(&part, turn).await {
                PartOutcome::Done => {}
                PartOutcome::Split => match part.split() {
                    Some((first, second)) => {
                        tracing::info!(
                            count = part.count,
                            first = first.count,
                            second = second.count,
                            "the platform refused a batch; sending it in two halves"
                        );
                        todo.push(second);
                        todo.push(first);
                    }
                    None => {
                        // Cannot happen (ranges come from the body they index); never drop.
                        tracing::error!(
                            count = part.count,
                            "cannot split a refused batch; dead-lettering it whole"
                        );
                        self.dead_letter_part(&part, 0, "cannot split", "").await;
                    }
                },
            }
        }
    }

    /// Sends one part until it is delivered, dead-lettered, or must be split.
    async fn deliver_part(&self, part: &Batch, turn: &Turn<'_>) -> PartOutcome {
        let mut backoff = Backoff::new(self.backoff_initial, self.backoff_max);
        loop {
            turn.wait().await;
            self.health.attempt(&self.metrics);
            let key_generation = self.upstream.key_generation();
            let err = match self.upstream.deliver(part).await {
                Ok(()) => {
                    turn.answered();
                    self.health.success(&self.metrics);
                    self.metrics.delivered.inc_by(part.count);
                    self.metrics.batches.inc();
                    self.metrics.batch_size.observe(part.count as f64);
                    return PartOutcome::Done;
                }
                Err(e) => e,
            };
            self.metrics
                .upstream_errors
                .with_label_values(&[err.kind()])
                .inc();
            let retry_after = match &err {
                UpstreamError::TooLarge { .. } | UpstreamError::Rejected { .. }
                    if part.count > 1 =>
                {
                    // The platform answered: the path works, this content does not.
                    turn.answered();
                    self.health.success(&self.metrics);
                    self.health.set_error(err.to_string());
                    return PartOutcome::Split;
                }
                UpstreamError::TooLarge { body } => {
                    turn.answered();
                    self.health.success(&self.metrics);
                    self.dead_letter_part(part, 413, "too large", body).await;
                    return PartOutcome::Done;
                }
                UpstreamError::Rejected { status, body } => {
                    turn.answered();
                    self.health.success(&self.metrics);
                    self.dead_letter_part(part, *status, "rejected", body).await;
                    return PartOutcome::Done;
                }
                UpstreamError::Unauthorized { status, .. } => {
                    tracing::error!(
                        status,
                        count = part.count,
                        "the platform refused the API key (HTTP {status}); messages stay in the \
                         spool and are retried: check the API key Secret (mounted as \
                         TENDRL_KEY_FILE and re-read within seconds of a change; or TENDRL_KEY / \
                         --api-key)"
                    );
                    None
                }
                UpstreamError::Redirected {
                    status, location, ..
                } => {
                    tracing::error!(
                        status,
                        location = %location,
                        count = part.count,
                        "the platform answered a batch with a redirect to {location}; redirects \
                         are not followed and the batch is retried: check the platform URL \
                         (--app-url)"
                    );
                    None
                }
                UpstreamError::Retryable { retry_after, .. } => *retry_after,
            };
            // The platform is not taking batches: only the oldest goes on trying.
            turn.failed();
            self.health.failure(&self.metrics, &err.to_string());
            let delay = retry_delay(backoff.next_delay(), retry_after, self.backoff_max);
            tracing::warn!(reason = %err, delay_ms = delay.as_millis() as u64, count = part.count,
                "delivery failed; retrying");
            if matches!(err, UpstreamError::Unauthorized { .. }) {
                // A rotated key is tried at once, not at the end of the backoff.
                tokio::select! {
                    _ = sleep(delay) => {}
                    _ = self.upstream.key_changed(key_generation) => {}
                }
            } else {
                sleep(delay).await;
            }
        }
    }

    /// Writes `part` (a single message, but any part works) to the dead-letter file, retrying
    /// until it is written, and counts it.
    async fn dead_letter_part(&self, part: &Batch, status: u16, reason: &str, reply: &str) {
        let id = part
            .messages
            .first()
            .map(|m| part.id(m))
            .unwrap_or_default();
        self.health.set_error(format!(
            "message {id} refused with HTTP {status} ({reason}); dead-lettered"
        ));
        tracing::error!(status, id, reason, reply = %reply, count = part.count,
            "the platform refused a message for good; writing it to the dead-letter file");
        let mut dl_backoff = Backoff::new(self.backoff_initial, self.backoff_max);
        while let Err(e) = self.dead_letter(part, status, reason, reply) {
            tracing::error!(error = %e, path = %self.dead_letter.display(),
                "cannot write the dead-letter file; retrying");
            sleep(dl_backoff.next_delay()).await;
        }
        self.metrics.dead_lettered.inc_by(part.count);
    }

    /// Appends one line: `{"time", "status", "reason", "reply", "id", "ids", "messages": [...]}`
    /// (`id` the first message's stable id, `ids` all of them; `messages` the JSON array).
    fn dead_letter(
        &self,
        part: &Batch,
        status: u16,
        reason: &str,
        reply: &str,
    ) -> std::io::Result<()> {
        if let Some(dir) = self.dead_letter.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.dead_letter)?;
        let ids: Vec<String> = part.messages.iter().map(|m| part.id(m)).collect();
        let head = serde_json::json!({
            "time": chrono::Utc::now().to_rfc3339(),
            "status": status,
            "reason": reason,
            "reply": reply,
            "id": ids.first().map_or("", String::as_str),
            "ids": ids,
        });
        let mut line = serde_json::to_vec(&head).map_err(std::io::Error::other)?;
        line.pop(); // reopen the object to add the raw messages
        line.extend_from_slice(b",\"messages\":");
        line.extend_from_slice(&part.body);
        line.extend_from_slice(b"}\n");
        f.write_all(&line)?;
        f.sync_data()
    }
}

/// A 1 MiB spool in `dir` that refuses when full, for the unit tests here and in the upstreams.
#[cfg(test)]
pub(crate) fn test_spool(dir: &std::path::Path) -> Arc<Spool> {
    Spool::open(crate::spool::SpoolOptions {
        dir: dir.to_owned(),
        max_bytes: 1 << 20,
        segment_bytes: 1 << 20,
        sync_interval: Duration::from_secs(1),
        overflow: crate::spool::Overflow::Reject,
    })
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The [`Upstream`] methods delivery never calls, for the fakes below.
    macro_rules! not_used_by_delivery {
        () => {
            async fn send_one(&self, _: Bytes) -> Result<Bytes, UpstreamError> {
                unimplemented!()
            }
            async fn check_messages(
                &self,
                _: u32,
            ) -> Result<Vec<serde_json::Value>, UpstreamError> {
                unimplemented!()
            }
        };
    }
    use crate::spool::RecordBuf;
    use bytes::Bytes;
    use sizing::tests::sizer;
    use std::sync::Mutex;
    use std::sync::atomic::Ordering;

    /// Records batches with the (paused) time they arrived.
    #[derive(Default)]
    struct Recorder {
        batches: Mutex<Vec<(Duration, usize)>>,
        fail_first: Mutex<u32>,
        start: Mutex<Option<Instant>>,
    }

    impl Recorder {
        /// A recorder whose clock starts now, failing its first `fail_first` batches.
        fn started_now(fail_first: u32) -> Arc<Recorder> {
            Arc::new(Recorder {
                fail_first: Mutex::new(fail_first),
                start: Mutex::new(Some(Instant::now())),
                ..Recorder::default()
            })
        }
    }

    /// Delivers `n` messages to a [`Recorder`] that fails its first `fail_first` batches, for
    /// `secs` of (paused) time: the batches it recorded (when, how many) and delivery's health.
    async fn record(fail_first: u32, n: usize, secs: u64) -> (Vec<(Duration, usize)>, Arc<Health>) {
        let up = Recorder::started_now(fail_first);
        let (_dir, _spool, _, health, _tx) = start_with(up.clone(), 4, n);
        sleep(Duration::from_secs(secs)).await;
        let got = up.batches.lock().unwrap().clone();
        (got, health)
    }

    impl Upstream for Recorder {
        async fn send_batch(&self, body: Bytes, count: u64) -> Result<(), UpstreamError> {
            let v: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
            assert_eq!(v.len() as u64, count);
            {
                let mut f = self.fail_first.lock().unwrap();
                if *f > 0 {
                    *f -= 1;
                    return Err(UpstreamError::Retryable {
                        reason: "boom".into(),
                        retry_after: Some(Duration::from_secs(2)),
                    });
                }
            }
            let t = self.start.lock().unwrap().unwrap().elapsed();
            self.batches.lock().unwrap().push((t, v.len()));
            Ok(())
        }
        not_used_by_delivery!();
    }

    fn setup_with<U: Upstream>(
        dir: &std::path::Path,
        up: Arc<U>,
        max_in_flight: usize,
    ) -> (Arc<Spool>, Delivery<U>) {
        let spool = test_spool(dir);
        let metrics = Arc::new(Metrics::new());
        let d = Delivery {
            spool: spool.clone(),
            upstream: up,
            tuning: Tuning {
                sizer: sizer(),
                flush_interval: Duration::from_millis(250),
                max_in_flight,
            }
            .fixed(),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            metrics,
            health: Arc::new(Health::default()),
            resources: Arc::new(Resources::default()),
            dead_letter: dir.join("dl.jsonl"),
        };
        (spool, d)
    }

    fn append(spool: &Spool, n: usize) {
        let mut r = RecordBuf::new();
        for i in 0..n {
            r.push(format!("{{\"i\":{i}}}").as_bytes());
        }
        spool.append(&r).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn trickle_is_flushed_within_the_flush_interval() {
        let up = Recorder::started_now(0);
        let (_dir, spool, _, _, _tx) = start_with(up.clone(), 4, 0);
        // One message every 100 ms: never fills a batch of 10 within 250 ms.
        for _ in 0..5 {
            append(&spool, 1);
            sleep(Duration::from_millis(100)).await;
        }
        sleep(Duration::from_secs(1)).await;
        let got = up.batches.lock().unwrap().clone();
        assert_eq!(got.iter().map(|b| b.1).sum::<usize>(), 5);
        // First batch: message at t=0 goes out at t=250ms with the ones at 100 and 200.
        assert_eq!(got[0], (Duration::from_millis(250), 3));
        for (t, _) in &got {
            assert!(t.as_millis() % 50 == 0, "{got:?}");
        }
        assert_eq!(spool.pending_msgs(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn backlog_grows_batches_and_respects_spacing() {
        let (got, _) = record(0, 1000, 5).await;
        assert_eq!(got.iter().map(|b| b.1).sum::<usize>(), 1000);
        assert_eq!(got[0], (Duration::ZERO, 200)); // 10 + 0.5 × 1000, clamped to 200
        for w in got.windows(2) {
            assert!(w[1].0 - w[0].0 >= Duration::from_millis(100), "{got:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_honour_retry_after() {
        let (got, health) = record(2, 10, 10).await;
        assert_eq!(got.len(), 1);
        assert!(got[0].0 >= Duration::from_secs(4), "{got:?}");
        assert_eq!(health.circuit(), crate::metrics::CIRCUIT_CLOSED);
    }

    /// An upstream with latency: the batch holding message 0 takes `slow_first`, the others
    /// `latency`; every attempt before `fail_until` fails (after its latency). Records each
    /// attempt (start time, first message, batches in flight then) and what it accepted.
    struct Latent {
        start: Instant,
        latency: Duration,
        slow_first: Duration,
        fail_until: Duration,
        now: std::sync::atomic::AtomicUsize,
        attempts: Mutex<Vec<(Duration, i64, usize)>>,
        done: Mutex<Vec<i64>>,
        accepted: Mutex<Vec<i64>>,
    }

    impl Latent {
        /// Times in milliseconds: see the fields.
        fn new(latency_ms: u64, slow_first_ms: u64, fail_until_ms: u64) -> Arc<Self> {
            Arc::new(Self {
                start: Instant::now(),
                latency: Duration::from_millis(latency_ms),
                slow_first: Duration::from_millis(slow_first_ms),
                fail_until: Duration::from_millis(fail_until_ms),
                now: Default::default(),
                attempts: Mutex::default(),
                done: Mutex::default(),
                accepted: Mutex::default(),
            })
        }

        fn peak(&self) -> usize {
            let a = self.attempts.lock().unwrap();
            a.iter().map(|a| a.2).max().unwrap_or(0)
        }
    }

    impl Upstream for Latent {
        async fn send_batch(&self, body: Bytes, _: u64) -> Result<(), UpstreamError> {
            let v: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
            let is: Vec<i64> = v.iter().map(|m| m["i"].as_i64().unwrap()).collect();
            let at = self.start.elapsed();
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.attempts.lock().unwrap().push((at, is[0], now));
            sleep(if is[0] == 0 {
                self.slow_first
            } else {
                self.latency
            })
            .await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            if at < self.fail_until {
                return Err(UpstreamError::Retryable {
                    reason: "down".into(),
                    retry_after: None,
                });
            }
            self.done.lock().unwrap().push(is[0]);
            self.accepted.lock().unwrap().extend(is);
            Ok(())
        }
        not_used_by_delivery!();
    }

    /// Four batches go out at once; the first is slow and the later ones finish first, yet
    /// nothing is acknowledged until the first is done, then all of them in order.
    #[tokio::test(start_paused = true)]
    async fn batches_overlap_and_the_spool_is_acked_in_order() {
        let up = Latent::new(1000, 5000, 0);
        let (_dir, spool, metrics, _, _tx) = start_with(up.clone(), 4, 1000); // five batches of 200
        sleep(Duration::from_secs(3)).await;
        // Batches 2 to 4 are done, the first is not, the fifth waits for room.
        assert_eq!(*up.done.lock().unwrap(), vec![200, 400, 600]);
        assert_eq!(up.peak(), 4, "four batches outstanding at once");
        assert_eq!(up.attempts.lock().unwrap().len(), 4);
        assert_eq!(metrics.batches_in_flight.get(), 4);
        assert_eq!(
            spool.pending_msgs(),
            1000,
            "nothing acked past the first batch"
        );
        sleep(Duration::from_millis(2100)).await; // the first is done at 5 s
        assert_eq!(spool.pending_msgs(), 200, "the first four acked together");
        sleep(Duration::from_secs(5)).await;
        // (The tail shrinks with the backlog: 10 + 0.5 × what is left.)
        assert_eq!(up.done.lock().unwrap()[..5], [200, 400, 600, 0, 800]);
        assert_eq!(spool.pending_msgs(), 0);
        let mut all = up.accepted.lock().unwrap().clone();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>(), "each once");
        // Sends were spaced by min_batch_interval (100 ms), not by round trips.
        let starts: Vec<Duration> = up.attempts.lock().unwrap().iter().map(|a| a.0).collect();
        assert_eq!(starts[3], Duration::from_millis(300), "{starts:?}");
    }

    /// With one batch in flight, a batch goes out once the previous one is done.
    #[tokio::test(start_paused = true)]
    async fn max_in_flight_one_sends_one_batch_at_a_time() {
        let up = Latent::new(1000, 1000, 0);
        let (_dir, spool, _, _, _tx) = start_with(up.clone(), 1, 1000);
        sleep(Duration::from_secs(20)).await;
        assert_eq!(up.peak(), 1);
        assert_eq!(up.done.lock().unwrap()[..5], [0, 200, 400, 600, 800]);
        assert_eq!(spool.pending_msgs(), 0);
    }

    /// While the platform fails, only the oldest batch is retried (no stampede of every batch
    /// in flight); once it succeeds the window opens up again.
    #[tokio::test(start_paused = true)]
    async fn a_failing_platform_sees_one_batch_at_a_time() {
        let up = Latent::new(50, 50, 10000);
        let (_dir, spool, _, health, _tx) = start_with(up.clone(), 4, 1000);
        sleep(Duration::from_secs(9)).await;
        let failing = up.attempts.lock().unwrap().clone();
        assert!(
            failing
                .iter()
                .all(|a| a.1 == 0 || a.0 < Duration::from_millis(200)),
            "only the oldest batch retries: {failing:?}"
        );
        assert!(
            failing.iter().filter(|a| a.1 == 0).count() >= 3,
            "{failing:?}"
        );
        assert!(
            failing
                .iter()
                .all(|a| a.0 < Duration::from_millis(200) || a.2 == 1)
        );
        assert_eq!(health.circuit(), crate::metrics::CIRCUIT_OPEN);
        assert_eq!(spool.pending_msgs(), 1000);
        sleep(Duration::from_secs(60)).await;
        assert_eq!(spool.pending_msgs(), 0);
        let mut all = up.accepted.lock().unwrap().clone();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        // Open again: after the recovery, batches overlap.
        let attempts = up.attempts.lock().unwrap().clone();
        let recovered_peak = attempts
            .iter()
            .filter(|a| a.0 >= Duration::from_secs(10))
            .map(|a| a.2)
            .max();
        assert!(recovered_peak >= Some(2), "{attempts:?}");
        assert_eq!(health.circuit(), crate::metrics::CIRCUIT_CLOSED);
    }

    #[test]
    fn the_window_shrinks_on_failure_and_doubles_back() {
        let mut w = Window::new(8);
        assert!(w.admits(7) && !w.admits(8));
        assert!(w.failed());
        assert!(w.admits(0) && !w.admits(1));
        assert!(!w.failed());
        for limit in [2, 4, 8, 8] {
            w.answered();
            assert_eq!(w.limit, limit);
        }
        w.oldest = 5;
        assert!(w.admits(12) && !w.admits(13));
        // A reload: an open window follows the new maximum, a shrunk one stays shrunk.
        assert!(w.set_max(16));
        assert_eq!(w.limit, 16);
        w.failed();
        assert!(w.set_max(4));
        assert_eq!((w.limit, w.max), (1, 4));
        assert!(!w.set_max(4));
        assert_eq!(Window::new(0).limit, 1);
    }

    #[test]
    fn retry_after_is_capped_at_backoff_max() {
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        // No Retry-After: the jittered backoff.
        assert_eq!(retry_delay(ms(300), None, secs(30)), ms(300));
        // A reasonable Retry-After is honoured.
        assert_eq!(retry_delay(ms(300), Some(secs(2)), secs(30)), secs(2));
        // A huge one is capped at backoff_max…
        assert_eq!(
            retry_delay(ms(300), Some(secs(1_000_000_000)), secs(30)),
            secs(30)
        );
        assert_eq!(retry_delay(ms(10), Some(secs(3600)), secs(1)), secs(1));
        // …and at MAX_RETRY_AFTER when backoff_max is larger.
        assert_eq!(
            retry_delay(ms(300), Some(secs(100_000)), secs(3600)),
            MAX_RETRY_AFTER
        );
    }

    type Script = dyn Fn(&[serde_json::Value], u32) -> Result<(), UpstreamError> + Send + Sync;

    /// An upstream whose answer to each attempt is computed from the batch's messages and the
    /// attempt number; records what it accepted.
    struct Scripted {
        script: Box<Script>,
        attempts: Mutex<u32>,
        accepted: Mutex<Vec<Vec<serde_json::Value>>>,
        ids: Mutex<Vec<String>>,
    }

    impl Scripted {
        fn new(
            script: impl Fn(&[serde_json::Value], u32) -> Result<(), UpstreamError>
            + Send
            + Sync
            + 'static,
        ) -> Arc<Self> {
            Arc::new(Self {
                script: Box::new(script),
                attempts: Mutex::new(0),
                accepted: Mutex::new(Vec::new()),
                ids: Mutex::new(Vec::new()),
            })
        }

        fn accepted_is(&self) -> Vec<i64> {
            self.accepted
                .lock()
                .unwrap()
                .iter()
                .flatten()
                .map(|v| v["i"].as_i64().unwrap())
                .collect()
        }
    }

    impl Upstream for Scripted {
        async fn send_batch(&self, _: Bytes, _: u64) -> Result<(), UpstreamError> {
            unimplemented!("deliver is overridden")
        }
        async fn deliver(&self, batch: &Batch) -> Result<(), UpstreamError> {
            let v: Vec<serde_json::Value> = serde_json::from_slice(&batch.body).unwrap();
            assert_eq!(v.len() as u64, batch.count);
            assert_eq!(v.len(), batch.messages.len());
            let n = {
                let mut a = self.attempts.lock().unwrap();
                *a += 1;
                *a
            };
            (self.script)(&v, n)?;
            self.ids
                .lock()
                .unwrap()
                .extend(batch.messages.iter().map(|m| batch.id(m)));
            self.accepted.lock().unwrap().push(v);
            Ok(())
        }
        not_used_by_delivery!();
    }

    /// Appends `n` messages and starts delivering them to `up`. Keep the sender: dropping it
    /// tells delivery to drain.
    fn start_scripted(up: Arc<Scripted>, n: usize) -> Started {
        start_with(up, 4, n)
    }

    /// What [`start_with`] returns: the spool's directory, the spool, delivery's metrics and
    /// health, and the sender whose drop tells delivery to drain.
    type Started = (
        tempfile::TempDir,
        Arc<Spool>,
        Arc<Metrics>,
        Arc<Health>,
        crate::shutdown::ShutdownTrigger,
    );

    /// Appends `n` messages and starts delivering them to `up` with `max_in_flight` batches
    /// at once. Keep the sender: dropping it tells delivery to drain.
    fn start_with<U: Upstream>(up: Arc<U>, max_in_flight: usize, n: usize) -> Started {
        let dir = tempfile::tempdir().unwrap();
        let (spool, d) = setup_with(dir.path(), up, max_in_flight);
        let (metrics, health) = (d.metrics.clone(), d.health.clone());
        // None at all: the test appends its own while delivery runs.
        if n > 0 {
            append(&spool, n);
        }
        let (tx, rx) = crate::shutdown::channel();
        tokio::spawn(d.run(rx));
        (dir, spool, metrics, health, tx)
    }

    fn dead_letter_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("dl.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn too_large_batches_are_halved_until_they_fit() {
        let up = Scripted::new(|msgs, _| {
            if msgs.len() > 3 {
                Err(UpstreamError::TooLarge { body: "big".into() })
            } else {
                Ok(())
            }
        });
        let (dir, spool, metrics, _health, _tx) = start_scripted(up.clone(), 10);
        sleep(Duration::from_secs(5)).await;
        assert_eq!(
            up.accepted_is(),
            (0..10).collect::<Vec<_>>(),
            "in order, once"
        );
        assert!(up.accepted.lock().unwrap().iter().all(|b| b.len() <= 3));
        // Stable ids: all distinct, one per message.
        let ids = up.ids.lock().unwrap().clone();
        assert_eq!(
            ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
            10
        );
        assert_eq!(metrics.delivered.get(), 10);
        assert_eq!(metrics.dead_lettered.get(), 0);
        assert!(dead_letter_lines(dir.path()).is_empty());
        assert_eq!(spool.pending_msgs(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_message_is_dead_lettered_alone_and_the_rest_delivered() {
        let up = Scripted::new(|msgs, _| {
            if msgs.iter().any(|m| m["i"] == 4) {
                Err(UpstreamError::Rejected {
                    status: 422,
                    body: "{\"error\":\"bad message\"}".into(),
                })
            } else {
                Ok(())
            }
        });
        let (dir, spool, metrics, _health, _tx) = start_scripted(up.clone(), 10);
        sleep(Duration::from_secs(5)).await;
        assert_eq!(up.accepted_is(), vec![0, 1, 2, 3, 5, 6, 7, 8, 9]);
        assert_eq!(metrics.delivered.get(), 9);
        assert_eq!(metrics.dead_lettered.get(), 1);
        let dl = dead_letter_lines(dir.path());
        assert_eq!(dl.len(), 1, "{dl:?}");
        assert_eq!(dl[0]["status"], 422);
        assert_eq!(dl[0]["reason"], "rejected");
        assert_eq!(dl[0]["reply"], "{\"error\":\"bad message\"}");
        assert_eq!(dl[0]["messages"], serde_json::json!([{"i": 4}]));
        let id = dl[0]["id"].as_str().unwrap();
        assert!(id.starts_with(spool.id()), "{id}");
        assert_eq!(dl[0]["ids"], serde_json::json!([id]));
        assert_eq!(spool.pending_msgs(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn single_message_too_large_is_dead_lettered_with_413() {
        let up = Scripted::new(|_, _| Err(UpstreamError::TooLarge { body: "no".into() }));
        let (dir, spool, metrics, _health, _tx) = start_scripted(up.clone(), 3);
        sleep(Duration::from_secs(5)).await;
        let dl = dead_letter_lines(dir.path());
        assert_eq!(dl.len(), 3, "each alone: {dl:?}");
        for (i, line) in dl.iter().enumerate() {
            assert_eq!(line["status"], 413);
            assert_eq!(line["reason"], "too large");
            assert_eq!(line["messages"], serde_json::json!([{ "i": i }]));
        }
        assert_eq!(metrics.dead_lettered.get(), 3);
        assert_eq!(spool.pending_msgs(), 0);
    }

    /// 401 on the second half of a split batch: the first half is delivered, the spool is
    /// not acked (the batch is not done) and nothing is dead-lettered while the key is
    /// refused; once it is accepted, the rest goes and the batch is acked.
    #[tokio::test(start_paused = true)]
    async fn unauthorized_holds_the_spool_and_the_ack_waits_for_the_whole_batch() {
        let key_ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let up = Scripted::new({
            let key_ok = key_ok.clone();
            move |msgs, _| {
                if msgs.len() > 5 {
                    Err(UpstreamError::TooLarge {
                        body: String::new(),
                    })
                } else if msgs.first().is_some_and(|m| m["i"] == 0) || key_ok.load(Ordering::SeqCst)
                {
                    Ok(())
                } else {
                    Err(UpstreamError::Unauthorized {
                        status: 401,
                        endpoint: "messages",
                    })
                }
            }
        });
        let (_dir, spool, metrics, health, _tx) = start_scripted(up.clone(), 10);
        sleep(Duration::from_secs(600)).await;
        assert_eq!(up.accepted_is(), vec![0, 1, 2, 3, 4]);
        assert_eq!(
            spool.pending_msgs(),
            10,
            "not acked while part of the batch waits"
        );
        assert_eq!(metrics.dead_lettered.get(), 0);
        let snap = health.snapshot();
        assert!(
            snap["upstream"]["last_error"]
                .as_str()
                .is_some_and(|e| e.starts_with("unauthorized")),
            "{snap}"
        );
        assert_eq!(health.circuit(), crate::metrics::CIRCUIT_OPEN);
        // Capped backoff: in 600 s at most 30 s apart, so at least 20 attempts.
        let unauthorized = metrics
            .upstream_errors
            .with_label_values(&["unauthorized"])
            .get();
        assert!(unauthorized >= 20, "{unauthorized}");
        key_ok.store(true, Ordering::SeqCst);
        sleep(Duration::from_secs(31)).await;
        assert_eq!(up.accepted_is(), (0..10).collect::<Vec<_>>());
        assert_eq!(spool.pending_msgs(), 0);
        assert_eq!(metrics.dead_lettered.get(), 0);
        assert_eq!(health.circuit(), crate::metrics::CIRCUIT_CLOSED);
    }

    #[tokio::test(start_paused = true)]
    async fn redirect_is_retried_never_delivered() {
        let up = Scripted::new(|_, n| {
            if n <= 4 {
                Err(UpstreamError::Redirected {
                    status: 302,
                    endpoint: "messages",
                    location: "/ok".into(),
                })
            } else {
                Ok(())
            }
        });
        let (_dir, spool, metrics, health, _tx) = start_scripted(up.clone(), 10);
        sleep(Duration::from_millis(400)).await; // past the 250 ms flush interval
        assert!(up.accepted_is().is_empty());
        assert_eq!(spool.pending_msgs(), 10);
        let snap = health.snapshot();
        assert!(
            snap["upstream"]["last_error"]
                .as_str()
                .is_some_and(|e| e.starts_with("redirected") && e.contains("/ok")),
            "{snap}"
        );
        sleep(Duration::from_secs(60)).await;
        assert_eq!(up.accepted_is(), (0..10).collect::<Vec<_>>());
        assert_eq!(
            metrics
                .upstream_errors
                .with_label_values(&["redirect"])
                .get(),
            4
        );
        assert_eq!(spool.pending_msgs(), 0);
    }
}
