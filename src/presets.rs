//! Model presets: one TOML file per model, shipped in `presets/` and added by
//! users in `$MLXD_HOME/presets/`. A preset names the model directory and how to
//! serve it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::supervisor::state::{KeepAlive, Policy};

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

/// What produces the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// mlx-lm with continuous batching.
    #[default]
    Mlx,
    /// A fixed text's tokens as fast as the protocol allows: measures the token path.
    Replay,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Mlx => "mlx",
            EngineKind::Replay => "replay",
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

impl FlushPolicy {
    /// The worker's view (its Load options).
    pub fn to_options(self) -> serde_json::Value {
        match self {
            FlushPolicy::Step => serde_json::json!({"every": "step"}),
            FlushPolicy::Tokens(n) => serde_json::json!({"every": "tokens", "tokens": n}),
            FlushPolicy::Millis(t) => serde_json::json!({"every": "ms", "ms": t}),
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
    /// Requests generating at once (the batch size); more wait in the queue.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
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
    /// What the loaded model needs ("700MiB", "12GiB"); without it the daemon
    /// estimates: weights on disk + runtime + full-context KV cache for
    /// `max_concurrent` sequences (README, "Memory").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_estimate: Option<String>,
    /// The prefix cache's limit ("1GiB"; "0" turns it off). Default: a quarter
    /// of what the model is expected to need (README, "Prompt cache").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_bytes: Option<String>,
    /// Speculative decoding with a draft model (README, "Speculative decoding").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<Speculative>,
    /// Test-only fault injection passed to the worker (see mlxd_worker/faults.py).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<toml::Table>,
}

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

/// A positive duration written like "60s", "5m" or "1h30m".
fn parse_timeout(what: &str, s: &str) -> anyhow::Result<std::time::Duration> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| anyhow::anyhow!("{what} {s:?}: {e} (write e.g. \"60s\" or \"5m\")"))?;
    anyhow::ensure!(!d.is_zero(), "{what} must be longer than zero");
    Ok(d)
}

fn default_max_tokens() -> u32 {
    512
}

fn default_max_concurrent() -> u32 {
    16
}

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
        for n in std::iter::once(&p.name).chain(&p.aliases) {
            anyhow::ensure!(valid_name(n), "invalid model name {n:?}");
        }
        anyhow::ensure!(p.max_tokens > 0, "max_tokens must be positive");
        anyhow::ensure!(p.max_concurrent > 0, "max_concurrent must be positive");
        anyhow::ensure!(p.prefill_step > 0, "prefill_step must be positive");
        anyhow::ensure!(
            p.transport != TransportKind::Http || cfg!(feature = "bench-http"),
            "transport \"http\" exists only in benchmark builds (--features bench-http): it \
             gives the worker an unauthenticated port; use \"shm\" or \"stdio\""
        );
        KeepAlive::parse(&p.keep_alive).map_err(|e| anyhow::anyhow!(e))?;
        parse_timeout("hang_timeout", &p.hang_timeout)?;
        parse_timeout("load_timeout", &p.load_timeout)?;
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
        Ok(p)
    }

    /// What loading this model is expected to take, in bytes.
    pub fn memory_need(&self, models_dir: &Path) -> u64 {
        if let Some(m) = self.memory_estimate.as_deref() {
            return crate::memory::parse_bytes(m).unwrap_or(0);
        }
        if self.engine == EngineKind::Replay {
            return crate::memory::RUNTIME_OVERHEAD;
        }
        let target = self
            .model_path(models_dir)
            .ok()
            .and_then(|dir| crate::memory::estimate(&dir, self.max_concurrent))
            .unwrap_or(0);
        // A draft runs in the same worker for one sequence at a time.
        let draft = self
            .draft_path(models_dir)
            .and_then(|dir| crate::memory::estimate(&dir, 1))
            .map_or(0, |d| d.saturating_sub(crate::memory::RUNTIME_OVERHEAD));
        target + draft
    }

    /// The prefix cache's limit in bytes (0: off).
    pub fn prompt_cache_limit(&self, models_dir: &Path) -> u64 {
        match self.prompt_cache_bytes.as_deref() {
            Some(s) => cache_bytes(s).unwrap_or(0),
            None if self.engine == EngineKind::Replay => 0,
            None => self.memory_need(models_dir) / 4,
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
            ..defaults
        }
    }

    /// The engine options the worker receives in its Load frame.
    pub fn worker_options(&self) -> serde_json::Value {
        let mut options = serde_json::json!({
            "max_batch": self.max_concurrent,
            "prefill_step": self.prefill_step,
            "flush": self.flush.to_options(),
        });
        if let Some(faults) = &self.faults {
            options["faults"] = serde_json::to_value(faults).unwrap_or_default();
        }
        if let Some(spec) = &self.speculative {
            options["speculative"] = serde_json::json!({
                "draft": spec.draft,
                "num_draft_tokens": spec.num_draft_tokens,
                "mode": spec.mode.as_str(),
                "require_supported": spec.require_supported,
            });
        }
        options
    }

    /// The model directory: absolute paths are taken as they are; names resolve
    /// under the models dir (and must not escape it).
    pub fn model_path(&self, models_dir: &Path) -> anyhow::Result<PathBuf> {
        resolve_model(&self.model, models_dir)
    }
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

