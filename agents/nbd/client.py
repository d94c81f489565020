"""The NBD client the agents use: `open(uri)` gives a Client over one or
more connections to one export.

    async with await nbd.open("nbd+unix:///vol?socket=/run/splitd/nbd.sock",
                              connections=4) as cl:
        data = await cl.read(0, 4 << 20)
        async for offset, length, flags in cl.extents("x-splitd:delta"):
            ...

Several connections are opened only when the export advertises
CAN_MULTI_CONN ("Transmission flags": then a FLUSH on any connection covers
writes completed on every one, and they see each other's writes); otherwise
one. Requests go to the connection with the fewest bytes, then requests, in
flight; a READ or WRITE larger than the server's maximum payload (NBD_INFO_
BLOCK_SIZE) is split, its pieces in flight at once, possibly on several
connections. Callers that want throughput keep several requests in flight
themselves (asyncio.gather, or a task per range: each call waits for its own
replies only), or use iter_read(), which keeps a window of READs ahead.
"""
from __future__ import annotations

import asyncio
import errno
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

import nbdwire as c

from .connection import Connection, Limits, Negotiated
from .errors import ConnectError
from .uri import Target, parse_uri, tls_context

__all__ = ["DEFAULT_CONTEXTS", "DELTA", "PENDING", "Client", "Stats", "open"]

PENDING = c.SPLITD_PENDING      # regions of a secondary not yet copied (flag 1)
DELTA = c.SPLITD_DELTA          # regions changed since the previous split (flag 1)
DEFAULT_CONTEXTS = (c.BASE_ALLOCATION, PENDING, DELTA)

# A request's length is 32 bits; TRIM / WRITE_ZEROES / BLOCK_STATUS ranges
# beyond it are sent as several requests of at most this (a multiple of any
# power-of-two minimum block size up to 1 GiB).
MAX_RANGE = 1 << 31


async def open(uri: str | Target, connections: int = 1, *,
               meta_contexts: Sequence[str] = DEFAULT_CONTEXTS,
               max_requests: int = 16, max_bytes: int = 64 << 20,
               timeout: float | None = None, connect_timeout: float = 30.0,
               ca_file: str | None = None, ca_dir: str | None = None,
               cert: str | None = None, key: str | None = None) -> Client:
    """Connect to the export an NBD URI names (see agents.nbd.uri).

    connections: how many to open if the export allows multi-conn (else 1).
    meta_contexts: asked for with SET_META_CONTEXT; those the server does
      not know are simply not there (Client.contexts).
    max_requests / max_bytes: in flight per connection.
    timeout: seconds a request may wait for its reply; past it the
      connection is closed and its requests fail with RequestTimeout.
    ca_file / ca_dir / cert / key: TLS, instead of the URI's tls-certificates.
    """
    if connections < 1:
        raise ValueError(f"connections must be at least 1, not {connections}")
    target = parse_uri(uri) if isinstance(uri, str) else uri
    tls = (tls_context(target, ca_file=ca_file, ca_dir=ca_dir, cert=cert, key=key)
           if target.tls else None)
    limits = Limits(max_requests, max_bytes, timeout, connect_timeout)
    contexts = tuple(meta_contexts)
    first = await Connection.connect(target, limits, contexts, tls)
    conns = [first]
    assert first.negotiated is not None
    if connections > 1 and first.negotiated.flags & c.TF_CAN_MULTI_CONN:
        more = await asyncio.gather(*(Connection.connect(target, limits, contexts, tls)
                                      for _ in range(connections - 1)), return_exceptions=True)
        failed = [m for m in more if isinstance(m, BaseException)]
        conns += [m for m in more if isinstance(m, Connection)]
        if failed:
            await asyncio.gather(*(cn.close() for cn in conns), return_exceptions=True)
            raise failed[0]
        for cn in conns[1:]:
            assert cn.negotiated is not None
            # Context ids are per connection; the names must be the same.
            mine, theirs = cn.negotiated, first.negotiated
            if (mine.size, mine.flags, set(mine.contexts)) != (theirs.size, theirs.flags,
                                                                set(theirs.contexts)):
                await asyncio.gather(*(cn.close() for cn in conns), return_exceptions=True)
                raise ConnectError(f"{target.where()}: connections disagree on the export's "
                                   "size, flags or meta contexts")
    return Client(target, conns)


@dataclass
class Stats:
    """What this client asked of the server: READ / WRITE requests and
    their bytes (done, successful), BLOCK_STATUS requests. The backup agent
    reports its reads with these (how much of a volume an incremental read)."""
    reads: int = 0
    bytes_read: int = 0
    writes: int = 0
    bytes_written: int = 0
    block_status: int = 0


