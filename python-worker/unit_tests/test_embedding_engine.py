"""The embedding engine (engines/embedding.py) as the daemon drives it: Embed frames
in, Embeddings or Error frames out, with all-MiniLM-L6-v2 (scripts/setup)."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from recorder import Recorder

from mlxd_worker.engines import embedding
from mlxd_worker.engines.embedding import EmbeddingEngine
from mlxd_worker.io import frames

MODEL = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "all-minilm-l6-v2"
SKY = "The sky is blue today."


@pytest.fixture(scope="module")
def engine() -> Iterator[EmbeddingEngine]:
    assert MODEL.is_dir(), "scripts/setup installs the embedding model"
    e = EmbeddingEngine(Recorder())
    e.submit(frames.LOAD, json.dumps({"model_path": str(MODEL), "model_name": "minilm", "options": {}}).encode())
    thread = threading.Thread(target=e.run, daemon=True)
    thread.start()
    rec = e.transport
    assert isinstance(rec, Recorder)
    for _ in range(600):  # the daemon sends work once the worker is Ready
        if any(k in (frames.READY, frames.ERROR) for k, _ in rec.frames):
            break
        threading.Event().wait(0.05)
    yield e
    e.stop()
    thread.join(10)


def answer(engine: EmbeddingEngine, req: dict[str, Any], timeout: float = 60) -> tuple[int, Any]:
    """Sends one Embed and waits for the frame that answers it."""
    rec = engine.transport
    assert isinstance(rec, Recorder)
    engine.submit(frames.EMBED, json.dumps(req).encode())
    deadline = threading.Event()
    for _ in range(int(timeout * 20)):
        for kind, payload in list(rec.frames):
            final = kind == frames.ERROR or (kind == frames.EMBEDDINGS and not payload.get("more"))
            if final and payload.get("id") == req["id"]:
                return kind, payload
        deadline.wait(0.05)
    raise AssertionError(f"no answer to {req['id']}")


def vectors(payload: dict[str, Any]) -> np.ndarray:
    return np.array([np.frombuffer(base64.b64decode(v), dtype="<f4") for v in payload["vectors"]])


def test_ready_tells_the_model_and_its_limit(engine: EmbeddingEngine) -> None:
    rec = engine.transport
    assert isinstance(rec, Recorder)
    ((_, ready),) = [(k, p) for k, p in rec.frames if k == frames.READY]
    assert ready["context_length"] == 256 and ready["model"]["family"] == "bert"


def test_texts_and_their_token_ids_give_the_same_vectors(engine: EmbeddingEngine) -> None:
    assert engine.model is not None
    kind, by_text = answer(engine, {"id": 2, "texts": [SKY, "Bonjour"]})
    assert kind == frames.EMBEDDINGS and len(by_text["vectors"]) == 2
    ids = [list(engine.model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (SKY, "Bonjour")]
    kind, by_ids = answer(engine, {"id": 3, "tokens": ids})
    assert kind == frames.EMBEDDINGS
    a, b = vectors(by_text), vectors(by_ids)
    assert a.shape == (2, 384) and np.allclose(a, b, atol=1e-6)
    assert by_text["prompt_tokens"] == sum(len(i) + 2 for i in ids)  # [CLS] and [SEP] each
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_dimensions_keep_the_first_values_renormalized(engine: EmbeddingEngine) -> None:
    full = vectors(answer(engine, {"id": 4, "texts": [SKY]})[1])[0]
    kind, cut = answer(engine, {"id": 5, "texts": [SKY], "dimensions": 64})
    short = vectors(cut)[0]
    assert kind == frames.EMBEDDINGS and short.shape == (64,)
    assert np.allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    kind, err = answer(engine, {"id": 6, "texts": [SKY], "dimensions": 1000})
    assert kind == frames.ERROR and err["code"] == "invalid_request" and "384" in err["message"]


def test_a_long_input_is_refused_or_truncated_as_asked(engine: EmbeddingEngine) -> None:
    long = "word " * 400
    kind, err = answer(engine, {"id": 7, "texts": [SKY, long]})
    assert kind == frames.ERROR and err["code"] == "context_length_exceeded"
    assert "input 1" in err["message"] and "256" in err["message"]
    kind, ok = answer(engine, {"id": 8, "texts": [long], "truncate": True})
    assert kind == frames.EMBEDDINGS and ok["prompt_tokens"] == 256
    assert engine.model is not None
    cut = engine.model.tokenizer(long, truncation=True, max_length=256)["input_ids"]
    assert np.allclose(vectors(ok)[0], np.array(engine.model.embed([list(cut)]))[0], atol=1e-5)


def test_a_long_answer_comes_in_several_frames_in_order(
    engine: EmbeddingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedding, "MAX_ANSWER_FRAME_BYTES", 5000)  # two 384-dim vectors a frame
    texts = [f"input {i}" for i in range(7)]
    kind, last = answer(engine, {"id": 9, "texts": texts})
    rec = engine.transport
    assert isinstance(rec, Recorder)
    parts = [p for k, p in rec.frames if k == frames.EMBEDDINGS and p["id"] == 9]
    assert [p.get("more", False) for p in parts] == [True, True, True, False]
    assert last["prompt_tokens"] > 0 and all(p["prompt_tokens"] == 0 for p in parts[:-1])
    joined = np.concatenate([vectors(p) for p in parts])
    monkeypatch.undo()
    assert np.allclose(joined, vectors(answer(engine, {"id": 10, "texts": texts})[1]), atol=1e-5)


def test_what_this_worker_cannot_serve_is_answered_not_dropped(engine: EmbeddingEngine) -> None:
    kind, err = answer(engine, {"id": 11, "tokens": [[101, 40000]]})
    assert kind == frames.ERROR and "40000" in err["message"] and "30521" in err["message"]
    rec = engine.transport
    assert isinstance(rec, Recorder)
    engine.submit(frames.GENERATE, json.dumps({"id": 12, "prompt": "hi", "max_tokens": 4}).encode())
    ((_, err),) = [(k, p) for k, p in rec.frames if k == frames.ERROR and p.get("id") == 12]
    assert "embedding model" in err["message"]


def test_a_generating_worker_answers_an_embed_with_an_error() -> None:
    from mlxd_worker.engines.backend import MlxBackend
    from mlxd_worker.engines.engine import Engine

    rec = Recorder()
    Engine(rec, MlxBackend()).submit(frames.EMBED, json.dumps({"id": 13, "texts": ["x"]}).encode())
    ((kind, err),) = rec.frames
    assert kind == frames.ERROR and err["id"] == 13 and "no embeddings" in err["message"]


def test_many_requests_at_once_are_batched_by_length_and_each_answered(
    engine: EmbeddingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty requests of mixed lengths in one round: fewer passes than inputs, every
    request gets its own vectors in its own order, as if embedded alone."""
    assert engine.model is not None
    model = engine.model
    passes: list[int] = []
    embed = model.embed

    def counted(rows: list[list[int]]) -> Any:
        passes.append(len(rows))
        return embed(rows)

    monkeypatch.setattr(model, "embed", counted)
    monkeypatch.setattr(embedding, "MAX_BATCH_ROWS", 8)
    texts = [f"Sentence number {i} " + "and more words " * (i % 5) for i in range(20)]
    rec = engine.transport
    assert isinstance(rec, Recorder)
    engine.inbox.put(None)  # hold the engine: all twenty wait for one round
    while engine._running:
        threading.Event().wait(0.01)
    for i, t in enumerate(texts):
        engine.submit(frames.EMBED, json.dumps({"id": 100 + i, "texts": [t, t.upper()]}).encode())
    engine._running = True
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    got: dict[int, Any] = {}
    for _ in range(1200):
        got = {p["id"]: p for k, p in rec.frames if k == frames.EMBEDDINGS and 100 <= p["id"] < 120}
        if len(got) == 20:
            break
        threading.Event().wait(0.05)
    assert len(got) == 20
    assert sum(passes) == 40 and len(passes) < 40 and max(passes) <= 8
    for i, t in enumerate(texts):
        alone = np.array(embed([model.tokenize(t), model.tokenize(t.upper())]))
        assert np.allclose(vectors(got[100 + i]), alone, atol=1e-5)


