"""Speculative decoding through the daemon, against mlx-lm's own.

Target: the test model imported as float32; draft: its 4-bit import (one
tokenizer). `smollm2-135m-spec-on` drafts 3 tokens always; `smollm2-135m-spec` is
the shipped auto preset; the `-othervocab` presets (conftest) name a draft whose
vocabulary differs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import MLXD, control, models_dir

ON = "smollm2-135m-spec-on"
AUTO = "smollm2-135m-spec"
PLAIN = "smollm2-135m"
PROMPTS = ["Monday, Tuesday, Wednesday,", "The capital of France is"]
MAX_TOKENS = 12
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")


def complete(url: str, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> dict:
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return r.json()


def native(prompt: str) -> dict:
    """mlx-lm's stream_generate with the same draft, in a process of its own with
    the BLAS the worker runs on."""
    env = dict(os.environ)
    if OPENBLAS.exists():
        env["LD_PRELOAD"] = str(OPENBLAS)
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("native_speculative.py")),
            str(models_dir() / "smollm2-135m"),
            str(models_dir() / "smollm2-135m-q4"),
            "3",
            str(MAX_TOKENS),
            prompt,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("prompt", PROMPTS)
def test_counters_and_text_match_mlx_lm_and_plain_decoding(daemon_url: str, prompt: str) -> None:
    spec = complete(daemon_url, ON, prompt)
    plain = complete(daemon_url, PLAIN, prompt)
    ref = native(prompt)
    text = spec["choices"][0]["text"]
    # Greedy output with speculation equals greedy output without it, and mlx-lm's.
    assert text == plain["choices"][0]["text"]
    assert text == ref["text"]
    counts = spec["usage"]["mlxd"]
    accepted = sum(ref["from_draft"])
    assert counts["accepted_tokens"] == accepted, (counts, ref)
    assert counts["draft_tokens"] == counts["accepted_tokens"] + counts["rejected_tokens"]
    rounds = len(ref["from_draft"]) - accepted  # each round ends with one target token
    assert accepted <= counts["draft_tokens"] <= 3 * max(rounds, 1) + 3
    assert counts["acceptance_ratio"] == pytest.approx(accepted / counts["draft_tokens"], abs=1e-4)
    assert "mlxd" not in plain["usage"]  # no draft, no counters


def test_a_lane_switch_mid_request_keeps_the_text(daemon_url: str) -> None:
    prompt, other = PROMPTS
    alone = complete(daemon_url, ON, prompt, 16)["choices"][0]["text"]
    to_batch = metric(daemon_url, "mlxd_spec_lane_switches_total", model=ON, to="batch")
    back = metric(daemon_url, "mlxd_spec_lane_switches_total", model=ON, to="speculative")
    text, joiner, usage = "", None, None
    body = {
        "model": ON,
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{daemon_url}/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk["choices"]:
                usage = chunk["usage"]
                continue
            text += chunk["choices"][0]["text"]
            if joiner is None and text:
                # A second request while the first is drafting: the first moves
                # into the batch, and back out to draft once the second is done.
                joiner = threading.Thread(target=complete, args=(daemon_url, ON, other, 3))
                joiner.start()
    assert joiner is not None
    joiner.join()
    assert text == alone
    # The stream's usage chunk carries the request's draft counters.
    assert usage is not None and usage["completion_tokens"] == 16
    counts = usage["mlxd"]
    assert 0 < counts["accepted_tokens"] <= counts["draft_tokens"] < 16
    time.sleep(1.2)  # one Stats period
    assert metric(daemon_url, "mlxd_spec_lane_switches_total", model=ON, to="batch") > to_batch
    assert metric(daemon_url, "mlxd_spec_lane_switches_total", model=ON, to="speculative") > back


def test_a_draft_with_another_vocabulary_is_refused_with_the_reason(daemon_url: str) -> None:
    r = httpx.post(
        f"{daemon_url}/v1/completions",
        json={"model": "smollm2-135m-spec-othervocab-required", "prompt": "Hi", "max_tokens": 2},
        timeout=300,
    )
    assert r.status_code >= 500, r.text
    message = r.json()["error"]["message"]
    assert "not supported" in message and "vocabulary differs" in message, message

    # Without require_supported the model serves, without drafting, and says why.
    served = complete(daemon_url, "smollm2-135m-spec-othervocab", PROMPTS[0], 4)
    assert "mlxd" not in served["usage"]
    models = httpx.get(f"{daemon_url}/v1/models").json()["data"]
    spec = next(m for m in models if m["id"] == "smollm2-135m-spec-othervocab")["mlxd"]["speculative"]
    assert spec["active"] is False and "vocabulary differs" in spec["reason"]
    ps = subprocess.run(
        [str(MLXD), "--port", daemon_url.rsplit(":", 1)[1], "ps"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"speculative \(on, draft \S+\): off \(the draft's vocabulary differs", ps), ps


def test_auto_mode_decides_by_itself_and_says_so(daemon_url: str) -> None:
    # The shipped auto preset measures both lanes at load; whichever it chose, it
    # says what it measured, and the metrics show its state.
    with control() as c:
        assert c.post("/admin/start", json={"model": AUTO}).status_code == 200
        workers = c.get("/admin/ps").json()["workers"]
    spec = next(w for w in workers if w["model"] == AUTO)["stats"]["speculative"]
    assert spec["mode"] == "auto" and spec["plain_tps"] > 0 and spec["spec_tps"] > 0
    if spec["spec_tps"] < spec["plain_tps"]:
        assert spec["active"] is False and "drafting measured slower" in spec["reason"]
        assert metric(daemon_url, "mlxd_spec_transitions_total", model=AUTO, transition="off") >= 1
    else:
        assert spec["active"] is True
    assert metric(daemon_url, "mlxd_spec_active", model=AUTO) == float(spec["active"])


def test_the_benchmark_runs_both_sides(daemon_url: str) -> None:
    with control() as c:
        r = c.post("/admin/benchmark", json={"model": AUTO, "runs": 1, "max_tokens": 6, "prompt": "Count to ten."})
        assert r.status_code == 200, r.text
        bench = r.json()
        none = c.post("/admin/benchmark", json={"model": PLAIN, "runs": 1})
        bad = c.post("/admin/benchmark", json={"model": AUTO, "runs": 0})
    assert [run["speculative"] for run in bench["runs"]] == [True, False]
    on, off = bench["runs"]
    assert on["mlxd"]["draft_tokens"] > 0 and off["mlxd"]["draft_tokens"] == 0
    assert on["completion_tokens"] == off["completion_tokens"] > 0
    assert bench["plain"]["median_decode_tps"] > 0 and bench["speculative"]["median_decode_tps"] > 0
    assert bench["speedup"] == pytest.approx(
        bench["speculative"]["median_decode_tps"] / bench["plain"]["median_decode_tps"], rel=0.01
    )
    assert none.status_code == 400 and "no draft model" in none.json()["error"]["message"]
    assert bad.status_code == 400 and "runs must be" in bad.json()["error"]["message"]
    port = daemon_url.rsplit(":", 1)[1]
    printed = subprocess.run(
        [str(MLXD), "--port", port, "benchmark", AUTO, "--runs", "1", "--max-tokens", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"^speculative +[\d.]+ +[\d.]+ +\d+ +\d+ +\d+ +[\d.]+$", printed, re.M), printed
    assert re.search(r"^plain +[\d.]+ +[\d.]+ +\d+ +- +- +-$", printed, re.M), printed
    assert "median decode:" in printed
