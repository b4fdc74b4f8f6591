"""A prompt whose prefill takes longer than the preset's hang_timeout is answered:
the worker sizes prefill chunks to its measured rate (lanes/pacing.py), so each
engine step shows progress within the timeout, instead of one 2048-token chunk
being taken for a hang (killed, retried on a fresh worker, killed again)."""

from __future__ import annotations

import httpx
import pytest

from conftest import control

MODEL = "smollm2-135m-slow-prefill"
HANG_TIMEOUT_S = 6.0


def test_a_prefill_longer_than_hang_timeout_is_not_a_hang(daemon_url: str) -> None:
    prompt = " ".join(f"item{i} is fine." for i in range(250))  # ~1500 tokens
    try:
        r = httpx.post(
            f"{daemon_url}/api/generate",
            json={"model": MODEL, "prompt": prompt, "raw": True, "stream": False, "options": {"num_predict": 2}},
            timeout=600,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["done"] and body["eval_count"] >= 1, body
        seconds = body["prompt_eval_duration"] / 1e9
        print(f"prefill of {body['prompt_eval_count']} tokens took {seconds:.1f} s")
        workers = control().get("/admin/ps").json()["workers"]
        worker = next(w for w in workers if w["model"] == MODEL)
        assert worker["restarts"] == 0, worker
        if seconds <= HANG_TIMEOUT_S:
            pytest.skip(f"this machine prefilled it in {seconds:.1f} s, within hang_timeout: nothing to show")
    finally:
        with control() as c:
            c.post("/admin/stop", json={"model": MODEL})
