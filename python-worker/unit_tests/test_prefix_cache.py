"""The prefix cache's contract with real KV caches of the test model: what comes
out holds a prefix of the prompt and leaves at least one token to feed, is a copy
(feeding it leaves the stored entry intact), and the counters say what happened."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mlxd_worker.cache.prefix_cache import PrefixCache, held

MODEL = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "smollm2-135m"


@pytest.fixture(scope="module")
def model() -> Any:
    if not (MODEL / "config.json").exists():
        pytest.skip("the test model is not imported (scripts/setup)")
    import mlx_lm

    return mlx_lm.load(str(MODEL))[0]


def filled(model: Any, tokens: list[int], max_kv_size: int | None = None) -> list[Any]:
    import mlx.core as mx
    from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

    if max_kv_size is None:
        cache = make_prompt_cache(model)
    else:
        cache = [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in model.layers]
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def test_a_longer_prompt_gets_the_stored_prefix_and_feeds_the_rest(model: Any) -> None:
    pc = PrefixCache(1 << 30)
    stored = list(range(100, 140))
    pc.put(stored, filled(model, stored))
    found = pc.take([*stored, 7, 8, 9])
    assert found.cached == 40 and found.cache is not None and held(found.cache) == 40
    assert pc.stats()["lookups"]["hit_continued"] == 1 and pc.stats()["cached_tokens_total"] == 40


def test_the_same_prompt_leaves_its_last_token_to_feed(model: Any) -> None:
    pc = PrefixCache(1 << 30)
    stored = list(range(200, 230))
    pc.put(stored, filled(model, stored))
    found = pc.take(stored)
    assert found.cached == 29 and found.cache is not None and held(found.cache) == 29


def test_a_taken_cache_is_a_copy(model: Any) -> None:
    import mlx.core as mx

    pc = PrefixCache(1 << 30)
    stored = list(range(300, 320))
    pc.put(stored, filled(model, stored))
    first = pc.take([*stored, 1])
    assert first.cache is not None
    model(mx.array([1, 2, 3])[None], cache=first.cache)  # feeding it moves only the copy
    again = pc.take([*stored, 5])
    assert again.cached == 20 and again.cache is not None and held(again.cache) == 20


def test_an_unrelated_prompt_misses_and_the_limit_evicts(model: Any) -> None:
    one = filled(model, list(range(400, 420)))
    size = sum(c.nbytes for c in one)
    pc = PrefixCache(int(size * 1.5))  # room for one entry
    pc.put(list(range(400, 420)), one)
    pc.put(list(range(500, 520)), filled(model, list(range(500, 520))))
    assert pc.take(list(range(400, 425))).cache is None  # evicted, least recently used
    assert pc.take(list(range(500, 525))).cached == 20
    assert pc.take([9, 9, 9]).cache is None
    stats = pc.stats()
    assert stats["entries"] == 1 and stats["lookups"]["miss_cold"] == 2 and stats["bytes"] <= stats["max_bytes"]


def test_each_lookup_is_counted_by_why_it_hit_or_missed(model: Any) -> None:
    """What an operator reads on /metrics: a conversation that goes on is a
    continued hit; a rewritten system prompt parts from it early (a diverged hit,
    or a miss where the cache cannot be cut back); a cache too small evicts."""
    system = list(range(100, 170))  # longer than the tokens an evicted entry is remembered by
    conversation = [*system, 1, 2, 3]
    one = filled(model, conversation)
    pc = PrefixCache(int(sum(c.nbytes for c in one) * 1.5))  # room for one entry
    pc.put(conversation, one)
    assert pc.take([*conversation, 4, 5]).cached == len(conversation)
    assert pc.take(conversation[:20]).cached == 19  # a prompt inside a cached one
    assert pc.take([*system[:10], *range(900, 960)]).cached == 10
    assert pc.take([*conversation[:-1], 999]).cached == len(conversation) - 1  # parts at its last token
    assert pc.take([7]).cache is None
    assert pc.take([900, 901, 902]).cache is None
    other = [*system[:3], *range(2000, 2070)]  # the same template opening, another conversation
    pc.put(other, filled(model, other))  # pushes the conversation out
    assert pc.take([*conversation, 6]).cache is None  # not the 3 template tokens: a miss
    assert pc.stats()["lookups"] == {
        "hit_continued": 2,
        "hit_diverged": 2,
        "miss_cold": 1,
        "miss_diverged": 0,
        "miss_evicted": 1,
        "miss_too_short": 1,
    }
    # A rotated cache (a preset's max_kv_size) cannot be cut back to where a prompt parts from it.
    rotating = PrefixCache(1 << 30)
    long = list(range(3000, 3040))
    rotating.put(long, filled(model, long, max_kv_size=32))
    assert rotating.take([*long, 9]).cached == 40
    assert rotating.take([*long[:20], 9, 9]).cache is None
    assert rotating.take(long).cache is None  # the same prompt again: it cannot be cut back by one
    lookups = rotating.stats()["lookups"]
    assert (lookups["hit_continued"], lookups["miss_diverged"]) == (1, 2)


def test_a_short_hit_on_a_long_entry_copies_only_what_it_uses(model: Any) -> None:
    import mlx.core as mx

    pc = PrefixCache(1 << 30)
    stored = list(range(100, 400))  # a 300-token entry: a 512-slot buffer
    pc.put(stored, filled(model, stored))
    prompt = stored[:10] + [7, 8, 9]
    found = pc.take(prompt)
    assert found.cached == 10 and found.cache is not None
    per_token = sum(c.nbytes for c in filled(model, stored[:10])) / 256  # a 10-token cache has 256 slots
    assert sum(c.nbytes for c in found.cache) == pytest.approx(10 * per_token)
    # Feeding the copy leaves the entry whole: the next taker still gets 300 tokens' worth.
    model(mx.array(prompt[10:])[None], cache=found.cache)
    again = pc.take(stored + [1])
    assert again.cached == 300 and again.cache is not None and held(again.cache) == 300


def test_shrinking_drops_the_least_recently_used_entries_first(model: Any) -> None:
    pc = PrefixCache(1 << 30)
    for start in (600, 700, 800):
        pc.put(list(range(start, start + 20)), filled(model, list(range(start, start + 20))))
    one = pc.bytes // 3
    assert pc.take(list(range(600, 625))).cached == 20  # 600 is now the most recent
    assert pc.shrink(one) == 2
    assert pc.bytes == one and pc.stats()["entries"] == 1
    assert pc.take(list(range(600, 625))).cached == 20
    assert pc.take(list(range(700, 725))).cache is None and pc.take(list(range(800, 825))).cache is None
    assert pc.shrink(one) == 0


def test_a_kept_entry_holds_its_own_arrays_not_the_batch_it_came_from() -> None:
    """A layer extracted from mlx-lm's batch (a lazy contiguous slice, or a view
    for a recurrent layer) would keep the whole batch's arrays alive."""
    import gc

    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache

    from mlxd_worker.cache.prefix_cache import detached

    gc.collect()
    keys, values, state = (mx.zeros((8, 4, 1024, 64)) for _ in range(3))
    mx.eval(keys, values, state)
    parents = keys.nbytes + values.nbytes + state.nbytes
    kv = KVCache()
    kv.keys, kv.values = mx.contiguous(keys[2:3, :, :100]), mx.contiguous(values[2:3, :, :100])
    kv.offset = 100
    recurrent = ArraysCache(1)
    recurrent.cache = [state[2:3]]
    cache = detached([kv, recurrent])
    mx.eval(kv.keys, kv.values, recurrent.cache[0])  # what detached started
    gc.collect()
    before = mx.get_active_memory()
    del keys, values, state
    gc.collect()
    assert before - mx.get_active_memory() == parents, "the batch's arrays are freed"
    assert len(cache) == 2
