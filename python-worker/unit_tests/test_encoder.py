"""The MLX encoder (models/encoder.py) against a numpy BERT of the same weights:
all-MiniLM-L6-v2, as scripts/setup installs it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlxd_worker.models import encoder

MODEL = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "all-minilm-l6-v2"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Stock markets fell sharply on Monday after the central bank raised interest rates again.",
]


@pytest.fixture(scope="module")
def model() -> encoder.EmbeddingModel:
    assert MODEL.is_dir(), "scripts/setup installs the embedding model"
    return encoder.load(MODEL)


def numpy_bert(model_dir: Path, ids: list[int]) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2 in numpy: BERT, mean pooling, L2 norm."""
    from safetensors.numpy import load_file

    w = load_file(str(model_dir / "model.safetensors"))
    c = json.loads((model_dir / "config.json").read_text())
    eps, heads = c["layer_norm_eps"], c["num_attention_heads"]
    erf = np.frompyfunc(math.erf, 1, 1)

    def norm(x: np.ndarray, p: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def linear(x: np.ndarray, p: str) -> np.ndarray:
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    n = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
    x = norm(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm").astype(np.float64)
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        d = x.shape[-1] // heads
        q, k, v = (
            linear(x, p + f"attention.self.{m}").reshape(n, heads, d).transpose(1, 0, 2)
            for m in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (scores / scores.sum(-1, keepdims=True)) @ v
        x = norm(
            linear(attended.transpose(1, 0, 2).reshape(n, -1), p + "attention.output.dense") + x,
            p + "attention.output.LayerNorm",
        )
        h = linear(x, p + "intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)).astype(np.float64))
        x = norm(linear(h, p + "output.dense") + x, p + "output.LayerNorm")
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def test_vectors_equal_a_numpy_bert_of_the_same_weights(model: encoder.EmbeddingModel) -> None:
    rows = [model.tokenize(s) for s in SENTENCES]
    assert rows[0][0] == 101 and rows[0][-1] == 102  # [CLS] ... [SEP], as the model was trained
    got = np.array(model.embed(rows))  # one batch: the short rows are padded
    assert got.shape == (len(SENTENCES), 384)
    for row, vector in zip(rows, got):
        want = numpy_bert(MODEL, row)
        cosine = float(vector @ want / np.linalg.norm(vector))
        assert cosine >= 0.9999, cosine
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_the_vector_on_the_models_card(model: encoder.EmbeddingModel) -> None:
    """sentence-transformers' own first values for its example sentence."""
    got = np.array(model.embed([model.tokenize("This is an example sentence")]))[0, :5]
    assert np.allclose(got, [0.0677, 0.0635, 0.0487, 0.0793, 0.0374], atol=1e-4), got


def test_close_sentences_are_closer_than_unrelated_ones(model: encoder.EmbeddingModel) -> None:
    v = np.array(model.embed([model.tokenize(s) for s in SENTENCES]))
    sim = v @ v.T
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[0, 4]) + 0.3
    assert sim[1, 0] > sim[1, 4] and sim[3, 0] > sim[3, 4]


def test_a_vector_does_not_depend_on_its_batch(model: encoder.EmbeddingModel) -> None:
    rows = [model.tokenize(s) for s in SENTENCES]
    alone = np.array(model.embed([rows[0]]))[0]
    batched = np.array(model.embed([rows[4], rows[0]]))[1]
    assert float(alone @ batched) >= 0.99999


def test_the_sentence_transformers_files_set_pooling_and_length(tmp_path: Path, model: encoder.EmbeddingModel) -> None:
    assert model.pooling == encoder.Pooling("mean", normalize=True)
    assert model.max_tokens == 256  # sentence_bert_config.json's max_seq_length, not the 512 positions
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert encoder.Pooling.from_dir(tmp_path) == encoder.Pooling("cls", normalize=False)


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"model_type": "llama"}, "not an encoder"),
        ({"model_type": "bert", "position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"model_type": "bert", "hidden_act": "swish"}, "hidden_act"),
        ({"model_type": "bert", "hidden_act": "gelu"}, "lacks"),
    ],
)
def test_an_encoder_it_cannot_serve_is_refused_with_the_reason(config: dict[str, Any], reason: str) -> None:
    with pytest.raises(encoder.EncoderError, match=reason):
        encoder.EncoderConfig.from_dict(config)
