"""What the engine needs from a token source: the mlx-lm model (BatchGenerator) or
the replay engine. Both advance every live sequence by one token per step."""

from __future__ import annotations

import json
from typing import Any, Optional, Protocol

from .sampling import Sampler
from .solo import SoloSequence

# (uid, token, finish_reason): finish_reason is "stop" (EOS), "length" or None.
StepResult = tuple[int, int, Optional[str]]


class Detokenizer(Protocol):
    def add_token(self, token: int) -> None: ...
    def finalize(self) -> None: ...
    @property
    def last_segment(self) -> str: ...


class Backend(Protocol):
    tokenizer: Any
    eos: frozenset[int]
    context_length: int | None

    def load(self, model_path: str, options: dict[str, Any]) -> None: ...
    def insert(self, ids: list[int], max_tokens: int, sampler: Sampler | None) -> int: ...
    def remove(self, uid: int) -> None: ...
    def step(self) -> list[StepResult]: ...
    def detokenizer(self) -> Detokenizer: ...


def context_length(model_path: str) -> int | None:
    try:
        with open(f"{model_path}/config.json") as f:
            cfg = json.load(f)
    except OSError:
        return None
    value = cfg.get("max_position_embeddings")
    return int(value) if value else None


class MlxBackend:
    """mlx-lm's BatchGenerator: sequences join the running batch at any step and
    leave when done; prompts are prefilled `prefill_step` tokens per step, so a
    long prompt delays the others' next token by one chunk, not by all of it.

    A sequence that arrives while nothing runs decodes alone (solo.py), as fast as
    stream_generate; the next arrival moves it into the batch, KV cache and all.
    Our uids are our own: the batch's uids are mapped to them.
    """

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.eos: frozenset[int] = frozenset()
        self.context_length: int | None = None
        self._model: Any = None
        self._gen: Any = None
        self._prefill_step = 2048
        self._next_uid = 0
        self._solo: tuple[int, SoloSequence] | None = None
        self._batch_uid: dict[int, int] = {}  # ours -> the batch's
        self._our_uid: dict[int, int] = {}  # the batch's -> ours
        self._waiting: list[tuple[int, list[int], int, Sampler | None]] = []

    def load(self, model_path: str, options: dict[str, Any]) -> None:
        import mlx_lm
        from mlx_lm.generate import BatchGenerator

        # Model files are untrusted: never run code shipped with them.
        self._model, self.tokenizer = mlx_lm.load(
            model_path, trust_remote_code=False, tokenizer_config={"trust_remote_code": False}
        )
        self.eos = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        self.context_length = context_length(model_path)
        max_batch = int(options.get("max_batch", 16))
        self._prefill_step = int(options.get("prefill_step", 2048))
        self._gen = BatchGenerator(
            self._model,
            stop_tokens=[[t] for t in sorted(self.eos)],
            completion_batch_size=max_batch,
            prefill_batch_size=min(max_batch, 8),
            prefill_step_size=self._prefill_step,
        )

    def insert(self, ids: list[int], max_tokens: int, sampler: Sampler | None) -> int:
        uid = self._next_uid
        self._next_uid += 1
        if self._solo is None and not self._batch_uid:
            from mlx_lm.generate import generation_stream

            solo = SoloSequence(self._model, ids, max_tokens, sampler, self._prefill_step, generation_stream)
            self._solo = (uid, solo)
        else:
            self._waiting.append((uid, ids, max_tokens, sampler))
        return uid

    def _to_batch(self, uid: int, ids: list[int], max_tokens: int, sampler: Sampler | None, cache: Any = None) -> None:
        (buid,) = self._gen.insert(
            [ids], max_tokens=[max_tokens], samplers=[sampler], caches=None if cache is None else [cache]
        )
        self._batch_uid[uid] = buid
        self._our_uid[buid] = uid

    def remove(self, uid: int) -> None:
        if self._solo is not None and self._solo[0] == uid:
            self._solo = None
            return
        self._waiting = [w for w in self._waiting if w[0] != uid]
        buid = self._batch_uid.pop(uid, None)
        if buid is not None:
            del self._our_uid[buid]
            self._gen.remove([buid])

    def step(self) -> list[StepResult]:
        results: list[StepResult] = []
        if self._solo is not None and not self._waiting:
            uid, solo = self._solo
            token = solo.step()
            if token is None:
                return results
            finish = "stop" if token in self.eos else ("length" if solo.left <= 0 else None)
            if finish is not None:
                self._solo = None
            return [(uid, token, finish)]
        if self._solo is not None:  # company arrived: the lone sequence joins the batch
            uid, solo = self._solo
            self._solo = None
            moved = solo.handover()
            finish = None
            if moved.emitted is not None:
                finish = "stop" if moved.emitted in self.eos else ("length" if moved.max_tokens <= 0 else None)
                results.append((uid, moved.emitted, finish))
            if finish is None:
                self._to_batch(uid, moved.prompt, moved.max_tokens, moved.sampler, moved.cache)
        for uid, ids, max_tokens, sampler in self._waiting:
            self._to_batch(uid, ids, max_tokens, sampler)
        self._waiting = []
        _, responses = self._gen.next()
        for r in responses:
            uid = self._our_uid[r.uid]
            if r.finish_reason is not None:
                del self._our_uid[r.uid]
                del self._batch_uid[uid]
            results.append((uid, r.token, r.finish_reason))
        return results

    def detokenizer(self) -> Detokenizer:
        return self.tokenizer.detokenizer
