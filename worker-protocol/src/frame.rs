//! The frames the daemon and a worker exchange: ONE definition, used by the shm
//! ring, the stdio codec and (through the extension module) the Python worker.
//!
//! Wire layout of every frame: `[len u32][kind u16][flags u16][payload; len]`,
//! little-endian. In the shm ring each frame is padded to 8 bytes; on stdio it is not.
//! Hot frames (TokenBatch, Cancel) have fixed binary layouts; cold frames carry JSON
//! whose field names follow mlx-lm (`finish_reason`, `prompt_tps`, ...).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; the Hello frame carries it and the daemon
/// refuses a worker that speaks another version.
pub const PROTOCOL_VERSION: u32 = 9;

/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 8;

/// Frame kinds. `Padding` only ever appears inside the shm ring (it fills the tail
/// end of the data area so that no frame straddles the wrap point).
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Padding = 0,
    Hello = 1,
    Load = 2,
    Ready = 3,
    Generate = 4,
    Cancel = 5,
    TokenBatch = 6,
    Done = 7,
    Error = 8,
    Stats = 9,
    Shutdown = 10,
    /// Daemon → worker: give MLX's buffer cache back to the system (memory pressure).
    ClearCache = 11,
    /// Worker → daemon: a tool call parsed from a request's output.
    ToolCall = 12,
    /// Worker → daemon: log probabilities of tokens about to be sent.
    Logprobs = 13,
    /// Worker → daemon: a request was admitted (its prompt's size, before prefill).
    Admitted = 14,
    /// Daemon → worker: its share of the memory budget changed.
    MemoryLimit = 15,
    /// Daemon → worker: vectors for some inputs (a worker in embedding mode).
    Embed = 16,
    /// Worker → daemon: an Embed's vectors.
    Embeddings = 17,
}

impl Kind {
    /// Every kind, for drift checks against the pure-Python codec.
    pub const ALL: [Kind; 18] = [
        Kind::Padding,
        Kind::Hello,
        Kind::Load,
        Kind::Ready,
        Kind::Generate,
        Kind::Cancel,
        Kind::TokenBatch,
        Kind::Done,
        Kind::Error,
        Kind::Stats,
        Kind::Shutdown,
        Kind::ClearCache,
        Kind::ToolCall,
        Kind::Logprobs,
        Kind::Admitted,
        Kind::MemoryLimit,
        Kind::Embed,
        Kind::Embeddings,
    ];

    pub fn from_u16(v: u16) -> Option<Kind> {
        Kind::ALL.get(v as usize).copied()
    }

    /// The name the Python side uses for this kind (`frames.py` constants).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Padding => "PADDING",
            Kind::Hello => "HELLO",
            Kind::Load => "LOAD",
            Kind::Ready => "READY",
            Kind::Generate => "GENERATE",
            Kind::Cancel => "CANCEL",
            Kind::TokenBatch => "TOKEN_BATCH",
            Kind::Done => "DONE",
            Kind::Error => "ERROR",
            Kind::Stats => "STATS",
            Kind::Shutdown => "SHUTDOWN",
            Kind::ClearCache => "CLEAR_CACHE",
            Kind::ToolCall => "TOOL_CALL",
            Kind::Logprobs => "LOGPROBS",
            Kind::Admitted => "ADMITTED",
            Kind::MemoryLimit => "MEMORY_LIMIT",
            Kind::Embed => "EMBED",
            Kind::Embeddings => "EMBEDDINGS",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("truncated {kind:?} frame: {detail}")]
    Truncated { kind: Kind, detail: &'static str },
    #[error("invalid JSON in {kind:?} frame: {message}")]
    Json { kind: Kind, message: String },
    #[error("token text is not UTF-8 in TokenBatch for request {0}")]
    Utf8(u64),
    #[error("frame kind {0:?} is not valid here")]
    Unexpected(Kind),
}

/// Worker → daemon, first frame: who is speaking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol_version: u32,
    pub pid: u32,
    /// "mlx" or "replay".
    pub engine: String,
    /// Where MLX runs: "cpu" or "gpu".
    #[serde(default)]
    pub device: String,
    /// The BLAS library the worker process has loaded (Linux CPU), if known.
    #[serde(default)]
    pub blas: Option<String>,
    /// Whether the worker uses the Rust extension module (false: pure-Python stdio).
    #[serde(default)]
    pub native_protocol: bool,
    /// The loopback port the worker serves generations on (`http` transport only).
    #[serde(default)]
    pub http_port: Option<u16>,
    /// A discrete GPU's own memory (MLX CUDA): the budget cannot exceed it.
    /// Absent on the CPU and on a Mac, whose GPU shares the host's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_memory: Option<u64>,
}

/// Daemon → worker: load this model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Load {
    pub model_path: String,
    /// The name clients use, for the worker's logs.
    pub model_name: String,
    /// How to serve it, from the preset (and the daemon's memory budget).
    // Boxed: a Frame is as large as its largest variant.
    #[serde(default)]
    pub options: Box<LoadOptions>,
}

