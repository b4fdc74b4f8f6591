//! Ollama's API: `/api/chat` and `/api/generate` (NDJSON streams by default),
//! `/api/tags`, `/api/ps`, `/api/show`, `/api/version`, in the shapes the
//! official `ollama` client parses. Errors are `{"error": "..."}`.

use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use worker_protocol::frame::{
    ChatMessage, ContentPart, Done, Generate, MessageToolCall, OutputFormat, TokenLogprob, Tool,
    ToolCallFrame,
};

use super::core;
use super::error::{Dialect, OllamaError};
use super::images::{Images, Turn};
use super::request::{self, FieldRule, Target};
use super::AppState;
use crate::error::Error;
use crate::model_files::ModelFiles;
use crate::presets::{KeepAlive, Preset, DEFAULT_MAX_TOKENS};
use crate::supervisor::Phase;

/// The Ollama version whose API this follows (clients gate features on it).
const OLLAMA_API_VERSION: &str = "0.12.0";

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[derive(Debug, Deserialize, Default)]
struct Options {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    num_predict: Option<i64>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    #[serde(default)]
    seed: Option<i64>,
}

/// `options` mlxd honours, those that only tune hardware use (no output
/// differs), and sampling options accepted only at their neutral value.
const OPTION_FIELDS: &[(&str, FieldRule)] = &[
    ("temperature", FieldRule::Served),
    ("top_p", FieldRule::Served),
    ("num_predict", FieldRule::Served),
    ("stop", FieldRule::Served),
    ("seed", FieldRule::Served),
    ("num_ctx", FieldRule::Ignored),
    ("num_batch", FieldRule::Ignored),
    ("num_gpu", FieldRule::Ignored),
    ("main_gpu", FieldRule::Ignored),
    ("num_thread", FieldRule::Ignored),
    ("numa", FieldRule::Ignored),
    ("low_vram", FieldRule::Ignored),
    ("use_mmap", FieldRule::Ignored),
    ("use_mlock", FieldRule::Ignored),
    ("num_keep", FieldRule::Ignored),
    ("top_k", FieldRule::OnlyNeutral(|v| v.as_f64() == Some(0.0))),
    ("min_p", FieldRule::OnlyNeutral(request::is_zero)),
    (
        "typical_p",
        FieldRule::OnlyNeutral(|v| v.as_f64() == Some(1.0)),
    ),
    ("tfs_z", FieldRule::OnlyNeutral(|v| v.as_f64() == Some(1.0))),
    (
        "repeat_penalty",
        FieldRule::OnlyNeutral(|v| v.as_f64() == Some(1.0)),
    ),
    ("presence_penalty", FieldRule::OnlyNeutral(request::is_zero)),
    (
        "frequency_penalty",
        FieldRule::OnlyNeutral(request::is_zero),
    ),
    ("mirostat", FieldRule::OnlyNeutral(request::is_zero)),
    ("repeat_last_n", FieldRule::Ignored),
    ("penalize_newline", FieldRule::Ignored),
];

const SHARED_FIELDS: &[(&str, FieldRule)] = &[
    ("model", FieldRule::Served),
    ("stream", FieldRule::Served),
    ("options", FieldRule::Served),
    ("format", FieldRule::Served),
    ("keep_alive", FieldRule::Served),
    ("logprobs", FieldRule::Served),
    ("top_logprobs", FieldRule::Served),
    ("think", FieldRule::Served),
];

const CHAT_FIELDS: &[(&str, FieldRule)] = &[
    ("messages", FieldRule::Served),
    ("tools", FieldRule::Served),
    // An mlxd extension with OpenAI's values: Ollama has no way to force a call.
    ("tool_choice", FieldRule::Served),
];

