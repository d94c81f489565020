"""Errors of the admin API: those of volumes.errors, plus the ones only a
request dispatcher can raise. See volumes/errors.py for the tree."""
from __future__ import annotations

from volumes.errors import BadInput, Conflict, NotFound, SplitdError

__all__ = ["SplitdError", "BadInput", "NotFound", "Conflict", "UnknownMethod"]


class UnknownMethod(SplitdError):
    code = "unknown-method"
