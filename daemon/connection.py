"""One NBD client connection: bytes in, requests served, replies out.

The class reads in the order a request travels (proto.md "Transmission"):

    socket     connection_made, connection_lost
    framing    get_buffer / buffer_updated: the receive buffer, and flow control
    handshake  bytes to daemon/handshake.py until it picks an export
    decode     _transmission_data: request headers; a WRITE's payload taken
               whole, streamed into the volume, or (refused) dropped
    validate   _refusal: the one check of a request, (NBD error, message) or None
    dispatch   _dispatch: the backend operation a command asks for
    replies    simple or structured; now, or once a thread or a held change is done
    closing    hard and soft disconnects, shutdown

Small operations (reads and writes to the page cache) run inline on the event
loop: that is the fast path, and replies produced by one buffer_updated call go
out in one write. Operations that block (fdatasync for FLUSH and FUA) run in
a thread and reply when done. Replies may go out of order; each carries its
cookie.

Flow control: requests are taken only while the connection is not paused,
and a pause stops the parsing of what is already buffered too, not only the
reading of more. It pauses while the client leaves its replies unread (more
than REPLY_HIGH waiting in the transport, behind the socket's own buffer),
while too many requests are in flight (threads, held reads), and after DISC.
Replies built in one go are written out every REPLY_BATCH bytes, so a pause
comes in time. A client that reads nothing thus costs the daemon at most
about one reply (a READ is up to 32 MiB) plus REPLY_BATCH; times the
connection cap, that bounds the total.
"""
from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import nbdwire as c
from nbdwire import nbd_error
from volumes.volume import pread_padded

from .handshake import CLOSE, MAX_PAYLOAD, STARTTLS, TRANSMISSION, Negotiation

log = logging.getLogger("splitd.nbd")

_REQ = c.REQUEST
_REQ_SIZE = c.REQUEST.size
_REQUEST_MAGIC = c.REQUEST_MAGIC
_SIMPLE_MAGIC = c.SIMPLE_REPLY_MAGIC
_SIMPLE_PACK = c.SIMPLE_REPLY.pack
_CMD_READ, _CMD_WRITE, _CMD_DISC = c.CMD_READ, c.CMD_WRITE, c.CMD_DISC
_CMD_BLOCK_STATUS = c.CMD_BLOCK_STATUS
_FLAG_FUA = c.CMD_FLAG_FUA
_KNOWN_FLAGS = (c.CMD_FLAG_FUA | c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_DF | c.CMD_FLAG_REQ_ONE
                | c.CMD_FLAG_FAST_ZERO)
# The flags each command may carry ("Request flags"): FUA is valid on every
# command; the others each on the command their description names. The server
# "SHOULD return NBD_EINVAL" for any other ("Error values"). DF also needs
# structured replies, checked where it is used.
_FLAGS_FOR = {
    c.CMD_READ: _FLAG_FUA | c.CMD_FLAG_DF,
    c.CMD_WRITE: _FLAG_FUA,
    c.CMD_FLUSH: _FLAG_FUA,
    c.CMD_TRIM: _FLAG_FUA,
    c.CMD_CACHE: _FLAG_FUA,
    c.CMD_WRITE_ZEROES: _FLAG_FUA | c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO,
    c.CMD_BLOCK_STATUS: _FLAG_FUA | c.CMD_FLAG_REQ_ONE,
}
_FLAG_NAMES = {c.CMD_FLAG_FUA: "FUA", c.CMD_FLAG_NO_HOLE: "NO_HOLE", c.CMD_FLAG_DF: "DF",
               c.CMD_FLAG_REQ_ONE: "REQ_ONE", c.CMD_FLAG_FAST_ZERO: "FAST_ZERO"}
# A BLOCK_STATUS reply lists at most this many extents per context, and the
# scan behind it (on the event loop) stops there. proto.md, BLOCK_STATUS
# reply chunk: "the server MAY return fewer descriptors in the reply than
# would be required to fully specify the whole range ... if looking up the
# information would be too resource-intensive"; clients go on from the first
# offset not covered (libnbd, qemu).
MAX_EXTENTS = 1024
# A bound on the size of a BLOCK_STATUS reply, for flow control: one chunk per
# context (at most three), each a 20-byte header, an id and the extents.
_STATUS_REPLY_MAX = 3 * (24 + 8 * MAX_EXTENTS)

if TYPE_CHECKING:
    from .exports import ContextFn, Export

# Replies waiting to go out, in order: encoded headers and read data.
Out = list[bytes]

# -- framing and flow control --------------------------------------------------------

