"""What a Generate asks of the engine, worked out on the reader thread before the
engine sees it: the prompt's tokens (chat template, tools rendered), how to read
tool calls back, the constraint (a format or a forced call) and logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, TypedDict

from ..errors import RequestError
from ..io.protocol import ChatMessage, Generate, ReasoningOptions, Tool, ToolChoice
from .constraint import Grammars, SequenceConstraint
from .logprobs import MAX_TOP
from .reasoning import ReasoningBudget, ReasoningFormat, ReasoningText, ReasoningTracker
from .tool_stream import ToolCallExtractor
from .tools import ToolFormat, chat_messages, read_calls, tool_choice, tool_format
from .vision import VisionInput, VisionPrompts

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
    reasoning: Optional[ReasoningOptions]


@dataclass
class ReasoningPlan:
    """A chat request to a model that thinks: where its output starts (inside
    the thinking section, when the template opened it) and its thinking budget."""

    fmt: ReasoningFormat
    inside: bool
    max_tokens: int | None

    def text(self) -> ReasoningText:
        return ReasoningText(self.fmt, self.inside)

    def tracker(self) -> ReasoningTracker:
        return ReasoningTracker(self.fmt, self.inside)

    def budget(self) -> ReasoningBudget | None:
        return None if self.max_tokens is None else ReasoningBudget(self.fmt, self.max_tokens, self.inside)


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
    reasoning: ReasoningPlan | None = None
    # Prompt lengths worth a prefix-cache snapshot (Planner.boundaries).
    boundaries: list[int] = field(default_factory=list)
    # The images, as the vision model's processor made them (requests/vision.py).
    vision: VisionInput | None = None

    def tool_extractor(self) -> ToolCallExtractor | None:
        fmt, tools = self.tool_format, self.tools
        if fmt is None or not tools:
            return None
        return ToolCallExtractor(fmt.start, fmt.end, lambda text: read_calls(fmt, text, tools))


class Planner:
    """One model's request planning: its tokenizer, tool format and grammars."""

    def __init__(
        self,
        tokenizer: TokenizerWrapper,
        eos: frozenset[int],
        reasoning: ReasoningFormat | None,
        boundaries: bool = False,
        vision: VisionPrompts | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        # A vision-language model's image-aware rendering; None: no images taken.
        self.vision = vision
        self.eos = eos
        # The model's thinking format, when its thinking is told apart.
        self.reasoning = reasoning
        # Work out each chat prompt's turn boundaries (for prefix-cache snapshots).
        self.boundaries = boundaries
        self.tool_format = tool_format(tokenizer)
        self.grammars = Grammars(tokenizer, eos)

    def prompt_ids(self, req: Prompt, images: Sequence[bytes] = ()) -> list[int]:
        """The prompt as it would be generated from (count_only counts this)."""
        tools = list(req.get("tools") or [])
        choice = tool_choice(req.get("tool_choice"), tools)
        return self._prompt_ids(req, images, [] if choice.mode == "none" else tools, constrained=False)[0]

    def _prompt_ids(
        self, req: Prompt, images: Sequence[bytes], tools: list[Tool], constrained: bool
    ) -> tuple[list[int], list[int], VisionInput | None]:
        """The prompt's tokens, its turn boundaries when the planner looks for them,
        and its images' arrays when it has images (`images`: the files the
        messages' image parts refer to, by index)."""
        tok = self.tokenizer
        chat = req.get("messages")
        cuts: list[int] = []
        if chat is not None:
            order: list[int] | None = None
            if any(m.get("parts") for m in chat):
                if self.vision is None:
                    raise RequestError("this model takes no images (its config has no vision tower)")
                chat, order = self.vision.with_markers(chat)
            messages, extra = chat_messages(chat, tools, self.tool_format)
            kwargs: dict[str, object] = dict(extra)
            asked = req.get("reasoning") or {}
            enabled = asked.get("enabled")
            if enabled is None and constrained:
                # A format or a forced call shapes the output from its first token:
                # thinking cannot come first, so the template is asked to skip it.
                enabled = False
            if enabled is not None:
                kwargs["enable_thinking"] = enabled
            if asked.get("effort"):
                kwargs["reasoning_effort"] = asked.get("effort")
            if order is not None and self.vision is not None:
                try:
                    ids, vision = self.vision.render(list(messages), images, order, kwargs)
                except RequestError:
                    raise
                except Exception:  # a system turn mid-conversation, as below
                    moved = _system_turns_as_user(list(messages))
                    if moved is None:
                        raise
                    ids, vision = self.vision.render(moved, images, order, kwargs)
                return ids, [], vision
            try:
                ids = template_ids(
                    tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
                )
            except Exception:
                # Templates that allow a system message only first (Qwen's, Llama's)
                # refuse one mid-conversation (Claude Code sends them): there it
                # becomes a user turn that says what it is.
                moved = _system_turns_as_user(messages)
                if moved is None:
                    raise
                messages = moved
                ids = template_ids(
                    tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
                )
            if self.boundaries:
                try:
                    cuts = self._boundaries(list(messages), kwargs, ids)
                except Exception:  # an optimisation only: a template that refuses a part
                    cuts = []
        else:
            ids = list(tok.encode(req.get("prompt") or ""))
        if not ids:  # an empty completion prompt: start from BOS
            ids = [tok.bos_token_id if tok.bos_token_id is not None else min(self.eos)]
        return ids, cuts, None

    def _boundaries(self, messages: list[Any], kwargs: dict[str, object], ids: list[int]) -> list[int]:
        """Where a later request is likely to part from this prompt: after the
        system prompt (a new conversation with the same instructions) and before
        the generation prompt (the conversation continued). Each is the length of
        the prompt's common prefix with the template rendered up to there, as
        mlx-lm's server segments prompts."""
        tok = self.tokenizer
        cuts: list[int] = []
        system = 0
        while system < len(messages) and messages[system]["role"] == "system":
            system += 1
        if 0 < system < len(messages):
            head = messages[:system] + [{"role": "user", "content": ""}]
            cuts.append(_common(template_ids(tok.apply_chat_template(head, tokenize=True, **kwargs)), ids))
        cuts.append(_common(template_ids(tok.apply_chat_template(messages, tokenize=True, **kwargs)), ids))
        return sorted({c for c in cuts if 1 < c < len(ids) - 1})

    def plan(self, req: Generate, images: Sequence[bytes] = ()) -> RequestPlan:
        tools = list(req.get("tools") or [])
        choice = tool_choice(req.get("tool_choice"), tools)
        offered = [] if choice.mode == "none" else tools
        fmt = req.get("format")
        ids, cuts, vision = self._prompt_ids(req, images, offered, constrained=choice.forced or bool(fmt))
        plan = RequestPlan(ids, offered, self.tool_format, boundaries=cuts, vision=vision)
        tool_fmt = self.tool_format
        grammar = None
        if choice.forced:
            # The call is the whole answer: a format sent with it has nothing to shape.
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
        if self.reasoning is not None and req.get("messages") is not None:
            fmt_r = self.reasoning
            budget = (req.get("reasoning") or {}).get("max_tokens")
            inside = fmt_r.starts_inside(plan.prompt_ids)
            if plan.constraint is not None:
                # The format shapes the output from its first token: a template that
                # opened the thinking section anyway (some always do) gets it closed
                # in the prompt, so the constrained text is the answer, and there is
                # no thinking left to budget.
                if inside:
                    plan.prompt_ids = plan.prompt_ids + list(fmt_r.force_close)
                    inside = False
                budget = None
            plan.reasoning = ReasoningPlan(fmt_r, inside, None if budget is None else int(budget))
        return plan


def template_ids(rendered: object) -> list[int]:
    """apply_chat_template's tokens, whichever form the tokenizer returns them in."""
    if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]  # type: ignore[index]
    return [int(t) for t in rendered]  # type: ignore[attr-defined]


def _common(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of `a` and `b`."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _system_turns_as_user(messages: list[Any]) -> list[Any] | None:
    """`messages` as templates that take one system message, first, want them:
    leading system messages joined into one (an Anthropic `system` and a first
    system message stack), and each later one turned into a user turn ("System:
    ..."), merged into an adjacent user turn where there is one (strict templates
    alternate roles); None when there is nothing to change."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    if first < 2 and not any(m["role"] == "system" for m in messages[first:]):
        return None
    out: list[Any] = []
    if first == 1:
        out.append(messages[0])
    elif first > 1:
        out.append({"role": "system", "content": "\n\n".join(str(m["content"]) for m in messages[:first])})
    for m in messages[first:]:
        if m["role"] == "system":
            m = {"role": "user", "content": f"System: {m['content']}"}
        if m["role"] == "user" and out and out[-1]["role"] == "user" and len(m) == 2 and len(out[-1]) == 2:
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(m)
    return out
