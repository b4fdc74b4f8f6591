//! OpenAI's Responses API: `POST /v1/responses` (text or items as input, function
//! tools, JSON output formats, streamed as typed events). Stateless: mlxd keeps
//! no responses, so `previous_response_id` is refused and the client sends the
//! conversation it wants continued.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use worker_protocol::frame::{
    ChatMessage, ContentPart as WireContentPart, Done, MessageToolCall, OutputFormat, TokenLogprob,
    Tool, ToolCallFrame, ToolChoice,
};

use super::core;
use super::error::ApiError;
use super::images::{Images, Turn};
use super::request::{self, FieldRule, Target};
use super::{unix_now, AppState};
use crate::error::Error;

const FIELDS: &[(&str, FieldRule)] = &[
    ("model", FieldRule::Served),
    ("input", FieldRule::Served),
    ("instructions", FieldRule::Served),
    ("tools", FieldRule::Served),
    ("tool_choice", FieldRule::Served),
    ("max_output_tokens", FieldRule::Served),
    ("temperature", FieldRule::Served),
    ("top_p", FieldRule::Served),
    ("stream", FieldRule::Served),
    ("text", FieldRule::Served),
    ("reasoning", FieldRule::Served),
    ("max_reasoning_tokens", FieldRule::Served),
    ("include", FieldRule::Served),
    // Bookkeeping and hints (Codex sends them): the answer is the same.
    ("client_metadata", FieldRule::Ignored),
    ("prompt_cache_key", FieldRule::Ignored),
    // Nothing is stored either way; the answer is the same.
    ("store", FieldRule::Ignored),
    ("metadata", FieldRule::Ignored),
    ("user", FieldRule::Ignored),
    ("parallel_tool_calls", FieldRule::Ignored),
    ("service_tier", FieldRule::Ignored),
    (
        "truncation",
        FieldRule::OnlyNeutral(|v| v.as_str() == Some("disabled")),
    ),
];

/// What `include` may ask for: the reasoning items' `encrypted_content`, which
/// mlxd fills with the thinking itself (nothing is secret from a local client),
/// so a stateless client that sends the items back gives the template its thinking.
const INCLUDE_REASONING: &str = "reasoning.encrypted_content";
/// Marks mlxd's `encrypted_content` (base64 of the thinking's text).
const ENCRYPTED_PREFIX: &str = "mlxd1:";

/// `reasoning`: how hard a reasoning model thinks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasoningParam {
    #[serde(default)]
    effort: Option<String>,
    /// "auto", "concise" or "detailed": the thinking is also given as the
    /// item's summary (mlxd writes no shorter one).
    #[serde(default)]
    summary: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Value>),
}

#[derive(Debug, Deserialize)]
struct InTool {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    /// A `namespace` tool's functions.
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    /// A `custom` tool's input format: text, or a Lark or regex grammar.
    #[serde(default)]
    format: Option<Value>,
}

/// Tools the OpenAI platform runs itself: a local server cannot, so they are left
/// out of the model's tools (and named in `x-mlxd-dropped-tools` and the log)
/// rather than failing a client that always sends them (Codex sends web_search).
const HOSTED_TOOLS: &[&str] = &[
    "web_search",
    "web_search_preview",
    "file_search",
    "code_interpreter",
    "computer_use",
    "computer_use_preview",
    "image_generation",
    "mcp",
    "local_shell",
];

/// A hosted tool's type, also in its dated form (`web_search_preview_2025_03_11`).
fn is_hosted(kind: &str) -> bool {
    HOSTED_TOOLS
        .iter()
        .any(|hosted| match kind.strip_prefix(hosted) {
            Some("") => true,
            Some(rest) => is_date_suffix(rest),
            None => false,
        })
}

/// `_YYYY_MM_DD`, as OpenAI dates a tool's version.
fn is_date_suffix(s: &str) -> bool {
    let digits = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit());
    matches!(s.split('_').collect::<Vec<_>>().as_slice(),
        ["", y, m, d] if digits(y, 4) && digits(m, 2) && digits(d, 2))
}

/// The header that names the hosted tools a request sent and mlxd left out.
pub const DROPPED_TOOLS_HEADER: &str = "x-mlxd-dropped-tools";

/// The tools offered to the model, where its calls' names come from, and what was
/// left out.
#[derive(Default)]
struct Offered {
    tools: Vec<Tool>,
    names: CallNames,
    dropped: Vec<String>,
}

/// What a call's name says of the tool the client offered.
#[derive(Default)]
struct CallNames {
    /// A namespaced function's name -> its namespace (a call names both).
    namespaces: std::collections::HashMap<String, String>,
    /// Custom (freeform) tools: a call is a `custom_tool_call` with raw input.
    custom: std::collections::HashSet<String>,
}

