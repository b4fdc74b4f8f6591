"""Per-request samplers that batch.

Requests with the same (temperature, top_p) and no seed share one sampler object,
so BatchGenerator samples their rows in one call. A seeded request gets its own
sampler with its own PRNG key, split once per token: its draws never depend on
which other requests share the batch (mlx_lm.server runs seeded requests one at a
time instead, because it seeds the global generator).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import mlx.core as mx

# logprobs (one row per sequence) -> the sampled tokens, as mlx-lm's samplers.
Sampler = Callable[["mx.array"], "mx.array"]

# Distinct (temperature, top_p) pairs kept: requests choose these freely, so the
# cache must not grow with every value a client invents.
MAX_SHARED = 64


log = logging.getLogger("mlxd_worker")


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves temperature or top_p out gets: the model's own
    recommendation (its generation_config.json, as vLLM and transformers read it),
    else greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0

    @staticmethod
    def of_model(model_dir: str) -> SamplingDefaults:
        try:
            config = json.loads((Path(model_dir) / "generation_config.json").read_text())
        except (OSError, ValueError):
            return SamplingDefaults()
        if not isinstance(config, dict) or config.get("do_sample") is False:
            # Greedy by the model's own word (its temperature is then unused).
            return SamplingDefaults()
        defaults = SamplingDefaults(
            temperature=_within(config.get("temperature"), 0.0, 2.0, 0.0),
            top_p=_within(config.get("top_p"), 1e-9, 1.0, 1.0),
        )
        if defaults != SamplingDefaults():
            log.info(
                "sampling defaults from generation_config.json: temperature %s, top_p %s",
                defaults.temperature,
                defaults.top_p,
            )
        return defaults


def _within(value: object, low: float, high: float, otherwise: float) -> float:
    """`value` when it is a number in [low, high] (what a request may ask for)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high:
        return float(value)
    return otherwise


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
