"""Per-request samplers that batch.

Requests with the same (temperature, top_p) and no seed share one sampler object,
so BatchGenerator samples their rows in one call. A seeded request gets its own
sampler with its own PRNG key, split once per token: its draws never depend on
which other requests share the batch (mlx_lm.server runs seeded requests one at a
time instead, because it seeds the global generator).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import mlx.core as mx

# logprobs (one row per sequence) -> the sampled tokens, as mlx-lm's samplers.
Sampler = Callable[["mx.array"], "mx.array"]

# Distinct (temperature, top_p) pairs kept: requests choose these freely, so the
# cache must not grow with every value a client invents.
MAX_SHARED = 64


class SamplerCache:
    def __init__(self) -> None:
        self._shared: OrderedDict[tuple[float, float], Sampler] = OrderedDict()

    def get(self, temperature: float, top_p: float, seed: int | None) -> Sampler | None:
        """None means greedy: BatchGenerator's own default sampler."""
        if temperature <= 0.0:
            return None
        if seed is not None:
            return seeded_sampler(temperature, top_p, seed)
        key = (temperature, top_p)
        if key in self._shared:
            self._shared.move_to_end(key)
            return self._shared[key]
        from mlx_lm.sample_utils import make_sampler

        sampler = make_sampler(temp=temperature, top_p=top_p)
        self._shared[key] = sampler
        if len(self._shared) > MAX_SHARED:
            self._shared.popitem(last=False)  # least recently used
        return sampler

    def __len__(self) -> int:
        return len(self._shared)


def seeded_sampler(temperature: float, top_p: float, seed: int) -> Sampler:
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    state = [mx.random.key(seed)]

    def sample(logprobs: mx.array) -> mx.array:
        if 0.0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        state[0], sub = mx.random.split(state[0])
        return mx.random.categorical(logprobs * (1.0 / temperature), key=sub)

    return sample
