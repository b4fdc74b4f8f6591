"""The interactive lane: one sequence decoding speculatively with a draft model.

Each round, the draft proposes up to `num_draft` tokens one at a time; the target
scores them all in one forward pass; the longest prefix on which the target agrees
is accepted, followed by one token of the target's own. The algorithm is mlx-lm's
`speculative_generate_step` (same draft counts, same acceptance rule, same cache
rewinds), written as a resumable object so the engine can move the sequence into
the batch at any round boundary and back out of it later.

At a round boundary the target's cache holds every token of the sequence but the
last one emitted, which is the next input (`Handover.prompt`), exactly the shape a
plain sequence hands to BatchGenerator.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, cast

from ..cache.layers import held, rewind_problem
from ..mlx_types import Model, PromptCache, Stream
from ..requests.sampling import Sampler
from .pacing import PrefillPacer
from .solo import Handover

if TYPE_CHECKING:
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import TokenizerWrapper

# Config keys that mark a mixture-of-experts model (mlx-lm / HF naming).
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


class SpeculativeSequence:
    def __init__(
        self,
        model: Model,
        draft: Model,
        history: list[int],
        max_tokens: int,
        sampler: Sampler | None,
        num_draft: int,
        prefill_step: int,
        stream: Stream,
        cache: PromptCache | None = None,
        draft_cache: PromptCache | None = None,
        pacer: PrefillPacer | None = None,
    ) -> None:
        """`history` is every token of the sequence so far (prompt and output);
        `cache` and `draft_cache`, when given, are the target's and the draft's KV
        caches over prefixes of it."""
        from mlx_lm.models.cache import make_prompt_cache

        self._model = model
        self._draft = draft
        self._cache = cache if cache is not None else make_prompt_cache(model)
        self._draft_cache = draft_cache if draft_cache is not None else make_prompt_cache(draft)
        self._pending = list(history[held(self._cache) :])  # target input not yet in its cache
        self._draft_pending = list(history[held(self._draft_cache) :])  # the same for the draft
        # Until the draft has prefilled the history down to its last token; after
        # that its input is one token, or two after a round accepted every draft.
        self._draft_primed = False
        self._left = max_tokens
        self._sampler = sampler
        self.num_draft = num_draft
        # The chunk follows the machine's measured prefill rate (lanes/pacing.py).
        self._pacer = pacer or PrefillPacer(prefill_step)
        self._stream = stream
        # What the last round drafted (0 while prefilling).
        self.last_drafted = 0

    @property
    def left(self) -> int:
        return self._left

    def _sample(self, logits: mx.array) -> mx.array:
        import mlx.core as mx

        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self._sampler is None:
            return mx.argmax(logprobs, axis=-1)
        return self._sampler(logprobs)

    def _prefill_chunk(self, model: Model, cache: PromptCache, pending: list[int], timed: bool) -> list[int]:
        """Feeds `model` the next chunk of `pending`. Only the target's chunks are
        timed: the draft prefills in chunks sized for the target, which is slower,
        and its timings would overstate the target's rate."""
        import mlx.core as mx

        n = min(self._pacer.chunk(), len(pending) - 1)
        with self._pacer.timing(n) if timed else nullcontext():
            model(mx.array(pending[:n])[None], cache=cache)
            mx.eval([c.state for c in cache])
        return pending[n:]

    def step(self) -> list[tuple[int, bool]]:
        """One prefill chunk (returns []) or one round: the tokens it yields, each
        with whether it came from the draft."""
        import mlx.core as mx
        from mlx_lm.models.cache import trim_prompt_cache

        self.last_drafted = 0
        with mx.stream(self._stream):
            if len(self._pending) > 1:
                self._pending = self._prefill_chunk(self._model, self._cache, self._pending, timed=True)
                return []
            if not self._draft_primed:
                if len(self._draft_pending) > 1:
                    self._draft_pending = self._prefill_chunk(
                        self._draft, self._draft_cache, self._draft_pending, timed=False
                    )
                    return []
                self._draft_primed = True

            num_draft = min(self._left, self.num_draft)
            dy = mx.array(self._draft_pending, mx.uint32)
            drafted = []
            for _ in range(num_draft):
                dy = self._sample(self._draft(dy[None], cache=self._draft_cache)[0, -1:, :])
                mx.async_eval(dy)
                drafted.append(dy)
            y = mx.array(self._pending, mx.uint32)
            proposed = mx.concatenate(drafted) if drafted else mx.array([], mx.uint32)
            if drafted:
                y = mx.concatenate([y, proposed.astype(mx.uint32)])
            logits = self._model(y[None], cache=self._cache)[0, -(num_draft + 1) :, :]
            targets = self._sample(logits)
            mx.eval(targets, proposed)
            # One read-back each: on a GPU every read is a synchronisation.
            target_tokens = cast("list[int]", targets.tolist())
            draft_tokens = cast("list[int]", proposed.tolist())

            out: list[tuple[int, bool]] = []
            n = 0
            while n < num_draft and target_tokens[n] == draft_tokens[n]:
                out.append((target_tokens[n], True))
                n += 1
            self._left -= n
            if self._left > 0:
                out.append((target_tokens[n], False))
                self._left -= 1
            self.last_drafted = num_draft
            last = target_tokens[n]
            self._pending = [last]
            # After a full accept the draft has not yet seen its own last token.
            self._draft_pending = [draft_tokens[-1], last] if n == num_draft and num_draft else [last]
            trim_prompt_cache(self._cache, num_draft - n)
            trim_prompt_cache(self._draft_cache, max(num_draft - n - 1, 0))
            return out

    @property
    def draft_cache(self) -> PromptCache:
        """The draft's cache, kept while the sequence is in the batch: coming back,
        the draft then only catches up on the tokens the batch produced."""
        return self._draft_cache

    def handover(self) -> Handover:
        """Leaves the lane at a round boundary (or mid-prefill): the target's cache
        and the tokens it has not seen yet go to the batch; the draft's cache is
        dropped."""
        return Handover(self._pending, self._cache, self._left, self._sampler, None)


