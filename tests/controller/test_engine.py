"""The copy engine: resuming after a restart, the background task, rates."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from controller import durability, states as S

from .env import Env

RS = 64 * 1024


def make(env: Env, size: int, name: str = "p") -> bytes:
    env.volumes.create(name, size, RS)
    data = random.Random(size).randbytes(size)
    env.layer(name).write(0, data)
    return data


def read(env, name):
    vol = env.volumes.get(name)
    return vol.read(0, vol.size)


# -- restart mid-copy, by stepping ----------------------------------------------------------

@pytest.mark.parametrize("phase", [S.COPY, S.SPLIT, S.RESYNC, S.RESTORE])
def test_restart_resumes_where_the_copy_stopped(tmp_path, phase):
    size = 64 * RS
    env = Env(tmp_path / "data")
    try:
        make(env, size)
        pm = env.pairs
        pair = pm.create("p", "s", create_secondary=True)
        if phase != S.COPY:
            if phase == S.SPLIT:
                pm.split(["s"])                          # all 64 regions pending
            else:
                env.engine.drain(pair)
                pm.split(["s"])
                side = "s" if phase == S.RESTORE else "p"
                env.layer(side).write(0, b"w" * size)    # every region changed
                (pm.resync if phase == S.RESYNC else pm.restore)("s")
        image = read(env, "s" if phase == S.RESTORE else "p")
        total = pair.work_bitmap().count()
        assert total == 64
        assert pair.describe()["remaining"] == 64
        while pair.work_bitmap().count() > total // 2:
            env.engine.step(pair, 3 * RS)
        remaining = pair.work_bitmap().count()
        assert total // 2 - 3 <= remaining <= total // 2
        # A copy is durable only once a durability round has synced both
        # volumes and then the cleared bits: a crash before one copies again.
        env.crash()
        pair = env.pairs.get("s")
        assert pair.state == phase
        assert pair.work_bitmap().count() == total
        while pair.work_bitmap().count() > remaining:
            env.engine.step(pair, 3 * RS)
        remaining = pair.work_bitmap().count()
        pm = env.pairs
        pm.durability.round_now(everything=True)
        env.crash()
        pair = env.pairs.get("s")
        assert pair.state == phase
        # It resumes: what was durably copied stays copied.
        assert pair.work_bitmap().count() == remaining
        info = pair.describe()
        assert info["remaining"] == remaining and info["progress"]["total"] == remaining
        steps = 0
        while pair.state == phase and pair.work_bitmap().count():
            env.engine.step(pair, RS)
            steps += 1
        assert steps == remaining          # one region a step: nothing copied twice
        env.engine.drain(pair)
        if phase == S.SPLIT:
            assert read(env, "s") == image
        else:
            assert pair.state == S.PAIR
            assert read(env, "s") == read(env, "p") == image
    finally:
        env.close()


# -- the background task -----------------------------------------------------------------------

async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def file_count(bm) -> int:
    """Bits set in the bitmap's file (the in-memory ones plus lazy clears)."""
    return int.from_bytes(bm.file_bits(), "little").bit_count()


async def test_rate_limited_copy_resumes_after_kill(tmp_path, monkeypatch):
    size = 64 * RS                      # 4 MiB at 1 MiB/s: about 4 s
    rate = 1024 * 1024
    # Copied regions keep their bit in the file for this long while mirroring.
    monkeypatch.setattr(durability, "LAZY_DELAY", 0.2)
    env = Env(tmp_path / "data")
    try:
        make(env, size)
        env.pairs.start()
        start = time.monotonic()
        pair = env.pairs.create("p", "s", create_secondary=True, rate=rate)
        await until(lambda: pair.diff.count() <= 56)
        elapsed = time.monotonic() - start
        remaining = pair.diff.count()
        # The rate holds: no more than rate x time, plus one burst (0.2 s) and
        # the region under way.
        assert (64 - remaining) * RS <= rate * (elapsed + 0.2) + RS
        assert remaining > 0 and pair.state == S.COPY
        # The clears reach the file once both copies are durable, lazily.
        await until(lambda: file_count(pair.diff) <= 56)
        in_file = file_count(pair.diff)
        engine = env.engine
        env.crash()                     # no clean stop: the engine is just gone
        engine.stopping = True
        engine.kick()
        pair = env.pairs.get("s")
        assert pair.state == S.COPY and pair.rate == rate
        # Resumes, not from zero: from what the file said at the kill.
        assert pair.diff.count() <= in_file <= 56
        env.pairs.set("s", rate=0)
        env.pairs.start()
        await until(lambda: pair.state == S.PAIR)
        assert read(env, "s") == read(env, "p")
        await env.pairs.stop()
    finally:
        env.close()


@pytest.mark.parametrize("case", ["empty-primary", "unchanged-resync", "unchanged-restore"])
async def test_nothing_to_copy_still_ends(tmp_path, case):
    """A copy, resync or restore with nothing to copy must still reach `pair`
    (the background task never stepped a pair whose bitmap was empty)."""
    env = Env(tmp_path / "data")
    try:
        env.volumes.create("p", 16 * RS, RS)
        env.pairs.start()
        pair = env.pairs.create("p", "s", create_secondary=True)
        assert pair.diff.count() == 0
        await until(lambda: pair.state == S.PAIR)
        if case != "empty-primary":
            env.pairs.split(["s"])
            (env.pairs.resync if case == "unchanged-resync" else env.pairs.restore)("s")
            await until(lambda: pair.state == S.PAIR)
        await env.pairs.stop()
    finally:
        env.close()


async def test_waiting_reads_go_first_even_when_rate_limited(tmp_path):
    size = 64 * RS
    env = Env(tmp_path / "data")
    try:
        image = make(env, size)
        env.volumes.create("s", size, RS)
        env.pairs.start()
        # s existed: all 64 regions to copy, at one region a second.
        pair = env.pairs.create("p", "s", read_policy="wait", rate=RS)
        env.pairs.split(["s"])
        assert pair.diff.count() >= 60
        start = time.monotonic()
        for off in (60 * RS + 5, 3 * RS, 33 * RS - 1):
            got = env.layer("s").read(off, 1000)
            assert type(got) is not bytes        # held until copied
            assert await asyncio.wait_for(got, 10) == image[off:off + 1000]
        # In order at the rate, region 60 alone would take a minute.
        assert time.monotonic() - start < 10
        await env.pairs.stop()
    finally:
        env.close()


async def test_global_rate_caps_all_pairs(tmp_path):
    size = 32 * RS
    env = Env(tmp_path / "data", global_rate=1024 * 1024)
    try:
        make(env, size)
        env.volumes.create("p2", size, RS)
        env.layer("p2").write(0, b"2" * size)
        env.pairs.start()
        start = time.monotonic()
        a = env.pairs.create("p", "a", create_secondary=True)
        b = env.pairs.create("p2", "b", create_secondary=True)
        await until(lambda: a.state == b.state == S.PAIR, timeout=30)
        # 4 MiB at 1 MiB/s for both pairs together: tokens start empty, so at
        # about 4 s, less the overshoot of the last slices (unlimited: milliseconds).
        assert time.monotonic() - start >= 3.0
        assert read(env, "a") == read(env, "p") and read(env, "b") == read(env, "p2")
        await env.pairs.stop()
    finally:
        env.close()
