"""The prefix cache: TTFT of a request whose ~500-token prefix is cold against one
whose prefix an earlier request left in the cache; a short prompt's TTFT against
that of a question after a cached ~4k-token prefix (an agent's system prompt and
tools: the cache pays off when the second is close to the first); an agent transcript of
several turns (each turn resends the conversation) with and without the cache,
and the memory a cached token takes with full-precision and 8-bit KV.

Each run opens its prefix with a fresh nonce, so nothing from an earlier run
helps. Runs against a real daemon with two presets of the same model: the cache
on (default size) and off (`prompt_cache_bytes = "0"`). Medians with min..max.

    scripts/bench prompt-cache [--runs 5] [--turns 10] [--long-paragraphs 100]
        [--model smollm2-135m] [--models-dir DIR] [--mlxd PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import daemon
import httpx

ROOT = Path(__file__).resolve().parents[1]
PARAGRAPH = (
    "The museum opens at nine and closes at six. Tickets are sold at the east entrance, "
    "guided tours start every hour, and the cafe on the second floor serves lunch until three. "
)


def prefix(paragraphs: int = 14) -> str:
    """A fresh system prompt (its nonce first): 14 paragraphs are ~580 tokens."""
    return f"[{uuid.uuid4()}] You answer questions about the museum. " + PARAGRAPH * paragraphs


def ttft(url: str, model: str, messages: list[dict[str, str]], max_tokens: int = 8) -> tuple[float, str, int]:
    """Seconds to the first text, the whole answer, and its cached tokens."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = 0.0
    text = ""
    cached = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code >= 400:
            r.read()
            raise RuntimeError(f"{model}: {r.status_code} {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                cached = chunk["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                if piece and not first:
                    first = time.perf_counter() - t0
                text += piece
    return first, text, cached


def usage_tokens(url: str, model: str, messages: list[dict[str, str]]) -> int:
    """Runs a request; the tokens its KV cache holds at the end (prompt and answer)."""
    body = {"model": model, "messages": messages, "max_tokens": 8}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    usage = r.json()["usage"]
    return int(usage["prompt_tokens"]) + int(usage["completion_tokens"])


def cache_bytes(url: str, model: str) -> float:
    """The model's prefix-cache bytes from /metrics (after the worker's next Stats)."""
    time.sleep(1.5)
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("mlxd_prompt_cache_bytes{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:8.0f} ms ({min(xs) * 1e3:.0f}..{max(xs) * 1e3:.0f})"


def main() -> None:
    home = Path(os.environ.get("MLXD_HOME") or Path.home() / ".mlxd")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--long-paragraphs", type=int, default=100, help="the long prefix (100: ~4k tokens)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--models-dir", default=os.environ.get("MLXD_MODELS_DIR") or str(home / "models"))
    p.add_argument("--mlxd", default=str(ROOT / "target" / "release" / "mlxd"))
    args = p.parse_args()
    presets = {
        "bench-cache": f'model = "{args.model}"\nkeep_alive = "-1"\n',
        "bench-nocache": f'model = "{args.model}"\nkeep_alive = "-1"\nprompt_cache_bytes = "0"\n',
        "bench-kv8": f'model = "{args.model}"\nkeep_alive = "-1"\n[performance]\nkv_bits = 8\n',
    }
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, _ = daemon.start_mlxd(args.mlxd, Path(tmp), args.models_dir, presets)
        try:
            unavailable: dict[str, str] = {}
            for m in presets:  # load them all
                try:
                    ttft(url, m, [{"role": "user", "content": "Hi"}], 2)
                except RuntimeError as e:
                    unavailable[m] = str(e)
                    if m != "bench-kv8":
                        raise
            cold, hit, prompt_tokens = [], [], 0
            for _ in range(args.runs):
                system = {"role": "system", "content": prefix()}
                c, _, _ = ttft(url, "bench-cache", [system, {"role": "user", "content": "When does it open?"}])
                h, _, cached = ttft(url, "bench-cache", [system, {"role": "user", "content": "Is there a cafe?"}])
                cold.append(c)
                hit.append(h)
                prompt_tokens = cached
            print(f"TTFT, ~{prompt_tokens}-token shared prefix, {args.runs} runs")
            print(f"  cold    {summary(cold)}")
            print(f"  cached  {summary(hit)}   {statistics.median(cold) / statistics.median(hit):.1f}x faster")
            short, long_hit, long_tokens = [], [], 0
            for _ in range(args.runs):
                question = {"role": "user", "content": f"[{uuid.uuid4()}] When does the museum open?"}
                t, _, _ = ttft(url, "bench-cache", [question])
                short.append(t)
                system = {"role": "system", "content": prefix(args.long_paragraphs)}
                ttft(url, "bench-cache", [system, {"role": "user", "content": "When does it open?"}], 1)
                h, _, long_tokens = ttft(url, "bench-cache", [system, {"role": "user", "content": "Is there a cafe?"}])
                long_hit.append(h)
            print(f"TTFT, a short prompt against one after a cached ~{long_tokens}-token prefix, {args.runs} runs")
            print(f"  short   {summary(short)}")
            ratio = statistics.median(long_hit) / statistics.median(short)
            print(f"  cached  {summary(long_hit)}   {ratio:.2f}x the short prompt's")
            print(f"agent transcript, {args.turns} turns (each resends the conversation): TTFT per turn")
            print(f"  {'turn':>4} {'no cache':>10} {'cache':>10} {'cached tokens':>14}")
            system = {"role": "system", "content": prefix()}
            history: dict[str, list[dict[str, str]]] = {m: [system] for m in ("bench-nocache", "bench-cache")}
            for turn in range(args.turns):
                row = []
                for m in ("bench-nocache", "bench-cache"):
                    history[m].append({"role": "user", "content": f"Question {turn + 1}: what else should I know?"})
                    t, text, cached = ttft(url, m, history[m], 16)
                    history[m].append({"role": "assistant", "content": text})
                    row.append((t, cached))
                print(f"  {turn + 1:>4} {row[0][0] * 1e3:8.0f}ms {row[1][0] * 1e3:8.0f}ms {row[1][1]:>14}")
            print("memory per cached token (one ~600-token entry per model, from /metrics)")
            system = {"role": "system", "content": prefix()}
            per_token = {}
            for m in ("bench-cache", "bench-kv8"):
                if m in unavailable:
                    print(f"  {m:<12} unavailable here: {unavailable[m]}")
                    continue
                before = cache_bytes(url, m)
                tokens = usage_tokens(url, m, [system, {"role": "user", "content": "When does it open?"}])
                per_token[m] = (cache_bytes(url, m) - before) / tokens
                print(f"  {m:<12} {per_token[m] / 1024:8.1f} KiB per token ({tokens} tokens)")
            if "bench-kv8" in per_token:
                print(f"  kv_bits = 8 keeps {per_token['bench-kv8'] / per_token['bench-cache']:.2f}x the bytes")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
