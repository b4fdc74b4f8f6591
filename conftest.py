"""Loaded by pytest before any test module or other conftest: the test process uses
the BLAS the daemon's workers use (OpenBLAS, which src/supervisor/spawn.rs preloads
into each worker), so a reference generation in a test runs the same kernels as
mlxd's worker. Random-weight test models have near-tied logits; with two BLAS
libraries a reference and mlxd could pick different tokens for that reason alone."""

from __future__ import annotations

import ctypes
import os
import platform

_OPENBLAS = f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libblas.so.3"
if os.path.exists(_OPENBLAS):
    # Global: MLX's own BLAS calls resolve to it, as under the workers' LD_PRELOAD.
    ctypes.CDLL(_OPENBLAS, mode=ctypes.RTLD_GLOBAL)
