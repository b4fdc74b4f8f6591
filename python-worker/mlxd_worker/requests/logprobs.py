"""Log probabilities of generated tokens, for requests that ask (`logprobs`: how
many alternatives per token, 0..20).

A token's logprob is read from the distribution it was sampled from: the model's
log-softmax after logits processors (a constraint's mask), before temperature and
top-p, as mlx-lm reports it. Alternatives the distribution rules out (-inf, under a
constraint) are left out of `top`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

from ..io.protocol import TokenLogprob

if TYPE_CHECKING:
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import TokenizerWrapper

MAX_TOP = 20
# JSON has no -inf; a sampled token never has it, but a fully masked row would.
FLOOR = -1e30


class TokenTexts:
    """Each token decoded alone (the vocabulary bounds what is remembered)."""

    def __init__(self, tokenizer: TokenizerWrapper) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self._tokenizer.decode([token])
        return text


def logprob_entry(vector: mx.array, token: int, top: int, text_of: TokenTexts) -> TokenLogprob:
    """The Logprobs frame entry of `token`, sampled from `vector` (log-softmax over
    the vocabulary), with the `top` likeliest tokens, likeliest first."""
    import mlx.core as mx

    row = vector.reshape(-1)
    chosen = row[token]
    if top <= 0:
        return {"token": token, "text": text_of(token), "logprob": _finite(cast(float, chosen.item()))}
    k = min(top, MAX_TOP, row.size)
    ids = mx.argpartition(-row, kth=k - 1)[:k]
    values = row[ids]
    mx.eval(chosen, ids, values)
    ranked = sorted(
        zip(cast("list[float]", values.tolist()), cast("list[int]", ids.tolist())), key=lambda p: (-p[0], p[1])
    )
    return {
        "token": token,
        "text": text_of(token),
        "logprob": _finite(cast(float, chosen.item())),
        "top": [{"token": t, "text": text_of(t), "logprob": lp} for lp, t in ranked if math.isfinite(lp)],
    }


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR
