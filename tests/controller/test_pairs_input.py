"""Bad requests about pairs: each is refused with a message that names the
volume or pair at fault, and leaves nothing behind (no bitmap files, no rows,
no volume, no change to the pairs that exist)."""
from __future__ import annotations

import functools
import os
import sqlite3

import pytest

from controller.errors import SplitdError
from controller.pairs import Refused
from volumes.errors import BadInput, Conflict, NotFound

from .env import Env, FakeConnection

MiB = 1024 * 1024


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path / "data")
    e.volumes.create("p", MiB, 4096)
    e.volumes.create("s", MiB, 4096)
    e.volumes.create("other", MiB, 4096)
    e.volumes.create("big", 2 * MiB, 4096)
    e.layer("p").write(0, b"p" * 8192)
    yield e
    e.close()


def snapshot(env: Env) -> dict:
    """Everything a refused request must leave as it was."""
    files = []
    for root, dirs, names in os.walk(env.data_dir):
        for n in names:
            if n.startswith("splitd.db") or n == "splitd.lock":
                continue
            path = os.path.join(root, n)
            with open(path, "rb") as f:
                files.append((os.path.relpath(path, env.data_dir), f.read()))
        for d in dirs:
            files.append((os.path.relpath(os.path.join(root, d), env.data_dir), None))
    with sqlite3.connect(os.path.join(env.data_dir, "splitd.db")) as db:
        pairs = db.execute("SELECT * FROM pairs ORDER BY secondary").fetchall()
        vols = db.execute("SELECT name, size, region_size, read_only FROM volumes "
                          "ORDER BY name").fetchall()
    memory = {n: (p.state, p.read_policy, p.rate, p.group, p.generation)
              for n, p in env.pairs.pairs.items()}
    return {"files": sorted(files, key=lambda f: f[0]), "pairs": pairs, "volumes": vols,
            "memory": memory, "layers": {n: (len(layer.primary_of), layer.secondary_of is not None)
                                         for n, layer in env.pairs.layers.items()}}


def refused(env: Env, exc: type, fn, *must_name: str, words: tuple[str, ...] = ()) -> str:
    """Run a request that must fail with `exc`; check its message names (in
    quotes) every one of `must_name`, contains `words`, and that nothing
    changed. Returns the message."""
    before = snapshot(env)
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    assert isinstance(e.value, SplitdError), f"not a SplitdError: {e.value!r}"
    for name in must_name:
        assert repr(name) in msg, f"{name!r} not named in: {msg}"
    for word in words:
        assert word in msg, f"{word!r} not in: {msg}"
    assert "\n" not in msg
    assert snapshot(env) == before
    return msg


# -- pair create ------------------------------------------------------------------------

def test_sizes_differ(env):
    msg = refused(env, BadInput, lambda: env.pairs.create("p", "big"), "p", "big")
    assert "1 MiB" in msg and "2 MiB" in msg


def test_volume_with_itself(env):
    refused(env, BadInput, lambda: env.pairs.create("p", "p"), "p")
    refused(env, BadInput, lambda: env.pairs.create("p", "p", create_secondary=True), "p")


def test_secondary_already_a_secondary(env):
    env.pairs.create("p", "s")
    refused(env, Conflict, lambda: env.pairs.create("other", "s"), "s", "p")
    refused(env, Conflict, lambda: env.pairs.create("p", "s"), "s")


def test_secondary_is_primary_of_another_pair(env):
    env.pairs.create("p", "s")
    refused(env, Conflict, lambda: env.pairs.create("other", "p"), "p", "s")


def test_primary_is_a_secondary(env):
    env.pairs.create("p", "s")
    refused(env, Conflict, lambda: env.pairs.create("s", "other"), "s")


def test_secondary_with_open_connections(env):
    conn = FakeConnection()
    env.registry.add(conn, "s", "peer", "unix")
    refused(env, Conflict, lambda: env.pairs.create("p", "s"), "s",
            words=("1 open NBD connection",))
    assert conn.closed is None, "a refused pairing must not close the connection"
    assert env.registry.count("s") == 1


def test_missing_volumes(env):
    refused(env, NotFound, lambda: env.pairs.create("nope", "s"), "nope")
    refused(env, NotFound, lambda: env.pairs.create("p", "nope"), "nope")
    refused(env, NotFound, lambda: env.pairs.create("nope", "s2", create_secondary=True), "nope")
    assert env.volumes.find("s2") is None


def test_create_secondary_that_exists(env):
    refused(env, Conflict, lambda: env.pairs.create("p", "s", create_secondary=True), "s")


