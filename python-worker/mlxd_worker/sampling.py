"""Per-request samplers that batch.

Requests with the same (temperature, top_p) and no seed share one sampler object,
so BatchGenerator samples their rows in one call. A seeded request gets its own
sampler with its own PRNG key, split once per token: its draws never depend on
which other requests share the batch (mlx_lm.server runs seeded requests one at a
time instead, because it seeds the global generator).
"""

from __future__ import annotations

from typing import Any, Callable

Sampler = Callable[[Any], Any]


class SamplerCache:
    def __init__(self) -> None:
        self._shared: dict[tuple[float, float], Sampler] = {}

    def get(self, temperature: float, top_p: float, seed: int | None) -> Sampler | None:
        """None means greedy: BatchGenerator's own default sampler."""
        if temperature <= 0.0:
            return None
        if seed is not None:
            return seeded_sampler(temperature, top_p, seed)
        key = (temperature, top_p)
        if key not in self._shared:
            from mlx_lm.sample_utils import make_sampler

            self._shared[key] = make_sampler(temp=temperature, top_p=top_p)
        return self._shared[key]


def seeded_sampler(temperature: float, top_p: float, seed: int) -> Sampler:
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    state = [mx.random.key(seed)]

    def sample(logprobs: Any) -> Any:
        if 0.0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        state[0], sub = mx.random.split(state[0])
        return mx.random.categorical(logprobs * (1.0 / temperature), key=sub)

    return sample
