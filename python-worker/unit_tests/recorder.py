"""A transport for engine tests: it keeps every frame the engine sends, decoded."""

from __future__ import annotations

import json
from typing import Any

from mlxd_worker.io import frames


class Recorder:
    name = "recorder"
    native = False

    def __init__(self) -> None:
        self.frames: list[tuple[int, Any]] = []

    def send(self, kind: int, payload: bytes) -> None:
        self.frames.append((kind, json.loads(payload)))

    def send_tokens(self, entries: list[tuple[int, int, str]]) -> None:
        self.frames.append((frames.TOKEN_BATCH, list(entries)))

    def beat(self) -> None:
        pass

    def recv(self) -> tuple[int, int, bytes] | None:
        return None
