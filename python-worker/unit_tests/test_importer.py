"""The GGUF importer on the real test model (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mlxd_worker.models import importer

ROOT = Path(__file__).resolve().parents[2]
GGUF = ROOT / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def q4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert GGUF.exists(), "scripts/setup fetches the test model"
    return importer.import_gguf(GGUF, tmp_path_factory.mktemp("m") / "q4", progress=False)


def test_config_and_mixed_quantization(q4_dir: Path) -> None:
    cfg = json.loads((q4_dir / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (576, 30, 9)
    assert cfg["num_key_value_heads"] == 3 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_traditional"] is False
    q = cfg["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32)
    # The GGUF keeps token_embd at Q8_0: it must stay 8-bit, not be read as 4-bit.
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8}


def test_tokenizer_splits_digits_like_llama_cpp(q4_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(q4_dir / "tokenizer.json"))
    ids = tok.encode("12345 apples").ids
    assert [tok.decode([i]) for i in ids[:5]] == ["1", "2", "3", "4", "5"]
    assert tok.decode(tok.encode("Hello, wörld!").ids) == "Hello, wörld!"
    assert tok.token_to_id("<|im_end|>") == 2
    cfg = json.loads((q4_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and "im_start" in cfg["chat_template"]


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    import mlx.core as mx

    heads, rows, cols = 3, 12, 5
    hf = mx.arange(rows * cols).reshape(rows, cols)
    gguf = hf.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert mx.array_equal(importer.unpermute_rows(gguf, heads), hf)


@pytest.mark.skipif(os.environ.get("MLXD_SKIP_SLOW") == "1", reason="slow")
def test_imported_q4_model_answers_paris_greedy(q4_dir: Path) -> None:
    from mlx_lm import generate, load

    model, tok = load(str(q4_dir))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    assert "Paris" in generate(model, tok, ids, max_tokens=10)


def test_other_architectures_and_bad_files_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(importer.ImportError_, match="architecture 'gemma'"):
        importer.model_config({"general.architecture": "gemma"}, {})
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"not a gguf")
    with pytest.raises(importer.ImportError_, match="not a valid GGUF file: not a GGUF file"):
        importer.import_gguf(bogus, tmp_path / "out", progress=False)


# ---- K-quants: the test model requantized into a Q4_K_M-style mix ---------------


@pytest.fixture(scope="module")
def k_gguf() -> Path:
    pytest.importorskip("gguf", reason="the gguf package (requirements.txt) writes the K-quant test file")
    if not GGUF.exists():
        pytest.skip("scripts/setup fetches the test model")
    from kquant_gguf import build_q4_k_m

    return build_q4_k_m(GGUF, ROOT / "target" / "kquant")


@pytest.fixture(scope="module")
def k_dir(k_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    start = time.perf_counter()
    out = importer.import_gguf(k_gguf, tmp_path_factory.mktemp("m") / "k", progress=False)
    print(f"\nimported {k_gguf.name} ({k_gguf.stat().st_size >> 20} MiB) in {time.perf_counter() - start:.2f} s")
    return out


def test_k_quant_mix_config(k_dir: Path) -> None:
    info = json.loads((k_dir / "mlxd-import.json").read_text())
    assert info["file_type"] == "Q4_K_M"
    assert info["tensor_types"] == {"F32": 61, "Q4_K": 16, "Q6_K": 14, "Q8_0": 181}
    q = json.loads((k_dir / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (8, 32)
    # ffn_down: Q4_K → 4 bits (as it is), Q6_K → 6 bits (requantized).
    assert q["model.layers.3.mlp.down_proj"] == {"group_size": 32, "bits": 4}
    assert q["model.layers.5.mlp.down_proj"] == {"group_size": 32, "bits": 6}
    assert "model.layers.3.self_attn.v_proj" not in q  # Q8_0: the default 8


@pytest.fixture(scope="module")
def k_reference(k_gguf: Path) -> dict[str, tuple[int, Any]]:
    """The 2-D weights of blocks 0, 3 and 5 (ffn_down Q6_K, Q4_K, Q6_K; Q8_0 the
    rest) as gguf-py dequantizes them, q/k rows back in Hugging Face order: MLX name →
    (ggml type, floats)."""
    import mlx.core as mx
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from mlxd_worker.models.gguf_check import read_header

    header = read_header(k_gguf)
    heads = {"attn_q": 9, "attn_k": 3}
    out = {}
    with open(k_gguf, "rb") as f:
        for t in header.tensors:
            if len(t.dims) != 2 or not t.name.startswith(("blk.0.", "blk.3.", "blk.5.")):
                continue
            f.seek(header.data_start + t.offset)
            raw = np.frombuffer(f.read(t.nbytes), np.uint8).reshape(t.dims[1], -1)
            ref = dequantize(raw, GGMLQuantizationType(t.ggml_type))
            kind = t.name.split(".")[-2]
            if kind in heads:
                ref = np.array(importer.unpermute_rows(mx.array(ref), heads[kind]))
            out[importer.mlx_name(t.name)] = (t.ggml_type, ref)
    return out


def _check_weights(reference: dict[str, tuple[int, Any]], out_dir: Path, bits: int | None = None) -> None:
    """`out_dir`'s weights against the reference: equal where the type maps onto MLX
    without loss, else within MLX's quantization error (one step: mx.quantize makes
    one end of each group exact and may miss the other by a step)."""
    import mlx.core as mx
    import numpy as np

    from mlxd_worker.models import kquants

    quant = json.loads((out_dir / "config.json").read_text()).get("quantization")
    weights = mx.load(str(out_dir / "model.safetensors"))
    exact_scales = sys.platform != "darwin"  # float16 scales on macOS
    for name, (ggml_type, ref) in reference.items():
        if quant is None:
            assert np.array_equal(np.array(weights[name]), ref), name
            continue
        base = name.rpartition(".")[0]
        have = quant.get(base, quant)["bits"]
        assert have == (bits or kquants.exact_bits(ggml_type) or kquants.DEFAULT_BITS[ggml_type])
        scales = weights[f"{base}.scales"]
        got = np.array(mx.dequantize(weights[name], scales, weights[f"{base}.biases"], group_size=32, bits=have))
        err = np.abs(got - ref)
        if have == kquants.exact_bits(ggml_type) and exact_scales:
            assert err.max() == 0.0, name
        else:
            step = np.abs(np.array(scales.astype(mx.float32))).repeat(32, axis=1)
            assert (err <= step * 1.001 + 1e-6).all(), name


def test_k_quant_weights_are_the_files(k_reference: dict[str, tuple[int, Any]], k_dir: Path) -> None:
    assert {t for t, _ in k_reference.values()} == {8, 12, 14}  # Q8_0, Q4_K, Q6_K
    _check_weights(k_reference, k_dir)


@pytest.mark.parametrize("option", [["--dtype", "float32"], ["--bits", "8"]], ids=["float32", "bits8"])
def test_k_quant_options(
    k_gguf: Path, k_reference: dict[str, tuple[int, Any]], tmp_path: Path, option: list[str]
) -> None:
    assert importer.main([str(k_gguf), "--models-dir", str(tmp_path), "--name", "k", "--no-progress", *option]) == 0
    _check_weights(k_reference, tmp_path / "k", bits=8 if option[0] == "--bits" else None)
    if option[0] == "--bits":
        assert json.loads((tmp_path / "k" / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8}


def test_bits_requantizes_what_mx_load_reads(q4_dir: Path, tmp_path: Path) -> None:
    """--bits on a file mx.load reads whole (Q4_1 + a Q8_0 embedding): every
    quantized tensor gets those bits, within a step of the 4-bit import's values."""
    import mlx.core as mx

    out = importer.import_gguf(GGUF, tmp_path / "q8", progress=False, bits=8)
    assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8}
    a, b = mx.load(str(q4_dir / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    p = "model.layers.2.self_attn.q_proj"
    four = mx.dequantize(a[f"{p}.weight"], a[f"{p}.scales"], a[f"{p}.biases"], group_size=32, bits=4)
    eight = mx.dequantize(b[f"{p}.weight"], b[f"{p}.scales"], b[f"{p}.biases"], group_size=32, bits=8)
    step = mx.repeat(mx.abs(b[f"{p}.scales"]), 32, axis=1)
    assert mx.all(mx.abs(four - eight) <= step * 1.001 + 1e-6).item()


@pytest.mark.skipif(os.environ.get("MLXD_SKIP_SLOW") == "1", reason="slow")
def test_k_quant_import_generates_like_the_q4_1_import(q4_dir: Path, k_dir: Path) -> None:
    """Greedy tokens for two chat prompts, the K-quant import against the Q4_1 one
    (the same weights quantized twice: the first tokens must agree)."""
    from mlx_lm import load, stream_generate

    prompts = ["What is the capital of France?", "Name three primary colors."]
    tokens: dict[str, list[list[int]]] = {}
    for label, path in (("q4_1", q4_dir), ("k", k_dir)):
        model, tok = load(str(path))
        for p in prompts:
            # A short system prompt: SmolLM2's default one triples the prefill, slow on a CPU.
            chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]
            ids = tok.apply_chat_template(chat, add_generation_prompt=True)
            out = [r.token for r in stream_generate(model, tok, ids, max_tokens=4)]
            tokens.setdefault(label, []).append(out)
            print(f"{label:5} {p!r}: {out} {tok.decode(out)!r}")
    for a, b in zip(tokens["q4_1"], tokens["k"]):
        assert a[:3] == b[:3]
