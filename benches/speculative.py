"""Speculative decoding: native mlx-lm against mlxd, drafting and plain, one run.

In one invocation, on the same target/draft pair, prompt and greedy settings, runs
interleaved (native plain, native drafting, mlxd drafting, mlxd plain, ...):
- `native`: mlx-lm in-process, `stream_generate` without and with `draft_model`;
- `mlxd`: a real daemon whose preset drafts with `mode = "on"`, measured by its own
  `POST /admin/benchmark` (drafting forced on and off per request).
Decode tok/s counts tokens after the first over the time from the first to the last;
figures are medians with min..max. Then a preset with `mode = "auto"` is loaded and
its decision is printed: whether it drafts, why, and what it measured at load.

    scripts/bench speculative [--runs 5] [--max-tokens 64] [--num-draft 3]
        [--target smollm2-135m] [--draft smollm2-135m-q4] [--models-dir DIR]
        [--mlxd PATH] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import daemon
import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a robot who learns to paint."


def run_native(model: Any, tokenizer: Any, draft: Any, ids: list[int], n: int, num_draft: int) -> dict:
    from mlx_lm.generate import stream_generate

    kwargs: dict[str, Any] = {"draft_model": draft, "num_draft_tokens": num_draft} if draft is not None else {}
    t0 = time.perf_counter()
    stamps: list[float] = []
    accepted = 0
    for r in stream_generate(model, tokenizer, ids, max_tokens=n, **kwargs):
        stamps.append(time.perf_counter())
        accepted += bool(r.from_draft)
    span = stamps[-1] - stamps[0]
    return {
        "ttft_ms": (stamps[0] - t0) * 1e3,
        "decode_tps": (len(stamps) - 1) / span if span > 0 else 0.0,
        "tokens": len(stamps),
        "accepted": accepted,
    }


def start_mlxd(args: argparse.Namespace, home: Path) -> tuple[subprocess.Popen, str, Path]:
    presets = {
        name: f'model = "{args.target}"\nkeep_alive = "-1"\n[speculative]\ndraft = "{args.draft}"\n'
        f'num_draft_tokens = {args.num_draft}\nmode = "{mode}"\n'
        for name, mode in [("bench-spec-on", "on"), ("bench-spec-auto", "auto")]
    }
    return daemon.start_mlxd(args.mlxd, home, args.models_dir, presets)


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.2f} ({min(xs):.1f}..{max(xs):.1f})" if xs else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", default="smollm2-135m-q4")
    home = Path(os.environ.get("MLXD_HOME") or Path.home() / ".mlxd")
    ap.add_argument("--models-dir", default=os.environ.get("MLXD_MODELS_DIR") or str(home / "models"))
    ap.add_argument("--mlxd", default=str(ROOT / "target" / "release" / "mlxd"))
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--json-out")
    args = ap.parse_args()

    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(f"{args.models_dir}/{args.target}")
    draft, _ = load(f"{args.models_dir}/{args.draft}")
    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True))
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    print(f"{platform.node()} {device}: target {args.target}, draft {args.draft}, {args.num_draft} draft tokens")

    tmp = Path(tempfile.mkdtemp(prefix="mlxd-spec-"))
    proc, url, sock = start_mlxd(args, tmp)
    control = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=1800)
    results: dict[str, list[dict]] = {"native plain": [], "native drafting": [], "mlxd plain": [], "mlxd drafting": []}
    try:
        for d in (None, draft):  # warm-up: kernels for both paths
            run_native(model, tokenizer, d, ids, 8, args.num_draft)
        bench = {"model": "bench-spec-on", "runs": 1, "max_tokens": args.max_tokens, "prompt": args.prompt}
        r = control.post("/admin/benchmark", json={**bench, "max_tokens": 8})
        r.raise_for_status()
        for i in range(args.runs):
            results["native plain"].append(run_native(model, tokenizer, None, ids, args.max_tokens, args.num_draft))
            results["native drafting"].append(run_native(model, tokenizer, draft, ids, args.max_tokens, args.num_draft))
            r = control.post("/admin/benchmark", json=bench)
            r.raise_for_status()
            for run in r.json()["runs"]:
                side = "mlxd drafting" if run["speculative"] else "mlxd plain"
                counts = run.get("mlxd") or {}
                results[side].append(
                    {
                        "ttft_ms": run["ttft_ms"],
                        "decode_tps": run["decode_tps"],
                        "worker_decode_tps": run["worker_decode_tps"],
                        "tokens": run["completion_tokens"],
                        "accepted": counts.get("accepted_tokens", 0),
                        "drafted": counts.get("draft_tokens", 0),
                    }
                )
            print(f"run {i + 1}/{args.runs} done", flush=True)

        # What auto mode decides here, from its own measurements at load.
        control.post("/admin/start", json={"model": "bench-spec-auto"}).raise_for_status()
        workers = control.get("/admin/ps").json()["workers"]
        auto = next(w for w in workers if w["model"] == "bench-spec-auto")["stats"]["speculative"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    tps = {k: [r["decode_tps"] for r in v] for k, v in results.items()}
    med = {k: statistics.median(v) for k, v in tps.items()}
    print(f"\n{'side':<16} {'decode tok/s median (min..max)':>32} {'TTFT ms':>10} {'accepted/tokens':>16}")
    for k, v in results.items():
        ttft = statistics.median(r["ttft_ms"] for r in v)
        acc = sum(r["accepted"] for r in v)
        toks = sum(r["tokens"] for r in v)
        print(f"{k:<16} {summary(tps[k]):>32} {ttft:10.1f} {acc:>8}/{toks:<7}")
    for k in ("mlxd plain", "mlxd drafting"):
        inside = [r["worker_decode_tps"] for r in results[k]]
        print(f"{k + ' (in worker)':<16} {summary(inside):>32}")
    drafted = sum(r["drafted"] for r in results["mlxd drafting"])
    accepted = sum(r["accepted"] for r in results["mlxd drafting"])
    ratios = {
        "native drafting / native plain": med["native drafting"] / med["native plain"],
        "mlxd drafting / mlxd plain": med["mlxd drafting"] / med["mlxd plain"],
        "mlxd plain / native plain": med["mlxd plain"] / med["native plain"],
        "mlxd drafting / native drafting": med["mlxd drafting"] / med["native drafting"],
    }
    print()
    for k, v in ratios.items():
        print(f"{k:<34} {v:6.2f}x")
    print(f"mlxd acceptance: {accepted}/{drafted} = {accepted / drafted if drafted else 0:.2f}")
    print(
        f"auto mode decided: {'drafting' if auto['active'] else 'not drafting'} ({auto['reason']}); "
        f"measured at load {auto['spec_tps']:.1f} tok/s drafting, {auto['plain_tps']:.1f} plain"
    )
    if args.json_out:
        out = {"results": results, "medians": med, "ratios": ratios, "auto": auto, "device": device}
        Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
