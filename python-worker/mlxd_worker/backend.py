"""What the engine needs from a token source: the mlx-lm model (BatchGenerator) or
the replay engine. Both advance every live sequence by one token per step."""

from __future__ import annotations

import json
from typing import Any, Optional, Protocol

from .sampling import Sampler

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
    long prompt delays the others' next token by one chunk, not by all of it."""

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.eos: frozenset[int] = frozenset()
        self.context_length: int | None = None
        self._model: Any = None
        self._gen: Any = None

    def load(self, model_path: str, options: dict[str, Any]) -> None:
        import mlx_lm
        from mlx_lm.generate import BatchGenerator

        self._model, self.tokenizer = mlx_lm.load(model_path)
        self.eos = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        self.context_length = context_length(model_path)
        max_batch = int(options.get("max_batch", 16))
        self._gen = BatchGenerator(
            self._model,
            stop_tokens=[[t] for t in sorted(self.eos)],
            completion_batch_size=max_batch,
            prefill_batch_size=min(max_batch, 8),
            prefill_step_size=int(options.get("prefill_step", 2048)),
        )

    def insert(self, ids: list[int], max_tokens: int, sampler: Sampler | None) -> int:
        (uid,) = self._gen.insert([ids], max_tokens=[max_tokens], samplers=[sampler])
        return int(uid)

    def remove(self, uid: int) -> None:
        self._gen.remove([uid])

    def step(self) -> list[StepResult]:
        _, responses = self._gen.next()
        return [(r.uid, r.token, r.finish_reason) for r in responses]

    def detokenizer(self) -> Detokenizer:
        return self.tokenizer.detokenizer
