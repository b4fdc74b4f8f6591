//! OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.
//! SSE chunks follow the shapes the official `openai` Python client parses.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use worker_protocol::frame::{
    ChatMessage, ContentPart as WireContentPart, Done, Generate, MessageToolCall, OutputFormat,
    TokenLogprob, Tool, ToolCallFrame,
};

use super::core;
use super::error::{ApiError, Dialect};
use super::images::{Images, Turn};
use super::request::{self, FieldRule, Target};
use super::{unix_now, AppState};
use crate::error::Error;
#[cfg(feature = "bench-http")]
use crate::presets::TransportKind;
use crate::presets::{KeepAlive, DEFAULT_MAX_TOKENS};

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
    #[serde(default)]
    image_url: Option<ImageUrl>,
}

/// `{"url": "data:...", "detail": "auto"}`, or the URL alone as some clients send it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ImageUrl {
    Object { url: String },
    Url(String),
}

#[derive(Debug, Deserialize)]
struct InToolCall {
    id: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    function: InFunctionCall,
}

#[derive(Debug, Deserialize)]
struct InFunctionCall {
    name: String,
    /// JSON text, as OpenAI sends it.
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    /// An assistant turn's thinking, as this API returned it (some clients
    /// send it back under the shorter name).
    #[serde(default, alias = "reasoning")]
    reasoning_content: Option<String>,
}

