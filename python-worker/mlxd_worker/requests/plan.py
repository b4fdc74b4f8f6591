"""What a Generate asks of the engine, worked out on the reader thread before the
engine sees it: the prompt's tokens (chat template, tools rendered), how to read
tool calls back, the constraint (a format or a forced call) and logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, TypedDict

from ..errors import RequestError
from ..io.protocol import ChatMessage, Generate, Tool, ToolChoice
from .constraint import Grammars, SequenceConstraint
from .logprobs import MAX_TOP
from .tool_stream import ToolCallExtractor
from .tools import ToolFormat, chat_messages, read_calls, tool_choice, tool_format

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper


class Prompt(TypedDict, total=False):
    """What a request's prompt tokens come from: `messages` (chat, with the tools
    offered) or `prompt` (completion). The part of a Generate that `prompt_ids`
    reads (a Generate is one), which warm-up fills without the rest."""

    messages: Optional[list[ChatMessage]]
    prompt: Optional[str]
    tools: list[Tool]
    tool_choice: ToolChoice


@dataclass
class RequestPlan:
    prompt_ids: list[int]
    # The tools offered to the model (none with tool_choice "none"): calls are read
    # back from the output only when there are some.
    tools: list[Tool] = field(default_factory=list)
    tool_format: ToolFormat | None = None
    constraint: SequenceConstraint | None = None
    # Alternatives per token in Logprobs frames; None: no logprobs.
    top_logprobs: int | None = None

    def tool_extractor(self) -> ToolCallExtractor | None:
        fmt, tools = self.tool_format, self.tools
        if fmt is None or not tools:
            return None
        return ToolCallExtractor(fmt.start, fmt.end, lambda text: read_calls(fmt, text, tools))


class Planner:
    """One model's request planning: its tokenizer, tool format and grammars."""

    def __init__(self, tokenizer: TokenizerWrapper, eos: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.eos = eos
        self.tool_format = tool_format(tokenizer)
        self.grammars = Grammars(tokenizer, eos)

    def prompt_ids(self, req: Prompt) -> list[int]:
        """The prompt as it would be generated from (count_only counts this)."""
        tools = list(req.get("tools") or [])
        choice = tool_choice(req.get("tool_choice"), tools)
        return self._prompt_ids(req, [] if choice.mode == "none" else tools)

    def _prompt_ids(self, req: Prompt, tools: list[Tool]) -> list[int]:
        tok = self.tokenizer
        chat = req.get("messages")
        if chat is not None:
            messages, extra = chat_messages(chat, tools, self.tool_format)
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            ids = list(tok.encode(req.get("prompt") or ""))
        if not ids:  # an empty completion prompt: start from BOS
            ids = [tok.bos_token_id if tok.bos_token_id is not None else min(self.eos)]
        return ids

    def plan(self, req: Generate) -> RequestPlan:
        tools = list(req.get("tools") or [])
        choice = tool_choice(req.get("tool_choice"), tools)
        offered = [] if choice.mode == "none" else tools
        plan = RequestPlan(self._prompt_ids(req, offered), offered, self.tool_format)
        fmt = req.get("format")
        tool_fmt = self.tool_format
        grammar = None
        if choice.forced:
            if fmt:
                raise RequestError(
                    f"tool_choice {choice.label()} forces a tool call, so a format cannot apply too: drop one"
                )
            if not tool_fmt.json_in_markers:
                raise RequestError(
                    f"tool_choice {choice.label()} is not supported for this model's tool-call format '{tool_fmt.name}'"
                )
            grammar = self.grammars.for_forced_call(tool_fmt, offered, choice)
        elif fmt:
            # The format applies to the text; calls stay possible where their
            # grammar can be written.
            if offered and tool_fmt.json_in_markers:
                grammar = self.grammars.for_format_or_calls(fmt, tool_fmt, offered)
            else:
                grammar = self.grammars.for_format(fmt)
        if grammar is not None:
            plan.constraint = self.grammars.constraint(grammar)
        top = req.get("logprobs")
        if top is not None:
            if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP:
                raise RequestError(f"logprobs must be an integer from 0 to {MAX_TOP}, not {top!r}")
            plan.top_logprobs = top
        return plan
