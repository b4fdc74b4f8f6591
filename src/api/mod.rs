//! HTTP API: one module per dialect plus admin. Handlers translate between the
//! client's dialect and the internal request; they never decide policy.
//!
//! - [`request`]: the rules every dialect's request shares (limits, sampling,
//!   keep-alive, tools, the model resolved once); [`error`]: errors in each
//!   dialect's shape; [`core`]: starting, collecting and streaming a generation.
//! - Dialects, each importing those three and never each other: [`openai`]
//!   (chat, completions, models), [`responses`] (OpenAI Responses),
//!   [`anthropic`] (messages), [`ollama`] (/api/*).
//! - [`admin`], [`benchmark`] (the control plane), [`ui`] (the status page),
//!   [`guard`] (Host, Origin, JSON bodies, API keys).

pub mod admin;
pub mod anthropic;
pub mod benchmark;
pub mod core;
pub mod error;
pub mod guard;
#[cfg(feature = "bench-http")]
mod http_proxy;
pub mod image_urls;
pub mod images;
pub mod ollama;
pub mod openai;
mod peer_route;
pub mod request;
pub mod rerank;
pub mod responses;
pub mod ui;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::supervisor::Supervisor;

/// Largest request body accepted (docs/design/RELIABILITY.md: body ≤ 8 MiB).
pub const MAX_BODY: usize = 8 << 20;

#[derive(Clone)]
pub struct AppState {
    pub supervisor: Arc<Supervisor>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Image URLs fetched for requests (from `allowed_image_hosts` only).
    pub image_urls: Arc<image_urls::ImageFetcher>,
    /// Other mlxd daemons (config `[peers]`) and what was last heard from each.
    pub peers: Arc<crate::peers::Peers>,
    /// For the `http` transport's proxy route to workers on loopback.
    #[cfg(feature = "bench-http")]
    pub http: reqwest::Client,
}

/// Every route the daemon serves, as (method, path). The router is built from
/// this table and the security test walks it, so no route escapes the check that
/// each one needs a key.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/rerank"),
    ("POST", "/rerank"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/api/chat"),
    ("POST", "/api/generate"),
    ("GET", "/api/tags"),
    ("GET", "/api/ps"),
    ("POST", "/api/show"),
    ("POST", "/api/embed"),
    ("POST", "/api/embeddings"),
    ("GET", "/api/version"),
    ("GET", "/metrics"),
    ("GET", "/ui"),
    ("GET", "/ui/events"),
    ("GET", "/admin/ps"),
    ("GET", "/admin/memory"),
    ("POST", "/admin/start"),
    ("POST", "/admin/restart"),
    ("POST", "/admin/stop"),
    ("POST", "/admin/reload"),
    ("POST", "/admin/benchmark"),
];

fn handler(path: &str) -> axum::routing::MethodRouter<AppState> {
    match path {
        "/healthz" => get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        "/v1/chat/completions" => post(openai::chat_completions),
        "/v1/completions" => post(openai::completions),
        "/v1/models" => get(openai::models),
        "/v1/embeddings" => post(openai::embeddings),
        "/v1/rerank" | "/rerank" => post(rerank::rerank),
        "/v1/responses" => post(responses::responses),
        "/v1/messages" => post(anthropic::messages),
        "/v1/messages/count_tokens" => post(anthropic::count_tokens),
        "/api/chat" => post(ollama::chat),
        "/api/generate" => post(ollama::generate),
        "/api/tags" => get(ollama::tags),
        "/api/ps" => get(ollama::ps),
        "/api/show" => post(ollama::show),
        "/api/embed" => post(ollama::embed),
        "/api/embeddings" => post(ollama::embeddings),
        "/api/version" => get(ollama::version),
        "/metrics" => get(render_metrics),
        "/ui" => get(ui::page),
        "/ui/events" => get(ui::events),
        "/admin/ps" => get(admin::ps),
        "/admin/memory" => get(admin::memory),
        "/admin/start" => post(admin::start),
        "/admin/restart" => post(admin::restart),
        "/admin/stop" => post(admin::stop),
        "/admin/reload" => post(admin::reload),
        "/admin/benchmark" => post(benchmark::benchmark),
        other => unreachable!("route {other} in ROUTES has no handler"),
    }
}

/// The routes of the control socket (owner-only by its file mode: no guard).
pub const CONTROL_ROUTES: &[&str] = &[
    "/healthz",
    "/admin/ps",
    "/admin/memory",
    "/admin/start",
    "/admin/restart",
    "/admin/stop",
    "/admin/reload",
    "/admin/benchmark",
];

/// The control plane the CLI uses, served on the 0600 Unix socket.
pub fn control_router(state: AppState) -> Router {
    let mut router = Router::new();
    for path in CONTROL_ROUTES {
        router = router.route(path, handler(path));
    }
    router
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The whole API behind the guard (Host, Origin, JSON bodies, API keys).
pub fn router(state: AppState, guard: guard::Guard) -> Router {
    let mut router = Router::new();
    for (_, path) in ROUTES {
        router = router.route(path, handler(path));
    }
    // Behind the guard: a forwarded request has passed this daemon's checks first.
    let peers = axum::middleware::from_fn_with_state(state.clone(), peer_route::forward_to_peers);
    router
        .layer(peers)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            std::sync::Arc::new(guard),
            guard::check,
        ))
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

/// Fuzz target (`fuzz/` and tests/fuzz_requests.rs): any body sent to any
/// generation endpoint of any dialect ends as a 400 or a well-formed request,
/// never a panic.
pub fn fuzz_request(body: &[u8]) {
    openai::fuzz_request(body);
    let _ = anthropic::parse_messages(&axum::body::Bytes::copy_from_slice(body));
    ollama::fuzz_request(body);
    responses::fuzz_request(body);
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
