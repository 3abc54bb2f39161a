//! Resource sampling: this process's CPU and memory use (cgroup working set, else the host),
//! read on a timer by [`run_resource_sampler`] and never per message. Delivery sizes batches
//! from the last sample; metrics and heartbeats report it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Last CPU/memory sample, shared between the sampler and the sizer.
#[derive(Debug, Default)]
pub struct Resources {
    cpu: AtomicU64,
    mem: AtomicU64,
}

impl Resources {
    pub fn cpu_percent(&self) -> f64 {
        f64::from_bits(self.cpu.load(Ordering::Relaxed))
    }
    pub fn mem_percent(&self) -> f64 {
        f64::from_bits(self.mem.load(Ordering::Relaxed))
    }
    pub fn set(&self, cpu: f64, mem: f64) {
        self.cpu.store(cpu.to_bits(), Ordering::Relaxed);
        self.mem.store(mem.to_bits(), Ordering::Relaxed);
    }
}

/// CPU ticks (user + system) of this process from /proc/self/stat.
fn cpu_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = s.get(s.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident set size in bytes.
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    Some(s.split_whitespace().nth(1)?.parse::<u64>().ok()? * 4096)
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Memory use in percent of the container's limit, or of the host when there is none.
fn mem_percent() -> Option<f64> {
    if let Some((working_set, limit)) = cgroup_memory() {
        return Some(working_set as f64 * 100.0 / limit as f64);
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let (total, avail) = (field("MemTotal:")?, field("MemAvailable:")?);
    Some((total - avail) * 100.0 / total)
}

/// The working set and limit of this process's memory cgroup (v2 or v1), as the kubelet
/// counts it: usage less inactive page cache. The spool's writes fill the page cache, which
/// the kernel reclaims before it OOM-kills; counting it would read as constant pressure.
fn cgroup_memory() -> Option<(u64, u64)> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        // `0::/path` (v2) or `4:memory:/path` (v1).
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (root, usage, limit, inactive) = if controllers.is_empty() {
            (
                "/sys/fs/cgroup",
                "memory.current",
                "memory.max",
                "inactive_file",
            )
        } else if controllers.split(',').any(|c| c == "memory") {
            let v1 = "/sys/fs/cgroup/memory";
            (
                v1,
                "memory.usage_in_bytes",
                "memory.limit_in_bytes",
                "total_inactive_file",
            )
        } else {
            continue;
        };
        // A container sees its own cgroup at the mount's root; a host process under its path.
        for dir in [format!("{root}{path}"), root.to_owned()] {
            let (Some(used), Some(max)) = (
                read_u64(&format!("{dir}/{usage}")),
                read_u64(&format!("{dir}/{limit}")),
            ) else {
                continue;
            };
            // v2 writes `max` (no number) and v1 a huge number when there is no limit.
            if max == 0 || max >= 1 << 60 {
                return None;
            }
            let stat = std::fs::read_to_string(format!("{dir}/memory.stat")).unwrap_or_default();
            let cache = stat
                .lines()
                .find_map(|l| {
                    l.strip_prefix(inactive)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or(0u64);
            return Some((used.saturating_sub(cache), max));
        }
    }
    None
}

/// Samples CPU and memory every `interval` until `shutdown` fires.
pub async fn run_resource_sampler(
    res: Arc<Resources>,
    metrics: Arc<Metrics>,
    interval: Duration,
    shutdown: Shutdown,
) {
    const TICKS_PER_SEC: f64 = 100.0; // USER_HZ, 100 on every Linux ABI we run on
    let mut last = (std::time::Instant::now(), cpu_ticks().unwrap_or(0));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.triggered() => return,
        }
        let now = (std::time::Instant::now(), cpu_ticks().unwrap_or(last.1));
        let secs = now.0.duration_since(last.0).as_secs_f64();
        let cpu = if secs > 0.0 {
            (now.1 - last.1) as f64 / TICKS_PER_SEC / secs * 100.0
        } else {
            0.0
        };
        last = now;
        let mem = mem_percent().unwrap_or(0.0);
        res.set(cpu, mem);
        metrics.cpu_ratio.set(cpu / 100.0);
        metrics.memory_ratio.set(mem / 100.0);
        if let Some(rss) = rss_bytes() {
            metrics.resident_memory_bytes.set(rss as i64);
        }
    }
}
