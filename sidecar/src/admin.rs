//! Admin HTTP: `/metrics` (Prometheus text), `/healthz` (process and upstream state, always
//! 200 while the process serves), `/readyz` (200 once the socket is bound and the spool
//! recovered, 503 before and while draining).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::spool::Spool;

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
    if let Some(rss) = crate::system::rss_bytes() {
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
