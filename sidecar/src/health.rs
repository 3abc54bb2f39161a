//! Health of the agent: ready (every listener bound), draining (shutting down), and the
//! upstream circuit breaker (closed → open after repeated failures → half-open probe), with
//! the last error and success. Delivery and the transports update it; `/healthz`, `/readyz`
//! and the hub's heartbeats read it.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::metrics::{CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, Metrics};

/// Consecutive failures after which the circuit counts as open.
const OPEN_AFTER_FAILURES: u64 = 3;

/// Liveness, readiness and upstream circuit state.
#[derive(Debug, Default)]
pub struct Health {
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    circuit: AtomicI64,
    failures: AtomicU64,
    /// Whether any call to the platform has ended yet (delivery, `wait:true`, `msg_check`).
    tried: AtomicBool,
    last_error: Mutex<Option<String>>,
    last_success: Mutex<Option<chrono::DateTime<chrono::Utc>>>,
    /// State of a persistent upstream connection (socketio); `None` for request-based ones.
    connection: Mutex<Option<&'static str>>,
}

impl Health {
    pub fn circuit(&self) -> i64 {
        self.circuit.load(Ordering::Relaxed)
    }

    fn set_circuit(&self, m: &Metrics, state: i64) {
        self.circuit.store(state, Ordering::Relaxed);
        m.circuit_state.set(state);
    }

    /// Before a delivery attempt: an open circuit becomes half-open (a probe).
    pub fn attempt(&self, m: &Metrics) {
        if self.circuit() == CIRCUIT_OPEN {
            self.set_circuit(m, CIRCUIT_HALF_OPEN);
        }
    }

    pub fn success(&self, m: &Metrics) {
        self.tried.store(true, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.set_circuit(m, CIRCUIT_CLOSED);
        *self
            .last_success
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(chrono::Utc::now());
    }

    pub fn failure(&self, m: &Metrics, reason: &str) {
        self.tried.store(true, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= OPEN_AFTER_FAILURES || self.circuit() == CIRCUIT_HALF_OPEN {
            self.set_circuit(m, CIRCUIT_OPEN);
        }
        self.set_error(reason.to_owned());
    }

    pub fn set_error(&self, reason: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(reason);
    }

    /// Records the state of a persistent upstream connection, shown in `/healthz`.
    pub fn set_connection(&self, state: &'static str) {
        *self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(state);
    }

    pub fn circuit_name(&self) -> &'static str {
        match self.circuit() {
            CIRCUIT_OPEN => "open",
            CIRCUIT_HALF_OPEN => "half_open",
            _ => "closed",
        }
    }

    /// The platform as the agent last saw it, for heartbeats and `/healthz`: `untried` before
    /// any call ended, `closed` after one succeeded, `failing` after one failed while the
    /// circuit is still closed, then the circuit's `open`/`half_open`. The circuit alone says
    /// `closed` before the first call and after one or two failures, which the gateway's
    /// status used to show as reachable.
    pub fn upstream_state(&self) -> &'static str {
        match self.circuit() {
            CIRCUIT_CLOSED if !self.tried.load(Ordering::Relaxed) => "untried",
            CIRCUIT_CLOSED if self.failures.load(Ordering::Relaxed) > 0 => "failing",
            _ => self.circuit_name(),
        }
    }

    /// Records the outcome of a call an app made through the agent (`wait:true`, `msg_check`).
    pub fn record<T, E: std::fmt::Display>(&self, m: &Metrics, outcome: &Result<T, E>) {
        match outcome {
            Ok(_) => self.success(m),
            Err(e) => self.failure(m, &e.to_string()),
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "ready": self.ready.load(Ordering::Relaxed),
            "draining": self.draining.load(Ordering::Relaxed),
            "upstream": {
                "state": self.upstream_state(),
                "circuit": self.circuit_name(),
                "consecutive_failures": self.failures.load(Ordering::Relaxed),
                "last_error": *self.last_error.lock().unwrap_or_else(PoisonError::into_inner),
                "last_success": self.last_success.lock().unwrap_or_else(PoisonError::into_inner).map(|t| t.to_rfc3339()),
                "connection": *self.connection.lock().unwrap_or_else(PoisonError::into_inner),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state a heartbeat reports follows the calls that ended, not the circuit alone.
    #[test]
    fn the_upstream_state_is_untried_until_a_call_ends_and_failing_after_a_failure() {
        let (health, m) = (Health::default(), Metrics::new());
        assert_eq!(health.upstream_state(), "untried");
        health.record(&m, &Err::<(), _>("connection refused"));
        assert_eq!(
            health.upstream_state(),
            "failing",
            "one failure, circuit still closed"
        );
        assert_eq!(health.circuit_name(), "closed");
        health.record(&m, &Ok::<_, String>(()));
        assert_eq!(health.upstream_state(), "closed");
        for _ in 0..OPEN_AFTER_FAILURES {
            health.failure(&m, "HTTP 503");
        }
        assert_eq!(health.upstream_state(), "open");
        assert_eq!(health.snapshot()["upstream"]["last_error"], "HTTP 503");
    }
}
