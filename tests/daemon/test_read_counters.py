"""The daemon's per-connection read counters (`connections`, `splitctl
status --connections`): READ requests and the bytes they asked for, per NBD
connection with its export and peer, on every read path (inline replies,
sendfile, TLS, a read a pair's policy holds), and kept with their final
counts once the connection closes. Real clients: libnbd, nbdcopy, nbdinfo."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from common.names import format_size
from daemon.connections import CLOSED_KEPT
from tests.conftest import need
from tests.daemon.test_tls import pki  # noqa: F401  (the throw-away CA fixture)

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
KiB = 1 << 10


def fill(d, export: str, size: int) -> None:
    """Real data everywhere, so that no client skips a hole."""
    h = nbd.NBD()
    h.connect_uri(d.uri(export))
    try:
        for off in range(0, size, MiB):
            h.pwrite(bytes([off // MiB + 1]) * MiB, off)
        h.flush()
    finally:
        h.shutdown()


def connections(d) -> dict:
    return d.call("connections")


def only_open(d, export: str) -> dict:
    conns = [c for c in connections(d)["connections"] if c["export"] == export]
    assert len(conns) == 1, conns
    return conns[0]


def closed_ids(d) -> set[int]:
    return {c["id"] for c in connections(d)["closed"]}


def newly_closed(d, export: str, before: set[int], count: int = 1) -> list[dict]:
    """The connections to `export` that closed since `before` (ids), once
    `count` of them have: a client's exit can come before the daemon sees
    its connection end."""
    deadline = time.monotonic() + 10
    while True:
        new = [c for c in connections(d)["closed"]
               if c["id"] not in before and c["export"] == export]
        if len(new) >= count or time.monotonic() > deadline:
            assert len(new) >= count, connections(d)
            return new
        time.sleep(0.02)


def test_reads_are_counted_on_the_inline_and_sendfile_paths(make_daemon):
    d = make_daemon()
    d.create_volume("db", "8M")
    fill(d, "db", 8 * MiB)
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(d.uri("db", tcp=True))
    try:
        c = only_open(d, "db")
        assert (c["read_requests"], c["read_bytes"]) == (0, 0)
        assert c["peer"].startswith("127.0.0.1:") and c["listener"] == "tcp" and c["id"] >= 1
        # 1 MiB reads go out with sendfile(2) on plain TCP; 4 KiB ones inline.
        for i in range(3):
            h.pread(MiB, i * MiB)
        h.pread(4 * KiB, 0)
        h.pread(512, 7 * MiB + 512)
        before = closed_ids(d)
        c = only_open(d, "db")
        assert (c["read_requests"], c["read_bytes"]) == (5, 3 * MiB + 4 * KiB + 512)
        # Writes, flushes and block status are not reads.
        h.pwrite(b"w" * 4096, 0)
        h.flush()
        h.block_status(MiB, 0, lambda *a: 0)
        assert only_open(d, "db")["read_bytes"] == 3 * MiB + 4 * KiB + 512
    finally:
        h.shutdown()
    # Closed: the final counts stay, under the same number.
    [closed] = newly_closed(d, "db", before)
    assert (closed["id"], closed["read_requests"], closed["read_bytes"]) == (
        c["id"], 5, 3 * MiB + 4 * KiB + 512)
    assert closed["closed"] >= closed["since"]
    assert not [x for x in connections(d)["connections"] if x["export"] == "db"]


def test_each_connection_counts_its_own(make_daemon):
    d = make_daemon()
    d.create_volume("a", "2M")
    d.create_volume("b", "2M")
    ha, hb = nbd.NBD(), nbd.NBD()
    ha.connect_uri(d.uri("a"))
    hb.connect_uri(d.uri("b", tcp=True))
    try:
        ha.pread(MiB, 0)
        hb.pread(4096, 0)
        hb.pread(4096, 4096)
        by_export = {c["export"]: c for c in connections(d)["connections"]}
        assert (by_export["a"]["read_requests"], by_export["a"]["read_bytes"]) == (1, MiB)
        assert (by_export["b"]["read_requests"], by_export["b"]["read_bytes"]) == (2, 8192)
        assert by_export["a"]["id"] != by_export["b"]["id"]
        # A Unix socket peer is the process (this test's).
        assert by_export["a"]["listener"] == "unix" and "uid" in by_export["a"]["peer"]
        # status lists the same, counters included.
        assert {c["export"]: c["read_bytes"] for c in d.call("status")["connections"]} == {
            "a": MiB, "b": 8192}
    finally:
        ha.shutdown()
        hb.shutdown()


def test_nbdcopy_and_nbdinfo_reads_of_a_known_size(make_daemon):
    need("nbdcopy", "nbdinfo")
    d = make_daemon()
    size = 8 * MiB
    d.create_volume("db", size)
    fill(d, "db", size)
    before = closed_ids(d)
    subprocess.run(["nbdcopy", "--connections=1", "--requests=4", f"--request-size={MiB}",
                    d.uri("db"), "null:"], check=True, timeout=60)
    [c] = newly_closed(d, "db", before)
    assert c["read_bytes"] == size, c
    assert c["read_requests"] == 8, c
    # nbdinfo --content opens the export and reads its start to guess what
    # the data is (as file(1) does); --no-content stays in the handshake
    # (NBD_OPT_INFO) and is no transmission connection at all.
    before = closed_ids(d)
    subprocess.run(["nbdinfo", "--content", d.uri("db", tcp=True)], check=True, timeout=60,
                   capture_output=True)
    [c] = newly_closed(d, "db", before)
    assert c["peer"].startswith("127.0.0.1:")
    assert c["read_requests"] >= 1 and 0 < c["read_bytes"] <= size, c
    # nbdcopy over several connections: each counts its share, the sum is the size.
    # (splitd offers multi-conn: nbdcopy opens one per thread.)
    before = closed_ids(d)
    subprocess.run(["nbdcopy", "--connections=2", "--threads=2", d.uri("db", tcp=True), "null:"],
                   check=True, timeout=60)
    new = newly_closed(d, "db", before, count=2)
    # (It splits the work in large slices: one of them may have read it all.)
    assert len(new) == 2 and sum(x["read_bytes"] for x in new) == size, new


def test_a_tls_connection_and_a_held_read_are_counted(make_daemon, pki):  # noqa: F811
    d = make_daemon(["--tls", "require", *pki["server_args"]])
    d.create_volume("db", "2M")
    fill(d, "db", 2 * MiB)
    d.call("pair.create", primary="db", secondary="snap", create_secondary=True,
           read_policy="wait", rate="64K")
    d.call("pair.split", name="snap")   # most of it still pending: reads are held
    h = nbd.NBD()
    h.set_tls_certificates(str(pki["client"]))
    h.set_tls(nbd.TLS_REQUIRE)
    h.connect_uri(f"nbds://127.0.0.1:{d.tcp_port}/snap")
    try:
        d.call("pair.set", name="snap", rate=0)
        assert h.pread(MiB, MiB) == bytes([2]) * MiB
        c = only_open(d, "snap")
        assert (c["read_requests"], c["read_bytes"]) == (1, MiB)
    finally:
        h.shutdown()


def test_closed_connections_kept_are_bounded(make_daemon):
    d = make_daemon()
    d.create_volume("db", "1M")
    for _ in range(CLOSED_KEPT + 3):
        h = nbd.NBD()
        h.connect_uri(d.uri("db"))
        h.pread(512, 0)
        h.shutdown()
    deadline = time.monotonic() + 10
    while True:
        closed = connections(d)["closed"]
        if closed[-1]["id"] == CLOSED_KEPT + 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(closed) == CLOSED_KEPT
    assert [c["id"] for c in closed] == list(range(4, CLOSED_KEPT + 4))
    assert {c["read_bytes"] for c in closed} == {512}


def test_splitctl_status_connections(make_daemon):
    d = make_daemon()
    d.create_volume("db", "2M")
    h = nbd.NBD()
    h.connect_uri(d.uri("db", tcp=True))
    try:
        h.pread(MiB, 0)
        lines = d.splitctl("status", "--connections").stdout.splitlines()
        assert lines[0].split() == ["ID", "EXPORT", "PEER", "PORT", "FOR", "READS", "BYTES",
                                    "READ"]
        row = lines[1].split()
        assert row[1:4] == ["db", row[2], "tcp"] and row[2].startswith("127.0.0.1:")
        assert row[-4:] == ["1", str(MiB), *format_size(MiB).split()]
        as_json = json.loads(d.splitctl("status", "--connections", "--json").stdout)
        assert [(c["export"], c["read_requests"], c["read_bytes"])
                for c in as_json["connections"]] == [("db", 1, MiB)]
    finally:
        h.shutdown()
    text = d.splitctl("status", "--connections").stdout
    assert "no NBD connections" in text and "closed lately (1, the last one last):" in text
    # Plain status is as it was, counters in its JSON only.
    assert "connections: 0" in d.splitctl("status").stdout
