"""Who is connected: the registry the NBD server fills and the admin API reads.

The NBD server adds a connection once it enters transmission (an export is
chosen) and removes it when it closes. The admin side uses it to refuse
deleting a volume in use, to force those connections closed, for status, and
for `connections`: each one's number, export, peer and read counters.

The read counters are the connection's own attributes (read_bytes,
read_requests), counted on its request path by one integer add each
(daemon/connection.py, _dispatch); the registry only reads them here. The
last CLOSED_KEPT connections to close are kept with their final counts, so
that what a client read can still be asked once it has disconnected (a
backup's reads, checked after the backup).
"""
from __future__ import annotations

import time
from collections import deque
from typing import Protocol

# Closed connections remembered, with their counters (a bound: a client that
# connects in a loop cannot make us keep more).
CLOSED_KEPT = 64


class Closable(Protocol):
    # READ requests served since the export was chosen, and the bytes they asked for.
    read_requests: int
    read_bytes: int

    def close_now(self, reason: str) -> None: ...


class ConnectionInfo:
    __slots__ = ("conn", "id", "export", "peer", "listener", "since", "closed")

    def __init__(self, conn: Closable, id: int, export: str, peer: str, listener: str):
        self.conn = conn
        self.id = id
        self.export = export
        self.peer = peer
        self.listener = listener
        self.since = time.time()
        self.closed: dict | None = None     # as_dict() frozen when it closed

    def as_dict(self) -> dict:
        if self.closed is not None:
            return self.closed
        return {"id": self.id, "export": self.export, "peer": self.peer,
                "listener": self.listener, "since": round(self.since, 3),
                "read_requests": self.conn.read_requests, "read_bytes": self.conn.read_bytes}

    def close(self) -> None:
        """Freeze what it shows, and let go of the connection."""
        self.closed = dict(self.as_dict(), closed=round(time.time(), 3))
        self.conn = None  # type: ignore[assignment]


class ConnectionRegistry:
    def __init__(self) -> None:
        self._by_conn: dict[Closable, ConnectionInfo] = {}
        self._closed: deque[ConnectionInfo] = deque(maxlen=CLOSED_KEPT)
        self._last_id = 0   # connections are numbered from 1, never reused

    def add(self, conn: Closable, export: str, peer: str, listener: str) -> None:
        self._last_id += 1
        self._by_conn[conn] = ConnectionInfo(conn, self._last_id, export, peer, listener)

    def remove(self, conn: Closable) -> None:
        info = self._by_conn.pop(conn, None)
        if info is not None:
            info.close()
            self._closed.append(info)

    def count(self, export: str | None = None) -> int:
        if export is None:
            return len(self._by_conn)
        return sum(1 for c in self._by_conn.values() if c.export == export)

    def close_export(self, export: str, reason: str) -> int:
        """Close every connection to `export` at once; returns how many."""
        victims = [c for c in self._by_conn.values() if c.export == export]
        for info in victims:
            conn = info.conn
            conn.close_now(reason)
            self.remove(conn)
        return len(victims)

    def snapshot(self) -> list[dict]:
        """The open connections, oldest first."""
        return [c.as_dict() for c in self._by_conn.values()]

    def closed(self) -> list[dict]:
        """The last CLOSED_KEPT connections to close, the last one last, each
        with `closed` (when) and its final counters."""
        return [c.as_dict() for c in self._closed]
