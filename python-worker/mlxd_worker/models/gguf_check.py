"""Validates a GGUF file's header before anything else reads it.

Model files are untrusted input (a crafted GGUF leaked heap memory from Ollama
through unchecked offsets). Every count, length, dimension, type and tensor offset
in the header is checked against the file's size and sane limits here, in plain
Python, before ``mx.load`` parses the file; a hostile file is refused with a message
saying what is wrong and where.

Layout (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64,
metadata count u64; metadata as (string key, u32 type, value); tensor infos as
(string name, u32 n_dims, u64 dims[n_dims], u32 type, u64 offset); then the data,
aligned to ``general.alignment`` (default 32). A string is a u64 length + bytes.

``read_header`` returns what it checked — the metadata and the tensor table — for
the importer's own tensor reader (block types ``mx.load`` does not read).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import numpy.typing as npt

MAX_TENSORS = 1 << 16
MAX_METADATA = 1 << 16
MAX_STRING = 1 << 20  # chat templates are kilobytes; nothing legitimate is near this
MAX_ARRAY = 1 << 24  # vocabularies and merges stay well under 16 M entries
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 40
MAX_NESTING = 2

# Metadata value types: fixed sizes (bytes) of the scalar ones.
SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}

# ggml tensor types: (values per block, bytes per block).
TENSOR_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}


# A metadata value as the check reads it: a scalar, a string, a list of strings or
# arrays, or a numpy array (an array of scalars).
Value = Union[bool, int, float, str, "npt.NDArray[Any]", list["Value"]]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: the row length first
    ggml_type: int
    offset: int  # from the start of the data
    nbytes: int


@dataclass(frozen=True)
class Header:
    version: int
    alignment: int
    data_start: int
    metadata: dict[str, Value]
    tensors: list[TensorInfo]


class GGUFError(Exception):
    """The file is not a well-formed GGUF; the message says what and where."""


class _Reader:
    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{what} at byte {self.pos} needs {n} bytes; the file has {self.size - self.pos} left")
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError(f"{what} at byte {self.pos}: the file ended early")
        self.pos += n
        return data

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack("<Q", self.take(8, what))[0])

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        if n > MAX_STRING:
            raise GGUFError(f"{what} at byte {self.pos} claims {n} bytes (limit {MAX_STRING})")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{what} at byte {self.pos - n} is not UTF-8") from e


def _value(r: _Reader, kind: int, key: str, depth: int = 0) -> Value:
    if kind in SCALARS:
        scalar: bool | int | float = struct.unpack(FORMATS[kind], r.take(SCALARS[kind], f"value of {key}"))[0]
        return scalar
    if kind == STRING:
        return r.string(f"value of {key}")
    if kind == ARRAY:
        if depth >= MAX_NESTING:
            raise GGUFError(f"{key}: arrays nested deeper than {MAX_NESTING}")
        elem = r.u32(f"element type of {key}")
        count = r.u64(f"length of {key}")
        if count > MAX_ARRAY:
            raise GGUFError(f"{key} claims {count} elements (limit {MAX_ARRAY})")
        if elem in SCALARS:
            # A whole scalar array at once (checked against the file first).
            return np.frombuffer(r.take(count * SCALARS[elem], f"elements of {key}"), dtype=DTYPES[elem])
        if elem not in (STRING, ARRAY):
            raise GGUFError(f"{key}: unknown array element type {elem}")
        return [_value(r, elem, key, depth + 1) for _ in range(count)]
    raise GGUFError(f"{key}: unknown value type {kind} at byte {r.pos - 4}")


def check(path: Path) -> dict[str, int]:
    """Validates `path`'s header and tensor table; returns a summary
    (version, tensor count, alignment, data offset). Raises GGUFError."""
    h = read_header(path)
    return {"version": h.version, "tensors": len(h.tensors), "alignment": h.alignment, "data_start": h.data_start}


def read_header(path: Path) -> Header:
    """Validates `path`'s header and tensor table and returns them. Raises GGUFError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, size)
        magic = r.take(4, "magic")
        if magic != b"GGUF":
            raise GGUFError(f"not a GGUF file (it starts with {magic!r})")
        version = r.u32("version")
        if version not in (2, 3):
            raise GGUFError(f"GGUF version {version} is not supported (2 or 3)")
        tensors = r.u64("tensor count")
        if tensors > MAX_TENSORS:
            raise GGUFError(f"the header claims {tensors} tensors (limit {MAX_TENSORS})")
        kvs = r.u64("metadata count")
        if kvs > MAX_METADATA:
            raise GGUFError(f"the header claims {kvs} metadata entries (limit {MAX_METADATA})")
        alignment = 32
        metadata: dict[str, Value] = {}
        for _ in range(kvs):
            key = r.string("metadata key")
            value = _value(r, r.u32(f"type of {key}"), key)
            metadata[key] = value
            if key == "general.alignment":
                if not isinstance(value, int) or value <= 0 or value & (value - 1) or value > 1 << 16:
                    raise GGUFError(f"general.alignment {value!r} is not a power of two")
                alignment = value
        infos = []
        for i in range(tensors):
            name = r.string(f"name of tensor {i}")
            n_dims = r.u32(f"dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
            dims = [r.u64(f"dimension of {name}") for _ in range(n_dims)]
            elements = 1
            for d in dims:
                if d == 0:
                    raise GGUFError(f"tensor {name} has a zero dimension")
                elements *= d
                if elements > MAX_ELEMENTS:
                    raise GGUFError(f"tensor {name} claims {elements}+ elements")
            kind = r.u32(f"type of {name}")
            if kind not in TENSOR_TYPES:
                raise GGUFError(f"tensor {name} has unknown type {kind}")
            per_block, block_bytes = TENSOR_TYPES[kind]
            if dims[0] % per_block:
                raise GGUFError(f"tensor {name}: {dims[0]} values per row do not fill blocks of {per_block}")
            offset = r.u64(f"offset of {name}")
            if offset % alignment:
                raise GGUFError(f"tensor {name} offset {offset} is not aligned to {alignment}")
            infos.append(TensorInfo(name, tuple(dims), kind, offset, elements // per_block * block_bytes))
        data_start = -(-r.pos // alignment) * alignment
        room = size - data_start
        for t in infos:
            if t.offset + t.nbytes > room:
                span = f"{t.offset}..{t.offset + t.nbytes}"
                raise GGUFError(f"tensor {t.name} spans bytes {span} of the data, which has {max(room, 0)}")
    return Header(version, alignment, data_start, metadata, infos)
