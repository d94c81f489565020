"""Bugs found by test_model.py (or while writing it), each as a short,
deterministic test."""
from __future__ import annotations

import pytest

from controller import states as S
from controller.pairs import Refused

from .env import Env

RS = 4096
SIZE = 64 * RS


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path / "data")
    e.volumes.create("p", SIZE, RS)
    yield e
    e.close()


def read(env, name):
    return env.volumes.get(name).read(0, SIZE)


def test_delta_after_a_restore_names_the_secondarys_writes(env):
    """The delta kept across a restore was the previous split's: the regions S
    wrote (now P's image) were missing from the next split's delta, so an
    incremental backup would have skipped them."""
    pm = env.pairs
    pair = pm.create("p", "s", create_secondary=True)
    env.engine.drain(pair)
    pm.split(["s"])
    pm.resync("s")
    env.engine.drain(pair)
    pm.split(["s"])
    assert pair.bm["delta"].count() == 0       # nothing changed between the splits
    env.layer("s").write(5 * RS, b"x" * RS)
    pm.restore("s")
    env.engine.drain(pair)
    pm.split(["s"])
    assert read(env, "s")[5 * RS:6 * RS] == b"x" * RS
    assert pair.bm["delta"][5]


def test_drain_goes_on_after_an_empty_restore(env):
    """engine.drain() stopped at the restore -> pair transition when the
    restore set was empty, leaving the pending regions uncopied."""
    env.layer("p").write(0, b"d" * SIZE)
    env.volumes.create("s", SIZE, RS)
    pm = env.pairs
    pair = pm.create("p", "s")
    pm.split(["s"])                      # all 64 regions pending
    pm.restore("s")                      # nothing changed: nothing to restore
    env.engine.drain(pair)
    assert pair.state == S.PAIR
    assert pair.diff.count() == 0
    assert read(env, "s") == read(env, "p")


def test_two_restores_of_one_primary(env):
    """Each restore copy into P is a P write for the other pairs of P; with two
    restores at once each copy triggered the other's: endless recursion."""
    pm = env.pairs
    a = pm.create("p", "a", create_secondary=True)
    b = pm.create("p", "b", create_secondary=True)
    pm.split(["a"])
    pm.split(["b"])
    env.layer("a").write(0, b"a" * SIZE)
    env.layer("b").write(0, b"b" * SIZE)
    pm.restore("a")
    with pytest.raises(Refused) as e:
        pm.restore("b")
    assert "'a'" in str(e.value) and b.state == S.SPLIT
    env.layer("p").write(RS, b"w" * 10)          # recursed before the fix
    env.engine.drain(a)
    image = bytearray(b"a" * SIZE)
    image[RS:RS + 10] = b"w" * 10
    assert read(env, "p") == image
    # b kept its split image (an empty P) through the restore.
    assert env.layer("b").read(0, SIZE) == b"b" * SIZE


def test_split_of_a_sibling_during_a_restore_would_freeze_stale_bytes(env):
    """A pair of P that split while another pair restored P took P's file,
    not P's image, where the restore had not copied yet."""
    pm = env.pairs
    env.layer("p").write(0, b"o" * SIZE)
    a = pm.create("p", "a", create_secondary=True)
    b = pm.create("p", "b", create_secondary=True)
    env.engine.drain(a)
    env.engine.drain(b)
    pm.split(["a"])
    env.layer("a").write(0, b"n" * SIZE)
    pm.restore("a")
    assert env.layer("p").read(0, RS) == b"n" * RS   # P's image is S's now
    with pytest.raises(Refused):
        pm.split(["b"])
    env.engine.drain(a)
    pm.split(["b"])
    assert env.layer("b").read(0, SIZE) == b"n" * SIZE


def test_copy_on_write_failure_suspends_the_pair_not_the_primary(env, monkeypatch):
    """A P write to a pending region first copies it to S; when S cannot take
    it (disk full), the P write failed, and so did every later one there."""
    import errno

    from volumes import copy as copy_mod

    env.layer("p").write(0, b"d" * SIZE)
    pm = env.pairs
    pair = pm.create("p", "s", create_secondary=True)
    pm.split(["s"])
    conn_closed = []

    class Conn:
        read_requests = read_bytes = 0

        def close_now(self, reason):
            conn_closed.append(reason)

    env.registry.add(Conn(), "s", "peer", "unix")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(copy_mod, "_copy_data", full)
    env.layer("p").write(RS, b"new" * 100)       # no exception: P goes on
    monkeypatch.undo()
    assert env.layer("p").read(RS, 300) == b"new" * 100
    assert pair.state == S.ERROR and "copy-on-write" in pair.reason
    assert "No space left" in pair.reason
    assert pm.store.list_pairs()[0].state == S.ERROR
    assert conn_closed, "S's connections are closed when the pair is suspended"
    with pytest.raises(OSError):
        env.layer("s").read(0, 512)
    env.layer("p").write(2 * RS, b"more")         # P keeps working
    pm.resync("s")
    env.engine.drain(pair)
    assert pair.state == S.PAIR
    assert read(env, "s") == read(env, "p")
