//! Prometheus metrics: the recorder, the table of every family mlxd exports (its
//! HELP text), per-request latency, and what workers report in their Stats.
//!
//! Hot-path counters (frames, doorbells, tokens) are `metrics::Counter` handles
//! made once per worker, so counting is one atomic add, never a registry lookup.
//!
//! Every `model` label value is a preset's name, never what a client sent: the
//! number of series is bounded by the presets, whatever clients ask for.

use std::time::Instant;

use metrics::{KeyName, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use worker_protocol::frame::{SpecStatus, Stats, StepStats, BATCH_SIZE_BOUNDS};

use crate::error::{Error, Source};

/// What Prometheus calls a family's TYPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family: its name, kind, unit and HELP text.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
}

const fn family(name: &'static str, kind: Kind, unit: Option<Unit>, help: &'static str) -> Family {
    Family {
        name,
        kind,
        unit,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram};
const BYTES: Option<Unit> = Some(Unit::Bytes);
const SECONDS: Option<Unit> = Some(Unit::Seconds);
const COUNT: Option<Unit> = Some(Unit::Count);
const NONE: Option<Unit> = None;

/// Every family mlxd exports. A name emitted anywhere in `src/` must be here:
/// tests/metrics.rs scans the sources and fails on one without its HELP text, and
/// checks that the Grafana dashboard (docs/grafana/) uses only these names.
#[rustfmt::skip] // a table: each family's name, kind and unit read on one line
pub const FAMILIES: &[Family] = &[
    // Requests, per model (recorded once, in api/core.rs, for every dialect).
    family("mlxd_request_duration_seconds", Histogram, SECONDS,
        "Time from a generation request's admission to its end (the last event sent, an error, or the client going away), by model and outcome (ok, client_error, worker_error, daemon_error, cancelled)."),
    family("mlxd_ttft_seconds", Histogram, SECONDS,
        "Time from a generation request's admission to its first output (a token or a tool call), by model."),
    family("mlxd_requests_rejected_total", Counter, COUNT,
        "Requests refused because the model's queue was full (answered 503)."),
    family("mlxd_queue_depth", Gauge, COUNT,
        "Requests waiting in the daemon for the model's worker (not yet sent to it)."),
    family("mlxd_tokens_total", Counter, COUNT,
        "Generated tokens the daemon routed from the worker to requests."),
    // Workers: lifecycle and memory.
    family("mlxd_worker_ready", Gauge, NONE,
        "1 while the model's worker is ready to serve, else 0."),
    family("mlxd_worker_protocol_errors_total", Counter, COUNT,
        "Frames from the worker the daemon could not decode (an unknown kind, a misspelt or unknown field, a truncated payload); the worker is then restarted."),
    family("mlxd_worker_restarts_total", Counter, COUNT,
        "Times the model's worker was restarted after it died or hung."),
    family("mlxd_worker_footprint_bytes", Gauge, BYTES,
        "The worker's memory footprint at the last measurement (what the memory budget counts)."),
    family("mlxd_worker_cache_clears_total", Counter, COUNT,
        "Times the worker was asked to give its MLX cache back (memory above the shed mark)."),
    family("mlxd_worker_active_memory_bytes", Gauge, BYTES,
        "MLX active memory, as the worker last reported it."),
    family("mlxd_worker_peak_memory_bytes", Gauge, BYTES,
        "MLX peak memory, as the worker last reported it."),
    family("mlxd_worker_rss_bytes", Gauge, BYTES,
        "The worker process's resident set size, as it last reported it."),
    // Workers: the engine's batch.
    family("mlxd_worker_active_sequences", Gauge, COUNT,
        "Sequences the worker is generating right now."),
    family("mlxd_worker_queued_sequences", Gauge, COUNT,
        "Requests the worker has received but not yet started."),
    family("mlxd_worker_completed_total", Counter, COUNT,
        "Sequences the worker finished."),
    family("mlxd_worker_cancelled_total", Counter, COUNT,
        "Sequences the worker cancelled (client gone, or asked to stop)."),
    family("mlxd_worker_batch_steps_total", Counter, COUNT,
        "Decode steps the worker ran (batch_tokens_total / batch_steps_total is the mean batch)."),
    family("mlxd_worker_batch_tokens_total", Counter, COUNT,
        "Tokens the worker's decode steps produced."),
    family("mlxd_worker_token_frames_total", Counter, COUNT,
        "TokenBatch frames the worker sent (fewer than steps under a flush policy)."),
    family("mlxd_worker_engine_seconds", Gauge, SECONDS,
        "The worker's engine time while sequences were in flight, by part: prefill and decode (the model's passes) and host (its own work between passes: admissions, detokenizing, stop strings, frames). A running total since the worker started: use rate()."),
    family("mlxd_worker_batch_size_bucket", Counter, COUNT,
        "Engine steps that advanced at most `le` sequences (le=\"0\": steps that only prefilled), as the cumulative buckets of a histogram: histogram_quantile works on them; the +Inf bucket equals mlxd_worker_batch_steps_total."),
    // Workers: the transport.
    family("mlxd_worker_frames_total", Counter, COUNT,
        "Protocol frames between the daemon and the worker, by direction."),
    family("mlxd_worker_doorbells_total", Counter, COUNT,
        "Doorbell bytes rung on the shm transport, by direction (far fewer than frames while readers are busy)."),
    // Memory budget (whole daemon).
    family("mlxd_memory_used_bytes", Gauge, BYTES,
        "The workers' footprints together."),
    family("mlxd_memory_cap_bytes", Gauge, BYTES,
        "The memory cap: loads that would exceed it evict idle models or are refused."),
    family("mlxd_memory_shed_bytes", Gauge, BYTES,
        "The shed mark: above it new requests are refused and caches cleared."),
    family("mlxd_memory_shedding", Gauge, NONE,
        "1 while memory is above the shed mark (new requests refused), else 0."),
    // Prompt cache.
    family("mlxd_prompt_cache_lookups_total", Counter, COUNT,
        "Prompt cache lookups, by result (hit, miss) and reason (continued, diverged, cold, evicted, too_short)."),
    family("mlxd_prompt_cache_cached_tokens_total", Counter, COUNT,
        "Prompt tokens served from the cache instead of prefilled."),
    family("mlxd_prompt_cache_entries", Gauge, COUNT,
        "Entries the prompt cache holds."),
    family("mlxd_prompt_cache_bytes", Gauge, BYTES,
        "Bytes the prompt cache holds."),
    family("mlxd_prompt_cache_max_bytes", Gauge, BYTES,
        "The prompt cache's size limit."),
    family("mlxd_prompt_cache_disk_hits_total", Counter, COUNT,
        "Prompt cache lookups served from the disk tier (after a miss in memory)."),
    family("mlxd_prompt_cache_disk_entries", Gauge, COUNT,
        "Files the prompt cache's disk tier holds."),
    family("mlxd_prompt_cache_disk_bytes", Gauge, BYTES,
        "Bytes the prompt cache's disk tier holds."),
    family("mlxd_prompt_cache_disk_stale_total", Counter, COUNT,
        "Disk-tier files found stale (another model or version, corrupt) and deleted."),
    family("mlxd_prompt_cache_disk_writes_total", Counter, COUNT,
        "Entries written to the disk tier, by result (written, dropped: the writer fell behind)."),
    // Speculative decoding.
    family("mlxd_spec_draft_tokens_total", Counter, COUNT,
        "Draft tokens the target model checked, by result (accepted, rejected)."),
    family("mlxd_spec_acceptance_ratio", Gauge, NONE,
        "Accepted / drafted tokens over the recent rounds."),
    family("mlxd_spec_active", Gauge, NONE,
        "1 while a request alone decodes speculatively, else 0."),
    family("mlxd_spec_num_draft_tokens", Gauge, COUNT,
        "Tokens drafted per round now (0 while inactive)."),
    family("mlxd_spec_decode_tokens_per_second", Gauge, NONE,
        "Decode tokens/s measured, by lane (speculative, plain)."),
    family("mlxd_spec_transitions_total", Counter, COUNT,
        "The adaptive draft policy's transitions, by transition (lowered, raised, off, on)."),
    family("mlxd_spec_lane_switches_total", Counter, COUNT,
        "Switches between the batch and the speculative lane, by destination (to)."),
];

/// Latency buckets (seconds) of the request histograms: from a cached short
/// answer's first token (milliseconds) to a long generation on a cold model.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// The exporter's configuration: every histogram family gets explicit buckets,
/// so that it exports as a Prometheus histogram (aggregatable with
/// `histogram_quantile`) rather than the exporter's default summary.
pub fn builder() -> PrometheusBuilder {
    FAMILIES
        .iter()
        .filter(|f| f.kind == Histogram)
        .fold(PrometheusBuilder::new(), |b, f| {
            b.set_buckets_for_metric(Matcher::Full(f.name.to_string()), LATENCY_BUCKETS)
                .expect("LATENCY_BUCKETS is not empty")
        })
}

/// Gives every family in [`FAMILIES`] its HELP text and unit, on the recorder
/// installed now (the global one, or a test's local one).
pub fn describe_all() {
    metrics::with_recorder(|recorder| {
        for f in FAMILIES {
            let (name, help) = (
                KeyName::from_const_str(f.name),
                SharedString::const_str(f.help),
            );
            match f.kind {
                Counter => recorder.describe_counter(name, f.unit, help),
                Gauge => recorder.describe_gauge(name, f.unit, help),
                Histogram => recorder.describe_histogram(name, f.unit, help),
            }
        }
    });
}

/// Installs the global recorder (once per process) and returns its renderer.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe_all();
            handle
        })
        .clone()
}

