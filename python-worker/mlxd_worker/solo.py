"""One sequence decoding alone, the way mlx_lm.stream_generate does it.

BatchGenerator pays for batching on every step (padding, masks, per-row stop and
length bookkeeping): on a GPU that costs a lone stream ~40% of its tokens/s. So a
sequence that arrives while nothing else runs decodes here; when another arrives,
`handover()` returns what BatchGenerator needs to carry on from the same KV cache.

Pipelining matches mlx-lm's generate_step: when token t is returned, the cache
already holds t and the forward pass for t+1 is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .sampling import Sampler


@dataclass
class Handover:
    """A sequence moving into the batch: feed `prompt` on top of `cache`."""

    prompt: list[int]
    cache: list[Any]
    max_tokens: int
    sampler: Sampler | None
    # A token already computed here that the caller must still emit.
    emitted: int | None


class SoloSequence:
    def __init__(
        self,
        model: Any,
        ids: list[int],
        max_tokens: int,
        sampler: Sampler | None,
        prefill_step: int,
        stream: Any,
    ) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self._model = model
        self._pending = list(ids)  # prompt tokens not yet in the cache
        self._left = max_tokens
        self._sampler = sampler
        self._prefill_step = prefill_step
        self._stream = stream
        self._cache = make_prompt_cache(model)
        self._next: Any = None  # the queued token (an mx.array), once decoding

    def _forward(self, tokens: Any) -> Any:
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
                if len(self._pending) > 1:
                    n = min(self._prefill_step, len(self._pending) - 1)
                    self._model(mx.array(self._pending[:n])[None], cache=self._cache)
                    mx.eval([c.state for c in self._cache])
                    self._pending = self._pending[n:]
                    if len(self._pending) > 1:
                        return []
                self._next = self._forward(mx.array(self._pending))
                self._pending = []
                mx.async_eval(self._next)
            current = self._next
            self._left -= 1
            if self._left > 0:
                self._next = self._forward(current)
                mx.async_eval(self._next)
            return [(int(current.item()), False)]

    @property
    def decoding(self) -> bool:
        """Past the prompt: a token is queued."""
        return self._next is not None

    @property
    def left(self) -> int:
        return self._left

    def handover(self) -> Handover:
        """Stops here. Mid-prefill, the rest of the prompt goes along; mid-decode,
        the queued token is taken (the caller emits it) and becomes the prompt."""
        if self._next is None:
            return Handover(self._pending, self._cache, self._left, self._sampler, None)
        token = int(self._next.item())
        self._left -= 1
        return Handover([token], self._cache, self._left, self._sampler, token)
