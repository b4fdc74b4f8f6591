"""Prefill chunks follow the measured rate and grow only as long chunks are measured."""

from __future__ import annotations

from mlxd_worker.lanes.pacing import FIRST_LONG_CHUNK, MIN_CHUNK, TARGET_SECONDS, PrefillPacer


def test_chunks_follow_the_rate_and_grow_from_what_was_measured() -> None:
    pacer = PrefillPacer(2048)
    assert pacer.chunk() == FIRST_LONG_CHUNK  # nothing measured: a modest first chunk
    pacer.observe(30, 0.01)  # the warm-up's short prompt: 3000 tok/s
    assert pacer.chunk() == FIRST_LONG_CHUNK  # a short chunk does not license a long one
    pacer.observe(512, 0.2)  # fast: 2560 tok/s
    assert pacer.chunk() == 2048  # 4 x 512, within the preset's prefill_step
    pacer.observe(2048, 16.0)  # a slow machine's long context: 128 tok/s
    assert pacer.chunk() == int(128 * TARGET_SECONDS)
    pacer.observe(256, 60.0)  # slower still: never below the minimum
    assert pacer.chunk() == MIN_CHUNK
    pacer.observe(4, 10.0)  # too short to say anything
    assert pacer.chunk() == MIN_CHUNK