/// `chat_template_kwargs` (vLLM's and SGLang's field): only the thinking switch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateKwargs {
    #[serde(default)]
    enable_thinking: Option<bool>,
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
struct InTool {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    function: Option<InFunction>,
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
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
struct JsonSchemaFormat {
    #[serde(default)]
    schema: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<InMessage>,
    #[serde(flatten)]
    sampling: Sampling,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u8>,
    #[serde(default)]
    reasoning_effort: Option<String>,
    /// mlxd's thinking budget: the worker ends the thinking section after this
    /// many tokens.
    #[serde(default)]
    max_reasoning_tokens: Option<u32>,
    #[serde(default)]
    chat_template_kwargs: Option<TemplateKwargs>,
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
    /// The legacy form: how many alternatives per token (0..=5).
    #[serde(default)]
    logprobs: Option<u8>,
}

/// Fields both endpoints take, and how.
const SHARED_FIELDS: &[(&str, FieldRule)] = &[
    ("model", FieldRule::Served),
    ("max_tokens", FieldRule::Served),
    ("temperature", FieldRule::Served),
    ("top_p", FieldRule::Served),
    ("stop", FieldRule::Served),
    ("seed", FieldRule::Served),
    ("n", FieldRule::Served),
    ("stream", FieldRule::Served),
    ("stream_options", FieldRule::Served),
    ("keep_alive", FieldRule::Served),
    ("logprobs", FieldRule::Served),
    ("user", FieldRule::Ignored),
    (
        "frequency_penalty",
        FieldRule::OnlyNeutral(request::is_zero),
    ),
    ("presence_penalty", FieldRule::OnlyNeutral(request::is_zero)),
    ("logit_bias", FieldRule::OnlyNeutral(request::is_empty)),
];

const CHAT_FIELDS: &[(&str, FieldRule)] = &[
    ("messages", FieldRule::Served),
    ("max_completion_tokens", FieldRule::Served),
    ("tools", FieldRule::Served),
    ("tool_choice", FieldRule::Served),
    ("response_format", FieldRule::Served),
    ("top_logprobs", FieldRule::Served),
    ("reasoning_effort", FieldRule::Served),
    ("max_reasoning_tokens", FieldRule::Served),
    ("chat_template_kwargs", FieldRule::Served),
    // Several calls in one answer are parsed either way.
    ("parallel_tool_calls", FieldRule::Ignored),
    ("metadata", FieldRule::Ignored),
    ("store", FieldRule::Ignored),
    ("service_tier", FieldRule::Ignored),
];

const COMPLETION_FIELDS: &[(&str, FieldRule)] = &[
    ("prompt", FieldRule::Served),
    ("echo", FieldRule::OnlyNeutral(|v| v == &Value::Bool(false))),
    ("best_of", FieldRule::OnlyNeutral(|v| v.as_u64() == Some(1))),
    ("suffix", FieldRule::OnlyNeutral(|v| v.as_str() == Some(""))),
];

impl Sampling {
    fn to_generate(&self, default_max_tokens: u32) -> Result<Generate, Error> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(Error::invalid("only n = 1 is supported", Some("n")));
            }
        }
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        request::SamplingParams {
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(default_max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            stop,
            seed: self.seed,
        }
        .to_generate()
    }

    fn keep_alive(&self) -> Result<Option<KeepAlive>, Error> {
        request::keep_alive(&self.keep_alive)
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// A message's content: its text, and its parts in order when it has images
/// (`image_url` parts, added to `images`); other part types are refused by name.
fn content_turn(
    content: Option<Content>,
    images: &mut Images,
) -> Result<(String, Vec<WireContentPart>), Error> {
    let mut turn = Turn::default();
    match content {
        None => {}
        Some(Content::Text(t)) => turn.push_text(&t),
        Some(Content::Parts(parts)) => {
            for p in parts {
                match (p.kind.as_str(), p.text, p.image_url) {
                    ("text", Some(t), _) => turn.push_text(&t),
                    ("image_url", _, Some(ImageUrl::Object { url } | ImageUrl::Url(url))) => {
                        turn.push_image(images.add_url(&url, "messages")?)
                    }
                    (kind, _, _) => {
                        return Err(Error::invalid(
                            format!("content part type '{kind}' is not supported"),
                            Some("messages"),
                        ))
                    }
                }
            }
        }
    }
    Ok(turn.finish())
}

fn chat_messages(messages: Vec<InMessage>, images: &mut Images) -> Result<Vec<ChatMessage>, Error> {
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
            if role == "tool" && m.tool_call_id.is_none() {
                return Err(Error::invalid(
                    "a message with role 'tool' needs its tool_call_id",
                    Some("messages"),
                ));
            }
            let tool_calls = m
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .map(|c| {
                    if c.kind.as_deref().is_some_and(|k| k != "function") {
                        return Err(Error::invalid(
                            "only function tool calls are supported",
                            Some("messages"),
                        ));
                    }
                    let text = c.function.arguments.unwrap_or_else(|| "{}".into());
                    // Arguments the model once wrote as broken JSON stay as text.
                    let arguments = serde_json::from_str(&text).unwrap_or(Value::String(text));
                    Ok(MessageToolCall {
                        id: c.id,
                        name: c.function.name,
                        arguments,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            let (content, parts) = content_turn(m.content, images)?;
            Ok(ChatMessage {
                role,
                content,
                tool_calls,
                tool_call_id: m.tool_call_id,
                name: m.name,
                reasoning: m.reasoning_content.filter(|r| !r.is_empty()),
                parts,
            })
        })
        .collect()
}

fn tools(tools: Option<Vec<InTool>>) -> Result<Vec<Tool>, Error> {
    tools
        .unwrap_or_default()
        .into_iter()
        .map(|t| match (t.kind.as_str(), t.function) {
            ("function", Some(f)) => request::tool(f.name, f.description, f.parameters),
            ("function", None) => Err(Error::invalid(
                "a function tool needs its 'function'",
                Some("tools"),
            )),
            (kind, _) => Err(Error::invalid(
                format!("tool type '{kind}' is not supported (only 'function')"),
                Some("tools"),
            )),
        })
        .collect()
}

fn output_format(f: Option<ResponseFormat>) -> Result<Option<OutputFormat>, Error> {
    let Some(f) = f else { return Ok(None) };
    match f.kind.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some(OutputFormat::JsonObject)),
        "json_schema" => match f.json_schema {
            Some(JsonSchemaFormat {
                schema: Some(schema),
                strict,
            }) if schema.is_object() => Ok(Some(OutputFormat::JsonSchema {
                schema,
                strict: strict.unwrap_or(false),
            })),
            _ => Err(Error::invalid(
                "response_format json_schema needs json_schema.schema, a JSON schema object",
                Some("response_format"),
            )),
        },
        other => Err(Error::invalid(
            format!("response_format type '{other}' is not supported"),
            Some("response_format"),
        )),
    }
}

fn usage(d: &Done) -> Value {
    let mut u = json!({
        "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.completion_tokens,
        "total_tokens": d.prompt_tokens + d.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": d.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": d.reasoning_tokens},
    });
    if let Some(counts) = &d.speculative {
        u["mlxd"] = core::speculative_usage(counts);
    }
    u
}

