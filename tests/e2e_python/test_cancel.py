"""A client that disconnects mid-stream frees its sequence in the worker."""

from __future__ import annotations

import json
import time

import httpx

from conftest import control


def worker_stats(url: str, model: str) -> dict:
    workers = control().get("/admin/ps").json()["workers"]
    return next(w for w in workers if w["model"] == model)


def test_disconnect_cancels_generation_in_the_worker(daemon_url: str) -> None:
    model = "smollm2-135m"
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon and a knight."}],
        "max_tokens": 400,
        "stream": True,
    }
    # Make sure the worker is up and its stats have been reported once.
    control().post("/admin/start", json={"model": model})
    time.sleep(1.2)
    before = worker_stats(daemon_url, model)["stats"]["cancelled_total"]
    with httpx.stream("POST", f"{daemon_url}/v1/chat/completions", json=body, timeout=60) as resp:
        got_text = False
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    got_text = True
                    break
        assert got_text
    # Disconnected after the first token; 400 tokens would take ~60 s at CPU speed,
    # so the worker reaching zero active sequences with one more cancellation within
    # the deadline shows the Cancel frame, not the end of generation, freed it.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        w = worker_stats(daemon_url, model)
        if w["stats"]["cancelled_total"] == before + 1 and w["stats"]["active_sequences"] == 0:
            assert w["inflight"] == 0
            return
        time.sleep(0.25)
    raise AssertionError(f"generation was not cancelled: {worker_stats(daemon_url, model)}")
