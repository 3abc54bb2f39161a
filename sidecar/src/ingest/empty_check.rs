//! Remembers for a short while that the platform had no messages, so `msg_check` polling
//! answers `204` locally instead of one platform round trip per poll.
//!
//! Why: apps poll `msg_check` in loops, often several apps per pod. Without this every poll is
//! an HTTP request (or a NATS pull that waits for its expiry) while nothing is waiting — load
//! on the platform and hundreds of microseconds to milliseconds per poll for the app. Only the
//! empty answer is remembered: messages the platform returns go straight to the app that
//! asked, so the agent never holds a message another app could lose. The price is that a
//! message arriving at the platform right after an empty answer is seen by the next poll after
//! the window (`--msg-check-cache`, default 100 ms; `0s` asks the platform every time).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct EmptyCheckCache {
    window: Duration,
    /// Fixed origin for the atomic timestamps below.
    origin: Instant,
    /// Nanoseconds after `origin` until which an empty answer stands; 0 = none.
    empty_until: AtomicU64,
}

impl EmptyCheckCache {
    /// A zero `window` disables the cache.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            origin: Instant::now(),
            empty_until: AtomicU64::new(0),
        }
    }

    /// True while an empty answer from the platform is recent enough to repeat.
    pub fn is_fresh(&self) -> bool {
        let until = self.empty_until.load(Ordering::Relaxed);
        until != 0 && self.now() < until
    }

    /// Records the platform's answer: empty starts a window, messages end it at once.
    pub fn record(&self, empty: bool) {
        let until = if empty && !self.window.is_zero() {
            self.now()
                .saturating_add(self.window.as_nanos() as u64)
                .max(1)
        } else {
            0
        };
        self.empty_until.store(until, Ordering::Relaxed);
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_answers_stand_for_the_window_and_messages_end_it() {
        let cache = EmptyCheckCache::new(Duration::from_millis(50));
        assert!(!cache.is_fresh(), "nothing recorded yet");
        cache.record(true);
        assert!(cache.is_fresh());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!cache.is_fresh(), "window over");
        cache.record(true);
        cache.record(false);
        assert!(!cache.is_fresh(), "messages end the window");
    }

    #[test]
    fn zero_window_never_caches() {
        let cache = EmptyCheckCache::new(Duration::ZERO);
        cache.record(true);
        assert!(!cache.is_fresh());
    }
}
