"""How many prompt tokens one prefill step takes, so that a step stays short.

The daemon takes a worker that makes no progress for `hang_timeout` with requests
in flight for hung, and progress is counted per engine step: one decode step, or
one prefill chunk. A fixed chunk (`prefill_step`, 2048 by default) of a long prompt
takes a minute on a slow machine (attention grows with the context), long enough to
be killed as hung. So the chunk follows the prefill rate measured on this machine:
as many tokens as take about TARGET_SECONDS at the last rate, never more than the
preset's `prefill_step`, never fewer than MIN_CHUNK. On a fast machine that is the
preset's value; a prompt that fits one chunk there is split exactly as before.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

# About this long per prefill step; the default hang_timeout is 60 s.
TARGET_SECONDS = 2.0
MIN_CHUNK = 32
# A chunk shorter than this says nothing of the rate. The warm-up's short prompt
# (a few dozen tokens) is measured: its rate, lowered by per-call overhead, sizes a
# worker's first long prefill on the safe side until a real chunk is measured.
MIN_OBSERVED = 8


class PrefillPacer:
    def __init__(self, max_chunk: int) -> None:
        self.max_chunk = max_chunk
        # Prompt tokens per second in the last measured chunk (None: none yet).
        self.rate: float | None = None

    def chunk(self) -> int:
        """The next prefill chunk's length in tokens."""
        if self.rate is None:
            return self.max_chunk
        return max(MIN_CHUNK, min(self.max_chunk, int(self.rate * TARGET_SECONDS)))

    def observe(self, tokens: int, seconds: float) -> None:
        """A chunk of `tokens` took `seconds` (evaluated). The last one counts:
        the cost per token grows with the context, so the next chunk is sized by
        the most recent one."""
        if tokens >= MIN_OBSERVED and seconds > 1e-4:
            self.rate = tokens / seconds

    @contextmanager
    def timing(self, tokens: int) -> Iterator[None]:
        """Times an evaluated chunk of `tokens`: `with pacer.timing(n): ...`."""
        started = time.perf_counter()
        yield
        self.observe(tokens, time.perf_counter() - started)
