"""What the engine needs from a token source: the mlx-lm model (BatchGenerator) or
the replay engine. Both advance every live sequence by one token per step."""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol, Union, cast

from ..cache.kv_cache import KvOptions
from ..cache.layers import held, kinds, rewind_problem
from ..cache.prefix_cache import PrefixCache
from ..errors import RequestError
from ..io.protocol import (
    DraftCounts,
    FeatureLimit,
    LoadOptions,
    ModelFacts,
    PromptCacheStats,
    SpecStatus,
    SpeculativeOptions,
)
from ..lanes.drafting import DraftController
from ..lanes.pacing import PrefillPacer
from ..lanes.solo import LogitsProcessor, ProcessedSoloSequence, SoloSequence
from ..lanes.speculative import SpeculativeSequence, pair_problem
from ..mlx_types import CacheLayer, Model, PromptCache
from ..requests.constraint import LaneProcessor, SequenceConstraint, TokenConsumer
from ..requests.reasoning import ReasoningBudget
from ..requests.sampling import Sampler, SamplingDefaults
from ..requests.vision import VisionInput, VisionPrompts
from . import sizing

if TYPE_CHECKING:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from .lockstep import Lockstep

log = logging.getLogger("mlxd_worker")

# (uid, token, finish_reason): finish_reason is "stop" (EOS), "length" or None.
# A token's logprobs, for sequences that keep them, are in Backend.step_logprobs.
StepResult = tuple[int, int, Optional[str]]


@dataclass
class ModelTimes:
    """Seconds the model's passes took since load, by kind (the engine's Stats
    report them beside its own time between passes)."""

    prefill: float = 0.0
    decode: float = 0.0


@dataclass(frozen=True)
class RowOptions:
    """What a sequence asks of the backend beyond its prompt and sampler; each
    backend refuses what it cannot serve."""

    # None: the draft policy decides; constrained, logprobs and budget rows never draft.
    speculative: bool | None = None
    constraint: SequenceConstraint | None = None
    logprobs: bool = False
    budget: ReasoningBudget | None = None
    # Prompt positions at turn boundaries, for the prefix cache's snapshots.
    boundaries: list[int] | None = None
    vision: VisionInput | None = None


NO_OPTIONS = RowOptions()


class Detokenizer(Protocol):
    def add_token(self, token: int) -> None: ...
    def finalize(self) -> None: ...
    @property
    def last_segment(self) -> str: ...


class Backend(Protocol):
    tokenizer: TokenizerWrapper
    eos: frozenset[int]
    context_length: int | None
    # What a request that leaves temperature or top_p out gets.
    sampling: SamplingDefaults
    # The draft policy, when the preset names a draft model.
    drafting: DraftController | None
    # The last step's logprobs vectors (log-softmax over the vocabulary), in token
    # order, of the sequences inserted with logprobs=True.
    step_logprobs: dict[int, list[mx.array]]
    # The prefix cache keeps snapshots at a prompt's turn boundaries (a model
    # whose cache cannot be cut back to a shorter prefix).
    snapshots: bool
    # What the model's passes took (the replay engine has none: all zero).
    times: ModelTimes
    # Sequences decoding at once (Load's max_batch, or sized to the device).
    max_batch: int
    # A vision-language model's image-aware prompt rendering; None: no images taken.
    prompts: VisionPrompts | None
    # The distributed group this rank belongs to, set before load (None: alone).
    group: Lockstep | None

    def load(self, model_path: str, options: LoadOptions) -> None: ...
    def insert(
        self,
        ids: list[int],
        max_tokens: int,
        sampler: Sampler | None,
        row: RowOptions = NO_OPTIONS,
    ) -> int: ...
    def remove(self, uid: int) -> None: ...
    def step(self) -> list[StepResult]: ...
    def detokenizer(self) -> Detokenizer: ...
    def logit_passes(self, prompts: list[list[int]], token_ids: list[int]) -> LogitPasses: ...
    def take_counts(self, uid: int) -> DraftCounts | None: ...
    def speculative_status(self) -> SpecStatus | None: ...
    def model_facts(self) -> ModelFacts | None: ...
    def cached_tokens(self, uid: int) -> int: ...
    def start_prompt_cache(self) -> None: ...
    def prompt_cache_stats(self) -> PromptCacheStats | None: ...
    def weights_bytes(self) -> int: ...
    def prompt_cache_bytes(self) -> int: ...
    def shrink_prompt_cache(self, target_bytes: int) -> int: ...
    def drop_all(self) -> None: ...
    def close(self) -> None: ...


def _config(model_path: str) -> dict[str, Any]:
    try:
        with open(f"{model_path}/config.json") as f:
            return dict(json.load(f))
    except OSError:
        return {}


