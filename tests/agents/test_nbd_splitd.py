"""agents.nbd against the real splitd: data, block status (ours and
base:allocation), several connections, errors with the server's message, a
dropped connection, a timeout, on asyncio's loop and on uvloop."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import signal

import pytest

import agents.nbd as nbd
import nbdwire as c
from tests.agents.conftest import run
from tests.conftest import need
from tests.pairs.helpers import pending_map, wait_mirrored

MiB = 1 << 20
REGION = 64 * 1024


@pytest.fixture
def vol(daemon):
    daemon.create_volume("vol", 64 * MiB)
    return daemon


def test_read_write_zero_trim_flush_fua(vol, loop):
    async def go():
        async with await nbd.open(vol.uri("vol")) as cl:
            assert cl.size == 64 * MiB and not cl.read_only
            assert cl.contexts == {c.BASE_ALLOCATION}     # no pair: none of ours
            data = os.urandom(5 * MiB + 123)
            await cl.write(MiB - 7, data, fua=True)
            assert await cl.read(MiB - 7, len(data)) == data
            await cl.zero(2 * MiB, MiB + 1)
            await cl.zero(4 * MiB, 4096, punch=False)
            try:
                # FAST_ZERO: zeroed at once, or ENOTSUP and nothing done ("NBD_CMD_FLAG_FAST_ZERO").
                await cl.zero(4 * MiB, 8192, fast=True)
            except nbd.RequestError as e:
                assert e.name == "ENOTSUP", e
                await cl.zero(4 * MiB, 8192)
            assert await cl.read(4 * MiB, 8192) == bytes(8192)
            await cl.trim(5 * MiB, REGION)
            await cl.flush()
            want = bytearray(bytes(MiB - 7) + data)
            want[2 * MiB:3 * MiB + 1] = bytes(MiB + 1)
            want[4 * MiB:4 * MiB + 8192] = bytes(8192)
            got = await cl.read(0, len(want))
            # A trimmed range reads as anything; splitd punches it (zeroes).
            want[5 * MiB:5 * MiB + REGION] = got[5 * MiB:5 * MiB + REGION]
            assert got == want
            # readinto a caller's buffer, holes included, overwriting what was there.
            buf = bytearray(b"\xff" * (2 * MiB))
            await cl.readinto(62 * MiB, buf)
            assert buf == bytes(2 * MiB)
    run(loop, go())


def test_many_requests_in_flight_on_several_connections(vol, loop):
    async def go():
        async with await nbd.open(vol.uri("vol"), connections=4, max_requests=4) as cl:
            # splitd advertises multi-conn: four connections, requests spread.
            assert cl.can_multi_conn and len(cl.connections) == 4
            blocks = {off: os.urandom(256 * 1024) for off in range(0, 32 * MiB, 512 * 1024)}
            await asyncio.gather(*(cl.write(off, b) for off, b in blocks.items()))
            peak = []

            async def read(off):
                got = await cl.read(off, len(blocks[off]))
                peak.append(sum(cn.budget.requests for cn in cl.connections))
                return off, got

            got = dict(await asyncio.gather(*(read(off) for off in blocks)))
            assert got == blocks
            # Bounded: at most 4 in flight per connection, and more than one at once.
            assert all(n <= 16 for n in peak) and max(peak) > 1
            # A write on one connection is seen on the others after its reply.
            await cl.connections[0].request(c.CMD_WRITE, 0, 4096, payload=b"z" * 4096)
            dest = bytearray(4096)
            await cl.connections[3].request(c.CMD_READ, 0, 4096, dest=memoryview(dest))
            assert dest == b"z" * 4096
    run(loop, go())


def test_base_allocation_extents_match_the_data(vol, loop):
    async def go():
        async with await nbd.open(vol.uri("vol")) as cl:
            await cl.write(REGION, os.urandom(REGION))
            await cl.write(10 * MiB, os.urandom(MiB))
            runs = [e async for e in cl.extents(c.BASE_ALLOCATION)]
            # Whole range, in order, no gaps, adjacent runs of equal flags merged.
            assert runs[0][0] == 0 and sum(n for _, n, _ in runs) == cl.size
            assert all(a[0] + a[1] == b[0] and a[2] != b[2] for a, b in itertools.pairwise(runs))
            data = [(o, n) for o, n, f in runs if not f & c.STATE_HOLE]
            assert data == [(REGION, REGION), (10 * MiB, MiB)]
            # Part of the range, starting inside a run; REQ_ONE: one extent a reply.
            part = [e async for e in cl.extents(c.BASE_ALLOCATION, REGION + 100, 10 * MiB,
                                                req_one=True)]
            assert part[0][0] == REGION + 100
            assert sum(n for _, n, _ in part) == 10 * MiB
            with pytest.raises(LookupError, match="x-splitd:delta.*not negotiated"):
                [e async for e in cl.extents(nbd.DELTA)]
    run(loop, go())


def test_pending_and_delta_of_a_split_secondary(daemon, loop):
    need("nbdinfo")
    daemon.create_volume("p", 32 * MiB)

    async def write_p(offsets):
        async with await nbd.open(daemon.uri("p")) as cl:
            for off in offsets:
                await cl.write(off, os.urandom(REGION))
            await cl.flush()

    run(loop, write_p(range(0, 32 * MiB, 2 * MiB)))
    # Slow copy: most regions still pending when we look.
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True, rate=4096)
    daemon.call("pair.split", name="s")

    async def maps(uri):
        async with await nbd.open(uri) as cl:
            assert {nbd.PENDING, nbd.DELTA} <= cl.contexts
            return [e async for e in cl.extents(nbd.PENDING)], [e async for e in cl.extents(nbd.DELTA)]

    before, _ = run(loop, maps(daemon.uri("s")))
    theirs = pending_map(daemon.uri("s"))
    after, _ = run(loop, maps(daemon.uri("s")))
    assert theirs in (before, after), (before, theirs, after)
    assert any(f == 1 for _, _, f in before)

    # After a resync and a second split, delta = the P regions written between.
    daemon.call("pair.set", name="s", rate=0)
    daemon.call("pair.resync", name="s")
    wait_mirrored(daemon, "s")
    run(loop, write_p([3 * MiB, 7 * MiB + REGION]))
    daemon.call("pair.split", name="s")
    _, delta = run(loop, maps(daemon.uri("s")))
    assert [(o, n) for o, n, f in delta if f == 1] == [(3 * MiB, REGION), (7 * MiB + REGION, REGION)]


def test_server_errors_carry_errno_name_and_message(vol, loop):
    async def go():
        async with await nbd.open(vol.uri("vol")) as cl:
            conn = cl.connections[0]
            # Past the client's own checks, straight to the server: EINVAL, its message.
            with pytest.raises(nbd.RequestError) as ei:
                await conn.request(c.CMD_READ, cl.size - 512, 1024, dest=memoryview(bytearray(1024)))
            e = ei.value
            assert e.errno == errno.EINVAL and e.name == "EINVAL" and e.message
            assert str(e).startswith(f"EINVAL: READ {cl.size - 512}+1024: ")
            with pytest.raises(nbd.RequestError) as ei:
                await conn.request(c.CMD_WRITE, cl.size, 512, payload=bytes(512))
            assert ei.value.name == "ENOSPC"
            # The connection goes on after request errors.
            assert await cl.read(0, 4096) == bytes(4096)
            # Caught before sending: out of range, wrong context.
            with pytest.raises(ValueError, match="outside the export"):
                await cl.write(cl.size - 1, b"ab")
        with pytest.raises(nbd.ConnectError, match="nope"):
            await nbd.open(vol.uri("nope"))
    run(loop, go())


def test_refused_export_names_the_pair(daemon, loop):
    daemon.create_volume("p", 8 * MiB)
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True)

    async def go():
        with pytest.raises(nbd.ConnectError) as ei:
            await nbd.open(daemon.uri("s"))
        # The server's own message, whole: which pair, which state.
        assert str(ei.value).startswith("export 's'")
        assert "server refused GO" in str(ei.value) and "in state 'pair'" in str(ei.value)
    run(loop, go())


def test_a_dropped_connection_fails_every_pending_request(vol, loop):
    async def go():
        cl = await nbd.open(vol.uri("vol"), connections=2)
        await cl.write(0, os.urandom(8 * MiB))
        os.kill(vol.pid, signal.SIGSTOP)      # replies stop; requests pile up in flight
        reads = [asyncio.ensure_future(cl.read(off, MiB)) for off in range(0, 8 * MiB, MiB)]
        await asyncio.sleep(0.3)
        assert not any(r.done() for r in reads)
        vol.kill9()                           # SIGKILL ends a stopped process too
        results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
        assert all(isinstance(r, nbd.Disconnected) for r in results), results
        assert "connection" in str(results[0])
        with pytest.raises(nbd.Disconnected):
            await cl.read(0, 4096)
        await cl.close()
    run(loop, go())


def test_a_request_without_reply_times_out(vol, loop):
    async def go():
        cl = await nbd.open(vol.uri("vol"), timeout=0.5)
        os.kill(vol.pid, signal.SIGSTOP)
        try:
            with pytest.raises(nbd.RequestTimeout, match=r"no reply to READ 0\+4096 in 0.5 s"):
                await asyncio.wait_for(cl.read(0, 4096), 10)
        finally:
            os.kill(vol.pid, signal.SIGCONT)
        with pytest.raises(nbd.Disconnected):
            await cl.read(0, 4096)
        await cl.close()
    run(loop, go())


def test_tcp_and_the_daemon_counts_one_client(vol, loop):
    async def go():
        async with await nbd.open(vol.uri("vol", tcp=True), connections=2) as cl:
            data = os.urandom(3 * MiB)
            await cl.write(0, data)
            assert await cl.read(0, len(data)) == data
    run(loop, go())


@pytest.mark.parametrize("reuse", [False, True])
def test_iter_read_in_order_with_a_window_ahead(vol, loop, reuse):
    async def go():
        async with await nbd.open(vol.uri("vol"), connections=2) as cl:
            data = os.urandom(9 * MiB + 4096)
            await cl.write(3 * MiB, data)
            await cl.zero(5 * MiB, MiB)         # a hole inside, into reused buffers too
            want = bytearray(data)
            want[2 * MiB:3 * MiB] = bytes(MiB)
            pieces = []
            async for off, piece in cl.iter_read(2 * MiB, len(data) + MiB, request=MiB,
                                                 ahead=4, reuse=reuse):
                pieces.append((off, len(piece)))
                # The window: later pieces are in flight while we hold this one.
                assert sum(cn.budget.requests for cn in cl.connections) <= 4
                want_here = bytes(MiB) if off == 2 * MiB else want[off - 3 * MiB:off - 3 * MiB + MiB]
                assert piece == want_here
                await asyncio.sleep(0.01)       # a slow consumer: the window fills meanwhile
            assert pieces == [(2 * MiB + i * MiB, MiB) for i in range(10)] + [(12 * MiB, 4096)]
            # Leaving early cancels what was still coming; the client goes on.
            async with contextlib.aclosing(cl.iter_read(request=MiB, ahead=8)) as reads:
                async for _ in reads:
                    break
            await asyncio.sleep(0.2)            # the cancelled READs' replies come and go
            assert sum(cn.budget.requests for cn in cl.connections) == 0
            assert await cl.read(3 * MiB, 4096) == data[:4096]
            with pytest.raises(ValueError, match="request=0"):
                async for _ in cl.iter_read(request=0):
                    pass
    run(loop, go())
