"""The prefix cache's disk tier (issue 18, item 3): entries survive a restart,
never give a wrong answer (another identity, other versions, a damaged file: a
miss, the file deleted and counted), stay under their byte limit, and are written
on the writer thread. Mechanics use real mlx-lm caches filled with random
values; one test runs the test model across a restart."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mlxd_worker.cache import disk_cache
from mlxd_worker.cache.disk_cache import DiskCache, model_identity
from mlxd_worker.cache.prefix_cache import PrefixCache, TokenTrie, held
from mlxd_worker.io.protocol import DiskCacheStats

MODEL = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "smollm2-135m"
GiB = 1 << 30


def kv(n: int, seed: int = 0, layers: int = 2, dtype: Any = None, dim: int = 8) -> list[Any]:
    """A real mlx-lm cache holding n tokens of random keys and values."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    mx.random.seed(seed)
    cache = [KVCache() for _ in range(layers)]
    for c in cache:
        k, v = mx.random.normal((1, 2, n, dim)), mx.random.normal((1, 2, n, dim))
        if dtype is not None:
            k, v = k.astype(dtype), v.astype(dtype)
        c.update_and_fetch(k, v)
    mx.eval([c.state for c in cache])
    return cache


def same(a: list[Any], b: list[Any], n: int) -> bool:
    import mlx.core as mx

    return all(
        mx.array_equal(x.keys[..., :n, :], y.keys[..., :n, :]).item()
        and mx.array_equal(x.values[..., :n, :], y.values[..., :n, :]).item()
        for x, y in zip(a, b)
    )


def tiers(directory: Path, identity: str = "model-a", mem: int = GiB, **kw: Any) -> PrefixCache:
    kw.setdefault("min_disk_tokens", 8)
    return PrefixCache(mem, DiskCache(directory, kw.pop("disk_bytes", GiB), identity, **kw))


def restart(pc: PrefixCache, directory: Path, **kw: Any) -> PrefixCache:
    assert pc.disk is not None
    pc.disk.close(10)
    return tiers(directory, **kw)


