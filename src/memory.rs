//! The memory budget: what the machine has, what each worker really uses, what a
//! model is expected to need, and which idle models to evict to make room. The
//! arithmetic (`plan`) is pure; the operating system is behind `Probe`.

use crate::model_files::{config_field, ModelFiles};
use std::time::Duration;

/// A size in the config: a share of physical memory (`"90%"`) or bytes (`"48GiB"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Fraction(f64),
    Bytes(u64),
}

impl Limit {
    pub fn parse(s: &str) -> Result<Limit, String> {
        let s = s.trim();
        if let Some(pct) = s.strip_suffix('%') {
            return match pct.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(Limit::Fraction(p / 100.0)),
                _ => Err(format!("{s:?}: a percentage must be in (0, 100]")),
            };
        }
        parse_bytes(s).map(Limit::Bytes)
    }

    /// The limit in bytes on a machine with `total` bytes of memory.
    pub fn resolve(self, total: u64) -> u64 {
        match self {
            Limit::Fraction(f) => (total as f64 * f) as u64,
            Limit::Bytes(b) => b,
        }
    }
}

/// `"700MiB"`, `"48GiB"`, `"1.5GB"`, `"123456"` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let at = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(at);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (write e.g. \"700MiB\" or \"48GiB\")"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        other => return Err(format!("{s:?}: unknown unit {other:?}")),
    };
    if !n.is_finite() || n <= 0.0 {
        return Err(format!("{s:?} must be a positive size"));
    }
    Ok((n * mult) as u64)
}

