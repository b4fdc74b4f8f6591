"""BERT-family encoders in MLX, pooled the way a model's sentence-transformers files say.

mlx-lm has decoders only, and mlx-embeddings (which has encoders) is GPL-licensed,
so this small implementation serves embedding models such as all-MiniLM-L6-v2:
`bert` checkpoints as Hugging Face writes them (post-LayerNorm blocks, absolute
positions, erf GELU), with the `roberta`/`xlm-roberta` position offset. Weights load
by their checkpoint names; the tokenizer is the model directory's own (fast)
tokenizer. Pooling (`1_Pooling/config.json`: mean, CLS, max, mean·√len) and the
`Normalize` module come from `modules.json`; without those files an encoder is
mean-pooled and normalized, as sentence-transformers does for a plain checkpoint.

Padding: a batch's rows are right-padded to its longest row; padded keys are masked
out of attention and padded positions out of pooling, so a row's vector does not
depend on what it was batched with (up to float rounding).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

import mlx.core as mx

# From their own modules: mypy does not follow mlx.nn's star imports.
from mlx.nn.layers.activations import gelu, gelu_approx, relu
from mlx.nn.layers.base import Module
from mlx.nn.layers.embedding import Embedding
from mlx.nn.layers.linear import Linear
from mlx.nn.layers.normalization import LayerNorm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta"})


class EncoderError(Exception):
    """A model directory this module cannot serve, with the reason."""


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
        if model_type not in ENCODER_TYPES:
            raise EncoderError(
                f"model_type {model_type!r} is not an encoder mlxd serves ({', '.join(sorted(ENCODER_TYPES))})"
            )
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise EncoderError(f"position_embedding_type {config['position_embedding_type']!r} is not supported")
        act = str(config.get("hidden_act", "gelu"))
        if act not in ACTIVATIONS:
            raise EncoderError(f"hidden_act {act!r} is not supported ({', '.join(sorted(ACTIVATIONS))})")
        try:
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
        except KeyError as e:
            raise EncoderError(f"config.json lacks {e.args[0]!r}") from None

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


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector (sentence-transformers' Pooling module)."""

    mode: str = "mean"  # mean | cls | max | mean_sqrt_len | lasttoken
    normalize: bool = True

    @classmethod
    def from_dir(cls, model_dir: Path) -> Pooling:
        modules_file = model_dir / "modules.json"
        if not modules_file.is_file():
            return cls()
        modules = json.loads(modules_file.read_text())
        kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
        normalize = "Normalize" in kinds
        mode = "mean"
        pooling = kinds.get("Pooling")
        if pooling is not None:
            config_file = model_dir / str(pooling.get("path", "1_Pooling")) / "config.json"
            if config_file.is_file():
                config = json.loads(config_file.read_text())
                modes = [
                    name
                    for key, name in (
                        ("pooling_mode_cls_token", "cls"),
                        ("pooling_mode_mean_tokens", "mean"),
                        ("pooling_mode_max_tokens", "max"),
                        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
                        ("pooling_mode_lasttoken", "lasttoken"),
                    )
                    if config.get(key)
                ]
                if len(modes) != 1:
                    raise EncoderError(f"{config_file}: exactly one pooling mode is supported, found {modes or 'none'}")
                mode = modes[0]
        return cls(mode, normalize)

    def __call__(self, states: mx.array, attention: mx.array) -> mx.array:
        """(batch, tokens, dim) states and (batch, tokens) mask → (batch, dim)."""
        weights = attention[..., None].astype(states.dtype)
        counts = mx.maximum(weights.sum(axis=1), 1.0)
        if self.mode == "cls":
            pooled = states[:, 0]
        elif self.mode == "max":
            pooled = mx.where(weights > 0, states, -mx.inf).max(axis=1)
        elif self.mode == "lasttoken":
            last = attention.astype(mx.int32).sum(axis=1) - 1
            pooled = mx.take_along_axis(states, last[:, None, None], axis=1)[:, 0]
        else:
            pooled = (states * weights).sum(axis=1) / (counts if self.mode == "mean" else mx.sqrt(counts))
        if self.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


