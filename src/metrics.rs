//! Prometheus metrics: the recorder, and what workers report in their Stats.
//!
//! Hot-path counters (frames, doorbells, tokens) are `metrics::Counter` handles
//! made once per worker, so counting is one atomic add, never a registry lookup.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use worker_protocol::frame::Stats;

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
}