/// "681 MiB", "6.3 GiB".
pub fn human(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

pub use crate::sys::SystemMemory;

/// What the budget needs from the operating system.
pub trait Probe: Send + Sync {
    fn system(&self) -> SystemMemory;
    /// A worker's true footprint (None if the process cannot be read).
    fn footprint(&self, pid: u32) -> Option<u64>;
}

/// The real machine.
pub struct OsProbe;

impl Probe for OsProbe {
    fn system(&self) -> SystemMemory {
        crate::sys::system()
    }

    fn footprint(&self, pid: u32) -> Option<u64> {
        crate::sys::footprint(pid)
    }
}

/// Which footprint the daemon measures on this OS (for `GET /admin/memory`).
pub const FOOTPRINT_SOURCE: &str = if cfg!(target_os = "macos") {
    "proc_pid_rusage ri_phys_footprint"
} else {
    "/proc/<pid>/smaps_rollup Pss"
};

/// Memory the MLX runtime, Python and the tokenizer take before any weight: the
/// replay worker (tokenizer only) measures ~120 MiB of PSS here.
pub const RUNTIME_OVERHEAD: u64 = 150 << 20;

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

/// What a model is expected to need when loaded:
/// weights on disk + runtime overhead + KV cache for `max_concurrent` sequences at
/// the model's full context (see `kv_bytes`).
pub fn estimate(files: &ModelFiles, max_concurrent: u32, kv: KvLayout) -> Option<u64> {
    if files.config.is_null() {
        return None;
    }
    Some(files.size + RUNTIME_OVERHEAD + kv_bytes(&files.config, max_concurrent, kv))
}

/// The KV cache of `sequences` sequences, from a model's config.json:
/// 2 × layers × kv_heads × head_dim elements per token, for the model's full
/// context or the rotating cache's `max_tokens` if smaller. Bytes per element: 4
/// for a float32 model, else 2 (the activations of float16/bfloat16 and of
/// quantized models); quantized to `bits`, bits/8 plus a scale and a bias of the
/// activation dtype per `group_size` elements.
pub fn kv_bytes(config: &serde_json::Value, sequences: u32, kv: KvLayout) -> u64 {
    let get = |k: &str| config_field(config, k).and_then(serde_json::Value::as_u64);
    let (Some(layers), Some(heads), Some(hidden)) = (
        get("num_hidden_layers"),
        get("num_attention_heads"),
        get("hidden_size"),
    ) else {
        return 0;
    };
    let kv_heads = get("num_key_value_heads").unwrap_or(heads);
    let head_dim = get("head_dim").unwrap_or(hidden / heads.max(1));
    let mut context = get("max_position_embeddings").unwrap_or(4096);
    if let Some(max) = kv.max_tokens {
        context = context.min(u64::from(max));
    }
    let quantized = config.get("quantization").is_some();
    let dtype = config_field(config, "torch_dtype").and_then(|v| v.as_str());
    let elem = if !quantized && matches!(dtype, None | Some("float32")) {
        4
    } else {
        2
    };
    let elements = 2 * layers * kv_heads * head_dim * context * u64::from(sequences);
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

/// A loaded (or loading) model, as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Resident {
    pub model: String,
    /// Measured footprint (or, while loading, the larger of that and its estimate).
    pub bytes: u64,
    pub pinned: bool,
    /// Requests in flight or queued: evicting it means draining it first.
    pub busy: bool,
    /// Time since its last request: the least recently used goes first.
    pub idle: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// It fits.
    Admit,
    /// It fits once these models are stopped (drained first if busy), in this order.
    Evict(Vec<String>),
    /// It cannot fit: the message names the cap, what is loaded and what was needed.
    Refuse(String),
}

/// Whether `model`, needing `need` bytes, fits under `cap` next to `residents`,
/// and if not, which of them to evict: idle ones before busy ones, least recently
/// used first, pinned never.
pub fn plan(cap: u64, model: &str, need: u64, residents: &[Resident]) -> Plan {
    let others: Vec<&Resident> = residents.iter().filter(|r| r.model != model).collect();
    let used: u64 = others.iter().map(|r| r.bytes).sum();
    if used + need <= cap {
        return Plan::Admit;
    }
    let mut candidates: Vec<&&Resident> = others.iter().filter(|r| !r.pinned).collect();
    candidates.sort_by(|a, b| a.busy.cmp(&b.busy).then(b.idle.cmp(&a.idle)));
    let mut freed = 0;
    let mut victims = Vec::new();
    for r in candidates {
        if used - freed + need <= cap {
            break;
        }
        freed += r.bytes;
        victims.push(r.model.clone());
    }
    if used - freed + need <= cap {
        return Plan::Evict(victims);
    }
    let loaded = if others.is_empty() {
        "nothing".to_string()
    } else {
        others
            .iter()
            .map(|r| {
                format!(
                    "'{}' {}{}",
                    r.model,
                    human(r.bytes),
                    if r.pinned { " (pinned)" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    Plan::Refuse(format!(
        "not enough memory for '{model}': it needs {}, the cap is {}, and loaded are {loaded}",
        human(need),
        human(cap)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(model: &str, mib: u64, pinned: bool, busy: bool, idle_s: u64) -> Resident {
        Resident {
            model: model.into(),
            bytes: mib << 20,
            pinned,
            busy,
            idle: Duration::from_secs(idle_s),
        }
    }

    #[test]
    fn sizes_and_limits_parse() {
        assert_eq!(Limit::parse("90%"), Ok(Limit::Fraction(0.9)));
        assert_eq!(Limit::parse("48GiB"), Ok(Limit::Bytes(48 << 30)));
        assert_eq!(Limit::parse("700 MiB"), Ok(Limit::Bytes(700 << 20)));
        assert_eq!(Limit::parse("1.5GB"), Ok(Limit::Bytes(1_500_000_000)));
        assert_eq!(Limit::parse("4096"), Ok(Limit::Bytes(4096)));
        for bad in ["0%", "120%", "lots", "-1GiB", "3 parsecs", ""] {
            assert!(Limit::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Limit::Fraction(0.5).resolve(1000), 500);
    }

    #[test]
    fn it_fits_or_evicts_idle_least_recently_used_first() {
        let cap = 1000 << 20;
        let loaded = [r("a", 300, false, false, 10), r("b", 300, false, false, 50)];
        assert_eq!(plan(cap, "c", 400, &loaded), Plan::Admit);
        // 300 + 300 + 500 > 1000: one must go, the one idle longest.
        assert_eq!(
            plan(cap, "c", 500 << 20, &loaded),
            Plan::Evict(vec!["b".into()])
        );
        assert_eq!(
            plan(cap, "c", 900 << 20, &loaded),
            Plan::Evict(vec!["b".into(), "a".into()])
        );
    }

    #[test]
    fn busy_models_go_after_idle_ones_and_pinned_never() {
        let cap = 1000 << 20;
        let loaded = [
            r("busy", 300, false, true, 500),
            r("idle", 300, false, false, 1),
            r("pinned", 300, true, false, 900),
        ];
        assert_eq!(
            plan(cap, "c", 400 << 20, &loaded),
            Plan::Evict(vec!["idle".into()])
        );
        assert_eq!(
            plan(cap, "c", 700 << 20, &loaded),
            Plan::Evict(vec!["idle".into(), "busy".into()])
        );
        let Plan::Refuse(why) = plan(cap, "c", 800 << 20, &loaded) else {
            panic!("the pinned model cannot be evicted")
        };
        assert!(why.contains("'pinned' 300 MiB (pinned)"), "{why}");
        assert!(
            why.contains("needs 800 MiB") && why.contains("the cap is 1000 MiB"),
            "{why}"
        );
    }

    #[test]
    fn a_model_larger_than_the_cap_is_refused_with_numbers() {
        let Plan::Refuse(why) = plan(1 << 30, "huge", 2 << 30, &[]) else {
            panic!()
        };
        assert_eq!(
            why,
            "not enough memory for 'huge': it needs 2.0 GiB, the cap is 1.0 GiB, and loaded are nothing"
        );
        // Its own previous footprint does not count against it.
        assert_eq!(
            plan(1 << 30, "m", 900 << 20, &[r("m", 900, false, false, 0)]),
            Plan::Admit
        );
    }

    #[test]
    fn the_kv_estimate_follows_the_config() {
        let smollm2 = serde_json::json!({
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "hidden_size": 576, "max_position_embeddings": 8192
        });
        // 2 × 30 layers × 3 heads × 64 dims × 4 bytes = 46,080 bytes per token.
        let full = KvLayout::default();
        assert_eq!(kv_bytes(&smollm2, 1, full), 46_080 * 8192);
        let mut q4 = smollm2.clone();
        q4["quantization"] = serde_json::json!({"bits": 4});
        assert_eq!(kv_bytes(&q4, 2, full), 23_040 * 8192 * 2);
    }

    #[test]
    fn a_rotating_kv_cache_counts_only_its_window() {
        let smollm2 = serde_json::json!({
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "hidden_size": 576, "max_position_embeddings": 8192
        });
        let window = KvLayout {
            max_tokens: Some(1024),
            ..KvLayout::default()
        };
        assert_eq!(kv_bytes(&smollm2, 2, window), 46_080 * 1024 * 2);
        // A window past the context changes nothing.
        let wide = KvLayout {
            max_tokens: Some(1 << 20),
            ..KvLayout::default()
        };
        assert_eq!(
            kv_bytes(&smollm2, 1, wide),
            kv_bytes(&smollm2, 1, KvLayout::default())
        );
    }

    #[test]
    fn a_quantized_kv_cache_counts_bits_scales_and_biases() {
        let smollm2 = serde_json::json!({
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "hidden_size": 576, "max_position_embeddings": 8192
        });
        // 11,520 elements per token; float32 model: 8 bits + a 4-byte scale and
        // bias per 64 elements = 1 + 8/64 = 1.125 bytes per element.
        let eight = KvLayout {
            bits: Some(8),
            group_size: 64,
            max_tokens: None,
        };
        assert_eq!(kv_bytes(&smollm2, 1, eight), 11_520 * 8192 * 9 / 8);
        // 4 bits, group 32, a float16 model: 0.5 + 4/32 = 0.625 bytes per element.
        let mut half = smollm2.clone();
        half["torch_dtype"] = "float16".into();
        let four = KvLayout {
            bits: Some(4),
            group_size: 32,
            max_tokens: Some(4096),
        };
        assert_eq!(kv_bytes(&half, 2, four), 11_520 * 4096 * 2 * 5 / 8);
    }
}
