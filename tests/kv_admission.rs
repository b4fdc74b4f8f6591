//! Memory admission that fits real models (issue 29), with the real 4-bit and
//! float32 test models under MLXD_MEMORY_CAP=750MiB (presets kv-*.toml, each
//! with a KV reserve of 1,024 tokens): a load is charged its weights, the
//! runtime and its reserve, so two 4-bit models fit side by side and the float32
//! one evicts them; KV beyond the reserve is granted at run time by the worker,
//! which makes a request wait while another finishes, empties its prefix cache
//! before anything else, refuses one that could never fit with the tokens and
//! bytes, and survives a failed allocation inside a step.

mod common;

use std::time::{Duration, Instant};

use common::{post_json, spawn_daemon, Daemon};
use serde_json::{json, Value};

/// SmolLM2-135M keeps float32 KV: 2 × 30 layers × 3 KV heads × 64 × 4 bytes.
const KV_PER_TOKEN: u64 = 46_080;
const MIB: u64 = 1 << 20;

async fn row(d: &Daemon, model: &str) -> Option<Value> {
    let m = d.admin("memory", None).await.1;
    m["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == model)
        .cloned()
}

/// Polls the model's /admin/memory row (its worker reports every second)
/// until `ok` holds.
async fn row_when(d: &Daemon, model: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = row(d, model).await.filter(|r| ok(r)) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{model}: never {what}: {:?}",
            row(d, model).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ask(model: &str, content: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn kv_is_reserved_at_load_granted_at_run_time_and_refused_with_numbers() {
    let d = spawn_daemon(&[("MLXD_MEMORY_CAP", "750MiB")]);
    let chat = format!("{}/v1/chat/completions", d.url);

    // 1. The load is charged weights + runtime + the reserve, and /admin/memory
    //    shows each part.
    let (status, v) = d.admin("start", Some(json!({"model": "kv-q4-a"}))).await;
    assert_eq!(status, 200, "{v}");
    let a = row_when(&d, "kv-q4-a", "measured", |r| u(r, "kv_capacity_bytes") > 0).await;
    assert_eq!(u(&a, "kv_bytes_per_token"), KV_PER_TOKEN, "{a}");
    assert_eq!(u(&a, "kv_reserve_bytes"), 1024 * KV_PER_TOKEN, "{a}");
    let weights = u(&a, "weights_bytes");
    let charged_weights = u(&a, "estimate_bytes") - 150 * MIB - 1024 * KV_PER_TOKEN;
    assert!(
        weights > 100 * MIB && charged_weights.abs_diff(weights) < weights / 50,
        "the estimate's weights (the files) match what MLX holds: {a}"
    );
    assert_eq!(
        u(&a, "share_bytes"),
        750 * MIB,
        "alone, its share is the cap"
    );
    let capacity = u(&a, "kv_capacity_bytes");
    assert!(
        capacity > 400 * MIB && capacity < 600 * MIB,
        "the share less what the worker holds: {a}"
    );

    // 2. Two requests whose KV to max_tokens (7,000 tokens, 309 MiB each) fit
    //    one at a time: the second waits until the first ends, then completes.
    let first = reqwest::Client::new()
        .post(&chat)
        .json(
            &json!({"model": "kv-q4-a", "stream": true, "max_tokens": 7000,
                      "messages": [{"role": "user", "content": "Tell a long story."}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let mut first = first;
    first.chunk().await.unwrap().expect("the first streams");
    let began = Instant::now();
    let second = {
        let url = chat.clone();
        let body = json!({"model": "kv-q4-a", "max_tokens": 7000, "stop": [" "],
                          "messages": [{"role": "user", "content": "Hi"}]});
        tokio::spawn(async move { post_json(&url, &body).await })
    };
    let waiting = row_when(&d, "kv-q4-a", "waiting", |r| r["waiting_for_memory"] == 1).await;
    assert!(
        u(&waiting, "kv_reserved_bytes") >= 7000 * KV_PER_TOKEN,
        "the first holds its reservation: {waiting}"
    );
    assert!(!second.is_finished(), "the second waits for memory");
    // A third waits behind it, and its client gives up: it leaves the queue.
    let third = reqwest::Client::new()
        .post(&chat)
        .json(&ask("kv-q4-a", "Hello", 7000))
        .send();
    let third = tokio::spawn(third);
    row_when(&d, "kv-q4-a", "two waiting", |r| {
        r["waiting_for_memory"] == 2
    })
    .await;
    third.abort();
    row_when(&d, "kv-q4-a", "back to one waiting", |r| {
        r["waiting_for_memory"] == 1
    })
    .await;
    drop(first); // the first ends (a client that goes away)
    let (status, v) = second.await.unwrap();
    assert_eq!(status, 200, "the waiting request completes: {v}");
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    eprintln!("the second request waited and ran in {:?}", began.elapsed());

    // 3. A second 4-bit model fits beside the first (305 + 305 MiB charged of
    //    750): nothing is evicted, and the first's share shrinks to make room.
    for n in 0..3 {
        let (status, v) = post_json(&chat, &ask("kv-q4-a", &format!("Count to {n}."), 2)).await;
        assert_eq!(status, 200, "{v}"); // entries for the prefix cache
    }
    let (status, v) = d.admin("start", Some(json!({"model": "kv-q4-b"}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(row(&d, "kv-q4-a").await.unwrap()["state"], "ready");
    let a = row_when(&d, "kv-q4-a", "given a smaller share", |r| {
        u(r, "share_bytes") < 500 * MIB && u(r, "kv_capacity_bytes") < 300 * MIB
    })
    .await;

    // 4. The prefix cache gives back its memory before a request waits or is
    //    refused: a request needing all but a little of the capacity completes.
    let cached = u(&a, "prompt_cache_bytes");
    assert!(cached > 20 * MIB, "the prefix cache holds entries: {a}");
    let tokens = (u(&a, "kv_capacity_bytes") - cached / 2) / KV_PER_TOKEN - 40;
    let (status, v) = post_json(
        &chat,
        &json!({"model": "kv-q4-a", "max_tokens": tokens, "stop": [" "],
                "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    row_when(&d, "kv-q4-a", "evicting for room", |r| {
        u(r, "kv_evicted_for_room_total") > 0
    })
    .await;

    // 5. One that could never fit the smaller share, even alone: a clear 400
    //    naming its tokens and bytes, in each dialect's shape.
    let (status, v) = post_json(&chat, &ask("kv-q4-a", "Hi", 7000)).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "kv_cache_too_large", "{v}");
    let why = v["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("tokens of KV cache (309 MiB") && why.contains("lower max_tokens"),
        "{why}"
    );
    let (status, v) = post_json(
        &format!("{}/v1/messages", d.url),
        &json!({"model": "kv-q4-a", "max_tokens": 7000,
                "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    row_when(&d, "kv-q4-a", "counting refusals", |r| {
        u(r, "kv_refused_total") == 2
    })
    .await;

    // 6. The float32 model (~710 MiB charged) evicts both 4-bit models.
    let (status, v) = post_json(&chat, &ask("kv-f32", "Hi", 2)).await;
    assert_eq!(status, 200, "{v}");
    assert!(row(&d, "kv-q4-a").await.is_none() && row(&d, "kv-q4-b").await.is_none());

    // `mlxd ps` shows the parts per model.
    let out = common::mlxd()
        .args(["--port", &d.port.to_string(), "ps"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.contains("memory: weights ") && out.contains("headroom"),
        "{out}"
    );

    // 7. A step that fails to allocate ends its sequences with 503
    //    out_of_memory; the same worker serves the next request.
    let (status, v) = post_json(&chat, &ask("kv-q4-oom", "Hi", 10)).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "out_of_memory", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("out of memory: "),
        "{v}"
    );
    let pid = d.ps_row("kv-q4-oom").await.unwrap()["pid"].clone();
    let (status, v) = post_json(&chat, &ask("kv-q4-oom", "Hi", 10)).await;
    assert_eq!(status, 200, "{v}");
    let after = d.ps_row("kv-q4-oom").await.unwrap();
    assert_eq!(
        (after["pid"].clone(), after["restarts"].clone()),
        (pid, json!(0))
    );
    assert!(d.shut_down().success());
}
