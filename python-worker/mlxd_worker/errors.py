"""Errors that name who is at fault."""

from __future__ import annotations


class RequestError(Exception):
    """The request itself is bad (reported with code invalid_request)."""
