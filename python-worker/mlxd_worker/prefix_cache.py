"""The prefix cache: KV caches of finished (and cancelled) sequences, keyed by the
tokens they hold, so that a request sharing a prefix with an earlier one (an
agent's growing conversation, a common system prompt) prefills only the rest.

Built on mlx-lm's `LRUPromptCache` (a token trie with LRU eviction by count and
bytes). What goes in is always a cache together with exactly the tokens it holds;
what comes out holds a prefix of the new prompt and leaves at least its last token
to be fed, since a sequence's first token comes from feeding one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

# The trie's key for this worker's one model.
_MODEL = "model"
# Entries at most, whatever their size (the byte limit usually binds first).
MAX_ENTRIES = 256


def held(cache: list[Any]) -> int:
    """Tokens a KV cache holds."""
    return int(cache[0].offset) if cache else 0


@dataclass
class Lookup:
    """A cached prefix for a prompt: `cache` holds `prompt[:cached]` (None: a miss)."""

    cache: list[Any] | None
    cached: int


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=MAX_ENTRIES, max_bytes=max_bytes)
        self.hits = 0
        self.misses = 0
        self.cached_tokens = 0
        # Stats are read from the stats thread; the engine thread changes them.
        self._lock = threading.Lock()

    def take(self, prompt: list[int]) -> Lookup:
        """The longest cached prefix of `prompt` (a private copy), leaving at least
        one token to feed. Counts a hit or a miss."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self._lru.fetch_nearest_cache(_MODEL, prompt)
        cached = len(prompt) - len(rest) if cache is not None else 0
        if cache is not None and cached >= len(prompt):
            # The whole prompt is cached: give its last token back to be fed.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, cached - (len(prompt) - 1))
                cached = len(prompt) - 1
            else:
                cache, cached = None, 0
        if cache is not None and (cached == 0 or held(cache) != cached):
            cache, cached = None, 0  # nothing usable (or a cache that is not what it claims)
        with self._lock:
            if cache is None:
                self.misses += 1
            else:
                self.hits += 1
                self.cached_tokens += cached
        return Lookup(cache, cached)

    def put(self, tokens: list[int], cache: list[Any] | None) -> None:
        """Keeps `cache`, which holds `tokens[:held(cache)]`."""
        if cache is None:
            return
        n = held(cache)
        if n < 2 or n > len(tokens):
            return
        with self._lock:
            self._lru.insert_cache(_MODEL, list(tokens[:n]), cache)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits_total": self.hits,
                "misses_total": self.misses,
                "cached_tokens_total": self.cached_tokens,
                "entries": len(self._lru),
                "bytes": int(self._lru.nbytes),
                "max_bytes": self.max_bytes,
            }
