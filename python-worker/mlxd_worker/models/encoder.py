"""BERT-family encoders in MLX (the token states an embedding model pools: embedder.py).

mlx-lm has decoders only, and mlx-embeddings (which has encoders) is GPL-licensed,
so this small implementation serves embedding models such as all-MiniLM-L6-v2:
`bert` checkpoints as Hugging Face writes them (post-LayerNorm blocks, absolute
positions, erf GELU), with the `roberta`/`xlm-roberta` position offset, and the
relevance head of a cross-encoder. Weights load by their checkpoint names.

Padding: a batch's rows are right-padded to its longest row; padded keys are masked
out of attention, so a row's states do not depend on what it was batched with (up
to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, cast

import mlx.core as mx

# From their own modules: mypy does not follow mlx.nn's star imports.
from mlx.nn.layers.activations import gelu, gelu_approx, relu
from mlx.nn.layers.base import Module
from mlx.nn.layers.embedding import Embedding
from mlx.nn.layers.linear import Linear
from mlx.nn.layers.normalization import LayerNorm

from ..errors import UnservableModel

# The BERT layout this module implements, and every encoder the worker serves
# (ModernBERT: modernbert.py).
BERT_TYPES = frozenset({"bert", "roberta", "xlm-roberta"})
ENCODER_TYPES = BERT_TYPES | {"modernbert"}


@dataclass(frozen=True)
class EncoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> EncoderConfig:
        model_type = str(config.get("model_type", ""))
        if model_type not in BERT_TYPES:
            raise UnservableModel(
                f"model_type {model_type!r} is not an encoder mlxd serves ({', '.join(sorted(ENCODER_TYPES))})"
            )
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise UnservableModel(f"position_embedding_type {config['position_embedding_type']!r} is not supported")
        act = activation(config, "hidden_act")
        with required_fields():
            return cls(
                model_type=model_type,
                vocab_size=int(config["vocab_size"]),
                hidden_size=int(config["hidden_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=int(config["num_attention_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 512)),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                hidden_act=act,
                pad_token_id=int(config.get("pad_token_id") or 0),
            )

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from pad_token_id + 1."""
        return self.pad_token_id + 1 if self.model_type != "bert" else 0

    @property
    def max_tokens(self) -> int:
        """The longest input the position table allows."""
        return self.max_position_embeddings - self.position_offset


def _gelu_tanh(x: mx.array) -> mx.array:
    out: mx.array = gelu_approx(x)
    return out


def _relu(x: mx.array) -> mx.array:
    out: mx.array = relu(x)
    return out


ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu": gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": _relu,
}


