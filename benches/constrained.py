"""Constrained decoding's per-token cost: decode tok/s with and without a JSON schema.

In one invocation, on the same model, prompt and greedy settings:
- `native`: mlx-lm in-process, `stream_generate` plain, and with the worker's
  llguidance logits processor for the same schema (the mask, nothing else);
- `mlxd`: a real daemon, one stream (runs interleaved plain/schema) and 8 streams at
  once (aggregate tok/s), with `response_format: json_schema`;
- `batch`: mlx-lm's BatchGenerator in-process at B rows (`--batch-sizes`), every row
  constrained or none: decode tok/s plain, with mlx-lm's own step (each row's
  processor in turn) and with the worker's (engines/masked_batch.py: all rows'
  masks at once, filled while the forward pass runs).
The schema (`--schema story`) holds one string with a large minLength, so a
constrained answer runs to max_tokens like a plain one: both decode the same number
of tokens; `--schema records` is rows of fixed keys (most tokens forced). Decode tok/s
counts tokens after the first over the time from the first to the last; figures are
medians with min..max. The cost per token is 1/tps(schema) - 1/tps(plain); its share
is that over 1/tps(schema).

    scripts/bench constrained [--runs 5] [--max-tokens 48] [--model smollm2-135m]
        [--models-dir DIR] [--mlxd PATH] [--json-out FILE]
        [--parts native,mlxd,batch] [--batch-sizes 8,64] [--schema story|records]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import daemon
import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a robot who learns to paint."
SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 4000}},
    "required": ["story"],
}
# `--schema records`: rows of fixed keys, as an agent's structured output looks. The
# keys and punctuation between the values are forced: a lone mlxd stream feeds them
# in the pass of the token before (fast-forward), mlx-lm's processor one per step.
RECORDS = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 500,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 10},
                    "id": {"type": "integer", "minimum": 0, "maximum": 99},
                    "done": {"type": "boolean"},
                },
                "required": ["name", "id", "done"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
SCHEMAS = {"story": SCHEMA, "records": RECORDS}
CONCURRENCY = 8


def native_run(model: Any, tokenizer: Any, ids: list[int], n: int, processor: Any) -> float:
    from mlx_lm.generate import stream_generate

    kwargs = {"logits_processors": [processor]} if processor is not None else {}
    stamps = [time.perf_counter() for _ in stream_generate(model, tokenizer, ids, max_tokens=n, **kwargs)]
    span = stamps[-1] - stamps[0]
    return (len(stamps) - 1) / span if span > 0 else 0.0


def native(args: argparse.Namespace) -> dict[str, list[float]]:
    import mlx_lm

    sys.path.insert(0, str(ROOT / "python-worker"))
    from mlxd_worker.requests.constraint import Grammars

    model, tokenizer = mlx_lm.load(str(Path(args.models_dir) / args.model))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    grammars = Grammars(tokenizer, frozenset(tokenizer.eos_token_ids))
    grammar = grammars.for_format({"type": "json_schema", "schema": SCHEMAS[args.schema]})
    native_run(model, tokenizer, ids, 8, None)  # warm-up
    out: dict[str, list[float]] = {"plain": [], "schema": []}
    for _ in range(args.runs):
        out["plain"].append(native_run(model, tokenizer, ids, args.max_tokens, None))
        constraint = grammars.constraint(grammar)
        constraint.prompt_len = len(ids)  # what the backend sets at insert
        processor = constraint.processor(list(ids))
        out["schema"].append(native_run(model, tokenizer, ids, args.max_tokens, processor))
    return out


def batch_run(model: Any, gen_rows: list[list[int]], n: int, procs: list[list[Any]] | None, masked: bool) -> float:
    """Decode tok/s of one BatchGenerator filled with `gen_rows` at once: tokens after
    each row's first over the time from the first decode step to the last."""
    from mlx_lm.generate import BatchGenerator

    from mlxd_worker.engines.masked_batch import MaskedGenerationBatch

    gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=len(gen_rows), prefill_batch_size=len(gen_rows))
    if masked:
        gen._generation_batch = MaskedGenerationBatch.empty(gen.model, gen.sampler)
    gen.insert(gen_rows, max_tokens=[n] * len(gen_rows), logits_processors=procs)
    tokens, start = 0, 0.0
    while True:
        _, responses = gen.next()
        if responses and not start:
            start = time.perf_counter()  # the first tokens: prefill done
        elif responses:
            tokens += len(responses)
        elif start:
            break
    span = time.perf_counter() - start
    gen.close()
    return tokens / span