const GENERATE_FIELDS: &[(&str, FieldRule)] = &[
    ("prompt", FieldRule::Served),
    ("system", FieldRule::Served),
    ("raw", FieldRule::Served),
    ("suffix", FieldRule::OnlyNeutral(|v| v.as_str() == Some(""))),
    (
        "template",
        FieldRule::OnlyNeutral(|v| v.as_str() == Some("")),
    ),
    ("context", FieldRule::OnlyNeutral(request::is_empty)),
    ("images", FieldRule::Served),
];

#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u8>,
    /// true, false, or a level ("low", "medium", "high") for models that take one.
    #[serde(default)]
    think: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct InFunctionCall {
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct InToolCall {
    function: InFunctionCall,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    #[serde(default)]
    tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    tool_name: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InTool {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    function: InFunction,
}

#[derive(Debug, Deserialize)]
struct InFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    #[serde(default)]
    messages: Vec<InMessage>,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct GenerateRequest {
    #[serde(flatten)]
    common: Common,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    images: Option<Vec<Value>>,
}

impl Common {
    fn generate(&self, preset_max: u32) -> Result<Generate, Error> {
        let options: Options = match &self.options {
            None | Some(Value::Null) => Options::default(),
            Some(Value::Object(map)) => {
                request::check_fields(map, &[OPTION_FIELDS]).map_err(|e| match e {
                    Error::InvalidRequest { message, param } => Error::InvalidRequest {
                        message: format!("options.{message}").replacen("options.'", "option '", 1),
                        param: param.map(|p| format!("options.{p}")),
                    },
                    other => other,
                })?;
                serde_json::from_value(Value::Object(map.clone()))
                    .map_err(|e| Error::invalid(format!("invalid options: {e}"), Some("options")))?
            }
            Some(_) => return Err(Error::invalid("options must be an object", Some("options"))),
        };
        // num_predict: -1 = no limit of the request's own (the preset's applies).
        let max_tokens = match options.num_predict {
            None | Some(-1) | Some(-2) => preset_max,
            Some(n) if n > 0 => u32::try_from(n).unwrap_or(u32::MAX),
            Some(_) => {
                return Err(Error::invalid(
                    "options.num_predict must be positive or -1",
                    Some("options.num_predict"),
                ))
            }
        };
        let mut gen = request::SamplingParams {
            max_tokens,
            temperature: options.temperature,
            top_p: options.top_p,
            stop: options.stop.unwrap_or_default(),
            seed: options.seed.map(|s| s as u64),
        }
        .to_generate()?;
        gen.format = match &self.format {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) if s == "json" => Some(Box::new(OutputFormat::JsonObject)),
            Some(schema @ Value::Object(_)) => Some(Box::new(OutputFormat::JsonSchema {
                schema: schema.clone(),
                strict: false,
            })),
            Some(_) => {
                return Err(Error::invalid(
                    "format must be \"json\" or a JSON schema object",
                    Some("format"),
                ))
            }
        };
        gen.logprobs = request::logprobs_request(self.logprobs, self.top_logprobs)?;
        gen.reasoning = match &self.think {
            None | Some(Value::Null) => None,
            Some(Value::Bool(on)) => request::reasoning(Some(*on), None, None, "think")?,
            Some(Value::String(level)) if level != "none" => {
                request::reasoning(Some(true), Some(level), None, "think")?
            }
            Some(_) => {
                return Err(Error::invalid(
                    "think must be true, false, \"low\", \"medium\" or \"high\"",
                    Some("think"),
                ))
            }
        };
        Ok(gen)
    }

    fn stream(&self) -> bool {
        self.stream.unwrap_or(true)
    }
}

/// A message's or a prompt's `images` (base64) and its text as the core's content
/// and parts: the images first, where Ollama puts them.
fn images_then_text(
    given: Option<Vec<Value>>,
    text: &str,
    images: &mut Images,
    field: &str,
) -> Result<(String, Vec<ContentPart>), Error> {
    let mut turn = Turn::default();
    for image in given.unwrap_or_default() {
        let Value::String(data) = image else {
            return Err(Error::invalid("an image is a base64 string", Some(field)));
        };
        turn.push_image(images.add_base64(&data, field)?);
    }
    turn.push_text(text);
    Ok(turn.finish())
}

/// Ollama's messages as the core's.
fn chat_messages(messages: Vec<InMessage>, images: &mut Images) -> Result<Vec<ChatMessage>, Error> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let text = m.content.as_deref().unwrap_or_default();
            let (content, parts) = images_then_text(m.images, text, images, "messages")?;
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                return Err(Error::invalid(
                    format!("unknown role '{}'", m.role),
                    Some("messages"),
                ));
            }
            let tool_calls = m
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(j, c)| MessageToolCall {
                    // Ollama's history has no call ids: made up, stable per turn.
                    id: format!("call_{i}_{j}"),
                    name: c.function.name,
                    arguments: c.function.arguments.unwrap_or_else(|| json!({})),
                })
                .collect();
            Ok(ChatMessage {
                role: m.role,
                content,
                tool_calls,
                name: m.tool_name,
                reasoning: m.thinking.filter(|t| !t.is_empty()),
                parts,
                ..Default::default()
            })
        })
        .collect()
}

