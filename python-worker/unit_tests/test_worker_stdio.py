"""The real worker without the mlxd_protocol extension: pure-Python stdio framing,
real model, real tokens; and the stdin lifeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from worker_process import worker_env

from mlxd_worker.io import frames

MODEL = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "smollm2-135m"
# Runs the worker with the extension made unimportable.
WITHOUT_EXTENSION = (
    "import sys, runpy; sys.modules['mlxd_protocol'] = None; "
    "sys.argv = ['mlxd_worker', '--transport', 'stdio']; runpy.run_module('mlxd_worker', run_name='__main__')"
)


def read_frame(proc: subprocess.Popen, dec: frames.StdioDecoder) -> tuple[int, bytes]:
    assert proc.stdout is not None
    while (f := dec.next_frame()) is None:
        chunk = os.read(proc.stdout.fileno(), 65536)
        assert chunk, "worker closed stdout"
        dec.feed(chunk)
    return f[0], f[2]


def next_non_stats(proc: subprocess.Popen, dec: frames.StdioDecoder) -> tuple[int, bytes]:
    while True:
        kind, payload = read_frame(proc, dec)
        if kind != frames.STATS:
            return kind, payload


@pytest.fixture(scope="module")
def worker() -> subprocess.Popen:
    assert MODEL.is_dir(), "scripts/setup imports the test model"
    proc = subprocess.Popen(
        [sys.executable, "-c", WITHOUT_EXTENSION],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=worker_env(),
    )
    yield proc
    proc.kill()
    proc.wait()


def send(proc: subprocess.Popen, kind: int, obj: dict) -> None:
    assert proc.stdin is not None
    proc.stdin.write(frames.encode(kind, frames.json_payload(obj)))
    proc.stdin.flush()


def test_pure_python_worker_generates_and_exits_on_eof(worker: subprocess.Popen) -> None:
    dec = frames.StdioDecoder()
    kind, payload = next_non_stats(worker, dec)
    hello = json.loads(payload)
    assert kind == frames.HELLO and hello["native_protocol"] is False
    assert hello["protocol_version"] == frames.PROTOCOL_VERSION

    send(worker, frames.LOAD, {"model_path": str(MODEL), "model_name": "t"})
    kind, payload = next_non_stats(worker, dec)
    assert kind == frames.READY, payload

    question = [{"role": "user", "content": "What is the capital of France?"}]
    send(worker, frames.GENERATE, {"id": 41, "messages": question, "max_tokens": 12})
    # First the prompt's size, before any token.
    kind, payload = next_non_stats(worker, dec)
    assert kind == frames.ADMITTED, payload
    admitted = json.loads(payload)
    assert admitted["id"] == 41 and admitted["prompt_tokens"] > 5
    text = ""
    while True:
        kind, payload = next_non_stats(worker, dec)
        if kind == frames.TOKEN_BATCH:
            for rid, _token, piece in frames.decode_token_batch(payload):
                assert rid == 41
                text += piece
        else:
            break
    assert kind == frames.DONE
    done = json.loads(payload)
    assert done["id"] == 41 and done["completion_tokens"] >= 1
    assert done["prompt_tokens"] == admitted["prompt_tokens"]
    assert "Paris" in text

    # Lifeline: closing stdin (the daemon dying) makes the worker exit.
    assert worker.stdin is not None
    worker.stdin.close()
    assert worker.wait(timeout=10) == 0
