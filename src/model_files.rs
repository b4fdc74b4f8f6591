//! What a model's own files say: the weights' size and the facts of its
//! `config.json`, read in one place for the model lists (Ollama's and OpenAI's),
//! the memory estimate and the worker's context limit.

use std::path::Path;

use serde_json::Value;

/// A fact of a model's config.json. A wrapped model (vision-language, some MoE)
/// keeps its text model's facts in `text_config`.
pub fn config_field<'a>(config: &'a Value, key: &str) -> Option<&'a Value> {
    config
        .get(key)
        .or_else(|| config.get("text_config").and_then(|t| t.get(key)))
}

/// What a model's files say (Ollama's `/api/tags` and `/api/show`, OpenAI's
/// `/v1/models`): the weights' size and the facts of its `config.json`.
pub struct ModelFiles {
    pub size: u64,
    pub family: String,
    pub quantization: String,
    pub context_length: Option<u64>,
    pub config: Value,
}

impl ModelFiles {
    pub fn read(dir: Option<&Path>) -> ModelFiles {
        let size = dir
            .and_then(|d| std::fs::read_dir(d).ok())
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        let config: Value = dir
            .and_then(|d| std::fs::read_to_string(d.join("config.json")).ok())
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        let field = |key: &str| config_field(&config, key).cloned();
        let quantization = match config
            .get("quantization")
            .and_then(|q| q.get("bits"))
            .and_then(Value::as_u64)
        {
            Some(bits) => format!("Q{bits}"),
            None => config
                .get("torch_dtype")
                .and_then(Value::as_str)
                .map_or("F16", |d| match d {
                    "float32" => "F32",
                    "bfloat16" => "BF16",
                    _ => "F16",
                })
                .to_string(),
        };
        ModelFiles {
            size,
            family: field("model_type")
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            quantization,
            context_length: field("max_position_embeddings").and_then(|v| v.as_u64()),
            config,
        }
    }
}