@dataclass
class EmbeddingModel:
    """An encoder, its tokenizer and its pooling: texts → unit vectors."""

    encoder: Encoder
    tokenizer: PreTrainedTokenizerBase
    pooling: Pooling
    max_tokens: int
    dims: int
    name: str = ""
    # A cross-encoder's relevance head (a rerank model); None for an embedding model.
    head: CrossEncoderHead | None = None
    _frame: tuple[list[int], list[int]] | None = None

    def tokenize(self, text: str) -> list[int]:
        """The input's ids with the model's special tokens ([CLS] … [SEP]), untruncated."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _framing(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text ([CLS], [SEP])."""
        if self._frame is None:
            bare = list(self.tokenizer("mlxd", add_special_tokens=False)["input_ids"])
            framed = list(self.tokenizer("mlxd", add_special_tokens=True)["input_ids"])
            at = next(i for i in range(len(framed) - len(bare) + 1) if framed[i : i + len(bare)] == bare)
            self._frame = (framed[:at], framed[at + len(bare) :])
        return self._frame

    def with_special_tokens(self, ids: list[int]) -> list[int]:
        """Token ids as a client sent them, framed as the tokenizer frames a text."""
        before, after = self._framing()
        return [*before, *ids, *after]

    def truncated(self, row: list[int]) -> list[int]:
        """A framed row cut to `max_tokens`, its closing special tokens kept."""
        closing = len(self._framing()[1])
        keep = self.max_tokens - closing
        return row[:keep] + row[len(row) - closing :]

    def pair(self, query: str, document: str) -> tuple[list[int], list[int]]:
        """A (query, document) pair as one input and its token types, the document
        cut so that the pair fits `max_tokens` (the query is never cut)."""
        enc = self.tokenizer(query, document, truncation="only_second", max_length=self.max_tokens)
        ids = list(enc["input_ids"])
        types = list(enc.get("token_type_ids") or [0] * len(ids))
        return ids, types

    def _padded(self, rows: list[list[int]]) -> tuple[mx.array, mx.array]:
        width = max(len(r) for r in rows)
        pad = self.encoder.config.pad_token_id
        ids = mx.array([r + [pad] * (width - len(r)) for r in rows])
        attention = mx.array([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return ids, attention

    def relevance(self, rows: list[list[int]], types: list[list[int]]) -> mx.array:
        """A cross-encoder's relevance (sigmoid of its logit, 0..1) of each pair row."""
        assert self.head is not None
        ids, attention = self._padded(rows)
        width = ids.shape[1]
        token_types = mx.array([t + [0] * (width - len(t)) for t in types])
        scores = mx.sigmoid(self.head(self.encoder(ids, attention, token_types)))
        mx.eval(scores)
        return scores

    def embed(self, rows: list[list[int]]) -> mx.array:
        """Unit (when the model normalizes) vectors of token-id rows, one batch pass;
        every row at most `max_tokens` long."""
        ids, attention = self._padded(rows)
        vectors = self.pooling(self.encoder(ids, attention), attention)
        mx.eval(vectors)
        return vectors


def is_encoder(config: dict[str, Any]) -> bool:
    return str(config.get("model_type", "")) in ENCODER_TYPES


def load(model_dir: str | Path) -> EmbeddingModel:
    """Loads an encoder directory (config.json, *.safetensors, tokenizer files,
    optional sentence-transformers modules). EncoderError says what is wrong."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    try:
        raw = json.loads((path / "config.json").read_text())
        config = EncoderConfig.from_dict(raw)
    except (OSError, ValueError) as e:
        raise EncoderError(f"{path / 'config.json'}: {e}") from None
    classifier = any(str(a).endswith("ForSequenceClassification") for a in raw.get("architectures") or [])
    if classifier:
        labels = int(raw.get("num_labels") or len(raw.get("id2label") or {}) or 1)
        if labels != 1:
            raise EncoderError(f"{path}: a classifier with {labels} labels is not a reranker (one relevance logit)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EncoderError(f"{path}: no .safetensors weights")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(cast_weights(cast("dict[str, mx.array]", mx.load(str(f)))))
    encoder = Encoder(config)
    wanted = {name for name, _ in _flat_names(encoder)}
    # Checkpoints carry extras the encoder does not use: the pooler, a MLM head,
    # position_ids buffers; a "bert." prefix when saved from a task model.
    kept = {}
    for name, value in weights.items():
        name = name.removeprefix("bert.").removeprefix("roberta.")
        if name in wanted:
            kept[name] = value
    missing = wanted - kept.keys()
    if missing:
        raise EncoderError(f"{path}: the weights lack {', '.join(sorted(missing)[:3])}")
    encoder.load_weights(list(kept.items()))
    mx.eval(encoder.parameters())
    head = None
    if classifier:
        head = CrossEncoderHead(config)
        wanted_head = {name for name, _ in _flat_names(head)}
        found = {n.removeprefix("bert."): v for n, v in weights.items() if n.removeprefix("bert.") in wanted_head}
        if wanted_head - found.keys():
            raise EncoderError(f"{path}: the weights lack {', '.join(sorted(wanted_head - found.keys())[:3])}")
        head.load_weights(list(found.items()))
        mx.eval(head.parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    limit = config.max_tokens
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        limit = min(limit, int(json.loads(st_config.read_text()).get("max_seq_length") or limit))
    pooling = Pooling() if classifier else Pooling.from_dir(path)
    return EmbeddingModel(encoder, tokenizer, pooling, limit, config.hidden_size, path.name, head)


def cast_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Integer buffers (position_ids) are not weights; floats stay as stored."""
    return {k: v for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)}


def _flat_names(module: Module) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return cast("list[tuple[str, Any]]", tree_flatten(module.parameters()))
