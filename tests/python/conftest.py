"""One real daemon for the pytest session: real workers, real SmolLM2-135M."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def daemon_url() -> Iterator[str]:
    binary = ROOT / "target" / "release" / "mlxd"
    assert binary.exists(), "build first: scripts/test does (cargo build --release)"
    proc = subprocess.Popen(
        [str(binary), "serve", "--port", "0", "--presets-dir", str(ROOT / "tests" / "presets"), "--exit-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "MLXD_LOG": "warn"},
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("mlxd listening on "), line
    url = line.removeprefix("mlxd listening on ")
    port = int(url.rsplit(":", 1)[1])
    home = Path(os.environ.get("MLXD_HOME") or Path.home() / ".mlxd")
    os.environ["MLXD_TEST_CONTROL_SOCKET"] = str(home / f"mlxd-{port}.sock")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
