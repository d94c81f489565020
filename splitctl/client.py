"""A blocking client for splitd's admin socket (see daemon/admin_server.py).

    with AdminClient() as admin:
        admin.call("volume.create", name="db", size="10G")

    with AdminClient() as admin:
        admin.call("pair.split", name="db-snap")
        admin.wait_pair("db-snap", "copied", timeout=600)

A remote daemon (daemon/remote_admin.py: TCP, TLS, a bearer token):

    with RemoteAdminClient("tcp://storage:10810", token, tls_ca="ca.pem") as admin:
        admin.call("pair.split", name="db-snap")

adds "tls" (the TLS handshake failed, e.g. the certificate is not trusted:
nothing was sent), and from the daemon "unauthorized" (no valid token) and
"forbidden" (outside the token's scope or volumes).

Every failure is an AdminError carrying a code: the daemon's own codes
("bad-input", "not-found", "conflict", "refused", ...) and, from this side,
"unreachable" (nothing was sent: no socket at the path, connection refused,
the path is not a socket, permission denied) and "protocol" (the connection
broke or the reply made no sense). Callers need to catch only AdminError:

    AdminError
     +-- PairFailed    "pair-error": a waited-on pair went to state error
     +-- WaitTimeout   "timeout": the pair did not get there in time
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any, Self

from common.errors import ErrorCode
from common.states import WAIT_TARGETS, target_reached

__all__ = [
    "DEFAULT_AGENT_PORT",
    "DEFAULT_SOCKET",
    "ENV_HOST_TLS_CA",
    "ENV_HOST_TOKEN_FILE",
    "ENV_SOCKET",
    "WAIT_TARGETS",
    "ENV_CONNECT",
    "ENV_TLS_CA",
    "ENV_TOKEN_FILE",
    "AdminClient",
    "AdminError",
    "PairFailed",
    "RemoteAdminClient",
    "WaitTimeout",
    "default_socket_path",
    "parse_connect",
    "target_reached",
]

ENV_SOCKET = "SPLITD_ADMIN_SOCKET"
ENV_CONNECT = "SPLITD_CONNECT"
ENV_TOKEN_FILE = "SPLITD_TOKEN_FILE"
ENV_TLS_CA = "SPLITD_TLS_CA"
DEFAULT_SOCKET = "/run/splitd/admin.sock"
# The host agent (splitd-host serve --listen): its TCP port when none is
# given (splitd's NBD port is 10809; a daemon's remote admin API is often
# put on 10810), and splitctl backup's variables.
DEFAULT_AGENT_PORT = 10811
ENV_HOST_TOKEN_FILE = "SPLITD_HOST_TOKEN_FILE"
ENV_HOST_TLS_CA = "SPLITD_HOST_TLS_CA"
MAX_REPLY = 64 << 20


class AdminError(Exception):
    """`method` is the request that failed, when one was sent (else None)."""

    def __init__(self, code: str, message: str, method: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.method = method


class PairFailed(AdminError):
    """The pair went to state `error` while waited on. `pair` is its last pair.show."""

    def __init__(self, pair: dict):
        # The message is printed as one line, whatever the reason holds.
        reason = " ".join(str(pair.get("reason") or "no reason given").split())
        super().__init__(ErrorCode.PAIR_ERROR, f"pair {pair.get('name')!r} went to state error: {reason}")
        self.pair = pair


class WaitTimeout(AdminError):
    """The pair did not get where it was waited for in time. `pair` is its last pair.show."""

    def __init__(self, pair: dict, until: str, timeout: float):
        super().__init__(ErrorCode.TIMEOUT, f"timed out after {timeout:g}s waiting for pair "
                                    f"{pair.get('name')!r} to be {until}: state "
                                    f"{pair.get('state')}, {pair.get('remaining')} regions "
                                    "still to copy")
        self.pair = pair


def default_socket_path() -> str:
    return os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET


class AdminClient:
    # Who answers, in messages ("cannot reach splitd at ..."); the host agent's
    # clients say splitd-host.
    peer = "splitd"

    def __init__(self, socket_path: str | None = None, timeout: float = 60.0):
        # None means the default; an empty path is a mistake, not a default.
        if socket_path == "":
            raise ValueError("the admin socket path is empty")
        self.socket_path = default_socket_path() if socket_path is None else socket_path
        self.where = self.socket_path   # in messages: "cannot reach splitd at ..."
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._ids = itertools.count(1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer = b""

    def abort(self) -> None:
        """Drop the connection so that nothing more of it reaches the daemon:
        SO_LINGER {on, 0} then close discards what the kernel still holds to
        send (a request given up on) and answers the peer with an RST, where
        a plain close() would go on retransmitting it (tcp(7), socket(7)
        SO_LINGER). A TLS socket is closed the same way, without close_notify."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
            self.close()

    def call(self, method: str, **params):
        """Send one request and return its result, or raise AdminError."""
        return self.call_timed(method, **params)[0]

    def call_before(self, deadline: float, method: str, **params):
        """call(), giving up (AdminError "timeout", the connection aborted)
        once time.monotonic() passes `deadline`, or at least within a
        receive of it; nothing is sent if it has passed already."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AdminError(ErrorCode.TIMEOUT, f"{method} was not sent to {self.peer} at "
                                                f"{self.where}: its deadline had passed", method)
        sock = self._connect()
        sock.settimeout(remaining)
        try:
            return self.call(method, **params)
        finally:
            if self._sock is sock:
                sock.settimeout(self.timeout)

    def call_timed(self, method: str, **params) -> tuple[Any, float]:
        """call(), and the seconds from just before the send to the reply's
        last byte (the round trip a benchmark reports)."""
        req_id = next(self._ids)
        request = json.dumps({"id": req_id, "method": method, "params": params}).encode()
        try:
            sock = self._connect()
            started = time.perf_counter()
            sock.sendall(request + b"\n")
            line = self._read_line(sock)
            elapsed = time.perf_counter() - started
        except (OSError, AdminError) as e:
            # The connection is in an unknown state: drop it, connect anew
            # next time; aborted, so a request we gave up on (a timeout) is
            # not delivered later by the kernel's retransmissions.
            self.abort()
            if isinstance(e, AdminError):
                e.method = method
                raise
            raise AdminError(ErrorCode.PROTOCOL, f"lost the connection to {self.peer} at "
                                         f"{self.where}: {_reason(e, peer=self.peer)}", method) from None
        try:
            reply = json.loads(line)
        except ValueError:
            self.close()
            raise AdminError(ErrorCode.PROTOCOL, f"{self.peer} at {self.where} sent a reply "
                                         "that is not JSON", method) from None
        if not isinstance(reply, dict) or reply.get("id") != req_id:
            self.close()
            raise AdminError(ErrorCode.PROTOCOL, f"{self.peer} at {self.where} answered another "
                                         "request", method)
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise AdminError(str(error.get("code", "error")), str(error.get("message", reply)),
                             method)
        return reply.get("result"), elapsed

    def wait_pair(self, name: str, until: str, timeout: float | None = None,
                  interval: float = 1.0, on_poll: Callable[[dict], None] | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> dict:
        """Poll pair.show every `interval` seconds until the pair is `until`
        (see WAIT_TARGETS); return that last pair.show.

        Raises PairFailed if the pair goes to `error` (only a resync leaves
        it, so waiting on is pointless), WaitTimeout after `timeout` seconds
        (None: no limit), or any AdminError of pair.show (the pair was
        deleted, the daemon stopped). `on_poll` sees every pair.show, e.g.
        to draw progress. A pair that cannot get there by itself (`synced`
        while split) is waited on all the same: someone may resync it.

        An instant restore (pair.show's kind "instant-restore") never gets
        to `pair`: its pair is dissolved once the volume is restored. For
        it, whatever `until`, this waits as wait_restore does, and returns
        its last backup.restore_status (state "restored").
        """
        if until not in WAIT_TARGETS:
            raise ValueError(f"unknown wait target {until!r} (one of {', '.join(WAIT_TARGETS)})")
        deadline = None if timeout is None else clock() + timeout
        while True:
            try:
                pair = self.call("pair.show", name=name)
            except AdminError as e:
                if e.code != ErrorCode.NOT_FOUND or not self._restore_known(name):
                    raise
                pair = {"kind": "instant-restore"}
            if pair.get("kind") == "instant-restore":
                return self._poll_restore(name, deadline, timeout, interval, on_poll, clock, sleep)
            if on_poll is not None:
                on_poll(pair)
            if target_reached(pair, until):
                return pair
            if pair["state"] == "error":
                raise PairFailed(pair)
            now = clock()
            if deadline is not None and now >= deadline:
                raise WaitTimeout(pair, until, timeout or 0.0)
            sleep(interval if deadline is None else min(interval, deadline - now))

    def _restore_known(self, volume: str) -> bool:
        """Does the daemon know of an instant restore of `volume` (running or done)?"""
        try:
            status = self.call("backup.restore_status", volume=volume)
        except AdminError:
            return False
        # (An older daemon said "restored", with no time, of any volume alone.)
        return status.get("state") != "restored" or status.get("finished") is not None

    def wait_restore(self, volume: str, timeout: float | None = None, interval: float = 1.0,
                     on_poll: Callable[[dict], None] | None = None,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> dict:
        """Poll backup.restore_status until the instant restore of `volume`
        is done (state "restored"): return that last status. PairFailed if
        it goes to error or its pair is deleted, WaitTimeout after
        `timeout` seconds; `on_poll` sees every status that has progress."""
        deadline = None if timeout is None else clock() + timeout
        return self._poll_restore(volume, deadline, timeout, interval, on_poll, clock, sleep)

    def _poll_restore(self, volume: str, deadline: float | None, timeout: float | None,
                      interval: float, on_poll: Callable[[dict], None] | None,
                      clock: Callable[[], float], sleep: Callable[[float], None]) -> dict:
        while True:
            status = self.call("backup.restore_status", volume=volume)
            if on_poll is not None and status.get("progress"):
                on_poll(status)
            if status["state"] == "restored":
                return status
            if status["state"] in ("error", "deleted"):
                raise PairFailed(dict(status, reason=status.get("reason") or status["state"]))
            now = clock()
            if deadline is not None and now >= deadline:
                raise WaitTimeout(status, "restored", timeout or 0.0)
            sleep(interval if deadline is None else min(interval, deadline - now))

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                sock.close()
                raise AdminError(ErrorCode.UNREACHABLE, f"cannot reach {self.peer} at {self.where}: "
                                                f"{_reason(e, self.socket_path, self.peer)}") from None
            self._sock = sock
        return self._sock

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_REPLY:
                raise AdminError(ErrorCode.PROTOCOL, f"reply from {self.peer} at {self.where} "
                                             "is too long")
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise AdminError(ErrorCode.PROTOCOL, f"{self.peer} at {self.where} closed the "
                                             "connection without answering")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


def parse_connect(uri: str) -> tuple[str, int]:
    """(host, port) of tcp://HOST:PORT (IPv6: tcp://[::1]:PORT); ValueError if
    `uri` is not one."""
    example = "tcp://HOST:PORT, e.g. tcp://storage.example:10810"
    if not uri.startswith("tcp://"):
        raise ValueError(f"{uri!r} is not a remote admin address: use {example}")
    host, colon, port = uri[len("tcp://"):].rstrip("/").rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{uri!r} needs a host and a port: use {example}")
    return host, int(port)


class RemoteAdminClient(AdminClient):
    """The admin API of a remote splitd: TCP, TLS (the server's certificate
    checked against `tls_ca`, or the system's CAs), then the bearer token as
    the first request ("auth"). `identity` is what the daemon answered to it:
    the token's name, scope and volumes. Raises ValueError at once for an
    address that is not tcp://HOST:PORT, an empty token or an unusable CA file."""

    port_hint = "is it splitd's remote admin port, --admin-listen?"

    def __init__(self, uri: str, token: str, tls_ca: str | None = None, timeout: float = 60.0):
        import ssl

        self.host, self.port = parse_connect(uri)
        super().__init__(uri, timeout)
        self.where = uri
        self._token = token.strip()
        if not self._token:
            raise ValueError("the token is empty")
        try:
            self._tls = ssl.create_default_context(cafile=tls_ca)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"cannot load the TLS CA {tls_ca}: {e}") from None
        self.identity: dict[str, Any] | None = None

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        import ssl

        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            reason = ("name or address not known" if isinstance(e, socket.gaierror)
                      else _reason(e, peer=self.peer))
            raise AdminError(ErrorCode.UNREACHABLE,
                             f"cannot reach {self.peer} at {self.where}: {reason}") from None
        try:
            sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except ssl.SSLCertVerificationError as e:
            raw.close()
            raise AdminError(ErrorCode.TLS, f"TLS failed: the certificate of {self.peer} at {self.where} "
                                            f"is not trusted ({e.verify_message}); give the CA "
                                            "that signed it with --tls-ca") from None
        except (ssl.SSLError, OSError) as e:
            raw.close()
            reason = e.reason if isinstance(e, ssl.SSLError) and e.reason else _reason(e, peer=self.peer)
            raise AdminError(ErrorCode.TLS, f"TLS failed with {self.peer} at {self.where}: {reason} "
                                            f"({self.port_hint})"
                             ) from None
        self._sock = sock
        try:
            # The first request on the connection; call() finds it connected.
            self.identity = self.call("auth", token=self._token)
        except AdminError:
            self.close()
            raise
        return sock


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"),
               (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def _reason(e: OSError, path: str | None = None, peer: str = "splitd") -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if e.errno == errno.ENOENT:
        return f"no such socket (is {peer} running?)"
    if e.errno in (errno.ECONNREFUSED, errno.ENOTSOCK) and path is not None:
        # Linux refuses a connection to a directory or a regular file as it
        # does one to a socket nobody listens on: say which it is.
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = None
        if mode is not None and not stat.S_ISSOCK(mode):
            kind = next((k for test, k in _FILE_KINDS if test(mode)), "something else")
            return f"{path} is {kind}, not a socket"
    if e.errno == errno.ECONNREFUSED:
        return f"connection refused (is {peer} running?)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or str(e)
