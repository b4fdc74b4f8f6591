//! The OpenAI-compatible API through a Rust HTTP client, against a real daemon,
//! real workers and the real SmolLM2-135M, over shm and over stdio.

mod common;

use common::daemon;
use serde_json::{json, Value};

const SHM_MODEL: &str = "smollm2-135m";
const STDIO_MODEL: &str = "smollm2-135m-stdio";

fn paris_request(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

async fn chat(body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", daemon().url))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn non_streamed_answer_names_paris(model: &str) {
    let resp = chat(paris_request(model, false)).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], model);
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "answer: {content:?}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion));
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
}

/// Parses an SSE body into its `data:` payloads.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

async fn streamed_answer_names_paris(model: &str) {
    let resp = chat(paris_request(model, true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.unwrap();
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.contains("Paris"), "streamed text: {text:?}");
    let finish: Vec<_> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish.len(), 1, "exactly one chunk finishes");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert!(usage_chunk["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
}

#[tokio::test]
async fn chat_over_shm_non_streamed() {
    non_streamed_answer_names_paris(SHM_MODEL).await;
}

#[tokio::test]
async fn chat_over_shm_streamed() {
    streamed_answer_names_paris(SHM_MODEL).await;
}

#[tokio::test]
async fn chat_over_stdio_non_streamed() {
    non_streamed_answer_names_paris(STDIO_MODEL).await;
}

#[tokio::test]
async fn chat_over_stdio_streamed() {
    streamed_answer_names_paris(STDIO_MODEL).await;
}

#[tokio::test]
async fn completions_continue_a_raw_prompt() {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", daemon().url))
        .json(&json!({"model": SHM_MODEL, "prompt": "The capital of France is", "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "continuation: {text:?}");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_the_daemon_keeps_serving() {
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", daemon().url);
    let long_stop = format!(
        r#"{{"model": "smollm2-135m", "messages": [{{"role": "user", "content": "hi"}}], "stop": ["{}"]}}"#,
        "x".repeat(300)
    );
    let long_prompt = format!(
        r#"{{"model": "smollm2-135m", "messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "word ".repeat(9000)
    );
    let cases: [(&str, u16, &str, &str); 6] = [
        ("{not json", 400, "invalid_request_error", "JSON"),
        (
            r#"{"model": "smollm2-135m"}"#,
            400,
            "invalid_request_error",
            "messages",
        ),
        (
            r#"{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}"#,
            404,
            "invalid_request_error",
            "no-such-model",
        ),
        (
            r#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}"#,
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        // A prompt past the model's context (8192 for SmolLM2), in the wording
        // clients look for (a max_tokens past it is clamped: below).
        (
            &long_prompt,
            400,
            "invalid_request_error",
            "tokens > 8191 maximum",
        ),
        (&long_stop, 400, "invalid_request_error", "stop sequence"),
    ];
    for (body, status, kind, mentions) in cases {
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], kind, "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(mentions),
            "{message:?} should mention {mentions}"
        );
        // OpenAI's code for a prompt past the context, which its clients match.
        if body == long_prompt.as_str() {
            assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
        }
    }
    // Still serving, and still generating; a max_tokens past the context is
    // clamped to what is left, not refused (the space stop keeps it short).
    let resp = chat(json!({
        "model": SHM_MODEL,
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 9000,
        "stop": [" "],
    }))
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn models_lists_presets_and_healthz_answers() {
    let v = common::get_json(&format!("{}/v1/models", daemon().url)).await;
    let ids: Vec<_> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert!(
        ids.contains(&json!(SHM_MODEL)) && ids.contains(&json!(STDIO_MODEL)),
        "{ids:?}"
    );
    // Each model's context, loaded or not (clients size requests by it).
    let shm = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == SHM_MODEL)
        .unwrap();
    assert_eq!(shm["context_length"], 8192, "{shm}");
    let health = common::get_json(&format!("{}/healthz", daemon().url)).await;
    assert_eq!(health["status"], "ok");
}
