"""Where a vision request's time to first token goes inside the worker: the image's
decode, the processor, the content key, the insert and the steps to the first token,
timed piece by piece with the vision backend (no daemon). Used to find what
benches/vision.py's mlxd side adds over mlx-vlm's own stream_generate.

    python benches/vision_steps.py MODEL_DIR --image-size 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e_python"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python-worker"))
import vision_model  # noqa: E402

from mlxd_worker.engines.backend import RowOptions  # noqa: E402
from mlxd_worker.engines.vision import VisionBackend  # noqa: E402
from mlxd_worker.requests import vision  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    backend = VisionBackend()
    backend.load(str(args.model), {"prompt_cache_bytes": 1 << 30})
    prompts = backend.prompts
    assert prompts is not None
    for run in range(args.runs + 1):
        data = vision_model.picture(50 + run, (args.image_size, args.image_size))
        t: list[tuple[str, float]] = [("start", time.perf_counter())]
        opened = vision.open_image(data, 0)
        t.append(("open", time.perf_counter()))
        decoded = vision.decode_image(opened, 0)
        t.append(("decode", time.perf_counter()))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is on screen?"}]}]
        text = prompts.template.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out = prompts.processor(text=[text], images=[decoded], padding=False, return_tensors="np")
        t.append(("processor", time.perf_counter()))
        import numpy as np

        arrays = {k: np.asarray(v) for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        key = vision.content_key([decoded])
        t.append(("key", time.perf_counter()))
        ids = [int(x) for x in np.asarray(out["input_ids"])[0]]
        uid = backend.insert(ids, 8, None, RowOptions(vision=vision.VisionInput(arrays, key)))
        t.append(("insert", time.perf_counter()))
        steps = 0
        while not any(u == uid for u, _, _ in backend.step()):
            steps += 1
        t.append((f"first token ({steps + 1} steps)", time.perf_counter()))
        while backend._in_batch:
            backend.step()
        if run:  # the first compiles
            parts = ", ".join(f"{name} {1000 * (b - a):.1f}" for (_, a), (name, b) in zip(t, t[1:]))
            print(f"{len(ids)} tokens: {parts} ms; total {1000 * (t[-1][1] - t[0][1]):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
