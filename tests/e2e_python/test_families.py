"""The family matrix (issue 26): tiny random-weight models of mlx-lm's families,
built with mlx-lm's own classes (families.py), each served through mlxd and
compared token for token with mlx-lm's own greedy generation: one request, three
at once (the batch), the same prompt again (the prefix cache), and a continuation
of the conversation. Hybrid linear-attention, sliding-window, MLA and MoE models
go through the same lanes and caches as the Llama the rest of the suite uses.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from families import (
    DISK,
    DRAFT_POLICY,
    DRAFTED,
    FAMILIES,
    KV8,
    KV8_REFUSED,
    MAX_KV_SIZE,
    ROTATING,
    cache_kinds,
    family_dir,
    greedy_text,
)
from families import tokenizer as family_tokenizer

from conftest import MLXD, control

PROMPT = "The quick brown fox"
MAX_TOKENS = 8


def complete(url: str, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def native_text(model_dir: Path, prompt: str, max_tokens: int = MAX_TOKENS, **cache: Any) -> str:
    """mlx-lm's greedy answer to a raw prompt."""
    return greedy_text(model_dir, list(family_tokenizer(model_dir).encode(prompt)), max_tokens, **cache)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_answers_as_mlx_lm_does(daemon_url: str, family: str) -> None:
    model = f"family-{family}"
    model_dir = family_dir(family)
    try:
        expected = native_text(model_dir, PROMPT)
        first = complete(daemon_url, model, PROMPT)
        assert first["choices"][0]["text"] == expected, f"{family}: one request"

        # What the worker found, as /v1/models reports it: the cache layers mlx-lm
        # builds, and the prefix cache limited (with the reason) where a layer
        # cannot be cut to a shorter prefix.
        info = next(m for m in httpx.get(f"{daemon_url}/v1/models").json()["data"] if m["id"] == model)["mlxd"]
        assert info["cache_kinds"] == cache_kinds(model_dir), info
        limited = [limit["reason"] for limit in info["limits"] if limit["feature"] == "prefix_cache"]
        rewinds = set(info["cache_kinds"]) <= {"KVCache", "QuantizedKVCache"}
        assert bool(limited) != rewinds, info
        ps = subprocess.run(
            [str(MLXD), "--port", daemon_url.rsplit(":", 1)[1], "ps"], capture_output=True, text=True, check=True
        ).stdout
        assert f"caches {' + '.join(info['cache_kinds'])}" in ps, ps
        assert all(reason in ps for reason in limited), ps

        # Three at once go through the batch.
        prompts = [PROMPT, PROMPT + " jumps", "Once upon a time"]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda p: complete(daemon_url, model, p), prompts))
        for p, answer in zip(prompts, answers):
            assert answer["choices"][0]["text"] == native_text(model_dir, p), f"{family}: batched {p!r}"

        # The same prompt again, and the conversation continued: whatever the
        # prefix cache reuses (or, for a cache it cannot cut, does not), the text
        # is mlx-lm's.
        again = complete(daemon_url, model, PROMPT)
        assert again["choices"][0]["text"] == expected, f"{family}: the prompt again"
        follow = PROMPT + expected + "\nand then"
        continued = complete(daemon_url, model, follow)
        assert continued["choices"][0]["text"] == native_text(model_dir, follow), f"{family}: continued"
    finally:
        with control() as c:
            c.post("/admin/stop", json={"model": model})


@pytest.mark.parametrize("family", sorted(DRAFTED))
def test_a_disagreeing_draft_never_changes_the_text(daemon_url: str, family: str) -> None:
    model = f"family-{family}-drafted"
    model_dir = family_dir(family)
    try:
        long_answer = 24  # past gemma3_text's 16-token window
        answer = complete(daemon_url, model, PROMPT, long_answer)
        assert answer["choices"][0]["text"] == native_text(model_dir, PROMPT, long_answer), family
        models = httpx.get(f"{daemon_url}/v1/models").json()["data"]
        spec = next(m for m in models if m["id"] == model)["mlxd"]["speculative"]
        assert spec["active"] is DRAFTED[family], spec
        if DRAFTED[family]:
            drafted = answer["usage"]["mlxd"]
            assert drafted["draft_tokens"] > 0 and drafted["rejected_tokens"] > 0, drafted
        else:
            assert "cannot take back rejected draft tokens" in spec["reason"], spec
    finally:
        with control() as c:
            c.post("/admin/stop", json={"model": model})


@pytest.mark.parametrize(("family", "mode"), DRAFT_POLICY)
def test_the_draft_policy_calibrates_and_refuses_mixture_of_experts_in_auto(
    daemon_url: str, family: str, mode: str
) -> None:
    model = f"family-{family}-draft-{mode}"
    model_dir = family_dir(family)
    try:
        answer = complete(daemon_url, model, PROMPT, 16)
        assert answer["choices"][0]["text"] == native_text(model_dir, PROMPT, 16), model
        worker = next(w for w in control().get("/admin/ps").json()["workers"] if w["model"] == model)
        spec = worker["stats"]["speculative"]
        print(f"{model}: {spec}")
        moe = family == "qwen3_moe"
        if moe and mode == "auto":
            # Refused by policy: the draft is loaded, never used, and says why.
            assert not spec["active"] and "mixture-of-experts" in spec["reason"], spec
            assert "draft_tokens" not in answer["usage"].get("mlxd", {}) or answer["usage"]["mlxd"]["draft_tokens"] == 0
        elif mode == "on":
            assert spec["active"] and answer["usage"]["mlxd"]["draft_tokens"] > 0, (spec, answer["usage"])
        else:
            # auto measured both lanes at load, on this machine, and decided from them.
            assert spec["plain_tps"] > 0 and spec["spec_tps"] > 0, spec
            assert spec["active"] or "probing again" in spec["reason"], spec
        ps = subprocess.run(
            [str(MLXD), "--port", daemon_url.rsplit(":", 1)[1], "ps"], capture_output=True, text=True, check=True
        ).stdout
        assert spec["reason"].split(";")[0] in ps, ps
    finally:
        with control() as c:
            c.post("/admin/stop", json={"model": model})


