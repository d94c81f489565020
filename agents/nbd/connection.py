"""One NBD connection: the handshake, then many requests in flight.

Everything that reads the socket lives in this file's protocol callbacks
(they run in the event loop, not in a task, and handle their own errors by
closing the connection). The rule they keep: a reply goes to the request of
its cookie and to nothing else; anything that cannot be matched or does not
fit its request is a protocol error, and the connection is closed with every
pending request failed (proto.md "Transmission": either side MAY hard
disconnect on a protocol violation).

Replies are read with asyncio.BufferedProtocol: headers and small payloads
into a scratch buffer, a READ's OFFSET_DATA payload straight into the
caller's buffer (one copy, the kernel's), so a reader keeps up with the
storage instead of with Python.

Requests: cookie -> _Request map; a budget bounds the requests and the READ
and WRITE bytes in flight; writes wait for the transport's flow control
(pause_writing / resume_writing), so a slow server holds the writer back
instead of filling our memory.
"""
from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import nbdwire as c

from .errors import ConnectError, Disconnected, RequestError, RequestTimeout
from .uri import Target, server_hostname

__all__ = ["Connection", "Limits", "Negotiated"]

Buffer = bytes | bytearray | memoryview
SCRATCH = 256 * 1024            # scratch buffer for headers and small payloads
ZEROES = memoryview(bytes(1 << 20))     # holes written into a caller's buffer come from here


@dataclass(frozen=True)
class Limits:
    """What one connection holds: requests in flight, READ/WRITE bytes in
    flight (a single larger request still goes, alone), the time a request
    or the handshake may take (None: no limit)."""
    requests: int = 16
    bytes: int = 64 * 1024 * 1024
    timeout: float | None = None
    connect_timeout: float = 30.0


@dataclass(frozen=True)
class Negotiated:
    """What the handshake agreed: the export, and the meta contexts by name."""
    size: int
    flags: int
    contexts: dict[str, int] = field(default_factory=dict)     # name -> id
    name: str | None = None
    description: str | None = None
    block_size: c.InfoBlockSize | None = None


class _Request:
    __slots__ = ("cmd", "offset", "length", "future", "dest", "fresh", "got", "error",
                 "extents", "cost", "timer")

    def __init__(self, cmd: int, offset: int, length: int, future: asyncio.Future[Any],
                 dest: memoryview | None, fresh: bool, cost: int):
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.future = future
        self.dest = dest                # READ: where the data goes
        self.fresh = fresh              # dest is known zero: holes need no writing
        self.got = 0                    # READ: bytes described so far
        self.error: tuple[int, str] | None = None
        self.extents: dict[int, list[tuple[int, int]]] = {}
        self.cost = cost
        self.timer: asyncio.TimerHandle | None = None


class _Budget:
    """Requests and bytes in flight, FIFO: a waiter is let in when it fits,
    and a request larger than the byte budget goes when nothing else is in
    flight (it could never fit otherwise)."""

    def __init__(self, requests: int, nbytes: int):
        self.max_requests, self.max_bytes = requests, nbytes
        self.requests = self.bytes = 0
        self.waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, cost: int) -> bool:
        return self.requests < self.max_requests and (
            self.bytes + cost <= self.max_bytes or self.requests == 0)

    async def take(self, cost: int) -> None:
        if not self.waiters and self._fits(cost):
            self.requests += 1
            self.bytes += cost
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (cost, fut)
        self.waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.give(cost)             # granted, then cancelled: hand it on
            elif entry in self.waiters:
                self.waiters.remove(entry)
                self._wake()
            raise

    def give(self, cost: int) -> None:
        self.requests -= 1
        self.bytes -= cost
        self._wake()

    def _wake(self) -> None:
        while self.waiters and self._fits(self.waiters[0][0]):
            cost, fut = self.waiters.popleft()
            if fut.done():
                continue
            self.requests += 1
            self.bytes += cost
            fut.set_result(None)

    def fail(self, exc: BaseException) -> None:
        while self.waiters:
            _, fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)


