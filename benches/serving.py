"""End-to-end serving benchmark: native mlx-lm, mlxd over shm and stdio, mlx_lm.server.

In one invocation, on the same model, prompts and greedy settings:
- `native`: mlx-lm in-process, no HTTP (stream_generate for one stream, BatchGenerator
  for several);
- `mlxd-shm`, `mlxd-stdio`: a real daemon and worker over each transport;
- `mlx_lm.server`: mlx-lm's own HTTP server.

Scenarios: one stream with a short prompt and with a ~500-token prompt (decode tok/s
and TTFT), then concurrency 1/4/8/16 (aggregate tok/s, p50/p95 TTFT). Native batching
is BatchGenerator with `--native-batch` rows (default: 32), or `c` at concurrency c with
`--native-batch c`. `mlxd-wide` is a preset with `max_concurrent` = the largest level.
For each mlxd side the worker's engine time per scenario (prefill, decode, its own
work between passes: host) and mean batch come from /metrics. Sides are
interleaved run by run; figures are medians over runs with min..max, and each is
compared with native. Every request's prompt starts with a fresh nonce so no side
gets a prompt-cache hit. TTFT is measured from the call (native: from before the
chat template) to the first text.

    scripts/bench serving [--runs 5] [--max-tokens 32] [--concurrency 1,4,8,16] [--native-batch 32|c]
        [--model smollm2-135m] [--models-dir DIR] [--mlxd PATH] [--json-out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOPICS = [
    "a lighthouse keeper and a storm",
    "a robot learning to paint",
    "a city under the sea",
    "a dragon who loves books",
    "two rival bakers",
    "a lost astronaut",
    "a talking river",
    "the last train home",
]
PARAGRAPH = (
    "The harbour town woke slowly. Fishermen checked their nets, the baker pulled the first loaves "
    "from the oven, and gulls argued over scraps on the pier. Out past the breakwater the sea was "
    "grey and restless, and the old lighthouse stood watch as it had for a hundred years. "
)
_nonce = itertools.count(1)


def messages(topic: str, long: bool = False, tokenizer: Any = None) -> list[dict[str, str]]:
    """A fresh prompt (its nonce defeats prompt caches); `long` makes it ~500 tokens."""
    # The nonce opens the system message: chat templates put a fixed system prompt
    # first otherwise, which a prefix cache would share across requests.
    system = {"role": "system", "content": f"Request {next(_nonce)}. You are a helpful storyteller."}
    if not long:
        return [system, {"role": "user", "content": f"Write a long story about {topic}."}]
    body = ""
    while tokenizer is None or len(tokenizer.encode(body)) < 470:
        body += PARAGRAPH
        if tokenizer is None and len(body) > 2400:
            break
    return [system, {"role": "user", "content": f"{body}\nContinue this story at length."}]


# -- one request, each side ---------------------------------------------------------


def run_native_single(model: Any, tokenizer: Any, msgs: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    from mlx_lm import stream_generate

    t0 = time.perf_counter()
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    stamps = [time.perf_counter() for _ in stream_generate(model, tokenizer, ids, max_tokens=max_tokens)]
    return {"t0": t0, "stamps": stamps, "tokens": len(stamps)}


def run_native_batch(
    model: Any, tokenizer: Any, batch: list[list[dict[str, str]]], max_tokens: int, rows: int = 32
) -> list[dict]:
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], completion_batch_size=rows)
    t0 = time.perf_counter()
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in batch]
    uids = gen.insert(prompts, max_tokens=[max_tokens] * len(prompts))
    stamps: dict[int, list[float]] = {u: [] for u in uids}
    live = set(uids)
    while live:
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            stamps[r.uid].append(now)
            if r.finish_reason is not None:
                live.discard(r.uid)
    gen.close()
    return [{"t0": t0, "stamps": stamps[u], "tokens": len(stamps[u])} for u in uids]


def run_http(client: httpx.Client, url: str, model: str, msgs: list[dict[str, str]], max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": msgs,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as resp:
            if resp.status_code != 200:
                return {"t0": t0, "stamps": [], "tokens": 0, "error": f"{resp.status_code}: {resp.read()[:200]!r}"}
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    return {"t0": t0, "stamps": stamps, "tokens": 0, "error": str(chunk["error"])[:200]}
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as e:  # counted and reported, not fatal: errors under load are a figure
        return {"t0": t0, "stamps": stamps, "tokens": 0, "error": repr(e)[:200]}
    return {"t0": t0, "stamps": stamps, "tokens": usage if usage is not None else len(stamps)}


# -- servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mlxd(mlxd: str, model: str, models_dir: str, presets: Path, wide: int) -> tuple[subprocess.Popen, str]:
    presets.mkdir(parents=True, exist_ok=True)
    (presets / f"{model}.toml").write_text(f'model = "{model}"\n')
    (presets / f"{model}-stdio.toml").write_text(f'model = "{model}"\ntransport = "stdio"\n')
    (presets / f"{model}-wide.toml").write_text(f'model = "{model}"\nmax_concurrent = {wide}\n')
    proc = subprocess.Popen(
        [mlxd, "serve", "--port", "0", "--presets-dir", str(presets), "--exit-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLXD_LOG": os.environ.get("MLXD_LOG", "warn"), "MLXD_MODELS_DIR": models_dir},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("mlxd listening on "), line
    return proc, line.removeprefix("mlxd listening on ")


def start_mlx_lm_server(model_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm.server", "--model", model_path, "--port", str(port)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("mlx_lm.server exited")
        time.sleep(0.2)
    raise RuntimeError("mlx_lm.server did not start")


# -- measuring -------------------------------------------------------------------------------


def single_figures(r: dict[str, Any]) -> dict[str, float]:
    # Tokens from the usage count: a client that falls behind may get several
    # tokens in one SSE chunk, so chunks under-count them.
    s, n = r["stamps"], r["tokens"]
    return {
        "tps": (n - 1) / (s[-1] - s[0]) if len(s) > 1 else 0.0,
        "ttft_ms": (s[0] - r["t0"]) * 1000 if s else float("nan"),
        "tokens": r["tokens"],
    }


def batch_figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    t0 = min(r["t0"] for r in results)
    end = max((r["stamps"][-1] for r in results if r["stamps"]), default=t0 + 1e-9)
    errors = [r["error"] for r in results if r.get("error")]
    for e in sorted(set(errors)):
        print(f"  error x{errors.count(e)}: {e}", file=sys.stderr)
    return {
        "tps": sum(r["tokens"] for r in results) / (end - t0),
        "ttfts_ms": [(r["stamps"][0] - r["t0"]) * 1000 for r in results if r["stamps"] and not r.get("error")],
        "tokens": sum(r["tokens"] for r in results),
        "errors": len(errors),
    }


ENGINE_PARTS = ("prefill", "decode", "host")


def engine_counters(url: str, model: str) -> dict[str, float]:
    """The worker's engine seconds by part, and its steps and tokens (/metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {p: 0.0 for p in (*ENGINE_PARTS, "steps", "tokens")}
    label = f'model="{model}"'
    for line in text.splitlines():
        if label not in line or line.startswith("#"):
            continue
        name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
        if name == "mlxd_worker_engine_seconds":
            out[line.split('part="', 1)[1].split('"', 1)[0]] = value
        elif name == "mlxd_worker_batch_steps_total":
            out["steps"] = value
        elif name == "mlxd_worker_batch_tokens_total":
            out["tokens"] = value
    return out


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--models-dir", default=os.environ.get("MLXD_MODELS_DIR", str(Path.home() / ".mlxd/models")))
    ap.add_argument("--mlxd", default=str(ROOT / "target/release/mlxd"))
    ap.add_argument("--sides", default="native,mlxd-shm,mlxd-stdio,mlx_lm.server")
    ap.add_argument("--native-batch", default="32", help="BatchGenerator's rows: a number, or c (the concurrency)")
    ap.add_argument("--json-out")
    ap.add_argument("--quick", action="store_true", help="2 runs, concurrency 1 and 8")
    ap.add_argument("--skip-single", action="store_true", help="only the concurrency scenarios")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.concurrency = 2, "1,8"
    levels = [int(c) for c in args.concurrency.split(",")]
    wanted = args.sides.split(",")

    import mlx.core as mx
    from mlx_lm import load

    model_path = f"{args.models_dir}/{args.model}"
    model, tokenizer = load(model_path)
    procs: list[subprocess.Popen] = []
    sides: dict[str, tuple[Callable[..., dict], Callable[..., list[dict]]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="mlxd-bench-"))
    local = threading.local()

    def http_client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=900)
        return local.client

    pool = ThreadPoolExecutor(max(levels))

    def http_side(url: str, name: str) -> tuple[Callable[..., dict], Callable[..., list[dict]]]:
        def single(msgs: list[dict[str, str]], n: int) -> dict:
            return run_http(http_client(), url, name, msgs, n)

        def batch(batch: list[list[dict[str, str]]], n: int) -> list[dict]:
            # The burst leaves together: without the barrier the first thread sends while
            # the others wait for the GIL (~90 ms at 32 threads), which spreads the burst
            # over the server's first step and charges the client's slowness to the server.
            ready = threading.Barrier(len(batch))

            def send(m: list[dict[str, str]]) -> dict:
                client = http_client()
                ready.wait()
                return run_http(client, url, name, m, n)

            return list(pool.map(send, batch))

        return single, batch

    try:
        if "native" in wanted:

            def native_rows(batch: list[Any]) -> int:
                return len(batch) if args.native_batch == "c" else int(args.native_batch)

            sides["native"] = (
                lambda msgs, n: run_native_single(model, tokenizer, msgs, n),
                lambda batch, n: run_native_batch(model, tokenizer, batch, n, native_rows(batch)),
            )
        mlxd_models: dict[str, str] = {}  # side -> its preset's name
        mlxd_url = ""
        if {"mlxd-shm", "mlxd-stdio", "mlxd-wide"} & set(wanted):
            proc, mlxd_url = start_mlxd(args.mlxd, args.model, args.models_dir, tmp / "presets", max(levels))
            procs.append(proc)
            for side, name in (
                ("mlxd-shm", args.model),
                ("mlxd-stdio", f"{args.model}-stdio"),
                ("mlxd-wide", f"{args.model}-wide"),
            ):
                if side in wanted:
                    sides[side] = http_side(mlxd_url, name)
                    mlxd_models[side] = name
        if "mlx_lm.server" in wanted:
            proc, url = start_mlx_lm_server(model_path)
            procs.append(proc)
            sides["mlx_lm.server"] = http_side(url, "default_model")

        # Warm-up: worker start, kernel compilation, and (HTTP sides) every pool thread's
        # client and connection, which would otherwise be made during the first run of the
        # widest level and spread its burst.
        for name, (single, batch) in sides.items():
            single(messages(TOPICS[0]), 4)
            batch([messages(TOPICS[i % len(TOPICS)]) for i in range(max(levels))], 4)
            print(f"warmed up {name}", flush=True)

        report: dict[str, Any] = {}
        singles = () if args.skip_single else (("single-short", False), ("single-long", True))
        for label, long in singles:
            got: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
            for _ in range(args.runs):
                for name, (single, _) in sides.items():
                    msgs = messages(TOPICS[1], long=long, tokenizer=tokenizer)
                    got[name].append(single_figures(single(msgs, args.max_tokens)))
            report[label] = summarize_single(label, got)
        for c in levels:
            got_b: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
            engine: dict[str, dict[str, float]] = {k: {} for k in mlxd_models}
            for _ in range(args.runs):
                for name, (_, batch) in sides.items():
                    prompts = [messages(TOPICS[i % len(TOPICS)]) for i in range(c)]
                    before = engine_counters(mlxd_url, mlxd_models[name]) if name in mlxd_models else {}
                    got_b[name].append(batch_figures(batch(prompts, args.max_tokens)))
                    if name in mlxd_models:
                        time.sleep(1.2)  # the worker's next Stats frame
                        after = engine_counters(mlxd_url, mlxd_models[name])
                        for k, v in after.items():
                            engine[name][k] = engine[name].get(k, 0.0) + v - before[k]
            report[f"concurrency-{c}"] = summarize_batch(f"concurrency {c}", got_b)
            report[f"concurrency-{c}"]["engine"] = summarize_engine(engine)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        pool.shutdown(wait=False)

    out = {
        "bench": "serving",
        "model": args.model,
        "max_tokens": args.max_tokens,
        "runs": args.runs,
        "host": {
            "mlx": mx.__version__,
            "device": str(mx.default_device()),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "scenarios": report,
    }
    line = json.dumps(out)
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line)


