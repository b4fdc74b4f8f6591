//! Prometheus metrics: the recorder, and what workers report in their Stats.
//!
//! Hot-path counters (frames, doorbells, tokens) are `metrics::Counter` handles
//! made once per worker, so counting is one atomic add, never a registry lookup.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use worker_protocol::frame::{SpecStatus, Stats};

/// Installs the global recorder (once per process) and returns its renderer.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// Mirrors a worker's latest Stats frame into gauges and counters.
pub fn record_worker_stats(model: &str, s: &Stats) {
    let m = || model.to_string();
    metrics::gauge!("mlxd_worker_active_sequences", "model" => m()).set(s.active_sequences as f64);
    metrics::gauge!("mlxd_worker_queued_sequences", "model" => m()).set(s.queued_sequences as f64);
    metrics::gauge!("mlxd_worker_active_memory_bytes", "model" => m()).set(s.active_memory as f64);
    metrics::gauge!("mlxd_worker_peak_memory_bytes", "model" => m()).set(s.peak_memory as f64);
    metrics::gauge!("mlxd_worker_rss_bytes", "model" => m()).set(s.rss as f64);
    metrics::counter!("mlxd_worker_completed_total", "model" => m()).absolute(s.completed_total);
    metrics::counter!("mlxd_worker_cancelled_total", "model" => m()).absolute(s.cancelled_total);
    metrics::counter!("mlxd_worker_batch_steps_total", "model" => m())
        .absolute(s.batch_steps_total);
    metrics::counter!("mlxd_worker_batch_tokens_total", "model" => m())
        .absolute(s.batch_tokens_total);
    metrics::counter!("mlxd_worker_token_frames_total", "model" => m())
        .absolute(s.token_frames_total);
    if let Some(spec) = &s.speculative {
        record_speculative(model, spec);
    }
    if let Some(pc) = &s.prompt_cache {
        metrics::counter!("mlxd_prompt_cache_lookups_total", "model" => m(), "result" => "hit")
            .absolute(pc.hits_total);
        metrics::counter!("mlxd_prompt_cache_lookups_total", "model" => m(), "result" => "miss")
            .absolute(pc.misses_total);
        metrics::counter!("mlxd_prompt_cache_cached_tokens_total", "model" => m())
            .absolute(pc.cached_tokens_total);
        metrics::gauge!("mlxd_prompt_cache_entries", "model" => m()).set(pc.entries as f64);
        metrics::gauge!("mlxd_prompt_cache_bytes", "model" => m()).set(pc.bytes as f64);
        metrics::gauge!("mlxd_prompt_cache_max_bytes", "model" => m()).set(pc.max_bytes as f64);
    }
}

/// The speculative counters and the draft policy's state, per model.
fn record_speculative(model: &str, s: &SpecStatus) {
    let m = || model.to_string();
    let tokens = |result: &'static str, v: u64| {
        metrics::counter!("mlxd_spec_draft_tokens_total", "model" => m(), "result" => result)
            .absolute(v)
    };
    tokens("accepted", s.accepted_total);
    tokens("rejected", s.drafted_total.saturating_sub(s.accepted_total));
    metrics::gauge!("mlxd_spec_acceptance_ratio", "model" => m()).set(s.acceptance);
    metrics::gauge!("mlxd_spec_active", "model" => m()).set(f64::from(u8::from(s.active)));
    metrics::gauge!("mlxd_spec_num_draft_tokens", "model" => m()).set(s.num_draft_tokens as f64);
    for (lane, tps) in [("speculative", s.spec_tps), ("plain", s.plain_tps)] {
        metrics::gauge!("mlxd_spec_decode_tokens_per_second", "model" => m(), "lane" => lane)
            .set(tps);
    }
    for (what, v) in [
        ("lowered", s.lowered_total),
        ("raised", s.raised_total),
        ("off", s.off_total),
        ("on", s.on_total),
    ] {
        metrics::counter!("mlxd_spec_transitions_total", "model" => m(), "transition" => what)
            .absolute(v);
    }
    for (to, v) in [
        ("batch", s.to_batch_total),
        ("speculative", s.to_speculative_total),
    ] {
        metrics::counter!("mlxd_spec_lane_switches_total", "model" => m(), "to" => to).absolute(v);
    }
}
