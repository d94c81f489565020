"""A split is a point-in-time image of the primary (DESIGN.md "Split").

- Under fio load, the secondary read at once after the split (pending
  regions served by each read policy) and again after the copy drained is
  exactly the primary as it was at the split, although fio keeps writing P.
- `x-splitd:pending` names the regions pair.show counts as pending.
- Writes to the secondary after the split never reach the primary, and a
  partial write to a pending region lands on the split image.
- A consistency group splits all its pairs at one point between two writes.
"""
from __future__ import annotations

import random
import struct
import threading
import time

import pytest

from tests.conftest import need
from tests.pairs.helpers import (
    BackgroundFio,
    MiB,
    first_mismatch,
    image_digests,
    log_tail,
    pending_map,
    pending_regions,
    show,
    wait_drained,
)

nbd = pytest.importorskip("nbd")

POLICIES = ["copy-on-read", "staging", "wait"]
REGION = 64 * 1024
# Slow enough that most regions are still pending at the split.
RATE = 2 * MiB


def connect(uri: str):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def fill(uri: str, size: int, every: int, length: int, seed: int, start: int = 0) -> None:
    """Random data: `length` bytes at start + each multiple of `every` (the
    rest stays a hole)."""
    rng = random.Random(seed)
    h = connect(uri)
    try:
        for off in range(start, size, every):
            h.pwrite(rng.randbytes(length), off)
        h.flush()
    finally:
        h.shutdown()


@pytest.mark.parametrize("policy", POLICIES)
def test_split_under_fio_is_the_image_at_the_split(daemon, tmp_path, policy):
    need("fio", "nbdcopy", "nbdinfo")
    size = 256 * MiB
    daemon.create_volume("p", size)
    fill(daemon.uri("p"), size, every=4 * MiB, length=MiB, seed=1)
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True,
                read_policy=policy, rate=RATE)
    fio = BackgroundFio(daemon.uri("p"), tmp_path).start()
    try:
        time.sleep(2.0)   # fio dirties the primary while the initial copy crawls
        fio.pause()
        at_split = image_digests(daemon.uri("p"), daemon)
        info = daemon.call("pair.split", name="s")
        assert info["state"] == "split", info
        assert info["pending"] > 0, f"nothing pending at the split: {info}"

        # The pending map lies between pair.show before and after it (pending
        # only shrinks while split; the engine keeps copying).
        extents = pending_map(daemon.uri("s"))
        after = show(daemon, "s")
        mapped = pending_regions(extents, REGION, size)
        assert info["pending"] >= mapped >= after["pending"], (info["pending"], mapped, after)

        fio.resume()
        got = image_digests(daemon.uri("s"), daemon)
        assert fio.alive(), f"fio died: {fio.stderr()}"
        mismatch = first_mismatch(at_split, got)
        assert mismatch is None, (f"{policy}: S read right after the split is not P at the "
                                  f"split: {mismatch}; {show(daemon, 's')}{log_tail(daemon)}")
        info = show(daemon, "s")
        assert info["state"] == "split", info
        # fio wrote into pending regions, so copy-on-write happened; the read
        # policy served pending regions too.
        assert info["copy_on_write"] > 0, info
        if policy == "copy-on-read":
            assert info["copy_on_read"] > 0, info
        elif policy == "staging":
            assert info["staged"] > 0, info

        daemon.call("pair.set", name="s", rate=0)
        wait_drained(daemon, "s")
        got = image_digests(daemon.uri("s"), daemon)
        assert fio.alive(), f"fio died: {fio.stderr()}"
        mismatch = first_mismatch(at_split, got)
        assert mismatch is None, (f"{policy}: S after the copy drained is not P at the split: "
                                  f"{mismatch}{log_tail(daemon)}")
        # fio kept writing P: P must have moved on, S must not have followed.
        fio.pause()
        assert first_mismatch(at_split, image_digests(daemon.uri("p"), daemon)) is not None
    finally:
        fio.stop()