/// A worker's engine settings: the preset's knobs as the worker reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadOptions {
    /// Sequences decoding at once (the preset's `max_concurrent`); absent, the
    /// worker sizes the batch to its device and says so in Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u32>,
    /// Prompt tokens prefilled per model call.
    #[serde(default = "default_prefill_step")]
    pub prefill_step: u32,
    /// When the engine hands its pending tokens to the transport.
    #[serde(default)]
    pub flush: FlushOptions,
    /// Quantized KV: bits per element, elements per scale, and the prompt
    /// length from which the lone lane quantizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_bits: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_group_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantized_kv_start: Option<u32>,
    /// A rotating KV cache of this many tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_kv_size: Option<u32>,
    /// The prefix cache's memory limit (0: off).
    #[serde(default)]
    pub prompt_cache_bytes: u64,
    /// The prefix cache's disk tier, when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_disk_bytes: Option<u64>,
    /// The worker's share of the memory budget, as MLX's memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
    /// The KV cache's bytes as a function of a sequence's tokens (the daemon
    /// reads it from config.json): what the worker reserves for each sequence
    /// before admitting it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_shape: Option<KvShape>,
    /// The draft model and how to use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<SpeculativeOptions>,
    /// The replay engine's text (benchmarks; a built-in text when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_text: Option<String>,
    /// Test-only fault injection (a preset's `[faults]` table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<FaultOptions>,
    /// The model's context in tokens, as its config.json gives it (the daemon
    /// reads it: one rule for what `/v1/models` says and what the worker refuses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
    /// The preset's `reasoning = "off"`: a reasoning model's thinking stays in
    /// the answer's text as the model wrote it, markers included.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reasoning_inline: bool,
    /// The preset's `[rerank]`: this chat model also answers reranks (an Embed
    /// with a query) by the yes/no method, judging relevance under this instruction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerank_instruction: Option<String>,
}

/// The KV cache's size as a function of one sequence's tokens:
/// `bytes_per_token · n + Σ window.bytes_per_token · min(n, window.tokens) +
/// bytes_per_sequence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KvShape {
    /// Per token, the layers that keep every token (full attention, MLA latents).
    pub bytes_per_token: u64,
    /// Layers that keep at most a window of tokens (sliding-window attention, a
    /// rotating cache), grouped by window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<KvWindow>,
    /// Per sequence whatever its length (linear attention and SSM state).
    #[serde(default)]
    pub bytes_per_sequence: u64,
}

/// Sliding-window layers of one window size, together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KvWindow {
    pub tokens: u64,
    pub bytes_per_token: u64,
}

impl KvShape {
    /// One sequence of `tokens` tokens.
    pub fn sequence_bytes(&self, tokens: u64) -> u64 {
        self.bytes_per_token * tokens
            + self
                .windows
                .iter()
                .map(|w| w.bytes_per_token * tokens.min(w.tokens))
                .sum::<u64>()
            + self.bytes_per_sequence
    }

    /// Bytes per token while a sequence is shorter than every window (the figure
    /// `mlxd list` shows; long sequences cost `bytes_per_token` per token more).
    pub fn first_token_bytes(&self) -> u64 {
        self.bytes_per_token + self.windows.iter().map(|w| w.bytes_per_token).sum::<u64>()
    }
}

fn default_prefill_step() -> u32 {
    2048
}

/// When the worker flushes tokens: every step, every N tokens, or every T ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(tag = "every", rename_all = "lowercase", deny_unknown_fields)]
pub enum FlushOptions {
    #[default]
    Step,
    Tokens {
        tokens: u32,
    },
    Ms {
        ms: f64,
    },
}

/// A draft model for speculative decoding, as the preset's `[speculative]` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeOptions {
    /// The draft as the preset names it (for logs and status).
    pub draft: String,
    /// The draft's resolved directory (set by the daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_path: Option<String>,
    pub num_draft_tokens: u32,
    /// "auto", "on" or "off".
    pub mode: String,
    #[serde(default)]
    pub require_supported: bool,
}

/// What a real worker cannot be made to do on demand, for the supervisor's
/// tests (python-worker/mlxd_worker/faults.py).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultOptions {
    /// Sleep forever inside Load, before the model is read.
    #[serde(default)]
    pub hang_in_load: bool,
    /// Milliseconds each decode step takes longer.
    #[serde(default)]
    pub step_delay_ms: u64,
    /// Raise inside the N-th decode step (1-based).
    #[serde(default)]
    pub raise_in_step: u64,
    /// Send a frame of an unknown kind after the N-th decode step.
    #[serde(default)]
    pub garbage_after_step: u64,
    /// Fail the N-th decode step as MLX fails an allocation past the device's
    /// memory (a Mac's Metal or CUDA raise; the Linux CPU allocator cannot).
    #[serde(default)]
    pub out_of_memory_in_step: u64,
    /// The batch the worker's device would choose when the preset leaves
    /// `max_concurrent` out (a CPU host cannot show a GPU's choice otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_batch: Option<u32>,
}

/// Worker → daemon: the model is loaded and warmed up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    pub load_seconds: f64,
    #[serde(default)]
    pub context_length: Option<u32>,
    /// Present when the preset names a draft model.
    #[serde(default)]
    pub speculative: Option<Box<SpecStatus>>,
    /// What the worker found the model to be (absent for the replay engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Box<ModelFacts>>,
    /// The sequences it decodes at once: Load's `max_batch`, or what it chose for
    /// its device when Load left it out (the daemon then admits that many).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u32>,
}

/// A loaded model as the worker sees it: its family, the cache layer kinds
/// mlx-lm builds for it, and the features switched off (or limited) for it at
/// load, each with the reason (`mlxd ps`, `/v1/models`, the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelFacts {
    /// mlx-lm's `model_type` (the text model's, for a wrapped config).
    pub family: String,
    /// The cache layer classes, each once, e.g. `["ArraysCache", "KVCache"]`.
    pub cache_kinds: Vec<String>,
    /// Features off or limited for this model, and why.
    #[serde(default)]
    pub limits: Vec<FeatureLimit>,
    /// How its thinking is told apart from its answer ("<think>…</think>",
    /// "harmony"), when the worker separates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
}

/// One feature off or limited for a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeatureLimit {
    /// "speculative", "prefix_cache", "kv_bits" or "max_kv_size".
    pub feature: String,
    pub reason: String,
}

/// One request's draft tokens: `drafted = accepted + rejected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct DraftCounts {
    pub drafted: u64,
    pub accepted: u64,
    pub rejected: u64,
}

