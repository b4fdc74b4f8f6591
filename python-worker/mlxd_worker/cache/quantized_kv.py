"""The batch form of mlx-lm's quantized KV cache (see kv_cache.py for why).

`BatchQuantizedKVCache` is shaped like mlx-lm's `BatchKVCache` (left padding,
per-row offsets, filter/extend/extract/merge) with each of keys and values kept
as mlx's quantized triple (packed data, scales, biases). Models call the
quantized attention for any cache with a `bits` attribute, as for the solo
`QuantizedKVCache`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, cast

from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import (
    QuantizedKVCache,
    _BaseCache,
    dynamic_roll,
)

from ..mlx_types import CacheLayer, PromptCache

if TYPE_CHECKING:
    import mlx.core as mx

# A quantized tensor: (packed data, scales, biases), as mx.quantize returns it.
Quantized = tuple["mx.array", "mx.array", "mx.array"]


def to_disk(cache: PromptCache) -> PromptCache:
    """A cache's layers as mlx-lm's own classes (what the disk cache stores);
    the cache itself is left as it is."""
    out: list[CacheLayer] = []
    for layer in cache:
        if isinstance(layer, MergeableQuantizedKVCache):
            plain = QuantizedKVCache(group_size=layer.group_size, bits=layer.bits)
            plain.keys, plain.values, plain.offset = layer.keys, layer.values, layer.offset
            layer = plain
        out.append(layer)
    return out


def from_disk(cache: PromptCache) -> PromptCache:
    """Loaded layers back as the worker's classes (quantized ones mergeable)."""
    return [MergeableQuantizedKVCache.adopt(c) if type(c) is QuantizedKVCache else c for c in cache]


class MergeableQuantizedKVCache(QuantizedKVCache):
    """mlx-lm's QuantizedKVCache that can join a batch."""

    # (Quantized | None): mlx-lm's __init__ sets them to None and only its untyped
    # methods fill them, so the type checker would take them to be None for good.
    keys: Any
    values: Any

    @classmethod
    def adopt(cls, layer: QuantizedKVCache) -> MergeableQuantizedKVCache:
        out = cls(group_size=layer.group_size, bits=layer.bits)
        out.keys, out.values, out.offset = layer.keys, layer.values, layer.offset
        return out

    @classmethod
    def merge(cls, caches: list[CacheLayer]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)


def _map(fn: Callable[..., mx.array], *triples: Quantized) -> Quantized:
    return cast(Quantized, tuple(fn(*parts) for parts in zip(*triples)))


