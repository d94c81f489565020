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

What a client without a token can make the daemon hold is bounded
(remoteapi/server.py's constants): at most MAX_UNAUTHENTICATED connections
between accept and a good token (more are closed at once), the handshake
timeout (--handshake-timeout) for TLS and the token line together, and
AUTH_LINE bytes for that line. An authenticated connection's lines are
limited to MAX_LINE (admin requests are small).

The connection itself (TLS over memory buffers, the token line, the bounds)
is remoteapi/server.py, shared with the host agent; this module is what is
the daemon's: its tokens, the scope of each admin method, the audit log.
The admin calls are answered as on the Unix socket: most at once, those that
open a backup store when done (a Future: the connection's next requests wait).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

from common.errors import Conflict, Forbidden, Unauthorized
from common.scopes import Scope
from controller.access import authorize, required_scope
from daemon.admin_server import handle_line
from remoteapi.server import MAX_CONNECTIONS, MAX_UNAUTHENTICATED, TokenConnection, TokenServer

if TYPE_CHECKING:
    from controller.service import Controller
    from volumes.store import TokenRecord

__all__ = ["MAX_CONNECTIONS", "MAX_UNAUTHENTICATED", "RemoteAdmin"]

log = logging.getLogger("splitd.remote_admin")

NEEDS_TOKEN = ("unauthorized: this admin port needs a token first: the first request must be "
               '{"method": "auth", "params": {"token": SECRET}} (splitctl --token-file FILE)')
BAD_TOKEN = ("unauthorized: the token is not valid (unknown, revoked or mistyped); "
             "make one with 'splitctl token create' on the daemon's host")


class RemoteAdmin:
    """The TCP listener of the remote admin API: the Gate of its TokenServer."""

    label = "remote admin"
    log = log
    needs_token = NEEDS_TOKEN
    bad_token = BAD_TOKEN

    def __init__(self, uri: str, controller: Controller, tls_context: ssl.SSLContext,
                 handshake_timeout: float):
        self.controller = controller
        self.server = TokenServer(uri, self, tls_context, handshake_timeout)
        self.listener = self.server.listener

    async def start(self) -> None:
        await self.server.start()
        log.info("remote admin API on %s (TLS, tokens)", ", ".join(self.listener.bound))

    async def stop(self) -> None:
        await self.server.stop()

    # -- the Gate ---------------------------------------------------------------------------

    def verify(self, secret: object) -> TokenRecord | None:
        return self.controller.tokens.verify(secret)

    def used(self, token: TokenRecord) -> None:
        self.controller.tokens.used(token)

    def still_valid(self, token: TokenRecord) -> bool:
        return self.controller.tokens.still_valid(token)

    def welcome(self, token: TokenRecord) -> dict[str, Any]:
        return {"token": token.name, "scope": token.scope, "volumes": token.volumes}

    def handle(self, conn: TokenConnection, line: bytes) -> bytes | asyncio.Future[bytes]:
        return handle_line(line, self.controller,
                           lambda method, params: self._authorize(conn, method, params))

    def _authorize(self, conn: TokenConnection, method: str, params: dict[str, Any] | None) -> None:
        token = conn.token
        assert token is not None
        if not self.still_valid(token):
            log.info("remote admin: %s: token %s was revoked; closing", conn.peer, token.name)
            raise Unauthorized(f"unauthorized: token {token.name!r} was revoked")
        if method == "auth":
            raise Conflict(f"this connection is authenticated already (token {token.name!r}); "
                           "to use another token, open another connection")
        try:
            authorize(token, method, params or {}, self.controller.pairs)
        except Forbidden as e:
            log.warning("remote admin: %s (token %s): %s refused: %s", conn.peer, token.name,
                        method, e)
            raise
        if required_scope(method) is not Scope.READ:
            # Who changed what, from where: the audit trail of remote changes.
            log.info("remote admin: %s (token %s): %s", conn.peer, token.name, method)