/// How a generation request ended: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused or failed for a reason of the client's (4xx).
    ClientError,
    /// The worker failed, was unavailable, or the model was at capacity (5xx).
    WorkerError,
    DaemonError,
    /// The client went away before the end.
    Cancelled,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::WorkerError => "worker_error",
            Outcome::DaemonError => "daemon_error",
            Outcome::Cancelled => "cancelled",
        }
    }

    pub fn of(e: &Error) -> Outcome {
        match e.source_of() {
            Source::Client => Outcome::ClientError,
            Source::Worker => Outcome::WorkerError,
            Source::Daemon => Outcome::DaemonError,
        }
    }
}

/// Times one generation request: TTFT at its first output, the whole duration at
/// its end. Dropped before an end (the client went away, which drops the
/// response and with it the generation), it records the request as cancelled.
pub struct RequestTimer {
    /// The preset's name (see the module doc: never a client's string).
    model: String,
    accepted: Instant,
    saw_output: bool,
    finished: bool,
}

impl RequestTimer {
    /// `model`: the resolved preset's name.
    pub fn start(model: &str) -> RequestTimer {
        RequestTimer {
            model: model.to_string(),
            accepted: Instant::now(),
            saw_output: false,
            finished: false,
        }
    }

    /// The request produced output (a token or a tool call); only the first counts.
    pub fn output(&mut self) {
        if !self.saw_output {
            self.saw_output = true;
            metrics::histogram!("mlxd_ttft_seconds", "model" => self.model.clone())
                .record(self.accepted.elapsed().as_secs_f64());
        }
    }

