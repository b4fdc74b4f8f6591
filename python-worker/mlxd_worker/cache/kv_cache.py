"""KV cache options of a preset: quantized KV (`kv_bits`) and rotating KV
(`max_kv_size`), in the lone lane and in the batch.

mlx-lm's `QuantizedKVCache` has no `merge`, so BatchGenerator cannot batch it
(its `_merge_caches` raises). `BatchQuantizedKVCache` is the missing piece: the
batch form of a quantized cache, shaped like mlx-lm's `BatchKVCache` (left
padding, per-row offsets, filter/extend/extract/merge) with each of keys and
values kept as mlx's quantized triple (packed data, scales, biases). Models call
the quantized attention for any cache with a `bits` attribute, as for the solo
`QuantizedKVCache`.

A batch holds one cache class per layer, so in the batch (and in the drafting
lane, whose rounds feed several tokens at once) every sequence's KV is quantized
from the start. With `quantized_kv_start` 0 (the default) the lone lane does the
same, so a request's answer does not depend on whether it ran alone or in company;
with a start above 0 the lone lane keeps the KV full precision until a sequence
holds that many tokens (as mlx-lm's generate does), and a lone sequence joining the
batch is quantized as it joins.

The classes live in quantized_kv.py, imported when a cache is made: importing
mlx-lm takes seconds, which a worker that never makes one (replay) should not pay.

Rotating KV needs no new class: mlx-lm's `RotatingKVCache` merges into
`BatchRotatingKVCache`; the worker makes the rotating layers itself (see
`make`). mlx-lm cannot quantize a rotating cache, so a preset chooses one or the
other (the daemon refuses both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..io.protocol import LoadOptions
from ..mlx_types import Model, PromptCache

# Tokens a rotating cache keeps from the start (an attention sink). mlx-lm's
# make_prompt_cache keeps 4, but its BatchRotatingKVCache keeps none: merged into a
# batch, a lone sequence's sink would be dropped and its answer would change with
# company. So none anywhere: a plain sliding window of max_kv_size tokens.
ROTATING_KEEP = 0


@dataclass(frozen=True)
class KvOptions:
    """The preset's KV settings (Load options `kv_bits`, `kv_group_size`,
    `quantized_kv_start`, `max_kv_size`)."""

    kv_bits: int | None = None
    group_size: int = 64
    quantized_kv_start: int = 0
    max_kv_size: int | None = None

    @classmethod
    def from_options(cls, options: LoadOptions) -> KvOptions:
        group_size = options.get("kv_group_size")
        kv = cls(
            kv_bits=options.get("kv_bits") or None,
            group_size=64 if group_size is None else group_size,
            quantized_kv_start=options.get("quantized_kv_start") or 0,
            max_kv_size=options.get("max_kv_size") or None,
        )
        if kv.kv_bits is not None and kv.max_kv_size is not None:
            raise ValueError("a rotating KV cache (max_kv_size) cannot be quantized (kv_bits): choose one")
        return kv

    def check(self, config: dict[str, Any]) -> None:
        """Refuses settings the model cannot take (at load, with the reason): an
        MLA latent cache and attention sinks have no quantized attention in
        mlx-lm, and mx.quantize groups the head dimension."""
        if self.kv_bits is None:
            return
        text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
        family = str(text.get("model_type") or config.get("model_type") or "?")
        if text.get("kv_lora_rank"):
            raise ValueError(
                f"kv_bits cannot quantize this model's cache: {family} attends through a compressed latent (MLA, "
                "kv_lora_rank), which mlx-lm's quantized attention does not take; remove kv_bits"
            )
        if family.startswith("gpt_oss"):
            raise ValueError(
                f"kv_bits cannot quantize this model's cache: {family} uses attention sinks, which mlx-lm's "
                "quantized attention does not support; remove kv_bits"
            )
        heads = int(config.get("num_attention_heads") or 1)
        head_dim = int(config.get("head_dim") or int(config.get("hidden_size") or 0) // heads)
        if head_dim and head_dim % self.group_size:
            raise ValueError(
                f"kv_group_size {self.group_size} does not divide the model's head dimension {head_dim}: "
                "choose a group size that does (32 or 64)"
            )

    @property
    def quantized(self) -> bool:
        return self.kv_bits is not None

    def describe(self) -> str:
        """What changes the cached values: part of the disk cache's identity."""
        if self.kv_bits is not None:
            return f"kv_bits={self.kv_bits},group={self.group_size},start={self.quantized_kv_start}"
        if self.max_kv_size is not None:
            return f"max_kv_size={self.max_kv_size},keep={ROTATING_KEEP}"
        return "kv=full"

    def make(self, model: Model) -> PromptCache:
        """A fresh cache for the lone lane: quantized from the first token as in
        the batch when `quantized_kv_start` is 0, else by `quantize_if_due` once a
        sequence is that long. With `max_kv_size`, every plain KV layer rotates:
        mlx-lm's `make_prompt_cache` ignores the size for models that make their
        own caches (Llama and most others do)."""
        from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

        cache = make_prompt_cache(model)
        if self.max_kv_size is not None:
            for i, layer in enumerate(cache):
                if type(layer) is KVCache:
                    cache[i] = RotatingKVCache(max_size=self.max_kv_size, keep=ROTATING_KEEP)
        if self.quantized and self.quantized_kv_start == 0:
            self.quantize(cache)
        return cache

    def quantize_if_due(self, cache: PromptCache) -> None:
        """The lone lane's rule, after each model call (mlx-lm's generate_step):
        full-precision layers become quantized once they hold quantized_kv_start
        tokens."""
        if not self.quantized:
            return
        from mlx_lm.models.cache import KVCache

        plain = [c for c in cache if type(c) is KVCache]
        if plain and plain[0].offset >= self.quantized_kv_start:
            self.quantize(cache)

    def quantize(self, cache: PromptCache) -> None:
        """Every full-precision (or foreign quantized) layer becomes a mergeable
        quantized one, in place."""
        from mlx_lm.models.cache import KVCache, QuantizedKVCache

        from .quantized_kv import MergeableQuantizedKVCache

        assert self.kv_bits is not None
        for i, layer in enumerate(cache):
            if type(layer) is KVCache:
                cache[i] = MergeableQuantizedKVCache.adopt(layer.to_quantized(self.group_size, self.kv_bits))
            elif type(layer) is QuantizedKVCache:
                cache[i] = MergeableQuantizedKVCache.adopt(layer)

    def shared(self, cache: PromptCache | None, model: Model) -> PromptCache | None:
        """The cache a sequence enters the batch (or the drafting lane) with:
        quantized from the start when kv_bits is set, rotating when max_kv_size is
        (None: nothing to change, BatchGenerator makes a plain one)."""
        if cache is None and (self.quantized or self.max_kv_size is not None):
            cache = self.make(model)
        if cache is not None and self.quantized:
            self.quantize(cache)
        return cache
