"""Embedding models: token states pooled into one vector, the way the model's own
sentence-transformers files say.

Two kinds of backbone give the states:
- a BERT-family encoder (encoder.py, modernbert.py): bidirectional, padded keys masked;
- a decoder of an mlx-lm family (Qwen3-Embedding, e5-mistral and the like), built by
  mlx-lm's own model class without its LM head. Rows are right-padded: under the
  causal mask a real token never sees the padding after it.

Pooling (`1_Pooling/config.json`: mean, CLS, max, mean·√len, last token) and the
`Normalize` module come from `modules.json`; without those files an encoder is
mean-pooled and a decoder pooled at its last token, both normalized, as
sentence-transformers does. A module the worker does not implement (the Dense
projections EmbeddingGemma has) fails the load: skipping it would give wrong vectors.
Prompts (`config_sentence_transformers.json`) are put before texts as
sentence-transformers does: the default prompt before every text, the query and
document prompts before a rerank's query and documents.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

import mlx.core as mx

from ..errors import UnservableModel
from . import encoder, modernbert

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("mlxd_worker")

# A decoder's longest input: one pass's activations are what the daemon charges an
# embedding slot for (src/presets.rs ENCODER_BATCH_TOKENS), and a decoder's context
# (32K and more) is not.
DECODER_MAX_TOKENS = 8192

# sentence-transformers modules the worker implements (modules.json `type`, last part).
KNOWN_MODULES = frozenset({"Transformer", "Pooling", "Normalize"})

# (ids, attention, token types) → (batch, tokens, dim) states.
Backbone = Callable[[mx.array, mx.array, "mx.array | None"], mx.array]


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector (sentence-transformers' Pooling module)."""

    mode: str = "mean"  # mean | cls | max | mean_sqrt_len | lasttoken
    normalize: bool = True

    @classmethod
    def from_dir(cls, model_dir: Path, default: str = "mean") -> Pooling:
        modules_file = model_dir / "modules.json"
        if not modules_file.is_file():
            return cls(default)
        modules = json.loads(modules_file.read_text())
        kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
        unknown = sorted(set(kinds) - KNOWN_MODULES)
        if unknown:
            raise UnservableModel(f"{modules_file}: module {unknown[0]!r} is not implemented by mlxd")
        normalize = "Normalize" in kinds
        mode = default
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
                    raise UnservableModel(
                        f"{config_file}: exactly one pooling mode is supported, found {modes or 'none'}"
                    )
                mode = modes[0]
                if config.get("include_prompt") is False and mode not in ("cls", "lasttoken"):
                    raise UnservableModel(f"{config_file}: pooling without the prompt's tokens is not implemented")
        return cls(mode, normalize)

    def __call__(self, states: mx.array, attention: mx.array) -> mx.array:
        """(batch, tokens, dim) states and (batch, tokens) mask → (batch, dim)."""
        states = states.astype(mx.float32)
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
            # where, not a product: nothing a padded position holds reaches the sum.
            summed = mx.where(weights > 0, states, 0.0).sum(axis=1)
            pooled = summed / (counts if self.mode == "mean" else mx.sqrt(counts))
        if self.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


