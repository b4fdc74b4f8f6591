//! `POST /admin/benchmark`: the same request N times with drafting forced on and
//! N times forced off, interleaved (on, off, on, off, ...) so drift on the machine
//! hits both alike, each run alone through the normal request path. Answers each
//! run's TTFT, decode tok/s and draft counters, and the medians and their ratio.

use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{json, Value};
use worker_protocol::frame::{ChatMessage, DraftCounts, Generate};

use super::core::speculative_usage;
use super::error::ApiError;
use super::AppState;
use crate::error::Error;
use crate::timing::{median, timed_run, TimedRun};

const MAX_RUNS: u32 = 20;
const MAX_TOKENS: u32 = 1024;
const DEFAULT_PROMPT: &str = "Write a short story about a robot who learns to paint.";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BenchmarkRequest {
    model: String,
    /// Runs per side.
    #[serde(default = "default_runs")]
    runs: u32,
    #[serde(default = "default_max_tokens")]
    max_tokens: u32,
    /// A user message (chat template applied); a default story prompt otherwise.
    #[serde(default)]
    prompt: Option<String>,
}

fn default_runs() -> u32 {
    3
}

fn default_max_tokens() -> u32 {
    64
}

/// One measured request.
struct Run {
    speculative: bool,
    timed: TimedRun,
}

impl Run {
    fn to_json(&self) -> Value {
        let (timed, done) = (&self.timed, &self.timed.done);
        let mut v = json!({
            "speculative": self.speculative,
            "ttft_ms": round2(timed.ttft_ms),
            "decode_tps": round2(timed.decode_tps),
            // The worker's own figure (first to last token inside the worker): the
            // difference to decode_tps is the token path's share.
            "worker_decode_tps": round2(done.generation_tps),
            "completion_tokens": done.completion_tokens,
            "finish_reason": done.finish_reason,
        });
        if let Some(c) = &done.speculative {
            v["mlxd"] = speculative_usage(c);
        }
        v
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn measure(state: &AppState, model: &str, gen: Generate) -> Result<Run, Error> {
    let speculative = gen.speculative.unwrap_or(false);
    let timed = timed_run(&state.supervisor, model, gen).await?;
    Ok(Run { speculative, timed })
}

fn side(runs: &[Run], speculative: bool) -> Value {
    let mine: Vec<&Run> = runs
        .iter()
        .filter(|r| r.speculative == speculative)
        .collect();
    let mut v = json!({
        "median_decode_tps": round2(median(mine.iter().map(|r| r.timed.decode_tps).collect())),
        "median_ttft_ms": round2(median(mine.iter().map(|r| r.timed.ttft_ms).collect())),
    });
    if speculative {
        // The side's draft counters, reported as a request's are.
        let total = mine.iter().filter_map(|r| r.timed.done.speculative).fold(
            DraftCounts::default(),
            |t, c| DraftCounts {
                drafted: t.drafted + c.drafted,
                accepted: t.accepted + c.accepted,
                rejected: t.rejected + c.rejected,
            },
        );
        if let (Some(v), Value::Object(counts)) = (v.as_object_mut(), speculative_usage(&total)) {
            v.extend(counts);
        }
    }
    v
}

pub async fn benchmark(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let req: BenchmarkRequest = serde_json::from_slice(&body).map_err(|e| {
        Error::invalid(
            format!("expected {{\"model\": NAME, \"runs\": N, \"max_tokens\": N, \"prompt\": TEXT}}: {e}"),
            None,
        )
    })?;
    if !(1..=MAX_RUNS).contains(&req.runs) {
        return Err(Error::invalid(format!("runs must be 1 to {MAX_RUNS}"), Some("runs")).into());
    }
    if !(2..=MAX_TOKENS).contains(&req.max_tokens) {
        return Err(Error::invalid(
            format!("max_tokens must be 2 to {MAX_TOKENS}"),
            Some("max_tokens"),
        )
        .into());
    }
    let presets = state.supervisor.presets();
    let preset = presets
        .resolve(&req.model)
        .ok_or_else(|| Error::ModelNotFound(req.model.clone()))?;
    let name = preset.name.clone();
    if preset.speculative.is_none() {
        return Err(Error::invalid(
            format!("'{name}' has no draft model: add a [speculative] table to its preset"),
            Some("model"),
        )
        .into());
    }
    // Loaded and warmed up first: no run's TTFT includes the load.
    state.supervisor.start(&name, false).await?;
    let gen = |speculative: bool| Generate {
        messages: Some(vec![ChatMessage {
            role: "user".into(),
            content: req.prompt.clone().unwrap_or_else(|| DEFAULT_PROMPT.into()),
            ..Default::default()
        }]),
        max_tokens: req.max_tokens,
        // Greedy whatever the model's defaults: drafting must give the same text.
        temperature: Some(0.0),
        speculative: Some(speculative),
        ..Generate::default()
    };
    let mut runs = Vec::new();
    for _ in 0..req.runs {
        for speculative in [true, false] {
            let run = measure(&state, &name, gen(speculative)).await?;
            if speculative && run.timed.done.speculative.is_none() {
                let reason = state
                    .supervisor
                    .ps()
                    .await
                    .into_iter()
                    .find(|w| w.model == name)
                    .and_then(|w| w.stats.speculative)
                    .map_or_else(|| "the worker has no usable draft".into(), |s| s.reason);
                return Err(Error::invalid(
                    format!("speculative decoding is not available for '{name}': {reason}"),
                    Some("model"),
                )
                .into());
            }
            runs.push(run);
        }
    }
    let on = side(&runs, true);
    let off = side(&runs, false);
    let plain = off["median_decode_tps"].as_f64().unwrap_or(0.0);
    let speedup = if plain > 0.0 {
        (on["median_decode_tps"].as_f64().unwrap_or(0.0) / plain * 1e4).round() / 1e4
    } else {
        0.0
    };
    Ok(axum::Json(json!({
        "model": name,
        "max_tokens": req.max_tokens,
        "runs": runs.iter().map(Run::to_json).collect::<Vec<_>>(),
        "speculative": on,
        "plain": off,
        "speedup": speedup,
    })))
}
