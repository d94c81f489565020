"""The remote admin API: the admin server's JSON lines on TCP, only over TLS,
only with a bearer token (DESIGN.md "Listeners and ports").

A connection, in order (Phase):

    TLS      the TLS handshake; a client that speaks plaintext, or does not
             finish in time, is logged and closed
    AUTH     the first line must be
                 {"id": 1, "method": "auth", "params": {"token": "<secret>"}}
             answered {"id": 1, "result": {"token": NAME, "scope": ..., "volumes": ...}}
             or with error "unauthorized", after which the connection is closed
    SERVING  requests and replies exactly as on the Unix socket
             (daemon/admin_server.py), each first checked against the token:
             revoked since -> "unauthorized" and closed; outside its scope
             or volumes (controller/access.py) -> "forbidden"

What a client without a token can make the daemon hold is bounded: at most
MAX_UNAUTHENTICATED connections between accept and a good token (more are
closed at once), the handshake timeout (--handshake-timeout) for TLS and the
token line together, and AUTH_LINE bytes for that line. An authenticated
connection's lines are limited to MAX_REMOTE_LINE (admin requests are small).

Rule of this module: everything runs in the protocol's callbacks, on the
event loop, without a task: TLS is done here over memory buffers
(TLSSession), the admin calls are synchronous (as on the Unix socket).
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import ssl
from typing import TYPE_CHECKING, Any, cast

from common.errors import Conflict, ErrorCode, Forbidden, Unauthorized
from common.scopes import Scope
from controller.access import authorize, required_scope
from daemon.admin_server import _encode, _error, handle_line
from daemon.listeners import Listener, bind, close_all, parse_listen

if TYPE_CHECKING:
    from controller.service import Controller
    from volumes.store import TokenRecord

log = logging.getLogger("splitd.remote_admin")

MAX_UNAUTHENTICATED = 16
MAX_CONNECTIONS = 64
AUTH_LINE = 4096
MAX_REMOTE_LINE = 64 * 1024

NEEDS_TOKEN = ("unauthorized: this admin port needs a token first: the first request must be "
               '{"method": "auth", "params": {"token": SECRET}} (splitctl --token-file FILE)')
BAD_TOKEN = ("unauthorized: the token is not valid (unknown, revoked or mistyped); "
             "make one with 'splitctl token create' on the daemon's host")


class Phase(enum.Enum):
    TLS = "TLS handshake"
    AUTH = "waiting for the token"
    SERVING = "serving"
    CLOSED = "closed"


class RemoteAdmin:
    """The TCP listener of the remote admin API and its connections."""

    def __init__(self, uri: str, controller: Controller, tls_context: ssl.SSLContext,
                 handshake_timeout: float):
        self.listener: Listener = parse_listen(uri)
        self.controller = controller
        self.tls_context = tls_context
        self.handshake_timeout = handshake_timeout
        self.connections: set[RemoteAdminConnection] = set()
        self.unauthenticated = 0

    async def start(self) -> None:
        await bind(self.listener, lambda: RemoteAdminConnection(self))
        log.info("remote admin API on %s (TLS, tokens)", ", ".join(self.listener.bound))

    async def stop(self) -> None:
        await close_all([self.listener])
        for conn in list(self.connections):
            conn.close(abort=True)


class RemoteAdminConnection(asyncio.Protocol):
    def __init__(self, server: RemoteAdmin):
        self.server = server
        self.phase = Phase.TLS
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.buf = bytearray()
        self.token: TokenRecord | None = None
        self.paused = False             # our replies are not being read: read no more
        self.unauthenticated = False    # counted in server.unauthenticated
        self.timer: asyncio.TimerHandle | None = None
        self.tls = TLSSession(server.tls_context)

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are ones.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        server = self.server
        if (server.unauthenticated >= MAX_UNAUTHENTICATED
                or len(server.connections) >= MAX_CONNECTIONS):
            log.warning("remote admin: connection from %s refused: %d connections, %d of them "
                        "without a token yet", self.peer, len(server.connections),
                        server.unauthenticated)
            self.phase = Phase.CLOSED
            transport.abort()
            return
        server.connections.add(self)
        server.unauthenticated += 1
        self.unauthenticated = True
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(server.handshake_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        try:
            plain = self.tls.receive(data)
        except ssl.SSLError as e:
            if self.phase is Phase.TLS:
                log.warning("remote admin: TLS handshake with %s failed (%s): a plaintext "
                            "client, or one that does not trust this certificate; closed",
                            self.peer, _tls_reason(e))
            else:
                log.warning("remote admin: %s: TLS error (%s); closed", self.peer, _tls_reason(e))
            self._flush_tls()       # the alert, if OpenSSL made one
            self.close(abort=False, notify=False)
            return
        self._flush_tls()
        if self.phase is Phase.TLS and self.tls.established:
            self.phase = Phase.AUTH
        if plain:
            self.buf += plain
            self._process()
        if self.tls.peer_closed and self.phase is not Phase.CLOSED:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None and self.phase is Phase.SERVING:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and self.phase is Phase.SERVING:
            self.transport.resume_reading()
            self._process()

    # -- the phases -------------------------------------------------------------------------

    def _process(self) -> None:
        while not self.paused and self.phase in (Phase.AUTH, Phase.SERVING):
            limit = AUTH_LINE if self.phase is Phase.AUTH else MAX_REMOTE_LINE
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
            self._refuse(req_id, ErrorCode.UNAUTHORIZED, NEEDS_TOKEN)
            return
        tokens = self.server.controller.tokens
        token = tokens.verify(params["token"])
        if token is None:
            self._refuse(req_id, ErrorCode.UNAUTHORIZED, BAD_TOKEN)
            return
        try:
            tokens.used(token)
        except Exception as e:  # noqa: BLE001 (a full disk must not lock the admin out)
            log.warning("remote admin: cannot record the use of token %s: %s", token.name, e)
        self.token = token
        self.phase = Phase.SERVING
        self._authenticated()
        log.info("remote admin: %s authenticated with token %s (scope %s)",
                 self.peer, token.name, token.scope)
        self._send(_encode({"id": req_id, "result": {"token": token.name, "scope": token.scope,
                                                     "volumes": token.volumes}}))

    def _request(self, line: bytes) -> None:
        reply = handle_line(line, self.server.controller, self._authorize)
        self._send(reply)
        if self.token is not None and not self.server.controller.tokens.still_valid(self.token):
            self.close()

    def _authorize(self, method: str, params: dict[str, Any] | None) -> None:
        token = self.token
        assert token is not None
        if not self.server.controller.tokens.still_valid(token):
            log.info("remote admin: %s: token %s was revoked; closing", self.peer, token.name)
            raise Unauthorized(f"unauthorized: token {token.name!r} was revoked")
        if method == "auth":
            raise Conflict(f"this connection is authenticated already (token {token.name!r}); "
                           "to use another token, open another connection")
        try:
            authorize(token, method, params or {}, self.server.controller.pairs)
        except Forbidden as e:
            log.warning("remote admin: %s (token %s): %s refused: %s", self.peer, token.name,
                        method, e)
            raise
        if required_scope(method) is not Scope.READ:
            # Who changed what, from where: the audit trail of remote changes.
            log.info("remote admin: %s (token %s): %s", self.peer, token.name, method)

    # -- ending ---------------------------------------------------------------------------------

    def _timed_out(self) -> None:
        self.timer = None
        if self.phase in (Phase.TLS, Phase.AUTH):
            log.warning("remote admin: %s sent no token within %gs (%s); closed", self.peer,
                        self.server.handshake_timeout, self.phase.value)
            self.close(abort=True)

    def _refuse(self, req_id: object, code: str, message: str) -> None:
        log.warning("remote admin: %s refused: %s", self.peer, message)
        self._send(_error(req_id, code, message))
        self.close()

    def _send(self, reply: bytes) -> None:
        if self.phase is not Phase.CLOSED:
            self.tls.send(reply)
            self._flush_tls()

    def _flush_tls(self) -> None:
        out = self.tls.outgoing()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def close(self, abort: bool = False, notify: bool = True) -> None:
        """Close after what was written (or at once, with abort); `notify`
        ends the TLS session properly first (close_notify)."""
        transport = self.transport
        if notify and not abort and self.phase in (Phase.AUTH, Phase.SERVING):
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


class TLSSession:
    """Server-side TLS over memory buffers (ssl.MemoryBIO): bytes from the
    network in, plaintext out; plaintext in, bytes for the network out. No
    socket here, so nothing the client sends can arrive before TLS is ready
    for it (loop.start_tls on a fresh connection races the first read)."""

    def __init__(self, context: ssl.SSLContext):
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False
        self.peer_closed = False

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the network; return the plaintext they complete.
        Raises ssl.SSLError for a failed handshake or a broken session."""
        self._incoming.write(data)
        if not self.established:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.established = True
        chunks = []
        while True:
            try:
                chunk = self._ssl.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def send(self, plaintext: bytes) -> None:
        self._ssl.write(plaintext)

    def outgoing(self) -> bytes:
        """What TLS has for the network (handshake, records, alerts)."""
        return self._outgoing.read()

    def shutdown(self) -> None:
        """Start a proper close (close_notify); the peer's answer is not awaited."""
        try:
            self._ssl.unwrap()
        except ssl.SSLError:
            pass


def _tls_reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason.lower().replace("_", " ")
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    return str(e) or type(e).__name__
