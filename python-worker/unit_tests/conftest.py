"""Worker tests run MLX in this process: give it the BLAS the daemon gives workers.

MLX's Linux CPU wheel links the reference BLAS (~14x slower on the model's matmuls).
The daemon starts workers with OpenBLAS in LD_PRELOAD; here, loading OpenBLAS
globally before anything imports MLX does the same: it carries the same soname
(libblas.so.3), and the dynamic linker resolves MLX's BLAS symbols in the global
scope first. Without OpenBLAS the tests still pass, slower.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")

if sys.platform == "linux" and OPENBLAS.exists() and "mlx.core" not in sys.modules:
    ctypes.CDLL(str(OPENBLAS), mode=ctypes.RTLD_GLOBAL)
