//! Model presets: one TOML file per model, shipped in `presets/` and added by
//! users in `$MLXD_HOME/presets/`. A preset names the model directory and how to
//! serve it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use worker_protocol::frame::{FaultOptions, FlushOptions, LoadOptions, SpeculativeOptions};

use crate::memory::{Estimate, KvLayout, KvReserve};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Shared-memory rings (stdio pipes only ring the doorbell).
    #[default]
    Shm,
    /// Length-prefixed frames on the worker's pipes.
    Stdio,
    /// The worker serves OpenAI HTTP on 127.0.0.1 and the daemon proxies to it
    /// (the llama-swap/Ollama design), for comparing against the rings.
    Http,
}

/// A reasoning model's thinking: told apart from its answer (`auto`: each
/// dialect's own place for it, when the worker knows the model's format), or
/// left in the answer's text as the model wrote it (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningMode {
    #[default]
    Auto,
    Off,
}

impl ReasoningMode {
    fn is_auto(&self) -> bool {
        *self == ReasoningMode::Auto
    }
}

/// What produces the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// mlx-lm with continuous batching.
    #[default]
    Mlx,
    /// A fixed text's tokens as fast as the protocol allows: measures the token path.
    Replay,
    /// Vectors of texts. Chosen by the model's own files for a preset that leaves
    /// `engine` at "mlx" (an encoder, or a decoder with sentence-transformers pooling:
    /// [`crate::model_files::serves_embeddings`]); written, it makes any decoder an
    /// embedding model pooled at its last token.
    Embedding,
    /// Chat with images (mlx-vlm). Chosen by the model's config (a vision tower) for
    /// a preset that leaves `engine` at "mlx"; writing it only states the fact.
    Vision,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Mlx => "mlx",
            EngineKind::Replay => "replay",
            EngineKind::Embedding => "embedding",
            EngineKind::Vision => "vision",
        }
    }
}

/// When the worker sends the tokens it has: after every decode step (the
/// default, lowest latency), once N tokens are waiting, or once the oldest
/// has waited T ms. Written `"step"`, `"8 tokens"` or `"20 ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FlushPolicy {
    #[default]
    Step,
    Tokens(u32),
    Millis(f64),
}

impl TryFrom<String> for FlushPolicy {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let s = s.trim();
        if s == "step" {
            return Ok(FlushPolicy::Step);
        }
        let bad = || format!("flush must be \"step\", \"N tokens\" or \"T ms\", not {s:?}");
        let (num, unit) = s.split_once(' ').ok_or_else(bad)?;
        match unit.trim() {
            "tokens" | "token" => match num.parse::<u32>() {
                Ok(n) if n > 0 => Ok(FlushPolicy::Tokens(n)),
                _ => Err(bad()),
            },
            "ms" => match num.parse::<f64>() {
                Ok(t) if t.is_finite() && t >= 0.0 => Ok(FlushPolicy::Millis(t)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl From<FlushPolicy> for String {
    fn from(p: FlushPolicy) -> String {
        match p {
            FlushPolicy::Step => "step".into(),
            FlushPolicy::Tokens(n) => format!("{n} tokens"),
            FlushPolicy::Millis(t) => format!("{t} ms"),
        }
    }
}

impl From<FlushPolicy> for FlushOptions {
    /// The worker's view (its Load options).
    fn from(p: FlushPolicy) -> FlushOptions {
        match p {
            FlushPolicy::Step => FlushOptions::Step,
            FlushPolicy::Tokens(tokens) => FlushOptions::Tokens { tokens },
            FlushPolicy::Millis(ms) => FlushOptions::Ms { ms },
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Shm => "shm",
            TransportKind::Stdio => "stdio",
            TransportKind::Http => "http",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// The name clients use; defaults to the file name without `.toml`.
    #[serde(default)]
    pub name: String,
    /// An imported model's name (a directory under the models dir) or an absolute path.
    pub model: String,
    /// Other names that route to this preset.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// How the daemon talks to the worker.
    #[serde(default)]
    pub transport: TransportKind,
    /// Completion length when a request names none.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// One line for `mlxd list`.
    #[serde(default)]
    pub description: String,
    /// What produces the tokens (`replay` is for benchmarks).
    #[serde(default)]
    pub engine: EngineKind,
    /// A reasoning model's thinking apart from its answer ("auto") or in it ("off").
    #[serde(default, skip_serializing_if = "ReasoningMode::is_auto")]
    pub reasoning: ReasoningMode,
    /// Requests generating at once (the batch size); more wait in the queue.
    /// Absent, the worker sizes its batch to its device (Ready says how many):
    /// see [`Preset::concurrency`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Requests that may wait for a slot; beyond that the answer is 503.
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    /// When the worker sends tokens: "step" (default), "N tokens" or "T ms".
    #[serde(default)]
    pub flush: FlushPolicy,
    /// Prompt tokens prefilled per step, so a long prompt does not stall the
    /// other sequences' tokens for its whole prefill.
    #[serde(default = "default_prefill_step")]
    pub prefill_step: u32,
    /// How long the model stays loaded without requests: "5m" (default), "-1"
    /// forever, "0" unload as soon as idle. A request's `keep_alive` overrides it.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: String,
    /// A worker with requests in flight that makes no progress this long is hung:
    /// it is killed and restarted.
    #[serde(default = "default_hang_timeout")]
    pub hang_timeout: String,
    /// A load that makes no progress this long (or takes twice this) fails.
    #[serde(default = "default_load_timeout")]
    pub load_timeout: String,
    /// The wait before restarting a crashed worker; it doubles per crash in a row,
    /// up to 30 s.
    #[serde(default = "default_restart_backoff")]
    pub restart_backoff: String,
    /// What the loaded model needs ("700MiB", "12GiB"); without it the daemon
    /// estimates: weights on disk + runtime + full-context KV cache for
    /// `max_concurrent` sequences (README, "Memory").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_estimate: Option<String>,
    /// The KV a model is guaranteed at load, in tokens shared by its sequences
    /// (`65536`, `"64K tokens"`) or bytes (`"8GiB"`); default: the config's
    /// `kv_reserve`, else 32,768 tokens or the model's context if smaller. KV
    /// beyond it is granted at run time from the free budget (README, "Memory").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_reserve: Option<crate::memory::KvReserve>,
    /// The prefix cache's limit ("1GiB"; "0" turns it off). Default: the KV of
    /// four sequences of 32,768 tokens (or the context, if shorter), or a quarter
    /// of what the model is expected to need (README, "Prompt cache").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_bytes: Option<String>,
    /// The speed knobs (what `mlxd tune` writes); see [`Performance`].
    #[serde(default, skip_serializing_if = "Performance::is_empty")]
    pub performance: Performance,
    /// Speculative decoding with a draft model (README, "Speculative decoding").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<Speculative>,
    /// A chat model as reranker (`[rerank]`, README "Embeddings").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerank: Option<Rerank>,
    /// One model over several ranks (`[distributed]`, README "Several Macs").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<crate::distributed::Distributed>,
    /// Test-only fault injection passed to the worker (see mlxd_worker/faults.py).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<FaultOptions>,
    /// The file this preset was read from (`mlxd tune` writes its profile there,
    /// or next to the user's presets when it is a shipped one).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// A preset's `[rerank]` table: its chat model answers `/v1/rerank` by the yes/no
/// method (Qwen3-Reranker's): the relevance of a document is the model's
/// probability of answering "yes" rather than "no" when asked whether it meets the
/// query under `instruction`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rerank {
    /// "yes_no", the one method there is.
    pub method: String,
    #[serde(default = "default_rerank_instruction")]
    pub instruction: String,
}

fn default_rerank_instruction() -> String {
    "Given a web search query, retrieve relevant passages that answer the query".into()
}

/// A preset's `[performance]` table: every speed knob in one place, which is what
/// `mlxd tune` writes. `max_concurrent`, `prefill_step` and `prompt_cache_bytes`
/// may stay at the top level instead (presets written before the table existed),
/// but not be in both; `num_draft_tokens` and `speculative_mode` override the
/// `[speculative]` table's. `Preset::parse` folds those five into the fields the
/// rest of the daemon reads, so a parsed preset's table holds only the keys that
/// live nowhere else (and serializes back without a key in two places).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Performance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_step: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_bytes: Option<String>,
    /// Quantize the KV cache to 4 or 8 bits (absent: the activation dtype).
    /// Less memory per sequence, at some cost in quality and speed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_bits: Option<u32>,
    /// Elements per quantization group: 32, 64 (the default) or 128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_group_size: Option<u32>,
    /// Tokens a sequence holds before its KV cache is quantized (0, the default:
    /// from the start). Applies in the lone lane; short answers stay exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantized_kv_start: Option<u32>,
    /// A rotating KV cache keeping the last this-many tokens (at least 256):
    /// bounded memory for long generations, which forget what fell out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_kv_size: Option<u32>,
    /// A directory for the on-disk prefix cache (`~` expands to $HOME); absent:
    /// the prefix cache lives in memory only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_dir: Option<String>,
    /// The on-disk prefix cache's limit ("4GiB", the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_disk_bytes: Option<String>,
    /// Overrides `[speculative].num_draft_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_draft_tokens: Option<u32>,
    /// Overrides `[speculative].mode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative_mode: Option<SpecMode>,
}

impl Performance {
    fn is_empty(&self) -> bool {
        *self == Performance::default()
    }
}

/// The keys a preset may set at its top level or in `[performance]`.
const TOP_LEVEL_PERFORMANCE_KEYS: [&str; 3] =
    ["max_concurrent", "prefill_step", "prompt_cache_bytes"];

/// `kv_group_size` when a preset names none (mlx-lm's default).
pub const DEFAULT_KV_GROUP_SIZE: u32 = 64;
/// `prompt_cache_disk_bytes` when a preset names none.
const DEFAULT_PROMPT_CACHE_DISK_BYTES: &str = "4GiB";
/// The smallest rotating KV cache: mlx-lm keeps the first tokens (the attention
/// sink) besides the window, and a window this short forgets its own prompt.
pub const MIN_MAX_KV_SIZE: u32 = 256;

/// Whether a preset's draft model drafts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SpecMode {
    /// Draft while it pays: the worker lowers the draft length when acceptance
    /// falls, and stops drafting when acceptance collapses or drafting measures
    /// slower than plain decoding here (probing again later).
    #[default]
    Auto,
    /// Always draft `num_draft_tokens` (also past the family policy).
    On,
    /// Never draft (the draft is not loaded).
    Off,
}

impl SpecMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SpecMode::Auto => "auto",
            SpecMode::On => "on",
            SpecMode::Off => "off",
        }
    }
}

/// A preset's `[speculative]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Speculative {
    /// The draft model: an imported model's name or an absolute path. It must
    /// share the target's tokenizer (checked at load).
    pub draft: String,
    /// Tokens the draft proposes per round (the most, in auto mode).
    #[serde(default = "default_num_draft_tokens")]
    pub num_draft_tokens: u32,
    #[serde(default)]
    pub mode: SpecMode,
    /// Fail the load when the pair cannot draft (tokenizer, cache or family),
    /// instead of serving without drafting.
    #[serde(default)]
    pub require_supported: bool,
}