def test_pending_map_is_what_pair_show_counts(daemon):
    """Exact: with the engine held back, the flag-1 extents of x-splitd:pending
    add up to pending regions (the short last region counted whole)."""
    need("nbdinfo")
    size = 64 * MiB + 3 * 4096          # the last region is short
    daemon.create_volume("p", size)
    fill(daemon.uri("p"), size, every=REGION, length=4096, seed=2)
    h = connect(daemon.uri("p"))
    h.pwrite(b"\xaa" * 4096, size - 4096)    # data in the short tail region too
    h.shutdown()
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True,
                rate=4 * MiB)
    time.sleep(0.5)
    daemon.call("pair.split", name="s")
    daemon.call("pair.set", name="s", rate=1)   # (almost) no background copy now
    for _ in range(20):
        before = show(daemon, "s")
        extents = pending_map(daemon.uri("s"))
        after = show(daemon, "s")
        if before["pending"] == after["pending"]:
            break
    else:
        pytest.fail(f"pending never held still: {before} {after}")
    assert after["pending"] > 0, after
    nregions = (size + REGION - 1) // REGION
    assert 0 < after["pending"] <= nregions
    assert sum(length for _, length, _ in extents) == size, extents
    for off, length, flags in extents:
        assert flags in (0, 1), extents
        assert off % REGION == 0, extents
        assert (off + length) % REGION == 0 or off + length == size, extents
    assert pending_regions(extents, REGION, size) == after["pending"], (extents, after)
    # The tail region is still pending (the engine copies in order) and is
    # reported up to the end of the export, not past it.
    assert extents[-1][2] == 1 and extents[-1][0] + extents[-1][1] == size, extents

    daemon.call("pair.set", name="s", rate=0)
    wait_drained(daemon, "s")
    assert pending_regions(pending_map(daemon.uri("s")), REGION, size) == 0


