"""libnbd's Python binding (`import nbd`, python3-libnbd) against splitd, with
structured replies negotiated and without (the kernel client never asks for
them, DESIGN.md "NBD").

Every check compares with a model of the volume kept in a bytearray.
"""
from __future__ import annotations

import random

import pytest

from tests.interop.clients import KiB, MiB, first_difference

nbd = pytest.importorskip("nbd")

SIZE = 32 * MiB
HOLE, ZERO = 1, 2   # base:allocation flags


def connect(daemon, name: str, structured: bool, tcp: bool = False, strict: bool = True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.add_meta_context("base:allocation")
    if not strict:
        # Let requests libnbd would refuse itself reach the server.
        h.set_strict_mode(0)
    h.connect_uri(daemon.uri(name, tcp=tcp))
    assert h.get_structured_replies_negotiated() is structured
    # Meta contexts ride on structured replies: none without them.
    assert h.can_meta_context("base:allocation") is structured
    return h


def extents(h, offset: int, length: int, flags: int = 0) -> list[tuple[int, int, int]]:
    """base:allocation as (offset, length, flags) over [offset, offset+length)."""
    out = []

    def seen(context, start, entries, err):
        assert context == "base:allocation"
        pos = start
        for i in range(0, len(entries), 2):
            out.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(length, offset, seen, flags)
    return out


def assert_volume_is(h, model: bytearray) -> None:
    for base in range(0, len(model), 8 * MiB):
        got = h.pread(8 * MiB, base)
        want = bytes(model[base:base + 8 * MiB])
        at = first_difference(got, want)
        assert at is None, f"volume differs from the model at {base + at}"


STRUCTURED = pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])


@STRUCTURED
@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_synchronous_requests(daemon, structured, tcp):
    daemon.create_volume("vol", SIZE)
    h = connect(daemon, "vol", structured, tcp)
    assert h.get_size() == SIZE
    assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()
    model = bytearray(SIZE)
    rng = random.Random(3)

    def write(offset, data, flags=0):
        h.pwrite(data, offset, flags)
        model[offset:offset + len(data)] = data

    write(0, rng.randbytes(3 * MiB + 5), nbd.CMD_FLAG_FUA)
    write(7, b"Q")
    write(4 * MiB - 1, b"\x01\x02")                # across an aligned boundary
    write(16 * MiB, rng.randbytes(16 * MiB))       # one 16 MiB payload
    write(SIZE - 512, rng.randbytes(512), nbd.CMD_FLAG_FUA)
    assert h.pread(1, 7) == b"Q"
    assert h.pread(4, 4 * MiB - 2) == bytes(model[4 * MiB - 2:4 * MiB + 2])

    h.zero(8192, 8192, nbd.CMD_FLAG_FUA)
    model[8192:16384] = bytes(8192)
    h.zero(100, 1 * MiB + 50, nbd.CMD_FLAG_NO_HOLE)
    model[1 * MiB + 50:1 * MiB + 150] = bytes(100)
    h.trim(1 * MiB, 2 * MiB, nbd.CMD_FLAG_FUA)      # splitd's TRIM reads back as zeroes
    model[2 * MiB:3 * MiB] = bytes(1 * MiB)
    h.flush()
    assert h.pread(8192, 8192) == bytes(8192)
    assert h.pread(3 * MiB + 5 - 2 * MiB, 2 * MiB) == bytes(model[2 * MiB:3 * MiB + 5])
    assert_volume_is(h, model)

    if structured:
        # DF: the read comes back in one chunk.
        chunks = []
        buf = h.pread_structured(
            64 * KiB, 0, lambda sub, off, status, err: chunks.append((off, len(sub), status)) or 0,
            nbd.CMD_FLAG_DF)
        assert buf == bytes(model[:64 * KiB])
        assert chunks == [(0, 64 * KiB, nbd.READ_DATA)], chunks
        # Block status: data where written, holes where trimmed or never touched.
        got = extents(h, 0, SIZE)
        assert sum(length for _, length, _ in got) == SIZE, got
        for offset, length, flags in got:
            if flags & HOLE:
                assert flags & ZERO, (offset, length, flags)
                assert model[offset:offset + length] == bytes(length), (offset, length, flags)
        hole = [(o, n) for o, n, f in got if f & HOLE]
        assert any(o <= 2 * MiB and o + n >= 3 * MiB for o, n in hole), got   # trimmed
        assert any(o <= 4 * MiB + 4096 and o + n >= 16 * MiB for o, n in hole), got  # untouched
        data = [(o, n) for o, n, f in got if not f & HOLE]
        assert any(o <= 16 * MiB and o + n >= 32 * MiB - 512 for o, n in data), got
        # REQ_ONE: a single extent, starting at the offset asked.
        one = extents(h, 16 * MiB + 4096, 1 * MiB, nbd.CMD_FLAG_REQ_ONE)
        assert len(one) == 1 and one[0][0] == 16 * MiB + 4096 and one[0][2] & HOLE == 0, one
    else:
        with pytest.raises(nbd.Error):
            extents(h, 0, SIZE)
    h.shutdown()


