"""A reasoning model's thinking, told apart from its answer.

Formats (found from the tokenizer at load, `detect`):
- "think": a thinking section between two markers mlx-lm's tokenizer knows
  (`<think>…</think>` for Qwen3/3.5, DeepSeek-R1, GLM, MiniMax, Kimi; the others
  mlx-lm lists). Many templates open the section in the prompt itself
  (`…assistant\\n<think>\\n`), so the output starts inside it.
- "harmony" (GPT-OSS): `<|channel|>analysis<|message|>…<|end|>` is thinking,
  `<|start|>assistant<|channel|>final<|message|>…` the answer.

Two views of the same output, for two jobs:
- `ReasoningText` splits the decoded text, with mlx-lm's own `TextStateMachine`
  (markers matched on text, held back while they may be partial, stripped), into
  thinking and answer pieces: what the client sees.
- `ReasoningTracker` follows the token ids: how many tokens were thinking (usage)
  and, in `ReasoningBudget`, when to end the thinking section by forcing its
  closing tokens, after which the model writes its answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .constraint import LaneProcessor, allow_only

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from .constraint import Bitmask

NORMAL, REASONING = "normal", "reasoning"

# Tokens at the end of a prompt that a template's generation prompt spans
# (`<|im_start|>assistant\n<think>\n` and the like), as mlx-lm's server looks.
GENERATION_TAIL = 12

# GPT-OSS's harmony markers, as text (each a special token of its vocabulary).
HARMONY_TOKENS = ("<|channel|>", "<|message|>", "<|end|>", "<|start|>")
HARMONY_THINK = "<|channel|>analysis<|message|>"
HARMONY_ANSWER = "<|channel|>final<|message|>"
HARMONY_HEADER = "<|start|>assistant"
HARMONY_END = "<|end|>"


@dataclass(frozen=True)
class ReasoningFormat:
    """How one model marks its thinking."""

    # For /v1/models and `mlxd ps`: "<think>…</think>" or "harmony".
    name: str
    # mlx-lm TextStateMachine transitions: state -> [(marker text, next state)].
    transitions: dict[str, list[tuple[str, str]]]
    # Token sequences that open and close a thinking section.
    opens: tuple[tuple[int, ...], ...]
    closes: tuple[tuple[int, ...], ...]
    # What the budget forces to end thinking (the model then writes its answer).
    force_close: tuple[int, ...]

    def starts_inside(self, prompt: list[int]) -> bool:
        """Whether the prompt leaves the model inside a thinking section (the
        template opened it). Only the generation prompt's tail is looked at: a
        `<think>` in a user's text or a tool's output (tokenized as the marker)
        opens nothing."""
        tail = prompt[-GENERATION_TAIL:]
        return _last_at(tail, self.opens) > _last_at(tail, self.closes)


def detect(tokenizer: TokenizerWrapper) -> ReasoningFormat | None:
    """The model's thinking format, or None for a model that does not think."""
    if tokenizer.has_thinking:
        start, end = tokenizer.think_start, tokenizer.think_end
        opens = tuple(tokenizer.think_start_tokens)
        closes = tuple(tokenizer.think_end_tokens)
        return ReasoningFormat(
            name=f"{start}…{end}",
            transitions={NORMAL: [(start, REASONING)], REASONING: [(end, NORMAL)]},
            opens=(opens,),
            closes=(closes,),
            force_close=closes,
        )
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in HARMONY_TOKENS):

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        return ReasoningFormat(
            name="harmony",
            transitions={
                # The answer's header and channel are stripped; so is a second
                # assistant header between thinking and answer.
                NORMAL: [(HARMONY_THINK, REASONING), (HARMONY_ANSWER, NORMAL), (HARMONY_HEADER, NORMAL)],
                REASONING: [(HARMONY_END, NORMAL)],
            },
            opens=(ids(HARMONY_THINK),),
            closes=(ids(HARMONY_END),),
            force_close=ids(HARMONY_END + HARMONY_HEADER + HARMONY_ANSWER),
        )
    return None


def _last_at(tokens: list[int], patterns: tuple[tuple[int, ...], ...]) -> int:
    """Where the last occurrence of any pattern ends in `tokens` (-1: none)."""
    best = -1
    for p in patterns:
        n = len(p)
        if not n:
            continue
        for i in range(len(tokens) - n, -1, -1):
            if tuple(tokens[i : i + n]) == p:
                best = max(best, i + n)
                break
    return best


class ReasoningText:
    """Splits one sequence's text into (thinking?, text) pieces."""

    def __init__(self, fmt: ReasoningFormat, inside: bool) -> None:
        from mlx_lm.generate import TextStateMachine

        self._sm = TextStateMachine(fmt.transitions)
        self._state: Any = self._sm.make_state(initial=REASONING if inside else NORMAL)

    def feed(self, text: str) -> list[tuple[bool, str]]:
        from mlx_lm.generate import TextStateMachine

        self._state, segments = TextStateMachine.split(self._state, text)
        return [(state == REASONING, piece) for state, piece in segments if piece]

    def finish(self) -> list[tuple[bool, str]]:
        """The text held back as a possible marker, at the end of the output."""
        from mlx_lm.generate import TextStateMachine

        self._state, held, state = TextStateMachine.flush(self._state)
        return [(state == REASONING, held)] if held else []


class ReasoningTracker:
    """Follows a sequence's generated tokens: inside a thinking section or not,
    and how many tokens were thinking (its markers included)."""

    def __init__(self, fmt: ReasoningFormat, inside: bool) -> None:
        self._fmt = fmt
        self.inside = inside
        self.tokens = 0
        self._recent: list[int] = []
        self._window = max(len(p) for p in fmt.opens + fmt.closes)

    def feed(self, token: int) -> None:
        was = self.inside
        self._recent.append(token)
        if len(self._recent) > self._window:
            del self._recent[0]
        patterns = self._fmt.closes if self.inside else self._fmt.opens
        if any(len(p) <= len(self._recent) and tuple(self._recent[-len(p) :]) == p for p in patterns):
            self.inside = not self.inside
            self._recent.clear()
        if was or self.inside:
            self.tokens += 1


class ReasoningBudget:
    """Ends the thinking section after `budget` thinking tokens by allowing only
    the format's closing tokens, one per step, then leaves the model free.

    A `TokenConsumer`: each lane drives it through a `LaneProcessor`, as it
    drives an output format's matcher.
    """

    def processor(self, history: list[int]) -> LaneProcessor:
        return LaneProcessor(self, history)

    error: str | None = None

    def __init__(self, fmt: ReasoningFormat, budget: int, inside: bool) -> None:
        self._fmt = fmt
        self._budget = budget
        self.tracker = ReasoningTracker(fmt, inside)
        self.prompt_len = 0  # set when the sequence is inserted
        self.seen = 0
        self._forcing: list[int] = []

    def consume(self, token: int) -> None:
        self.seen += 1
        if self._forcing and token == self._forcing[0]:
            del self._forcing[0]
        self.tracker.feed(token)

    def grammar(self) -> None:
        return None

    def restrict(self, words: Bitmask) -> bool:
        t = self.tracker
        if not self._forcing and t.inside and t.tokens >= self._budget:
            # Over budget (again, if the model opened a new section): close it.
            self._forcing = list(self._fmt.force_close)
        if not self._forcing:
            return False
        allow_only(words, self._forcing[:1], if_allowed=True)
        return True
