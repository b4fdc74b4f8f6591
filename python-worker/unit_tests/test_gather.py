"""A burst of requests reaching an idle engine starts in one step (engine.GATHER_S):
the engine waits for the requests the reader thread is still planning; a lone
request does not wait, unless starting alone has been slow (GATHER_FRACTION). The
replay engine: no model, the scheduler as it is."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from recorder import Recorder

from mlxd_worker.engines import engine as engine_module
from mlxd_worker.engines.engine import GATHER_S, Engine
from mlxd_worker.engines.replay import ReplayBackend
from mlxd_worker.io import frames

MODEL = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "smollm2-135m"


@pytest.fixture
def engine() -> Iterator[Engine]:
    assert MODEL.is_dir(), "scripts/setup imports the test model"
    e = Engine(Recorder(), ReplayBackend())
    e._load({"model_path": str(MODEL), "model_name": "replay", "options": {}})
    yield e


def generate(rid: int) -> bytes:
    return json.dumps({"id": rid, "prompt": "hi", "max_tokens": 4}).encode()


def first_step_batch(engine: Engine) -> int:
    """Sequences the first step advances, counted as the engine's loop counts them."""
    before = list(engine.counters.batch_sizes)
    engine._step()
    (bucket,) = [i for i, (a, b) in enumerate(zip(before, engine.counters.batch_sizes)) if b != a]
    return [0, 1, 2, 4, 8][bucket] if bucket < 5 else 99


def test_a_burst_from_idle_starts_in_one_step(engine: Engine) -> None:
    engine.submit(frames.GENERATE, generate(1))

    def reader() -> None:  # the rest of the burst, still being planned
        time.sleep(0.01)
        engine.submit(frames.GENERATE, generate(2))

    engine.planning = True  # the reader has the next frame in hand
    thread = threading.Thread(target=reader)
    thread.start()
    engine._drain_inbox(block=True)
    engine._gather()
    thread.join()
    assert len(engine._by_uid) == 2
    assert first_step_batch(engine) == 2


def test_a_lone_request_does_not_wait(engine: Engine) -> None:
    engine.submit(frames.GENERATE, generate(1))
    started = time.perf_counter()
    engine._drain_inbox(block=True)
    engine._gather()
    assert time.perf_counter() - started < GATHER_S / 2
    assert len(engine._by_uid) == 1
    assert first_step_batch(engine) == 1


def test_a_burst_with_gaps_between_its_frames_still_starts_together(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once two have come, a third that reaches the worker a moment later (the reader
    idle in between, waiting for its frame) joins the first step too. (The windows
    are widened so that a loaded machine's scheduling cannot close them.)"""
    monkeypatch.setattr(engine_module, "GATHER_S", 2.0)
    monkeypatch.setattr(engine_module, "GATHER_GAP_S", 1.0)
    engine.submit(frames.GENERATE, generate(1))
    engine.submit(frames.GENERATE, generate(2))

    def reader() -> None:
        time.sleep(0.1)
        engine.submit(frames.GENERATE, generate(3))

    thread = threading.Thread(target=reader)
    thread.start()
    engine._drain_inbox(block=True)
    engine._gather()
    thread.join()
    assert len(engine._by_uid) == 3
    assert first_step_batch(engine) == 4  # the bucket of 3 and 4


def test_where_starting_alone_is_slow_a_lone_request_waits_for_company(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that wakes the engine alone waits for a second in proportion to
    how long earlier lone starts took to their first token, and the burst's frames
    are gathered past GATHER_S while its expected prefill is long; they then share
    the first step instead of waiting for a whole lone start. (The fraction and caps
    are widened so that a loaded machine's scheduling cannot close the window.)"""
    monkeypatch.setattr(engine_module, "GATHER_FRACTION", 1.0)
    monkeypatch.setattr(engine_module, "GATHER_PATIENCE_S", 2.0)
    monkeypatch.setattr(engine_module, "GATHER_MAX_S", 5.0)
    monkeypatch.setattr(engine_module, "GATHER_PACE_MIN_TOKENS", 1)
    fast_step = engine.backend.step

    def slow_step() -> list:
        time.sleep(0.5)
        return fast_step()

    # A lone start whose first token took 0.5 s sets the pace.
    monkeypatch.setattr(engine.backend, "step", slow_step)
    engine.submit(frames.GENERATE, generate(1))
    engine._drain_inbox(block=True)
    engine._gather()
    while engine._by_uid:
        engine._step()
    monkeypatch.setattr(engine.backend, "step", fast_step)

    engine.submit(frames.GENERATE, generate(2))

    def reader() -> None:  # three more, 0.1 s apart (GATHER_S is 0.05), the reader idle between
        for rid in (3, 4, 5):
            time.sleep(0.1)
            engine.submit(frames.GENERATE, generate(rid))

    thread = threading.Thread(target=reader)
    thread.start()
    engine._drain_inbox(block=True)
    engine._gather()
    thread.join()
    assert GATHER_S < 0.3
    assert len(engine._by_uid) == 4
    assert first_step_batch(engine) == 4


def test_the_debug_log_says_where_a_requests_first_token_waited(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """With the worker's log at DEBUG, each request's first token comes with its
    timeline: planning, the wait for the engine, and the step that gave it."""
    with caplog.at_level("DEBUG", logger="mlxd_worker"):
        engine.submit(frames.GENERATE, generate(7))
        engine._drain_inbox(block=True)
        steps_before = engine.counters.steps
        engine._step()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request 7:")]
    assert f"(after step {steps_before})" in line and f"(step {steps_before + 1}, 1 tokens in it)" in line, line
    for part in ("planned in ", "admitted ", "first token "):
        assert part in line, line