    /// The request ended; only the first end counts.
    pub fn finish(&mut self, outcome: Outcome) {
        if !self.finished {
            self.finished = true;
            metrics::histogram!(
                "mlxd_request_duration_seconds",
                "model" => self.model.clone(),
                "outcome" => outcome.label()
            )
            .record(self.accepted.elapsed().as_secs_f64());
        }
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        self.finish(Outcome::Cancelled);
    }
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
    if let Some(steps) = &s.steps {
        record_steps(model, steps);
    }
    if let Some(spec) = &s.speculative {
        record_speculative(model, spec);
    }
    if let Some(pc) = &s.prompt_cache {
        for (result, reason, n) in pc.lookups.by_outcome() {
            metrics::counter!("mlxd_prompt_cache_lookups_total", "model" => m(), "result" => result,
                "reason" => reason)
            .absolute(n);
        }
        metrics::counter!("mlxd_prompt_cache_cached_tokens_total", "model" => m())
            .absolute(pc.cached_tokens_total);
        metrics::gauge!("mlxd_prompt_cache_entries", "model" => m()).set(pc.entries as f64);
        metrics::gauge!("mlxd_prompt_cache_bytes", "model" => m()).set(pc.bytes as f64);
        metrics::gauge!("mlxd_prompt_cache_max_bytes", "model" => m()).set(pc.max_bytes as f64);
        if let Some(disk) = &pc.disk {
            metrics::counter!("mlxd_prompt_cache_disk_hits_total", "model" => m())
                .absolute(disk.hits_total);
            metrics::gauge!("mlxd_prompt_cache_disk_entries", "model" => m())
                .set(disk.entries as f64);
            metrics::gauge!("mlxd_prompt_cache_disk_bytes", "model" => m()).set(disk.bytes as f64);
            metrics::counter!("mlxd_prompt_cache_disk_stale_total", "model" => m())
                .absolute(disk.stale_total);
            let writes = |result: &'static str, v: u64| {
                metrics::counter!("mlxd_prompt_cache_disk_writes_total", "model" => m(), "result" => result)
                    .absolute(v)
            };
            writes("written", disk.writes_total);
            writes("dropped", disk.dropped_total);
        }
    }
}

