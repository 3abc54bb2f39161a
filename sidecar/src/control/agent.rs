//! The running agent as the hub sees it ([`AgentControl`]): heartbeats and `register` built
//! from its metrics, health and spool, and the hub's `reload`, `flush`, `drain` and `status`
//! requests applied to it.

use std::sync::Arc;
use std::time::Duration;

use nanogate_protocol::control::Heartbeat;
use rmpv::Value;
use tokio::sync::watch;
use tracing::{info, warn};

use super::ControlHandler;

/// The running agent as the hub sees it: heartbeats from its metrics and health, and the
/// hub's requests applied to it.
pub struct AgentControl {
    pub config: crate::config::Config,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub health: Arc<crate::health::Health>,
    pub spool: Arc<crate::spool::Spool>,
    /// Live batching knobs read by delivery; `reload` replaces them.
    pub tuning: watch::Sender<crate::delivery::Tuning>,
    /// `drain` fires the agent's graceful shutdown (stop accepting, deliver, exit).
    pub drain: crate::shutdown::ShutdownTrigger,
    pub started: std::time::Instant,
    /// Generation of the configuration in use (changes on reload).
    pub generation: std::sync::atomic::AtomicI64,
}

impl AgentControl {
    fn status(&self) -> nanogate_protocol::control::AgentStatus {
        use crate::metrics::CIRCUIT_CLOSED;
        use nanogate_protocol::control::AgentStatus;
        use std::sync::atomic::Ordering;
        if self.health.draining.load(Ordering::Relaxed) {
            AgentStatus::Draining
        } else if !self.health.ready.load(Ordering::Relaxed) {
            AgentStatus::Starting
        } else if self.health.circuit() != CIRCUIT_CLOSED {
            AgentStatus::Degraded
        } else {
            AgentStatus::Ready
        }
    }

    /// Applies a configuration file sent by the hub. Batching knobs apply from the next batch;
    /// settings the agent sets up once (socket, spool, connections) are named as pending a
    /// restart, and the agent keeps reporting the generation it really runs.
    fn reload(&self, kwargs: &[(String, Value)]) -> Result<Value, String> {
        let text = kwargs
            .iter()
            .find(|(k, _)| k == "config")
            .and_then(|(_, v)| v.as_str())
            .ok_or("reload needs kwargs.config: the configuration file's text")?;
        // The same precedence as at start: the process's flags and environment, then this
        // file, so a reload gives what a restart with the new file would.
        let new = self
            .config
            .with_file_text(text)
            .map_err(|e| format!("{e:#}"))?;
        let pending = crate::config::reload::needs_restart(&new, &self.config);
        let restart_needed = !pending.is_empty();
        self.tuning
            .send_replace(crate::delivery::Tuning::from_config(&new));
        // The crc32 of the file's text, computed while parsing it.
        let generation = new.config_generation;
        if restart_needed {
            // Only the batching knobs took effect: keep reporting the generation in use, so
            // the gateway's status does not count this sidecar as on the new configuration.
            warn!(
                generation,
                fields = %pending.join(", "),
                "configuration from the hub needs a restart of the pod to take full effect; batching knobs applied"
            );
        } else {
            self.generation
                .store(generation, std::sync::atomic::Ordering::Relaxed);
            info!(generation, "configuration reloaded from the hub");
        }
        Ok(Value::Map(vec![
            (Value::from("generation"), Value::from(generation)),
            (Value::from("applied"), Value::from("batching")),
            (Value::from("restart_needed"), Value::from(restart_needed)),
            (
                Value::from("pending_fields"),
                Value::Array(pending.into_iter().map(Value::from).collect()),
            ),
        ]))
    }
}

impl ControlHandler for AgentControl {
    fn heartbeat(&self) -> Heartbeat {
        use std::sync::atomic::Ordering;
        let snapshot = self.health.snapshot();
        let upstream = snapshot.get("upstream").unwrap_or(&serde_json::Value::Null);
        let rejected: u64 = {
            use prometheus::core::Collector;
            self.metrics
                .rejected
                .collect()
                .iter()
                .flat_map(|family| {
                    family
                        .get_metric()
                        .iter()
                        .map(|m| m.get_counter().get_value() as u64)
                })
                .sum()
        };
        Heartbeat {
            agent_id: self.config.pod_uid.clone().unwrap_or_default(),
            gateway: self.config.gateway.clone().unwrap_or_default(),
            pod: self.config.source(),
            status: self.status(),
            uptime: self.started.elapsed().as_secs(),
            cpu_usage: self.metrics.cpu_ratio.get() * 100.0,
            memory_usage: self.metrics.resident_memory_bytes.get().max(0) as u64,
            queue_depth: self.spool.pending_msgs(),
            spool_bytes: self.spool.pending_bytes(),
            received_total: self.metrics.received.get(),
            delivered_total: self.metrics.delivered.get(),
            rejected_total: rejected,
            dead_lettered_total: self.metrics.dead_lettered.get(),
            dropped_oldest_total: self.metrics.dropped_oldest.get(),
            upstream: nanogate_protocol::control::UpstreamHealth {
                state: upstream["state"].as_str().unwrap_or("closed").to_string(),
                last_error: upstream["last_error"].as_str().map(str::to_string),
                last_success: upstream["last_success"].as_str().map(str::to_string),
            },
            config_generation: self.generation.load(Ordering::Relaxed),
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            backlogged: self.metrics.backlogged.get() == 1,
            backlog_growth_per_second: self.metrics.backlog_growth.get(),
        }
    }

    fn register_info(&self) -> serde_json::Value {
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pod": self.config.source(),
            "gateway": self.config.gateway,
            "node": std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default(),
            "socket_path": self.config.socket_path,
            "upstream": {
                "kind": self.config.upstream_kind.as_str(),
                "insecure_skip_verify": self.config.upstream_insecure_skip_verify,
            },
            "capabilities": ["reload", "flush", "drain", "status"],
        })
    }

    async fn handle(&self, method: &str, kwargs: Vec<(String, Value)>) -> Result<Value, String> {
        match method {
            "reload" => self.reload(&kwargs),
            "status" => self.heartbeat().to_data().map_err(|e| e.to_string()),
            "flush" => {
                // Delivery sends a partial batch within the flush interval; wait (bounded) for
                // the spool to empty and report what is left.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while self.spool.pending_msgs() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Value::Map(vec![(
                    Value::from("pending"),
                    Value::from(self.spool.pending_msgs()),
                )]))
            }
            "drain" => {
                self.drain.trigger();
                Ok(Value::Map(vec![(
                    Value::from("draining"),
                    Value::from(true),
                )]))
            }
            other => Err(format!(
                "unknown method {other:?}; the agent serves reload, flush, drain, status"
            )),
        }
    }
}
