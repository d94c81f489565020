"""The transition table, walked: every state x action, in the table itself
and through a PairManager with a real pair in each state."""
from __future__ import annotations

import os

import pytest

from controller import states as S
from controller.pairs import Refused

from .env import Env

USER_ACTIONS = ("split", "resync", "restore")


def allowed_from(state: str) -> list[str]:
    return sorted(a for a in USER_ACTIONS if state in S.TRANSITIONS[a])


@pytest.mark.parametrize("state", S.STATES)
@pytest.mark.parametrize("action", sorted(S.TRANSITIONS))
def test_table_walk(state, action):
    table = S.TRANSITIONS[action]
    if state in table:
        assert S.next_state("pp", state, action) == table[state]
        assert table[state] in S.STATES
        return
    with pytest.raises(S.TransitionRefused) as e:
        S.next_state("pp", state, action)
    msg = str(e.value)
    assert "'pp'" in msg and repr(state) in msg and action in msg
    # The refusal says what is allowed instead: from where this action is,
    # and what this state can do (or delete, when it can do nothing).
    for from_state in table:
        assert from_state in msg
    for other in allowed_from(state):
        assert other in msg.split("you can:")[1]
    if not allowed_from(state):
        assert "you can: delete" in msg


def test_table_shape():
    # Every state is reachable, error is reachable from everywhere, and only a
    # (full) resync leaves error.
    targets = {t for table in S.TRANSITIONS.values() for t in table.values()}
    assert targets | {S.COPY} == set(S.STATES)
    assert S.TRANSITIONS["fail"] == {s: S.ERROR for s in S.STATES}
    assert [a for a, t in S.TRANSITIONS.items() if S.ERROR in t and t[S.ERROR] != S.ERROR] == ["resync"]
    assert S.SECONDARY_SERVED == {S.SPLIT}


# -- through the PairManager ------------------------------------------------------------

def pair_in(env: Env, state: str):
    """A fresh pair p -> s in `state` (nothing is copied unless asked)."""
    env.volumes.create("p", 256 * 1024, 4096)
    env.layer("p").write(0, b"p" * 8192)
    pm = env.pairs
    pair = pm.create("p", "s", create_secondary=True)
    if state == S.COPY:
        return pair
    env.engine.drain(pair)
    if state == S.PAIR:
        return pair
    if state == S.ERROR:
        pm.fail(pair, "test fault")
        return pair
    pm.split(["s"])
    env.layer("s").write(0, b"s" * 4096)
    env.layer("p").write(65536, b"q" * 4096)
    if state == S.RESYNC:
        pm.resync("s")
    elif state == S.RESTORE:
        pm.restore("s")
    return pair


@pytest.mark.parametrize("state", S.STATES)
@pytest.mark.parametrize("action", USER_ACTIONS)
def test_manager_follows_the_table(tmp_path, state, action):
    env = Env(tmp_path / "data")
    try:
        pair = pair_in(env, state)
        assert pair.state == state
        folder = os.path.join(env.pairs.dir, "s")
        before = (pair.generation, sorted(os.listdir(folder)), env.pairs.store.list_pairs())
        call = {"split": lambda: env.pairs.split(["s"]),
                "resync": lambda: env.pairs.resync("s"),
                "restore": lambda: env.pairs.restore("s")}[action]
        if state in S.TRANSITIONS[action]:
            call()
            assert pair.state == S.TRANSITIONS[action][state]
            assert env.pairs.store.list_pairs()[0].state == pair.state
        else:
            with pytest.raises(Refused) as e:
                call()
            assert "'s'" in str(e.value) and repr(state) in str(e.value)
            assert (pair.generation, sorted(os.listdir(folder)),
                    env.pairs.store.list_pairs()) == before
            assert pair.state == state
        # Whatever happened, the reloaded state is the one in memory.
        env.crash()
        assert env.pairs.get("s").state == pair.state
        # And draining leads to a state with guarantees: S == P in pair.
        reloaded = env.pairs.get("s")
        if reloaded.state != S.ERROR:
            env.engine.drain(reloaded)
            assert reloaded.state in (S.PAIR, S.SPLIT)
            if reloaded.state == S.PAIR:
                assert env.volumes.get("s").read(0, 256 * 1024) == \
                    env.volumes.get("p").read(0, 256 * 1024)
    finally:
        env.close()