SOCKET_BUFFER = 4 * 1024 * 1024
INITIAL_BUFFER = 256 * 1024
MAX_SLACK = 4 * 1024 * 1024
MAX_IDLE_BUFFER = 8 * 1024 * 1024
MIN_READ_ROOM = 64 * 1024
# Reads this large go out with sendfile(2) when the backend allows it.
SENDFILE_MIN = 128 * 1024
# WRITEs this large are written to the volume piece by piece as they arrive.
STREAM_MIN = 256 * 1024
# Reply flow control (see the module docstring). REPLY_HIGH is the transport's
# high-water mark: past it the client is not keeping up with the socket buffer
# (4 MiB) in front, and we stop taking its requests until everything queued
# has gone to the socket (low-water mark 0: then the next large READ can go
# out with sendfile again). REPLY_BATCH: replies built by one pass over the
# receive buffer are written out when they reach it, not all at its end.
# HELD: bytes of requests a layer holds at once: READs (pair read policy
# `wait`) and WRITEs waiting for their pairs' bits (set before write).
REPLY_HIGH = 64 * 1024
REPLY_BATCH = 1024 * 1024
HELD = 32 * 1024 * 1024

# -- validation ----------------------------------------------------------------------

# Commands that change the export: refused on a read-only one ("Error values":
# EPERM for "a write or trim request on a read-only export").
_CHANGES = frozenset((c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES))
_CMD_FLUSH, _CMD_TRIM, _CMD_CACHE = c.CMD_FLUSH, c.CMD_TRIM, c.CMD_CACHE
_CMD_WRITE_ZEROES = c.CMD_WRITE_ZEROES
_NOT_FUA = ~_FLAG_FUA & 0xFFFF   # any command flag but FUA (16 bits on the wire)


class Phase(enum.Enum):
    """Where a connection is. Bytes that arrive are handed on by phase."""
    GREETING = enum.auto()       # greeting sent, client flags awaited
    OPTIONS = enum.auto()        # option haggling (daemon/handshake.py)
    TLS_UPGRADE = enum.auto()    # STARTTLS acknowledged, TLS handshake running
    TRANSMISSION = enum.auto()   # requests and replies
    CLOSED = enum.auto()


class StreamedWrite:
    """A WRITE whose payload is taken as it arrives instead of buffered whole:
    each piece goes to the volume while it is hot in cache, or is dropped once
    the write is refused (a refused payload is never buffered). The reply
    follows the last byte. (A write is not atomic in NBD until it is
    acknowledged.)"""
    __slots__ = ("cookie", "error", "flags", "offset", "remaining")

    def __init__(self, cookie: int, flags: int, offset: int, remaining: int,
                 error: tuple[int, str] | None) -> None:
        self.cookie = cookie
        self.flags = flags
        self.offset = offset            # where the next piece goes
        self.remaining = remaining      # payload bytes still to come
        self.error = error              # (NBD error, message) once refused or failed