impl DraftCounts {
    /// Accepted / drafted (0 when nothing was drafted).
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

/// A worker's speculative decoding as it stands: its draft, whether it drafts
/// now and why, and its counters (Ready and every Stats).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct SpecStatus {
    pub draft: String,
    /// "auto", "on" or "off".
    pub mode: String,
    /// Whether a request alone decodes speculatively now.
    pub active: bool,
    /// Why it is (in)active: the pair check, the mode, or the adaptive policy.
    pub reason: String,
    /// Tokens drafted per round now (0 while inactive).
    #[serde(default)]
    pub num_draft_tokens: u32,
    /// Accepted / drafted over the recent rounds.
    #[serde(default)]
    pub acceptance: f64,
    #[serde(default)]
    pub drafted_total: u64,
    #[serde(default)]
    pub accepted_total: u64,
    /// Decode tokens/s measured drafting and plain (0 until measured).
    #[serde(default)]
    pub spec_tps: f64,
    #[serde(default)]
    pub plain_tps: f64,
    /// Adaptive transitions: draft length lowered/raised, drafting turned off/on.
    #[serde(default)]
    pub lowered_total: u64,
    #[serde(default)]
    pub raised_total: u64,
    #[serde(default)]
    pub off_total: u64,
    #[serde(default)]
    pub on_total: u64,
    /// Lane switches of a request in flight: into the batch, and back to drafting.
    #[serde(default)]
    pub to_batch_total: u64,
    #[serde(default)]
    pub to_speculative_total: u64,
}

/// One turn of a conversation, in the dialect-neutral form every API maps onto.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// "system", "user", "assistant" or "tool".
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<MessageToolCall>,
    /// A tool turn: the call it answers, and the tool's name when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's reasoning, as the client sent it back (chat templates
    /// that keep the thinking of the current tool-call round render it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// A turn with images: its text and images in the order the client wrote them
    /// (`content` is then empty: the parts hold the text).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<ContentPart>,
}

/// A piece of a turn with images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ContentPart {
    Text {
        text: String,
    },
    /// The request's `images[image]`.
    Image {
        image: u32,
    },
}

/// A tool call already in the history (the model made it on an earlier turn).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON object (chat templates iterate over them).
    pub arguments: serde_json::Value,
}

/// A function the model may call: its JSON-schema parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub parameters: serde_json::Value,
    /// A custom (freeform) tool's Lark grammar: a call forced to it writes its
    /// input raw, after a line with the tool's name, held to the grammar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lark: Option<String>,
}

/// Whether and which tool the model must call. `Required` and `Function` are
/// enforced with constrained decoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    #[default]
    Auto,
    None,
    Required,
    /// This function, by name.
    Function(String),
}

/// An output format enforced during decoding (llguidance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against `schema`; `strict` forbids properties the schema does
    /// not name (OpenAI's strict mode) where the schema leaves that open.
    JsonSchema {
        schema: serde_json::Value,
        #[serde(default)]
        strict: bool,
    },
}

/// Daemon → worker: start generating for request `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Generate {
    pub id: u64,
    /// Chat messages (the worker applies the model's chat template) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// ... or a raw prompt (completions API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The images the messages' parts refer to: each file's bytes (PNG, JPEG,
    /// WebP or GIF). They travel after the frame's JSON, not in it (see
    /// [`Frame::encode_payload`]): base64 in JSON cost the worker ~25 ms per
    /// megapixel screenshot to parse and decode.
    #[serde(skip)]
    pub images: Vec<bytes::Bytes>,
    pub max_tokens: u32,
    /// Sampling; absent: the model's own default (its generation_config.json),
    /// else greedy (temperature 0) and top_p 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Force the interactive lane's drafting on or off for this request (the
    /// benchmark compares both); None leaves it to the worker's policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<bool>,
    /// Functions the model may call (rendered by the chat template, or in the
    /// system prompt when the template has no tool support).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    #[serde(default, skip_serializing_if = "is_auto")]
    pub tool_choice: ToolChoice,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Box<OutputFormat>>,
    /// Send Logprobs frames for this request, with this many alternatives per
    /// token (0..=20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u8>,
    /// What the request asks of a reasoning model's thinking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<Box<ReasoningOptions>>,
    /// Only count the prompt's tokens (Anthropic's count_tokens): the worker
    /// answers Done with finish_reason "counted" and generates nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub count_only: bool,
}

/// A request's thinking, as every dialect's own fields map onto it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ReasoningOptions {
    /// Ask the chat template to open (true) or skip (false) the thinking
    /// section (`enable_thinking`); None: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// "low", "medium" or "high": the chat template's `reasoning_effort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effort: Option<String>,
    /// At most this many thinking tokens: the worker then ends the thinking
    /// section itself and the answer follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
}

fn is_auto(c: &ToolChoice) -> bool {
    *c == ToolChoice::Auto
}

/// Worker → daemon: request `id` called a tool (its `index`-th call). Sent after
/// the tokens before it and before Done, whose finish_reason is then "tool_calls".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolCallFrame {
    pub id: u64,
    pub index: u32,
    /// The call's id ("call_..."), which a tool result refers to.
    pub call_id: String,
    pub name: String,
    /// The arguments as JSON text (an object).
    pub arguments: String,
}

/// Worker → daemon: request `id` was admitted: its prompt's length in tokens and
/// how many of them the prefix cache holds, known before its prefill starts (so a
/// stream can open with them: Anthropic's `message_start` carries its usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdmittedFrame {
    pub id: u64,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
}

/// The log probability of one token, with the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenLogprob {
    pub token: u32,
    /// The token decoded alone (may be part of a character).
    pub text: String,
    pub logprob: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TopLogprob {
    pub token: u32,
    pub text: String,
    pub logprob: f32,
}

