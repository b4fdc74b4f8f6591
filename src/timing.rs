//! One request timed through the supervisor's normal path, and the median of
//! several: what `POST /admin/benchmark` and `mlxd tune` measure.

use std::time::Instant;

use worker_protocol::frame::{Done, Generate};

use crate::error::Error;
use crate::supervisor::{GenEvent, Supervisor};

/// A finished request's timing, from submission.
#[derive(Debug, Clone)]
pub struct TimedRun {
    pub ttft_ms: f64,
    /// Tokens after the first over the time between the first and the last.
    pub decode_tps: f64,
    pub done: Done,
}

/// Runs `gen` on `model` and times it; the request's error if it fails.
pub async fn timed_run(sup: &Supervisor, model: &str, gen: Generate) -> Result<TimedRun, Error> {
    let began = Instant::now();
    let preset = sup.resolve(model)?;
    if preset.worker_engine(sup.models_dir()) == crate::presets::EngineKind::Embedding {
        return Err(embedding_model(model));
    }
    let mut stream = sup.generate(&preset, gen, None)?;
    let (mut first, mut last) = (None, None);
    loop {
        match stream.next().await {
            Some(GenEvent::Token { .. }) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
            }
            Some(GenEvent::Done(done)) => {
                let first = first.unwrap_or(began);
                let span = last.map_or(0.0, |l| (l - first).as_secs_f64());
                let decoded = f64::from(done.completion_tokens.saturating_sub(1));
                return Ok(TimedRun {
                    ttft_ms: (first - began).as_secs_f64() * 1e3,
                    decode_tps: if span > 0.0 { decoded / span } else { 0.0 },
                    done,
                });
            }
            Some(GenEvent::Error(e)) => return Err(e),
            Some(GenEvent::Embeddings(_)) => return Err(embedding_model(model)),
            Some(GenEvent::ToolCall(_) | GenEvent::Logprobs(_) | GenEvent::Admitted { .. }) => {}
            None => return Err(Error::Internal("the request ended without a result".into())),
        }
    }
}

/// The median (0 for none).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[mid]
    } else {
        (xs[mid - 1] + xs[mid]) / 2.0
    }
}

/// Timing a generation on an embedding model (`mlxd tune`, the benchmark route).
fn embedding_model(model: &str) -> Error {
    Error::invalid(
        format!("'{model}' is an embedding model: it generates nothing to time"),
        Some("model"),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(super::median(vec![]), 0.0);
    }
}
