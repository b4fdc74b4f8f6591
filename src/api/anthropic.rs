//! Anthropic's Messages API: `POST /v1/messages` (streamed and not) and
//! `POST /v1/messages/count_tokens`, in the shapes the official `anthropic`
//! client parses (and Claude Code sends with `ANTHROPIC_BASE_URL`).

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use worker_protocol::frame::{
    ChatMessage, Done, Generate, MessageToolCall, OutputFormat, ReasoningOptions, TokenLogprob,
    Tool, ToolCallFrame, ToolChoice,
};

use super::core;
use super::error::{AnthropicError, Dialect};
use super::images::{Images, Turn};
use super::request::{self, FieldRule, Target};
use super::AppState;
use crate::error::Error;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    // tool_use
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    // tool_result
    #[serde(default)]
    tool_use_id: Option<String>,
    #[serde(default)]
    content: Option<Box<Content>>,
    #[serde(default)]
    is_error: Option<bool>,
    // thinking (an assistant turn's, sent back)
    #[serde(default)]
    thinking: Option<String>,
    // image
    #[serde(default)]
    source: Option<ImageSource>,
}

/// An image block's source: the file in base64, or a URL.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageSource {
    Base64 { data: String },
    Url { url: String },
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
struct InTool {
    name: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct InToolChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InOutputFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    schema: Option<Value>,
}

/// `output_config`: the answer's format (as `output_format`) and how much effort
/// the model spends (a reasoning model's thinking effort).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputConfig {
    #[serde(default)]
    format: Option<InOutputFormat>,
    #[serde(default)]
    effort: Option<String>,
}

/// `thinking`: `{"type": "enabled", "budget_tokens": N}`, `{"type": "adaptive"}`
/// or `{"type": "disabled"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Thinking {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    budget_tokens: Option<u32>,
    /// "summarized" or "omitted" (Claude Code's): omitted thinking is not sent.
    #[serde(default)]
    display: Option<String>,
}

/// A request's thinking as the core's: enabled with a budget, adaptive (the
/// model's own length) or disabled.
fn thinking(
    t: Option<Thinking>,
    max_tokens: Option<u32>,
    effort: Option<&str>,
) -> Result<Option<Box<ReasoningOptions>>, Error> {
    // output_config.effort: "low" | "medium" | "high" (and "max", the most).
    let effort = effort.map(|e| if e == "max" { "high" } else { e });
    let Some(t) = t else {
        return request::reasoning(None, effort, None, "output_config.effort");
    };
    let enabled = match t.kind.as_str() {
        "enabled" => true,
        "adaptive" => true,
        "disabled" => false,
        other => {
            return Err(Error::invalid(
                format!("thinking.type '{other}' is not one of enabled, adaptive, disabled"),
                Some("thinking"),
            ))
        }
    };
    let budget = if enabled { t.budget_tokens } else { None };
    if t.kind == "enabled" && budget.is_none() {
        return Err(Error::invalid(
            "thinking.budget_tokens: field required",
            Some("thinking.budget_tokens"),
        ));
    }
    if let (Some(budget), Some(max)) = (budget, max_tokens) {
        if budget >= max {
            return Err(Error::invalid(
                format!("`max_tokens` must be greater than `thinking.budget_tokens` ({max} <= {budget})"),
                Some("thinking.budget_tokens"),
            ));
        }
    }
    request::reasoning(Some(enabled), effort, budget, "output_config.effort")
}

#[derive(Debug, Deserialize)]
struct MessagesRequest {
    model: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    messages: Vec<InMessage>,
    #[serde(default)]
    system: Option<Content>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    #[serde(default)]
    tool_choice: Option<InToolChoice>,
    #[serde(default)]
    output_format: Option<InOutputFormat>,
    #[serde(default)]
    thinking: Option<Thinking>,
    #[serde(default)]
    output_config: Option<OutputConfig>,
}

