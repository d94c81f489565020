"""NBD error replies, through libnbd and, where libnbd will not send the
request, through the raw client.

libnbd checks bounds, read-only exports and negotiated features on the
client side; `set_strict_mode(0)` turns that off so the request reaches the
server. nbd.Error carries the errno number in `.errnum` (`.errno` is its
name, e.g. "EINVAL"). The errors expected are those of proto.md "Error
values" and the request types' own sections.
"""
from __future__ import annotations

import errno
import struct

import pytest

nbd = pytest.importorskip("nbd")

from tests.daemon import rawnbd as r  # noqa: E402  (after importorskip)
from tests.daemon.rawnbd import RawClient  # noqa: E402

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture
def served(daemon):
    daemon.create_volume("vol", SIZE)
    daemon.call("volume.create", name="ro", size=SIZE, read_only=True)
    return daemon


def open_handle(d, export: str = "vol", meta: bool = False):
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(d.uri(export))
    h.set_strict_mode(0)        # let the server do the checking
    return h


def fails_with(err: int, fn, *args, **kw) -> None:
    with pytest.raises(nbd.Error) as e:
        fn(*args, **kw)
    assert e.value.errnum == err, f"{e.value} (wanted {errno.errorcode[err]})"


@pytest.fixture
def h(served):
    handle = open_handle(served)
    yield handle
    handle.shutdown()


def still_works(h) -> None:
    h.pwrite(b"\x42" * 4096, 0)
    assert h.pread(4096, 0) == b"\x42" * 4096


# -- out of range -------------------------------------------------------------------------

@pytest.mark.parametrize("offset, count", [(SIZE, 512), (SIZE - 512, 1024), (SIZE * 4, 4096)],
                         ids=["at-end", "straddling", "far"])
def test_read_past_the_end_is_einval(h, offset, count):
    # "Error values": "SHOULD return NBD_EINVAL if it receives a read or trim
    # request including one or more sectors beyond the size of the device."
    fails_with(errno.EINVAL, h.pread, count, offset)
    still_works(h)


@pytest.mark.parametrize("offset, count", [(SIZE, 512), (SIZE - 512, 1024)],
                         ids=["at-end", "straddling"])
def test_trim_past_the_end_is_einval(h, offset, count):
    fails_with(errno.EINVAL, h.trim, count, offset)
    still_works(h)


@pytest.mark.parametrize("offset, count", [(SIZE, 512), (SIZE - 512, 1024)],
                         ids=["at-end", "straddling"])
def test_write_past_the_end_is_enospc_and_writes_nothing(h, offset, count):
    # "Error values": "SHOULD return NBD_ENOSPC if it receives a write request
    # including one or more sectors beyond the size of the device."
    h.pwrite(b"\x11" * 512, SIZE - 512)
    fails_with(errno.ENOSPC, h.pwrite, b"\x99" * count, offset)
    # Rejected as a whole: the part that was in range is untouched.
    assert h.pread(512, SIZE - 512) == b"\x11" * 512
    still_works(h)


def test_write_zeroes_past_the_end_is_enospc(h):
    # NBD_CMD_WRITE_ZEROES: "The server SHOULD return NBD_ENOSPC if it receives
    # a write zeroes request including one or more sectors beyond the size."
    fails_with(errno.ENOSPC, h.zero, 1024, SIZE - 512)
    still_works(h)


def test_cache_past_the_end_is_einval(h):
    fails_with(errno.EINVAL, h.cache, 1024, SIZE - 512)
    still_works(h)


def test_block_status_past_the_end_is_einval(served):
    handle = open_handle(served, meta=True)
    try:
        # NBD_CMD_BLOCK_STATUS: "The server SHOULD return NBD_EINVAL if it
        # receives a NBD_CMD_BLOCK_STATUS request including one or more
        # sectors beyond the size of the device."
        fails_with(errno.EINVAL, handle.block_status, 1024, SIZE - 512, lambda *a: 0)
        seen = []
        handle.block_status(SIZE, 0, lambda ctx, off, ext, err: seen.append((ctx, ext)))
        assert seen and seen[0][0] == "base:allocation"
        still_works(handle)
    finally:
        handle.shutdown()


def test_offsets_near_2_to_the_64_are_einval(served):
    # offset + length wraps around in 64 bits: still out of range, not at 0.
    with RawClient.unix(served.nbd_socket).open("vol") as cl:
        for cmd in (r.CMD_READ, r.CMD_TRIM, r.CMD_CACHE):
            err, _ = cl.call(cmd, 2**64 - 512, 1024, cookie=cmd)
            assert err == r.EINVAL
        err, _ = cl.call(r.CMD_WRITE, 2**64 - 512, 1024, cookie=9, payload=b"\1" * 1024)
        assert err == r.ENOSPC
        assert cl.read(0, 1024) == bytes(1024)


def test_read_larger_than_max_payload_fails(served):
    served.create_volume("big", 40 * MiB)
    with RawClient.unix(served.nbd_socket).open("big") as cl:
        # "Simple replies": "any client request with a length larger than the
        # maximum payload size will fail."
        err, _ = cl.call(r.CMD_READ, 0, 32 * MiB + 512, cookie=1)
        assert err in (r.EINVAL, 75)        # NBD_EOVERFLOW is also allowed
        assert cl.read(0, 512, cookie=2) == bytes(512)


