"""Quantized and rotating KV through the real backend and SmolLM2-135M: the batch
form of mlx-lm's quantized cache (quantized_kv.BatchQuantizedKVCache) against mlx-lm's
own quantized generation, and rotating KV in both lanes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from mlxd_worker.cache.kv_cache import KvOptions
from mlxd_worker.cache.quantized_kv import BatchQuantizedKVCache, MergeableQuantizedKVCache
from mlxd_worker.engines.backend import MlxBackend

MODEL = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "smollm2-135m"
PROMPTS = [
    "Name three colours of the rainbow.",
    "What is the capital of France? Answer in one word.",
    "Write one sentence about the sea.",
]
TOKENS = 8


def quantized(length: int, seed: int) -> MergeableQuantizedKVCache:
    mx.random.seed(seed)
    plain = KVCache()
    plain.update_and_fetch(mx.random.normal((1, 3, length, 64)), mx.random.normal((1, 3, length, 64)))
    return MergeableQuantizedKVCache.adopt(plain.to_quantized(group_size=64, bits=8))


def triples_equal(a: Any, b: Any) -> bool:
    return all(mx.array_equal(x, y).item() for x, y in zip(a, b))


def test_quantized_caches_merge_extend_filter_and_come_back_out_unchanged() -> None:
    a, b, c = quantized(5, 1), quantized(9, 2), quantized(3, 3)
    batch = MergeableQuantizedKVCache.merge([a, b])
    assert isinstance(batch, BatchQuantizedKVCache) and batch.size() == 9
    assert batch.left_padding.tolist() == [4, 0]
    batch.extend(MergeableQuantizedKVCache.merge([c]))
    for i, original in enumerate((a, b, c)):
        row = batch.extract(i)
        assert row.offset == original.offset
        assert triples_equal(row.keys, [x[..., : original.offset, :] for x in original.keys])
        assert triples_equal(row.values, [x[..., : original.offset, :] for x in original.values])
    batch.filter([2])  # only the shortest left: its padding is dropped
    assert batch.size() == 3 and batch.left_padding.tolist() == [0]
    assert triples_equal(batch.extract(0).keys, [x[..., :3, :] for x in c.keys])


def test_quantizing_a_plain_cache_follows_quantized_kv_start() -> None:
    kv = KvOptions(kv_bits=8, quantized_kv_start=6)
    cache: list[Any] = [KVCache()]
    cache[0].update_and_fetch(mx.zeros((1, 3, 4, 64)), mx.zeros((1, 3, 4, 64)))
    kv.quantize_if_due(cache)
    assert type(cache[0]) is KVCache
    cache[0].update_and_fetch(mx.zeros((1, 3, 2, 64)), mx.zeros((1, 3, 2, 64)))
    kv.quantize_if_due(cache)
    assert isinstance(cache[0], MergeableQuantizedKVCache) and cache[0].offset == 6
    with pytest.raises(ValueError, match="choose one"):
        KvOptions.from_options({"kv_bits": 8, "max_kv_size": 512})
    with pytest.raises(ValueError, match="does not divide the model's head dimension 64"):
        KvOptions(kv_bits=8, group_size=128).check({"hidden_size": 576, "num_attention_heads": 9})


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    backend = MlxBackend()
    backend.load(str(MODEL), {})
    tok = backend.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]


def run(backend: MlxBackend, prompts: list[list[int]], max_tokens: int = TOKENS) -> list[list[int]]:
    """All prompts at once: the first starts in the lone lane, the others join it
    in the batch."""
    uids = [backend.insert(p, max_tokens, None) for p in prompts]
    out: dict[int, list[int]] = {u: [] for u in uids}
    done: set[int] = set()
    while len(done) < len(uids):
        for uid, token, finish in backend.step():
            out[uid].append(token)
            if finish is not None:
                done.add(uid)
    return [out[u] for u in uids]


def native(prompt: list[int], max_tokens: int, quantized_from_start: int | None = None, **kwargs: Any) -> list[int]:
    """mlx-lm's own greedy generation with the same KV settings; with
    `quantized_from_start` (bits), mlx-lm's own QuantizedKVCache from the first
    token (what quantized_kv_start 0 means in mlxd)."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from mlxd_worker.engines.backend import _load

    model, _ = _load(str(MODEL))
    if quantized_from_start is not None:
        cache = [c.to_quantized(group_size=64, bits=quantized_from_start) for c in make_prompt_cache(model)]
        kwargs["prompt_cache"] = cache
    tokens = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kwargs):
        tokens.append(int(token))
        if token in (2,):  # SmolLM2's <|im_end|>
            break
    return tokens


