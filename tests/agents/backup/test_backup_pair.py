"""Incremental forever against the real daemon: a pair is split, backed up in
full, resynced, written, split again and backed up incrementally.

- the incremental reads only the x-splitd:delta regions: the agent's READ
  bytes (its NBD client's stats) and the daemon's per-connection read
  counters are at most delta regions x region size;
- every snapshot restores to exactly what the secondary held at its split;
- a chain of 10 incrementals restores each point; forgetting the middle ones
  and collecting garbage keeps the rest restorable;
- a daemon restart between backups keeps the chain (split_gen/delta_base are
  kept), a pair through error, restore or a generation gap makes the next
  backup read everything and say why; --incremental then refuses.
"""
from __future__ import annotations

import random

import pytest

from agents.store import open_dir
from tests.agents.backup.helpers import (
    MiB,
    backup,
    backup_fails,
    check_restores,
    image_digests,
    resplit,
    write_blocks,
)
from tests.pairs.helpers import wait_mirrored

pytest.importorskip("nbd")

SIZE = 32 * MiB
REGION = 64 * 1024


@pytest.fixture
def pair(daemon):
    """Pair s (primary p, 32 MiB) mirrored, p holding data in its first 8 MiB."""
    daemon.create_volume("p", SIZE)
    write_blocks(daemon, "p", [0], seed=0, length=8 * MiB)
    daemon.call("pair.create", primary="p", secondary="s", create_secondary=True)
    wait_mirrored(daemon, "s")
    return "s"


@pytest.fixture
def store(request, daemon, tmp_path):
    """A store in tmp_path, or on S3 for tests parametrized with "s3"
    (indirect): a bucket on the session's SeaweedFS (tests/agents/conftest.py)."""
    path = tmp_path / "store"
    if getattr(request, "param", "dir") == "s3":
        path = f"s3://{request.getfixturevalue('s3_env')}/store"
    backup(daemon, "init", str(path), "--chunk-size", "1M")
    return path


def run(daemon, store, *extra: str) -> dict:
    return backup(daemon, "run", "--pair", "s", "--port", "unix", "--to", str(store), *extra)


def s_read_bytes(daemon) -> int:
    """READ bytes the daemon served on connections to export s (open or closed)."""
    return daemon.export_read_bytes("s")


