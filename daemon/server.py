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


# A client whose queued replies have not moved for this long is "stalled".
STALL_GRACE = 10.0
WATCH_EVERY = 1.0


class NBDServer:
    def __init__(self, exports, registry, *, tls_context=None, max_connections: int = 256,
                 max_inflight: int = 64, handshake_timeout: float = 10.0,
                 reply_memory: int = 256 * 1024 * 1024):
        self.exports = exports
        self.registry = registry
        self.tls_context = tls_context
        self.max_connections = max_connections
        self.max_inflight = max_inflight
        self.handshake_timeout = handshake_timeout
        self.reply_memory = reply_memory
        self.connections: set[NBDConnection] = set()
        self.stopping = False
        self._watch: asyncio.Task | None = None
        # Per connection: (bytes queued at the last look, when they last moved).
        self._queued: dict[NBDConnection, tuple[int, float]] = {}

    def protocol_factory(self, listener):
        return lambda: NBDConnection(self, listener)

    # Called by connections.
    def admit(self, conn: NBDConnection) -> bool:
        if len(self.connections) >= self.max_connections:
            return False
        self.connections.add(conn)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_replies())
        return True

    def forget(self, conn: NBDConnection) -> None:
        self.connections.discard(conn)
        self._queued.pop(conn, None)
        self.registry.remove(conn)

    # -- reply memory, in total ---------------------------------------------------------

    # Each connection holds about one reply it has not sent (its flow control:
    # daemon/connection.py), so the total is bounded by the connection cap;
    # at 256 connections that is several GiB. This bounds it tighter: while
    # the replies queued for all clients pass reply_memory, the clients that
    # have not read any of theirs for STALL_GRACE seconds are disconnected,
    # the largest first. A client that reads, however slowly, is never dropped;
    # nor is any while the total is under the bound.

    async def _watch_replies(self) -> None:
        # Background task: handles its own errors.
        while not self.stopping:
            await asyncio.sleep(WATCH_EVERY)
            try:
                self.check_reply_memory(time.monotonic())
            except Exception:  # noqa: BLE001 -- logged; the next look tries again
                log.exception("reply memory check failed")

    def check_reply_memory(self, now: float) -> None:
        total = 0
        stalled = []
        for conn in list(self.connections):
            t = conn.transport
            queued = t.get_write_buffer_size() if t is not None and not t.is_closing() else 0
            last, since = self._queued.get(conn, (0, now))
            if queued == 0 or queued < last:
                since = now
            self._queued[conn] = (queued, since)
            total += queued
            if queued and now - since >= STALL_GRACE:
                stalled.append((queued, conn))
        if total <= self.reply_memory:
            return
        for queued, conn in sorted(stalled, key=lambda x: -x[0]):
            conn.close_now(f"{queued} bytes of replies unread for {now - self._queued[conn][1]:.0f} s "
                           f"while replies for all clients ({total} bytes) exceed the "
                           f"{self.reply_memory} byte bound")
            total -= queued
            if total <= self.reply_memory:
                return

    async def shutdown(self, grace: float) -> None:
        """Stop serving: new requests get ESHUTDOWN, in-flight ones finish
        (within `grace` seconds), then every connection is closed."""
        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
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
