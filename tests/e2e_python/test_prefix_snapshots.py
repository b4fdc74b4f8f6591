"""Prefix reuse for models whose cache cannot be cut back (issue 26, item 2).

A hybrid model's recurrent state and a sliding window's rotated cache hold no
earlier prefix, so the prefix cache keeps snapshots where later requests part
from a prompt: after the system prompt and before the generation prompt. Two
agents share a system prompt and take turns: the second agent's first request
reuses the first agent's system prompt, and every later turn reuses its own
conversation so far. Every answer is mlx-lm's own greedy answer to the same chat
prompt.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from families import family_dir, greedy_text
from families import tokenizer as family_tokenizer

from conftest import control

SYSTEM = (
    "You are a careful coding agent. You read files before you change them, you run the tests after every "
    "change, and you explain what you did in one short paragraph. Never guess a file's contents."
)
# Six requests: four turns of one agent, two of the other.
QUESTIONS = {
    "a": ["List the files in src.", "Open main.rs.", "Run the tests.", "Commit it."],
    "b": ["What does the README say?", "Fix the typo in it."],
}
MAX_TOKENS = 6


def chat(url: str, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def native(model_dir: Any, messages: list[dict[str, str]]) -> str:
    ids = list(family_tokenizer(model_dir).apply_chat_template(messages, add_generation_prompt=True))
    return greedy_text(model_dir, ids, MAX_TOKENS)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "gpt_oss", "gemma3_text"])
def test_turn_boundaries_are_reused_by_hybrid_and_sliding_models(daemon_url: str, family: str) -> None:
    model = f"family-{family}"
    model_dir = family_dir(family)
    conversations: dict[str, list[dict[str, str]]] = {
        name: [{"role": "system", "content": SYSTEM}] for name in QUESTIONS
    }
    cached: dict[str, list[int]] = {name: [] for name in QUESTIONS}
    try:
        for turn in range(max(len(q) for q in QUESTIONS.values())):
            for name, questions in QUESTIONS.items():
                if turn >= len(questions):
                    continue
                messages = conversations[name]
                messages.append({"role": "user", "content": questions[turn]})
                r = chat(daemon_url, model, messages)
                answer = r["choices"][0]["message"]["content"]
                assert answer == native(model_dir, messages), f"{family} {name} turn {turn + 1}"
                cached[name].append(r["usage"]["prompt_tokens_details"]["cached_tokens"])
                messages.append({"role": "assistant", "content": answer})
        print(f"{family}: cached tokens per turn {cached}")
        # The second agent's first request: the first agent's system prompt.
        assert cached["b"][0] > 30, cached
        # Every later turn: at least the conversation up to its previous question.
        assert all(n > 40 for n in cached["a"][1:] + cached["b"][1:]), cached
    finally:
        with control() as c:
            c.post("/admin/stop", json={"model": model})
