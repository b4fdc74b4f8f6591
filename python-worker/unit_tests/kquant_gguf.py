"""Test helper: simple Q4_K/Q6_K quantizers (valid ggml blocks, min/max and max-abs
scales, no search) and a builder that turns the Q4_1 test model into the GGUF
llama.cpp's Q4_K_M mix would make of it. Needs the gguf package (gguf-py)."""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

F32 = np.float32


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape, F32), where=den > 0)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Float rows (row length a multiple of 256) → Q4_K blocks (n, 144): per 32-value
    sub-block, value = d*sc*q - dmin*m with the sub-block's min (≤ 0) and max."""
    x = x.reshape(-1, 8, 32).astype(F32)
    n = len(x)
    lo, hi = np.minimum(x.min(axis=2), 0), np.maximum(x.max(axis=2), 0)
    step = (hi - lo) / 15
    d = (step.max(axis=1) / 63).astype(np.float16)
    dmin = ((-lo).max(axis=1) / 63).astype(np.float16)
    df, dminf = d.astype(F32)[:, None], dmin.astype(F32)[:, None]
    sc = np.clip(np.round(_ratio(step, df)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(_ratio(-lo, dminf)), 0, 63).astype(np.uint8)
    q = np.round(_ratio(x + (dminf * m)[:, :, None], (df * sc)[:, :, None]))
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(n, 4, 2, 32)  # (32-byte chunk, nibble, l)
    # The 12 scale bytes (get_scale_min_k4 read backwards).
    scales = np.concatenate(
        [
            (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
            (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
        ],
        axis=1,
    ).astype(np.uint8)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Float rows (row length a multiple of 256) → Q6_K blocks (n, 210): per 16-value
    sub-block, value = d*sc*(q - 32) with the sub-block's largest |value|."""
    x = x.reshape(-1, 16, 16).astype(F32)
    n = len(x)
    step = np.abs(x).max(axis=2) / 31
    d = (step.max(axis=1) / 127).astype(np.float16)
    df = d.astype(F32)[:, None]
    sc = np.clip(np.round(_ratio(step, df)), 0, 127).astype(np.int8)
    q = np.clip(np.round(_ratio(x, (df * sc)[:, :, None])), -32, 31) + 32
    q = q.astype(np.uint8).reshape(n, 2, 4, 32)  # (half, k, l)
    low, high = q & 15, q >> 4
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)


# Types for rows that do not fill 256-value super-blocks: llama.cpp's, and this test's.
LLAMA_CPP_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
FALLBACK = {"Q4_K": "Q8_0", "Q6_K": "Q8_0"}


def q4_k_m_type(name: str, row_len: int, n_layer: int, fallback: dict[str, str] = FALLBACK) -> str:
    """The type llama.cpp's Q4_K_M gives a tensor (llama_tensor_get_type, simplified to
    a llama model with tied embeddings: Q6_K for the embedding and for attn_v/ffn_down
    in a third of the layers, Q4_K for the rest). Rows that do not fill 256-value
    super-blocks (SmolLM2's 576-wide ones) fall back to Q8_0 here. llama.cpp falls
    back to Q5_0 for Q4_K; but this file is made from a Q4_1 one, and Q5_0 re-rounding
    Q4_1's grid adds ~4% (rms) noise to those weights, which alone changes the tiny
    model's greedy answers, imported quantized or in float32 alike.
    """

    def more_bits(i: int) -> bool:
        return i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2

    parts = name.split(".")
    if name in ("output.weight", "token_embd.weight"):
        kind = "Q6_K"
    elif parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down"):
        kind = "Q6_K" if more_bits(int(parts[1])) else "Q4_K"
    else:
        kind = "Q4_K"
    return fallback[kind] if row_len % 256 else kind


def build_q4_k_m(source: Path, cache_dir: Path, fallback: dict[str, str] = FALLBACK) -> Path:
    """The Q4_1 `source` requantized into a Q4_K_M-style mix; cached in `cache_dir`
    under a hash of the source's size and date and of this builder's code."""
    import gguf
    from gguf.quants import dequantize, quantize

    st = source.stat()
    code = inspect.getsource(sys.modules[__name__])
    key = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{version('gguf')}:{fallback}:{code}".encode()).hexdigest()[:16]
    out = cache_dir / f"{source.stem.replace('Q4_1', 'Q4_K_M')}-{key}.gguf"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(source)
    tmp = out.with_suffix(f".{os.getpid()}.partial")
    writer = gguf.GGUFWriter(tmp, "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    n_layer = int(reader.fields["llama.block_count"].contents())
    T = gguf.GGMLQuantizationType
    for t in reader.tensors:
        data: Any = t.data
        if t.tensor_type in (T.F32, T.F16):
            writer.add_tensor(t.name, np.array(data), raw_dtype=t.tensor_type)
            continue
        x = dequantize(np.array(data), t.tensor_type)  # (rows, row length) floats
        kind = q4_k_m_type(t.name, x.shape[-1], n_layer, fallback)
        if kind == "Q4_K":
            blocks = quantize_q4_k(x).reshape(x.shape[0], -1)
        elif kind == "Q6_K":
            blocks = quantize_q6_k(x).reshape(x.shape[0], -1)
        else:
            blocks = quantize(x, T[kind])
        writer.add_tensor(t.name, blocks, raw_dtype=T[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out
