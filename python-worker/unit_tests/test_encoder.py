"""The MLX encoder (models/encoder.py) against a numpy BERT of the same weights:
all-MiniLM-L6-v2, as scripts/setup installs it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import bert_reference
import mlx.core as mx
import numpy as np
import pytest

from mlxd_worker.errors import UnservableModel
from mlxd_worker.models import embedder, encoder

MODEL = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "all-minilm-l6-v2"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Stock markets fell sharply on Monday after the central bank raised interest rates again.",
]


@pytest.fixture(scope="module")
def model() -> embedder.EmbeddingModel:
    assert MODEL.is_dir(), "scripts/setup installs the embedding model"
    return embedder.load(MODEL)


def test_vectors_equal_a_numpy_bert_of_the_same_weights(model: embedder.EmbeddingModel) -> None:
    rows = [model.tokenize(s) for s in SENTENCES]
    assert rows[0][0] == 101 and rows[0][-1] == 102  # [CLS] ... [SEP], as the model was trained
    got = np.array(model.embed(rows))  # one batch: the short rows are padded
    assert got.shape == (len(SENTENCES), 384)
    for row, vector in zip(rows, got):
        want = bert_reference.sentence_vector(MODEL, row)
        cosine = float(vector @ want / np.linalg.norm(vector))
        assert cosine >= 0.9999, cosine
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_the_vector_on_the_models_card(model: embedder.EmbeddingModel) -> None:
    """sentence-transformers' own first values for its example sentence."""
    got = np.array(model.embed([model.tokenize("This is an example sentence")]))[0, :5]
    assert np.allclose(got, [0.0677, 0.0635, 0.0487, 0.0793, 0.0374], atol=1e-4), got


def test_close_sentences_are_closer_than_unrelated_ones(model: embedder.EmbeddingModel) -> None:
    v = np.array(model.embed([model.tokenize(s) for s in SENTENCES]))
    sim = v @ v.T
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[0, 4]) + 0.3
    assert sim[1, 0] > sim[1, 4] and sim[3, 0] > sim[3, 4]


def test_a_vector_does_not_depend_on_its_batch(model: embedder.EmbeddingModel) -> None:
    rows = [model.tokenize(s) for s in SENTENCES]
    alone = np.array(model.embed([rows[0]]))[0]
    batched = np.array(model.embed([rows[4], rows[0]]))[1]
    assert float(alone @ batched) >= 0.99999


def test_the_sentence_transformers_files_set_pooling_and_length(tmp_path: Path, model: embedder.EmbeddingModel) -> None:
    assert model.pooling == embedder.Pooling("mean", normalize=True)
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
    assert embedder.Pooling.from_dir(tmp_path) == embedder.Pooling("cls", normalize=False)


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
    with pytest.raises(UnservableModel, match=reason):
        encoder.EncoderConfig.from_dict(config)


def test_a_cross_encoders_relevance_equals_numpy_of_its_weights(tmp_path: Path) -> None:
    """A BertForSequenceClassification (random, written like Hugging Face saves one):
    each (query, document) pair's score is the sigmoid of its logit, with the
    document's token types, batched with padding."""
    directory = bert_reference.write_tiny_cross_encoder(tmp_path / "reranker", MODEL)
    model = embedder.load(directory)
    assert model.head is not None
    docs = [
        "Paris is the capital of France.",
        "Bananas are yellow.",
        "The capital city of France is Paris, on the Seine.",
    ]
    pairs = [model.pair("What is the capital of France?", d) for d in docs]
    assert pairs[0][1][-1] == 1 and pairs[0][1][0] == 0  # the document's tokens are type 1
    got = np.array(model.relevance([ids for ids, _ in pairs], [types for _, types in pairs]))
    want = [bert_reference.relevance(directory, ids, types) for ids, types in pairs]
    assert np.allclose(got, want, atol=1e-5), (got, want)
    long = model.pair("query", "word " * 400)
    assert len(long[0]) == model.max_tokens == 128  # the document is cut to fit


def test_a_modernbert_equals_numpy_of_its_weights(tmp_path: Path) -> None:
    """A tiny random ModernBERT (masked-LM layout, mean pooling): rotary positions,
    GeGLU, and a local window narrower than the inputs on its middle layer; batched
    with padding, each vector equals the numpy ModernBertModel's."""
    directory = bert_reference.write_tiny_modernbert(tmp_path / "modernbert", MODEL)
    model = embedder.load(directory)
    assert (model.family, model.dims, model.pooling) == ("modernbert", 64, embedder.Pooling("mean", True))
    rows = [model.tokenize(s) for s in SENTENCES]
    assert max(len(r) for r in rows) > 2 * bert_reference.MODERNBERT_LOCAL
    got = np.array(model.embed(rows))
    for row, vector in zip(rows, got):
        want = bert_reference.modernbert_vector(directory, row)
        assert float(vector @ want) >= 0.9999
        assert np.allclose(vector, want, atol=1e-4)


def test_a_modernbert_in_float16_with_long_padding_is_not_nan(tmp_path: Path) -> None:
    """A short row batched with one longer than twice the window: its padded
    positions past the window see only themselves, not nothing (a NaN that the
    next layer would carry into the real tokens)."""
    directory = bert_reference.write_tiny_modernbert(tmp_path / "half", MODEL, dtype=np.float16)
    model = embedder.load(directory)
    short, long = model.tokenize("Stocks fell."), model.tokenize(SENTENCES[4] + " " + SENTENCES[2])
    assert len(long) - len(short) > 2 * bert_reference.MODERNBERT_LOCAL
    got = np.array(model.embed([short, long]).astype(mx.float32))
    assert np.isfinite(got).all()
    for row, vector in zip([short, long], got):
        assert float(vector @ bert_reference.modernbert_vector(directory, row)) >= 0.999


def test_a_modernbert_config_as_transformers_5_writes_it(tmp_path: Path) -> None:
    """layer_types and rope_parameters instead of global_attn_every_n_layers and the
    thetas: the same model, the same vectors."""
    directory = bert_reference.write_tiny_modernbert(tmp_path / "modernbert", MODEL)
    row = embedder.load(directory).tokenize(SENTENCES[4])
    want = bert_reference.modernbert_vector(directory, row)  # read from the older keys
    config = json.loads((directory / "config.json").read_text())
    every = config.pop("global_attn_every_n_layers")
    config["layer_types"] = [
        "sliding_attention" if i % every else "full_attention" for i in range(config["num_hidden_layers"])
    ]
    config["rope_parameters"] = {
        "full_attention": {"rope_type": "default", "rope_theta": config.pop("global_rope_theta")},
        "sliding_attention": {"rope_type": "default", "rope_theta": config.pop("local_rope_theta")},
    }
    (directory / "config.json").write_text(json.dumps(config))
    vector = np.array(embedder.load(directory).embed([row]))[0]
    assert float(vector @ want) >= 0.9999
