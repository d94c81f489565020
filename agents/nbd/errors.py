"""What the NBD client raises, named by what the caller does next.

    OSError
     +-- RequestError       the server failed this one request (its NBD error
     |                      as an errno, and its message); the connection goes on
     +-- ConnectError       could not connect: no server, the handshake failed,
     |                      the server refused the export or an option we need
     +-- Disconnected       (ConnectionError) the connection is gone: every
          |                 request in flight on it fails with this
          +-- RequestTimeout  no reply in time: the connection was closed,
                              as a late reply could no longer be told apart

nbdwire.ProtocolError (the server broke the protocol) is the cause
(__cause__) of the Disconnected that follows it.
"""
from __future__ import annotations

import errno as _errno

from nbdwire import COMMAND_NAMES, to_errno

__all__ = ["ConnectError", "Disconnected", "RequestError", "RequestTimeout"]


class RequestError(OSError):
    """The server answered a request with an error. `errno` is the errno
    for its NBD error value, `name` that errno's name (EIO, ENOSPC...),
    `message` the server's own text (may be empty)."""

    def __init__(self, cmd: int, offset: int, length: int, error: int, message: str = ""):
        code = to_errno(error)
        self.name = _errno.errorcode.get(code, str(code))
        self.message = message
        self.command = COMMAND_NAMES.get(cmd, str(cmd))
        self.offset = offset
        self.length = length
        text = f"{self.name}: {self.command} {offset}+{length}"
        super().__init__(code, text + (f": {message}" if message else ""))

    def __str__(self) -> str:
        return str(self.strerror)


class ConnectError(OSError):
    """Connecting or the handshake failed; the message says why."""


class Disconnected(ConnectionError):
    """The connection is closed (by us, by the server, or broken)."""


class RequestTimeout(Disconnected, TimeoutError):
    """A request had no reply within the timeout; its connection was closed."""
