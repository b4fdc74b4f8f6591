//! The `http` transport, for the token-path benchmark only (`--features
//! bench-http`): the request is forwarded to the worker's own HTTP server on
//! loopback and its response streamed back unchanged, as llama-swap and Ollama
//! do, so the benchmark can measure what the rings save.

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use futures::StreamExt;
use serde_json::json;
use worker_protocol::frame::Generate;

use super::request::Target;
use super::AppState;
use crate::error::Error;
use crate::presets::KeepAlive;

/// A request the worker's own HTTP server can answer.
pub fn is_plain(gen: &Generate) -> bool {
    gen.tools.is_empty() && gen.format.is_none() && gen.logprobs.is_none()
}

/// What the worker needs to render OpenAI's response shape itself.
pub struct Shape<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub created: u64,
    pub chat: bool,
    pub include_usage: bool,
    pub stream: bool,
}

pub async fn forward(
    state: &AppState,
    target: &Target,
    shape: Shape<'_>,
    gen: Generate,
    keep_alive: Option<KeepAlive>,
) -> Result<Response, Error> {
    let lease = state.supervisor.lease(&target.preset, keep_alive).await?;
    let mut body = serde_json::to_value(&gen).map_err(|e| Error::Internal(e.to_string()))?;
    body["chunk_id"] = json!(shape.id);
    body["model"] = json!(shape.model);
    body["created"] = json!(shape.created);
    body["chat"] = json!(shape.chat);
    body["include_usage"] = json!(shape.include_usage);
    body["stream"] = json!(shape.stream);
    let upstream = state
        .http
        .post(format!("http://127.0.0.1:{}/generate", lease.port))
        .json(&body)
        .send()
        .await
        .map_err(|e| Error::WorkerFailed {
            model: target.preset.name.clone(),
            reason: e.to_string(),
        })?;
    let status = upstream.status().as_u16();
    let content_type = upstream
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(header::HeaderValue::from_static("application/json"));
    // The lease is held until the body is fully forwarded (or the client leaves).
    let body = upstream.bytes_stream().map(move |chunk| {
        let _held = &lease;
        chunk
    });
    Ok(Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(body))
        .expect("valid response parts"))
}
