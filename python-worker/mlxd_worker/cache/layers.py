"""What the worker knows about each cache layer kind mlx-lm builds: how many tokens a
cache has consumed, and which layers can be rewound by any amount at any length.

mlx-lm's families mix layer kinds in one model's cache: full attention
(``KVCache``, quantized ``QuantizedKVCache``), sliding windows (``RotatingKVCache``,
which past its window cannot be rewound), linear attention and SSMs (``ArraysCache``:
a recurrent state with no token axis at all) and nested ``CacheList``s. No code here
assumes layer 0 is a KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..mlx_types import CacheLayer, PromptCache


def _flat(cache: Iterable[CacheLayer]) -> list[CacheLayer]:
    out: list[CacheLayer] = []
    for layer in cache:
        inner = getattr(layer, "caches", None)  # CacheList
        out.extend(_flat(inner) if inner is not None else [layer])
    return out


def held(cache: PromptCache | None) -> int:
    """Tokens the cache has consumed: the offset of its first layer that counts
    tokens (a recurrent state does not). 0 for an empty or all-recurrent cache."""
    if not cache:
        return 0
    for layer in _flat(cache):
        offset = getattr(layer, "offset", None)
        if offset is not None:
            return int(offset)
    return 0


def kinds(cache: PromptCache) -> list[str]:
    """The layer classes of a cache, each once, in order (for logs and status),
    by mlx-lm's names: the worker's batchable quantized cache is mlx-lm's
    QuantizedKVCache to anyone reading them."""
    seen: list[str] = []
    for layer in _flat(cache):
        name = type(layer).__name__.removeprefix("Mergeable")
        if name not in seen:
            seen.append(name)
    return seen


def rewind_problem(cache: PromptCache) -> str | None:
    """Why some layer of this (model's fresh) cache cannot be rewound by any number
    of tokens at any length, or None. Speculative decoding rewinds rejected draft
    tokens: a sliding window past its size, or a recurrent state, cannot forget
    them, and would silently keep them."""
    from mlx_lm.models.cache import ConcatenateKVCache, KVCache, QuantizedKVCache

    always = (KVCache, QuantizedKVCache, ConcatenateKVCache)
    stuck = kinds([layer for layer in _flat(cache) if not isinstance(layer, always)])
    if not stuck:
        return None
    return f"its cache has layers that cannot be rewound at every length ({', '.join(stuck)})"


def is_rotated(cache: PromptCache) -> bool:
    """A sliding-window layer has dropped tokens (it holds fewer than it consumed)."""
    for layer in _flat(cache):
        max_size = getattr(layer, "max_size", None)
        if max_size is not None and int(getattr(layer, "offset", 0)) > int(max_size):
            return True
    return False