fn default_num_draft_tokens() -> u32 {
    3
}

/// The largest `num_draft_tokens` accepted: past this, a round's rejected tail
/// costs more than a good draft saves.
pub const MAX_DRAFT_TOKENS: u32 = 16;

fn default_keep_alive() -> String {
    "5m".into()
}

fn default_hang_timeout() -> String {
    "60s".into()
}

fn default_load_timeout() -> String {
    "300s".into()
}

fn default_restart_backoff() -> String {
    "1s".into()
}

/// A positive duration written like "60s", "5m" or "1h30m".
fn parse_timeout(what: &str, s: &str) -> anyhow::Result<std::time::Duration> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| anyhow::anyhow!("{what} {s:?}: {e} (write e.g. \"60s\" or \"5m\")"))?;
    anyhow::ensure!(!d.is_zero(), "{what} must be longer than zero");
    Ok(d)
}

fn default_max_tokens() -> u32 {
    DEFAULT_MAX_TOKENS
}

/// max_tokens for a request that names none, when its preset sets none either.
pub const DEFAULT_MAX_TOKENS: u32 = 512;

/// What the daemon assumes of a preset without `max_concurrent` until its worker
/// has said what it chose (python-worker/mlxd_worker/engines/sizing.py: 64 on a
/// GPU, 16 on a CPU): the memory estimate's sequences, which cost beyond their
/// tokens only for windowed or recurrent caches, and the queue's room before the
/// first load. Kept at the former default, so no load is charged more than before;
/// each request's KV is reserved by the worker as it starts, whatever this says.
pub const ASSUMED_MAX_CONCURRENT: u32 = 16;

fn default_max_queue() -> u32 {
    64
}

fn default_prefill_step() -> u32 {
    // mlx_lm.server's default: a prompt up to this long prefills in one pass (no
    // TTFT cost); longer ones yield to the running batch between chunks.
    2048
}

/// A model name a client may send: letters, digits, `._:-`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
}

impl Preset {
    pub fn parse(text: &str, file_stem: &str) -> anyhow::Result<Preset> {
        let mut p: Preset = toml::from_str(text)?;
        if p.name.is_empty() {
            p.name = file_stem.to_string();
        }
        // The typed parse cannot tell a default from a value written: the table can.
        let table: toml::Table = toml::from_str(text)?;
        let performance = table.get("performance").and_then(toml::Value::as_table);
        for key in TOP_LEVEL_PERFORMANCE_KEYS {
            anyhow::ensure!(
                !(table.contains_key(key) && performance.is_some_and(|t| t.contains_key(key))),
                "{key} is set both at the top level and in [performance]: keep one"
            );
        }
        p.fold_performance()?;
        p.validate()?;
        Ok(p)
    }

    /// Moves the `[performance]` keys that have a home elsewhere into it (see
    /// [`Performance`]).
    fn fold_performance(&mut self) -> anyhow::Result<()> {
        let perf = &mut self.performance;
        if let Some(n) = perf.max_concurrent.take() {
            self.max_concurrent = Some(n);
        }
        if let Some(n) = perf.prefill_step.take() {
            self.prefill_step = n;
        }
        if let Some(s) = perf.prompt_cache_bytes.take() {
            self.prompt_cache_bytes = Some(s);
        }
        let num_draft_tokens = perf.num_draft_tokens.take();
        let mode = perf.speculative_mode.take();
        if num_draft_tokens.is_none() && mode.is_none() {
            return Ok(());
        }
        let key = if num_draft_tokens.is_some() {
            "num_draft_tokens"
        } else {
            "speculative_mode"
        };
        let Some(spec) = self.speculative.as_mut() else {
            anyhow::bail!(
                "performance.{key} tunes a draft model, and there is none: add a [speculative] \
                 table naming it (draft = \"...\")"
            );
        };
        if let Some(n) = num_draft_tokens {
            spec.num_draft_tokens = n;
        }
        if let Some(mode) = mode {
            spec.mode = mode;
        }
        Ok(())
    }

