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


def footprint_bytes() -> int:
    """The worker's own footprint as the daemon measures it (sys.rs): on macOS
    the physical footprint (proc_pid_rusage; it counts Metal buffers, which RSS
    misses), on Linux the resident set, plus MLX's device memory on a discrete
    GPU, whose memory RSS does not hold."""
    if sys.platform == "darwin":
        phys = _darwin_phys_footprint()
        if phys is not None:
            return phys
        import mlx.core as mx

        return max(rss_bytes(), int(mx.get_active_memory()))
    rss = rss_bytes()
    if discrete_gpu_memory() is not None:
        import mlx.core as mx

        rss += int(mx.get_active_memory())
    return rss


def _darwin_phys_footprint() -> int | None:
    """`ri_phys_footprint` of proc_pid_rusage(RUSAGE_INFO_V2): after a 16-byte
    UUID, the eighth 64-bit field."""
    import ctypes
    import ctypes.util

    path = ctypes.util.find_library("proc") or "/usr/lib/libSystem.B.dylib"
    try:
        libproc = ctypes.CDLL(path)
        buf = (ctypes.c_uint64 * 40)()
        if libproc.proc_pid_rusage(os.getpid(), 2, ctypes.byref(buf)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return int(buf[2 + 7])
