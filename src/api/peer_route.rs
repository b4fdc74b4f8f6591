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
use futures::StreamExt;
use serde::Deserialize;
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
    // Inference routes only: this daemon's admin routes act on this daemon (a key for
    // it is not a key for its peers' control planes).
    let admin = req.uri().path().starts_with("/admin/");
    if state.peers.is_empty() || req.method() != Method::POST || admin {
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
    // Created before the call, so that a loss while it waits is not missed.
    let lost_before_answer = peer.lost.clone().notified_owned();
    let lost_while_streaming = peer.lost.clone().notified_owned();
    let send = peer
        .client
        .post(peer.url(path_and_query))
        .headers(out)
        .bearer_auth(peer.key())
        .body(body)
        .send();
    let resp = tokio::select! {
        sent = send => sent.map_err(|e| {
            if e.is_connect() {
                "connection refused or no route".to_string()
            } else {
                e.to_string()
            }
        })?,
        () = lost_before_answer => return Err(LOST.into()),
    };
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
    // The peer's bytes, then an end mark; or the peer lost first.
    let pieces = futures::stream::select(
        resp.bytes_stream()
            .map(Piece::Data)
            .chain(futures::stream::once(std::future::ready(Piece::End))),
        futures::stream::once(lost_while_streaming).map(|()| Piece::Lost),
    )
    .boxed();
    // A failed read or a lost peer: the dialect's error event (a stream), then the
    // end, without waiting on the peer again.
    let body = futures::stream::unfold(Some(pieces), move |pieces| {
        let (path, model, name) = (path.clone(), model.clone(), name.clone());
        async move {
            let mut pieces = pieces?;
            let broke_off = match pieces.next().await? {
                Piece::End => return None,
                Piece::Data(Ok(bytes)) => return Some((Ok(bytes), Some(pieces))),
                Piece::Data(Err(e)) => e.to_string(),
                Piece::Lost => LOST.to_string(),
            };
            tracing::warn!(peer = %name, %model, "a forwarded answer broke off: {broke_off}");
            let e = Error::WorkerFailed {
                model,
                reason: format!("peer '{name}' stopped answering: {broke_off}"),
            };
            let last = if streaming {
                Ok(axum::body::Bytes::from(stream_error(&path, &e)))
            } else {
                Err(std::io::Error::other(e.to_string()))
            };
            Some((last, None))
        }
    });
    answer
        .body(Body::from_stream(body))
        .map_err(|e| e.to_string())
}

/// What a forwarded answer is made of, as it arrives.
enum Piece {
    Data(Result<axum::body::Bytes, reqwest::Error>),
    /// The peer's answer ended.
    End,
    /// The peer missed its polls (`peers::LOST_AFTER_MISSES`).
    Lost,
}

const LOST: &str = "it missed its health checks (stopped, or unreachable)";

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
