"""How many prompt tokens one prefill step takes, so that a step stays short.

The daemon takes a worker that makes no progress for `hang_timeout` with requests
in flight for hung, and progress is counted per engine step: one decode step, or
one prefill chunk. A fixed chunk (`prefill_step`, 2048 by default) of a long prompt
takes a minute on a slow machine (attention grows with the context), long enough to
be killed as hung.

The rule: a chunk is the preset's `prefill_step` (max_chunk), as in mlx-lm, unless
that step would run past TARGET_SECONDS at the rate last measured on this machine,
or past the growth cap; then it is `max_chunk / 2**k` for the smallest k that fits
both, down to the last such step not below MIN_CHUNK. The growth cap: a step takes
at most GROWTH times the longest step measured, and never less than
FIRST_LONG_CHUNK, because a rate measured on short steps (the warm-up's) overstates
that of long ones, whose attention costs more per token.

Chunk lengths are therefore always one of max_chunk, max_chunk/2, max_chunk/4, ...:
different chunkings give slightly different floating-point results, and a ladder
keeps the choices few and stable from run to run. On a fast machine, once a step of
max_chunk / GROWTH tokens has been measured (with the default 2048, the first long
prompt's first chunk of FIRST_LONG_CHUNK), every chunk is max_chunk, so a prompt is
split exactly as mlx-lm splits it.

Rows prefilled together in one step (the batch) share the budget: each takes the
largest ladder step whose total over the rows fits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# About this long per prefill step; the default hang_timeout is 60 s.
TARGET_SECONDS = 2.0
MIN_CHUNK = 32
# A chunk shorter than this says nothing of the rate. The warm-up's short prompt
# (a few dozen tokens) is measured: its rate, lowered by per-call overhead, sizes a
# worker's first long prefill on the safe side until a real chunk is measured.
MIN_OBSERVED = 8


# A step takes at most this many times the tokens of the longest one measured (and
# is never capped below FIRST_LONG_CHUNK): a rate measured on short chunks says
# little about long ones, whose attention costs more per token, so chunks grow as
# they are measured.
GROWTH = 4
FIRST_LONG_CHUNK = 512


class PrefillPacer:
    def __init__(self, max_chunk: int) -> None:
        self.max_chunk = max_chunk
        # Prompt tokens per second in the last measured step (None: none yet).
        self.rate: float | None = None
        # The most tokens one measured step prefilled.
        self.longest = 0
        # Makes a chunk the same on every rank of a distributed group (rank 0's:
        # the rate is each rank's own clock); alone, the chunk as chosen.
        self.agree: Callable[[int], int] = int

    def chunk(self, rows: int = 1) -> int:
        """The next prefill chunk's length in tokens, for each of `rows` sequences
        prefilled together in one step: a step of the ladder max_chunk / 2**k."""
        budget = float(max(FIRST_LONG_CHUNK, GROWTH * self.longest))
        if self.rate is not None:
            budget = min(budget, self.rate * TARGET_SECONDS)
        step = self.max_chunk
        while step * rows > budget and step // 2 >= MIN_CHUNK:
            step //= 2
        return self.agree(step)

    def observe(self, tokens: int, seconds: float) -> None:
        """A step prefilling `tokens` (all rows together) took `seconds`
        (evaluated). The last one counts: the cost per token grows with the
        context, so the next chunk is sized by the most recent one."""
        if tokens >= MIN_OBSERVED and seconds > 1e-4:
            self.rate = tokens / seconds
            self.longest = max(self.longest, tokens)

    @contextmanager
    def timing(self, tokens: int) -> Iterator[None]:
        """Times an evaluated chunk of `tokens`: `with pacer.timing(n): ...`."""
        started = time.perf_counter()
        yield
        self.observe(tokens, time.perf_counter() - started)
