"""What the lanes tell the prefill pacer, with the test model: the batch's chunk is
shared by the rows that really prefill in the call, its timing counts only prompt
tokens fed to the model, and the drafting lane paces the target's prefill."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mlxd_worker.engines.backend import MlxBackend
from mlxd_worker.lanes.pacing import PrefillPacer

MODEL = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "smollm2-135m"
CHUNK = 64


class RecordingPacer(PrefillPacer):
    """A fixed chunk per row; records the rows each chunk was asked for and the
    tokens each measured step prefilled."""

    def __init__(self) -> None:
        super().__init__(2048)
        self.rows: list[int] = []
        self.observed: list[int] = []

    def chunk(self, rows: int = 1) -> int:
        self.rows.append(rows)
        return CHUNK

    def observe(self, tokens: int, seconds: float) -> None:
        self.observed.append(tokens)


@pytest.fixture(scope="module")
def backend() -> MlxBackend:
    if not (MODEL / "config.json").exists():
        pytest.skip("the test model is not imported (scripts/setup)")
    b = MlxBackend()
    b.load(str(MODEL), {"max_batch": 16})  # 8 rows prefill together
    return b


def test_the_batch_paces_the_rows_that_prefill_and_counts_their_prompt_tokens(backend: MlxBackend) -> None:
    pacer = RecordingPacer()
    backend._pacer = pacer
    # More prompts than prefill_batch_size (8): the last ones wait in the queue.
    # One-token prompts have nothing to prefill (their token is the first decode
    # step's input), yet take a place in the prompt batch for the call that admits them.
    lengths = [150, 170, 200, 130, 165, 64, 140, 135, 1, 2, 70, 1, 65]
    assert backend._gen.prefill_batch_size < len(lengths)
    calls: list[tuple[int, int]] = []  # per call: rows that prefilled, tokens they fed
    fed_so_far: dict[int, int] = {}
    real_next = backend._gen.next

    def next_recorded() -> Any:
        prompt_responses, responses = real_next()
        rows = [r for r in prompt_responses if not r.end_of_prompt]
        fed = 0
        for r in rows:
            fed += r.progress[0] - fed_so_far.get(r.uid, 0)
            fed_so_far[r.uid] = r.progress[0]
        calls.append((len(rows), fed))
        return prompt_responses, responses

    backend._gen.next = next_recorded  # type: ignore[method-assign]
    try:
        uids = [backend.insert([100 + (i * 7 + j) % 500 for j in range(n)], 2, None) for i, n in enumerate(lengths)]
        done: set[int] = set()
        while len(done) < len(uids):
            done |= {uid for uid, _, finish in backend.step() if finish is not None}
    finally:
        del backend._gen.next  # type: ignore[method-assign]
    # Each call's chunk was sized for the rows that then prefilled in it.
    assert pacer.rows == [max(1, rows) for rows, _ in calls]
    assert any(rows == backend._gen.prefill_batch_size for rows, _ in calls)
    # Each call that prefilled was observed with the tokens it fed: all but each
    # prompt's last token, once.
    assert pacer.observed == [fed for rows, fed in calls if rows]
    assert sum(pacer.observed) == sum(n - 1 for n in lengths)
    assert not backend._prompt_left and not backend._prompt_admitted


def test_the_drafting_lane_paces_and_times_the_targets_prefill_only(backend: MlxBackend) -> None:
    from mlx_lm.generate import generation_stream

    from mlxd_worker.lanes.speculative import SpeculativeSequence

    pacer = RecordingPacer()
    model = backend._model
    history = [100 + j % 400 for j in range(300)]
    # The same model drafts: its prefill runs too, from an empty cache.
    seq = SpeculativeSequence(model, model, history, 1, None, 2, 2048, generation_stream, pacer=pacer)
    while not seq.step():
        pass
    target_chunks = [CHUNK] * 4 + [299 - 4 * CHUNK]
    assert pacer.observed == target_chunks  # the draft's chunks are not timed
    assert len(pacer.rows) == 2 * len(target_chunks)  # the draft's chunks were sized by it too
