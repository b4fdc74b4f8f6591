//! The request rules every dialect shares: a body parsed once, the fields a
//! dialect cannot honour refused by name, the model resolved to its preset once
//! ([`Target`]), sampling limits, keep-alive, tools and `tool_choice`, logprobs,
//! and the one rule output formats share. A dialect maps its own field names
//! onto these and never imports another dialect.

use std::sync::Arc;

use axum::body::Bytes;
use serde::Deserialize;
use serde_json::Value;
use worker_protocol::frame::{Embed, Generate, ReasoningOptions, Tool, ToolChoice};

use super::AppState;
use crate::error::Error;
use crate::presets::{KeepAlive, Preset, DEFAULT_MAX_TOKENS};

/// The model a request names, resolved to its preset once: the default
/// max_tokens, the transport, the metrics label and the supervisor's slot all
/// come from here, so an alias is looked up once per request.
#[derive(Clone)]
pub struct Target {
    /// The name the client sent (an alias stays an alias in responses).
    pub requested: String,
    pub preset: Arc<Preset>,
}

impl Target {
    /// `model` among the presets in force; a name not known is a 404.
    pub fn resolve(state: &AppState, model: &str) -> Result<Target, Error> {
        Ok(Target {
            requested: model.to_string(),
            preset: state.supervisor.resolve(model)?,
        })
    }

    /// The request map's model, resolved before the full parse (its preset gives
    /// the default max_tokens). `None` when the body has no model string: the
    /// full parse then names what is missing.
    pub fn of_body(
        state: &AppState,
        map: &serde_json::Map<String, Value>,
    ) -> Result<Option<Target>, Error> {
        match map.get("model").and_then(Value::as_str) {
            Some(model) if !model.is_empty() => Target::resolve(state, model).map(Some),
            _ => Ok(None),
        }
    }

    /// The max_tokens of a request that names none.
    pub fn default_max_tokens(target: Option<&Target>) -> u32 {
        target.map_or(DEFAULT_MAX_TOKENS, |t| t.preset.max_tokens)
    }

    /// The target after a full parse, which succeeds only with a model string.
    pub fn required(target: Option<Target>) -> Result<Target, Error> {
        target.ok_or_else(|| Error::invalid("model is required", Some("model")))
    }
}

/// Parses a JSON body into a map; a body that is not a JSON object is a 400.
pub fn parse_object(body: &Bytes) -> Result<serde_json::Map<String, Value>, Error> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::invalid(
            "the request body must be a JSON object",
            None,
        )),
        Err(e) => Err(Error::invalid(
            format!("could not parse the JSON body of the request: {e}"),
            None,
        )),
    }
}

/// A body parsed as a dialect's request: its model resolved, its fields checked
/// against `rules`, then deserialized (for routes with no defaults from the preset).
pub fn parse_checked<T: for<'de> Deserialize<'de>>(
    state: &AppState,
    body: &Bytes,
    rules: &[&[(&str, FieldRule)]],
) -> Result<(Target, T), Error> {
    let map = parse_object(body)?;
    let target = Target::of_body(state, &map)?;
    check_fields(&map, rules)?;
    let req = from_object(map)?;
    Ok((Target::required(target)?, req))
}

/// Deserializes a checked object into a dialect's request type.
pub fn from_object<T: for<'de> Deserialize<'de>>(
    map: serde_json::Map<String, Value>,
) -> Result<T, Error> {
    serde_json::from_value(Value::Object(map))
        .map_err(|e| Error::invalid(format!("invalid request: {e}"), None))
}

/// How a dialect treats one of its request's fields.
pub enum FieldRule {
    /// Honoured.
    Served,
    /// Accepted and without effect here (`user`, `metadata`): no output differs.
    Ignored,
    /// Accepted only when it asks for nothing (e.g. a penalty of 0).
    OnlyNeutral(fn(&Value) -> bool),
}

/// Refuses, with a 400 that names it, any field the dialect cannot honour: a
/// request is never served as if a field it sent had been applied.
pub fn check_fields(
    map: &serde_json::Map<String, Value>,
    rule_sets: &[&[(&str, FieldRule)]],
) -> Result<(), Error> {
    for (key, value) in map {
        let rule = rule_sets
            .iter()
            .flat_map(|rules| rules.iter())
            .find(|(name, _)| name == key);
        match rule {
            Some((_, FieldRule::Served | FieldRule::Ignored)) => {}
            Some((_, FieldRule::OnlyNeutral(neutral))) => {
                if !value.is_null() && !neutral(value) {
                    return Err(Error::invalid(
                        format!(
                            "'{key}' is not supported by mlxd (only its neutral value is accepted)"
                        ),
                        Some(key),
                    ));
                }
            }
            None => {
                return Err(Error::invalid(
                    format!("'{key}' is not supported by mlxd"),
                    Some(key),
                ))
            }
        }
    }
    Ok(())
}

