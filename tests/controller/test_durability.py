"""md's write-intent rules (DESIGN.md "Crash safety"), seen in the files.

In-process, with the durability rounds running on an event loop as in the
daemon: what matters is the order in which things reach the files, so each
test looks at the bitmap and volume files directly, before and after a round.
The power-loss test (tests/powerloss) checks the same rules end to end.
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from controller import durability, states as S

from .env import Env

RS = 64 * 1024
SIZE = 16 * RS


def file_bit(bm, r: int) -> bool:
    return bool(os.pread(bm.fd, 1, r >> 3)[0] & (1 << (r & 7)))


def pread(env, name: str, off: int, n: int) -> bytes:
    return os.pread(env.volumes.get(name).fd, n, off)


@pytest.fixture
def env(tmp_path):
    env = Env(tmp_path / "data")
    env.volumes.create("p", SIZE, RS)
    env.layer("p").write(0, b"a" * SIZE)
    yield env
    env.close()


async def settle(env, fut=None) -> None:
    """Let rounds run until `fut` (a held change) is done."""
    if fut is not None:
        await asyncio.wait_for(fut, 10)
    await asyncio.sleep(0)


async def test_a_write_waits_for_its_dirty_bit(env):
    """Set before write: a P write to a clean region is not issued to P's
    file until the diff bit covering it is durable."""
    pair = env.pairs.create("p", "s", create_secondary=True)
    env.engine.drain(pair)
    env.pairs.durability.round_now(everything=True)
    assert pair.state == S.PAIR and not file_bit(pair.diff, 3)
    env.pairs.start()
    try:
        held = env.layer("p").write(3 * RS, b"b" * 4096)
        assert held is not None, "the write was issued before its bit was durable"
        assert pread(env, "p", 3 * RS, 4096) == b"a" * 4096
        assert file_bit(pair.diff, 3)            # written through, not yet synced
        await settle(env, held)
        assert pread(env, "p", 3 * RS, 4096) == b"b" * 4096
        # The bit is durable now: the next write there is issued at once.
        assert env.layer("p").write(3 * RS + 4096, b"c" * 4096) is None
        assert pread(env, "p", 3 * RS + 4096, 4096) == b"c" * 4096
    finally:
        await env.pairs.stop()


async def test_a_copy_clears_its_bit_only_once_durable(env):
    """Clear after both copies are durable: the engine's copy clears the bit
    in memory; the file keeps it until a round has synced P and S."""
    pair = env.pairs.create("p", "s", create_secondary=True)
    env.pairs.durability.round_now(everything=True)
    env.engine.step(pair, 2 * RS)
    copied = [r for r in range(pair.nregions) if not pair.diff[r]]
    assert copied, "the engine copied nothing"
    for r in copied:
        assert file_bit(pair.diff, r), f"region {r}: cleared in the file before S was synced"
    env.pairs.durability.round_now(everything=True)
    for r in copied:
        assert not file_bit(pair.diff, r), f"region {r}: never cleared in the file"


async def test_copy_on_write_is_durable_before_the_write(env):
    """A P write to a pending region is issued only after that region is in
    S and its pending bit is durably clear."""
    pair = env.pairs.create("p", "s", create_secondary=True, rate=1)
    env.pairs.split(["s"])
    env.pairs.durability.round_now(everything=True)
    assert pair.diff[5] and file_bit(pair.diff, 5)
    env.pairs.start()
    try:
        held = env.layer("p").write(5 * RS, b"z" * 4096)
        assert held is not None
        assert pread(env, "s", 5 * RS, RS) == b"a" * RS     # copied already
        assert pread(env, "p", 5 * RS, 4096) == b"a" * 4096   # but not yet written
        assert file_bit(pair.diff, 5)                          # still pending on disk
        await settle(env, held)
        assert not file_bit(pair.diff, 5)
        assert file_bit(pair.bm["changed_p"], 5)
        assert pread(env, "p", 5 * RS, 4096) == b"z" * 4096
        assert pread(env, "s", 5 * RS, RS) == b"a" * RS
    finally:
        await env.pairs.stop()


async def test_a_large_trim_of_pending_regions_is_copied_by_the_engine(env):
    """Copy-on-write for a change over many pending regions is done by the
    engine in slices, not on the spot (it would block every client)."""
    pair = env.pairs.create("p", "s", create_secondary=True, rate=1)
    env.pairs.split(["s"])
    env.pairs.start()
    try:
        pair.fill_limit = 4
        held = env.layer("p").trim(0, SIZE)
        assert held is not None
        assert pair.diff.count() == 16      # nothing copied on the spot
        await settle(env, held)
        assert pair.diff.count() == 0
        assert pread(env, "s", 0, SIZE) == b"a" * SIZE
        assert pread(env, "p", 0, SIZE) == bytes(SIZE)
    finally:
        await env.pairs.stop()


async def test_a_write_in_pair_state_is_mirrored_to_s_at_once(env):
    """In `pair` a WRITE of P goes to S too, as md mirrors it: S holds it as
    soon as the write is done, and the engine has nothing to copy. Before,
    each write dirtied 8 regions (a bitmap byte) that the engine then copied
    whole: 512 KiB of copying for a 4 KiB write."""
    pair = env.pairs.create("p", "s", create_secondary=True)
    env.engine.drain(pair)
    env.pairs.durability.round_now(everything=True)
    env.pairs.start()
    try:
        copied = pair.copied_regions
        held = env.layer("p").write(3 * RS + 4096, b"m" * 4096)
        if held is not None:
            await settle(env, held)
        assert pread(env, "s", 3 * RS + 4096, 4096) == b"m" * 4096
        assert pair.diff.count() == 0, "regions were left for the engine to copy"
        # Written again: the hot path, no wait.
        assert env.layer("p").write(3 * RS, b"n" * 4096) is None
        assert pread(env, "s", 3 * RS, 4096) == b"n" * 4096
        assert pair.copied_regions == copied
    finally:
        await env.pairs.stop()


async def test_a_mirrored_write_keeps_its_bit_until_both_copies_are_durable(env):
    """Set before write, clear after both copies are durable: the mirrored
    region's bit is in the file before P is written, and leaves it only in a
    round that synced P and S after the write."""
    pair = env.pairs.create("p", "s", create_secondary=True)
    env.engine.drain(pair)
    env.pairs.durability.round_now(everything=True)
    assert not file_bit(pair.diff, 6)
    env.pairs.start()
    try:
        held = env.layer("p").write(6 * RS, b"k" * 4096)
        assert held is not None, "the write was issued before its bit was durable"
        assert file_bit(pair.diff, 6)
        await settle(env, held)
        assert file_bit(pair.diff, 6), "cleared in the file with no sync of P and S since"
        assert 6 in pair.diff.lazy
    finally:
        await env.pairs.stop()           # a clean stop syncs both, then clears
    assert not file_bit(pair.diff, 6)


async def test_a_failed_mirror_write_leaves_the_region_to_the_engine(env, monkeypatch):
    """S's half of a mirrored write fails (S's disk, say): the client's
    write still succeeds on P, and the region is dirty again, so the engine
    copies it (and puts the pair in error if S keeps failing)."""
    pair = env.pairs.create("p", "s", create_secondary=True)
    env.engine.drain(pair)
    env.pairs.durability.round_now(everything=True)
    env.pairs.start()
    try:
        assert await _write(env, 2 * RS, b"w" * 4096) is None
        real = os.pwrite
        s_fd = env.volumes.get("s").fd

        def failing(fd, data, off):
            if fd == s_fd:
                raise OSError(28, "No space left on device")
            return real(fd, data, off)

        monkeypatch.setattr(os, "pwrite", failing)
        await _write(env, 2 * RS, b"x" * 4096)
        monkeypatch.setattr(os, "pwrite", real)
        assert pread(env, "p", 2 * RS, 4096) == b"x" * 4096
        assert pair.diff[2], "S missed the write and nothing says so"
        env.engine.drain(pair)
        assert pread(env, "s", 2 * RS, 4096) == b"x" * 4096
    finally:
        await env.pairs.stop()


async def _write(env, off: int, data: bytes):
    held = env.layer("p").write(off, data)
    if held is not None:
        await settle(env, held)
    return None


def test_lazy_clears_come_by_whole_bytes_and_in_batches(env, monkeypatch):
    """While writes mirror, a region's bit leaves the file only once its
    whole bitmap byte (8 regions, what a write sets in the file) has been
    idle LAZY_DELAY, and clears come in one batch per LAZY_DELAY. Before, a
    region idle for LAZY_DELAY was cleared although its neighbours were
    written, so the next write there waited for a bitmap sync again, and each
    of those rounds also synced P and S for the clears that had come due
    meanwhile: under random writes spread over many regions, every round."""
    delay = 1.0
    monkeypatch.setattr(durability, "LAZY_DELAY", delay)
    env.volumes.create("q", 32 * RS, RS)
    env.layer("q").write(0, b"a" * 32 * RS)
    pair = env.pairs.create("q", "q-s", create_secondary=True)
    env.engine.drain(pair)
    rounds = env.pairs.durability
    rounds.round_now(everything=True)
    assert pair.state == S.PAIR and not any(file_bit(pair.diff, r) for r in range(32))
    q = env.layer("q")
    t0 = time.monotonic()

    def at(t: float) -> None:
        time.sleep(max(0.0, t0 + t - time.monotonic()))

    def hot_round(t: float) -> None:
        at(t)
        assert q.write(16 * RS, b"c" * 4096) is None    # the hot path: no round needed
        rounds.round_now()

    # A round's mark makes the clears made before it due LAZY_DELAY later.
    q.write(16 * RS, b"c" * 4096)          # byte 2 (regions 16-23): kept busy below
    q.write(0, b"a" * 4096)                # byte 0
    at(0.5)
    q.write(8 * RS, b"b" * 4096)           # byte 1
    hot_round(0.8)
    hot_round(1.7)                         # byte 0 due since 1.5: a batch of clears
    assert not file_bit(pair.diff, 0), "byte 0, idle for LAZY_DELAY, was not cleared"
    assert file_bit(pair.diff, 17), "region 17 was cleared while its byte is written"
    assert file_bit(pair.diff, 8)
    hot_round(2.1)                         # byte 1 due since 1.8
    assert file_bit(pair.diff, 8), "a second batch of clears within LAZY_DELAY"
    hot_round(2.9)
    assert not file_bit(pair.diff, 8)
    assert file_bit(pair.diff, 16) and file_bit(pair.diff, 17)
