"""GGUF → mlx-lm model directory (``mlxd import``).

Reads a llama-architecture GGUF with ``mx.load`` and writes ``config.json``,
``model.safetensors`` and the tokenizer files mlx-lm loads. Legacy block quants
(Q4_0, Q4_1, Q8_0) stay quantized as MLX affine weights (group size 32); with
``--dtype`` everything is dequantized to that dtype instead. Files with tensors
``mx.load`` does not read (Q5_0, Q5_1, the K-quants Q2_K…Q6_K, IQ4_NL, IQ4_XS) are
read tensor by tensor by ``kquants``: Q5_0/Q5_1/Q4_K/Q5_K map onto MLX affine
weights without loss, Q2_K/Q3_K/Q6_K/IQ4_* are requantized (4, 4, 6 and 5 bits).
``--bits`` picks the bits of every quantized tensor instead.

Facts this relies on (see docs/design/GGUF-NOTES.md):
- llama.cpp permutes the rows of attn_q/attn_k into the interleaved RoPE layout;
  we undo that (rows only, so packed weights, scales and biases alike) and keep
  ``rope_traditional = false``, the Hugging Face layout.
- ``tokenizer.ggml.pre = "smollm"``/"starcoder" split every digit before the
  byte-level regex.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, cast

if TYPE_CHECKING:
    import mlx.core as mx
    from tokenizers.pre_tokenizers import PreTokenizer

# GGUF general.file_type values (llama.cpp's enum llama_ftype), for mlxd-import.json.
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
}

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

GROUP_SIZE = 32  # every legacy ggml block holds 32 values
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# Weights by name, as mx.load reads them and mx.save_safetensors writes them.
Weights = dict[str, "mx.array"]
# Weights as read: mx.load's dict, or kquants.GGUFTensors (converted on access).
WeightsIn = Mapping[str, "mx.array"]
# A GGUF file's metadata as mx.load (or gguf_check.read_header) returns it: values
# are arrays, scalars, strings or lists of strings (mlx types them Any).
Metadata = dict[str, Any]
# config.json's "quantization": the group size, the bits most layers use, and the
# layers that use other bits.
Quantization = dict[str, Union[int, dict[str, int]]]


class ImportError_(Exception):
    """The file cannot be imported; the message says why."""


def _scalar(meta: Metadata, key: str, default: Any = None) -> Any:
    v = meta.get(key, default)
    if v is None:
        if default is None:
            raise ImportError_(f"GGUF metadata lacks {key}")
        return default
    return v.item() if hasattr(v, "item") else v


def mlx_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{suffix}"
    raise ImportError_(f"unexpected tensor {gguf_name} for a llama model")


def unpermute_rows(w: mx.array, n_head: int) -> mx.array:
    """Inverse of llama.cpp's HF→GGUF q/k permutation (acts on rows only).

    llama.cpp maps HF rows with reshape(n_head, 2, half, ...).swapaxes(1, 2); the
    inverse reads the GGUF rows as (n_head, half, 2) and swaps back.
    """
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def model_config(meta: Metadata, weights: WeightsIn) -> dict[str, Any]:
    arch = _scalar(meta, "general.architecture")
    if arch != "llama":
        raise ImportError_(f"architecture {arch!r} is not supported (only 'llama')")
    p = "llama."
    heads = int(_scalar(meta, p + "attention.head_count"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": int(_scalar(meta, p + "embedding_length")),
        "num_hidden_layers": int(_scalar(meta, p + "block_count")),
        "intermediate_size": int(_scalar(meta, p + "feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(meta, p + "attention.head_count_kv", heads)),
        "rms_norm_eps": float(_scalar(meta, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_scalar(meta, p + "rope.freq_base", 10000.0)),
        "rope_traditional": False,
        "max_position_embeddings": int(_scalar(meta, p + "context_length", 2048)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id", 2)),
    }


def convert_weights(
    weights: WeightsIn, cfg: dict[str, Any], dtype: str | None, progress: bool, to_bits: int | None = None
) -> tuple[Weights, Quantization | None]:
    """Returns (mlx weights, quantization config or None). `to_bits`: quantized
    tensors with other bits are requantized to these."""
    import mlx.core as mx

    dense_dtype = getattr(mx, dtype) if dtype else mx.float16
    # Keep scales/biases in float32 on the Linux CPU (bfloat16 ones ran ~8x slower
    # there); float16 suits Apple GPUs.
    scale_dtype = mx.float16 if sys.platform == "darwin" else mx.float32
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    bases = sorted({k.rpartition(".")[0] for k in weights})
    out: Weights = {}
    quant: Quantization = {"group_size": GROUP_SIZE, "bits": 4}
    bit_counts: dict[int, int] = {}
    per_layer: dict[str, dict[str, int]] = {}
    iterator: Iterable[str] = bases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(bases, desc="importing tensors", unit="tensor", file=sys.stderr)
    for base in iterator:
        w = weights[f"{base}.weight"]
        target = mlx_name(f"{base}.weight").rpartition(".")[0]
        kind = base.rpartition(".")[2]
        quantized = f"{base}.scales" in weights
        parts = {"weight": w}
        if quantized:
            parts["scales"] = weights[f"{base}.scales"]
            parts["biases"] = weights[f"{base}.biases"]
        if kind in heads:
            parts = {k: unpermute_rows(v, heads[kind]) for k, v in parts.items()}
        if quantized:
            in_features = parts["scales"].shape[-1] * GROUP_SIZE
            bits = parts["weight"].shape[-1] * 32 // in_features
            if dtype:
                dense = mx.dequantize(
                    parts["weight"], parts["scales"], parts["biases"], group_size=GROUP_SIZE, bits=bits
                )
                out[f"{target}.weight"] = dense.astype(dense_dtype)
            else:
                if to_bits and bits != to_bits:
                    dense = mx.dequantize(
                        parts["weight"],
                        parts["scales"].astype(mx.float32),
                        parts["biases"].astype(mx.float32),
                        group_size=GROUP_SIZE,
                        bits=bits,
                    )
                    parts["weight"], parts["scales"], parts["biases"] = mx.quantize(
                        dense, group_size=GROUP_SIZE, bits=to_bits
                    )
                    bits = to_bits
                out[f"{target}.weight"] = parts["weight"]
                out[f"{target}.scales"] = parts["scales"].astype(scale_dtype)
                out[f"{target}.biases"] = parts["biases"].astype(scale_dtype)
                bit_counts[bits] = bit_counts.get(bits, 0) + 1
                per_layer[target] = {"group_size": GROUP_SIZE, "bits": bits}
        else:
            out[f"{target}.weight"] = parts["weight"].astype(dense_dtype)
        mx.eval(*[out[k] for k in out if k.startswith(target + ".")])
    if dtype or not bit_counts:
        return out, None
    quant["bits"] = max(bit_counts, key=lambda b: bit_counts[b])
    for target, q in per_layer.items():
        if q["bits"] != quant["bits"]:
            quant[target] = q
    return out, quant


def _pre_tokenizer(pre: str) -> PreTokenizer:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "default"):
        return byte_level
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        llama3 = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ImportError_(f"tokenizer pre-split {pre!r} is not supported yet")


def write_tokenizer(meta: Metadata, out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = _scalar(meta, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ImportError_(f"tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = meta["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in meta else []
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(str(_scalar(meta, "tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    special_ids = {
        name: int(_scalar(meta, f"tokenizer.ggml.{name}_token_id", -1)) for name in ("bos", "eos", "padding", "unknown")
    }
    add_bos = bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False))
    bos = tokens[special_ids["bos"]] if special_ids["bos"] >= 0 else None
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, special_ids["bos"])]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # token_type 3 = control (special), 4 = user-defined.
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    )
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4])
    tok.save(str(out_dir / "tokenizer.json"))

    def name_of(key: str) -> str | None:
        i = special_ids[key]
        return tokens[i] if 0 <= i < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": name_of("eos"),
        "pad_token": name_of("padding"),
        "unk_token": name_of("unknown"),
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length", 2048)),
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
        (out_dir / "chat_template.jinja").write_text(str(template))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in config.items() if k.endswith("_token") and v}, indent=2)
    )


def import_gguf(
    gguf: Path,
    out_dir: Path,
    dtype: str | None = None,
    progress: bool = True,
    bits: int | None = None,
    reader: str = "auto",
) -> Path:
    """`bits`: the bits of every quantized tensor (default: each type's own, see
    kquants). `reader`: "auto" lets ``mx.load`` read files it can read whole and
    kquants the others; "kquants" always uses kquants (tests)."""
    import mlx.core as mx

    from .gguf_check import GGUFError, read_header
    from .kquants import MX_LOAD_TYPES, GGUFTensors, TensorError, type_name

    if dtype and bits:
        raise ImportError_("--bits and --dtype exclude each other")
    # The file is untrusted: its header is validated before MLX's parser sees it.
    try:
        header = read_header(gguf)
    except (GGUFError, OSError) as e:
        raise ImportError_(f"{gguf.name} is not a valid GGUF file: {e}") from e
    weights: WeightsIn
    if reader == "auto" and all(t.ggml_type in MX_LOAD_TYPES for t in header.tensors):
        try:
            weights, meta = cast("tuple[Weights, Metadata]", mx.load(str(gguf), return_metadata=True))
        except Exception as e:
            raise ImportError_(f"cannot read {gguf}: {e}") from e
    else:
        try:
            weights = GGUFTensors(gguf, header, dense=dtype is not None, bits=bits)
        except TensorError as e:
            raise ImportError_(f"{gguf.name}: {e}") from e
        meta = header.metadata
    file_type = int(_scalar(meta, "general.file_type", 0))
    tensor_types = Counter(type_name(t.ggml_type) for t in header.tensors)
    cfg = model_config(meta, weights)
    try:
        mlx_weights, quant = convert_weights(weights, cfg, dtype, progress, bits)
    except TensorError as e:
        raise ImportError_(f"{gguf.name}: {e}") from e
    if quant:
        cfg["quantization"] = quant
        cfg["quantization_config"] = quant
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), mlx_weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(meta, tmp)
    (tmp / "mlxd-import.json").write_text(
        json.dumps(
            {
                "source": str(gguf),
                "dtype": dtype or "quantized",
                "file_type": FILE_TYPES.get(file_type),
                "tensor_types": dict(sorted(tensor_types.items())),
            }
        )
    )
    # Publish atomically: a half-written import is never mistaken for a model.
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def default_name(gguf: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem).strip("-.").lower()
    return name or "model"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mlxd import", description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--name")
    ap.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="dequantize every tensor to this dtype (default: keep quantized tensors quantized)",
    )
    ap.add_argument(
        "--bits",
        type=int,
        choices=[4, 5, 6, 8],
        help="store every quantized tensor with this many bits (default: Q4_0/Q4_1/Q4_K 4, "
        "Q5_0/Q5_1/Q5_K 5, Q8_0 8, Q2_K/Q3_K 4, Q6_K 6, IQ4_NL/IQ4_XS 5)",
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    name = args.name or default_name(args.gguf)
    if not SAFE_NAME.match(name):
        print(f"error: model name {name!r} must match {SAFE_NAME.pattern}", file=sys.stderr)
        return 2
    if not args.gguf.is_file():
        print(f"error: {args.gguf} is not a file", file=sys.stderr)
        return 2
    try:
        out = import_gguf(args.gguf, args.models_dir / name, args.dtype, not args.no_progress, args.bits)
    except ImportError_ as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"imported {args.gguf.name} as {name} → {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
