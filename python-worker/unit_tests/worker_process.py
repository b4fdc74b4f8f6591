"""A worker process as the daemon starts one (src/supervisor/spawn.rs): the worker
package on the path and OpenBLAS preloaded. Without the preload MLX's Linux CPU
wheel runs the reference BLAS it links, ~14x slower on the model's matmuls."""

from __future__ import annotations

import os
import platform
from pathlib import Path

WORKER_DIR = Path(__file__).resolve().parents[1]
OPENBLAS = Path(f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libblas.so.3")


def worker_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(WORKER_DIR)}
    if OPENBLAS.exists():
        env["LD_PRELOAD"] = str(OPENBLAS)
    return env
