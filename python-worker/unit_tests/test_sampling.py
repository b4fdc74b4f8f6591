"""The shared-sampler cache stays bounded whatever values clients send."""

from __future__ import annotations

from mlxd_worker.requests.sampling import MAX_SHARED, SamplerCache


def test_the_cache_is_bounded_and_keeps_recent_pairs() -> None:
    cache = SamplerCache()
    first = cache.get(0.5, 1.0, None)
    for i in range(MAX_SHARED * 3):
        cache.get(0.5, 1.0, None)  # used again and again: stays
        cache.get(1.0 + i / 1000, 0.9, None)
    assert len(cache) == MAX_SHARED
    assert cache.get(0.5, 1.0, None) is first
    assert cache.get(0.0, 1.0, None) is None, "greedy needs no sampler"
