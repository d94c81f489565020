"""Hostile and unlucky clients (issue 9, section 3): what one client does must
not cost the daemon unbounded memory or event-loop time, nor change what
other clients see.

- A zero-length TRIM is a no-op, not a reason to stop punching holes.

Section names refer to proto.md.
"""
from __future__ import annotations

import os
import struct

import pytest

from tests.daemon import rawnbd as r
from tests.daemon.rawnbd import RawClient

MiB = 1 << 20
# "Command flags"
CMD_FLAG_FAST_ZERO = 1 << 4
# base:allocation ("Metadata querying")
STATE_HOLE = 1
STATE_ZERO = 2


def connect(d) -> RawClient:
    return RawClient.unix(d.nbd_socket)


def block_status(cl: RawClient, offset: int, length: int, flags: int = 0,
                 cookie: int = 1) -> list[tuple[int, int]]:
    """One BLOCK_STATUS request over a raw connection with one context; the
    (length, flags) descriptors of its single chunk."""
    cl.send_request(r.CMD_BLOCK_STATUS, offset, length, cookie, flags)
    chunks = cl.full_reply()
    assert [c.type for c in chunks] == [r.REPLY_TYPE_BLOCK_STATUS], chunks
    payload = chunks[0].payload
    return [struct.unpack_from(">II", payload, i) for i in range(4, len(payload), 8)]


@pytest.fixture
def served_big(daemon):
    """A 32 MiB volume `big` holding random data; returns (daemon, data)."""
    daemon.create_volume("big", 32 * MiB)
    pattern = os.urandom(MiB) * 32
    with connect(daemon).open("big") as cl:
        assert cl.write(0, pattern) == 0
    return daemon, pattern


# -- TRIM ----------------------------------------------------------------------------------

def test_zero_length_trim_leaves_hole_punching_on(served_big):
    # NBD_CMD_TRIM: "The client SHOULD NOT request a trim length of 0; the
    # behavior of a server on such a request is unspecified although the
    # server SHOULD NOT disconnect." It is a no-op here; fallocate() answers
    # EINVAL to a zero length, which is no sign that punching is unsupported.
    d, pattern = served_big
    with connect(d).open("big", structured=True, meta=("base:allocation",)) as cl:
        for cmd in (r.CMD_TRIM, r.CMD_WRITE_ZEROES):
            assert cl.call(cmd, MiB, 0, cookie=2) == (0, b"")
        assert cl.call(r.CMD_TRIM, MiB, MiB, cookie=3) == (0, b"")
        assert block_status(cl, MiB, MiB, cookie=4) == [(MiB, STATE_HOLE | STATE_ZERO)]
        # FAST_ZERO is answered ENOTSUP only where zeroing would be slow.
        assert cl.call(r.CMD_WRITE_ZEROES, 4 * MiB, MiB, cookie=5,
                       flags=CMD_FLAG_FAST_ZERO) == (0, b"")
        assert block_status(cl, 4 * MiB, MiB, cookie=6) == [(MiB, STATE_HOLE | STATE_ZERO)]
        assert cl.read(MiB - 4096, MiB + 8192) == (
            pattern[MiB - 4096:MiB] + bytes(MiB) + pattern[2 * MiB:2 * MiB + 4096])
