//! Admin API used by `mlxd start|stop|ps` (loopback only, like the rest).

use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{json, Value};

use super::openai::ApiError;
use super::AppState;
use crate::error::Error;

#[derive(Deserialize)]
struct ModelRequest {
    model: String,
}

fn parse(body: &Bytes) -> Result<ModelRequest, Error> {
    serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("expected {{\"model\": NAME}}: {e}"), None))
}

pub async fn ps(State(state): State<AppState>) -> axum::Json<Value> {
    axum::Json(json!({"workers": state.supervisor.ps().await}))
}

pub async fn start(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let req = parse(&body)?;
    let worker = state.supervisor.ensure(&req.model).await?;
    Ok(axum::Json(json!({"worker": worker.info()})))
}

pub async fn stop(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let req = parse(&body)?;
    let stopped = state.supervisor.stop(&req.model).await?;
    Ok(axum::Json(json!({"model": req.model, "stopped": stopped})))
}
