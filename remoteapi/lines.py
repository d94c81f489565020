"""Requests and replies as JSON lines (sans-IO): one request line in, one reply
line out.

    request:  {"id": <any>, "method": "volume.create", "params": {...}}
    reply:    {"id": <same>, "result": <any>}
          or  {"id": <same>, "error": {"code": "<code>", "message": "<one line>"}}

"bad-request" is a line that is not a JSON object with a string "method" (and
object "params", if any); a SplitdError gives its own code; any other
exception is a bug ("internal", logged with its traceback), unless the
caller's `translate` names it.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from common.errors import ErrorCode, SplitdError
from common.names import quoted


class Request(NamedTuple):
    id: Any
    method: str
    params: dict[str, Any] | None


# translate(exception, method) -> (code, message), or None for "a bug".
Translate = Callable[[Exception, str], "tuple[str, str] | None"]


def parse_request(line: bytes) -> Request | bytes:
    """The request on `line`, or the bad-request reply to send instead."""
    try:
        request = json.loads(line)
    except ValueError as e:  # includes UnicodeDecodeError
        return error(None, ErrorCode.BAD_REQUEST, f"request is not JSON: {e}")
    except RecursionError:
        return error(None, ErrorCode.BAD_REQUEST, "request is nested too deeply")
    if not isinstance(request, dict):
        return error(None, ErrorCode.BAD_REQUEST, "request must be a JSON object")
    req_id = request.get("id")
    method = request.get("method")
    params = request.get("params")
    if not isinstance(method, str):
        return error(req_id, ErrorCode.BAD_REQUEST, 'request needs a "method" string')
    if params is not None and not isinstance(params, dict):
        return error(req_id, ErrorCode.BAD_REQUEST, '"params" must be a JSON object')
    return Request(req_id, method, params)


def answer(request: Request, call: Callable[[], Any], log: logging.Logger,
           translate: Translate | None = None) -> bytes:
    """The reply to `request`: call()'s result, or the error it raised. Never raises."""
    started = time.monotonic()
    req_id, method = request.id, request.method
    try:
        reply = encode({"id": req_id, "result": call()})
        outcome = "ok"
    except SplitdError as e:
        reply = error(req_id, e.code, str(e))
        outcome = e.code
    except Exception as e:
        named = translate(e, method) if translate is not None else None
        if named is None:
            log.exception("request %s failed", method)
            outcome = ErrorCode.INTERNAL
            reply = error(req_id, outcome, f"internal error in {method}: {type(e).__name__}: {e}")
        else:
            outcome, message = named
            log.warning("request %s failed: %s", method, message)
            reply = error(req_id, outcome, message)
    log.debug("%s id=%s: %s (%.1f ms)", quoted(method), quoted(req_id), outcome,
              (time.monotonic() - started) * 1000)
    return reply


def error(req_id: Any, code: str, message: str) -> bytes:
    # Messages are one line by contract; make sure of it for unexpected ones.
    message = " ".join(message.split())
    return encode({"id": req_id, "error": {"code": code, "message": message}})


def encode(reply: dict) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"
