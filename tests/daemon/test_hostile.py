"""Hostile and unlucky clients (issue 9, section 3): what one client does must
not cost the daemon unbounded memory or event-loop time, nor change what
other clients see.

- A zero-length TRIM is a no-op, not a reason to stop punching holes.
- BLOCK_STATUS with REQ_ONE looks at the first extent only, and without it a
  reply describes a bounded number of extents.
- A client that never reads its replies holds at most about one reply of
  daemon memory, in the transmission phase and in the handshake alike; the
  others keep being served.

Memory is read from /proc/PID/status, CPU time from /proc/PID/stat;
section names refer to proto.md.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import time

import pytest

from tests.conftest import grown, memory, need
from tests.daemon import rawnbd as r
from tests.daemon.rawnbd import RawClient

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
KiB = 1 << 10
# "Command flags"
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
# base:allocation ("Metadata querying")
STATE_HOLE = 1
STATE_ZERO = 2


def connect(d) -> RawClient:
    return RawClient.unix(d.nbd_socket)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


# -- BLOCK_STATUS --------------------------------------------------------------------------

@pytest.fixture
def fragmented(daemon):
    """A 512 MiB volume `frag` with 8192 data extents: 32 KiB of data every
    64 KiB, the rest holes (16384 extents in all)."""
    size, every, length = 512 * MiB, 64 * KiB, 32 * KiB
    daemon.create_volume("frag", size)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("frag"))
    try:
        data = os.urandom(length)
        for off in range(0, size, every):
            h.pwrite(data, off)
        h.flush()
    finally:
        h.shutdown()
    return daemon, size, every, length


def test_req_one_looks_at_the_first_extent_only(fragmented):
    # NBD_CMD_FLAG_REQ_ONE: "the server MUST NOT send metadata on more than
    # one extent in the reply". The answer is the first extent; scanning the
    # rest of the range (16384 extents here) for it blocked the event loop
    # for every such request.
    d, size, every, length = fragmented
    pid = d.proc.pid
    with RawClient.unix(d.nbd_socket, timeout=120).open(
            "frag", structured=True, meta=("base:allocation",)) as cl:
        assert block_status(cl, 0, size, CMD_FLAG_REQ_ONE) == [(length, 0)]
        assert block_status(cl, length, size - length, CMD_FLAG_REQ_ONE) == [
            (every - length, STATE_HOLE | STATE_ZERO)]
        # And a descriptor never exceeds the length asked for.
        assert block_status(cl, 4096, 4096, CMD_FLAG_REQ_ONE) == [(4096, 0)]
        cpu0 = cpu_seconds(pid)
        n = 200
        cl.send(b"".join(r.request(r.CMD_BLOCK_STATUS, 0, size, i, CMD_FLAG_REQ_ONE)
                         for i in range(n)))
        for _ in range(n):
            [chunk] = cl.full_reply()
            assert chunk.type == r.REPLY_TYPE_BLOCK_STATUS and len(chunk.payload) == 12
        used = cpu_seconds(pid) - cpu0
    assert used < 1.0, f"{n} REQ_ONE requests cost the daemon {used:.1f} s of CPU"


def test_qemu_img_map_of_a_fragmented_volume(fragmented):
    # qemu's NBD client asks BLOCK_STATUS with REQ_ONE for the rest of the
    # image, extent after extent: a whole-range scan per request made this
    # quadratic (minutes for 8192 extents, against about a second through
    # nbdkit). The generous limits only catch that; the map must be exact.
    need("qemu-img")
    d, size, every, length = fragmented
    pid = d.proc.pid
    cpu0 = cpu_seconds(pid)
    cp = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", d.uri("frag")],
                        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    used = cpu_seconds(pid) - cpu0
    assert cp.returncode == 0, cp.stderr
    data = [(e["start"], e["length"]) for e in json.loads(cp.stdout) if e["data"]]
    assert data == [(off, length) for off in range(0, size, every)], data[:4]
    assert used < 10, f"qemu-img map cost the daemon {used:.1f} s of CPU"


def test_block_status_reply_describes_a_bounded_number_of_extents(fragmented):
    # "the server MAY return fewer descriptors in the reply than would be
    # required to fully specify the whole range of requested information to
    # the client, if looking up the information would be too
    # resource-intensive for the server, so long as at least one extent is
    # returned." A client follows up at the first offset not covered, as
    # nbdinfo does: its map is still exact.
    need("nbdinfo")
    d, size, every, length = fragmented
    with connect(d).open("frag", structured=True, meta=("base:allocation",)) as cl:
        extents = block_status(cl, 0, size)
        assert 1 <= len(extents) <= 4096, f"one reply described {len(extents)} extents"
        assert sum(n for n, _ in extents) <= size
        hole = (every - length, STATE_HOLE | STATE_ZERO)
        for i, extent in enumerate(extents):
            assert extent == ((length, 0) if i % 2 == 0 else hole), (i, extent)
    cp = subprocess.run(["nbdinfo", "--map", d.uri("frag")], capture_output=True, text=True,
                        timeout=60, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stderr
    rows = [tuple(int(x) for x in line.split()[:3]) for line in cp.stdout.splitlines()]
    assert rows == [(off + part, n, f) for off in range(0, size, every)
                    for part, n, f in ((0, length, 0), (length, every - length, 3))], rows[:4]


# -- replies nobody reads ------------------------------------------------------------------

def test_replies_nobody_reads_cost_about_one_reply(served_big):
    # A client may pipeline as many READs as it likes and read the replies
    # when it wants to. One that does not read them must not make the daemon
    # hold every reply: it stops reading that client's requests while its
    # replies wait (about one reply, here 32 MiB), serves the others, and goes
    # on when the client reads.
    d, pattern = served_big
    pid = d.proc.pid
    n, length = 40, 32 * MiB
    with connect(d).open("big") as hoarder:
        assert hoarder.read(0, 4096) == pattern[:4096]
        before = memory(pid)
        hoarder.send(b"".join(r.request(r.CMD_READ, 0, length, cookie=i) for i in range(n)))
        time.sleep(1.0)
        with connect(d).open("big") as other:
            for i in range(8):
                off = i * MiB
                assert other.read(off, 64 * KiB, cookie=i) == pattern[off:off + 64 * KiB]
        grew = grown(pid, before)
        assert grew < 80 * MiB, (f"{n} unread 32 MiB replies made the daemon grow by "
                                 f"{grew / MiB:.0f} MiB")
        for i in range(n):
            rep = hoarder.reply(length)
            assert (rep.cookie, rep.error) == (i, 0)
            assert rep.payload == pattern, f"reply {i} carries the wrong bytes"
        assert hoarder.read(4096, 4096, cookie=99) == pattern[4096:8192]


@pytest.mark.slow
def test_replies_for_all_clients_are_bounded(make_daemon):
    # Each connection holds about one unread reply; many hoarders together
    # would still hold many. Past --reply-memory in total, the clients that
    # have read nothing for 10 s are dropped, largest first, until the total
    # is under it again; a client that reads is served throughout.
    d = make_daemon(["--reply-memory", "64M"])
    d.create_volume("big", 32 * MiB)
    pattern = os.urandom(MiB) * 32
    with connect(d).open("big") as cl:
        assert cl.write(0, pattern) == 0
    hoarders = [connect(d).open("big") for _ in range(5)]
    try:
        for h in hoarders:
            h.send(b"".join(r.request(r.CMD_READ, 0, 32 * MiB, cookie=i) for i in range(4)))
        with connect(d).open("big") as reader:
            deadline = time.monotonic() + 30
            i = 0
            while d.log().count("replies unread for") < 3 and time.monotonic() < deadline:
                off = (i % 32) * MiB
                assert reader.read(off, 64 * KiB, cookie=i) == pattern[off:off + 64 * KiB]
                i += 1
                time.sleep(0.05)
            dropped = d.log().count("replies unread for")
            assert dropped >= 3, (f"5 clients hold 160 MiB of unread replies, over the 64 MiB "
                                  f"bound for 30 s, and {dropped} were dropped")
            assert reader.read(0, 4096, cookie=10**6) == pattern[:4096]
    finally:
        for h in hoarders:
            h.close()


def test_list_replies_nobody_reads_cost_little(daemon):
    # NBD_OPT_LIST is 16 bytes; with 100 exports its replies are ~5 KB. A
    # client that sends thousands and reads nothing must be stopped like one
    # that does the same with READs, not answered a receive buffer at a time.
    for i in range(100):
        daemon.create_volume(f"volume-{i:03d}-with-a-longer-name", "1M")
    pid = daemon.proc.pid
    option = struct.pack(">QII", r.IHAVEOPT, r.OPT_LIST, 0)
    before = memory(pid)
    clients = [connect(daemon) for _ in range(8)]
    try:
        for cl in clients:
            cl.start()
            cl.send(option * 20000)
        time.sleep(1.0)
        grew = grown(pid, before)
        assert grew < 48 * MiB, (f"8 clients sending LIST without reading made the daemon grow "
                                 f"by {grew / MiB:.0f} MiB")
        # Nothing was lost on the way: the first client's replies are all
        # there, in order, when it reads them.
        cl = clients[0]
        for _ in range(300):
            names = []
            while True:
                rep = cl.option_reply()
                assert rep.option == r.OPT_LIST
                if rep.type == r.REP_ACK:
                    break
                assert rep.type == r.REP_SERVER, rep
                names.append(rep.data[4:].decode())
            assert len(names) == 100 and names[0].startswith("volume-000"), names[:3]
    finally:
        for cl in clients:
            cl.close()
