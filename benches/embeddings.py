"""Embedding throughput: inputs per second, one at a time vs batched, in-process and
through mlxd with many clients at once.

In one invocation, on the same model and inputs (sentences of 8-40 words):
- `native`: the worker's embedding model in-process (models/embedder.py), one input per pass,
  then passes of 64 inputs sorted by length: the model's batched forward-pass rate;
- `mlxd`: a real daemon, `/v1/embeddings` with one input per request from 1 client,
  and from 16 clients at once (each request one input): what dynamic batching gives
  clients that each send one text.

    scripts/bench embeddings [--inputs 512] [--runs 3] [--model all-minilm-l6-v2]
        [--models-dir DIR] [--mlxd PATH] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import daemon
import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a model serves many agents on one machine and every request gets its answer in time".split()


def sentences(n: int) -> list[str]:
    rng = random.Random(7)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 41))) for _ in range(n)]


def native(args: argparse.Namespace, texts: list[str]) -> dict[str, list[float]]:
    sys.path.insert(0, str(ROOT / "python-worker"))
    from mlxd_worker.models import embedder

    model = embedder.load(Path(args.models_dir) / args.model)
    rows = [model.tokenize(t) for t in texts]
    model.embed(rows[:64])  # warm-up
    out: dict[str, list[float]] = {"one_by_one": [], "batched": []}
    for _ in range(args.runs):
        t0 = time.perf_counter()
        for r in rows:
            model.embed([r])
        out["one_by_one"].append(len(rows) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        ordered = sorted(rows, key=len)
        for i in range(0, len(ordered), 64):
            model.embed(ordered[i : i + 64])
        out["batched"].append(len(rows) / (time.perf_counter() - t0))
    return out


def mlxd(args: argparse.Namespace, texts: list[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"c1": [], "c16": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, _ = daemon.start_mlxd(
            args.mlxd, Path(tmp), args.models_dir, {"bench-embed": f'model = "{args.model}"\nkeep_alive = "-1"\n'}
        )
        try:
            with httpx.Client(timeout=600) as client:

                def one(text: str) -> None:
                    r = client.post(f"{url}/v1/embeddings", json={"model": "bench-embed", "input": text})
                    r.raise_for_status()

                one("warm up")
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    for t in texts:
                        one(t)
                    out["c1"].append(len(texts) / (time.perf_counter() - t0))
                    t0 = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(16) as pool:
                        list(pool.map(one, texts))
                    out["c16"].append(len(texts) / (time.perf_counter() - t0))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return out


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.1f} ({min(xs):.1f}..{max(xs):.1f})"


def main() -> None:
    home = Path(os.environ.get("MLXD_HOME") or Path.home() / ".mlxd")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument("--models-dir", default=os.environ.get("MLXD_MODELS_DIR") or str(home / "models"))
    p.add_argument("--mlxd", default=str(ROOT / "target" / "release" / "mlxd"))
    p.add_argument("--json-out")
    args = p.parse_args()
    texts = sentences(args.inputs)
    nat = native(args, texts)
    ours = mlxd(args, texts)
    print(f"embeddings ({platform.machine()}, {args.model}, {args.inputs} inputs of 8-40 words, {args.runs} runs)")
    print(f"{'':40}{'inputs/s median (min..max)':>28}")
    rows = [
        ("native, one input per pass", nat["one_by_one"]),
        ("native, 64 per pass (by length)", nat["batched"]),
        ("mlxd, 1 client, 1 input per request", ours["c1"]),
        ("mlxd, 16 clients, 1 input per request", ours["c16"]),
    ]
    for name, xs in rows:
        print(f"{name:40}{summary(xs):>28}")
    med = statistics.median
    print(
        f"mlxd x16 / native batched {med(ours['c16']) / med(nat['batched']):.2f}x; "
        f"mlxd x16 / mlxd x1 {med(ours['c16']) / med(ours['c1']):.2f}x"
    )
    if args.json_out:
        result: dict[str, Any] = {"native": nat, "mlxd": ours, "args": vars(args)}
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
