//! OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.
//! SSE chunks follow the shapes the official `openai` Python client parses.

use std::convert::Infallible;

use futures::StreamExt;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use worker_protocol::frame::{ChatMessage, Done, DraftCounts, Generate};

use super::{unix_now, AppState};
use crate::error::{Error, Source};
use crate::presets::TransportKind;
use crate::supervisor::{token_text, GenEvent, GenStream, KeepAlive};

/// The OpenAI error shape: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(e: &Error) -> Value {
    let kind = match e.source_of() {
        Source::Client => "invalid_request_error",
        Source::Worker | Source::Daemon => "server_error",
    };
    json!({"error": {"message": e.to_string(), "type": kind, "param": e.param(), "code": e.code()}})
}

pub struct ApiError(pub Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0.status(), axum::Json(error_body(&self.0))).into_response();
        if self.0.status() == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

/// Parses a JSON body into `T`, with OpenAI-shaped 400s for bad JSON or fields.
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Error> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Error::invalid(
            format!("could not parse the JSON body of the request: {e}"),
            None,
        )
    })?;
    if !value.is_object() {
        return Err(Error::invalid(
            "the request body must be a JSON object",
            None,
        ));
    }
    serde_json::from_value(value).map_err(|e| Error::invalid(format!("invalid request: {e}"), None))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields shared by both generation endpoints.
#[derive(Debug, Deserialize)]
struct Sampling {
    model: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// How long the model stays loaded after this request (Ollama's field):
    /// "5m", "0", "-1" or a number of seconds.
    #[serde(default)]
    keep_alive: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<InMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: PromptInput,
    #[serde(flatten)]
    sampling: Sampling,
}

/// Stop sequences per request, and the longest one (the worker holds back this
/// much text while it checks for them).
const MAX_STOPS: usize = 4;
const MAX_STOP_LEN: usize = 256;

/// Largest max_tokens accepted; the worker also refuses prompts past the context.
const MAX_TOKENS_LIMIT: u32 = 131_072;

impl Sampling {
    fn to_generate(&self, default_max_tokens: u32) -> Result<Generate, Error> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(Error::invalid("only n = 1 is supported", Some("n")));
            }
        }
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(default_max_tokens);
        if max_tokens == 0 || max_tokens > MAX_TOKENS_LIMIT {
            return Err(Error::invalid(
                format!("max_tokens must be between 1 and {MAX_TOKENS_LIMIT}"),
                Some("max_tokens"),
            ));
        }
        let temperature = self.temperature.unwrap_or(0.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(Error::invalid(
                "temperature must be between 0 and 2",
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::invalid("top_p must be in (0, 1]", Some("top_p")));
        }
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() <= MAX_STOPS => v.clone(),
            Some(Stop::Many(_)) => {
                return Err(Error::invalid(
                    format!("at most {MAX_STOPS} stop sequences"),
                    Some("stop"),
                ))
            }
        };
        if stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
            return Err(Error::invalid(
                format!("each stop sequence must be 1 to {MAX_STOP_LEN} bytes"),
                Some("stop"),
            ));
        }
        Ok(Generate {
            id: 0,
            messages: None,
            prompt: None,
            max_tokens,
            temperature,
            top_p,
            stop,
            seed: self.seed,
            ..Default::default()
        })
    }

    fn keep_alive(&self) -> Result<Option<KeepAlive>, Error> {
        let parsed = match &self.keep_alive {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => KeepAlive::parse(s),
            Some(Value::Number(n)) => KeepAlive::from_seconds(n.as_f64().unwrap_or(f64::NAN)),
            Some(_) => Err("keep_alive must be a duration string or a number of seconds".into()),
        };
        parsed
            .map(Some)
            .map_err(|e| Error::invalid(e, Some("keep_alive")))
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

fn chat_messages(messages: Vec<InMessage>) -> Result<Vec<ChatMessage>, Error> {
    if messages.is_empty() {
        return Err(Error::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    messages
        .into_iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "developer" => "system".to_string(),
                "system" | "user" | "assistant" | "tool" => m.role,
                other => {
                    return Err(Error::invalid(
                        format!("unknown role '{other}'"),
                        Some("messages"),
                    ))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(Error::invalid(
                                    format!("content part type '{kind}' is not supported"),
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role,
                content,
                ..Default::default()
            })
        })
        .collect()
}

fn usage(d: &Done) -> Value {
    let mut u = json!({
        "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.completion_tokens,
        "total_tokens": d.prompt_tokens + d.completion_tokens,
    });
    if let Some(counts) = &d.speculative {
        u["mlxd"] = speculative_usage(counts);
    }
    u
}

/// A request's draft counters as every dialect reports them (`usage.mlxd`).
pub fn speculative_usage(c: &DraftCounts) -> Value {
    json!({
        "draft_tokens": c.drafted,
        "accepted_tokens": c.accepted,
        "rejected_tokens": c.rejected,
        "acceptance_ratio": (c.acceptance() * 1e4).round() / 1e4,
    })
}

fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}-{:x}{:04x}",
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

/// Which endpoint a response is for: the shapes differ, the flow does not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Chat,
    Completion,
}

