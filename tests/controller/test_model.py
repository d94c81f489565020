"""Pairs against an in-memory model: a hypothesis state machine, in-process.

Two primaries and three pairs on a temporary data directory:

    p1 (16 KiB regions, last one short) -> s1  (no group; s1 made by pair create)
    p1                                  -> s2  (group g; s2 existed, full of garbage)
    p2 (4 KiB regions)                  -> s3  (group g; s3 made by pair create)

so a group split spans two primaries, and one primary has two secondaries.
Every operation goes through the volumes' layers (what the NBD server calls)
or the PairManager (what the admin API calls); the copy engine only moves
when a rule steps or drains it, so every interleaving is reachable.

The model: each primary's image; for each pair its state and, while split,
the image S must show (P's image at the split plus S's own writes). After
every step the files and bitmaps are checked WITHOUT going through the layers
(reading through them would copy regions and hide what the engine must do):

    copy/pair/resync  every region not in diff: S file == P file
    split             S's image == P file where pending, S file elsewhere;
                      staged buffers hold that image; pending is disjoint
                      from changed_p and changed_s; changed_s is exactly the
                      regions S wrote, changed_p covers what P wrote
    error             a reason; nothing is copied
    restore           P's image (S file where still to restore, P file
                      elsewhere) == the model; S file == P's image wherever
                      nothing is left to copy P->S
    always            bitmap counts == bits set, and each bitmap file holds
                      the bits in memory plus those cleared lazily (copied,
                      not yet durably: DESIGN.md "Crash safety")
    at every split    delta covers every region where this split image
                      differs from the previous one
    after drain       pair: S file == P file == the model; split: S file ==
                      S's image

`crash` simulates kill -9 and a restart in the middle of anything: the
model does not change, and the same checks go on with the reloaded pairs.
"""
from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from controller import reads as reads_mod, states as S
from controller.pair import READ_POLICIES
from controller.pairs import Refused

from .env import Env

P1_SIZE = 1024 * 1024 - 4096     # 64 regions of 16 KiB, the last one 12 KiB
P1_REGION = 16 * 1024
P2_SIZE = 256 * 1024             # 64 regions of 4 KiB
P2_REGION = 4096

PRIMARIES = ("p1", "p2")
PAIRS = {"s1": ("p1", None), "s2": ("p1", "g"), "s3": ("p2", "g")}
SIZES = {"p1": P1_SIZE, "p2": P2_SIZE, "s1": P1_SIZE, "s2": P1_SIZE, "s3": P2_SIZE}
MIRRORING = (S.COPY, S.PAIR, S.RESYNC)