@STRUCTURED
def test_errors_leave_the_connection_usable(daemon, structured):
    daemon.create_volume("vol", SIZE)
    daemon.call("volume.create", name="ro", size=SIZE, read_only=True)
    h = connect(daemon, "vol", structured, strict=False)
    ro = connect(daemon, "ro", structured, strict=False)
    assert ro.is_read_only() and not h.is_read_only()
    h.pwrite(b"kept", 0)

    cases = [
        ("read past the end", lambda: h.pread(1, SIZE), "EINVAL"),
        ("read across the end", lambda: h.pread(8, SIZE - 4), "EINVAL"),
        ("write past the end", lambda: h.pwrite(b"x", SIZE), "ENOSPC"),
        ("trim past the end", lambda: h.trim(4096, SIZE), "EINVAL"),
        ("zero past the end", lambda: h.zero(4096, SIZE), "ENOSPC"),
        ("read over 32 MiB", lambda: h.pread(32 * MiB + 4096, 0), "EINVAL"),
        ("unknown command flag", lambda: h.pread(1, 0, 1 << 9), "EINVAL"),
        ("write to read-only", lambda: ro.pwrite(b"x", 0), "EPERM"),
        ("zero on read-only", lambda: ro.zero(4096, 0), "EPERM"),
        ("trim on read-only", lambda: ro.trim(4096, 0), "EPERM"),
    ]
    for what, request, errno_name in cases:
        with pytest.raises(nbd.Error) as e:
            request()
        assert e.value.errno == errno_name, (what, e.value.string)
        # A request error is not a protocol error: the same handle goes on.
        assert h.pread(4, 0) == b"kept", what
        assert ro.pread(4, 0) == bytes(4), what
    assert h.aio_in_flight() == 0
    h.shutdown()
    ro.shutdown()


@STRUCTURED
def test_zero_length_requests(daemon, structured):
    # The spec leaves zero-length requests unspecified, but the server "SHOULD
    # NOT disconnect", and whatever reply it sends must be well formed (an
    # OFFSET_DATA chunk carries at least one byte).
    daemon.create_volume("vol", SIZE)
    h = connect(daemon, "vol", structured, strict=False)
    h.pwrite(b"kept", 0)
    for what, request in [("read", lambda: h.pread(0, 4096)),
                          ("write", lambda: h.pwrite(b"", 4096)),
                          ("trim", lambda: h.trim(0, 4096)),
                          ("zero", lambda: h.zero(0, 4096)),
                          ("flush", lambda: h.flush())]:
        try:
            result = request()
        except nbd.Error as e:
            # An NBD error is fine; a dead connection is not.
            assert e.errno is not None, f"zero-length {what}: {e.string}\n{daemon.log()[-1500:]}"
        else:
            if what == "read":
                assert result == b""
        assert h.pread(4, 0) == b"kept", what
    h.shutdown()


@STRUCTURED
def test_many_requests_in_flight(daemon, structured):
    # More requests in flight than splitd's default cap of 64, mixing reads
    # served inline, FUA writes and flushes served in threads, and 1-byte reads.
    daemon.create_volume("vol", SIZE)
    h = connect(daemon, "vol", structured)
    rng = random.Random(5)
    block = 256 * KiB
    count = SIZE // block
    blocks = [rng.randbytes(block) for _ in range(count)]

    cookies = []
    for i, data in enumerate(blocks):
        flags = nbd.CMD_FLAG_FUA if i % 2 else 0
        cookies.append(h.aio_pwrite(data, i * block, flags=flags))
        if i % 16 == 0:
            cookies.append(h.aio_flush())
    assert h.aio_in_flight() > 64
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in cookies:
        assert h.aio_command_completed(cookie) is True

    whole = b"".join(blocks)
    reads = []
    for _ in range(2):
        for i in range(count):
            buf = nbd.Buffer(block)
            reads.append((i * block, block, buf, h.aio_pread(buf, i * block)))
    for _ in range(300):
        offset, length = rng.randrange(SIZE - 100), rng.randrange(1, 100)
        buf = nbd.Buffer(length)
        reads.append((offset, length, buf, h.aio_pread(buf, offset)))
    assert h.aio_in_flight() > 64
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for offset, length, buf, cookie in reads:
        assert h.aio_command_completed(cookie) is True
        assert bytes(buf.to_bytearray()) == whole[offset:offset + length], (offset, length)
    h.shutdown()


def test_flush_on_one_connection_covers_the_others(daemon):
    # CAN_MULTI_CONN: a write acknowledged on one connection, then a flush on
    # another, and a third connection reads it.
    daemon.create_volume("vol", SIZE)
    handles = [connect(daemon, "vol", True) for _ in range(3)]
    assert all(h.can_multi_conn() for h in handles)
    data = random.Random(9).randbytes(1 * MiB)
    handles[0].pwrite(data, 5 * MiB)
    handles[1].flush()
    assert handles[2].pread(len(data), 5 * MiB) == data
    for h in handles:
        h.shutdown()
