"""Errors that name who is at fault."""

from __future__ import annotations


class RequestError(Exception):
    """The request itself is bad (reported with code invalid_request)."""

    code = "invalid_request"


class ContextOverflow(RequestError):
    """The prompt leaves nothing of the model's context to generate in."""

    code = "context_length_exceeded"


class UnservableModel(Exception):
    """A model directory this worker cannot serve (a load error), with the reason."""