@dataclass
class EmbeddingModel:
    """A backbone, its tokenizer and its pooling: texts → (unit) vectors."""

    backbone: Backbone
    tokenizer: PreTrainedTokenizerBase
    pooling: Pooling
    max_tokens: int
    dims: int
    vocab_size: int
    family: str
    pad_id: int = 0
    name: str = ""
    # A cross-encoder's relevance head (a rerank model); None for an embedding model.
    head: encoder.CrossEncoderHead | None = None
    # config_sentence_transformers.json's prompts by name, and the one every text gets.
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt: str = ""
    # An end token the tokenizer does not add itself but the model was trained to
    # pool at (`add_eos_token` of a tokenizer whose custom code adds it).
    eos_after: int | None = None
    _frame: tuple[list[int], list[int]] | None = None

    def prompted(self, text: str, role: str | None = None) -> str:
        """The text as the model was trained to see it: after its role's prompt
        ("query", "document") if the model has one, else the default prompt."""
        prompt = self.prompts.get(role, self.default_prompt) if role else self.default_prompt
        return prompt + text

    def tokenize(self, text: str) -> list[int]:
        """The input's ids with the model's special tokens ([CLS] … [SEP]), untruncated."""
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return ids if self.eos_after is None else [*ids, self.eos_after]

    def _framing(self) -> tuple[list[int], list[int]]:
        """The special tokens the model's inputs have before and after a text ([CLS], [SEP])."""
        if self._frame is None:
            bare = list(self.tokenizer("mlxd", add_special_tokens=False)["input_ids"])
            framed = self.tokenize("mlxd")
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
        ids = mx.array([r + [self.pad_id] * (width - len(r)) for r in rows])
        attention = mx.array([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return ids, attention

    def relevance(self, rows: list[list[int]], types: list[list[int]]) -> mx.array:
        """A cross-encoder's relevance (sigmoid of its logit, 0..1) of each pair row."""
        assert self.head is not None
        ids, attention = self._padded(rows)
        width = ids.shape[1]
        token_types = mx.array([t + [0] * (width - len(t)) for t in types])
        scores = mx.sigmoid(self.head(self.backbone(ids, attention, token_types)))
        mx.eval(scores)
        return scores

    def embed(self, rows: list[list[int]]) -> mx.array:
        """Unit (when the model normalizes) vectors of token-id rows, one batch pass;
        every row at most `max_tokens` long."""
        ids, attention = self._padded(rows)
        vectors = self.pooling(self.backbone(ids, attention, None), attention)
        mx.eval(vectors)
        return vectors


def load(model_dir: str | Path) -> EmbeddingModel:
    """Loads an embedding model's directory (config.json, *.safetensors, tokenizer
    files, optional sentence-transformers files); UnservableModel says what is wrong."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UnservableModel(f"{path / 'config.json'}: {e}") from None
    head = None
    backbone: Backbone
    if raw.get("model_type") == "modernbert":
        if encoder.is_classifier(raw):
            raise UnservableModel(f"{path}: a ModernBERT cross-encoder is not served (its embeddings are)")
        bert = modernbert.load(path, raw)
        backbone = bert
        limit, pad, default_pooling = bert.config.max_position_embeddings, bert.config.pad_token_id, "mean"
    elif encoder.is_encoder(raw):
        enc, head = encoder.load(path, raw)
        backbone = enc
        limit, pad, default_pooling = enc.config.max_tokens, enc.config.pad_token_id, "mean"
    else:
        backbone = _decoder(path, raw)
        limit = min(int(raw.get("max_position_embeddings") or DECODER_MAX_TOKENS), DECODER_MAX_TOKENS)
        pad, default_pooling = 0, "lasttoken"
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        limit = min(limit, int(json.loads(st_config.read_text()).get("max_seq_length") or limit))
    pooling = Pooling() if head is not None else Pooling.from_dir(path, default_pooling)
    prompts, default_prompt = _prompts(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return EmbeddingModel(
        backbone=backbone,
        tokenizer=tokenizer,
        pooling=pooling,
        max_tokens=limit,
        dims=int(raw["hidden_size"]),
        vocab_size=int(raw["vocab_size"]),
        family=str(raw.get("model_type", "")),
        pad_id=pad,
        name=path.name,
        head=head,
        prompts=prompts,
        default_prompt=default_prompt,
        eos_after=_eos_after(path, tokenizer) if pooling.mode == "lasttoken" else None,
    )


def _eos_after(path: Path, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The end token to put after each text when the tokenizer's config asks for it
    (`add_eos_token`: gte-Qwen2's tokenizer adds it in code mlxd does not run) and
    the tokenizer, loaded without that code, does not add it."""
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    eos = tokenizer.eos_token_id
    if not config.get("add_eos_token") or not isinstance(eos, int):
        return None
    ids = list(tokenizer("mlxd", add_special_tokens=True)["input_ids"])
    return None if ids and ids[-1] == eos else eos


def _prompts(path: Path) -> tuple[dict[str, str], str]:
    try:
        config = json.loads((path / "config_sentence_transformers.json").read_text())
    except (OSError, ValueError):
        return {}, ""
    prompts = {str(k): str(v) for k, v in (config.get("prompts") or {}).items()}
    return prompts, prompts.get(str(config.get("default_prompt_name")), "")


def _decoder(path: Path, config: dict[str, Any]) -> Backbone:
    """An mlx-lm family's backbone (its final norm's output), loaded without the LM
    head. Embedding checkpoints are often saved from the backbone alone: keys
    without the "model." prefix and no `lm_head` even where the config says the
    head is untied (Qwen3-Embedding-8B)."""
    from mlx.nn.layers.base import Module

    # mlx-lm's own family lookup (private, but load_model's documented hook takes a
    # function of its shape; scripts/setup pins mlx-lm).
    from mlx_lm.utils import _get_classes, load_model

    if config.get("use_bidirectional_attention"):
        raise UnservableModel(f"{path}: a decoder run with bidirectional attention (EmbeddingGemma) is not served")
    if config.get("is_causal") is False:
        # gte-Qwen2's config says so, yet its own code (and sentence-transformers
        # before transformers 5) ran it causally: mlx-lm's causal mask is its reference.
        log.warning("%s: config.json's is_causal = false is ignored: the decoder runs causally", path)

    def headless(config: dict[str, Any]) -> tuple[type[Module], Any]:
        model_class, args_class = _get_classes(config)

        class Headless(model_class):  # type: ignore[misc, valid-type]
            def __init__(self, args: Any) -> None:
                super().__init__(args)
                self.pop("lm_head", None)

            def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
                if not any(k.startswith("model.") for k in weights):
                    weights = {f"model.{k}": v for k, v in weights.items()}
                weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
                parent = getattr(super(), "sanitize", None)
                return cast("dict[str, mx.array]", parent(weights)) if parent else weights

        return Headless, args_class

    try:
        model, _ = load_model(path, strict=True, get_model_classes=headless)
    except (ValueError, FileNotFoundError) as e:
        raise UnservableModel(f"{path}: {e}") from None
    inner = getattr(model, "model", None)
    if not callable(inner):
        family = config.get("model_type")
        raise UnservableModel(f"{path}: mlx-lm's {family!r} model has no backbone to take states from")

    def states(ids: mx.array, attention: mx.array, types: mx.array | None) -> mx.array:
        return cast(mx.array, inner(ids))

    return states
