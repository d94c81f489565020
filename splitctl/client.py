"""A blocking client for splitd's admin socket (see daemon/admin_server.py).

    with AdminClient() as admin:
        admin.call("volume.create", name="db", size="10G")

Every failure is an AdminError carrying a code: the daemon's own codes
("bad-input", "not-found", "conflict", ...) and, from this side,
"unreachable" (no daemon at the socket) and "protocol" (the connection broke
or the reply made no sense). Callers need to catch only AdminError.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import socket

ENV_SOCKET = "SPLITD_ADMIN_SOCKET"
DEFAULT_SOCKET = "/run/splitd/admin.sock"
MAX_REPLY = 64 << 20


class AdminError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def default_socket_path() -> str:
    return os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET


class AdminClient:
    def __init__(self, socket_path: str | None = None, timeout: float = 60.0):
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._ids = itertools.count(1)

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer = b""

    def call(self, method: str, **params):
        """Send one request and return its result, or raise AdminError."""
        req_id = next(self._ids)
        request = json.dumps({"id": req_id, "method": method, "params": params}).encode()
        sock = self._connect()
        try:
            sock.sendall(request + b"\n")
            line = self._read_line(sock)
        except (OSError, AdminError) as e:
            # The connection is in an unknown state: drop it, connect anew next time.
            self.close()
            if isinstance(e, AdminError):
                raise
            raise AdminError("protocol", f"lost the connection to splitd at "
                                         f"{self.socket_path}: {_reason(e)}") from None
        try:
            reply = json.loads(line)
        except ValueError:
            self.close()
            raise AdminError("protocol", f"splitd at {self.socket_path} sent a reply "
                                         "that is not JSON") from None
        if not isinstance(reply, dict) or reply.get("id") != req_id:
            self.close()
            raise AdminError("protocol", f"splitd at {self.socket_path} answered another request")
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise AdminError(str(error.get("code", "error")), str(error.get("message", reply)))
        return reply.get("result")

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                sock.close()
                raise AdminError("unreachable", f"cannot reach splitd at {self.socket_path}: "
                                                f"{_reason(e)}") from None
            self._sock = sock
        return self._sock

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_REPLY:
                raise AdminError("protocol", f"reply from splitd at {self.socket_path} "
                                             "is too long")
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise AdminError("protocol", f"splitd at {self.socket_path} closed the "
                                             "connection without answering")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


def _reason(e: OSError) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if e.errno == errno.ENOENT:
        return "no such socket (is splitd running?)"
    if e.errno == errno.ECONNREFUSED:
        return "connection refused (is splitd running?)"
    return e.strerror or str(e)
