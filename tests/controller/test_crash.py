"""kill -9 in-process: stop in the middle of anything, reopen the data
directory with new managers, and check that every pair is in a state whose
guarantees hold (or in error with the reason), and that going on from there
gives the guaranteed images. (test_model.py crashes between any two steps of
random sequences; these are the windows inside single operations.)"""
from __future__ import annotations

import os
import random

import pytest

from controller import pair as pair_mod, states as S

from .env import Env

SIZE = 512 * 1024
RS = 16 * 1024
NREG = SIZE // RS


class Killed(BaseException):
    """The process died here (BaseException: no `except Exception` runs)."""


def kill(*args, **kwargs):
    raise Killed


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path / "data")
    e.volumes.create("p", SIZE, RS)
    rng = random.Random(7)
    e.layer("p").write(0, rng.randbytes(SIZE // 2))
    e.layer("p").write(SIZE - 40000, rng.randbytes(40000))
    yield e
    e.close()


def read(env, name):
    return env.volumes.get(name).read(0, SIZE)


def split_with_writes(env, name="s"):
    """Pair p -> s mirrored, split, then writes on both sides. Returns
    (P's image at the split, S's image now)."""
    pair = env.pairs.create("p", name, create_secondary=True)
    env.engine.drain(pair)
    env.pairs.split([name])
    at_split = read(env, "p")
    env.layer("p").write(3 * RS + 100, b"P" * (2 * RS))
    env.layer(name).write(10 * RS - 7, b"S" * 3000)
    image = bytearray(at_split)
    image[10 * RS - 7:10 * RS - 7 + 3000] = b"S" * 3000
    return at_split, bytes(image)


def folder_generations(env, name="s") -> set[int]:
    return {int(f.split(".")[1]) for f in os.listdir(os.path.join(env.pairs.dir, name))
            if f.endswith(".bm")}


@pytest.mark.parametrize("action", ["resync", "restore"])
def test_crash_before_the_new_generation_is_committed(env, monkeypatch, action):
    _, s_image = split_with_writes(env)
    generation = env.pairs.get("s").generation
    # Killed after the new bitmap files are written, before the row names them
    # (and so before any clean-up of them).
    monkeypatch.setattr(env.pairs.store, "update_pairs", kill)
    monkeypatch.setattr(env.pairs.files, "remove_generation", lambda *a: None)
    with pytest.raises(Killed):
        getattr(env.pairs, action)("s")
    assert folder_generations(env) == {generation, generation + 1}
    env.crash()
    pair = env.pairs.get("s")
    assert (pair.state, pair.generation) == (S.SPLIT, generation)
    assert folder_generations(env) == {generation}
    assert env.layer("s").read(0, SIZE) == s_image
    # And the action can be done again.
    getattr(env.pairs, action)("s")
    env.engine.drain(pair)
    assert pair.state == S.PAIR
    assert read(env, "s") == read(env, "p")
    if action == "restore":
        assert read(env, "p") == s_image


@pytest.mark.parametrize("action", ["resync", "restore"])
def test_crash_after_the_commit(env, monkeypatch, action):
    _, s_image = split_with_writes(env)
    generation = env.pairs.get("s").generation
    monkeypatch.setattr(env.pairs.files, "remove_generation", kill)
    with pytest.raises(Killed):
        getattr(env.pairs, action)("s")
    env.crash()
    pair = env.pairs.get("s")
    assert pair.state == {"resync": S.RESYNC, "restore": S.RESTORE}[action]
    assert pair.generation == generation + 1
    assert folder_generations(env) == {generation + 1}
    if action == "restore":
        assert env.layer("p").read(0, SIZE) == s_image   # served from S where not restored
    env.engine.drain(pair)
    assert pair.state == S.PAIR
    assert read(env, "s") == read(env, "p")
    if action == "restore":
        assert read(env, "p") == s_image


def test_crash_while_creating(env, monkeypatch):
    monkeypatch.setattr(env.pairs.store, "add_pair", kill)
    monkeypatch.setattr("shutil.rmtree", lambda *a, **k: None)
    monkeypatch.setattr(env.volumes, "delete", lambda *a: None)
    with pytest.raises(Killed):
        env.pairs.create("p", "s", create_secondary=True)
    monkeypatch.undo()
    env.crash()
    assert env.pairs.pairs == {} and env.pairs.unavailable == {}
    # The volume was made; pairing with it works and copies everything.
    pair = env.pairs.create("p", "s")
    assert pair.diff.count() == NREG
    env.engine.drain(pair)
    assert read(env, "s") == read(env, "p")


@pytest.mark.parametrize("state", [S.COPY, S.SPLIT, S.RESTORE])
def test_crash_in_the_middle_of_a_region_copy(env, monkeypatch, state):
    """The engine copies half a run of regions, then dies: their bits are
    still set, so the copy is done again after the restart."""
    if state == S.COPY:
        pair = env.pairs.create("p", "s", create_secondary=True)
        want_s = read(env, "p")
    elif state == S.SPLIT:
        # Split before anything is copied: every allocated region pending.
        pair = env.pairs.create("p", "s", create_secondary=True)
        env.pairs.split(["s"])
        s_image = read(env, "p")
        env.layer("p").write(SIZE - RS, b"after the split")
    else:
        at_split, s_image = split_with_writes(env)
        want_s = at_split
        if state == S.RESTORE:
            env.layer("s").write(0, b"R" * SIZE)     # changed_s: every region
            s_image = b"R" * SIZE
            env.pairs.restore("s")
            want_s = s_image
        pair = env.pairs.get("s")
    work = pair.work_bitmap()
    before = work.count()
    assert before

    real = pair_mod.copy_range

    def half_then_die(src, dst, offset, length, *args):
        real(src, dst, offset, length // 2, *args)
        raise Killed

    monkeypatch.setattr(pair_mod, "copy_range", half_then_die)
    with pytest.raises(Killed):
        env.engine.step(pair, SIZE)
    monkeypatch.undo()
    env.crash()
    pair = env.pairs.get("s")
    assert pair.state == state
    assert pair.work_bitmap().count() == before
    env.engine.drain(pair)
    if state == S.SPLIT:
        assert read(env, "s") == s_image
    else:
        assert pair.state == S.PAIR
        assert read(env, "s") == read(env, "p") == want_s


def test_crash_drops_staged_buffers_not_pending_bits(env):
    # s existed: every region is to copy; split before any is.
    env.volumes.create("s", SIZE, RS)
    pair = env.pairs.create("p", "s", read_policy="staging")
    env.pairs.split(["s"])
    at_split = read(env, "p")
    assert pair.diff.count() == NREG
    assert env.layer("s").read(RS + 5, 3 * RS) == at_split[RS + 5:4 * RS + 5]
    assert pair.staged
    env.crash()
    pair = env.pairs.get("s")
    assert pair.read_policy == "staging" and not pair.staged
    assert pair.diff.count() == NREG      # staged regions were never written to S
    env.layer("p").write(0, b"x" * SIZE)  # copy-on-write of every pending region
    assert env.layer("s").read(0, SIZE) == at_split
    env.engine.drain(pair)
    assert read(env, "s") == at_split


@pytest.mark.parametrize("kind", ["diff", "restore"])
@pytest.mark.parametrize("damage", ["missing", "short"])
def test_damaged_bitmap_goes_to_error(env, damage, kind):
    split_with_writes(env)
    pair = env.pairs.get("s")
    env.pairs.resync("s")   # something to copy
    path = env.pairs.files.path("s", kind, pair.generation)
    env.crash()     # SQLite keeps one fd of a closed connection around for reuse
    if damage == "missing":
        os.unlink(path)
    else:
        os.truncate(path, 1)
    fds = len(os.listdir("/proc/self/fd"))
    env.crash()
    assert len(os.listdir("/proc/self/fd")) == fds, "fds left open by the failed load"
    pair = env.pairs.get("s")
    # Never silently wrong: error, with the reason.
    assert pair.state == S.ERROR
    assert "unreadable" in pair.reason and str(pair.generation - 1) in pair.reason
    assert env.pairs.store.list_pairs()[0].state == S.ERROR
    with pytest.raises(OSError):
        env.layer("s").read(0, 512)
    env.layer("p").write(0, b"still writable")
    # Only a full resync leaves error, and it copies everything.
    env.pairs.resync("s")
    assert pair.diff.count() == NREG
    env.engine.drain(pair)
    assert pair.state == S.PAIR and pair.reason == ""
    assert read(env, "s") == read(env, "p")


def test_crash_during_a_restore_with_a_sibling(env):
    """P restored from s while s2 (split earlier) must keep its image."""
    _, s_image = split_with_writes(env)
    s2 = env.pairs.create("p", "s2", create_secondary=True)
    env.engine.drain(s2)
    env.pairs.split(["s2"])
    s2_image = read(env, "p")
    env.layer("s").write(0, b"Z" * SIZE)
    s_image = b"Z" * SIZE
    env.pairs.restore("s")
    pair = env.pairs.get("s")
    for _ in range(5):
        env.engine.step(pair, RS)
    env.crash()
    pair, s2 = env.pairs.get("s"), env.pairs.get("s2")
    assert (pair.state, s2.state) == (S.RESTORE, S.SPLIT)
    assert env.layer("s2").read(0, SIZE) == s2_image
    assert env.layer("p").read(0, 7 * RS) == s_image[:7 * RS]
    env.engine.drain(pair)
    env.engine.drain(s2)
    assert read(env, "p") == s_image == read(env, "s")
    assert read(env, "s2") == s2_image
    # s2 saw the restore as P writes: its resync brings P's image over.
    assert s2.bm["changed_p"].count() == NREG
    env.pairs.resync("s2")
    env.engine.drain(s2)
    assert read(env, "s2") == s_image