const FIELDS: &[(&str, FieldRule)] = &[
    ("model", FieldRule::Served),
    ("max_tokens", FieldRule::Served),
    ("messages", FieldRule::Served),
    ("system", FieldRule::Served),
    ("stop_sequences", FieldRule::Served),
    ("stream", FieldRule::Served),
    ("temperature", FieldRule::Served),
    ("top_p", FieldRule::Served),
    ("tools", FieldRule::Served),
    ("tool_choice", FieldRule::Served),
    ("output_format", FieldRule::Served),
    ("thinking", FieldRule::Served),
    ("output_config", FieldRule::Served),
    ("metadata", FieldRule::Ignored),
    ("service_tier", FieldRule::Ignored),
    // Hints about Anthropic's own prompt cache: mlxd's prefix cache reuses
    // whatever it can without them.
    ("cache_control", FieldRule::Ignored),
    // Server-side context editing (clearing old tool results and thinking past
    // a threshold): the conversation is served as sent, and a model's earlier
    // thinking does not reach its prompt unless its template keeps it.
    ("context_management", FieldRule::Ignored),
];

/// count_tokens takes the input fields only.
const COUNT_FIELDS: &[(&str, FieldRule)] = &[
    ("model", FieldRule::Served),
    ("messages", FieldRule::Served),
    ("system", FieldRule::Served),
    ("tools", FieldRule::Served),
    ("tool_choice", FieldRule::Served),
    ("thinking", FieldRule::Served),
    ("cache_control", FieldRule::Ignored),
    ("context_management", FieldRule::Ignored),
    // The answer's format and effort change nothing in the prompt's count.
    ("output_config", FieldRule::Ignored),
];

fn unsupported_block(kind: &str) -> Error {
    Error::invalid(
        format!("content block type '{kind}' is not supported"),
        Some("messages"),
    )
}

fn text_of(content: Content, field: &str) -> Result<String, Error> {
    match content {
        Content::Text(t) => Ok(t),
        Content::Blocks(blocks) => {
            let mut text = String::new();
            for b in blocks {
                match (b.kind.as_str(), b.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    (kind, _) => {
                        return Err(Error::invalid(
                            format!("content block type '{kind}' is not supported in {field}"),
                            Some(field),
                        ))
                    }
                }
            }
            Ok(text)
        }
    }
}

