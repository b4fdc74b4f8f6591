"""Tiny random-weight models of several mlx-lm families, for comparing the serving
code token by token with mlx-lm's own greedy generation.

Each model is built by mlx-lm's own ``Model`` class for its ``model_type``, with
random weights (``mx.random.seed(seed)`` then the class's own initialisation), the
SmolLM2 tokenizer, and a config small enough that building, loading and generating
a few tokens takes a second or two on a CPU. Nothing is downloaded.

The weights are float32 and unquantized, saved as ``model.safetensors`` in mlx-lm's
own (already sanitized) layout: ``mlx_lm.load`` reads them back through the model's
``sanitize`` unchanged.

No tests live here; tests import this module.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# The SmolLM2 tokenizer: 49152 tokens, ids 0..49151, no added tokens beyond that.
VOCAB_SIZE = 49152
BOS_TOKEN_ID = 1  # <|im_start|>
EOS_TOKEN_ID = 2  # <|im_end|>

# Files copied from the tokenizer directory (those that exist; tokenizer.json must).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)

# Where build() records the seed next to config.json (config.json itself stays as in FAMILIES).
BUILD_INFO = "families-build.json"

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": EOS_TOKEN_ID,
    "hidden_size": 64,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
}


# The draft model of the drafted presets, and the targets: one whose every cache
# layer rewinds (drafting on, its rewind exercised by a draft that disagrees), and
# a sliding-window and a hybrid one (served without drafting, with the reason).
DRAFT = "llama"
DRAFTED = {"qwen3": True, "gemma3_text": False, "qwen3_next": False}
# The draft policy (mode "auto" and "on") for a dense and a mixture-of-experts target:
# auto calibrates at load (plain against drafted, on this machine); a MoE target is
# refused by policy in auto and drafts with "on".
DRAFT_POLICY = (("qwen3", "auto"), ("qwen3_moe", "auto"), ("qwen3_moe", "on"))
# Families whose prefix cache is tested across a worker restart (its disk tier):
# full attention, MLA, a sliding window, and a recurrent state.
DISK = ("llama", "deepseek_v3", "gemma3_text", "qwen3_next")
# Families whose attention mlx-lm cannot quantize: kv_bits is refused at load.
KV8_REFUSED = {"deepseek_v3": "MLA", "gpt_oss": "attention sinks"}
# Families served with kv_bits 8 (group 32): full attention, a sliding window (its
# global layers quantized) and a recurrent state (its attention layers quantized).
# mx.quantize groups the head dimension by at least 32, so these are built wider.
KV8 = ("llama", "qwen3", "gemma3_text", "qwen3_next")
KV8_GROUP = 32
WIDE_HEADS: dict[str, Any] = {"head_dim": 32}
# Families served with a rotating KV cache (max_kv_size, the smallest mlxd takes),
# with prompts that outgrow it.
ROTATING = ("llama", "qwen3_moe", "qwen3_next")
MAX_KV_SIZE = 256


def _config(**fields: Any) -> dict[str, Any]:
    return {**_COMMON, **fields}


# Hybrid Gated DeltaNet fields shared by qwen3_next and qwen3_5: three linear layers, then one full attention layer.
_GATED_DELTA: dict[str, Any] = {
    "num_hidden_layers": 4,
    "full_attention_interval": 4,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
}

# Every family has untied embeddings: with random weights this small, a tied lm_head mostly echoes the input
# token, and greedy generation settles on one repeated token within a few steps (the real SmolLM2-135M, tied,
# covers that path). The untied ones give 8 distinct-looking tokens.
FAMILIES: dict[str, dict[str, Any]] = {
    # Dense, full attention: the SmolLM2 shape, but untied (see the note on tied embeddings above).
    "llama": _config(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    # Dense with q/k norms.
    "qwen3": _config(
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    # MoE on every layer: 4 experts, top 2.
    "qwen3_moe": _config(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        num_hidden_layers=2,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    # Hybrid: Gated DeltaNet layers (ArraysCache) and gated full attention (KVCache), MoE with a shared expert.
    "qwen3_next": _config(
        model_type="qwen3_next",
        architectures=["Qwen3NextForCausalLM"],
        **_GATED_DELTA,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        partial_rotary_factor=0.25,
        rope_theta=10000000.0,
        tie_word_embeddings=False,
    ),
    # Hybrid like qwen3_next with a dense MLP, in the multimodal wrapper's layout: mlx-lm's qwen3_5.Model takes
    # either a flat config or a text_config; this is the checkpoint layout (weights under language_model.).
    "qwen3_5": {
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "tie_word_embeddings": False,
        "text_config": _config(
            model_type="qwen3_5_text",
            **_GATED_DELTA,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
        ),
    },
    # Alternating sliding-window (RotatingKVCache) and full attention, attention sinks, MoE with biases, YaRN.
    "gpt_oss": _config(
        model_type="gpt_oss",
        architectures=["GptOssForCausalLM"],
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=150000.0,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
        tie_word_embeddings=False,
    ),
    # Sliding-window and global layers alternating (pattern 2), local and global rope bases.
    "gemma3_text": _config(
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        num_hidden_layers=4,
        sliding_window=16,
        sliding_window_pattern=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
    ),
    # Multi-head latent attention, first layer dense, then MoE (sigmoid, grouped top-k, shared expert), YaRN.
    "deepseek_v3": _config(
        model_type="deepseek_v3",
        architectures=["DeepseekV3ForCausalLM"],
        num_hidden_layers=2,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        norm_topk_prob=True,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        rope_theta=10000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        tie_word_embeddings=False,
    ),
    # First layer dense, then MoE with a shared expert; q/k norms, attention bias, partial rotary.
    "glm4_moe": _config(
        model_type="glm4_moe",
        architectures=["Glm4MoeForCausalLM"],
        num_hidden_layers=2,
        first_k_dense_replace=1,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        partial_rotary_factor=0.5,
        use_qk_norm=True,
        attention_bias=True,
        rope_theta=1000000.0,
        rope_scaling=None,
        tie_word_embeddings=False,
    ),
    # MoE on every layer (sigmoid router with a correction bias), q/k norms over all heads, partial rotary.
    "minimax": _config(
        model_type="minimax",
        architectures=["MiniMaxM2ForCausalLM"],
        num_hidden_layers=2,
        intermediate_size=32,
        shared_intermediate_size=0,
        num_local_experts=4,
        num_experts_per_tok=2,
        scoring_func="sigmoid",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rotary_dim=8,
        use_qk_norm=True,
        rope_theta=5000000.0,
        tie_word_embeddings=False,
    ),
    # The multimodal wrapper (weights under language_model.) around a ministral3 text model: YaRN and the
    # llama-4 attention scaling by position (original_max_position_embeddings is small so that it moves).
    "mistral3": {
        "model_type": "mistral3",
        "architectures": ["Mistral3ForConditionalGeneration"],
        "text_config": _config(
            model_type="ministral3",
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-5,
            max_position_embeddings=256,  # original_max_position_embeddings * factor
            sliding_window=None,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "yarn",
                "type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 16.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "llama_4_scaling_beta": 0.1,
            },
        ),
    },
    # Hybrid: Kimi Delta Attention layers 1-3 (ArraysCache), MLA on layer 4 (KVCache); first layer dense, then MoE.
    "kimi_linear": _config(
        model_type="kimi_linear",
        architectures=["KimiLinearForCausalLM"],
        num_hidden_layers=4,
        model_max_length=4096,
        linear_attn_config={
            "kda_layers": [1, 2, 3],
            "full_attn_layers": [4],
            "num_heads": 4,
            "head_dim": 16,
            "short_conv_kernel_size": 4,
        },
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_token=2,
        num_shared_experts=1,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        moe_router_activation_func="sigmoid",
        moe_renormalize=True,
        routed_scaling_factor=2.5,
        use_grouped_topk=True,
        num_expert_group=1,
        topk_group=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        mla_use_nope=True,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}


def _model_class(config: dict[str, Any]) -> tuple[type[nn.Module], Any]:
    """mlx-lm's Model and ModelArgs for this config (every model_type here names its module)."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    return module.Model, module.ModelArgs