@dataclass
class Track:
    """What the backend keeps per sequence across lanes: its tokens (prompt and
    output, for a draft joining later), what is left, and its draft counters."""

    history: list[int]
    left: int
    sampler: Sampler | None
    forced: bool | None
    drafted: int = 0
    accepted: int = 0
    batch_tokens: int = 0  # tokens produced since it last entered the batch
    # The draft's cache while the sequence is in the batch (it drafted before).
    draft_cache: PromptCache | None = None
    # Constrained decoding: every lane masks this sequence's logits with it.
    constraint: SequenceConstraint | None = None
    # A thinking budget: every lane ends the thinking section with it.
    budget: ReasoningBudget | None = None
    # Keep each token's logprobs vector (step_logprobs).
    logprobs: bool = False
    # The prefix cache's hit: a cache holding history[:cached], until a lane takes it.
    prefix: PromptCache | None = None
    cached: int = 0
    # Prompt lengths at which the prefix cache keeps a snapshot (turn boundaries).
    boundaries: list[int] = field(default_factory=list)

    @property
    def processed(self) -> bool:
        """Needs the lone lane's processed variant (and never drafts)."""
        return self.constraint is not None or self.budget is not None or self.logprobs

    def processors(self) -> list[LogitsProcessor]:
        """Fresh logits processors for one lane entry (see constraint.LaneProcessor)."""
        consumers: list[TokenConsumer | None] = [self.constraint, self.budget]
        return [c.processor(self.history) for c in consumers if c is not None]


Lane = Union[SoloSequence, SpeculativeSequence]
# One model pass per step; returns the logits (Backend.logit_passes).
LogitPasses = Generator[None, None, list[list[float]]]

# Tokens (rows × the longest) in one pass of `logit_passes`, whose logits are that many
# vocabulary-wide rows (512 × 150k × 4 bytes ≈ 300 MB at most); longer prompts are
# prefilled in chunks of this many.
LOGITS_PASS_TOKENS = 512

# A sequence leaves the batch to draft again only if the draft's catch-up prefill
# is at most this many times the tokens it has left to decode.
CATCH_UP_PER_TOKEN_LEFT = 4

# Seconds a stopping worker spends writing its prefix cache to disk (the daemon
# allows a draining stop 10 s before it kills the worker).
CLOSE_TIMEOUT = 5.0