class Client:
    """One export over one or more connections."""

    def __init__(self, target: Target, connections: list[Connection]):
        self.target = target
        self.connections = connections
        neg = connections[0].negotiated
        assert neg is not None
        self.negotiated: Negotiated = neg
        bs = neg.block_size
        self.minimum = bs.minimum if bs else 1
        self.preferred = bs.preferred if bs else 4096
        self.max_payload = min(cn.max_payload for cn in connections)
        # Pieces of a split READ/WRITE: the largest multiple of the minimum.
        self.piece = self.max_payload - self.max_payload % self.minimum
        self.max_range = MAX_RANGE - MAX_RANGE % self.minimum
        self.stats = Stats()

    # -- what the export is -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.negotiated.size

    @property
    def flags(self) -> int:
        return self.negotiated.flags

    @property
    def read_only(self) -> bool:
        return bool(self.flags & c.TF_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & c.TF_CAN_MULTI_CONN)

    @property
    def contexts(self) -> frozenset[str]:
        """The meta contexts the server agreed to."""
        return frozenset(self.negotiated.contexts)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Wait for what is in flight, then disconnect every connection."""
        await asyncio.gather(*(cn.close() for cn in self.connections), return_exceptions=True)

    # -- helpers ----------------------------------------------------------------------------

    def _pick(self) -> Connection:
        conns = self.connections
        if len(conns) == 1:
            return conns[0]
        return min(conns, key=Connection.load)

    def _check(self, what: str, offset: int, length: int, write: bool = False,
               need: int = 0) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{what} {offset}+{length} is outside the export "
                             f"(size {self.size})")
        if (offset % self.minimum or length % self.minimum) and offset + length != self.size:
            # "Block size constraints": requests SHOULD be aligned to the minimum.
            raise ValueError(f"{what} {offset}+{length} is not aligned to the export's "
                             f"minimum block size {self.minimum}")
        if write and self.read_only:
            raise PermissionError(f"{what}: {self.target.where()} is read-only")
        missing = need & ~self.flags
        if missing:
            names = {c.TF_SEND_FUA: "FUA", c.TF_SEND_TRIM: "TRIM", c.TF_SEND_FAST_ZERO: "FAST_ZERO",
                     c.TF_SEND_WRITE_ZEROES: "WRITE_ZEROES"}
            lacking = ", ".join(v for k, v in names.items() if missing & k)
            raise OSError(errno.ENOTSUP, f"{what}: {self.target.where()} does not support {lacking}")

    @staticmethod
    def _pieces(offset: int, length: int, step: int) -> list[tuple[int, int]]:
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    async def _all(self, coros: list[Any]) -> None:
        if len(coros) == 1:
            await coros[0]
            return
        tasks = [asyncio.ensure_future(co) for co in coros]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    # -- data -------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        """`length` bytes from `offset` (holes read as zeroes)."""
        buf = bytearray(length)
        await self._readinto(offset, memoryview(buf), fresh=True)
        return buf

    async def iter_read(self, offset: int = 0, length: int | None = None, *,
                        request: int = 4 << 20, ahead: int = 8, reuse: bool = False
                        ) -> AsyncIterator[tuple[int, bytearray | memoryview]]:
        """(offset, data) for [offset, offset+length) in pieces of `request`
        bytes, in order, with up to `ahead` READs in flight (over every
        connection) so the next pieces arrive while the caller works on this
        one. Leaving the loop early cancels what is still coming (when the
        generator is closed: `async with contextlib.aclosing(...)` makes that
        happen at once).

        reuse=True: the data is a memoryview into one of ahead + 1 buffers
        used in turn, valid only until the next step (copy what you keep);
        this saves allocating and zeroing a buffer for every piece."""
        if length is None:
            length = self.size - offset
        self._check("READ", offset, length)
        if request <= 0 or request % self.minimum or ahead < 1:
            raise ValueError(f"request={request} must be a positive multiple of the minimum "
                             f"block size {self.minimum}, ahead={ahead} at least 1")
        pieces = self._pieces(offset, length, request)
        free = [bytearray(min(request, length)) for _ in range(ahead + 1)] if reuse else []
        coming: deque[tuple[int, asyncio.Future[Any]]] = deque()
        lent: bytearray | None = None       # (reuse) the buffer the caller holds
        nxt = 0

        async def into(o: int, n: int, buf: bytearray) -> tuple[bytearray, memoryview]:
            view = memoryview(buf)[:n]
            await self._readinto(o, view, fresh=False)
            return buf, view

        try:
            while nxt < len(pieces) or coming:
                if lent is not None:
                    free.append(lent)
                    lent = None
                while nxt < len(pieces) and len(coming) < ahead:
                    o, n = pieces[nxt]
                    nxt += 1
                    co = into(o, n, free.pop()) if reuse else self.read(o, n)
                    coming.append((o, asyncio.ensure_future(co)))
                o, fut = coming.popleft()
                if reuse:
                    lent, data = await fut
                    yield o, data
                else:
                    yield o, await fut
        finally:
            for _, fut in coming:
                fut.cancel()

    async def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Read len(buf) bytes from offset into buf. If the call is
        cancelled, buf may still be written until the replies arrive."""
        await self._readinto(offset, memoryview(buf).cast("B"), fresh=False)

    async def _readinto(self, offset: int, view: memoryview, fresh: bool) -> None:
        length = len(view)
        self._check("READ", offset, length)
        if length == 0:
            return
        pieces = self._pieces(offset, length, self.piece)
        await self._all([self._pick().request(c.CMD_READ, o, n, dest=view[o - offset:o - offset + n],
                                              fresh=fresh)
                         for o, n in pieces])
        self.stats.reads += len(pieces)
        self.stats.bytes_read += length

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        """Write data at offset; fua: durable before the reply. Do not
        change data until this returns."""
        view = memoryview(data).cast("B")
        length = len(view)
        self._check("WRITE", offset, length, write=True, need=c.TF_SEND_FUA if fua else 0)
        if length == 0:
            return
        flags = c.CMD_FLAG_FUA if fua else 0
        pieces = self._pieces(offset, length, self.piece)
        await self._all([self._pick().request(c.CMD_WRITE, o, n, flags,
                                              payload=view[o - offset:o - offset + n])
                         for o, n in pieces])
        self.stats.writes += len(pieces)
        self.stats.bytes_written += length

    async def zero(self, offset: int, length: int, *, fua: bool = False, punch: bool = True,
                   fast: bool = False) -> None:
        """WRITE_ZEROES. punch=False sends NO_HOLE (allocate, do not punch);
        fast=True sends FAST_ZERO: the server fails with ENOTSUP instead of
        zeroing slowly (a RequestError the caller may answer by writing)."""
        need = c.TF_SEND_WRITE_ZEROES | (c.TF_SEND_FAST_ZERO if fast else 0) | (
            c.TF_SEND_FUA if fua else 0)
        self._check("WRITE_ZEROES", offset, length, write=True, need=need)
        flags = ((c.CMD_FLAG_FUA if fua else 0) | (0 if punch else c.CMD_FLAG_NO_HOLE)
                 | (c.CMD_FLAG_FAST_ZERO if fast else 0))
        await self._ranged(c.CMD_WRITE_ZEROES, offset, length, flags)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """TRIM: the range need no longer hold its data (reads are unspecified)."""
        self._check("TRIM", offset, length, write=True,
                    need=c.TF_SEND_TRIM | (c.TF_SEND_FUA if fua else 0))
        await self._ranged(c.CMD_TRIM, offset, length, c.CMD_FLAG_FUA if fua else 0)

    async def _ranged(self, cmd: int, offset: int, length: int, flags: int) -> None:
        if length == 0:
            return
        await self._all([self._pick().request(cmd, o, n, flags)
                         for o, n in self._pieces(offset, length, self.max_range)])

    async def flush(self) -> None:
        """FLUSH: every write completed before it is durable. With several
        connections (multi-conn) one FLUSH covers them all."""
        if self.flags & c.TF_SEND_FLUSH:
            await self._pick().request(c.CMD_FLUSH)

    # -- block status ---------------------------------------------------------------------

    async def extents(self, context: str = c.BASE_ALLOCATION, offset: int = 0,
                      length: int | None = None, *, req_one: bool = False
                      ) -> AsyncIterator[tuple[int, int, int]]:
        """(offset, length, flags) runs describing [offset, offset+length)
        in `context`, in order, adjacent runs of equal flags merged. A server
        may describe less than it was asked ("NBD_CMD_BLOCK_STATUS"): this
        asks again from where its answer ended until the range is covered."""
        if length is None:
            length = self.size - offset
        self._check("BLOCK_STATUS", offset, length)
        if context not in self.negotiated.contexts:
            raise LookupError(f"meta context {context!r} was not negotiated with "
                              f"{self.target.where()} (have: {sorted(self.contexts) or 'none'})")
        flags = c.CMD_FLAG_REQ_ONE if req_one else 0
        end = offset + length
        run: list[int] | None = None        # [offset, length, flags] not yet yielded
        pos = offset
        while pos < end:
            n = min(end - pos, self.max_range)
            conn = self._pick()
            assert conn.negotiated is not None
            ctx_id = conn.negotiated.contexts[context]      # ids are per connection
            got = await conn.request(c.CMD_BLOCK_STATUS, pos, n, flags)
            self.stats.block_status += 1
            described = got.get(ctx_id)
            if not described:
                raise c.ProtocolError(f"BLOCK_STATUS {pos}+{n}: no extents for {context}")
            for elen, eflags in described:
                elen = min(elen, end - pos)     # the last may reach past what we asked
                if elen <= 0:
                    break
                if run is not None and run[2] == eflags:
                    run[1] += elen
                else:
                    if run is not None:
                        yield run[0], run[1], run[2]
                    run = [pos, elen, eflags]
                pos += elen
        if run is not None:
            yield run[0], run[1], run[2]