/// Anthropic turns as the core's messages: a user turn's tool_result blocks
/// become tool messages (before its text), an assistant turn's tool_use blocks
/// its tool calls.
fn chat_messages(
    system: Option<Content>,
    messages: Vec<InMessage>,
    images: &mut Images,
) -> Result<Vec<ChatMessage>, Error> {
    if messages.is_empty() {
        return Err(Error::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut out = Vec::new();
    if let Some(system) = system {
        let text = text_of(system, "system")?;
        if !text.is_empty() {
            out.push(ChatMessage {
                role: "system".into(),
                content: text,
                ..Default::default()
            });
        }
    }
    for m in messages {
        if m.role == "system" {
            // A system message mid-conversation (Claude Code sends them): it
            // stays where it is; the worker renders it (chat_messages in
            // requests/tools.py says how when the template refuses it there).
            let text = text_of(m.content, "messages")?;
            if !text.is_empty() {
                out.push(ChatMessage {
                    role: "system".into(),
                    content: text,
                    ..Default::default()
                });
            }
            continue;
        }
        if m.role != "user" && m.role != "assistant" {
            return Err(Error::invalid(
                format!(
                    "unknown role '{}' (messages are 'user', 'assistant' or 'system')",
                    m.role
                ),
                Some("messages"),
            ));
        }
        let blocks = match m.content {
            Content::Text(t) => {
                out.push(ChatMessage {
                    role: m.role,
                    content: t,
                    ..Default::default()
                });
                continue;
            }
            Content::Blocks(b) => b,
        };
        let mut turn = Turn::default();
        let mut calls = Vec::new();
        let mut thought = String::new();
        for b in blocks {
            match b.kind.as_str() {
                "text" => turn.push_text(b.text.as_deref().unwrap_or_default()),
                "image" if m.role == "user" => {
                    let image = match b.source {
                        Some(ImageSource::Base64 { data }) => {
                            images.add_base64(&data, "messages")?
                        }
                        Some(ImageSource::Url { url }) => images.add_url(&url, "messages")?,
                        None => {
                            return Err(Error::invalid(
                                "an image block needs its source",
                                Some("messages"),
                            ))
                        }
                    };
                    turn.push_image(image);
                }
                "thinking" if m.role == "assistant" => {
                    thought.push_str(b.thinking.as_deref().unwrap_or_default())
                }
                // Thinking Anthropic encrypted: nothing a local model can read.
                "redacted_thinking" if m.role == "assistant" => {}
                "tool_use" if m.role == "assistant" => calls.push(MessageToolCall {
                    id: b.id.unwrap_or_default(),
                    name: b.name.unwrap_or_default(),
                    arguments: b.input.unwrap_or_else(|| json!({})),
                }),
                "tool_result" if m.role == "user" => {
                    let mut content = match b.content {
                        Some(c) => text_of(*c, "messages")?,
                        None => String::new(),
                    };
                    if b.is_error == Some(true) {
                        content = format!("Error: {content}");
                    }
                    out.push(ChatMessage {
                        role: "tool".into(),
                        content,
                        tool_call_id: b.tool_use_id,
                        ..Default::default()
                    });
                }
                other => return Err(unsupported_block(other)),
            }
        }
        let (text, parts) = turn.finish();
        if !text.is_empty() || !calls.is_empty() || !parts.is_empty() {
            out.push(ChatMessage {
                role: m.role,
                content: text,
                tool_calls: calls,
                reasoning: Some(thought).filter(|t| !t.is_empty()),
                parts,
                ..Default::default()
            });
        }
    }
    Ok(out)
}

fn tools(tools: Option<Vec<InTool>>) -> Result<Vec<Tool>, Error> {
    tools
        .unwrap_or_default()
        .into_iter()
        .map(|t| match t.kind.as_deref() {
            None | Some("custom") => request::tool(t.name, t.description, t.input_schema),
            Some(kind) => Err(Error::invalid(
                format!("tool type '{kind}' is not supported (server tools run at Anthropic)"),
                Some("tools"),
            )),
        })
        .collect()
}

fn tool_choice(c: Option<InToolChoice>, tools: &[Tool]) -> Result<ToolChoice, Error> {
    let choice = match c {
        None => ToolChoice::Auto,
        Some(c) => match (c.kind.as_str(), c.name) {
            ("auto", _) => ToolChoice::Auto,
            ("none", _) => ToolChoice::None,
            ("any", _) => ToolChoice::Required,
            ("tool", Some(name)) => ToolChoice::Function(name),
            _ => {
                return Err(Error::invalid(
                    "tool_choice.type must be 'auto', 'any', 'none' or 'tool' (with a name)",
                    Some("tool_choice"),
                ))
            }
        },
    };
    request::forced_tool_is_known(&choice, tools, "tool_choice")?;
    Ok(choice)
}

/// A request as the core's Generate, and how to answer it.
pub struct Parsed {
    pub model: String,
    pub gen: Generate,
    pub stream: bool,
    /// The model's thinking goes out as thinking blocks (not with
    /// `thinking.display: "omitted"`).
    pub show_thinking: bool,
}

fn generate(req: MessagesRequest) -> Result<(Generate, bool), Error> {
    let max_tokens = req
        .max_tokens
        .ok_or_else(|| Error::invalid("max_tokens: field required", Some("max_tokens")))?;
    if let Some(t) = req.temperature {
        if !(0.0..=1.0).contains(&t) {
            return Err(Error::invalid(
                "temperature must be between 0 and 1",
                Some("temperature"),
            ));
        }
    }
    let mut gen = request::SamplingParams {
        max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        stop: req.stop_sequences.unwrap_or_default(),
        seed: None,
    }
    .to_generate()?;
    let mut images = Images::default();
    gen.messages = Some(chat_messages(req.system, req.messages, &mut images)?);
    gen.images = images.files;
    gen.tools = tools(req.tools)?;
    gen.tool_choice = tool_choice(req.tool_choice, &gen.tools)?;
    let (config_format, effort) = match req.output_config {
        Some(c) => (c.format, c.effort),
        None => (None, None),
    };
    let output_format = match (req.output_format, config_format) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid(
                "output_format and output_config.format cannot both be given",
                Some("output_config"),
            ))
        }
        (a, b) => a.or(b),
    };
    gen.format = match output_format {
        None => None,
        Some(InOutputFormat {
            kind,
            schema: Some(schema),
        }) if kind == "json_schema" && schema.is_object() => {
            Some(Box::new(OutputFormat::JsonSchema {
                schema,
                strict: true,
            }))
        }
        Some(_) => {
            return Err(Error::invalid(
                "output_format must be {\"type\": \"json_schema\", \"schema\": {...}}",
                Some("output_format"),
            ))
        }
    };
    request::forced_call_wins(&mut gen);
    gen.reasoning = thinking(req.thinking, Some(max_tokens), effort.as_deref())?;
    Ok((gen, req.stream))
}