/// The engine's time by part and its steps as a batch-size histogram.
fn record_steps(model: &str, s: &StepStats) {
    let m = || model.to_string();
    for (part, seconds) in [
        ("prefill", s.prefill_seconds_total),
        ("decode", s.decode_seconds_total),
        ("host", s.host_seconds_total),
    ] {
        metrics::gauge!("mlxd_worker_engine_seconds", "model" => m(), "part" => part).set(seconds);
    }
    let bounds = BATCH_SIZE_BOUNDS
        .iter()
        .map(|b| b.to_string())
        .chain(["+Inf".to_string()]);
    let mut below = 0;
    for (le, count) in bounds.zip(s.batch_size_steps.iter()) {
        below += count;
        metrics::counter!("mlxd_worker_batch_size_bucket", "model" => m(), "le" => le)
            .absolute(below);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The exporter's text after touching every family (through the code that
    /// records it where a unit test can reach that code, by name otherwise).
    fn render_all() -> String {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_all();
            let stats = Stats {
                speculative: Some(Box::default()),
                prompt_cache: Some(Box::default()),
                ..Stats::default()
            };
            record_worker_stats("m", &stats);
            let _wire = crate::transport::WireCounters::new("m");
            let mut done = RequestTimer::start("m");
            done.output();
            done.finish(Outcome::Ok);
            drop(RequestTimer::start("m"));
            for f in FAMILIES {
                match f.kind {
                    Counter => metrics::counter!(f.name).increment(1),
                    Gauge => metrics::gauge!(f.name).set(1.0),
                    Histogram => metrics::histogram!(f.name).record(1.0),
                }
            }
        });
        handle.render()
    }

    #[test]
    fn every_rendered_family_has_help() {
        let text = render_all();
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert_eq!(types.len(), FAMILIES.len(), "families rendered:\n{text}");
        for name in types {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP line: add it to metrics::FAMILIES"
            );
        }
    }

    /// Explicit buckets make the latencies real histograms, aggregatable across
    /// models and instances with histogram_quantile (a summary is not).
    #[test]
    fn request_latencies_are_histograms() {
        let text = render_all();
        for name in ["mlxd_request_duration_seconds", "mlxd_ttft_seconds"] {
            assert!(text.contains(&format!("# TYPE {name} histogram")), "{text}");
        }
        assert!(text.contains(
            r#"mlxd_request_duration_seconds_bucket{model="m",outcome="ok",le="120"} 1"#
        ));
        assert!(text
            .contains(r#"mlxd_request_duration_seconds_count{model="m",outcome="cancelled"} 1"#));
        assert!(text.contains(r#"mlxd_ttft_seconds_bucket{model="m",le="120"} 1"#));
    }

    #[test]
    fn a_family_is_described_once() {
        let mut names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len());
    }
}