/// Worker → daemon: the logprobs of request `id`'s next tokens, sent just before
/// the TokenBatch that carries them (one entry per generated token, EOS included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogprobsFrame {
    pub id: u64,
    pub entries: Vec<TokenLogprob>,
}

/// One token of one sequence inside a TokenBatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub id: u64,
    pub token: u32,
    /// The text this token completes (may be empty while the detokenizer waits
    /// for the rest of a multi-byte character or a possible stop string).
    pub text: String,
    /// The text is thinking, not answer (a reasoning model's thinking section).
    pub reasoning: bool,
}

/// Set in an entry's token field when its text is thinking: token ids stay far
/// below 2^31, so the flag costs the hot path no byte.
pub const REASONING_FLAG: u32 = 1 << 31;

/// Worker → daemon: one step's tokens for every sequence that advanced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenBatch {
    pub entries: Vec<TokenEntry>,
}

/// Worker → daemon: request `id` is finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Done {
    pub id: u64,
    /// "stop", "length", "tool_calls", "cancelled", or "counted" (count_only).
    pub finish_reason: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    #[serde(default)]
    pub prompt_tps: f64,
    #[serde(default)]
    pub generation_tps: f64,
    /// Present when the model has a usable draft.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<DraftCounts>,
    /// The stop sequence that ended the request (finish_reason "stop").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequence: Option<String>,
    /// Prompt tokens whose KV came from the prefix cache (not prefilled).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_tokens: u32,
    /// Completion tokens spent thinking (included in completion_tokens).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reasoning_tokens: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The worker's prefix cache (Stats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PromptCacheStats {
    /// Requests that looked a prefix up, by outcome.
    pub lookups: PromptCacheLookups,
    /// Prompt tokens served from the cache instead of prefilled.
    pub cached_tokens_total: u64,
    /// What the cache holds now, and its limit.
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// The disk tier, when the preset has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Box<DiskCacheStats>>,
}

/// The prefix cache's lookups by outcome (one per request with a prompt), so an
/// operator sees why reuse fails: an agent that rewrites its system prompt parts
/// from its cached conversation early (`hit_diverged` at a small token, or
/// `miss_diverged` where the cache cannot be cut), a cache too small evicts
/// (`miss_evicted`). The worker's debug log says where each one parted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PromptCacheLookups {
    /// Hits whose prompt goes on from the cached prompt they reuse (or ends inside it).
    pub hit_continued: u64,
    /// Hits whose prompt parts from the cached prompt inside it: only the tokens
    /// before the parting were reused.
    pub hit_diverged: u64,
    /// Misses: nothing cached shares the prompt's start.
    pub miss_cold: u64,
    /// Misses: a cached prompt shares the start, but its cache cannot be cut back
    /// to where they part (rotating or recurrent layers).
    pub miss_diverged: u64,
    /// Misses: the prompt's start was cached, and was evicted since.
    pub miss_evicted: u64,
    /// Misses: the prompt is too short to reuse anything (one token).
    pub miss_too_short: u64,
}

impl PromptCacheLookups {
    /// Each count with its result (`hit`, `miss`) and reason, as /metrics labels them.
    pub fn by_outcome(&self) -> [(&'static str, &'static str, u64); 6] {
        [
            ("hit", "continued", self.hit_continued),
            ("hit", "diverged", self.hit_diverged),
            ("miss", "cold", self.miss_cold),
            ("miss", "diverged", self.miss_diverged),
            ("miss", "evicted", self.miss_evicted),
            ("miss", "too_short", self.miss_too_short),
        ]
    }

    pub fn hits(&self) -> u64 {
        self.hit_continued + self.hit_diverged
    }

    pub fn total(&self) -> u64 {
        self.by_outcome().iter().map(|(_, _, n)| n).sum()
    }
}

/// The prefix cache's disk tier (`prompt_cache_dir`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct DiskCacheStats {
    /// Lookups served from a file (after missing in memory).
    pub hits_total: u64,
    /// Files on disk now, and their bytes.
    pub entries: u64,
    pub bytes: u64,
    /// Files found stale (another model, versions, corrupt) and deleted.
    pub stale_total: u64,
    /// Entries written, and writes dropped because the writer fell behind.
    pub writes_total: u64,
    pub dropped_total: u64,
}

/// Worker → daemon: something failed, for one request (`id`) or the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorFrame {
    #[serde(default)]
    pub id: Option<u64>,
    pub message: String,
    /// "invalid_request" (the client's fault), "context_length_exceeded" (the
    /// client's too: the prompt leaves nothing of the context) or "worker" (ours).
    #[serde(default = "worker_code")]
    pub code: String,
}

fn worker_code() -> String {
    "worker".to_string()
}

/// Worker → daemon, every second: memory and load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    #[serde(default)]
    pub active_memory: u64,
    #[serde(default)]
    pub peak_memory: u64,
    #[serde(default)]
    pub cache_memory: u64,
    #[serde(default)]
    pub rss: u64,
    /// Sequences generating right now.
    #[serde(default)]
    pub active_sequences: u32,
    /// Generate frames received but not yet started.
    #[serde(default)]
    pub queued_sequences: u32,
    #[serde(default)]
    pub completed_total: u64,
    #[serde(default)]
    pub cancelled_total: u64,
    /// Decode steps run, and tokens they produced (their ratio is the mean batch).
    #[serde(default)]
    pub batch_steps_total: u64,
    #[serde(default)]
    pub batch_tokens_total: u64,
    /// TokenBatch frames sent (fewer than steps under a "N tokens"/"T ms" flush policy).
    #[serde(default)]
    pub token_frames_total: u64,
    /// The engine's progress counter (advanced every loop iteration and prefill
    /// chunk). Over shm the daemon reads it from the segment header instead.
    #[serde(default)]
    pub heartbeat: u64,
    /// True once the engine can no longer serve (its thread died); the worker then
    /// exits, and the daemon never takes such a worker for healthy.
    #[serde(default)]
    pub engine_failed: bool,
    /// Present when the preset names a draft model.
    #[serde(default)]
    pub speculative: Option<Box<SpecStatus>>,
    /// Present when the prefix cache is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache: Option<Box<PromptCacheStats>>,
    /// The worker's KV accounting (absent from the replay engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<Box<KvStats>>,
    /// Where the engine's time goes and how full its steps are (absent from
    /// workers that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Box<StepStats>>,
}

