//! The one retry backoff of the agent (full jitter, exponential, capped): delivery retries, the
//! dead-letter file, upstream reconnects and the hub connection all wait with it.

use std::time::Duration;

use rand::Rng as _;

/// Full-jitter exponential backoff: delay ∈ [0, min(max, initial × 2^attempt)].
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The upper bound of the next delay.
    pub fn cap(&self) -> Duration {
        self.initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max)
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(rand::rng().random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let caps: Vec<_> = (0..10)
            .map(|_| {
                let c = b.cap();
                assert!(b.next_delay() <= c);
                c.as_millis()
            })
            .collect();
        assert_eq!(
            caps,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }
}
