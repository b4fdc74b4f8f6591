"""The prefix cache: KV caches of finished (and cancelled) sequences, keyed by the
tokens they hold, so that a request sharing a prefix with an earlier one (an
agent's growing conversation, a common system prompt) prefills only the rest.

Two tiers. Memory: entries in a token trie with LRU eviction by count and bytes
(our own, rather than mlx-lm's `LRUPromptCache`, because that one evicts inside
`insert_cache` without saying what went, and evicted entries must spill to disk).
Disk (optional, disk_cache.py): entries that survive a restart; an entry evicted
from memory spills there, and a long one is written through at once (see
disk_cache.py for the policy).

What goes in is always a cache together with exactly the tokens it holds; what
comes out holds a prefix of the new prompt and leaves at least its last token to
be fed, since a sequence's first token comes from feeding one. It is a private
copy: feeding it leaves the stored entry intact.

Threads: `take`, `put` and `close` run on the engine thread (they touch MLX
arrays); `stats` may be called from any thread.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generic, Literal, Optional, TypeVar

from ..io.protocol import PromptCacheLookups, PromptCacheStats
from ..mlx_types import CacheLayer, PromptCache
from .layers import held, is_rotated

if TYPE_CHECKING:
    from .disk_cache import DiskCache

# Entries at most, whatever their size (the byte limit usually binds first).
MAX_ENTRIES = 256

# An evicted entry is remembered by its first tokens (a hash), so a later prompt
# starting the same way is told apart as `miss_evicted` from a cold one; entries
# shorter than this are not remembered. Bounded: the oldest are forgotten.
EVICTED_KEY_TOKENS = 64
MAX_EVICTED_KEYS = 4096

log = logging.getLogger("mlxd_worker")

# A lookup's outcome: the name of the `PromptCacheLookups` count it adds to.
Outcome = Literal["hit_continued", "hit_diverged", "miss_cold", "miss_diverged", "miss_evicted", "miss_too_short"]

V = TypeVar("V")


def can_trim(cache: PromptCache) -> bool:
    from mlx_lm.models.cache import can_trim_prompt_cache

    return bool(can_trim_prompt_cache(cache))


@dataclass
class Lookup:
    """A cached prefix for a prompt: `cache` holds `prompt[:cached]` (None: a miss)."""

    cache: PromptCache | None
    cached: int


class _Node(Generic[V]):
    __slots__ = ("edges", "value")

    def __init__(self) -> None:
        # First token of the edge -> (the edge's tokens, the node it leads to).
        self.edges: dict[int, tuple[tuple[int, ...], _Node[V]]] = {}
        self.value: V | None = None


def _common(label: tuple[int, ...], tokens: tuple[int, ...], at: int) -> int:
    """Length of the common prefix of `label` and `tokens[at:]`."""
    if tokens[at : at + len(label)] == label:
        return len(label)
    k = 0
    for a, b in zip(label, tokens[at:]):
        if a != b:
            break
        k += 1
    return k


class TokenTrie(Generic[V]):
    """Token sequences -> values, as a radix tree (one node per branch point, not
    per token: a long conversation is one edge). Values are never None."""

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()

    def add(self, tokens: Sequence[int], value: V) -> None:
        key = tuple(tokens)
        node, i = self._root, 0
        while i < len(key):
            edge = node.edges.get(key[i])
            if edge is None:
                leaf: _Node[V] = _Node()
                leaf.value = value
                node.edges[key[i]] = (key[i:], leaf)
                return
            label, child = edge
            k = _common(label, key, i)
            if k < len(label):  # split the edge where the tokens part
                mid: _Node[V] = _Node()
                mid.edges[label[k]] = (label[k:], child)
                node.edges[key[i]] = (label[:k], mid)
                child = mid
            node, i = child, i + k
        node.value = value

    def remove(self, tokens: Sequence[int]) -> V | None:
        key = tuple(tokens)
        path: list[tuple[_Node[V], int]] = []  # (parent, first token of the edge taken)
        node, i = self._root, 0
        while i < len(key):
            edge = node.edges.get(key[i])
            if edge is None or key[i : i + len(edge[0])] != edge[0]:
                return None
            path.append((node, key[i]))
            node, i = edge[1], i + len(edge[0])
        value, node.value = node.value, None
        if value is not None:
            # Keep the tree minimal: the emptied node, then its parent.
            for parent, first in reversed(path[-2:]):
                self._tidy(parent, first)
        return value

    @staticmethod
    def _tidy(parent: _Node[V], first: int) -> None:
        label, child = parent.edges[first]
        if child.value is not None:
            return
        if not child.edges:
            del parent.edges[first]
        elif len(child.edges) == 1:
            ((rest, grandchild),) = child.edges.values()
            parent.edges[first] = (label + rest, grandchild)

    def search(self, prompt: tuple[int, ...]) -> tuple[list[tuple[int, V]], int, list[_Node[V]]]:
        """Walks `prompt` down the tree: the values on the way (with their token
        counts), how many tokens of `prompt` the tree holds, and the subtrees
        whose values all hold exactly those tokens and then more."""
        found: list[tuple[int, V]] = []
        node, i = self._root, 0
        while i < len(prompt):
            edge = node.edges.get(prompt[i])
            if edge is None:
                break
            label, child = edge
            k = _common(label, prompt, i)
            if k < len(label):
                return found, i + k, [child]
            node, i = child, i + k
            if node.value is not None:
                found.append((i, node.value))
        return found, i, [child for _, child in node.edges.values()]

    @staticmethod
    def first_below(roots: Iterable[_Node[V]], accept: Callable[[V], bool]) -> V | None:
        """The shallowest accepted value in the subtrees (breadth first)."""
        level = list(roots)
        while level:
            for node in level:
                if node.value is not None and accept(node.value):
                    return node.value
            level = [child for node in level for _, child in node.edges.values()]
        return None

    def best(self, prompt: Sequence[int], trimmable: Callable[[V], bool]) -> Match[V]:
        """The value that gives the most tokens of `prompt` while leaving at least
        one to feed, and that many tokens: a stored prefix as it is, or (when its
        cache can be trimmed) the whole prompt or an entry that goes on past
        where the prompt parts from it, trimmed back. Also how many tokens of
        `prompt` the tree holds at all (what a miss shared with some entry)."""
        key = tuple(prompt)
        if len(key) < 2:
            return Match(None, 0, 0)
        found, common, below = self.search(key)
        best: V | None = None
        usable = 0
        for depth, value in found:
            n = depth if depth < len(key) else (len(key) - 1 if trimmable(value) else 0)
            if n > usable:
                best, usable = value, n
        n = min(common, len(key) - 1)
        if n > usable:
            longer = self.first_below(below, trimmable)
            if longer is not None:
                best, usable = longer, n
        return Match(best, usable, common)


@dataclass(frozen=True)
class Match(Generic[V]):
    """`TokenTrie.best`'s answer: the value to reuse (None: none), how many of the
    prompt's tokens it gives, and how many the tree shares with the prompt."""

    value: V | None
    usable: int
    shared: int


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    cache: PromptCache
    nbytes: int
    trimmable: bool


