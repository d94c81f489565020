"""JSON lines over TLS behind a bearer token: the connection, its phases and its
bounds. Its owner (a Gate) says whose tokens count and what a request does.

A connection, in order (Phase):

    TLS      the TLS handshake; a client that speaks plaintext, or does not
             finish in time, is logged and closed
    AUTH     the first line must be
                 {"id": 1, "method": "auth", "params": {"token": "<secret>"}}
             answered {"id": 1, "result": gate.welcome(token)} or with error
             "unauthorized", after which the connection is closed
    SERVING  every further line goes to gate.handle(); a token revoked since
             is refused ("unauthorized") and the connection closed

A connection made without TLS (TokenServer(..., tls_context=None): a local
Unix socket whose file mode is the access control) starts in SERVING with
token LOCAL.

What a client without a token can make us hold is bounded: at most
MAX_UNAUTHENTICATED connections between accept and a good token (more are
closed at once), `handshake_timeout` for TLS and the token line together, and
AUTH_LINE bytes for that line. Every connection's lines are limited to
MAX_LINE, and to MAX_CONNECTIONS connections in all.

Rule of this module: everything runs in the protocol's callbacks, on the
event loop, without a task of its own. A request whose answer takes time
(gate.handle returns a future) holds the connection's next requests, and
stops reading from it, until it is answered: replies stay in order.
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import ssl
from typing import Any, Protocol, cast

from common.errors import ErrorCode
from daemon.listeners import Listener, bind, close_all, parse_listen
from remoteapi.lines import encode, error
from remoteapi.tls import TLSSession, tls_reason

MAX_UNAUTHENTICATED = 16
MAX_CONNECTIONS = 64
AUTH_LINE = 4096
MAX_LINE = 64 * 1024

# The token of a connection on a local socket: full rights, nothing to revoke.
LOCAL = "local"


class Phase(enum.Enum):
    TLS = "TLS handshake"
    AUTH = "waiting for the token"
    SERVING = "serving"
    CLOSED = "closed"


class Gate(Protocol):
    """What a TokenServer asks of its owner. `label` starts its log lines
    ("remote admin"); `needs_token` and `bad_token` are the refusals of a
    first line that is not an auth request, and of an unknown secret."""

    label: str
    log: logging.Logger
    needs_token: str
    bad_token: str

    def verify(self, secret: object) -> Any | None: ...

    def used(self, token: Any) -> None: ...

    def still_valid(self, token: Any) -> bool: ...

    def welcome(self, token: Any) -> dict[str, Any]: ...

    def handle(self, conn: TokenConnection, line: bytes) -> bytes | asyncio.Future[bytes]: ...


class TokenServer:
    """The listener (tcp://ADDR:PORT, or unix:PATH) and its connections."""

    def __init__(self, uri: str, gate: Gate, tls_context: ssl.SSLContext | None,
                 handshake_timeout: float):
        self.listener: Listener = parse_listen(uri)
        self.gate = gate
        self.tls_context = tls_context
        self.handshake_timeout = handshake_timeout
        self.connections: set[TokenConnection] = set()
        self.unauthenticated = 0

    async def start(self) -> None:
        await bind(self.listener, lambda: TokenConnection(self))

    async def stop(self) -> None:
        await self.stop_listening()
        self.drop_connections(abort=True)

    async def stop_listening(self) -> None:
        """No new connections; those open go on (to be answered, then dropped)."""
        await close_all([self.listener])

    def drop_connections(self, abort: bool) -> None:
        """Close every connection: at once (abort), or after what was written."""
        for conn in list(self.connections):
            conn.close(abort=abort)


class TokenConnection(asyncio.Protocol):
    def __init__(self, server: TokenServer):
        self.server = server
        self.gate = server.gate
        self.log = server.gate.log
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.buf = bytearray()
        self.token: Any = None
        self.paused = False             # our replies are not being read: read no more
        self.pending: asyncio.Future[bytes] | None = None  # a request being answered
        self.unauthenticated = False    # counted in server.unauthenticated
        self.timer: asyncio.TimerHandle | None = None
        context = server.tls_context
        self.tls = TLSSession(context) if context is not None else None
        self.phase = Phase.TLS if self.tls is not None else Phase.SERVING

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are ones.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        elif self.tls is None:
            self.peer = "local"
        server = self.server
        if (server.unauthenticated >= MAX_UNAUTHENTICATED
                or len(server.connections) >= MAX_CONNECTIONS):
            self.log.warning("%s: connection from %s refused: %d connections, %d of them "
                             "without a token yet", self.gate.label, self.peer,
                             len(server.connections), server.unauthenticated)
            self.phase = Phase.CLOSED
            transport.abort()
            return
        server.connections.add(self)
        if self.tls is None:
            self.token = LOCAL
            return
        server.unauthenticated += 1
        self.unauthenticated = True
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(server.handshake_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.tls is None:
            self.buf += data
            self._process()
            return
        try:
            plain = self.tls.receive(data)
        except ssl.SSLError as e:
            if self.phase is Phase.TLS:
                self.log.warning("%s: TLS handshake with %s failed (%s): a plaintext client, "
                                 "or one that does not trust this certificate; closed",
                                 self.gate.label, self.peer, tls_reason(e))
            else:
                self.log.warning("%s: %s: TLS error (%s); closed", self.gate.label, self.peer,
                                 tls_reason(e))
            self._flush_tls()       # the alert, if OpenSSL made one
            self.close(abort=False, notify=False)
            return
        self._flush_tls()
        if self.phase is Phase.TLS and self.tls.established:
            self.phase = Phase.AUTH
        if plain:
            self.buf += plain
            self._process()
        if self.tls.peer_closed and self.phase is not Phase.CLOSED and self.pending is None:
            self.close()

    def eof_received(self) -> bool | None:
        # A local client that half-closes after its request still gets the answer.
        return self.pending is not None or None

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None and self.phase is Phase.SERVING:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and self.phase is Phase.SERVING and self.pending is None:
            self.transport.resume_reading()
            self._process()

    # -- the phases -------------------------------------------------------------------------

    def _process(self) -> None:
        while (not self.paused and self.pending is None
               and self.phase in (Phase.AUTH, Phase.SERVING)):
            limit = AUTH_LINE if self.phase is Phase.AUTH else MAX_LINE
            end = self.buf.find(b"\n", 0, limit + 1)
            if end < 0:
                if len(self.buf) <= limit:
                    return
                if self.phase is Phase.AUTH:
                    self._refuse(None, ErrorCode.UNAUTHORIZED,
                                 f"unauthorized: the token line is longer than {limit} bytes")
                else:
                    self._refuse(None, ErrorCode.BAD_REQUEST,
                                 f"request line longer than {limit} bytes")
                return
            line = bytes(self.buf[:end])
            del self.buf[:end + 1]
            if not line.strip():
                continue
            if self.phase is Phase.AUTH:
                self._authenticate(line)
            else:
                self._request(line)

    def _authenticate(self, line: bytes) -> None:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            request = None
        req_id = request.get("id") if isinstance(request, dict) else None
        params = request.get("params") if isinstance(request, dict) else None
        if (not isinstance(request, dict) or request.get("method") != "auth"
                or not isinstance(params, dict) or "token" not in params):
            self._refuse(req_id, ErrorCode.UNAUTHORIZED, self.gate.needs_token)
            return
        token = self.gate.verify(params["token"])
        if token is None:
            self._refuse(req_id, ErrorCode.UNAUTHORIZED, self.gate.bad_token)
            return
        try:
            self.gate.used(token)
        except Exception as e:  # noqa: BLE001 (a full disk must not lock the admin out)
            self.log.warning("%s: cannot record the use of token %s: %s", self.gate.label,
                             token.name, e)
        self.token = token
        self.phase = Phase.SERVING
        self._authenticated()
        self.log.info("%s: %s authenticated with token %s (scope %s)", self.gate.label,
                      self.peer, token.name, token.scope)
        self._send(encode({"id": req_id, "result": self.gate.welcome(token)}))

    def _request(self, line: bytes) -> None:
        reply = self.gate.handle(self, line)
        if isinstance(reply, bytes):
            self._answered(reply)
            return
        # Answered later (a worker thread): hold this connection's next requests.
        self.pending = reply
        if self.transport is not None:
            self.transport.pause_reading()
        reply.add_done_callback(self._later)

    def _later(self, future: asyncio.Future[bytes]) -> None:
        self.pending = None
        if self.phase is Phase.CLOSED or future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self.log.error("%s: %s: a request failed: %r", self.gate.label, self.peer, exc)
            self._refuse(None, ErrorCode.INTERNAL, f"internal error: {exc}")
            return
        self._answered(future.result())
        if self.phase is Phase.CLOSED:
            return
        if self.tls is not None and self.tls.peer_closed:
            self.close()
            return
        if self.transport is not None and not self.paused:
            self.transport.resume_reading()
        self._process()

    def _answered(self, reply: bytes) -> None:
        self._send(reply)
        if self.token not in (None, LOCAL) and not self.gate.still_valid(self.token):
            self.close()

    # -- ending ---------------------------------------------------------------------------------

    def _timed_out(self) -> None:
        self.timer = None
        if self.phase in (Phase.TLS, Phase.AUTH):
            self.log.warning("%s: %s sent no token within %gs (%s); closed", self.gate.label,
                             self.peer, self.server.handshake_timeout, self.phase.value)
            self.close(abort=True)

    def _refuse(self, req_id: object, code: str, message: str) -> None:
        self.log.warning("%s: %s refused: %s", self.gate.label, self.peer, message)
        self._send(error(req_id, code, message))
        self.close()

    def _send(self, reply: bytes) -> None:
        if self.phase is Phase.CLOSED or self.transport is None:
            return
        if self.tls is None:
            if not self.transport.is_closing():
                self.transport.write(reply)
            return
        self.tls.send(reply)
        self._flush_tls()

    def _flush_tls(self) -> None:
        out = self.tls.outgoing() if self.tls is not None else b""
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def close(self, abort: bool = False, notify: bool = True) -> None:
        """Close after what was written (or at once, with abort); `notify`
        ends the TLS session properly first (close_notify)."""
        transport = self.transport
        if (notify and not abort and self.tls is not None
                and self.phase in (Phase.AUTH, Phase.SERVING)):
            self.tls.shutdown()
            self._flush_tls()
        self._finish()
        if transport is not None:
            if abort:
                transport.abort()
            else:
                transport.close()

    def _authenticated(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.unauthenticated:
            self.unauthenticated = False
            self.server.unauthenticated -= 1

    def _finish(self) -> None:
        # Idempotent: reached from connection_lost, a failed handshake, close().
        self._authenticated()
        self.phase = Phase.CLOSED
        self.buf = bytearray()
        self.server.connections.discard(self)
