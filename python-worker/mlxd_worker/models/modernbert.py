"""ModernBERT encoders in MLX (gte-modernbert, modernbert-embed and the like): the
token states an embedding model pools (embedder.py).

As Hugging Face's ModernBertModel computes them: pre-LayerNorm blocks without biases
(the first block's attention reads the embeddings' norm directly), rotary positions
(`global_rope_theta` on full-attention layers, `local_rope_theta` on the others,
rotate-half as Hugging Face applies them), GeGLU feed-forward, a final norm. Every
`global_attn_every_n_layers`-th layer (from the first) attends to the whole input; the
others to the tokens within `local_attention / 2` either side. Rows are right-padded
and padded keys masked out, as in encoder.py. Checkpoints load with or without the
`model.` prefix (a masked-LM checkpoint or the bare model sentence-transformers saves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

# From their own modules: mypy does not follow mlx.nn's star imports.
from mlx.nn.layers.base import Module
from mlx.nn.layers.embedding import Embedding
from mlx.nn.layers.linear import Linear
from mlx.nn.layers.normalization import LayerNorm

from ..errors import UnservableModel
from .encoder import ACTIVATIONS, activation, fill, read_weights, required_fields


@dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_activation: str
    # Per layer: whether it attends to the whole input (else to its window).
    global_layers: tuple[bool, ...]
    local_attention: int
    global_rope_theta: float
    local_rope_theta: float
    pad_token_id: int

    @classmethod
    def from_dict(cls, c: dict[str, Any]) -> ModernBertConfig:
        act = activation(c, "hidden_activation")
        if c.get("rope_scaling"):
            raise UnservableModel("rope_scaling is not supported in a ModernBERT")
        with required_fields():
            layers = int(c["num_hidden_layers"])
            # Transformers 5 writes layer_types and rope_parameters; older configs
            # global_attn_every_n_layers and the two thetas.
            kinds = c.get("layer_types") or [
                "sliding_attention" if i % int(c.get("global_attn_every_n_layers", 3)) else "full_attention"
                for i in range(layers)
            ]
            if len(kinds) != layers or set(kinds) - {"full_attention", "sliding_attention"}:
                raise UnservableModel(f"layer_types {kinds} is not one of full/sliding_attention per layer")
            rope = c.get("rope_parameters") or {}
            for kind in ("full_attention", "sliding_attention"):
                rope_type = (rope.get(kind) or {}).get("rope_type", "default")
                if rope_type != "default":
                    raise UnservableModel(f"rope_type {rope_type!r} ({kind}) is not supported in a ModernBERT")

            def theta(kind: str, legacy: str, default: float) -> float:
                return float((rope.get(kind) or {}).get("rope_theta") or c.get(legacy) or default)

            return cls(
                vocab_size=int(c["vocab_size"]),
                hidden_size=int(c["hidden_size"]),
                num_hidden_layers=layers,
                num_attention_heads=int(c["num_attention_heads"]),
                intermediate_size=int(c["intermediate_size"]),
                max_position_embeddings=int(c.get("max_position_embeddings", 8192)),
                norm_eps=float(c.get("norm_eps", 1e-5)),
                norm_bias=bool(c.get("norm_bias", False)),
                attention_bias=bool(c.get("attention_bias", False)),
                mlp_bias=bool(c.get("mlp_bias", False)),
                hidden_activation=act,
                global_layers=tuple(k == "full_attention" for k in kinds),
                local_attention=int(c.get("local_attention", 128)),
                global_rope_theta=theta("full_attention", "global_rope_theta", 160000.0),
                local_rope_theta=theta("sliding_attention", "local_rope_theta", 10000.0),
                pad_token_id=int(c.get("pad_token_id") or 0),
            )

    def is_global(self, layer: int) -> bool:
        return self.global_layers[layer]


class _Embeddings(Module):
    def __init__(self, c: ModernBertConfig) -> None:
        super().__init__()
        self.tok_embeddings = Embedding(c.vocab_size, c.hidden_size)
        self.norm = LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)

    def __call__(self, ids: mx.array) -> mx.array:
        out: mx.array = self.norm(self.tok_embeddings(ids))
        return out


class _Attention(Module):
    def __init__(self, c: ModernBertConfig, theta: float) -> None:
        super().__init__()
        self.Wqkv = Linear(c.hidden_size, 3 * c.hidden_size, bias=c.attention_bias)
        self.Wo = Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias)
        self.heads = c.num_attention_heads
        self.theta = theta

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, n, d = x.shape
        h = self.heads
        qkv = self.Wqkv(x).reshape(b, n, 3, h, d // h).transpose(2, 0, 3, 1, 4)
        # Hugging Face's rotate-half rotary is MLX's non-traditional one.
        q = mx.fast.rope(qkv[0], d // h, traditional=False, base=self.theta, scale=1.0, offset=0)
        k = mx.fast.rope(qkv[1], d // h, traditional=False, base=self.theta, scale=1.0, offset=0)
        out = mx.fast.scaled_dot_product_attention(q, k, qkv[2], scale=1.0 / math.sqrt(d // h), mask=mask)
        projected: mx.array = self.Wo(out.transpose(0, 2, 1, 3).reshape(b, n, d))
        return projected


class _Mlp(Module):
    def __init__(self, c: ModernBertConfig) -> None:
        super().__init__()
        self.Wi = Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        self.Wo = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self._act = ACTIVATIONS[c.hidden_activation]

    def __call__(self, x: mx.array) -> mx.array:
        inner, gate = mx.split(self.Wi(x), 2, axis=-1)
        out: mx.array = self.Wo(self._act(inner) * gate)
        return out


class _Layer(Module):
    def __init__(self, c: ModernBertConfig, index: int) -> None:
        super().__init__()
        self.is_global = c.is_global(index)
        # The first block reads the embeddings' norm as it is (no attn_norm weights).
        if index > 0:
            self.attn_norm = LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)
        self.attn = _Attention(c, c.global_rope_theta if self.is_global else c.local_rope_theta)
        self.mlp_norm = LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)
        self.mlp = _Mlp(c)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        normed = self.attn_norm(x) if "attn_norm" in self else x
        x = x + self.attn(normed, mask)
        out: mx.array = x + self.mlp(self.mlp_norm(x))
        return out


class ModernBert(Module):
    """Token ids (batch, tokens) and their attention mask (1 real, 0 padding) → the
    final norm's states; token types are ignored (ModernBERT has none)."""

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.layers = [_Layer(config, i) for i in range(config.num_hidden_layers)]
        self.final_norm = LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def __call__(self, ids: mx.array, attention: mx.array, types: mx.array | None = None) -> mx.array:
        x = self.embeddings(ids)
        keys = attention[:, None, None, :] > 0
        positions = mx.arange(ids.shape[1])
        distance = mx.abs(positions[:, None] - positions[None, :])
        # Every position sees itself: a padded one past its window's real tokens would
        # otherwise see nothing, a softmax of nothing is NaN (-1e9 is -inf in
        # float16), and the next layer's attention would carry it into real rows.
        itself = (distance == 0)[None, None]
        local = keys & (distance <= self.config.local_attention // 2)[None, None]
        full_mask = mx.where(keys | itself, 0.0, -1e9).astype(x.dtype)
        local_mask = mx.where(local | itself, 0.0, -1e9).astype(x.dtype)
        for layer in self.layers:
            x = layer(x, full_mask if layer.is_global else local_mask)
        out: mx.array = self.final_norm(x)
        return out


def load(path: Path, raw: dict[str, Any]) -> ModernBert:
    """The ModernBERT of a directory whose config.json is `raw`."""
    config = ModernBertConfig.from_dict(raw)
    model = ModernBert(config)
    fill(model, read_weights(path), path, ("model.",))
    return model