def _init_zero_routers(model: nn.Module) -> None:
    """The routers of deepseek_v3 and glm4_moe start as all-zero matrices, which ties every expert and makes
    the routing meaningless; give them nn.Linear's uniform initialisation instead."""
    updates: list[tuple[str, mx.array]] = []
    for name, value in tree_flatten(model.parameters()):
        if name.endswith(".gate.weight") and not mx.any(value).item():
            bound = 1.0 / math.sqrt(value.shape[-1])
            updates.append((name, mx.random.uniform(-bound, bound, value.shape, dtype=value.dtype)))
    if updates:
        model.load_weights(updates, strict=False)


def _same_build(out: Path, config: dict[str, Any], seed: int) -> bool:
    try:
        on_disk = json.loads((out / "config.json").read_text())
        info = json.loads((out / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return False
    return on_disk == config and info.get("seed") == seed and (out / "model.safetensors").is_file()


def build(family: str, out: Path, tokenizer_dir: Path, seed: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """Write a tiny random-weight model of `family` (its config with `overrides`) to `out` (config.json,
    model.safetensors, the tokenizer files of `tokenizer_dir`); nothing is done when `out` already holds the
    same config built with the same seed. config.json is written last, so a directory that has it is complete.
    Returns `out`."""
    config = {**FAMILIES[family], **(overrides or {})}
    out = Path(out)
    tokenizer_dir = Path(tokenizer_dir)
    if _same_build(out, config, seed):
        return out
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)

    model_class, args_class = _model_class(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(copy.deepcopy(config)))
    _init_zero_routers(model)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})

    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    (out / BUILD_INFO).write_text(json.dumps({"family": family, "seed": seed}) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def tokenizer_dir() -> Path:
    """The SmolLM2 model directory the test suite uses (MLXD_MODELS_DIR, else MLXD_HOME/models, else
    ~/.mlxd/models), whose tokenizer every family borrows."""
    home = Path(os.environ.get("MLXD_HOME") or Path.home() / ".mlxd")
    return Path(os.environ.get("MLXD_MODELS_DIR") or home / "models") / "smollm2-135m"


def family_dir(family: str, seed: int = 0, wide: bool = False) -> Path:
    """`family` built (once) under target/families/ of the repository, with the SmolLM2 tokenizer; `wide`:
    with WIDE_HEADS (for kv_bits)."""
    root = Path(__file__).resolve().parents[2]
    name = f"{family}-wide" if wide else family
    return build(family, root / "target" / "families" / name, tokenizer_dir(), seed, WIDE_HEADS if wide else None)


def load(model_dir: Path) -> nn.Module:
    """The model alone, as mlx_lm.load builds it (no tokenizer)."""
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_dir))
    return model