@st.composite
def ranges(draw, size: int):
    """(offset, length) inside a volume: 512-aligned, unaligned, or whole."""
    kind = draw(st.sampled_from(["aligned", "unaligned", "unaligned", "whole"]))
    if kind == "whole":
        return 0, size
    if kind == "aligned":
        off = draw(st.integers(0, size // 512 - 1)) * 512
        return off, draw(st.integers(1, min(96, (size - off) // 512))) * 512
    off = draw(st.integers(0, size - 1))
    return off, draw(st.integers(1, min(48 * 1024, size - off)))


def payload(draw, length: int) -> bytes:
    kind = draw(st.sampled_from(["random", "random", "byte", "zeroes"]))
    if kind == "zeroes":
        return bytes(length)       # written zeroes: data, not a hole
    if kind == "byte":
        return bytes([draw(st.integers(1, 255))]) * length
    return random.Random(draw(st.integers(0, 2**32))).randbytes(length)


class PairModel:
    def __init__(self, state: str):
        self.state = state
        self.image: bytearray | None = None    # S's image while split
        self.written_p: set[int] = set()       # regions P wrote since the split
        self.written_s: set[int] = set()       # regions S wrote since the split
        self.prev_split: bytes | None = None   # P's image at this pair's previous split


class PairMachine(RuleBasedStateMachine):
    initial_policy = "copy-on-read"

    # -- set-up ------------------------------------------------------------------

    @initialize(data=st.data())
    def setup(self, data):
        self.tmp = tempfile.mkdtemp(prefix="splitd-model-")
        self.env = Env(os.path.join(self.tmp, "data"))
        self.loop = asyncio.new_event_loop()
        # A small staging budget, so the "limit reached: copy on read" path runs too.
        self.saved_staging_limit = reads_mod.STAGING_LIMIT
        reads_mod.STAGING_LIMIT = 3 * P1_REGION
        vols = self.env.volumes
        vols.create("p1", P1_SIZE, P1_REGION)
        vols.create("p2", P2_SIZE, P2_REGION)
        vols.create("s2", P1_SIZE, 4096)
        self.img = {p: bytearray(SIZES[p]) for p in PRIMARIES}
        # Data on the primaries before pairing (the initial copy must bring
        # it), garbage on s2 (the initial copy must overwrite all of it).
        for _ in range(data.draw(st.integers(0, 4), label="writes before pairing")):
            name = data.draw(st.sampled_from(["p1", "p2", "s2"]))
            off, length = data.draw(ranges(SIZES[name]))
            buf = payload(data.draw, length)
            vols.get(name).write(off, buf)
            if name in self.img:
                self.img[name][off:off + length] = buf
        pm = self.env.pairs
        pm.create("p1", "s1", create_secondary=True, read_policy=self.initial_policy)
        pm.create("p1", "s2", read_policy=self.initial_policy, group="g")
        pm.create("p2", "s3", create_secondary=True, read_policy=self.initial_policy, group="g")
        self.model = {name: PairModel(S.COPY) for name in PAIRS}

    def teardown(self):
        if hasattr(self, "env"):
            reads_mod.STAGING_LIMIT = self.saved_staging_limit
            self.env.close()
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------

    def pair(self, name: str):
        return self.env.pairs.pairs[name]

    def regions(self, name: str, off: int, length: int) -> set[int]:
        rs = self.pair(name).region_size
        return set(range(off // rs, (off + length - 1) // rs + 1))

    def split_names(self) -> list[str]:
        return [n for n, m in self.model.items() if m.state == S.SPLIT]

    def restoring(self, primary: str) -> str | None:
        """The pair restoring this primary, if any."""
        for n, m in self.model.items():
            if PAIRS[n][0] == primary and m.state == S.RESTORE:
                return n
        return None

    def read(self, layer, off: int, length: int, max_bytes: int = 4096) -> bytes:
        """A read through a layer; a held read (policy `wait`) runs in an event
        loop while the engine is stepped until it is answered."""
        engine = self.env.engine

        async def go():
            res = layer.read(off, length)
            if type(res) is bytes:
                return res
            pair = layer.secondary_of
            for _ in range(4 * pair.nregions + 4):
                if res.done():
                    break
                engine.step(pair, max_bytes)
            assert res.done(), "a held read was never answered while the engine ran"
            return res.result()

        return self.loop.run_until_complete(go())

    def after_engine(self, name: str) -> None:
        """The engine may end a copy/resync/restore: state pair, and only then."""
        m, pair = self.model[name], self.pair(name)
        if m.state in (S.COPY, S.RESYNC, S.RESTORE) and pair.state == S.PAIR:
            m.state = S.PAIR
        assert pair.state == m.state, f"{name}: engine moved {m.state} to {pair.state}"
        if pair.state in (S.COPY, S.RESYNC, S.RESTORE):
            assert pair.work_bitmap().count() > 0, f"{name}: drained but still {pair.state}"

    def allowed(self, name: str, action: str) -> bool:
        if self.model[name].state not in S.TRANSITIONS[action]:
            return False
        if action in ("split", "restore"):
            # While a pair restores P, the other pairs of P neither split nor restore.
            other = self.restoring(PAIRS[name][0])
            return other is None or other == name
        return True

    def expect_refused(self, fn, *names: str) -> None:
        with pytest.raises(Refused) as e:
            fn()
        assert any(repr(n) in str(e.value) for n in names), str(e.value)

    # -- the primaries ----------------------------------------------------------------

    def change(self, data, name: str):
        """A random write, zero (punching or not) or trim through the volume's
        layer: (offset, length, the bytes the range now holds)."""
        off, length = data.draw(ranges(SIZES[name]))
        op = data.draw(st.sampled_from(["write", "write", "zero", "zero-no-punch", "trim"]))
        layer = self.env.layer(name)
        if op == "write":
            buf = payload(data.draw, length)
            layer.write(off, buf)
        else:
            buf = bytes(length)
            if op == "trim":
                layer.trim(off, length)
            else:
                layer.zero(off, length, punch=(op == "zero"))
        return off, length, buf

    @rule(data=st.data())
    def write_primary(self, data):
        name = data.draw(st.sampled_from(PRIMARIES))
        off, length, buf = self.change(data, name)
        self.img[name][off:off + length] = buf
        for n, m in self.model.items():
            if PAIRS[n][0] == name and m.state == S.SPLIT:
                m.written_p |= self.regions(n, off, length)

    @rule(data=st.data())
    def read_primary(self, data):
        name = data.draw(st.sampled_from(PRIMARIES))
        off, length = data.draw(ranges(SIZES[name]))
        assert self.read(self.env.layer(name), off, length) == self.img[name][off:off + length]

    @rule(data=st.data())
    def primary_read_fd_and_extents(self, data):
        """sendfile is offered only where the file holds the image; a hole
        reported by base:allocation reads as zeroes."""
        name = data.draw(st.sampled_from(PRIMARIES))
        off, length = data.draw(ranges(SIZES[name]))
        self.check_fd_and_extents(self.env.layer(name), self.img[name], off, length)

    def check_fd_and_extents(self, layer, image, off, length) -> None:
        src = layer.read_fd(off, length)
        if src is not None:
            fd, file_off = src
            assert os.pread(fd, length, file_off) == image[off:off + length]
        exts = layer.extents(off, length)
        assert sum(n for n, _ in exts) == length
        pos = off
        for n, flags in exts:
            if flags & 1:
                assert image[pos:pos + n] == bytes(n), f"hole at {pos}+{n} is not zeroes"
            pos += n
        # With a limit (BLOCK_STATUS, REQ_ONE): that many at most, from the
        # start of the range, each as true as above.
        for limit in (1, 2):
            part = layer.extents(off, length, limit)
            assert 1 <= len(part) <= limit and 0 < sum(n for n, _ in part) <= length, part
            pos = off
            for n, flags in part:
                assert n > 0
                if flags & 1:
                    assert image[pos:pos + n] == bytes(n), f"hole at {pos}+{n} is not zeroes"
                pos += n

    # -- the secondaries ------------------------------------------------------------------

    @precondition(lambda self: self.split_names())
    @rule(data=st.data())
    def write_secondary(self, data):
        name = data.draw(st.sampled_from(self.split_names()))
        off, length, buf = self.change(data, name)
        m = self.model[name]
        m.image[off:off + length] = buf
        m.written_s |= self.regions(name, off, length)

    @precondition(lambda self: self.split_names())
    @rule(data=st.data())
    def read_secondary(self, data):
        name = data.draw(st.sampled_from(self.split_names()))
        off, length = data.draw(ranges(SIZES[name]))
        max_bytes = data.draw(st.sampled_from([1, 4096, 20000, 1 << 20]))
        got = self.read(self.env.layer(name), off, length, max_bytes)
        assert got == self.model[name].image[off:off + length]

    @precondition(lambda self: self.split_names())
    @rule(data=st.data())
    def secondary_read_fd_and_extents(self, data):
        name = data.draw(st.sampled_from(self.split_names()))
        off, length = data.draw(ranges(SIZES[name]))
        self.check_fd_and_extents(self.env.layer(name), self.model[name].image, off, length)

    @precondition(lambda self: any(m.state != S.SPLIT for m in self.model.values()))
    @rule(data=st.data())
    def secondary_not_served(self, data):
        name = data.draw(st.sampled_from([n for n, m in self.model.items() if m.state != S.SPLIT]))
        with pytest.raises(OSError) as e:
            self.env.layer(name).read(0, 512)
        assert e.value.errno == errno.EIO and name in str(e.value)

    # -- transitions -------------------------------------------------------------------------

    def did_split(self, names: list[str]) -> None:
        for n in names:
            m, pair = self.model[n], self.pair(n)
            image = bytes(self.img[PAIRS[n][0]])
            delta = pair.bm["delta"]
            if m.prev_split is None:
                assert delta.count() == pair.nregions, f"{n}: first split, delta must be all"
            else:
                rs = pair.region_size
                for r in range(pair.nregions):
                    if image[r * rs:(r + 1) * rs] != m.prev_split[r * rs:(r + 1) * rs]:
                        assert delta[r], f"{n}: region {r} changed since the last split, not in delta"
            m.prev_split = image
            m.state = S.SPLIT
            m.image = bytearray(image)
            m.written_p = set()
            m.written_s = set()
            assert pair.state == S.SPLIT

    @rule(name=st.sampled_from(sorted(PAIRS)))
    def split(self, name):
        if self.allowed(name, "split"):
            self.env.pairs.split([name])
            self.did_split([name])
        else:
            self.expect_refused(lambda: self.env.pairs.split([name]), name)

    @rule()
    def group_split(self):
        pm = self.env.pairs
        members = pm.group_members("g")
        assert members == ["s2", "s3"]
        if all(self.allowed(n, "split") for n in members):
            pm.split(members)
            self.did_split(members)
        else:
            before = {n: self.pair(n).state for n in members}
            self.expect_refused(lambda: pm.split(members), *members)
            assert {n: self.pair(n).state for n in members} == before

    @rule(name=st.sampled_from(sorted(PAIRS)))
    def resync(self, name):
        if self.allowed(name, "resync"):
            self.env.pairs.resync(name)
            self.model[name].state = S.RESYNC
            self.model[name].image = None
        else:
            self.expect_refused(lambda: self.env.pairs.resync(name), name)

    @rule(name=st.sampled_from(sorted(PAIRS)))
    def restore(self, name):
        if self.allowed(name, "restore"):
            self.env.pairs.restore(name)
            m = self.model[name]
            # P's image is S's image from now on (reads of regions not yet
            # restored are served from S).
            self.img[PAIRS[name][0]][:] = m.image
            m.state = S.RESTORE
            m.image = None
        else:
            self.expect_refused(lambda: self.env.pairs.restore(name), name)

    @precondition(lambda self: any(m.state not in (S.RESTORE, S.ERROR)
                                   for m in self.model.values()))
    @rule(data=st.data())
    def fault(self, data):
        """An I/O fault suspends a pair (not a restoring one: its P would be
        half restored, which the model cannot say)."""
        name = data.draw(st.sampled_from(sorted(
            n for n, m in self.model.items() if m.state not in (S.RESTORE, S.ERROR))))
        self.env.pairs.fail(self.pair(name), "injected fault")
        self.model[name].state = S.ERROR
        self.model[name].image = None

    @rule(name=st.sampled_from(sorted(PAIRS)), policy=st.sampled_from(READ_POLICIES))
    def set_read_policy(self, name, policy):
        self.env.pairs.set(name, read_policy=policy)
        assert self.pair(name).read_policy == policy

    @precondition(lambda self: all(self.restoring(p) is None for p in PRIMARIES))
    @rule(name=st.sampled_from(sorted(PAIRS)))
    def delete_and_recreate(self, name):
        pm = self.env.pairs
        pair = self.pair(name)
        if pair.state == S.SPLIT and pair.diff.count():
            self.expect_refused(lambda: pm.delete(name), name)
            return
        policy = pair.read_policy
        pm.delete(name)
        assert not os.path.exists(os.path.join(pm.dir, name))
        primary, group = PAIRS[name]
        pm.create(primary, name, read_policy=policy, group=group)
        self.model[name] = PairModel(S.COPY)

    # -- the copy engine ---------------------------------------------------------------------

    @rule(name=st.sampled_from(sorted(PAIRS)),
          max_bytes=st.sampled_from([1, 4096, 16384, 40000, 100000]))
    def step(self, name, max_bytes):
        self.env.engine.step(self.pair(name), max_bytes)
        self.after_engine(name)

    @rule(name=st.sampled_from(sorted(PAIRS)))
    def drain(self, name):
        pair = self.pair(name)
        self.env.engine.drain(pair)
        self.after_engine(name)
        m = self.model[name]
        files = self.files()
        primary = PAIRS[name][0]
        if m.state == S.PAIR:
            assert pair.diff.count() == 0
            assert files[name] == files[primary]
            if self.restoring(primary) is None:
                assert files[name] == self.img[primary]
        elif m.state == S.SPLIT:
            assert pair.diff.count() == 0
            assert files[name] == m.image
        else:
            assert m.state == S.ERROR, m.state

    # -- kill -9 --------------------------------------------------------------------------------

    @rule()
    def crash(self):
        self.env.crash()
        for n, m in self.model.items():
            assert self.pair(n).state == m.state, f"{n} reloaded as {self.pair(n).state}"
            assert bool(self.pair(n).reason) == (m.state == S.ERROR)

    # -- the checks -----------------------------------------------------------------------------

    def files(self) -> dict[str, bytes]:
        return {n: self.env.volumes.get(n).read(0, size) for n, size in SIZES.items()}

    @invariant()
    def consistent(self):
        if not hasattr(self, "env"):
            return
        files = self.files()
        for name, m in self.model.items():
            pair = self.pair(name)
            assert pair.state == m.state, f"{name}: {pair.state} != model {m.state}"
            primary = PAIRS[name][0]
            n, rs = pair.nregions, pair.region_size
            bits = {}
            for kind, bm in pair.bm.items():
                got = {r for r in range(n) if bm[r]}
                assert bm.count() == len(got), f"{name}.{kind}: count {bm.count()} != {len(got)}"
                # Write intent: the file holds every bit set in memory, and
                # keeps the bits cleared since the last round (lazy clears).
                assert os.pread(bm.fd, len(bm.bits) + 1, 0) == bm.file_bits(), \
                    f"{name}.{kind}: the file does not hold the bitmap"
                assert not any(bm[r] for r in bm.lazy), f"{name}.{kind}: lazy bit set"
                bits[kind] = got
            pair.describe()

            def reg(buf, r, rs=rs):
                return buf[r * rs:(r + 1) * rs]

            p_file, s_file = files[primary], files[name]
            if m.state in MIRRORING:
                for r in range(n):
                    if r not in bits["diff"]:
                        assert reg(s_file, r) == reg(p_file, r), \
                            f"{name} ({m.state}): region {r} not in diff but S != P"
            elif m.state == S.SPLIT:
                pending = bits["diff"]
                assert not pending & bits["changed_p"], f"{name}: pending & changed_p"
                assert not pending & bits["changed_s"], f"{name}: pending & changed_s"
                assert bits["changed_s"] == m.written_s, f"{name}: changed_s"
                assert bits["changed_p"] >= m.written_p, f"{name}: changed_p misses P writes"
                for r in range(n):
                    want = reg(m.image, r)
                    if r in pending:
                        assert reg(p_file, r) == want, f"{name}: pending region {r} changed on P"
                        staged = pair.staged.get(r)
                        assert staged is None or staged == want, f"{name}: staged {r} wrong"
                    else:
                        assert reg(s_file, r) == want, f"{name}: region {r} of S is wrong"
            elif m.state == S.RESTORE:
                todo, diff = bits["restore"], bits["diff"]
                assert not todo & diff, f"{name}: restore & diff"
                image = self.img[primary]
                for r in range(n):
                    got = reg(s_file, r) if r in todo else reg(p_file, r)
                    assert got == reg(image, r), f"{name}: P's image wrong in region {r}"
                    if r not in diff:
                        assert reg(s_file, r) == reg(image, r), \
                            f"{name}: region {r} not in diff but S != P's image"
            elif m.state == S.ERROR:
                assert pair.reason, f"{name}: error without a reason"
                assert pair.work_bitmap() is None
            else:
                raise AssertionError(f"{name}: unexpected state {m.state}")
        for p in PRIMARIES:
            if self.restoring(p) is None:
                assert files[p] == self.img[p], f"{p}: file differs from the model"


# A few seconds per read policy; SPLITD_MODEL_EXAMPLES=2000 for a long hunt.
SETTINGS = settings(max_examples=int(os.environ.get("SPLITD_MODEL_EXAMPLES", 40)),
                    stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class CopyOnReadMachine(PairMachine):
    initial_policy = "copy-on-read"


class StagingMachine(PairMachine):
    initial_policy = "staging"


class WaitMachine(PairMachine):
    initial_policy = "wait"


TestCopyOnRead = CopyOnReadMachine.TestCase
TestCopyOnRead.settings = SETTINGS
TestStaging = StagingMachine.TestCase
TestStaging.settings = SETTINGS
TestWait = WaitMachine.TestCase
TestWait.settings = SETTINGS