#[derive(Debug, Deserialize)]
struct TextOptions {
    #[serde(default)]
    format: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ResponsesRequest {
    model: String,
    input: Input,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    text: Option<TextOptions>,
    #[serde(default)]
    reasoning: Option<ReasoningParam>,
    /// mlxd's thinking budget, as in chat completions.
    #[serde(default)]
    max_reasoning_tokens: Option<u32>,
    #[serde(default)]
    include: Option<Vec<String>>,
}

/// A message item's content: its text, and its parts in order when it has
/// `input_image`s (their `image_url` a data: URL, added to `images`).
fn content_turn(
    content: &Value,
    images: &mut Images,
) -> Result<(String, Vec<WireContentPart>), Error> {
    let mut turn = Turn::default();
    match content {
        Value::String(s) => turn.push_text(s),
        Value::Array(parts) => {
            for p in parts {
                match p["type"].as_str() {
                    Some("input_text" | "output_text" | "text") => {
                        turn.push_text(p["text"].as_str().unwrap_or_default())
                    }
                    Some("input_image") => {
                        let Some(url) = p["image_url"].as_str() else {
                            return Err(Error::invalid(
                                "an input_image needs its image_url (file_id is not served)",
                                Some("input"),
                            ));
                        };
                        turn.push_image(images.add_url(url, "input")?);
                    }
                    other => {
                        return Err(Error::invalid(
                            format!("content type '{}' is not supported", other.unwrap_or("?")),
                            Some("input"),
                        ))
                    }
                }
            }
        }
        _ => {
            return Err(Error::invalid(
                "a message's content must be text or parts",
                Some("input"),
            ))
        }
    }
    Ok(turn.finish())
}

/// Text of a content value that takes no images (a tool's output).
fn content_text(content: &Value) -> Result<String, Error> {
    let (text, parts) = content_turn(content, &mut Images::default())?;
    if !parts.is_empty() {
        return Err(Error::invalid(
            "a tool output's images are not served",
            Some("input"),
        ));
    }
    Ok(text)
}

fn str_field(item: &Value, key: &str) -> Result<String, Error> {
    item[key].as_str().map(str::to_owned).ok_or_else(|| {
        Error::invalid(
            format!(
                "input item '{}' needs '{key}'",
                item["type"].as_str().unwrap_or("message")
            ),
            Some("input"),
        )
    })
}

fn messages(
    instructions: Option<String>,
    input: Input,
    images: &mut Images,
) -> Result<Vec<ChatMessage>, Error> {
    let mut out = Vec::new();
    if let Some(text) = instructions.filter(|t| !t.is_empty()) {
        out.push(ChatMessage {
            role: "system".into(),
            content: text,
            ..Default::default()
        });
    }
    let items = match input {
        Input::Text(text) => vec![json!({"role": "user", "content": text})],
        Input::Items(items) => items,
    };
    // A reasoning item's text belongs to the assistant turn that follows it.
    let mut thought: Option<String> = None;
    for item in items {
        let kind = item["type"].as_str().unwrap_or("message");
        if kind == "reasoning" {
            let text = reasoning_text(&item)?;
            thought.get_or_insert_with(String::new).push_str(&text);
            continue;
        }
        let before = out.len();
        match kind {
            "message" => {
                let role = match item["role"].as_str() {
                    Some("developer" | "system") => "system",
                    Some("user") => "user",
                    Some("assistant") => "assistant",
                    other => {
                        return Err(Error::invalid(
                            format!("unknown role '{}'", other.unwrap_or("")),
                            Some("input"),
                        ))
                    }
                };
                let (content, parts) = content_turn(&item["content"], images)?;
                out.push(ChatMessage {
                    role: role.into(),
                    content,
                    parts,
                    ..Default::default()
                });
            }
            "function_call" | "custom_tool_call" => {
                let arguments = if kind == "custom_tool_call" {
                    json!({"input": str_field(&item, "input")?})
                } else {
                    let text = str_field(&item, "arguments")?;
                    serde_json::from_str(&text).unwrap_or(Value::String(text))
                };
                let call = MessageToolCall {
                    id: str_field(&item, "call_id")?,
                    name: str_field(&item, "name")?,
                    arguments,
                };
                // Calls made in one turn belong to one assistant message.
                match out.last_mut() {
                    Some(m) if m.role == "assistant" => m.tool_calls.push(call),
                    _ => out.push(ChatMessage {
                        role: "assistant".into(),
                        tool_calls: vec![call],
                        ..Default::default()
                    }),
                }
            }
            "function_call_output" | "custom_tool_call_output" => {
                let output = match &item["output"] {
                    Value::String(s) => s.clone(),
                    other => content_text(other)?,
                };
                out.push(ChatMessage {
                    role: "tool".into(),
                    content: output,
                    tool_call_id: Some(str_field(&item, "call_id")?),
                    ..Default::default()
                });
            }
            other => {
                return Err(Error::invalid(
                    format!("input item type '{other}' is not supported"),
                    Some("input"),
                ))
            }
        }
        if let Some(last) = out.last_mut().filter(|m| m.role == "assistant") {
            if let Some(text) = thought.take() {
                last.reasoning = Some(text);
            }
        } else if out.len() > before {
            thought = None; // a user or tool turn came between: it stays unsaid
        }
    }
    if out.iter().all(|m| m.role == "system") {
        return Err(Error::invalid("input must not be empty", Some("input")));
    }
    Ok(out)
}

/// A reasoning input item's text (its `content` parts; a summary stands in when
/// only that came back).
fn reasoning_text(item: &Value) -> Result<String, Error> {
    if let Some(text) = item["encrypted_content"]
        .as_str()
        .and_then(|e| e.strip_prefix(ENCRYPTED_PREFIX))
        .and_then(decode_base64)
    {
        return Ok(text);
    }
    let parts = match (&item["content"], &item["summary"]) {
        (Value::Array(parts), _) if !parts.is_empty() => parts,
        (_, Value::Array(parts)) => parts,
        _ => return Ok(String::new()),
    };
    let mut text = String::new();
    for p in parts {
        match p["type"].as_str() {
            Some("reasoning_text" | "summary_text" | "text") => {
                text.push_str(p["text"].as_str().unwrap_or_default())
            }
            other => {
                return Err(Error::invalid(
                    format!(
                        "reasoning content type '{}' is not supported",
                        other.unwrap_or("?")
                    ),
                    Some("input"),
                ))
            }
        }
    }
    Ok(text)
}

fn decode_base64(text: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    String::from_utf8(bytes).ok()
}

fn encode_base64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// Functions as they are; a `namespace` tool's functions flattened into the
/// list (a call then names its namespace); hosted tools dropped.
fn tools(tools: Option<Vec<InTool>>) -> Result<Offered, Error> {
    let mut offered = Offered::default();
    for t in tools.unwrap_or_default() {
        match (t.kind.as_str(), t.name) {
            ("function", Some(name)) => {
                offered
                    .tools
                    .push(request::tool(name, t.description, t.parameters)?)
            }
            ("namespace", Some(space)) => {
                for f in t.tools.unwrap_or_default() {
                    let Some(name) = f.name.filter(|_| f.kind == "function") else {
                        return Err(Error::invalid(
                            format!(
                                "namespace '{space}' holds a tool that is not a named function"
                            ),
                            Some("tools"),
                        ));
                    };
                    if offered
                        .names
                        .namespaces
                        .insert(name.clone(), space.clone())
                        .is_some()
                    {
                        return Err(Error::invalid(
                            format!("the function '{name}' is in two namespaces"),
                            Some("tools"),
                        ));
                    }
                    offered
                        .tools
                        .push(request::tool(name, f.description, f.parameters)?);
                }
            }
            ("custom", Some(name)) => {
                offered.names.custom.insert(name.clone());
                offered
                    .tools
                    .push(custom_tool(name, t.description, t.format)?);
            }
            (kind, _) if is_hosted(kind) => offered.dropped.push(kind.to_string()),
            ("function" | "namespace" | "custom", None) => {
                return Err(Error::invalid("a tool needs its name", Some("tools")))
            }
            (kind, _) => {
                return Err(Error::invalid(
                    format!(
                        "tool type '{kind}' is not supported (only 'function', 'namespace' and 'custom')"
                    ),
                    Some("tools"),
                ))
            }
        }
    }
    if let Some(dup) = duplicate_name(&offered.tools) {
        return Err(Error::invalid(
            format!("two tools are named '{dup}'"),
            Some("tools"),
        ));
    }
    Ok(offered)
}

fn duplicate_name(tools: &[Tool]) -> Option<&str> {
    let mut seen = std::collections::HashSet::new();
    tools
        .iter()
        .map(|t| t.name.as_str())
        .find(|name| !seen.insert(*name))
}

/// "none" | "auto" | "required" | {"type": "function", "name": ...}.
fn tool_choice(v: Option<Value>, tools: &[Tool]) -> Result<ToolChoice, Error> {
    let choice = match v {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required,
        Some(Value::Object(o))
            if matches!(o.get("type").and_then(Value::as_str), Some("function" | "custom")) =>
        {
            match o.get("name").and_then(Value::as_str) {
                Some(name) => ToolChoice::Function(name.to_string()),
                None => return Err(Error::invalid("tool_choice needs the function's name", Some("tool_choice"))),
            }
        }
        Some(_) => {
            return Err(Error::invalid(
                "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"name\": ...}",
                Some("tool_choice"),
            ))
        }
    };
    request::forced_tool_is_known(&choice, tools, "tool_choice")?;
    Ok(choice)
}

fn output_format(text: Option<TextOptions>) -> Result<Option<OutputFormat>, Error> {
    let Some(format) = text.and_then(|t| t.format) else {
        return Ok(None);
    };
    match format["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::JsonObject)),
        Some("json_schema") if format["schema"].is_object() => Ok(Some(OutputFormat::JsonSchema {
            schema: format["schema"].clone(),
            strict: format["strict"].as_bool().unwrap_or(false),
        })),
        _ => Err(Error::invalid(
            "text.format must be text, json_object, or json_schema with a schema",
            Some("text.format"),
        )),
    }
}

struct Parsed {
    model: String,
    gen: worker_protocol::frame::Generate,
    stream: bool,
    /// Echoed in the response object.
    echo: Value,
    shape: ReasoningShape,
    /// Namespaced and custom tools' names, and the hosted tools left out.
    names: CallNames,
    dropped: Vec<String>,
}

/// What a reasoning item carries besides its text: the thinking as its summary
/// too (`reasoning.summary`), and as `encrypted_content` (`include`).
#[derive(Clone, Copy, Default)]
struct ReasoningShape {
    summary: bool,
    encrypted: bool,
}

fn parse(map: serde_json::Map<String, Value>, preset_max: u32) -> Result<Parsed, Error> {
    request::check_fields(&map, &[FIELDS])?;
    if let Some(id) = map.get("previous_response_id").filter(|v| !v.is_null()) {
        return Err(Error::invalid(
            format!("previous_response_id ({id}) is not supported: mlxd stores no responses; send the conversation as input"),
            Some("previous_response_id"),
        ));
    }
    let echo = json!({
        "instructions": map.get("instructions").cloned().unwrap_or(Value::Null),
        "tools": map.get("tools").cloned().unwrap_or(json!([])),
        "tool_choice": map.get("tool_choice").cloned().unwrap_or(json!("auto")),
        // null: the model's own default (README "Sampling defaults").
        "temperature": map.get("temperature").cloned().unwrap_or(Value::Null),
        "top_p": map.get("top_p").cloned().unwrap_or(Value::Null),
        "max_output_tokens": map.get("max_output_tokens").cloned().unwrap_or(Value::Null),
        "text": map.get("text").cloned().unwrap_or(json!({"format": {"type": "text"}})),
        "reasoning": map.get("reasoning").cloned().unwrap_or(json!({"effort": null, "summary": null})),
    });
    let req: ResponsesRequest = request::from_object(map)?;
    let mut gen = request::SamplingParams {
        max_tokens: req.max_output_tokens.unwrap_or(preset_max),
        temperature: req.temperature,
        top_p: req.top_p,
        stop: vec![],
        seed: None,
    }
    .to_generate()?;
    let mut images = Images::default();
    gen.messages = Some(messages(req.instructions, req.input, &mut images)?);
    gen.images = images.files;
    let offered = tools(req.tools)?;
    gen.tools = offered.tools;
    gen.tool_choice = tool_choice(req.tool_choice, &gen.tools)?;
    gen.format = output_format(req.text)?.map(Box::new);
    request::forced_call_wins(&mut gen);
    let (effort, summary) = match req.reasoning {
        Some(r) => (r.effort, r.summary),
        None => (None, None),
    };
    gen.reasoning = request::reasoning(
        None,
        effort.as_deref(),
        req.max_reasoning_tokens,
        "reasoning.effort",
    )?;
    let summary = match summary.as_deref() {
        None | Some("none") => false,
        Some("auto" | "concise" | "detailed") => true,
        Some(other) => {
            return Err(Error::invalid(
                format!("reasoning.summary '{other}' is not one of auto, concise, detailed"),
                Some("reasoning.summary"),
            ))
        }
    };
    let include = req.include.unwrap_or_default();
    if let Some(other) = include.iter().find(|i| *i != INCLUDE_REASONING) {
        return Err(Error::invalid(
            format!("include '{other}' is not supported (only '{INCLUDE_REASONING}')"),
            Some("include"),
        ));
    }
    let shape = ReasoningShape {
        summary,
        encrypted: !include.is_empty(),
    };
    Ok(Parsed {
        model: req.model,
        gen,
        stream: req.stream,
        echo,
        shape,
        names: offered.names,
        dropped: offered.dropped,
    })
}

/// Fuzz entry: any body ends as an error or a Generate, never a panic.
pub fn fuzz_request(body: &[u8]) {
    if let Ok(map) = request::parse_object(&Bytes::copy_from_slice(body)) {
        let _ = parse(map, crate::presets::DEFAULT_MAX_TOKENS);
    }
}

pub async fn responses(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let map = request::parse_object(&body)?;
    let target = Target::of_body(&state, &map)?;
    let parsed = parse(map, Target::default_max_tokens(target.as_ref()))?;
    let target = Target::required(target)?;
    if !parsed.dropped.is_empty() {
        tracing::info!(tools = ?parsed.dropped, "hosted tools left out: a local server cannot run them");
    }
    let dropped = parsed.dropped.join(",");
    let shell = Shell {
        id: core::new_id("resp"),
        model: parsed.model.clone(),
        created_at: unix_now(),
        echo: parsed.echo,
    };
    let started = core::start(
        &state,
        core::CoreRequest {
            target,
            gen: parsed.gen,
            keep_alive: None,
        },
    )
    .await?;
    if parsed.stream {
        let renderer = ResponsesStream {
            shell,
            seq: 0,
            output: Vec::new(),
            text_item: None,
            reasoning_item: None,
            shape: parsed.shape,
            names: parsed.names,
        };
        return Ok(with_dropped(
            core::stream(started, renderer, core::Framing::Sse),
            &dropped,
        ));
    }
    let c = core::collect(started).await?;
    let mut output = Vec::new();
    if !c.reasoning.is_empty() {
        output.push(reasoning_item(
            &core::new_id("rs"),
            &c.reasoning,
            parsed.shape,
        ));
    }
    if !c.text.is_empty() {
        let status = item_status(&c.done);
        output.push(message_item(&core::new_id("msg"), &c.text, status));
    }
    output.extend(
        c.tool_calls
            .iter()
            .map(|call| call_item(call, "completed", &parsed.names)),
    );
    let response = axum::Json(shell.response(output, Some(&c.done))).into_response();
    Ok(with_dropped(response, &dropped))
}

/// Names the hosted tools left out of the request, when there were any.
fn with_dropped(mut response: Response, dropped: &str) -> Response {
    if let Ok(value) = axum::http::HeaderValue::from_str(dropped) {
        if !dropped.is_empty() {
            response.headers_mut().insert(DROPPED_TOOLS_HEADER, value);
        }
    }
    response
}

/// The response object's fixed parts.
struct Shell {
    id: String,
    model: String,
    created_at: u64,
    echo: Value,
}

impl Shell {
    /// The response object; `done` None while in progress.
    fn response(&self, output: Vec<Value>, done: Option<&Done>) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
            "status": "in_progress", "output": output, "error": null, "incomplete_details": null,
            "parallel_tool_calls": true, "metadata": {}, "usage": null,
        });
        for (k, v) in self.echo.as_object().into_iter().flatten() {
            r[k] = v.clone();
        }
        if let Some(done) = done {
            if done.finish_reason == "length" {
                r["status"] = json!("incomplete");
                r["incomplete_details"] = json!({"reason": "max_output_tokens"});
            } else {
                r["status"] = json!("completed");
            }
            let mut usage = json!({
                "input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
                "input_tokens_details": {"cached_tokens": done.cached_tokens},
                "output_tokens_details": {"reasoning_tokens": done.reasoning_tokens},
            });
            if let Some(counts) = &done.speculative {
                usage["mlxd"] = core::speculative_usage(counts);
            }
            r["usage"] = usage;
        }
        r
    }
}

