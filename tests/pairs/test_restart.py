"""A clean stop (SIGTERM) and a start in the middle of a pair's work
(DESIGN.md "Crash safety": "the restart resumes copies where they stopped").

- Initial copy, resync and restore: what is left to copy after the restart is
  what was left before it (not every region again), the rate limit is kept,
  the copy goes on, and the pair ends as a mirror with S == P.
- A split pair keeps its pending regions across the restart (same count,
  same map), and S is still the image at the split, before and after the
  rest is copied.
"""
from __future__ import annotations

import hashlib
import random
import time

import pytest

from tests.conftest import need
from tests.pairs.helpers import (
    MiB,
    first_mismatch,
    image_digests,
    log_tail,
    pending_map,
    show,
    wait_drained,
    wait_mirrored,
    wait_until,
)

nbd = pytest.importorskip("nbd")

SIZE = 64 * MiB
REGION = 64 * 1024
NREGIONS = SIZE // REGION
RATE = 2 * MiB                      # 32 regions/s: ~30 s for all of them
# Regions the engine may copy between the last pair.show and the stop, or
# between the start and the first pair.show.
SLACK = 30


def connect(uri: str):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def digests(image: bytes) -> list[bytes]:
    return [hashlib.sha256(image[off:off + MiB]).digest() for off in range(0, len(image), MiB)]


def read_all(uri: str) -> bytes:
    h = connect(uri)
    try:
        return b"".join(h.pread(4 * MiB, off) for off in range(0, SIZE, 4 * MiB))
    finally:
        h.shutdown()


def fill_primary(daemon, seed: int) -> bytes:
    """P full of random data (every region allocated); returns it."""
    rng = random.Random(seed)
    image = rng.randbytes(SIZE)
    h = connect(daemon.uri("p"))
    try:
        for off in range(0, SIZE, 4 * MiB):
            h.pwrite(image[off:off + 4 * MiB], off)
        h.flush()
    finally:
        h.shutdown()
    return image


def one_block_per_region(uri: str, seed: int, image: bytearray | None = None) -> None:
    """Write 4 KiB of new data into every region (and into `image`)."""
    rng = random.Random(seed)
    h = connect(uri)
    try:
        for r in range(NREGIONS):
            off = r * REGION + rng.randrange(REGION // 4096) * 4096
            data = rng.randbytes(4096)
            h.pwrite(data, off)
            if image is not None:
                image[off:off + 4096] = data
        h.flush()
    finally:
        h.shutdown()


def restart(daemon) -> None:
    rc = daemon.stop()
    assert rc == 0, f"splitd exited {rc} on SIGTERM{log_tail(daemon)}"
    daemon.start()


@pytest.mark.parametrize("phase", ["copy", "resync", "restore"])
def test_copy_resumes_where_it_stopped(daemon, phase):
    need("nbdcopy")
    daemon.create_volume("p", SIZE)
    p_image = fill_primary(daemon, seed=1)
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True, rate=RATE)
    expected_p = p_image
    if phase != "copy":
        time.sleep(0.3)
        daemon.call("pair.split", name="s")
        if phase == "resync":
            # P changes in every region: all of them are copied again.
            one_block_per_region(daemon.uri("p"), seed=2)
            daemon.call("pair.resync", name="s")
        else:
            # S changes in every region: all of them are copied back to P.
            s_image = bytearray(p_image)
            one_block_per_region(daemon.uri("s"), seed=3, image=s_image)
            expected_p = bytes(s_image)
            daemon.call("pair.restore", name="s")
    start = show(daemon, "s")
    assert start["state"] == phase, start
    assert start["remaining"] > NREGIONS - SLACK, start
    wait_until(daemon, "s", "some progress",
               lambda i: i["remaining"] <= start["remaining"] - 2 * SLACK, timeout=30)
    before = show(daemon, "s")
    restart(daemon)
    after = show(daemon, "s")
    assert after["state"] == phase, (before, after)
    assert after["rate"] == RATE, after
    assert before["remaining"] - SLACK <= after["remaining"] <= before["remaining"], (
        f"{phase}: {before['remaining']} regions left before the restart, "
        f"{after['remaining']} after (started with {start['remaining']})")
    # The copy goes on after the restart, at the pair's rate.
    wait_until(daemon, "s", "progress after the restart",
               lambda i: i["remaining"] < after["remaining"], timeout=10)

    daemon.call("pair.set", name="s", rate=0)
    wait_mirrored(daemon, "s")
    p_now = image_digests(daemon.uri("p"), daemon)
    if phase == "restore":
        assert first_mismatch(digests(expected_p), p_now) is None, "restore did not finish"
    elif phase == "copy":
        assert first_mismatch(digests(expected_p), p_now) is None, "P changed"
    daemon.call("pair.split", name="s")
    mismatch = first_mismatch(p_now, image_digests(daemon.uri("s"), daemon))
    assert mismatch is None, f"{phase}: S != P after the restart and drain: {mismatch}"


