"""Single-stream decode through mlxd (shm and stdio) against native mlx-lm.

Runs, in one process and interleaved (native, shm, stdio, native, ...): native
``mlx_lm.stream_generate`` in-process, and the same model, prompt and greedy
settings through a real mlxd daemon over each transport. Decode speed is
measured the same way on every side, from the client's view: (tokens - 1) /
(time of last token - time of first token). Prints medians, spread and the
ratio to native, plus JSON.

    scripts/bench [--runs 5] [--max-tokens 48] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


def native_run(model, tokenizer, max_tokens: int) -> dict:
    from mlx_lm import stream_generate

    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    t0 = time.perf_counter()
    stamps = []
    for _ in stream_generate(model, tokenizer, ids, max_tokens=max_tokens):
        stamps.append(time.perf_counter())
    return summarize(t0, stamps)


def mlxd_run(url: str, model: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["delta"].get("content"):
                stamps.append(time.perf_counter())
    return summarize(t0, stamps)


def summarize(t0: float, stamps: list[float]) -> dict:
    n = len(stamps)
    decode = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0
    return {"tokens": n, "ttft_s": stamps[0] - t0, "decode_tps": decode}


def start_daemon() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            str(ROOT / "target/release/mlxd"),
            "serve",
            "--port",
            "0",
            "--presets-dir",
            str(ROOT / "tests/presets"),
            "--exit-on-stdin-eof",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLXD_LOG": "warn"},
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip().removeprefix("mlxd listening on ")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--models-dir", default=os.environ.get("MLXD_MODELS_DIR", str(Path.home() / ".mlxd/models")))
    args = ap.parse_args()

    from mlx_lm import load

    model, tokenizer = load(f"{args.models_dir}/{args.model}")
    proc, url = start_daemon()
    sides = {
        "native": lambda: native_run(model, tokenizer, args.max_tokens),
        "mlxd-shm": lambda: mlxd_run(url, args.model, args.max_tokens),
        "mlxd-stdio": lambda: mlxd_run(url, f"{args.model}-stdio", args.max_tokens),
    }
    for run in sides.values():  # warm-up: worker start, kernel compilation
        run()
    results: dict[str, list[dict]] = {k: [] for k in sides}
    for i in range(args.runs):
        for name, run in sides.items():
            results[name].append(run())
        print(
            f"run {i + 1}/{args.runs}: "
            + ", ".join(f"{k} {v[-1]['decode_tps']:.2f} tok/s" for k, v in results.items()),
            flush=True,
        )
    proc.terminate()
    proc.wait(timeout=30)

    native = statistics.median(r["decode_tps"] for r in results["native"])
    report = {}
    print(f"\n{'side':<12} {'decode tok/s (median)':>22} {'min..max':>16} {'ratio':>7} {'TTFT ms':>8} {'tokens':>6}")
    for name, runs in results.items():
        tps = [r["decode_tps"] for r in runs]
        med = statistics.median(tps)
        ttft = statistics.median(r["ttft_s"] for r in runs) * 1000
        report[name] = {
            "decode_tps_median": med,
            "decode_tps_min": min(tps),
            "decode_tps_max": max(tps),
            "ratio_to_native": med / native,
            "ttft_ms_median": ttft,
            "tokens": runs[0]["tokens"],
        }
        print(
            f"{name:<12} {med:>22.2f} {min(tps):>7.2f}..{max(tps):<7.2f} {med / native:>7.3f} {ttft:>8.0f} "
            f"{runs[0]['tokens']:>6}"
        )
    print(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "runs": args.runs, "results": report}))


if __name__ == "__main__":
    main()