/// A number that is zero (a penalty that changes nothing).
pub fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

/// An empty object or array.
pub fn is_empty(v: &Value) -> bool {
    v.as_object().is_some_and(|m| m.is_empty()) || v.as_array().is_some_and(|a| a.is_empty())
}

/// Checks a tool as any dialect declares it: a name models can write, and an
/// object schema for its arguments.
pub fn tool(
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
) -> Result<Tool, Error> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !valid {
        return Err(Error::invalid(
            format!("tool name '{name}' must be 1-64 letters, digits, '_', '-' or '.'"),
            Some("tools"),
        ));
    }
    let parameters =
        parameters.unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
    if !parameters.is_object() {
        return Err(Error::invalid(
            format!("the parameters of tool '{name}' must be a JSON schema object"),
            Some("tools"),
        ));
    }
    Ok(Tool {
        name,
        description,
        parameters,
        lark: None,
    })
}

/// A forced tool call decides the whole answer: an output format sent with it
/// (instructor's Responses tools mode sends both) has nothing left to shape, so
/// the call wins and the format is dropped.
pub fn forced_call_wins(gen: &mut Generate) {
    let forced = matches!(
        gen.tool_choice,
        worker_protocol::frame::ToolChoice::Required
            | worker_protocol::frame::ToolChoice::Function(_)
    );
    if forced {
        gen.format = None;
    }
}

/// `logprobs: true` with `top_logprobs` alternatives (0..=20), as OpenAI's chat
/// and Ollama take them.
pub fn logprobs_request(logprobs: Option<bool>, top: Option<u8>) -> Result<Option<u8>, Error> {
    const MAX_TOP_LOGPROBS: u8 = 20;
    match (logprobs, top) {
        (Some(true), n) if n.unwrap_or(0) <= MAX_TOP_LOGPROBS => Ok(Some(n.unwrap_or(0))),
        (Some(true), _) => Err(Error::invalid(
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            Some("top_logprobs"),
        )),
        (_, Some(_)) => Err(Error::invalid(
            "top_logprobs needs logprobs: true",
            Some("top_logprobs"),
        )),
        _ => Ok(None),
    }
}

/// Stop sequences per request, and the longest one (the worker holds back this
/// much text while it checks for them).
pub const MAX_STOPS: usize = 4;
const MAX_STOP_LEN: usize = 256;

/// Largest max_tokens accepted; the worker also refuses prompts past the context.
pub const MAX_TOKENS_LIMIT: u32 = 131_072;

/// The sampling settings every dialect maps onto, checked once.
pub struct SamplingParams {
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
}

impl SamplingParams {
    /// A Generate with these settings (the caller adds the input and the rest).
    pub fn to_generate(&self) -> Result<Generate, Error> {
        let max_tokens = self.max_tokens;
        if max_tokens == 0 || max_tokens > MAX_TOKENS_LIMIT {
            return Err(Error::invalid(
                format!("max_tokens must be between 1 and {MAX_TOKENS_LIMIT}"),
                Some("max_tokens"),
            ));
        }
        // Absent: the worker takes the model's own default (generation_config.json).
        let (temperature, top_p) = (self.temperature, self.top_p);
        if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(Error::invalid(
                "temperature must be between 0 and 2",
                Some("temperature"),
            ));
        }
        if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(Error::invalid("top_p must be in (0, 1]", Some("top_p")));
        }
        if self.stop.len() > MAX_STOPS {
            return Err(Error::invalid(
                format!("at most {MAX_STOPS} stop sequences"),
                Some("stop"),
            ));
        }
        if self
            .stop
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_LEN)
        {
            return Err(Error::invalid(
                format!("each stop sequence must be 1 to {MAX_STOP_LEN} bytes"),
                Some("stop"),
            ));
        }
        Ok(Generate {
            max_tokens,
            temperature,
            top_p,
            stop: self.stop.clone(),
            seed: self.seed,
            ..Default::default()
        })
    }
}

/// Ollama's keep-alive forms: "5m", "0", "-1" or a number of seconds.
pub fn keep_alive(value: &Option<Value>) -> Result<Option<KeepAlive>, Error> {
    let parsed = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => KeepAlive::parse(s),
        Some(Value::Number(n)) => KeepAlive::from_seconds(n.as_f64().unwrap_or(f64::NAN)),
        Some(_) => Err("keep_alive must be a duration string or a number of seconds".into()),
    };
    parsed
        .map(Some)
        .map_err(|e| Error::invalid(e, Some("keep_alive")))
}