def test_split_keeps_pending_regions_across_restart(daemon):
    need("nbdcopy", "nbdinfo")
    daemon.create_volume("p", SIZE)
    fill_primary(daemon, seed=4)
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True,
                read_policy="staging", rate=RATE)
    time.sleep(0.5)
    at_split = bytearray(read_all(daemon.uri("p")))   # nobody writes P meanwhile
    info = daemon.call("pair.split", name="s")
    assert info["pending"] > NREGIONS // 2, info

    # After the split: P writes (copy-on-write), S writes (changed_s), and a
    # few S reads through the read policy.
    expected = at_split
    rng = random.Random(5)
    p = connect(daemon.uri("p"))
    s = connect(daemon.uri("s"))
    try:
        for _ in range(50):
            p.pwrite(rng.randbytes(4096), rng.randrange(SIZE // 4096) * 4096)
        for _ in range(50):
            off = rng.randrange(SIZE // 4096) * 4096
            data = rng.randbytes(4096)
            s.pwrite(data, off)
            expected[off:off + 4096] = data
        for _ in range(20):
            off = rng.randrange(SIZE // 4096) * 4096
            assert s.pread(8192, off) == bytes(expected[off:off + 8192])
        p.flush()
        s.flush()
    finally:
        p.shutdown()
        s.shutdown()
    expected = bytes(expected)

    # Hold the engine back (1 byte/s: at most one more region, paid for in
    # advance), so pending is the same on both sides of the restart.
    daemon.call("pair.set", name="s", rate=1)
    time.sleep(1.2)
    before = show(daemon, "s")
    map_before = pending_map(daemon.uri("s"))
    restart(daemon)
    after = show(daemon, "s")
    map_after = pending_map(daemon.uri("s"))
    assert after["state"] == "split", after
    assert after["rate"] == 1 and after["read_policy"] == "staging", after
    assert after["pending"] > 0, after
    assert before["pending"] - 1 <= after["pending"] <= before["pending"], (before, after)
    for key in ("changed_p", "changed_s", "delta"):
        assert after[key] == before[key], (key, before, after)
    if after["pending"] == before["pending"]:
        assert map_after == map_before, "the pending regions changed across the restart"

    mismatch = first_mismatch(digests(expected), image_digests(daemon.uri("s"), daemon))
    assert mismatch is None, f"S after the restart is not the split image: {mismatch}"
    daemon.call("pair.set", name="s", rate=0)
    wait_drained(daemon, "s", timeout=15)    # 64 MiB unthrottled: well under a second
    mismatch = first_mismatch(digests(expected), image_digests(daemon.uri("s"), daemon))
    assert mismatch is None, f"S after the restart and drain is not the split image: {mismatch}"


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_bitmap_at_start_is_error_not_silently_wrong(daemon, damage):
    """DESIGN.md "Crash safety": never silently wrong. The pending bitmap of a
    split pair is gone or cut short while the daemon is down: the pair must
    come back in `error` with a reason (a full resync then repairs it), not
    split with regions silently taken as copied."""
    daemon.create_volume("p", SIZE)
    p_image = fill_primary(daemon, seed=6)
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True, rate=RATE)
    time.sleep(0.3)
    info = daemon.call("pair.split", name="s")
    assert info["pending"] > NREGIONS // 2, info
    daemon.stop()
    folder = daemon.data_dir / "pairs" / "s"
    diff_files = sorted(folder.glob("diff.*.bm"))
    assert len(diff_files) == 1, list(folder.iterdir())
    if damage == "missing":
        diff_files[0].unlink()
    else:
        with open(diff_files[0], "r+b") as f:
            f.truncate(16)      # the first 128 regions survive, the rest are cut off
    daemon.start()
    after = show(daemon, "s")
    if after["state"] == "split":
        # Only acceptable if S really is the split image.
        got = image_digests(daemon.uri("s"), daemon)
        mismatch = first_mismatch(digests(p_image), got)
        assert mismatch is None, (f"{damage} pending bitmap: the pair came back split with "
                                  f"{after['pending']} pending (was {info['pending']}) and S "
                                  f"is not the split image: {mismatch}")
    else:
        assert after["state"] == "error" and after["reason"], after
    daemon.call("pair.resync", name="s")
    daemon.call("pair.set", name="s", rate=0)
    wait_mirrored(daemon, "s")
    daemon.call("pair.split", name="s")
    assert first_mismatch(digests(p_image), image_digests(daemon.uri("s"), daemon)) is None
