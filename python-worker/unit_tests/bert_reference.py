"""BERT in numpy, the reference the MLX encoder (models/encoder.py) is checked
against, and a tiny random cross-encoder written the way Hugging Face saves
BertForSequenceClassification (for rerank tests: no hub here)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]


def _weights(model_dir: Path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors.numpy import load_file

    w = {k.removeprefix("bert."): v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    return w, json.loads((model_dir / "config.json").read_text())


def states(model_dir: Path, ids: list[int], types: list[int] | None = None) -> np.ndarray:
    """The last layer's hidden states of one unpadded input (float64)."""
    w, c = _weights(model_dir)
    eps, heads = c["layer_norm_eps"], c["num_attention_heads"]
    erf = np.frompyfunc(math.erf, 1, 1)

    def norm(x: np.ndarray, p: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def linear(x: np.ndarray, p: str) -> np.ndarray:
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    n = len(ids)
    kinds = types if types is not None else [0] * n
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
    x = norm(x + w["embeddings.token_type_embeddings.weight"][kinds], "embeddings.LayerNorm").astype(np.float64)
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
    return x


def sentence_vector(model_dir: Path, ids: list[int]) -> np.ndarray:
    """sentence-transformers' mean pooling and L2 normalization."""
    pooled = states(model_dir, ids).mean(0)
    return pooled / np.linalg.norm(pooled)


def relevance(model_dir: Path, ids: list[int], types: list[int]) -> float:
    """BertForSequenceClassification with one label, through a sigmoid."""
    w, _ = _weights(model_dir)
    first = states(model_dir, ids, types)[0]
    pooled = np.tanh(first @ w["pooler.dense.weight"].T + w["pooler.dense.bias"])
    logit = float(pooled @ w["classifier.weight"][0] + w["classifier.bias"][0])
    return 1.0 / (1.0 + math.exp(-logit))


def write_tiny_cross_encoder(out: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide BertForSequenceClassification with random weights and the
    given model's (BERT uncased) tokenizer files."""
    from safetensors.numpy import save_file

    hidden, inner, layers, vocab, positions = 64, 128, 2, 30522, 128
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "bert.embeddings.word_embeddings.weight": rand(vocab, hidden),
        "bert.embeddings.position_embeddings.weight": rand(positions, hidden),
        "bert.embeddings.token_type_embeddings.weight": rand(2, hidden),
        "bert.embeddings.LayerNorm.weight": 1 + rand(hidden),
        "bert.embeddings.LayerNorm.bias": rand(hidden),
        "bert.pooler.dense.weight": rand(hidden, hidden),
        "bert.pooler.dense.bias": rand(hidden),
        "classifier.weight": rand(1, hidden),
        "classifier.bias": rand(1),
    }
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        for name, (rows, cols) in {
            "attention.self.query": (hidden, hidden),
            "attention.self.key": (hidden, hidden),
            "attention.self.value": (hidden, hidden),
            "attention.output.dense": (hidden, hidden),
            "intermediate.dense": (inner, hidden),
            "output.dense": (hidden, inner),
        }.items():
            w[p + name + ".weight"], w[p + name + ".bias"] = rand(rows, cols), rand(rows)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = 1 + rand(hidden), rand(hidden)
    out.mkdir(parents=True, exist_ok=True)
    save_file(w, str(out / "model.safetensors"))
    config = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "hidden_size": hidden,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": positions,
        "type_vocab_size": 2,
        "vocab_size": vocab,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "id2label": {"0": "LABEL_0"},
    }
    (out / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, out / name)
    return out
