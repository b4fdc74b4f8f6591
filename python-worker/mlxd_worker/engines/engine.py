"""The scheduler: one thread owns the backend (and MLX), admits requests into the
running batch at any step, and flushes the tokens of each step as one TokenBatch.

The reader thread enqueues frames (Load, Generate, Cancel) on the inbox in order,
planning each Generate on the way (requests/plan.py: its prompt's tokens, tool
format, constraint, logprobs; a count_only request is answered right there); the
engine drains the inbox between steps.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import queue
import threading
import time
from collections import abc, deque
from dataclasses import dataclass, field
from typing import Callable, Union

from ..errors import ContextOverflow, RequestError  # the client's fault: _report sends its code
from ..faults import GARBAGE_KIND, Faults
from ..io import frames
from ..io.flush import FlushPolicy
from ..io.protocol import (
    BATCH_SIZE_BOUNDS,
    AdmittedFrame,
    Done,
    Embed,
    EmbeddingsFrame,
    ErrorFrame,
    Generate,
    Load,
    LogprobsFrame,
    Ready,
    Stats,
    StepStats,
    TokenLogprob,
    ToolCallFrame,
)
from ..io.transport import Transport
from ..lanes.pacing import MIN_OBSERVED
from ..requests.constraint import SequenceConstraint
from ..requests.logprobs import TokenTexts, logprob_entry
from ..requests.plan import Planner, Prompt, RequestPlan
from ..requests.reasoning import ReasoningText, ReasoningTracker, detect
from ..requests.rerank import RerankPlan, judge_prompt, verdict_tokens
from ..requests.sampling import SamplerCache
from ..requests.stops import StopMatcher
from ..requests.tool_stream import ToolCallExtractor
from ..requests.tools import ToolCall, new_call_id
from ..stats import footprint_bytes
from . import sizing
from .backend import Backend, Detokenizer, LogitPasses, MlxBackend, ModelTimes, RowOptions
from .kv_budget import KvBudget, KvShape, mib
from .lockstep import STOP, Lockstep

log = logging.getLogger("mlxd_worker")

# Tokens each lone lane decodes when auto mode measures plain against drafted.
CALIBRATION_TOKENS = 16
# The warm-up prompt's length on the CPU (see Engine._warm_up): its prefill chunk
# (all but the last token) is long enough for the pacer to measure, so a worker's
# first long prompt is chunked by this machine's rate.
CPU_WARM_UP_TOKENS = MIN_OBSERVED + 4
# An idle engine still beats this often: while the reader thread plans a request
# (a chat template over 100,000 messages takes seconds), the daemon already counts
# it in flight and would take a silent worker for a hung one.
IDLE_BEAT_S = 0.5

# A token that completes no tool call (shared: plain sequences allocate nothing).
NO_CALLS: tuple[ToolCall, ...] = ()

# An entry's token field with this bit set carries thinking text (frame.rs
# REASONING_FLAG: token ids stay far below it).
REASONING_FLAG = 1 << 31

# An idle engine woken by a request while the reader thread is already planning
# the next one (a burst: many clients at once) waits up to this long for the
# rest (longer where the burst's prefill is slow: GATHER_FRACTION), so that they
# prefill together in the batch's first steps instead of the first running alone
# and the others joining it one step at a time.
GATHER_S = 0.05
# ... and, between two frames of a burst (the reader is not planning while it waits
# for the next), for the next one to arrive this soon after the last.
GATHER_GAP_S = 0.004
# A request that wakes an idle engine alone waits for company for this fraction of
# what starting it alone is expected to take (its uncached prompt tokens at the pace
# of earlier lone starts), at most GATHER_PATIENCE_S; between frames of a burst the
# gap allowed is at least as long, and the whole gather may take this fraction of
# the gathered prompts' expected prefill where that exceeds GATHER_S (never more
# than GATHER_MAX_S). A request that arrives just after a lone start
# waits for that whole start (on this 2-core CPU ~0.4 s for a short prompt, where
# the next frame of a burst comes 3 to 10 ms later); on a GPU a short prompt starts
# in ~15 ms, and the wait is under a millisecond.
GATHER_FRACTION = 0.05
GATHER_PATIENCE_S = 0.02
GATHER_MAX_S = 0.5
# Lone starts with fewer uncached tokens than this do not set the pace (a step's
# fixed cost over a few tokens overstates the cost per token).
GATHER_PACE_MIN_TOKENS = 16

# How MLX words a failed allocation (Metal, CUDA, the C++ allocator): a step that
# raises one of these fails its sequences, and the worker serves on.
OUT_OF_MEMORY_MARKS = ("out of memory", "unable to allocate", "[metal::malloc]", "cudamalloc", "bad_alloc")


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(mark in str(e).lower() for mark in OUT_OF_MEMORY_MARKS)


@dataclass
class Counters:
    """What Stats frames report about the request flow."""

    active: int = 0
    queued: int = 0
    completed: int = 0
    cancelled: int = 0
    steps: int = 0
    step_tokens: int = 0
    frames: int = 0
    # Where the engine's time went while sequences were in flight, and its steps
    # by batch size (StepStats).
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    host_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=lambda: [0] * (len(BATCH_SIZE_BOUNDS) + 1))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stepped(self, sequences: int, tokens: int) -> None:
        """One step ran: it advanced `sequences` sequences by `tokens` tokens."""
        with self.lock:
            self.steps += 1
            self.step_tokens += tokens
            self.batch_sizes[bisect.bisect_left(BATCH_SIZE_BOUNDS, sequences)] += 1

    def timed(self, busy: float, model: ModelTimes, before: ModelTimes) -> None:
        """An engine iteration took `busy` seconds; the model's passes went from
        `before` to `model` meanwhile (the rest was the engine's own work)."""
        prefill, decode = model.prefill - before.prefill, model.decode - before.decode
        with self.lock:
            self.prefill_seconds += prefill
            self.decode_seconds += decode
            self.host_seconds += max(0.0, busy - prefill - decode)

    def snapshot(self) -> Stats:
        """The Stats frame's request-flow counters (the rest is the stats loop's)."""
        with self.lock:
            steps: StepStats = {
                "prefill_seconds_total": self.prefill_seconds,
                "decode_seconds_total": self.decode_seconds,
                "host_seconds_total": self.host_seconds,
                "batch_size_steps": list(self.batch_sizes),
            }
            return {
                "steps": steps,
                "active_sequences": self.active,
                "queued_sequences": self.queued,
                "completed_total": self.completed,
                "cancelled_total": self.cancelled,
                "batch_steps_total": self.steps,
                "batch_tokens_total": self.step_tokens,
                "token_frames_total": self.frames,
            }


@dataclass
class Sequence:
    rid: int
    uid: int
    detok: Detokenizer
    stops: StopMatcher
    prompt_tokens: int
    started: float
    completion_tokens: int = 0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    ended: bool = False
    # Any of tool calls, a constraint or logprobs: the one check plain sequences pay.
    extras: bool = False
    tools: ToolCallExtractor | None = None
    calls: int = 0  # tool calls sent
    # Text that followed a tool call inside one token: it goes out with the next.
    deferred: str = ""
    constraint: SequenceConstraint | None = None
    top_logprobs: int | None = None
    # A model that thinks: its text split into thinking and answer, and its
    # thinking tokens counted.
    thinking: ReasoningText | None = None
    tracker: ReasoningTracker | None = None
    # Its way to the first token, for the debug log (see Engine._log_first_token).
    timeline: Timeline | None = None
    # Prompt tokens not taken from the prefix cache.
    prefill_tokens: int = 0
    # It woke the engine and started alone (its first token paces GATHER_FRACTION).
    lone_start: bool = False


@dataclass
class Timeline:
    """When a request reached the worker and was planned (perf_counter seconds),
    and the engine's step count at its admission (its time: Sequence.started)."""

    received: float
    planned: float
    admitted_step: int = 0


@dataclass
class Planned:
    """A Generate as the reader thread hands it to the engine: the request and
    what it asks of the engine."""

    req: Generate
    plan: RequestPlan
    timeline: Timeline | None = None
    # The frame as it came (a distributed group's followers plan it themselves).
    payload: bytes = b""


@dataclass
class Admission:
    """A planned request checked against the context, with the tokens it may
    reach (prompt + max_tokens, its KV reservation)."""

    planned: Planned
    max_tokens: int
    tokens: int
    since: float


@dataclass
class Rerank:
    """A rerank the engine runs: its plan and its model passes (Backend.logit_passes)."""

    plan: RerankPlan
    passes: LogitPasses


# The inbox: (kind, payload) as the frame came, a planned Generate or rerank, or None to stop.
InboxItem = Union[tuple[int, bytes], tuple[int, Planned], tuple[int, RerankPlan], None]


def _raw_frame(item: InboxItem) -> tuple[int, bytes]:
    """An inbox item as the frame it came in (lockstep.STOP for the inbox's end)."""
    if item is None:
        return (STOP, b"")
    kind, body = item
    if isinstance(body, Planned):
        return (kind, body.payload)
    if isinstance(body, RerankPlan):
        raise RuntimeError("a distributed model does not rerank")  # refused at load
    return (kind, body)


def make_backend(engine: str) -> Backend:
    if engine == "replay":
        from .replay import ReplayBackend

        return ReplayBackend()
    if engine == "vision":
        from .vision import VisionBackend

        return VisionBackend()
    return MlxBackend()


def report_error(transport: Transport, rid: int | None, e: Exception) -> None:
    """A worker error (about request `rid`, or the model's load: None) must reach
    the daemon, not kill us. A client's mistake is one line; ours has its traceback."""
    if isinstance(e, RequestError):
        log.warning("request %s refused: %s", rid, e)
    else:
        log.exception("engine error")
    code = e.code if isinstance(e, RequestError) else "worker"
    error: ErrorFrame = {"id": rid, "message": str(e), "code": code}
    transport.send(frames.ERROR, frames.json_payload(error))


def run_load(transport: Transport, load: Callable[[Load], None], payload: bytes) -> None:
    """Runs a Load frame: a failure is reported (the daemon says why the model did
    not load) and raised (the engine cannot serve; the worker exits)."""
    try:
        load(frames.decode_load(payload))
    except Exception as e:
        report_error(transport, None, e)
        raise


def send_scores(transport: Transport, rid: int, scores: list[float], prompt_tokens: int) -> None:
    """A rerank's answer: each document's relevance, in order."""
    frame: EmbeddingsFrame = {"id": rid, "vectors": [], "scores": scores, "prompt_tokens": prompt_tokens}
    transport.send(frames.EMBEDDINGS, frames.json_payload(frame))


class Engine:
    def __init__(self, transport: Transport, backend: Backend) -> None:
        self.transport = transport
        self.backend = backend
        self.inbox: queue.Queue[InboxItem] = queue.Queue()
        self.counters = Counters()
        self.flush_policy = FlushPolicy()
        self._samplers = SamplerCache()
        self._by_uid: dict[int, Sequence] = {}
        self._by_rid: dict[int, Sequence] = {}
        self._pending: list[tuple[int, int, str]] = []
        self._pending_since = 0.0
        # Logprobs entries per request, sent just before the TokenBatch that
        # carries their tokens.
        self._pending_logprobs: dict[int, list[TokenLogprob]] = {}
        self._planner: Planner | None = None  # once a model is loaded
        self._token_texts: TokenTexts | None = None
        self._running = True
        # The preset's [rerank] instruction (this chat model also reranks), from Load.
        self._rerank_instruction: str | None = None
        # Reranks in progress, first come first served: one model pass per loop
        # iteration, between decode steps.
        self._reranks: deque[Rerank] = deque()
        self.faults = Faults()
        # Advanced on every loop iteration (one decode step or prefill chunk): the
        # daemon's hang detector watches it while requests are in flight.
        self.heartbeat = 0
        # Set when the engine can no longer serve; the process exits right after.
        self.failed = False
        # KV accounting against the worker's share of the budget, and the
        # requests waiting (in arrival order) for KV memory to free up.
        self.kv = KvBudget()
        self.waiting_for_memory: deque[Admission] = deque()
        # Set while the reader thread plans a Generate (see GATHER_S).
        self.planning = False
        # When a blocking wait for the inbox last returned an item.
        self._woke_at = 0.0
        # Seconds per uncached prompt token that the last request started alone
        # took to its first token (0: none yet); see GATHER_FRACTION.
        self._lone_start_pace = 0.0
        # This process's place in a distributed group (None: the model is all here).
        self.lockstep: Lockstep | None = None

    # -- called from the reader thread -------------------------------------
    def submit(self, kind: int, payload: bytes) -> None:
        """A Generate's chat template, tokenization and grammar run here, on the
        reader thread, so that this CPU work overlaps the engine's model steps
        instead of stalling the batch (MLX releases the GIL while it computes)."""
        if kind == frames.EMBED:
            embed = frames.decode_embed(payload)
            try:
                plan = self._plan_rerank(embed)
            except Exception as e:
                report_error(self.transport, embed.get("id"), e)
                return
            with self.counters.lock:
                self.counters.queued += 1
            self.inbox.put((kind, plan))
            return
        if kind != frames.GENERATE:
            self.inbox.put((kind, payload))
            return
        # Cleared only once the request is in the inbox. (Between two frames the
        # reader is not planning: a burst whose next frame has not reached the
        # worker yet ends the gather.)
        self.planning = True
        received = time.perf_counter()
        try:
            req, images = frames.decode_generate(payload)
            if req.get("count_only"):
                try:
                    self._count(req, images)
                except Exception as e:  # an image it cannot take, like a Generate's
                    self._report(req.get("id"), e)
                return
            try:
                timeline = Timeline(received, time.perf_counter())
                planned = Planned(req, self._plan(req, images), timeline, payload)
            except Exception as e:
                self._report(req.get("id"), e)
                return
            with self.counters.lock:
                self.counters.queued += 1
            self.inbox.put((kind, planned))
        finally:
            self.planning = False

    def _plan_rerank(self, req: Embed) -> RerankPlan:
        """A rerank by this chat model (its preset's `[rerank]`); anything else an
        Embed asks of a generating model is refused."""
        query = req.get("query")
        if self._rerank_instruction is None or query is None:
            raise RequestError("this worker serves a generating model: it has no embeddings")
        if req.get("tokens"):
            raise RequestError("rerank documents are texts, not token ids")
        tok = self.backend.tokenizer
        prompts = [judge_prompt(tok, self._rerank_instruction, query, d) for d in req.get("texts") or []]
        limit = self.backend.context_length
        for i, p in enumerate(prompts):
            if limit and len(p) > limit:
                raise ContextOverflow(f"document {i} makes a prompt of {len(p)} tokens, past the model's {limit}")
        return RerankPlan(req["id"], prompts)

    def stop(self) -> None:
        self.inbox.put(None)

    def stats(self) -> Stats:
        """The Stats frame's engine part (the stats loop adds memory figures)."""
        stats: Stats = {
            "heartbeat": self.heartbeat,
            "engine_failed": self.failed,
            "speculative": self.backend.speculative_status(),
            "prompt_cache": self.backend.prompt_cache_stats(),
            **self.counters.snapshot(),
        }
        if self.kv.shape is not None:
            stats["kv"] = self.kv.stats(self.kv_in_use(), len(self.waiting_for_memory))
        return stats

    # -- the engine thread ---------------------------------------------------
    def run(self) -> None:
        try:
            while self._running:
                self._beat()
                started = time.perf_counter()
                idle = not self._by_uid and not self.waiting_for_memory and not self._reranks
                if self.lockstep is not None:
                    started = self._take_in_lockstep(self.lockstep, idle, started)
                    if not self._running:
                        break
                else:
                    self._drain_inbox(block=idle)
                if idle and self.lockstep is None:  # waiting for work is not the engine's time; admitting it is
                    started = self._woke_at
                    if self._by_uid:
                        started += self._gather()
                if self.waiting_for_memory:
                    self._admit_waiting()
                if self._by_uid or self._reranks:
                    times = self.backend.times
                    before = ModelTimes(times.prefill, times.decode)
                    if self._reranks:
                        self._rerank_pass()
                    if self._by_uid:
                        self._step()
                    self.counters.timed(time.perf_counter() - started, times, before)
            self.backend.close()
        except BaseException as e:  # noqa: BLE001 - whatever it was, we cannot serve
            self._die(e)

    def _beat(self) -> None:
        self.heartbeat += 1
        self.transport.beat()

    def _die(self, e: BaseException) -> None:
        """The engine failed in a way that leaves its state unknown (an exception in
        a decode step, or a failed load): the sequences that already streamed tokens
        get an Error frame with the cause, then the process exits non-zero. Sequences
        that produced nothing yet get no frame: the daemon hands them to the next
        incarnation. In a distributed group the daemon says why instead: an
        exception here is most often a collective that failed because another rank
        died, and the daemon knows which rank and how."""
        self.failed = True
        log.error("engine failed: %r; exiting", e, exc_info=e)
        try:
            self._flush()
            for seq in list(self._by_rid.values()) if self.lockstep is None else []:
                if seq.first_token_at:
                    error: ErrorFrame = {
                        "id": seq.rid,
                        "message": f"the worker's engine failed: {type(e).__name__}: {e}",
                        "code": "worker",
                    }
                    self.transport.send(frames.ERROR, frames.json_payload(error))
        finally:
            os._exit(70)  # EX_SOFTWARE

    def _drain_inbox(self, block: bool) -> None:
        if block:
            self._flush()
        while True:
            try:
                item = self.inbox.get(block=block, timeout=IDLE_BEAT_S if block else None)
            except queue.Empty:
                return  # (the caller beats, then waits again)
            if block:
                self._woke_at = time.perf_counter()
            block = False
            if item is None:
                self._running = False
                return
            self._handle(*item)

    def _take_in_lockstep(self, lockstep: Lockstep, idle: bool, started: float) -> float:
        """One iteration's frames in a distributed group: rank 0 takes them from its
        inbox (an idle one waits at most IDLE_BEAT_S, so the group meets at least
        that often) and shares them raw; every rank handles the same frames in the
        same order. Returns when the engine's time for the iteration began."""
        taken: list[InboxItem] = []
        if lockstep.leader:
            if idle:
                self._flush()
                try:
                    taken.append(self.inbox.get(timeout=IDLE_BEAT_S))
                    started = time.perf_counter()
                except queue.Empty:
                    pass
                # A burst from idle: those the reader is planning now start together.
                while self.planning and time.perf_counter() - started < GATHER_S:
                    try:
                        taken.append(self.inbox.get(timeout=0.002))
                    except queue.Empty:
                        continue
            while True:
                try:
                    taken.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
        frames_in = lockstep.share_frames([_raw_frame(item) for item in taken])
        for i, (kind, payload) in enumerate(frames_in):
            if kind == STOP:
                self._running = False
                return started
            item = taken[i] if lockstep.leader else self._follow(kind, payload)
            if item is not None:
                self._handle(*item)
        return started

    def _follow(self, kind: int, payload: bytes) -> InboxItem:
        """A follower's inbox item for a frame rank 0 handled: a Generate planned
        here as rank 0 planned it (the same tokenizer, template and grammar)."""
        if kind != frames.GENERATE:
            return (kind, payload)
        req, images = frames.decode_generate(payload)
        return (kind, Planned(req, self._plan(req, images), None, payload))

    def _gather(self) -> float:
        """The first request after idleness: while the reader thread is planning
        more (a burst), or, once two have come, while the next follows the last
        within GATHER_GAP_S, they are admitted before the first step, up to
        GATHER_S. A lone request waits for a second only where starting alone is
        slow, and a slow burst start may gather for longer (GATHER_FRACTION).
        Returns the seconds spent waiting.
        (On an H100, c=64 went from 0.77x to 0.94x of BatchGenerator given the
        whole burst: requests reaching the worker a few ms apart joined the batch
        in waves, and the first ones finished alone.)"""
        began = time.perf_counter()
        waited = 0.0
        last = began
        patience = max((self._patience(seq) for seq in self._by_uid.values()), default=0.0)
        gap = max(GATHER_GAP_S, patience)

        def window_left() -> float:
            """How much longer the burst's next frame is waited for (the planning
            flag is polled every 2 ms)."""
            window = (gap if len(self._by_uid) > 1 else patience) - (time.perf_counter() - last)
            return max(min(window, 0.002), 0.002 if self.planning else 0.0)

        def bound() -> float:
            burst = sum(seq.prefill_tokens for seq in self._by_uid.values())
            return min(GATHER_MAX_S, max(GATHER_S, self._gather_share(burst)))

        while self._running and (window := window_left()) > 0:
            left = began + bound() - time.perf_counter()
            if left <= 0:
                break
            wait_started = time.perf_counter()
            try:
                item = self.inbox.get(timeout=min(left, window))
            except queue.Empty:
                continue
            finally:
                waited += time.perf_counter() - wait_started
            last = time.perf_counter()
            if item is None:
                self._running = False
                break
            self._handle(*item)
            self._drain_inbox(block=False)
        if len(self._by_uid) == 1:
            (seq,) = self._by_uid.values()
            seq.lone_start = True
        return waited

    def _patience(self, seq: Sequence) -> float:
        """How long a request that woke the engine alone waits for company."""
        return min(GATHER_PATIENCE_S, self._gather_share(seq.prefill_tokens))

    def _gather_share(self, tokens: int) -> float:
        """GATHER_FRACTION of what prefilling `tokens` uncached tokens is expected to
        take, at the pace of the last lone start (0 before one was measured)."""
        return GATHER_FRACTION * self._lone_start_pace * tokens

    def _handle(self, kind: int, item: bytes | Planned | RerankPlan) -> None:
        if isinstance(item, RerankPlan):
            self._start_rerank(item)
            return
        if isinstance(item, Planned):  # a Generate
            try:
                self._admit(item)
            except Exception as e:
                self._report(item.req.get("id"), e)
            return
        if kind == frames.CANCEL:
            self._cancel(frames.decode_cancel(item))
            return
        if kind == frames.MEMORY_LIMIT:
            # Another model loaded or left: this worker's share changed.
            import mlx.core as mx

            limit = frames.decode_memory_limit(item)["memory_limit"]
            mx.set_memory_limit(limit)
            self.kv.limit = limit
            log.info("memory share now %s (KV capacity %s)", mib(limit), mib(self.kv.capacity or 0))
            return
        if kind == frames.CLEAR_CACHE:
            # The daemon is short of memory: hand MLX's buffer cache back (on the
            # engine thread, which owns MLX); sequences in flight carry on.
            import mlx.core as mx

            before = mx.get_cache_memory()
            mx.clear_cache()
            log.info("cleared MLX's cache (%d MiB) at the daemon's request", before >> 20)
            return
        if kind == frames.LOAD:
            run_load(self.transport, self._load, item)

    def _report(self, rid: int | None, e: Exception) -> None:
        report_error(self.transport, rid, e)

    def _start_rerank(self, plan: RerankPlan) -> None:
        with self.counters.lock:
            self.counters.queued -= 1
        try:
            yes, no = verdict_tokens(self.backend.tokenizer)
            passes = self.backend.logit_passes(plan.prompts, [yes, no])
        except Exception as e:
            self._report(plan.rid, e)
            return
        with self.counters.lock:
            self.counters.active += 1
        self._reranks.append(Rerank(plan, passes))

    def _rerank_pass(self) -> None:
        """The first rerank's next model pass; its scores once the last is done.
        A decode step follows, so the batch waits one pass, not a whole rerank. (The
        pass's time, booked as prefill, includes finishing the step before it, which
        MLX may still be computing.)"""
        rerank = self._reranks[0]
        try:
            next(rerank.passes)
            return
        except StopIteration as done:
            logits: list[list[float]] = done.value
        except Exception as e:  # a pass MLX refused (memory): this request fails, the rest go on
            self._reranks.popleft()
            self._report(rerank.plan.rid, e)
            with self.counters.lock:
                self.counters.active -= 1
            return
        self._reranks.popleft()
        # "yes"'s share of the two, as a logistic of their difference (no overflow).
        scores = [0.5 * (1.0 + math.tanh((y - n) / 2.0)) for y, n in logits]
        with self.counters.lock:
            self.counters.active -= 1
        if not all(math.isfinite(x) for x in scores):
            self._report(rerank.plan.rid, RuntimeError("the model's verdict logits are not finite numbers"))
            return
        send_scores(self.transport, rerank.plan.rid, scores, sum(len(p) for p in rerank.plan.prompts))
        with self.counters.lock:
            self.counters.completed += 1

    def _cancel_rerank(self, rid: int) -> bool:
        for rerank in self._reranks:
            if rerank.plan.rid == rid:
                self._reranks.remove(rerank)
                rerank.passes.close()
                with self.counters.lock:
                    self.counters.active -= 1
                    self.counters.cancelled += 1
                return True
        return False

    def _load(self, req: Load) -> None:
        t0 = time.perf_counter()
        options = req.get("options") or {}
        self.flush_policy = FlushPolicy.from_options(options)
        self.faults = Faults.from_options(options)
        limit = options.get("memory_limit")
        # (What a group does not serve yet, the daemon refused with the preset.)
        self.backend.group = self.lockstep
        # A group's ranks admit alike only without a KV budget: each would measure
        # its own memory (the daemon's budget still admitted the load).
        kv_limit = int(limit) if limit and self.lockstep is None else None
        self.kv = KvBudget(KvShape.from_options(options), kv_limit)
        if limit:
            # This worker's share of the daemon's budget: MLX frees its cache and
            # then fails an allocation past it instead of pushing the machine to swap.
            import mlx.core as mx

            mx.set_memory_limit(int(limit))
            log.info("MLX memory limit %d MiB", int(limit) >> 20)
        self.faults.in_load()
        self._rerank_instruction = options.get("rerank_instruction")
        self.backend.load(req["model_path"], options)
        if self._rerank_instruction is not None:
            verdict_tokens(self.backend.tokenizer)  # a model that cannot say yes or no fails its load
        # The preset's reasoning = "off" leaves thinking in the text, markers and all.
        reasoning = None if options.get("reasoning_inline") else detect(self.backend.tokenizer)
        self._planner = Planner(
            self.backend.tokenizer, self.backend.eos, reasoning, self.backend.snapshots, self.backend.prompts
        )
        self._token_texts = TokenTexts(self.backend.tokenizer)
        self._warm_up()
        self.backend.start_prompt_cache()
        self._measure_baseline()
        ready: Ready = {
            "load_seconds": time.perf_counter() - t0,
            "context_length": self.backend.context_length,
            "speculative": self.backend.speculative_status(),
            "max_batch": self.backend.max_batch,
        }
        facts = self.backend.model_facts()
        if facts is not None:
            if reasoning is not None:
                facts["reasoning"] = reasoning.name
            ready["model"] = facts
        self.transport.send(frames.READY, frames.json_payload(ready))
        log.info("loaded %s in %.1fs (flush %s)", req["model_name"], time.perf_counter() - t0, self.flush_policy)

    def _measure_baseline(self) -> None:
        """What the worker holds with nothing in flight (weights, runtime,
        compiled kernels): the share less this is its KV capacity."""
        import mlx.core as mx

        mx.clear_cache()
        self.kv.weights = self.backend.weights_bytes()
        self.kv.baseline = footprint_bytes()
        self.kv.started = True
        if self.kv.capacity is not None:
            log.info(
                "KV capacity %s of a %s share (weights %s, baseline %s)",
                mib(self.kv.capacity),
                mib(self.kv.limit or 0),
                mib(self.kv.weights),
                mib(self.kv.baseline),
            )

    def kv_in_use(self) -> int:
        """The KV the sequences in flight hold now (from the stats thread)."""
        for _ in range(3):
            try:
                sequences = list(self._by_rid.values())
                break
            except RuntimeError:  # changed by the engine thread meanwhile
                continue
        else:
            return 0
        return self.kv.batch_bytes(s.prompt_tokens + s.completion_tokens for s in sequences)

    def _warm_up(self) -> None:
        """Compile kernels on our time, not on a user's first request: one sequence
        alone, then a second joining it (the lone lane, the handover, the batch,
        and with a draft the way back out of the batch). With a draft, both lone
        lanes run; in auto mode they run once more, measured, so the draft policy
        starts from this machine's own figures for both."""
        ids = self._prompt_ids({"messages": [{"role": "user", "content": "Hi"}]})
        if not sizing.on_gpu():
            # MLX's CPU kernels do not depend on the prompt's length: the template's
            # last tokens compile what all of it would, at a fraction of its prefill
            # (a 4-bit model prefills ~0.1 s per token on two cores).
            ids = ids[-CPU_WARM_UP_TOKENS:]
        # The first one is the longer: with a draft it started drafting, so it
        # leaves the batch to draft again when the second ends.
        live = {self.backend.insert(ids, 8, None)}
        self.backend.step()
        live.add(self.backend.insert(ids, 3, None))
        self._run_to_end(live)
        drafting = self.backend.drafting
        if drafting is None or not drafting.available:
            return
        # Eight drafted tokens: a first round that accepts all three drafts leaves the
        # draft a two-token input, so the second round compiles that shape too.
        for speculative, n in ((False, 4), (True, 8)):
            self._run_to_end({self.backend.insert(ids, n, None, RowOptions(speculative=speculative))})
        if drafting.mode == "auto":
            story = self._prompt_ids({"messages": [{"role": "user", "content": "Tell me a story about a robot."}]})
            for speculative in (False, True):
                row = RowOptions(speculative=speculative)
                self._run_to_end({self.backend.insert(story, CALIBRATION_TOKENS, None, row)})
            log.info("draft policy after calibration: %s", drafting.reason)
        drafting.start_counting()

    def _run_to_end(self, live: set[int]) -> None:
        while live:
            self._beat()  # a load that warms up is making progress
            for uid, _, finish in self.backend.step():
                if finish is not None:
                    live.discard(uid)
                    self.backend.take_counts(uid)

    def _loaded_planner(self) -> Planner:
        if self._planner is None:
            raise RuntimeError("no model loaded yet")
        return self._planner

    def _prompt_ids(self, req: Prompt, images: abc.Sequence[bytes] = ()) -> list[int]:
        return self._loaded_planner().prompt_ids(req, images)

    def _plan(self, req: Generate, images: list[bytes]) -> RequestPlan:
        return self._loaded_planner().plan(req, images)

    def _count(self, req: Generate, images: list[bytes]) -> None:
        """count_only: the prompt's tokens as a generation would see them, at once."""
        done: Done = {
            "id": int(req["id"]),
            "finish_reason": "counted",
            "prompt_tokens": len(self._prompt_ids(req, images)),
            "completion_tokens": 0,
            "prompt_tps": 0.0,
            "generation_tps": 0.0,
        }
        self.transport.send(frames.DONE, frames.json_payload(done))

    def _admit(self, planned: Planned) -> None:
        """Starts a request now, or queues it behind others waiting for KV memory
        (first come, first served), or refuses one that could never run."""
        try:
            admission = self._check(planned)
            wait = bool(self.waiting_for_memory) or not self._room_for(admission.tokens)
        except Exception:
            with self.counters.lock:
                self.counters.queued -= 1
            raise
        if wait:
            if not self.waiting_for_memory:
                log.info(
                    "request %s waits for KV memory: it needs %s, %s are reserved",
                    planned.req.get("id"),
                    mib(self.kv.need(admission.tokens)),
                    mib(self.kv.reserved),
                )
            self.waiting_for_memory.append(admission)
            return
        self._start(admission)

    def _admit_waiting(self) -> None:
        """Starts the requests at the head of the memory queue that fit now (a
        smaller share may have made one impossible: it is refused)."""
        while self.waiting_for_memory:
            head = self.waiting_for_memory[0]
            try:
                self.kv.check_ever_fits(head.tokens)
                if not self._room_for(head.tokens):
                    return
            except Exception as e:
                self.waiting_for_memory.popleft()
                with self.counters.lock:
                    self.counters.queued -= 1
                self._report(head.planned.req.get("id"), e)
                continue
            self.waiting_for_memory.popleft()
            waited = time.perf_counter() - head.since
            log.info("request %s waited %.2fs for KV memory", head.planned.req.get("id"), waited)
            try:
                self._start(head)
            except Exception as e:
                self._report(head.planned.req.get("id"), e)

    def _room_for(self, tokens: int) -> bool:
        """Whether a sequence of `tokens` fits beside the reservations; the prefix
        cache gives back what it must (least recently used first) before anyone
        waits, but only when that makes room."""
        capacity = self.kv.capacity
        if capacity is None:
            return True
        reserved = self.kv.reserved_with(tokens)
        if reserved > capacity:
            return False  # others must finish first: the cache cannot make room
        if reserved + self.backend.prompt_cache_bytes() <= capacity:
            return True
        dropped = self.backend.shrink_prompt_cache(capacity - reserved)
        if dropped:
            self.kv.evicted_for_room_total += dropped
            log.info("dropped %d prefix-cache entries to make room for %s of KV", dropped, mib(self.kv.need(tokens)))
        return reserved + self.backend.prompt_cache_bytes() <= capacity

    def _check(self, planned: Planned) -> Admission:
        """The request against the model's context and the worker's memory:
        raises for one that could never run."""
        ids = planned.plan.prompt_ids
        limit = self.backend.context_length
        if limit and len(ids) >= limit:
            # Anthropic's wording, which Claude Code (and other clients) look for to
            # compact a conversation; the largest prompt leaves one token to generate.
            raise ContextOverflow(
                f"prompt is too long: {len(ids)} tokens > {limit - 1} maximum (the model's context is {limit} "
                "tokens, and at least one must be left to generate)"
            )
        # What does not fit is not asked for: the answer stops at the context's end
        # (finish reason "length"), as vLLM and Ollama do.
        max_tokens = int(planned.req["max_tokens"])
        if limit:
            max_tokens = min(max_tokens, limit - len(ids))
        self.kv.check_ever_fits(len(ids) + max_tokens)
        return Admission(planned, max_tokens, len(ids) + max_tokens, time.perf_counter())

    def _start(self, admission: Admission) -> None:
        planned, max_tokens = admission.planned, admission.max_tokens
        req, plan = planned.req, planned.plan
        rid = int(req["id"])
        with self.counters.lock:
            self.counters.queued -= 1
        ids = plan.prompt_ids
        seed = req.get("seed")
        # What the request leaves out, the model's own defaults decide.
        temperature, top_p = req.get("temperature"), req.get("top_p")
        sampler = self._samplers.get(
            self.backend.sampling.temperature if temperature is None else float(temperature),
            self.backend.sampling.top_p if top_p is None else float(top_p),
            None if seed is None else int(seed),
        )
        # The backend never drafts constrained or logprobs sequences, whatever this says.
        speculative = req.get("speculative")
        row = RowOptions(
            speculative=None if speculative is None else bool(speculative),
            constraint=plan.constraint,
            logprobs=plan.top_logprobs is not None,
            budget=None if plan.reasoning is None else plan.reasoning.budget(),
            boundaries=plan.boundaries,
            vision=plan.vision,
        )
        uid = self.backend.insert(ids, max_tokens, sampler, row)
        # The prompt's size before its prefill (Anthropic's message_start says it).
        cached = self.backend.cached_tokens(uid)
        admitted: AdmittedFrame = {"id": rid, "prompt_tokens": len(ids), "cached_tokens": cached}
        self.transport.send(frames.ADMITTED, frames.json_payload(admitted))
        tools = plan.tool_extractor()
        seq = Sequence(
            rid=rid,
            uid=uid,
            detok=self.backend.detokenizer(),
            stops=StopMatcher(list(req.get("stop") or [])),
            prompt_tokens=len(ids),
            prefill_tokens=len(ids) - cached,
            started=time.perf_counter(),
            extras=tools is not None or plan.constraint is not None or plan.top_logprobs is not None,
            tools=tools,
            constraint=plan.constraint,
            top_logprobs=plan.top_logprobs,
        )
        if plan.reasoning is not None:
            seq.thinking, seq.tracker = plan.reasoning.text(), plan.reasoning.tracker()
        if admission.planned.timeline is not None and log.isEnabledFor(logging.DEBUG):
            seq.timeline = admission.planned.timeline
            seq.timeline.admitted_step = self.counters.steps
        self._by_uid[uid] = seq
        self._by_rid[rid] = seq
        self.kv.reserve(rid, admission.tokens)
        with self.counters.lock:
            self.counters.active += 1

    def _log_first_token(self, seq: Sequence, now: float, rows: int) -> None:
        """Where a request's time to first token went inside the worker: planning
        on the reader thread, waiting for the engine, and the steps until its first
        token (a burst that joins the batch in waves shows here)."""
        t = seq.timeline
        assert t is not None
        log.debug(
            "request %d: planned in %.1f ms, admitted %.1f ms later (after step %d), first token"
            " %.1f ms after that (step %d, %d tokens in it)",
            seq.rid,
            (t.planned - t.received) * 1000,
            (seq.started - t.planned) * 1000,
            t.admitted_step,
            (now - seq.started) * 1000,
            self.counters.steps + 1,
            rows,
        )

    def _cancel(self, rid: int) -> None:
        seq = self._by_rid.get(rid)
        if seq is None:  # a rerank, finished already, waiting for memory, or never admitted
            if not self._cancel_rerank(rid):
                self._cancel_waiting(rid)
            return
        self.backend.remove(seq.uid)
        self._finish(seq, "cancelled")

    def _cancel_waiting(self, rid: int) -> None:
        for admission in self.waiting_for_memory:
            if int(admission.planned.req["id"]) == rid:
                self.waiting_for_memory.remove(admission)
                with self.counters.lock:
                    self.counters.queued -= 1
                    self.counters.cancelled += 1
                done: Done = {
                    "id": rid,
                    "finish_reason": "cancelled",
                    "prompt_tokens": len(admission.planned.plan.prompt_ids),
                    "completion_tokens": 0,
                    "prompt_tps": 0.0,
                    "generation_tps": 0.0,
                }
                self.transport.send(frames.DONE, frames.json_payload(done))
                return

    def _step(self) -> None:
        try:
            self.faults.before_step(self.counters.steps + 1)
            results = self.backend.step()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            self._out_of_memory(e)
            return
        now = time.perf_counter()
        eos = self.backend.eos
        ended: list[tuple[Sequence, str]] = []
        failed: list[tuple[Sequence, str]] = []
        for uid, token, finish in results:
            seq = self._by_uid.get(uid)
            if seq is None or seq.ended:  # a round's tokens after its stop string
                continue
            if seq.constraint is not None and seq.constraint.error is not None:
                if finish is None:
                    self.backend.remove(uid)
                seq.ended = True
                failed.append((seq, seq.constraint.error))
                continue
            if not seq.first_token_at:
                seq.first_token_at = now
                if seq.lone_start and seq.prefill_tokens >= GATHER_PACE_MIN_TOKENS:
                    self._lone_start_pace = (now - seq.started) / seq.prefill_tokens
                if seq.timeline is not None:
                    self._log_first_token(seq, now, len(results))
            seq.last_token_at = now
            if token in eos:
                text = ""
            else:
                seq.completion_tokens += 1
                seq.detok.add_token(token)
                text = seq.detok.last_segment
                if seq.tracker is not None:
                    seq.tracker.feed(int(token))
            if finish is not None:
                seq.detok.finalize()
                text += seq.detok.last_segment
            thought = False
            if seq.thinking is not None:
                # Stop sequences end the answer, not the thinking before it.
                text, thought = self._split_thinking(seq, int(token), text, finish is not None, now)
            text, hit = seq.stops.feed(text)
            if hit:
                if finish is None:
                    self.backend.remove(uid)
                finish = "stop"
            elif finish is not None:
                text += seq.stops.flush()
            calls = NO_CALLS
            if seq.extras:
                text, calls = self._extras(seq, uid, int(token), text, finish is not None, thought and not text)
            if text or (token not in eos and not thought):
                if not self._pending:
                    self._pending_since = now
                self._pending.append((seq.rid, int(token), text))
            if calls:
                self._flush()  # the text before a call precedes it
                self._send_calls(seq, calls)
            if finish is not None:
                seq.ended = True
                ended.append((seq, finish))
        advanced = len({uid for uid, _, _ in results}) if len(results) > 1 else len(results)
        self.counters.stepped(advanced, len(results))
        if self.faults.garbage_due(self.counters.steps):
            self.transport.send(GARBAGE_KIND, b"\xde\xad\xbe\xef")
        if ended or failed:
            self._flush()  # a sequence's tokens precede its Done
            for seq, finish in ended:
                self._finish(seq, finish)
            for seq, message in failed:
                self._fail(seq, message)
        elif self.flush_policy.due(len(self._pending), self._pending_since):
            self._flush()

    def _split_thinking(self, seq: Sequence, token: int, text: str, last: bool, now: float) -> tuple[str, bool]:
        """Sends a token's thinking text as flagged entries; returns its answer
        text (which goes on to tool calls) and whether thinking was sent."""
        assert seq.thinking is not None
        pieces = seq.thinking.feed(text) if text else []
        if last:
            pieces += seq.thinking.finish()
        answer = ""
        thought = False
        for reasoning, piece in pieces:
            if reasoning:
                if not self._pending:
                    self._pending_since = now
                self._pending.append((seq.rid, token | REASONING_FLAG, piece))
                thought = True
            else:
                answer += piece
        return answer, thought

    def _extras(
        self, seq: Sequence, uid: int, token: int, text: str, last: bool, thinking: bool = False
    ) -> tuple[str, tuple[ToolCall, ...]]:
        """A token's logprobs entry (none for a thinking token: logprobs are the
        answer's), and its text split around the tool calls it completes: (the
        text that precedes them, the calls)."""
        if seq.top_logprobs is not None:
            vectors = self.backend.step_logprobs.get(uid)
            if vectors and self._token_texts is not None:
                vector = vectors.pop(0)
                if not thinking:
                    entry = logprob_entry(vector, token, seq.top_logprobs, self._token_texts)
                    self._pending_logprobs.setdefault(seq.rid, []).append(entry)
        if seq.tools is None:
            return text, NO_CALLS
        pieces = seq.tools.feed(text)
        if last:
            pieces += seq.tools.finish()
        before, after = seq.deferred, ""
        calls: list[ToolCall] = []
        for piece in pieces:
            if isinstance(piece, ToolCall):
                calls.append(piece)
            elif calls:
                after += piece
            else:
                before += piece
        if last:
            # No later token to carry the text after a call: it goes first (the
            # one place where text and calls can come out of order).
            seq.deferred = ""
            return before + after, tuple(calls)
        seq.deferred = after
        return before, tuple(calls)

    def _send_calls(self, seq: Sequence, calls: tuple[ToolCall, ...]) -> None:
        for call in calls:
            frame: ToolCallFrame = {
                "id": seq.rid,
                "index": seq.calls,
                "call_id": new_call_id(),
                "name": call.name,
                "arguments": call.arguments,
            }
            self.transport.send(frames.TOOL_CALL, frames.json_payload(frame))
            seq.calls += 1

    def _flush(self) -> None:
        if self._pending_logprobs:
            for rid, entries in self._pending_logprobs.items():
                logprobs: LogprobsFrame = {"id": rid, "entries": entries}
                self.transport.send(frames.LOGPROBS, frames.json_payload(logprobs))
            self._pending_logprobs = {}
        if self._pending:
            self.transport.send_tokens(self._pending)
            self._pending = []
            with self.counters.lock:
                self.counters.frames += 1

    def _forget(self, seq: Sequence, cancelled: bool) -> None:
        del self._by_uid[seq.uid]
        del self._by_rid[seq.rid]
        self.kv.release(seq.rid)
        with self.counters.lock:
            self.counters.active -= 1
            if cancelled:
                self.counters.cancelled += 1
            else:
                self.counters.completed += 1

    def _out_of_memory(self, e: Exception) -> None:
        """A step failed to allocate: every sequence in it needed the memory. They
        end with an out-of-memory error (with the numbers), MLX's buffer cache goes
        back, and the worker serves the next requests on a fresh batch."""
        import mlx.core as mx

        sequences = list(self._by_uid.values())
        with self.counters.lock:
            self.counters.steps += 1  # it ran (and failed): the next one is the next step
        message = (
            f"out of memory: {e} (the worker held {mib(mx.get_active_memory())} of MLX memory, "
            f"{mib(self.kv.limit or 0)} share; {len(sequences)} sequences were in the step)"
        )
        log.error("%s; the worker carries on", message)
        self.backend.drop_all()
        mx.clear_cache()
        for seq in sequences:
            seq.ended = True
            self._fail(seq, message, code="out_of_memory")

    def _fail(self, seq: Sequence, message: str, code: str = "worker") -> None:
        """Ends one request with an error; the others carry on."""
        self._flush()
        self._forget(seq, cancelled=False)
        self.backend.take_counts(seq.uid)
        log.error("request %d failed: %s", seq.rid, message)
        error: ErrorFrame = {"id": seq.rid, "message": message, "code": code}
        self.transport.send(frames.ERROR, frames.json_payload(error))

    def _finish(self, seq: Sequence, finish: str) -> None:
        self._flush()
        self._forget(seq, cancelled=finish == "cancelled")
        if finish == "stop" and seq.calls:
            finish = "tool_calls"
        first, last = seq.first_token_at, seq.last_token_at
        prompt_s = (first - seq.started) if first else 0.0
        gen_s = last - first
        done: Done = {
            "id": seq.rid,
            "finish_reason": finish,
            "prompt_tokens": seq.prompt_tokens,
            "completion_tokens": seq.completion_tokens,
            "prompt_tps": seq.prompt_tokens / prompt_s if prompt_s > 0 else 0.0,
            "generation_tps": (seq.completion_tokens - 1) / gen_s if gen_s > 0 else 0.0,
        }
        cached = self.backend.cached_tokens(seq.uid)
        if cached:
            done["cached_tokens"] = cached
        counts = self.backend.take_counts(seq.uid)
        if counts is not None:
            done["speculative"] = counts
        if seq.stops.matched is not None:
            done["stop_sequence"] = seq.stops.matched
        if seq.tracker is not None and seq.tracker.tokens:
            done["reasoning_tokens"] = seq.tracker.tokens
        self.transport.send(frames.DONE, frames.json_payload(done))
