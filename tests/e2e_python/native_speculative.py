"""mlx-lm's own speculative decoding, for comparison with mlxd's: run as a script
(with the worker's BLAS) and print JSON. Usage:
    native_speculative.py TARGET_DIR DRAFT_DIR NUM_DRAFT MAX_TOKENS PROMPT
"""

from __future__ import annotations

import json
import sys

import mlx_lm
from mlx_lm.generate import stream_generate


def main() -> None:
    target_dir, draft_dir, num_draft, max_tokens, prompt = sys.argv[1:6]
    model, tokenizer = mlx_lm.load(target_dir)
    draft, _ = mlx_lm.load(draft_dir)
    ids = list(tokenizer.encode(prompt))  # as the worker encodes a completions prompt
    tokens, from_draft, text = [], [], ""
    for r in stream_generate(
        model, tokenizer, ids, max_tokens=int(max_tokens), draft_model=draft, num_draft_tokens=int(num_draft)
    ):
        text += r.text
        if r.finish_reason == "stop" and r.token in tokenizer.eos_token_ids:
            break
        tokens.append(r.token)
        from_draft.append(bool(r.from_draft))
    print(json.dumps({"tokens": tokens, "from_draft": from_draft, "text": text}))


if __name__ == "__main__":
    main()
