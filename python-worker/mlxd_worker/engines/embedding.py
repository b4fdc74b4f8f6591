"""The engine of a worker serving an embedding model (`--engine embedding`).

Requests (Embed frames) are tokenized on the reader thread as they arrive, like a
Generate's planning, so the engine thread only runs the model. The engine takes
every input waiting, sorts the inputs by length and runs them in batches of similar
length (little padding, and the padding is masked: models/embedder.py), at most
`MAX_BATCH_ROWS` inputs and `MAX_BATCH_TOKENS` padded tokens per pass; between passes it
beats and reads its inbox, so a long request does not stop the heartbeat and new
requests join the next round. A request's Embeddings frame leaves when its last
input is done.
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import time
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from ..errors import ContextOverflow, RequestError
from ..io import frames
from ..io.protocol import Embed, EmbeddingsFrame, Load, ModelFacts, Ready, Stats
from ..io.transport import Transport
from ..models import embedder
from .backend import ModelTimes
from .engine import IDLE_BEAT_S, Counters, report_error, run_load, send_scores

log = logging.getLogger("mlxd_worker")

# Padded tokens in one encoder pass (rows × the longest row): bounds the pass's
# activations, which the daemon's memory estimate charges for
# (src/presets.rs ENCODER_BATCH_TOKENS).
MAX_BATCH_TOKENS = 8192
# The vectors in one Embeddings frame stay under this many bytes of JSON: a ring
# takes frames up to half its size (the daemon's event ring is 4 MiB).
MAX_ANSWER_FRAME_BYTES = 1 << 20
# Inputs in one pass.
MAX_BATCH_ROWS = 64


@dataclass
class Job:
    """One Embed request: its inputs' token rows and the results done so far (a
    vector per row; a cross-encoder's relevance, as a 0-d array, per pair row).

    `mode`: "embed" (vectors), "pairs" (a cross-encoder's (query, input) rows,
    `types` their token types) or "cosine" (rerank by an embedding model: row 0 is
    the query, the answer each input's cosine with it)."""

    rid: int
    rows: list[list[int]]
    dimensions: int | None
    mode: str = "embed"
    types: list[list[int]] | None = None
    vectors: list[np.ndarray | None] = field(default_factory=list)
    left: int = 0

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.rows)
        self.left = len(self.rows)


InboxItem = Union[tuple[int, bytes], tuple[int, Job], None]


