//! Continuous batching through a real daemon and real workers: concurrent
//! streams keep their own tokens, a cancel leaves the rest of the batch alone,
//! the queue limit answers 503, and the replay engine's flush policy batches frames.

mod common;

use std::time::Duration;

use common::daemon;
use futures::future::join_all;
use serde_json::{json, Value};

const MODEL: &str = "smollm2-135m";

/// Eight raw prompts whose greedy continuations differ from each other, each with
/// its own length.
const PROMPTS: [&str; 8] = [
    "1, 2, 3, 4, 5,",
    "Monday, Tuesday, Wednesday,",
    "The capital of France is",
    "a b c d e f",
    "January, February, March,",
    "Roses are red, violets are",
    "10, 20, 30, 40,",
    "The opposite of hot is",
];

struct Completion {
    text: String,
    completion_tokens: u64,
    finish_reason: String,
}

/// A streamed /v1/completions request, read to the end.
async fn stream_completion(model: &str, prompt: &str, max_tokens: u32) -> Completion {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", daemon().url))
        .json(&json!({
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    parse_stream(&resp.text().await.unwrap())
}

fn parse_stream(body: &str) -> Completion {
    let mut out = Completion {
        text: String::new(),
        completion_tokens: 0,
        finish_reason: String::new(),
    };
    for event in body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if event == "[DONE]" {
            return out;
        }
        let v: Value = serde_json::from_str(event).unwrap();
        assert!(v.get("error").is_none(), "stream error: {v}");
        if let Some(choice) = v["choices"].get(0) {
            out.text += choice["text"].as_str().unwrap_or_default();
            if let Some(f) = choice["finish_reason"].as_str() {
                out.finish_reason = f.to_string();
            }
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            out.completion_tokens = n;
        }
    }
    panic!("stream ended without [DONE]: {body}");
}

/// The value of a metric line `name{...model="<model>"...} value`.
fn metric(text: &str, name: &str, model: &str) -> f64 {
    let label = format!("model=\"{model}\"");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Each of 8 concurrent streams must get exactly the text and token count it gets
/// when run alone. The prompts' greedy continuations all differ, so a token routed
/// to the wrong request, or a sequence fed another's KV cache, changes some text.
/// Batched numerics could in principle flip a near-tie argmax; the model runs in
/// float32 here and these prompts' continuations are far from ties (the test has
/// matched exactly run after run), so any difference is a bug, not noise.
#[tokio::test]
async fn concurrent_streams_keep_their_own_tokens() {
    let lengths: Vec<u32> = (0..8).map(|i| 5 + i).collect();
    let mut alone = Vec::new();
    for (p, n) in PROMPTS.iter().zip(&lengths) {
        alone.push(stream_completion(MODEL, p, *n).await);
    }
    let distinct: std::collections::HashSet<_> = alone.iter().map(|c| c.text.clone()).collect();
    assert_eq!(
        distinct.len(),
        PROMPTS.len(),
        "the prompts must continue differently"
    );

    let before = daemon().metrics().await;
    let together = join_all(
        PROMPTS
            .iter()
            .zip(&lengths)
            .map(|(p, n)| stream_completion(MODEL, p, *n)),
    )
    .await;
    for ((solo, batched), prompt) in alone.iter().zip(&together).zip(PROMPTS) {
        assert_eq!(batched.text, solo.text, "prompt {prompt:?}");
        assert_eq!(
            batched.completion_tokens, solo.completion_tokens,
            "prompt {prompt:?}"
        );
        assert_eq!(
            batched.finish_reason, solo.finish_reason,
            "prompt {prompt:?}"
        );
    }
    // And they really shared decode steps: more than one token per step on average.
    tokio::time::sleep(Duration::from_millis(1200)).await; // one Stats period
    let after = daemon().metrics().await;
    let steps = metric(&after, "mlxd_worker_batch_steps_total", MODEL)
        - metric(&before, "mlxd_worker_batch_steps_total", MODEL);
    let tokens = metric(&after, "mlxd_worker_batch_tokens_total", MODEL)
        - metric(&before, "mlxd_worker_batch_tokens_total", MODEL);
    assert!(
        steps > 0.0 && tokens / steps > 2.0,
        "mean batch {tokens}/{steps}"
    );
    // /metrics says so too: steps that advanced more than one sequence (the
    // batch-size histogram), and where the engine's time went.
    let bucket = |text: &str, le: &str| {
        metric(
            text,
            "mlxd_worker_batch_size_bucket",
            &format!("{MODEL}\",le=\"{le}"),
        )
    };
    let batched_steps = (bucket(&after, "+Inf") - bucket(&after, "1"))
        - (bucket(&before, "+Inf") - bucket(&before, "1"));
    assert!(batched_steps > 0.0, "no step advanced two sequences");
    assert_eq!(
        bucket(&after, "+Inf") - bucket(&before, "+Inf"),
        steps,
        "every step is in the histogram"
    );
    let part = |text: &str, part: &str| {
        metric(
            text,
            "mlxd_worker_engine_seconds",
            &format!("{MODEL}\",part=\"{part}"),
        )
    };
    for p in ["prefill", "decode", "host"] {
        assert!(part(&after, p) > part(&before, p), "no {p} time counted");
    }
}

/// Dropping one stream mid-generation cancels it in the worker; the others in
/// the same batch finish with exactly the text they get alone.
#[tokio::test]
async fn cancelling_one_stream_leaves_the_batch_intact() {
    let prompts = &PROMPTS[..4];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(stream_completion(MODEL, p, 12).await);
    }
    let cancelled_before = metric(
        &daemon().metrics().await,
        "mlxd_worker_cancelled_total",
        MODEL,
    );
    let victim = async {
        let mut resp = reqwest::Client::new()
            .post(format!("{}/v1/completions", daemon().url))
            .json(&json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "stream": true}))
            .send()
            .await
            .unwrap();
        // Read until the first text arrives, then hang up.
        let mut seen = String::new();
        while !seen.contains("\"text\":\"") || seen.contains("\"text\":\"\"") {
            seen = String::from_utf8_lossy(&resp.chunk().await.unwrap().unwrap()).into_owned();
        }
        drop(resp);
    };
    let others = join_all(prompts.iter().map(|p| stream_completion(MODEL, p, 12)));
    let ((), together) = tokio::join!(victim, others);
    for ((solo, batched), prompt) in alone.iter().zip(&together).zip(prompts) {
        assert_eq!(batched.text, solo.text, "prompt {prompt:?}");
        assert_eq!(batched.completion_tokens, solo.completion_tokens);
    }
    // The worker counted the cancel (its Stats arrive every second).
    let mut cancelled = cancelled_before;
    for _ in 0..50 {
        cancelled = metric(
            &daemon().metrics().await,
            "mlxd_worker_cancelled_total",
            MODEL,
        );
        if cancelled > cancelled_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cancelled, cancelled_before + 1.0);
}

