"""A request far too big for the model (issue 28): 100,000 messages, a 6 MB body.
The worker spends seconds rendering its chat template before it can say the
prompt does not fit; meanwhile its engine, idle, keeps beating, so the daemon
does not take it for a hung worker. The client gets its dialect's context error,
and the worker serves on."""

from __future__ import annotations

import httpx

from conftest import control

MODEL = "smollm2-135m-quick-hang"  # hang_timeout 2 s: less than the template takes
MESSAGES = [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} with a few words"}
    for i in range(100_000)
]


def test_a_prompt_that_takes_seconds_to_plan_is_refused_as_too_long_not_hung(daemon_url: str) -> None:
    r = httpx.post(
        f"{daemon_url}/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4},
        timeout=300,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and "prompt is too long" in error["message"], error
    worker = next(w for w in control().get("/admin/ps").json()["workers"] if w["model"] == MODEL)
    assert worker["state"] == "ready" and worker["restarts"] == 0 and worker["last_exit"] is None, worker
    r = httpx.post(
        f"{daemon_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        timeout=120,
    )
    assert r.status_code == 200, r.text
