"""Process facts the worker reports: memory and which BLAS it runs on."""

from __future__ import annotations

import os
import resource
import sys


def rss_bytes() -> int:
    """Current resident set size (Linux); peak RSS elsewhere (what getrusage has)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def blas_library() -> str | None:
    """The BLAS the process has mapped: 'openblas', 'accelerate', or a file name."""
    if sys.platform == "darwin":
        return "accelerate"
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "blas" in line.lower()}
    except OSError:
        return None
    if any("openblas" in p for p in paths):
        return "openblas"
    names = sorted(os.path.basename(p) for p in paths)
    return names[0] if names else None


def discrete_gpu_memory() -> int | None:
    """A discrete GPU's own memory as MLX reports it (MLX CUDA on Linux): the
    daemon's budget cannot exceed it. None on the CPU and on a Mac, where the GPU
    shares the host's memory that the daemon already counts."""
    if sys.platform == "darwin":
        return None
    import mlx.core as mx

    if mx.default_device() != mx.gpu:
        return None
    info = mx.device_info()
    for key in ("memory_size", "total_memory"):
        value = info.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
