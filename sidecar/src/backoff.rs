//! The one retry backoff of the agent (exponential, capped, jittered): delivery retries, the
//! dead-letter file, upstream reconnects and the hub connection all wait with it.

use std::time::Duration;

use rand::Rng as _;

/// Exponential backoff: the cap of the next delay is min(max, initial × 2^attempt); the delay is
/// drawn below it (see [`Backoff::new`] and [`Backoff::spaced`]).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    /// Every delay is at least half its cap ([`Backoff::spaced`]).
    spaced: bool,
}

impl Backoff {
    /// Full jitter: delay ∈ [0, cap]. Spreads many clients best; a draw may be near zero.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
            spaced: false,
        }
    }

    /// Equal jitter: delay ∈ [cap / 2, cap], the cap starting at 2 × `initial`, so no delay is
    /// shorter than `initial` (or `max / 2`, when that is less). For a peer that refuses at once
    /// and pays for every attempt (the hub: a TLS handshake and an audit line each), where a
    /// near-zero full-jitter draw would redial at once.
    pub fn spaced(initial: Duration, max: Duration) -> Self {
        Self {
            initial: initial.saturating_mul(2),
            max,
            attempt: 0,
            spaced: true,
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
        let draw = rand::rng().random::<f64>();
        if self.spaced {
            cap / 2 + (cap / 2).mul_f64(draw)
        } else {
            cap.mul_f64(draw)
        }
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

    #[test]
    fn spaced_backoff_never_goes_below_half_its_cap() {
        let initial = Duration::from_millis(250);
        let mut b = Backoff::spaced(initial, Duration::from_secs(30));
        for _ in 0..3 {
            let mut floors = Vec::new();
            for _ in 0..12 {
                let cap = b.cap();
                let delay = b.next_delay();
                assert!(
                    cap / 2 <= delay && delay <= cap,
                    "{delay:?} outside [cap/2, {cap:?}]"
                );
                assert!(delay >= initial);
                floors.push((cap / 2).as_millis());
            }
            assert_eq!(
                floors,
                [
                    250, 500, 1000, 2000, 4000, 8000, 15000, 15000, 15000, 15000, 15000, 15000
                ]
            );
            b.reset();
        }
    }
}
