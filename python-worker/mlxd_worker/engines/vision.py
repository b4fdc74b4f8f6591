"""The backend of a worker serving a vision-language model (`--engine vision`):
mlx-vlm's model and its continuous batch (mlx-vlm's BatchGenerator) behind the
engine's Backend protocol, so scheduling, streaming, stops, tools and cancellation
are the text engine's own.

mlx-vlm has its own model classes, caches and batch (it does not use mlx-lm's):
every row enters the batch as its input embeddings, which this backend computes at
insert with the model's `get_input_embeddings` (the vision tower over the request's
pixel arrays, merged into the token embeddings; text-only rows are embedded the same
way) together with what the family needs beside them (Qwen2-VL's 3-D rotary
positions). The images were decoded and preprocessed on the reader thread
(requests/vision.py).

Prefix reuse: an agent re-sending the same screenshot with a new question reuses
both the image's vision features (the tower's output, memoized by the images'
content hash, computed on the reader thread) and the prompt's KV (mlx-vlm's prefix
cache, salted with the same hash so that the same tokens with other pixels never
match). mlx-vlm 0.7.10 pages a dense model's KV in blocks and never reuses a block
that holds image tokens; its snapshot mode keeps whole prompts and cuts a snapshot
back to where a new prompt parts from it, which is what reuse across questions
needs: this backend runs every model in snapshot mode.

mlx-vlm's batch samples every row with one sampler (greedy here); each row's own
wishes (an output format's or a thinking budget's mask, logprobs, its sampler) are
one logits processor (RowProcessor). Not served for these models: drafting (Ready's
model facts say so; a request's `speculative` is ignored); a format's forced tokens
are fed one per step.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

from ..errors import RequestError
from ..io.protocol import DraftCounts, FeatureLimit, LoadOptions, ModelFacts, PromptCacheStats, SpecStatus
from ..lanes.drafting import DraftController
from ..requests.constraint import LaneProcessor, mask_logits
from ..requests.sampling import Sampler, SamplingDefaults
from ..requests.vision import VisionPrompts
from . import sizing
from .backend import NO_OPTIONS, Detokenizer, LogitPasses, ModelTimes, RowOptions, StepResult

if TYPE_CHECKING:
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from .lockstep import Lockstep

log = logging.getLogger("mlxd_worker")

# Whole-prompt snapshots the prefix cache keeps (least recently used first out),
# within the preset's prompt_cache_bytes.
SNAPSHOTS = 8
# Vision-tower outputs kept (one per image set; one per call for families that
# call the tower more than once per prompt).
FEATURE_SETS = 8


class FeatureMemo:
    """The vision tower's outputs for the last few image sets, by content key. The
    backend sets `key` (`start`) around its `get_input_embeddings` call; each tower
    call in it (wrapped by `memoize_tower`) returns the kept output for that key and
    call number, or keeps the new one. Families that call the tower more than once
    per prompt (local and global views, images and videos) call it in the same
    order for the same inputs, so the n-th call's output is the n-th's again."""

    def __init__(self, size: int = FEATURE_SETS) -> None:
        self.key: int | None = None
        self.hits = 0
        self._calls = 0
        self._size = size
        self._kept: OrderedDict[tuple[int, int], Any] = OrderedDict()

    def start(self, key: int | None) -> None:
        self.key = key
        self._calls = 0

    def run(self, compute: Callable[[], Any]) -> Any:
        if self.key is None:
            return compute()
        key = (self.key, self._calls)
        self._calls += 1
        kept = self._kept.get(key)
        if kept is not None:
            self._kept.move_to_end(key)
            self.hits += 1
            return kept
        out = compute()
        self._kept[key] = out
        while len(self._kept) > self._size:
            self._kept.popitem(last=False)
        return out

    def nbytes(self) -> int:
        from mlx.utils import tree_flatten

        leaves = cast("list[tuple[str, Any]]", tree_flatten(list(self._kept.values())))
        return sum(int(getattr(leaf, "nbytes", 0)) for _, leaf in leaves)

    def clear(self) -> None:
        self._kept.clear()


def memoize_tower(model: Any) -> FeatureMemo | None:
    """Route the model's vision tower through a memo; None for a family whose tower
    has another name (its features are then computed every time)."""
    from mlx.nn.layers.base import Module

    tower = next(
        (
            t
            for name in ("vision_tower", "vision_model", "visual")
            if isinstance(t := getattr(model, name, None), Module)
        ),
        None,
    )
    if tower is None:
        return None
    memo = FeatureMemo()
    base = type(tower)

    def memoized_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return memo.run(lambda: base.__call__(self, *args, **kwargs))

    # A subclass of the tower's own class, set on this instance: every attribute
    # the family's code reads from its tower (patch_embed, dtypes) stays where it was.
    # (mlx-vlm's own `cached_image_features` argument takes features computed
    # apart, which only families with an `encode_image(s)` method can compute:
    # not Qwen2-VL nor Gemma 3.)
    tower.__class__ = type(f"Memoized{base.__name__}", (base,), {"__call__": memoized_call})
    return memo


def snapshot_mode(generator: Any, looked_up: Callable[[int, int], None]) -> None:
    """Put mlx-vlm's prefix cache in snapshot mode (see the module's note) and call
    `looked_up(batch uid, prompt tokens reused)` at each lookup. Reaches into
    mlx-vlm 0.7.10's coordinator: tests/e2e_python/test_vision.py checks a re-ask
    reuses the image's prefix, so an upgrade that moves it fails there."""
    from mlx_vlm.apc_adapters import PrefixCachePlan

    class SnapshotPlan(PrefixCachePlan):
        @property
        def strategy(self) -> str | None:
            return "checkpoint" if self.restorable else None

    generator.apc.plan.__class__ = SnapshotPlan
    generator.apc_mode = generator.apc.legacy_mode
    pick = generator._apc_pick_for

    def recorded(sequence: tuple[Any, ...]) -> Any:
        hit = pick(sequence)
        looked_up(int(sequence[0]), int(hit["prefix_len"]) if hit else 0)
        return hit

    generator._apc_pick_for = recorded


