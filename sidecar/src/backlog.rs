//! Is delivery keeping up with ingest? The backlog (messages accepted but not yet acknowledged
//! by the platform, the spool's depth) is sampled a few times per window (`--backlog-window`,
//! default 60 s) and judged by [`BacklogTracker`], a pure function of the samples and their
//! times (no clock of its own, so its tests give explicit timestamps).
//!
//! - **Backlogged** when, over the last window, the backlog grew by more than it fluctuates:
//!   the lowest level of the window's newer half is above the highest level of its older
//!   half. A backlog that goes up and down with each batch (a busy but keeping-up agent) never
//!   qualifies; one that keeps growing for a window does.
//! - **Cleared** (hysteresis, so the state does not flap with each batch) only once the
//!   backlog is back down to the level the episode started from (the older half's highest
//!   level when it began), or is plainly draining: over a whole window, the highest level of
//!   the newer half is below the lowest of the older half (delivery now outpaces ingest). A
//!   backlog that stops growing without draining — a full spool refusing messages, say —
//!   stays reported.
//!
//! The state is published as the gauges `nanogate_sidecar_backlogged` and
//! `nanogate_sidecar_backlog_growth_messages_per_second`, which heartbeats carry to the hub
//! (`SidecarsHealthy` reason `Backlogged`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::spool::Spool;

/// The tracker's verdict after a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BacklogState {
    pub backlogged: bool,
    /// Net growth of the backlog over the samples held (at most about a window), messages per
    /// second; 0 when it shrank or the window is not yet covered.
    pub growth_per_second: f64,
}

#[derive(Debug)]
pub struct BacklogTracker {
    window: Duration,
    /// `(when, depth)`, oldest first, spanning a little more than `window`.
    samples: VecDeque<(Instant, u64)>,
    /// While backlogged: the level the episode started from.
    episode_floor: Option<u64>,
}

impl BacklogTracker {
    pub fn new(window: Duration) -> Self {
        BacklogTracker {
            window,
            samples: VecDeque::new(),
            episode_floor: None,
        }
    }

    /// Records the backlog `depth` at `now` (not before the previous sample) and says whether
    /// the agent is backlogged.
    pub fn sample(&mut self, now: Instant, depth: u64) -> BacklogState {
        self.samples.push_back((now, depth));
        // Keep one sample at least a window old: the window is then fully covered.
        while self
            .samples
            .get(1)
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= self.window)
        {
            self.samples.pop_front();
        }
        let Some(&(oldest_at, oldest)) = self.samples.front() else {
            return self.state(0.0);
        };
        let span = now.saturating_duration_since(oldest_at);
        if span < self.window || span.is_zero() {
            return self.state(0.0);
        }
        let growth = depth.saturating_sub(oldest) as f64 / span.as_secs_f64();
        let middle = oldest_at + span / 2;
        let (mut old_min, mut old_max, mut new_min, mut new_max) = (u64::MAX, 0, u64::MAX, 0);
        for &(at, level) in &self.samples {
            if at < middle {
                old_min = old_min.min(level);
                old_max = old_max.max(level);
            } else {
                new_min = new_min.min(level);
                new_max = new_max.max(level);
            }
        }
        match self.episode_floor {
            None if new_min > old_max => {
                self.episode_floor = Some(old_max);
                tracing::warn!(backlog = depth, growth_per_second = growth, window = ?self.window,
                    "backlogged: delivery is slower than ingest and the spool keeps growing; raise spec.delivery.maxInFlight or the batch sizes, lower spec.batching.minBatchInterval, or fix a slow platform");
            }
            Some(floor) if depth <= floor || new_max < old_min => {
                self.episode_floor = None;
                tracing::info!(backlog = depth, "backlog is draining: no longer backlogged");
            }
            _ => {}
        }
        self.state(growth)
    }

    fn state(&self, growth: f64) -> BacklogState {
        let backlogged = self.episode_floor.is_some();
        BacklogState {
            backlogged,
            growth_per_second: if backlogged { growth } else { 0.0 },
        }
    }
}

