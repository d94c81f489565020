"""The store against a model: a dict of snapshot id -> image bytes.

Hypothesis drives backups (full, or incremental from any remaining snapshot
with some chunks changed and the rest taken from the parent), aborted
backups, forgets, prunes and garbage collections (after time passes), in any
order. After every step, every snapshot the model holds is in the store and
restores exactly; after a collection, nothing unreferenced is left and the
store checks clean."""
from __future__ import annotations

import os
import random
import shutil
import tempfile

from hypothesis import settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from agents.store import RetentionPolicy, init_dir

from .conftest import SHM, age_everything, image_of

CS = 4096
CHUNK = st.one_of(
    st.just(bytes(CS)),                                          # zero
    st.sampled_from([0x41, 0x42, 0x43]).map(lambda b: bytes([b]) * CS),  # shared, compressible
    st.integers(0, 2**32).map(lambda seed: random.Random(seed).randbytes(CS)),  # unique
)


class StoreModel(RuleBasedStateMachine):
    @initialize()
    def make(self):
        self.dir = tempfile.mkdtemp(prefix=f"store-model-{os.getpid()}-", dir=SHM)
        self.store = init_dir(os.path.join(self.dir, "s"), chunk_size=CS)
        self.model: dict[str, bytes] = {}

    def teardown(self):
        if hasattr(self, "store"):
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(chunks=st.lists(CHUNK, min_size=1, max_size=8), tail=st.integers(0, CS - 1),
          order_seed=st.randoms(use_true_random=False))
    def full_backup(self, chunks, tail, order_seed):
        image = b"".join(chunks)
        if tail and len(chunks) > 1:
            image = image[:-tail]
        w = self.store.writer(len(image))
        offsets = list(range(0, len(image), CS))
        order_seed.shuffle(offsets)
        for off in offsets:
            w.add(off, image[off:off + CS])
        sid = w.commit(volume="v")
        self.model[sid] = image

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def incremental(self, data):
        parent = data.draw(st.sampled_from(sorted(self.model)))
        image = bytearray(self.model[parent])
        count = -(-len(image) // CS)
        changed = data.draw(st.sets(st.integers(0, count - 1), max_size=count))
        w = self.store.writer(len(image), parent=parent)
        for i in sorted(changed):
            n = min(CS, len(image) - i * CS)
            piece = data.draw(CHUNK)[:n]
            image[i * CS:i * CS + n] = piece
            w.add(i * CS, piece)
        w.fill_from_parent()
        sid = w.commit(volume="v")
        self.model[sid] = bytes(image)

    @rule(chunks=st.lists(CHUNK, min_size=2, max_size=6))
    def aborted_backup(self, chunks):
        w = self.store.writer(len(chunks) * CS)
        for i, c in enumerate(chunks[:-1]):
            w.add(i * CS, c)
        w.abort()

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def forget(self, data):
        sid = data.draw(st.sampled_from(sorted(self.model)))
        assert self.store.forget([sid]) == [sid]
        del self.model[sid]

    @precondition(lambda self: self.model)
    @rule(last=st.integers(0, 3), daily=st.integers(0, 2))
    def prune(self, last, daily):
        if not last and not daily:
            return
        plan, _ = self.store.prune(RetentionPolicy(last=last, daily=daily), margin=0)
        for m in plan.remove:
            del self.model[m["id"]]
        newest = sorted(self.model)[-max(last, 1):]
        assert {m["id"] for m in plan.keep} >= set(newest)

    @rule()
    def gc(self):
        age_everything(self.store.backend.root)
        self.store.gc(margin=0)
        report = self.store.check()
        assert report.ok and report.unreferenced_chunks == 0 and not report.orphan_indexes

    @invariant()
    def every_snapshot_restores(self):
        if not hasattr(self, "store"):
            return
        assert self.store.snapshot_ids() == sorted(self.model)
        for sid, image in self.model.items():
            assert image_of(self.store, sid) == image


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)