# -- read-only export ------------------------------------------------------------------------

@pytest.fixture
def ro(served):
    handle = open_handle(served, "ro")
    assert handle.is_read_only()
    yield handle
    handle.shutdown()


@pytest.mark.parametrize("op", ["write", "write-fua", "trim", "zero", "zero-no-hole"])
def test_changing_a_read_only_export_is_eperm(ro, op):
    # "Error values": "SHOULD return NBD_EPERM if it receives a write or trim
    # request on a read-only export"; NBD_CMD_WRITE_ZEROES: likewise.
    calls = {
        "write": lambda: ro.pwrite(b"x" * 4096, 0),
        "write-fua": lambda: ro.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA),
        "trim": lambda: ro.trim(4096, 0),
        "zero": lambda: ro.zero(4096, 0),
        "zero-no-hole": lambda: ro.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE),
    }
    fails_with(errno.EPERM, calls[op])
    assert ro.pread(4096, 0) == bytes(4096)
    ro.flush()


# -- block status needs a meta context ------------------------------------------------------

def test_block_status_without_meta_context_is_einval(h):
    # NBD_CMD_BLOCK_STATUS: "A client MUST NOT send NBD_CMD_BLOCK_STATUS unless
    # within the negotiation phase it sent NBD_OPT_SET_META_CONTEXT"; the server
    # answers the violation with an error, not a disconnect.
    assert h.can_meta_context("base:allocation") is False
    fails_with(errno.EINVAL, h.block_status, 4096, 0, lambda *a: 0)
    still_works(h)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_block_status_without_meta_context_is_einval_raw(served, structured):
    with RawClient.unix(served.nbd_socket).open("vol", structured=structured) as cl:
        cl.send_request(r.CMD_BLOCK_STATUS, 0, 4096, cookie=31)
        replies = cl.full_reply()
        assert [x.cookie for x in replies] == [31]
        assert replies[0].error == r.EINVAL
        if structured:
            assert replies[0].type == r.REPLY_TYPE_ERROR
            # Error chunk: 32 bits error, 16 bits message length, message.
            _, msg_len = struct.unpack_from(">IH", replies[0].payload)
            assert len(replies[0].payload) == 6 + msg_len
        assert cl.read(0, 512, cookie=32) == bytes(512)


def test_block_status_for_other_export_context_is_einval(served):
    # Contexts set for one export do not carry over to another ("the final time
    # it was sent, it referred to the same export name").
    with RawClient.unix(served.nbd_socket) as cl:
        cl.start()
        cl.negotiate_structured()
        replies = cl.option(r.OPT_SET_META_CONTEXT, r.meta_data("ro", ("base:allocation",)))
        assert replies[-1].type == r.REP_ACK
        cl.go("vol")
        err, _ = cl.call(r.CMD_BLOCK_STATUS, 0, 4096, cookie=41)
        assert err == r.EINVAL


def test_oversized_write_from_libnbd_is_einval_and_the_connection_lives(h):
    # The reply to a WRITE over the 32 MiB limit comes once its payload has
    # been drained: libnbd, still sending the payload, cannot take it sooner
    # (with an early reply it found "no matching cookie" and gave up).
    fails_with(errno.EINVAL, h.pwrite, b"\x5a" * (32 * 1024 * 1024 + 4096), 0)
    still_works(h)
    # Nothing of the rejected payload landed.
    assert h.pread(4096, 1024 * 1024) == bytes(4096)


# -- large writes, whose payload is written as it arrives ------------------------------

@pytest.mark.parametrize("offset", [SIZE - MiB + 4096, SIZE], ids=["straddling", "at-end"])
def test_large_write_past_the_end_is_enospc_and_writes_nothing(h, offset):
    # A 1 MiB payload is written piece by piece as it arrives: the range check
    # must come before the first piece lands.
    h.pwrite(b"\x11" * MiB, SIZE - MiB)
    fails_with(errno.ENOSPC, h.pwrite, b"\x99" * MiB, offset)
    assert h.pread(MiB, SIZE - MiB) == b"\x11" * MiB
    still_works(h)


def test_large_write_to_a_read_only_export_is_eperm(served):
    h = open_handle(served, "ro")
    try:
        fails_with(errno.EPERM, h.pwrite, b"\x77" * (4 * MiB), 0)
        assert h.pread(4 * MiB, 0) == bytes(4 * MiB)
    finally:
        h.shutdown()


def test_large_write_sent_in_small_pieces_lands_whole(served):
    # The payload of a 2 MiB write trickles in, 1000 bytes at a time, with a
    # read request right behind it: the write lands whole, the stream stays in step.
    payload = bytes(range(256)) * (8 * 1024)
    with RawClient.unix(served.nbd_socket).open("vol") as cl:
        data = r.request(r.CMD_WRITE, 4096, len(payload), 7) + payload + r.request(
            r.CMD_READ, 4096, len(payload), 8)
        for i in range(0, len(data), 1000):
            cl.send(data[i:i + 1000])
        rep = cl.reply()
        assert (rep.cookie, rep.error) == (7, 0)
        rep = cl.reply(len(payload))
        assert rep.cookie == 8 and rep.payload == payload
