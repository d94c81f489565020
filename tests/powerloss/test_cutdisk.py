"""The cut-able disk itself (harness/powerloss/cutdisk.py), through libnbd:
what survives a cut is exactly what a FLUSH or a FUA request made durable.
No root needed: these talk NBD to the server directly.
"""
from __future__ import annotations

import os
import threading

import pytest

from harness.powerloss.cutdisk import CutDisk

nbd = pytest.importorskip("nbd")

KiB = 1024
MiB = 1 << 20
SIZE = 8 * MiB


def blk(tag: int, n: int = 4096) -> bytes:
    return bytes([tag]) * n


@pytest.fixture
def disk(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    d = CutDisk(image, tmp_path).start()
    yield d
    d.stop()


def connect(d: CutDisk):
    h = nbd.NBD()
    h.connect_uri(d.uri)
    return h


def restart(d: CutDisk) -> None:
    d.stop()
    d.start()


def test_handshake_and_flags(disk):
    h = connect(disk)
    assert h.get_size() == SIZE
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    assert not h.is_read_only()
    assert not h.can_multi_conn()
    assert not h.get_structured_replies_negotiated()
    h.shutdown()


def test_read_your_writes_before_a_flush(disk):
    h = connect(disk)
    h.pwrite(blk(1), 0)
    h.pwrite(b"x" * 100, 4096 + 10)              # part of a block
    assert h.pread(4096, 0) == blk(1)
    got = h.pread(4096, 4096)
    assert got == bytes(10) + b"x" * 100 + bytes(4096 - 110)
    # a read across blocks, some in the overlay and some not
    assert h.pread(3 * 4096, 0)[:4096 + 110] == blk(1) + bytes(10) + b"x" * 100
    h.shutdown()


def test_unflushed_lost_flushed_kept(disk):
    h = connect(disk)
    h.pwrite(blk(1), 0)
    h.pwrite(blk(2), 8192)
    h.flush()
    h.pwrite(blk(3), 8192)                      # overwrites a flushed block, unflushed
    h.pwrite(blk(4), 16384)                     # a new block, unflushed
    assert disk.cut() == (2, 0)
    # After the cut: reads are the durable image; writes are acknowledged and lost.
    assert h.pread(4096, 8192) == blk(2)
    h.pwrite(blk(5), 0)
    h.flush()
    h.pwrite(blk(6), 4096, nbd.CMD_FLAG_FUA)
    h.zero(4096, 4096, nbd.CMD_FLAG_FUA)     # (count, offset)
    assert h.pread(4096, 0) == blk(1)
    h.shutdown()
    restart(disk)
    h = connect(disk)
    assert h.pread(4096, 0) == blk(1)
    assert h.pread(4096, 8192) == blk(2)
    assert h.pread(4096, 16384) == bytes(4096)
    assert h.pread(4096, 4096) == bytes(4096)
    h.shutdown()


def test_fua_makes_only_its_own_bytes_durable(disk):
    h = connect(disk)
    h.pwrite(blk(1, 8192), 0)                   # unflushed, two blocks
    h.pwrite(b"F" * 1024, 1024, nbd.CMD_FLAG_FUA)   # inside block 0
    h.pwrite(blk(7), 65536, nbd.CMD_FLAG_FUA)
    assert h.pread(8192, 0) == blk(1, 1024) + b"F" * 1024 + blk(1, 6144)
    disk.cut()
    h.shutdown()
    restart(disk)
    h = connect(disk)
    assert h.pread(8192, 0) == bytes(1024) + b"F" * 1024 + bytes(6144)
    assert h.pread(4096, 65536) == blk(7)
    h.shutdown()


def test_stopping_is_a_cut_too(disk):
    h = connect(disk)
    h.pwrite(blk(1), 0)
    h.flush()
    h.pwrite(blk(2), 0)
    h.shutdown()
    restart(disk)
    h = connect(disk)
    assert h.pread(4096, 0) == blk(1)
    h.shutdown()


def test_trim_and_zero(disk):
    h = connect(disk)
    h.pwrite(blk(9, 64 * KiB), 0)
    h.flush()
    h.trim(4 * KiB, 48 * KiB)                   # unflushed trim (count, offset)
    h.zero(32 * KiB, 1000, nbd.CMD_FLAG_FUA)    # durable, unaligned
    assert h.pread(4096, 48 * KiB) == bytes(4096)
    assert h.pread(1000, 0) == blk(9, 1000)
    assert h.pread(4096, 4096) == bytes(4096)
    disk.cut()
    h.shutdown()
    restart(disk)
    h = connect(disk)
    assert h.pread(1000, 0) == blk(9, 1000)
    assert h.pread(4096, 4096) == bytes(4096)
    assert h.pread(4096, 40 * KiB) == blk(9)
    assert h.pread(4096, 48 * KiB) == blk(9)      # the unflushed trim is lost
    h.shutdown()
    # A flushed trim punched a hole in the image.
    h = connect(disk)
    h.trim(4 * MiB, 1 * MiB)
    h.flush()
    h.shutdown()
    st = os.stat(disk.image)
    assert st.st_blocks * 512 < 2 * MiB


def test_cut_keeping_part_of_the_overlay(disk):
    h = connect(disk)
    for i in range(64):
        h.pwrite(blk(i + 1), i * 4096)
    dropped, kept = disk.cut(keep=0.5, seed=3)
    assert dropped + kept == 64 and 0 < kept < 64
    h.shutdown()
    restart(disk)
    h = connect(disk)
    survived = sum(h.pread(4096, i * 4096) == blk(i + 1) for i in range(64))
    lost = sum(h.pread(4096, i * 4096) == bytes(4096) for i in range(64))
    assert (survived, lost) == (kept, dropped)
    h.shutdown()


def test_a_flush_covers_every_connection(disk):
    hs = [connect(disk) for _ in range(4)]
    errors = []

    def writer(i):
        try:
            for j in range(50):
                hs[i].pwrite(blk(i + 1), (i * 50 + j) * 4096)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    hs[0].flush()
    assert disk.stats()["overlay_blocks"] == 0
    disk.cut()
    for h in hs:
        h.shutdown()
    restart(disk)
    h = connect(disk)
    for i in range(4):
        assert h.pread(50 * 4096, i * 50 * 4096) == blk(i + 1, 50 * 4096)
    h.shutdown()


def test_out_of_range(disk):
    h = connect(disk)
    with pytest.raises(nbd.Error):
        h.pwrite(blk(1), SIZE - 2048, nbd.CMD_FLAG_FUA)
    with pytest.raises(nbd.Error):
        h.pread(4096, SIZE - 2048)
    h.pwrite(blk(1), SIZE - 4096)       # the connection goes on
    assert h.pread(4096, SIZE - 4096) == blk(1)
    h.shutdown()


def test_an_image_not_a_multiple_of_the_block(tmp_path):
    image = tmp_path / "odd.img"
    with open(image, "wb") as f:
        f.truncate(SIZE - 1536)
    d = CutDisk(image, tmp_path).start()
    try:
        h = connect(d)
        h.pwrite(b"t" * 1536, SIZE - 3072)           # the last, short block
        h.flush()
        h.shutdown()
        assert os.path.getsize(image) == SIZE - 1536
        restart(d)
        h = connect(d)
        assert h.get_size() == SIZE - 1536
        assert h.pread(1536, SIZE - 3072) == b"t" * 1536
        h.shutdown()
    finally:
        d.stop()