def test_secondary_writes_do_not_touch_the_primary(daemon):
    size = 32 * MiB
    daemon.create_volume("p", size)
    fill(daemon.uri("p"), size, every=REGION, length=REGION, seed=3)   # all data
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True,
                rate=2 * MiB)
    time.sleep(0.5)
    daemon.call("pair.split", name="s")
    daemon.call("pair.set", name="s", rate=1)
    p = connect(daemon.uri("p"))
    s = connect(daemon.uri("s"))
    try:
        p_image = bytearray(p.pread(size, 0))
        expected = bytearray(p_image)     # S is P's image: nobody wrote P since
        extents = pending_map(daemon.uri("s"))
        pending = []
        for off, length, flags in extents:
            if flags == 1:
                pending += range(off // REGION, (off + length) // REGION)
        done = [r for r in range(size // REGION) if r not in set(pending)]
        assert len(pending) >= 8 and done, (len(pending), len(done))
        before = show(daemon, "s")

        def s_write(off: int, data: bytes) -> None:
            s.pwrite(data, off)
            expected[off:off + len(data)] = data

        rng = random.Random(4)
        r1, r2, r3, r4, r5 = pending[-1], pending[-2], pending[-3], pending[-5], pending[-7]
        s_write(r1 * REGION + 4096, rng.randbytes(4096))        # inside a pending region
        s_write(r2 * REGION + 512, rng.randbytes(1000))         # unaligned, partial
        s_write(r3 * REGION - 2048, rng.randbytes(4096))        # across a region boundary
        s_write(done[0] * REGION + 8192, rng.randbytes(4096))   # a region already copied
        s.zero(8192, r4 * REGION)                               # write zeroes
        expected[r4 * REGION:r4 * REGION + 8192] = bytes(8192)
        s.trim(REGION, r5 * REGION)                             # trim a whole region
        expected[r5 * REGION:(r5 + 1) * REGION] = bytes(REGION)
        s.flush()

        info = show(daemon, "s")
        assert info["changed_p"] == 0, info
        assert info["changed_s"] >= 6, info
        assert info["pending"] < before["pending"], (before, info)   # filled before writing
        assert p.pread(size, 0) == bytes(p_image), "a write to S changed P"
        got = s.pread(size, 0)
        assert got == bytes(expected), "S is not the split image plus S's writes"

        daemon.call("pair.set", name="s", rate=0)
        wait_drained(daemon, "s")
        assert s.pread(size, 0) == bytes(expected), "after draining, S lost its writes"
        assert p.pread(size, 0) == bytes(p_image), "draining changed P"
    finally:
        s.shutdown()
        p.shutdown()


# -- consistency group -----------------------------------------------------------------

SLOTS = 256


def counter_block(n: int) -> bytes:
    return struct.pack("<Q", n) * 512


class AlternatingWriter(threading.Thread):
    """Writes counter n to slot n % SLOTS of P1, then of P2, then n + 1 ...
    each acknowledged before the next is sent. Any single point between two
    writes therefore leaves P1 at counter m1 and P2 at m2 with m1 - m2 in
    {0, 1}; two different points of a group split show up as anything else."""

    def __init__(self, uris: list[str], slot_bytes: int):
        super().__init__(daemon=True)
        self.handles = [connect(u) for u in uris]
        self.slot_bytes = slot_bytes
        self.issued = 0        # highest counter sent to any primary
        self.acked_both = 0    # highest counter acknowledged by both
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        n = 0
        try:
            while not self.stop_flag.is_set():
                n += 1
                off = (n % SLOTS) * self.slot_bytes
                block = counter_block(n)
                self.issued = n
                for h in self.handles:
                    h.pwrite(block, off)
                self.acked_both = n
        except BaseException as e:  # noqa: BLE001 -- reported by the test
            self.error = e

    def finish(self) -> None:
        self.stop_flag.set()
        self.join(30)
        for h in self.handles:
            h.shutdown()


def slot_counters(uri: str, slot_bytes: int) -> list[int]:
    h = connect(uri)
    try:
        out = []
        for i in range(SLOTS):
            block = h.pread(4096, i * slot_bytes)
            values = set(struct.unpack("<512Q", block))
            assert len(values) == 1, f"slot {i} of {uri} holds a torn block"
            out.append(values.pop())
        return out
    finally:
        h.shutdown()


def check_prefix(name: str, counters: list[int]) -> int:
    """The slots hold exactly the writes 1..m for some m: returns m."""
    m = max(counters)
    for i, v in enumerate(counters):
        # The last write of slot i up to m: the largest n <= m with n % SLOTS == i.
        want = m - ((m - i) % SLOTS)
        want = want if want > 0 else 0
        assert v == want, (f"{name}: slot {i} holds counter {v}, a point-in-time image "
                           f"at counter {m} holds {want}")
    return m


@pytest.mark.parametrize("policy", ["copy-on-read", "staging"])
def test_group_split_is_one_point(daemon, policy):
    size = 64 * MiB
    slot_bytes = size // SLOTS      # one slot per 256 KiB: every slot in its own region
    for p in ("p1", "p2"):
        daemon.create_volume(p, size)
        # Data between the slots, so the initial copy has work to do.
        fill(daemon.uri(p), size, every=slot_bytes, length=REGION, seed=5, start=2 * REGION)
    for p, s in (("p1", "s1"), ("p2", "s2")):
        daemon.call("pair.create", primary=p, secondary=s, create_secondary=True,
                    read_policy=policy, rate=MiB, group="g")
    writer = AlternatingWriter([daemon.uri("p1"), daemon.uri("p2")], slot_bytes)
    writer.start()
    try:
        # Past the first round of slots: each first write to a region waits
        # for its dirty bit to be durable (set before write), later ones do
        # not, so the writer is at full speed when the split comes.
        deadline = time.monotonic() + 60
        while writer.acked_both < 2 * SLOTS and time.monotonic() < deadline:
            assert writer.is_alive(), writer.error
            time.sleep(0.05)
        assert writer.is_alive(), writer.error
        lo = writer.acked_both
        time.sleep(0.01)     # a few more writes: the split lands among them
        reply = daemon.call("group.split", name="g")
        hi = writer.issued
        time.sleep(1.0)      # the writer goes on: copy-on-write into both secondaries
        assert writer.is_alive(), writer.error
    finally:
        writer.finish()
    assert writer.error is None, writer.error
    assert hi > lo + 1, "the writer was not running across the split"
    states = {p["name"]: (p["state"], p["pending"]) for p in reply["pairs"]}
    assert set(states) == {"s1", "s2"}, reply
    assert all(st == "split" and pending > 0 for st, pending in states.values()), states

    m1 = check_prefix("s1", slot_counters(daemon.uri("s1"), slot_bytes))
    m2 = check_prefix("s2", slot_counters(daemon.uri("s2"), slot_bytes))
    assert lo <= m2 <= m1 <= hi, (lo, m1, m2, hi)
    assert m1 - m2 in (0, 1), (f"s1 was split at counter {m1}, s2 at {m2}: two points, "
                               f"not one{log_tail(daemon)}")
    # After the copy drains, still the same images.
    for s in ("s1", "s2"):
        daemon.call("pair.set", name=s, rate=0)
        wait_drained(daemon, s)
    assert check_prefix("s1", slot_counters(daemon.uri("s1"), slot_bytes)) == m1
    assert check_prefix("s2", slot_counters(daemon.uri("s2"), slot_bytes)) == m2
    # The primaries moved on past the split.
    assert max(slot_counters(daemon.uri("p1"), slot_bytes)) > m1
