"""Garbage collection removes what nothing refers to, and nothing a snapshot or
a running backup needs: the forgotten parent of a running writer, chunks a
writer reused, and, under a real race between sweeps and writers, any chunk a
committed snapshot names. A writer killed with SIGKILL leaves no snapshot."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from agents.store import ConcurrentSweep, RetentionPolicy, open_dir
from agents.store.names import index_name

from .conftest import age_everything, backup, image_of

CS = 65536
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def chunk_set(store) -> set[str]:
    return set(store.backend.list("chunks/"))


def test_gc_removes_old_garbage_only(store):
    rnd = random.Random(20)
    shared = rnd.randbytes(CS)
    a = backup(store, shared + rnd.randbytes(CS))
    b = backup(store, rnd.randbytes(CS) + shared)
    store.forget([a])
    young = store.gc(margin=0)
    assert young.unreferenced_chunks == 1 and young.deleted_chunks == 0 and young.kept_young_chunks == 1
    age_everything(store.backend.root)
    dry = store.gc(margin=0, dry_run=True)
    assert dry.deleted_chunks == 1 and dry.deleted_indexes == [a] and len(chunk_set(store)) == 3
    report = store.gc(margin=0)
    assert report.deleted_chunks == 1 and report.deleted_indexes == [a]
    assert len(chunk_set(store)) == 2 and not store.backend.exists(index_name(a))
    assert store.check().ok and store.check().unreferenced_chunks == 0
    assert image_of(store, b)[CS:] == shared


def test_default_margin_keeps_recent_garbage(store):
    a = backup(store, b"q" * CS)
    store.forget([a])
    assert store.gc().deleted_chunks == 0      # gc.MARGIN: minutes, not seconds


def test_forgotten_parent_of_a_running_writer_survives_gc(store):
    rnd = random.Random(21)
    image = rnd.randbytes(6 * CS)
    parent = backup(store, image)
    w = store.writer(len(image), parent=parent)
    store.forget([parent])
    age_everything(store.backend.root)
    report = store.gc(margin=0)
    assert report.deleted_chunks == 0 and report.deleted_indexes == []
    w.fill_from_parent()
    child = w.commit()
    assert image_of(store, child) == image
    age_everything(store.backend.root)
    assert store.gc(margin=0).deleted_indexes == [parent]
    assert image_of(store, child) == image


def test_chunks_a_running_writer_reused_survive_gc(store):
    rnd = random.Random(22)
    image = rnd.randbytes(8 * CS)
    old = backup(store, image)
    store.forget([old])
    age_everything(store.backend.root)          # old garbage, the same data
    w = store.writer(len(image))
    w.add(0, image)                             # reuses (and touches) every chunk
    w.wait()
    report = store.gc(margin=0)
    assert report.unreferenced_chunks == 8 and report.deleted_chunks == 0
    sid = w.commit()                            # a sweep ran: the writer re-checked
    assert image_of(store, sid) == image


def test_prune_then_gc(store):
    sids = [backup(store, bytes([i + 1]) * CS, volume="v") for i in range(5)]
    plan, gc_report = store.prune(RetentionPolicy(last=2), dry_run=True)
    assert [m["id"] for m in plan.remove] == sids[:3] and gc_report is None
    assert store.snapshot_ids() == sids
    age_everything(store.backend.root)
    plan, gc_report = store.prune(RetentionPolicy(last=2), margin=0)
    assert store.snapshot_ids() == sids[3:]
    assert gc_report is not None and gc_report.deleted_chunks == 3
    assert store.check().ok


@pytest.mark.slow
def test_gc_racing_writers_loses_nothing(store):
    """Sweeps run back to back in one thread while backups of the same image
    (so each reuses the previous one's chunks, which have just become garbage
    and are old enough to sweep) commit in another. Every committed snapshot
    must restore exactly; a writer may only fail with ConcurrentSweep."""
    rnd = random.Random(23)
    base = rnd.randbytes(48 * CS)
    stop = threading.Event()
    sweeps = []
    errors: list[BaseException] = []

    def sweeper():
        try:
            while not stop.is_set():
                sweeps.append(store_g.gc(margin=0).deleted_chunks)
        except BaseException as e:
            errors.append(e)

    store_g = open_dir(store.backend.root)       # its own handle, as another process would have
    t = threading.Thread(target=sweeper)
    t.start()
    committed, refused = {}, 0
    try:
        for round_ in range(8):
            image = bytearray(base)
            image[round_ * CS:round_ * CS + 10] = bytes([round_ + 1]) * 10
            if committed:
                store.forget(list(committed))
                time.sleep(1.1)                  # the forgotten chunks are now sweepable
            w = store.writer(len(image))
            order = list(range(48))
            rnd.shuffle(order)
            for i in order:
                w.add(i * CS, bytes(image[i * CS:(i + 1) * CS]))
                if i % 8 == 0:
                    time.sleep(0.01)
            try:
                sid = w.commit()
            except ConcurrentSweep:
                refused += 1
                continue
            assert image_of(store, sid) == image
            committed = {sid: bytes(image)}
    finally:
        stop.set()
        t.join()
    assert not errors
    assert sum(sweeps) > 0, "the sweeps never removed anything: the race was not exercised"
    for sid, image in committed.items():
        assert image_of(store, sid) == image
    assert store.check().ok
    print(f"sweeps {len(sweeps)}, chunks swept {sum(sweeps)}, commits refused {refused}")


_CHILD = r"""
import os, random, sys, time
from agents.store import open_dir
s = open_dir(sys.argv[1])
rnd = random.Random(int(sys.argv[2]))
image = rnd.randbytes(64 * 65536)
w = s.writer(len(image))
for i in range(64):
    w.add(i * 65536, image[i * 65536:(i + 1) * 65536])
    print("added", i, flush=True)
print("commit", flush=True)
print("done", w.commit(), flush=True)
"""


@pytest.mark.parametrize("kill_after", ["added 5", "added 40", "commit"])
def test_writer_killed_leaves_no_snapshot_and_a_clean_store(tmp_path, kill_after):
    """On disk (fsync for real): SIGKILL the writer at some point; the store
    has no snapshot (or, if the kill came after the manifest, a whole one),
    checks clean, and the next backup of the same image completes, reusing
    what was stored."""
    from agents.store import init_dir
    path = str(tmp_path / "store")
    init_dir(path, chunk_size=CS).close()
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, path, "7"], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(kill_after):
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait()
    s = open_dir(path)
    report = s.check()
    assert report.ok, report.problems
    for sid in s.snapshot_ids():                 # only if the kill missed the commit
        assert s.verify(sid).ok
    assert list(s.backend.list("leases/")), "the dead writer's lease is still there"
    image = random.Random(7).randbytes(64 * CS)
    w = s.writer(len(image))
    w.add(0, image)
    sid = w.commit()
    assert image_of(s, sid) == image
    if kill_after == "added 40":
        assert w.stats["reused_chunks"] >= 30
