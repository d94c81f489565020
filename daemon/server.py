"""The NBD server: limits, the set of live connections, and graceful stop.

Listeners (daemon/listeners.py) create one NBDConnection per client through
`protocol_factory`; this object is what those connections share.
"""
from __future__ import annotations

import asyncio
import logging
import time

from .connection import NBDConnection

log = logging.getLogger("splitd.nbd")


class NBDServer:
    def __init__(self, exports, registry, *, tls_context=None, max_connections: int = 256,
                 max_inflight: int = 64, handshake_timeout: float = 10.0):
        self.exports = exports
        self.registry = registry
        self.tls_context = tls_context
        self.max_connections = max_connections
        self.max_inflight = max_inflight
        self.handshake_timeout = handshake_timeout
        self.connections: set[NBDConnection] = set()
        self.stopping = False

    def protocol_factory(self, listener):
        return lambda: NBDConnection(self, listener)

    # Called by connections.
    def admit(self, conn: NBDConnection) -> bool:
        if len(self.connections) >= self.max_connections:
            return False
        self.connections.add(conn)
        return True

    def forget(self, conn: NBDConnection) -> None:
        self.connections.discard(conn)
        self.registry.remove(conn)

    async def shutdown(self, grace: float) -> None:
        """Stop serving: new requests get ESHUTDOWN, in-flight ones finish
        (within `grace` seconds), then every connection is closed."""
        self.stopping = True
        for conn in list(self.connections):
            conn.begin_shutdown()
        deadline = time.monotonic() + grace
        while any(c.inflight for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        # Give closing transports a moment to send what they hold.
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close_now("shutdown grace period over")
