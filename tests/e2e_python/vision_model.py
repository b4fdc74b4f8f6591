"""A tiny random-weight Qwen2-VL built with mlx-vlm's own classes (two text layers,
a two-block vision tower), SmolLM2's tokenizer with Qwen2-VL's four vision tokens
added and a ChatML template that renders image parts in place; and mlx-vlm's own
greedy generation on it, the reference mlxd's answers are compared with. Nothing is
downloaded. No tests live here."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Images of 56² to 112² pixels: 4 to 16 image tokens each.
PREPROCESSOR = {
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "min_pixels": 3136,
    "max_pixels": 12544,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def build(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Writes the model to `out` once (config.json last: a directory that has it is complete)."""
    if (out / "config.json").is_file():
        return out
    os.environ["HF_HUB_OFFLINE"] = "1"
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models.qwen2_vl import Model, ModelConfig, TextConfig, VisionConfig
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.save_pretrained(str(out))
    ids = {t: tok.convert_tokens_to_ids(t) for t in [*VISION_TOKENS, "<|im_end|>"]}
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    config: dict[str, Any] = {
        "model_type": "qwen2_vl",
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": 49160,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]},
        "tie_word_embeddings": False,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "eos_token_id": [ids["<|im_end|>"]],
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "hidden_size": 64,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
    }
    model_config = ModelConfig.from_dict(json.loads(json.dumps(config)))
    model_config.text_config = TextConfig.from_dict(model_config.text_config)
    model_config.vision_config = VisionConfig.from_dict(model_config.vision_config)
    mx.random.seed(seed)
    model = Model(model_config)
    mx.eval(model.parameters())
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    return out


def picture(seed: int, size: tuple[int, int] = (100, 80), fmt: str = "PNG") -> bytes:
    """A random RGB image's file bytes."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def native(model_dir: Path, content: list[dict[str, str]], images: list[bytes], max_tokens: int) -> str:
    """mlx-vlm's own greedy answer to one user turn (`content`: its parts in order,
    {"type": "image"} or {"type": "text", "text": ...}) with `images` in that order."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from mlx_vlm import generate
    from mlx_vlm.utils import load
    from PIL import Image

    model, processor = load(str(model_dir.resolve()))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    result = generate(model, processor, prompt, image=pictures, max_tokens=max_tokens, temperature=0.0, verbose=False)
    return str(result.text)