/// With one slot and a queue of one, a third concurrent request is refused at
/// once with 503, Retry-After and an OpenAI-shaped error (and so are Anthropic's
/// and Ollama's, in their shapes); the queued one still completes.
#[tokio::test]
async fn a_full_queue_answers_503() {
    let model = "smollm2-135m-queue";
    let client = reqwest::Client::new();
    let url = format!("{}/v1/completions", daemon().url);
    let body = |n: u32| json!({"model": model, "prompt": "Once upon a time", "max_tokens": n, "stream": true});
    // The first request takes the slot: wait until its first chunk arrives. Long
    // enough that the queue stays full while every dialect is refused.
    let mut first = client.post(&url).json(&body(100)).send().await.unwrap();
    assert_eq!(first.status(), 200);
    first.chunk().await.unwrap();
    // The second waits in the queue.
    let second = tokio::spawn(client.post(&url).json(&body(2)).send());
    let mut queued = 0;
    for _ in 0..100 {
        let (_, ps) = daemon().admin("ps", None).await;
        queued = ps["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["model"] == model)
            .and_then(|w| w["queued"].as_u64())
            .unwrap_or(0);
        if queued == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(queued, 1, "the second request should be queued");
    // The preset's own max_concurrent holds, not the size the worker would choose.
    let (_, ps) = daemon().admin("ps", None).await;
    let slot = ps["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["model"] == model)
        .cloned()
        .unwrap();
    assert_eq!(
        (&slot["max_concurrent"], &slot["max_concurrent_auto"]),
        (&json!(1), &json!(false))
    );
    // The third finds the queue full.
    let third = client.post(&url).json(&body(2)).send().await.unwrap();
    assert_eq!(third.status(), 503);
    assert_eq!(third.headers()["retry-after"], "1");
    let v: Value = third.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_overloaded", "{v}");
    assert_eq!(v["error"]["type"], "server_error");
    common::assert_503_in_every_dialect(&daemon().url, model, "model_overloaded", "at capacity")
        .await;
    // Nothing was lost: the first and the queued second both finish.
    let rest = first.text().await.unwrap();
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.status(), 200);
    assert!(second.text().await.unwrap().ends_with("data: [DONE]\n\n"));
}

/// The replay engine streams its fixed text; under a "4 tokens" flush policy
/// the worker sends fewer TokenBatch frames than it runs steps, and 8 concurrent
/// streams each still get every token of their own length.
#[tokio::test]
async fn replay_streams_and_flush_policy_batches_frames() {
    let model = "replay";
    let solo = stream_completion(model, "hi", 64).await;
    assert!(solo.text.starts_with("Call me Ishmael."), "{:?}", solo.text);
    assert_eq!(solo.completion_tokens, 64);
    let before = daemon().metrics().await;
    let lengths: Vec<u32> = (0..8).map(|i| 16 + 8 * i).collect();
    let together = join_all(lengths.iter().map(|n| stream_completion(model, "hi", *n))).await;
    for (c, n) in together.iter().zip(&lengths) {
        assert_eq!(c.completion_tokens, *n as u64);
        assert_eq!(c.finish_reason, "length");
        assert!(solo.text.starts_with(&c.text) || c.text.starts_with(&solo.text));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = daemon().metrics().await;
    let delta = |name| metric(&after, name, model) - metric(&before, name, model);
    let (steps, frames) = (
        delta("mlxd_worker_batch_steps_total"),
        delta("mlxd_worker_token_frames_total"),
    );
    assert!(
        steps > 0.0 && frames < steps,
        "{frames} frames for {steps} steps"
    );
    // The daemon counted the frames it read, and the doorbell rang for fewer.
    assert!(metric(&after, "mlxd_worker_frames_total", model) > 0.0);
    assert!(
        metric(&after, "mlxd_tokens_total", model) >= lengths.iter().sum::<u32>() as f64 + 64.0
    );
}

/// The loopback-HTTP proxy path (the worker serves SSE, the daemon forwards it)
/// streams the same tokens as the ring path.
#[cfg(feature = "bench-http")]
#[tokio::test]
async fn the_http_proxy_path_streams_the_same_tokens() {
    let over_ring = stream_completion("replay", "hi", 40).await;
    let proxied = stream_completion("replay-http", "hi", 40).await;
    assert_eq!(proxied.text, over_ring.text);
    assert_eq!(proxied.completion_tokens, 40);
    assert_eq!(proxied.finish_reason, "length");
}

/// A stream decoding alone (the fast single-sequence path) hands its KV cache to
/// the batch when a second request arrives mid-generation; neither text changes.
#[tokio::test]
async fn a_lone_stream_joins_the_batch_mid_generation_intact() {
    let (first, second) = (PROMPTS[4], PROMPTS[6]);
    let first_alone = stream_completion(MODEL, first, 16).await;
    let second_alone = stream_completion(MODEL, second, 8).await;
    let mut resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", daemon().url))
        .json(&json!({
            "model": MODEL, "prompt": first, "max_tokens": 16, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap();
    // Wait until the first has produced text, so it is decoding when the second comes.
    // Bytes until the end: a read may end inside a multi-byte character.
    let mut bytes = Vec::new();
    while {
        let body = String::from_utf8_lossy(&bytes);
        !body.contains("\"text\":\"") || body.matches("\"text\":").count() < 2
    } {
        bytes.extend_from_slice(&resp.chunk().await.unwrap().unwrap());
    }
    let second_joined = stream_completion(MODEL, second, 8).await;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        bytes.extend_from_slice(&chunk);
    }
    let first_joined = parse_stream(&String::from_utf8(bytes).unwrap());
    assert_eq!(first_joined.text, first_alone.text);
    assert_eq!(
        first_joined.completion_tokens,
        first_alone.completion_tokens
    );
    assert_eq!(second_joined.text, second_alone.text);
}

/// A client that reads slower than tokens arrive gets them coalesced into fewer,
/// larger SSE chunks, every token still delivered in order.
#[tokio::test]
async fn a_slow_client_gets_coalesced_chunks() {
    let tokens = 20_000;
    let fast = stream_completion("replay", "hi", tokens).await;
    let mut resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", daemon().url))
        .json(&json!({
            "model": "replay", "prompt": "hi", "max_tokens": tokens, "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap();
    // Stall: the socket buffers fill, and tokens pile up behind them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Bytes first: a read may end inside a multi-byte character (the text has "—").
    let mut bytes = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        bytes.extend_from_slice(&chunk);
    }
    let body = String::from_utf8(bytes).unwrap();
    let slow = parse_stream(&body);
    assert_eq!(slow.completion_tokens, tokens as u64);
    assert_eq!(slow.text, fast.text, "every token, in order");
    let events = body.matches("data: ").count();
    assert!(
        events < tokens as usize / 2,
        "{events} SSE chunks for {tokens} tokens"
    );
}

/// A preset without max_concurrent generates as many requests at once as its
/// worker chose for its device (a replay worker standing in for a GPU host that
/// batches 4), and the rest wait in the daemon's queue; every request still gets
/// all its tokens. The daemon's own assumption before the load is 16, so a queue
/// here can only come from the worker's choice.
#[tokio::test]
async fn the_worker_sizes_the_batch_when_the_preset_does_not() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let model = "replay-device-batch";
    stream_completion(model, "hi", 2).await; // loaded and ready
    let done = AtomicBool::new(false);
    let streams = async {
        let out = join_all((0..6).map(|_| stream_completion(model, "hi", 30))).await;
        done.store(true, Ordering::Relaxed);
        out
    };
    let watch = async {
        let (mut most_inflight, mut most_queued, mut slot) = (0, 0, Value::Null);
        while !done.load(Ordering::Relaxed) {
            let (_, ps) = daemon().admin("ps", None).await;
            if let Some(w) = ps["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|w| w["model"] == model)
            {
                most_inflight = most_inflight.max(w["inflight"].as_u64().unwrap_or(0));
                most_queued = most_queued.max(w["queued"].as_u64().unwrap_or(0));
                slot = w.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (most_inflight, most_queued, slot)
    };
    let (finished, (most_inflight, most_queued, slot)) = tokio::join!(streams, watch);
    for c in &finished {
        assert_eq!(
            (c.completion_tokens, c.finish_reason.as_str()),
            (30, "length")
        );
    }
    assert_eq!(
        (&slot["max_concurrent"], &slot["max_concurrent_auto"]),
        (&json!(4), &json!(true))
    );
    assert_eq!(most_inflight, 4, "at most the worker's batch at once");
    assert!(most_queued >= 1, "the rest waited in the daemon's queue");
}