def summarize_engine(engine: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Where each mlxd side's worker spent the scenario's runs (all runs together)."""
    out: dict[str, Any] = {}
    for name, e in engine.items():
        if not e:
            continue
        busy = sum(e[p] for p in ENGINE_PARTS) or 1.0
        steps = e["steps"] or 1.0
        shares = " ".join(f"{p} {e[p]:.2f}s ({100 * e[p] / busy:.0f}%)" for p in ENGINE_PARTS)
        print(
            f"  {name} engine: {shares}; {e['steps']:.0f} steps, mean batch {e['tokens'] / steps:.1f}, "
            f"host {1000 * e['host'] / steps:.2f} ms/step"
        )
        out[name] = e
    return out


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarize_single(label: str, got: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    native = got.get("native")
    base_tps = statistics.median(r["tps"] for r in native) if native else None
    base_ttft = statistics.median(r["ttft_ms"] for r in native) if native else None
    print(f"\n{label}: one stream")
    head = ("side", "decode tok/s", "min..max", "ratio", "TTFT ms", "added ms", "tokens")
    print("{:<14} {:>12} {:>16} {:>7} {:>9} {:>9} {:>7}".format(*head))
    out = {}
    for name, runs in got.items():
        tps, lo, hi = spread([r["tps"] for r in runs])
        ttft = statistics.median(r["ttft_ms"] for r in runs)
        ratio = tps / base_tps if base_tps else float("nan")
        added = ttft - base_ttft if base_ttft is not None else float("nan")
        tokens = int(statistics.median(r["tokens"] for r in runs))
        print(f"{name:<14} {tps:>12.2f} {lo:>7.2f}..{hi:<7.2f} {ratio:>7.3f} {ttft:>9.1f} {added:>9.1f} {tokens:>7}")
        out[name] = {
            "decode_tps_median": tps,
            "decode_tps_min": lo,
            "decode_tps_max": hi,
            "ratio_to_native": ratio,
            "ttft_ms_median": ttft,
            "ttft_added_ms": added,
            "tokens": tokens,
        }
    return out


def summarize_batch(label: str, got: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    native = got.get("native")
    base = statistics.median(r["tps"] for r in native) if native else None
    print(f"\n{label}: aggregate")
    print(f"{'side':<14} {'tok/s':>10} {'min..max':>18} {'ratio':>7} {'TTFT p50 ms':>12} {'p95 ms':>9} {'errors':>7}")
    out = {}
    for name, runs in got.items():
        tps, lo, hi = spread([r["tps"] for r in runs])
        ttfts = [t for r in runs for t in r["ttfts_ms"]]
        p50, p95 = percentile(ttfts, 0.5), percentile(ttfts, 0.95)
        ratio = tps / base if base else float("nan")
        errors = sum(r.get("errors", 0) for r in runs)
        print(f"{name:<14} {tps:>10.2f} {lo:>8.2f}..{hi:<8.2f} {ratio:>7.3f} {p50:>12.1f} {p95:>9.1f} {errors:>7}")
        out[name] = {
            "tps_median": tps,
            "tps_min": lo,
            "tps_max": hi,
            "ratio_to_native": ratio,
            "ttft_p50_ms": p50,
            "ttft_p95_ms": p95,
            "errors": errors,
        }
    return out


if __name__ == "__main__":
    main()
