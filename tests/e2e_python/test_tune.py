"""`mlxd tune` with the real model: a small sweep measures every configuration,
prints the table, and writes the chosen profile into the user's preset, which the
daemon's preset parser then reads back."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import tomllib

from conftest import MLXD, models_dir


def test_tune_measures_the_sweep_and_writes_the_profile(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "MLXD_HOME": str(home), "MLXD_MODELS_DIR": str(models_dir()), "MLXD_LOG": "warn"}
    out = subprocess.run(
        [
            str(MLXD),
            "tune",
            "smollm2-135m",
            "--concurrency",
            "1,2",
            "--prefill-step",
            "512",
            "--kv-bits",
            "none,8",
            "--max-tokens",
            "4",
            "--prompt",
            "Tell me a story about the sea.",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # One measured row per configuration and concurrency level, figures filled in.
    rows = [line for line in out.stdout.splitlines() if re.match(r"\s*\*?\s*512\s", line)]
    assert len(rows) == 4, out.stdout
    assert sum("8" in r.split()[1:3] for r in rows) >= 2, out.stdout
    written = home / "presets" / "smollm2-135m.toml"
    assert out.stdout.strip().splitlines()[-1] == f"wrote {written}"
    preset = tomllib.loads(written.read_text())
    assert preset["model"] == "smollm2-135m"
    profile = preset["performance"]
    assert profile["max_concurrent"] in (1, 2)
    assert profile["prefill_step"] == 512
    assert profile.get("kv_bits") in (None, 8)
    # The preset loader reads the written file back (mlxd list parses every preset).
    listed = subprocess.run([str(MLXD), "list"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "smollm2-135m" in listed.stdout, listed.stderr