/// A message item's status at the end: cut by `max_output_tokens` or whole.
fn item_status(done: &Done) -> &'static str {
    if done.finish_reason == "length" {
        "incomplete"
    } else {
        "completed"
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "in_progress" {
        json!([])
    } else {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

/// A reasoning model's thinking: its text as `reasoning_text` content (mlxd
/// writes no summaries).
fn reasoning_item(id: &str, text: &str, shape: ReasoningShape) -> Value {
    let (content, summary) = if text.is_empty() {
        (json!([]), json!([]))
    } else {
        let summary = if shape.summary {
            json!([{"type": "summary_text", "text": text}])
        } else {
            json!([])
        };
        (json!([{"type": "reasoning_text", "text": text}]), summary)
    };
    let mut item = json!({"type": "reasoning", "id": id, "summary": summary, "content": content});
    if shape.encrypted && !text.is_empty() {
        item["encrypted_content"] = json!(format!("{ENCRYPTED_PREFIX}{}", encode_base64(text)));
    }
    item
}

/// A call's output item: a `function_call` (naming its namespace, when it has
/// one), or a `custom_tool_call` carrying the input as the model wrote it.
fn call_item(call: &ToolCallFrame, status: &str, names: &CallNames) -> Value {
    if names.custom.contains(&call.name) {
        return json!({"type": "custom_tool_call", "id": format!("ctc_{}", call.call_id),
            "call_id": call.call_id, "name": call.name, "input": custom_input(call), "status": status});
    }
    let mut item = json!({"type": "function_call", "id": format!("fc_{}", call.call_id),
        "call_id": call.call_id, "name": call.name, "arguments": call.arguments, "status": status});
    if let Some(space) = names.namespaces.get(&call.name) {
        item["namespace"] = json!(space);
    }
    item
}

/// A custom tool's input: the model called it as a function of one string.
fn custom_input(call: &ToolCallFrame) -> String {
    match serde_json::from_str::<Value>(&call.arguments) {
        Ok(Value::Object(mut args)) => match args.remove("input") {
            Some(Value::String(input)) => input,
            _ => call.arguments.clone(),
        },
        _ => call.arguments.clone(),
    }
}

/// A custom (freeform) tool as the model sees it: a function of one string,
/// `input`. A regex grammar becomes that string's `pattern`, so a constrained call
/// (a forced one) matches it; a Lark grammar is given in the description, and a
/// call forced to the tool writes its input raw, held to the grammar (worker).
fn custom_tool(
    name: String,
    description: Option<String>,
    format: Option<Value>,
) -> Result<Tool, Error> {
    let mut input = json!({"type": "string"});
    let mut description = description.unwrap_or_default();
    let mut grammar = None;
    let f = format.unwrap_or(Value::Null);
    match (f["type"].as_str(), f["syntax"].as_str(), f["definition"].as_str()) {
        (None, ..) if f.is_null() => {}
        (Some("text"), ..) => {}
        // Anchored: a JSON schema's pattern searches, a grammar matches the whole input.
        (Some("grammar"), Some("regex"), Some(regex)) => {
            input["pattern"] = json!(format!("^(?:{regex})$"));
        }
        (Some("grammar"), Some("lark"), Some(lark)) => {
            description.push_str(&format!(
                "\n\nThe input is text in this Lark grammar:\n{lark}"
            ));
            grammar = Some(lark.to_string());
        }
        _ => {
            return Err(Error::invalid(
                format!(
                    "custom tool '{name}': format must be {{\"type\": \"text\"}} or \
                     {{\"type\": \"grammar\", \"syntax\": \"lark\" or \"regex\", \"definition\": ...}}"
                ),
                Some("tools"),
            ))
        }
    }
    let parameters = json!({"type": "object", "properties": {"input": input},
        "required": ["input"], "additionalProperties": false});
    let mut tool = request::tool(
        name,
        (!description.is_empty()).then_some(description),
        Some(parameters),
    )?;
    tool.lark = grammar;
    Ok(tool)
}

/// The typed event stream: `response.created`, `response.in_progress`, per output
/// item `output_item.added` ... `output_item.done` (text parts with their
/// deltas, function calls with their arguments), then `response.completed`.
struct ResponsesStream {
    shell: Shell,
    seq: u64,
    /// Finished output items, for the final response object.
    output: Vec<Value>,
    /// The open message item: its id and text so far.
    text_item: Option<(String, String)>,
    /// The open reasoning item: its id and text so far.
    reasoning_item: Option<(String, String)>,
    shape: ReasoningShape,
    names: CallNames,
}

impl ResponsesStream {
    fn event(&mut self, out: &mut Vec<u8>, kind: &str, mut body: Value) {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        core::sse_event(out, kind, &body);
    }

    fn close_reasoning(&mut self, out: &mut Vec<u8>) {
        let Some((id, text)) = self.reasoning_item.take() else {
            return;
        };
        let index = self.output.len();
        self.event(
            out,
            "response.reasoning_text.done",
            json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
        );
        if self.shape.summary {
            let at = json!({"item_id": id, "output_index": index, "summary_index": 0});
            let mut done = at.clone();
            done["text"] = json!(text);
            self.event(out, "response.reasoning_summary_text.done", done);
            let mut part = at;
            part["part"] = json!({"type": "summary_text", "text": text});
            self.event(out, "response.reasoning_summary_part.done", part);
        }
        let item = reasoning_item(&id, &text, self.shape);
        self.event(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.output.push(item);
    }

    fn close_text(&mut self, out: &mut Vec<u8>, status: &str) {
        let Some((id, text)) = self.text_item.take() else {
            return;
        };
        let index = self.output.len();
        let part = json!({"type": "output_text", "text": text, "annotations": []});
        self.event(out, "response.output_text.done",
            json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
        self.event(
            out,
            "response.content_part.done",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        );
        let item = message_item(&id, &text, status);
        self.event(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.output.push(item);
    }
}

impl core::Renderer for ResponsesStream {
    fn open(&mut self, out: &mut Vec<u8>) {
        let r = self.shell.response(vec![], None);
        self.event(out, "response.created", json!({"response": r}));
        self.event(out, "response.in_progress", json!({"response": r}));
    }

    fn reasoning(&mut self, text: &str, out: &mut Vec<u8>) {
        self.close_text(out, "completed");
        let index = self.output.len();
        if self.reasoning_item.is_none() {
            let id = core::new_id("rs");
            let item = reasoning_item(&id, "", self.shape);
            self.event(
                out,
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            if self.shape.summary {
                self.event(out, "response.reasoning_summary_part.added", json!({"item_id": id,
                    "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": ""}}));
            }
            self.reasoning_item = Some((id, String::new()));
        }
        let id = {
            let (id, so_far) = self.reasoning_item.as_mut().expect("opened above");
            so_far.push_str(text);
            id.clone()
        };
        self.event(
            out,
            "response.reasoning_text.delta",
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text}),
        );
        if self.shape.summary {
            self.event(
                out,
                "response.reasoning_summary_text.delta",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": text}),
            );
        }
    }

    fn text(&mut self, text: &str, _logprobs: Vec<TokenLogprob>, out: &mut Vec<u8>) {
        self.close_reasoning(out);
        let index = self.output.len();
        if self.text_item.is_none() {
            let id = core::new_id("msg");
            self.event(
                out,
                "response.output_item.added",
                json!({"output_index": index, "item": message_item(&id, "", "in_progress")}),
            );
            self.event(out, "response.content_part.added", json!({"item_id": id, "output_index": index,
                "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}));
            self.text_item = Some((id, String::new()));
        }
        let id = {
            let (id, so_far) = self.text_item.as_mut().expect("opened above");
            so_far.push_str(text);
            id.clone()
        };
        self.event(out, "response.output_text.delta",
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text, "logprobs": []}));
    }

    fn tool_call(&mut self, call: ToolCallFrame, out: &mut Vec<u8>) {
        self.close_reasoning(out);
        self.close_text(out, "completed");
        let index = self.output.len();
        let item = call_item(&call, "completed", &self.names);
        // A custom tool's input streams as such, a function's arguments as theirs.
        let (field, events) = if item["type"] == "custom_tool_call" {
            ("input", "response.custom_tool_call_input")
        } else {
            ("arguments", "response.function_call_arguments")
        };
        let text = item[field].clone();
        let mut added = item.clone();
        added[field] = json!("");
        added["status"] = json!("in_progress");
        let id = item["id"].clone();
        self.event(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": added}),
        );
        self.event(
            out,
            &format!("{events}.delta"),
            json!({"item_id": id, "output_index": index, "delta": text}),
        );
        let mut finished = json!({"item_id": id, "output_index": index, field: text});
        if field == "arguments" {
            finished["name"] = json!(call.name);
        }
        self.event(out, &format!("{events}.done"), finished);
        self.event(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.output.push(item);
    }

    fn done(&mut self, done: Done, _logprobs: Vec<TokenLogprob>, out: &mut Vec<u8>) {
        self.close_reasoning(out);
        self.close_text(out, item_status(&done));
        let r = self
            .shell
            .response(std::mem::take(&mut self.output), Some(&done));
        let kind = if done.finish_reason == "length" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.event(out, kind, json!({"response": r}));
    }

    fn error(&mut self, e: &Error, out: &mut Vec<u8>) {
        self.event(
            out,
            "error",
            json!({"code": e.code(), "message": e.to_string(), "param": e.param()}),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codex_tools_are_flattened_and_hosted_ones_left_out() {
        let f = |name: &str| json!({"type": "function", "name": name, "parameters": {"type": "object"}});
        let body = json!({
            "model": "m", "input": "hi", "store": false, "parallel_tool_calls": true,
            "client_metadata": {"session_id": "s"}, "prompt_cache_key": "k",
            "include": ["reasoning.encrypted_content"], "reasoning": {"summary": "auto"},
            "tools": [f("exec_command"),
                      {"type": "namespace", "name": "multi_agent_v1", "description": "agents",
                       "tools": [f("close_agent"), f("spawn_agent")]},
                      {"type": "web_search", "external_web_access": false},
                      {"type": "web_search_preview_2025_03_11"}],
        });
        let p = parse(
            request::parse_object(&Bytes::from(body.to_string())).unwrap(),
            64,
        )
        .unwrap();
        let names: Vec<&str> = p.gen.tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["exec_command", "close_agent", "spawn_agent"]);
        assert_eq!(p.names.namespaces["spawn_agent"], "multi_agent_v1");
        assert_eq!(p.dropped, ["web_search", "web_search_preview_2025_03_11"]);
        for unknown in ["web_search_2025", "web_searcher", "file_search_2025_03_1x"] {
            let body = json!({"model": "m", "input": "hi", "tools": [{"type": unknown}]});
            let Err(err) = parse(
                request::parse_object(&Bytes::from(body.to_string())).unwrap(),
                64,
            ) else {
                panic!("tool type {unknown} was taken for a hosted tool");
            };
            assert!(err.to_string().contains(unknown), "{err}");
        }
        assert!(p.shape.summary && p.shape.encrypted);
        let call = ToolCallFrame {
            id: 1,
            index: 0,
            call_id: "call_1".into(),
            name: "spawn_agent".into(),
            arguments: "{}".into(),
        };
        assert_eq!(
            call_item(&call, "completed", &p.names)["namespace"],
            "multi_agent_v1"
        );
        let other = [
            ("include", json!(["file_search_call.results"])),
            ("reasoning", json!({"summary": "long"})),
        ];
        for (field, value) in other {
            let mut bad = body.clone();
            bad[field] = value;
            let e = parse(
                request::parse_object(&Bytes::from(bad.to_string())).unwrap(),
                64,
            );
            assert!(e.is_err(), "{field}");
        }
    }

    #[test]
    fn items_become_the_core_messages() {
        let body = json!({
            "model": "m", "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{\"city\":\"Rome\"}"},
                {"type": "function_call_output", "call_id": "c1", "output": "18C"},
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "text"}},
        });
        let p = parse(
            request::parse_object(&Bytes::from(body.to_string())).unwrap(),
            64,
        )
        .unwrap();
        let m = p.gen.messages.unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(
            m[2].tool_calls.len(),
            2,
            "calls of one turn share a message"
        );
        assert_eq!(m[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(
            p.gen.tool_choice,
            ToolChoice::Function("get_weather".into())
        );
        assert_eq!(p.gen.max_tokens, 64);
    }

    #[test]
    fn stored_state_and_unknown_items_are_refused() {
        for (body, field) in [
            (
                json!({"model": "m", "input": "hi", "previous_response_id": "resp_1"}),
                "previous_response_id",
            ),
            (
                json!({"model": "m", "input": "hi", "reasoning": {"effort": "extreme"}}),
                "reasoning.effort",
            ),
            (
                json!({"model": "m", "input": [{"type": "input_image"}]}),
                "input",
            ),
            (
                json!({"model": "m", "input": "hi", "tools": [{"type": "custom", "name": "x",
                    "format": {"type": "grammar", "syntax": "ebnf", "definition": "x"}}]}),
                "tools",
            ),
        ] {
            match parse(
                request::parse_object(&Bytes::from(body.to_string())).unwrap(),
                64,
            ) {
                Err(Error::InvalidRequest { param, .. }) => {
                    assert_eq!(param.as_deref(), Some(field))
                }
                other => panic!("{field}: {:?}", other.map(|p| p.model)),
            }
        }
    }

    #[test]
    fn custom_tools_are_functions_of_one_string() {
        let body = json!({
            "model": "m",
            "input": [
                {"role": "user", "content": "patch it"},
                {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch"},
                {"type": "custom_tool_call_output", "call_id": "c1", "output": "done"},
            ],
            "tools": [
                {"type": "custom", "name": "apply_patch", "description": "Edit files",
                 "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
                {"type": "custom", "name": "shout",
                 "format": {"type": "grammar", "syntax": "regex", "definition": "[A-Z]{3,8}"}},
                {"type": "custom", "name": "note"},
            ],
            "tool_choice": {"type": "custom", "name": "shout"},
        });
        let p = parse(
            request::parse_object(&Bytes::from(body.to_string())).unwrap(),
            64,
        )
        .unwrap();
        let tool = |name: &str| p.gen.tools.iter().find(|t| t.name == name).unwrap();
        assert!(tool("apply_patch")
            .description
            .as_deref()
            .unwrap()
            .contains("start: /.+/"));
        assert_eq!(tool("apply_patch").lark.as_deref(), Some("start: /.+/"));
        assert_eq!(tool("shout").lark, None);
        assert_eq!(
            tool("shout").parameters["properties"]["input"]["pattern"],
            "^(?:[A-Z]{3,8})$"
        );
        assert_eq!(tool("note").parameters["required"], json!(["input"]));
        assert_eq!(p.gen.tool_choice, ToolChoice::Function("shout".into()));
        // The history's call and its output, as any tool call and result.
        let messages = p.gen.messages.as_ref().unwrap();
        assert_eq!(
            messages[1].tool_calls[0].arguments,
            json!({"input": "*** Begin Patch"})
        );
        assert_eq!(messages[2].role, "tool");
        assert_eq!(messages[2].tool_call_id.as_deref(), Some("c1"));
        // The model's call comes back as a custom_tool_call with the raw input.
        let call = ToolCallFrame {
            id: 1,
            index: 0,
            call_id: "call_1".into(),
            name: "shout".into(),
            arguments: r#"{"input": "HELLO"}"#.into(),
        };
        let item = call_item(&call, "completed", &p.names);
        assert_eq!(item["type"], "custom_tool_call");
        assert_eq!(item["input"], "HELLO");
    }
}