struct Meta {
    dialect: Dialect,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

impl Meta {
    fn chunk(&self, delta_or_text: Value, finish: Option<&str>) -> Value {
        let choice = match self.dialect {
            Dialect::Chat => {
                json!({"index": 0, "delta": delta_or_text, "logprobs": null, "finish_reason": finish})
            }
            Dialect::Completion => {
                json!({"index": 0, "text": delta_or_text, "logprobs": null, "finish_reason": finish})
            }
        };
        let mut c = json!({
            "id": self.id,
            "object": if self.dialect == Dialect::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn text_piece(&self, text: &str) -> Value {
        match self.dialect {
            Dialect::Chat => json!({"content": text}),
            Dialect::Completion => json!(text),
        }
    }

    fn full(&self, text: String, done: &Done) -> Value {
        let choice = match self.dialect {
            Dialect::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": done.finish_reason,
            }),
            Dialect::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": done.finish_reason})
            }
        };
        json!({
            "id": self.id,
            "object": if self.dialect == Dialect::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(done),
        })
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

async fn run(
    state: AppState,
    sampling: Sampling,
    gen: Generate,
    dialect: Dialect,
) -> Result<Response, ApiError> {
    let keep_alive = sampling.keep_alive()?;
    let meta = Meta {
        dialect,
        id: new_id(if dialect == Dialect::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        model: sampling.model.clone(),
        created: unix_now(),
        include_usage: sampling.include_usage(),
    };
    let preset = state
        .supervisor
        .presets()
        .resolve(&sampling.model)
        .ok_or_else(|| Error::ModelNotFound(sampling.model.clone()))?;
    if preset.transport == TransportKind::Http {
        return proxy(&state, &meta, sampling.stream, gen, keep_alive).await;
    }
    let mut stream = state
        .supervisor
        .generate(&sampling.model, gen, keep_alive)?;
    // Nothing is sent before the worker's first event: a request refused, or one
    // whose worker dies before starting it, still gets a plain HTTP error status.
    let first = match stream.next().await {
        Some(GenEvent::Error(e)) => return Err(e.into()),
        Some(ev) => ev,
        None => return Err(Error::Internal("generation ended without a result".into()).into()),
    };
    if sampling.stream {
        Ok(stream_response(meta, first, stream))
    } else {
        collect_response(meta, first, stream).await
    }
}

/// The `http` transport: forward the request to the worker's own HTTP server on
/// loopback and stream its response back unchanged, as llama-swap and Ollama do.
/// Kept for the benchmark that measures what the rings save.
async fn proxy(
    state: &AppState,
    meta: &Meta,
    stream: bool,
    gen: Generate,
    keep_alive: Option<KeepAlive>,
) -> Result<Response, ApiError> {
    let lease = state.supervisor.lease(&meta.model, keep_alive).await?;
    let mut body = serde_json::to_value(&gen).map_err(|e| Error::Internal(e.to_string()))?;
    body["chunk_id"] = json!(meta.id);
    body["model"] = json!(meta.model);
    body["created"] = json!(meta.created);
    body["chat"] = json!(meta.dialect == Dialect::Chat);
    body["include_usage"] = json!(meta.include_usage);
    body["stream"] = json!(stream);
    let upstream = state
        .http
        .post(format!("http://127.0.0.1:{}/generate", lease.port))
        .json(&body)
        .send()
        .await
        .map_err(|e| Error::WorkerFailed {
            model: meta.model.clone(),
            reason: e.to_string(),
        })?;
    let status = upstream.status().as_u16();
    let content_type = upstream
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(header::HeaderValue::from_static("application/json"));
    // The lease is held until the body is fully forwarded (or the client leaves).
    let body = upstream.bytes_stream().map(move |chunk| {
        let _held = &lease;
        chunk
    });
    Ok(Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(body))
        .expect("valid response parts"))
}

async fn collect_response(
    meta: Meta,
    first: GenEvent,
    mut stream: GenStream,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut held = Some(first);
    loop {
        let ev = match held.take() {
            Some(ev) => ev,
            None => match stream.next().await {
                Some(ev) => ev,
                None => break,
            },
        };
        match ev {
            GenEvent::Token { text: t, .. } => text.push_str(token_text(&t)),
            GenEvent::Done(done) => return Ok(axum::Json(meta.full(text, &done)).into_response()),
            GenEvent::Error(e) => return Err(e.into()),
        }
    }
    Err(Error::Internal("generation ended without a result".into()).into())
}

/// The bytes of a text chunk around its JSON-string text, rendered once per
/// request: a token then costs one small buffer, not a JSON tree.
struct TextChunkFrame {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl TextChunkFrame {
    fn new(meta: &Meta) -> TextChunkFrame {
        // U+0001 renders as the escape below and cannot occur in the fixed parts.
        const MARK: &str = "\"\\u0001\"";
        let full = sse(&meta.chunk(meta.text_piece("\u{1}"), None));
        let full = std::str::from_utf8(&full).expect("JSON is UTF-8");
        let at = full.find(MARK).expect("the marker is rendered");
        TextChunkFrame {
            head: full.as_bytes()[..at].to_vec(),
            tail: full.as_bytes()[at + MARK.len()..].to_vec(),
        }
    }

    fn render(&self, text: &str) -> Bytes {
        let mut out = Vec::with_capacity(self.head.len() + self.tail.len() + text.len() + 8);
        out.extend_from_slice(&self.head);
        serde_json::to_writer(&mut out, text).expect("a str always serializes");
        out.extend_from_slice(&self.tail);
        Bytes::from(out)
    }
}

/// SSE: a role chunk, one chunk per text delta, a finish chunk, an optional usage
/// chunk, then `[DONE]`. An error mid-stream is sent as `data: {"error": ...}` and
/// the stream ends without `[DONE]`. A client that goes away cancels the generation
/// (hyper drops the body, and with it the `GenStream`).
///
/// The body polls the generation directly: a token wakes the connection's own task,
/// which renders and writes it (no task or channel in between). Coalescing: hyper
/// polls the body only when it can write, so tokens that arrive while a slow
/// client's socket is full wait in the stream and leave together in one chunk.
fn stream_response(meta: Meta, first_event: GenEvent, stream: GenStream) -> Response {
    struct Sse {
        meta: Meta,
        frame: TextChunkFrame,
        stream: GenStream,
        first: Option<Bytes>,
        held: Option<GenEvent>,
        ended: bool,
    }
    let first = (meta.dialect == Dialect::Chat)
        .then(|| sse(&meta.chunk(json!({"role": "assistant", "content": ""}), None)));
    let state = Sse {
        frame: TextChunkFrame::new(&meta),
        meta,
        stream,
        first,
        held: Some(first_event),
        ended: false,
    };
    let body = futures::stream::unfold(state, |mut st| async move {
        if let Some(first) = st.first.take() {
            return Some((Ok::<_, Infallible>(first), st));
        }
        while !st.ended {
            let ev = match st.held.take() {
                Some(ev) => ev,
                None => st.stream.next().await?,
            };
            let out = match ev {
                GenEvent::Token { text, .. } => {
                    let mut joined: Option<String> = None;
                    while let Some(more) = st.stream.try_next() {
                        match more {
                            GenEvent::Token { text: t, .. } => joined
                                .get_or_insert_with(|| token_text(&text).to_owned())
                                .push_str(token_text(&t)),
                            other => {
                                st.held = Some(other);
                                break;
                            }
                        }
                    }
                    let text = joined.as_deref().unwrap_or(token_text(&text));
                    if text.is_empty() {
                        continue;
                    }
                    st.frame.render(text)
                }
                GenEvent::Done(done) => {
                    st.ended = true;
                    let meta = &st.meta;
                    let empty = if meta.dialect == Dialect::Chat {
                        json!({})
                    } else {
                        json!("")
                    };
                    let mut tail = sse(&meta.chunk(empty, Some(&done.finish_reason))).to_vec();
                    if meta.include_usage {
                        let mut u = meta.chunk(Value::Null, None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(&done);
                        tail.extend_from_slice(&sse(&u));
                    }
                    tail.extend_from_slice(b"data: [DONE]\n\n");
                    Bytes::from(tail)
                }
                GenEvent::Error(e) => {
                    st.ended = true;
                    sse(&error_body(&e))
                }
            };
            return Some((Ok(out), st));
        }
        None
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .expect("static headers are valid")
}

/// Fuzz target (`fuzz/` and tests/fuzz_requests.rs): any body sent to either
/// generation endpoint ends as a 400 or a well-formed Generate, never a panic.
pub fn fuzz_request(body: &[u8]) {
    let body = Bytes::copy_from_slice(body);
    if let Ok(req) = parse::<ChatRequest>(&body) {
        if let Ok(gen) = req.sampling.to_generate(512) {
            assert!((1..=MAX_TOKENS_LIMIT).contains(&gen.max_tokens));
            assert!(gen.stop.len() <= 4 && gen.top_p > 0.0 && gen.top_p <= 1.0);
        }
        let _ = req.sampling.keep_alive();
        let _ = chat_messages(req.messages);
    }
    if let Ok(req) = parse::<CompletionRequest>(&body) {
        let _ = req.sampling.to_generate(512);
        let _ = req.sampling.keep_alive();
    }
}

pub async fn chat_completions(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(&body)?;
    let preset_max = default_max_tokens(&state, &req.sampling.model)?;
    let mut gen = req.sampling.to_generate(preset_max)?;
    gen.messages = Some(chat_messages(req.messages)?);
    run(state, req.sampling, gen, Dialect::Chat).await
}

pub async fn completions(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    let preset_max = default_max_tokens(&state, &req.sampling.model)?;
    let mut gen = req.sampling.to_generate(preset_max)?;
    gen.prompt = Some(match req.prompt {
        PromptInput::One(p) => p,
        PromptInput::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptInput::Many(_) => {
            return Err(
                Error::invalid("only one prompt per request is supported", Some("prompt")).into(),
            )
        }
    });
    run(state, req.sampling, gen, Dialect::Completion).await
}

fn default_max_tokens(state: &AppState, model: &str) -> Result<u32, Error> {
    state
        .supervisor
        .presets()
        .resolve(model)
        .map(|p| p.max_tokens)
        .ok_or_else(|| Error::ModelNotFound(model.to_string()))
}

pub async fn models(State(state): State<AppState>) -> axum::Json<Value> {
    let created = unix_now();
    let loaded = state.supervisor.ps().await;
    let data: Vec<Value> = state
        .supervisor
        .presets()
        .iter()
        .map(|p| {
            let mut m =
                json!({"id": p.name, "object": "model", "created": created, "owned_by": "mlxd"});
            if let Some(spec) = &p.speculative {
                // What the worker says once loaded; the preset's word before that.
                let status = loaded
                    .iter()
                    .find(|w| w.model == p.name)
                    .and_then(|w| w.stats.speculative.as_ref());
                m["mlxd"] = json!({"speculative": match status {
                    Some(s) => json!({
                        "draft": s.draft, "mode": s.mode, "active": s.active, "reason": s.reason,
                        "num_draft_tokens": s.num_draft_tokens, "acceptance_ratio": s.acceptance,
                    }),
                    None => json!({
                        "draft": spec.draft, "mode": spec.mode.as_str(), "active": null,
                        "reason": "not loaded", "num_draft_tokens": spec.num_draft_tokens,
                    }),
                }});
            }
            m
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data}))
}
