"""A tiny random Qwen3 written as Qwen3-Embedding ships (the backbone's keys without
the "model." prefix, no LM head though the config says untied, sentence-transformers
files for last-token pooling and normalization, a query prompt), and its vectors
computed by mlx-lm's own Qwen3 backbone: the reference the embedding engine's
decoder path (models/embedder.py) is checked against. Used by unit and e2e tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 49152,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def write(out: Path, tokenizer_from: Path, seed: int = 0, layout: str = "sentence-transformers") -> Path:
    """`layout`: "sentence-transformers" as above, or "mlx-lm" (prefixed keys, an
    LM head, no sentence-transformers files: a chat checkpoint a preset names as an
    embedding model)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3

    mx.random.seed(seed)
    backbone = qwen3.Qwen3Model(qwen3.ModelArgs.from_dict(CONFIG))
    weights = dict(tree_flatten(backbone.parameters()))
    if layout == "mlx-lm":
        weights = {f"model.{k}": v for k, v in weights.items()}
        weights["lm_head.weight"] = mx.random.normal((CONFIG["vocab_size"], CONFIG["hidden_size"])) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, out / name)
    if layout == "sentence-transformers":
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (out / "modules.json").write_text(json.dumps(modules))
        (out / "1_Pooling").mkdir(exist_ok=True)
        (out / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": CONFIG["hidden_size"], "pooling_mode_lasttoken": True})
        )
        (out / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None})
        )
    (out / "config.json").write_text(json.dumps(CONFIG))
    return out


def vector(model_dir: Path, row: list[int]) -> np.ndarray:
    """The unit vector of one token row by mlx-lm's Qwen3 backbone alone: its last
    position's final-norm state."""
    from mlx_lm.models import qwen3

    backbone = qwen3.Qwen3Model(qwen3.ModelArgs.from_dict(CONFIG))
    weights = mx.load(str(model_dir / "model.safetensors"))
    assert isinstance(weights, dict)
    backbone.load_weights([(k.removeprefix("model."), v) for k, v in weights.items() if not k.startswith("lm_head")])
    state = np.array(backbone(mx.array([row]))[0, -1], dtype=np.float32)
    return state / np.linalg.norm(state)
