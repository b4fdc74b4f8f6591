"""ggml block quantizations → numpy floats and MLX affine weights (``mlxd import``).

``mx.load`` reads F32/F16/BF16 and the legacy blocks Q4_0, Q4_1 and Q8_0 of a GGUF
file. This module reads the tensors of files that also hold other block types —
Q5_0, Q5_1 and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K that llama.cpp's mixes
(Q4_K_M, …) are made of — straight from the file, one tensor at a time, at the
offsets ``gguf_check`` validated.

Every supported block type is affine per group of 16 or 32 values: a value is
``scale * (code - zero) + bias`` with an unsigned integer code. The decoders below
unpack a block's codes, scales and biases exactly as llama.cpp's ``ggml-common.h``
lays them out and compute the values with the same float operations as its
``dequantize_row_*`` functions, vectorised over all blocks of a tensor chunk.

Types whose groups hold 32 values (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) map onto
MLX affine quantization with group size 32 without loss: same codes, same scales,
bias ``bias - zero * scale``. Q2_K, Q3_K and Q6_K keep one scale per 16 values,
which MLX's group sizes (32, 64, 128) cannot express: those are dequantized and
quantized again with ``mx.quantize`` (group size 32, 4 bits for Q2_K and Q3_K, 6 for
Q6_K, unless the caller asks for other bits). So are IQ4_NL and IQ4_XS (5 bits),
whose 4-bit codes index a fixed table of 16 unevenly spaced levels; the other IQ
types (lattice codebooks) are not read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
import numpy.typing as npt

from .gguf_check import Header, TensorInfo

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

# ggml type ids (ggml.h, enum ggml_type) and their names, for messages.
TYPE_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
    40: "NVFP4",
    41: "Q1_0",
}
F32_TYPE, F16_TYPE, BF16_TYPE = 0, 1, 30
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
IQ4_NL, IQ4_XS = 20, 23
# What mx.load reads by itself.
MX_LOAD_TYPES = frozenset({F32_TYPE, F16_TYPE, BF16_TYPE, Q4_0, Q4_1, Q8_0})

GROUP_SIZE = 32  # MLX group size for every imported quantized tensor
QK_K = 256  # values per K-quant super-block
# Values per chunk when a tensor is converted (bounds the float32 temporaries).
CHUNK_VALUES = 1 << 22


def type_name(ggml_type: int) -> str:
    return TYPE_NAMES.get(ggml_type, f"type {ggml_type}")


@dataclass
class Affine:
    """Decoded blocks: value = scales * (codes - zero) + biases, per group of
    ``group`` consecutive values (biases None: zero); with a table, value = scales *
    table[codes] (IQ4_NL, IQ4_XS: not affine)."""

    codes: U8  # (blocks, values per block)
    scales: F32  # (blocks, groups per block)
    biases: Optional[F32]  # (blocks, groups per block)
    zero: int
    bits: int  # bits one code needs
    group: int
    table: Optional[F32] = None

    def values(self) -> F32:
        n, per_block = self.codes.shape
        codes = self.codes.reshape(n, -1, self.group)
        q = self.table[codes] if self.table is not None else codes.astype(np.float32)
        if self.zero:
            q -= np.float32(self.zero)
        v = self.scales[:, :, None] * q
        if self.biases is not None:
            v += self.biases[:, :, None]
        return v.reshape(n, per_block)


def _f16(blocks: U8, at: int) -> F32:
    """The fp16 field at byte `at` of every block, as float32 (blocks, 1)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: U8) -> U8:
    """(n, k) bytes → (n, 2, k): the low nibbles, then the high ones."""
    return np.stack([qs & 0x0F, qs >> 4], axis=1)


def _bit_planes(bits: U8, count: int) -> U8:
    """(n, k) bytes → (n, count, k): bit i of every byte in plane i."""
    shifts = np.arange(count, dtype=np.uint8)[None, :, None]
    return (bits[:, None, :] >> shifts) & np.uint8(1)


# ---- legacy 32-value blocks (ggml-common.h block_q4_0 … block_q8_0) -------------


def _q4_0(b: U8) -> Affine:
    # half d; u8 qs[16]: value j = low nibble of qs[j], value j+16 = its high nibble.
    codes = _nibbles(b[:, 2:18]).reshape(-1, 32)
    return Affine(codes, _f16(b, 0), None, 8, 4, 32)


def _q4_1(b: U8) -> Affine:
    # half d; half m; u8 qs[16]: value = d * code + m.
    codes = _nibbles(b[:, 4:20]).reshape(-1, 32)
    return Affine(codes, _f16(b, 0), _f16(b, 2), 0, 4, 32)