    /// Checks a preset's values (after `parse` has folded `[performance]`; `mlxd
    /// tune` checks the candidates it makes by changing a parsed preset).
    pub fn validate(&self) -> anyhow::Result<()> {
        let p = self;
        for n in std::iter::once(&p.name).chain(&p.aliases) {
            anyhow::ensure!(valid_name(n), "invalid model name {n:?}");
        }
        anyhow::ensure!(p.max_tokens > 0, "max_tokens must be positive");
        anyhow::ensure!(
            p.max_concurrent != Some(0),
            "max_concurrent must be positive"
        );
        anyhow::ensure!(p.prefill_step > 0, "prefill_step must be positive");
        if let Some(rerank) = &p.rerank {
            anyhow::ensure!(
                rerank.method == "yes_no",
                "rerank.method must be \"yes_no\", not {:?}",
                rerank.method
            );
            anyhow::ensure!(
                p.engine == EngineKind::Mlx,
                "[rerank] needs engine \"mlx\" (a chat model)"
            );
        }
        if let Some(d) = &p.distributed {
            p.validate_distributed(d)?;
        }
        anyhow::ensure!(
            p.transport != TransportKind::Http || cfg!(feature = "bench-http"),
            "transport \"http\" exists only in benchmark builds (--features bench-http): it \
             gives the worker an unauthenticated port; use \"shm\" or \"stdio\""
        );
        KeepAlive::parse(&p.keep_alive).map_err(|e| anyhow::anyhow!(e))?;
        parse_timeout("hang_timeout", &p.hang_timeout)?;
        parse_timeout("load_timeout", &p.load_timeout)?;
        let backoff = parse_timeout("restart_backoff", &p.restart_backoff)?;
        anyhow::ensure!(
            backoff <= Policy::default().backoff_max,
            "restart_backoff {} is longer than the 30 s a backoff grows to",
            p.restart_backoff
        );
        if let Some(m) = &p.prompt_cache_bytes {
            cache_bytes(m).map_err(|e| anyhow::anyhow!("prompt_cache_bytes {e}"))?;
        }
        if let Some(m) = &p.memory_estimate {
            crate::memory::parse_bytes(m).map_err(|e| anyhow::anyhow!("memory_estimate {e}"))?;
        }
        if let Some(spec) = &p.speculative {
            anyhow::ensure!(
                (1..=MAX_DRAFT_TOKENS).contains(&spec.num_draft_tokens),
                "speculative.num_draft_tokens must be 1 to {MAX_DRAFT_TOKENS}"
            );
            anyhow::ensure!(
                p.engine == EngineKind::Mlx,
                "speculative decoding needs engine \"mlx\""
            );
            resolve_model(&spec.draft, Path::new("/"))
                .map_err(|e| anyhow::anyhow!("speculative.draft: {e}"))?;
        }
        p.validate_performance()
    }

    /// A `[distributed]` preset: the table itself, and what a group does not serve
    /// yet (its ranks would diverge: each draws drafts, reads its own disk tier).
    fn validate_distributed(&self, d: &crate::distributed::Distributed) -> anyhow::Result<()> {
        d.validate()?;
        if let Some(why) = d.unsupported() {
            anyhow::bail!("{why}");
        }
        anyhow::ensure!(
            matches!(self.engine, EngineKind::Mlx | EngineKind::Replay),
            "a [distributed] preset needs engine \"mlx\""
        );
        anyhow::ensure!(
            self.transport != TransportKind::Http,
            "a [distributed] preset's rank 0 is reached over \"shm\" or \"stdio\""
        );
        for (what, set) in [
            ("[speculative]", self.speculative.is_some()),
            ("[rerank]", self.rerank.is_some()),
            (
                "performance.prompt_cache_dir",
                self.performance.prompt_cache_dir.is_some(),
            ),
        ] {
            anyhow::ensure!(
                !set,
                "a [distributed] preset does not take {what} yet: leave it out"
            );
        }
        Ok(())
    }

    /// The `[performance]` keys that `validate` has not seen elsewhere.
    fn validate_performance(&self) -> anyhow::Result<()> {
        let perf = &self.performance;
        if let Some(bits) = perf.kv_bits {
            anyhow::ensure!(
                matches!(bits, 4 | 8),
                "performance.kv_bits must be 4 or 8 (leave it out for a full-precision KV cache), not {bits}"
            );
        } else {
            for (key, set) in [
                ("kv_group_size", perf.kv_group_size.is_some()),
                ("quantized_kv_start", perf.quantized_kv_start.is_some()),
            ] {
                anyhow::ensure!(
                    !set,
                    "performance.{key} applies to a quantized KV cache: set kv_bits too, or remove it"
                );
            }
        }
        if let Some(group) = perf.kv_group_size {
            anyhow::ensure!(
                matches!(group, 32 | 64 | 128),
                "performance.kv_group_size must be 32, 64 or 128, not {group}"
            );
        }
        if let Some(max) = perf.max_kv_size {
            anyhow::ensure!(
                max >= MIN_MAX_KV_SIZE,
                "performance.max_kv_size must be at least {MIN_MAX_KV_SIZE} tokens, not {max}"
            );
            anyhow::ensure!(
                perf.kv_bits.is_none(),
                "a rotating KV cache cannot be quantized (mlx-lm): choose kv_bits or max_kv_size"
            );
        }
        if self.engine != EngineKind::Mlx {
            let kv_keys = [
                ("kv_bits", perf.kv_bits.is_some()),
                ("kv_group_size", perf.kv_group_size.is_some()),
                ("quantized_kv_start", perf.quantized_kv_start.is_some()),
                ("max_kv_size", perf.max_kv_size.is_some()),
            ];
            if let Some((key, _)) = kv_keys.iter().find(|(_, set)| *set) {
                anyhow::bail!(
                    "performance.{key} needs engine \"mlx\": the {} engine keeps no KV cache",
                    self.engine.as_str()
                );
            }
        }
        if let Some(dir) = &perf.prompt_cache_dir {
            expand_home(dir).map_err(|e| anyhow::anyhow!("performance.prompt_cache_dir: {e}"))?;
        }
        if let Some(size) = &perf.prompt_cache_disk_bytes {
            anyhow::ensure!(
                perf.prompt_cache_dir.is_some(),
                "performance.prompt_cache_disk_bytes limits the on-disk prefix cache: set \
                 prompt_cache_dir too, or remove it"
            );
            crate::memory::parse_bytes(size)
                .map_err(|e| anyhow::anyhow!("performance.prompt_cache_disk_bytes {e}"))?;
        }
        Ok(())
    }

