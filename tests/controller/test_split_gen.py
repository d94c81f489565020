"""Split generations (controller/pairs.py, "Split generations"): split_gen
counts a pair's splits and delta_base names the split whose changes the
delta covers, both committed with the state, and dropped (None) wherever
the delta is "all" or unknown. The backup agent trusts an incremental only
when its parent's split_gen is this split's delta_base, so every path that
sets the delta is walked here, through a real PairManager on real files."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from controller import states as S
from volumes.store import SCHEMA_VERSION, MetadataStore

from .env import Env

RS = 4096           # region size
SIZE = 64 * RS


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path / "data")
    yield e
    e.close()


def make_pair(env: Env, primary: str = "p", secondary: str = "s", group: str | None = None):
    env.volumes.create(primary, SIZE, RS)
    env.layer(primary).write(0, b"p" * 8 * RS)
    pair = env.pairs.create(primary, secondary, create_secondary=True, group=group)
    env.engine.drain(pair)
    assert pair.state == S.PAIR
    return pair


def gens(pair) -> tuple[int, int | None]:
    return pair.split_gen, pair.delta_base


def row(env: Env, name: str = "s") -> tuple[int, int | None]:
    rec = next(r for r in env.pairs.store.list_pairs() if r.secondary == name)
    return rec.split_gen, rec.delta_base


def delta_regions(pair) -> set[int]:
    return {r for r in range(pair.nregions) if pair.bm["delta"][r]}


def split_resync(env: Env, name: str = "s"):
    """Resync a split pair and drain it back to `pair`."""
    pair = env.pairs.resync(name)
    env.engine.drain(pair)
    assert pair.state == S.PAIR
    return pair


def test_split_resync_split_bases_each_delta_on_the_split_before(env):
    pair = make_pair(env)
    assert gens(pair) == (0, None) == row(env)
    env.pairs.split(["s"])
    # The first split: the delta is every region (the pair was just made).
    assert gens(pair) == (1, None) == row(env)
    assert delta_regions(pair) == set(range(pair.nregions))
    # Changes after split 1: P in split, S in split, P while resyncing and mirroring.
    env.layer("p").write(10 * RS, b"a" * RS)
    env.layer("s").write(20 * RS + 512, b"b" * 512)
    pair = env.pairs.resync("s")
    assert gens(pair) == (1, 1) == row(env)     # the delta now covers changes since split 1
    env.layer("p").write(30 * RS, b"c" * 2 * RS)
    env.engine.drain(pair)
    env.layer("p").write(40 * RS, b"d")
    reply = env.controller.pair_split("s")
    assert (reply["split_gen"], reply["delta_base"]) == (2, 1) == row(env)
    assert reply["split_at"] == pair.split_at is not None
    # Exactly the regions changed since split 1, on either side.
    assert delta_regions(pair) == {10, 20, 30, 31, 40}
    # Once more: the base moves on with the splits.
    env.layer("p").write(50 * RS, b"e")
    split_resync(env)
    env.pairs.split(["s"])
    assert gens(pair) == (3, 2) == row(env)
    assert delta_regions(pair) == {50}


def test_a_split_during_a_resync_keeps_the_base(env):
    pair = make_pair(env)
    env.pairs.split(["s"])
    env.layer("p").write(0, b"x" * RS)
    env.pairs.resync("s")
    assert pair.state == S.RESYNC
    env.pairs.split(["s"])
    assert gens(pair) == (2, 1) == row(env)


def test_split_gen_and_base_survive_a_restart(env):
    pair = make_pair(env)
    env.pairs.split(["s"])
    split_resync(env)
    env.pairs.split(["s"])
    assert gens(pair) == (2, 1)
    env.crash()     # kill -9: nothing synced or stopped
    again = env.pairs.get("s")
    assert gens(again) == (2, 1)
    # And they go on from there: the delta kept across the restart is trusted.
    env.layer("p").write(5 * RS, b"y")
    split_resync(env)
    env.pairs.split(["s"])
    assert gens(again) == (3, 2) == row(env)
    assert delta_regions(again) == {5}


def test_a_full_resync_leaves_no_base(env):
    pair = make_pair(env)
    env.pairs.split(["s"])
    split_resync(env)
    env.pairs.fail(pair, "test fault")
    assert pair.state == S.ERROR and gens(pair) == (1, None) == row(env)
    split_resync(env)       # from error: every region again
    assert gens(pair) == (1, None)
    env.pairs.split(["s"])
    assert gens(pair) == (2, None) == row(env)
    assert delta_regions(pair) == set(range(pair.nregions))
    # The next normal cycle has a base again.
    split_resync(env)
    env.pairs.split(["s"])
    assert gens(pair) == (3, 2) == row(env)


def test_an_error_while_split_leaves_no_base(env):
    pair = make_pair(env)
    env.pairs.split(["s"])
    split_resync(env)
    env.pairs.split(["s"])
    assert gens(pair) == (2, 1)
    # The primary's writes in error are not tracked: the delta is unknown.
    env.pairs.fail(pair, "test fault")
    env.layer("p").write(7 * RS, b"z")
    assert gens(pair) == (2, None) == row(env)
    split_resync(env)
    env.pairs.split(["s"])
    assert gens(pair) == (3, None) == row(env)


def test_an_error_found_at_start_leaves_no_base(env, tmp_path):
    pair = make_pair(env)
    env.pairs.split(["s"])
    split_resync(env)
    assert gens(pair) == (1, 1)
    # A fault recorded in the fault file only (its row could not be
    # committed): the restart puts the pair in error.
    env.pairs.files.write_fault("s", "recorded before the stop")
    env.crash()
    again = env.pairs.get("s")
    assert again.state == S.ERROR and gens(again) == (1, None) == row(env)


def test_a_restore_leaves_no_base(env):
    pair = make_pair(env)
    env.pairs.split(["s"])
    split_resync(env)
    env.pairs.split(["s"])
    env.layer("s").write(3 * RS, b"r")
    env.pairs.restore("s")
    assert gens(pair) == (2, None) == row(env)
    env.engine.drain(pair)
    assert pair.state == S.PAIR
    env.pairs.split(["s"])
    assert gens(pair) == (3, None) == row(env)


def test_a_group_split_counts_every_member_in_one_commit(env):
    a = make_pair(env, "p1", "s1", group="g")
    b = make_pair(env, "p2", "s2", group="g")
    # Members need not agree: s1 has one split more than s2.
    env.pairs.split(["s1"])
    split_resync(env, "s1")
    assert gens(a) == (1, 1) and gens(b) == (0, None)
    statements: list[str] = []
    env.pairs.store._db.set_trace_callback(statements.append)
    try:
        reply = env.controller.group_split("g")
    finally:
        env.pairs.store._db.set_trace_callback(None)
    assert [(p["name"], p["split_gen"], p["delta_base"]) for p in reply["pairs"]] == [
        ("s1", 2, 1), ("s2", 1, None)]
    assert (row(env, "s1"), row(env, "s2")) == ((2, 1), (1, None))
    # One transaction: BEGIN, one UPDATE per member, COMMIT (not synced on
    # the spot: the PRAGMAs around it, controller/pairs.py).
    kinds = [s.split()[0].upper() for s in statements if not s.upper().startswith("PRAGMA")]
    assert kinds == ["BEGIN", "UPDATE", "UPDATE", "COMMIT"], statements
    assert all("split_gen" in s for s in statements if s.upper().startswith("UPDATE"))


def test_a_refused_member_changes_no_split_gen(env):
    a = make_pair(env, "p1", "s1", group="g")
    b = make_pair(env, "p2", "s2", group="g")
    env.pairs.fail(b, "test fault")
    with pytest.raises(Exception, match="cannot split"):
        env.controller.group_split("g")
    assert gens(a) == (0, None) == row(env, "s1")
    assert gens(b) == (0, None) == row(env, "s2")


def test_a_pair_made_again_counts_from_zero_with_a_new_created(env):
    pair = make_pair(env)
    env.pairs.split(["s"])
    split_resync(env)
    env.pairs.split(["s"])
    first = (pair.created, gens(pair))
    assert first[1] == (2, 1)
    env.pairs.delete("s")
    again = env.pairs.create("p", "s")
    env.engine.drain(again)
    env.pairs.split(["s"])
    # Not a continuation of the old chain: no base, and `created` differs.
    assert gens(again) == (1, None) == row(env)
    assert again.created > first[0]
    assert env.controller.pair_show("s")["created"] == again.created


# -- migration from schema v3 -------------------------------------------------------------

# The schema as splitd wrote it at version 3 (volumes/store.py MIGRATIONS[:3]
# before split generations), spelled out: the test must not follow later edits.
V3_SCHEMA = """
CREATE TABLE volumes (
    name        TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    region_size INTEGER NOT NULL,
    read_only   INTEGER NOT NULL DEFAULT 0,
    created     REAL NOT NULL
);
CREATE TABLE pairs (
    secondary   TEXT PRIMARY KEY REFERENCES volumes(name),
    primary_vol TEXT NOT NULL REFERENCES volumes(name),
    state       TEXT NOT NULL,
    read_policy TEXT NOT NULL,
    rate        INTEGER NOT NULL DEFAULT 0,
    grp         TEXT,
    generation  INTEGER NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    created     REAL NOT NULL,
    split_at    REAL
);
CREATE TABLE tokens (
    name          TEXT PRIMARY KEY,
    scope         TEXT NOT NULL,
    volumes       TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created       REAL NOT NULL,
    last_used     REAL
);
PRAGMA user_version = 3;
"""
V3_PAIR_COLUMNS = ("secondary, primary_vol, state, read_policy, rate, grp, generation, reason, "
                   "created, split_at")


def as_v3(data_dir) -> list[tuple]:
    """Rewrite a stopped daemon's database as splitd v3 had it; its pair rows."""
    path = data_dir / "splitd.db"
    with sqlite3.connect(path) as db:
        volumes = db.execute("SELECT name, size, region_size, read_only, created "
                             "FROM volumes").fetchall()
        pairs = db.execute(f"SELECT {V3_PAIR_COLUMNS} FROM pairs").fetchall()
    db.close()
    for suffix in ("", "-wal", "-shm"):
        (data_dir / f"splitd.db{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(path)
    try:
        db.executescript(V3_SCHEMA)
        db.executemany("INSERT INTO volumes VALUES (?,?,?,?,?)", volumes)
        db.executemany(f"INSERT INTO pairs ({V3_PAIR_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                       pairs)
        db.commit()
    finally:
        db.close()
    return pairs


def test_migration_from_v3_keeps_pairs(tmp_path):
    data = tmp_path / "data"
    env = Env(data)
    try:
        make_pair(env, "p1", "s1", group="g")
        make_pair(env, "p2", "s2")
        env.pairs.split(["s1"])
        env.layer("p1").write(0, b"after the split")
        asyncio.run(env.pairs.stop())   # a clean stop: no split number is skipped
    finally:
        env.close()
    old_rows = as_v3(data)
    assert {r[0]: r[2] for r in old_rows} == {"s1": "split", "s2": "pair"}
    with sqlite3.connect(data / "splitd.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        assert "split_gen" not in [c[1] for c in db.execute("PRAGMA table_info(pairs)")]
    db.close()

    env = Env(data)
    try:
        assert env.pairs.store.schema_version == SCHEMA_VERSION == 6
        # Every pair as it was, its v3 columns unchanged.
        new_rows = [tuple(r)[:10] for r in env.pairs.store.list_pairs()]
        assert new_rows == sorted(old_rows)
        s1, s2 = env.pairs.get("s1"), env.pairs.get("s2")
        assert (s1.state, s1.group, s2.state) == (S.SPLIT, "g", S.PAIR)
        # The split pair counts that split as its first; no base is known.
        assert gens(s1) == (1, None) and gens(s2) == (0, None)
        assert env.layer("s1").read(0, 15) == b"p" * 15     # still the split image
        # And they go on from there.
        split_resync(env, "s1")
        env.pairs.split(["s1", "s2"])
        assert (gens(s1), gens(s2)) == ((2, 1), (1, None))
    finally:
        env.close()
    # A current database opens as it is; pairs of two volumes have no source (v5).
    store = MetadataStore(str(data / "splitd.db"))
    try:
        assert store.schema_version == SCHEMA_VERSION
        assert [(r.split_gen, r.delta_base) for r in store.list_pairs()] == [(2, 1), (1, None)]
        assert [r.source for r in store.list_pairs()] == [None, None]
        # v6: served snapshots and ended instant restores, none yet.
        assert store.list_served() == [] and store.get_restore_end("s1") is None
    finally:
        store.close()


# -- splits durable before anything depends on them (controller/pairs.py) -----------------------


def test_a_change_after_a_split_waits_for_the_split_to_be_durable(env):
    """The split's commit is not synced when it is answered; a P or S change
    is held until it is, even one whose bits are already durably set."""
    pair = make_pair(env)
    env.pairs.durability.round_now(everything=True)   # the copies' clears durable
    env.pairs.split(["s"])
    store = env.pairs.store
    assert pair.row_commit and not store.synced(pair.row_commit)
    for kind in ("changed_p", "changed_s"):
        pair.bm[kind].intent(0, 0)
        pair.bm[kind].sync()
    assert not pair.primary_change_ready(0, 0), "a P write ran before its split was durable"
    assert not pair.secondary_change_ready(0, 0), "an S write ran before its split was durable"
    store.sync_wal()
    assert pair.primary_change_ready(0, 0) and pair.secondary_change_ready(0, 0)
    assert pair.row_commit == 0


def test_a_round_makes_the_split_durable(env):
    pair = make_pair(env)
    env.pairs.split(["s"])
    assert not pair.split_durable()
    env.pairs.durability.round_now()
    assert pair.split_durable()
    # Any synced commit covers the split before it.
    env.pairs.resync("s")
    assert env.pairs.store.synced(env.pairs.store.last_commit)


def test_after_an_unclean_stop_the_first_split_of_a_mirroring_pair_skips_a_number(env):
    """A split answered and then lost in a power cut leaves no trace in the
    row; after an unclean stop a mirroring pair's next split takes the
    number after the one that split may have had. A clean stop skips none,
    and a pair found split needs none (its split survived)."""
    make_pair(env, "p1", "s1")
    make_pair(env, "p2", "s2")
    env.pairs.split(["s2"])
    env.pairs.durability.round_now()
    env.crash()                      # the running marker stays: an unclean stop
    assert env.pairs.unclean
    (a,) = env.pairs.split(["s1"])
    assert a.split_gen == 2, "a split after an unclean stop may reuse a lost split's number"
    b = split_resync(env, "s2")
    env.pairs.split(["s2"])
    assert b.split_gen == 2
    split_resync(env, "s1")
    asyncio.run(env.pairs.stop())    # a clean stop: the marker goes
    env.crash()
    assert not env.pairs.unclean
    (a,) = env.pairs.split(["s1"])
    assert a.split_gen == 3


def test_changed_bits_of_a_lost_split_are_dropped_at_start(env):
    """Bits a held change set in changed_p / changed_s (written back by the
    kernel) before a split was lost mean nothing in a mirroring state: they
    are dropped at start, or a later restore would copy S->P there."""
    pair = make_pair(env)
    pair.bm["changed_p"].intent(3, 3)
    pair.bm["changed_s"].intent(5, 5)
    pair.bm["changed_p"].sync()
    pair.bm["changed_s"].sync()
    env.crash()
    again = env.pairs.get("s")
    assert again.state == S.PAIR
    assert again.bm["changed_p"].count() == 0 and again.bm["changed_s"].count() == 0


def test_the_skip_after_an_unclean_stop_survives_a_clean_stop_before_the_next_split(env):
    """The number a lost split may have had stays skipped until the pair's
    next split, however many clean restarts come first: a clean stop right
    after the unclean restart (an upgrade, say) must not give the next split
    the lost split's number, or a backup of the lost split passes for its
    parent (agents/backup/chain.py matches numbers)."""
    make_pair(env)
    env.crash()                      # an unclean stop: a split may have been lost
    asyncio.run(env.pairs.stop())    # then a clean one, before any split
    env.crash()
    (a,) = env.pairs.split(["s"])
    assert a.split_gen == 2, "a clean stop forgot the number a lost split may have had"