fn tools(tools: Option<Vec<InTool>>) -> Result<Vec<Tool>, Error> {
    tools
        .unwrap_or_default()
        .into_iter()
        .map(|t| match t.kind.as_deref() {
            None | Some("function") => request::tool(
                t.function.name,
                t.function.description,
                t.function.parameters,
            ),
            Some(kind) => Err(Error::invalid(
                format!("tool type '{kind}' is not supported"),
                Some("tools"),
            )),
        })
        .collect()
}

/// Which endpoint: the chunk shapes differ (`message` against `response`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Generate,
}

/// The chat request as the core's Generate, with its stream flag (and the fuzz
/// target's entry). None: no messages, a load or unload request.
fn parse_chat(
    map: serde_json::Map<String, Value>,
    preset_max: u32,
) -> Result<(Common, Option<Generate>), Error> {
    request::check_fields(&map, &[SHARED_FIELDS, CHAT_FIELDS])?;
    let req: ChatRequest = request::from_object(map)?;
    if req.messages.is_empty() {
        return Ok((req.common, None));
    }
    let mut gen = req.common.generate(preset_max)?;
    let mut images = Images::default();
    gen.messages = Some(chat_messages(req.messages, &mut images)?);
    gen.images = images.files;
    gen.tools = tools(req.tools)?;
    gen.tool_choice = request::tool_choice(req.tool_choice, &gen.tools)?;
    request::forced_call_wins(&mut gen);
    Ok((req.common, Some(gen)))
}

fn parse_generate(
    map: serde_json::Map<String, Value>,
    preset_max: u32,
) -> Result<(Common, Option<Generate>), Error> {
    request::check_fields(&map, &[SHARED_FIELDS, GENERATE_FIELDS])?;
    let req: GenerateRequest = request::from_object(map)?;
    let prompt = req.prompt.unwrap_or_default();
    if prompt.is_empty() {
        return Ok((req.common, None));
    }
    let mut gen = req.common.generate(preset_max)?;
    if req.raw {
        if req.system.is_some() {
            return Err(Error::invalid(
                "system cannot be combined with raw",
                Some("system"),
            ));
        }
        if req.images.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(Error::invalid(
                "images cannot be combined with raw (a raw prompt has no place for them)",
                Some("images"),
            ));
        }
        gen.prompt = Some(prompt);
    } else {
        let mut messages = Vec::new();
        if let Some(system) = req.system.filter(|s| !s.is_empty()) {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system,
                ..Default::default()
            });
        }
        let mut images = Images::default();
        let (content, parts) = images_then_text(req.images, &prompt, &mut images, "images")?;
        messages.push(ChatMessage {
            role: "user".into(),
            content,
            parts,
            ..Default::default()
        });
        gen.messages = Some(messages);
        gen.images = images.files;
    }
    Ok((req.common, Some(gen)))
}