def files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*/*.safetensors"))


def disk_stats(pc: PrefixCache) -> DiskCacheStats:
    """The disk tier's counters, as the Stats frame nests them (prompt_cache.disk)."""
    disk = pc.stats().get("disk")
    assert disk is not None
    return disk


def test_an_entry_survives_a_restart_and_counts_as_a_disk_hit(tmp_path: Path) -> None:
    pc = tiers(tmp_path)
    tokens = list(range(100, 140))
    stored = kv(40)
    pc.put(tokens, stored)
    pc = restart(pc, tmp_path)
    assert disk_stats(pc)["entries"] == 1
    found = pc.take([*tokens, 1, 2, 3])
    assert found.cached == 40 and found.cache is not None and same(found.cache, stored, 40)
    stats = pc.stats()
    assert stats["lookups"]["hit_continued"] == 1 and disk_stats(pc)["hits_total"] == 1 and stats["entries"] == 1
    # Now it is in memory too: the next hit does not read the disk.
    assert pc.take([*tokens, 9]).cached == 40 and disk_stats(pc)["hits_total"] == 1


def test_the_whole_prompt_on_disk_leaves_its_last_token_to_feed(tmp_path: Path) -> None:
    pc = tiers(tmp_path)
    tokens = list(range(30))
    pc.put(tokens, kv(30))
    pc = restart(pc, tmp_path)
    found = pc.take(tokens)
    assert found.cached == 29 and found.cache is not None and held(found.cache) == 29
    # A prompt that parts from the entry midway gets the shared part, trimmed back.
    found = pc.take([*tokens[:12], 999, 998])
    assert found.cached == 12 and found.cache is not None and held(found.cache) == 12


def test_a_stale_mlx_lm_version_is_a_miss_and_the_file_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx_lm

    pc = tiers(tmp_path)
    tokens = list(range(20))
    pc.put(tokens, kv(20))
    assert pc.disk is not None and pc.disk.flush(10) and len(files(tmp_path)) == 1
    pc.disk.close(10)
    monkeypatch.setattr(mlx_lm, "__version__", "0.0.1")
    pc = tiers(tmp_path)
    assert pc.take([*tokens, 5]).cache is None
    stats = disk_stats(pc)
    assert stats["stale_total"] == 1 and stats["entries"] == 0 and stats["hits_total"] == 0
    assert files(tmp_path) == []


def test_another_identity_never_sees_the_entries(tmp_path: Path) -> None:
    pc = restart(tiers(tmp_path, "model-a"), tmp_path, identity="model-b")
    pc.put(list(range(50, 70)), kv(20))  # model-b's own entry
    pc = restart(pc, tmp_path, identity="model-c")
    assert disk_stats(pc)["entries"] == 0 and pc.take([*range(50, 70), 1]).cache is None
    assert disk_stats(pc)["stale_total"] == 0  # nothing of model-b's was touched
    pc = restart(pc, tmp_path, identity="model-b")
    assert pc.take([*range(50, 70), 1]).cached == 20


def test_a_replaced_model_reclaims_its_old_identitys_directory(tmp_path: Path) -> None:
    """A re-import changes a model's identity but not its owner (directory and KV
    settings): the old entries can never hit again, so the next cache removes them.
    Other owners' directories stay."""
    kept = DiskCache(tmp_path, GiB, "model-b|kv", owner="/models/b|kv")
    other_kv = DiskCache(tmp_path, GiB, "model-a|kv8", owner="/models/a|kv8")
    old = DiskCache(tmp_path, GiB, "model-a|kv", owner="/models/a|kv", min_disk_tokens=8)
    for cache, seed in ((kept, 1), (other_kv, 2), (old, 3)):
        assert cache.write(list(range(50, 70)), kv(20, seed=seed))
        cache.close(10)
    assert len(files(tmp_path)) == 3
    new = DiskCache(tmp_path, GiB, "model-a-reimported|kv", owner="/models/a|kv")
    assert new.reclaimed == 1 and not old.dir.exists()
    assert kept.dir.exists() and other_kv.dir.exists() and len(files(tmp_path)) == 2
    assert new.lookup(list(range(50, 75))).value is None  # the old entry is not the new model's
    new.close(10)
    # The same identity again (a restart) keeps its own entries.
    again = DiskCache(tmp_path, GiB, "model-b|kv", owner="/models/b|kv")
    assert again.reclaimed == 0 and again.stats(hits_total=0)["entries"] == 1
    again.close(10)


def test_a_truncated_or_garbage_file_is_a_miss_not_a_crash(tmp_path: Path) -> None:
    pc = tiers(tmp_path)
    pc.put(list(range(20)), kv(20, seed=1))
    pc.put(list(range(100, 120)), kv(20, seed=2))
    assert pc.disk is not None and pc.disk.flush(10)
    pc.disk.close(10)
    one, two = files(tmp_path)
    one.write_bytes(one.read_bytes()[: one.stat().st_size // 2])  # a half-written file
    two.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (one.parent / ("0" * 32 + ".safetensors")).write_bytes(b"\xff" * 8)  # a header longer than the file
    pc = tiers(tmp_path)  # a fresh memory tier: every hit would come from disk
    assert pc.take([*range(20), 7]).cache is None and pc.take([*range(100, 120), 7]).cache is None
    assert disk_stats(pc)["stale_total"] == 3 and disk_stats(pc)["entries"] == 0
    assert files(tmp_path) == []


def test_a_file_damaged_after_the_index_was_built_is_a_miss(tmp_path: Path) -> None:
    pc = restart(tiers(tmp_path), tmp_path)
    pc.put(list(range(20)), kv(20))
    pc = restart(pc, tmp_path)
    (path,) = files(tmp_path)
    path.write_bytes(path.read_bytes()[:-16])
    assert pc.take([*range(20), 7]).cache is None
    assert disk_stats(pc)["stale_total"] == 1 and files(tmp_path) == []


def test_a_cache_holding_other_tokens_than_its_header_says_is_a_miss(tmp_path: Path) -> None:
    dc = DiskCache(tmp_path, GiB, "model-a")
    tokens = tuple(range(20))
    job = dc._prepare(tokens[:19], kv(19))  # 19 tokens of KV...
    job.metadata["tokens"] = disk_cache._encode_tokens(tokens)  # ...claiming 20
    disk_cache._write_safetensors(dc._path(disk_cache._key(tokens)), job.tensors, job.metadata)
    dc.close()
    pc = tiers(tmp_path)
    assert disk_stats(pc)["entries"] == 1  # the header is consistent...
    assert pc.take([*tokens, 1]).cache is None  # ...but the cache is not what it claims
    assert disk_stats(pc)["stale_total"] == 1 and files(tmp_path) == []


def test_the_byte_limit_deletes_the_least_recently_used(tmp_path: Path) -> None:
    pc = tiers(tmp_path)
    pc.put(list(range(20)), kv(20))
    assert pc.disk is not None and pc.disk.flush(10)
    size = disk_stats(pc)["bytes"]
    pc = restart(pc, tmp_path, disk_bytes=int(size * 2.5))  # room for two
    a, b, c = list(range(20)), list(range(200, 220)), list(range(300, 320))
    pc.put(b, kv(20))
    assert pc.disk is not None and pc.disk.flush(10)
    os.utime(files(tmp_path)[0], (1, 1))  # whichever it is, make the times unambiguous
    pc = restart(pc, tmp_path, disk_bytes=int(size * 2.5))
    assert pc.take([*a, 1]).cached == 20  # a hit touches `a`: `b` is now the oldest
    pc.put(c, kv(20))
    assert pc.disk is not None and pc.disk.flush(10)
    stats = disk_stats(pc)
    assert stats["entries"] == 2 and stats["bytes"] <= size * 2.5 and len(files(tmp_path)) == 2
    fresh = restart(pc, tmp_path, mem=1)  # no memory tier to speak of: disk only
    assert fresh.take([*b, 1]).cache is None
    assert fresh.take([*a, 1]).cached == 20 and fresh.take([*c, 1]).cached == 20


def test_a_smaller_limit_at_start_deletes_the_oldest(tmp_path: Path) -> None:
    pc = tiers(tmp_path)
    for i in range(3):
        pc.put(list(range(100 * i, 100 * i + 20)), kv(20, seed=i))
        assert pc.disk is not None and pc.disk.flush(10)
    size = disk_stats(pc)["bytes"] // 3
    for i, path in enumerate(sorted(files(tmp_path), key=lambda p: p.stat().st_mtime)):
        os.utime(path, (1000 + i, 1000 + i))
    pc = restart(pc, tmp_path, disk_bytes=size * 2)
    assert disk_stats(pc)["entries"] == 2 and len(files(tmp_path)) == 2
    assert pc.take([*range(20), 1]).cache is None and pc.take([*range(200, 220), 1]).cached == 20


def test_writes_happen_on_the_writer_thread_and_flush_drains_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    writers: list[str] = []
    real = disk_cache._write_safetensors

    def slow(*args: Any) -> None:
        writers.append(threading.current_thread().name)
        gate.wait(10)
        real(*args)

    monkeypatch.setattr(disk_cache, "_write_safetensors", slow)
    pc = tiers(tmp_path, max_pending=1)
    assert pc.disk is not None
    started = time.monotonic()
    pc.put(list(range(20)), kv(20, seed=1))  # the writer takes it and blocks
    pc.put(list(range(100, 120)), kv(20, seed=2))  # queued
    pc.put(list(range(200, 220)), kv(20, seed=3))  # no room: dropped
    assert time.monotonic() - started < 5
    assert not pc.disk.flush(0.2) and disk_stats(pc)["writes_total"] == 0
    gate.set()
    assert pc.disk.flush(10)
    stats = disk_stats(pc)
    assert stats["writes_total"] == 2 and stats["dropped_total"] == 1 and stats["entries"] == 2
    assert set(writers) == {"mlxd-disk-cache"}


def test_eviction_from_memory_spills_to_disk(tmp_path: Path) -> None:
    one = kv(20)
    size = sum(c.nbytes for c in one)
    pc = tiers(tmp_path, mem=int(size * 1.5), min_disk_tokens=1000)  # no write-through
    assert pc.disk is not None
    pc.put(list(range(20)), one)
    assert pc.disk.flush(10) and disk_stats(pc)["writes_total"] == 0
    pc.put(list(range(500, 520)), kv(20, seed=5))  # evicts the first: it spills
    assert pc.disk.flush(10)
    stats = pc.stats()
    assert stats["entries"] == 1 and disk_stats(pc)["writes_total"] == 1 and disk_stats(pc)["entries"] == 1
    found = pc.take([*range(20), 3])
    assert found.cached == 20 and found.cache is not None and same(found.cache, one, 20)
    assert disk_stats(pc)["hits_total"] == 1


def test_close_spills_what_memory_holds(tmp_path: Path) -> None:
    pc = tiers(tmp_path, min_disk_tokens=1000)
    pc.put(list(range(20)), kv(20))
    pc.close(10)
    assert tiers(tmp_path).take([*range(20), 1]).cached == 20


def test_covered_prefixes_are_not_written_and_extensions_replace_them(tmp_path: Path) -> None:
    pc = tiers(tmp_path)
    assert pc.disk is not None
    long = kv(40)
    pc.put(list(range(40)), long)
    assert pc.disk.flush(10)
    short = kv(30)
    pc.put(list(range(30)), short)  # a prefix of what the disk has: nothing to write
    assert pc.disk.flush(10) and disk_stats(pc)["writes_total"] == 1
    pc.put(list(range(60)), kv(60))  # an extension: written, and the 40 goes
    assert pc.disk.flush(10)
    stats = disk_stats(pc)
    assert stats["writes_total"] == 2 and stats["entries"] == 1 and len(files(tmp_path)) == 1


def test_a_trimmed_cache_is_written_as_the_tokens_it_holds(tmp_path: Path) -> None:
    from mlx_lm.models.cache import trim_prompt_cache

    cache = kv(300)  # a 512-token buffer
    trim_prompt_cache(cache, 100)
    pc = tiers(tmp_path)
    pc.put(list(range(200)), cache)
    pc = restart(pc, tmp_path)
    # 2 layers x (keys + values) x 2 heads x 8 dims x 4 bytes per token, and a header.
    assert 200 * 256 < disk_stats(pc)["bytes"] < 200 * 256 + 16_384
    found = pc.take([*range(200), 1])
    assert found.cached == 200 and found.cache is not None and same(found.cache, cache, 200)


def test_quantized_and_bfloat16_caches_round_trip(tmp_path: Path) -> None:
    import mlx.core as mx

    quantized = [c.to_quantized(group_size=32, bits=4) for c in kv(24, seed=3, dim=64)]
    half = kv(24, seed=4, dtype=mx.bfloat16)
    pc = tiers(tmp_path)
    pc.put(list(range(24)), quantized)
    pc.put(list(range(100, 124)), half)
    pc = restart(pc, tmp_path)
    q = pc.take([*range(24), 1]).cache
    h = pc.take([*range(100, 124), 1]).cache
    assert q is not None and h is not None and disk_stats(pc)["hits_total"] == 2
    assert type(q[0]).__name__ == "QuantizedKVCache" and h[0].keys.dtype == mx.bfloat16
    for x, y in zip(q, quantized):
        assert all(mx.array_equal(a[..., :24, :], b[..., :24, :]).item() for a, b in zip(x.keys, y.keys))
    assert same(h, half, 24)


def test_worker_classes_go_through_to_disk_and_from_disk(tmp_path: Path) -> None:
    from mlx_lm.models.cache import KVCache

    class Ours(KVCache):
        pass

    def ours(n: int) -> list[Any]:
        out = []
        for c in kv(n):
            o = Ours()
            o.keys, o.values, o.offset = c.keys, c.values, c.offset
            out.append(o)
        return out

    def to_disk(cache: list[Any]) -> list[Any]:
        return [KVCache.from_state(c.state) for c in cache]

    def from_disk(cache: list[Any]) -> list[Any]:
        return [Ours.from_state(c.state) for c in cache]

    plain = tiers(tmp_path)
    plain.put(list(range(20)), ours(20))  # mlx-lm could not load it back: not written
    assert plain.disk is not None and plain.disk.flush(10) and disk_stats(plain)["dropped_total"] == 1
    pc = restart(plain, tmp_path, to_disk=to_disk, from_disk=from_disk)
    pc.put(list(range(20)), ours(20))
    pc = restart(pc, tmp_path, to_disk=to_disk, from_disk=from_disk)
    found = pc.take([*range(20), 1])
    assert found.cache is not None and type(found.cache[0]) is Ours


def test_the_token_trie_finds_what_a_scan_finds() -> None:
    rng = random.Random(7)
    trie: TokenTrie[tuple[int, ...]] = TokenTrie()
    stored: set[tuple[int, ...]] = set()
    for _ in range(400):
        key = tuple(rng.randrange(3) for _ in range(rng.randrange(2, 9)))
        if key in stored and rng.random() < 0.5:
            assert trie.remove(key) == key
            stored.discard(key)
        else:
            trie.add(key, key)
            stored.add(key)
        prompt = tuple(rng.randrange(3) for _ in range(rng.randrange(2, 9)))
        trimmable = rng.random() < 0.5

        def accept(_: tuple[int, ...], t: bool = trimmable) -> bool:
            return t

        got = trie.best(prompt, accept)
        want = 0
        for s in stored:
            common = next((i for i, (a, b) in enumerate(zip(s, prompt)) if a != b), min(len(s), len(prompt)))
            if common == len(s) < len(prompt):
                want = max(want, len(s))
            elif trimmable:
                want = max(want, min(common, len(prompt) - 1))
        assert got.usable == want, (sorted(stored), prompt, got)
    for key in list(stored):
        assert trie.remove(key) == key
    assert trie.remove((0, 1)) is None and not trie._root.edges


def test_model_identity_changes_with_the_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}" + b"\0" * 64)
    first = model_identity(str(tmp_path))
    assert model_identity(str(tmp_path)) == first
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert model_identity(str(tmp_path)) != first


# --- the test model across a restart ----------------------------------------------


@pytest.fixture(scope="module")
def model() -> Any:
    if not (MODEL / "config.json").exists():
        pytest.skip("the test model is not imported (scripts/setup)")
    import mlx_lm

    return mlx_lm.load(str(MODEL))


def test_the_model_continues_from_a_cache_loaded_after_a_restart(model: Any, tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    net, tokenizer = model
    text = "The disk tier keeps the KV cache of a long system prompt across restarts of the worker. " * 8
    prompt = tokenizer.encode(text)
    prefix = prompt[: len(prompt) - 7]
    identity = model_identity(str(MODEL)) + "/kv=full"

    cache = make_prompt_cache(net)
    net(mx.array(prefix)[None], cache=cache)
    mx.eval([c.state for c in cache])
    pc = PrefixCache(GiB, DiskCache(tmp_path, GiB, identity, min_disk_tokens=16))
    pc.put(prefix, cache)
    assert pc.disk is not None
    pc.disk.close(30)
    del pc, cache

    pc = PrefixCache(GiB, DiskCache(tmp_path, GiB, identity))  # the restart
    found = pc.take(prompt)
    assert found.cache is not None and found.cached == len(prefix)
    assert disk_stats(pc)["hits_total"] == 1
    continued = net(mx.array(prompt[found.cached :])[None], cache=found.cache)[0, -1]
    full = net(mx.array(prompt)[None], cache=make_prompt_cache(net))[0, -1]
    assert mx.allclose(continued, full, atol=1e-3, rtol=1e-3).item()
    assert mx.argmax(continued).item() == mx.argmax(full).item()


# --- entries checked against the model's own cache (issue 28) --------------------


def checked(directory: Path, **kw: Any) -> PrefixCache:
    """Tiers that know the model's cache: two layers of (1, 2, n, 8) float32 KV."""
    return tiers(directory, probe=lambda n: [kv(n)], **kw)


def rewrite(path: Path, header_change: Any = None, payload_change: Any = None) -> None:
    """Rewrites a file's header (a function of its JSON) or payload (of its bytes),
    keeping its name: a hostile or damaged file that still says what it belongs to."""
    import json
    import struct

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, payload = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    if header_change is not None:
        header_change(header)
    if payload_change is not None:
        payload = payload_change(payload)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def set_shapes(shape: list[int]) -> Any:
    def change(header: dict[str, Any]) -> None:
        for name, entry in header.items():
            if name != "__metadata__":
                entry["shape"] = shape

    return change


def set_dtype(header: dict[str, Any]) -> None:
    for name, entry in header.items():
        if name != "__metadata__":
            entry["dtype"] = "I32"  # the same bytes read as integers


def set_class(header: dict[str, Any]) -> None:
    import json

    layers = json.loads(header["__metadata__"]["layers"])
    layers[1]["class"] = "ChunkedKVCache"
    header["__metadata__"]["layers"] = json.dumps(layers)


def drop_checksum(header: dict[str, Any]) -> None:
    del header["__metadata__"]["checksum"]


HOSTILE = {
    # The same bytes under other shapes (heads and head dim swapped): its size and
    # checksum still agree; a step would fail in concatenate.
    "other shapes": (set_shapes([1, 8, 20, 2]), None),
    "other dtype": (set_dtype, None),
    "other layer class": (set_class, None),
    "zeroed arrays": (None, lambda payload: bytes(len(payload))),
    "random arrays": (None, lambda payload: random.Random(7).randbytes(len(payload))),
    "one flipped byte": (None, lambda payload: payload[:100] + bytes([payload[100] ^ 1]) + payload[101:]),
    "no checksum": (drop_checksum, None),
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_file_with_the_right_identity_is_a_miss_and_goes(tmp_path: Path, kind: str) -> None:
    pc = checked(tmp_path)
    tokens = list(range(20))
    pc.put(tokens, kv(20, seed=3))
    pc = restart(pc, tmp_path, probe=lambda n: [kv(n)])  # the entry is indexed, memory is empty
    (path,) = files(tmp_path)
    rewrite(path, *HOSTILE[kind])
    assert pc.take([*tokens, 1]).cache is None
    assert disk_stats(pc)["stale_total"] == 1 and files(tmp_path) == []
    # Found at start, a bad header is dropped there (the scan reads no arrays: a
    # bad payload goes at its first lookup).
    pc.put(tokens, kv(20, seed=3))
    pc = restart(pc, tmp_path)
    (path,) = files(tmp_path)
    rewrite(path, *HOSTILE[kind])
    pc = checked(tmp_path)
    header_only = HOSTILE[kind][1] is None
    assert disk_stats(pc)["entries"] == (0 if header_only else 1)
    assert pc.take([*tokens, 1]).cache is None
    assert disk_stats(pc)["stale_total"] == 1 and files(tmp_path) == []


def test_an_intact_file_passes_every_check_and_loads_what_was_stored(tmp_path: Path) -> None:
    pc = checked(tmp_path)
    stored = kv(20, seed=3)
    pc.put(list(range(20)), stored)
    pc = restart(pc, tmp_path, probe=lambda n: [kv(n)])
    found = pc.take([*range(20), 1])
    assert found.cache is not None and found.cached == 20 and same(found.cache, stored, 20)
    assert disk_stats(pc)["stale_total"] == 0


def test_an_entry_of_another_model_shape_is_dropped_at_start(tmp_path: Path) -> None:
    # Written by the same identity with other heads: a checksum cannot tell, the layout can.
    pc = tiers(tmp_path)
    pc.put(list(range(20)), kv(20, dim=16))
    pc.put(list(range(100, 120)), kv(20, layers=3))
    pc = restart(pc, tmp_path, probe=lambda n: [kv(n)])
    assert disk_stats(pc)["entries"] == 0 and disk_stats(pc)["stale_total"] == 2 and files(tmp_path) == []


def test_fewer_tokens_than_the_header_says_is_dropped_at_start(tmp_path: Path) -> None:
    dc = DiskCache(tmp_path, GiB, "model-a")
    tokens = tuple(range(449))
    job = dc._prepare(tokens[:448], kv(448))  # 448 tokens of KV...
    job.metadata["tokens"] = disk_cache._encode_tokens(tokens)  # ...claiming 449
    disk_cache._write_safetensors(dc._path(disk_cache._key(tokens)), job.tensors, job.metadata)
    dc.close()
    pc = checked(tmp_path)
    assert disk_stats(pc)["entries"] == 0 and disk_stats(pc)["stale_total"] == 1 and files(tmp_path) == []


def test_an_entry_the_model_fails_on_leaves_both_tiers_and_the_next_lookup_misses(tmp_path: Path) -> None:
    pc = checked(tmp_path)
    tokens = list(range(20))
    pc.put(tokens, kv(20))
    tried: list[tuple[int, ...]] = []

    def accept(cache: list[Any], held_tokens: tuple[int, ...]) -> None:
        tried.append(held_tokens)
        raise ValueError("[concatenate] shapes do not match")

    pc = restart(pc, tmp_path, probe=lambda n: [kv(n)], accept=accept)
    assert pc.take([*tokens, 1]).cache is None
    assert tried == [tuple(tokens)]
    stats = pc.stats()
    assert stats["entries"] == 0 and disk_stats(pc)["stale_total"] == 1 and files(tmp_path) == []
    assert pc.take([*tokens, 1]).cache is None and tried == [tuple(tokens)]  # gone: not tried again
    # The entry did not load: its tokens were never in memory, nothing remembers them.
    assert stats["lookups"]["miss_cold"] == 1 and pc.stats()["lookups"]["miss_cold"] == 2


def test_the_cache_directory_and_its_files_are_private(tmp_path: Path) -> None:
    store = tmp_path / "cache"  # created by the cache: private
    pc = tiers(store)
    pc.put(list(range(20)), kv(20))
    assert pc.disk is not None and pc.disk.flush(10)
    modes = {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in [store, *store.rglob("*")]}
    assert modes and all(m == (0o700 if (tmp_path / p).is_dir() else 0o600) for p, m in modes.items()), modes
    pc.disk.close(10)
    # A directory the preset names that exists already (shared, or not ours) keeps
    # its mode; the cache's own directory in it is private all the same.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    dc = DiskCache(shared, GiB, "model-a")
    assert shared.stat().st_mode & 0o7777 == 0o1777 and dc.dir.stat().st_mode & 0o777 == 0o700
    dc.close(10)


def test_a_prompt_parting_from_an_uncuttable_entry_on_disk_is_a_diverged_miss(tmp_path: Path) -> None:
    """Where reuse fails is told from the disk tier too, not only from memory."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache

    pc = tiers(tmp_path)
    tokens = list(range(100, 140))
    recurrent = ArraysCache(1)  # a hybrid model's state: it cannot be cut back
    recurrent[0] = mx.ones((1, 4, 8))
    pc.put(tokens, [*kv(40, layers=1), recurrent])
    pc = restart(pc, tmp_path)  # only the disk holds it now
    assert pc.take([*tokens, 1]).cached == 40  # going on from it is a hit
    pc = restart(pc, tmp_path)
    assert pc.take([*tokens[:20], 7, 8]).cache is None
    assert pc.take(list(range(500, 540))).cache is None
    lookups = pc.stats()["lookups"]
    assert (lookups["miss_diverged"], lookups["miss_cold"]) == (1, 1)
