"""Where drafting loses speed inside the worker, in one process, interleaved:
mlx-lm's own speculative_generate_step (`native`), our SpeculativeSequence rounds
(`ours`), MlxBackend.step around them (`backend`) and the Engine loop with a
transport that drops frames (`engine`); 128 tokens, 7 runs each, medians.

    PYTHONPATH=python-worker python benches/speculative_layers.py MODELS_DIR [tokens [RUNS]]
    (MODELS_DIR holds smollm2-135m and smollm2-135m-q4)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import generation_stream, speculative_generate_step

from mlxd_worker.engines.backend import MlxBackend, RowOptions
from mlxd_worker.engines.engine import Engine
from mlxd_worker.io import frames
from mlxd_worker.lanes.speculative import SpeculativeSequence

MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


class DropFrames:
    native = False

    def send(self, kind: int, payload: bytes) -> None: ...
    def beat(self) -> None: ...
    def send_tokens(self, entries: list[tuple[int, int, str]]) -> None: ...
    def recv(self) -> None: ...


def rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    models = sys.argv[1]
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    backend = MlxBackend()
    engine = Engine(DropFrames(), backend)
    spec = {"draft": "q4", "draft_path": f"{models}/smollm2-135m-q4", "mode": "on", "num_draft_tokens": 3}
    engine._load({"model_path": f"{models}/smollm2-135m", "model_name": "x", "options": {"speculative": spec}})
    model, draft = backend._model, backend._draft
    ids = engine._prompt_ids({"messages": MESSAGES})

    def native() -> float:
        stamps = []
        for _ in speculative_generate_step(mx.array(ids), model, draft, num_draft_tokens=3, max_tokens=tokens):
            stamps.append(time.perf_counter())
        return rate(stamps)

    def ours() -> float:
        seq = SpeculativeSequence(model, draft, ids, tokens, None, 3, 2048, generation_stream)
        stamps: list[float] = []
        while seq.left > 0:
            out = seq.step()
            stamps += [time.perf_counter()] * len(out)
        return rate(stamps)

    def in_backend() -> float:
        uid = backend.insert(ids, tokens, None, RowOptions(speculative=True))
        stamps: list[float] = []
        done = False
        while not done:
            results = backend.step()
            stamps += [time.perf_counter()] * len(results)
            done = any(finish for _, _, finish in results)
        backend.take_counts(uid)
        return rate(stamps)

    request_ids = iter(range(1000, 10**6))

    def in_engine() -> float:
        req = {"id": next(request_ids), "messages": MESSAGES, "max_tokens": tokens, "speculative": True}
        engine.submit(frames.GENERATE, json.dumps(req).encode())
        engine._drain_inbox(block=False)
        stamps: list[float] = []
        while engine._by_uid:
            engine._beat()
            engine._drain_inbox(block=False)
            before = engine.counters.step_tokens
            engine._step()
            stamps += [time.perf_counter()] * (engine.counters.step_tokens - before)
        return rate(stamps)

    sides: dict[str, Callable[[], float]] = {
        "native": native,
        "ours": ours,
        "backend": in_backend,
        "engine": in_engine,
    }
    for side in sides.values():  # warm-up
        side()
    results: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(runs):
        for name, side in sides.items():
            results[name].append(side())
    for name, v in results.items():
        print(f"{name:8} median {statistics.median(v):7.1f} tok/s  ({min(v):.1f}..{max(v):.1f})", flush=True)


if __name__ == "__main__":
    main()
