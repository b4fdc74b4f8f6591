"""The worker's KV accounting (docs/design/MEMORY.md): the daemon gives the worker
its share of the memory budget (the Load's `memory_limit`, then MemoryLimit
frames as other models come and go) and the KV cache's bytes as a function of
tokens (`kv_shape`, read from config.json by the daemon: one formula). What the
worker holds after loading (weights, runtime) is its baseline; the rest of the
share is its capacity for KV and the prefix cache together.

A sequence reserves its KV to `max_tokens` (prompt + answer, capped at the
context) when it is admitted and gives it back when it ends, so that the KV of
the sequences in flight can never outgrow the share; sequences together are
counted as mlx-lm's batch holds them, each as long as the longest. Before a
request starts the engine asks: never (not even alone: refused), now, or later
(it waits while others finish).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import RequestError
from ..io.protocol import KvStats, LoadOptions


class KvTooLarge(RequestError):
    """The request's KV could never fit the model's share of memory."""

    code = "kv_cache_too_large"


def mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class KvShape:
    """`bytes_per_token · n + Σ window · min(n, tokens) + bytes_per_sequence`."""

    bytes_per_token: int
    windows: tuple[tuple[int, int], ...] = ()
    bytes_per_sequence: int = 0

    @staticmethod
    def from_options(options: LoadOptions) -> KvShape | None:
        """The daemon's shape, with each window widened by a prefill chunk: a
        rotating cache holds its window and the chunk being fed until the step
        trims it (mlx-lm's RotatingKVCache._update_concat)."""
        raw = options.get("kv_shape")
        if raw is None:
            return None
        chunk = int(options.get("prefill_step") or 0)
        return KvShape(
            bytes_per_token=int(raw["bytes_per_token"]),
            windows=tuple((int(w["tokens"]) + chunk, int(w["bytes_per_token"])) for w in raw.get("windows") or ()),
            bytes_per_sequence=int(raw.get("bytes_per_sequence") or 0),
        )

    def sequence_bytes(self, tokens: int) -> int:
        windowed = sum(per_token * min(tokens, window) for window, per_token in self.windows)
        return self.bytes_per_token * tokens + windowed + self.bytes_per_sequence


@dataclass
class KvBudget:
    shape: KvShape | None = None
    # The worker's share of the budget (None: no budget, nothing is enforced).
    limit: int | None = None
    # What the worker holds with nothing in flight: weights, runtime.
    baseline: int = 0
    weights: int = 0
    started: bool = False
    refused_total: int = 0
    evicted_for_room_total: int = 0
    # Reserved tokens (prompt + max_tokens) by request id.
    _tokens: dict[int, int] = field(default_factory=dict)

    @property
    def capacity(self) -> int | None:
        """What KV and the prefix cache may fill together (None: unlimited)."""
        if not self.started or self.shape is None or self.limit is None:
            return None
        return max(0, self.limit - self.baseline)

    def need(self, tokens: int) -> int:
        """One sequence of `tokens` alone."""
        return 0 if self.shape is None else self.shape.sequence_bytes(tokens)

    def batch_bytes(self, tokens: Iterable[int]) -> int:
        """mlx-lm's batch caches are rectangular (rows left-padded to the longest),
        so sequences together hold their count times the longest one's KV."""
        lengths = list(tokens)
        return len(lengths) * self.need(max(lengths)) if lengths else 0

    @property
    def reserved(self) -> int:
        return self.batch_bytes(self._tokens.values())

    def reserved_with(self, tokens: int) -> int:
        """The reservations if one more sequence of `tokens` joined."""
        return self.batch_bytes([*self._tokens.values(), tokens])

    def check_ever_fits(self, tokens: int) -> None:
        """Refuses a request whose KV exceeds the whole capacity: it could not run
        even alone with the prefix cache empty."""
        capacity = self.capacity
        need = self.need(tokens)
        if capacity is None or need <= capacity:
            return
        self.refused_total += 1
        raise KvTooLarge(
            f"this request needs {tokens} tokens of KV cache ({mib(need)}: prompt + max_tokens), more than "
            f"this model's share of memory can ever hold: {mib(capacity)} for KV of a {mib(self.limit or 0)} share "
            f"({mib(self.baseline)} taken by weights and runtime); lower max_tokens or shorten the prompt, or "
            "give the model more memory (memory cap, fewer models loaded, kv_bits)"
        )

    def reserve(self, rid: int, tokens: int) -> None:
        self._tokens[rid] = tokens

    def release(self, rid: int) -> None:
        self._tokens.pop(rid, None)

    def stats(self, in_use: int, waiting: int) -> KvStats:
        return {
            "weights_bytes": self.weights,
            "baseline_bytes": self.baseline,
            "in_use_bytes": in_use,
            "reserved_bytes": self.reserved,
            "capacity_bytes": self.capacity or 0,
            "waiting": waiting,
            "refused_total": self.refused_total,
            "evicted_for_room_total": self.evicted_for_room_total,
        }
