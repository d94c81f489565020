"""Hostile and unlucky clients of a pair (issue 9, section 3).

- READs that the `wait` read policy holds count towards what a client that
  reads nothing may cost, by their size, not only by their number.
- A READ of the secondary that was served but not yet received when
  `pair resync` starts must not arrive carrying bytes that were never in the
  image (sendfile queues references to page-cache pages, which the resync
  then overwrites).
- The split point is "a single point between two requests of P" (DESIGN.md
  "Split"): a WRITE still streaming in when the split arrives is either
  wholly in the image or not at all; acknowledged after the split, not at all.
"""
from __future__ import annotations

import os
import time

import pytest

from tests.conftest import memory
from tests.daemon import rawnbd as r
from tests.daemon.rawnbd import RawClient
from tests.pairs.helpers import MiB, log_tail, show, wait_mirrored

nbd = pytest.importorskip("nbd")

SIZE = 16 * MiB


def test_held_reads_nobody_reads_cost_bounded_memory(daemon):
    # Read policy `wait` holds a READ of a pending region until the copy
    # engine has copied it. 64 such READs of 4 MiB are within the in-flight
    # cap, but once copied they are 256 MiB of replies for a client that
    # reads none of them.
    size, length, n = 256 * MiB, 4 * MiB, 64
    data = os.urandom(MiB) * 4
    daemon.create_volume("p", size)
    with RawClient.unix(daemon.nbd_socket).open("p") as p:
        for off in range(0, size, length):
            assert p.write(off, data, cookie=off // length) == 0
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True,
                read_policy="wait", rate=1)
    daemon.call("pair.split", name="s")
    assert show(daemon, "s")["pending"] > 4000
    pid = daemon.proc.pid
    before = memory(pid)
    with RawClient.unix(daemon.nbd_socket, timeout=60).open("s") as s:
        s.send(b"".join(r.request(r.CMD_READ, i * length, length, cookie=i) for i in range(n)))
        time.sleep(3)
        after = memory(pid)
        grew = max(after["VmHWM"] - before["VmHWM"], after["VmRSS"] - before["VmRSS"])
        assert grew < 96 * MiB, (f"{n} held READs of {length // MiB} MiB nobody reads made the "
                                 f"daemon grow by {grew / MiB:.0f} MiB")
        got = set()
        for _ in range(n):
            rep = s.reply(length)
            assert rep.error == 0 and rep.cookie not in got and rep.payload == data, rep.cookie
            got.add(rep.cookie)


def mirrored_pair(daemon, old: bytes) -> None:
    """P holds `old` at its start; pair p -> s, mirrored."""
    daemon.create_volume("p", SIZE)
    with RawClient.unix(daemon.nbd_socket).open("p") as cl:
        assert cl.write(0, old) == 0
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True)
    wait_mirrored(daemon, "s")


def test_queued_read_of_the_secondary_keeps_the_image(daemon):
    old, new = os.urandom(MiB), os.urandom(MiB)
    mirrored_pair(daemon, old)
    daemon.call("pair.split", name="s")
    with RawClient.unix(daemon.nbd_socket).open("p") as p:
        assert p.write(0, new) == 0                 # after the split: not in S
    with RawClient.unix(daemon.nbd_socket).open("s") as s:
        assert s.read(0, 4096) == old[:4096]
        # Served now, received after the resync has rewritten S: the reply
        # was complete when the resync started, and it is the image's bytes.
        s.send_request(r.CMD_READ, 0, MiB, cookie=7)
        time.sleep(0.3)
        daemon.call("pair.resync", name="s")
        wait_mirrored(daemon, "s")
        rep = s.reply(MiB)
        assert (rep.cookie, rep.error) == (7, 0)
        assert rep.payload == old, (
            "a READ of S served before the resync carries bytes that were never in the image"
            + log_tail(daemon))


def test_split_while_a_write_streams_in_does_not_tear_it(daemon):
    old, new = os.urandom(MiB), os.urandom(MiB)
    mirrored_pair(daemon, old)
    with RawClient.unix(daemon.nbd_socket).open("p") as p:
        # The WRITE's header and half its payload, then a pause long enough
        # for the daemon to take in what came.
        p.send(r.request(r.CMD_WRITE, 0, MiB, cookie=5) + new[:MiB // 2])
        time.sleep(0.3)
        daemon.call("pair.split", name="s")
        p.send(new[MiB // 2:])
        rep = p.reply()
        assert (rep.cookie, rep.error) == (5, 0)    # acknowledged after the split
        assert p.read(0, MiB) == new
    with RawClient.unix(daemon.nbd_socket).open("s") as s:
        got = s.read(0, MiB)
    torn = sum(1 for i in range(0, MiB, 4096) if got[i:i + 4096] != old[i:i + 4096])
    assert torn == 0, (f"{torn} of 256 pages of S hold a write acknowledged after the split"
                       f" (pair: {show(daemon, 's')})")