/// Fuzz entry: any body ends as an error or a Generate, never a panic.
pub fn fuzz_request(body: &[u8]) {
    if let Ok(map) = request::parse_object(&Bytes::copy_from_slice(body)) {
        let _ = parse_chat(map.clone(), DEFAULT_MAX_TOKENS);
        let _ = parse_generate(map, DEFAULT_MAX_TOKENS);
    }
}

pub async fn chat(State(state): State<AppState>, body: Bytes) -> Result<Response, OllamaError> {
    serve(state, body, Endpoint::Chat).await
}

pub async fn generate(State(state): State<AppState>, body: Bytes) -> Result<Response, OllamaError> {
    serve(state, body, Endpoint::Generate).await
}

async fn serve(state: AppState, body: Bytes, endpoint: Endpoint) -> Result<Response, OllamaError> {
    let began = Instant::now();
    let map = request::parse_object(&body)?;
    let target = Target::required(Target::of_body(&state, &map)?)?;
    let preset_max = target.preset.max_tokens;
    let (common, gen) = match endpoint {
        Endpoint::Chat => parse_chat(map, preset_max)?,
        Endpoint::Generate => parse_generate(map, preset_max)?,
    };
    let keep = request::keep_alive(&common.keep_alive)?;
    let meta = Meta {
        endpoint,
        model: common.model.clone(),
        began,
        logprobs: gen.as_ref().is_some_and(|g| g.logprobs.is_some()),
    };
    let Some(gen) = gen else {
        return load_or_unload(&state, &meta, keep).await;
    };
    let stream = common.stream();
    let started = core::start(
        &state,
        core::CoreRequest {
            target,
            gen,
            keep_alive: keep,
        },
    )
    .await?;
    if stream {
        return Ok(core::stream(
            started,
            OllamaStream { meta },
            core::Framing::NdJson,
        ));
    }
    let c = core::collect(started).await?;
    let mut v = meta.chunk(&c.text, &c.tool_calls);
    if !c.reasoning.is_empty() {
        meta.thinking(&mut v, &c.reasoning);
    }
    if meta.logprobs {
        v["logprobs"] = logprobs_json(&c.logprobs);
    }
    meta.finish(&mut v, &c.done);
    Ok(axum::Json(v).into_response())
}

/// Ollama's way to load (`{"model": m}`) or unload (`keep_alive: 0`) a model.
async fn load_or_unload(
    state: &AppState,
    meta: &Meta,
    keep: Option<KeepAlive>,
) -> Result<Response, OllamaError> {
    let unload = matches!(keep, Some(KeepAlive::For(d)) if d.is_zero());
    if unload {
        state.supervisor.stop(&meta.model).await?;
    } else {
        // keep_alive -1 keeps it loaded until stopped, as a pin does.
        let pin = keep == Some(KeepAlive::Forever);
        state.supervisor.start(&meta.model, pin).await?;
    }
    let mut v = meta.chunk("", &[]);
    v["done"] = json!(true);
    v["done_reason"] = json!(if unload { "unload" } else { "load" });
    Ok(axum::Json(v).into_response())
}

struct Meta {
    endpoint: Endpoint,
    model: String,
    began: Instant,
    logprobs: bool,
}