def greedy(
    model_dir: Path, prompt_ids: list[int], max_tokens: int, kv_bits: int | None = None, max_kv_size: int | None = None
) -> list[int]:
    """mlx-lm's own greedy generation from `prompt_ids`: mlx_lm.load, then generate_step with an argmax sampler
    and the model's own prompt cache. Exactly `max_tokens` ids come back: generate_step does not stop at EOS.

    `kv_bits`: the cache's full-attention layers are mlx-lm's QuantizedKVCache from the first token (group
    KV8_GROUP); `max_kv_size`: they are mlx-lm's RotatingKVCache of that size, a plain window (mlxd keeps
    no sink tokens: mlx-lm's batch cannot). The other layers (sliding windows, recurrent state) stay as the
    model makes them."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache, make_prompt_cache

    model = _loaded(Path(model_dir))
    cache = make_prompt_cache(model)
    for i, layer in enumerate(cache):
        if type(layer) is KVCache and kv_bits is not None:
            cache[i] = QuantizedKVCache(group_size=KV8_GROUP, bits=kv_bits)
        elif type(layer) is KVCache and max_kv_size is not None:
            cache[i] = RotatingKVCache(max_size=max_kv_size, keep=0)
    steps = generate_step(
        mx.array(prompt_ids, dtype=mx.uint32),
        model,
        max_tokens=max_tokens,
        sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
        prompt_cache=cache,
    )
    return [int(token) for token, _ in steps]


def greedy_text(model_dir: Path, prompt_ids: list[int], max_tokens: int, **cache: Any) -> str:
    """mlx-lm's greedy answer as text, ending at an end-of-sequence token as mlxd's
    does (`cache`: greedy's kv_bits or max_kv_size)."""
    tok = tokenizer(Path(model_dir))
    ids = greedy(model_dir, prompt_ids, max_tokens, **cache)
    for i, token in enumerate(ids):
        if token in tok.eos_token_ids:
            ids = ids[:i]
            break
    # mlx-lm's streaming detokenizer, as stream_generate (and the worker) use it:
    # a plain decode of the ids alone drops a leading space.
    detokenizer = tok.detokenizer
    detokenizer.reset()
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    text: str = detokenizer.text
    return text


@functools.lru_cache(maxsize=8)
def _loaded(model_dir: Path) -> nn.Module:
    """mlx_lm.load's model, once per directory (a test compares several answers
    of one model; generate_step is given a fresh cache each time)."""
    import mlx_lm

    model, _ = mlx_lm.load(str(model_dir))
    return model


@functools.lru_cache(maxsize=8)
def tokenizer(model_dir: Path) -> Any:
    """mlx-lm's tokenizer of a model directory, once per directory."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(model_dir)


def cache_kinds(model_dir: Path) -> list[str]:
    """The class names of mlx_lm.models.cache.make_prompt_cache(model), one per kind, in layer order."""
    from mlx_lm.models.cache import make_prompt_cache

    kinds: list[str] = []
    for cache in make_prompt_cache(load(model_dir)):
        name = type(cache).__name__
        if name not in kinds:
            kinds.append(name)
    return kinds
