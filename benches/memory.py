"""Memory admission figures (issue 29), printed as two tables.

1. `estimates`: `mlxd estimate` over the published config.json of each family in
   tests/fixtures/model-configs, with a sparse weights file of the model's size at
   4-bit (4.5 bits a parameter: 4 bits plus a 16-bit scale and bias per 64), on a
   512 GB and a 64 GB Mac (their default caps: 90%), reserve and one sequence at
   the full context.
2. `measured`: the daemon's estimate against the measured footprint of the test
   models (float32, 4-bit, with a draft, with kv_bits = 8), idle after the load and
   after a ~1,500-token request.

    .venv/bin/python benches/memory.py [estimates|measured|all]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import admin  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MLXD = ROOT / "target" / "release" / "mlxd"
GB = 1e9

# Published parameter counts (billions).
PARAMS = {
    "llama-3.1-8b-instruct": 8.03,
    "llama-3.3-70b-instruct": 70.6,
    "mistral-7b-instruct-v0.3": 7.25,
    "qwen3-8b": 8.19,
    "qwen3-30b-a3b": 30.5,
    "qwen3-next-80b-a3b-instruct": 81.3,
    "qwen3.5-27b": 27.0,
    "qwen3.5-35b-a3b": 35.0,
    "gpt-oss-20b": 20.9,
    "gpt-oss-120b": 116.8,
    "deepseek-v3": 671.0,
    "kimi-k2-instruct": 1026.0,
    "glm-4.5-air": 106.0,
    "minimax-m2": 230.0,
    "gemma-3-27b-it": 27.4,
    "gemma-3-1b-it": 1.0,
}


def words(text: str) -> str:
    return " ".join(text.split())


def estimate(model_dir: Path, *args: str) -> tuple[int, str]:
    out = subprocess.run(
        [str(MLXD), "estimate", str(model_dir), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "MLXD_HOME": str(model_dir.parent)},
    )
    return out.returncode, words(out.stdout + out.stderr)


def field(text: str, name: str) -> str:
    m = re.search(rf"{name} ([\d.]+ [KMG]iB)", text)
    return m.group(1) if m else "?"


def estimates() -> None:
    configs = ROOT / "tests" / "fixtures" / "model-configs"
    print(
        "| model | KV/token | reserve (32K tokens) | load needs (4-bit weights) | 512 GB | 64 GB "
        "| 1 seq at full context |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, billions in PARAMS.items():
            model = Path(tmp) / name
            model.mkdir()
            (model / "config.json").write_bytes((configs / f"{name}.json").read_bytes())
            with open(model / "model.safetensors", "wb") as f:
                f.truncate(int(billions * 1e9 * 4.5 / 8))
            big, text = estimate(model, "--cap", f"{0.9 * 512 * GB:.0f}")
            small, _ = estimate(model, "--cap", f"{0.9 * 64 * GB:.0f}")
            print(
                f"| {name} | {field(text, 'KV per token')} | {field(text, 'KV reserve')} | "
                f"{field(text, 'load needs')} | {'fits' if big == 0 else 'no'} | {'fits' if small == 0 else 'no'} | "
                f"{field(text, 'working set')} |"
            )


def measured() -> None:
    home = Path(tempfile.mkdtemp(prefix="mlxd-memory-bench-"))
    daemon = subprocess.Popen(
        [str(MLXD), "serve", "--port", "0", "--presets-dir", str(ROOT / "tests" / "presets"), "--exit-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={
            **os.environ,
            "MLXD_HOME": str(home),
            "MLXD_MODELS_DIR": os.environ.get("MLXD_MODELS_DIR", str(Path.home() / ".mlxd" / "models")),
            "MLXD_PYTHON": os.environ.get("MLXD_PYTHON", sys.executable),
        },
        text=True,
    )
    assert daemon.stdout is not None
    url = daemon.stdout.readline().split()[-1]
    port = url.rsplit(":", 1)[1]
    sock = home / f"mlxd-{port}.sock"
    prompt = "Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 150
    print("| preset | estimate | footprint idle | after a 1,500-token request | estimate / footprint |")
    print("|---|---|---|---|---|")
    for preset in ("smollm2-135m", "smollm2-135m-q4", "smollm2-135m-spec", "smollm2-135m-kv8"):
        admin(sock, "/admin/start", {"model": preset})
        time.sleep(2.5)
        row = next(r for r in admin(sock, "/admin/memory")["models"] if r["model"] == preset)
        idle = row["footprint_bytes"]
        body = json.dumps(
            {"model": preset, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}
        ).encode()
        request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"content-type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=300).read()
        except urllib.error.HTTPError as e:
            raise SystemExit(f"{preset}: {e.code} {e.read().decode()}") from e
        time.sleep(2.5)
        row = next(r for r in admin(sock, "/admin/memory")["models"] if r["model"] == preset)
        mib = 1 << 20
        print(
            f"| {preset} | {row['estimate_bytes'] / mib:.0f} MiB | {idle / mib:.0f} MiB | "
            f"{row['footprint_bytes'] / mib:.0f} MiB | {row['estimate_bytes'] / max(row['footprint_bytes'], 1):.2f} |"
        )
        admin(sock, "/admin/stop", {"model": preset})
    daemon.terminate()
    daemon.wait()


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("estimates", "all"):
        estimates()
    if what in ("measured", "all"):
        measured()
