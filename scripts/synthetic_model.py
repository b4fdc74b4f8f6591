#!/usr/bin/env python3
"""Writes a synthetic model directory for speed work: the test model's tokenizer
with random weights of a chosen Llama shape, quantized like a real checkpoint.

Throughput does not depend on the weights' values, so a GPU host that cannot
download (or be sent) a 1B checkpoint builds one here in seconds. The rows of the
EOS tokens in the embedding (and the output head, when untied) are zeroed so the
model never prefers EOS: every generation runs to its max_tokens.

    python3 scripts/synthetic_model.py --tokenizer-from ~/.mlxd/models/smollm2-135m \\
        --out /tmp/models/synthetic-1b [--shape 1b] [--bits 4] [--layers N] [--seed 0]

Needs only mlx and mlx-lm (no project imports), so it runs on a bare GPU host.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M
    "135m": {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
             "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
             "rope_theta": 100000.0},
    # Llama-3.2-1B
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
           "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True,
           "rope_theta": 500000.0},
    # Llama-3.1-8B
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
           "rope_theta": 500000.0},
}  # fmt: skip

WEIGHT_SUFFIXES = (".safetensors", ".npz", ".gguf", ".bin")
# Files that describe the source's weights, not the tokenizer.
NOT_COPIED = {"config.json", "mlxd-import.json", "model.safetensors.index.json"}


def eos_ids(src_config: dict[str, Any]) -> list[int]:
    eos = src_config.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def build(args: argparse.Namespace) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import save_model

    src = Path(args.tokenizer_from).expanduser()
    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        sys.exit(f"{out} exists (pass --force to replace it)")
    src_config = json.loads((src / "config.json").read_text())
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(src_config["vocab_size"]),
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "bos_token_id": src_config.get("bos_token_id"),
        "eos_token_id": src_config.get("eos_token_id"),
        **shape,
    }

    t0 = time.perf_counter()
    mx.random.seed(args.seed)
    model = Model(ModelArgs.from_dict(config))  # mlx.nn's random init: finite activations
    model.set_dtype(mx.float16)
    for eos in eos_ids(src_config):
        model.model.embed_tokens.weight[eos] = 0
        if not shape["tie_word_embeddings"]:
            model.lm_head.weight[eos] = 0
    if args.bits:
        nn.quantize(model, group_size=64, bits=args.bits)
        config["quantization"] = {"group_size": 64, "bits": args.bits}
    mx.eval(model.parameters())
    params = sum(v.size for _, v in tree_flatten(model.parameters()))

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.name not in NOT_COPIED and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"{out}: llama {args.shape} ({shape['num_hidden_layers']} layers), {params / 1e6:.0f}M stored values, "
        f"{f'{args.bits}-bit' if args.bits else 'float16'}, {size / 2**20:.0f} MiB, "
        f"{time.perf_counter() - t0:.1f}s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer-from", required=True, help="a model directory whose tokenizer to use")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=0, help="override the shape's layer count")
    ap.add_argument("--bits", type=int, choices=[0, 4, 8], default=4, help="0 keeps float16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    build(ap.parse_args())


if __name__ == "__main__":
    main()