/// The upper bounds of the batch-size buckets of [`StepStats::batch_size_steps`]
/// (sequences a step advanced; 0: a step that only prefilled); a last bucket past
/// them counts larger batches.
pub const BATCH_SIZE_BOUNDS: [u32; 9] = [0, 1, 2, 4, 8, 16, 32, 64, 128];

/// The engine's time by part, and its steps by batch size (Stats): /metrics
/// exports them, so an operator sees whether the model, the prefill of new
/// arrivals or the worker's own per-token work bounds throughput.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepStats {
    /// Seconds in the model's prefill passes (prompts, in chunks).
    pub prefill_seconds_total: f64,
    /// Seconds in the model's decode passes (waiting for a step's tokens).
    pub decode_seconds_total: f64,
    /// Seconds of the engine's own work between passes while sequences were in
    /// flight: admissions, detokenizing, stop strings, tool calls, frames.
    pub host_seconds_total: f64,
    /// Steps by the sequences they advanced: one count per bucket of
    /// [`BATCH_SIZE_BOUNDS`] (at most that many, more than the previous bound),
    /// and a last one for larger steps.
    pub batch_size_steps: Vec<u64>,
}

/// What the worker holds and has promised (Stats): `/admin/memory` and `mlxd ps`
/// show it per model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KvStats {
    /// The model's weights (and the draft's) as MLX holds them.
    pub weights_bytes: u64,
    /// What the worker holds with nothing in flight (weights, runtime, kernels).
    pub baseline_bytes: u64,
    /// The KV caches of the sequences in flight, as their arrays measure.
    pub in_use_bytes: u64,
    /// What the sequences in flight may grow to (each reserved to its
    /// `max_tokens` when admitted).
    pub reserved_bytes: u64,
    /// The share of the budget that KV and the prefix cache may fill together.
    pub capacity_bytes: u64,
    /// Requests waiting for KV memory to free up.
    pub waiting: u32,
    /// Requests refused because their KV could never fit, and prefix-cache
    /// entries dropped to make room for a request.
    pub refused_total: u64,
    pub evicted_for_room_total: u64,
}

/// Daemon → worker: the worker's share of the budget changed (another model
/// loaded or left, or the device's memory became known).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryLimitFrame {
    pub memory_limit: u64,
}

/// Daemon → worker: request `id` wants one vector per input, in order. Inputs are
/// texts (`texts`) or token-id lists (`tokens`), never both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Embed {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub texts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<Vec<u32>>,
    /// Cut an input longer than the model's limit to the limit (else the request is
    /// refused, naming the limit).
    #[serde(default)]
    pub truncate: bool,
    /// Keep the first `dimensions` values of each vector, renormalized (Matryoshka).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    /// Rerank: the answer is each input's relevance to this query (`scores`), not
    /// vectors. A cross-encoder scores each (query, input) pair; an embedding model
    /// gives the cosine of their vectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// Worker → daemon: request `id`'s vectors, in its inputs' order, each as base64 of
/// little-endian f32 (OpenAI's `encoding_format: "base64"` as it is). A long answer
/// comes in several frames (each well inside a ring's frame limit), in order; the
/// last has `more: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsFrame {
    pub id: u64,
    pub vectors: Vec<String>,
    /// Tokens the inputs came to (after any truncation); on the last frame.
    pub prompt_tokens: u32,
    /// More of this answer's vectors follow in another frame.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
    /// A rerank's answer: one relevance score per input, in order (no vectors).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<f32>,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello(Hello),
    Load(Load),
    Ready(Ready),
    Generate(Generate),
    Cancel { id: u64 },
    TokenBatch(TokenBatch),
    Done(Done),
    Error(ErrorFrame),
    Stats(Stats),
    Shutdown,
    ClearCache,
    ToolCall(ToolCallFrame),
    Logprobs(LogprobsFrame),
    Admitted(AdmittedFrame),
    MemoryLimit(MemoryLimitFrame),
    Embed(Embed),
    Embeddings(EmbeddingsFrame),
}