def _grow_socket_buffers(sock: socket.socket) -> None:
    # A 1 MiB reply that fits in the send buffer goes out in one send, and a
    # 1 MiB WRITE payload arrives in a few large receives instead of many.
    for force, plain in ((getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
                         (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF)):
        for opt in (force, plain):  # FORCE passes the sysctl cap, as root only
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                break
            except OSError:
                continue


def _unix_peer(sock: socket.socket | None) -> str | None:
    """A Unix-socket client has no address: name it by its process
    (SO_PEERCRED), as `comm[pid] uid N`, so `splitctl status` tells clients apart."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = "pid"
    return f"{comm}[{pid}] uid {uid}"


class NBDConnection(asyncio.BufferedProtocol):
    def __init__(self, server: Any, listener: Any) -> None:
        self.server = server
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        # Set by connection_made, the first callback; never None after it.
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer = "?"
        self.phase = Phase.GREETING
        # Framing: the loop receives into rbuf; bytes [rstart, rend) are unparsed.
        self.rbuf = bytearray(INITIAL_BUFFER)
        self.rstart = 0
        self.rend = 0
        self.want = 0               # bytes a partly received WRITE needs in one piece
        self.stream: StreamedWrite | None = None   # a WRITE whose payload is arriving
        # Handshake.
        self.buf = bytearray()      # handshake bytes not yet parsed
        self.skip = 0               # bytes of a too long option still to drop
        self.skip_option = 0        # ... and that option's code
        self.negotiation = Negotiation(
            server.exports, tls_available=listener.tls != "off" and server.tls_context is not None,
            tls_required=listener.tls_required)
        self.handshake_timer: asyncio.TimerHandle | None = None
        # The export, once chosen.
        self.export: Export | None = None
        self.backend: Any = None
        self.size = 0
        self.read_only = True
        self.structured = False
        self.meta: dict[int, ContextFn] = {}
        # Counters the admin API shows (daemon/connections.py): READs served
        # and the bytes they asked for, however they were sent.
        self.read_requests = 0
        self.read_bytes = 0
        # Flow control.
        self.inflight = 0           # requests handed to threads, not yet replied
        self.held = 0               # bytes of requests a layer holds, not yet replied
        self.paused: set[str] = set()  # why reading is paused: "writes", "inflight", "held", "disc"
        self.parse_soon = False     # a pass over buffered requests is scheduled
        # Ending.
        self.disconnecting = False  # NBD_CMD_DISC seen: close once inflight drains
        self.shutting_down = False
        self.since = time.monotonic()
        self.sockfd = -1            # raw socket for sendfile; -1 once TLS wraps it

    # -- socket ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A read-write stream transport (uvloop's are not asyncio.Transport subclasses).
        transport = self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        else:
            self.peer = _unix_peer(sock) or peer or self.listener.name
        self.sockfd = sock.fileno() if sock is not None else -1
        if sock is not None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _grow_socket_buffers(sock)
        transport.set_write_buffer_limits(REPLY_HIGH, 0)
        if not self.server.admit(self):
            log.warning("refused connection from %s on %s: %d connections is the cap",
                        self.peer, self.listener.name, self.server.max_connections)
            self.phase = Phase.CLOSED
            transport.abort()
            return
        if self.server.stopping:
            self.phase = Phase.CLOSED
            transport.close()
            return
        self.handshake_timer = self.loop.call_later(
            self.server.handshake_timeout, self._handshake_timed_out)
        transport.write(c.encode_greeting())

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        if self.handshake_timer:
            self.handshake_timer.cancel()
        self.server.forget(self)
        self.buf = bytearray()
        self.rstart = self.rend = 0

    # -- framing ----------------------------------------------------------------------------

    # Input is a BufferedProtocol: the loop receives straight into self.rbuf,
    # bytes [rstart, rend) are unparsed. A WRITE payload is copied once, from
    # this buffer to the volume.

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self.rbuf) - self.rend < MIN_READ_ROOM:
            self._make_room(MIN_READ_ROOM)
        return memoryview(self.rbuf)[self.rend:]

    def buffer_updated(self, nbytes: int) -> None:
        self.rend += nbytes
        phase = self.phase
        if phase is Phase.TRANSMISSION:
            self._transmission_data()
        elif phase is Phase.GREETING or phase is Phase.OPTIONS:
            self.buf += self.rbuf[self.rstart:self.rend]
            self.rstart = self.rend = 0
            self._handshake_data()
        else:
            # TLS_UPGRADE / CLOSED: nothing may arrive; drop it.
            self.rstart = self.rend = 0

    def _make_room(self, room: int) -> None:
        """Ensure `room` free bytes after the unparsed data, moving it to the
        front or into a bigger buffer. Never resizes in place: the loop may
        still hold a view of the old buffer."""
        pending = self.rend - self.rstart
        size = len(self.rbuf)
        if pending + room > size:
            # Some slack after the payload (up to MAX_SLACK), so the next
            # payloads rarely straddle the end and have to be moved; never a
            # multiple of a large payload.
            size = pending + room + min(3 * room, MAX_SLACK)
            new = bytearray(size)
            new[:pending] = self.rbuf[self.rstart:self.rend]
            self.rbuf = new
        elif self.rstart:
            self.rbuf[:pending] = self.rbuf[self.rstart:self.rend]
        self.rstart, self.rend = 0, pending

    # Flow control: reading stops while any reason in self.paused holds.

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests.
        self._pause("writes")

    def resume_writing(self) -> None:
        self._resume("writes")

    def _pause(self, why: str) -> None:
        if not self.paused and self.transport is not None and self.phase is not Phase.CLOSED:
            self.transport.pause_reading()
        self.paused.add(why)

    def _resume(self, why: str) -> None:
        if why not in self.paused:
            return
        self.paused.discard(why)
        if not self.paused and self.phase is not Phase.CLOSED:
            self.transport.resume_reading()
            # Requests (or options) that arrived before the pause wait in the
            # buffer: no more data may come to trigger their parsing.
            if (self.rend > self.rstart or self.buf) and not self.parse_soon:
                self.parse_soon = True
                self.loop.call_soon(self._parse_buffered)

    def _parse_buffered(self) -> None:
        self.parse_soon = False
        if self.paused:
            return
        if self.phase is Phase.TRANSMISSION:
            self._transmission_data()
        elif self.phase is Phase.OPTIONS:
            self._handshake_data()

    # -- handshake phase ------------------------------------------------------------------

    def _handshake_data(self) -> None:
        try:
            self._handshake()
        except c.ProtocolError as e:
            self.close_now(f"protocol error in handshake: {e}")

    def _handshake(self) -> None:
        buf = self.buf
        pos = 0
        if self.phase is Phase.GREETING:
            if len(buf) < c.CLIENT_FLAGS.size:
                return
            (flags,) = c.CLIENT_FLAGS.unpack_from(buf, 0)
            pos = c.CLIENT_FLAGS.size
            reason = self.negotiation.client_flags(flags)
            if reason:
                self.close_now(reason)
                return
            self.phase = Phase.OPTIONS
        # Options are taken while the client reads the replies, as requests
        # are: a LIST of 16 bytes can take kilobytes to answer.
        while self.phase is Phase.OPTIONS and not self.paused:
            if self.skip:
                # An option too long to take: its data is dropped as it
                # arrives, never buffered, then refused.
                n = min(self.skip, len(buf) - pos)
                pos += n
                self.skip -= n
                if self.skip:
                    break
                step = self.negotiation.too_big(self.skip_option)
            else:
                try:
                    got = c.decode_option(buf, pos)
                except c.OptionTooLong as e:
                    if e.code == c.OPT_EXPORT_NAME:
                        raise  # it cannot be refused politely: disconnect
                    pos += c.OPTION_HEADER.size
                    self.skip, self.skip_option = e.length, e.code
                    continue
                if got is None:
                    break
                opt, used = got
                pos += used
                step = self.negotiation.handle(opt)
            if step.out:
                self.transport.write(step.out)
            if step.action == CLOSE:
                self._close_soon(step.reason)
                return
            if step.action == STARTTLS:
                if len(buf) > pos:
                    # The client may not send anything between STARTTLS and its ACK.
                    raise c.ProtocolError("data sent before the TLS handshake")
                self.phase = Phase.TLS_UPGRADE
                self.transport.pause_reading()
                self.loop.create_task(self._start_tls())
                break
            if step.action == TRANSMISSION:
                assert step.export is not None
                self._enter_transmission(step.export)
                del buf[:pos]
                if buf:
                    # Requests sent right behind the last option.
                    self._make_room(len(buf))
                    self.rbuf[self.rend:self.rend + len(buf)] = buf
                    self.rend += len(buf)
                    self.buf = bytearray()
                    self._transmission_data()
                return
        del buf[:pos]

    async def _start_tls(self) -> None:
        # Background task: handles its own errors and closes on failure.
        try:
            transport = await self.loop.start_tls(
                self.transport, self, self.server.tls_context, server_side=True,
                ssl_handshake_timeout=self.server.handshake_timeout)
        except Exception as e:  # noqa: BLE001 (any TLS failure ends the session)
            self.close_now(f"TLS handshake failed: {e}")
            return
        assert transport is not None
        self.transport = transport
        if self.phase is not Phase.TLS_UPGRADE:
            # Closed (timed out) while the TLS handshake ran: drop what it made.
            self.transport.abort()
            return
        self.negotiation.tls_active = True
        self.sockfd = -1  # bytes now go through TLS: no more sendfile
        self.transport.set_write_buffer_limits(REPLY_HIGH, 0)
        self.phase = Phase.OPTIONS
        log.info("TLS active with %s", self.peer)

    def _enter_transmission(self, export: Export) -> None:
        self.export = export
        self.backend = export.backend
        self.size = export.size
        self.read_only = export.read_only
        self.structured = self.negotiation.structured
        self.meta = {i: export.contexts[name] for i, name in self.negotiation.meta.items()
                     if name in export.contexts}
        if self.handshake_timer:
            self.handshake_timer.cancel()
            self.handshake_timer = None
        self.phase = Phase.TRANSMISSION
        self.server.registry.add(self, export.name, self.peer, self.listener.name)
        log.info("client %s on %s opened export %s (%s replies)", self.peer,
                 self.listener.name, export.name, "structured" if self.structured else "simple")

    # -- transmission: decode ------------------------------------------------------------

    def _transmission_data(self) -> None:
        """Take the requests buffered in [rstart, rend) until they run out or
        the connection pauses; replies go out at the end of the pass, or
        every REPLY_BATCH bytes."""
        buf = self.rbuf
        end = self.rend
        pos = self.rstart
        out: Out = []
        built = 0       # bytes of read data and block status in `out`
        view = memoryview(buf)
        try:
            while not self.paused:  # DISC pauses too
                if self.stream is not None:
                    pos = self._take_streamed(view, pos, end, out)
                    if self.stream is not None:
                        break   # the rest of the payload is still to come
                if end - pos < _REQ_SIZE:
                    break
                magic, flags, cmd, cookie, offset, length = _REQ.unpack_from(buf, pos)
                if magic != _REQUEST_MAGIC:
                    # "Transmission": a bad magic means we lost sync; disconnect.
                    self.close_now(f"bad request magic 0x{magic:08x}")
                    return
                if cmd == _CMD_WRITE:
                    start = pos + _REQ_SIZE
                    if end - start < length:
                        # The payload has not all arrived. A large one is
                        # taken as it comes, to the volume or, refused,
                        # dropped (a paired volume takes a write whole).
                        if length >= STREAM_MIN:
                            refusal = self._refusal(cmd, flags, offset, length)
                            if refusal is not None or self.backend.streams_writes:
                                pos = start
                                self.stream = StreamedWrite(cookie, flags, offset, length, refusal)
                                continue
                        # Wait for the whole payload, with room for it in one piece.
                        self.want = _REQ_SIZE + length
                        break
                    pos = start + length
                    payload: memoryview | None = view[start:pos]
                else:
                    pos += _REQ_SIZE
                    payload = None
                refusal = self._refusal(cmd, flags, offset, length)
                if refusal is not None:
                    self._reply_error(out, cookie, *refusal)
                    continue
                self._dispatch(out, cmd, flags, cookie, offset, length, payload)
                if cmd == _CMD_READ:
                    built += length
                elif cmd == _CMD_BLOCK_STATUS:
                    built += _STATUS_REPLY_MAX
                if built >= REPLY_BATCH:
                    # Out now: if the client is not reading, the transport
                    # pauses us before the next request.
                    self.transport.writelines(out)
                    out.clear()
                    built = 0
        finally:
            view.release()
            if pos == end:
                self.rstart = self.rend = 0
                if len(buf) > MAX_IDLE_BUFFER:
                    # A big payload has gone through: give its memory back.
                    self.rbuf = bytearray(INITIAL_BUFFER)
            else:
                self.rstart = pos
                if self.want > len(buf) - pos:
                    self._make_room(self.want - (end - pos))
            self.want = 0
            if out and self.phase is Phase.TRANSMISSION:
                self.transport.writelines(out)
        if self.disconnecting:
            self._maybe_finish_disc()

    def _take_streamed(self, view: memoryview, pos: int, end: int, out: Out) -> int:
        """Give the streamed WRITE the part of its payload in [pos, end);
        reply after its last byte. Returns the position after what it took."""
        ws = self.stream
        assert ws is not None
        n = min(ws.remaining, end - pos)
        if n and ws.error is None:
            try:
                self.backend.write(ws.offset, view[pos:pos + n])
            except OSError as e:
                log.warning("%s WRITE on %s at %d failed: %s", self.peer,
                            self._export_name(), ws.offset, e)
                ws.error = (nbd_error(e), e.strerror or str(e))
        ws.offset += n
        ws.remaining -= n
        if not ws.remaining:
            self.stream = None
            if ws.error is not None:
                # Only now that the payload is gone: a client still sending
                # it may not expect the reply before (libnbd does not).
                self._reply_error(out, ws.cookie, *ws.error)
            else:
                self._done(out, ws.cookie, ws.flags)
        return pos + n

    # -- validate --------------------------------------------------------------------------

    def _refusal(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """Why a request must fail, as (NBD error, message), or None to serve
        it. Every request passes here, its payload buffered or streamed; the
        first check that fails names the error."""
        if flags & _NOT_FUA or length > MAX_PAYLOAD or self.shutting_down:
            # Rare; one test keeps them off the common path.
            if cmd == _CMD_WRITE and length > MAX_PAYLOAD:
                # "Size constraints": a client MUST NOT send a larger payload.
                # Refused, and its payload dropped as it arrives, not buffered.
                return c.EINVAL, f"write of {length} bytes exceeds the {MAX_PAYLOAD} byte limit"
            if cmd != _CMD_DISC:  # DISC never gets a reply, whatever its flags ("NBD_CMD_DISC")
                if self.shutting_down:
                    return c.ESHUTDOWN, "server is shutting down"
                refusal = self._flag_refusal(cmd, flags)
                if refusal:
                    return c.EINVAL, refusal
        if self.read_only and cmd in _CHANGES:
            return c.EPERM, "export is read-only"
        # Beyond the end: ENOSPC for a write, EINVAL otherwise ("Error values").
        if cmd == _CMD_READ:
            if offset + length > self.size:
                return c.EINVAL, self._beyond_end(offset, length)
            if length > MAX_PAYLOAD:
                return c.EINVAL, f"read of {length} bytes exceeds the limit"
        elif cmd == _CMD_WRITE or cmd == _CMD_WRITE_ZEROES:
            if offset + length > self.size:
                return c.ENOSPC, self._beyond_end(offset, length)
        elif cmd == _CMD_TRIM or cmd == _CMD_CACHE:
            if offset + length > self.size:
                return c.EINVAL, self._beyond_end(offset, length)
        elif cmd == _CMD_BLOCK_STATUS:
            if not self.structured or not self.meta:
                # "NBD_CMD_BLOCK_STATUS": needs structured replies and a context set.
                return c.EINVAL, "no meta context was negotiated"
            if length == 0:
                return c.EINVAL, "block status of length 0"
            if offset + length > self.size:
                return c.EINVAL, self._beyond_end(offset, length)
        elif cmd != _CMD_FLUSH and cmd != _CMD_DISC:
            # "Error values": EINVAL for an unknown command.
            return c.EINVAL, f"unknown command {cmd}"
        return None

    def _flag_refusal(self, cmd: int, flags: int) -> str | None:
        """Why these command flags are refused on this command, or None."""
        if flags & ~_KNOWN_FLAGS:
            return f"unknown command flags 0x{flags & ~_KNOWN_FLAGS:x}"
        if cmd not in _FLAGS_FOR:
            return None  # an unknown command: refused as such
        stray = flags & ~_FLAGS_FOR[cmd]
        if flags & c.CMD_FLAG_DF and not self.structured:
            # DF "MUST NOT be set unless the transmission flags include
            # NBD_FLAG_SEND_DF", which needs structured replies.
            stray |= c.CMD_FLAG_DF
        if not stray:
            return None
        names = "|".join(n for bit, n in _FLAG_NAMES.items() if stray & bit)
        return f"flag {names} does not apply to {c.COMMAND_NAMES.get(cmd, cmd)}"

    def _beyond_end(self, offset: int, length: int) -> str:
        return f"{offset}+{length} is beyond the end ({self.size})"

    # -- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, out: Out, cmd: int, flags: int, cookie: int, offset: int, length: int,
                  payload: memoryview | None) -> None:
        """Serve a valid request: the backend operation it asks for, and its
        reply in `out` (or later: a flush, a change or read a layer holds)."""
        # READ and WRITE come first and are written out in full, no helper
        # call of their own: they are the hot path.
        try:
            if cmd == _CMD_READ:
                self.read_requests += 1
                self.read_bytes += length
                if length == 0:
                    # An OFFSET_DATA chunk must carry at least one byte: plain
                    # success, structured if negotiated (a READ never gets a
                    # simple reply then).
                    out.append(c.encode_done(cookie) if self.structured
                               else _SIMPLE_PACK(_SIMPLE_MAGIC, 0, cookie))
                    return
                if length >= SENDFILE_MIN and self.sockfd >= 0:
                    src = self.backend.read_fd(offset, length)
                    if src is not None and self._sendfile(out, cookie, offset, length, *src):
                        return
                data = self.backend.read(offset, length)
                if type(data) is not bytes:
                    # A layer holds this read (pair read policy `wait`).
                    self._reply_when_read(cookie, offset, length, data)
                    return
                if self.structured:
                    out.append(c.encode_offset_data_header(cookie, offset, length))
                else:
                    out.append(_SIMPLE_PACK(_SIMPLE_MAGIC, 0, cookie))
                out.append(data)
            elif cmd == _CMD_WRITE:
                held = self.backend.write(offset, payload)
                if held is None and not flags & _FLAG_FUA:
                    out.append(_SIMPLE_PACK(_SIMPLE_MAGIC, 0, cookie))
                else:
                    self._done(out, cookie, flags, held, length)
            elif cmd == _CMD_FLUSH:
                self._in_thread(cookie, self.backend.flush)
            elif cmd == _CMD_TRIM:
                # Length 0 is "unspecified" ("NBD_CMD_TRIM"): a no-op.
                self._done(out, cookie, flags, self.backend.trim(offset, length) if length else None)
            elif cmd == _CMD_WRITE_ZEROES:
                self._write_zeroes(out, cookie, flags, offset, length)
            elif cmd == _CMD_BLOCK_STATUS:
                self._block_status(out, cookie, flags, offset, length)
            elif cmd == _CMD_CACHE:
                # Our storage is the page cache already: nothing to do.
                self._reply_ok(out, cookie)
            elif cmd == _CMD_DISC:
                # No reply; finish what is in flight, then close. Nothing sent
                # after it is read ("the client MUST NOT send any further
                # requests"): a client that goes on sending is not buffered.
                self.disconnecting = True
                self._pause("disc")
        except OSError as e:
            log.warning("%s %s on %s at %d+%d failed: %s", self.peer,
                        c.COMMAND_NAMES.get(cmd, cmd), self._export_name(), offset, length, e)
            self._reply_error(out, cookie, nbd_error(e), e.strerror or str(e))

    # -- backend operations --------------------------------------------------------------------

    def _sendfile(self, out: Out, cookie: int, offset: int, length: int, fd: int,
                  file_offset: int) -> bool:
        """Send a read reply straight from the volume's file with sendfile(2).

        Only while the transport holds nothing unsent, so bytes on the wire stay
        in order; whatever the socket does not take at once is queued on the
        transport as usual. Returns False (nothing sent) if the path is busy.

        The reply header goes out before the data is read, so an error can
        only show up after it: a structured reply's data chunk is therefore
        not marked final (a NONE chunk closes the reply), and an error is a
        hard disconnect, the one way left to tell the client ("Simple reply
        message"; "Structured reply chunk message": a chunk MUST NOT be
        marked final while an error may still be detected).
        """
        if out:
            self.transport.writelines(out)
            out.clear()
        if self.transport.get_write_buffer_size():
            return False
        header = self._data_header(cookie, offset, length, done=False)
        try:
            self._send_from_file(header, fd, file_offset, length)
        except OSError as e:
            log.warning("%s READ on %s at %d+%d failed after its reply began: %s", self.peer,
                        self._export_name(), offset, length, e)
            self.close_now(f"READ failed after its reply began: {e}")
            return True
        if self.structured:
            self.transport.write(c.encode_done(cookie))
        return True

    def _send_from_file(self, header: bytes, fd: int, file_offset: int, length: int) -> None:
        try:
            n = os.write(self.sockfd, header)
        except BlockingIOError:
            n = 0
        sent = 0
        if n < len(header):
            self.transport.write(header[n:])
        else:
            while sent < length:
                try:
                    n = os.sendfile(self.sockfd, fd, file_offset + sent, length - sent)
                except BlockingIOError:
                    break
                if n == 0:
                    break  # end of file: the rest reads as zeroes
                sent += n
        if sent < length:
            self.transport.write(pread_padded(fd, file_offset + sent, length - sent))

    def _write_zeroes(self, out: Out, cookie: int, flags: int, offset: int, length: int) -> None:
        if not length:  # length 0 is "unspecified" ("NBD_CMD_WRITE_ZEROES"): a no-op
            self._done(out, cookie, flags)
            return
        punch = not flags & c.CMD_FLAG_NO_HOLE
        if not flags & c.CMD_FLAG_FAST_ZERO:
            self._done(out, cookie, flags, self.backend.zero(offset, length, punch))
            return
        # "NBD_CMD_FLAG_FAST_ZERO": fail fast with ENOTSUP rather than write
        # zeroes slowly; the backend finds out, changing nothing.
        try:
            held = self.backend.zero(offset, length, punch, fast_only=True)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            self._reply_error(out, cookie, c.ENOTSUP, "zeroing would not be fast")
            return
        self._done(out, cookie, flags, held)

    def _block_status(self, out: Out, cookie: int, flags: int, offset: int, length: int) -> None:
        # REQ_ONE: "every reply chunk MUST contain exactly one descriptor, and
        # that descriptor MUST NOT exceed the length of the original request":
        # the scan stops at the first extent instead of covering the range.
        limit = 1 if flags & c.CMD_FLAG_REQ_ONE else MAX_EXTENTS
        items = list(self.meta.items())
        for n, (ctx_id, fn) in enumerate(items):
            extents = fn(offset, length, limit)
            out.append(c.encode_block_status(cookie, ctx_id, extents, done=n == len(items) - 1))

    # -- replies -----------------------------------------------------------------------------

    def _done(self, out: Out, cookie: int, flags: int, held: asyncio.Future[Any] | None = None,
              nbytes: int = 0) -> None:
        """Reply to a data-changing request, after a flush if FUA asks for
        one; once the change is issued if the backend `held` it (holding
        `nbytes` of payload meanwhile)."""
        if held is not None:
            self._reply_when_changed(cookie, flags, held, nbytes)
        elif flags & _FLAG_FUA:
            self._in_thread(cookie, self.backend.flush)
        else:
            self._reply_ok(out, cookie)

    def _data_header(self, cookie: int, offset: int, length: int, done: bool = True) -> bytes:
        """What goes before `length` bytes of read data: one OFFSET_DATA chunk
        header (structured; final unless `done` is False) or a simple reply."""
        if self.structured:
            return c.encode_offset_data_header(cookie, offset, length, done)
        return _SIMPLE_PACK(_SIMPLE_MAGIC, 0, cookie)

    def _reply_ok(self, out: Out, cookie: int) -> None:
        # Success without data is a simple reply even when structured replies
        # are negotiated: proto.md "Structured reply chunk message" lets a
        # server use either for every command but NBD_CMD_READ. A client such
        # as libnbd reads a structured header in two receives and a simple one
        # in one, so this saves a system call per write on the client's side.
        out.append(_SIMPLE_PACK(_SIMPLE_MAGIC, 0, cookie))

    def _reply_error(self, out: Out, cookie: int, error: int, message: str) -> None:
        if self.structured:
            out.append(c.encode_error_chunk(cookie, error, message))
        else:
            out.append(_SIMPLE_PACK(_SIMPLE_MAGIC, error, cookie))

    # Replies that come later: from a thread, or once a layer lets go of a
    # request it held.

    def _in_thread(self, cookie: int, fn: Callable[..., object], *args: object) -> None:
        """Run a blocking operation (a flush) in a thread; reply when it is done."""
        fut = self.loop.run_in_executor(None, fn, *args)
        self._reply_later(cookie, fut, "flush", lambda out, _: self._reply_ok(out, cookie))

    def _reply_when_changed(self, cookie: int, flags: int, fut: asyncio.Future[Any],
                            nbytes: int = 0) -> None:
        """A change the backend held until its pairs were ready (set before
        write): reply once it is issued, after a flush if FUA asks for one.
        `nbytes` of payload are held meanwhile, and count against the bound."""

        def issued(out: Out, _: object) -> None:
            if flags & _FLAG_FUA:
                self._in_thread(cookie, self.backend.flush)
            else:
                self._reply_ok(out, cookie)

        self._reply_later(cookie, fut, "write", issued, nbytes)

    def _reply_when_read(self, cookie: int, offset: int, length: int,
                         fut: asyncio.Future[bytes]) -> None:
        """A layer holds a read (pair read policy `wait`): reply with its data.
        Held reads count towards flow control by their size: the in-flight cap
        alone let 64 of them (2 GiB) pile up for a client reading nothing."""

        def reply(out: Out, data: bytes) -> None:
            out.extend((self._data_header(cookie, offset, length), data))

        self._reply_later(cookie, fut, "read", reply, length)

    def _reply_later(self, cookie: int, fut: asyncio.Future[Any], what: str,
                     on_success: Callable[[Out, Any], None], nbytes: int = 0) -> None:
        """Count a request in flight until `fut` is done, then send its reply:
        on_success(out, result) builds it, or an error reply on failure.
        `nbytes`: memory the request holds meanwhile (a held read's data, a
        held write's payload); requests are not taken while HELD bytes are."""
        self.inflight += 1
        if self.inflight >= self.server.max_inflight:
            self._pause("inflight")
        if nbytes:
            self.held += nbytes
            if self.held >= HELD:
                self._pause("held")

        def done(f: asyncio.Future[Any]) -> None:
            self.inflight -= 1
            if self.inflight < self.server.max_inflight:
                self._resume("inflight")
            if nbytes:
                self.held -= nbytes
                if self.held < HELD:
                    self._resume("held")
            if f.cancelled():
                return
            # Retrieved even when no reply goes out (the client went away
            # meanwhile): else asyncio logs "exception was never retrieved".
            exc = f.exception()
            if self.phase is not Phase.TRANSMISSION:
                return
            out: Out = []
            if exc is None:
                on_success(out, f.result())
            else:
                log.warning("%s: %s on %s failed: %s", self.peer, what, self._export_name(), exc)
                self._reply_error(out, cookie, nbd_error(exc), str(exc))
            self.transport.writelines(out)
            if self.disconnecting:
                self._maybe_finish_disc()

        fut.add_done_callback(done)

    # -- closing ---------------------------------------------------------------------------------

    def _maybe_finish_disc(self) -> None:
        if self.inflight == 0:
            self._close_soon("client disconnected")

    def close_now(self, reason: str) -> None:
        """Hard disconnect (protocol error, forced delete, timeout)."""
        if self.phase is Phase.CLOSED:
            return
        log.info("closing connection %s (%s): %s", self.peer,
                 self.export.name if self.export else "handshake", reason)
        self.phase = Phase.CLOSED
        if self.handshake_timer:
            self.handshake_timer.cancel()
        # Free the slot now: once a TLS upgrade has begun, the transport's
        # connection_lost does not reach us if the TLS handshake never finished.
        self.server.forget(self)
        if self.transport is not None:
            self.transport.abort()

    def _close_soon(self, reason: str) -> None:
        """Close once what was written has gone out."""
        if self.phase is Phase.CLOSED:
            return
        log.info("closing connection %s: %s", self.peer, reason)
        self.phase = Phase.CLOSED
        self.transport.close()

    def _handshake_timed_out(self) -> None:
        if self.phase in (Phase.GREETING, Phase.OPTIONS, Phase.TLS_UPGRADE):
            self.close_now(f"handshake not finished in {self.server.handshake_timeout:g}s")

    def begin_shutdown(self) -> None:
        """Daemon stopping: new requests get ESHUTDOWN; the daemon closes us later."""
        self.shutting_down = True
        # A client still negotiating gets NBD_REP_ERR_SHUTDOWN for its next
        # options ("Termination of the session during option haggling") until
        # the server closes every connection; one midway through a TLS
        # handshake is dropped now.
        self.negotiation.shutting_down = True
        if self.phase is Phase.TLS_UPGRADE:
            self.close_now("server shutting down")

    def _export_name(self) -> str:
        return self.export.name if self.export is not None else "?"