def test_a_quantized_kv_model_batches_and_answers_like_mlx_lm(prompts: list[list[int]]) -> None:
    backend = MlxBackend()
    backend.load(str(MODEL), {"kv_bits": 8, "kv_group_size": 64})
    backend._prompt_cache_bytes = 1 << 30
    backend.start_prompt_cache()
    together = run(backend, prompts)
    # Finished sequences were kept quantized: ~1.1 bytes per KV element instead of 4.
    quantized_bytes = backend.prompt_cache_stats()["bytes"]  # type: ignore[index]
    for prompt, got in zip(prompts, together):
        assert got == native(prompt, TOKENS, quantized_from_start=8)[: len(got)]
        assert len(got) == TOKENS or got[-1] in backend.eos
    # The second ran in the batch from its first token; alone (a prefix cache hit
    # of its whole prompt) its answer is the same: both lanes quantize from the start.
    assert run(backend, prompts[1:2]) == together[1:2]
    plain = MlxBackend()
    plain.load(str(MODEL), {"prompt_cache_bytes": 1 << 30})
    plain._prompt_cache_bytes = 1 << 30
    plain.start_prompt_cache()
    assert run(plain, prompts[:1]) and run(plain, prompts[1:])
    plain_bytes = plain.prompt_cache_stats()["bytes"]  # type: ignore[index]
    assert 0 < quantized_bytes < 0.4 * plain_bytes


def test_a_lone_sequence_quantizes_at_quantized_kv_start_and_joins_a_quantized_batch(
    prompts: list[list[int]],
) -> None:
    start = len(prompts[0]) + 3
    backend = MlxBackend()
    backend.load(str(MODEL), {"kv_bits": 8, "quantized_kv_start": start})
    first = backend.insert(prompts[0], TOKENS, None)
    got: list[int] = []
    while len(got) < 5:
        got += [t for uid, t, _ in backend.step() if uid == first]
    lane = backend._solo[1]  # type: ignore[index]
    assert isinstance(lane.cache[0], QuantizedKVCache)
    assert got == native(prompts[0], TOKENS, kv_bits=8, quantized_kv_start=start)[:5]
    second = backend.insert(prompts[1], TOKENS, None)  # the lone sequence moves into the batch
    rest = {first: got, second: []}
    while len(rest[first]) < TOKENS or len(rest[second]) < TOKENS:
        results = backend.step()
        if not results:
            break
        for uid, token, _ in results:
            rest[uid].append(token)
    assert len(rest[second]) > 0 and len(rest[first]) >= 5