/// The request as the core's Generate (the fuzz target's entry too).
pub fn parse_messages(body: &Bytes) -> Result<Parsed, Error> {
    let map = request::parse_object(body)?;
    request::check_fields(&map, &[FIELDS])?;
    let req: MessagesRequest = request::from_object(map)?;
    let model = req.model.clone();
    let show_thinking = req.thinking.as_ref().and_then(|t| t.display.as_deref()) != Some("omitted");
    let (gen, stream) = generate(req)?;
    Ok(Parsed {
        model,
        gen,
        stream,
        show_thinking,
    })
}

fn stop_reason(done: &Done) -> &'static str {
    match done.finish_reason.as_str() {
        "length" => "max_tokens",
        "tool_calls" => "tool_use",
        _ if done.stop_sequence.is_some() => "stop_sequence",
        _ => "end_turn",
    }
}

fn usage(done: &Done) -> Value {
    let mut u = prompt_usage(
        done.prompt_tokens,
        done.cached_tokens,
        done.completion_tokens,
    );
    if let Some(counts) = &done.speculative {
        u["mlxd"] = core::speculative_usage(counts);
    }
    u
}

/// Anthropic counts prompt tokens read from a cache apart from input_tokens.
fn prompt_usage(prompt_tokens: u32, cached_tokens: u32, output_tokens: u32) -> Value {
    json!({
        "input_tokens": prompt_tokens.saturating_sub(cached_tokens),
        "cache_read_input_tokens": cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": output_tokens,
    })
}

fn tool_use_block(call: &ToolCallFrame) -> Value {
    json!({"type": "tool_use", "id": call.call_id, "name": call.name, "input": core::arguments_object(call)})
}

pub async fn messages(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, AnthropicError> {
    let Parsed {
        model,
        gen,
        stream,
        show_thinking,
    } = parse_messages(&body)?;
    let target = Target::resolve(&state, &model)?;
    let id = core::new_id("msg");
    let req = core::CoreRequest {
        target,
        gen,
        keep_alive: None,
    };
    let started = core::start(&state, req).await?;
    if stream {
        let renderer = AnthropicStream {
            id,
            model,
            open_block: None,
            show_thinking,
            blocks: 0,
            started: false,
        };
        return Ok(core::stream(started, renderer, core::Framing::Sse));
    }
    let c = core::collect(started).await?;
    let mut content = Vec::new();
    if !c.reasoning.is_empty() && show_thinking {
        // No signature: nothing signs a local model's thinking.
        content.push(json!({"type": "thinking", "thinking": c.reasoning, "signature": ""}));
    }
    if !c.text.is_empty() {
        content.push(json!({"type": "text", "text": c.text}));
    }
    content.extend(c.tool_calls.iter().map(tool_use_block));
    Ok(axum::Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(&c.done),
        "stop_sequence": c.done.stop_sequence,
        "usage": usage(&c.done),
    }))
    .into_response())
}

