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
event loop: no request ever sees another one half done. The few that must
wait for something slow (opening a backup store: backup.serve,
backup.instant_restore) are coroutines: the slow part runs in a thread,
then they check again and make their change in one go on the loop; the
reply is sent when they are done (the connection's next requests wait for
it, so replies stay in order), and other connections are served meanwhile.
"""
from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from common.errors import ErrorCode
from daemon.listeners import bind_unix, unlink_owned
from remoteapi.lines import Request, answer, error as _error, parse_request

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
                    await _send(writer, await _reply(handle_line(line, controller)))
                return
            except asyncio.LimitOverrunError:
                await _send(writer, _error(None, ErrorCode.BAD_REQUEST,
                                           f"request line longer than {MAX_LINE} bytes"))
                return
            if line.strip():
                await _send(writer, await _reply(handle_line(line, controller)))
    except (ConnectionError, BrokenPipeError):
        pass  # the client went away; nothing to answer
    except Exception:
        log.exception("admin connection failed")
    finally:
        writer.close()


async def _send(writer: asyncio.StreamWriter, reply: bytes) -> None:
    writer.write(reply)
    await writer.drain()


async def _reply(reply: bytes | asyncio.Future[bytes]) -> bytes:
    return reply if isinstance(reply, bytes) else await reply


def handle_line(line: bytes, controller,
                authorize: Callable[[str, dict | None], None] | None = None,
                ) -> bytes | asyncio.Future[bytes]:
    """One request line in, one reply line out (newline included), or a
    Future of it for a method that is a coroutine (module docstring). Never
    raises, nor does the Future. `authorize(method, params)`, if given, runs
    first and refuses by raising a SplitdError (the remote admin API's token
    check, daemon/remote_admin.py)."""
    request = parse_request(line)
    if isinstance(request, bytes):
        return request
    work: list[Awaitable[Any]] = []

    def call() -> Any:
        if authorize is not None:
            authorize(request.method, request.params)
        result = controller.call(request.method, request.params)
        if inspect.isawaitable(result):
            work.append(result)     # answered by _answer_later
            return None
        return result

    reply = answer(request, call, log, _no_space)
    if not work:
        return reply
    return asyncio.ensure_future(_answer_later(request, work[0]))


async def _answer_later(request: Request, work: Awaitable[Any]) -> bytes:
    """The reply to `request` once `work` (its method's coroutine) is done."""
    try:
        result = await work
    except Exception as e:  # noqa: BLE001 -- answered as answer() answers it
        failure = e

        def call() -> Any:
            raise failure
    else:
        def call() -> Any:
            return result
    return answer(request, call, log, _no_space)


def _no_space(e: Exception, method: str) -> tuple[str, str] | None:
    full = _disk_full(e)
    if full is None:
        return None
    return ErrorCode.NO_SPACE, f"no space left in the data directory: {method} was not done ({full})"


def _disk_full(e: Exception) -> str | None:
    """What a full disk (or quota) said, or None for any other failure: the
    metadata store's "database or disk is full", or ENOSPC from a file."""
    if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return e.strerror or str(e)
    return None
