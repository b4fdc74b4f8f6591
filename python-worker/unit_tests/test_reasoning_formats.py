"""Thinking told apart from the answer: formats found from the tokenizer, text split
with markers held back and stripped, thinking tokens tracked, a budget forcing the
section closed. The `<think>` path runs end to end in tests/e2e_python/test_reasoning.py;
GPT-OSS's harmony channels are checked here on its real marker tokens, added to the
SmolLM2 tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import pytest

from mlxd_worker.requests.constraint import mask_logits
from mlxd_worker.requests.reasoning import ReasoningBudget, ReasoningFormat, ReasoningText, ReasoningTracker, detect

MODEL = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "smollm2-135m"
HARMONY = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>"]


def wrapper(added: list[str]) -> object:
    if not (MODEL / "tokenizer.json").is_file():
        pytest.skip(f"no test model at {MODEL} (scripts/setup imports it)")
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL))
    tok.add_special_tokens({"additional_special_tokens": added})
    return TokenizerWrapper(tok)


@pytest.fixture(scope="module")
def harmony() -> tuple[object, ReasoningFormat]:
    tok = wrapper(HARMONY)
    fmt = detect(tok)  # type: ignore[arg-type]
    assert fmt is not None and fmt.name == "harmony"
    return tok, fmt


def test_a_model_without_markers_does_not_think() -> None:
    assert detect(wrapper([])) is None  # type: ignore[arg-type]


def split(fmt: ReasoningFormat, pieces: list[str], inside: bool = False) -> list[tuple[bool, str]]:
    text = ReasoningText(fmt, inside)
    out: list[tuple[bool, str]] = []
    for p in pieces:
        out += text.feed(p)
    out += text.finish()
    merged: list[tuple[bool, str]] = []
    for reasoning, piece in out:
        if merged and merged[-1][0] == reasoning:
            merged[-1] = (reasoning, merged[-1][1] + piece)
        else:
            merged.append((reasoning, piece))
    return merged


def test_harmony_channels_split_whatever_the_token_boundaries(harmony: tuple[object, ReasoningFormat]) -> None:
    _, fmt = harmony
    output = "<|channel|>analysis<|message|>User asks 2+2.<|end|><|start|>assistant<|channel|>final<|message|>4."
    want = [(True, "User asks 2+2."), (False, "4.")]
    # One piece, one character at a time, and cut inside every marker.
    assert split(fmt, [output]) == want
    assert split(fmt, list(output)) == want
    assert split(fmt, [output[:5], output[5:40], output[40:75], output[75:]]) == want
    # A text that only looks like the start of a marker is given back at the end.
    assert split(fmt, ["<|channel|>final<|message|>a <|chan"]) == [(False, "a <|chan")]


def test_think_markers_with_the_section_opened_by_the_prompt() -> None:
    fmt = ReasoningFormat(
        name="<think>…</think>",
        transitions={"normal": [("<think>", "reasoning")], "reasoning": [("</think>", "normal")]},
        opens=((7,),),
        closes=((8,),),
        force_close=(8,),
    )
    assert split(fmt, ["Hmm", ".</th", "ink>\n\nYes"], inside=True) == [(True, "Hmm."), (False, "\n\nYes")]
    assert split(fmt, ["<think>a</think>b"]) == [(True, "a"), (False, "b")]
    assert fmt.starts_inside([1, 7, 2]) and not fmt.starts_inside([1, 7, 2, 8, 3])
    tracker = ReasoningTracker(fmt, inside=True)
    for token in (3, 4, 8, 5, 6):
        tracker.feed(token)
    assert (tracker.inside, tracker.tokens) == (False, 3)


def test_harmony_tracker_and_budget_force_the_whole_closing_header(harmony: tuple[object, ReasoningFormat]) -> None:
    tok, fmt = harmony
    encode = tok.encode  # type: ignore[attr-defined]
    thinking = encode("<|channel|>analysis<|message|>", add_special_tokens=False)
    words = encode(" so far", add_special_tokens=False)
    # Thinking counts from the header's last token: it and the two words.
    budget = ReasoningBudget(fmt, budget=1 + len(words), inside=False)
    vocab = 49152 + len(HARMONY)
    logits = mx.zeros((1, vocab))
    for token in thinking + words:
        assert mask_logits([[budget]], logits) is logits  # free while under budget
        budget.consume(token)
    forced: list[int] = []
    while True:
        masked = mask_logits([[budget]], logits)
        if masked is logits:
            break
        allowed = [i for i, v in enumerate(masked[0].tolist()) if v != float("-inf")]
        assert len(allowed) == 1
        forced.append(allowed[0])
        budget.consume(allowed[0])
    assert forced == list(fmt.force_close)
    assert tok.decode(forced) == "<|end|><|start|>assistant<|channel|>final<|message|>"  # type: ignore[attr-defined]
    assert not budget.tracker.inside
