//! The platform's commands (`flush`, `get_consumption`, `deliver`): their contracts, the
//! answers, the consumption history `get_consumption` reads; and the `heartbeat` payload.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use nanogate_protocol::contract::{self, Contract, FieldType};
use serde_json::{Map, Value, json};
use tokio::time::{Instant, sleep};

use super::{FLUSH_MAX_WAIT, HISTORY, Inner};
use crate::shutdown::Shutdown;

/// Bounded history of this process's CPU and memory for `get_consumption`.
#[derive(Debug, Default)]
pub(super) struct History {
    samples: VecDeque<(chrono::DateTime<chrono::Utc>, f64, u64)>,
}

impl History {
    fn push(&mut self, at: chrono::DateTime<chrono::Utc>, cpu: f64, rss: u64) {
        if self.samples.len() == HISTORY {
            self.samples.pop_front();
        }
        self.samples.push_back((at, cpu, rss));
    }

    fn summary(
        &self,
        start: chrono::DateTime<chrono::Utc>,
        end: chrono::DateTime<chrono::Utc>,
    ) -> Map<String, Value> {
        let in_period: Vec<_> = self
            .samples
            .iter()
            .filter(|(t, _, _)| *t >= start && *t <= end)
            .collect();
        let n = in_period.len();
        let stats = |values: Vec<f64>| -> Value {
            if values.is_empty() {
                return json!({"avg": null, "max": null});
            }
            let avg = values.iter().sum::<f64>() / values.len() as f64;
            let max = values.iter().copied().fold(f64::MIN, f64::max);
            json!({"avg": round2(avg), "max": round2(max)})
        };
        let mut m = Map::new();
        m.insert(
            "period".into(),
            json!({"start": iso(start), "end": iso(end)}),
        );
        m.insert("samples".into(), n.into());
        let mut cpu = stats(in_period.iter().map(|s| s.1).collect());
        if let Some(cpu) = cpu.as_object_mut() {
            cpu.insert("unit".into(), "percent".into());
        }
        let mut mem = stats(in_period.iter().map(|s| s.2 as f64 / 1048576.0).collect());
        if let Some(mem) = mem.as_object_mut() {
            mem.insert("unit".into(), "MiB".into());
        }
        m.insert("cpu_usage".into(), cpu);
        m.insert("memory_usage".into(), mem);
        m
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A date the contract accepted (`FieldType::Date`), as UTC; no zone means UTC.
fn parse_date(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    let s = s.replace(' ', "T").replace(',', ".");
    for f in ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M%#z"] {
        if let Ok(t) = DateTime::parse_from_str(&s, f) {
            return Some(t.with_timezone(&Utc));
        }
    }
    let s = s.trim_end_matches(['Z', 'z']);
    for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// The commands the agent serves and their contracts (a command is checked against its
/// contract before it runs; a missing or mistyped field is answered with its name).
pub fn contract_for(action: &str) -> Option<Contract> {
    Some(match action {
        // Deliver what is queued now; `wait` (default true) answers once the spool is empty
        // or `timeout_ms` passed.
        "flush" => Contract::base()
            .field("wait", FieldType::optional(FieldType::Boolean))
            .field("timeout_ms", FieldType::optional(FieldType::Number)),
        // The agent's CPU and memory over a period (`end` defaults to now).
        "get_consumption" => Contract::base().field(
            "period",
            FieldType::Nested(
                Contract::new()
                    .field("start", FieldType::Date)
                    .field("end", FieldType::optional(FieldType::Date)),
            ),
        ),
        // A message for the pod's apps, served by `msg_check`.
        "deliver" => Contract::base()
            .field("data", FieldType::Any)
            .field("dest", FieldType::optional(FieldType::NonEmptyString))
            .field(
                "tags",
                FieldType::optional(FieldType::list(FieldType::String)),
            ),
        _ => return None,
    })
}

/// A field of a platform request, `null` when absent.
fn field(request: &Value, name: &str) -> Value {
    request.get(name).cloned().unwrap_or(Value::Null)
}

impl Inner {
    pub(super) fn heartbeat(&self) -> Value {
        let (mem_used, mem_total) = memory_gb();
        let (disk_used, disk_total) = disk_gb(&self.opts.disk_path);
        let status = if self.health.draining.load(Ordering::Relaxed) {
            "draining"
        } else {
            "online"
        };
        json!({
            "agent_id": self.opts.agent_id,
            "cpu_usage": round2(self.metrics.cpu_ratio.get() * 100.0),
            "memory_usage": mem_used,
            "memory_total": mem_total,
            "disk_usage": disk_used,
            "disk_total": disk_total,
            "uptime": self.started.elapsed().as_secs(),
            "status": status,
            "timestamp": iso(chrono::Utc::now()),
            "queue_depth": self.spool.pending_msgs(),
            "delivered_total": self.metrics.delivered.get(),
        })
    }

    /// Runs a command and returns its reply (the acknowledgement's argument).
    pub(super) async fn command(&self, action: &str, request: Value) -> Value {
        let reply = self.command_inner(action, &request).await;
        let result = if reply.get("status").and_then(Value::as_str) == Some("error") {
            "error"
        } else {
            "ok"
        };
        self.metrics
            .commands
            .with_label_values(&[
                if contract_for(action).is_some() {
                    action
                } else {
                    "unknown"
                },
                result,
            ])
            .inc();
        reply
    }

    async fn command_inner(&self, action: &str, request: &Value) -> Value {
        let Some(contract) = contract_for(action) else {
            return contract::error_reply(
                &format!(
                    "Unknown action: {action} (the agent handles flush, get_consumption, deliver)"
                ),
                request,
            );
        };
        if let Err(v) = contract.validate(request) {
            tracing::warn!(action, error = %v, "command refused by its contract");
            return contract::error_reply(&v.to_string(), request);
        }
        let mut out = Map::new();
        match action {
            "flush" => {
                // Delivery sends a partial batch within the flush interval; wait (bounded) for
                // the spool to empty and report what is left, as the hub's flush does.
                let wait = request["wait"].as_bool().unwrap_or(true);
                let limit = request["timeout_ms"]
                    .as_f64()
                    .filter(|ms| *ms >= 0.0)
                    .map_or(FLUSH_MAX_WAIT, |ms| Duration::from_secs_f64(ms / 1000.0))
                    .min(FLUSH_MAX_WAIT);
                let deadline = Instant::now() + limit;
                while wait && self.spool.pending_msgs() > 0 && Instant::now() < deadline {
                    sleep(Duration::from_millis(20)).await;
                }
                out.insert("pending".into(), self.spool.pending_msgs().into());
            }
            "get_consumption" => {
                let now = chrono::Utc::now();
                let period = &request["period"];
                let (Some(start), end) = (
                    period["start"].as_str().and_then(parse_date),
                    period["end"].as_str().map(parse_date),
                ) else {
                    return contract::error_reply(
                        "Invalid field type: period.start (unsupported ISO-8601 form)",
                        request,
                    );
                };
                let end = match end {
                    None => now,
                    Some(Some(e)) => e,
                    Some(None) => {
                        return contract::error_reply(
                            "Invalid field type: period.end (unsupported ISO-8601 form)",
                            request,
                        );
                    }
                };
                out = self
                    .history
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .summary(start, end);
            }
            "deliver" => {
                let mut msg = Map::new();
                msg.insert("msg_type".into(), "message".into());
                msg.insert("data".into(), field(request, "data"));
                if let Some(d) = request.get("dest").filter(|d| !d.is_null()) {
                    msg.insert("dest".into(), d.clone());
                }
                if let Some(t) = request.get("tags").filter(|t| !t.is_null()) {
                    msg.insert("context".into(), json!({ "tags": t }));
                }
                msg.insert("correlation_id".into(), field(request, "correlation_id"));
                msg.insert("timestamp".into(), field(request, "requested_at"));
                let mut inbox = self.inbox.lock().unwrap_or_else(PoisonError::into_inner);
                if inbox.len() >= self.opts.inbox_size {
                    return contract::error_reply(
                        &format!(
                            "Inbox full: {} messages wait for msg_check; retry later",
                            inbox.len()
                        ),
                        request,
                    );
                }
                inbox.push_back(Value::Object(msg));
                out.insert("queued".into(), inbox.len().into());
            }
            _ => unreachable!("contract_for knows only these"),
        }
        contract::ok_reply(request, out)
    }
}

/// System memory in GB: (used, total), from the cgroup when limited, else the host.
fn memory_gb() -> (f64, f64) {
    const GB: f64 = 1024.0 * 1024.0 * 1024.0;
    let read = |p: &str| -> Option<f64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    if let (Some(cur), Some(max)) = (
        read("/sys/fs/cgroup/memory.current"),
        read("/sys/fs/cgroup/memory.max"),
    ) {
        return (round2(cur / GB), round2(max / GB));
    }
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> f64 {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
            * 1024.0
    };
    let (total, avail) = (field("MemTotal:"), field("MemAvailable:"));
    (round2((total - avail) / GB), round2(total / GB))
}

/// Disk of `path`'s filesystem in GB: (used, total).
fn disk_gb(path: &std::path::Path) -> (f64, f64) {
    const GB: f64 = 1024.0 * 1024.0 * 1024.0;
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(std::path::Path::new("/"));
    match nix::sys::statvfs::statvfs(existing) {
        Ok(s) => {
            let frag = s.fragment_size() as f64;
            let total = s.blocks() as f64 * frag;
            let free = s.blocks_free() as f64 * frag;
            (round2((total - free) / GB), round2(total / GB))
        }
        Err(_) => (0.0, 0.0),
    }
}

pub(super) async fn sample_history(inner: Arc<Inner>, stop: Shutdown) {
    let mut tick = tokio::time::interval(inner.opts.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.triggered() => return,
        }
        let rss = crate::system::rss_bytes().unwrap_or(0);
        let cpu = inner.metrics.cpu_ratio.get() * 100.0;
        inner
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(chrono::Utc::now(), cpu, rss);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn command_contracts_cover_every_type_kind() {
        for action in ["flush", "get_consumption", "deliver"] {
            let c = contract_for(action).unwrap();
            let e = c.validate(&json!({})).unwrap_err().to_string();
            assert_eq!(e, "Missing required field: correlation_id");
        }
        let base =
            json!({"correlation_id": 1, "action": "x", "requested_at": "2025-11-20T20:30:45"});
        assert!(contract_for("delete_device").is_none());
        let deliver = contract_for("deliver").unwrap();
        let mut m = base.clone();
        m["data"] = json!({"text": "hi"});
        assert_eq!(deliver.validate(&m), Ok(()));
        m["tags"] = json!(["a", 2]);
        assert!(
            deliver
                .validate(&m)
                .unwrap_err()
                .to_string()
                .contains("tags[1]")
        );
    }

    #[test]
    fn dates_parse_in_every_accepted_form() {
        // The contract's forms (a leap second among them) and an ordinary last second.
        for s in contract::ISO8601_FORMS
            .into_iter()
            .chain(["2025-12-31T23:59:59+05"])
        {
            assert!(contract::is_iso8601(s), "{s}");
            assert!(parse_date(s).is_some(), "{s}");
        }
        assert_eq!(
            parse_date("2025-11-20T22:30:00+02:00"),
            parse_date("2025-11-20T20:30")
        );
    }

    #[test]
    fn consumption_summary() {
        let mut h = History::default();
        let t0 = parse_date("2025-11-20T20:00:00Z").unwrap();
        for i in 0..10 {
            h.push(
                t0 + chrono::Duration::seconds(5 * i),
                i as f64,
                (i as u64 + 1) << 20,
            );
        }
        let s = h.summary(
            t0 + chrono::Duration::seconds(10),
            t0 + chrono::Duration::seconds(20),
        );
        assert_eq!(s["samples"], 3);
        assert_eq!(
            s["cpu_usage"],
            json!({"avg": 3.0, "max": 4.0, "unit": "percent"})
        );
        assert_eq!(s["memory_usage"]["max"], 5.0);
        let s = h.summary(
            t0 - chrono::Duration::hours(2),
            t0 - chrono::Duration::hours(1),
        );
        assert_eq!(s["samples"], 0);
        assert_eq!(s["cpu_usage"]["avg"], Value::Null);
    }
}
