"""Error codes of the admin API, and the errors a caller can act on.

Every code a reply's {"error": {"code": ...}} can hold is an ErrorCode, so the
daemon, splitctl and the agents spell them one way. The exceptions below carry
theirs in `code`:

    SplitdError            code "error"      (base; never raised itself)
     +-- BadInput          code "bad-input"  fix the request and try again
     +-- NotFound          code "not-found"  no such thing; check the name
     +-- Conflict          code "conflict"   the request clashes with the
                                             current state (exists already,
                                             in use); change that state first
     +-- NoSpace           code "no-space"   the data directory's filesystem
                                             is full; free space and retry
     +-- Unauthorized      code "unauthorized"  remote admin API: no token, or
                                             one unknown or revoked; get a
                                             valid token (splitctl token create)
     +-- Forbidden         code "forbidden"  the token is valid but its scope
                                             (or volumes) does not cover the call
     +-- UnknownMethod     code "unknown-method"  no such method here

The admin server turns any SplitdError into {"code": e.code, "message": str(e)};
anything else is a bug and becomes "internal". Messages are one line and name
the thing at fault, because splitctl prints them as they are.
"""
from __future__ import annotations

from common.plain import PlainStrEnum


class ErrorCode(PlainStrEnum):
    # Raised by the daemon's own errors (the tree above and its subclasses).
    ERROR = "error"
    BAD_INPUT = "bad-input"
    NOT_FOUND = "not-found"
    CONFLICT = "conflict"
    NO_SPACE = "no-space"
    REFUSED = "refused"                 # a pair action not allowed in its state
    SCHEMA_TOO_NEW = "schema-too-new"   # metadata written by a newer splitd
    UNAUTHORIZED = "unauthorized"       # remote admin API: no valid token
    FORBIDDEN = "forbidden"             # remote admin API: the token's scope does not cover it
    # Given by the admin server itself.
    BAD_REQUEST = "bad-request"         # the line is not a request at all
    UNKNOWN_METHOD = "unknown-method"
    INTERNAL = "internal"               # a bug, logged with its traceback
    # Given by the client side (splitctl.client), never sent by the daemon.
    UNREACHABLE = "unreachable"         # nothing was sent: no daemon to ask
    PROTOCOL = "protocol"               # the connection broke or the reply made no sense
    PAIR_ERROR = "pair-error"           # a waited-on pair went to state error
    TIMEOUT = "timeout"                 # a waited-on pair did not get there in time
    TLS = "tls"                         # remote: the TLS handshake failed (nothing was sent)


class SplitdError(Exception):
    code: str = ErrorCode.ERROR


class BadInput(SplitdError, ValueError):
    code = ErrorCode.BAD_INPUT


class NotFound(SplitdError, LookupError):
    code = ErrorCode.NOT_FOUND


class Conflict(SplitdError):
    code = ErrorCode.CONFLICT


class NoSpace(SplitdError):
    code = ErrorCode.NO_SPACE


class Unauthorized(SplitdError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(SplitdError):
    code = ErrorCode.FORBIDDEN


class UnknownMethod(SplitdError):
    """The request names a method this server does not have."""

    code = ErrorCode.UNKNOWN_METHOD