def _zeros(batch: int, heads: int, length: int, dim: int, dtype: mx.Dtype, group_size: int, bits: int) -> Quantized:
    import mlx.core as mx

    per_word = 32 // bits
    return (
        mx.zeros((batch, heads, length, dim // per_word), dtype=mx.uint32),
        mx.zeros((batch, heads, length, dim // group_size), dtype=dtype),
        mx.zeros((batch, heads, length, dim // group_size), dtype=dtype),
    )


class BatchQuantizedKVCache(_BaseCache):
    """The batch form of a quantized KV cache. Rows are left-padded as in
    BatchKVCache: `left_padding[i]` slots before row i's first token, `offset[i]`
    its length (minus padding), `_idx` the filled width."""

    step = 256

    def __init__(self, left_padding: list[int], group_size: int = 64, bits: int = 8) -> None:
        import mlx.core as mx

        self.keys: Quantized | None = None
        self.values: Quantized | None = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-pad for pad in left_padding])
        self._idx = 0
        self._right_padding: mx.array | None = None
        self.group_size = group_size
        self.bits = bits

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Quantized, Quantized]:
        import mlx.core as mx

        batch, heads, steps, k_dim = keys.shape
        v_dim = values.shape[-1]
        prev = self._idx
        if self.keys is None or prev + steps > self.keys[0].shape[2]:
            grow = (self.step + steps - 1) // self.step * self.step
            new_k = _zeros(batch, heads, grow, k_dim, keys.dtype, self.group_size, self.bits)
            new_v = _zeros(batch, heads, grow, v_dim, values.dtype, self.group_size, self.bits)
            if self.keys is not None and self.values is not None:
                old_k, old_v = self.keys, self.values
                if prev % self.step != 0:
                    old_k = _map(lambda x: x[..., :prev, :], old_k)
                    old_v = _map(lambda x: x[..., :prev, :], old_v)
                self.keys = _map(lambda a, b: mx.concatenate([a, b], axis=2), old_k, new_k)
                self.values = _map(lambda a, b: mx.concatenate([a, b], axis=2), old_v, new_v)
            else:
                self.keys, self.values = new_k, new_v
        self.offset = self.offset + steps
        self._idx += steps
        q_keys = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        q_values = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        assert self.keys is not None and self.values is not None
        for i in range(3):
            self.keys[i][..., prev : self._idx, :] = q_keys[i]
            self.values[i][..., prev : self._idx, :] = q_values[i]
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Quantized, Quantized]:
        assert self.keys is not None and self.values is not None
        idx = self._idx
        return _map(lambda x: x[..., :idx, :], self.keys), _map(lambda x: x[..., :idx, :], self.values)

    def prepare(
        self,
        *,
        left_padding: list[int] | None = None,
        lengths: list[int] | None = None,
        right_padding: list[int] | None = None,
    ) -> None:
        import mlx.core as mx

        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty BatchQuantizedKVCache")
            pad = mx.array(left_padding)
            self.left_padding += pad
            self.offset = self.offset - pad
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self) -> None:
        """Right padding (prompts of different lengths prefilled together) moves
        to the left, where the mask expects it."""
        if self._right_padding is None or self.keys is None or self.values is None:
            self._right_padding = None
            return
        shift = self._right_padding[:, None]
        self.keys = _map(lambda x: dynamic_roll(x, shift, axis=2), self.keys)
        self.values = _map(lambda x: dynamic_roll(x, shift, axis=2), self.values)
        self.offset = self.offset - self._right_padding
        self.left_padding += self._right_padding
        self._right_padding = None

    @property
    def state(self) -> tuple[Quantized | None, Quantized | None, mx.array, mx.array]:
        return self.keys, self.values, self.offset, self.left_padding

    @state.setter
    def state(self, v: tuple[Quantized | None, Quantized | None, mx.array, mx.array]) -> None:
        self.keys, self.values, self.offset, self.left_padding = v

    @property
    def meta_state(self) -> tuple[str, ...]:
        return tuple(map(str, (self._idx, self.group_size, self.bits)))

    @meta_state.setter
    def meta_state(self, v: tuple[str, ...]) -> None:
        self._idx, self.group_size, self.bits = map(int, v)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:  # noqa: N803 (mlx-lm's name)
        return cast("mx.array", create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs))

    def filter(self, batch_indices: list[int] | mx.array) -> None:
        """Keeps the given rows, dropping padding no row needs any more."""
        if self.keys is not None and self.values is not None:
            self.keys = _map(lambda x: x[batch_indices], self.keys)
            self.values = _map(lambda x: x[batch_indices], self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        min_pad = min(cast("list[int]", self.left_padding.tolist()))
        if min_pad > 0:
            if self.keys is not None and self.values is not None:
                self.keys = _map(lambda x: x[..., min_pad:, :], self.keys)
                self.values = _map(lambda x: x[..., min_pad:, :], self.values)
            self._idx -= min_pad
            self.left_padding -= min_pad

    def extend(self, other: BatchQuantizedKVCache) -> None:
        """Appends `other`'s rows, both right-aligned on the longer filled width."""
        import mlx.core as mx

        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        idx = max(self._idx, other._idx)
        width = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)
        ref = self if self.keys is not None else other
        assert ref.keys is not None and ref.values is not None
        heads = ref.keys[0].shape[1]
        k_dim = ref.keys[0].shape[3] * (32 // self.bits)
        v_dim = ref.values[0].shape[3] * (32 // self.bits)
        dtype = ref.keys[1].dtype

        def aligned(c: BatchQuantizedKVCache) -> tuple[Quantized, Quantized, mx.array, mx.array]:
            rows = c.offset.shape[0]
            k = c.keys or _zeros(rows, heads, 0, k_dim, dtype, self.group_size, self.bits)
            v = c.values or _zeros(rows, heads, 0, v_dim, dtype, self.group_size, self.bits)
            left = idx - c._idx
            right = width - k[0].shape[2] - left
            if right < 0:
                k = _map(lambda x: x[..., :right, :], k)
                v = _map(lambda x: x[..., :right, :], v)
                right = 0
            if left or right:
                pad = [(0, 0), (0, 0), (left, right), (0, 0)]
                k = _map(lambda x: mx.pad(x, pad), k)
                v = _map(lambda x: mx.pad(x, pad), v)
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, p1), (k2, v2, o2, p2) = aligned(self), aligned(other)
        self.keys = _map(lambda a, b: mx.concatenate([a, b]), k1, k2)
        self.values = _map(lambda a, b: mx.concatenate([a, b]), v1, v2)
        self.offset = mx.concatenate([o1, o2])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = idx

    def extract(self, idx: int) -> MergeableQuantizedKVCache:
        """Row `idx` as a lone sequence's cache."""
        import mlx.core as mx

        out = MergeableQuantizedKVCache(group_size=self.group_size, bits=self.bits)
        if self.keys is None or self.values is None:
            return out
        mx.eval(self.left_padding)
        pad = cast("list[int]", self.left_padding.tolist())[idx]
        end = self._idx
        out.keys = _map(lambda x: mx.contiguous(x[idx : idx + 1, :, pad:end]), self.keys)
        out.values = _map(lambda x: mx.contiguous(x[idx : idx + 1, :, pad:end]), self.values)
        out.offset = end - pad
        return out

    @classmethod
    def merge(cls, caches: list[CacheLayer]) -> BatchQuantizedKVCache:
        """Lone sequences' quantized caches as one batch, left-padded to the
        longest."""

        first = caches[0]
        group_size, bits = first.group_size, first.bits
        lengths = [int(c.offset) for c in caches]
        longest = max(lengths)
        if longest == 0:
            return cls([0] * len(caches), group_size, bits)
        padding = [longest - n for n in lengths]
        filled = [c for c in caches if c.keys is not None]
        heads = filled[0].keys[0].shape[1]
        k_dim = filled[0].keys[0].shape[3] * (32 // bits)
        v_dim = filled[0].values[0].shape[3] * (32 // bits)
        dtype = filled[0].keys[1].dtype
        keys = _zeros(len(caches), heads, longest, k_dim, dtype, group_size, bits)
        values = _zeros(len(caches), heads, longest, v_dim, dtype, group_size, bits)
        for i, (pad, c) in enumerate(zip(padding, caches)):
            if c.keys is None:
                continue
            if (c.group_size, c.bits) != (group_size, bits):
                raise ValueError("quantized caches with different settings cannot share a batch")
            n = int(c.offset)
            for j in range(3):
                keys[j][i : i + 1, :, pad : pad + n] = c.keys[j][..., :n, :]
                values[j][i : i + 1, :, pad : pad + n] = c.values[j][..., :n, :]
        out = cls(padding, group_size, bits)
        out.keys, out.values = keys, values
        out.offset += longest
        out._idx = longest
        return out

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return sum(x.nbytes for x in self.keys) + sum(x.nbytes for x in self.values)
