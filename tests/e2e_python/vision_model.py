"""A tiny random-weight Qwen2-VL built with mlx-vlm's own classes (two text layers,
a two-block vision tower), SmolLM2's tokenizer with Qwen2-VL's four vision tokens
added and a ChatML template that renders image parts in place; a tiny random Gemma 3
(build_gemma3: sliding-window and global layers, a SigLIP tower, Gemma 3's chat
template and image tokens); and mlx-vlm's own greedy generation on them, the
reference mlxd's answers are compared with. Nothing is downloaded. No tests live here."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mlxd_worker.requests.vision import template_owner

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


def build(
    out: Path,
    tokenizer_dir: Path,
    seed: int = 0,
    shape: dict[str, Any] | None = None,
    max_pixels: int | None = None,
    bfloat16: bool = False,
) -> Path:
    """Writes the model to `out` once (config.json last: a directory that has it is
    complete). `shape` overrides config keys (benches/vision.py: a 2B shape, its
    "vision_config" merged), `max_pixels` the largest image before downscaling;
    `bfloat16` stores the weights so (the tests keep float32)."""
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
    (out / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "max_pixels": max_pixels or 12544}))
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
    for key, value in (shape or {}).items():
        config[key] = {**config[key], **value} if key == "vision_config" else value
    if bfloat16:
        config["torch_dtype"] = "bfloat16"
    model_config = ModelConfig.from_dict(json.loads(json.dumps(config)))
    model_config.text_config = TextConfig.from_dict(model_config.text_config)
    model_config.vision_config = VisionConfig.from_dict(model_config.vision_config)
    mx.random.seed(seed)
    model = Model(model_config)
    weights = dict(tree_flatten(model.parameters()))
    if bfloat16:
        weights = {name: w.astype(mx.bfloat16) for name, w in weights.items()}
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    return out


# Gemma 3: a tiny random gemma3 (two text layers, sliding then global, a two-block
# SigLIP tower over 56² pixels pooled to 4 image tokens) with Gemma 3's own chat
# template, which writes the BOS itself (the tokenizer adds one too when asked, as
# Gemma's does: a second BOS is the bug to catch) and an image part as <start_of_image>,
# which the processor expands to the image's soft tokens.
GEMMA3_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
GEMMA3_IMAGE_SIZE = 56
GEMMA3_IMAGE_TOKENS = 4
# Gemma3ImageProcessor's (every image resized to the tower's square, no pan and scan).
GEMMA3_PREPROCESSOR = {
    "image_processor_type": "Gemma3ImageProcessor",
    "processor_class": "Gemma3Processor",
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_pan_and_scan": None,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_seq_length": GEMMA3_IMAGE_TOKENS,
    "resample": 2,
    "rescale_factor": 1 / 255,
    "size": {"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE},
}


def build_gemma3(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Writes the Gemma 3 model to `out` once (config.json last)."""
    if (out / "config.json").is_file():
        return out
    os.environ["HF_HUB_OFFLINE"] = "1"
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models.gemma3 import Model, ModelConfig, TextConfig, VisionConfig
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "additional_special_tokens": GEMMA3_TOKENS}
    )
    tok.add_bos_token = True  # as Gemma's tokenizer: a BOS first unless told not to
    tok.save_pretrained(str(out))
    # The processor finds its image tokens by these names (Gemma 3's tokenizer_config has them).
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config.update(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_TOKENS}
    (out / "chat_template.jinja").write_text(GEMMA3_CHAT_TEMPLATE)
    (out / "preprocessor_config.json").write_text(json.dumps(GEMMA3_PREPROCESSOR))
    (out / "processor_config.json").write_text(
        json.dumps({"image_seq_length": GEMMA3_IMAGE_TOKENS, "processor_class": "Gemma3Processor"})
    )
    config: dict[str, Any] = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": ids["<start_of_image>"],
        "eoi_token_index": ids["<end_of_image>"],
        "image_token_index": ids["<image_soft_token>"],
        "pad_token_id": ids["<pad>"],
        "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
        "mm_tokens_per_image": GEMMA3_IMAGE_TOKENS,
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "rms_norm_eps": 1e-6,
            "vocab_size": 49160,
            # Layer 0 slides over 16 tokens, layer 1 sees all (Gemma 3's pattern is 6).
            "sliding_window": 16,
            "sliding_window_pattern": 2,
            "rope_global_base_freq": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "mm_tokens_per_image": GEMMA3_IMAGE_TOKENS,
            "max_position_embeddings": 4096,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 14,
            "image_size": GEMMA3_IMAGE_SIZE,
            "layer_norm_eps": 1e-6,
        },
    }
    model_config = ModelConfig.from_dict(json.loads(json.dumps(config)))
    model_config.text_config = TextConfig.from_dict(model_config.text_config)
    model_config.vision_config = VisionConfig.from_dict(model_config.vision_config)
    mx.random.seed(seed)
    model = Model(model_config)
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    del weights["language_model.lm_head.weight"]  # the embedding's (mlx-vlm's loader ties them)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
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


def prompt_ids(model_dir: Path, content: list[dict[str, str]], images: list[bytes]) -> list[int]:
    """One user turn's prompt tokens as the model's processor makes them (images
    expanded to their tokens)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from mlx_vlm.utils import load
    from PIL import Image

    _, processor = load(str(model_dir.resolve()))
    text = template_owner(processor).apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    out = processor(text=[text], images=pictures, padding=False, return_tensors="np")
    return [int(t) for t in np.asarray(out["input_ids"])[0]]


def native(
    model_dir: Path,
    content: list[dict[str, str]],
    images: list[bytes],
    max_tokens: int,
    history: list[dict[str, Any]] | None = None,
) -> str:
    """mlx-vlm's own greedy answer to one user turn (`content`: its parts in order,
    {"type": "image"} or {"type": "text", "text": ...}) after the messages of
    `history`, with `images` in the order their parts come in all of them."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from mlx_vlm import generate
    from mlx_vlm.utils import load
    from PIL import Image

    model, processor = load(str(model_dir.resolve()))
    prompt = template_owner(processor).apply_chat_template(
        [*(history or []), {"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    # mlx-vlm 0.7.10's generate has the tokenizer add its special tokens to the
    # rendered prompt (with images Gemma3Processor passes no add_special_tokens on;
    # without, should_add_special_tokens sees no template on the processor): a
    # tokenizer that adds a BOS (Gemma's) puts a second after the template's. mlxd,
    # as transformers, adds none to a rendered prompt: one BOS here too.
    tok = processor.tokenizer
    if tok.bos_token and prompt.startswith(tok.bos_token) and tok("")["input_ids"][:1] == [tok.bos_token_id]:
        prompt = prompt.removeprefix(tok.bos_token)
    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    result = generate(model, processor, prompt, image=pictures, max_tokens=max_tokens, temperature=0.0, verbose=False)
    return str(result.text)
