"""ggml block decoding (kquants) against gguf-py's reference dequantization, and the
MLX forms the importer writes for each type."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from mlxd_worker.models import importer, kquants

gguf = pytest.importorskip("gguf", reason="the gguf package (requirements.txt) is the reference")
from gguf.quants import dequantize as reference  # noqa: E402

# Byte offsets of each type's fp16 scale fields (ggml-common.h).
FP16_FIELDS = {
    kquants.Q4_0: (0,),
    kquants.Q4_1: (0, 2),
    kquants.Q5_0: (0,),
    kquants.Q5_1: (0, 2),
    kquants.Q8_0: (0,),
    kquants.Q2_K: (80, 82),
    kquants.Q3_K: (108,),
    kquants.Q4_K: (0, 2),
    kquants.Q5_K: (0, 2),
    kquants.Q6_K: (208,),
    kquants.IQ4_NL: (0,),
    kquants.IQ4_XS: (0,),
}
K_QUANTS = [kquants.Q2_K, kquants.Q3_K, kquants.Q4_K, kquants.Q5_K, kquants.Q6_K]
LEGACY = [kquants.Q4_0, kquants.Q4_1, kquants.Q5_0, kquants.Q5_1, kquants.Q8_0]
IQ = [kquants.IQ4_NL, kquants.IQ4_XS]


def random_blocks(ggml_type: int, n: int, seed: int = 0) -> np.ndarray:
    """Random bytes, with finite small fp16 scales (±1e-4 … ±0.1)."""
    rng = np.random.default_rng(seed + ggml_type)
    _, size, _ = kquants.DECODERS[ggml_type]
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in FP16_FIELDS[ggml_type]:
        scale = (rng.uniform(1e-4, 0.1, n) * rng.choice([-1, 1], n)).astype(np.float16)
        blocks[:, at : at + 2] = scale.view(np.uint8).reshape(n, 2)
    return blocks


@pytest.mark.parametrize("ggml_type", K_QUANTS + LEGACY + IQ, ids=kquants.type_name)
def test_dequantize_matches_gguf_py(ggml_type: int) -> None:
    blocks = random_blocks(ggml_type, 512)
    ours = kquants.dequantize(blocks, ggml_type)
    ref = reference(blocks, gguf.GGMLQuantizationType(ggml_type)).reshape(-1)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    err = float(np.abs(ours - ref).max())
    print(f"{kquants.type_name(ggml_type)}: max |ours - gguf-py| = {err:g} (max |value| {np.abs(ref).max():g})")
    # Same integer codes and scales, same float operations: the same floats (-0.0 aside).
    assert err == 0.0


@pytest.mark.parametrize("ggml_type", K_QUANTS + LEGACY + IQ, ids=kquants.type_name)
def test_mlx_form_of_each_type(ggml_type: int) -> None:
    """What the importer stores: exact group-32 affine weights for the types with
    32-value groups; otherwise mx.quantize at the default bits, within one step (it
    makes one end of each group exact and may miss the other by a step)."""
    import mlx.core as mx

    per_block, size, _ = kquants.DECODERS[ggml_type]
    rows, row_len = 4, 512
    blocks = random_blocks(ggml_type, rows * row_len // per_block, seed=1)
    values = kquants.dequantize(blocks, ggml_type).reshape(rows, row_len)
    aff = kquants.decode(blocks, ggml_type)
    exact = kquants.exact_bits(ggml_type)
    assert (exact is not None) == (aff.group == kquants.GROUP_SIZE and aff.table is None)
    if exact is not None:
        w, s, b = kquants.to_mlx_exact(aff, rows)
        bits = exact
    else:
        w, s, b = mx.quantize(mx.array(values), group_size=kquants.GROUP_SIZE, bits=kquants.DEFAULT_BITS[ggml_type])
        bits = kquants.DEFAULT_BITS[ggml_type]
    back = np.array(mx.dequantize(mx.array(w), mx.array(s), mx.array(b), group_size=kquants.GROUP_SIZE, bits=bits))
    err = np.abs(back - values)
    if exact is not None:
        assert err.max() <= 1e-6 * np.abs(values).max()
    else:
        step = np.array(s).repeat(kquants.GROUP_SIZE, axis=1)
        assert (err <= np.abs(step) * 1.001 + 1e-6).all()


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_pack_is_mlx_packing(bits: int) -> None:
    import mlx.core as mx

    codes = np.random.default_rng(bits).integers(0, 1 << bits, (3, 64)).astype(np.uint8)
    packed = mx.array(kquants.pack(codes, bits))
    ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
    assert np.array_equal(np.array(mx.dequantize(packed, ones, zeros, group_size=32, bits=bits)), codes)


ROOT = Path(__file__).resolve().parents[2]
GGUF = ROOT / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not GGUF.exists(), reason="scripts/setup fetches the test model")
def test_reader_gives_what_mx_load_gives() -> None:
    """On the Q4_1 test model (Q4_1, Q8_0, F32), the kquants reader yields mx.load's
    metadata and, bit for bit, its weights: mixed files keep today's conversion."""
    import mlx.core as mx

    from mlxd_worker.models.gguf_check import read_header

    header = read_header(GGUF)
    ours = kquants.GGUFTensors(GGUF, header)
    theirs, meta = mx.load(str(GGUF), return_metadata=True)
    assert sorted(ours) == sorted(theirs)
    for name in ["token_embd", "blk.0.attn_q", "blk.7.ffn_down"]:
        for part in ("weight", "scales", "biases"):
            a, b = ours[f"{name}.{part}"], theirs[f"{name}.{part}"]
            assert a.shape == b.shape
            assert mx.array_equal(a, b.astype(a.dtype)).item(), (name, part)
    assert mx.array_equal(ours["blk.3.attn_norm.weight"], theirs["blk.3.attn_norm.weight"]).item()

    def plain(v: object) -> object:
        return v.tolist() if hasattr(v, "tolist") else v

    assert set(meta) <= set(header.metadata)
    for k, v in meta.items():
        assert plain(v) == plain(header.metadata[k]), k


def test_unsupported_types_are_refused_by_name(tmp_path: Path) -> None:
    """An IQ tensor: the error names the tensor and its type."""
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((2, 66), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(importer.ImportError_, match=r"tensor blk\.0\.attn_q\.weight is IQ2_XXS, which cannot be"):
        importer.import_gguf(path, tmp_path / "out", progress=False)
    # A type id ggml does not have: the header check names it.
    data = bytearray(path.read_bytes())
    at = data.index(b"blk.0.attn_q.weight") + len("blk.0.attn_q.weight") + 4 + 2 * 8
    assert struct.unpack_from("<I", data, at)[0] == 16
    struct.pack_into("<I", data, at, 99)
    path.write_bytes(bytes(data))
    with pytest.raises(importer.ImportError_, match=r"tensor blk\.0\.attn_q\.weight has unknown type 99"):
        importer.import_gguf(path, tmp_path / "out", progress=False)