def test_a_worker_process_in_embedding_mode_answers_over_stdio() -> None:
    """`python -m mlxd_worker --engine embedding` as the daemon starts it: Hello,
    Ready after Load, the vectors of an Embed, and its Stats beside them."""
    import subprocess
    import sys

    from worker_process import worker_env

    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxd_worker", "--transport", "stdio", "--engine", "embedding"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=worker_env(),
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = proc.stdout

    def send(kind: int, payload: dict[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write(frames.encode(kind, json.dumps(payload).encode()))
        proc.stdin.flush()

    def until(kind: int) -> tuple[Any, set[int]]:
        seen: set[int] = set()
        while True:
            length, got, _ = frames.HEADER.unpack(out.read(frames.HEADER.size))
            payload = json.loads(out.read(length)) if length else None
            seen.add(got)
            if got == kind:
                return payload, seen

    try:
        hello, _ = until(frames.HELLO)
        assert hello["engine"] == "embedding" and hello["protocol_version"] == frames.PROTOCOL_VERSION
        send(frames.LOAD, {"model_path": str(MODEL), "model_name": "minilm", "options": {}})
        until(frames.READY)
        send(frames.EMBED, {"id": 1, "texts": [SKY]})
        got, _ = until(frames.EMBEDDINGS)
        assert got["id"] == 1 and vectors(got).shape == (1, 384)
        stats, _ = until(frames.STATS)
        assert stats["engine_failed"] is False and stats["heartbeat"] > 0
    finally:
        proc.stdin.close()  # the lifeline: the worker exits
        proc.wait(30)
