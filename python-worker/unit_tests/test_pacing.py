"""Prefill chunks are the preset's prefill_step or a step down its ladder
(max_chunk / 2**k): the largest that fits the target time at the measured rate and
the growth cap."""

from __future__ import annotations

import random

import pytest

from mlxd_worker.lanes.pacing import FIRST_LONG_CHUNK, GROWTH, MIN_CHUNK, TARGET_SECONDS, PrefillPacer


def ladder(max_chunk: int) -> set[int]:
    steps = {max_chunk}
    while max_chunk // 2 >= MIN_CHUNK:
        max_chunk //= 2
        steps.add(max_chunk)
    return steps


def fast(pacer: PrefillPacer) -> PrefillPacer:
    """A machine that prefills 100k tokens/s, measured on a step long enough to
    lift the growth cap past max_chunk."""
    tokens = max(pacer.max_chunk // GROWTH, 8)
    pacer.observe(tokens, tokens / 100_000)
    return pacer


def test_chunks_grow_from_what_was_measured_and_follow_the_rate() -> None:
    pacer = PrefillPacer(2048)
    assert pacer.chunk() == FIRST_LONG_CHUNK  # nothing measured: a modest first chunk
    pacer.observe(30, 0.001)  # the warm-up's short prompt: 30000 tok/s
    assert pacer.chunk() == FIRST_LONG_CHUNK  # a short chunk does not license a long one
    pacer.observe(512, 0.2)  # fast: 2560 tok/s
    assert pacer.chunk() == 2048  # 4 x 512 and 0.8 s: the preset's prefill_step
    pacer.observe(2048, 16.0)  # a slow machine's long context: 128 tok/s
    assert pacer.chunk() == 256  # 2 s at 128 tok/s: 2048 and 1024 and 512 would not fit
    pacer.observe(256, 60.0)  # slower still: the ladder stops at the minimum
    assert pacer.chunk() == MIN_CHUNK
    pacer.observe(4, 10.0)  # too short to say anything
    assert pacer.chunk() == MIN_CHUNK


@pytest.mark.parametrize("max_chunk", [2048, 1000, 512, 4096])
def test_a_fast_rate_gives_max_chunk_exactly(max_chunk: int) -> None:
    assert fast(PrefillPacer(max_chunk)).chunk() == max_chunk


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(3000, 2048), (1000, 1024), (700, 1024), (512, 1024), (300, 512), (128, 256), (100, 128), (40, 64)],
)
def test_a_slow_rate_gives_the_largest_ladder_step_within_target(rate: float, expected: int) -> None:
    pacer = PrefillPacer(2048)
    pacer.observe(2048, 2048 / rate)
    chunk = pacer.chunk()
    assert chunk == expected
    assert chunk / rate <= TARGET_SECONDS
    if chunk < 2048:
        assert 2 * chunk / rate > TARGET_SECONDS  # the next step up would not fit


def test_the_growth_cap_rounds_down_to_the_ladder() -> None:
    pacer = PrefillPacer(2048)
    pacer.observe(300, 0.001)  # very fast, but only 300 tokens measured: cap 1200
    assert pacer.chunk() == 1024


def test_rows_prefilled_together_share_the_budget() -> None:
    pacer = PrefillPacer(2048)
    pacer.observe(2048, 0.2)  # 10240 tok/s, growth cap 8192 tokens a step
    assert [pacer.chunk(rows) for rows in (1, 2, 4, 5, 8, 16)] == [2048, 2048, 2048, 1024, 1024, 512]
    unmeasured = PrefillPacer(2048)
    assert unmeasured.chunk(8) == FIRST_LONG_CHUNK // 8


def test_the_ladder_ends_at_its_last_step_not_below_the_minimum() -> None:
    crawl = PrefillPacer(1000)
    crawl.observe(1000, 1000.0)  # 1 tok/s
    assert crawl.chunk() == 62  # 1000 / 16; 31 would be below MIN_CHUNK
    tiny = PrefillPacer(16)  # a preset's prefill_step below MIN_CHUNK is still kept
    tiny.observe(16, 100.0)
    assert tiny.chunk() == 16


@pytest.mark.parametrize("max_chunk", [2048, 1000, 512, 100])
def test_every_chunk_is_on_the_ladder(max_chunk: int) -> None:
    rng = random.Random(max_chunk)
    pacer = PrefillPacer(max_chunk)
    steps = ladder(max_chunk)
    for _ in range(500):
        rows = rng.randint(1, 8)
        chunk = pacer.chunk(rows)
        assert chunk in steps
        pacer.observe(chunk * rows, chunk * rows / rng.uniform(5.0, 50_000.0))