/// The event sequence of a streamed message: `message_start`, then per content
/// block `content_block_start`, its deltas and `content_block_stop`, then
/// `message_delta` (stop reason, usage) and `message_stop`.
struct AnthropicStream {
    id: String,
    model: String,
    /// The open block's type: "text" or "thinking" (tool_use blocks open and
    /// close at once).
    open_block: Option<&'static str>,
    /// Content blocks started so far (the next block's index).
    blocks: u32,
    show_thinking: bool,
    /// Whether `message_start` went out.
    started: bool,
}

impl AnthropicStream {
    /// `message_start`, with the prompt's usage when the worker told it (at
    /// admission, before any token: Claude Code sizes its context by it).
    fn start(&mut self, prompt_tokens: u32, cached_tokens: u32, out: &mut Vec<u8>) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        let message = json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": prompt_usage(prompt_tokens, cached_tokens, 0),
        });
        core::sse_event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": message}),
        );
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if self.open_block.take().is_some() {
            let index = self.blocks - 1;
            core::sse_event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// A delta of a `kind` block, opening one (and closing another) first.
    fn block_delta(&mut self, kind: &'static str, delta: Value, out: &mut Vec<u8>) {
        self.start(0, 0, out);
        if self.open_block != Some(kind) {
            self.close_block(out);
            let block = match kind {
                "thinking" => json!({"type": "thinking", "thinking": "", "signature": ""}),
                _ => json!({"type": "text", "text": ""}),
            };
            let start = json!({"type": "content_block_start", "index": self.blocks, "content_block": block});
            core::sse_event(out, "content_block_start", &start);
            self.open_block = Some(kind);
            self.blocks += 1;
        }
        let delta =
            json!({"type": "content_block_delta", "index": self.blocks - 1, "delta": delta});
        core::sse_event(out, "content_block_delta", &delta);
    }
}

impl core::Renderer for AnthropicStream {
    fn admitted(&mut self, prompt_tokens: u32, cached_tokens: u32, out: &mut Vec<u8>) {
        self.start(prompt_tokens, cached_tokens, out);
    }

    fn text(&mut self, text: &str, _logprobs: Vec<TokenLogprob>, out: &mut Vec<u8>) {
        self.block_delta("text", json!({"type": "text_delta", "text": text}), out);
    }

    fn reasoning(&mut self, text: &str, out: &mut Vec<u8>) {
        if !self.show_thinking {
            return;
        }
        let delta = json!({"type": "thinking_delta", "thinking": text});
        self.block_delta("thinking", delta, out);
    }

    fn tool_call(&mut self, call: ToolCallFrame, out: &mut Vec<u8>) {
        self.start(0, 0, out);
        self.close_block(out);
        let index = self.blocks;
        self.blocks += 1;
        let start = json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "tool_use", "id": call.call_id, "name": call.name, "input": {}}});
        core::sse_event(out, "content_block_start", &start);
        let delta = json!({"type": "content_block_delta", "index": index,
            "delta": {"type": "input_json_delta", "partial_json": call.arguments}});
        core::sse_event(out, "content_block_delta", &delta);
        core::sse_event(
            out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        );
    }

    fn done(&mut self, done: Done, _logprobs: Vec<TokenLogprob>, out: &mut Vec<u8>) {
        self.start(done.prompt_tokens, done.cached_tokens, out);
        self.close_block(out);
        let delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(&done), "stop_sequence": done.stop_sequence},
            "usage": usage(&done),
        });
        core::sse_event(out, "message_delta", &delta);
        core::sse_event(out, "message_stop", &json!({"type": "message_stop"}));
    }

    fn error(&mut self, e: &Error, out: &mut Vec<u8>) {
        self.start(0, 0, out);
        core::sse_event(out, "error", &Dialect::Anthropic.error_body(e));
    }
}