def test_rotating_kv_serves_past_its_size_in_both_lanes(prompts: list[list[int]]) -> None:
    from mlx_lm.models.cache import RotatingKVCache

    from mlxd_worker.engines.backend import _load

    size = len(prompts[0]) + 4  # wraps a few tokens into the answer
    backend = MlxBackend()
    backend.load(str(MODEL), {"max_kv_size": size})
    first = backend.insert(prompts[0], 12, None)
    alone: list[int] = []
    while len(alone) < 12:
        alone += [t for uid, t, _ in backend.step() if uid == first]
        if backend._solo is None:
            break
        cache = backend._solo[1].cache
        assert all(isinstance(c, RotatingKVCache) and c.max_size == size for c in cache)
    # mlx-lm's own generation over the same rotating layers (its make_prompt_cache
    # ignores max_kv_size for Llama, which makes its own caches).
    model, _ = _load(str(MODEL))
    rotating = [RotatingKVCache(max_size=size, keep=0) for _ in model.layers]
    assert alone == native(prompts[0], 12, prompt_cache=rotating)[: len(alone)]
    assert rotating[0].offset > size  # the reference did wrap
    together = run(backend, prompts, max_tokens=12)
    assert all(len(t) == 12 or t[-1] in backend.eos for t in together)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"kv_bits": 8, "kv_group_size": 64},
        # Entries of both forms: plain below quantized_kv_start, quantized past it.
        {"kv_bits": 8, "kv_group_size": 64, "quantized_kv_start": 60},
        {"max_kv_size": 256},
    ],
    ids=["full", "kv8", "kv8-from-60", "rotating"],
)
def test_every_kv_setting_finds_its_own_disk_entries_valid(
    prompts: list[list[int]], tmp_path: Path, options: dict[str, Any]
) -> None:
    """Issue 28: entries are checked against the layout the backend learns from
    the model's own caches (and tried on a copy). A genuine entry of every KV
    setting must pass: a check too strict would turn the disk tier into misses."""

    def backend() -> MlxBackend:
        b = MlxBackend()
        b.load(str(MODEL), {**options, "prompt_cache_bytes": 1 << 30, "prompt_cache_dir": str(tmp_path)})  # type: ignore[typeddict-item]
        b.start_prompt_cache()
        return b

    first = backend()
    short, long = prompts[0], prompts[1] + prompts[2]  # 45 and 87 tokens with their answers
    answers = run(first, [short]), run(first, [long])
    first.close()  # what memory holds goes to disk
    second = backend()
    for prompt, answer in zip((short, long), answers):
        uid = second.insert([*prompt, *answer[0]], 2, None)
        assert second.cached_tokens(uid) > len(prompt) - 2, options
        while not any(finish for u, _, finish in second.step() if u == uid):
            pass
    disk = second.prompt_cache_stats()["disk"]  # type: ignore[index,typeddict-item]
    assert disk["hits_total"] == 2 and disk["stale_total"] == 0, disk
    second.close()


def test_an_entry_the_model_answers_nan_on_is_dropped_and_recomputed(prompts: list[list[int]], tmp_path: Path) -> None:
    """Issue 28: an entry with the model's own layout and a valid checksum (written
    by a worker) whose values make the model's output non-finite fails its trial:
    a miss, the file deleted, the answer computed without it."""
    from mlx_lm.models.cache import make_prompt_cache

    options: dict[str, Any] = {"prompt_cache_bytes": 1 << 30, "prompt_cache_dir": str(tmp_path)}
    first = MlxBackend()
    first.load(str(MODEL), options)  # type: ignore[arg-type]
    first.start_prompt_cache()
    prompt = prompts[0]
    cache = make_prompt_cache(first._model)
    first._model(mx.array([prompt]), cache=cache)
    for layer in cache:
        layer.keys = mx.full(layer.keys.shape, float("nan"), dtype=layer.keys.dtype)
    mx.eval([layer.state for layer in cache])
    assert first.prefix is not None and first.prefix.disk is not None
    assert first.prefix.disk.write(prompt, cache) and first.prefix.disk.flush(30)
    first.close()
    second = MlxBackend()
    second.load(str(MODEL), options)  # type: ignore[arg-type]
    second.start_prompt_cache()
    assert run(second, [[*prompt, 42]], 4)[0] == native([*prompt, 42], 4)
    disk = second.prompt_cache_stats()["disk"]  # type: ignore[index,typeddict-item]
    assert disk["hits_total"] == 0 and disk["stale_total"] == 1 and disk["entries"] == 0, disk
    second.close()


def test_a_disk_tier_that_cannot_start_leaves_the_model_serving(
    prompts: list[list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_probe(self: MlxBackend, n: int) -> list[Any]:
        raise ValueError("DeepseekV4LayerCache is not one of mlx-lm's cache classes")

    monkeypatch.setattr(MlxBackend, "_probe_caches", no_probe)
    backend = MlxBackend()
    backend.load(str(MODEL), {"prompt_cache_bytes": 1 << 30, "prompt_cache_dir": str(tmp_path)})  # type: ignore[typeddict-item]
    backend.start_prompt_cache()
    assert backend.prefix is not None and backend.prefix.disk is None  # the memory tier alone
    assert run(backend, prompts[:1], 2)
