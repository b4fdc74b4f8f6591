//! `/ui`: a live status page served from the binary (plain HTML, CSS and a little
//! JavaScript; no build step), and `/ui/events`, the Server-Sent Events it reads:
//! one snapshot a second of every model (state, incarnation, memory against the
//! budget, requests in flight and queued, tokens/s, TTFT, speculative acceptance,
//! prompt-cache hit rate, restarts, last error).
//!
//! Rates are computed here, per connection, from the difference between two
//! snapshots: tokens/s from the worker's token counter, TTFT from the
//! `mlxd_ttft_seconds` histogram's sum and count (the same series Prometheus
//! scrapes), so the page and the dashboard agree.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use futures::Stream;
use serde_json::{json, Value};

use super::AppState;

/// The page.
const PAGE: &str = include_str!("ui.html");

/// How often the page gets a snapshot.
const PERIOD: Duration = Duration::from_secs(1);

pub async fn page() -> impl IntoResponse {
    (
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Html(PAGE),
    )
}

/// Counters of one model at one instant, to difference against the next.
#[derive(Clone, Copy, Default)]
struct Reading {
    tokens: u64,
    ttft_sum: f64,
    ttft_count: f64,
}

struct Watch {
    state: AppState,
    previous: HashMap<String, Reading>,
    at: Option<Instant>,
}

pub async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let watch = Watch {
        state,
        previous: HashMap::new(),
        at: None,
    };
    let stream = futures::stream::unfold(watch, |mut w| async move {
        if w.at.is_some() {
            tokio::time::sleep(PERIOD).await;
        }
        let snapshot = snapshot(&mut w).await;
        Some((Ok(Event::default().data(snapshot.to_string())), w))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Every model's row and the memory budget, with rates since the last snapshot.
async fn snapshot(w: &mut Watch) -> Value {
    let now = Instant::now();
    let seconds = w.at.map(|t| (now - t).as_secs_f64());
    w.at = Some(now);
    let ttft = ttft_by_model(&w.state.metrics.render());
    let memory = w.state.supervisor.memory().await;
    let mut rows = Vec::new();
    for info in w.state.supervisor.ps().await {
        let (ttft_sum, ttft_count) = ttft.get(&info.model).copied().unwrap_or_default();
        let reading = Reading {
            tokens: info.stats.batch_tokens_total,
            ttft_sum,
            ttft_count,
        };
        let before = w.previous.insert(info.model.clone(), reading);
        let (tokens_per_second, recent_ttft_ms) = match (before, seconds) {
            (Some(b), Some(s)) if s > 0.0 => (
                Some(reading.tokens.saturating_sub(b.tokens) as f64 / s),
                (reading.ttft_count > b.ttft_count).then(|| {
                    (reading.ttft_sum - b.ttft_sum) / (reading.ttft_count - b.ttft_count) * 1e3
                }),
            ),
            _ => (None, None),
        };
        let cache = info.stats.prompt_cache.as_ref();
        let lookups = cache.map_or(0, |c| c.lookups.total());
        rows.push(json!({
            "model": info.model,
            "state": info.state,
            "incarnation": info.incarnation,
            "pid": info.pid,
            "restarts": info.restarts,
            "error": info.error.or(info.last_exit),
            "inflight": info.inflight,
            "queued": info.queued,
            "footprint_bytes": info.footprint_bytes,
            "estimate_bytes": info.estimate_bytes,
            "tokens_per_second": tokens_per_second,
            "ttft_ms": recent_ttft_ms,
            "ttft_mean_ms": (ttft_count > 0.0).then(|| ttft_sum / ttft_count * 1e3),
            "requests": ttft_count as u64,
            "spec_acceptance": info.stats.speculative.as_ref().filter(|s| s.active).map(|s| s.acceptance),
            "cache_hit_rate": (lookups > 0).then(|| {
                cache.map_or(0.0, |c| c.lookups.hits() as f64 / lookups as f64)
            }),
        }));
    }
    json!({
        "models": rows,
        "peers": w.state.peers.snapshot(),
        "memory": {
            "cap_bytes": memory.cap_bytes,
            "used_bytes": memory.used_bytes,
            "total_bytes": memory.total_bytes,
        },
    })
}

/// `mlxd_ttft_seconds` sum and count per model, from the exposition text (summed
/// over any other labels).
fn ttft_by_model(text: &str) -> HashMap<String, (f64, f64)> {
    let mut out: HashMap<String, (f64, f64)> = HashMap::new();
    for line in text.lines() {
        let (is_sum, rest) = if let Some(r) = line.strip_prefix("mlxd_ttft_seconds_sum{") {
            (true, r)
        } else if let Some(r) = line.strip_prefix("mlxd_ttft_seconds_count{") {
            (false, r)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Some(model) = label(labels, "model") else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let entry = out.entry(model).or_default();
        if is_sum {
            entry.0 += v;
        } else {
            entry.1 += v;
        }
    }
    out
}

/// A label's value in `a="x",b="y"` (model names have no quotes or escapes:
/// presets::valid_name).
fn label(labels: &str, name: &str) -> Option<String> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn ttft_sums_and_counts_are_read_per_model() {
        let text = "# HELP mlxd_ttft_seconds Time to first token\n\
            mlxd_ttft_seconds_bucket{model=\"a\",le=\"0.1\"} 1\n\
            mlxd_ttft_seconds_sum{model=\"a\",dialect=\"openai\"} 0.5\n\
            mlxd_ttft_seconds_sum{dialect=\"ollama\",model=\"a\"} 0.25\n\
            mlxd_ttft_seconds_count{model=\"a\",dialect=\"openai\"} 2\n\
            mlxd_ttft_seconds_count{dialect=\"ollama\",model=\"a\"} 1\n\
            mlxd_ttft_seconds_sum{model=\"b\"} 3\n\
            mlxd_ttft_seconds_count{model=\"b\"} 4\n";
        let got = super::ttft_by_model(text);
        assert_eq!(got["a"], (0.75, 3.0));
        assert_eq!(got["b"], (3.0, 4.0));
        assert_eq!(got.len(), 2);
    }
}