#[derive(Debug, Deserialize)]
struct CountRequest {
    model: String,
    messages: Vec<InMessage>,
    #[serde(default)]
    system: Option<Content>,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    #[serde(default)]
    tool_choice: Option<InToolChoice>,
    #[serde(default)]
    thinking: Option<Thinking>,
}

/// `POST /v1/messages/count_tokens`: the prompt as the model would see it
/// (template, tools), counted by the worker's tokenizer.
pub async fn count_tokens(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, AnthropicError> {
    let map = request::parse_object(&body)?;
    request::check_fields(&map, &[COUNT_FIELDS])?;
    let req: CountRequest = request::from_object(map)?;
    let target = Target::resolve(&state, &req.model)?;
    let tools = tools(req.tools)?;
    let mut images = Images::default();
    let messages = chat_messages(req.system, req.messages, &mut images)?;
    let gen = Generate {
        messages: Some(messages),
        images: images.files,
        tool_choice: tool_choice(req.tool_choice, &tools)?,
        reasoning: thinking(req.thinking, None, None)?,
        tools,
        max_tokens: 1,
        count_only: true,
        ..Default::default()
    };
    let started = core::start(
        &state,
        core::CoreRequest {
            target,
            gen,
            keep_alive: None,
        },
    )
    .await?;
    let c = core::collect(started).await?;
    Ok(axum::Json(json!({"input_tokens": c.done.prompt_tokens})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Generate, Error> {
        parse_messages(&Bytes::from(v.to_string())).map(|p| p.gen)
    }

    #[test]
    fn tool_turns_become_the_core_messages() {
        let gen = parse(json!({
            "model": "m", "max_tokens": 8, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                    {"type": "text", "text": "Thanks"}]},
            ],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
        }))
        .unwrap();
        let m = gen.messages.unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(m[2].content, "Let me look.");
        assert_eq!(m[2].tool_calls[0].arguments, json!({"city": "Paris"}));
        assert_eq!(m[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(m[3].content, "18C");
        assert_eq!(gen.tool_choice, ToolChoice::Required);
        assert_eq!(gen.tools[0].name, "get_weather");
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let base =
            json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
        for (field, value) in [
            ("top_k", json!(5)),
            ("thinking", json!({"type": "sometimes"})),
            (
                "tools",
                json!([{"type": "web_search_20250305", "name": "web_search"}]),
            ),
            ("tool_choice", json!({"type": "tool", "name": "missing"})),
        ] {
            let mut body = base.clone();
            body[field] = value;
            match parse(body) {
                Err(Error::InvalidRequest { param, .. }) => {
                    assert_eq!(param.as_deref(), Some(field))
                }
                other => panic!("{field}: {other:?}"),
            }
        }
        // Images are a user's: in an assistant turn the block is refused by name.
        let mut image = base.clone();
        let source = json!({"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="});
        image["messages"] =
            json!([{"role": "assistant", "content": [{"type": "image", "source": source}]}]);
        assert!(matches!(parse(image), Err(e) if e.to_string().contains("'image'")));
        let mut no_max = base;
        no_max.as_object_mut().unwrap().remove("max_tokens");
        assert!(matches!(parse(no_max), Err(e) if e.param() == Some("max_tokens")));
    }

    #[test]
    fn thinking_maps_to_the_core_and_its_budget_is_checked() {
        let base = json!({"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]});
        let with = |thinking: Value| {
            let mut body = base.clone();
            body["thinking"] = thinking;
            parse(body)
        };
        let budget = with(json!({"type": "enabled", "budget_tokens": 16})).unwrap();
        let r = budget.reasoning.unwrap();
        assert_eq!((r.enabled, r.max_tokens), (Some(true), Some(16)));
        let off = with(json!({"type": "disabled"}))
            .unwrap()
            .reasoning
            .unwrap();
        assert_eq!((off.enabled, off.max_tokens), (Some(false), None));
        let adaptive = with(json!({"type": "adaptive"}))
            .unwrap()
            .reasoning
            .unwrap();
        assert_eq!((adaptive.enabled, adaptive.max_tokens), (Some(true), None));
        let over = with(json!({"type": "enabled", "budget_tokens": 64})).unwrap_err();
        assert_eq!(over.param(), Some("thinking.budget_tokens"));
        assert!(with(json!({"type": "enabled"})).is_err());
        // An assistant turn's thinking block is its reasoning; redacted ones are skipped.
        let mut body = base;
        body["messages"] = json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "They said hi.", "signature": "x"},
                {"type": "redacted_thinking", "data": "abc"},
                {"type": "text", "text": "Hello!"}]},
            {"role": "user", "content": "And?"},
        ]);
        let m = parse(body).unwrap().messages.unwrap();
        assert_eq!(m[1].reasoning.as_deref(), Some("They said hi."));
        assert_eq!(m[1].content, "Hello!");
    }

    #[test]
    fn claude_codes_fields_are_taken() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let gen = parse(json!({
            "model": "m", "max_tokens": 64,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
                {"role": "assistant", "content": "Hello."},
                {"role": "system", "content": "The user is in Paris."},
                {"role": "user", "content": "Weather?"},
            ],
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "thinking": {"type": "adaptive", "display": "omitted"},
            "cache_control": {"type": "ephemeral"},
            "metadata": {"user_id": "u"},
            "output_config": {"effort": "low", "format": {"type": "json_schema", "schema": schema}},
        }))
        .unwrap();
        let m = gen.messages.unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "system", "user"]);
        assert_eq!(m[3].content, "The user is in Paris.");
        assert!(matches!(
            gen.format.as_deref(),
            Some(OutputFormat::JsonSchema { .. })
        ));
        let r = gen.reasoning.unwrap();
        assert_eq!((r.enabled, r.effort.as_deref()), (Some(true), Some("low")));
        // Thinking shown unless the client asks for it omitted (Claude Code does).
        let body = |display: &str| {
            json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
                   "thinking": {"type": "adaptive", "display": display}})
        };
        let shown = |v: Value| {
            parse_messages(&Bytes::from(v.to_string()))
                .unwrap()
                .show_thinking
        };
        assert!(!shown(body("omitted")) && shown(body("summarized")));
        // One format, not two; an effort mlxd does not know is named.
        let both = parse(json!({
            "model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
            "output_format": {"type": "json_schema", "schema": schema},
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
        }));
        assert_eq!(both.unwrap_err().param(), Some("output_config"));
        let effort = parse(json!({
            "model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
            "output_config": {"effort": "extreme"},
        }));
        assert_eq!(effort.unwrap_err().param(), Some("output_config.effort"));
    }

    #[test]
    fn stop_reasons_follow_the_finish() {
        let done = |finish: &str, stop: Option<&str>| Done {
            id: 1,
            finish_reason: finish.into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            prompt_tps: 0.0,
            generation_tps: 0.0,
            speculative: None,
            stop_sequence: stop.map(str::to_owned),
            cached_tokens: 0,
            reasoning_tokens: 0,
        };
        assert_eq!(stop_reason(&done("stop", None)), "end_turn");
        assert_eq!(stop_reason(&done("stop", Some("###"))), "stop_sequence");
        assert_eq!(stop_reason(&done("length", None)), "max_tokens");
        assert_eq!(stop_reason(&done("tool_calls", None)), "tool_use");
    }
}