impl Frame {
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Hello(_) => Kind::Hello,
            Frame::Load(_) => Kind::Load,
            Frame::Ready(_) => Kind::Ready,
            Frame::Generate(_) => Kind::Generate,
            Frame::Cancel { .. } => Kind::Cancel,
            Frame::TokenBatch(_) => Kind::TokenBatch,
            Frame::Done(_) => Kind::Done,
            Frame::Error(_) => Kind::Error,
            Frame::Stats(_) => Kind::Stats,
            Frame::Shutdown => Kind::Shutdown,
            Frame::ClearCache => Kind::ClearCache,
            Frame::ToolCall(_) => Kind::ToolCall,
            Frame::Logprobs(_) => Kind::Logprobs,
            Frame::Admitted(_) => Kind::Admitted,
            Frame::MemoryLimit(_) => Kind::MemoryLimit,
            Frame::Embed(_) => Kind::Embed,
            Frame::Embeddings(_) => Kind::Embeddings,
        }
    }

    /// Appends this frame's payload (not the header) to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        // serde_json cannot fail on these plain structs (string keys, no maps with
        // non-string keys), so the expects below document an invariant.
        let json = |out: &mut Vec<u8>, v: &dyn erased::Json| v.write(out);
        match self {
            Frame::Hello(v) => json(out, v),
            Frame::Load(v) => json(out, v),
            Frame::Ready(v) => json(out, v),
            Frame::Generate(v) => {
                json(out, v);
                encode_images(&v.images, out);
            }
            Frame::Done(v) => json(out, v),
            Frame::Error(v) => json(out, v),
            Frame::Stats(v) => json(out, v),
            Frame::ToolCall(v) => json(out, v),
            Frame::Logprobs(v) => json(out, v),
            Frame::Admitted(v) => json(out, v),
            Frame::MemoryLimit(v) => json(out, v),
            Frame::Embed(v) => json(out, v),
            Frame::Embeddings(v) => json(out, v),
            Frame::Cancel { id } => out.extend_from_slice(&id.to_le_bytes()),
            Frame::TokenBatch(b) => encode_token_batch(&b.entries, out),
            Frame::Shutdown | Frame::ClearCache => {}
        }
    }

    /// Header + payload, as written on the stdio transport.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_LEN];
        self.encode_payload(&mut out);
        let len = (out.len() - HEADER_LEN) as u32;
        write_header(&mut out[..HEADER_LEN], len, self.kind() as u16, 0);
        out
    }

    pub fn decode(kind: u16, _flags: u16, payload: &[u8]) -> Result<Frame, FrameError> {
        let kind = Kind::from_u16(kind).ok_or(FrameError::UnknownKind(kind))?;
        fn json<T: for<'a> Deserialize<'a>>(kind: Kind, p: &[u8]) -> Result<T, FrameError> {
            serde_json::from_slice(p).map_err(|e| FrameError::Json {
                kind,
                message: e.to_string(),
            })
        }
        Ok(match kind {
            Kind::Hello => Frame::Hello(json(kind, payload)?),
            Kind::Load => Frame::Load(json(kind, payload)?),
            Kind::Ready => Frame::Ready(json(kind, payload)?),
            Kind::Generate => {
                // serde_json never writes a NUL byte: the first one ends the JSON.
                let end = payload.iter().position(|&b| b == 0);
                let mut gen: Generate = json(kind, &payload[..end.unwrap_or(payload.len())])?;
                if let Some(end) = end {
                    gen.images = decode_images(&payload[end + 1..])?;
                }
                Frame::Generate(gen)
            }
            Kind::Done => Frame::Done(json(kind, payload)?),
            Kind::Error => Frame::Error(json(kind, payload)?),
            Kind::Stats => Frame::Stats(json(kind, payload)?),
            Kind::ToolCall => Frame::ToolCall(json(kind, payload)?),
            Kind::Logprobs => Frame::Logprobs(json(kind, payload)?),
            Kind::Admitted => Frame::Admitted(json(kind, payload)?),
            Kind::MemoryLimit => Frame::MemoryLimit(json(kind, payload)?),
            Kind::Embed => Frame::Embed(json(kind, payload)?),
            Kind::Embeddings => Frame::Embeddings(json(kind, payload)?),
            Kind::Cancel => {
                let id = payload
                    .get(..8)
                    .ok_or(FrameError::Truncated {
                        kind,
                        detail: "cancel id",
                    })?
                    .try_into()
                    .map(u64::from_le_bytes)
                    .expect("slice of 8");
                Frame::Cancel { id }
            }
            Kind::TokenBatch => Frame::TokenBatch(decode_token_batch(payload)?),
            Kind::Shutdown => Frame::Shutdown,
            Kind::ClearCache => Frame::ClearCache,
            Kind::Padding => return Err(FrameError::Unexpected(kind)),
        })
    }
}

mod erased {
    /// Object-safe "serialize as JSON into a Vec" so `encode_payload` has one arm shape.
    pub trait Json {
        fn write(&self, out: &mut Vec<u8>);
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, out: &mut Vec<u8>) {
            serde_json::to_writer(out, self).expect("plain structs always serialize");
        }
    }
}

/// A Generate's images after its JSON: a NUL byte (which JSON text never holds),
/// then per image `[len u32][file bytes]`. Nothing at all when it has none.
fn encode_images(images: &[bytes::Bytes], out: &mut Vec<u8>) {
    if images.is_empty() {
        return;
    }
    out.reserve(1 + images.iter().map(|i| 4 + i.len()).sum::<usize>());
    out.push(0);
    for image in images {
        out.extend_from_slice(&(image.len() as u32).to_le_bytes());
        out.extend_from_slice(image);
    }
}

fn decode_images(mut rest: &[u8]) -> Result<Vec<bytes::Bytes>, FrameError> {
    let truncated = || FrameError::Truncated {
        kind: Kind::Generate,
        detail: "image file",
    };
    let mut images = Vec::new();
    while !rest.is_empty() {
        let len = rest
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("slice of 4")) as usize)
            .ok_or_else(truncated)?;
        let file = rest.get(4..4 + len).ok_or_else(truncated)?;
        images.push(bytes::Bytes::copy_from_slice(file));
        rest = &rest[4 + len..];
    }
    Ok(images)
}

/// Writes the 8-byte frame header.
pub fn write_header(dst: &mut [u8], len: u32, kind: u16, flags: u16) {
    dst[0..4].copy_from_slice(&len.to_le_bytes());
    dst[4..6].copy_from_slice(&kind.to_le_bytes());
    dst[6..8].copy_from_slice(&flags.to_le_bytes());
}

/// Reads an 8-byte frame header: (payload len, kind, flags).
pub fn read_header(src: &[u8; HEADER_LEN]) -> (u32, u16, u16) {
    (
        u32::from_le_bytes([src[0], src[1], src[2], src[3]]),
        u16::from_le_bytes([src[4], src[5]]),
        u16::from_le_bytes([src[6], src[7]]),
    )
}

