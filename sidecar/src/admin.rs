//! Admin HTTP: `/metrics` (Prometheus text), `/healthz` (process and upstream state, always
//! 200 while the process serves), `/readyz` (200 once the socket is bound and the spool
//! recovered, 503 before and while draining).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::{CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, Metrics};
use crate::spool::Spool;

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

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub spool: Arc<Spool>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    s.metrics.queue_depth.set(s.spool.pending_msgs() as i64);
    s.metrics.spool_bytes.set(s.spool.pending_bytes() as i64);
    if let Some(rss) = crate::batcher::rss_bytes() {
        s.metrics.resident_memory_bytes.set(rss as i64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<AdminState>) -> impl IntoResponse {
    let mut body = s.health.snapshot();
    if let Some(fields) = body.as_object_mut() {
        fields.insert("status".into(), "ok".into());
        fields.insert("queue_depth".into(), s.spool.pending_msgs().into());
        fields.insert("spool_bytes".into(), s.spool.pending_bytes().into());
    }
    axum::Json(body)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let ready =
        s.health.ready.load(Ordering::Relaxed) && !s.health.draining.load(Ordering::Relaxed);
    if ready {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