    /// How the worker keeps the KV cache, for the memory estimate.
    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            bits: self.performance.kv_bits,
            group_size: self
                .performance
                .kv_group_size
                .unwrap_or(DEFAULT_KV_GROUP_SIZE),
            max_tokens: self.performance.max_kv_size,
        }
    }

    /// The on-disk prefix cache's directory (home expanded), if it has one.
    pub fn prompt_cache_dir(&self) -> Option<PathBuf> {
        expand_home(self.performance.prompt_cache_dir.as_deref()?).ok()
    }

    /// The on-disk prefix cache's limit in bytes, when there is one.
    pub fn prompt_cache_disk_limit(&self) -> Option<u64> {
        self.performance.prompt_cache_dir.as_ref()?;
        let size = self
            .performance
            .prompt_cache_disk_bytes
            .as_deref()
            .unwrap_or(DEFAULT_PROMPT_CACHE_DISK_BYTES);
        crate::memory::parse_bytes(size).ok()
    }

    /// What loading this model is expected to take, part by part: its weights,
    /// the runtime, the draft's weights and KV, and the KV reserve (the preset's
    /// `kv_reserve`, else `default_reserve` from the config, else 32,768 tokens).
    pub fn estimate(&self, models_dir: &Path, default_reserve: Option<KvReserve>) -> Estimate {
        let reserve = self
            .kv_reserve
            .or(default_reserve)
            .unwrap_or(KvReserve::Tokens(crate::memory::DEFAULT_KV_RESERVE_TOKENS));
        if self.engine == EngineKind::Replay {
            return Estimate {
                runtime_bytes: crate::memory::RUNTIME_OVERHEAD,
                ..Estimate::default()
            };
        }
        let read = |dir: PathBuf| crate::model_files::ModelFiles::read(Some(&dir));
        let Some(files) = self.model_path(models_dir).ok().map(read) else {
            return Estimate::default();
        };
        if self.worker_engine(models_dir) == EngineKind::Embedding {
            // An embedding model keeps no KV: its weights, the runtime, and one
            // pass's activations, counted with the runtime.
            return Estimate {
                weights_bytes: files.size,
                runtime_bytes: crate::memory::RUNTIME_OVERHEAD + encoder_activations(&files),
                context_length: files.context_length,
                ..Estimate::default()
            };
        }
        let mut estimate =
            crate::memory::estimate(&files, self.concurrency(None), self.kv_layout(), reserve);
        // A draft runs in the same worker for one sequence at a time: its weights
        // and its KV for the reserve's tokens, at full precision (the safe side).
        if let Some(draft) = self.draft_path(models_dir).map(read) {
            let tokens = match estimate.reserve_tokens {
                0 => crate::memory::DEFAULT_KV_RESERVE_TOKENS,
                t => t,
            };
            let d =
                crate::memory::estimate(&draft, 1, KvLayout::default(), KvReserve::Tokens(tokens));
            estimate.draft_bytes = d.weights_bytes + d.reserve_bytes;
        }
        estimate
    }

    /// Requests generating at once: `max_concurrent`, else what the worker chose
    /// for its device (`chosen`, from its Ready), else [`ASSUMED_MAX_CONCURRENT`].
    pub fn concurrency(&self, chosen: Option<u32>) -> u32 {
        self.max_concurrent
            .or(chosen)
            .unwrap_or(ASSUMED_MAX_CONCURRENT)
    }

    /// What the load admission charges, in bytes: `memory_estimate` when the
    /// preset sets one, else the estimate's total.
    pub fn memory_need(&self, models_dir: &Path, default_reserve: Option<KvReserve>) -> u64 {
        if let Some(m) = self.memory_estimate.as_deref() {
            return crate::memory::parse_bytes(m).unwrap_or(0);
        }
        match self.estimate(models_dir, default_reserve) {
            e if e == Estimate::default() => 0,
            e => e.total(),
        }
    }

    /// The settings that would lower what this preset needs, with the figures
    /// they act on (a refused load's message, `mlxd estimate`).
    pub fn ways_to_fit(&self, estimate: &Estimate) -> Vec<String> {
        let human = crate::memory::human;
        let mut ways = Vec::new();
        if estimate.reserve_bytes > 0 {
            ways.push(format!(
                "a smaller kv_reserve (now {} tokens, {})",
                estimate.reserve_tokens,
                human(estimate.reserve_bytes)
            ));
        }
        // Sequences cost beyond their tokens only with windows or recurrent state.
        let per_sequence = estimate
            .kv_shape
            .as_ref()
            .is_some_and(|s| s.bytes_per_sequence > 0 || !s.windows.is_empty());
        if per_sequence && self.concurrency(None) > 1 {
            ways.push(format!(
                "a lower max_concurrent (now {})",
                self.concurrency(None)
            ));
        }
        let quantizable = estimate.kv_quantizable && self.performance.max_kv_size.is_none();
        if quantizable && self.performance.kv_bits.is_none() && estimate.kv_bytes_per_token > 0 {
            ways.push("kv_bits = 8 (one byte per KV element instead of two or four)".into());
        }
        if estimate.draft_bytes > 0 {
            ways.push(format!("no draft model ({})", human(estimate.draft_bytes)));
        }
        ways
    }

    /// The prefix cache's limit in bytes (0: off).
    pub fn prompt_cache_limit(&self, models_dir: &Path, default_reserve: Option<KvReserve>) -> u64 {
        match self.prompt_cache_bytes.as_deref() {
            Some(s) => cache_bytes(s).unwrap_or(0),
            None if self.engine == EngineKind::Replay => 0,
            None if self.worker_engine(models_dir) == EngineKind::Embedding => 0,
            // Room for four long conversations (or a quarter of the need, if
            // more): the worker gives it back when a request needs the memory.
            None => {
                let estimate = self.estimate(models_dir, default_reserve);
                let long = estimate
                    .context_length
                    .map_or(crate::memory::DEFAULT_KV_RESERVE_TOKENS, |c| {
                        c.min(crate::memory::DEFAULT_KV_RESERVE_TOKENS)
                    });
                let conversations = estimate
                    .kv_shape
                    .as_ref()
                    .map_or(0, |shape| 4 * shape.sequence_bytes(long));
                conversations.max(self.memory_need(models_dir, default_reserve) / 4)
            }
        }
    }

    /// The draft model's directory, when the preset drafts.
    pub fn draft_path(&self, models_dir: &Path) -> Option<PathBuf> {
        let spec = self.speculative.as_ref()?;
        if spec.mode == SpecMode::Off {
            return None;
        }
        resolve_model(&spec.draft, models_dir).ok()
    }

    /// The slot's restart policy and timeouts (fields validated by `parse`).
    pub fn policy(&self) -> Policy {
        let defaults = Policy::default();
        Policy {
            keep_alive: KeepAlive::parse(&self.keep_alive).unwrap_or(defaults.keep_alive),
            hang_timeout: parse_timeout("", &self.hang_timeout).unwrap_or(defaults.hang_timeout),
            load_timeout: parse_timeout("", &self.load_timeout).unwrap_or(defaults.load_timeout),
            backoff_first: parse_timeout("", &self.restart_backoff)
                .unwrap_or(defaults.backoff_first),
            ..defaults
        }
    }

    /// The engine options the worker receives in its Load frame (the daemon adds
    /// what depends on the machine: memory limit, cache size, the draft's path).
    pub fn worker_options(&self) -> LoadOptions {
        let perf = &self.performance;
        let (dir, disk) = match (self.prompt_cache_dir(), self.prompt_cache_disk_limit()) {
            (Some(dir), Some(limit)) => (Some(dir.to_string_lossy().into_owned()), Some(limit)),
            _ => (None, None),
        };
        LoadOptions {
            max_batch: self.max_concurrent,
            prefill_step: self.prefill_step,
            flush: self.flush.into(),
            kv_bits: perf.kv_bits,
            kv_group_size: perf
                .kv_bits
                .map(|_| perf.kv_group_size.unwrap_or(DEFAULT_KV_GROUP_SIZE)),
            quantized_kv_start: perf.kv_bits.map(|_| perf.quantized_kv_start.unwrap_or(0)),
            max_kv_size: perf.max_kv_size,
            prompt_cache_dir: dir,
            prompt_cache_disk_bytes: disk,
            faults: self.faults.clone(),
            reasoning_inline: self.reasoning == ReasoningMode::Off,
            rerank_instruction: self.rerank.as_ref().map(|r| r.instruction.clone()),
            speculative: self.speculative.as_ref().map(|spec| SpeculativeOptions {
                draft: spec.draft.clone(),
                draft_path: None,
                num_draft_tokens: spec.num_draft_tokens,
                mode: spec.mode.as_str().to_string(),
                require_supported: spec.require_supported,
            }),
            ..LoadOptions::default()
        }
    }

    /// The model directory: absolute paths are taken as they are; names resolve
    /// under the models dir (and must not escape it).
    pub fn model_path(&self, models_dir: &Path) -> anyhow::Result<PathBuf> {
        resolve_model(&self.model, models_dir)
    }

    /// What the model's files say, read from its directory (empty where absent).
    pub fn model_files(&self, models_dir: &Path) -> crate::model_files::ModelFiles {
        crate::model_files::ModelFiles::read(self.model_path(models_dir).ok().as_deref())
    }

    /// The engine the worker runs: the preset's, except that a model whose files say
    /// it is an embedding model is served by the embedding engine (unless its preset
    /// has `[rerank]`: that makes it a chat model that reranks by its verdict), and
    /// one with a vision tower by the vision engine.
    pub fn worker_engine(&self, models_dir: &Path) -> EngineKind {
        match self.engine {
            EngineKind::Mlx if self.rerank.is_some() => EngineKind::Mlx,
            EngineKind::Mlx => match self.model_path(models_dir) {
                Ok(dir) if crate::model_files::serves_embeddings(&dir) => EngineKind::Embedding,
                Ok(dir) if crate::model_files::has_vision_tower(&dir) => EngineKind::Vision,
                _ => EngineKind::Mlx,
            },
            other => other,
        }
    }
}

