//! The KV cache's bytes as a function of a sequence's tokens, read from a
//! model's own config.json for every attention kind mlx-lm builds a cache for
//! (docs/design/MEMORY.md): full attention (2 × KV heads × head dim per token),
//! MLA (the compressed latent and the rotary key, one "head"), sliding-window
//! layers (capped at their window), linear attention / SSM (a constant state per
//! sequence), a quantized KV cache (bits plus a scale and a bias per group) and a
//! rotating one (`max_kv_size`). Pure: the daemon's estimates, `mlxd estimate`,
//! `mlxd list` and the worker's per-sequence reservations all come from here.

use serde_json::Value;
use worker_protocol::frame::{KvShape, KvWindow};

use crate::model_files::config_field;

/// How a worker keeps its KV cache (a preset's `[performance]` keys), as far as
/// its size is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvLayout {
    /// Quantized to this many bits per element (None: the activation dtype).
    pub bits: Option<u32>,
    /// Elements sharing one scale and one bias when quantized.
    pub group_size: u32,
    /// A rotating cache that keeps only the last this-many tokens.
    pub max_tokens: Option<u32>,
}

/// What one decoder layer keeps, as mlx-lm's `make_cache` for the family builds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// Every token (mlx-lm's `KVCache`).
    Full,
    /// The last `window` tokens (`RotatingKVCache`).
    Window(u64),
    /// A constant state (`ArraysCache`: linear attention, SSM).
    Linear,
}

/// The bytes of one activation element: the model's dtype (`torch_dtype`, or
/// `dtype` in newer configs; `ModelFiles` fills it from the weights when the
/// config names none). Without one, a quantized checkpoint (GPT-OSS, MiniMax's
/// FP8) runs in 16 bits and anything else is taken as float32: the safe side.
pub fn activation_bytes(config: &Value) -> u64 {
    let dtype = config_field(config, "torch_dtype")
        .or_else(|| config_field(config, "dtype"))
        .and_then(Value::as_str);
    match dtype {
        Some("bfloat16" | "float16" | "half") => 2,
        Some(_) => 4,
        None if config.get("quantization").is_some()
            || config.get("quantization_config").is_some() =>
        {
            2
        }
        None => 4,
    }
}

/// The model's context in tokens (`max_position_embeddings`), when it says.
pub fn context_length(config: &Value) -> Option<u64> {
    config_field(config, "max_position_embeddings").and_then(Value::as_u64)
}

fn get(config: &Value, key: &str) -> Option<u64> {
    config_field(config, key).and_then(Value::as_u64)
}