/// Which endpoint a response is for: the shapes differ, the flow does not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

struct Meta {
    dialect: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// Alternatives per token when logprobs were asked for.
    logprobs: Option<u8>,
}

/// OpenAI's `bytes` of a token: its UTF-8 encoding.
fn token_bytes(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// Chat logprobs: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
fn chat_logprobs(entries: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let top: Vec<Value> = e
                .top
                .iter()
                .map(|t| json!({"token": t.text, "logprob": t.logprob, "bytes": token_bytes(&t.text)}))
                .collect();
            json!({"token": e.text, "logprob": e.logprob, "bytes": token_bytes(&e.text), "top_logprobs": top})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions' legacy logprobs: parallel arrays, offsets into the text.
fn completion_logprobs(entries: &[TokenLogprob], offset: &mut usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    for e in entries {
        tokens.push(json!(e.text));
        token_logprobs.push(json!(e.logprob));
        let top: serde_json::Map<String, Value> = e
            .top
            .iter()
            .map(|t| (t.text.clone(), json!(t.logprob)))
            .collect();
        top_logprobs.push(Value::Object(top));
        text_offset.push(json!(*offset));
        *offset += e.text.len();
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset})
}

fn tool_call_json(call: &ToolCallFrame, with_index: bool) -> Value {
    let mut v = json!({
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    });
    if with_index {
        v["index"] = json!(call.index);
    }
    v
}

impl Meta {
    fn chunk(&self, delta_or_text: Value, finish: Option<&str>) -> Value {
        let choice = match self.dialect {
            Kind::Chat => {
                json!({"index": 0, "delta": delta_or_text, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": delta_or_text, "logprobs": null, "finish_reason": finish})
            }
        };
        let mut c = json!({
            "id": self.id,
            "object": if self.dialect == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
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
            Kind::Chat => json!({"content": text}),
            Kind::Completion => json!(text),
        }
    }

    fn logprobs_json(&self, entries: &[TokenLogprob], offset: &mut usize) -> Value {
        match (self.logprobs, self.dialect) {
            (None, _) => Value::Null,
            (Some(_), Kind::Chat) => chat_logprobs(entries),
            (Some(_), Kind::Completion) => completion_logprobs(entries, offset),
        }
    }

    fn full(&self, c: core::Collected) -> Value {
        let finish = &c.done.finish_reason;
        let logprobs = self.logprobs_json(&c.logprobs, &mut 0);
        let choice = match self.dialect {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": c.text});
                if !c.reasoning.is_empty() {
                    message["reasoning_content"] = json!(c.reasoning);
                }
                if !c.tool_calls.is_empty() {
                    if c.text.is_empty() {
                        message["content"] = Value::Null;
                    }
                    message["tool_calls"] = c
                        .tool_calls
                        .iter()
                        .map(|t| tool_call_json(t, false))
                        .collect();
                }
                json!({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                // A raw prompt's output is never split (only chat turns are).
                json!({"index": 0, "text": c.reasoning + &c.text, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": if self.dialect == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(&c.done),
        })
    }
}

fn sse(v: &Value) -> Bytes {
    let mut out = Vec::new();
    core::sse_data(&mut out, v);
    Bytes::from(out)
}

async fn run(
    state: AppState,
    target: Target,
    sampling: Sampling,
    gen: Generate,
    dialect: Kind,
) -> Result<Response, ApiError> {
    let keep_alive = sampling.keep_alive()?;
    let meta = Meta {
        dialect,
        id: core::new_id(if dialect == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        model: sampling.model.clone(),
        created: unix_now(),
        include_usage: sampling.include_usage(),
        logprobs: gen.logprobs,
    };
    #[cfg(feature = "bench-http")]
    if target.preset.transport == TransportKind::Http && super::http_proxy::is_plain(&gen) {
        let shape = super::http_proxy::Shape {
            id: &meta.id,
            model: &meta.model,
            created: meta.created,
            chat: meta.dialect == Kind::Chat,
            include_usage: meta.include_usage,
            stream: sampling.stream,
        };
        return Ok(super::http_proxy::forward(&state, &target, shape, gen, keep_alive).await?);
    }
    let req = core::CoreRequest {
        target,
        gen,
        keep_alive,
    };
    let started = core::start(&state, req).await?;
    if sampling.stream {
        Ok(core::stream(
            started,
            OpenAiStream::new(meta),
            core::Framing::Sse,
        ))
    } else {
        let collected = core::collect(started).await?;
        Ok(axum::Json(meta.full(collected)).into_response())
    }
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

    fn render(&self, text: &str, out: &mut Vec<u8>) {
        out.reserve(self.head.len() + self.tail.len() + text.len() + 8);
        out.extend_from_slice(&self.head);
        serde_json::to_writer(&mut *out, text).expect("a str always serializes");
        out.extend_from_slice(&self.tail);
    }
}

/// SSE: a role chunk, one chunk per text delta (tool calls as `tool_calls`
/// deltas with their `index`), a finish chunk, an optional usage chunk, then
/// `[DONE]`. An error mid-stream is sent as `data: {"error": ...}` and the
/// stream ends without `[DONE]`.
struct OpenAiStream {
    meta: Meta,
    frame: TextChunkFrame,
    /// Bytes of text sent so far (completions' logprobs text_offset).
    offset: usize,
}

impl OpenAiStream {
    fn new(meta: Meta) -> OpenAiStream {
        OpenAiStream {
            frame: TextChunkFrame::new(&meta),
            meta,
            offset: 0,
        }
    }
}

impl core::Renderer for OpenAiStream {
    fn open(&mut self, out: &mut Vec<u8>) {
        if self.meta.dialect == Kind::Chat {
            core::sse_data(
                out,
                &self
                    .meta
                    .chunk(json!({"role": "assistant", "content": ""}), None),
            );
        }
    }

    fn text(&mut self, text: &str, logprobs: Vec<TokenLogprob>, out: &mut Vec<u8>) {
        if self.meta.logprobs.is_none() {
            return self.frame.render(text, out);
        }
        let mut c = self.meta.chunk(self.meta.text_piece(text), None);
        c["choices"][0]["logprobs"] = self.meta.logprobs_json(&logprobs, &mut self.offset);
        core::sse_data(out, &c);
    }

    fn reasoning(&mut self, text: &str, out: &mut Vec<u8>) {
        match self.meta.dialect {
            Kind::Chat => {
                let delta = json!({"reasoning_content": text});
                core::sse_data(out, &self.meta.chunk(delta, None));
            }
            // A raw prompt's output is never split (only chat turns are).
            Kind::Completion => self.frame.render(text, out),
        }
    }

    fn tool_call(&mut self, call: ToolCallFrame, out: &mut Vec<u8>) {
        if self.meta.dialect == Kind::Chat {
            let delta = json!({"tool_calls": [tool_call_json(&call, true)]});
            core::sse_data(out, &self.meta.chunk(delta, None));
        }
    }

    fn done(&mut self, done: Done, logprobs: Vec<TokenLogprob>, out: &mut Vec<u8>) {
        let meta = &self.meta;
        let empty = if meta.dialect == Kind::Chat {
            json!({})
        } else {
            json!("")
        };
        let mut fin = meta.chunk(empty, Some(&done.finish_reason));
        if meta.logprobs.is_some() && !logprobs.is_empty() {
            fin["choices"][0]["logprobs"] = meta.logprobs_json(&logprobs, &mut self.offset);
        }
        core::sse_data(out, &fin);
        if meta.include_usage {
            let mut u = meta.chunk(Value::Null, None);
            u["choices"] = json!([]);
            u["usage"] = usage(&done);
            core::sse_data(out, &u);
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }

    fn error(&mut self, e: &Error, out: &mut Vec<u8>) {
        core::sse_data(out, &Dialect::OpenAi.error_body(e));
    }
}

/// Fuzz target (`fuzz/` and tests/fuzz_requests.rs): any body sent to either
/// generation endpoint ends as a 400 or a well-formed Generate, never a panic.
pub fn fuzz_request(body: &[u8]) {
    if let Ok(map) = request::parse_object(&Bytes::copy_from_slice(body)) {
        let _ = chat_generate(map.clone(), DEFAULT_MAX_TOKENS);
        let _ = completion_generate(map, DEFAULT_MAX_TOKENS);
    }
}

/// A chat request as the core's Generate (everything but the model's defaults).
fn chat_generate(
    map: serde_json::Map<String, Value>,
    preset_max: u32,
) -> Result<(Sampling, Generate), Error> {
    request::check_fields(&map, &[SHARED_FIELDS, CHAT_FIELDS])?;
    let req: ChatRequest = request::from_object(map)?;
    let mut gen = req.sampling.to_generate(preset_max)?;
    let mut images = Images::default();
    gen.messages = Some(chat_messages(req.messages, &mut images)?);
    gen.images = images.files;
    gen.tools = tools(req.tools)?;
    gen.tool_choice = request::tool_choice(req.tool_choice, &gen.tools)?;
    gen.format = output_format(req.response_format)?.map(Box::new);
    request::forced_call_wins(&mut gen);
    gen.logprobs = request::logprobs_request(req.logprobs, req.top_logprobs)?;
    gen.reasoning = request::reasoning(
        req.chat_template_kwargs.and_then(|k| k.enable_thinking),
        req.reasoning_effort.as_deref(),
        req.max_reasoning_tokens,
        "reasoning_effort",
    )?;
    request::assert_generate(&gen);
    Ok((req.sampling, gen))
}

fn completion_generate(
    map: serde_json::Map<String, Value>,
    preset_max: u32,
) -> Result<(Sampling, Generate), Error> {
    request::check_fields(&map, &[SHARED_FIELDS, COMPLETION_FIELDS])?;
    let req: CompletionRequest = request::from_object(map)?;
    let mut gen = req.sampling.to_generate(preset_max)?;
    gen.prompt = Some(match req.prompt {
        PromptInput::One(p) => p,
        PromptInput::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptInput::Many(_) => {
            return Err(Error::invalid(
                "only one prompt per request is supported",
                Some("prompt"),
            ))
        }
    });
    gen.logprobs = match req.logprobs {
        Some(n) if n > 5 => {
            return Err(Error::invalid(
                "logprobs must be between 0 and 5",
                Some("logprobs"),
            ))
        }
        n => n,
    };
    request::assert_generate(&gen);
    Ok((req.sampling, gen))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let map = request::parse_object(&body)?;
    let target = Target::of_body(&state, &map)?;
    let (sampling, gen) = chat_generate(map, Target::default_max_tokens(target.as_ref()))?;
    run(state, Target::required(target)?, sampling, gen, Kind::Chat).await
}

pub async fn completions(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let map = request::parse_object(&body)?;
    let target = Target::of_body(&state, &map)?;
    let (sampling, gen) = completion_generate(map, Target::default_max_tokens(target.as_ref()))?;
    run(
        state,
        Target::required(target)?,
        sampling,
        gen,
        Kind::Completion,
    )
    .await
}

/// `POST /v1/embeddings`.
#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: request::EmbedInput,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u32>,
    #[serde(default)]
    keep_alive: Option<Value>,
}

const EMBEDDINGS_FIELDS: &[(&str, FieldRule)] = &[
    ("model", FieldRule::Served),
    ("input", FieldRule::Served),
    ("encoding_format", FieldRule::Served),
    ("dimensions", FieldRule::Served),
    ("keep_alive", FieldRule::Served),
    ("user", FieldRule::Ignored),
];

pub async fn embeddings(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let (target, req): (Target, EmbeddingsRequest) =
        request::parse_checked(&state, &body, &[EMBEDDINGS_FIELDS])?;
    let as_base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(Error::invalid(
                format!("encoding_format must be \"float\" or \"base64\", not {other:?}"),
                Some("encoding_format"),
            )
            .into())
        }
    };
    if matches!(&req.input, request::EmbedInput::Text(t) if t.is_empty()) {
        return Err(Error::invalid("input must not be an empty string", Some("input")).into());
    }
    // OpenAI refuses an input longer than the model's limit rather than cut it.
    let embed = request::embed_frame(req.input, false, req.dimensions, "input")?;
    let out = core::embed(&state, target, embed, &req.keep_alive).await?;
    let vectors: Vec<Vector> = if as_base64 {
        out.vectors.iter().cloned().map(Vector::Base64).collect()
    } else {
        out.floats()?.into_iter().map(Vector::Floats).collect()
    };
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| EmbeddingItem {
            object: "embedding",
            index,
            embedding,
        })
        .collect();
    let usage = EmbeddingUsage {
        prompt_tokens: out.prompt_tokens,
        total_tokens: out.prompt_tokens,
    };
    Ok(axum::Json(EmbeddingList {
        object: "list",
        data,
        model: req.model,
        usage,
    })
    .into_response())
}

// The answer as typed structs, not a `json!` tree: serde_json writes an f32 in its
// shortest form ("0.06765687"), where a Value would hold it as f64 and write twice
// the digits.
#[derive(serde::Serialize)]
struct EmbeddingList {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(serde::Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Vector {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(serde::Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u32,
    total_tokens: u32,
}

pub async fn models(State(state): State<AppState>) -> axum::Json<Value> {
    let created = unix_now();
    let loaded = state.supervisor.ps().await;
    // One snapshot of the presets for the list and for telling peers' models apart.
    let presets = state.supervisor.presets();
    let mut data: Vec<Value> = presets
        .iter()
        .map(|p| {
            let mut m =
                json!({"id": p.name, "object": "model", "created": created, "owned_by": "mlxd"});
            // What clients size requests by (and pick a model with): the model's
            // context, from its config.json, loaded or not.
            let files = p.model_files(state.supervisor.models_dir());
            m["context_length"] = json!(files.context_length);
            let running = loaded.iter().find(|w| w.model == p.name);
            if let Some(facts) = running.and_then(|w| w.facts.as_ref()) {
                // What the worker found at load: the family, its caches, and
                // each feature off or limited for it, with the reason.
                m["mlxd"] = json!({
                    "family": facts.family,
                    "cache_kinds": facts.cache_kinds,
                    "reasoning": facts.reasoning,
                    "limits": facts.limits.iter().map(|l| json!({"feature": l.feature, "reason": l.reason})).collect::<Vec<_>>(),
                });
            }
            if let Some(spec) = &p.speculative {
                // What the worker says once loaded; the preset's word before that.
                let status = running.and_then(|w| w.stats.speculative.as_ref());
                m["mlxd"]["speculative"] = json!(match status {
                    Some(s) => json!({
                        "draft": s.draft, "mode": s.mode, "active": s.active, "reason": s.reason,
                        "num_draft_tokens": s.num_draft_tokens, "acceptance_ratio": s.acceptance,
                    }),
                    None => json!({
                        "draft": spec.draft, "mode": spec.mode.as_str(), "active": null,
                        "reason": "not loaded", "num_draft_tokens": spec.num_draft_tokens,
                    }),
                });
            }
            m
        })
        .collect();
    // Peers' models, with where they run (requests for them are forwarded there).
    let remote = state.peers.remote_models(|m| presets.resolve(m).is_some());
    data.extend(remote.into_iter().map(|(id, peer, url)| {
        json!({"id": id, "object": "model", "created": created, "owned_by": "mlxd",
               "mlxd": {"peer": peer, "peer_url": url}})
    }));
    axum::Json(json!({"object": "list", "data": data}))
}
