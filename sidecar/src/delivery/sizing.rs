//! Batch sizing: how many messages and bytes the next batch holds and how long after the
//! previous send it may go, from the backlog and the last CPU/memory sample; and [`Tuning`],
//! the knobs a reload from the hub may change while the agent runs.
//!
//! Every knob of the Tendrl client configuration table is honoured:
//!
//! ```text
//! backlog  = min(queue_depth, max_queue_size)            messages waiting in the spool
//! cpu      = max(1, cpu% / target_cpu_percent)
//! mem      = max(1, mem% / target_mem_percent)           mem% is the working set
//! target   = clamp(round((batch_size + scale_factor × backlog) × cpu / mem),
//!                  min_batch_size, max_batch_size)
//! bytes    = max(1 message, max_batch_bytes / mem)
//! spacing  = clamp(min_batch_interval × max(cpu, mem), min_batch_interval, max_batch_interval)
//! ```
//!
//! CPU pressure grows batches (fewer requests for the same messages); memory pressure shrinks
//! them, by count and by bytes, because a batch is what delivery holds in memory — growing it
//! near the container's limit (as the Tendrl agent's formula did) is how a backlog of large messages
//! gets the agent OOM-killed. The byte budget bounds a batch whatever the message sizes.
//!
//! A batch is sent as soon as it holds `target` messages (or `bytes`), but never sooner than `spacing`
//! after the previous send started; a partial batch is sent `flush_interval` after its first message
//! was read, whatever the load (a steady trickle is never held back). Up to `max_in_flight`
//! batches are outstanding at once, so throughput is bounded by
//! `max_batch_size / max(min_batch_interval, round trip / max_in_flight)` (2,000 msgs/s with
//! the defaults, as long as the platform answers within 400 ms), which is the point of those
//! knobs: raise them for chattier pods.
//!
//! CPU and memory are sampled by [`crate::system::run_resource_sampler`] on a timer, never per message; the
//! sizer only reads the last sample.

use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;

/// The sizing knobs (see the module documentation for the formula).
#[derive(Debug, Clone)]
pub struct Sizer {
    pub batch_size: usize,
    pub min_batch_size: usize,
    pub max_batch_size: usize,
    pub scale_factor: f64,
    pub max_queue_size: usize,
    pub target_cpu_percent: f64,
    pub target_mem_percent: f64,
    pub min_batch_interval: Duration,
    pub max_batch_interval: Duration,
    pub max_batch_bytes: usize,
}

/// What the sizer decided for the next batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub target: usize,
    /// Most bytes of the batch's JSON array (one message always fits, whatever its size).
    pub max_bytes: usize,
    pub spacing: Duration,
}

impl Sizer {
    pub fn from_config(c: &Config) -> Self {
        Self {
            batch_size: c.batch_size,
            min_batch_size: c.min_batch_size,
            max_batch_size: c.max_batch_size,
            scale_factor: c.scale_factor,
            max_queue_size: c.max_queue_size,
            target_cpu_percent: c.target_cpu_percent,
            target_mem_percent: c.target_mem_percent,
            min_batch_interval: c.min_batch_interval,
            max_batch_interval: c.max_batch_interval,
            max_batch_bytes: c.max_batch_bytes,
        }
    }

    pub fn plan(&self, queue_depth: u64, cpu_percent: f64, mem_percent: f64) -> Plan {
        let backlog = queue_depth.min(self.max_queue_size as u64) as f64;
        let pressure = |used: f64, target: f64| {
            let p = (used / target).max(1.0);
            if p.is_finite() { p } else { 1.0 }
        };
        let cpu = pressure(cpu_percent, self.target_cpu_percent);
        let mem = pressure(mem_percent, self.target_mem_percent);
        let size = ((self.batch_size as f64 + self.scale_factor * backlog) * cpu / mem).round();
        let target = (size as usize).clamp(self.min_batch_size, self.max_batch_size);
        let max_bytes = (self.max_batch_bytes as f64 / mem) as usize;
        let spacing = self
            .min_batch_interval
            .mul_f64(cpu.max(mem))
            .clamp(self.min_batch_interval, self.max_batch_interval);
        Plan {
            target,
            max_bytes,
            spacing,
        }
    }
}

/// The batching knobs a `reload` from the hub may change while the agent runs.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub sizer: Sizer,
    pub flush_interval: Duration,
    /// Most batches outstanding at once (see the delivery module).
    pub max_in_flight: usize,
}

impl Tuning {
    pub fn from_config(c: &Config) -> Self {
        Self {
            sizer: Sizer::from_config(c),
            flush_interval: c.flush_interval,
            max_in_flight: c.max_in_flight,
        }
    }

    /// A fixed tuning (tests, benches): the sender is dropped, the value stays.
    pub fn fixed(self) -> watch::Receiver<Tuning> {
        watch::channel(self).1
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sizer() -> Sizer {
        Sizer {
            batch_size: 10,
            min_batch_size: 10,
            max_batch_size: 200,
            scale_factor: 0.5,
            max_queue_size: 1000,
            target_cpu_percent: 70.0,
            target_mem_percent: 80.0,
            min_batch_interval: Duration::from_millis(100),
            max_batch_interval: Duration::from_secs(1),
            max_batch_bytes: 4 << 20,
        }
    }

    #[test]
    fn sizing_formula() {
        let s = sizer();
        let ms = Duration::from_millis;
        assert_eq!(
            s.plan(0, 0.0, 0.0),
            Plan {
                target: 10,
                max_bytes: 4 << 20,
                spacing: ms(100)
            }
        );
        assert_eq!(
            s.plan(100, 10.0, 10.0),
            Plan {
                target: 60,
                max_bytes: 4 << 20,
                spacing: ms(100)
            }
        );
        assert_eq!(
            s.plan(100_000, 0.0, 0.0),
            Plan {
                target: 200,
                max_bytes: 4 << 20,
                spacing: ms(100)
            }
        );
        // CPU at twice the target: batches and spacing double.
        assert_eq!(
            s.plan(20, 140.0, 0.0),
            Plan {
                target: 40,
                max_bytes: 4 << 20,
                spacing: ms(200)
            }
        );
        // Memory far over target: spacing saturates at max_batch_interval.
        assert_eq!(s.plan(0, 0.0, 8000.0).spacing, ms(1000));
        // Memory at twice the target: batches halve, by count and by bytes, and sends are
        // spaced out — a batch is what delivery holds in memory (the Tendrl agent's formula grew it).
        assert_eq!(
            s.plan(380, 0.0, 160.0),
            Plan {
                target: 100,
                max_bytes: 2 << 20,
                spacing: ms(200)
            }
        );
        // Both: CPU grows the count, memory shrinks it; the byte budget follows memory alone.
        let both = s.plan(380, 140.0, 160.0);
        assert_eq!((both.target, both.max_bytes), (200, 2 << 20));
        let s = Sizer {
            batch_size: 50,
            min_batch_size: 20,
            scale_factor: 0.0,
            ..sizer()
        };
        assert_eq!(s.plan(500, 0.0, 0.0).target, 50);
    }
}