fn logprobs_json(entries: &[TokenLogprob]) -> Value {
    entries
        .iter()
        .map(|e| {
            let top: Vec<Value> = e
                .top
                .iter()
                .map(|t| json!({"token": t.text, "logprob": t.logprob}))
                .collect();
            json!({"token": e.text, "logprob": e.logprob, "top_logprobs": top})
        })
        .collect()
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Seconds for `tokens` at `rate` tokens/s, in nanoseconds.
fn duration_ns(tokens: u32, rate: f64) -> u64 {
    if rate > 0.0 {
        (f64::from(tokens) / rate * 1e9) as u64
    } else {
        0
    }
}

impl Meta {
    /// A chunk with this text (and tool calls), `done: false`.
    fn chunk(&self, text: &str, calls: &[ToolCallFrame]) -> Value {
        let mut v = json!({"model": self.model, "created_at": now_rfc3339()});
        match self.endpoint {
            Endpoint::Chat => {
                let mut message = json!({"role": "assistant", "content": text});
                if !calls.is_empty() {
                    let calls: Vec<Value> = calls
                        .iter()
                        .map(|c| json!({"function": {"index": c.index, "name": c.name, "arguments": core::arguments_object(c)}}))
                        .collect();
                    message["tool_calls"] = json!(calls);
                }
                v["message"] = message;
            }
            Endpoint::Generate => v["response"] = json!(text),
        }
        v["done"] = json!(false);
        v
    }

    /// Adds a reasoning model's thinking to a chunk, where Ollama puts it.
    fn thinking(&self, v: &mut Value, text: &str) {
        match self.endpoint {
            Endpoint::Chat => v["message"]["thinking"] = json!(text),
            Endpoint::Generate => v["thinking"] = json!(text),
        }
    }

    /// Turns a chunk into the final one: reason, counts and durations.
    fn finish(&self, v: &mut Value, done: &Done) {
        v["done"] = json!(true);
        v["done_reason"] = json!(match done.finish_reason.as_str() {
            "length" => "length",
            _ => "stop",
        });
        v["total_duration"] = json!(nanos(self.began.elapsed()));
        v["load_duration"] = json!(0);
        // As Ollama counts: every prompt token, cached or evaluated (the duration
        // is the evaluation's, which a cached prefix does not take).
        v["prompt_eval_count"] = json!(done.prompt_tokens);
        v["prompt_eval_duration"] = json!(duration_ns(done.prompt_tokens, done.prompt_tps));
        v["eval_count"] = json!(done.completion_tokens);
        v["eval_duration"] = json!(duration_ns(done.completion_tokens, done.generation_tps));
        if self.endpoint == Endpoint::Generate {
            v["context"] = json!([]);
        }
        if let Some(counts) = &done.speculative {
            v["mlxd"] = json!({"speculative": core::speculative_usage(counts)});
        }
    }
}

/// NDJSON: one object per text delta or tool call (`done: false`), then the
/// final object with `done: true` and the counts. An error mid-stream is a
/// line `{"error": "..."}` and no final object.
struct OllamaStream {
    meta: Meta,
}

impl core::Renderer for OllamaStream {
    fn text(&mut self, text: &str, logprobs: Vec<TokenLogprob>, out: &mut Vec<u8>) {
        let mut v = self.meta.chunk(text, &[]);
        if self.meta.logprobs {
            v["logprobs"] = logprobs_json(&logprobs);
        }
        core::ndjson(out, &v);
    }

    fn reasoning(&mut self, text: &str, out: &mut Vec<u8>) {
        let mut v = self.meta.chunk("", &[]);
        self.meta.thinking(&mut v, text);
        core::ndjson(out, &v);
    }

    fn tool_call(&mut self, call: ToolCallFrame, out: &mut Vec<u8>) {
        if self.meta.endpoint == Endpoint::Chat {
            core::ndjson(out, &self.meta.chunk("", std::slice::from_ref(&call)));
        }
    }

    fn done(&mut self, done: Done, logprobs: Vec<TokenLogprob>, out: &mut Vec<u8>) {
        let mut v = self.meta.chunk("", &[]);
        if self.meta.logprobs && !logprobs.is_empty() {
            v["logprobs"] = logprobs_json(&logprobs);
        }
        self.meta.finish(&mut v, &done);
        core::ndjson(out, &v);
    }

    fn error(&mut self, e: &Error, out: &mut Vec<u8>) {
        core::ndjson(out, &Dialect::Ollama.error_body(e));
    }
}

fn details(f: &ModelFiles) -> Value {
    json!({
        "parent_model": "", "format": "mlx", "family": f.family, "families": [f.family],
        "parameter_size": "", "quantization_level": f.quantization,
    })
}

/// A stable digest-like id for a preset (Ollama lists a sha256 per model).
fn digest(preset: &Preset) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    preset.name.hash(&mut h);
    preset.model.hash(&mut h);
    format!("{:016x}", h.finish())
}

