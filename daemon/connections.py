"""Who is connected: the registry the NBD server fills and the admin API reads.

The NBD server adds a connection once it enters transmission (an export is
chosen) and removes it when it closes. The admin side uses it to refuse
deleting a volume in use, to force those connections closed, for status, and
for `connections`: each one's number, export, peer and read counters.

The read counters are the connection's own attributes (read_bytes,
read_requests), counted on its request path by one integer add each
(daemon/connection.py, _dispatch); the registry only reads them here.
"""
from __future__ import annotations

import time
from typing import Protocol


class Closable(Protocol):
    # READ requests served since the export was chosen, and the bytes they asked for.
    read_requests: int
    read_bytes: int

    def close_now(self, reason: str) -> None: ...


class ConnectionInfo:
    __slots__ = ("conn", "id", "export", "peer", "listener", "since")

    def __init__(self, conn: Closable, id: int, export: str, peer: str, listener: str):
        self.conn = conn
        self.id = id
        self.export = export
        self.peer = peer
        self.listener = listener
        self.since = time.time()

    def as_dict(self) -> dict:
        return {"id": self.id, "export": self.export, "peer": self.peer,
                "listener": self.listener, "since": round(self.since, 3),
                "read_requests": self.conn.read_requests, "read_bytes": self.conn.read_bytes}


class ConnectionRegistry:
    def __init__(self) -> None:
        self._by_conn: dict[Closable, ConnectionInfo] = {}
        self._last_id = 0   # connections are numbered from 1, never reused

    def add(self, conn: Closable, export: str, peer: str, listener: str) -> None:
        self._last_id += 1
        self._by_conn[conn] = ConnectionInfo(conn, self._last_id, export, peer, listener)

    def remove(self, conn: Closable) -> None:
        self._by_conn.pop(conn, None)

    def count(self, export: str | None = None) -> int:
        if export is None:
            return len(self._by_conn)
        return sum(1 for c in self._by_conn.values() if c.export == export)

    def close_export(self, export: str, reason: str) -> int:
        """Close every connection to `export` at once; returns how many."""
        victims = [c for c in self._by_conn.values() if c.export == export]
        for info in victims:
            info.conn.close_now(reason)
            self._by_conn.pop(info.conn, None)
        return len(victims)

    def snapshot(self) -> list[dict]:
        return [c.as_dict() for c in self._by_conn.values()]
