"""The admin server: newline-delimited JSON requests on a Unix socket.

    request:  {"id": <any>, "method": "volume.create", "params": {...}}
    reply:    {"id": <same>, "result": <any>}
          or  {"id": <same>, "error": {"code": "<code>", "message": "<one line>"}}

Error codes (all in common.errors.ErrorCode): "bad-request" (the line is not
a JSON object with a string "method"), "unknown-method", the `code` of any
controller.errors error ("bad-input", "not-found", "conflict", "refused", ...),
"no-space" when the data directory's filesystem is full, and "internal" for a
bug, which is logged with its traceback while the daemon carries on. The
same requests on TCP (daemon/remote_admin.py) may also be refused with
"unauthorized" (no valid token) or "forbidden" (outside the token's scope).

A connection may send many requests; each is answered in order. A line
longer than MAX_LINE is answered with a bad-request error and the connection
is closed, since we cannot tell where the next request would start.

Controller methods are synchronous and quick, so they run right here on the
event loop: no request ever sees another one half done.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import sqlite3
import time
from collections.abc import Callable

from common.errors import ErrorCode, SplitdError
from common.names import quoted
from daemon.listeners import bind_unix, unlink_owned

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20


async def start_admin_server(path: str, controller):
    """Listen on the Unix socket `path` (mode 0660) and serve `controller`.
    Returns the server and the owned_path() record of its socket."""
    sock, owned = bind_unix(path, f"admin socket {path}")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_connection(reader, writer, controller)

    try:
        # limit: a line of MAX_LINE bytes, newline included, still fits.
        server = await asyncio.start_unix_server(serve, sock=sock, limit=MAX_LINE)
    except BaseException:
        sock.close()
        unlink_owned(owned)
        raise
    return server, owned




async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            controller) -> None:
    # Runs as a task of its own: handles every error itself so a bad client
    # never reaches the loop's exception handler.
    try:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as e:
                line = e.partial  # EOF: a last request may lack its newline
                if line.strip():
                    await _send(writer, handle_line(line, controller))
                return
            except asyncio.LimitOverrunError:
                await _send(writer, _error(None, ErrorCode.BAD_REQUEST,
                                           f"request line longer than {MAX_LINE} bytes"))
                return
            if line.strip():
                await _send(writer, handle_line(line, controller))
    except (ConnectionError, BrokenPipeError):
        pass  # the client went away; nothing to answer
    except Exception:
        log.exception("admin connection failed")
    finally:
        writer.close()


async def _send(writer: asyncio.StreamWriter, reply: bytes) -> None:
    writer.write(reply)
    await writer.drain()


def handle_line(line: bytes, controller,
                authorize: Callable[[str, dict | None], None] | None = None) -> bytes:
    """One request line in, one reply line out (newline included). Never raises.
    `authorize(method, params)`, if given, runs first and refuses by raising
    a SplitdError (the remote admin API's token check, daemon/remote_admin.py)."""
    started = time.monotonic()
    try:
        request = json.loads(line)
    except ValueError as e:  # includes UnicodeDecodeError
        return _error(None, ErrorCode.BAD_REQUEST, f"request is not JSON: {e}")
    except RecursionError:
        return _error(None, ErrorCode.BAD_REQUEST, "request is nested too deeply")
    if not isinstance(request, dict):
        return _error(None, ErrorCode.BAD_REQUEST, "request must be a JSON object")
    req_id = request.get("id")
    method = request.get("method")
    params = request.get("params")
    if not isinstance(method, str):
        return _error(req_id, ErrorCode.BAD_REQUEST, 'request needs a "method" string')
    if params is not None and not isinstance(params, dict):
        return _error(req_id, ErrorCode.BAD_REQUEST, '"params" must be a JSON object')

    try:
        if authorize is not None:
            authorize(method, params)
        reply = _encode({"id": req_id, "result": controller.call(method, params)})
        outcome = "ok"
    except SplitdError as e:
        reply = _error(req_id, e.code, str(e))
        outcome = e.code
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            log.exception("admin request %s failed", method)
            reply = _error(req_id, ErrorCode.INTERNAL, f"internal error in {method}: {type(e).__name__}: {e}")
            outcome = ErrorCode.INTERNAL
        else:
            log.warning("admin request %s failed: %s", method, full)
            reply = _error(req_id, ErrorCode.NO_SPACE, f"no space left in the data directory: {method} "
                                                 f"was not done ({full})")
            outcome = ErrorCode.NO_SPACE
    log.debug("admin %s id=%s: %s (%.1f ms)", quoted(method), quoted(req_id), outcome,
              (time.monotonic() - started) * 1000)
    return reply


def _disk_full(e: Exception) -> str | None:
    """What a full disk (or quota) said, or None for any other failure: the
    metadata store's "database or disk is full", or ENOSPC from a file."""
    if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return e.strerror or str(e)
    return None




def _error(req_id, code: str, message: str) -> bytes:
    # Messages are one line by contract; make sure of it for unexpected ones.
    message = " ".join(message.split())
    return _encode({"id": req_id, "error": {"code": code, "message": message}})


def _encode(reply: dict) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"
