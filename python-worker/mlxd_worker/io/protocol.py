"""The worker protocol's JSON frames as typed dicts. GENERATED from the Rust
definitions in worker-protocol/src/frame.rs by scripts/gen_protocol.py: do not edit;
change the Rust structs and run the script. The daemon decodes every frame from the
worker strictly (an unknown or misspelt field is an error), and
python-worker/unit_tests/test_protocol_drift.py round-trips every field through both sides.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, TypedDict, Union

PROTOCOL_VERSION = 9
# StepStats.batch_size_steps: the buckets' upper bounds (and one past them).
BATCH_SIZE_BOUNDS = (0, 1, 2, 4, 8, 16, 32, 64, 128)


class AdmittedFrame(TypedDict):
    """Worker → daemon: request `id` was admitted: its prompt's length in tokens and
    how many of them the prefix cache holds, known before its prefill starts (so a
    stream can open with them: Anthropic's `message_start` carries its usage)."""

    cached_tokens: int
    id: int
    prompt_tokens: int


class DraftCounts(TypedDict):
    """One request's draft tokens: `drafted = accepted + rejected`."""

    accepted: int
    drafted: int
    rejected: int


class _DoneRequired(TypedDict):
    completion_tokens: int
    #: "stop", "length", "tool_calls", "cancelled", or "counted" (count_only).
    finish_reason: str
    id: int
    prompt_tokens: int


class Done(_DoneRequired, total=False):
    """Worker → daemon: request `id` is finished."""

    #: Prompt tokens whose KV came from the prefix cache (not prefilled).
    cached_tokens: int
    generation_tps: float
    prompt_tps: float
    #: Completion tokens spent thinking (included in completion_tokens).
    reasoning_tokens: int
    #: Present when the model has a usable draft.
    speculative: Optional[DraftCounts]
    #: The stop sequence that ended the request (finish_reason "stop").
    stop_sequence: Optional[str]


class _EmbedRequired(TypedDict):
    id: int


class Embed(_EmbedRequired, total=False):
    """Daemon → worker: request `id` wants one vector per input, in order. Inputs are
    texts (`texts`) or token-id lists (`tokens`), never both."""

    #: Keep the first `dimensions` values of each vector, renormalized (Matryoshka).
    dimensions: Optional[int]
    #: Rerank: the answer is each input's relevance to this query (`scores`), not
    #: vectors. A cross-encoder scores each (query, input) pair; an embedding model
    #: gives the cosine of their vectors.
    query: Optional[str]
    texts: list[str]
    tokens: list[list[int]]
    #: Cut an input longer than the model's limit to the limit (else the request is
    #: refused, naming the limit).
    truncate: bool


class _EmbeddingsFrameRequired(TypedDict):
    id: int
    #: Tokens the inputs came to (after any truncation); on the last frame.
    prompt_tokens: int
    vectors: list[str]


class EmbeddingsFrame(_EmbeddingsFrameRequired, total=False):
    """Worker → daemon: request `id`'s vectors, in its inputs' order, each as base64 of
    little-endian f32 (OpenAI's `encoding_format: "base64"` as it is). A long answer
    comes in several frames (each well inside a ring's frame limit), in order; the
    last has `more: false`."""

    #: More of this answer's vectors follow in another frame.
    more: bool
    #: A rerank's answer: one relevance score per input, in order (no vectors).
    scores: list[float]


class _ErrorFrameRequired(TypedDict):
    message: str


class ErrorFrame(_ErrorFrameRequired, total=False):
    """Worker → daemon: something failed, for one request (`id`) or the worker."""

    #: "invalid_request" (the client's fault), "context_length_exceeded" (the
    #: client's too: the prompt leaves nothing of the context) or "worker" (ours).
    code: str
    id: Optional[int]


class OutputFormatJsonObject(TypedDict):
    """Any JSON object."""

    type: Literal["json_object"]


class _OutputFormatJsonSchemaRequired(TypedDict):
    schema: Any
    type: Literal["json_schema"]


class OutputFormatJsonSchema(_OutputFormatJsonSchemaRequired, total=False):
    """JSON valid against `schema`; `strict` forbids properties the schema does
    not name (OpenAI's strict mode) where the schema leaves that open."""

    strict: bool


class ContentPartText(TypedDict):
    text: str
    type: Literal["text"]


class ContentPartImage(TypedDict):
    """The request's `images[image]`."""

    image: int
    type: Literal["image"]


class MessageToolCall(TypedDict):
    """A tool call already in the history (the model made it on an earlier turn)."""

    #: The arguments as a JSON object (chat templates iterate over them).
    arguments: Any
    id: str
    name: str


class _ChatMessageRequired(TypedDict):
    content: str
    #: "system", "user", "assistant" or "tool".
    role: str


class ChatMessage(_ChatMessageRequired, total=False):
    """One turn of a conversation, in the dialect-neutral form every API maps onto."""

    name: Optional[str]
    #: A turn with images: its text and images in the order the client wrote them
    #: (`content` is then empty: the parts hold the text).
    parts: list[ContentPart]
    #: An assistant turn's reasoning, as the client sent it back (chat templates
    #: that keep the thinking of the current tool-call round render it).
    reasoning: Optional[str]
    #: A tool turn: the call it answers, and the tool's name when known.
    tool_call_id: Optional[str]
    #: An assistant turn's tool calls.
    tool_calls: list[MessageToolCall]


class ReasoningOptions(TypedDict, total=False):
    """A request's thinking, as every dialect's own fields map onto it."""

    #: "low", "medium" or "high": the chat template's `reasoning_effort`.
    effort: Optional[str]
    #: Ask the chat template to open (true) or skip (false) the thinking
    #: section (`enable_thinking`); None: the model's default.
    enabled: Optional[bool]
    #: At most this many thinking tokens: the worker then ends the thinking
    #: section itself and the answer follows.
    max_tokens: Optional[int]


class ToolChoiceFunction(TypedDict):
    """This function, by name."""

    function: str


class _ToolRequired(TypedDict):
    name: str
    parameters: Any


class Tool(_ToolRequired, total=False):
    """A function the model may call: its JSON-schema parameters."""

    description: Optional[str]
    #: A custom (freeform) tool's Lark grammar: a call forced to it writes its
    #: input raw, after a line with the tool's name, held to the grammar.
    lark: Optional[str]


class _GenerateRequired(TypedDict):
    id: int
    max_tokens: int


class Generate(_GenerateRequired, total=False):
    """Daemon → worker: start generating for request `id`."""

    #: Only count the prompt's tokens (Anthropic's count_tokens): the worker
    #: answers Done with finish_reason "counted" and generates nothing.
    count_only: bool
    format: Optional[OutputFormat]
    #: Send Logprobs frames for this request, with this many alternatives per
    #: token (0..=20).
    logprobs: Optional[int]
    #: Chat messages (the worker applies the model's chat template) ...
    messages: Optional[list[ChatMessage]]
    #: ... or a raw prompt (completions API).
    prompt: Optional[str]
    #: What the request asks of a reasoning model's thinking.
    reasoning: Optional[ReasoningOptions]
    seed: Optional[int]
    #: Force the interactive lane's drafting on or off for this request (the
    #: benchmark compares both); None leaves it to the worker's policy.
    speculative: Optional[bool]
    stop: list[str]
    #: Sampling; absent: the model's own default (its generation_config.json),
    #: else greedy (temperature 0) and top_p 1.
    temperature: Optional[float]
    tool_choice: ToolChoice
    #: Functions the model may call (rendered by the chat template, or in the
    #: system prompt when the template has no tool support).
    tools: list[Tool]
    top_p: Optional[float]


class _HelloRequired(TypedDict):
    #: "mlx" or "replay".
    engine: str
    pid: int
    protocol_version: int


class Hello(_HelloRequired, total=False):
    """Worker → daemon, first frame: who is speaking."""

    #: The BLAS library the worker process has loaded (Linux CPU), if known.
    blas: Optional[str]
    #: Where MLX runs: "cpu" or "gpu".
    device: str
    #: A discrete GPU's own memory (MLX CUDA): the budget cannot exceed it.
    #: Absent on the CPU and on a Mac, whose GPU shares the host's memory.
    device_memory: Optional[int]
    #: The loopback port the worker serves generations on (`http` transport only).
    http_port: Optional[int]
    #: Whether the worker uses the Rust extension module (false: pure-Python stdio).
    native_protocol: bool


class FaultOptions(TypedDict, total=False):
    """What a real worker cannot be made to do on demand, for the supervisor's
    tests (python-worker/mlxd_worker/faults.py)."""

    #: The batch the worker's device would choose when the preset leaves
    #: `max_concurrent` out (a CPU host cannot show a GPU's choice otherwise).
    device_batch: Optional[int]
    #: Send a frame of an unknown kind after the N-th decode step.
    garbage_after_step: int
    #: Sleep forever inside Load, before the model is read.
    hang_in_load: bool
    #: Fail the N-th decode step as MLX fails an allocation past the device's
    #: memory (a Mac's Metal or CUDA raise; the Linux CPU allocator cannot).
    out_of_memory_in_step: int
    #: Raise inside the N-th decode step (1-based).
    raise_in_step: int
    #: Milliseconds each decode step takes longer.
    step_delay_ms: int


class FlushOptionsStep(TypedDict):
    every: Literal["step"]


class FlushOptionsTokens(TypedDict):
    every: Literal["tokens"]
    tokens: int


class FlushOptionsMs(TypedDict):
    every: Literal["ms"]
    ms: float


class KvWindow(TypedDict):
    """Sliding-window layers of one window size, together."""

    bytes_per_token: int
    tokens: int


class _KvShapeRequired(TypedDict):
    #: Per token, the layers that keep every token (full attention, MLA latents).
    bytes_per_token: int


class KvShape(_KvShapeRequired, total=False):
    """The KV cache's size as a function of one sequence's tokens:
    `bytes_per_token · n + Σ window.bytes_per_token · min(n, window.tokens) +
    bytes_per_sequence`."""

    #: Per sequence whatever its length (linear attention and SSM state).
    bytes_per_sequence: int
    #: Layers that keep at most a window of tokens (sliding-window attention, a
    #: rotating cache), grouped by window.
    windows: list[KvWindow]


class _SpeculativeOptionsRequired(TypedDict):
    #: The draft as the preset names it (for logs and status).
    draft: str
    #: "auto", "on" or "off".
    mode: str
    num_draft_tokens: int


class SpeculativeOptions(_SpeculativeOptionsRequired, total=False):
    """A draft model for speculative decoding, as the preset's `[speculative]` says."""

    #: The draft's resolved directory (set by the daemon).
    draft_path: Optional[str]
    require_supported: bool


class LoadOptions(TypedDict, total=False):
    """A worker's engine settings: the preset's knobs as the worker reads them."""

    #: The model's context in tokens, as its config.json gives it (the daemon
    #: reads it: one rule for what `/v1/models` says and what the worker refuses).
    context_length: Optional[int]
    #: Test-only fault injection (a preset's `[faults]` table).
    faults: Optional[FaultOptions]
    #: When the engine hands its pending tokens to the transport.
    flush: FlushOptions
    #: Quantized KV: bits per element, elements per scale, and the prompt
    #: length from which the lone lane quantizes.
    kv_bits: Optional[int]
    kv_group_size: Optional[int]
    #: The KV cache's bytes as a function of a sequence's tokens (the daemon
    #: reads it from config.json): what the worker reserves for each sequence
    #: before admitting it.
    kv_shape: Optional[KvShape]
    #: Sequences decoding at once (the preset's `max_concurrent`); absent, the
    #: worker sizes the batch to its device and says so in Ready.
    max_batch: Optional[int]
    #: A rotating KV cache of this many tokens.
    max_kv_size: Optional[int]
    #: The worker's share of the memory budget, as MLX's memory limit.
    memory_limit: Optional[int]
    #: Prompt tokens prefilled per model call.
    prefill_step: int
    #: The prefix cache's memory limit (0: off).
    prompt_cache_bytes: int
    #: The prefix cache's disk tier, when on.
    prompt_cache_dir: Optional[str]
    prompt_cache_disk_bytes: Optional[int]
    quantized_kv_start: Optional[int]
    #: The preset's `reasoning = "off"`: a reasoning model's thinking stays in
    #: the answer's text as the model wrote it, markers included.
    reasoning_inline: bool
    #: The replay engine's text (benchmarks; a built-in text when absent).
    replay_text: Optional[str]
    #: The preset's `[rerank]`: this chat model also answers reranks (an Embed
    #: with a query) by the yes/no method, judging relevance under this instruction.
    rerank_instruction: Optional[str]
    #: The draft model and how to use it.
    speculative: Optional[SpeculativeOptions]


class _LoadRequired(TypedDict):
    #: The name clients use, for the worker's logs.
    model_name: str
    model_path: str


class Load(_LoadRequired, total=False):
    """Daemon → worker: load this model."""

    #: How to serve it, from the preset (and the daemon's memory budget).
    options: LoadOptions


class TopLogprob(TypedDict):
    logprob: float
    text: str
    token: int


class _TokenLogprobRequired(TypedDict):
    logprob: float
    #: The token decoded alone (may be part of a character).
    text: str
    token: int


class TokenLogprob(_TokenLogprobRequired, total=False):
    """The log probability of one token, with the most likely alternatives."""

    top: list[TopLogprob]


class LogprobsFrame(TypedDict):
    """Worker → daemon: the logprobs of request `id`'s next tokens, sent just before
    the TokenBatch that carries them (one entry per generated token, EOS included)."""

    entries: list[TokenLogprob]
    id: int


class MemoryLimitFrame(TypedDict):
    """Daemon → worker: the worker's share of the budget changed (another model
    loaded or left, or the device's memory became known)."""

    memory_limit: int


class FeatureLimit(TypedDict):
    """One feature off or limited for a model."""

    #: "speculative", "prefix_cache", "kv_bits" or "max_kv_size".
    feature: str
    reason: str


class _ModelFactsRequired(TypedDict):
    #: The cache layer classes, each once, e.g. `["ArraysCache", "KVCache"]`.
    cache_kinds: list[str]
    #: mlx-lm's `model_type` (the text model's, for a wrapped config).
    family: str


class ModelFacts(_ModelFactsRequired, total=False):
    """A loaded model as the worker sees it: its family, the cache layer kinds
    mlx-lm builds for it, and the features switched off (or limited) for it at
    load, each with the reason (`mlxd ps`, `/v1/models`, the log)."""

    #: Features off or limited for this model, and why.
    limits: list[FeatureLimit]
    #: How its thinking is told apart from its answer ("<think>…</think>",
    #: "harmony"), when the worker separates it.
    reasoning: Optional[str]


class _SpecStatusRequired(TypedDict):
    #: Whether a request alone decodes speculatively now.
    active: bool
    draft: str
    #: "auto", "on" or "off".
    mode: str
    #: Why it is (in)active: the pair check, the mode, or the adaptive policy.
    reason: str


class SpecStatus(_SpecStatusRequired, total=False):
    """A worker's speculative decoding as it stands: its draft, whether it drafts
    now and why, and its counters (Ready and every Stats)."""

    #: Accepted / drafted over the recent rounds.
    acceptance: float
    accepted_total: int
    drafted_total: int
    #: Adaptive transitions: draft length lowered/raised, drafting turned off/on.
    lowered_total: int
    #: Tokens drafted per round now (0 while inactive).
    num_draft_tokens: int
    off_total: int
    on_total: int
    plain_tps: float
    raised_total: int
    #: Decode tokens/s measured drafting and plain (0 until measured).
    spec_tps: float
    #: Lane switches of a request in flight: into the batch, and back to drafting.
    to_batch_total: int
    to_speculative_total: int


class _ReadyRequired(TypedDict):
    load_seconds: float


class Ready(_ReadyRequired, total=False):
    """Worker → daemon: the model is loaded and warmed up."""

    context_length: Optional[int]
    #: The sequences it decodes at once: Load's `max_batch`, or what it chose for
    #: its device when Load left it out (the daemon then admits that many).
    max_batch: Optional[int]
    #: What the worker found the model to be (absent for the replay engine).
    model: Optional[ModelFacts]
    #: Present when the preset names a draft model.
    speculative: Optional[SpecStatus]


class KvStats(TypedDict):
    """What the worker holds and has promised (Stats): `/admin/memory` and `mlxd ps`
    show it per model."""

    #: What the worker holds with nothing in flight (weights, runtime, kernels).
    baseline_bytes: int
    #: The share of the budget that KV and the prefix cache may fill together.
    capacity_bytes: int
    evicted_for_room_total: int
    #: The KV caches of the sequences in flight, as their arrays measure.
    in_use_bytes: int
    #: Requests refused because their KV could never fit, and prefix-cache
    #: entries dropped to make room for a request.
    refused_total: int
    #: What the sequences in flight may grow to (each reserved to its
    #: `max_tokens` when admitted).
    reserved_bytes: int
    #: Requests waiting for KV memory to free up.
    waiting: int
    #: The model's weights (and the draft's) as MLX holds them.
    weights_bytes: int


class DiskCacheStats(TypedDict):
    """The prefix cache's disk tier (`prompt_cache_dir`)."""

    bytes: int
    dropped_total: int
    #: Files on disk now, and their bytes.
    entries: int
    #: Lookups served from a file (after missing in memory).
    hits_total: int
    #: Files found stale (another model, versions, corrupt) and deleted.
    stale_total: int
    #: Entries written, and writes dropped because the writer fell behind.
    writes_total: int


class PromptCacheLookups(TypedDict):
    """The prefix cache's lookups by outcome (one per request with a prompt), so an
    operator sees why reuse fails: an agent that rewrites its system prompt parts
    from its cached conversation early (`hit_diverged` at a small token, or
    `miss_diverged` where the cache cannot be cut), a cache too small evicts
    (`miss_evicted`). The worker's debug log says where each one parted."""

    #: Hits whose prompt goes on from the cached prompt they reuse (or ends inside it).
    hit_continued: int
    #: Hits whose prompt parts from the cached prompt inside it: only the tokens
    #: before the parting were reused.
    hit_diverged: int
    #: Misses: nothing cached shares the prompt's start.
    miss_cold: int
    #: Misses: a cached prompt shares the start, but its cache cannot be cut back
    #: to where they part (rotating or recurrent layers).
    miss_diverged: int
    #: Misses: the prompt's start was cached, and was evicted since.
    miss_evicted: int
    #: Misses: the prompt is too short to reuse anything (one token).
    miss_too_short: int


class _PromptCacheStatsRequired(TypedDict):
    bytes: int
    #: Prompt tokens served from the cache instead of prefilled.
    cached_tokens_total: int
    #: What the cache holds now, and its limit.
    entries: int
    #: Requests that looked a prefix up, by outcome.
    lookups: PromptCacheLookups
    max_bytes: int


class PromptCacheStats(_PromptCacheStatsRequired, total=False):
    """The worker's prefix cache (Stats)."""

    #: The disk tier, when the preset has one.
    disk: Optional[DiskCacheStats]


class StepStats(TypedDict):
    """The engine's time by part, and its steps by batch size (Stats): /metrics
    exports them, so an operator sees whether the model, the prefill of new
    arrivals or the worker's own per-token work bounds throughput."""

    #: Steps by the sequences they advanced: one count per bucket of
    #: [`BATCH_SIZE_BOUNDS`] (at most that many, more than the previous bound),
    #: and a last one for larger steps.
    batch_size_steps: list[int]
    #: Seconds in the model's decode passes (waiting for a step's tokens).
    decode_seconds_total: float
    #: Seconds of the engine's own work between passes while sequences were in
    #: flight: admissions, detokenizing, stop strings, tool calls, frames.
    host_seconds_total: float
    #: Seconds in the model's prefill passes (prompts, in chunks).
    prefill_seconds_total: float


class Stats(TypedDict, total=False):
    """Worker → daemon, every second: memory and load."""

    active_memory: int
    #: Sequences generating right now.
    active_sequences: int
    #: Decode steps run, and tokens they produced (their ratio is the mean batch).
    batch_steps_total: int
    batch_tokens_total: int
    cache_memory: int
    cancelled_total: int
    completed_total: int
    #: True once the engine can no longer serve (its thread died); the worker then
    #: exits, and the daemon never takes such a worker for healthy.
    engine_failed: bool
    #: The engine's progress counter (advanced every loop iteration and prefill
    #: chunk). Over shm the daemon reads it from the segment header instead.
    heartbeat: int
    #: The worker's KV accounting (absent from the replay engine).
    kv: Optional[KvStats]
    peak_memory: int
    #: Present when the prefix cache is on.
    prompt_cache: Optional[PromptCacheStats]
    #: Generate frames received but not yet started.
    queued_sequences: int
    rss: int
    #: Present when the preset names a draft model.
    speculative: Optional[SpecStatus]
    #: Where the engine's time goes and how full its steps are (absent from
    #: workers that predate it).
    steps: Optional[StepStats]
    #: TokenBatch frames sent (fewer than steps under a "N tokens"/"T ms" flush policy).
    token_frames_total: int


class ToolCallFrame(TypedDict):
    """Worker → daemon: request `id` called a tool (its `index`-th call). Sent after
    the tokens before it and before Done, whose finish_reason is then "tool_calls"."""

    #: The arguments as JSON text (an object).
    arguments: str
    #: The call's id ("call_..."), which a tool result refers to.
    call_id: str
    id: int
    index: int
    name: str


# An output format enforced during decoding (llguidance).
OutputFormat = Union[OutputFormatJsonObject, OutputFormatJsonSchema]

# A piece of a turn with images.
ContentPart = Union[ContentPartText, ContentPartImage]

# Whether and which tool the model must call. `Required` and `Function` are
# enforced with constrained decoding.
ToolChoice = Union[Literal["auto", "none", "required"], ToolChoiceFunction]

# When the worker flushes tokens: every step, every N tokens, or every T ms.
FlushOptions = Union[FlushOptionsStep, FlushOptionsTokens, FlushOptionsMs]

# The payload type of each JSON frame kind.
FRAME_TYPES: dict[str, Any] = {
    "ADMITTED": AdmittedFrame,
    "DONE": Done,
    "EMBED": Embed,
    "EMBEDDINGS": EmbeddingsFrame,
    "ERROR": ErrorFrame,
    "GENERATE": Generate,
    "HELLO": Hello,
    "LOAD": Load,
    "LOGPROBS": LogprobsFrame,
    "MEMORY_LIMIT": MemoryLimitFrame,
    "READY": Ready,
    "STATS": Stats,
    "TOOL_CALL": ToolCallFrame,
}
