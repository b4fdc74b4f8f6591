"""BERT and ModernBERT in numpy, the references the MLX encoders (models/encoder.py,
models/modernbert.py) are checked against, a tiny random cross-encoder written the
way Hugging Face saves BertForSequenceClassification (for rerank tests: no hub
here) and a tiny random ModernBERT."""

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


# A tiny ModernBERT: 3 layers, full attention on layers 0 and 2 and a window of
# ±LOCAL/2 tokens on layer 1 (shorter than the test's inputs, so the window shows).
MODERNBERT_LOCAL = 8


def write_tiny_modernbert(out: Path, tokenizer_from: Path, seed: int = 0, dtype: type = np.float32) -> Path:
    """A random ModernBERT saved as a masked-LM checkpoint ("model." keys and a head
    the embedder ignores; weights of `dtype`), with sentence-transformers files for
    mean pooling and normalization, and the given model's (BERT) tokenizer."""
    from safetensors.numpy import save_file

    hidden, inner, layers, vocab = 64, 96, 3, 30522
    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "model.embeddings.tok_embeddings.weight": rand(vocab, hidden),
        "model.embeddings.norm.weight": 1 + rand(hidden),
        "model.final_norm.weight": 1 + rand(hidden),
        "head.dense.weight": rand(hidden, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        if i > 0:
            w[p + "attn_norm.weight"] = 1 + rand(hidden)
        w[p + "attn.Wqkv.weight"] = rand(3 * hidden, hidden)
        w[p + "attn.Wo.weight"] = rand(hidden, hidden)
        w[p + "mlp_norm.weight"] = 1 + rand(hidden)
        w[p + "mlp.Wi.weight"] = rand(2 * inner, hidden)
        w[p + "mlp.Wo.weight"] = rand(hidden, inner)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.astype(dtype) for k, v in w.items()}, str(out / "model.safetensors"))
    config = {
        "architectures": ["ModernBertForMaskedLM"],
        "model_type": "modernbert",
        "hidden_size": hidden,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "vocab_size": vocab,
        "hidden_activation": "gelu",
        "norm_eps": 1e-5,
        "norm_bias": False,
        "global_attn_every_n_layers": 2,
        "local_attention": MODERNBERT_LOCAL,
        "global_rope_theta": 160000.0,
        "local_rope_theta": 10000.0,
        "pad_token_id": 0,
        # BERT's (the tokenizer's) ids, not ModernBERT's defaults past this vocabulary.
        "bos_token_id": 101,
        "cls_token_id": 101,
        "eos_token_id": 102,
        "sep_token_id": 102,
    }
    (out / "config.json").write_text(json.dumps(config))
    (out / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, out / name)
    return out


def modernbert_vector(model_dir: Path, ids: list[int]) -> np.ndarray:
    """Hugging Face's ModernBertModel on one unpadded input (float64), mean-pooled
    and normalized."""
    from safetensors.numpy import load_file

    stored = load_file(str(model_dir / "model.safetensors"))
    w = {k.removeprefix("model."): v.astype(np.float64) for k, v in stored.items()}
    c = json.loads((model_dir / "config.json").read_text())
    heads, eps = c["num_attention_heads"], c["norm_eps"]
    erf = np.frompyfunc(math.erf, 1, 1)

    def norm(x: np.ndarray, p: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w[p + ".weight"]

    def rotary(t: np.ndarray, theta: float) -> np.ndarray:  # (heads, n, d), rotate-half
        d = t.shape[-1]
        freqs = np.arange(t.shape[1])[:, None] * (1.0 / theta ** (np.arange(0, d, 2) / d))[None]
        cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
        rotated = np.concatenate([-t[..., d // 2 :], t[..., : d // 2]], -1)
        return t * cos + rotated * sin

    n = len(ids)
    x = norm(w["embeddings.tok_embeddings.weight"][ids], "embeddings.norm")
    distance = np.abs(np.arange(n)[:, None] - np.arange(n)[None])
    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}."
        full = i % c["global_attn_every_n_layers"] == 0
        h = norm(x, p + "attn_norm") if i > 0 else x
        d = x.shape[-1] // heads
        q, k, v = (h @ w[p + "attn.Wqkv.weight"].T).reshape(n, 3, heads, d).transpose(1, 2, 0, 3)
        theta = c["global_rope_theta"] if full else c["local_rope_theta"]
        scores = rotary(q, theta) @ rotary(k, theta).transpose(0, 2, 1) / math.sqrt(d)
        if not full:
            scores = np.where(distance <= c["local_attention"] // 2, scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (scores / scores.sum(-1, keepdims=True)) @ v
        x = x + attended.transpose(1, 0, 2).reshape(n, -1) @ w[p + "attn.Wo.weight"].T
        inner, gate = np.split(norm(x, p + "mlp_norm") @ w[p + "mlp.Wi.weight"].T, 2, axis=-1)
        inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)).astype(np.float64))
        x = x + (inner * gate) @ w[p + "mlp.Wo.weight"].T
    pooled = norm(x, "final_norm").mean(0)
    return pooled / np.linalg.norm(pooled)
