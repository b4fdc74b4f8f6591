"""The `replay` engine: streams a fixed text's tokens as fast as the protocol
allows, through the same scheduler, batching and framing as the mlx-lm engine.

It measures the token path (worker framing, transport, daemon fan-out, SSE)
without a model in the way. Selected by a preset's `engine = "replay"`; never the
default. Only the model directory's tokenizer is loaded. With no model there are no
logits: a request for logprobs, an output format or a forced tool call is refused
(RequestError), not answered with made-up figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from ..errors import RequestError
from ..io.protocol import DraftCounts, LoadOptions, ModelFacts, PromptCacheStats, SpecStatus
from ..lanes.drafting import DraftController
from ..requests.sampling import Sampler, SamplingDefaults
from ..requests.vision import VisionPrompts
from .backend import NO_OPTIONS, Detokenizer, LogitPasses, ModelTimes, RowOptions, StepResult
from .sizing import max_batch

if TYPE_CHECKING:
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from .lockstep import Lockstep

# Public-domain text (Moby-Dick, chapter 1), replayed in a loop.
REPLAY_TEXT = (
    "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my "
    "purse, and nothing particular to interest me on shore, I thought I would sail about a little and "
    "see the watery part of the world. It is a way I have of driving off the spleen and regulating the "
    "circulation. Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly "
    "November in my soul; whenever I find myself involuntarily pausing before coffin warehouses, and "
    "bringing up the rear of every funeral I meet; and especially whenever my hypos get such an upper "
    "hand of me, that it requires a strong moral principle to prevent me from deliberately stepping "
    "into the street, and methodically knocking people's hats off—then, I account it high time to get "
    "to sea as soon as I can. "
)


class _ReplayDetokenizer:
    """The text pieces were decoded once at load; a sequence's n-th token is piece n."""

    def __init__(self, pieces: list[str]) -> None:
        self._pieces = pieces
        self._next = 0
        self.last_segment = ""

    def add_token(self, token: int) -> None:
        self.last_segment = self._pieces[self._next % len(self._pieces)]
        self._next += 1

    def finalize(self) -> None:
        self.last_segment = ""


class ReplayBackend:
    def __init__(self) -> None:
        self.tokenizer = cast("TokenizerWrapper", None)  # set by load()
        self.eos: frozenset[int] = frozenset()
        self.times = ModelTimes()  # no model: the engine's time is all its own
        self.max_batch = 16
        self.prompts: VisionPrompts | None = None  # replays text: no images
        # A group's ranks replay alike: no model to split.
        self.group: Lockstep | None = None
        self.context_length: int | None = None
        self.sampling = SamplingDefaults()
        self.drafting: DraftController | None = None  # no draft model here
        self.step_logprobs: dict[int, list[mx.array]] = {}  # always empty: no logits
        self.snapshots = False
        self._ids: list[int] = []
        self._pieces: list[str] = []
        # uid -> [position, tokens left]
        self._live: dict[int, list[int]] = {}
        self._next_uid = 0

    def load(self, model_path: str, options: LoadOptions) -> None:
        from pathlib import Path

        from mlx_lm.utils import load_tokenizer

        self.tokenizer = load_tokenizer(Path(model_path), {"trust_remote_code": False})
        # Nothing computes: the batch is only the admission limit, as on a CPU.
        self.max_batch = max_batch(options, gpu=False)
        # No model runs, so no context limits a replay: it streams text forever.
        self.context_length = None
        text = str(options.get("replay_text") or REPLAY_TEXT)
        self._ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        detok = self.tokenizer.detokenizer
        for t in self._ids:
            detok.add_token(t)
            self._pieces.append(detok.last_segment)
        detok.finalize()
        self._pieces[-1] += detok.last_segment

    def insert(
        self,
        ids: list[int],
        max_tokens: int,
        sampler: Sampler | None,
        row: RowOptions = NO_OPTIONS,
    ) -> int:
        # The replay text has no thinking section: a budget has nothing to end;
        # and no prefix cache to keep snapshots in.
        if row.constraint is not None or row.logprobs:
            what = "logprobs" if row.logprobs else "constrained decoding (an output format or a forced tool call)"
            raise RequestError(f"the replay engine has no model, so no {what}")
        uid = self._next_uid
        self._next_uid += 1
        self._live[uid] = [0, max_tokens]
        return uid

    def remove(self, uid: int) -> None:
        self._live.pop(uid, None)

    def step(self) -> list[StepResult]:
        out: list[StepResult] = []
        ids = self._ids
        n = len(ids)
        done = []
        for uid, state in self._live.items():
            pos, left = state
            state[0] = pos + 1
            state[1] = left - 1
            finish = None
            if left <= 1:
                finish = "length"
                done.append(uid)
            out.append((uid, ids[pos % n], finish))
        for uid in done:
            del self._live[uid]
        return out

    def take_counts(self, uid: int) -> DraftCounts | None:
        return None  # no draft model here

    def speculative_status(self) -> SpecStatus | None:
        return None

    def model_facts(self) -> ModelFacts | None:
        return None  # no model: a fixed text

    def cached_tokens(self, uid: int) -> int:
        return 0  # no KV cache to keep

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        return None

    def weights_bytes(self) -> int:
        return 0  # no model

    def prompt_cache_bytes(self) -> int:
        return 0

    def shrink_prompt_cache(self, target_bytes: int) -> int:
        return 0

    def drop_all(self) -> None:
        self._live.clear()

    def start_prompt_cache(self) -> None:
        pass

    def close(self) -> None:
        pass

    def logit_passes(self, prompts: list[list[int]], token_ids: list[int]) -> LogitPasses:
        raise RequestError("the replay engine has no model to score with")

    def detokenizer(self) -> Detokenizer:
        return _ReplayDetokenizer(self._pieces)