def _five_bit(qh: U8, qs: U8) -> U8:
    # The fifth bit of value j is bit j of the little-endian u32 qh.
    high = _bit_planes(qh, 8).transpose(0, 2, 1).reshape(-1, 32)
    return _nibbles(qs).reshape(-1, 32) | (high << np.uint8(4))


def _q5_0(b: U8) -> Affine:
    # half d; u8 qh[4]; u8 qs[16].
    return Affine(_five_bit(b[:, 2:6], b[:, 6:22]), _f16(b, 0), None, 16, 5, 32)


def _q5_1(b: U8) -> Affine:
    # half d; half m; u8 qh[4]; u8 qs[16].
    return Affine(_five_bit(b[:, 4:8], b[:, 8:24]), _f16(b, 0), _f16(b, 2), 0, 5, 32)


def _q8_0(b: U8) -> Affine:
    # half d; i8 qs[32]: stored as code = q + 128.
    codes = (b[:, 2:34] ^ np.uint8(0x80)).astype(np.uint8)
    return Affine(codes, _f16(b, 0), None, 128, 8, 32)


# ---- K-quants: 256-value super-blocks (ggml-common.h block_q2_K … block_q6_K) ----


def _two_bit_planes(qs: U8) -> U8:
    """Q2_K/Q3_K low bits: (n, 64) → (n, 256). Value h*128 + j*32 + l is bits
    2j..2j+1 of qs[h*32 + l]."""
    n = qs.shape[0]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    return ((qs.reshape(n, 2, 1, 32) >> shifts) & np.uint8(3)).reshape(n, QK_K)


def _q2_k(b: U8) -> Affine:
    # u8 scales[16] (low nibble: scale, high: min); u8 qs[64]; half d; half dmin.
    sc = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    scales = d * (sc & 0x0F).astype(np.float32)
    biases = -(dmin * (sc >> 4).astype(np.float32))
    return Affine(_two_bit_planes(b[:, 16:80]), scales, biases, 0, 2, 16)


def _q3_k(b: U8) -> Affine:
    # u8 hmask[32]; u8 qs[64]; u8 scales[12] (16 six-bit scales); half d.
    # Value h*128 + j*32 + l: low two bits as Q2_K, third bit = bit 4h+j of hmask[l];
    # llama.cpp subtracts 4 when that bit is clear, i.e. code = low + 4*bit, zero 4.
    n = b.shape[0]
    high = _bit_planes(b[:, 0:32], 8).reshape(n, QK_K)
    codes = _two_bit_planes(b[:, 32:96]) | (high << np.uint8(2))
    s = b[:, 96:108]
    # Scale k: low 4 bits from s[k % 8] (nibble k // 8), high 2 from s[8 + k % 4]
    # (bits 2 * (k // 4)).
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]
    hi2 = ((s[:, None, 8:12] >> shifts) & np.uint8(3)).reshape(n, 16)
    sc = (low | (hi2 << np.uint8(4))).astype(np.int16) - 32
    return Affine(codes, _f16(b, 108) * sc.astype(np.float32), None, 4, 3, 16)


def _scale_min_k4(s: U8) -> tuple[U8, U8]:
    """Q4_K/Q5_K's 12 bytes → 8 six-bit scales and 8 six-bit mins (get_scale_min_k4):
    j < 4: scale s[j] & 63, min s[j+4] & 63; j >= 4: the low 4 bits from s[j+4]'s
    nibbles, the high 2 from the top bits of s[j-4] (scale) and s[j] (min)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << np.uint8(4))], axis=1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << np.uint8(4))], axis=1)
    return scales, mins


def _k4_affine(b: U8, codes: U8, bits: int) -> Affine:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    return Affine(codes, d * sc.astype(np.float32), -(dmin * mn.astype(np.float32)), 0, bits, 32)


def _k4_low(qs: U8) -> U8:
    """Q4_K/Q5_K low nibbles: (n, 128) → (n, 256). Sub-block 2c is the low nibbles
    of qs[32c : 32c+32], sub-block 2c+1 their high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(n, QK_K)


def _q4_k(b: U8) -> Affine:
    # half d; half dmin; u8 scales[12]; u8 qs[128].
    return _k4_affine(b, _k4_low(b[:, 16:144]), 4)


def _q5_k(b: U8) -> Affine:
    # half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]: the fifth bit of
    # sub-block s is bit s of qh[l].
    n = b.shape[0]
    high = _bit_planes(b[:, 16:48], 8).reshape(n, QK_K)
    return _k4_affine(b, _k4_low(b[:, 48:176]) | (high << np.uint8(4)), 5)