/// Padded tokens in one pass of the embedding engine
/// (python-worker/mlxd_worker/engines/embedding.py `MAX_BATCH_TOKENS`).
pub const ENCODER_BATCH_TOKENS: u64 = 8192;

/// The float32 activations of one full encoder pass: per token, every head's
/// attention scores over its row (at most the position table long), the hidden
/// states a block keeps, and the feed-forward's inner layer (with its activation).
fn encoder_activations(files: &crate::model_files::ModelFiles) -> u64 {
    let get = |key: &str, default: u64| {
        crate::model_files::config_field(&files.config, key)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(default)
    };
    let hidden = get("hidden_size", 768);
    let row = files.context_length.unwrap_or(512).min(8192);
    let per_token = get("num_attention_heads", 12) * row
        + 4 * hidden
        + 2 * get("intermediate_size", 4 * hidden);
    ENCODER_BATCH_TOKENS * per_token * 4
}

/// A directory written absolute or from the home directory (`~/cache`).
fn expand_home(dir: &str) -> anyhow::Result<PathBuf> {
    let path = match dir.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => {
            let home = std::env::var_os("HOME")
                .ok_or_else(|| anyhow::anyhow!("{dir:?} starts with ~ and HOME is not set"))?;
            PathBuf::from(home).join(rest.trim_start_matches('/'))
        }
        _ => PathBuf::from(dir),
    };
    anyhow::ensure!(
        path.is_absolute(),
        "{dir:?} must be an absolute path or start with ~/"
    );
    Ok(path)
}

/// A prefix-cache size: a size, or "0" for none.
fn cache_bytes(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    crate::memory::parse_bytes(s).map_err(|e| e.to_string())
}

/// An imported model's name (resolved under the models dir, which it must not
/// escape) or an absolute path.
fn resolve_model(model: &str, models_dir: &Path) -> anyhow::Result<PathBuf> {
    let p = Path::new(model);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    anyhow::ensure!(
        valid_name(model),
        "model {model:?} is not a valid model name"
    );
    Ok(models_dir.join(model))
}

/// How long an idle model stays loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Until stopped.
    Forever,
    /// Unloaded after this long without requests (zero: as soon as it is idle).
    For(Duration),
}

impl KeepAlive {
    /// Ollama's forms: `"5m"`, `"1h30m"`, `"30s"`, `"0"`, a negative number for
    /// forever, or a bare number of seconds.
    pub fn parse(s: &str) -> Result<KeepAlive, String> {
        let s = s.trim();
        if let Ok(secs) = s.parse::<f64>() {
            return KeepAlive::from_seconds(secs);
        }
        if s.starts_with('-') {
            return Ok(KeepAlive::Forever);
        }
        humantime::parse_duration(s)
            .map(KeepAlive::For)
            .map_err(|e| format!("keep_alive {s:?}: {e} (use e.g. \"5m\", \"0\" or \"-1\")"))
    }

    pub fn from_seconds(secs: f64) -> Result<KeepAlive, String> {
        if secs.is_nan() {
            return Err("keep_alive must be a number of seconds or a duration".into());
        }
        if secs < 0.0 {
            return Ok(KeepAlive::Forever);
        }
        Duration::try_from_secs_f64(secs)
            .map(KeepAlive::For)
            .map_err(|e| format!("keep_alive {secs}: {e}"))
    }

    pub fn describe(self) -> String {
        match self {
            KeepAlive::Forever => "forever".into(),
            KeepAlive::For(d) => humantime::format_duration(d).to_string(),
        }
    }
}

/// The restart policy and timeouts of one model.
#[derive(Debug, Clone)]
pub struct Policy {
    /// First wait before restarting a crashed worker; doubles per consecutive crash.
    pub backoff_first: Duration,
    pub backoff_max: Duration,
    /// More than `max_crashes` within `crash_window` puts the model in Failed, and
    /// so do more than `max_crashes` in a row that each came before or within
    /// `quick_uptime` of their incarnation becoming ready (slow loads spread those
    /// beyond any window: a model that dies right after every load); a longer run,
    /// or one ended on purpose, breaks the row. A run of `crash_window` resets the
    /// backoff.
    pub max_crashes: usize,
    pub crash_window: Duration,
    pub quick_uptime: Duration,
    /// How long a stop waits for in-flight requests and the worker's own exit.
    pub stop_grace: Duration,
    /// No progress for this long with requests in flight: the worker is hung.
    pub hang_timeout: Duration,
    /// No progress for this long while loading (or twice this in all): stalled.
    pub load_timeout: Duration,
    /// The preset's keep-alive; a request may override it.
    pub keep_alive: KeepAlive,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            backoff_first: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            max_crashes: 5,
            crash_window: Duration::from_secs(60),
            // Short of the gaps between outside kills (the soak's, an OOM killer's
            // now and then), long enough for a first request to kill a new worker.
            quick_uptime: Duration::from_secs(10),
            stop_grace: Duration::from_secs(10),
            hang_timeout: Duration::from_secs(60),
            load_timeout: Duration::from_secs(300),
            keep_alive: KeepAlive::For(Duration::from_secs(300)),
        }
    }
}

/// All presets by name, with aliases.
#[derive(Debug, Clone, Default)]
pub struct Presets {
    /// Shared: a request carries its preset from the API to the slot.
    by_name: BTreeMap<String, Arc<Preset>>,
    aliases: BTreeMap<String, String>,
}