class _Embeddings(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self._offset = c.position_offset

    def __call__(self, ids: mx.array, types: mx.array) -> mx.array:
        positions = mx.arange(ids.shape[1])[None] + self._offset
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings(types)
        out: mx.array = self.LayerNorm(x)
        return out


class _SelfAttention(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.query = Linear(c.hidden_size, c.hidden_size)
        self.key = Linear(c.hidden_size, c.hidden_size)
        self.value = Linear(c.hidden_size, c.hidden_size)
        self.heads = c.num_attention_heads

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, n, d = x.shape
        h = self.heads

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, n, h, d // h).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d // h), mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b, n, d)


class _Output(Module):
    """dense → residual → LayerNorm (BERT's post-LN sublayer end)."""

    def __init__(self, c: EncoderConfig, inner: int) -> None:
        super().__init__()
        self.dense = Linear(inner, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        out: mx.array = self.LayerNorm(self.dense(x) + residual)
        return out


class _Attention(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)  # the checkpoint's name for it
        self.output = _Output(c, c.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        inner: _SelfAttention = self.self
        return self.output(inner(x, mask), x)


class _Intermediate(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = Linear(c.hidden_size, c.intermediate_size)
        self._act = ACTIVATIONS[c.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self._act(self.dense(x))


class _Layer(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c, c.intermediate_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class _Encoder(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.layer = [_Layer(c) for _ in range(c.num_hidden_layers)]


class Encoder(Module):
    """The transformer: token ids (batch, tokens) and their attention mask (1 for a
    real token, 0 for padding) → the last layer's hidden states."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def __call__(self, ids: mx.array, attention: mx.array, types: mx.array | None = None) -> mx.array:
        x = self.embeddings(ids, mx.zeros_like(ids) if types is None else types)
        # Additive mask over keys: padded keys get -inf-like scores for every query.
        keys_mask = mx.where(attention[:, None, None, :] > 0, 0.0, -1e9).astype(x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, keys_mask)
        return x


class _Dense(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = Linear(c.hidden_size, c.hidden_size)


class _RobertaClassifier(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = Linear(c.hidden_size, c.hidden_size)
        self.out_proj = Linear(c.hidden_size, 1)


class CrossEncoderHead(Module):
    """A sequence-classification head with one label: the relevance logit of a
    (query, document) pair read from its first token's state. BERT pools it
    (`pooler.dense`, tanh) before `classifier`; RoBERTa has `classifier.dense`
    (tanh) then `classifier.out_proj`."""

    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self._bert = c.model_type == "bert"
        if self._bert:
            self.pooler = _Dense(c)
            self.classifier: Module = Linear(c.hidden_size, 1)
        else:
            self.classifier = _RobertaClassifier(c)

    def __call__(self, states: mx.array) -> mx.array:
        first = states[:, 0]
        if self._bert:
            logits: mx.array = self.classifier(mx.tanh(self.pooler.dense(first)))
        else:
            head = cast(_RobertaClassifier, self.classifier)
            logits = head.out_proj(mx.tanh(head.dense(first)))
        return logits[:, 0]


def is_encoder(config: dict[str, Any]) -> bool:
    return str(config.get("model_type", "")) in ENCODER_TYPES


def is_classifier(config: dict[str, Any]) -> bool:
    """A sequence-classification checkpoint (a cross-encoder), not an embedder."""
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def load(path: Path, raw: dict[str, Any]) -> tuple[Encoder, CrossEncoderHead | None]:
    """The encoder of a directory whose config.json is `raw` (and a cross-encoder's
    relevance head); UnservableModel says what is wrong."""
    config = EncoderConfig.from_dict(raw)
    classifier = is_classifier(raw)
    if classifier:
        labels = int(raw.get("num_labels") or len(raw.get("id2label") or {}) or 1)
        if labels != 1:
            raise UnservableModel(f"{path}: a classifier with {labels} labels is not a reranker (one relevance logit)")
    weights = read_weights(path)
    encoder = Encoder(config)
    # Checkpoints carry extras the encoder does not use: the pooler, a MLM head,
    # position_ids buffers; a "bert." prefix when saved from a task model.
    fill(encoder, weights, path, ("bert.", "roberta."))
    head = None
    if classifier:
        head = CrossEncoderHead(config)
        fill(head, weights, path, ("bert.",))
    return encoder, head


def read_weights(path: Path) -> dict[str, mx.array]:
    """Every float tensor of the checkpoint's safetensors files. Integer buffers
    (position_ids) are not weights; floats stay as stored."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnservableModel(f"{path}: no .safetensors weights")
    weights: dict[str, mx.array] = {}
    for f in files:
        loaded = cast("dict[str, mx.array]", mx.load(str(f)))
        weights.update((k, v) for k, v in loaded.items() if mx.issubdtype(v.dtype, mx.floating))
    return weights


def fill(module: Module, weights: dict[str, mx.array], path: Path, prefixes: tuple[str, ...]) -> None:
    """Load the module's parameters from the weights named like them once the
    prefixes are removed (in order); one the weights lack fails the load."""
    wanted = {name for name, _ in flat_names(module)}
    kept = {}
    for name, value in weights.items():
        for prefix in prefixes:
            name = name.removeprefix(prefix)
        if name in wanted:
            kept[name] = value
    missing = wanted - kept.keys()
    if missing:
        raise UnservableModel(f"{path}: the weights lack {', '.join(sorted(missing)[:3])}")
    module.load_weights(list(kept.items()))
    mx.eval(module.parameters())


def activation(config: dict[str, Any], key: str) -> str:
    """The config's activation, when mlxd has it."""
    act = str(config.get(key, "gelu"))
    if act not in ACTIVATIONS:
        raise UnservableModel(f"{key} {act!r} is not supported ({', '.join(sorted(ACTIVATIONS))})")
    return act


@contextmanager
def required_fields() -> Iterator[None]:
    """A field the config cannot do without, missing: the load fails naming it."""
    try:
        yield
    except KeyError as e:
        raise UnservableModel(f"config.json lacks {e.args[0]!r}") from None


def flat_names(module: Module) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return cast("list[tuple[str, Any]]", tree_flatten(module.parameters()))