/// All presets by name, with aliases.
#[derive(Debug, Clone, Default)]
pub struct Presets {
    by_name: BTreeMap<String, Preset>,
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
                let p = Preset::parse(&text, stem)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                out.insert(p);
            }
        }
        Ok(out)
    }

    pub fn insert(&mut self, p: Preset) {
        for a in &p.aliases {
            self.aliases.insert(a.clone(), p.name.clone());
        }
        self.by_name.insert(p.name.clone(), p);
    }

    /// Exact name first, then alias.
    pub fn resolve(&self, name: &str) -> Option<&Preset> {
        self.by_name
            .get(name)
            .or_else(|| self.aliases.get(name).and_then(|n| self.by_name.get(n)))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Preset> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            (FlushPolicy::Step, 16, 64, EngineKind::Mlx)
        );
        let p = Preset::parse(
            "model = \"m\"\nflush = \"8 tokens\"\nengine = \"replay\"\nmax_concurrent = 2",
            "x",
        )
        .unwrap();
        assert_eq!(
            (p.flush, p.engine, p.max_concurrent),
            (FlushPolicy::Tokens(8), EngineKind::Replay, 2)
        );
        assert_eq!(p.worker_options()["flush"]["tokens"], 8);
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
        let p = Preset::parse(
            "model = \"m\"\nkeep_alive = \"-1\"\nhang_timeout = \"3s\"\n[faults]\nstep_delay_ms = 5",
            "x",
        )
        .unwrap();
        assert_eq!(p.policy().keep_alive, KeepAlive::Forever);
        assert_eq!(p.policy().hang_timeout.as_secs(), 3);
        assert_eq!(p.worker_options()["faults"]["step_delay_ms"], 5);
        for bad in [
            "keep_alive = \"soon\"",
            "hang_timeout = \"0s\"",
            "load_timeout = \"x\"",
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
        let options = p.worker_options();
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
        assert_eq!(p.worker_options()["speculative"]["require_supported"], true);
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
                .map(|p| p.prompt_cache_limit(models))
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
    fn the_memory_need_counts_the_draft_weights() {
        let dir = std::env::temp_dir().join(format!("mlxd-draft-need-{}", std::process::id()));
        for (name, bytes) in [("t", 1000usize), ("d", 300)] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("model.safetensors"), vec![0u8; bytes]).unwrap();
            std::fs::write(dir.join(name).join("config.json"), "{}").unwrap();
        }
        let plain = Preset::parse("model = \"t\"", "x").unwrap();
        let drafting = Preset::parse("model = \"t\"\n[speculative]\ndraft = \"d\"", "x").unwrap();
        assert_eq!(drafting.memory_need(&dir) - plain.memory_need(&dir), 300);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
