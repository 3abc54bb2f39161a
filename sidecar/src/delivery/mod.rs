//! Delivery: reads the spool in order, forms batches ([`sizing`] decides how large and how
//! often), sends them upstream, retries with backoff, splits refused batches, dead-letters
//! what the platform refuses for good, and acks the spool only once a batch is done.
//!
//! What each upstream error leads to is tabled at [`UpstreamError`].

pub mod sizing;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};

use crate::backoff::Backoff;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::spool::{PendingBatch, Spool};
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
    /// Runs until `drain` fires and the spool is empty. While draining, partial batches
    /// go out at once. The caller bounds draining with its shutdown deadline.
    pub async fn run(self, drain: Shutdown) {
        let mut reader = self.spool.reader();
        let mut batch = PendingBatch::default();
        let mut first_seen: Option<Instant> = None;
        let mut last_send: Option<Instant> = None;
        let mut draining = false;
        loop {
            draining = draining || drain.is_triggered();
            let tuning = self.tuning.borrow().clone();
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
                if draining {
                    return;
                }
                tokio::select! {
                    _ = self.spool.appended() => {}
                    _ = drain.triggered() => { draining = true; }
                }
                continue;
            }
            let first = *first_seen.get_or_insert_with(Instant::now);
            if !draining {
                if batch.count < plan.target as u64 {
                    let deadline = first + tuning.flush_interval;
                    if Instant::now() < deadline {
                        tokio::select! {
                            _ = self.spool.appended() => continue,
                            _ = sleep_until(deadline) => {}
                            _ = drain.triggered() => { draining = true; continue; }
                        }
                    }
                } else if let Some(last) = last_send {
                    sleep_until(last + plan.spacing).await;
                }
            }
            self.deliver(&batch).await;
            if let Some(end) = batch.end
                && let Err(e) = self.spool.ack(end, batch.count, batch.bytes)
            {
                // The batch is delivered; failing to record it only risks a duplicate.
                tracing::error!(error = %e, "writing the spool ack failed");
            }
            batch.clear();
            first_seen = None;
            last_send = Some(Instant::now());
        }
    }

    /// Delivers one batch read from the spool: returns once every message of it is delivered
    /// or dead-lettered (only then may the caller ack the spool). A batch the platform refuses
    /// (413 or another 4xx) is split in halves, recursively; a single message it still refuses
    /// is dead-lettered alone. Every other failure is retried with backoff, forever.
    async fn deliver(&self, batch: &PendingBatch) {
        // Built once: every retry and every split part carries the same stable message ids.
        let whole = Batch::from_pending(self.spool.id(), batch);
        // Parts still to send, the next one last (so the batch's order is kept).
        let mut todo = vec![whole];
        while let Some(part) = todo.pop() {
            match self.deliver_part(&part).await {
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
    async fn deliver_part(&self, part: &Batch) -> PartOutcome {
        let mut backoff = Backoff::new(self.backoff_initial, self.backoff_max);
        loop {
            self.health.attempt(&self.metrics);
            let key_generation = self.upstream.key_generation();
            let err = match self.upstream.deliver(part).await {
                Ok(()) => {
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
                    self.health.success(&self.metrics);
                    self.health.set_error(err.to_string());
                    return PartOutcome::Split;
                }
                UpstreamError::TooLarge { body } => {
                    self.health.success(&self.metrics);
                    self.dead_letter_part(part, 413, "too large", body).await;
                    return PartOutcome::Done;
                }
                UpstreamError::Rejected { status, body } => {
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
        let id = part.messages.first().map_or("", |m| m.id.as_str());
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
        let ids: Vec<&str> = part.messages.iter().map(|m| m.id.as_str()).collect();
        let head = serde_json::json!({
            "time": chrono::Utc::now().to_rfc3339(),
            "status": status,
            "reason": reason,
            "reply": reply,
            "id": ids.first().copied().unwrap_or(""),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{RecordBuf, SpoolOptions};
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
        async fn send_one(&self, _: Bytes) -> Result<Bytes, UpstreamError> {
            unimplemented!()
        }
        async fn check_messages(&self, _: u32) -> Result<Vec<serde_json::Value>, UpstreamError> {
            unimplemented!()
        }
    }

    fn setup<U: Upstream>(dir: &std::path::Path, up: Arc<U>) -> (Arc<Spool>, Delivery<U>) {
        let spool = Spool::open(SpoolOptions {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
            segment_bytes: 1 << 20,
            sync_interval: Duration::from_secs(1),
            overflow: crate::spool::Overflow::Reject,
        })
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let d = Delivery {
            spool: spool.clone(),
            upstream: up,
            tuning: Tuning {
                sizer: sizer(),
                flush_interval: Duration::from_millis(250),
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
        let dir = tempfile::tempdir().unwrap();
        let up = Arc::new(Recorder::default());
        *up.start.lock().unwrap() = Some(Instant::now());
        let (spool, d) = setup(dir.path(), up.clone());
        let (_tx, rx) = crate::shutdown::channel();
        tokio::spawn(d.run(rx));
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
        let dir = tempfile::tempdir().unwrap();
        let up = Arc::new(Recorder::default());
        *up.start.lock().unwrap() = Some(Instant::now());
        let (spool, d) = setup(dir.path(), up.clone());
        append(&spool, 1000);
        let (_tx, rx) = crate::shutdown::channel();
        tokio::spawn(d.run(rx));
        sleep(Duration::from_secs(5)).await;
        let got = up.batches.lock().unwrap().clone();
        assert_eq!(got.iter().map(|b| b.1).sum::<usize>(), 1000);
        assert_eq!(got[0], (Duration::ZERO, 200)); // 10 + 0.5 × 1000, clamped to 200
        for w in got.windows(2) {
            assert!(w[1].0 - w[0].0 >= Duration::from_millis(100), "{got:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_honour_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let up = Arc::new(Recorder::default());
        *up.fail_first.lock().unwrap() = 2;
        *up.start.lock().unwrap() = Some(Instant::now());
        let (spool, d) = setup(dir.path(), up.clone());
        let health = d.health.clone();
        append(&spool, 10);
        let (_tx, rx) = crate::shutdown::channel();
        tokio::spawn(d.run(rx));
        sleep(Duration::from_secs(10)).await;
        let got = up.batches.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert!(got[0].0 >= Duration::from_secs(4), "{got:?}");
        assert_eq!(health.circuit(), crate::metrics::CIRCUIT_CLOSED);
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
                .extend(batch.messages.iter().map(|m| m.id.clone()));
            self.accepted.lock().unwrap().push(v);
            Ok(())
        }
        async fn send_one(&self, _: Bytes) -> Result<Bytes, UpstreamError> {
            unimplemented!()
        }
        async fn check_messages(&self, _: u32) -> Result<Vec<serde_json::Value>, UpstreamError> {
            unimplemented!()
        }
    }

    /// Appends `n` messages and starts delivering them to `up`. Keep the sender: dropping it
    /// tells delivery to drain.
    fn start_scripted(
        dir: &std::path::Path,
        up: Arc<Scripted>,
        n: usize,
    ) -> (
        Arc<Spool>,
        Arc<Metrics>,
        Arc<Health>,
        crate::shutdown::ShutdownTrigger,
    ) {
        let (spool, d) = setup(dir, up);
        let (metrics, health) = (d.metrics.clone(), d.health.clone());
        append(&spool, n);
        let (tx, rx) = crate::shutdown::channel();
        tokio::spawn(d.run(rx));
        (spool, metrics, health, tx)
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
        let dir = tempfile::tempdir().unwrap();
        let up = Scripted::new(|msgs, _| {
            if msgs.len() > 3 {
                Err(UpstreamError::TooLarge { body: "big".into() })
            } else {
                Ok(())
            }
        });
        let (spool, metrics, _health, _tx) = start_scripted(dir.path(), up.clone(), 10);
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
        let dir = tempfile::tempdir().unwrap();
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
        let (spool, metrics, _health, _tx) = start_scripted(dir.path(), up.clone(), 10);
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
        let dir = tempfile::tempdir().unwrap();
        let up = Scripted::new(|_, _| Err(UpstreamError::TooLarge { body: "no".into() }));
        let (spool, metrics, _health, _tx) = start_scripted(dir.path(), up.clone(), 3);
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
        let dir = tempfile::tempdir().unwrap();
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
        let (spool, metrics, health, _tx) = start_scripted(dir.path(), up.clone(), 10);
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
        let dir = tempfile::tempdir().unwrap();
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
        let (spool, metrics, health, _tx) = start_scripted(dir.path(), up.clone(), 10);
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
