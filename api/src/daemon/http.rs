//! HTTP: `GET /metrics` (Prometheus text) and `GET /healthz`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::Daemon;

/// The HTTP routes.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(daemon)
}

async fn metrics(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    let text = tokio::task::spawn_blocking(move || daemon.metrics.render(&daemon.registry))
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}