def test_read_only_secondary(env):
    env.volumes.create("ro", MiB, 4096, read_only=True)
    refused(env, BadInput, lambda: env.pairs.create("p", "ro"), "ro")


@pytest.mark.parametrize("name", ["../etc", "", "a/b", ".hidden", "x" * 65, None, 3])
def test_invalid_names(env, name):
    refused(env, BadInput, lambda: env.pairs.create("p", name))
    refused(env, BadInput, lambda: env.pairs.create(name, "s"))
    refused(env, BadInput, lambda: env.pairs.create("p", name, create_secondary=True))


def test_invalid_group(env):
    msg = refused(env, BadInput, lambda: env.pairs.create("p", "s", group="../g"), "../g")
    assert "group" in msg


@pytest.mark.parametrize("policy", ["bogus", "", "WAIT", None, 1, ["wait"]])
def test_invalid_read_policy_on_create(env, policy):
    msg = refused(env, BadInput, lambda: env.pairs.create("p", "s", read_policy=policy), "s")
    assert "copy-on-read" in msg and "staging" in msg and "wait" in msg
    refused(env, BadInput,
            lambda: env.pairs.create("p", "new", create_secondary=True, read_policy=policy), "new")
    assert env.volumes.find("new") is None


@pytest.mark.parametrize("rate", [-1, -(1 << 40), "-5", "fast", 1.5, True, None])
def test_invalid_rate_on_create(env, rate):
    refused(env, BadInput, lambda: env.pairs.create("p", "s", rate=rate), "s")
    refused(env, BadInput, lambda: env.pairs.create("p", "new", create_secondary=True, rate=rate),
            "new")
    assert env.volumes.find("new") is None


# -- pair set ----------------------------------------------------------------------------------

def test_set_refusals(env):
    env.pairs.create("p", "s", read_policy="staging", rate=1000)
    refused(env, BadInput, lambda: env.pairs.set("s", read_policy="bogus"), "s", "bogus")
    refused(env, BadInput, lambda: env.pairs.set("s", rate=-1), "s")
    refused(env, BadInput, lambda: env.pairs.set("s", rate="x"), "s")
    refused(env, BadInput, lambda: env.pairs.set("s"), words=("rate",))
    refused(env, NotFound, lambda: env.pairs.set("nope", rate=5), "nope")
    # A bad part refuses the whole request: the good part is not applied either.
    refused(env, BadInput, lambda: env.pairs.set("s", rate=5, read_policy="bogus"), "s")
    pair = env.pairs.get("s")
    assert (pair.rate, pair.read_policy) == (1000, "staging")


def test_set_through_the_admin_api(env):
    env.pairs.create("p", "s")
    call = env.controller.call
    refused(env, BadInput, lambda: call("pair.set", {"name": "s", "rate": -3}), "s")
    refused(env, BadInput, lambda: call("pair.set", {"name": "s", "read_policy": "x"}), "s")
    refused(env, BadInput, lambda: call("pair.set", {"name": "s", "speed": 1}), "speed")
    assert call("pair.set", {"name": "s", "rate": "1M"})["rate"] == MiB


# -- volumes in pairs -----------------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["p", "s"])
def test_delete_volume_in_a_pair(env, victim):
    env.pairs.create("p", "s")
    call = env.controller.call
    msg = refused(env, Conflict, lambda: call("volume.delete", {"name": victim}), victim, "s")
    assert "pair" in msg
    refused(env, Conflict, lambda: call("volume.delete", {"name": victim, "force": True}), victim)
    refused(env, Conflict, lambda: call("volume.resize", {"name": victim, "size": "2M"}), victim)
    # Once the pair is gone the volume can go.
    env.pairs.delete("s")
    assert call("volume.delete", {"name": victim})["deleted"]


def test_admin_api_pair_create_refusals(env):
    call = env.controller.call
    refused(env, BadInput, lambda: call("pair.create", {"primary": "p", "secondary": "big"}),
            "p", "big")
    refused(env, BadInput, lambda: call("pair.create", {"primary": "p", "secondary": "s",
                                                        "create_secondary": "yes"}),
            words=("create_secondary",))
    refused(env, BadInput, lambda: call("pair.create", {"primary": "p"}), words=("secondary",))
    refused(env, BadInput, lambda: call("pair.create", {"primary": "p", "secondary": "s",
                                                        "rate": -1}), "s")


# -- transitions refused -------------------------------------------------------------------------

def test_transition_refusals_name_the_pair(env):
    env.pairs.create("p", "s")
    for action in (env.pairs.resync, env.pairs.restore):
        msg = refused(env, Refused, functools.partial(action, "s"), "s", "copy")
        assert "split" in msg  # what would be allowed
    refused(env, NotFound, lambda: env.pairs.split(["nope"]), "nope")
    refused(env, NotFound, lambda: env.pairs.group_members("nogroup"), "nogroup")


