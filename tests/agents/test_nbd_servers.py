"""agents.nbd against servers other than splitd: nbdkit (a sparse memory
export, block size limits, a plugin that describes less than it is asked, an
export without multi-conn) and qemu-nbd (qcow2, whose READ replies carry
OFFSET_HOLE chunks)."""
from __future__ import annotations

import errno
import os
import socket
import subprocess

import pytest

import agents.nbd as nbd
import nbdwire as c
from tests.agents.conftest import nbdkit, run
from tests.conftest import need

MiB = 1 << 20


def test_nbdkit_sparse_memory_with_holes(serve, loop):
    srv = nbdkit(serve, "memory", "64M")

    async def go():
        async with await nbd.open(srv.uri(), connections=3) as cl:
            assert cl.size == 64 * MiB and len(cl.connections) == 3    # memory: multi-conn
            a, b = os.urandom(MiB), os.urandom(4096)
            await cl.write(8 * MiB, a)
            await cl.write(40 * MiB + 512, b)
            got = await cl.read(7 * MiB, 2 * MiB)
            assert got == bytes(MiB) + a
            data = [(o, n) async for o, n, f in cl.extents() if not f & c.STATE_HOLE]
            assert data[0][0] == 8 * MiB and sum(n for _, n in data) >= MiB + 4096
            await cl.trim(8 * MiB, MiB)
            await cl.zero(40 * MiB, 8192)
            assert await cl.read(40 * MiB, 8192) == bytes(8192)
            await cl.flush()
    run(loop, go())


def test_nbdkit_block_size_limits_split_big_requests(serve, loop):
    # blocksize-error-policy=error: a request above the maximum fails, so
    # reads and writes that work were split as the server asked.
    srv = nbdkit(serve, "--filter=blocksize-policy", "memory", "16M",
                 "blocksize-minimum=512", "blocksize-preferred=4096",
                 "blocksize-maximum=65536", "blocksize-error-policy=error")

    async def go():
        async with await nbd.open(srv.uri()) as cl:
            assert (cl.minimum, cl.preferred, cl.max_payload) == (512, 4096, 65536)
            data = os.urandom(3 * MiB + 512)
            await cl.write(512, data)
            assert await cl.read(512, len(data)) == data
            # In 64 KiB pieces: 48 and a short one, each way.
            assert (cl.stats.writes, cl.stats.reads) == (49, 49)
            assert cl.stats.bytes_read == cl.stats.bytes_written == len(data)
            with pytest.raises(ValueError, match="minimum block size 512"):
                await cl.read(100, 512)
            # Straight to the server, unsplit: refused, as the control.
            with pytest.raises(nbd.RequestError):
                await cl.connections[0].request(c.CMD_READ, 0, MiB,
                                                dest=memoryview(bytearray(MiB)))
    run(loop, go())


# Extents of 64 KiB, alternating data / hole+zero, one per BLOCK_STATUS reply
# however much was asked: the client has to ask again from where each ended.
SHORT_EXTENTS = ["get_size=echo 8M", "pread=head -c $3 /dev/zero", "can_extents=exit 0",
                 "extents=echo $4 65536 $(( ($4 / 65536) % 2 ? 3 : 0 ))"]


def test_extents_loop_until_the_range_is_described(serve, loop):
    srv = nbdkit(serve, "eval", *SHORT_EXTENTS)

    async def go():
        async with await nbd.open(srv.uri(), connections=4) as cl:
            # eval does not advertise multi-conn: one connection, whatever was asked.
            assert not cl.can_multi_conn and len(cl.connections) == 1
            runs = [e async for e in cl.extents()]
            assert runs == [(o, 65536, 3 if (o // 65536) % 2 else 0)
                            for o in range(0, 8 * MiB, 65536)]
            assert cl.stats.block_status == 128        # one request per 64 KiB answer
            part = [e async for e in cl.extents(c.BASE_ALLOCATION, 100, 200000)]
            assert part[0][0] == 100 and sum(n for _, n, _ in part) == 200000
            assert part[-1][0] + part[-1][1] == 200100
    run(loop, go())


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_qemu_nbd(serve, tmp_path, loop, fmt):
    need("qemu-img")
    img = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), "32M"], check=True)
    srv = serve("qemu-nbd", "--socket={sock}", "--format", fmt, "--export-name=disk",
                "--shared=4", "--persistent", "--cache=writeback", str(img))

    async def go():
        async with await nbd.open(srv.uri("disk"), connections=2) as cl:
            assert cl.size == 32 * MiB
            a = os.urandom(2 * MiB)
            await cl.write(5 * MiB, a, fua=True)
            # Holes on both sides: qemu answers them with OFFSET_HOLE chunks.
            buf = bytearray(b"\x55" * (4 * MiB))
            await cl.readinto(4 * MiB, buf)
            assert buf == bytes(MiB) + a + bytes(MiB)
            await cl.zero(5 * MiB, MiB)
            assert await cl.read(5 * MiB, 2 * MiB) == bytes(MiB) + a[MiB:]
            runs = [e async for e in cl.extents()]
            assert sum(n for _, n, _ in runs) == cl.size
            data = [(o, n) for o, n, f in runs if not f & c.STATE_HOLE]
            assert any(o <= 6 * MiB < o + n for o, n in data), runs
            await cl.flush()
            return a
    a = run(loop, go())
    # What qemu itself reads from the image once its server is gone.
    srv.stop()
    raw = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(img), str(raw)], check=True)
    with open(raw, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(4 * MiB) == bytes(2 * MiB) + a[MiB:] + bytes(MiB)


def test_flags_the_export_lacks_are_refused_before_sending(serve, loop):
    srv = nbdkit(serve, "--filter=fua", "--filter=nozero", "memory", "1M",
                 )

    async def go():
        async with await nbd.open(srv.uri()) as cl:
            with pytest.raises(OSError, match="does not support FUA") as ei:
                await cl.write(0, b"x" * 512, fua=True)
            assert ei.value.errno == errno.ENOTSUP
            with pytest.raises(OSError, match="does not support WRITE_ZEROES"):
                await cl.zero(0, 512)
            await cl.write(0, b"x" * 512)
    run(loop, go())


def test_connect_failures_say_why(tmp_path, loop):
    silent = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(silent))
    listener.listen(1)          # accepted by the kernel, never answered

    async def go():
        with pytest.raises(nbd.ConnectError, match="cannot connect to export 'v' at unix:"):
            await nbd.open(f"nbd+unix:///v?socket={tmp_path}/none.sock")
        with pytest.raises(nbd.ConnectError, match=r"no handshake within 0.3 s"):
            await nbd.open(f"nbd+unix:///v?socket={silent}", connect_timeout=0.3)
    try:
        run(loop, go())
    finally:
        listener.close()