/// `tool_choice`: "none" | "auto" | "required" | {"type": "function", "function": {"name"}}.
pub fn tool_choice(v: Option<Value>, tools: &[Tool]) -> Result<ToolChoice, Error> {
    let bad = || {
        Error::invalid(
            "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            Some("tool_choice"),
        )
    };
    let choice = match v {
        None | Some(Value::Null) => return Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => return Err(bad()),
        },
        Some(Value::Object(o)) => match o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
        {
            Some(name) => ToolChoice::Function(name.to_string()),
            None => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    forced_tool_is_known(&choice, tools, "tool_choice")?;
    Ok(choice)
}

/// A forced call needs tools, and a named one must be among them.
pub fn forced_tool_is_known(choice: &ToolChoice, tools: &[Tool], field: &str) -> Result<(), Error> {
    match choice {
        ToolChoice::Required if tools.is_empty() => Err(Error::invalid(
            "a tool call is required but no tools were given",
            Some(field),
        )),
        ToolChoice::Function(name) if !tools.iter().any(|t| &t.name == name) => {
            Err(Error::invalid(
                format!("tool_choice names '{name}', which is not among the tools"),
                Some(field),
            ))
        }
        _ => Ok(()),
    }
}

/// A request's thinking, from its dialect's fields: `enabled` (a switch, e.g.
/// Ollama's `think: false`), an effort (OpenAI's `reasoning_effort`; "none" turns
/// thinking off) and a budget in tokens. None when the request says nothing.
pub fn reasoning(
    enabled: Option<bool>,
    effort: Option<&str>,
    max_tokens: Option<u32>,
    effort_field: &str,
) -> Result<Option<Box<ReasoningOptions>>, Error> {
    let (enabled, effort) = match effort {
        None => (enabled, None),
        Some("none") => (Some(false), None),
        // Chat templates know low, medium and high (GPT-OSS's "Reasoning: low").
        Some("minimal" | "low") => (enabled, Some("low")),
        Some(e @ ("medium" | "high")) => (enabled, Some(e)),
        Some(other) => {
            return Err(Error::invalid(
                format!("{effort_field} '{other}' is not one of none, minimal, low, medium, high"),
                Some(effort_field),
            ))
        }
    };
    if enabled.is_none() && effort.is_none() && max_tokens.is_none() {
        return Ok(None);
    }
    Ok(Some(Box::new(ReasoningOptions {
        enabled,
        effort: effort.map(str::to_owned),
        max_tokens,
    })))
}

/// What every accepted request satisfies (checked here, and by the fuzzer).
pub fn assert_generate(gen: &Generate) {
    assert!((1..=MAX_TOKENS_LIMIT).contains(&gen.max_tokens));
    assert!(gen.stop.len() <= MAX_STOPS);
    assert!(gen.top_p.is_none_or(|p| p > 0.0 && p <= 1.0));
    assert!(gen.temperature.is_none_or(|t| (0.0..=2.0).contains(&t)));
}

/// An embedding request's inputs as OpenAI and Ollama write them: one text, texts,
/// one input's token ids, or several inputs' token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbedInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// Inputs in one embedding request at most (OpenAI's limit).
pub const MAX_EMBED_INPUTS: usize = 2048;

/// The Embed frame for `input` (its `id` set by the supervisor). An input list
/// that is empty, too long, or holds an empty token list is refused naming `field`.
pub fn embed_frame(
    input: EmbedInput,
    truncate: bool,
    dimensions: Option<u32>,
    field: &str,
) -> Result<Embed, Error> {
    let (texts, tokens) = match input {
        EmbedInput::Text(t) => (vec![t], vec![]),
        EmbedInput::Texts(t) => (t, vec![]),
        EmbedInput::Tokens(ids) => (vec![], vec![ids]),
        EmbedInput::TokenLists(lists) => (vec![], lists),
    };
    let count = texts.len() + tokens.len();
    if count == 0 {
        return Err(Error::invalid(
            format!("{field} must not be empty"),
            Some(field),
        ));
    }
    if count > MAX_EMBED_INPUTS {
        return Err(Error::invalid(
            format!("{field} holds {count} inputs; at most {MAX_EMBED_INPUTS} per request"),
            Some(field),
        ));
    }
    if tokens.iter().any(Vec::is_empty) {
        return Err(Error::invalid(
            format!("{field} holds an empty list of token ids"),
            Some(field),
        ));
    }
    if dimensions == Some(0) {
        return Err(Error::invalid(
            "dimensions must be at least 1",
            Some("dimensions"),
        ));
    }
    Ok(Embed {
        id: 0,
        texts,
        tokens,
        truncate,
        dimensions,
        query: None,
    })
}