def _q6_k(b: U8) -> Affine:
    # u8 ql[128]; u8 qh[64]; i8 scales[16]; half d. Value h*128 + k*32 + l: low 4 bits
    # from ql[h*64 + (k % 2)*32 + l] (nibble k // 2), high 2 bits from qh[h*32 + l]
    # (bits 2k); zero 32; scale d * scales[value // 16].
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 2, 32)  # (h, nibble, k % 2, l)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & np.uint8(3)
    codes = (low | (high << np.uint8(4))).reshape(n, QK_K)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    return Affine(codes, _f16(b, 208) * sc, None, 32, 6, 16)


# ---- IQ4_NL, IQ4_XS: 4-bit indices into a table of 16 levels (kvalues_iq4nl) ------

IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def _iq4_nl(b: U8) -> Affine:
    # half d; u8 qs[16] (nibbles ordered as Q4_0's); value = d * level[code].
    codes = _nibbles(b[:, 2:18]).reshape(-1, 32)
    return Affine(codes, _f16(b, 0), None, 0, 4, 32, IQ4_LEVELS)


def _iq4_xs(b: U8) -> Affine:
    # half d; u16 scales_h; u8 scales_l[4]; u8 qs[128]. Sub-block i (32 values): scale
    # d * (ls - 32), ls = nibble i % 2 of scales_l[i // 2] | bits 2i..2i+1 of scales_h
    # << 4; its codes as an IQ4_NL block's in qs[16i : 16i+16].
    n = b.shape[0]
    low = _nibbles(b[:, 4:8]).transpose(0, 2, 1).reshape(n, 8)
    scales_h = np.ascontiguousarray(b[:, 2:4]).view("<u2")
    high = ((scales_h >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)
    ls = (low | (high << np.uint8(4))).astype(np.int16) - 32
    codes = _nibbles(b[:, 8:136].reshape(n * 8, 16)).reshape(n, 256)
    return Affine(codes, _f16(b, 0) * ls.astype(np.float32), None, 0, 4, 32, IQ4_LEVELS)


# type → (values per block, bytes per block, decoder)
DECODERS: dict[int, tuple[int, int, Callable[[U8], Affine]]] = {
    Q4_0: (32, 18, _q4_0),
    Q4_1: (32, 20, _q4_1),
    Q5_0: (32, 22, _q5_0),
    Q5_1: (32, 24, _q5_1),
    Q8_0: (32, 34, _q8_0),
    Q2_K: (QK_K, 84, _q2_k),
    Q3_K: (QK_K, 110, _q3_k),
    Q4_K: (QK_K, 144, _q4_k),
    Q5_K: (QK_K, 176, _q5_k),
    Q6_K: (QK_K, 210, _q6_k),
    IQ4_NL: (32, 18, _iq4_nl),
    IQ4_XS: (QK_K, 136, _iq4_xs),
}
# Types whose groups hold 32 values: their codes' bits (MLX keeps them as they are).
EXACT_BITS = {Q4_0: 4, Q4_1: 4, Q5_0: 5, Q5_1: 5, Q8_0: 8, Q4_K: 4, Q5_K: 5}
# Bits a requantized type gets by default: the K-quants whose groups hold 16 values,
# and the IQ4 types (uneven levels: 4 bits would add ~35% to their rms error, 5 ~10%).
DEFAULT_BITS = {Q2_K: 4, Q3_K: 4, Q6_K: 6, IQ4_NL: 5, IQ4_XS: 5}
SUPPORTED = frozenset({F32_TYPE, F16_TYPE, BF16_TYPE, *DECODERS})


def decode(raw: U8, ggml_type: int) -> Affine:
    """Decodes raw block bytes (any shape, whole blocks) of a block type."""
    _, size, decoder = DECODERS[ggml_type]
    return decoder(np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, size))


def dequantize(raw: U8, ggml_type: int) -> F32:
    """Raw block bytes → float32 values, flat, as llama.cpp's dequantize_row_* gives them."""
    return decode(raw, ggml_type).values().reshape(-1)


def exact_bits(ggml_type: int) -> int | None:
    """The bits of the MLX group-32 affine form that holds this type without loss, or None."""
    return EXACT_BITS.get(ggml_type)


