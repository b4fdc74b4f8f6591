"""Tool calls out of a stream of text deltas.

Text outside calls passes through as it comes. Text from a start marker to its end
marker is held back and read as a call when the end marker arrives; text that
might be the beginning of a start marker is held back until it is known not to be
(as stop strings are). Nothing is ever lost: a block that does not read as a call
is passed on as text, markers included.
"""

from __future__ import annotations

from typing import Callable, Union

from .tools import ToolCall

# What the extractor hands on, in stream order.
Piece = Union[str, ToolCall]


class ToolCallExtractor:
    def __init__(self, start: str, end: str, read: Callable[[str], list[ToolCall]]) -> None:
        """`read` turns the text between the markers into calls, or raises
        ValueError. An empty `end` means a call runs to the end of the output."""
        self._start = start
        self._end = end
        self._read = read
        self._held = ""
        self._inside = False

    def feed(self, delta: str) -> list[Piece]:
        out: list[Piece] = []
        text = self._held + delta
        while True:
            if not self._inside:
                at = text.find(self._start)
                if at < 0:
                    keep = _partial_suffix(text, self._start)
                    _add(out, text[: len(text) - keep])
                    self._held = text[len(text) - keep :]
                    return out
                _add(out, text[:at])
                text = text[at + len(self._start) :]
                self._inside = True
            else:
                at = text.find(self._end) if self._end else -1
                if at < 0:
                    self._held = text
                    return out
                for piece in self._complete(text[:at], closed=True):
                    _add(out, piece)
                text = text[at + len(self._end) :]
                self._inside = False

    def finish(self) -> list[Piece]:
        """At the end of the output: an unterminated call is read as it is (and
        passed on as text when it does not read); a held partial marker is text."""
        held, self._held = self._held, ""
        if not self._inside:
            return [held] if held else []
        self._inside = False
        return self._complete(held, closed=False)

    def _complete(self, body: str, closed: bool) -> list[Piece]:
        try:
            calls = self._read(body)
        except ValueError:
            calls = []
        if calls:
            return list(calls)
        return [self._start + body + (self._end if closed else "")]


def _add(out: list[Piece], piece: Piece) -> None:
    """Appends, joining text to text so that a list never holds two strings in a row."""
    if isinstance(piece, str):
        if not piece:
            return
        if out and isinstance(out[-1], str):
            out[-1] += piece
            return
    out.append(piece)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (shorter than it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
