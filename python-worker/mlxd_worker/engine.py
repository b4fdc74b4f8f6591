"""The mlx-lm engine: one thread owns MLX, loads the model and generates.

Requests arrive on a queue from the reader thread; cancellation is a flag the
reader sets and the engine checks every token.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import frames
from .stops import StopMatcher
from .transport import Transport

log = logging.getLogger("mlxd_worker")


@dataclass
class Counters:
    """What Stats frames report about the request flow."""

    active: int = 0
    queued: int = 0
    completed: int = 0
    cancelled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class RequestError(Exception):
    """The request itself is bad (reported with code invalid_request)."""


class Engine:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.inbox: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
        self.cancelled: set[int] = set()
        self.cancel_lock = threading.Lock()
        self.counters = Counters()
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_length: int | None = None

    # -- called from the reader thread -------------------------------------
    def submit(self, kind: int, payload: bytes) -> None:
        if kind == frames.GENERATE:
            with self.counters.lock:
                self.counters.queued += 1
        self.inbox.put((kind, payload))

    def cancel(self, rid: int) -> None:
        with self.cancel_lock:
            self.cancelled.add(rid)

    def stop(self) -> None:
        self.inbox.put(None)

    # -- the engine thread ---------------------------------------------------
    def run(self) -> None:
        while (item := self.inbox.get()) is not None:
            kind, payload = item
            try:
                if kind == frames.LOAD:
                    self._load(json.loads(payload))
                elif kind == frames.GENERATE:
                    self._generate(json.loads(payload))
            except Exception as e:  # a worker error must reach the daemon, not kill us
                log.exception("engine error")
                rid = json.loads(payload).get("id") if kind == frames.GENERATE else None
                code = "invalid_request" if isinstance(e, RequestError) else "worker"
                self.transport.send(frames.ERROR, frames.json_payload({"id": rid, "message": str(e), "code": code}))
                if kind == frames.LOAD:
                    raise

    def _load(self, req: dict[str, Any]) -> None:
        import mlx_lm

        t0 = time.perf_counter()
        self.model, self.tokenizer = mlx_lm.load(req["model_path"])
        self.context_length = _context_length(req["model_path"])
        self._warm_up()
        self.transport.send(
            frames.READY,
            frames.json_payload({"load_seconds": time.perf_counter() - t0, "context_length": self.context_length}),
        )
        log.info("loaded %s in %.1fs", req["model_name"], time.perf_counter() - t0)

    def _warm_up(self) -> None:
        """Compile kernels on our time, not on a user's first request."""
        from mlx_lm import stream_generate

        ids = self._prompt_ids({"messages": [{"role": "user", "content": "Hi"}]})
        for _ in stream_generate(self.model, self.tokenizer, ids, max_tokens=2):
            pass

    def _prompt_ids(self, req: dict[str, Any]) -> list[int]:
        if req.get("messages") is not None:
            ids = self.tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tokenizer.encode(req.get("prompt") or ""))

    def _is_cancelled(self, rid: int) -> bool:
        with self.cancel_lock:
            return rid in self.cancelled

    def _generate(self, req: dict[str, Any]) -> None:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        rid = int(req["id"])
        with self.counters.lock:
            self.counters.queued -= 1
            self.counters.active += 1
        prompt_tokens = 0
        completion_tokens = 0
        finish = "length"
        prompt_tps = generation_tps = 0.0
        try:
            if self._is_cancelled(rid):
                finish = "cancelled"
                ids = []
            else:
                ids = self._prompt_ids(req)
            prompt_tokens = len(ids)
            if self.context_length and prompt_tokens >= self.context_length:
                raise RequestError(f"prompt is {prompt_tokens} tokens; the model's context is {self.context_length}")
            if req.get("seed") is not None:
                mx.random.seed(int(req["seed"]))
            sampler = make_sampler(temp=float(req.get("temperature", 0.0)), top_p=float(req.get("top_p", 1.0)))
            stops = StopMatcher(list(req.get("stop") or []))
            eos = set(self.tokenizer.eos_token_ids)
            responses = (
                stream_generate(self.model, self.tokenizer, ids, max_tokens=int(req["max_tokens"]), sampler=sampler)
                if finish != "cancelled"
                else ()
            )
            for resp in responses:
                prompt_tps, generation_tps = resp.prompt_tps, resp.generation_tps
                if self._is_cancelled(rid):
                    finish = "cancelled"
                    break
                is_eos = resp.token in eos
                if not is_eos:
                    completion_tokens += 1
                text, hit = stops.feed(resp.text)
                if resp.finish_reason is not None and not hit:
                    text += stops.flush()
                if text or not is_eos:
                    self.transport.send_tokens([(rid, int(resp.token), text)])
                if hit:
                    finish = "stop"
                    break
                if resp.finish_reason is not None:
                    finish = resp.finish_reason
        finally:
            with self.counters.lock:
                self.counters.active -= 1
                if finish == "cancelled":
                    self.counters.cancelled += 1
                else:
                    self.counters.completed += 1
            with self.cancel_lock:
                self.cancelled.discard(rid)
        self.transport.send(
            frames.DONE,
            frames.json_payload(
                {
                    "id": rid,
                    "finish_reason": finish,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "prompt_tps": prompt_tps,
                    "generation_tps": generation_tps,
                }
            ),
        )


def _context_length(model_path: str) -> int | None:
    try:
        with open(f"{model_path}/config.json") as f:
            cfg = json.load(f)
    except OSError:
        return None
    value = cfg.get("max_position_embeddings")
    return int(value) if value else None
