"""When the engine hands its pending tokens to the transport.

One TokenBatch frame carries every token produced since the last flush, for all
sequences. Latency-first by default: flush after every decode step. A preset may
trade latency for fewer frames: every N tokens, or every T milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .protocol import LoadOptions


@dataclass(frozen=True)
class FlushPolicy:
    every: str = "step"  # "step" | "tokens" | "ms"
    tokens: int = 1
    ms: float = 0.0

    @classmethod
    def from_options(cls, options: LoadOptions | None) -> FlushPolicy:
        spec = (options or {}).get("flush")
        if spec is None or spec["every"] == "step":
            return cls()
        if spec["every"] == "tokens":
            return cls(every="tokens", tokens=max(1, spec["tokens"]))
        return cls(every="ms", ms=max(0.0, float(spec["ms"])))

    def due(self, pending_tokens: int, oldest_pending: float) -> bool:
        """Whether to flush now, at the end of a step with `pending_tokens` waiting."""
        if pending_tokens == 0:
            return False
        if self.every == "step":
            return True
        if self.every == "tokens":
            return pending_tokens >= self.tokens
        return (time.perf_counter() - oldest_pending) * 1000.0 >= self.ms
