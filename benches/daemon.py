"""A real mlxd for a benchmark: started with its own home and presets, on a free
port, gone when the benchmark's stdin closes."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
from pathlib import Path


def start_mlxd(mlxd: str, home: Path, models_dir: str, presets: dict[str, str]) -> tuple[subprocess.Popen, str, Path]:
    """Writes `presets` (name -> TOML) under `home` and serves them: the process,
    its URL and its control socket."""
    presets_dir = home / "presets"
    presets_dir.mkdir(parents=True)
    for name, toml in presets.items():
        (presets_dir / f"{name}.toml").write_text(toml)
    proc = subprocess.Popen(
        [mlxd, "serve", "--port", "0", "--presets-dir", str(presets_dir), "--exit-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLXD_LOG": "warn", "MLXD_HOME": str(home), "MLXD_MODELS_DIR": models_dir},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("mlxd listening on "), line
    url = line.removeprefix("mlxd listening on ")
    return proc, url, home / f"mlxd-{url.rsplit(':', 1)[1]}.sock"


def admin(sock: Path, path: str, body: dict | None = None) -> dict:
    """An admin call over the daemon's control socket: GET `path`, or POST `body`."""
    conn = http.client.HTTPConnection("localhost")
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(sock))
    data = json.dumps(body).encode() if body is not None else None
    conn.request("POST" if body is not None else "GET", path, data, {"content-type": "application/json"})
    return dict(json.loads(conn.getresponse().read()))
