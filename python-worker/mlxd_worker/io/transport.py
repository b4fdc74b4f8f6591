"""The worker's end of the two transports.

Both give ``send(kind, payload)``, ``send_tokens(entries)`` (thread-safe) and
``recv()`` (one reader thread), which returns ``None`` at EOF: the daemon is gone.
fd 0 is the daemon's end (requests or doorbell); ``out_fd`` is our private copy of
the original stdout (events or doorbell), since fd 1 is pointed at stderr so that
stray prints from libraries can never corrupt the protocol.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Protocol

from . import frames

# (id, token, text) entries of a TokenBatch.
TokenEntries = list[tuple[int, int, str]]


class Transport(Protocol):
    name: str
    native: bool

    def send(self, kind: int, payload: bytes) -> None: ...
    def beat(self) -> None: ...
    def send_tokens(self, entries: TokenEntries) -> None: ...
    def recv(self) -> tuple[int, int, bytes] | None: ...


class NullTransport:
    """A distributed group's follower: it runs rank 0's engine step for step, and
    rank 0 alone answers the daemon, so what the follower would send goes nowhere."""

    name = "none"
    native = False

    def send(self, kind: int, payload: bytes) -> None:
        pass

    def beat(self) -> None:
        pass

    def send_tokens(self, entries: TokenEntries) -> None:
        pass

    def recv(self) -> tuple[int, int, bytes] | None:
        return None


class _Rings(Protocol):
    """What the worker uses of mlxd_protocol.WorkerRings (worker-protocol/src/python.rs),
    which ships no type information."""

    def push(self, kind: int, payload: bytes) -> bool: ...
    def push_token_batch(self, entries: TokenEntries) -> bool: ...
    def pop(self) -> tuple[int, int, bytes] | None: ...
    def beat(self) -> None: ...
    def prepare_sleep(self) -> bool: ...
    def finish_sleep(self) -> None: ...


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class StdioTransport:
    """Length-prefixed frames on the pipes; works without the extension module."""

    name = "stdio"

    def __init__(self, in_fd: int, out_fd: int) -> None:
        self._in = in_fd
        self._out = out_fd
        self._lock = threading.Lock()
        self._decoder = frames.StdioDecoder()
        self._encode_batch: Callable[[TokenEntries], bytes]
        try:
            import mlxd_protocol

            self._encode_batch = mlxd_protocol.encode_token_batch
            self.native = True
        except ImportError:
            self._encode_batch = frames.encode_token_batch
            self.native = False

    def send(self, kind: int, payload: bytes) -> None:
        data = frames.encode(kind, payload)
        with self._lock:
            _write_all(self._out, data)

    def beat(self) -> None:
        """Over stdio the heartbeat rides on Stats frames (see __main__)."""

    def send_tokens(self, entries: TokenEntries) -> None:
        self.send(frames.TOKEN_BATCH, self._encode_batch(entries))

    def recv(self) -> tuple[int, int, bytes] | None:
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                return None
            self._decoder.feed(chunk)


class ShmTransport:
    """Frames in the shared-memory rings; the pipes only carry doorbell bytes."""

    name = "shm"
    native = True

    def __init__(self, segment: str, generation: int | None, in_fd: int, out_fd: int) -> None:
        import mlxd_protocol

        self._rings: _Rings = mlxd_protocol.WorkerRings(segment, generation)
        self._in = in_fd
        self._out = out_fd
        self._bell_lock = threading.Lock()

    def _ring(self, wake: bool) -> None:
        if wake:
            with self._bell_lock:
                _write_all(self._out, b"\x01")

    def send(self, kind: int, payload: bytes) -> None:
        self._ring(self._rings.push(kind, payload))

    def beat(self) -> None:
        self._rings.beat()

    def send_tokens(self, entries: TokenEntries) -> None:
        self._ring(self._rings.push_token_batch(entries))

    def recv(self) -> tuple[int, int, bytes] | None:
        spins = 0
        while True:
            frame = self._rings.pop()
            if frame is not None:
                return frame
            spins += 1
            if spins < 100:
                continue
            if self._rings.prepare_sleep():
                woke = os.read(self._in, 4096)
                self._rings.finish_sleep()
                if not woke:
                    return None
            spins = 0