/// TokenBatch payload: `[count u32][reserved u32]` then per entry
/// `[id u64][token u32][text_len u32][text bytes]` (entries are not padded); the
/// token field's top bit is `REASONING_FLAG`.
pub fn encode_token_batch(entries: &[TokenEntry], out: &mut Vec<u8>) {
    let parts = || {
        entries.iter().map(|e| {
            let flag = if e.reasoning { REASONING_FLAG } else { 0 };
            (e.id, e.token | flag, e.text.as_bytes())
        })
    };
    let at = out.len();
    out.resize(at + token_batch_len(parts().map(|p| p.2)), 0);
    write_token_batch(parts(), &mut out[at..]);
}

/// The size of a TokenBatch payload holding entries with these texts.
pub fn token_batch_len<'a>(texts: impl Iterator<Item = &'a [u8]>) -> usize {
    8 + texts.map(|t| 16 + t.len()).sum::<usize>()
}

/// Writes a TokenBatch payload into `dst`, which must be exactly `token_batch_len`
/// bytes: the worker writes straight into its ring slot, with no buffer between.
pub fn write_token_batch<'a>(entries: impl Iterator<Item = (u64, u32, &'a [u8])>, dst: &mut [u8]) {
    let mut at = 8;
    let mut count = 0u32;
    for (id, token, text) in entries {
        dst[at..at + 8].copy_from_slice(&id.to_le_bytes());
        dst[at + 8..at + 12].copy_from_slice(&token.to_le_bytes());
        dst[at + 12..at + 16].copy_from_slice(&(text.len() as u32).to_le_bytes());
        dst[at + 16..at + 16 + text.len()].copy_from_slice(text);
        at += 16 + text.len();
        count += 1;
    }
    dst[0..4].copy_from_slice(&count.to_le_bytes());
    dst[4..8].fill(0);
}

/// Decodes a TokenBatch payload; every length is bounds-checked because frames
/// from a worker are untrusted.
pub fn decode_token_batch(p: &[u8]) -> Result<TokenBatch, FrameError> {
    let entries = token_batch_entries(p)?
        .map(|e| {
            e.map(|e| TokenEntry {
                id: e.id,
                token: e.token,
                text: e.text.to_owned(),
                reasoning: e.reasoning,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(TokenBatch { entries })
}

/// One entry of a TokenBatch, borrowed from the payload (no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRef<'a> {
    pub id: u64,
    pub token: u32,
    pub text: &'a str,
    pub reasoning: bool,
}

/// The entries of a TokenBatch payload, bounds- and UTF-8-checked one by one.
pub struct TokenBatchEntries<'a> {
    payload: &'a [u8],
    at: usize,
    left: u32,
}

/// Checks a TokenBatch's header and iterates its entries without allocating: the
/// daemon's hot path routes each entry as a slice of the frame it arrived in.
pub fn token_batch_entries(p: &[u8]) -> Result<TokenBatchEntries<'_>, FrameError> {
    let count = p
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| batch_truncated("count"))?;
    if p.len() < 8 {
        return Err(batch_truncated("header"));
    }
    // Each entry needs at least 16 bytes: refuse counts the payload cannot hold
    // (a caller may size a buffer by it).
    if (count as usize) > (p.len() - 8) / 16 {
        return Err(batch_truncated("count larger than payload"));
    }
    Ok(TokenBatchEntries {
        payload: p,
        at: 8,
        left: count,
    })
}

fn batch_truncated(detail: &'static str) -> FrameError {
    FrameError::Truncated {
        kind: Kind::TokenBatch,
        detail,
    }
}

