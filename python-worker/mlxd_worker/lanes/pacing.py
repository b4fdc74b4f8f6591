"""How many prompt tokens one prefill step takes, so that a step stays short.

The daemon takes a worker that makes no progress for `hang_timeout` with requests
in flight for hung, and progress is counted per engine step: one decode step, or
one prefill chunk. A fixed chunk (`prefill_step`, 2048 by default) of a long prompt
takes a minute on a slow machine (attention grows with the context), long enough to
be killed as hung. So the chunk follows the prefill rate measured on this machine:
as many tokens as take about TARGET_SECONDS at the last rate, never more than the
preset's `prefill_step`, never fewer than MIN_CHUNK, and growing from
FIRST_LONG_CHUNK by at most GROWTH times the longest chunk measured. On a fast
machine chunks reach the preset's value after a step or two; prompts up to
FIRST_LONG_CHUNK tokens are split exactly as before.
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


# A chunk at most this many times the longest one measured (and never capped
# below FIRST_LONG_CHUNK): a rate measured on short chunks says little about long
# ones, whose attention costs more per token, so chunks grow as they are measured.
GROWTH = 4
FIRST_LONG_CHUNK = 512


class PrefillPacer:
    def __init__(self, max_chunk: int) -> None:
        self.max_chunk = max_chunk
        # Prompt tokens per second in the last measured chunk (None: none yet).
        self.rate: float | None = None
        # The longest chunk measured so far.
        self.longest = 0

    def chunk(self) -> int:
        """The next prefill chunk's length in tokens."""
        grown = max(FIRST_LONG_CHUNK, GROWTH * self.longest)
        by_rate = self.max_chunk if self.rate is None else int(self.rate * TARGET_SECONDS)
        return max(MIN_CHUNK, min(self.max_chunk, grown, by_rate))

    def observe(self, tokens: int, seconds: float) -> None:
        """A chunk of `tokens` took `seconds` (evaluated). The last one counts:
        the cost per token grows with the context, so the next chunk is sized by
        the most recent one."""
        if tokens >= MIN_OBSERVED and seconds > 1e-4:
            self.rate = tokens / seconds
            self.longest = max(self.longest, tokens)

    @contextmanager
    def timing(self, tokens: int) -> Iterator[None]:
        """Times an evaluated chunk of `tokens`: `with pacer.timing(n): ...`."""
        started = time.perf_counter()
        yield
        self.observe(tokens, time.perf_counter() - started)
