//! The memory budget: what the machine has, what each worker really uses, what a
//! model is expected to need, and which idle models to evict to make room. The
//! arithmetic (`plan`) is pure; the operating system is behind `Probe`.

use crate::model_files::ModelFiles;
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
    "/proc/<pid>/status VmRSS less the shared pages of smaps_rollup (Rss - Pss, read every 30 s)"
};

/// Memory the MLX runtime, Python and the tokenizer take before any weight: the
/// replay worker (tokenizer only) measures ~120 MiB of PSS here.
pub const RUNTIME_OVERHEAD: u64 = 150 << 20;

pub use crate::kv_shape::KvLayout;
use crate::kv_shape::{self, working_set_bytes};
use worker_protocol::frame::KvShape;

/// Tokens of KV a model is guaranteed when no preset or config says otherwise
/// (or its context, if smaller): the working set of a few agents, not the worst
/// case of every sequence at full context.
pub const DEFAULT_KV_RESERVE_TOKENS: u64 = 32_768;

/// The KV a model is guaranteed at load (`kv_reserve`, per preset or in the
/// config): a count of tokens shared by all its sequences, or a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvReserve {
    Tokens(u64),
    Bytes(u64),
}

impl KvReserve {
    /// `65536`, `"65536 tokens"`, `"64K tokens"`: tokens; `"8GiB"`: bytes.
    pub fn parse(s: &str) -> Result<KvReserve, String> {
        let s = s.trim();
        let tokens = s
            .strip_suffix("tokens")
            .or_else(|| s.strip_suffix("token"))
            .map(str::trim);
        match tokens {
            Some(n) => {
                let (digits, mult) = match n.strip_suffix(['K', 'k']) {
                    Some(d) => (d, 1024),
                    None => (n, 1),
                };
                digits
                    .trim()
                    .parse::<u64>()
                    .map(|v| KvReserve::Tokens(v * mult))
                    .map_err(|_| format!("{s:?}: write a count of tokens (\"32768 tokens\", \"64K tokens\") or a size (\"8GiB\")"))
            }
            None if s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty() => Ok(
                KvReserve::Tokens(s.parse().map_err(|_| format!("{s:?} is too large"))?),
            ),
            None => parse_bytes(s).map(KvReserve::Bytes),
        }
    }
}

impl<'de> serde::Deserialize<'de> for KvReserve {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KvReserve, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Tokens(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Tokens(n) => Ok(KvReserve::Tokens(n)),
            Raw::Text(s) => KvReserve::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl serde::Serialize for KvReserve {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            KvReserve::Tokens(n) => s.serialize_u64(*n),
            KvReserve::Bytes(b) => s.serialize_str(&b.to_string()),
        }
    }
}

/// What loading a model is expected to take, part by part (`mlxd estimate`,
/// `/admin/memory`, the load admission).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Estimate {
    /// The weights on disk (the safetensors files).
    pub weights_bytes: u64,
    /// MLX, Python and the tokenizer before any weight.
    pub runtime_bytes: u64,
    /// The draft model's weights and its KV for one sequence of the reserve.
    pub draft_bytes: u64,
    /// KV bytes per token while a sequence is shorter than every sliding window.
    pub kv_bytes_per_token: u64,
    /// The KV cache as a function of tokens (None: the config does not say).
    pub kv_shape: Option<KvShape>,
    /// The model's context (config.json).
    pub context_length: Option<u64>,
    /// Tokens of KV guaranteed at load, shared by all sequences, and their bytes.
    pub reserve_tokens: u64,
    pub reserve_bytes: u64,
    /// Whether `kv_bits` can quantize this model's cache (not an MLA latent,
    /// not GPT-OSS's attention sinks: the worker refuses those).
    #[serde(default)]
    pub kv_quantizable: bool,
}

impl Estimate {
    /// What the load admission charges.
    pub fn total(&self) -> u64 {
        self.weights_bytes + self.runtime_bytes + self.draft_bytes + self.reserve_bytes
    }

    /// The KV of `tokens` tokens over up to `sequences` sequences.
    pub fn kv_for(&self, tokens: u64, sequences: u64) -> u64 {
        self.kv_shape
            .as_ref()
            .map_or(0, |shape| working_set_bytes(shape, tokens, sequences))
    }
}

/// What a model needs at load: its weights, the runtime, and a KV reserve of
/// `reserve` (tokens are capped at the model's context) shared by up to
/// `max_concurrent` sequences. KV beyond the reserve is granted at run time by
/// the worker's own accounting (docs/design/MEMORY.md).
pub fn estimate(
    files: &ModelFiles,
    max_concurrent: u32,
    kv: KvLayout,
    reserve: KvReserve,
) -> Estimate {
    let shape = kv_shape::kv_shape(&files.config, kv);
    let context = kv_shape::context_length(&files.config);
    let sequences = u64::from(max_concurrent.max(1));
    let (reserve_tokens, reserve_bytes) = match (reserve, &shape) {
        (KvReserve::Bytes(b), Some(shape)) => (b / shape.first_token_bytes().max(1), b),
        (KvReserve::Bytes(b), None) => (0, b),
        (KvReserve::Tokens(t), Some(shape)) => {
            let t = context.map_or(t, |c| t.min(c));
            (t, working_set_bytes(shape, t, sequences))
        }
        (KvReserve::Tokens(_), None) => (0, 0),
    };
    Estimate {
        weights_bytes: files.size,
        runtime_bytes: RUNTIME_OVERHEAD,
        draft_bytes: 0,
        kv_bytes_per_token: shape.as_ref().map_or(0, KvShape::first_token_bytes),
        kv_shape: shape,
        context_length: context,
        reserve_tokens,
        reserve_bytes,
        kv_quantizable: kv_shape::kv_quantizable(&files.config),
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
}