def pack(codes: U8, bits: int) -> npt.NDArray[np.uint32]:
    """(rows, k) codes → MLX's packing: a little-endian bit stream, `bits` per code,
    read as uint32 words (rows, k * bits / 32)."""
    rows, k = codes.shape
    if bits == 8:
        packed = np.ascontiguousarray(codes)
    elif bits == 4:
        packed = codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))
    else:
        planes = np.unpackbits(codes[:, :, None], axis=2, count=bits, bitorder="little")
        packed = np.packbits(planes.reshape(rows, k * bits), axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4")


def to_mlx_exact(aff: Affine, rows: int) -> tuple[npt.NDArray[np.uint32], F32, F32]:
    """Group-32 blocks of `rows` whole rows → (packed weight, scales, biases) that MLX
    dequantizes to the same values."""
    assert aff.group == GROUP_SIZE and aff.table is None
    scales = aff.scales.reshape(rows, -1)
    biases = np.zeros_like(scales) if aff.biases is None else aff.biases.reshape(rows, -1)
    if aff.zero:
        biases = biases - np.float32(aff.zero) * scales
    return pack(aff.codes.reshape(rows, -1), aff.bits), scales, biases


class TensorError(Exception):
    """A tensor the importer cannot read (its type, or the file ended); the message
    names it."""


# One converted tensor: {"weight"} dense, or {"weight", "scales", "biases"}.
Parts = dict[str, mx.array]


class GGUFTensors(Mapping[str, mx.array]):
    """The tensors of a checked GGUF file by the names ``mx.load`` gives them
    (``X.weight``, plus ``X.scales``/``X.biases`` for quantized ones), each read
    from the file and converted when first asked for (the last one is kept).

    dense: every tensor as float32 (block types dequantized). Otherwise a 2-D
    tensor of a block type becomes MLX affine weights with group size 32 and
    `bits` bits (default: without loss where possible, else DEFAULT_BITS).
    """

    def __init__(self, path: Path, header: Header, dense: bool = False, bits: int | None = None) -> None:
        self.path = path
        self.data_start = header.data_start
        self.dense = dense
        self.bits = bits
        self._keys: dict[str, tuple[TensorInfo, str]] = {}
        self._last: tuple[str, Parts] | None = None
        for t in header.tensors:
            if t.ggml_type not in SUPPORTED:
                raise TensorError(
                    f"tensor {t.name} is {type_name(t.ggml_type)}, which cannot be imported (supported: "
                    + ", ".join(type_name(k) for k in sorted(SUPPORTED))
                    + ")"
                )
            if self._quantized(t):
                base = t.name[: -len(".weight")]
                for part in ("weight", "scales", "biases"):
                    self._keys[f"{base}.{part}"] = (t, part)
            else:
                self._keys[t.name] = (t, "weight")

    def _quantized(self, t: TensorInfo) -> bool:
        return not self.dense and t.ggml_type in DECODERS and len(t.dims) == 2 and t.name.endswith(".weight")

    def __getitem__(self, key: str) -> mx.array:
        t, part = self._keys[key]
        if self._last is None or self._last[0] != t.name:
            self._last = (t.name, self.convert(t))
        return self._last[1][part]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def raw(self, t: TensorInfo) -> U8:
        with open(self.path, "rb") as f:
            f.seek(self.data_start + t.offset)
            data = f.read(t.nbytes)
        if len(data) != t.nbytes:
            raise TensorError(f"tensor {t.name}: the file ended early")
        return np.frombuffer(data, dtype=np.uint8)

    def convert(self, t: TensorInfo) -> Parts:
        raw = self.raw(t)
        shape = tuple(reversed(t.dims))  # ggml lists the row length first
        if t.ggml_type == F32_TYPE:
            return {"weight": mx.array(raw.view("<f4").reshape(shape))}
        if t.ggml_type == F16_TYPE:
            return {"weight": mx.array(raw.view("<f2").reshape(shape))}
        if t.ggml_type == BF16_TYPE:
            wide = raw.view("<u2").astype(np.uint32) << 16
            return {"weight": mx.array(wide.view(np.float32).reshape(shape))}
        per_block, size, _ = DECODERS[t.ggml_type]
        row_len = shape[-1]
        row_bytes = row_len // per_block * size
        n_rows = t.nbytes // row_bytes
        step = max(1, CHUNK_VALUES // row_len)
        chunks = [raw[i * row_bytes : min(i + step, n_rows) * row_bytes] for i in range(0, n_rows, step)]
        if not self._quantized(t):
            dense = np.concatenate([dequantize(c, t.ggml_type) for c in chunks])
            return {"weight": mx.array(dense.reshape(shape))}
        exact = exact_bits(t.ggml_type)
        bits = self.bits or exact or DEFAULT_BITS[t.ggml_type]
        out: list[tuple[mx.array, mx.array, mx.array]] = []
        for c in chunks:
            aff = decode(c, t.ggml_type)
            rows = c.size // row_bytes
            if bits == exact:
                pw, ps, pb = to_mlx_exact(aff, rows)
                out.append((mx.array(pw), mx.array(ps), mx.array(pb)))
            else:
                q = mx.quantize(mx.array(aff.values().reshape(rows, row_len)), group_size=GROUP_SIZE, bits=bits)
                mx.eval(*q)
                out.append((q[0], q[1], q[2]))
        w, s, b = out[0] if len(out) == 1 else (mx.concatenate([o[i] for o in out]) for i in range(3))
        return {"weight": w, "scales": s, "biases": b}
