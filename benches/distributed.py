"""Issue 33's figures on one machine over loopback: the test model alone against
the same model split over three ranks (tensor parallel, MLX's ring backend), served
by one mlxd.

- tokens/s and TTFT of one greedy stream, each side in turn, `--runs` times;
- the collective time of one decode step: the 2 all-sums per layer that mlx-lm's
  shard() adds (one hidden state each), timed alone between three processes;
- memory per rank (proportional set size) against the single worker's;
- a rank's SIGKILL: the time until the group is gone, and until it is ready again.

    scripts/bench distributed [--runs 3] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import admin, start_mlxd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SINGLE, GROUP = "single", "tp3"
PROMPT = "Write a short story about a lighthouse keeper."


def row(sock: Path, model: str) -> dict:
    return next((r for r in admin(sock, "/admin/ps")["workers"] if r["model"] == model), {})


def ranks_of(model: str) -> list[int]:
    needle = f"--model\0{model}\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


def pss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    kib = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))
    return kib / 1024


def stream(url: str, model: str, max_tokens: int) -> tuple[float, float]:
    """TTFT and decode tokens/s (after the first token) of one greedy stream."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    began = time.perf_counter()
    first = 0.0
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif not first and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    return first - began, (tokens - 1) / (end - first)


COLLECTIVES = textwrap.dedent(
    """
    import sys, time
    import mlx.core as mx
    group = mx.distributed.init(strict=True, backend="ring")
    hidden, per_step, steps = int(sys.argv[1]), int(sys.argv[2]), 20
    x = mx.ones((1, 1, hidden))
    for _ in range(3):
        mx.eval(mx.distributed.all_sum(x, stream=mx.cpu))
    began = time.perf_counter()
    for _ in range(steps):
        for _ in range(per_step):
            mx.eval(mx.distributed.all_sum(x, stream=mx.cpu))
    if group.rank() == 0:
        print((time.perf_counter() - began) / steps)
    """
)


def collective_seconds_per_step(ranks: int, hidden: int, per_step: int) -> float:
    hostfile = Path(tempfile.mkdtemp()) / "hosts.json"
    ports = []
    for _ in range(ranks):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", COLLECTIVES, str(hidden), str(per_step)],
            env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for r in range(ranks)
    ]
    out = [p.communicate(timeout=600)[0] for p in procs]
    return float(out[0].strip())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--models-dir", default=os.environ.get("MLXD_MODELS_DIR", str(Path.home() / ".mlxd/models")))
    ap.add_argument("--mlxd", default=str(ROOT / "target/release/mlxd"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    config = json.loads((Path(args.models_dir) / args.model / "config.json").read_text())

    home = Path(tempfile.mkdtemp(prefix="mlxd-distributed-bench-"))
    group = '[distributed]\nhosts = ["self", "self", "self"]\nparallel = "tensor"\n'
    presets = {
        SINGLE: f'model = "{args.model}"\nkeep_alive = "-1"\n',
        GROUP: f'model = "{args.model}"\nkeep_alive = "-1"\n{group}',
    }
    proc, url, sock = start_mlxd(args.mlxd, home, args.models_dir, presets)
    try:
        print(f"{args.model} on this machine ({os.cpu_count()} cores), {args.max_tokens} tokens, {args.runs} runs")
        figures: dict[str, list[tuple[float, float]]] = {SINGLE: [], GROUP: []}
        loads = {}
        for model in (SINGLE, GROUP):
            began = time.perf_counter()
            admin(sock, "/admin/start", {"model": model})
            loads[model] = time.perf_counter() - began
            stream(url, model, 4)  # warm
        for _ in range(args.runs):
            for model in (SINGLE, GROUP):
                figures[model].append(stream(url, model, args.max_tokens))
        print(f"\n{'side':<24}{'tok/s':>8}{'TTFT ms':>10}{'start s':>9}")
        for model, label in ((SINGLE, "one process"), (GROUP, "3 ranks (tensor)")):
            tps = statistics.median(f[1] for f in figures[model])
            ttft = statistics.median(f[0] for f in figures[model]) * 1000
            print(f"{label:<24}{tps:>8.2f}{ttft:>10.0f}{loads[model]:>9.1f}")

        layers = int(config["num_hidden_layers"])
        step = collective_seconds_per_step(3, int(config["hidden_size"]), 2 * layers)
        decode = 1 / statistics.median(f[1] for f in figures[GROUP])
        print(
            f"\ncollectives per decode step (2 x {layers} all-sums of one {config['hidden_size']}-float hidden "
            f"state, 3 ranks): {step * 1000:.0f} ms of the {decode * 1000:.0f} ms step"
        )

        single = pss_mib(row(sock, SINGLE)["pid"])
        per_rank = [pss_mib(pid) for pid in ranks_of(GROUP)]
        print(
            f"memory (PSS): one process {single:.0f} MiB; ranks "
            + ", ".join(f"{m:.0f}" for m in per_rank)
            + f" MiB (sum {sum(per_rank):.0f})"
        )

        before = ranks_of(GROUP)
        leader = row(sock, GROUP)["pid"]
        follower = next(pid for pid in before if pid != leader)
        incarnation = row(sock, GROUP)["incarnation"]
        killed = time.perf_counter()
        os.kill(follower, signal.SIGKILL)
        while any(pid in before for pid in ranks_of(GROUP)):
            time.sleep(0.01)
        gone = time.perf_counter() - killed
        while not (r := row(sock, GROUP)) or r.get("incarnation") == incarnation or r.get("state") != "ready":
            time.sleep(0.05)
        ready = time.perf_counter() - killed
        print(f"a follower's SIGKILL: group gone after {gone * 1000:.0f} ms, ready again after {ready:.1f} s")
        print(f"  ({r['last_exit']})")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
