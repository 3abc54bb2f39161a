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
        self.failures.store(0, Ordering::Relaxed);
        self.set_circuit(m, CIRCUIT_CLOSED);
        *self
            .last_success
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(chrono::Utc::now());
    }

    pub fn failure(&self, m: &Metrics, reason: &str) {
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

    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "ready": self.ready.load(Ordering::Relaxed),
            "draining": self.draining.load(Ordering::Relaxed),
            "upstream": {
                "state": self.circuit_name(),
                "consecutive_failures": self.failures.load(Ordering::Relaxed),
                "last_error": *self.last_error.lock().unwrap_or_else(PoisonError::into_inner),
                "last_success": self.last_success.lock().unwrap_or_else(PoisonError::into_inner).map(|t| t.to_rfc3339()),
                "connection": *self.connection.lock().unwrap_or_else(PoisonError::into_inner),
            }
        })
    }
}