class RowProcessor:
    """What a row asks of its logits inside mlx-vlm's greedy batch, applied in
    mlx-lm's order: its consumers' masks (an output format or forced call, a
    thinking budget), its logprobs kept (after the masks), then its own sampler's
    draw left as the only token for the batch's greedy pick, so each request keeps
    its temperature, top_p and seed. mlx-vlm calls `process_last_token` in decode
    steps (with the token fed last) and the processor itself for the token that
    ends the prefill."""

    def __init__(self, sampler: Sampler | None, lanes: list[LaneProcessor], logprobs: deque[mx.array] | None) -> None:
        self.sampler = sampler
        self.lanes = lanes
        self.logprobs = logprobs

    def process_last_token(self, token: int, logits: mx.array) -> mx.array:
        return self._apply(token, logits)

    def __call__(self, tokens: mx.array | None, logits: mx.array) -> mx.array:
        # The prefill's end: no token was sampled yet (the lanes read none).
        return self._apply(-1, logits)

    def _apply(self, last: int, logits: mx.array) -> mx.array:
        import mlx.core as mx

        for lane in self.lanes:
            lane.advance(last)
        if self.lanes:
            logits = mask_logits([[lane.consumer for lane in self.lanes]], logits)
        if self.logprobs is None and self.sampler is None:
            return logits
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.logprobs is not None:
            self.logprobs.append(logprobs.reshape(-1))
        if self.sampler is None:
            return logits
        token = self.sampler(logprobs)
        keep = mx.arange(logits.shape[-1]) == token.reshape(-1, 1)
        return mx.where(keep, logits, -mx.inf)


@dataclass
class Row:
    """A sequence: its uid in mlx-vlm's batch, its prompt and the tokens handed out
    (the lanes' consumers read them), its logprobs vectors not yet handed out, in
    order, and the prompt tokens its prefix-cache lookup reused."""

    batch_uid: int
    history: list[int]
    logprobs: deque[mx.array] | None = None
    cached: int = 0


