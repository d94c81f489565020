"""daemon.handshake.Negotiation in memory, driven the way daemon/connection.py
drives it, and a driver that plays a sans-IO ClientHandshake against it.
No sockets: TLS is a flag flipped when the client says it has wrapped."""
from __future__ import annotations

import nbdwire as c
from daemon.exports import Export, ExportUnknown
from daemon.handshake import CLOSE, STARTTLS, TRANSMISSION, Negotiation

PENDING = "x-splitd:pending"


def _extents(offset: int, length: int, limit: int) -> list[tuple[int, int]]:
    return [(length, 0)]


class FakeExports:
    def __init__(self, **sizes: int):
        self.sizes = sizes

    def names(self) -> list[str]:
        return list(self.sizes)

    def lookup(self, name: str) -> Export:
        if name not in self.sizes:
            raise ExportUnknown(f"no export named {name!r}")
        return Export(name, None, self.sizes[name], read_only=name.startswith("ro"),
                      description=f"volume {name}",
                      contexts={c.BASE_ALLOCATION: _extents, PENDING: _extents})


class MemoryServer:
    def __init__(self, exports: FakeExports | None = None,
                 greeting_flags: int = c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES, **kw):
        self.negotiation = Negotiation(exports or FakeExports(vol=1 << 20, other=4096), **kw)
        self.greeting_flags = greeting_flags
        self.buf = bytearray()
        self.greeted = False
        self.closed: str | None = None
        self.export: Export | None = None
        self.tls_pending = False
        self.options: list[int] = []

    def greeting(self) -> bytes:
        return c.encode_greeting(self.greeting_flags)

    def feed(self, data: bytes) -> bytes:
        assert self.closed is None and self.export is None and not self.tls_pending
        self.buf += data
        out = []
        if not self.greeted:
            if len(self.buf) < 4:
                return b""
            (flags,) = c.CLIENT_FLAGS.unpack_from(self.buf)
            del self.buf[:4]
            reason = self.negotiation.client_flags(flags)
            if reason:
                self.closed = reason
                return b""
            self.greeted = True
        while True:
            got = c.decode_option(self.buf)
            if got is None:
                break
            opt, used = got
            del self.buf[:used]
            self.options.append(opt.code)
            step = self.negotiation.handle(opt)
            out.append(step.out)
            if step.action == CLOSE:
                self.closed = step.reason
                break
            if step.action == STARTTLS:
                self.tls_pending = True
                break
            if step.action == TRANSMISSION:
                self.export = step.export
                break
        return b"".join(out)

    def tls_started(self) -> None:
        self.tls_pending = False
        self.negotiation.tls_active = True


def drive(client: c.ClientHandshake, server: MemoryServer, byte_by_byte: bool = False) -> list:
    """Play the handshake to its end; returns every event the client gave."""
    seen: list = []

    def deliver(data: bytes) -> list:
        if not byte_by_byte:
            return client.receive(data)
        evs: list = []
        for i in range(len(data)):
            evs += client.receive(data[i:i + 1])
        return evs

    queue = deliver(server.greeting())
    while queue:
        ev = queue.pop(0)
        seen.append(ev)
        if isinstance(ev, c.Send):
            if server.closed is not None:
                continue        # e.g. our ABORT after the server hung up
            queue += deliver(server.feed(ev.data))
        elif isinstance(ev, c.StartTLS):
            server.tls_started()
            queue += client.resume()
    return seen