@pytest.mark.parametrize("family", sorted(KV8_REFUSED))
def test_kv_bits_is_refused_at_load_where_the_family_cannot_use_it(daemon_url: str, family: str) -> None:
    with control() as c:
        r = c.post("/admin/start", json={"model": f"family-{family}-kv8"})
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "kv_bits cannot quantize" in message and KV8_REFUSED[family] in message, message


@pytest.mark.parametrize("family", DISK)
def test_the_disk_tier_survives_a_restart_and_keeps_the_text(daemon_url: str, family: str) -> None:
    model = f"family-{family}-disk"
    model_dir = family_dir(family)
    try:
        first = complete(daemon_url, model, PROMPT)
        expected = native_text(model_dir, PROMPT)
        assert first["choices"][0]["text"] == expected, family
        # A clean restart writes what the cache holds; the next worker reads it.
        with control() as c:
            r = c.post("/admin/restart", json={"model": model})
        assert r.status_code == 200, r.text
        follow = PROMPT + expected + "\nand then"
        continued = complete(daemon_url, model, follow)
        assert continued["choices"][0]["text"] == native_text(model_dir, follow), family
        # The continuation starts with the first answer's sequence: the new worker
        # found it on disk (its memory started empty), whatever the layer kinds.
        assert continued["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, continued["usage"]
        series = f'mlxd_prompt_cache_disk_hits_total{{model="{model}"}}'
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # Stats reach the daemon every second
            hits = [line for line in httpx.get(f"{daemon_url}/metrics").text.splitlines() if line.startswith(series)]
            if hits and float(hits[0].rsplit(" ", 1)[1]) >= 1:
                break
            time.sleep(0.25)
        else:
            raise AssertionError(f"no disk hit counted for {model}")
    finally:
        with control() as c:
            c.post("/admin/stop", json={"model": model})


def batched(url: str, model: str, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: complete(url, model, p, max_tokens), prompts))
    return [a["choices"][0]["text"] for a in answers]


@pytest.mark.parametrize("family", KV8)
def test_kv_bits_8_answers_as_mlx_lm_quantized_alone_and_batched(daemon_url: str, family: str) -> None:
    model = f"family-{family}-kv8q"
    model_dir = family_dir(family, wide=True)
    prompts = [PROMPT, PROMPT + " jumps", "Once upon a time"]
    try:
        expected = [native_text(model_dir, p, kv_bits=8) for p in prompts]
        alone = complete(daemon_url, model, PROMPT)["choices"][0]["text"]
        assert alone == expected[0], f"{family}: kv8 alone"
        # In company the answers are the lone ones: both lanes quantize from the first token.
        assert batched(daemon_url, model, prompts) == expected, f"{family}: kv8 batched"
        info = next(m for m in httpx.get(f"{daemon_url}/v1/models").json()["data"] if m["id"] == model)["mlxd"]
        assert "QuantizedKVCache" in info["cache_kinds"], info
        partial = [limit["reason"] for limit in info["limits"] if limit["feature"] == "kv_bits"]
        if set(cache_kinds(model_dir)) == {"KVCache"}:
            assert not partial, info
        else:  # a sliding window or a recurrent state stays at full precision, and says so
            assert partial and "stay at full precision" in partial[0], info
    finally:
        with control() as c:
            c.post("/admin/stop", json={"model": model})


@pytest.mark.parametrize("family", ROTATING)
def test_a_rotating_cache_past_its_size_answers_as_mlx_lm(daemon_url: str, family: str) -> None:
    model = f"family-{family}-rotating"
    model_dir = family_dir(family)
    # Prompts longer than the cache (in SmolLM2 tokens), so that it rotates in the
    # prompt and in the answer; then the first again (a prefix cache hit, or not).
    long = " ".join(f"word{i}" for i in range(MAX_KV_SIZE // 2))
    prompts = [long, long + " and more", "Once upon a time " + long]
    try:
        expected = [native_text(model_dir, p, max_kv_size=MAX_KV_SIZE) for p in prompts]
        assert complete(daemon_url, model, prompts[0])["choices"][0]["text"] == expected[0], family
        assert batched(daemon_url, model, prompts) == expected, f"{family}: rotating, batched"
        again = complete(daemon_url, model, prompts[0])
        assert again["choices"][0]["text"] == expected[0], f"{family}: rotating, again"
        assert again["usage"]["prompt_tokens"] > MAX_KV_SIZE, again["usage"]
    finally:
        with control() as c:
            c.post("/admin/stop", json={"model": model})