class PrefixCache:
    def __init__(self, max_bytes: int, disk: Optional[DiskCache] = None, keep_rotated: bool = True) -> None:
        self.max_bytes = max_bytes
        self.disk = disk
        # A cache rotated by a preset's max_kv_size (no window mask: a plain run's
        # prompt attends to all of itself) would answer differently once reused,
        # so it is not kept; a model's own sliding windows mask by position and are.
        self.keep_rotated = keep_rotated
        # Least recently used first.
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._trie: TokenTrie[_Entry] = TokenTrie()
        self._bytes = 0
        self.lookups: PromptCacheLookups = {
            "hit_continued": 0,
            "hit_diverged": 0,
            "miss_cold": 0,
            "miss_diverged": 0,
            "miss_evicted": 0,
            "miss_too_short": 0,
        }
        self.disk_hits = 0
        self.cached_tokens = 0
        self._evicted: OrderedDict[int, None] = OrderedDict()
        # Stats are read from the stats thread; the engine thread changes them.
        self._lock = threading.Lock()

    def take(self, prompt: list[int]) -> Lookup:
        """The longest cached prefix of `prompt` (a private copy), leaving at least
        one token to feed; from disk when the disk has a longer one than memory.
        Counts the lookup by outcome (and a disk hit)."""
        with self._lock:
            in_memory = self._trie.best(prompt, lambda e: e.trimmable)
        source, cached, shared = in_memory.value, in_memory.usable, in_memory.shared
        from_disk = False
        if self.disk is not None:
            on_disk = self.disk.lookup(prompt)
            disk_shared = on_disk.shared
            if on_disk.value is not None and on_disk.usable > cached:
                loaded = self.disk.load(on_disk.value)
                if loaded is not None:
                    source = _Entry(on_disk.value.tokens, loaded, _nbytes(loaded), can_trim(loaded))
                    cached, from_disk = on_disk.usable, True
                    self._insert(source)  # it is on disk already: an eviction will not rewrite it
                else:
                    disk_shared = 0  # the entry was unreadable and is gone
            shared = max(shared, disk_shared)
        outcome: Outcome | None = None
        if cached < EVICTED_KEY_TOKENS and shared < EVICTED_KEY_TOKENS and self._was_evicted(prompt):
            # At most a template's first tokens from another prompt: what this one
            # needed was evicted. Counted (and served) as the miss it is.
            log.debug("prompt cache: the prompt's first %d tokens were cached and evicted", EVICTED_KEY_TOKENS)
            source, cached, outcome = None, 0, "miss_evicted"
        cache: PromptCache | None = None
        if source is not None:
            with self._lock:
                if source.tokens in self._entries:
                    self._entries.move_to_end(source.tokens)
            cache = _private_prefix(source.cache, cached)
            if cached == 0 or held(cache) != cached:
                cache, cached = None, 0  # nothing usable (or a cache that is not what it claims)
        if outcome is None:
            outcome = self._outcome(prompt, None if cache is None else source, cached, shared)
        with self._lock:
            self.lookups[outcome] += 1
            if cache is not None:
                self.disk_hits += from_disk
                self.cached_tokens += cached
        return Lookup(cache, cached)

    def _was_evicted(self, prompt: list[int]) -> bool:
        if len(prompt) < EVICTED_KEY_TOKENS:
            return False
        key = hash(tuple(prompt[:EVICTED_KEY_TOKENS]))
        with self._lock:
            return key in self._evicted

    def _outcome(self, prompt: list[int], source: _Entry | None, cached: int, shared: int) -> Outcome:
        """Which `PromptCacheLookups` count a lookup adds to (`miss_evicted` is
        decided before); where the prompt parted from a cached one goes to the debug
        log. `shared`: the tokens the prompt shares with the nearest entry of either
        tier."""
        if source is not None:
            within = len(source.tokens) >= len(prompt) and source.tokens[: len(prompt)] == tuple(prompt)
            if cached == len(source.tokens) or within:
                return "hit_continued"
            log.debug(
                "prompt cache: the prompt (%d tokens) diverged at token %d from a cached prompt of %d; reused %d",
                len(prompt),
                cached,
                len(source.tokens),
                cached,
            )
            return "hit_diverged"
        if len(prompt) < 2:
            return "miss_too_short"
        if shared > 0:
            # Only a cache that cannot be trimmed (rotating or recurrent layers) gets here.
            if shared >= len(prompt) - 1:
                log.debug(
                    "prompt cache: the prompt (%d tokens) ends inside a cached prompt whose cache cannot be "
                    "cut back to leave a token to feed (rotating or recurrent layers)",
                    len(prompt),
                )
            else:
                log.debug(
                    "prompt cache: the prompt (%d tokens) diverged at token %d from a cached prompt whose cache "
                    "cannot be cut back there (rotating or recurrent layers)",
                    len(prompt),
                    shared,
                )
            return "miss_diverged"
        return "miss_cold"

    def put(self, tokens: list[int], cache: PromptCache | None) -> None:
        """Keeps `cache`, which holds `tokens[:held(cache)]` (and is handed over:
        the caller no longer feeds it). A long one is also written to disk."""
        if cache is None:
            return
        n = held(cache)
        if n < 2 or n > len(tokens) or (not self.keep_rotated and is_rotated(cache)):
            return
        entry = _Entry(tuple(tokens[:n]), detached(cache), _nbytes(cache), can_trim(cache))
        self._insert(entry)
        if self.disk is not None and n >= self.disk.min_disk_tokens:
            self.disk.write(entry.tokens, entry.cache)

    def _insert(self, entry: _Entry) -> None:
        """Into the memory tier; what the limits push out spills to disk."""
        evicted: list[_Entry] = []
        with self._lock:
            old = self._entries.pop(entry.tokens, None)
            if old is not None:
                self._bytes -= old.nbytes
            if entry.trimmable:
                # Stored prefixes of a trimmable cache only take space: it holds them.
                for depth, prefix in self._trie.search(entry.tokens)[0]:
                    if depth < len(entry.tokens):
                        self._drop(prefix)
            self._entries[entry.tokens] = entry
            self._trie.add(entry.tokens, entry)
            self._bytes += entry.nbytes
            while self._entries and (len(self._entries) > MAX_ENTRIES or self._bytes > self.max_bytes):
                evicted.append(self._evict(next(iter(self._entries.values()))))
        if self.disk is not None:
            for gone in evicted:
                self.disk.write(gone.tokens, gone.cache)

    @property
    def bytes(self) -> int:
        return self._bytes

    def shrink(self, target_bytes: int) -> int:
        """Drops the least recently used entries until the memory tier holds at
        most `target_bytes` (what the disk tier lacks spills there first): room for
        a request's KV comes out of the cache before any request waits or is
        refused. Returns how many entries went."""
        evicted: list[_Entry] = []
        with self._lock:
            while self._entries and self._bytes > target_bytes:
                evicted.append(self._evict(next(iter(self._entries.values()))))
        if self.disk is not None:
            for gone in evicted:
                self.disk.write(gone.tokens, gone.cache)
        return len(evicted)

    def _evict(self, entry: _Entry) -> _Entry:
        """Drops an entry for room, remembering how it started (lock held)."""
        if len(entry.tokens) >= EVICTED_KEY_TOKENS:
            key = hash(entry.tokens[:EVICTED_KEY_TOKENS])
            self._evicted[key] = None
            self._evicted.move_to_end(key)
            while len(self._evicted) > MAX_EVICTED_KEYS:
                self._evicted.popitem(last=False)
        return self._drop(entry)

    def _drop(self, entry: _Entry) -> _Entry:
        del self._entries[entry.tokens]
        self._trie.remove(entry.tokens)
        self._bytes -= entry.nbytes
        return entry

    def close(self, timeout: float | None = None) -> None:
        """At shutdown (engine thread): spills what memory holds and the disk does
        not (most recently used first), then drains the disk writer, all within
        `timeout` seconds."""
        if self.disk is None:
            return
        deadline = time.monotonic() + (timeout if timeout is not None else 86400.0)
        with self._lock:
            entries = list(reversed(self._entries.values()))
        for entry in entries:
            self.disk.write(entry.tokens, entry.cache, wait_until=deadline)
        self.disk.close(None if timeout is None else max(0.0, deadline - time.monotonic()))

    def stats(self) -> PromptCacheStats:
        """The Stats frame's `prompt_cache` (with `disk`, the disk tier's, when on)."""
        with self._lock:
            out: PromptCacheStats = {
                "lookups": {**self.lookups},
                "cached_tokens_total": self.cached_tokens,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
            }
            disk_hits = self.disk_hits
        if self.disk is not None:
            out["disk"] = self.disk.stats(disk_hits)
        return out


