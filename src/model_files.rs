//! What a model's own files say: the weights' size and the facts of its
//! `config.json`, read in one place for the model lists (Ollama's and OpenAI's),
//! the memory estimate and the worker's context limit.

use std::path::{Path, PathBuf};

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

/// The `model_type`s of the encoders the embedding engine serves
/// (python-worker/mlxd_worker/models/encoder.py `ENCODER_TYPES`).
pub const ENCODER_TYPES: &[&str] = &["bert", "roberta", "xlm-roberta", "modernbert"];

/// Whether the model in `dir` is an embedding model by its own files: an encoder
/// (its config.json's `model_type`), or a decoder whose sentence-transformers
/// `modules.json` has a Pooling module (Qwen3-Embedding). The daemon decides; the
/// worker runs the engine it is started with.
pub fn serves_embeddings(dir: &Path) -> bool {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
    };
    if read("config.json").is_some_and(|config| is_encoder(&config)) {
        return true;
    }
    read("modules.json")
        .as_ref()
        .and_then(Value::as_array)
        .is_some_and(|modules| {
            modules.iter().any(|m| {
                m.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.ends_with(".Pooling"))
            })
        })
}

fn is_encoder(config: &Value) -> bool {
    config
        .get("model_type")
        .and_then(Value::as_str)
        .is_some_and(|t| ENCODER_TYPES.contains(&t))
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
        let mut config: Value = dir
            .and_then(|d| std::fs::read_to_string(d.join("config.json")).ok())
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        // A config that names no dtype (mlx-lm's conversions often do not) gets
        // the one its weights are stored in: the activations' (and KV's) dtype.
        let named = config_field(&config, "torch_dtype")
            .or_else(|| config_field(&config, "dtype"))
            .is_some();
        if let (false, Some(obj), Some(dtype)) = (
            named,
            config.as_object_mut(),
            dir.and_then(weights_float_dtype),
        ) {
            obj.insert("torch_dtype".into(), dtype.into());
        }
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

/// The model's weights files, in name order.
fn weights_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    files
}

/// A safetensors file's header: each tensor's name, dtype and shape.
fn safetensors_header(path: &Path) -> Option<serde_json::Map<String, Value>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    // A header is a few MB at most; a sparse stand-in file has none.
    if len == 0 || len > 64 << 20 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).ok()?;
    serde_json::from_slice(&header).ok()
}

/// Names that only a vision tower's tensors have (mlx-vlm's `vision_tower`,
/// Hugging Face's `visual` and `vision_model`).
const VISION_TENSORS: &[&str] = &["vision_tower", "visual.", "vision_model", "vision_encoder"];

/// Whether the model in `dir` is a vision-language model: its config.json
/// describes a vision tower (`vision_config`, as mlx-vlm reads it) and its weights
/// hold one (mlx-lm's text-only conversions of such models keep the config but
/// drop the tower: those stay text models).
pub fn has_vision_tower(dir: &Path) -> bool {
    let configured = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .is_some_and(|config| config.get("vision_config").is_some_and(Value::is_object));
    if !configured {
        return false;
    }
    let vision = |name: &String| VISION_TENSORS.iter().any(|part| name.contains(part));
    // A sharded checkpoint's index names every tensor; else each file's header.
    let index = std::fs::read_to_string(dir.join("model.safetensors.index.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok());
    if let Some(map) = index
        .as_ref()
        .and_then(|i| i.get("weight_map"))
        .and_then(Value::as_object)
    {
        return map.keys().any(vision);
    }
    weights_files(dir)
        .iter()
        .filter_map(|f| safetensors_header(f))
        .any(|header| header.keys().any(vision))
}

/// The activations' dtype as the weights decide it, from the safetensors header
/// of the model's first weights file.
fn weights_float_dtype(dir: &Path) -> Option<&'static str> {
    let header = safetensors_header(weights_files(dir).first()?)?;
    let float = |v: &Value| match v.get("dtype").and_then(Value::as_str) {
        Some("F32") => Some("float32"),
        Some("BF16") => Some("bfloat16"),
        Some("F16") => Some("float16"),
        _ => None,
    };
    // The embedding's output is the first activation (a quantized one's scales
    // decide it: float32 scales promote float16 norms); then the norms.
    let named = |part: &str| {
        header
            .iter()
            .filter(|(name, _)| name.contains(part))
            .find_map(|(_, v)| float(v))
    };
    named("embed")
        .or_else(|| named("norm"))
        .or_else(|| header.values().find_map(float))
}
