"""Hostile GGUF headers are refused with a clear error, never a crash, a hang or
a huge allocation: hand-made lies, then a bounded fuzz of the real test model's
header (random byte changes and truncations)."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from mlxd_worker.models.gguf_check import GGUFError, check

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf(tensors: int = 0, kvs: bytes = b"", n_kv: int = 0, infos: bytes = b"", data: bytes = b"") -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, tensors, n_kv) + kvs + infos
    pad = -len(head) % 32
    return head + b"\0" * pad + data


def s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def tensor(name: str, dims: list[int], kind: int, offset: int) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", kind, offset)
    )


def refused(tmp_path: Path, data: bytes, says: str) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(data)
    with pytest.raises(GGUFError, match=says):
        check(p)


def test_a_well_formed_file_passes(tmp_path: Path) -> None:
    p = tmp_path / "ok.gguf"
    p.write_bytes(gguf(1, s("general.name") + struct.pack("<I", 8) + s("t"), 1, tensor("w", [4], 0, 0), b"\0" * 16))
    assert check(p)["tensors"] == 1


def test_hostile_headers_are_refused(tmp_path: Path) -> None:
    refused(tmp_path, b"NOPE" + b"\0" * 20, "not a GGUF file")
    refused(tmp_path, b"GGUF" + struct.pack("<IQQ", 9, 0, 0), "version 9")
    refused(tmp_path, b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0), "tensors")
    refused(tmp_path, b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 60), "claims")
    refused(tmp_path, gguf(0, s("k") + struct.pack("<IIQ", 9, 4, 1 << 62), 1), "elements")
    refused(tmp_path, gguf(0, s("k") + struct.pack("<I", 77), 1), "unknown value type")
    refused(tmp_path, gguf(1, infos=tensor("w", [4] * 9, 0, 0)), "dimensions")
    refused(tmp_path, gguf(1, infos=tensor("w", [4], 99, 0)), "unknown type 99")
    refused(tmp_path, gguf(1, infos=tensor("w", [4], 0, 3)), "not aligned")
    refused(tmp_path, gguf(1, infos=tensor("w", [1 << 20], 0, 0), data=b"\0" * 64), "spans bytes")
    refused(tmp_path, gguf(1, infos=tensor("w", [1 << 30, 1 << 30, 1 << 30], 0, 0)), "elements")
    refused(tmp_path, b"GGUF" + struct.pack("<I", 3), "needs 8 bytes")


@pytest.mark.skipif(not REAL.exists(), reason="scripts/setup fetches the test model")
def test_the_real_header_fuzzed(tmp_path: Path) -> None:
    summary = check(REAL)
    assert summary["tensors"] == 272
    full = REAL.stat().st_size
    with open(REAL, "rb") as f:
        original = f.read(summary["data_start"])  # the header and tensor table
    rng = random.Random(13)
    p = tmp_path / "fuzz.gguf"
    header = 4096  # counts, the first keys and values: where the lengths live
    outcomes = {"refused": 0, "passed": 0}
    for _ in range(300):
        whole = rng.random() < 0.5
        data = bytearray(original if whole else original[: rng.randrange(16, 1 << 16)])
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(header, len(data)))] = rng.randrange(256)
        p.write_bytes(bytes(data))
        if whole:
            os.truncate(p, full)  # the tensor data, as a hole: only sizes matter here
        try:
            check(p)
            outcomes["passed"] += 1
        except GGUFError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100, outcomes