class MlxBackend:
    """mlx-lm's BatchGenerator: sequences join the running batch at any step and
    leave when done; prompts are prefilled `prefill_step` tokens per step, so a
    long prompt delays the others' next token by one chunk, not by all of it.

    A sequence that arrives while nothing runs decodes alone, as fast as
    stream_generate (lanes/solo.py), or speculatively with the preset's draft model
    (lanes/speculative.py, the interactive lane); the next arrival moves it into the
    batch, KV cache and all, and when the batch is down to one sequence that one
    moves back out to draft again. Our uids are our own: the batch's are mapped.
    """

    def __init__(self) -> None:
        # The model, its tokenizer and the batch: set by load().
        self.tokenizer = cast("TokenizerWrapper", None)
        self.eos: frozenset[int] = frozenset()
        self.context_length: int | None = None
        self.sampling = SamplingDefaults()
        self.drafting: DraftController | None = None  # None: no draft configured
        self._model = cast(Model, None)
        self._draft: Model | None = None
        self._gen = cast("BatchGenerator", None)
        self.max_batch = 16
        self.prompts: VisionPrompts | None = None  # a text model takes no images
        self.group: Lockstep | None = None
        self._prefill_step = 2048
        self._next_uid = 0
        self._solo: tuple[int, Lane] | None = None
        self._batch_uid: dict[int, int] = {}  # ours -> the batch's
        self._our_uid: dict[int, int] = {}  # the batch's -> ours
        self._waiting: list[int] = []
        self._tracks: dict[int, Track] = {}
        self.step_logprobs: dict[int, list[mx.array]] = {}
        self.prefix: PrefixCache | None = None  # when the preset gives it bytes
        self._prompt_cache_bytes = 0
        self._kv = KvOptions()
        self.snapshots = False
        self._pacer = PrefillPacer(self._prefill_step)
        # The batch's rows still in their prompt, by the batch's uid: the prompt
        # tokens each has not fed yet, in insertion order (BatchGenerator's queue
        # order); and those BatchGenerator has taken from its queue into its prompt
        # batch.
        self._prompt_left: dict[int, int] = {}
        self._prompt_admitted: set[int] = set()
        self.times = ModelTimes()

    def load(self, model_path: str, options: LoadOptions) -> None:
        if self.group is None:
            self._model, self.tokenizer = _load(model_path)
        else:
            self._model, self.tokenizer = _sharded_load(model_path, self.group)
        self.eos = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        # The daemon reads it from config.json (one rule for what /v1/models says).
        self.context_length = options.get("context_length")
        self.sampling = SamplingDefaults.of_model(model_path)
        max_batch = sizing.max_batch(options, sizing.on_gpu())
        self._prefill_step = options.get("prefill_step", 2048)
        self._pacer = PrefillPacer(self._prefill_step)
        if self.group is not None:
            self._pacer.agree = self.group.agree  # the chunk follows rank 0's clock
        self._kv = KvOptions.from_options(options)
        self._kv.check(_config(model_path))
        self.max_batch = max_batch
        self._gen = self._new_generator()
        spec = options.get("speculative")
        if spec:
            self._load_draft(model_path, spec)
        self._prompt_cache_bytes = options.get("prompt_cache_bytes", 0)
        if self.group is not None and self.group.parallel == "pipeline":
            # A pipeline's ranks hold different layers, so their entries differ in
            # size and each rank's limit would evict differently: their caches, and
            # then their prefills, would part ways. Off until eviction is shared.
            self._prompt_cache_bytes = 0
        # A cache that can be cut back serves any shared prefix of a stored
        # sequence; one that cannot (recurrent state, a sliding window) only the
        # prefixes stored as they were: those are kept at turn boundaries.
        self.snapshots = self._prompt_cache_bytes > 0 and rewind_problem(self._kv.make(self._model)) is not None
        self._model_path = model_path
        self._disk_dir = options.get("prompt_cache_dir")
        disk_bytes = options.get("prompt_cache_disk_bytes")
        self._disk_bytes = 4 << 30 if disk_bytes is None else disk_bytes

    def _new_generator(self) -> BatchGenerator:
        from mlx_lm.generate import BatchGenerator

        from .masked_batch import MaskedGenerationBatch

        gen = BatchGenerator(
            self._model,
            stop_tokens=[[t] for t in sorted(self.eos)],
            completion_batch_size=self.max_batch,
            prefill_batch_size=min(self.max_batch, 8),
            prefill_step_size=self._prefill_step,
            max_kv_size=self._kv.max_kv_size,
        )
        # Constrained rows masked for the whole batch at once (masked_batch.py).
        gen._generation_batch = MaskedGenerationBatch.empty(gen.model, gen.sampler)
        return gen

    def weights_bytes(self) -> int:
        """The model's (and the draft's) parameters as MLX holds them."""
        from mlx.utils import tree_flatten

        total = 0
        for model in (self._model, self._draft):
            if model is not None:
                leaves = cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
                total += sum(int(array.nbytes) for _, array in leaves)
        return total

    def prompt_cache_bytes(self) -> int:
        return 0 if self.prefix is None else self.prefix.bytes

    def shrink_prompt_cache(self, target_bytes: int) -> int:
        return 0 if self.prefix is None else self.prefix.shrink(target_bytes)

    def drop_all(self) -> None:
        """After a step failed (out of memory): forgets every sequence, keeps
        nothing of theirs, and starts a fresh batch (the old one's state is
        whatever the failed step left)."""
        self._solo = None
        self._waiting = []
        self._batch_uid.clear()
        self._our_uid.clear()
        self._prompt_left.clear()
        self._prompt_admitted.clear()
        self.step_logprobs = {}
        self._gen = self._new_generator()

    def start_prompt_cache(self) -> None:
        """Turns the prefix cache on (after warm-up, whose sequences it should
        neither keep nor count), with its disk tier when the preset names a
        directory: entries there are found again by the next worker."""
        if self._prompt_cache_bytes <= 0:
            return
        disk = None
        if self._disk_dir:
            from ..cache import quantized_kv
            from ..cache.disk_cache import DiskCache, model_identity

            kv = self._kv.describe()
            try:
                disk = DiskCache(
                    self._disk_dir,
                    self._disk_bytes,
                    f"{model_identity(self._model_path)}|{kv}",
                    to_disk=quantized_kv.to_disk,
                    from_disk=quantized_kv.from_disk,
                    owner=f"{os.path.realpath(self._model_path)}|{kv}",
                    probe=self._probe_caches,
                    accept=self._try_entry,
                )
            except Exception as e:  # a directory we cannot use, a cache the format cannot hold
                # The model serves on with the memory tier alone.
                log.warning("prompt cache: the disk tier is off: %s: %s", type(e).__name__, e)
        self.prefix = PrefixCache(self._prompt_cache_bytes, disk, keep_rotated=self._kv.max_kv_size is None)

    def _probe_caches(self, n: int) -> list[PromptCache]:
        """The caches of every form a prompt-cache entry of this model can take,
        after n tokens (the disk tier learns its entries' layout from them):
        fresh ones as the lone lane makes them, and with kv_bits set from a later
        start, quantized too."""
        import mlx.core as mx

        cache = self._kv.make(self._model)
        self._model(mx.array([list(range(1, n + 1))]), cache=cache)
        mx.eval([layer.state for layer in cache])
        forms = [cache]
        if self._kv.quantized and self._kv.quantized_kv_start > 0:
            quantized = list(cache)
            self._kv.quantize(quantized)
            forms.append(quantized)
        return forms

    def _try_entry(self, cache: PromptCache, tokens: tuple[int, ...]) -> None:
        """The trial of an entry loaded from disk: the model is fed one token on
        a copy of it. An entry that would fail a step (or make the model's output
        non-finite) raises here, where only its lookup fails, not in the batch."""
        import mlx.core as mx
        from mlx.utils import tree_map

        trial: list[CacheLayer] = []
        for layer in cache:
            twin = copy.copy(layer)
            # New array objects: an in-place update of the twin leaves the entry as it is.
            twin.state = tree_map(lambda x: mx.array(x) if isinstance(x, mx.array) else x, layer.state)
            trial.append(twin)
        logits = self._model(mx.array([[tokens[-1]]]), cache=trial)
        if not bool(mx.all(mx.isfinite(logits)).item()):
            raise ValueError("the model's output on it is not finite")

    def close(self) -> None:
        """At exit (engine thread): what the prefix cache holds in memory and the
        disk lacks goes to disk."""
        if self.prefix is not None:
            self.prefix.close(timeout=CLOSE_TIMEOUT)

    def _load_draft(self, model_path: str, spec: SpeculativeOptions) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        mode, name = spec["mode"], spec["draft"]
        problem: str | None = None
        if mode != "off":
            draft_path = spec.get("draft_path")
            if draft_path is None:
                raise RuntimeError(f"the daemon did not resolve draft '{name}' to a directory (draft_path)")
            self._draft, draft_tok = _load(draft_path)
            problem = pair_problem(model_path, self.tokenizer, draft_tok, make_prompt_cache(self._model), mode)
            if problem is None and self._kv.max_kv_size is not None:
                problem = "a rotating KV cache (max_kv_size) cannot be rewound after a rejected draft"

            if problem:
                self._draft = None
                if spec.get("require_supported"):
                    raise RuntimeError(f"speculative decoding with draft '{name}' is not supported: {problem}")
        self.drafting = DraftController(draft=name, mode=mode, max_draft=spec["num_draft_tokens"], unsupported=problem)
        if self.drafting.active:
            log.info("speculative decoding: draft '%s', %d tokens, mode %s", name, self.drafting.num_draft, mode)
        else:
            log.warning("speculative decoding inactive (draft '%s'): %s", name, self.drafting.reason)

    def insert(
        self,
        ids: list[int],
        max_tokens: int,
        sampler: Sampler | None,
        row: RowOptions = NO_OPTIONS,
    ) -> int:
        if row.vision is not None:  # the planner takes no images without prompts: never
            raise RequestError("this model takes no images")
        uid = self._next_uid
        self._next_uid += 1
        constraint, budget, logprobs, speculative = row.constraint, row.budget, row.logprobs, row.speculative
        if constraint is not None or budget is not None or logprobs:
            # Drafted tokens would bypass the mask and carry no logprobs of their own.
            speculative = False
        for consumer in (constraint, budget):
            if consumer is not None:
                consumer.prompt_len = len(ids)
        track = Track(
            list(ids), max_tokens, sampler, speculative, constraint=constraint, budget=budget, logprobs=logprobs
        )
        if self.prefix is not None:
            found = self.prefix.take(track.history)
            track.prefix, track.cached = found.cache, found.cached
            if self.snapshots and row.boundaries:
                track.boundaries = [b for b in row.boundaries if track.cached < b < len(ids)]
        self._tracks[uid] = track
        if self._solo is None and not self._batch_uid:
            self._solo = (uid, self._lone_lane(track))
        else:
            self._waiting.append(uid)
        return uid

    def _lone_lane(self, track: Track, cache: PromptCache | None = None) -> Lane:
        from mlx_lm.generate import generation_stream

        prefix = None
        if cache is None and track.prefix is not None:
            prefix, track.prefix = track.prefix, None
        d = self.drafting
        if d is not None and self._draft is not None and d.use_draft(track.forced, time.monotonic()):
            # A drafting lane starts from a cache holding all but the last token.
            if prefix is not None and track.cached == len(track.history) - 1:
                cache = prefix
            elif prefix is not None:
                track.cached = 0
            draft_cache, track.draft_cache = track.draft_cache, None
            return SpeculativeSequence(
                self._model,
                self._draft,
                track.history,
                track.left,
                track.sampler,
                max(d.num_draft, 1),
                self._prefill_step,
                generation_stream,
                self._kv.shared(cache, self._model),
                draft_cache,
                pacer=self._pacer,
            )
        stream = generation_stream
        base = track.cached if prefix is not None else 0
        marks = [b for b in track.boundaries if b > base]
        # What both lone lanes take; a processed one adds its processors.
        lane: dict[str, Any] = dict(
            model=self._model,
            ids=track.history[base:],
            max_tokens=track.left,
            sampler=track.sampler,
            prefill_step=self._prefill_step,
            stream=stream,
            cache=prefix,
            kv=self._kv,
            marks=marks,
            base=base,
            pacer=self._pacer,
        )
        if track.processed:
            processors = track.processors()
            # Forced tokens are fed ahead only where the format is the lane's one consumer
            # (a thinking budget would have to see them too).
            fast_forward = None
            if track.constraint is not None and track.budget is None:
                fast_forward = cast(LaneProcessor, processors[0]).fast_forward
            return ProcessedSoloSequence(
                processors=processors, keep_logprobs=track.logprobs, fast_forward=fast_forward, **lane
            )
        return SoloSequence(**lane)

    def _to_batch(self, uid: int, ids: list[int], cache: PromptCache | None = None) -> None:
        track = self._tracks[uid]
        if cache is None and track.prefix is not None:
            cache, track.prefix = track.prefix, None
            ids = ids[track.cached :]
        processors = [track.processors()] if track.constraint or track.budget else None
        cache = self._kv.shared(cache, self._model)
        # Stop the prefill at each boundary still ahead, for its snapshot.
        base = len(track.history) - len(ids)
        cuts = [b - base for b in track.boundaries if b - base > 0 and b - base < len(ids) - 1]
        segments = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]
        (buid,) = self._gen.insert_segments(
            [segments],
            max_tokens=[track.left],
            # None: BatchGenerator's default sampler (which its annotation leaves out).
            samplers=cast("list[Sampler]", [track.sampler]),
            caches=None if cache is None else [cache],
            logits_processors=processors,
        )
        track.batch_tokens = 0
        self._batch_uid[uid] = buid
        self._our_uid[buid] = uid
        self._prompt_left[buid] = len(ids)

    def remove(self, uid: int) -> None:
        """Stops a sequence (cancelled, or ended by a stop string); what it had
        computed goes into the prefix cache."""
        if self._solo is not None and self._solo[0] == uid:
            self._keep(uid, self._solo[1])
            self._solo = None
            return
        self._waiting = [w for w in self._waiting if w != uid]
        buid = self._batch_uid.pop(uid, None)
        if buid is not None:
            del self._our_uid[buid]
            self._prompt_done(buid)
            caches = self._gen.remove([buid], return_prompt_caches=self.prefix is not None)
            if buid in caches:
                self._keep_cache(uid, caches[buid][0])

    def _keep(self, uid: int, lane: Lane) -> None:
        if isinstance(lane, SoloSequence):  # a drafting lane's caches are not kept
            self._keep_cache(uid, lane.cache)

    def _keep_cache(self, uid: int, cache: PromptCache | None) -> None:
        track = self._tracks.get(uid)
        if self.prefix is not None and track is not None:
            self.prefix.put(track.history, cache)

    def cached_tokens(self, uid: int) -> int:
        """Prompt tokens the sequence took from the prefix cache."""
        track = self._tracks.get(uid)
        return track.cached if track is not None else 0

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        return None if self.prefix is None else self.prefix.stats()

    def take_counts(self, uid: int) -> DraftCounts | None:
        """The sequence's draft counters (None without a usable draft); forgets it."""
        track = self._tracks.pop(uid, None)
        if track is None or self.drafting is None or not self.drafting.available:
            return None
        return {"drafted": track.drafted, "accepted": track.accepted, "rejected": track.drafted - track.accepted}

    def _emit(self, uid: int, token: int, finish: str | None) -> StepResult:
        track = self._tracks[uid]
        track.history.append(token)
        track.left -= 1
        return (uid, token, finish)

    def _finish_of(self, token: int, left: int) -> str | None:
        return "stop" if token in self.eos else ("length" if left <= 0 else None)

    def step(self) -> list[StepResult]:
        if self.step_logprobs:
            self.step_logprobs = {}
        if self._solo is not None and not self._waiting:
            return self._step_lone(*self._solo)
        results: list[StepResult] = []
        if self._solo is not None:  # company arrived: the lone sequence joins the batch
            uid, lane = self._solo
            self._solo = None
            handover_started = time.perf_counter()
            moved = lane.handover()  # waits for the lane's queued token: the model's time
            self.times.decode += time.perf_counter() - handover_started
            finish = None
            if moved.emitted is not None:
                finish = self._finish_of(moved.emitted, moved.max_tokens)
                results.append(self._emit(uid, moved.emitted, finish))
                if moved.logprobs is not None:
                    self.step_logprobs.setdefault(uid, []).append(moved.logprobs)
            if isinstance(lane, SpeculativeSequence) and self.drafting is not None:
                self._tracks[uid].draft_cache = lane.draft_cache
                self.drafting.switched("batch")
            if finish is None:
                self._to_batch(uid, moved.prompt, moved.cache)
        for uid in self._waiting:
            self._to_batch(uid, self._tracks[uid].history)
        self._waiting = []
        # The batch's prefill chunk follows the measured rate too, shared by the
        # rows that prefill together; a call that prefilled is timed (with the
        # decode step it also ran, which only makes the next chunk smaller).
        self._gen.prefill_step_size = self._pacer.chunk(max(1, self._prefill_rows()))
        started = time.perf_counter()
        with self._gen.stats() as spent:
            prompt_responses, responses = self._gen.next()
        # The rest of the call (a finished prompt's first decode pass, joins) is
        # the model's too: counted as decode.
        self.times.prefill += spent.prompt_time
        self.times.decode += time.perf_counter() - started - spent.prompt_time
        prefilled = 0
        for r in prompt_responses:
            if r.end_of_prompt:
                # Its last token moved to the decode batch (fed by the next decode
                # step): nothing of it was prefilled in this call.
                self._prompt_done(r.uid)
                continue
            left = r.progress[1] - r.progress[0]
            prefilled += self._prompt_left.get(r.uid, r.progress[1]) - left
            self._prompt_left[r.uid] = left
            self._prompt_admitted.add(r.uid)
        if prefilled:
            self._pacer.observe(prefilled, time.perf_counter() - started)
        if self.snapshots:
            self._snapshot_batch(prompt_responses)
        for r in responses:
            uid = self._our_uid[r.uid]
            if r.finish_reason is not None:
                del self._our_uid[r.uid]
                del self._batch_uid[uid]
            track = self._tracks[uid]
            track.batch_tokens += 1
            if track.logprobs:
                self.step_logprobs.setdefault(uid, []).append(r.logprobs)
            results.append(self._emit(uid, r.token, r.finish_reason))
            if r.finish_reason is not None:
                self._keep_cache(uid, r.prompt_cache)
        self._leave_batch_if_alone(results)
        return results

    def _prefill_rows(self) -> int:
        """Rows that prefill in the next BatchGenerator.next(), sharing its chunk:
        the rows of its prompt batch with more than their last token left (the
        last one is fed by the first decode step), and the rows it admits from its
        queue in that call, first come, while its prompt batch (counted before
        finished prompts leave it) holds fewer than prefill_batch_size. A full
        decode batch also holds admission back; that bound is left out, because
        decode rows that finish in the same call make room first: the count may be
        too high (smaller chunks), never too low."""
        free = self._gen.prefill_batch_size - len(self._prompt_admitted)
        rows = 0
        for buid, left in self._prompt_left.items():
            if buid not in self._prompt_admitted:
                if free <= 0:
                    continue
                free -= 1
            if left > 1:
                rows += 1
        return rows

    def _prompt_done(self, buid: int) -> None:
        """The row left its prompt: decoding, or gone from the batch."""
        self._prompt_left.pop(buid, None)
        self._prompt_admitted.discard(buid)

    def _snapshot_batch(self, prompt_responses: list[Any]) -> None:
        """The prefix cache's snapshots of batched sequences whose prefill just
        reached one of their boundaries."""
        for r in prompt_responses:
            if not r.end_of_segment or r.end_of_prompt or r.uid not in self._our_uid:
                continue
            track = self._tracks[self._our_uid[r.uid]]
            n = len(track.history) - r.progress[1] + r.progress[0]
            if n in track.boundaries:
                cache = self._gen.extract_cache([r.uid])[r.uid][0]
                self._keep_snapshot(track, n, cache)

    def _keep_snapshot(self, track: Track, n: int, cache: PromptCache) -> None:
        if self.prefix is not None and held(cache) == n:
            import mlx.core as mx

            # Evaluated now: a lazy slice of the batch's state would keep the whole
            # batch's buffers alive for as long as the entry lives.
            mx.eval([layer.state for layer in cache])
            self.prefix.put(track.history[:n], cache)

    def _step_lone(self, uid: int, lane: Lane) -> list[StepResult]:
        track = self._tracks[uid]
        started = time.perf_counter()
        # A plain sequence's first token carries its prompt's last pass: not decode speed.
        first = isinstance(lane, SoloSequence) and not lane.decoding
        out = lane.step()
        if isinstance(lane, SoloSequence):
            for n, snapshot in lane.take_snapshots():
                self._keep_snapshot(track, n, snapshot)
        seconds = time.perf_counter() - started
        if first or not out:  # a prefill chunk yields nothing
            self.times.prefill += seconds
        else:
            self.times.decode += seconds
        if track.logprobs and out:
            # A sequence that keeps logprobs runs in the processed lane, which kept them.
            assert isinstance(lane, ProcessedSoloSequence) and lane.last_logprobs is not None
            self.step_logprobs[uid] = [lane.last_logprobs]
        results: list[StepResult] = []
        accepted = 0
        for token, from_draft in out:
            finish = self._finish_of(token, track.left - 1)
            if from_draft and token not in self.eos:
                accepted += 1
            results.append(self._emit(uid, token, finish))
            if finish is not None:
                self._keep(uid, lane)
                self._solo = None
                break
        d = self.drafting
        if d is not None and out:
            now = time.monotonic()
            if isinstance(lane, SpeculativeSequence):
                track.drafted += lane.last_drafted
                track.accepted += accepted
                d.on_round(lane.last_drafted, accepted, len(results), seconds, now)
            elif not first and not isinstance(lane, ProcessedSoloSequence):
                # A processed lane's pace (masks, forced tokens fed ahead) is not
                # what drafting competes with.
                d.on_plain(len(results), seconds, now)
        return results

    def _leave_batch_if_alone(self, results: list[StepResult]) -> None:
        """Batch -> interactive lane: the last sequence left in the batch drafts
        again. Its KV cache comes out of the batch (holding every token it has,
        the last one included); rewound by one, that last token is the input of
        its first round, as at any round boundary."""
        if self.drafting is None or self._draft is None or self._waiting or len(self._batch_uid) != 1:
            return
        ((uid, buid),) = self._batch_uid.items()
        track = self._tracks[uid]
        if track.batch_tokens == 0 or track.left < 2 or any(r[0] == uid and r[2] for r in results):
            return  # still prefilling in the batch, or about to end
        # The draft must first catch up on what it has not seen (all of it, for a
        # sequence that never drafted): worth it only with enough left to decode.
        catch_up = len(track.history) - (held(track.draft_cache) if track.draft_cache else 0)
        if catch_up > CATCH_UP_PER_TOKEN_LEFT * track.left:
            return
        if not self.drafting.use_draft(track.forced, time.monotonic()):
            return
        from mlx_lm.models.cache import trim_prompt_cache

        cache, _ = self._gen.remove([buid], return_prompt_caches=True)[buid]
        del self._batch_uid[uid]
        del self._our_uid[buid]
        self._prompt_done(buid)
        if held(cache) != len(track.history):
            raise RuntimeError(f"the batch's cache holds {held(cache)} tokens; the sequence has {len(track.history)}")
        trim_prompt_cache(cache, 1)
        self._solo = (uid, self._lone_lane(track, cache))
        if isinstance(self._solo[1], SpeculativeSequence):
            self.drafting.switched("speculative")

    def detokenizer(self) -> Detokenizer:
        detok: Detokenizer = self.tokenizer.detokenizer
        return detok

    def logit_passes(self, prompts: list[list[int]], token_ids: list[int]) -> LogitPasses:
        """The logits of `token_ids` at each prompt's last position, no cache kept,
        one model pass per step of the generator (the engine runs its decode steps
        between them); the generator's return value is the logits, by prompt.
        Short prompts go in passes of similar length, right-padded (a causal model's
        real positions never see the padding after them); a longer one is prefilled
        in chunks through a cache of its own, then its last token alone, so no pass
        holds more than LOGITS_PASS_TOKENS rows of vocabulary-wide logits. A pass's
        time counts as prefill."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        out: dict[int, list[float]] = {}
        picks = mx.array(token_ids)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        short = [i for i in order if len(prompts[i]) <= LOGITS_PASS_TOKENS]
        while short:
            take = 1
            while take < len(short) and len(prompts[short[take]]) * (take + 1) <= LOGITS_PASS_TOKENS:
                take += 1
            rows, short = short[:take], short[take:]
            started = time.perf_counter()
            width = len(prompts[rows[-1]])
            ids = mx.array([prompts[i] + [prompts[i][-1]] * (width - len(prompts[i])) for i in rows])
            last = self._model(ids)[mx.arange(len(rows)), mx.array([len(prompts[i]) - 1 for i in rows])]
            for i, values in zip(rows, cast("list[list[float]]", last[:, picks].astype(mx.float32).tolist())):
                out[i] = values
            self.times.prefill += time.perf_counter() - started
            yield
        for i in (i for i in order if len(prompts[i]) > LOGITS_PASS_TOKENS):
            cache = make_prompt_cache(self._model)
            head = prompts[i][:-1]
            for start in range(0, len(head), LOGITS_PASS_TOKENS):
                started = time.perf_counter()
                # Only the cache is evaluated: the chunk's logits are never computed.
                self._model(mx.array(head[start : start + LOGITS_PASS_TOKENS])[None], cache=cache)
                mx.eval([c.state for c in cache])
                self.times.prefill += time.perf_counter() - started
                yield
            started = time.perf_counter()
            last = self._model(mx.array(prompts[i][-1:])[None], cache=cache)[0, -1]
            out[i] = cast("list[float]", last[picks].astype(mx.float32).tolist())
            self.times.prefill += time.perf_counter() - started
            yield
        return [out[i] for i in range(len(prompts))]

    def speculative_status(self) -> SpecStatus | None:
        return None if self.drafting is None else self.drafting.status()

    def model_facts(self) -> ModelFacts:
        """The family, the cache layers this worker builds for it, and what is off
        or limited for it, with the reason (reported in Ready)."""
        cfg = _config(self._model_path)
        text_cfg = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
        cache = self._kv.make(self._model)
        limits: list[FeatureLimit] = []
        if self.drafting is not None and not self.drafting.active and self._draft is None:
            limits.append({"feature": "speculative", "reason": self.drafting.reason})
        stuck = rewind_problem(cache)
        if self._prompt_cache_bytes > 0 and stuck:
            limits.append(
                {
                    "feature": "prefix_cache",
                    "reason": f"only whole cached sequences are reused, not a shorter shared prefix: {stuck}",
                }
            )
        if self._prompt_cache_bytes > 0 and self._kv.max_kv_size is not None:
            limits.append(
                {
                    "feature": "prefix_cache",
                    "reason": f"sequences past max_kv_size ({self._kv.max_kv_size}) are not kept: a rotated cache "
                    "would answer differently from a plain run",
                }
            )
        if self._kv.quantized:
            from mlx_lm.models.cache import KVCache, QuantizedKVCache

            def quantizable(layer: object) -> bool:  # quantized now, or once long enough
                return type(layer) is KVCache or isinstance(layer, QuantizedKVCache)

            plain = [layer for layer in cache if quantizable(layer)]
            if len(plain) < len(cache):
                others = ", ".join(kinds([layer for layer in cache if not quantizable(layer)]))
                limits.append(
                    {
                        "feature": "kv_bits",
                        "reason": f"kv_bits quantizes {len(plain)} of {len(cache)} cache layers; the others "
                        f"({others}) stay at full precision",
                    }
                )
        return {
            "family": str(text_cfg.get("model_type") or cfg.get("model_type") or "unknown"),
            "cache_kinds": kinds(cache),
            "limits": limits,
        }


def _sharded_load(model_path: str, group: Lockstep) -> tuple[Model, TokenizerWrapper]:
    """This rank's part of the model, split by mlx-lm's own shard() (tensor) or
    pipeline() (layers), refused with the reason where it would not split."""
    from pathlib import Path

    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer, sharded_load

    from ..errors import UnservableModel
    from .lockstep import check_shardable

    config = _config(model_path)
    check_shardable(config, group.parallel, group.size)
    if group.parallel == "tensor":
        model, tokenizer = sharded_load(
            model_path,
            tensor_group=group.group,
            tokenizer_config={"trust_remote_code": False},
            trust_remote_code=False,
        )
    else:
        # sharded_load's pipeline path reads only the shard files a rank needs,
        # from the checkpoint's index; a local model has them all: loaded lazily,
        # a rank evaluates only its own layers' weights.
        model, _ = load_model(Path(model_path), lazy=True)
        pipeline = getattr(getattr(model, "model", None), "pipeline", None)
        if pipeline is None:
            raise UnservableModel(f"mlx-lm cannot split {config.get('model_type')} models into a pipeline")
        pipeline(group.group)
        mx.eval(model.parameters())
        tokenizer = load_tokenizer(
            Path(model_path), {"trust_remote_code": False}, eos_token_ids=config.get("eos_token_id")
        )
    tokenizer.model_max_length = sys.maxsize  # as in _load
    return cast(Model, model), tokenizer


def _load(model_path: str) -> tuple[Model, TokenizerWrapper]:
    import mlx_lm

    # Model files are untrusted: never run code shipped with them.
    loaded = mlx_lm.load(model_path, trust_remote_code=False, tokenizer_config={"trust_remote_code": False})
    tokenizer = loaded[1]
    # The model's context bounds a prompt (the daemon's context_length); the
    # tokenizer's model_max_length is advisory, often smaller (8192 for SmolLM2's),
    # and transformers would warn of "indexing errors" on every longer prompt.
    tokenizer.model_max_length = sys.maxsize
    return cast(Model, loaded[0]), tokenizer
