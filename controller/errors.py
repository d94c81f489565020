"""Errors of the admin API: those of common.errors, plus the ones only a
request dispatcher can raise. See common/errors.py for the tree and the codes."""
from __future__ import annotations

from common.errors import BadInput, Conflict, NotFound, SplitdError, UnknownMethod

__all__ = ["BadInput", "Conflict", "NotFound", "SplitdError", "UnknownMethod"]
