"""Errors a caller can act on: the tree and its codes live in common.errors
(shared with splitctl and the agents); the volume code imports them from here."""
from __future__ import annotations

from common.errors import BadInput, Conflict, ErrorCode, NoSpace, NotFound, SplitdError

__all__ = ["BadInput", "Conflict", "ErrorCode", "NoSpace", "NotFound", "SplitdError"]
