//! Admin API used by `mlxd start|restart|stop|ps|reload` (loopback only, like the rest).

use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::error::Error;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelRequest {
    model: String,
    /// `start` only: never unload it for keep-alive.
    #[serde(default)]
    pin: bool,
}

fn parse(body: &Bytes) -> Result<ModelRequest, Error> {
    serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("expected {{\"model\": NAME}}: {e}"), None))
}

pub async fn ps(State(state): State<AppState>) -> axum::Json<Value> {
    axum::Json(json!({
        "workers": state.supervisor.ps().await,
        "segments": state.supervisor.live_segments(),
        "peers": state.peers.snapshot(),
    }))
}

pub async fn memory(State(state): State<AppState>) -> axum::Json<Value> {
    axum::Json(json!(state.supervisor.memory().await))
}

pub async fn start(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let req = parse(&body)?;
    let info = state.supervisor.start(&req.model, req.pin).await?;
    Ok(axum::Json(json!({"worker": info})))
}

pub async fn restart(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let req = parse(&body)?;
    let info = state.supervisor.restart(&req.model).await?;
    Ok(axum::Json(json!({"worker": info})))
}

pub async fn stop(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let req = parse(&body)?;
    let stopped = state.supervisor.stop(&req.model).await?;
    Ok(axum::Json(json!({"model": req.model, "stopped": stopped})))
}

/// Re-reads config and presets (`mlxd reload`); the report says what changed, or
/// the error why nothing did.
pub async fn reload(State(state): State<AppState>) -> Result<axum::Json<Value>, ApiError> {
    let report = state.supervisor.reload().await?;
    Ok(axum::Json(json!(report)))
}
