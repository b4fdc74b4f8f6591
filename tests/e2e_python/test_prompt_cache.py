"""The prefix cache with the real model: a request sharing a long prefix with an
earlier one prefills only its new tokens and answers as it would without the
cache; concurrent requests sharing a system prompt all hit; the counts reach
every dialect and /metrics."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import struct
import time
import uuid
from pathlib import Path

import anthropic
import httpx
import pytest
from openai import OpenAI

from conftest import control, models_dir

MODEL = "smollm2-135m"
REFERENCE = "smollm2-135m-nocache"
# The system prompt is ~280 tokens (a long entry: written through to disk at 256):
# a hit reuses more than SHARED of them.
SHARED = 240
PARAGRAPH = (
    "The museum opens at nine and closes at six. Tickets are sold at the east entrance, "
    "guided tours start every hour, and the cafe on the second floor serves lunch until three. "
)


def system_prompt() -> str:
    # A fresh nonce first: no earlier test in the session shares this prefix.
    return f"[{uuid.uuid4()}] You answer questions about the museum. " + PARAGRAPH * 6


def ask(client: OpenAI, model: str, system: str, question: str, history: list | None = None):
    messages = [{"role": "system", "content": system}, *(history or []), {"role": "user", "content": question}]
    return client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)


def cached(resp) -> int:
    details = resp.usage.prompt_tokens_details
    return (details.cached_tokens or 0) if details is not None else 0


def test_a_shared_prefix_is_not_prefilled_again_and_answers_the_same(oai: OpenAI) -> None:
    system = system_prompt()
    first = ask(oai, MODEL, system, "When does it open?")
    assert cached(first) < 10  # at most the template's opening, shared with anything
    second = ask(oai, MODEL, system, "Where are tickets sold?")
    # Everything but the new question came from the cache.
    assert second.usage is not None and first.usage is not None
    assert SHARED < cached(second) < second.usage.prompt_tokens
    assert second.usage.prompt_tokens - cached(second) < 40
    reference = ask(oai, REFERENCE, system, "Where are tickets sold?")
    assert cached(reference) == 0
    assert second.choices[0].message.content == reference.choices[0].message.content
    # The next agent turn carries the first answer: its prefix is cached further.
    earlier = [
        {"role": "user", "content": "When does it open?"},
        {"role": "assistant", "content": first.choices[0].message.content},
    ]
    turn = ask(oai, MODEL, system, "And when does the cafe close?", earlier)
    assert cached(turn) >= cached(second)
    reference_turn = ask(oai, REFERENCE, system, "And when does the cafe close?", earlier)
    assert turn.choices[0].message.content == reference_turn.choices[0].message.content


def test_concurrent_requests_sharing_a_system_prompt_all_hit(oai: OpenAI, daemon_url: str) -> None:
    system = system_prompt()
    ask(oai, MODEL, system, "Is there a cafe?")
    questions = ["When does it close?", "How often are tours?", "Where is the cafe?"]
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(lambda q: ask(oai, MODEL, system, q), questions))
    assert all(cached(a) > SHARED for a in answers), [cached(a) for a in answers]
    for q, a in zip(questions, answers):
        assert a.choices[0].message.content == ask(oai, REFERENCE, system, q).choices[0].message.content
    metrics = httpx.get(f"{daemon_url}/metrics").text
    hits = {
        line.split('reason="')[1].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("mlxd_prompt_cache_lookups_total") and 'result="hit"' in line and f'model="{MODEL}"' in line
    }
    # The three questions part from the first conversation after the shared system prompt.
    assert hits.get("diverged", 0) >= 3 and sum(hits.values()) >= 4, hits


def test_anthropic_reports_cache_reads(daemon_url: str) -> None:
    claude = anthropic.Anthropic(base_url=daemon_url, api_key="unused", max_retries=0)
    system = system_prompt()
    usages = [
        claude.messages.create(
            model=MODEL, max_tokens=4, system=system, messages=[{"role": "user", "content": q}]
        ).usage
        for q in ("When does it open?", "Where are tickets sold?")
    ]
    assert (usages[0].cache_read_input_tokens or 0) < 10
    assert (usages[1].cache_read_input_tokens or 0) > SHARED
    assert usages[1].input_tokens < 40


def test_a_killed_worker_finds_its_prefix_cache_on_disk(oai: OpenAI, session_presets: Path) -> None:
    model = "smollm2-135m-disk"
    store = session_presets.parent / "prompt-cache"
    system = system_prompt()
    first = ask(oai, model, system, "When does it open?")
    assert cached(first) < 10
    # Written through off the engine thread: wait for the entry's file.
    deadline = time.monotonic() + 60
    while not list(store.rglob("*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(store.rglob("*.safetensors")), "no entry reached the disk"
    # Its directory names its owner (the model's directory and KV settings), so
    # that a re-imported model's worker can reclaim it.
    owners = [p.read_text().split("|")[0] for p in store.glob("*/owner")]
    assert owners == [os.path.realpath(models_dir() / "smollm2-135m")], owners
    worker = next(w for w in control().get("/admin/ps").json()["workers"] if w["model"] == model)
    os.kill(worker["pid"], signal.SIGKILL)  # nothing in memory survives this
    time.sleep(0.5)
    second = ask(oai, model, system, "Where are tickets sold?")
    assert cached(second) > SHARED, cached(second)
    reference = ask(oai, REFERENCE, system, "Where are tickets sold?")
    assert second.choices[0].message.content == reference.choices[0].message.content
    restarted = next(w for w in control().get("/admin/ps").json()["workers"] if w["model"] == model)
    assert restarted["pid"] != worker["pid"]
    # A clean restart writes what memory holds: a short exchange (below the
    # write-through length) is found on disk by the next worker.
    short = f"[{uuid.uuid4()}] Be brief."
    written = set(store.rglob("*.safetensors"))
    assert cached(ask(oai, model, short, "Hi")) < 10
    control().post("/admin/restart", json={"model": model}).raise_for_status()
    assert set(store.rglob("*.safetensors")) - written, "nothing was written at the stop"
    assert cached(ask(oai, model, short, "Hello")) > 15


def rewrite_entry(path: Path, kind: str) -> None:
    """A hostile entry that keeps its name and identity: its arrays' shapes
    (3 heads x 64 dims read as 6 x 32: the same bytes, size and checksum), or its
    arrays zeroed under an intact header."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, payload = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    if kind == "other shapes":
        for name, entry in header.items():
            if name != "__metadata__":
                b, heads, n, dims = entry["shape"]
                entry["shape"] = [b, heads * 2, n, dims // 2]
    else:
        payload = bytes(len(payload))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def metric(url: str, series: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("kind", ["other shapes", "zeroed arrays"])
def test_a_hostile_cache_file_is_a_miss_and_the_model_keeps_serving(
    oai: OpenAI, daemon_url: str, session_presets: Path, kind: str
) -> None:
    model = "smollm2-135m-disk"
    store = session_presets.parent / "prompt-cache"
    system = system_prompt()
    before = set(store.rglob("*.safetensors"))
    ask(oai, model, system, "When does it open?")
    # A clean stop writes what memory holds: the entries of this conversation.
    control().post("/admin/stop", json={"model": model}).raise_for_status()
    mine = set(store.rglob("*.safetensors")) - before
    assert mine, "no entry reached the disk"
    for path in mine:
        rewrite_entry(path, kind)
    restarts = f'mlxd_worker_restarts_total{{model="{model}"}}'
    restarts_before = metric(daemon_url, restarts)
    answer = ask(oai, model, system, "Where are tickets sold?")
    reference = ask(oai, REFERENCE, system, "Where are tickets sold?")
    assert answer.choices[0].message.content == reference.choices[0].message.content
    assert cached(answer) < 10, cached(answer)  # recomputed: nothing came from the bad files
    assert not mine & set(store.rglob("*.safetensors")), "a bad file was left on disk"
    # The worker that met the bad files (it started after they were written)
    # counted them, and serves on: no crash, no restart.
    deadline = time.monotonic() + 10
    while True:
        worker = next(w for w in control().get("/admin/ps").json()["workers"] if w["model"] == model)
        if worker["stats"]["prompt_cache"]["disk"]["stale_total"] >= len(mine) or time.monotonic() > deadline:
            break
        time.sleep(0.25)  # Stats reach the daemon every second
    assert worker["stats"]["prompt_cache"]["disk"]["stale_total"] >= len(mine), worker["stats"]
    assert worker["state"] == "ready" and metric(daemon_url, restarts) == restarts_before, worker


def test_a_quantized_kv_model_serves_concurrent_requests(oai: OpenAI) -> None:
    model = "smollm2-135m-kv8"
    system = system_prompt()
    questions = ["When does it close?", "How often are tours?", "Where is the cafe?"]
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(lambda q: ask(oai, model, system, q), questions))
    for a in answers:
        assert a.usage is not None and a.usage.completion_tokens > 0
        assert a.choices[0].message.content
    # A later request finds the quantized prefix the batch left behind.
    again = ask(oai, model, system, "Is there a cafe?")
    assert cached(again) > SHARED