def _private_prefix(cache: PromptCache, n: int) -> PromptCache:
    """A copy of `cache` holding its first `n` tokens, for a lane to feed on. KV
    layers (full precision or quantized) are cut to exactly `n` slots, never the
    entry's whole buffer: a short hit on a long entry costs what it uses. Other
    layer kinds are copied whole and trimmed."""
    from mlx.utils import tree_map
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, trim_prompt_cache

    if all(isinstance(c, (KVCache, QuantizedKVCache)) and c.keys is not None for c in cache):
        out: list[CacheLayer] = []
        for layer in cache:
            part = copy.copy(layer)
            part.keys, part.values = tree_map(lambda x: x[..., :n, :], (layer.keys, layer.values))
            part.offset = min(n, layer.offset)
            out.append(part)
        return out
    whole = copy.deepcopy(cache)
    if held(whole) > n:
        trim_prompt_cache(whole, held(whole) - n)
    return whole


def detached(cache: PromptCache) -> PromptCache:
    """`cache` with arrays of its own (evaluated in the background), in place. A layer extracted
    from mlx-lm's batch is a lazy copy of a slice of the whole batch's arrays (a
    KV layer) or a view into them (a recurrent layer): kept as it is, an entry
    would hold every row of the batch alive, far more memory than it counts."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, CacheList

    pending: list[mx.array] = []

    def own(layer: object) -> None:
        if isinstance(layer, CacheList):
            for part in layer.caches:
                own(part)
            return
        if isinstance(layer, ArraysCache):
            layer.cache = [None if a is None else mx.contiguous(a) for a in layer.cache]
        for value in getattr(layer, "__dict__", {}).values():
            if isinstance(value, mx.array):
                pending.append(value)
            elif isinstance(value, (tuple, list)):
                pending.extend(v for v in value if isinstance(v, mx.array))

    for layer in cache:
        own(layer)
    # Asynchronously: a finishing sequence must not drain the batch's pipeline.
    mx.async_eval(pending)
    return cache


def _nbytes(cache: PromptCache) -> int:
    return int(sum(c.nbytes for c in cache))
