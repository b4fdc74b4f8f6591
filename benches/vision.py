"""Time to first token for one image: mlx-vlm's own `stream_generate` against mlxd's
vision engine, in one run, interleaved round by round; mlx-vlm's time split into the
vision encoding, the prefill and the decode; and the re-ask (the same image, a new
question) through mlxd, whose prefix cache keeps the image's features and KV.

The models are random-weight Qwen2-VL built with mlx-vlm's classes
(tests/e2e_python/vision_model.py): `tiny` (the tests' model, bigger images allowed)
or `2b` (Qwen2-VL-2B's shape: a 28-layer 1536-wide language model, a 32-block
1280-wide vision tower; bfloat16). A 1024x1024 image becomes 1,369 image tokens.

    python benches/vision.py --shape 2b --mlxd target/release/mlxd --tokenizer-from DIR
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e_python"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python-worker"))
import vision_model  # noqa: E402
from daemon import start_mlxd  # noqa: E402

from mlxd_worker.requests.vision import template_owner  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "2b": {
        "hidden_size": 1536,
        "num_hidden_layers": 28,
        "intermediate_size": 8960,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "hidden_size": 1536},
    },
}
QUESTION = "Describe this screenshot: what application is it, and what is on screen?"
REASK = "Describe this screenshot: which buttons can be pressed?"


def image_bytes(size: int) -> bytes:
    return vision_model.picture(1, (size, size))


def native_run(model: Any, processor: Any, image: bytes, question: str, tokens: int) -> dict[str, float]:
    """mlx-vlm's own stream_generate from the image file's bytes (decoded in the
    timed region, as a server must): TTFT and decode rate; its processor and vision
    encoding timed apart beforehand (the prefill is what is left of the TTFT)."""
    import mlx.core as mx
    from mlx_vlm import stream_generate
    from mlx_vlm.utils import prepare_inputs
    from PIL import Image

    prompt = template_owner(processor).apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    started = time.perf_counter()
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    decoded = time.perf_counter()
    inputs = prepare_inputs(processor, images=[picture], prompts=[prompt])
    processed = time.perf_counter()
    features = model.get_input_embeddings(
        inputs["input_ids"], inputs["pixel_values"], image_grid_thw=inputs.get("image_grid_thw")
    )
    mx.eval(features.inputs_embeds)
    encoded = time.perf_counter()
    first = last = 0.0
    n = 0
    started_again = time.perf_counter()
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    for _ in stream_generate(model, processor, prompt, image=[picture], max_tokens=tokens, temperature=0.0):
        now = time.perf_counter()
        first = first or now
        last = now
        n += 1
    ttft = first - started_again
    parts = {"decode_ms": decoded - started, "processor_ms": processed - decoded, "vision_ms": encoded - processed}
    return {
        "ttft_ms": 1000 * ttft,
        **{k: 1000 * v for k, v in parts.items()},
        "prefill_ms": 1000 * max(ttft - sum(parts.values()), 0.0),
        "decode_tps": (n - 1) / (last - first) if n > 1 else 0.0,
        "prompt_tokens": float(inputs["input_ids"].shape[1]),
    }


def mlxd_run(client: httpx.Client, url: str, model: str, image: bytes, question: str, tokens: int) -> dict[str, float]:
    """One streamed chat request: TTFT (first content delta), decode rate, cached
    tokens. On a kept-alive connection: a new client per request costs httpx tens
    of milliseconds that would be counted as mlxd's."""
    data = base64.b64encode(image).decode()
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # Encoded before the clock starts, as a client that holds its request does
    # (json.dumps of a 4 MB image takes ~20 ms of Python).
    encoded = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    first = last = 0.0
    n = 0
    usage: dict[str, Any] = {}
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", content=encoded, headers=headers, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    details = usage.get("prompt_tokens_details") or {}
    return {
        "ttft_ms": 1000 * (first - started),
        "decode_tps": (n - 1) / (last - first) if n > 1 else 0.0,
        "prompt_tokens": float(usage.get("prompt_tokens", 0)),
        "cached_tokens": float(details.get("cached_tokens") or 0),
    }


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mlxd", default="target/release/mlxd")
    ap.add_argument("--tokenizer-from", type=Path, required=True, help="the SmolLM2 model directory")
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "mlxd-vision-bench")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import mlx.core as mx
    from mlx_vlm.utils import load

    name = f"vision-{args.shape}"
    model_dir = args.models_dir / name
    pixels = args.image_size * args.image_size
    vision_model.build(
        model_dir, args.tokenizer_from, shape=SHAPES[args.shape], max_pixels=pixels, bfloat16=args.shape != "tiny"
    )
    image = image_bytes(args.image_size)
    model, processor = load(str(model_dir))
    home = Path(tempfile.mkdtemp(prefix="mlxd-vision-"))
    preset = f'model = "{model_dir}"\nkeep_alive = "30m"\n'
    proc, url, _ = start_mlxd(args.mlxd, home, str(args.models_dir), {name: preset})
    client = httpx.Client()
    try:
        # Warm both: kernels compiled for this image's shapes on each side.
        native_run(model, processor, image, QUESTION, 2)
        mlxd_run(client, url, name, vision_model.picture(2, (args.image_size, args.image_size)), QUESTION, 2)
        native_rows, cold_rows, reask_rows = [], [], []
        for round_ in range(args.runs):
            # A new picture each round: mlxd's first ask of it is cold, the re-ask cached.
            picture = vision_model.picture(10 + round_, (args.image_size, args.image_size))
            native_rows.append(native_run(model, processor, picture, QUESTION, args.tokens))
            cold_rows.append(mlxd_run(client, url, name, picture, QUESTION, args.tokens))
            reask_rows.append(mlxd_run(client, url, name, picture, REASK, args.tokens))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)
    report = {
        "shape": args.shape,
        "device": str(mx.default_device()),
        "image": f"{args.image_size}x{args.image_size}",
        "prompt_tokens": median(cold_rows, "prompt_tokens"),
        "native": {
            k: median(native_rows, k)
            for k in ("ttft_ms", "decode_ms", "processor_ms", "vision_ms", "prefill_ms", "decode_tps")
        },
        "mlxd_cold": {k: median(cold_rows, k) for k in ("ttft_ms", "decode_tps")},
        "mlxd_reask": {k: median(reask_rows, k) for k in ("ttft_ms", "decode_tps", "cached_tokens")},
    }
    report["ratios"] = {
        "mlxd_cold_ttft_over_native": report["mlxd_cold"]["ttft_ms"] / report["native"]["ttft_ms"],
        "reask_ttft_over_cold": report["mlxd_reask"]["ttft_ms"] / report["mlxd_cold"]["ttft_ms"],
        "mlxd_decode_over_native": report["mlxd_cold"]["decode_tps"] / max(report["native"]["decode_tps"], 1e-9),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
