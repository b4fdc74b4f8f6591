//! Metrics (issue 19, item 4): every family mlxd emits has HELP text, the request
//! latencies are per-model histograms labelled by preset names only, and the
//! Grafana dashboard in docs/grafana/ queries only families that exist.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{daemon, post_json, root};
use mlxd::metrics::{Kind, FAMILIES};
use serde_json::{json, Value};

/// String literals in src/ that start with `mlxd_` but name no metric.
const NOT_METRICS: &[&str] = &[
    "mlxd_worker", // the worker's Python package
];

/// Every `"mlxd_…"` string literal in the Rust files under `dir`.
fn literals(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            literals(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for (at, _) in text.match_indices("\"mlxd_") {
                let rest = &text[at + 1..];
                let name = &rest[..rest.find('"').unwrap_or(0)];
                if !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    out.insert(name.to_string());
                }
            }
        }
    }
}

fn described() -> BTreeSet<&'static str> {
    FAMILIES.iter().map(|f| f.name).collect()
}

/// A metric named in the code without an entry in `metrics::FAMILIES` would
/// export without HELP: this fails first.
#[test]
fn every_family_in_the_sources_is_described() {
    let mut names = BTreeSet::new();
    literals(&root().join("src"), &mut names);
    // The scan itself works: names given to a helper (transport) are found too.
    assert!(names.contains("mlxd_worker_doorbells_total"), "{names:?}");
    let described = described();
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !described.contains(n.as_str()) && !NOT_METRICS.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics emitted in src/ without a HELP entry in metrics::FAMILIES \
         (or, if they name no metric, add them to NOT_METRICS here): {missing:?}"
    );
}

/// Every string under a key named `key`, anywhere in `v`.
fn strings_under<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::String(s) if k == key => out.push(s),
                    _ => strings_under(v, key, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| strings_under(v, key, out)),
        _ => {}
    }
}

/// The `mlxd_…` identifiers in a PromQL expression.
fn identifiers(expr: &str) -> Vec<&str> {
    expr.match_indices("mlxd_")
        .map(|(at, _)| {
            let rest = &expr[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

/// A series name as the family it belongs to: a histogram's `_bucket`, `_sum`
/// and `_count` series are its family's.
fn family_of(series: &str) -> Option<&'static str> {
    let histograms = FAMILIES.iter().filter(|f| f.kind == Kind::Histogram);
    FAMILIES
        .iter()
        .find(|f| f.name == series)
        .or_else(|| {
            histograms.clone().find(|f| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| series.strip_suffix(s) == Some(f.name))
            })
        })
        .map(|f| f.name)
}

#[test]
fn the_dashboard_queries_only_exported_families() {
    let path = root().join("docs/grafana/mlxd-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);

    let mut exprs = Vec::new();
    strings_under(&dashboard, "expr", &mut exprs);
    strings_under(&dashboard["templating"], "definition", &mut exprs);
    assert!(exprs.len() > 10, "the dashboard has too few queries");
    let mut used = BTreeSet::new();
    for expr in exprs {
        for series in identifiers(expr) {
            let family = family_of(series).unwrap_or_else(|| {
                panic!("the dashboard queries {series}, which mlxd does not export: {expr}")
            });
            used.insert(family);
        }
    }
    for family in [
        "mlxd_request_duration_seconds",
        "mlxd_ttft_seconds",
        "mlxd_worker_batch_tokens_total",
        "mlxd_worker_footprint_bytes",
        "mlxd_memory_cap_bytes",
        "mlxd_worker_restarts_total",
        "mlxd_spec_draft_tokens_total",
        "mlxd_prompt_cache_lookups_total",
        "mlxd_prompt_cache_bytes",
    ] {
        assert!(
            used.contains(family),
            "the dashboard has no panel on {family}"
        );
    }

    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "{}",
            panel["title"]
        );
        assert!(
            !panel["targets"].as_array().unwrap().is_empty(),
            "{}",
            panel["title"]
        );
    }
}

/// Requests of the `replay` preset that ended well, by the duration histogram.
fn ok_requests(text: &str) -> f64 {
    text.lines()
        .find(|l| {
            l.starts_with("mlxd_request_duration_seconds_count{")
                && l.contains(r#"model="replay""#)
                && l.contains(r#"outcome="ok""#)
        })
        .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

/// Through the real daemon: requests are timed per preset, a streamed one too,
/// a request for a model that does not exist adds no label value, and every
/// family the live exporter renders (the supervisor's, the budget's, the
/// workers') has HELP text.
#[tokio::test]
async fn requests_are_timed_per_preset_and_every_family_has_help() {
    let url = format!("{}/v1/completions", daemon().url);
    let before = ok_requests(&daemon().metrics().await);
    let ask = |model: &str, stream: bool| json!({"model": model, "prompt": "hi", "max_tokens": 4, "stream": stream});
    let (status, body) = post_json(&url, &ask("replay", false)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_json(&url, &ask("replay", true)).await;
    assert_eq!(status, 200, "{body}");
    let unknown = "no-such-model-for-metrics";
    let (status, _) = post_json(&url, &ask(unknown, false)).await;
    assert_eq!(status, 404);

    let text = daemon().metrics().await;
    assert!(
        !text.contains(unknown),
        "a client's model name became a label"
    );
    // Exactly the two requests above, the streamed one included.
    assert_eq!(ok_requests(&text) - before, 2.0, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(r#"mlxd_ttft_seconds_bucket{model="replay",le="120"}"#)),
        "no TTFT histogram for replay:\n{text}"
    );

    let described = described();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(
                text.contains(&format!("# HELP {name} ")) && described.contains(name),
                "{name} is exported without HELP text"
            );
        }
    }
}