def batch(args: argparse.Namespace) -> dict[str, list[float]]:
    import mlx_lm

    sys.path.insert(0, str(ROOT / "python-worker"))
    from mlxd_worker.requests.constraint import Grammars

    model, tokenizer = mlx_lm.load(str(Path(args.models_dir) / args.model))
    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True))
    grammars = Grammars(tokenizer, frozenset(tokenizer.eos_token_ids))
    grammar = grammars.for_format({"type": "json_schema", "schema": SCHEMAS[args.schema]})

    def processors(b: int) -> list[list[Any]]:
        out = []
        for _ in range(b):
            constraint = grammars.constraint(grammar)
            constraint.prompt_len = len(ids)
            out.append([constraint.processor(list(ids))])
        return out

    out: dict[str, list[float]] = {}
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        rows = [list(ids) for _ in range(b)]
        batch_run(model, rows, 4, None, False)  # warm-up
        batch_run(model, rows, 4, processors(b), True)
        for _ in range(args.runs):
            out.setdefault(f"plain_b{b}", []).append(batch_run(model, rows, args.max_tokens, None, False))
            out.setdefault(f"mlx_lm_b{b}", []).append(batch_run(model, rows, args.max_tokens, processors(b), False))
            out.setdefault(f"ours_b{b}", []).append(batch_run(model, rows, args.max_tokens, processors(b), True))
    return out


def start_mlxd(args: argparse.Namespace, home: Path) -> tuple[subprocess.Popen, str]:
    preset = f'model = "{args.model}"\nkeep_alive = "-1"\nmax_concurrent = {CONCURRENCY}\n'
    proc, url, _ = daemon.start_mlxd(args.mlxd, home, args.models_dir, {"bench-constrained": preset})
    return proc, url


