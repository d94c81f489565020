"""agents.nbd against a scripted server: splitd's own handshake code
(daemon.handshake.Negotiation, through tests/nbdwire/memserver.py), then
replies written by each test, as a real server may legally send them (chunks
in any order, interleaved across requests, dribbled in small pieces) or as a
broken one would (a cookie not in flight, data outside the request, a READ
left short). Legal replies are read right; broken ones close the connection
and fail what was pending, never a wrong answer."""
from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import pytest

import agents.nbd as nbd
import nbdwire as c
from tests.agents.conftest import run
from tests.nbdwire.memserver import MemoryServer

KiB = 1024
Request = tuple[int, int, int, int, int]       # flags, cmd, cookie, offset, length


class Peer:
    """The server's side of one connection, for a script to drive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def request(self) -> Request:
        raw = await self.reader.readexactly(c.REQUEST.size)
        magic, flags, cmd, cookie, offset, length = c.REQUEST.unpack(raw)
        assert magic == c.REQUEST_MAGIC
        if cmd == c.CMD_WRITE:
            await self.reader.readexactly(length)
        return flags, cmd, cookie, offset, length

    async def send(self, data: bytes, piece: int = 0) -> None:
        """Write data, in pieces of `piece` bytes with a pause between (so
        the client receives them apart), or at once."""
        step = piece or len(data)
        for at in range(0, len(data), step):
            self.writer.write(data[at:at + step])
            await self.writer.drain()
            if piece:
                await asyncio.sleep(0)


Script = Callable[[Peer], Awaitable[None]]


async def serve_script(path: str, script: Script) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hs = MemoryServer()
        writer.write(hs.greeting())
        while hs.export is None and hs.closed is None:
            data = await reader.read(65536)
            if not data:
                return
            writer.write(hs.feed(data))
        try:
            await script(Peer(reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, path)


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return c.encode_offset_data_header(cookie, offset, len(data), done) + data


def hole_chunk(cookie: int, offset: int, length: int) -> bytes:
    return c.encode_chunk_header(cookie, 0, c.REPLY_TYPE_OFFSET_HOLE, 12) + c.OFFSET_HOLE.pack(
        offset, length)


@pytest.fixture
def scripted(tmp_path, loop):
    """scripted(script, client_fn): serve, connect, run client_fn(client)."""
    path = str(tmp_path / f"scripted-{os.getpid()}.sock")

    def go(script: Script, client_fn: Callable[[nbd.Client], Awaitable[object]]) -> object:
        async def main():
            server = await serve_script(path, script)
            try:
                async with await nbd.open(f"nbd+unix:///vol?socket={path}",
                                          timeout=10) as cl:
                    return await client_fn(cl)
            finally:
                server.close()
        return run(loop, main())
    return go


def test_chunks_out_of_order_interleaved_and_dribbled(scripted):
    a_data, b_data = os.urandom(48 * KiB), os.urandom(32 * KiB)

    async def script(peer: Peer) -> None:
        (_, _, ca, oa, _), (_, _, cb, ob, _) = await peer.request(), await peer.request()
        assert (oa, ob) == (0, 64 * KiB)
        stream = b"".join([
            data_chunk(ca, 16 * KiB + 32 * KiB, a_data[32 * KiB:]),
            hole_chunk(cb, 64 * KiB, 32 * KiB),
            hole_chunk(ca, 0, 16 * KiB),
            data_chunk(cb, 96 * KiB, b_data),
            data_chunk(ca, 16 * KiB, a_data[:32 * KiB]),
            c.encode_done(cb),
            c.encode_done(ca),
        ])
        await peer.send(stream, piece=999)
        await peer.request()            # DISC

    async def client(cl: nbd.Client):
        a, b = bytearray(b"\xff" * 64 * KiB), bytearray(b"\xff" * 64 * KiB)
        await asyncio.gather(cl.readinto(0, a), cl.readinto(64 * KiB, b))
        return a, b

    a, b = scripted(script, client)
    assert a == bytes(16 * KiB) + a_data
    assert b == bytes(32 * KiB) + b_data


def test_an_error_chunk_fails_its_request_only(scripted):
    async def script(peer: Peer) -> None:
        _, _, cookie, off, n = await peer.request()
        await peer.send(c.encode_error_chunk(cookie, c.EIO, "disk on fire at sector 9"))
        _, _, cookie, off, n = await peer.request()
        await peer.send(data_chunk(cookie, off, b"k" * n, done=True))
        await peer.request()

    async def client(cl: nbd.Client):
        with pytest.raises(nbd.RequestError) as ei:
            await cl.read(0, 4096)
        assert ei.value.name == "EIO" and ei.value.message == "disk on fire at sector 9"
        assert str(ei.value) == "EIO: READ 0+4096: disk on fire at sector 9"
        return await cl.read(4096, 512)

    assert scripted(script, client) == b"k" * 512


@pytest.mark.parametrize("name, reply, says", [
    ("unknown cookie", lambda ck, off, n: data_chunk(ck + 100, off, bytes(n), True),
     "not in flight"),
    ("outside the request", lambda ck, off, n: data_chunk(ck, off + 512, bytes(n), True),
     "outside the request"),
    ("short", lambda ck, off, n: data_chunk(ck, off, bytes(n - 512), True), "described"),
    ("simple reply to READ", lambda ck, off, n: c.encode_simple_reply(ck), "simple reply"),
    ("bad magic", lambda ck, off, n: b"\x12\x34\x56\x78" + bytes(16), "magic"),
    ("hole in a BLOCK_STATUS", lambda ck, off, n: hole_chunk(ck, off, n), "OFFSET_HOLE"),
    ("unknown context", lambda ck, off, n: c.encode_block_status(ck, 77, [(n, 0)], True),
     "context id 77"),
])
def test_a_broken_reply_closes_the_connection(scripted, name, reply, says):
    async def client(cl: nbd.Client):
        other = asyncio.ensure_future(cl.read(8192, 512))      # pending alongside
        with pytest.raises(nbd.Disconnected, match=f"protocol error from the server: .*{says}"):
            if name in ("hole in a BLOCK_STATUS", "unknown context"):
                [e async for e in cl.extents()]
            else:
                await cl.read(0, 4096)
        with pytest.raises(nbd.Disconnected):
            await other
        with pytest.raises(nbd.Disconnected):
            await cl.read(0, 512)

    async def script(peer: Peer) -> None:
        _, _, cookie, off, n = await peer.request()
        await peer.request()                # the other read: never answered
        await peer.send(reply(cookie, off, n))
        await asyncio.sleep(5)

    scripted(script, client)


def test_block_status_answers_for_less_and_past_the_end(scripted):
    async def script(peer: Peer) -> None:
        while True:
            flags, cmd, cookie, off, n = await peer.request()
            if cmd != c.CMD_BLOCK_STATUS:
                return
            # 4 KiB extents, alternating, at most 3 a reply; the last one
            # reaches past what was asked when the request is short.
            ext = [(4096, (off // 4096 + i) % 2) for i in range(3)]
            await peer.send(c.encode_block_status(cookie, 1, ext, done=False) + c.encode_done(cookie))

    async def client(cl: nbd.Client):
        return [e async for e in cl.extents(c.BASE_ALLOCATION, 0, 10 * 4096 + 100)]

    runs = scripted(script, client)
    assert runs == [(i * 4096, 4096, i % 2) for i in range(10)] + [(40960, 100, 0)]


@pytest.mark.parametrize("limits, size, expect", [
    ({"max_requests": 3}, 4 * KiB, 3),                     # by count
    ({"max_requests": 16, "max_bytes": 64 * KiB}, 24 * KiB, 2),   # by bytes
    ({"max_requests": 16, "max_bytes": 16 * KiB}, 64 * KiB, 1),   # too big: alone
])
def test_requests_in_flight_are_bounded(tmp_path, loop, limits, size, expect):
    # The server answers nothing until no more requests come for a while:
    # what arrived by then is what the client let out at once.
    path = str(tmp_path / f"bound-{os.getpid()}.sock")
    seen: list[int] = []

    async def script(peer: Peer) -> None:
        while True:
            held = []
            while True:
                try:
                    held.append(await asyncio.wait_for(peer.request(), 0.3))
                except TimeoutError:
                    break
            if not held or held[0][1] == c.CMD_DISC:
                return
            seen.append(len(held))
            for _, _, cookie, off, n in held:
                await peer.send(data_chunk(cookie, off, bytes(n), done=True))

    async def main():
        server = await serve_script(path, script)
        try:
            async with await nbd.open(f"nbd+unix:///vol?socket={path}", **limits) as cl:
                await asyncio.gather(*(cl.read(i * size, size) for i in range(6)))
        finally:
            server.close()

    run(loop, main())
    assert seen[0] == expect and sum(seen) == 6 and max(seen) == expect, seen


def test_cancelled_requests_keep_the_connection_in_step(scripted):
    # One request in flight at a time; the server answers each after 0.2 s
    # with data naming its offset.
    async def script(peer: Peer) -> None:
        while True:
            _, cmd, cookie, off, n = await peer.request()
            if cmd == c.CMD_DISC:
                return
            await asyncio.sleep(0.2)
            await peer.send(data_chunk(cookie, off, off.to_bytes(8, "big") * (n // 8), done=True))

    async def client(cl: nbd.Client):
        conn = cl.connections[0]
        conn.budget.max_requests = 1
        first = asyncio.ensure_future(cl.read(0, 4096))          # in flight
        waiting = asyncio.ensure_future(cl.read(8192, 4096))     # waits for the budget
        third = asyncio.ensure_future(cl.read(16384, 4096))
        await asyncio.sleep(0.05)
        waiting.cancel()
        first.cancel()                  # its reply still comes, and goes nowhere
        got = await third
        assert got == (16384).to_bytes(8, "big") * 512
        assert first.cancelled() and waiting.cancelled()
        assert await cl.read(4096, 512) == (4096).to_bytes(8, "big") * 64
        assert conn.budget.requests == 0 and conn.budget.bytes == 0

    scripted(script, client)