pub async fn tags(State(state): State<AppState>) -> axum::Json<Value> {
    let models_dir = state.supervisor.models_dir();
    let modified = now_rfc3339();
    let presets = state.supervisor.presets();
    let mut models: Vec<Value> = presets
        .iter()
        .map(|p| {
            let f = p.model_files(models_dir);
            json!({"name": p.name, "model": p.name, "modified_at": modified, "size": f.size,
                   "digest": digest(p), "details": details(&f)})
        })
        .collect();
    // Peers' models, served there (Ollama's own field for a model run elsewhere).
    let remote = state.peers.remote_models(|m| presets.resolve(m).is_some());
    models.extend(remote.into_iter().map(|(name, _, url)| {
        json!({"name": name, "model": name, "modified_at": modified, "size": 0, "digest": "",
               "remote_host": url, "details": {}})
    }));
    axum::Json(json!({"models": models}))
}

pub async fn ps(State(state): State<AppState>) -> axum::Json<Value> {
    let models_dir = state.supervisor.models_dir();
    let loaded = state.supervisor.ps().await;
    let presets = state.supervisor.presets();
    let models: Vec<Value> = loaded
        .iter()
        .filter(|w| w.state == Phase::Ready)
        .filter_map(|w| {
            let p = presets.resolve(&w.model)?;
            let f = p.model_files(models_dir);
            let expires = match KeepAlive::parse(&w.keep_alive) {
                Ok(KeepAlive::For(d)) if !w.pinned => Some(
                    SystemTime::now()
                        + d.saturating_sub(Duration::from_secs_f64(w.idle_s.max(0.0))),
                ),
                _ => None,
            };
            // "Forever" as Ollama shows it: far in the future.
            let expires = expires
                .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(100 * 365 * 86_400));
            Some(json!({
                "name": w.model, "model": w.model, "size": w.footprint_bytes.max(f.size),
                "digest": digest(p), "details": details(&f),
                "expires_at": humantime::format_rfc3339_seconds(expires).to_string(),
                "size_vram": if w.device.as_deref() == Some("gpu") { w.footprint_bytes } else { 0 },
                "context_length": f.context_length,
            }))
        })
        .collect();
    axum::Json(json!({"models": models}))
}

#[derive(Deserialize)]
struct ShowRequest {
    #[serde(default)]
    model: Option<String>,
    /// Older clients send `name`.
    #[serde(default)]
    name: Option<String>,
}

/// `POST /api/embed`.
#[derive(Deserialize)]
struct EmbedRequest {
    model: String,
    input: request::EmbedInput,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    dimensions: Option<u32>,
    #[serde(default)]
    keep_alive: Option<Value>,
}

/// `POST /api/embeddings` (Ollama's older form: one prompt).
#[derive(Deserialize)]
struct EmbeddingsRequest {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    keep_alive: Option<Value>,
}

/// An embedding's `options` change nothing in its vector (Ollama's sampling and
/// hardware options): accepted as an object and left alone.
fn embed_options(v: &Value) -> bool {
    v.is_object() || v.is_null()
}

const EMBED_FIELDS: &[(&str, FieldRule)] = &[
    ("model", FieldRule::Served),
    ("input", FieldRule::Served),
    ("truncate", FieldRule::Served),
    ("dimensions", FieldRule::Served),
    ("keep_alive", FieldRule::Served),
    ("options", FieldRule::OnlyNeutral(embed_options)),
];

