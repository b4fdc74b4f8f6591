"""One sequence decoding alone, the way mlx_lm.stream_generate does it.

BatchGenerator pays for batching on every step (padding, masks, per-row stop and
length bookkeeping): on a GPU that costs a lone stream ~40% of its tokens/s. So a
sequence that arrives while nothing else runs decodes here; when another arrives,
`handover()` returns what BatchGenerator needs to carry on from the same KV cache.

Pipelining matches mlx-lm's generate_step: when token t is returned, the cache
already holds t and the forward pass for t+1 is queued.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, cast

from ..cache.kv_cache import KvOptions
from ..mlx_types import Model, PromptCache, Stream
from ..requests.sampling import Sampler
from .pacing import PrefillPacer

if TYPE_CHECKING:
    import mlx.core as mx


@dataclass
class Handover:
    """A sequence moving into the batch: feed `prompt` on top of `cache`."""

    prompt: list[int]
    cache: PromptCache
    max_tokens: int
    sampler: Sampler | None
    # A token already computed here that the caller must still emit.
    emitted: int | None
    # Its logprobs vector, when the sequence keeps them.
    logprobs: Optional[mx.array] = None


class SoloSequence:
    def __init__(
        self,
        model: Model,
        ids: list[int],
        max_tokens: int,
        sampler: Sampler | None,
        prefill_step: int,
        stream: Stream,
        cache: PromptCache | None = None,
        kv: KvOptions | None = None,
        marks: list[int] | None = None,
        base: int = 0,
        pacer: PrefillPacer | None = None,
    ) -> None:
        self._model = model
        # Prompt tokens not yet in the cache (a prefix-cache hit holds the others).
        self._pending = list(ids)
        self._left = max_tokens
        self._sampler = sampler
        self._prefill_step = prefill_step
        # The chunk follows the machine's measured prefill rate (lanes/pacing.py).
        self._pacer = pacer or PrefillPacer(prefill_step)
        self._stream = stream
        # The preset's KV settings: quantized (from some length on) or rotating.
        self._kv = kv or KvOptions()
        self._cache = cache if cache is not None else self._kv.make(model)
        # On a prefix-cache hit the rest of the prompt is fed in one model call
        # (the first token's latency is the cached TTFT); a cold prompt is split
        # like mlx-lm's generate_step (all but the last token, then the last), so
        # its tokens equal native mlx-lm's bit for bit.
        self._one_pass = cache is not None
        self._next: mx.array | None = None  # the queued token, once decoding
        # Where the prefill stops for a snapshot of the cache (absolute token
        # counts; `base` tokens were in the cache before `ids`), and the snapshots.
        self._base = base
        self._fed = 0
        self._marks = [m for m in (marks or []) if base < m < base + len(ids) - 1]
        self._snapshots: list[tuple[int, PromptCache]] = []

    def _forward(self, tokens: mx.array) -> mx.array:
        import mlx.core as mx

        logits = self._model(tokens[None], cache=self._cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        if self._sampler is None:
            return mx.argmax(logprobs, axis=-1)
        return self._sampler(logprobs)

    def step(self) -> list[tuple[int, bool]]:
        """One prefill chunk (returns []) or one decoded token (never a draft's)."""
        import mlx.core as mx

        with mx.stream(self._stream):
            if self._next is None:
                step = self._pacer.chunk()
                one_pass = self._one_pass and len(self._pending) <= step and not self._marks
                if len(self._pending) > 1 and not one_pass:
                    n = min(step, len(self._pending) - 1)
                    if self._marks:
                        n = min(n, self._marks[0] - self._base - self._fed)
                    with self._pacer.timing(n):
                        self._model(mx.array(self._pending[:n])[None], cache=self._cache)
                        self._kv.quantize_if_due(self._cache)
                        mx.eval([c.state for c in self._cache])
                    self._pending = self._pending[n:]
                    self._fed += n
                    if self._marks and self._base + self._fed == self._marks[0]:
                        self._snapshots.append((self._marks.pop(0), copy.deepcopy(self._cache)))
                    if len(self._pending) > 1:
                        return []
                # Tokens an output format forces at the start ride on the prompt's last pass.
                opening = self._forced_after(None, self._left - 1)
                self._left -= len(opening)
                self._next = self._forward(mx.array(self._pending + opening))
                self._kv.quantize_if_due(self._cache)
                self._pending = []
                mx.async_eval(self._next)
            else:
                opening = []
            current = self._next
            self._left -= 1
            forced: list[int] = []
            if self._left > 0:
                forced = self._forced_after(current, self._left)
                self._left -= len(forced)
            if self._left > 0:
                self._next = self._forward(mx.array([current.item(), *forced]) if forced else current)
                self._kv.quantize_if_due(self._cache)
                mx.async_eval(self._next)
            return [(t, False) for t in (*opening, cast(int, current.item()), *forced)]

    def _forced_after(self, last: mx.array | None, limit: int) -> list[int]:
        """Tokens to feed after `last` (None: after the prompt) without sampling
        them, at most `limit`: none in a plain lane (ProcessedSoloSequence)."""
        return []

    def take_snapshots(self) -> list[tuple[int, PromptCache]]:
        """Copies of the cache taken where the prefill crossed a boundary: (the
        tokens it holds, the copy). Handed over once."""
        out, self._snapshots = self._snapshots, []
        return out

    @property
    def decoding(self) -> bool:
        """Past the prompt: a token is queued."""
        return self._next is not None

    @property
    def left(self) -> int:
        return self._left

    @property
    def cache(self) -> PromptCache:
        """The KV cache: it holds the sequence's tokens fed so far."""
        return self._cache

    def handover(self) -> Handover:
        """Stops here. Mid-prefill, the rest of the prompt goes along; mid-decode,
        the queued token is taken (the caller emits it) and becomes the prompt."""
        if self._next is None:
            return Handover(self._pending, self._cache, self._left, self._sampler, None)
        token = cast(int, self._next.item())
        self._left -= 1
        return Handover([token], self._cache, self._left, self._sampler, token)


# processor(context, logits) -> logits, as mlx-lm calls logits processors.
LogitsProcessor = Callable[["mx.array", "mx.array"], "mx.array"]
# fast_forward(last token or None, limit) -> forced tokens to feed after it.
FastForward = Callable[[Optional[int], int], list[int]]


class ProcessedSoloSequence(SoloSequence):
    """A lone sequence whose logits go through processors (a constraint's mask)
    and/or whose tokens keep their logprobs vectors. A subclass, so that plain
    sequences decode without a single extra step.

    Processors are called as BatchGenerator calls them, one step ahead: the call
    for token t+1 happens before token t is returned, and `context[-1]` is then t
    (for the first token, the prompt's last token)."""

    def __init__(
        self,
        model: Model,
        ids: list[int],
        max_tokens: int,
        sampler: Sampler | None,
        prefill_step: int,
        stream: Stream,
        processors: list[LogitsProcessor],
        keep_logprobs: bool,
        cache: PromptCache | None = None,
        kv: KvOptions | None = None,
        marks: list[int] | None = None,
        base: int = 0,
        pacer: PrefillPacer | None = None,
        fast_forward: FastForward | None = None,
    ) -> None:
        super().__init__(model, ids, max_tokens, sampler, prefill_step, stream, cache, kv, marks, base, pacer)
        self._processors = processors
        self._keep_logprobs = keep_logprobs
        # An output format's forced tokens, fed in the pass that samples the next
        # token (not one pass each; requests/constraint.py LaneProcessor.fast_forward).
        self._fast_forward = None if keep_logprobs else fast_forward
        # One per queued forward pass, oldest first: tokens come out in that order.
        self._queued_logprobs: deque[mx.array] = deque()
        # The logprobs of the token the last step() returned (when kept).
        self.last_logprobs: mx.array | None = None

    def _forward(self, tokens: mx.array) -> mx.array:
        import mlx.core as mx

        logits = self._model(tokens[None], cache=self._cache)[:, -1, :]
        for processor in self._processors:
            logits = processor(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        if self._keep_logprobs:
            self._queued_logprobs.append(logprobs)
        if self._sampler is None:
            return mx.argmax(logprobs, axis=-1)
        return self._sampler(logprobs)

    def _forced_after(self, last: mx.array | None, limit: int) -> list[int]:
        if self._fast_forward is None or limit <= 0:
            return []
        return self._fast_forward(None if last is None else cast(int, last.item()), limit)

    def step(self) -> list[tuple[int, bool]]:
        out = super().step()
        if out and self._keep_logprobs:
            self.last_logprobs = self._queued_logprobs.popleft()
        return out

    def handover(self) -> Handover:
        moved = super().handover()
        if moved.emitted is not None and self._keep_logprobs:
            moved.logprobs = self._queued_logprobs.popleft()
        return moved