impl Presets {
    /// Loads every `*.toml` in `dirs` (missing dirs are skipped; a later dir wins).
    pub fn load(dirs: &[PathBuf]) -> anyhow::Result<Presets> {
        let mut out = Presets::default();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f)?;
                let stem = f.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
                let mut p = Preset::parse(&text, stem)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                p.source = Some(f.clone());
                out.insert(p);
            }
        }
        Ok(out)
    }

    pub fn insert(&mut self, p: Preset) {
        for a in &p.aliases {
            self.aliases.insert(a.clone(), p.name.clone());
        }
        self.by_name.insert(p.name.clone(), Arc::new(p));
    }

    /// Exact name first, then alias.
    pub fn resolve(&self, name: &str) -> Option<&Arc<Preset>> {
        self.by_name
            .get(name)
            .or_else(|| self.aliases.get(name).and_then(|n| self.by_name.get(n)))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Preset> {
        self.by_name.values().map(|p| &**p)
    }

    /// By exact name (no alias).
    pub fn get(&self, name: &str) -> Option<&Arc<Preset>> {
        self.by_name.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Load options as the worker reads them.
    fn options_json(p: &Preset) -> serde_json::Value {
        serde_json::to_value(p.worker_options()).unwrap()
    }

    #[test]
    fn shipped_presets_parse() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets");
        let presets = Presets::load(&[dir]).unwrap();
        let p = presets
            .resolve("smollm2-135m")
            .expect("the default model is shipped");
        assert_eq!(p.transport, TransportKind::Shm);
    }

    #[test]
    fn embedding_models_are_known_by_their_files_or_by_the_preset() {
        let dir = std::env::temp_dir().join(format!("mlxd-embedder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = r#"{"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "intermediate_size": 128, "max_position_embeddings": 32768}"#;
        std::fs::write(dir.join("config.json"), config).unwrap();
        std::fs::write(dir.join("model.safetensors"), vec![0u8; 4096]).unwrap();
        let preset = |extra: &str| {
            Preset::parse(
                &format!("model = {:?}\n{extra}", dir.to_str().unwrap()),
                "x",
            )
            .unwrap()
        };
        let plain = preset("");
        assert_eq!(plain.worker_engine(&dir), EngineKind::Mlx);
        assert!(plain.estimate(&dir, None).kv_bytes_per_token > 0);
        // A chat checkpoint named as an embedding model by its preset.
        let named = preset("engine = \"embedding\"");
        assert_eq!(named.worker_engine(&dir), EngineKind::Embedding);
        // Qwen3-Embedding's sentence-transformers files make it one without a word.
        let modules =
            r#"[{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]"#;
        std::fs::write(dir.join("modules.json"), modules).unwrap();
        assert_eq!(plain.worker_engine(&dir), EngineKind::Embedding);
        // A preset's [rerank] keeps it a chat model that judges by its verdict.
        let judge = preset("[rerank]\nmethod = \"yes_no\"");
        assert_eq!(judge.worker_engine(&dir), EngineKind::Mlx);
        let estimate = plain.estimate(&dir, None);
        assert_eq!(
            (estimate.kv_bytes_per_token, estimate.reserve_tokens),
            (0, 0)
        );
        assert!(estimate.runtime_bytes > crate::memory::RUNTIME_OVERHEAD);
        // An encoder is one by its config alone.
        std::fs::remove_file(dir.join("modules.json")).unwrap();
        std::fs::write(dir.join("config.json"), r#"{"model_type": "modernbert"}"#).unwrap();
        assert_eq!(plain.worker_engine(&dir), EngineKind::Embedding);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_vision_model_is_known_by_its_tower_not_only_its_config() {
        let dir = std::env::temp_dir().join(format!("mlxd-vision-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = r#"{"model_type": "qwen2_vl", "vision_config": {"depth": 2}}"#;
        std::fs::write(dir.join("config.json"), config).unwrap();
        // A one-tensor safetensors file: header length, header, data.
        let weights = |name: &str| {
            let header = format!(
                r#"{{"{name}": {{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}}}"#
            );
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header.as_bytes());
            bytes.extend([0u8; 4]);
            std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        };
        let preset = Preset::parse(&format!("model = {:?}", dir.to_str().unwrap()), "x").unwrap();
        // mlx-lm's text-only conversion: the config kept, the tower dropped.
        weights("language_model.model.embed_tokens.weight");
        assert_eq!(preset.worker_engine(&dir), EngineKind::Mlx);
        weights("vision_tower.patch_embed.proj.weight");
        assert_eq!(preset.worker_engine(&dir), EngineKind::Vision);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rerank_table_reaches_the_worker_and_bad_ones_are_refused() {
        let p = Preset::parse("model = \"m\"\n[rerank]\nmethod = \"yes_no\"", "x").unwrap();
        assert_eq!(
            options_json(&p)["rerank_instruction"],
            default_rerank_instruction()
        );
        let bad = Preset::parse("model = \"m\"\n[rerank]\nmethod = \"cosine\"", "x");
        assert!(bad.unwrap_err().to_string().contains("yes_no"));
        let replay = "model = \"m\"\nengine = \"replay\"\n[rerank]\nmethod = \"yes_no\"";
        assert!(Preset::parse(replay, "x").is_err());
        assert!(options_json(&Preset::parse("model = \"m\"", "x").unwrap())
            .get("rerank_instruction")
            .is_none());
    }

    #[test]
    fn names_aliases_transport_and_validation() {
        let p = Preset::parse(
            "model = \"m\"\naliases = [\"a\"]\ntransport = \"stdio\"",
            "stem",
        )
        .unwrap();
        assert_eq!(
            (p.name.as_str(), p.transport, p.max_tokens),
            ("stem", TransportKind::Stdio, 512)
        );
        let mut ps = Presets::default();
        ps.insert(p);
        assert_eq!(ps.resolve("a").unwrap().name, "stem");
        assert!(ps.resolve("b").is_none());
        assert!(Preset::parse("model = \"m\"\nbogus = 1", "x").is_err());
        assert!(Preset::parse("model = \"m\"", "../evil").is_err());
        let traversal = Preset::parse("model = \"../../etc\"", "x").unwrap();
        assert!(traversal.model_path(Path::new("/models")).is_err());
    }

    #[test]
    fn flush_policies_and_limits() {
        let p = Preset::parse("model = \"m\"", "x").unwrap();
        assert_eq!(
            (p.flush, p.max_concurrent, p.max_queue, p.engine),
            (FlushPolicy::Step, None, 64, EngineKind::Mlx)
        );
        // Left out, the worker sizes the batch (Load says nothing) and the daemon
        // admits what it chose; a preset's own value wins over both.
        assert!(options_json(&p).get("max_batch").is_none());
        assert_eq!(p.concurrency(Some(64)), 64);
        assert_eq!(p.concurrency(None), ASSUMED_MAX_CONCURRENT);
        let p = Preset::parse(
            "model = \"m\"\nflush = \"8 tokens\"\nengine = \"replay\"\nmax_concurrent = 2",
            "x",
        )
        .unwrap();
        assert_eq!(
            (p.flush, p.engine, p.max_concurrent),
            (FlushPolicy::Tokens(8), EngineKind::Replay, Some(2))
        );
        assert_eq!(options_json(&p)["flush"]["tokens"], 8);
        assert_eq!(
            (
                options_json(&p)["max_batch"].clone(),
                p.concurrency(Some(64))
            ),
            (2.into(), 2)
        );
        let p = Preset::parse("model = \"m\"\nflush = \"2.5 ms\"", "x").unwrap();
        assert_eq!(p.flush, FlushPolicy::Millis(2.5));
        for bad in ["\"0 tokens\"", "\"fast\"", "\"-1 ms\"", "\"3 parsecs\""] {
            assert!(
                Preset::parse(&format!("model = \"m\"\nflush = {bad}"), "x").is_err(),
                "{bad}"
            );
        }
        assert!(Preset::parse("model = \"m\"\nmax_concurrent = 0", "x").is_err());
    }

    #[cfg(not(feature = "bench-http"))]
    #[test]
    fn the_http_transport_is_refused_outside_benchmark_builds() {
        let err = Preset::parse("model = \"m\"\ntransport = \"http\"", "x").unwrap_err();
        assert!(
            err.to_string().contains("only in benchmark builds"),
            "{err}"
        );
    }

    #[test]
    fn lifecycle_settings_parse_and_bad_ones_are_refused() {
        let p = Preset::parse("model = \"m\"", "x").unwrap();
        let policy = p.policy();
        assert_eq!(
            policy.keep_alive,
            KeepAlive::For(std::time::Duration::from_secs(300))
        );
        assert_eq!(policy.hang_timeout.as_secs(), 60);
        assert_eq!(policy.load_timeout.as_secs(), 300);
        assert_eq!(policy.backoff_first.as_secs(), 1);
        let p = Preset::parse(
            "model = \"m\"\nkeep_alive = \"-1\"\nhang_timeout = \"3s\"\nrestart_backoff = \"250ms\"\n[faults]\nstep_delay_ms = 5",
            "x",
        )
        .unwrap();
        assert_eq!(p.policy().keep_alive, KeepAlive::Forever);
        assert_eq!(p.policy().hang_timeout.as_secs(), 3);
        assert_eq!(p.policy().backoff_first.as_millis(), 250);
        assert_eq!(options_json(&p)["faults"]["step_delay_ms"], 5);
        for bad in [
            "keep_alive = \"soon\"",
            "hang_timeout = \"0s\"",
            "load_timeout = \"x\"",
            "restart_backoff = \"1m\"",
        ] {
            assert!(
                Preset::parse(&format!("model = \"m\"\n{bad}"), "x").is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn speculative_tables_parse_and_reach_the_worker() {
        let p = Preset::parse("model = \"m\"\n[speculative]\ndraft = \"d\"", "x").unwrap();
        let spec = p.speculative.as_ref().unwrap();
        assert_eq!(
            (spec.num_draft_tokens, spec.mode, spec.require_supported),
            (3, SpecMode::Auto, false)
        );
        let options = options_json(&p);
        assert_eq!(options["speculative"]["draft"], "d");
        assert_eq!(options["speculative"]["mode"], "auto");
        assert_eq!(
            p.draft_path(Path::new("/models")),
            Some(PathBuf::from("/models/d"))
        );
        let p = Preset::parse(
            "model = \"m\"\n[speculative]\ndraft = \"/abs/d\"\nnum_draft_tokens = 5\nmode = \"on\"\nrequire_supported = true",
            "x",
        )
        .unwrap();
        let spec = p.speculative.as_ref().unwrap();
        assert_eq!((spec.num_draft_tokens, spec.mode), (5, SpecMode::On));
        assert_eq!(options_json(&p)["speculative"]["require_supported"], true);
        assert_eq!(
            p.draft_path(Path::new("/models")),
            Some(PathBuf::from("/abs/d"))
        );
        // mode "off" loads no draft.
        let p = Preset::parse(
            "model = \"m\"\n[speculative]\ndraft = \"d\"\nmode = \"off\"",
            "x",
        )
        .unwrap();
        assert_eq!(p.draft_path(Path::new("/models")), None);
        for bad in [
            "[speculative]\nnum_draft_tokens = 3",
            "[speculative]\ndraft = \"d\"\nnum_draft_tokens = 0",
            "[speculative]\ndraft = \"d\"\nnum_draft_tokens = 99",
            "[speculative]\ndraft = \"d\"\nmode = \"sometimes\"",
            "[speculative]\ndraft = \"d\"\ndrafts = 2",
            "[speculative]\ndraft = \"../../etc\"",
            "engine = \"replay\"\n[speculative]\ndraft = \"d\"",
        ] {
            assert!(
                Preset::parse(&format!("model = \"m\"\n{bad}"), "x").is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_prompt_cache_limit_is_a_size_zero_or_a_quarter_of_the_need() {
        let models = Path::new("/nonexistent");
        let limit = |extra: &str| {
            Preset::parse(&format!("model = \"m\"\n{extra}"), "x")
                .map(|p| p.prompt_cache_limit(models, None))
        };
        assert_eq!(limit("prompt_cache_bytes = \"64MiB\"").unwrap(), 64 << 20);
        assert_eq!(limit("prompt_cache_bytes = \"0\"").unwrap(), 0);
        assert_eq!(
            limit("memory_estimate = \"4GiB\"").unwrap(),
            1 << 30,
            "a quarter of the need"
        );
        assert_eq!(limit("engine = \"replay\"").unwrap(), 0);
        assert!(limit("prompt_cache_bytes = \"lots\"").is_err());
    }

    #[test]
    fn the_performance_table_parses_and_folds_into_the_top_level_fields() {
        let p = Preset::parse(
            "model = \"m\"\nmax_queue = 8\n[performance]\nmax_concurrent = 4\nprefill_step = 512\n\
             prompt_cache_bytes = \"64MiB\"\nkv_bits = 8\nkv_group_size = 32\nquantized_kv_start = 100",
            "x",
        )
        .unwrap();
        assert_eq!(
            (p.max_concurrent, p.prefill_step, p.max_queue),
            (Some(4), 512, 8)
        );
        assert_eq!(
            p.prompt_cache_limit(Path::new("/nonexistent"), None),
            64 << 20
        );
        assert_eq!(p.performance.max_concurrent, None, "folded into the field");
        let options = options_json(&p);
        assert_eq!(
            (
                &options["max_batch"],
                &options["prefill_step"],
                &options["kv_bits"],
                &options["kv_group_size"],
                &options["quantized_kv_start"]
            ),
            (&4.into(), &512.into(), &8.into(), &32.into(), &100.into())
        );
        for absent in ["max_kv_size", "prompt_cache_dir", "prompt_cache_disk_bytes"] {
            assert!(options.get(absent).is_none(), "{absent}");
        }
        // Serialized, it parses back to the same values (no key in two places).
        let again = Preset::parse(&toml::to_string(&p).unwrap(), "x").unwrap();
        assert_eq!(options_json(&again), options);
        // The top level still works for presets written before the table.
        let old =
            Preset::parse("model = \"m\"\nmax_concurrent = 2\nprefill_step = 256", "x").unwrap();
        assert_eq!((old.max_concurrent, old.prefill_step), (Some(2), 256));
    }

    #[test]
    fn a_key_at_the_top_level_and_in_performance_is_refused_by_name() {
        for key in [
            "max_concurrent = 2",
            "prefill_step = 512",
            "prompt_cache_bytes = \"1GiB\"",
        ] {
            let err = Preset::parse(&format!("model = \"m\"\n{key}\n[performance]\n{key}"), "x")
                .unwrap_err()
                .to_string();
            let name = key.split(' ').next().unwrap();
            assert!(err.contains(name) && err.contains("both"), "{err}");
        }
    }

    #[test]
    fn kv_options_and_the_disk_cache_reach_the_worker() {
        let p = Preset::parse("model = \"m\"\n[performance]\nkv_bits = 4", "x").unwrap();
        let options = options_json(&p);
        assert_eq!(
            (
                &options["kv_bits"],
                &options["kv_group_size"],
                &options["quantized_kv_start"]
            ),
            (&4.into(), &64.into(), &0.into()),
            "defaults travel with kv_bits"
        );
        let p = Preset::parse(
            "model = \"m\"\n[performance]\nmax_kv_size = 4096\nprompt_cache_dir = \"/var/cache/mlxd\"",
            "x",
        )
        .unwrap();
        let options = options_json(&p);
        assert_eq!(options["max_kv_size"], 4096);
        assert_eq!(options["prompt_cache_dir"], "/var/cache/mlxd");
        assert_eq!(options["prompt_cache_disk_bytes"], 4u64 << 30);
        assert!(options.get("kv_bits").is_none() && options.get("kv_group_size").is_none());
        let p = Preset::parse(
            "model = \"m\"\n[performance]\nprompt_cache_dir = \"~/pc\"\nprompt_cache_disk_bytes = \"512MiB\"",
            "x",
        )
        .unwrap();
        let options = options_json(&p);
        let dir = options["prompt_cache_dir"].as_str().unwrap();
        assert!(
            dir.starts_with('/') && dir.ends_with("/pc") && !dir.contains('~'),
            "{dir}"
        );
        assert_eq!(options["prompt_cache_disk_bytes"], 512u64 << 20);
        let plain = options_json(&Preset::parse("model = \"m\"", "x").unwrap());
        for absent in [
            "kv_bits",
            "max_kv_size",
            "prompt_cache_dir",
            "prompt_cache_disk_bytes",
        ] {
            assert!(plain.get(absent).is_none(), "{absent}");
        }
    }

    #[test]
    fn performance_overrides_the_speculative_table() {
        let p = Preset::parse(
            "model = \"m\"\n[speculative]\ndraft = \"d\"\nnum_draft_tokens = 3\nmode = \"auto\"\n\
             [performance]\nnum_draft_tokens = 5\nspeculative_mode = \"off\"",
            "x",
        )
        .unwrap();
        let options = options_json(&p);
        assert_eq!(options["speculative"]["num_draft_tokens"], 5);
        assert_eq!(options["speculative"]["mode"], "off");
        let err = Preset::parse(
            "model = \"m\"\n[performance]\nspeculative_mode = \"on\"",
            "x",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("speculative_mode") && err.contains("[speculative]"),
            "{err}"
        );
        assert!(Preset::parse(
            "model = \"m\"\n[speculative]\ndraft = \"d\"\n[performance]\nnum_draft_tokens = 99",
            "x"
        )
        .is_err());
    }

    #[test]
    fn bad_performance_values_are_refused_with_the_reason() {
        for (bad, says) in [
            ("kv_bits = 3", "4 or 8"),
            (
                "kv_bits = 8\nmax_kv_size = 1024",
                "choose kv_bits or max_kv_size",
            ),
            ("kv_bits = 8\nkv_group_size = 48", "32, 64 or 128"),
            ("kv_group_size = 32", "set kv_bits"),
            ("quantized_kv_start = 10", "set kv_bits"),
            ("max_kv_size = 100", "at least 256"),
            ("prompt_cache_disk_bytes = \"1GiB\"", "prompt_cache_dir"),
            (
                "prompt_cache_dir = \"/c\"\nprompt_cache_disk_bytes = \"lots\"",
                "not a size",
            ),
            ("prompt_cache_dir = \"relative/dir\"", "absolute"),
            ("prompt_cache_dir = \"~other/dir\"", "absolute"),
            ("prefill_step = 0", "prefill_step"),
            ("kv_bitz = 8", "kv_bitz"),
        ] {
            let err = Preset::parse(&format!("model = \"m\"\n[performance]\n{bad}"), "x")
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let err = Preset::parse(
            "model = \"m\"\nengine = \"replay\"\n[performance]\nkv_bits = 8",
            "x",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("replay"), "{err}");
    }

    fn model_dir(name: &str, models: &[(&str, usize, &str)]) -> PathBuf {
        let dir = crate::test_support::scratch_dir(name);
        for (model, bytes, config) in models {
            std::fs::create_dir_all(dir.join(model)).unwrap();
            std::fs::write(dir.join(model).join("model.safetensors"), vec![0u8; *bytes]).unwrap();
            std::fs::write(dir.join(model).join("config.json"), config).unwrap();
        }
        dir
    }

    /// 2 layers × 4 KV heads × 64 dims: 2 × 2 × 4 × 64 = 1,024 float32 elements
    /// (4,096 bytes) per token; a context of 4,096.
    const SMALL: &str = r#"{"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256,
        "max_position_embeddings": 4096}"#;

    #[test]
    fn the_memory_need_charges_a_reserve_of_the_working_set_not_every_sequence_at_full_context() {
        let dir = model_dir("kv-need", &[("t", 1000, SMALL)]);
        let need = |extra: &str, default: Option<KvReserve>| {
            Preset::parse(&format!("model = \"t\"\nmax_concurrent = 16\n{extra}"), "x")
                .unwrap()
                .memory_need(&dir, default)
        };
        let fixed = 1000 + crate::memory::RUNTIME_OVERHEAD;
        let per_token = 4096;
        // The default reserve: 32,768 tokens, capped at the context (4,096),
        // whatever max_concurrent says.
        assert_eq!(need("", None), fixed + per_token * 4096);
        assert_eq!(need("kv_reserve = 1000", None), fixed + per_token * 1000);
        assert_eq!(
            need("kv_reserve = \"1K tokens\"", None),
            fixed + per_token * 1024
        );
        assert_eq!(need("kv_reserve = \"1MiB\"", None), fixed + (1 << 20));
        // The config's default applies where the preset says nothing.
        assert_eq!(
            need("", Some(KvReserve::Tokens(10))),
            fixed + per_token * 10
        );
        assert_eq!(
            need("kv_reserve = 20", Some(KvReserve::Tokens(10))),
            fixed + per_token * 20
        );
        // A rotating cache of 256 tokens: 16 sequences hold 1,000 tokens in
        // all; 8-bit KV is 1.125 bytes per element, not 4.
        assert_eq!(
            need("kv_reserve = 1000\n[performance]\nmax_kv_size = 256", None),
            fixed + per_token * 1000
        );
        assert_eq!(
            need("kv_reserve = 1000\n[performance]\nkv_bits = 8", None),
            fixed + 1024 * 1000 * 9 / 8
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_default_prompt_cache_holds_four_long_conversations() {
        let dir = model_dir("cache-default", &[("t", 1000, SMALL)]);
        let preset = Preset::parse("model = \"t\"", "x").unwrap();
        // Four sequences at the 4,096-token context, 4,096 bytes a token: 64 MiB,
        // more than a quarter of the need (1000 B + 150 MiB + a 16 MiB reserve).
        assert_eq!(preset.prompt_cache_limit(&dir, None), 4 * 4096 * 4096);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_memory_need_counts_the_draft_weights_and_its_kv() {
        let dir = model_dir("draft-need", &[("t", 1000, SMALL), ("d", 300, SMALL)]);
        let plain = Preset::parse("model = \"t\"\nkv_reserve = 100", "x").unwrap();
        let drafting = Preset::parse(
            "model = \"t\"\nkv_reserve = 100\n[speculative]\ndraft = \"d\"",
            "x",
        )
        .unwrap();
        assert_eq!(
            drafting.memory_need(&dir, None) - plain.memory_need(&dir, None),
            300 + 4096 * 100
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