impl<'a> Iterator for TokenBatchEntries<'a> {
    type Item = Result<TokenRef<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let p = self.payload;
        let at = self.at;
        let entry = (|| {
            let head = p
                .get(at..at + 16)
                .ok_or_else(|| batch_truncated("entry header"))?;
            let id = u64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
            let raw = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
            let (token, reasoning) = (raw & !REASONING_FLAG, raw & REASONING_FLAG != 0);
            let text_len = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as usize;
            let end = (at + 16)
                .checked_add(text_len)
                .ok_or_else(|| batch_truncated("text"))?;
            let text = p.get(at + 16..end).ok_or_else(|| batch_truncated("text"))?;
            let text = std::str::from_utf8(text).map_err(|_| FrameError::Utf8(id))?;
            let entry = TokenRef {
                id,
                token,
                text,
                reasoning,
            };
            Ok((entry, end))
        })();
        match entry {
            Ok((e, end)) => {
                self.at = end;
                Some(Ok(e))
            }
            Err(e) => {
                self.left = 0; // a broken entry ends the batch
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let bytes = f.encode();
        let (len, kind, flags) = read_header(bytes[..8].try_into().unwrap());
        assert_eq!(len as usize, bytes.len() - 8);
        assert_eq!(Frame::decode(kind, flags, &bytes[8..]).unwrap(), f);
    }

    #[test]
    fn every_frame_round_trips() {
        roundtrip(Frame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            pid: 42,
            engine: "mlx".into(),
            device: "cpu".into(),
            blas: Some("openblas".into()),
            native_protocol: true,
            http_port: Some(8080),
            device_memory: None,
        }));
        roundtrip(Frame::MemoryLimit(MemoryLimitFrame {
            memory_limit: 1 << 30,
        }));
        roundtrip(Frame::Embed(Embed {
            id: 9,
            texts: vec!["héllo".into(), String::new()],
            truncate: true,
            dimensions: Some(64),
            query: Some("q".into()),
            ..Default::default()
        }));
        roundtrip(Frame::Embeddings(EmbeddingsFrame {
            id: 9,
            vectors: vec!["AACAPw==".into()],
            prompt_tokens: 5,
            more: true,
            scores: vec![0.5, 0.25],
        }));
        roundtrip(Frame::Generate(Generate {
            id: 7,
            messages: Some(vec![ChatMessage {
                role: "user".into(),
                content: "héllo \"quoted\"".into(),
                ..Default::default()
            }]),
            max_tokens: 16,
            stop: vec!["\n".into()],
            seed: Some(3),
            ..Default::default()
        }));
        roundtrip(Frame::Generate(Generate {
            id: 9,
            messages: Some(vec![ChatMessage {
                role: "user".into(),
                content: "left right".into(),
                parts: vec![
                    ContentPart::Image { image: 1 },
                    ContentPart::Text {
                        text: "left right".into(),
                    },
                    ContentPart::Image { image: 0 },
                ],
                ..Default::default()
            }]),
            images: vec![
                bytes::Bytes::from_static(b"GIF89a\0\0"),
                bytes::Bytes::from_static(b"\x89PNG"),
            ],
            max_tokens: 4,
            ..Default::default()
        }));
        roundtrip(Frame::Generate(Generate {
            id: 8,
            messages: Some(vec![
                ChatMessage {
                    role: "assistant".into(),
                    tool_calls: vec![MessageToolCall {
                        id: "call_1".into(),
                        name: "get_weather".into(),
                        arguments: serde_json::json!({"city": "Paris"}),
                    }],
                    ..Default::default()
                },
                ChatMessage {
                    role: "tool".into(),
                    content: "18C".into(),
                    tool_call_id: Some("call_1".into()),
                    name: Some("get_weather".into()),
                    ..Default::default()
                },
            ]),
            max_tokens: 16,
            tools: vec![Tool {
                name: "get_weather".into(),
                description: None,
                parameters: serde_json::json!({"type": "object"}),
                lark: None,
            }],
            tool_choice: ToolChoice::Function("get_weather".into()),
            format: Some(Box::new(OutputFormat::JsonSchema {
                schema: serde_json::json!({"type": "object"}),
                strict: true,
            })),
            logprobs: Some(2),
            count_only: true,
            ..Default::default()
        }));
        roundtrip(Frame::Admitted(AdmittedFrame {
            id: 8,
            prompt_tokens: 40,
            cached_tokens: 32,
        }));
        roundtrip(Frame::ToolCall(ToolCallFrame {
            id: 8,
            index: 0,
            call_id: "call_x".into(),
            name: "get_weather".into(),
            arguments: "{\"city\":\"Paris\"}".into(),
        }));
        roundtrip(Frame::Logprobs(LogprobsFrame {
            id: 8,
            entries: vec![TokenLogprob {
                token: 5,
                text: "Par".into(),
                logprob: -0.5,
                top: vec![TopLogprob {
                    token: 6,
                    text: "Lon".into(),
                    logprob: -1.5,
                }],
            }],
        }));
        roundtrip(Frame::Cancel { id: u64::MAX });
        roundtrip(Frame::TokenBatch(TokenBatch {
            entries: vec![
                TokenEntry {
                    id: 1,
                    token: 5,
                    text: "Par".into(),
                    reasoning: false,
                },
                TokenEntry {
                    id: 2,
                    token: 9,
                    text: String::new(),
                    reasoning: true,
                },
                TokenEntry {
                    id: 1,
                    token: 6,
                    text: "is 🇫🇷".into(),
                    reasoning: false,
                },
            ],
        }));
        roundtrip(Frame::Done(Done {
            id: 1,
            finish_reason: "length".into(),
            prompt_tokens: 3,
            completion_tokens: 4,
            prompt_tps: 1.5,
            generation_tps: 2.5,
            speculative: Some(DraftCounts {
                drafted: 9,
                accepted: 6,
                rejected: 3,
            }),
            stop_sequence: Some("###".into()),
            cached_tokens: 7,
            reasoning_tokens: 2,
        }));
        roundtrip(Frame::Stats(Stats {
            rss: 1 << 30,
            speculative: Some(Box::new(SpecStatus {
                draft: "d".into(),
                mode: "auto".into(),
                active: false,
                reason: "drafting measured slower".into(),
                off_total: 1,
                ..Default::default()
            })),
            ..Default::default()
        }));
        roundtrip(Frame::Shutdown);
        roundtrip(Frame::ClearCache);
    }

    #[test]
    fn hostile_token_batches_are_refused_not_trusted() {
        // count claims a million entries in a 16-byte payload
        let mut p = vec![0u8; 16];
        p[..4].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(matches!(
            decode_token_batch(&p),
            Err(FrameError::Truncated { .. })
        ));
        // text_len runs past the end
        let mut p = Vec::new();
        encode_token_batch(
            &[TokenEntry {
                id: 1,
                token: 1,
                text: "abc".into(),
                reasoning: false,
            }],
            &mut p,
        );
        let n = p.len();
        p[n - 7..n - 3].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_token_batch(&p).is_err());
        // invalid UTF-8
        let bad: &[u8] = &[0xff, 0xfe];
        let mut p = vec![0u8; token_batch_len(std::iter::once(bad))];
        write_token_batch(std::iter::once((9, 1, bad)), &mut p);
        assert_eq!(decode_token_batch(&p), Err(FrameError::Utf8(9)));
        assert_eq!(Frame::decode(99, 0, &[]), Err(FrameError::UnknownKind(99)));
        assert!(Frame::decode(Kind::Cancel as u16, 0, &[1, 2]).is_err());
    }

    #[test]
    fn kinds_are_dense_and_named() {
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
            assert_eq!(Kind::from_u16(i as u16), Some(*k));
        }
        assert_eq!(Kind::from_u16(Kind::ALL.len() as u16), None);
    }
}
