//! The memory budget, with the real model and a cap (MLXD_MEMORY_CAP=1GiB) that
//! fits one test model but not two: eviction of an idle model, a drain that lets a
//! stream in flight finish before the next load, a pinned model that is never
//! evicted, and a model larger than the cap, each refused with numbers.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{post_json, spawn_daemon, Daemon};
use serde_json::{json, Value};

fn daemon() -> &'static Daemon {
    static D: OnceLock<Daemon> = OnceLock::new();
    D.get_or_init(|| spawn_daemon(&[("MLXD_MEMORY_CAP", "1GiB")]))
}

async fn memory() -> Value {
    daemon().admin("memory", None).await.1
}

fn row<'a>(m: &'a Value, model: &str) -> Option<&'a Value> {
    m["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == model)
}

fn ask(model: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to fly."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

async fn chat(body: Value) -> (u16, Value) {
    post_json(&format!("{}/v1/chat/completions", daemon().url), &body).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_evicts_drains_keeps_pins_and_refuses_with_numbers() {
    let d = daemon();
    let (status, v) = d.admin("start", Some(json!({"model": "mem-a"}))).await;
    assert_eq!(status, 200, "{v}");
    let m = memory().await;
    assert_eq!(m["cap_bytes"], 1u64 << 30);
    assert!(m["total_bytes"].as_u64().unwrap() > m["cap_bytes"].as_u64().unwrap());
    let a = row(&m, "mem-a").expect("mem-a is loaded");
    let footprint = a["footprint_bytes"].as_u64().unwrap();
    assert!(
        footprint > 300 << 20,
        "the float32 model's true footprint: {a}"
    );
    assert_eq!(a["estimate_bytes"], 700u64 << 20);
    assert_eq!(m["used_bytes"].as_u64().unwrap(), footprint);

    // 1. mem-b does not fit next to the idle mem-a: mem-a is evicted.
    let began = Instant::now();
    let (status, v) = chat(ask("mem-b", 4, false)).await;
    assert_eq!(status, 200, "{v}");
    eprintln!(
        "load with eviction, to the first answer: {:?}",
        began.elapsed()
    );
    let m = memory().await;
    assert!(row(&m, "mem-a").is_none(), "mem-a was evicted: {m}");
    assert_eq!(row(&m, "mem-b").unwrap()["state"], "ready");

    // 2. mem-a again while mem-b streams: mem-b drains (its stream finishes
    //    intact), and only then does mem-a load.
    let url = format!("{}/v1/chat/completions", d.url);
    let mut stream = reqwest::Client::new()
        .post(&url)
        .json(&ask("mem-b", 40, true))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut body = String::from_utf8_lossy(&stream.chunk().await.unwrap().unwrap()).into_owned();
    let waiting = tokio::spawn(chat(ask("mem-a", 4, false)));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = memory().await;
        if row(&m, "mem-b").is_some_and(|r| r["state"] == "draining") {
            let a = row(&m, "mem-a");
            assert!(
                a.is_none_or(|a| a["footprint_bytes"] == 0),
                "mem-a must not load before mem-b is gone: {m}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "mem-b never drained: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Some(chunk) = stream.chunk().await.unwrap() {
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        body.trim_end().ends_with("data: [DONE]"),
        "the drained stream was cut: {body}"
    );
    let (status, v) = waiting.await.unwrap();
    assert_eq!(status, 200, "{v}");
    let m = memory().await;
    assert!(row(&m, "mem-b").is_none(), "{m}");

    // 3. A pinned model is never evicted; the refusal names it and the numbers.
    let (status, _) = d
        .admin("start", Some(json!({"model": "mem-a", "pin": true})))
        .await;
    assert_eq!(status, 200);
    let (status, v) = chat(ask("mem-b", 4, false)).await;
    assert_eq!(status, 503, "{v}");
    let why = v["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("not enough memory for 'mem-b': it needs 700 MiB, the cap is 1.0 GiB"),
        "{why}"
    );
    assert!(why.contains("'mem-a'") && why.contains("(pinned)"), "{why}");
    assert_eq!(row(&memory().await, "mem-a").unwrap()["state"], "ready");

    // 4. A model larger than the whole cap.
    let (status, v) = chat(ask("mem-huge", 4, false)).await;
    assert_eq!(status, 503, "{v}");
    let why = v["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("not enough memory for 'mem-huge': it needs 2.0 GiB, the cap is 1.0 GiB"),
        "{why}"
    );

    // `mlxd ps` prints the budget above its table.
    let out = common::mlxd()
        .args(["--port", &d.port.to_string(), "ps"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.starts_with("memory: workers use ") && out.contains("of the 1.0 GiB cap"),
        "{out}"
    );
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Above the shed mark (MLXD_MEMORY_SHED below one model's footprint), a stream in
/// flight carries on to its end, new requests get 503 memory_pressure with
/// Retry-After (in every dialect's shape), and the worker is told to give MLX's
/// cache back.
#[tokio::test(flavor = "multi_thread")]
async fn above_the_shed_mark_new_requests_are_refused_and_streams_finish() {
    let d = spawn_daemon(&[("MLXD_MEMORY_SHED", "300MiB")]);
    let url = format!("{}/v1/chat/completions", d.url);
    let mut stream = reqwest::Client::new()
        .post(&url)
        .json(&ask("mem-a", 30, true))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut body = String::from_utf8_lossy(&stream.chunk().await.unwrap().unwrap()).into_owned();
    let metrics_url = format!("{}/metrics", d.url);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "mlxd_memory_shedding",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "never shed with a 300 MiB mark");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&ask("mem-a", 4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "memory_pressure", "{v}");
    common::assert_503_in_every_dialect(&d.url, "mem-a", "memory_pressure", "shed mark").await;
    while let Some(chunk) = stream.chunk().await.unwrap() {
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        body.trim_end().ends_with("data: [DONE]"),
        "the stream in flight was cut: {body}"
    );
    let text = reqwest::get(&metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metric(&text, "mlxd_worker_cache_clears_total{model=\"mem-a\"}") >= 1.0,
        "the worker was not asked to clear its cache"
    );
    assert!(d.shut_down().success());
}