const EMBEDDINGS_FIELDS: &[(&str, FieldRule)] = &[
    ("model", FieldRule::Served),
    ("prompt", FieldRule::Served),
    ("keep_alive", FieldRule::Served),
    ("options", FieldRule::OnlyNeutral(embed_options)),
];

pub async fn embed(State(state): State<AppState>, body: Bytes) -> Result<Response, OllamaError> {
    let (target, req): (Target, EmbedRequest) =
        request::parse_checked(&state, &body, &[EMBED_FIELDS])?;
    // Ollama answers an empty list with no vectors (and loads nothing).
    if matches!(&req.input, request::EmbedInput::Texts(t) if t.is_empty()) {
        return Ok(axum::Json(json!({"model": req.model, "embeddings": []})).into_response());
    }
    // Ollama cuts inputs to the model's context unless told not to.
    let truncate = req.truncate.unwrap_or(true);
    let embed = request::embed_frame(req.input, truncate, req.dimensions, "input")?;
    let out = core::embed(&state, target, embed, &req.keep_alive).await?;
    // A typed struct, not a `json!` tree: f32s written in their shortest form.
    #[derive(serde::Serialize)]
    struct Embedded {
        model: String,
        embeddings: Vec<Vec<f32>>,
        total_duration: u64,
        load_duration: u64,
        prompt_eval_count: u32,
    }
    Ok(axum::Json(Embedded {
        model: req.model,
        embeddings: out.floats()?,
        total_duration: (out.seconds * 1e9) as u64,
        load_duration: 0,
        prompt_eval_count: out.prompt_tokens,
    })
    .into_response())
}

pub async fn embeddings(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, OllamaError> {
    let (target, req): (Target, EmbeddingsRequest) =
        request::parse_checked(&state, &body, &[EMBEDDINGS_FIELDS])?;
    if req.prompt.is_empty() {
        return Ok(axum::Json(json!({"embedding": []})).into_response());
    }
    let embed = request::embed_frame(request::EmbedInput::Text(req.prompt), true, None, "prompt")?;
    let out = core::embed(&state, target, embed, &req.keep_alive).await?;
    #[derive(serde::Serialize)]
    struct Embedding {
        embedding: Vec<f32>,
    }
    let embedding = out.floats()?.into_iter().next().unwrap_or_default();
    Ok(axum::Json(Embedding { embedding }).into_response())
}

pub async fn show(State(state): State<AppState>, body: Bytes) -> Result<Response, OllamaError> {
    let req: ShowRequest = request::from_object(request::parse_object(&body)?)?;
    let name = req.model.or(req.name).unwrap_or_default();
    let presets = state.supervisor.presets();
    let preset = presets
        .resolve(&name)
        .ok_or_else(|| Error::ModelNotFound(name.clone()))?;
    let f = preset.model_files(state.supervisor.models_dir());
    let mut model_info = serde_json::Map::new();
    model_info.insert("general.architecture".into(), json!(f.family));
    if let Some(ctx) = f.context_length {
        model_info.insert(format!("{}.context_length", f.family), json!(ctx));
    }
    for key in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    ] {
        if let Some(v) = f.config.get(key) {
            model_info.insert(format!("{}.{key}", f.family), v.clone());
        }
    }
    let parameters = format!("num_predict {}", preset.max_tokens);
    Ok(axum::Json(json!({
        "modelfile": format!("# mlxd preset {}\nFROM {}\n", preset.name, preset.model),
        "parameters": parameters,
        "template": "",
        "details": details(&f),
        "model_info": model_info,
        "capabilities": ["completion", "tools"],
        "modified_at": now_rfc3339(),
    }))
    .into_response())
}

pub async fn version() -> axum::Json<Value> {
    axum::Json(json!({"version": OLLAMA_API_VERSION, "mlxd": env!("CARGO_PKG_VERSION")}))
}
