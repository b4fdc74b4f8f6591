"""The JSON payloads of the worker protocol's cold frames, as the worker reads and
writes them. ``worker-protocol/src/frame.rs`` is the one definition (Hello, Load,
Generate, Done, ...); these are its shapes for the type checker, nothing is
validated at run time. Keys the daemon may leave out are in the ``total=False``
part of each type; JSON the worker only passes on (schemas, tool arguments) stays
``Any``, as ``json.loads`` gives it.
"""

from __future__ import annotations

from typing import Any, TypedDict, Union

# --- daemon -> worker -------------------------------------------------------------


class SpeculativeOptions(TypedDict, total=False):
    """The preset's `[speculative]` table (Load options `speculative`)."""

    draft: str
    num_draft_tokens: int
    mode: str  # "auto" | "on" | "off"
    require_supported: bool
    draft_path: str  # added by the daemon when the draft is loadable


class FlushOptions(TypedDict, total=False):
    every: str  # "step" | "tokens" | "ms"
    tokens: int
    ms: float


class FaultOptions(TypedDict, total=False):
    """A preset's `[faults]` table (tests only; see faults.py)."""

    hang_in_load: bool
    step_delay_ms: int
    raise_in_step: int
    garbage_after_step: int


class LoadOptions(TypedDict, total=False):
    """Load.options: the preset's engine settings (Preset::worker_options)."""

    max_batch: int
    prefill_step: int
    flush: FlushOptions
    kv_bits: int
    kv_group_size: int
    quantized_kv_start: int
    max_kv_size: int
    prompt_cache_bytes: int
    prompt_cache_dir: str
    prompt_cache_disk_bytes: int
    memory_limit: int
    faults: FaultOptions
    speculative: SpeculativeOptions
    replay_text: str  # the replay engine's text (tests and benchmarks)


class _LoadRequired(TypedDict):
    model_path: str
    model_name: str


class Load(_LoadRequired, total=False):
    options: LoadOptions


class MessageToolCall(TypedDict):
    """A call the model made on an earlier turn."""

    id: str
    name: str
    arguments: Any  # a JSON object (chat templates iterate over it)


class _ChatMessageRequired(TypedDict):
    role: str  # "system" | "user" | "assistant" | "tool"


class ChatMessage(_ChatMessageRequired, total=False):
    content: str
    tool_calls: list[MessageToolCall]
    tool_call_id: str
    name: str


class _ToolRequired(TypedDict):
    name: str


class Tool(_ToolRequired, total=False):
    """A function the model may call."""

    description: str
    parameters: dict[str, Any]  # its JSON schema


class OutputFormat(TypedDict, total=False):
    """{"type": "json_object"} or {"type": "json_schema", "schema": ..., "strict": bool}."""

    type: str
    schema: object  # checked to be an object where it is used
    strict: bool


# "auto" | "none" | "required" | {"function": name}
ToolChoiceValue = Union[str, dict[str, str], None]


class Prompt(TypedDict, total=False):
    """What a request's prompt tokens come from: `messages` (chat, with the tools
    offered) or `prompt` (completion)."""

    messages: list[ChatMessage]
    prompt: str
    tools: list[Tool]
    tool_choice: ToolChoiceValue


class _GenerateRequired(TypedDict):
    id: int


class Generate(_GenerateRequired, Prompt, total=False):
    """A request; `count_only` asks for its prompt's token count alone."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    speculative: bool | None
    format: OutputFormat | None
    logprobs: int | None
    count_only: bool


# --- worker -> daemon -------------------------------------------------------------


class DraftCounts(TypedDict):
    """One request's draft tokens (Done.speculative)."""

    drafted: int
    accepted: int
    rejected: int


class SpecStatus(TypedDict):
    """The draft policy's state (Ready.speculative, Stats.speculative)."""

    draft: str
    mode: str
    active: bool
    reason: str
    num_draft_tokens: int
    acceptance: float
    drafted_total: int
    accepted_total: int
    spec_tps: float
    plain_tps: float
    lowered_total: int
    raised_total: int
    off_total: int
    on_total: int
    to_batch_total: int
    to_speculative_total: int


class _DoneRequired(TypedDict):
    id: int
    finish_reason: str  # "stop" | "length" | "cancelled" | "tool_calls" | "counted"
    prompt_tokens: int
    completion_tokens: int
    prompt_tps: float
    generation_tps: float


class Done(_DoneRequired, total=False):
    cached_tokens: int
    speculative: DraftCounts
    stop_sequence: str


class ErrorFrame(TypedDict):
    id: int | None  # None: the worker's own failure
    message: str
    code: str  # "invalid_request" | "worker"


class ToolCallFrame(TypedDict):
    id: int
    index: int
    call_id: str
    name: str
    arguments: str  # JSON text (an object)


class TopLogprob(TypedDict):
    token: int
    text: str
    logprob: float


class _TokenLogprobRequired(TypedDict):
    token: int
    text: str
    logprob: float


class TokenLogprob(_TokenLogprobRequired, total=False):
    top: list[TopLogprob]


class Counts(TypedDict):
    """The request flow's counters in Stats."""

    active_sequences: int
    queued_sequences: int
    completed_total: int
    cancelled_total: int
    batch_steps_total: int
    batch_tokens_total: int
    token_frames_total: int