def _config(model_path: str) -> dict[str, Any]:
    try:
        with open(f"{model_path}/config.json") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def is_mixture_of_experts(cfg: dict[str, Any]) -> bool:
    text_cfg = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else {}
    for c in (cfg, text_cfg):
        if any(c.get(k) for k in _MOE_KEYS):
            return True
        model_type = str(c.get("model_type", ""))
        if "moe" in model_type or "mixtral" in model_type:
            return True
    return False


def tokenizer_mismatch(target: TokenizerWrapper, draft: TokenizerWrapper) -> str | None:
    """Why the draft's tokens would not mean the same to the target, or None."""
    tv, dv = target.get_vocab(), draft.get_vocab()
    if tv != dv:
        differ = sum(1 for k, v in tv.items() if dv.get(k) != v) + sum(1 for k in dv if k not in tv)
        return (
            f"the draft's vocabulary differs from the target's ({len(dv)} vs {len(tv)} tokens, {differ} entries differ)"
        )
    checks = {
        "EOS tokens": (sorted(target.eos_token_ids), sorted(draft.eos_token_ids)),
        "BOS token": (target.bos_token_id, draft.bos_token_id),
        "special tokens": (sorted(target.all_special_tokens), sorted(draft.all_special_tokens)),
    }
    for what, (t, d) in checks.items():
        if t != d:
            return f"the draft's {what} differ from the target's ({d} vs {t})"
    return None


def pair_problem(
    target_path: str, target_tok: TokenizerWrapper, draft_tok: TokenizerWrapper, target_cache: PromptCache, mode: str
) -> str | None:
    """Why this target/draft pair cannot (or, by policy, should not) draft; None
    when it can. Tokenizer and cache problems are hard; the family policy
    (mixture-of-experts targets) yields to mode = "on"."""
    problem = tokenizer_mismatch(target_tok, draft_tok)
    if problem:
        return problem
    stuck = rewind_problem(target_cache)
    if stuck:
        return f"the target cannot take back rejected draft tokens: {stuck}"
    cfg = _config(target_path)
    if mode != "on" and is_mixture_of_experts(cfg):
        return (
            f"the target is a mixture-of-experts model ({cfg.get('model_type', '?')}): drafted tokens each "
            'route through other experts, so drafting rarely pays; mode = "on" forces it'
        )
    return None