class EmbeddingEngine:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.inbox: queue.Queue[InboxItem] = queue.Queue()
        self.counters = Counters()
        self.model: embedder.EmbeddingModel | None = None
        self.heartbeat = 0
        self.failed = False
        self._running = True
        self._jobs: dict[int, Job] = {}

    # -- called from the reader thread -------------------------------------
    def submit(self, kind: int, payload: bytes) -> None:
        if kind == frames.GENERATE:  # the daemon sends none; a clear answer if it did
            rid = frames.decode_generate(payload)[0].get("id")
            self._report(rid, RequestError("this worker serves an embedding model: it generates no text"))
            return
        if kind != frames.EMBED:
            self.inbox.put((kind, payload))
            return
        req = frames.decode_embed(payload)
        try:
            job = self._plan(req)
        except Exception as e:
            self._report(req.get("id"), e)
            return
        with self.counters.lock:
            self.counters.queued += 1
        self.inbox.put((kind, job))

    def _plan(self, req: Embed) -> Job:
        model = self.model
        if model is None:
            raise RequestError("the embedding model is not loaded yet")
        texts, tokens = req.get("texts") or [], req.get("tokens") or []
        if texts and tokens:
            raise RequestError("an Embed carries texts or token ids, not both")
        if not texts and not tokens:
            raise RequestError("an Embed needs at least one input")
        vocab = model.vocab_size
        for i, ids in enumerate(tokens):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(f"input {i} holds token id {bad}; this model's ids are 0 to {vocab - 1}")
        query = req.get("query")
        if query is not None:
            return self._plan_rerank(req["id"], model, query, texts, tokens)
        if model.head is not None:
            raise RequestError("this model scores query-document pairs (rerank): it gives no embeddings")
        truncate = bool(req.get("truncate"))
        rows = [model.tokenize(model.prompted(t)) for t in texts] + [model.with_special_tokens(ids) for ids in tokens]
        for i, row in enumerate(rows):
            if len(row) > model.max_tokens:
                if not truncate:
                    raise ContextOverflow(
                        f"input {i} is {len(row)} tokens, more than the {model.max_tokens} this model takes; "
                        "shorten it or ask for truncation"
                    )
                rows[i] = model.truncated(row)
        dimensions = req.get("dimensions")
        if dimensions is not None and not 1 <= dimensions <= model.dims:
            raise RequestError(f"dimensions must be between 1 and {model.dims} for this model, not {dimensions}")
        return Job(req["id"], rows, dimensions)

    @staticmethod
    def _plan_rerank(
        rid: int, model: embedder.EmbeddingModel, query: str, texts: list[str], tokens: list[list[int]]
    ) -> Job:
        """Documents are cut to fit (a long document is scored on its start); a query
        that leaves no room is refused. An embedding model's query and documents get
        its query and document prompts."""
        if tokens:
            raise RequestError("rerank documents are texts, not token ids")
        if model.head is None:
            query = model.prompted(query, "query")
            texts = [model.prompted(t, "document") for t in texts]
        if len(model.tokenize(query)) + 8 > model.max_tokens:
            raise ContextOverflow(f"the query leaves no room for a document in the model's {model.max_tokens} tokens")
        if model.head is not None:
            pairs = [model.pair(query, t) for t in texts]
            return Job(rid, [ids for ids, _ in pairs], None, "pairs", [types for _, types in pairs])
        rows = [model.tokenize(t) for t in (query, *texts)]
        rows = [model.truncated(r) if len(r) > model.max_tokens else r for r in rows]
        return Job(rid, rows, None, "cosine")

    def stop(self) -> None:
        self.inbox.put(None)

    def stats(self) -> Stats:
        """The Stats frame's engine part (the stats loop adds memory figures)."""
        return {
            "heartbeat": self.heartbeat,
            "engine_failed": self.failed,
            "speculative": None,
            "prompt_cache": None,
            **self.counters.snapshot(),
        }

    # -- the engine thread ---------------------------------------------------
    def run(self) -> None:
        try:
            while self._running:
                self._beat()
                self._drain_inbox(block=not self._jobs)
                if self._jobs:
                    self._embed_round()
        except BaseException as e:  # noqa: BLE001 - whatever it was, we cannot serve
            self.failed = True
            log.error("engine failed: %r; exiting", e, exc_info=e)
            os._exit(70)

    def _beat(self) -> None:
        self.heartbeat += 1
        self.transport.beat()

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                item = self.inbox.get(block=block, timeout=IDLE_BEAT_S if block else None)
            except queue.Empty:
                return
            block = False
            if item is None:
                self._running = False
                return
            self._handle(*item)

    def _handle(self, kind: int, item: bytes | Job) -> None:
        if isinstance(item, Job):
            self._jobs[item.rid] = item
            with self.counters.lock:
                self.counters.queued -= 1
                self.counters.active += 1
            return
        if kind == frames.LOAD:
            run_load(self.transport, self._load, item)
        elif kind == frames.CANCEL:
            job = self._jobs.pop(frames.decode_cancel(item), None)
            if job is not None:
                with self.counters.lock:
                    self.counters.active -= 1
                    self.counters.cancelled += 1
        elif kind == frames.MEMORY_LIMIT:
            import mlx.core as mx

            mx.set_memory_limit(frames.decode_memory_limit(item)["memory_limit"])
        elif kind == frames.CLEAR_CACHE:
            import mlx.core as mx

            mx.clear_cache()

    def _load(self, req: Load) -> None:
        t0 = time.perf_counter()
        options = req.get("options") or {}
        limit = options.get("memory_limit")
        if limit:
            import mlx.core as mx

            mx.set_memory_limit(int(limit))
        self.model = embedder.load(req["model_path"])
        self.model.embed([self.model.tokenize("warm up")])  # compiles the kernels
        facts: ModelFacts = {"family": self.model.family, "cache_kinds": [], "limits": []}
        ready: Ready = {
            "load_seconds": time.perf_counter() - t0,
            "context_length": self.model.max_tokens,
            "max_batch": MAX_BATCH_ROWS,
            "model": facts,
        }
        self.transport.send(frames.READY, frames.json_payload(ready))
        log.info(
            "loaded %s (embeddings: %d dims, %s pooling, %d tokens) in %.1fs",
            req["model_name"],
            self.model.dims,
            self.model.pooling.mode,
            self.model.max_tokens,
            time.perf_counter() - t0,
        )

    def _embed_round(self) -> None:
        """Every input waiting, by length, in batches; each finished request answered."""
        model = self.model
        assert model is not None
        # Pair rows (a cross-encoder's relevance) and vector rows run in passes of their own.
        pending = sorted(
            ((job, i) for job in self._jobs.values() for i, v in enumerate(job.vectors) if v is None),
            key=lambda p: (p[0].mode == "pairs", len(p[0].rows[p[1]])),
        )
        while pending:
            pairs = pending[0][0].mode == "pairs"
            take = 1
            while take < min(len(pending), MAX_BATCH_ROWS):
                job, i = pending[take]
                if (job.mode == "pairs") != pairs or len(job.rows[i]) * (take + 1) > MAX_BATCH_TOKENS:
                    break
                take += 1
            batch, pending = pending[:take], pending[take:]
            started = time.perf_counter()
            try:
                rows = [job.rows[i] for job, i in batch]
                if pairs:
                    types = [job.types[i] for job, i in batch if job.types is not None]
                    out = model.relevance(rows, types)
                else:
                    out = model.embed(rows)
                vectors = np.array(out, dtype=np.float32)
            except Exception as e:  # a pass MLX refused (memory): its requests fail, the worker goes on
                for job in {id(job): job for job, _ in batch}.values():
                    if self._jobs.pop(job.rid, None) is not None:
                        self._report(job.rid, e)
                        with self.counters.lock:
                            self.counters.active -= 1
                pending = [(job, i) for job, i in pending if job.rid in self._jobs]
                continue
            seconds = time.perf_counter() - started
            # An encoder pass reads a whole input at once: it is booked as prefill.
            self.counters.timed(seconds, ModelTimes(seconds, 0.0), ModelTimes(0.0, 0.0))
            self.counters.stepped(len(batch), sum(len(job.rows[i]) for job, i in batch))
            for (job, i), vector in zip(batch, vectors):
                job.vectors[i] = vector
                job.left -= 1
                if job.left == 0 and self._jobs.pop(job.rid, None) is not None:
                    self._answer(job)
            # Between passes: the daemon sees the engine alive, cancels and new work land.
            self._beat()
            self._drain_inbox(block=False)
            if not self._running:
                return
            pending = [(job, i) for job, i in pending if job.rid in self._jobs]

    def _answer(self, job: Job) -> None:
        if job.mode == "embed":
            self._send_vectors(job)
        else:
            self._send_scores(job)
        with self.counters.lock:
            self.counters.active -= 1
            self.counters.completed += 1

    def _send_vectors(self, job: Job) -> None:
        """The request's vectors, in frames of at most MAX_ANSWER_FRAME_BYTES."""
        out: list[str] = []
        size = 0
        for vector in job.vectors:
            assert vector is not None
            if job.dimensions is not None:  # Matryoshka: the first values, unit length again
                vector = vector[: job.dimensions]
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            encoded = base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
            if out and size + len(encoded) + 3 > MAX_ANSWER_FRAME_BYTES:
                part: EmbeddingsFrame = {"id": job.rid, "vectors": out, "prompt_tokens": 0, "more": True}
                self.transport.send(frames.EMBEDDINGS, frames.json_payload(part))
                out, size = [], 0
            out.append(encoded)
            size += len(encoded) + 3
        last: EmbeddingsFrame = {"id": job.rid, "vectors": out, "prompt_tokens": sum(len(r) for r in job.rows)}
        self.transport.send(frames.EMBEDDINGS, frames.json_payload(last))

    def _send_scores(self, job: Job) -> None:
        """Each input's relevance: a cross-encoder's, or its cosine with the query (row 0)."""
        results = [v for v in job.vectors if v is not None]
        if job.mode == "pairs":
            scores = [float(v) for v in results]
        else:
            unit = [v / max(float(np.linalg.norm(v)), 1e-12) for v in results]
            scores = [float(unit[0] @ d) for d in unit[1:]]
        send_scores(self.transport, job.rid, scores, sum(len(r) for r in job.rows))

    def _report(self, rid: int | None, e: Exception) -> None:
        report_error(self.transport, rid, e)
