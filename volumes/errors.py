"""Errors a caller can act on, each with a stable `code` for the admin API.

    SplitdError            code "error"      (base; never raised itself)
     +-- BadInput          code "bad-input"  fix the request and try again
     +-- NotFound          code "not-found"  no such thing; check the name
     +-- Conflict          code "conflict"   the request clashes with the
                                             current state (exists already,
                                             in use); change that state first
     +-- NoSpace           code "no-space"   the data directory's filesystem
                                             is full; free space and retry

The admin server turns any SplitdError into {"code": e.code, "message": str(e)};
anything else is a bug and becomes "internal". Messages are one line and name
the thing at fault, because splitctl prints them as they are.
"""
from __future__ import annotations


class SplitdError(Exception):
    code = "error"


class BadInput(SplitdError, ValueError):
    code = "bad-input"


class NotFound(SplitdError, LookupError):
    code = "not-found"


class Conflict(SplitdError):
    code = "conflict"


class NoSpace(SplitdError):
    code = "no-space"