def changed_regions(seed: int, n: int) -> list[int]:
    """n distinct random regions' offsets (4 KiB written in each, somewhere)."""
    rnd = random.Random(seed)
    return [r * REGION + rnd.randrange(0, REGION, 4096)
            for r in rnd.sample(range(SIZE // REGION), n)]


@pytest.mark.parametrize("store", ["dir", "s3"], indirect=True)
def test_full_then_incremental_reads_only_delta(daemon, pair, store, tmp_path):
    daemon.call("pair.split", name="s")
    expected = {}
    full = run(daemon, store)
    assert full["mode"] == "full" and "no earlier backup" in full["reason"], full
    assert full["split_gen"] == 1 and full["delta_base"] is None, full
    expected[full["snapshot"]] = image_digests(daemon.uri("s"))

    write_blocks(daemon, "p", changed_regions(1, 7), seed=1)
    info = resplit(daemon, "s")
    assert info["delta"] == 7, info
    before = s_read_bytes(daemon)
    inc = run(daemon, store, "--incremental")
    read_by_daemon = s_read_bytes(daemon) - before
    assert inc["mode"] == "incremental" and inc["parent"] == full["snapshot"], inc
    assert inc["delta_bytes"] == 7 * REGION, inc
    assert 0 < inc["bytes_read"] <= 7 * REGION, inc
    assert read_by_daemon <= 7 * REGION, f"the daemon served {read_by_daemon} bytes to the backup"
    assert inc["chunks_parent"] >= SIZE // MiB - 7, inc
    expected[inc["snapshot"]] = image_digests(daemon.uri("s"))
    check_restores(daemon, store, tmp_path, expected)

    shown = backup(daemon, "show", inc["snapshot"], "--store", str(store))["manifest"]
    assert shown["parent"] == full["snapshot"] and shown["read"]["mode"] == "incremental", shown
    assert shown["split_gen"] == 2 and shown["delta_base"] == 1, shown


def split_with_pending(daemon, seed: int, regions: int) -> list[bytes]:
    """Change P in `regions` regions while split, resync at 1 byte/s (nothing
    is copied) and split again at once: S has those regions pending. P's
    image, which S holds at this split, is returned."""
    write_blocks(daemon, "p", changed_regions(seed, regions), seed=seed)
    daemon.call("pair.set", name="s", rate=1)
    daemon.call("pair.resync", name="s")
    daemon.call("pair.split", name="s")
    assert daemon.call("pair.show", name="s")["pending"] >= regions - 1
    return image_digests(daemon.uri("p"))


def test_wait_copy_waits_for_pending(daemon, pair, store, tmp_path):
    daemon.call("pair.split", name="s")
    run(daemon, store)
    expected = split_with_pending(daemon, 5, 40)
    daemon.call("pair.set", name="s", rate=4 * MiB)      # drained in about a second
    r = run(daemon, store, "--wait-copy")
    assert daemon.call("pair.show", name="s")["pending"] == 0
    assert r["mode"] == "incremental" and r["waited_s"] > 0, r
    check_restores(daemon, store, tmp_path, {r["snapshot"]: expected})


@pytest.mark.parametrize("policy", ["copy-on-read", "staging", "wait"])
def test_now_reads_through_the_read_policy(daemon, pair, store, tmp_path, policy):
    daemon.call("pair.set", name="s", read_policy=policy)
    daemon.call("pair.split", name="s")
    run(daemon, store)
    expected = split_with_pending(daemon, 6, 20)
    if policy == "wait":
        daemon.call("pair.set", name="s", rate=4 * MiB)  # the reads wait for the engine
    r = run(daemon, store, "--now")
    assert r["mode"] == "incremental" and r["bytes_read"] <= 20 * REGION and r["waited_s"] == 0, r
    check_restores(daemon, store, tmp_path, {r["snapshot"]: expected})


@pytest.mark.parametrize("store", ["dir", pytest.param("s3", marks=pytest.mark.slow)], indirect=True)
def test_chain_of_ten_then_forget_the_middle(daemon, pair, store, tmp_path):
    daemon.call("pair.split", name="s")
    snaps = [run(daemon, store)]
    expected = {snaps[0]["snapshot"]: image_digests(daemon.uri("s"))}
    for k in range(1, 11):
        write_blocks(daemon, "p", changed_regions(100 + k, 3 + k), seed=100 + k)
        resplit(daemon, "s")
        r = run(daemon, store)
        assert r["mode"] == "incremental" and r["bytes_read"] <= (3 + k) * REGION, r
        assert r["parent"] == snaps[-1]["snapshot"], r
        snaps.append(r)
        expected[r["snapshot"]] = image_digests(daemon.uri("s"))
    check_restores(daemon, store, tmp_path, expected)

    middle = [s["snapshot"] for s in snaps[3:8]]
    gone = backup(daemon, "forget", *middle, "--store", str(store), "--gc")
    assert sorted(gone["forgotten"]) == sorted(middle), gone
    # gc keeps chunks younger than its safety margin (agents/store/gc.py):
    # sweep again without it, so that the middle snapshots' own chunks go.
    with open_dir(str(store)) as st:
        assert st.gc(margin=0).deleted_chunks > 0
    assert backup(daemon, "check", "--store", str(store))["ok"]
    for sid in middle:
        del expected[sid]
    check_restores(daemon, store, tmp_path, expected)

    plan = backup(daemon, "prune", "--keep-last", "3", "--store", str(store), "--dry-run")
    assert len(plan["remove"]) == len(expected) - 3 and plan["gc"] is None, plan
    pruned = backup(daemon, "prune", "--keep-last", "3", "--store", str(store))
    with open_dir(str(store)) as st:
        st.gc(margin=0)
    assert backup(daemon, "check", "--store", str(store))["ok"]
    kept = [k["id"] for k in pruned["keep"]]
    assert kept == [s["snapshot"] for s in snaps[-3:]][::-1] or sorted(kept) == sorted(
        s["snapshot"] for s in snaps[-3:]), pruned
    check_restores(daemon, store, tmp_path, {sid: expected[sid] for sid in kept})
    # The chain goes on from the newest.
    write_blocks(daemon, "p", changed_regions(999, 2), seed=999)
    resplit(daemon, "s")
    r = run(daemon, store)
    assert r["mode"] == "incremental" and r["parent"] == snaps[-1]["snapshot"], r


def test_restart_keeps_the_chain(daemon, pair, store, tmp_path):
    daemon.call("pair.split", name="s")
    full = run(daemon, store)
    daemon.call("pair.resync", name="s")
    wait_mirrored(daemon, "s")
    write_blocks(daemon, "p", changed_regions(2, 5), seed=2)
    daemon.restart()
    wait_mirrored(daemon, "s")
    daemon.call("pair.split", name="s")
    r = run(daemon, store)
    assert r["mode"] == "incremental" and r["parent"] == full["snapshot"], r
    assert r["bytes_read"] <= 5 * REGION, r
    check_restores(daemon, store, tmp_path, {r["snapshot"]: image_digests(daemon.uri("s"))})


def test_pair_through_error_falls_back_to_full(daemon, pair, store, tmp_path):
    daemon.call("pair.split", name="s")
    full = run(daemon, store)
    daemon.call("pair.resync", name="s")
    wait_mirrored(daemon, "s")
    write_blocks(daemon, "p", changed_regions(3, 4), seed=3)
    # A lost bitmap file: the pair comes back in error, its delta unknown.
    daemon.stop()
    folder = daemon.data_dir / "pairs" / "s"
    delta = sorted(folder.glob("delta.*"))
    assert delta, sorted(p.name for p in folder.iterdir())
    delta[0].unlink()
    daemon.start()
    assert daemon.call("pair.show", name="s")["state"] == "error"
    daemon.call("pair.resync", name="s")
    wait_mirrored(daemon, "s")
    info = daemon.call("pair.split", name="s")
    assert info["delta_base"] is None, info
    status, err, _ = backup_fails(daemon, "run", "--pair", "s", "--port", "unix", "--to", str(store),
                                  "--incremental")
    assert status == 1 and "no base" in err["message"], err
    r = run(daemon, store)
    assert r["mode"] == "full" and "no base" in r["reason"] and "error" in r["reason"], r
    assert r["parent"] is None and r["bytes_read"] >= 8 * MiB, r
    assert r["new_bytes"] <= 4 * MiB, "a fallback full read is deduplicated against the store"
    check_restores(daemon, store, tmp_path, {r["snapshot"]: image_digests(daemon.uri("s"))})
    assert full["snapshot"] != r["snapshot"]


def test_generation_gap_and_full(daemon, pair, store, tmp_path):
    daemon.call("pair.split", name="s")
    first = run(daemon, store)
    # Split 2 is never backed up: split 3's delta covers only 2 -> 3.
    write_blocks(daemon, "p", changed_regions(4, 3), seed=4)
    resplit(daemon, "s")
    write_blocks(daemon, "p", changed_regions(5, 3), seed=5)
    info = resplit(daemon, "s")
    assert info["split_gen"] == 3 and info["delta_base"] == 2, info
    r = run(daemon, store)
    assert r["mode"] == "full" and "generation gap" in r["reason"], r
    assert "split 1" in r["reason"] and "since split 2" in r["reason"], r
    forced = run(daemon, store, "--full")
    assert forced["mode"] == "full" and "--full" in forced["reason"] and forced["new_bytes"] == 0, forced
    check_restores(daemon, store, tmp_path, {r["snapshot"]: image_digests(daemon.uri("s"))})
    assert first["snapshot"] != r["snapshot"]


def test_pair_made_again_is_not_chained_onto(daemon, pair, store, tmp_path):
    """A pair deleted and made again counts splits from 0: its split 3 (delta
    since 2) must not chain onto the old pair's backup of split 2."""
    daemon.call("pair.split", name="s")
    run(daemon, store)
    resplit(daemon, "s")
    old = run(daemon, store)
    assert old["mode"] == "incremental" and old["split_gen"] == 2, old
    daemon.call("pair.delete", name="s")
    daemon.call("pair.create", primary="p", secondary="s")
    wait_mirrored(daemon, "s")
    daemon.call("pair.split", name="s")
    resplit(daemon, "s")
    write_blocks(daemon, "p", changed_regions(8, 3), seed=8)
    info = resplit(daemon, "s")
    assert (info["split_gen"], info["delta_base"]) == (3, 2), info
    r = run(daemon, store)
    assert r["mode"] == "full" and "made again" in r["reason"], r
    check_restores(daemon, store, tmp_path, {r["snapshot"]: image_digests(daemon.uri("s"))})