fn family(config: &Value) -> &str {
    config_field(config, "model_type")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The families whose mlx-lm class builds its caches from the config's
/// `layer_types` (others, Qwen2/3 and Gemma 2 among them, cache every layer in
/// full whatever the list says); Gemma 3 and Qwen3-Next/3.5 list what their
/// pattern gives anyway.
const LAYER_TYPES_FAMILIES: [&str; 22] = [
    "afmoe",
    "exaone_moe",
    "gear",
    "gemma3",
    "gemma3_text",
    "gemma3n",
    "gemma4_text",
    "gpt_oss",
    "granitemoehybrid",
    "laguna",
    "lfm2",
    "lfm2_moe",
    "llama",
    "mellum",
    "ministral3",
    "olmo3",
    "olmo_hybrid",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_next",
    "step3p5",
    "spark2_5",
];

/// MLA families whose mlx-lm class caches full per-head keys and values rather
/// than the compressed latent.
const PER_HEAD_MLA_FAMILIES: [&str; 3] = ["deepseek_v2", "minicpm3", "youtu_llm"];

/// Each layer's kind, following mlx-lm's `make_cache`: the config's
/// `layer_types` when it has them; Gemma 3's `sliding_window_pattern` (every
/// p-th layer global); Qwen3-Next/3.5's `full_attention_interval` (every n-th
/// layer full, the rest linear); else full attention everywhere (Llama and
/// Mistral configs name a `sliding_window` that mlx-lm does not apply).
fn layers(config: &Value, count: u64) -> Vec<Layer> {
    // Gemma 3's Hub configs leave the pattern (and the 1B's window) to the
    // model class's defaults, as mlx-lm's gemma3_text does.
    let gemma3 = config_field(config, "model_type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.starts_with("gemma3"));
    let window = get(config, "sliding_window").or(gemma3.then_some(512));
    let pattern = get(config, "sliding_window_pattern").or(gemma3.then_some(6));
    let windowed = |w: Option<u64>| w.map_or(Layer::Full, Layer::Window);
    let listed = config_field(config, "layer_types")
        .and_then(Value::as_array)
        .filter(|_| LAYER_TYPES_FAMILIES.contains(&family(config)));
    if let Some(types) = listed {
        return types
            .iter()
            .map(|t| match t.as_str().unwrap_or("") {
                "sliding_attention" | "sliding_window" => windowed(window),
                "chunked_attention" => windowed(get(config, "attention_chunk_size")),
                "linear_attention" | "mamba" | "ssm" | "recurrent" => Layer::Linear,
                // Anything else keeps every token: the safe side.
                _ => Layer::Full,
            })
            .collect();
    }
    if let (Some(pattern), Some(_)) = (pattern, window) {
        let pattern = pattern.max(1);
        return (0..count)
            .map(|i| {
                if i % pattern == pattern - 1 {
                    Layer::Full
                } else {
                    windowed(window)
                }
            })
            .collect();
    }
    if let Some(interval) = get(config, "full_attention_interval") {
        let interval = interval.max(1);
        return (0..count)
            .map(|i| {
                if (i + 1) % interval == 0 {
                    Layer::Full
                } else {
                    Layer::Linear
                }
            })
            .collect();
    }
    vec![Layer::Full; count as usize]
}

/// One linear-attention layer's state per sequence (Qwen3-Next/3.5's gated
/// DeltaNet): the convolution's last `kernel − 1` inputs of the q, k and v
/// projections in the activation dtype, and the recurrent state, one
/// value-dim × key-dim matrix per value head in float32.
fn linear_state_bytes(config: &Value, elem: u64) -> u64 {
    let (Some(key_heads), Some(key_dim), Some(value_heads), Some(value_dim)) = (
        get(config, "linear_num_key_heads"),
        get(config, "linear_key_head_dim"),
        get(config, "linear_num_value_heads"),
        get(config, "linear_value_head_dim"),
    ) else {
        return 0;
    };
    let kernel = get(config, "linear_conv_kernel_dim").unwrap_or(4);
    let conv_dim = 2 * key_heads * key_dim + value_heads * value_dim;
    kernel.saturating_sub(1) * conv_dim * elem + value_heads * value_dim * key_dim * 4
}

/// Elements per token of one attention layer: MLA keeps its compressed latent
/// and rotary key (`kv_lora_rank + qk_rope_head_dim`; DeepSeek-V3.2's indexer
/// adds its keys, kept as keys and values) except in the families that expand
/// it per head; attention keeps keys and values for each KV head.
fn attention_elements(config: &Value) -> Option<u64> {
    if let Some(rank) = get(config, "kv_lora_rank") {
        let rope = get(config, "qk_rope_head_dim").unwrap_or(0);
        if PER_HEAD_MLA_FAMILIES.contains(&family(config)) {
            let heads = get(config, "num_attention_heads")?;
            let nope = get(config, "qk_nope_head_dim").unwrap_or(0);
            let value = get(config, "v_head_dim").unwrap_or(nope + rope);
            return Some(heads * (nope + rope + value));
        }
        let indexer = get(config, "index_head_dim").map_or(0, |d| 2 * d);
        return Some(rank + rope + indexer);
    }
    let heads = get(config, "num_attention_heads")?;
    let kv_heads = get(config, "num_key_value_heads").unwrap_or(heads);
    let head_dim = match get(config, "head_dim") {
        Some(d) => d,
        None => get(config, "hidden_size")? / heads.max(1),
    };
    Some(2 * kv_heads * head_dim)
}

/// `elements` per token as stored: the activation dtype, or quantized to `bits`
/// with a scale and a bias of the activation dtype per `group` elements.
fn stored_bytes(elements: u64, elem: u64, kv: KvLayout) -> u64 {
    match kv.bits {
        None => elements * elem,
        // bits/8 + 2·elem/group bytes per element, in integers:
        // (bits·group + 16·elem) / (8·group).
        Some(bits) => {
            let group = u64::from(kv.group_size.max(1));
            elements * (u64::from(bits) * group + 16 * elem) / (8 * group)
        }
    }
}

/// The model's KV cache as a function of tokens, or None when its config does
/// not say enough (no layer count, no heads).
pub fn kv_shape(config: &Value, kv: KvLayout) -> Option<KvShape> {
    let count = get(config, "num_hidden_layers")?;
    let elem = activation_bytes(config);
    let per_layer = attention_elements(config)?;
    let mut shape = KvShape::default();
    for layer in layers(config, count) {
        match layer {
            // A rotating cache (max_kv_size) turns every full layer into a window;
            // mlx-lm quantizes only full layers.
            Layer::Full => match kv.max_tokens {
                Some(max) => add_window(&mut shape, u64::from(max), per_layer * elem),
                None => shape.bytes_per_token += stored_bytes(per_layer, elem, kv),
            },
            Layer::Window(window) => add_window(&mut shape, window, per_layer * elem),
            Layer::Linear => shape.bytes_per_sequence += linear_state_bytes(config, elem),
        }
    }
    Some(shape)
}

fn add_window(shape: &mut KvShape, tokens: u64, bytes_per_token: u64) {
    match shape.windows.iter_mut().find(|w| w.tokens == tokens) {
        Some(w) => w.bytes_per_token += bytes_per_token,
        None => shape.windows.push(KvWindow {
            tokens,
            bytes_per_token,
        }),
    }
}

/// Whether the worker can quantize this model's KV (`kv_bits`): mlx-lm's
/// quantized attention takes neither an MLA latent nor attention sinks.
pub fn kv_quantizable(config: &Value) -> bool {
    get(config, "kv_lora_rank").is_none() && !family(config).starts_with("gpt_oss")
}

/// The KV of `tokens` tokens spread over up to `sequences` sequences, at most
/// (what a reserve of that many tokens must cover): full layers count every
/// token, a window layer at most its window per sequence, a constant state once
/// per sequence.
pub fn working_set_bytes(shape: &KvShape, tokens: u64, sequences: u64) -> u64 {
    let sequences = sequences.max(1);
    shape.bytes_per_token * tokens
        + shape
            .windows
            .iter()
            .map(|w| w.bytes_per_token * tokens.min(w.tokens * sequences))
            .sum::<u64>()
        + shape.bytes_per_sequence * sequences
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smollm2() -> Value {
        json!({
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "hidden_size": 576, "max_position_embeddings": 8192
        })
    }

    #[test]
    fn full_attention_counts_keys_and_values_of_every_kv_head() {
        // 2 × 30 layers × 3 heads × 64 dims × 4 bytes = 46,080 bytes per token.
        let shape = kv_shape(&smollm2(), KvLayout::default()).unwrap();
        assert_eq!(shape.bytes_per_token, 46_080);
        assert_eq!(shape.sequence_bytes(8192), 46_080 * 8192);
        assert_eq!(working_set_bytes(&shape, 1000, 16), 46_080 * 1000);
    }

    #[test]
    fn a_rotating_kv_cache_counts_only_its_window() {
        let window = KvLayout {
            max_tokens: Some(1024),
            ..KvLayout::default()
        };
        let shape = kv_shape(&smollm2(), window).unwrap();
        assert_eq!(shape.sequence_bytes(8192), 46_080 * 1024);
        assert_eq!(shape.sequence_bytes(100), 46_080 * 100);
        // Two sequences of 1,024 each at most, however many tokens in all.
        assert_eq!(working_set_bytes(&shape, 32_768, 2), 46_080 * 2048);
    }

    #[test]
    fn a_quantized_kv_cache_counts_bits_scales_and_biases() {
        // 11,520 elements per token; float32 model: 8 bits + a 4-byte scale and
        // bias per 64 elements = 1 + 8/64 = 1.125 bytes per element.
        let eight = KvLayout {
            bits: Some(8),
            group_size: 64,
            max_tokens: None,
        };
        let shape = kv_shape(&smollm2(), eight).unwrap();
        assert_eq!(shape.bytes_per_token, 11_520 * 9 / 8);
        // 4 bits, group 32, a float16 model: 0.5 + 4/32 = 0.625 bytes per element.
        let mut half = smollm2();
        half["torch_dtype"] = "float16".into();
        let four = KvLayout {
            bits: Some(4),
            group_size: 32,
            max_tokens: None,
        };
        assert_eq!(
            kv_shape(&half, four).unwrap().bytes_per_token,
            11_520 * 5 / 8
        );
    }

    #[test]
    fn the_dtype_is_read_from_either_key_and_float32_when_absent() {
        let mut c = smollm2();
        assert_eq!(activation_bytes(&c), 4);
        c["dtype"] = "bfloat16".into();
        assert_eq!(activation_bytes(&c), 2);
        c["torch_dtype"] = "float32".into();
        assert_eq!(activation_bytes(&c), 4);
    }

    fn fixture(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/model-configs")
            .join(format!("{name}.json"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    fn shape(name: &str) -> KvShape {
        kv_shape(&fixture(name), KvLayout::default()).unwrap()
    }

    fn window(tokens: u64, bytes_per_token: u64) -> Vec<KvWindow> {
        vec![KvWindow {
            tokens,
            bytes_per_token,
        }]
    }

    /// The families users run, from their published config.json files
    /// (tests/fixtures/model-configs, SOURCES.md says where each came from),
    /// against figures worked by hand from the same fields.
    #[test]
    fn full_attention_families_pay_keys_and_values_per_token() {
        // layers × 2 × KV heads × head dim × 2 bytes (bfloat16).
        for (name, per_token) in [
            ("llama-3.1-8b-instruct", 32 * 2 * 8 * 128 * 2), // 131,072 (128 KiB)
            ("llama-3.3-70b-instruct", 80 * 2 * 8 * 128 * 2), // 327,680 (320 KiB)
            ("mistral-7b-instruct-v0.3", 32 * 2 * 8 * 128 * 2), // no sliding window
            ("qwen3-8b", 36 * 2 * 8 * 128 * 2),              // 147,456
            ("qwen3-30b-a3b", 48 * 2 * 4 * 128 * 2),         // 98,304
            ("glm-4.5-air", 46 * 2 * 8 * 128 * 2),           // 188,416
            // No dtype, FP8 weights: 16-bit activations. 253,952 per token.
            ("minimax-m2", 62 * 2 * 8 * 128 * 2),
        ] {
            let s = shape(name);
            assert_eq!(
                (s.bytes_per_token, s.windows.clone(), s.bytes_per_sequence),
                (per_token, vec![], 0),
                "{name}"
            );
        }
        // MiniMax-M2 at its 196,608-token context: 46.5 GiB for one sequence,
        // where every one of 16 sequences at full context (the old charge) was 745 GiB.
        assert_eq!(shape("minimax-m2").sequence_bytes(196_608), 49_928_994_816);
    }

    #[test]
    fn mla_families_pay_the_latent_and_the_rotary_key() {
        // 61 layers × (kv_lora_rank 512 + qk_rope_head_dim 64) × 2 bytes, not
        // 128 heads × (192 + 128): 70,272 bytes per token instead of 5.0 MB.
        for name in ["deepseek-v3", "kimi-k2-instruct"] {
            assert_eq!(shape(name).bytes_per_token, 61 * 576 * 2, "{name}");
        }
    }

    #[test]
    fn mla_families_that_expand_per_head_pay_every_head() {
        // DeepSeek-V2-Lite: mlx-lm's deepseek_v2 caches 16 heads × (128 + 64)
        // keys and 16 × 128 values per layer.
        let lite = json!({"model_type": "deepseek_v2", "num_hidden_layers": 27,
            "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "torch_dtype": "bfloat16"});
        let shape = kv_shape(&lite, KvLayout::default()).unwrap();
        assert_eq!(shape.bytes_per_token, 27 * 16 * (192 + 128) * 2);
        // DeepSeek-V3.2 keeps its indexer's keys beside the latent.
        let mut v32 = fixture("deepseek-v3");
        v32["model_type"] = "deepseek_v32".into();
        v32["index_head_dim"] = 128.into();
        let shape = kv_shape(&v32, KvLayout::default()).unwrap();
        assert_eq!(shape.bytes_per_token, 61 * (576 + 256) * 2);
    }

    #[test]
    fn layer_types_count_only_where_mlx_lm_reads_them() {
        // Qwen3 caches every layer in full, whatever a config's list says.
        let mut qwen = fixture("qwen3-8b");
        qwen["layer_types"] = json!(vec!["sliding_attention"; 36]);
        qwen["sliding_window"] = 4096.into();
        assert_eq!(
            kv_shape(&qwen, KvLayout::default()).unwrap(),
            shape("qwen3-8b")
        );
        // Llama reads them.
        let mut llama = fixture("llama-3.1-8b-instruct");
        llama["layer_types"] = json!(["sliding_attention", "full_attention"].repeat(16));
        llama["sliding_window"] = 4096.into();
        let s = kv_shape(&llama, KvLayout::default()).unwrap();
        assert_eq!(
            (s.bytes_per_token, s.windows),
            (16 * 4096, window(4096, 16 * 4096))
        );
    }

    #[test]
    fn sliding_window_layers_are_capped_at_their_window() {
        // GPT-OSS: layer_types alternate; 8 KV heads × 64 × 2 × 2 bytes = 2,048
        // per layer per token; half the layers keep 128 tokens.
        let oss = shape("gpt-oss-20b");
        assert_eq!(oss.bytes_per_token, 12 * 2048);
        assert_eq!(oss.windows, window(128, 12 * 2048));
        assert_eq!(
            oss.sequence_bytes(100_000),
            12 * 2048 * 100_000 + 12 * 2048 * 128
        );
        let oss = shape("gpt-oss-120b");
        assert_eq!(
            (oss.bytes_per_token, oss.windows),
            (18 * 2048, window(128, 18 * 2048))
        );
        // Gemma 3 27B: every 6th of 62 layers is global (10), the other 52 keep
        // 1,024 tokens; 16 KV heads × 128 × 2 × 2 bytes = 8,192 per layer.
        let gemma = shape("gemma-3-27b-it");
        assert_eq!(gemma.bytes_per_token, 10 * 8192);
        assert_eq!(gemma.windows, window(1024, 52 * 8192));
        // Gemma 3 1B: 26 layers, 4 global; one KV head of 256: 1,024 per layer.
        let small = shape("gemma-3-1b-it");
        assert_eq!(
            (small.bytes_per_token, small.windows),
            (4 * 1024, window(512, 22 * 1024))
        );
    }

    #[test]
    fn linear_attention_layers_pay_a_constant_state_per_sequence() {
        // Qwen3-Next 80B: 12 of 48 layers full (2 KV heads × 256); 36 gated
        // DeltaNet layers each keep a conv state of 3 × (2·16·128 + 32·128) × 2
        // bytes and a float32 recurrent state of 32 × 128 × 128 × 4 bytes.
        let linear = 3 * (2 * 16 * 128 + 32 * 128) * 2 + 32 * 128 * 128 * 4;
        for name in ["qwen3-next-80b-a3b-instruct", "qwen3-next-80b-a3b-thinking"] {
            let s = shape(name);
            assert_eq!(
                (s.bytes_per_token, s.bytes_per_sequence),
                (12 * 2 * 2 * 256 * 2, 36 * linear),
                "{name}"
            );
        }
        // Qwen3.5 27B (layer_types in text_config): 16 full of 64 with 4 KV heads;
        // 48 linear with 48 value heads.
        let s = shape("qwen3.5-27b");
        let linear = 3 * (2 * 16 * 128 + 48 * 128) * 2 + 48 * 128 * 128 * 4;
        assert_eq!(
            (s.bytes_per_token, s.bytes_per_sequence),
            (16 * 2 * 4 * 256 * 2, 48 * linear)
        );
        // Qwen3.5 35B-A3B: 10 full of 40 with 2 KV heads; 30 linear.
        let s = shape("qwen3.5-35b-a3b");
        let linear = 3 * (2 * 16 * 128 + 32 * 128) * 2 + 32 * 128 * 128 * 4;
        assert_eq!(
            (s.bytes_per_token, s.bytes_per_sequence),
            (10 * 2 * 2 * 256 * 2, 30 * linear)
        );
        // 16 sequences pay 16 states however few tokens they hold.
        assert_eq!(working_set_bytes(&s, 0, 16), 16 * 30 * linear);
    }

    #[test]
    fn a_config_without_layers_or_heads_gives_no_shape() {
        assert_eq!(kv_shape(&json!({}), KvLayout::default()), None);
        assert_eq!(
            kv_shape(&json!({"num_hidden_layers": 2}), KvLayout::default()),
            None
        );
    }
}
