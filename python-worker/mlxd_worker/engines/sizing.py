"""The batch a worker runs when its preset leaves `max_concurrent` out: what
`mlxd tune` finds on each kind of device, chosen at load without running it.

On a GPU (Metal, CUDA) one decode step reads every weight once whatever the
batch, so rows are nearly free until the step turns compute-bound: mlx-lm's
BatchGenerator delivers ~1,700 tok/s at 64 rows on a 1B 4-bit model on an H100,
~1,650 at 16 and ~1,230 at 8 (docs/design/PERFORMANCE.md, README "Performance"),
and mlxd at c=64 reached 0.77x of it with 16 rows, 0.83x with 64. A 64-row batch
is only an upper bound: each request's KV is reserved against the worker's memory
share as it is admitted (kv_budget.py), so a large model on a small machine runs
fewer at once and the rest wait. On a CPU the step is compute-bound early, and a wide batch mostly
stretches everyone's time to first token: 16, as before.
The daemon assumes the same rule until the worker's Ready says what it chose
(src/presets.rs ASSUMED_MAX_CONCURRENT).
"""

from __future__ import annotations

from ..io.protocol import LoadOptions

GPU_BATCH = 64
CPU_BATCH = 16


def max_batch(options: LoadOptions, gpu: bool) -> int:
    """Load's `max_batch` (the preset's max_concurrent), else the device's: a
    preset's `[faults] device_batch` stands in for a device this host lacks."""
    chosen = options.get("max_batch") or (options.get("faults") or {}).get("device_batch")
    if chosen:
        return int(chosen)
    return GPU_BATCH if gpu else CPU_BATCH


def on_gpu() -> bool:
    import mlx.core as mx

    return bool(mx.default_device() == mx.gpu)