class Connection(asyncio.BufferedProtocol):
    """One connection to one export. Made by `await Connection.connect(...)`."""

    def __init__(self, target: Target, limits: Limits):
        self.target = target
        self.limits = limits
        self.negotiated: Negotiated | None = None
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.closed: BaseException | None = None        # set once: why it closed
        self.budget = _Budget(limits.requests, limits.bytes)
        self.inflight: dict[int, _Request] = {}
        self.cookies = itertools.count(1)
        self.max_payload = c.MAX_PAYLOAD
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost: asyncio.Future[None] = self.loop.create_future()
        # Reading: scratch buffer [start, end) not parsed yet.
        self._buf = bytearray(SCRATCH)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._handshaking = True
        self._hs_data = bytearray()
        self._hs_event = asyncio.Event()
        self._header: c.ChunkHeader | None = None     # a chunk whose payload is being read
        self._sink: memoryview | None = None          # where the rest of an OFFSET_DATA goes
        self._sink_pos = 0
        self._sink_req: _Request | None = None

    # -- connecting -----------------------------------------------------------------------

    @classmethod
    async def connect(cls, target: Target, limits: Limits, contexts: tuple[str, ...],
                      tls: ssl.SSLContext | None) -> Connection:
        conn = cls(target, limits)
        try:
            async with asyncio.timeout(limits.connect_timeout):
                await conn._open(contexts, tls)
        except TimeoutError:
            conn._abort(Disconnected("handshake timed out"))
            raise ConnectError(f"{target.where()}: no handshake within "
                               f"{limits.connect_timeout:g} s") from None
        except BaseException:
            conn._abort(Disconnected("handshake failed"))
            raise
        return conn

    async def _open(self, contexts: tuple[str, ...], tls: ssl.SSLContext | None) -> None:
        t = self.target
        try:
            if t.socket is not None:
                await self.loop.create_unix_connection(lambda: self, t.socket)
            else:
                await self.loop.create_connection(lambda: self, t.host or "localhost", t.port)
        except OSError as e:
            err = ConnectError(f"cannot connect to {t.where()}: {e.strerror or e}")
            err.errno = e.errno
            raise err from e
        hs = c.ClientHandshake(t.export, structured=True, meta_contexts=contexts,
                               tls=c.TLS_REQUIRE if t.tls else c.TLS_OFF)
        ready: c.Ready | None = None
        refused: c.Refused | None = None
        events: list[c.Event] = []
        while ready is None:
            if not events:
                data = await self._handshake_bytes()
                try:
                    events = hs.receive(data)
                except c.ProtocolError as e:
                    raise ConnectError(f"{t.where()}: protocol error from the server in the "
                                       f"handshake: {e}") from e
                continue
            ev = events.pop(0)
            if isinstance(ev, c.Send):
                self._write(ev.data)
            elif isinstance(ev, c.StartTLS):
                assert tls is not None and self.transport is not None
                try:
                    new = await self.loop.start_tls(self.transport, self, tls,
                                                    server_hostname=server_hostname(t))
                except (OSError, ssl.SSLError) as e:
                    raise ConnectError(f"{t.where()}: TLS handshake failed: {e}") from e
                assert new is not None
                self.transport = new
                events = hs.resume() + events
            elif isinstance(ev, c.Refused) and ev.fatal:
                refused = ev            # the Send of NBD_OPT_ABORT and a Closing follow
            elif isinstance(ev, c.Closing):
                why = refused.exception() if refused is not None else ev.reason
                raise ConnectError(f"{t.where()}: {why}")
            elif isinstance(ev, c.Ready):
                ready = ev
        if not ready.structured:
            self._soft_disconnect()
            raise ConnectError(f"{t.where()}: the server does not do structured replies, "
                               "which this client needs")
        names = {name: ctx_id for ctx_id, name in ready.contexts.items()}
        self.negotiated = Negotiated(ready.size, ready.flags, names, ready.name,
                                     ready.description, ready.block_size)
        if ready.block_size is not None:
            # "Block size constraints": a client MUST NOT send a payload above
            # the maximum it was given; we hold to our own cap too.
            self.max_payload = min(ready.block_size.maximum, c.MAX_PAYLOAD)
        self._handshaking = False
        self._hs_data.clear()
        if ready.trailing:
            raise ConnectError(f"{t.where()}: server sent {len(ready.trailing)} bytes before "
                               "any request")
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def _handshake_bytes(self) -> bytes:
        while not self._hs_data:
            if self.closed is not None:
                raise ConnectError(f"{self.target.where()}: server closed the connection "
                                   "during the handshake")
            self._hs_event.clear()
            await self._hs_event.wait()
        data = bytes(self._hs_data)
        self._hs_data.clear()
        return data

    def _soft_disconnect(self) -> None:
        self._write(c.encode_option(c.OPT_ABORT))
        self._abort(Disconnected("closed by the client"))

    # -- protocol callbacks (event loop; they handle their own errors) ----------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport          # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        why = f"connection lost: {exc}" if exc else "server closed the connection"
        self._abort(Disconnected(f"{self.target.where()}: {why}"), close=False)
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    def eof_received(self) -> bool | None:
        return None         # close the transport: connection_lost follows

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None:
            return self._sink[self._sink_pos:]
        if self._end == len(self._buf):
            self._make_room(1)
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed is not None and not self._handshaking:
            return              # aborted: what is still coming is dropped
        try:
            if self._sink is not None:
                self._sink_pos += nbytes
                if self._sink_pos == len(self._sink):
                    self._sink = None
                    self._data_done()
                    self._parse()
                return
            if self._handshaking:
                self._hs_data += self._view[self._end:self._end + nbytes]
                self._hs_event.set()
                return
            self._end += nbytes
            self._parse()
        except c.ProtocolError as e:
            exc = Disconnected(f"{self.target.where()}: protocol error from the server: {e}")
            exc.__cause__ = e
            self._abort(exc)

    # -- reading replies --------------------------------------------------------------------

    def _make_room(self, need: int) -> None:
        """Room for `need` unparsed bytes from _start on: move them to the
        front, or into a bigger buffer (bounded by decode_reply_header's
        max_payload check, which came first)."""
        size = self._end - self._start
        if need > len(self._buf):
            new = bytearray(max(need, 2 * len(self._buf)))
            new[:size] = self._view[self._start:self._end]
            self._view.release()
            self._buf, self._view = new, memoryview(new)
        elif self._start:
            self._buf[:size] = self._view[self._start:self._end]
        self._start, self._end = 0, size

    def _parse(self) -> None:
        view = self._view
        while True:
            header = self._header
            if header is None:
                got = c.decode_reply_header(view[:self._end], self._start)
                if got is None:
                    break
                msg, used = got
                self._start += used
                if isinstance(msg, c.SimpleReply):
                    self._simple(msg)
                    continue
                self._header = header = msg
            req = self._request(header.cookie)
            if (header.type == c.REPLY_TYPE_OFFSET_DATA and req.cmd == c.CMD_READ
                    and header.length > c.U64.size):
                if self._end - self._start < c.U64.size:
                    break
                (offset,) = c.U64.unpack_from(view, self._start)
                self._start += c.U64.size
                dest = self._place(req, offset, header.length - c.U64.size)
                take = min(len(dest), self._end - self._start)
                dest[:take] = view[self._start:self._start + take]
                self._start += take
                if take < len(dest):
                    # The rest comes straight into dest (get_buffer).
                    self._sink, self._sink_pos, self._sink_req = dest, take, req
                    self._start = self._end = 0
                    return
                self._sink_req = req
                self._data_done()
                continue
            if self._end - self._start < header.length:
                if len(self._buf) - self._start < header.length:
                    self._make_room(header.length)
                break
            payload = bytes(view[self._start:self._start + header.length])
            self._start += header.length
            self._header = None
            self._chunk(req, c.decode_chunk(header, payload))
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < 4096:
            self._make_room(0)

    def _request(self, cookie: int) -> _Request:
        req = self.inflight.get(cookie)
        if req is None:
            raise c.ProtocolError(f"reply for cookie {cookie}, which is not in flight")
        return req

    def _place(self, req: _Request, offset: int, length: int) -> memoryview:
        """Where a READ chunk's data goes. "Structured reply types": chunks
        MUST NOT describe data outside the request's range."""
        start = offset - req.offset
        if start < 0 or start + length > req.length:
            raise c.ProtocolError(f"READ {req.offset}+{req.length}: chunk {offset}+{length} "
                                  "is outside the request")
        assert req.dest is not None
        return req.dest[start:start + length]

    def _data_done(self) -> None:
        header, req = self._header, self._sink_req
        assert header is not None and req is not None
        req.got += header.length - c.U64.size
        self._header = self._sink_req = None
        if header.flags & c.REPLY_FLAG_DONE:
            self._finish(header.cookie, req)

    def _simple(self, msg: c.SimpleReply) -> None:
        req = self._request(msg.cookie)
        if msg.error:
            req.error = (msg.error, "")
        elif req.cmd in (c.CMD_READ, c.CMD_BLOCK_STATUS):
            # "Structured reply chunk message": with structured replies
            # negotiated, a successful READ or BLOCK_STATUS is answered in chunks.
            raise c.ProtocolError(f"simple reply to {c.COMMAND_NAMES[req.cmd]} on a connection "
                                  "with structured replies")
        self._finish(msg.cookie, req)

    def _chunk(self, req: _Request, chunk: c.Chunk) -> None:
        if isinstance(chunk, c.ErrorChunk):
            if req.error is None:
                req.error = (chunk.error, chunk.message)
        elif isinstance(chunk, c.OffsetHole):
            if req.cmd != c.CMD_READ:
                raise c.ProtocolError("OFFSET_HOLE chunk in a reply that is not to a READ")
            dest = self._place(req, chunk.offset, chunk.length)
            if not req.fresh:
                for at in range(0, len(dest), len(ZEROES)):
                    piece = dest[at:at + len(ZEROES)]
                    piece[:] = ZEROES[:len(piece)]
            req.got += chunk.length
        elif isinstance(chunk, c.OffsetData):
            raise c.ProtocolError("OFFSET_DATA chunk in a reply that is not to a READ")
        elif isinstance(chunk, c.BlockStatus):
            if req.cmd != c.CMD_BLOCK_STATUS:
                raise c.ProtocolError("BLOCK_STATUS chunk in a reply that is not to BLOCK_STATUS")
            assert self.negotiated is not None
            if chunk.context_id not in self.negotiated.contexts.values():
                raise c.ProtocolError(f"BLOCK_STATUS for context id {chunk.context_id}, "
                                      "which was not negotiated")
            req.extents[chunk.context_id] = chunk.extents
        if chunk.done:
            self._finish(chunk.cookie, req)

    def _finish(self, cookie: int, req: _Request) -> None:
        if req.error is None and req.cmd == c.CMD_READ and req.got != req.length:
            # "NBD_CMD_READ": without an error, the chunks cover the whole range.
            raise c.ProtocolError(f"READ {req.offset}+{req.length}: reply described "
                                  f"{req.got} bytes")
        del self.inflight[cookie]
        if req.timer is not None:
            req.timer.cancel()
        self.budget.give(req.cost)
        if req.future.done():           # the caller gave up on it
            return
        if req.error is not None:
            req.future.set_exception(RequestError(req.cmd, req.offset, req.length, *req.error))
        elif req.cmd == c.CMD_BLOCK_STATUS:
            req.future.set_result(req.extents)
        else:
            req.future.set_result(None)

    # -- closing ----------------------------------------------------------------------------

    def _abort(self, exc: BaseException, close: bool = True) -> None:
        """Fail everything pending with exc and close, once."""
        if self.closed is None:
            self.closed = exc
        self._hs_event.set()
        pending, self.inflight = self.inflight, {}
        for req in pending.values():
            if req.timer is not None:
                req.timer.cancel()
            if not req.future.done():
                req.future.set_exception(self.closed)
        self.budget.fail(self.closed)
        self.resume_writing()
        if close and self.transport is not None:
            self.transport.abort()

    async def close(self) -> None:
        """Wait for the requests in flight, send NBD_CMD_DISC ("Terminating
        the transmission phase": a soft disconnect), and close."""
        if self.closed is None:
            futures = [r.future for r in self.inflight.values()]
            if futures:
                await asyncio.wait(futures)
        if self.closed is None and self.transport is not None:
            self._write(c.encode_request(c.CMD_DISC, next(self.cookies)))
            self.closed = Disconnected(f"{self.target.where()}: closed by the client")
            self.budget.fail(self.closed)
            self.transport.close()
        if self.transport is not None and not self._lost.done():
            try:
                async with asyncio.timeout(5):
                    await asyncio.shield(self._lost)
            except TimeoutError:
                self.transport.abort()

    # -- requests ---------------------------------------------------------------------------

    def _write(self, data: Buffer) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                      payload: Buffer | None = None, dest: memoryview | None = None,
                      fresh: bool = False) -> Any:
        """Send one request and wait for its reply: None, or for BLOCK_STATUS
        {context id: [(length, flags)]}. The caller has checked the range."""
        cost = length if cmd in (c.CMD_READ, c.CMD_WRITE) else 0
        await self.budget.take(cost)
        if self.closed is not None:
            self.budget.give(cost)
            raise self.closed
        cookie = next(self.cookies)
        fut: asyncio.Future[Any] = self.loop.create_future()
        req = _Request(cmd, offset, length, fut, dest, fresh, cost)
        self.inflight[cookie] = req
        if self.limits.timeout is not None:
            req.timer = self.loop.call_later(self.limits.timeout, self._timed_out, req)
        self._write(c.encode_request(cmd, cookie, offset, length, flags))
        if payload is not None:
            self._write(payload)
        if self._paused:
            await self._drain()
        return await fut

    async def _drain(self) -> None:
        while self._paused and self.closed is None:
            fut = self.loop.create_future()
            self._drain_waiters.append(fut)
            await fut

    def _timed_out(self, req: _Request) -> None:
        name = c.COMMAND_NAMES.get(req.cmd, str(req.cmd))
        self._abort(RequestTimeout(f"{self.target.where()}: no reply to {name} {req.offset}+"
                                   f"{req.length} in {self.limits.timeout:g} s; connection closed"))

    # -- for the pool -------------------------------------------------------------------------

    def load(self) -> tuple[int, int]:
        return self.budget.bytes, self.budget.requests