/// How often the backlog is sampled: ten times per window, between 100 ms and 5 s.
pub fn sample_interval(window: Duration) -> Duration {
    (window / 10).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Samples the spool's depth until `stop` and publishes the verdict in the metrics.
pub async fn run(spool: Arc<Spool>, metrics: Arc<Metrics>, window: Duration, stop: Shutdown) {
    let mut tracker = BacklogTracker::new(window);
    let mut tick = tokio::time::interval(sample_interval(window));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.triggered() => return,
        }
        let state = tracker.sample(Instant::now(), spool.pending_msgs());
        metrics.backlogged.set(i64::from(state.backlogged));
        metrics.backlog_growth.set(state.growth_per_second);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    /// Feeds `levels`, one every 6 s from `t0 + from * 6 s`; the states after each.
    fn feed(
        tracker: &mut BacklogTracker,
        t0: Instant,
        from: u64,
        levels: &[u64],
    ) -> Vec<BacklogState> {
        levels
            .iter()
            .enumerate()
            .map(|(i, &level)| {
                tracker.sample(t0 + Duration::from_secs(6 * (from + i as u64)), level)
            })
            .collect()
    }

    fn backlogged(states: &[BacklogState]) -> Vec<bool> {
        states.iter().map(|s| s.backlogged).collect()
    }

    #[test]
    fn steady_growth_for_a_window_is_a_backlog_and_draining_clears_it() {
        let (t0, mut t) = (Instant::now(), BacklogTracker::new(WINDOW));
        // +100 messages every 6 s: reported once the window is covered (the 11th sample).
        let rising: Vec<u64> = (0..12).map(|i| 100 * i).collect();
        let states = feed(&mut t, t0, 0, &rising);
        assert_eq!(
            backlogged(&states),
            [vec![false; 10], vec![true; 2]].concat()
        );
        let growth = states[11].growth_per_second;
        assert!((growth - 100.0 / 6.0).abs() < 1e-9, "{growth}");
        // Stops growing but is not drained (a full spool): still reported.
        let states = feed(&mut t, t0, 12, &[1100; 15]);
        assert!(states.iter().all(|s| s.backlogged));
        assert!(states.last().is_some_and(|s| s.growth_per_second == 0.0));
        // Draining for a window clears it, well before the spool is empty.
        let draining: Vec<u64> = (1..=12).map(|i| 1100 - 50 * i).collect();
        let states = feed(&mut t, t0, 27, &draining);
        let cleared = states.iter().position(|s| !s.backlogged).unwrap();
        assert!(states[cleared..].iter().all(|s| !s.backlogged));
        assert!(draining[cleared] > 100, "cleared while draining");
    }

    #[test]
    fn back_to_the_level_the_episode_started_from_clears_at_once() {
        let (t0, mut t) = (Instant::now(), BacklogTracker::new(WINDOW));
        let rising: Vec<u64> = (0..11).map(|i| 5 + 100 * i).collect();
        assert!(feed(&mut t, t0, 0, &rising)[10].backlogged);
        // The episode's floor is the older half's highest level.
        assert!(t.sample(t0 + Duration::from_secs(66), 1100).backlogged);
        assert!(!t.sample(t0 + Duration::from_secs(67), 205).backlogged);
    }

    #[test]
    fn a_backlog_that_rises_and_falls_with_each_batch_is_not_reported() {
        let (t0, mut t) = (Instant::now(), BacklogTracker::new(WINDOW));
        // A busy agent keeping up: the depth swings between 10 and 500, drifting up a little.
        let swinging: Vec<u64> = (0..60)
            .map(|i| if i % 2 == 0 { 10 + i } else { 500 + i })
            .collect();
        assert!(feed(&mut t, t0, 0, &swinging).iter().all(|s| !s.backlogged));
        // An empty spool, and a constant one, are not backlogs either.
        let mut t = BacklogTracker::new(WINDOW);
        assert!(feed(&mut t, t0, 0, &[0; 30]).iter().all(|s| !s.backlogged));
        let mut t = BacklogTracker::new(WINDOW);
        assert!(feed(&mut t, t0, 0, &[70; 30]).iter().all(|s| !s.backlogged));
    }

    #[test]
    fn growth_shorter_than_the_window_is_not_a_backlog() {
        let (t0, mut t) = (Instant::now(), BacklogTracker::new(WINDOW));
        feed(&mut t, t0, 0, &[0; 10]);
        // A 30 s burst, then delivered.
        let burst = [100, 200, 300, 400, 500, 0, 0, 0, 0, 0, 0, 0];
        assert!(feed(&mut t, t0, 10, &burst).iter().all(|s| !s.backlogged));
    }

    #[test]
    fn a_short_window_judges_quickly() {
        let (t0, mut t) = (Instant::now(), BacklogTracker::new(Duration::from_secs(2)));
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut last = None;
        for step in 0..=25u64 {
            last = Some(t.sample(at(100 * step), 10 * step));
        }
        assert!(last.is_some_and(|s| s.backlogged));
        assert_eq!(
            sample_interval(Duration::from_secs(2)),
            Duration::from_millis(200)
        );
        assert_eq!(
            sample_interval(Duration::from_secs(60)),
            Duration::from_secs(5)
        );
        assert_eq!(
            sample_interval(Duration::from_millis(10)),
            Duration::from_millis(100)
        );
    }
}
