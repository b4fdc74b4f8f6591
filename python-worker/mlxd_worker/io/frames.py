"""Pure-Python codec of the worker protocol's frames, for the stdio transport.

The Rust crate ``worker-protocol`` is the one definition; ``python-worker/unit_tests/test_frames.py``
compares these constants with the extension module's and prints a fix on mismatch.
Wire layout: ``[len u32][kind u16][flags u16][payload]``, little-endian.

JSON payloads are the typed dicts of ``protocol.py`` (generated from the Rust
structs): ``json_payload`` takes nothing else, so a frame is built as its type and
mypy catches a misspelt or missing key; ``decode_load``/``decode_generate`` type
what the daemon sends.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Union, cast

from .protocol import PROTOCOL_VERSION as PROTOCOL_VERSION  # the version lives with the types
from .protocol import (
    AdmittedFrame,
    Done,
    Embed,
    EmbeddingsFrame,
    ErrorFrame,
    Generate,
    Hello,
    Load,
    LogprobsFrame,
    MemoryLimitFrame,
    Ready,
    Stats,
    ToolCallFrame,
)

HEADER = struct.Struct("<IHH")
MAX_FRAME = 64 << 20

PADDING = 0
HELLO = 1
LOAD = 2
READY = 3
GENERATE = 4
CANCEL = 5
TOKEN_BATCH = 6
DONE = 7
ERROR = 8
STATS = 9
SHUTDOWN = 10
CLEAR_CACHE = 11
TOOL_CALL = 12
LOGPROBS = 13
ADMITTED = 14
MEMORY_LIMIT = 15
EMBED = 16
EMBEDDINGS = 17

KINDS: dict[str, int] = {
    "PADDING": PADDING,
    "HELLO": HELLO,
    "LOAD": LOAD,
    "READY": READY,
    "GENERATE": GENERATE,
    "CANCEL": CANCEL,
    "TOKEN_BATCH": TOKEN_BATCH,
    "DONE": DONE,
    "ERROR": ERROR,
    "STATS": STATS,
    "SHUTDOWN": SHUTDOWN,
    "CLEAR_CACHE": CLEAR_CACHE,
    "TOOL_CALL": TOOL_CALL,
    "LOGPROBS": LOGPROBS,
    "ADMITTED": ADMITTED,
    "MEMORY_LIMIT": MEMORY_LIMIT,
    "EMBED": EMBED,
    "EMBEDDINGS": EMBEDDINGS,
}

_ENTRY = struct.Struct("<QII")


def encode(kind: int, payload: bytes, flags: int = 0) -> bytes:
    """Header + payload, as written on the stdio transport."""
    return HEADER.pack(len(payload), kind, flags) + payload


# The payload of a JSON frame: what the worker sends, and the Generate that the
# http transport builds for the engine (the one frame it writes for itself).
JsonFrame = Union[
    Hello, Ready, Done, ErrorFrame, Stats, ToolCallFrame, LogprobsFrame, AdmittedFrame, Generate, EmbeddingsFrame
]


def json_payload(frame: JsonFrame) -> bytes:
    return json.dumps(frame, separators=(",", ":")).encode()


# The daemon's frames were written by the Rust structs protocol.py is generated
# from, so they are taken as their types without checking.
def decode_load(payload: bytes) -> Load:
    return cast(Load, json.loads(payload))


def decode_generate(payload: bytes) -> tuple[Generate, list[bytes]]:
    """A Generate and its image files, which follow its JSON after a NUL byte (JSON
    text holds none), each as ``[len u32][file bytes]``."""
    end = payload.find(b"\0")
    if end < 0:
        return cast(Generate, json.loads(payload)), []
    images: list[bytes] = []
    view = memoryview(payload)
    at = end + 1
    while at < len(payload):
        (size,) = struct.unpack_from("<I", payload, at)
        if at + 4 + size > len(payload):
            raise ValueError("a Generate frame's image file is truncated")
        images.append(bytes(view[at + 4 : at + 4 + size]))
        at += 4 + size
    return cast(Generate, json.loads(payload[:end])), images


def decode_embed(payload: bytes) -> Embed:
    return cast(Embed, json.loads(payload))


def decode_memory_limit(payload: bytes) -> MemoryLimitFrame:
    return cast(MemoryLimitFrame, json.loads(payload))


def encode_token_batch(entries: Iterable[tuple[int, int, str]]) -> bytes:
    """TokenBatch payload: [count u32][reserved u32] then [id u64][token u32][len u32][text]."""
    parts = [b""]
    count = 0
    for rid, token, text in entries:
        raw = text.encode()
        parts.append(_ENTRY.pack(rid, token, len(raw)))
        parts.append(raw)
        count += 1
    parts[0] = struct.pack("<II", count, 0)
    return b"".join(parts)


def decode_token_batch(payload: bytes) -> list[tuple[int, int, str]]:
    (count,) = struct.unpack_from("<I", payload, 0)
    at = 8
    out: list[tuple[int, int, str]] = []
    for _ in range(count):
        rid, token, n = _ENTRY.unpack_from(payload, at)
        at += _ENTRY.size
        if at + n > len(payload):
            raise ValueError("truncated TokenBatch text")
        out.append((rid, token, payload[at : at + n].decode()))
        at += n
    return out


def encode_cancel(rid: int) -> bytes:
    return struct.pack("<Q", rid)


def decode_cancel(payload: bytes) -> int:
    (rid,) = struct.unpack_from("<Q", payload, 0)
    return int(rid)


class StdioDecoder:
    """Incremental decoder: feed bytes, take whole frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> tuple[int, int, bytes] | None:
        if len(self._buf) < HEADER.size:
            return None
        length, kind, flags = HEADER.unpack_from(self._buf, 0)
        if length > MAX_FRAME:
            raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME}")
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        return kind, flags, payload

    def pending(self) -> int:
        return len(self._buf)
