"""Issue 33, pipeline parallel: a tiny random-weight DeepSeek-V3 (mlx-lm's own class,
families.py) whose two layers are split between two ranks by mlx-lm's own
``pipeline()``, served as one slot; its greedy answers equal mlx-lm's single-process
generation, one request, several at once (the batch) and streamed. (Tensor parallel
and the group's faults are in tests/distributed.rs.)"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
from families import family_dir
from test_families import complete, native_text

MODEL = "family-deepseek_v3-pp2"
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning"]


def test_a_pipeline_of_two_ranks_answers_as_mlx_lm_alone(daemon_url: str) -> None:
    model_dir = family_dir("deepseek_v3")
    native = [native_text(model_dir, p) for p in PROMPTS]
    assert complete(daemon_url, MODEL, PROMPTS[0])["choices"][0]["text"] == native[0]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: complete(daemon_url, MODEL, p)["choices"][0]["text"], PROMPTS))
    assert together == native

    streamed = ""
    with httpx.stream(
        "POST",
        f"{daemon_url}/v1/completions",
        json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0, "stream": True},
        timeout=300,
    ) as r:
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines
    for data in lines[:-1]:
        event = json.loads(data)
        assert "error" not in event, event
        streamed += event["choices"][0]["text"]
    assert streamed == native[1]