def stream_once(url: str, n: int, schema: dict[str, Any] | None) -> tuple[list[float], int]:
    """Arrival times of a streamed answer's text chunks (a slow reader gets several
    tokens in one), and the tokens it decoded (from its usage chunk)."""
    body: dict[str, Any] = {
        "model": "bench-constrained",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": n,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    stamps: list[float] = []
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                stamps.append(time.perf_counter())
            elif line.startswith("data: {") and '"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    if tokens < n // 2 or len(stamps) < 2:
        raise RuntimeError(f"{tokens} tokens in {len(stamps)} chunks for max_tokens {n}")
    return stamps, tokens


def decode_tps(run: tuple[list[float], int]) -> float:
    stamps, tokens = run
    span = stamps[-1] - stamps[0]
    return (tokens - 1) / span if span > 0 else 0.0


def concurrent_tps(url: str, n: int, schema: dict[str, Any] | None) -> float:
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        runs = list(pool.map(lambda _: stream_once(url, n, schema), range(CONCURRENCY)))
    first = min(stamps[0] for stamps, _ in runs)
    last = max(stamps[-1] for stamps, _ in runs)
    return sum(tokens - 1 for _, tokens in runs) / (last - first)


def mlxd(args: argparse.Namespace) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"plain": [], "schema": [], "plain_c8": [], "schema_c8": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_mlxd(args, Path(tmp))
        try:
            schema = SCHEMAS[args.schema]
            stream_once(url, 24, schema)  # load, and compile the masked path
            for _ in range(args.runs):
                out["plain"].append(decode_tps(stream_once(url, args.max_tokens, None)))
                out["schema"].append(decode_tps(stream_once(url, args.max_tokens, schema)))
            for _ in range(max(1, args.runs // 2)):
                out["plain_c8"].append(concurrent_tps(url, args.max_tokens, None))
                out["schema_c8"].append(concurrent_tps(url, args.max_tokens, schema))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summary(xs: list[float]) -> str:
    return f"{med(xs):8.2f} ({min(xs):.1f}..{max(xs):.1f})" if xs else "-"


def cost(plain: float, schema: float) -> str:
    if plain <= 0 or schema <= 0:
        return "-"
    per_token = 1 / schema - 1 / plain
    return f"{per_token * 1e3:+.2f} ms/token ({per_token * schema:+.0%} of a constrained token)"


def main() -> None:
    home = Path(os.environ.get("MLXD_HOME") or Path.home() / ".mlxd")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--models-dir", default=os.environ.get("MLXD_MODELS_DIR") or str(home / "models"))
    p.add_argument("--mlxd", default=str(ROOT / "target" / "release" / "mlxd"))
    p.add_argument("--json-out")
    p.add_argument("--parts", default="native,mlxd,batch")
    p.add_argument("--batch-sizes", default="8,64")
    p.add_argument("--schema", choices=sorted(SCHEMAS), default="story")
    args = p.parse_args()
    parts = args.parts.split(",")

    rows = batch(args) if "batch" in parts else {}
    nat = native(args) if "native" in parts else {}
    ours = mlxd(args) if "mlxd" in parts else {}
    print(
        f"constrained decoding ({platform.machine()}, {args.model}, {args.max_tokens} tokens, {args.runs} runs, "
        f"schema {args.schema})"
    )
    print(f"{'':26}{'tok/s median (min..max)':>26}")
    for b in [int(x) for x in args.batch_sizes.split(",")] if rows else []:
        plain, theirs, mine = rows[f"plain_b{b}"], rows[f"mlx_lm_b{b}"], rows[f"ours_b{b}"]
        print(f"{f'batch B={b} plain':26}{summary(plain):>26}")
        print(f"{f'batch B={b} mlx-lm step':26}{summary(theirs):>26}")
        print(f"{f'batch B={b} mlxd step':26}{summary(mine):>26}")
        print(
            f"  schema/plain: mlx-lm's step {med(theirs) / med(plain):.2f}x, mlxd's {med(mine) / med(plain):.2f}x; "
            f"mlxd/mlx-lm {med(mine) / med(theirs):.2f}x"
        )
    if not ours or not nat:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"batch": rows, "args": vars(args)}, indent=1))
        return
    for name, xs in [
        ("native plain", nat["plain"]),
        ("native json_schema", nat["schema"]),
        ("mlxd plain", ours["plain"]),
        ("mlxd json_schema", ours["schema"]),
        (f"mlxd plain x{CONCURRENCY}", ours["plain_c8"]),
        (f"mlxd json_schema x{CONCURRENCY}", ours["schema_c8"]),
    ]:
        print(f"{name:26}{summary(xs):>26}")
    print(
        f"native: schema/plain {med(nat['schema']) / med(nat['plain']):.2f}x, "
        f"{cost(med(nat['plain']), med(nat['schema']))}"
    )
    print(
        f"mlxd 1 stream: schema/plain {med(ours['schema']) / med(ours['plain']):.2f}x, "
        f"{cost(med(ours['plain']), med(ours['schema']))}"
    )
    print(
        f"mlxd x{CONCURRENCY} aggregate: schema/plain {med(ours['schema_c8']) / med(ours['plain_c8']):.2f}x, "
        f"{cost(med(ours['plain_c8']), med(ours['schema_c8']))} (per token of the batch)"
    )
    print(
        f"mlxd/native: plain {med(ours['plain']) / med(nat['plain']):.2f}x, "
        f"json_schema {med(ours['schema']) / med(nat['schema']):.2f}x"
    )
    if args.json_out:
        figures = {"native": nat, "mlxd": ours, "batch": rows, "args": vars(args)}
        Path(args.json_out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