def test_group_split_refused_as_a_whole(env):
    env.volumes.create("p2", MiB, 4096)
    env.pairs.create("p", "s", group="g")
    env.pairs.create("p2", "s2", create_secondary=True, group="g")
    env.pairs.split(["s"])
    members = env.pairs.group_members("g")
    refused(env, Refused, lambda: env.pairs.split(members), "s")
    assert env.pairs.get("s2").state == "copy"


def test_delete_refusals(env):
    env.pairs.create("p", "s")
    env.pairs.split(["s"])
    assert env.pairs.get("s").diff.count() > 0
    refused(env, Refused, lambda: env.pairs.delete("s"), "s")
    env.engine.drain(env.pairs.get("s"))
    env.layer("s").write(0, b"x" * 4096)
    env.pairs.restore("s")
    refused(env, Refused, lambda: env.pairs.delete("s"), "s")
    refused(env, NotFound, lambda: env.pairs.delete("nope"), "nope")


def test_restore_of_a_read_only_primary(env):
    env.volumes.create("rop", MiB, 4096, read_only=True)
    env.pairs.create("rop", "other")
    pair = env.pairs.get("other")
    env.engine.drain(pair)
    env.pairs.split(["other"])
    env.layer("other").write(0, b"x" * 4096)
    refused(env, Refused, lambda: env.pairs.restore("other"), "other", "rop")


def test_second_restore_of_one_primary(env):
    """Two restores into one primary at once would fight; the second waits."""
    env.pairs.create("p", "s")
    env.pairs.create("p", "other")
    for name in ("s", "other"):
        env.engine.drain(env.pairs.get(name))
    env.pairs.split(["s"])
    env.pairs.split(["other"])
    env.layer("s").write(0, b"s" * 4096)
    env.layer("other").write(0, b"o" * 4096)
    env.pairs.restore("s")
    refused(env, Refused, lambda: env.pairs.restore("other"), "other", "p", "s")
    env.engine.drain(env.pairs.get("s"))
    env.pairs.restore("other")   # allowed once the first restore is done


def test_split_of_a_sibling_during_a_restore(env):
    """While P is restored from one pair, P's file is not yet P's image: a
    split of another pair of P would freeze stale bytes."""
    env.pairs.create("p", "s")
    env.pairs.create("p", "other")
    for name in ("s", "other"):
        env.engine.drain(env.pairs.get(name))
    env.pairs.split(["s"])
    env.layer("s").write(0, b"s" * 4096)
    env.pairs.restore("s")
    refused(env, Refused, lambda: env.pairs.split(["other"]), "other", "p", "s")
    env.engine.drain(env.pairs.get("s"))
    env.pairs.split(["other"])
    assert env.layer("other").read(0, 4096) == b"s" * 4096


# -- pairs whose volume is unavailable -------------------------------------------------------------

def make_unavailable(env: Env) -> None:
    """Pair p -> s, then p's file disappears and the daemon restarts."""
    env.pairs.create("p", "s")
    env.engine.drain(env.pairs.get("s"))
    os.unlink(env.volumes.path_of("p"))
    env.crash()
    assert "p" in env.volumes.unavailable
    assert "s" in env.pairs.unavailable and "s" not in env.pairs.pairs


def test_unavailable_pair_is_not_overwritten(env):
    make_unavailable(env)
    bitmaps = sorted(os.listdir(os.path.join(env.pairs.dir, "s")))
    assert bitmaps
    # s still belongs to the (unavailable) pair: pairing it again must be
    # refused, and must not remove that pair's bitmap files.
    refused(env, Conflict, lambda: env.pairs.create("other", "s"), "s")
    assert sorted(os.listdir(os.path.join(env.pairs.dir, "s"))) == bitmaps
    refused(env, Conflict, lambda: env.pairs.create("s", "other"), "s")


def test_volume_of_an_unavailable_pair(env):
    make_unavailable(env)
    call = env.controller.call
    # Refused with a message, not an internal sqlite error.
    refused(env, Conflict, lambda: call("volume.delete", {"name": "s"}), "s")
    assert env.controller.call("status")["unavailable_pairs"]["s"]
    # The pair can be deleted, then the volume.
    assert env.pairs.delete("s")["deleted"]
    assert not os.path.exists(os.path.join(env.pairs.dir, "s"))
    assert call("volume.delete", {"name": "s"})["deleted"]
    assert call("volume.delete", {"name": "p"})["deleted"]
