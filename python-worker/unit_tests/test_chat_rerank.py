"""A chat model's reranks (its preset's [rerank]) share the engine with its decode
batch: one model pass per loop iteration between decode steps, so a long rerank
does not hold the batch; a cancelled rerank stops and is counted. A tiny random
Qwen3 with SmolLM2's tokenizer and chat template."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import decoder_embedder
import pytest
from recorder import Recorder

from mlxd_worker.engines.backend import MlxBackend
from mlxd_worker.engines.engine import Engine
from mlxd_worker.io import frames

SMOLLM2 = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "smollm2-135m"
# Each makes a prompt past one pass's 512 tokens: prefilled in two chunks, then its last token.
LONG_DOCUMENTS = ["Paris, on the Seine, is the capital city of France. " * 50] * 4


@pytest.fixture
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    directory = decoder_embedder.write(tmp_path_factory.mktemp("chat"), SMOLLM2, layout="mlx-lm")
    e = Engine(Recorder(), MlxBackend())
    options = {"rerank_instruction": "Find the passage that answers the question"}
    e._load({"model_path": str(directory), "model_name": "tiny", "options": options})  # type: ignore[typeddict-item]
    yield e


def rerank(engine: Engine, rid: int) -> None:
    body = {"id": rid, "texts": LONG_DOCUMENTS, "query": "What is the capital of France?"}
    engine.submit(frames.EMBED, json.dumps(body).encode())


def frames_of(engine: Engine, kind: int, rid: int) -> list[int]:
    """Where the frames of `kind` for `rid` are among everything the engine sent."""
    assert isinstance(engine.transport, Recorder)
    return [i for i, (k, p) in enumerate(engine.transport.frames) if k == kind and p.get("id") == rid]


def test_decode_steps_run_between_a_reranks_passes(engine: Engine) -> None:
    """Both arrive together; the generation (6 tokens) ends while the rerank's
    twelve passes are still going, and both answer."""
    engine.submit(frames.GENERATE, json.dumps({"id": 1, "prompt": "hi", "max_tokens": 6}).encode())
    rerank(engine, 2)
    thread = threading.Thread(target=engine.run)
    thread.start()
    deadline = time.monotonic() + 300
    while not (frames_of(engine, frames.EMBEDDINGS, 2) and frames_of(engine, frames.DONE, 1)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    engine.stop()
    thread.join()
    ((done,),) = [frames_of(engine, frames.DONE, 1)]
    ((answer,),) = [frames_of(engine, frames.EMBEDDINGS, 2)]
    assert done < answer
    assert isinstance(engine.transport, Recorder)
    scores = engine.transport.frames[answer][1]["scores"]
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)
    counters = engine.counters
    assert (counters.completed, counters.active, counters.queued) == (2, 0, 0)
    assert counters.prefill_seconds > 0


def test_a_cancelled_rerank_stops_between_passes(engine: Engine) -> None:
    rerank(engine, 3)
    engine._drain_inbox(block=False)
    engine._rerank_pass()
    assert engine.counters.active == 1
    passes = engine._reranks[0].passes
    engine.submit(frames.CANCEL, frames.encode_cancel(3))
    engine._drain_inbox(block=False)
    assert not engine._reranks and passes.gi_frame is None  # closed: its cache is freed
    assert (engine.counters.active, engine.counters.cancelled) == (0, 1)
    assert not frames_of(engine, frames.EMBEDDINGS, 3) and not frames_of(engine, frames.ERROR, 3)
