"""Fault injection for the supervisor's tests: what a real worker cannot be made to
do on demand (hang while loading, send a garbage frame, raise inside a decode step,
decode slowly but steadily). Set by a preset's ``[faults]`` table, which the daemon
passes through in the Load options; absent in every shipped preset.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .io.protocol import FaultOptions, LoadOptions

log = logging.getLogger("mlxd_worker")

# A frame kind no protocol version defines: the daemon must treat it as garbage.
GARBAGE_KIND = 0x7FFF


class InjectedFault(RuntimeError):
    """Raised inside a decode step by ``raise_in_step``."""


class InjectedOutOfMemory(RuntimeError):
    """Raised inside a decode step by ``out_of_memory_in_step``, worded as MLX's
    Metal allocator words a failed allocation (the Linux CPU allocator cannot
    fail one: it crashes the process, docs/design/MEMORY.md)."""


@dataclass(frozen=True)
class Faults:
    # Sleep forever inside Load, before the model is read (no progress at all).
    hang_in_load: bool = False
    # Seconds each decode step takes longer: slow, but progressing.
    step_delay_s: float = 0.0
    # Raise inside the N-th decode step (1-based) of this process.
    raise_in_step: int = 0
    # Send a frame of an unknown kind after the N-th decode step.
    garbage_after_step: int = 0
    # Fail the N-th decode step as a failed MLX allocation.
    out_of_memory_in_step: int = 0

    @staticmethod
    def from_options(options: LoadOptions) -> Faults:
        raw: FaultOptions = options.get("faults") or {}
        if raw:
            log.warning("fault injection on: %s", raw)
        return Faults(
            hang_in_load=bool(raw.get("hang_in_load", False)),
            step_delay_s=float(raw.get("step_delay_ms", 0)) / 1000.0,
            raise_in_step=int(raw.get("raise_in_step", 0)),
            garbage_after_step=int(raw.get("garbage_after_step", 0)),
            out_of_memory_in_step=int(raw.get("out_of_memory_in_step", 0)),
        )
        # (`device_batch` is read where the batch is sized: engines/sizing.py.)

    def in_load(self) -> None:
        while self.hang_in_load:
            time.sleep(3600)

    def before_step(self, step: int) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.raise_in_step and step == self.raise_in_step:
            raise InjectedFault(f"injected fault in decode step {step}")
        if self.out_of_memory_in_step and step == self.out_of_memory_in_step:
            raise InjectedOutOfMemory(f"[metal::malloc] Unable to allocate 1073741824 bytes (injected in step {step})")

    def garbage_due(self, step: int) -> bool:
        return bool(self.garbage_after_step) and step == self.garbage_after_step
