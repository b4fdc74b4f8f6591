//! Requests for a model this daemon does not serve but a peer does (peers.rs) go to
//! that peer as they came: same route, same body, the client's headers but its key
//! (the peer's key instead), and the peer's answer streamed back unchanged, so every
//! dialect, stream and error reaches the client in its own shape. A client that
//! hangs up drops the forwarded connection, which cancels the request on the peer.
//! A peer that does not answer is a 503 in the client's dialect, never a hang; one
//! that stops answering mid-stream ends the stream with the dialect's error event,
//! never a clean-looking end.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use futures::StreamExt;
use serde_json::json;

use super::error::Dialect;
use super::{core, AppState, MAX_BODY};
use crate::error::Error;
use crate::peers::{PeerHandle, Route};

/// The one field a forwarding decision reads (the rest is skipped, not built).
#[derive(Deserialize)]
struct Addressed {
    model: Option<String>,
}

/// Headers that describe this hop or carry the client's credentials for this
/// daemon: not forwarded.
const HOP_HEADERS: &[HeaderName] = &[
    header::HOST,
    header::AUTHORIZATION,
    header::CONTENT_LENGTH,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::ORIGIN,
];

pub async fn forward_to_peers(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.peers.is_empty() || req.method() != Method::POST {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        // The guard words it in the route's dialect.
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let model = serde_json::from_slice::<Addressed>(&bytes)
        .ok()
        .and_then(|a| a.model);
    let route = model
        .as_deref()
        .filter(|m| state.supervisor.resolve(m).is_err())
        .and_then(|m| state.peers.route(m));
    let path = parts.uri.path().to_owned();
    match route {
        None => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Some(Route::Peer(peer)) => {
            let path_and_query = parts
                .uri
                .path_and_query()
                .map_or(path.as_str(), |p| p.as_str());
            forward(
                &peer,
                &path,
                path_and_query,
                &parts.headers,
                bytes,
                model.as_deref().unwrap_or_default(),
            )
            .await
            .unwrap_or_else(|why| {
                unavailable(
                    &path,
                    model.as_deref().unwrap_or_default(),
                    peer.name(),
                    &why,
                )
            })
        }
        Some(Route::Unavailable { peer, why }) => {
            unavailable(&path, model.as_deref().unwrap_or_default(), &peer, &why)
        }
    }
}

async fn forward(
    peer: &PeerHandle<'_>,
    path: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: axum::body::Bytes,
    model: &str,
) -> Result<Response, String> {
    let mut out = reqwest::header::HeaderMap::new();
    for (name, value) in headers {
        if !HOP_HEADERS.contains(name) && name.as_str() != "x-api-key" {
            out.append(name.clone(), value.clone());
        }
    }
    tracing::debug!(peer = peer.name(), %model, path = path_and_query, "forwarded to a peer");
    let resp = peer
        .client
        .post(peer.url(path_and_query))
        .headers(out)
        .bearer_auth(peer.key())
        .body(body)
        .send()
        .await
        .map_err(|e| {
            if e.is_connect() {
                "connection refused or no route".to_string()
            } else {
                e.to_string()
            }
        })?;
    let mut answer = Response::builder().status(resp.status().as_u16());
    for (name, value) in resp.headers() {
        if !HOP_HEADERS.contains(name) {
            answer = answer.header(name, value);
        }
    }
    let streaming = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.starts_with("text/event-stream") || t.starts_with("application/x-ndjson")
        });
    let (path, model, name) = (path.to_owned(), model.to_owned(), peer.name().to_owned());
    // After a failed read: the dialect's error event (a stream), then the end.
    let body = resp.bytes_stream().scan(false, move |failed, chunk| {
        let item = match (chunk, *failed) {
            (_, true) => None,
            (Ok(bytes), false) => Some(Ok(bytes)),
            (Err(e), false) => {
                *failed = true;
                tracing::warn!(peer = %name, %model, "a forwarded answer broke off: {e}");
                let e = Error::WorkerFailed {
                    model: model.clone(),
                    reason: format!("peer '{name}' stopped answering: {e}"),
                };
                if streaming {
                    Some(Ok(axum::body::Bytes::from(stream_error(&path, &e))))
                } else {
                    Some(Err(std::io::Error::other(e.to_string())))
                }
            }
        };
        std::future::ready(item)
    });
    answer
        .body(Body::from_stream(body))
        .map_err(|e| e.to_string())
}

/// The dialect's in-stream error event for the route, as its own handlers write it.
fn stream_error(path: &str, e: &Error) -> Vec<u8> {
    let mut out = Vec::new();
    if path.starts_with("/v1/responses") {
        let body = json!({"type": "error", "code": e.code(), "message": e.to_string(), "param": e.param()});
        core::sse_event(&mut out, "error", &body);
    } else {
        match Dialect::of_path(path) {
            Dialect::Anthropic => {
                core::sse_event(&mut out, "error", &Dialect::Anthropic.error_body(e))
            }
            Dialect::Ollama => core::ndjson(&mut out, &Dialect::Ollama.error_body(e)),
            Dialect::OpenAi => core::sse_data(&mut out, &Dialect::OpenAi.error_body(e)),
        }
    }
    out
}

fn unavailable(path: &str, model: &str, peer: &str, why: &str) -> Response {
    let dialect = Dialect::of_path(path);
    let message = format!("model '{model}' runs on peer '{peer}', which is not answering: {why}");
    dialect.response(
        StatusCode::SERVICE_UNAVAILABLE,
        dialect.body(
            StatusCode::SERVICE_UNAVAILABLE,
            "peer_unavailable",
            &message,
            None,
        ),
    )
}
