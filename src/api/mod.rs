//! HTTP API: one module per dialect plus admin. Handlers translate between the
//! client's dialect and the internal request; they never decide policy.

pub mod admin;
pub mod openai;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::supervisor::Supervisor;

/// Largest request body accepted (RELIABILITY.md: body ≤ 8 MiB).
pub const MAX_BODY: usize = 8 << 20;

#[derive(Clone)]
pub struct AppState {
    pub supervisor: Arc<Supervisor>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// For the `http` transport's proxy route to workers on loopback.
    pub http: reqwest::Client,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/metrics", get(render_metrics))
        .route("/admin/ps", get(admin::ps))
        .route("/admin/memory", get(admin::memory))
        .route("/admin/start", post(admin::start))
        .route("/admin/restart", post(admin::restart))
        .route("/admin/stop", post(admin::stop))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn render_metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
