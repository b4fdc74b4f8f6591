"""Constrained decoding with llguidance: an output format (any JSON object, or JSON
valid against a schema) or a forced tool call, enforced token by token.

Each constrained sequence has one matcher (`SequenceConstraint`). Before each token
is sampled, the matcher's token mask sets the logits of every token the grammar
does not allow to -inf; once the grammar is complete only EOS is allowed, so
generation ends there. The lone lanes (lanes/solo.py) and a sequence's first token
in mlx-lm's BatchGenerator call a logits processor per sequence,
`processor(context, logits)`, where `context[-1]` is the token just fed to the
model; the batch's decode steps (engines/masked_batch.py) fill every row's mask
together and apply them in one op (`step_masks`, `apply_token_mask`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from ..errors import RequestError
from ..io.protocol import OutputFormat, Tool
from .tools import ToolChoice, ToolFormat, call_schema, raw_input_grammar

if TYPE_CHECKING:
    import mlx.core as mx
    import numpy as np
    from llguidance import LLExecutor, LLMatcher, LLTokenizer
    from llguidance._lib import JsonCompileOptions
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from numpy.typing import NDArray
    from transformers import PreTrainedTokenizerFast

    # llguidance's token bitmask: int32 words, bit i of word w = token 32*w + i.
    Bitmask = NDArray[np.int32]

# JSON as json.dumps writes it: ", " and ": ", no other whitespace. Fewer tokens
# than free whitespace, and the style models see most. A schema's own
# "x-guidance" options win.
JSON_STYLE: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Sub-schemas, by the keyword that holds them (JSON Schema 2020-12 and draft 7).
_ONE_SCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

_metal: bool | None = None

# The largest grammar compiled (a schema's JSON text with its styling, or a forced
# call's tools). Compile time grows with it, on the reader thread, which plans
# every request: on a 2-core Linux CPU host the slowest schemas tried compiled in
# 0.5 s at 0.4 MiB, and llguidance refuses most larger ones itself ("schema too
# large") after parsing them; its own fuel limits bound the rest.
MAX_GRAMMAR_BYTES = 1 << 20

J = TypeVar("J")


def closed_objects(schema: J) -> J:
    """A copy of `schema` where every object schema that leaves additionalProperties
    unset forbids properties it does not name (OpenAI's strict mode)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"])
    if (is_object or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _ONE_SCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed_objects(out["additionalProperties"])
    return cast(J, out)  # a JSON object, as it came


def format_schema(fmt: OutputFormat) -> dict[str, Any]:
    """The JSON schema a request's `format` asks for."""
    if fmt["type"] == "json_object":
        return {"type": "object"}
    if fmt["type"] == "json_schema":
        schema: object = fmt.get("schema")
        if not isinstance(schema, dict):
            raise RequestError("format json_schema needs a schema (a JSON object)")
        cycle = reference_cycle(schema)
        if cycle is not None:
            raise RequestError(f"invalid format: {cycle}")
        return closed_objects(schema) if fmt.get("strict") else schema
    # The daemon's OutputFormat has only the two; a frame written by hand (the
    # tests) may say anything.
    raise RequestError(f"unknown format type {json.dumps(fmt.get('type'))}")


# Keys that leave a schema that is only a reference what the reference says.
_ANNOTATIONS = frozenset({"$ref", "$defs", "definitions", "$schema", "$id", "$comment", "title", "description"})
_ANNOTATIONS |= {"default", "examples"}


def reference_cycle(schema: dict[str, Any]) -> str | None:
    """Where a schema's references lead back to themselves with nothing in
    between (`{"$ref": "#"}`, or a -> b -> a through `$defs`): no JSON value
    matches it, and llguidance would only say that the grammar admits nothing.
    Recursion through a property or an item (a tree) is fine and not reported."""

    def resolve(ref: str) -> object:
        if not ref.startswith("#"):
            return None  # remote references are llguidance's to refuse
        node: object = schema
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    starts: list[tuple[str, object]] = [("#", schema)]
    for key in ("$defs", "definitions"):
        defs = schema.get(key)
        if isinstance(defs, dict):
            starts += [(f"#/{key}/{name}", sub) for name, sub in defs.items()]
    for name, node in starts:
        path = [name]
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node.keys() <= _ANNOTATIONS:
            ref = node["$ref"]
            if ref in path:
                chain = " -> ".join(json.dumps(p) for p in [*path[path.index(ref) :], ref])
                return f"its references form a cycle with nothing in between ({chain}): no JSON value matches it"
            path.append(ref)
            node = resolve(ref)
    return None


def _styled(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**JSON_STYLE, **(schema.get("x-guidance") or {})}}


class Grammars:
    """One model's grammars: llguidance's view of its tokenizer (built on first use,
    ~1 s, from any thread) and the matchers of requests."""

    def __init__(self, tokenizer: TokenizerWrapper, eos: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._eos = sorted(eos)
        self._lock = threading.Lock()
        self._ll: LLTokenizer | None = None

    def ll_tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                # The Hugging Face tokenizer mlx-lm's wrapper holds.
                hf = cast("PreTrainedTokenizerFast", getattr(self._tokenizer, "_tokenizer", self._tokenizer))
                try:
                    # All the model's EOS tokens end a grammar, not just the tokenizer's one
                    # (none known: the tokenizer's).
                    self._ll = llguidance.hf.from_tokenizer(hf, eos_token=self._eos or None)
                except ValueError as e:
                    raise RequestError(f"constrained decoding is not available for this model's tokenizer: {e}") from e
            return self._ll

    def for_format(self, fmt: OutputFormat) -> str:
        from llguidance import LLMatcher

        try:
            return LLMatcher.grammar_from_json_schema(format_schema(fmt), defaults=JSON_STYLE)
        except ValueError as e:
            raise RequestError(f"invalid format: {e}") from e

    def for_forced_call(self, tool_fmt: ToolFormat, tools: list[Tool], choice: ToolChoice) -> str:
        """Start marker, the call's JSON object, end marker; then EOS. Arguments
        are held to the parameters as strict mode would (objects that leave
        additionalProperties unset get none): small models otherwise pad calls
        with keys copied from the schema."""
        lark = raw_input_grammar(tools, choice)
        if lark is not None:
            # A custom tool's input, raw after its name's line, in the tool's own
            # grammar (a sub-grammar: its rule names cannot clash with these).
            name = json.dumps(choice.function, ensure_ascii=False)
            main = f'start: {self._block(tool_fmt)}\ncall: {name} "\\n" input\ninput: @custom'
            return json.dumps({"grammars": [{"lark_grammar": main}, {"name": "custom", "lark_grammar": lark}]})
        call = json.dumps(_styled(closed_objects(call_schema(tools, choice))))
        return self._lark(f"start: {self._block(tool_fmt)}\ncall: %json {call}")

    def for_format_or_calls(self, fmt: OutputFormat, tool_fmt: ToolFormat, tools: list[Tool]) -> str:
        """A format with tools offered (tool_choice "auto"): the answer is either
        calls or text in the format."""
        calls = json.dumps(_styled(closed_objects(call_schema(tools, ToolChoice("required")))))
        text = json.dumps(_styled(format_schema(fmt)))
        return self._lark(
            "start: calls | text\n"
            f'calls: block ("\\n" block)*\nblock: {self._block(tool_fmt)}\n'
            f"call: %json {calls}\ntext: %json {text}"
        )

    def _block(self, tool_fmt: ToolFormat) -> str:
        return f'{self._literal(tool_fmt.start)} "\\n" call "\\n" {self._literal(tool_fmt.end)}'

    def _literal(self, text: str) -> str:
        """A marker in lark: the special token by id when it is one (a string
        literal would only match its text, which special tokens are not), else
        the string."""
        ids = list(self._tokenizer.encode(text, add_special_tokens=False))
        if len(ids) == 1 and self.ll_tokenizer().is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json.dumps(text, ensure_ascii=False)

    def _lark(self, lark: str) -> str:
        from llguidance import LLMatcher

        return LLMatcher.grammar_from_lark(lark)

    def constraint(self, grammar: str) -> SequenceConstraint:
        """A fresh matcher for one sequence; RequestError when the grammar is bad
        (an invalid schema), with llguidance's reason."""
        import llguidance.numpy as lln
        from llguidance import LLMatcher

        ll = self.ll_tokenizer()
        size = len(grammar.encode())
        if size > MAX_GRAMMAR_BYTES:
            raise RequestError(
                f"invalid format: the schema (with any tools' parameters) makes a grammar of {size >> 10} "
                f"KiB, more than the {MAX_GRAMMAR_BYTES >> 10} KiB mlxd compiles; send a smaller schema or fewer tools"
            )
        matcher = LLMatcher(ll, grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"invalid format: {_first_line(matcher.get_error())}")
        # A grammar that admits no first token (a schema that is only a reference
        # to itself, {"$ref": "#"}) is the client's mistake, found here (a mask
        # costs about a millisecond), not in the batch's first step.
        first = lln.allocate_token_bitmask(1, ll.vocab_size)
        lln.fill_next_token_bitmask(matcher, first, 0)
        if matcher.is_error():
            raise RequestError(f"invalid format: it admits no output ({_first_line(matcher.get_error())})")
        return SequenceConstraint(matcher, ll.vocab_size, self._eos, first[0])


class SequenceConstraint:
    """One sequence's matcher and what it has seen.

    Invariant: `seen` counts the sequence's generated tokens the matcher has
    consumed (EOS counted, not consumed: it ends the sequence). Generated tokens
    are `history[prompt_len:]`, where history is the backend's Track.history
    (prompt + every token handed to the engine), plus at most one more: the token a
    lane has sampled but not yet handed out (mlx-lm pipelines one step ahead).
    """

    def __init__(self, matcher: LLMatcher, vocab_size: int, eos: list[int], first: Bitmask | None = None) -> None:
        self.matcher = matcher
        # The mask of the first token, computed when the grammar was checked: the
        # first step reuses it (the matcher is where it was until a token is consumed).
        self.ready_mask = first
        self.vocab_size = vocab_size
        self._eos = frozenset(eos)
        self.prompt_len = 0  # set when the sequence is inserted
        self.seen = 0
        self.ended = False  # it consumed an end-of-sequence token
        # Why the matcher stopped accepting tokens (a token the grammar rejects:
        # a bug, never expected); the engine ends the request with it.
        self.error: str | None = None

    def processor(self, history: list[int]) -> LaneProcessor:
        """A logits processor for one stay of the sequence in one lane."""
        return LaneProcessor(self, history)

    def consume(self, token: int) -> None:
        self.seen += 1
        self.ready_mask = None
        if token in self._eos:
            self.ended = True
        if token in self._eos or self.error is not None:
            return
        if not self.matcher.consume_token(token):
            self.error = f"the output format rejected token {token}: {_first_line(self.matcher.get_error())}"

    def grammar(self) -> SequenceConstraint | None:
        return self if self.error is None else None

    def forced(self, limit: int) -> list[int]:
        """The tokens the grammar forces next (llguidance's fast-forward tokens, in
        the tokenizer's own spelling of the forced text), at most `limit`, consumed:
        a lane feeds them in one pass instead of sampling them one step each."""
        if limit <= 0 or self.ended or self.error is not None or self.matcher.is_error() or self.matcher.is_stopped():
            return []
        out: list[int] = []
        for token in self.matcher.compute_ff_tokens()[:limit]:
            if token in self._eos:
                break
            out.append(token)
        for token in out:
            self.consume(token)
        return out

    def restrict(self, words: Bitmask) -> bool:
        if self.error is None and self.matcher.is_error():
            self.error = f"the output format failed: {_first_line(self.matcher.get_error())}"
        if self.error is not None:  # end the sequence: EOS only
            allow_only(words, self._eos)
        return True


class TokenConsumer(Protocol):
    """What a lane's logits processor drives: something that sees each generated
    token once, in order, and narrows which token may come next (an output
    format's matcher; a thinking budget, requests/reasoning.py). `prompt_len` is
    set when the sequence is inserted; `seen` counts the generated tokens consumed.

    A step's mask for a row is built in two passes (`step_masks`): each consumer
    with a `grammar()` has its matcher fill the row (all rows' grammars together),
    then every consumer `restrict`s the row in place (True when it narrowed it)."""

    prompt_len: int
    seen: int

    def consume(self, token: int) -> None: ...
    def grammar(self) -> SequenceConstraint | None: ...
    def restrict(self, words: Bitmask) -> bool: ...
    def processor(self, history: list[int]) -> LaneProcessor: ...


class LaneProcessor:
    """A consumer's logits processor for one stay of a sequence in one lane.

    Call j of a lane computes the logits of the lane's j-th token. By then the lane
    has sampled tokens 0..j-1 and handed out all but the last, which is
    `context[-1]` (for j > 0). So: consume what the engine was handed and the
    matcher has not seen (tokens that arrived through another lane), then, unless
    this is the first call, the lane's last token if the matcher has not seen it.
    A fresh processor per lane entry keeps the count right across lane switches:
    the tokens a lane computed but never handed out die with it.

    Lanes call it as mlx-lm calls a logits processor, `processor(context, logits)`;
    the batch (engines/masked_batch.py) calls `advance` for every row, then masks
    all rows at once.
    """

    def __init__(self, consumer: TokenConsumer, history: list[int]) -> None:
        self.consumer = consumer
        self._history = history
        self._handed_before = len(history) - consumer.prompt_len
        self._calls = 0
        self._forced = 0  # tokens this lane fed as forced (fast_forward), not sampled

    def _catch_up(self, last: int | mx.array | None) -> None:
        c = self.consumer
        for token in self._history[c.prompt_len + c.seen :]:
            c.consume(token)
        sampled = self._handed_before + self._calls + self._forced  # generated tokens that exist now
        if last is not None and self._calls > 0 and c.seen < sampled:
            c.consume(int(last))  # a token id

    def advance(self, last: int | mx.array) -> None:
        """Brings the consumer up to the lane's next token; `last` is the token the
        lane fed last (read only when the consumer has not seen it)."""
        self._catch_up(last)
        self._calls += 1

    def fast_forward(self, last: int | None, limit: int) -> list[int]:
        """For a lone lane between calls: brings the consumer up to `last` (the
        lane's newest token; None before the first call) and returns the tokens its
        grammar forces after it (at most `limit`), which the lane feeds with `last`
        in its next call and hands out as generated."""
        self._catch_up(last)
        grammar = self.consumer.grammar()
        forced = [] if grammar is None else grammar.forced(limit)
        self._forced += len(forced)
        return forced

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        self.advance(context[-1])
        return mask_logits([[self.consumer]], logits)


# llguidance fills grammar masks in parallel on its own threads (one per core).
# With fewer cores than this the threads only take time from MLX's own (on a
# 2-core host eight masks filled in turn took half the time of the parallel call).
PARALLEL_FILL_MIN_CORES = 4
_executor: LLExecutor | None = None


def allow_only(words: Bitmask, tokens: Iterable[int], *, if_allowed: bool = False) -> None:
    """Narrows one row's packed mask (bit t of word t // 32: token t may come next)
    to `tokens`; with `if_allowed`, to those of them the row allowed already."""
    import numpy as np

    bits = words.view(np.uint32)
    before = bits.copy() if if_allowed else None
    bits[:] = 0
    for token in tokens:
        bit = np.uint32(1 << (token % 32))
        bits[token // 32] |= bit if before is None else before[token // 32] & bit


def step_masks(rows: Sequence[Sequence[TokenConsumer]], width: int) -> Bitmask | None:
    """One step's token masks for a batch of `width`-wide logits: row e allows what
    every consumer of row e allows (a row without consumers, everything); None when
    no row is narrowed. At most one grammar per row."""
    import llguidance.numpy as lln
    import numpy as np

    bitmask = np.full((len(rows), (width + 31) // 32), -1, np.int32)
    fills = [(e, g) for e, consumers in enumerate(rows) for c in consumers if (g := c.grammar()) is not None]
    if fills:
        scratch = lln.allocate_token_bitmask(len(fills), fills[0][1].vocab_size)
        pairs = []
        for i, (_, g) in enumerate(fills):
            if g.ready_mask is not None:
                scratch[i] = g.ready_mask
            else:
                pairs.append((g.matcher, i))
        if len(pairs) > 1 and (os.cpu_count() or 1) >= PARALLEL_FILL_MIN_CORES:
            lln.fill_next_token_bitmask_par(_llg_executor(), pairs, scratch)
        else:
            for matcher, i in pairs:
                lln.fill_next_token_bitmask(matcher, scratch, i)
        # Columns past the tokenizer's vocabulary (models pad their output layer)
        # are never allowed in a grammar's row.
        filled = [e for e, _ in fills]
        shared = min(scratch.shape[1], bitmask.shape[1])
        bitmask[filled] = 0
        bitmask[filled, :shared] = scratch[:, :shared]
    narrowed = False
    for e, consumers in enumerate(rows):
        for c in consumers:
            narrowed = c.restrict(bitmask[e]) or narrowed
    return bitmask if narrowed else None


def mask_logits(rows: Sequence[Sequence[TokenConsumer]], logits: mx.array) -> mx.array:
    """`logits` (one row per entry of `rows`) with every token its row's consumers
    forbid set to -inf; the same array when none forbids anything."""
    bitmask = step_masks(rows, logits.shape[-1])
    return logits if bitmask is None else apply_token_mask(logits, bitmask)


def _llg_executor() -> LLExecutor:
    global _executor
    if _executor is None:
        from llguidance import LLExecutor

        _executor = LLExecutor()
    return _executor


_bit_positions: dict[int, tuple[mx.array, mx.array]] = {}


def apply_token_mask(logits: mx.array, bitmask: Bitmask) -> mx.array:
    """Sets the logits (B×V) of tokens the bitmask (B×W llguidance int32 words, bit
    i of word w = token 32*w + i, W*32 ≥ V) does not allow to -inf, in one op for
    the batch. The words travel to the device, not a byte per token."""
    import mlx.core as mx

    global _metal
    if _metal is None:
        _metal = bool(mx.metal.is_available())
    if _metal:
        from llguidance.mlx import apply_token_bitmask

        return apply_token_bitmask(logits, bitmask)
    import numpy as np

    width = logits.shape[-1]
    if width not in _bit_positions:
        columns = mx.arange(width, dtype=mx.uint32)
        _bit_positions[width] = (columns // 32, columns % 32)
    word, bit = _bit_positions[width]
    words = mx.array(bitmask.view(np.uint32))
    allowed = (mx.right_shift(mx.take(words, word, axis=-1), bit) & 1).astype(mx.bool_)
    return mx.where(allowed, logits, float("-inf"))


def _first_line(message: str) -> str:
    return message.strip().split("\n", 1)[0]
