"""The GGUF importer on the real test model (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def test_k_quants_and_other_architectures_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(importer.ImportError_, match="architecture 'gemma'"):
        importer.model_config({"general.architecture": "gemma"}, {})
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"not a gguf")
    with pytest.raises(importer.ImportError_, match="not a valid GGUF file: not a GGUF file"):
        importer.import_gguf(bogus, tmp_path / "out", progress=False)