class VisionBackend:
    def __init__(self) -> None:
        self.tokenizer = cast("TokenizerWrapper", None)
        self.eos: frozenset[int] = frozenset()
        self.context_length: int | None = None
        self.sampling = SamplingDefaults()
        self.drafting: DraftController | None = None
        self.step_logprobs: dict[int, list[mx.array]] = {}
        self.snapshots = False
        self.times = ModelTimes()
        self.max_batch = 16
        self.prompts: VisionPrompts | None = None
        self.group: Lockstep | None = None  # refused at load: vision runs on one host
        self._model: Any = None
        self._processor: Any = None
        self._gen: Any = None
        self._family = ""
        self._prefill_step = 2048
        self._cache_bytes = 0
        self._disk_asked = False
        self._kv_asked: list[str] = []
        self._apc: Any = None
        self._features: FeatureMemo | None = None
        # By our uid, from insert until the engine takes its counts at its end
        # (usage then reports what its lookup reused).
        self._rows: dict[int, Row] = {}
        # The batch's uid -> ours, while the batch holds the row.
        self._in_batch: dict[int, int] = {}
        self._lookups = {"hit": 0, "miss": 0}
        self._cached_total = 0
        self._next_uid = 0

    def load(self, model_path: str, options: LoadOptions) -> None:
        if self.group is not None:
            from ..errors import UnservableModel

            raise UnservableModel("a vision model is served on one host: a distributed preset cannot take it")
        # Model files come from the directory alone: mlx-vlm's loaders fall back to
        # the Hugging Face hub for a missing file, which a worker never reaches.
        os.environ["HF_HUB_OFFLINE"] = "1"
        from mlx_lm.utils import load_tokenizer
        from mlx_vlm.utils import load

        path = Path(model_path).resolve()
        try:
            self._model, self._processor = load(str(path))
        except FileNotFoundError as e:
            raise RuntimeError(f"{path}: a file the model needs is missing ({e})") from None
        config = self._model.config
        self._family = str(getattr(config, "model_type", ""))
        eos = getattr(config, "eos_token_id", None)
        self.tokenizer = load_tokenizer(path, eos_token_ids=eos if isinstance(eos, list) else None)
        # Every id mlx-vlm's batch stops on (its stopping criteria join the config's
        # and the tokenizer's), so that none is ever sent as text.
        stops = getattr(self._processor.tokenizer, "stopping_criteria", None)
        extra = getattr(stops, "eos_token_ids", None) or []
        self.eos = frozenset(int(t) for t in [*self.tokenizer.eos_token_ids, *extra])
        self.context_length = options.get("context_length")
        self.sampling = SamplingDefaults.of_model(model_path)
        self.max_batch = sizing.max_batch(options, sizing.on_gpu())
        self._prefill_step = options.get("prefill_step", 2048)
        self.prompts = VisionPrompts(self._processor, self._family)
        self._cache_bytes = options.get("prompt_cache_bytes", 0)
        self._disk_asked = self._cache_bytes > 0 and bool(options.get("prompt_cache_dir"))
        # mlx-vlm's batch keeps its own KV: the preset's KV options do not reach it.
        self._kv_asked = [k for k in ("kv_bits", "max_kv_size") if options.get(k) is not None]
        if self._cache_bytes > 0:
            from mlx_vlm.apc import APCManager

            # Snapshot mode uses no block pool (one block), and a snapshot cut back
            # to a block size of one token keeps everything before the parting: a
            # new question right after the image still reuses the image.
            self._apc = APCManager(
                num_blocks=1,
                block_size=1,
                disk=None,
                overrides={"memory_max_gb": self._cache_bytes / 2**30, "checkpoint_entries": SNAPSHOTS},
            )
            self._features = memoize_tower(self._model)
        self._gen = self._new_generator()

    def _new_generator(self) -> Any:
        from mlx_vlm.generate.ar import BatchGenerator

        gen = BatchGenerator(
            self._model.language_model,
            self._processor,
            stop_tokens=set(self.eos),
            completion_batch_size=self.max_batch,
            prefill_batch_size=min(self.max_batch, 8),
            prefill_step_size=self._prefill_step,
            compute_logprobs=False,
            apc_manager=self._apc,
        )
        if gen.apc is not None:
            snapshot_mode(gen, self._looked_up)
        return gen

    def _looked_up(self, batch_uid: int, reused: int) -> None:
        self._lookups["hit" if reused else "miss"] += 1
        self._cached_total += reused
        uid = self._in_batch.get(batch_uid)
        if uid is not None:
            self._rows[uid].cached = reused

    def insert(
        self,
        ids: list[int],
        max_tokens: int,
        sampler: Sampler | None,
        row: RowOptions = NO_OPTIONS,
    ) -> int:
        import mlx.core as mx

        tokens = mx.array([ids])
        arrays = {} if row.vision is None else {k: mx.array(v) for k, v in row.vision.arrays.items()}
        pixels = arrays.pop("pixel_values", None)
        key = 0 if row.vision is None else row.vision.key
        if self._features is not None:
            self._features.start(key or None)
        try:
            features = self._model.get_input_embeddings(tokens, pixels, mask=mx.ones_like(tokens), **arrays)
        finally:
            if self._features is not None:
                self._features.start(None)
        kwargs: dict[str, Any] = {
            name: value
            for name, value in vars(features).items()
            if value is not None and name not in ("attention_mask_4d",)
        }
        if self._apc is not None:
            # The prefix cache's salt: the images' content (0: none). Without it
            # mlx-vlm would hash the whole embedding, which differs with any text.
            kwargs["_apc_semantic_hash"] = key
        track = Row(-1, list(ids), deque() if row.logprobs else None)
        lanes: list[LaneProcessor] = []
        for consumer in (row.constraint, row.budget):
            if consumer is not None:
                consumer.prompt_len = len(ids)
                lanes.append(consumer.processor(track.history))
        wanted = sampler is not None or lanes or track.logprobs is not None
        processors = [[RowProcessor(sampler, lanes, track.logprobs)]] if wanted else None
        (track.batch_uid,) = self._gen.insert([ids], max_tokens, prompt_kwargs=[kwargs], logits_processors=processors)
        uid = self._next_uid
        self._next_uid += 1
        self._in_batch[track.batch_uid] = uid
        self._rows[uid] = track
        return uid

    def remove(self, uid: int) -> None:
        track = self._rows.get(uid)  # kept: the engine reads its counts at the end
        if track is not None and self._in_batch.pop(track.batch_uid, None) is not None:
            self._gen.remove(track.batch_uid)

    def step(self) -> list[StepResult]:
        # mlx-vlm admits waiting prompts only when prefill_batch_size rows are free:
        # asked for as many as are free, a new request joins as soon as one is.
        free = self.max_batch - len(self._gen._generation_batch)
        self._gen.prefill_batch_size = max(1, min(8, free))
        started = time.perf_counter()
        prompt_progress, responses = self._gen.next()
        elapsed = time.perf_counter() - started
        if responses:
            self.times.decode += elapsed
        else:
            self.times.prefill += elapsed
        if self.step_logprobs:
            self.step_logprobs = {}
        out: list[StepResult] = []
        for r in responses:
            uid = self._in_batch.get(r.uid)
            if uid is None:
                continue
            track = self._rows[uid]
            track.history.append(int(r.token))
            if track.logprobs:
                self.step_logprobs[uid] = [track.logprobs.popleft()]
            finish = r.finish_reason
            out.append((uid, int(r.token), None if finish is None else ("length" if finish == "length" else "stop")))
            if finish is not None:
                del self._in_batch[r.uid]
        return out

    def detokenizer(self) -> Detokenizer:
        detok: Detokenizer = self.tokenizer.detokenizer
        return detok

    def logit_passes(self, prompts: list[list[int]], token_ids: list[int]) -> LogitPasses:
        raise RequestError("reranking by a vision model is not served")

    def take_counts(self, uid: int) -> DraftCounts | None:
        self._rows.pop(uid, None)  # the sequence ended
        return None

    def speculative_status(self) -> SpecStatus | None:
        return None

    def model_facts(self) -> ModelFacts:
        limits: list[FeatureLimit] = [{"feature": "speculative", "reason": "not served for vision models yet"}]
        if self._disk_asked:
            limits.append({"feature": "prefix_cache", "reason": "kept in memory only: no disk tier for vision models"})
        for key in self._kv_asked:
            limits.append({"feature": key, "reason": "not applied to vision models (mlx-vlm keeps its own KV cache)"})
        return {"family": self._family, "cache_kinds": [], "limits": limits}

    def cached_tokens(self, uid: int) -> int:
        # Known once the row's prefill looked it up (usage at its end says it).
        track = self._rows.get(uid)
        return 0 if track is None else track.cached

    def start_prompt_cache(self) -> None:
        pass

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        if self._apc is None:
            return None
        return {
            "bytes": self.prompt_cache_bytes(),
            "cached_tokens_total": self._cached_total,
            "entries": len(self._apc._exact_cache),
            "max_bytes": self._cache_bytes,
            # mlx-vlm's lookup says whether it hit, not why it missed.
            "lookups": {
                "hit_continued": self._lookups["hit"],
                "hit_diverged": 0,
                "miss_cold": self._lookups["miss"],
                "miss_diverged": 0,
                "miss_evicted": 0,
                "miss_too_short": 0,
            },
        }

    def weights_bytes(self) -> int:
        from mlx.utils import tree_flatten

        leaves = cast("list[tuple[str, mx.array]]", tree_flatten(self._model.parameters()))
        return sum(int(array.nbytes) for _, array in leaves)

    def prompt_cache_bytes(self) -> int:
        if self._apc is None:
            return 0
        features = 0 if self._features is None else self._features.nbytes()
        return int(self._apc.resident_bytes()) + features

    def shrink_prompt_cache(self, target_bytes: int) -> int:
        """mlx-vlm's cache evicts by its own budget, not to a size asked: past the
        target, all of it goes."""
        held = self.prompt_cache_bytes()
        if held <= target_bytes:
            return 0
        self._apc.clear()
        if self._features is not None:
            self._features.clear()
        return held

    def drop_all(self) -> None:
        self._gen.close()
        # The next batch numbers its rows from 0 again.
        self._in_batch.clear()
        self._rows.clear()
        self._gen = self._new_generator()

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
