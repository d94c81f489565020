#!/usr/bin/env python3
"""kill -9 the daemon at random moments of a pair's life, under write load,
and check DESIGN.md "Crash safety" after every restart.

usage: scripts/crash.py [--rounds N] [--seed S] [--phase PHASE] [--keep] [-v]
       scripts/crash.py --power [--cut-keep F] [--lossless] ...

Each round starts a fresh daemon, fills a primary P with known blocks,
creates a pair with a low copy rate (so the kill lands mid-copy) and drives
it to one phase -- the initial copy, a split with regions still pending, a
resync, or a restore (and with --power also `pair`: mirrored, writes
flowing) -- while writer threads keep writing; or (phase `instant`) backs P
up into a store and restores it with `backup restore --instant` into a new
volume s, written and read at once. Then kill -9 at a random moment,
restart, and check:

  * the pair is in a state its phase allows, or in `error` with a reason;
  * P holds every acknowledged write (the page cache outlives kill -9);
  * split: after the copy drains, S is exactly P's image at the split plus
    S's own acknowledged writes;
  * copy / pair / resync / restore: the pair drains to `pair`, and then
    S == P (checked by splitting the quiet pair and reading S through NBD);
  * restore: P is S's image at the restore plus P's later writes;
  * instant: s reads as the snapshot plus s's writes while it restores (a
    writer checks its reads), and is exactly that once restored;
  * the daemon logged no traceback.

--power: the kill is a power cut. The data directory is on ext4 on a disk
that loses what was not flushed (harness/powerloss: cutdisk, an NBD server with
a volatile overlay, under nbdfuse and a loop device); the round tells the
disk to cut, then kills the daemon, takes the stack apart, brings it back
(ext4 replays its journal, e2fsck -fn must find it clean) and restarts the
daemon. Writers FLUSH every few dozen writes and use FUA now and then, and
the model records what a completed FLUSH / FUA made durable before the cut:
after it, a block may hold its last durable write or any write issued later,
and the checks above run on that ("P holds every write flushed before the
cut", checked again right after the restart). Failures say of each write
whether it was flushed before the cut. A third of the rounds keep a random
part of the disk's unflushed blocks (--cut-keep sets it for all). Needs root
and /dev/fuse. --lossless is the harness's own check: the daemon is stopped
and everything synced before the cut, so every round must hold.

Every 4 KiB block written carries (side, block number, generation) all over
it, so a read names exactly which write it holds. The model keeps for each
block the set of writes it may hold: the last acknowledged one, plus any
still unacknowledged (those may or may not have landed before the kill).

Prints one line per round, and at the end
    crash: N rounds, N passed, N failed
    power: N rounds, N held, N failed       (with --power; then one line per phase)
and exits non-zero if any round failed. `make crash` runs 50 kill -9 rounds
and 25 power rounds; the test suite (tests/pairs/test_crash.py,
tests/powerloss/test_powerloss.py) runs a few.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import nbd  # python3-libnbd

from harness.powerloss.stack import PowerDisk, missing_requirements
from harness.splitd import BIN, Splitd
from splitctl.client import AdminError

MiB = 1 << 20
BLOCK = 4096
REGION = 64 * 1024
SIZE = 64 * MiB
NBLOCKS = SIZE // BLOCK
RATE = 2 * MiB                  # 32 regions/s: a full copy takes ~30 s
PHASES = ("copy", "split", "resync", "restore", "instant")
# --power adds `pair`: mirrored, writes flowing (a kill -9 round may use it too).
POWER_PHASES = ("copy", "pair", "split", "resync", "restore", "instant")
ALL_PHASES = POWER_PHASES
AT_CALL_PHASES = ("split", "resync", "restore")     # phases begun by a request
POLICIES = ("copy-on-read", "staging", "wait")
# States a pair may be found in after a kill during each phase (besides error).
ALLOWED_AFTER = {
    "copy": {"copy", "pair"},
    "pair": {"pair"},
    "split": {"split"},
    "resync": {"resync", "pair"},
    "restore": {"restore", "pair"},
    # An instant restore (controller/instant.py) of P's backup into volume s:
    # its pair is named s; "restored" once it is dissolved.
    "instant": {"restore", "restored"},
}
P_SIDE, S_SIDE = 0, 1

# -- blocks ---------------------------------------------------------------------------------

# magic, side, block number, generation; repeated over the whole block.
HEADER = struct.Struct("<8sIQQ4x")
MAGIC = b"SPLITDCR"
ZERO = ("zero",)
ZERO_BLOCK = bytes(BLOCK)


def make_block(side: int, block: int, gen: int) -> bytes:
    return HEADER.pack(MAGIC, side, block, gen) * (BLOCK // HEADER.size)


def decode(data: bytes, block: int):
    """The token a block holds: (side, gen), ZERO, or ("garbage", why)."""
    if data == ZERO_BLOCK:
        return ZERO
    magic, side, num, gen = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        return ("garbage", "no block header")
    if num != block:
        return ("garbage", f"block {num}'s data")
    if data != make_block(side, num, gen):
        return ("garbage", f"torn block (header {side}/{gen})")
    return (side, gen)


def show_token(tok) -> str:
    if tok == ZERO:
        return "zero"
    if tok[0] == "garbage":
        return f"garbage: {tok[1]}"
    return f"{'PS'[tok[0]]}#{tok[1]}"


# -- the model ----------------------------------------------------------------------------------


class VolumeModel:
    """What each block of a volume may hold: a set of tokens."""

    def __init__(self, base: list[set] | None = None, durable: list[set] | None = None):
        self.lock = threading.Lock()
        self.acked: list[set] = base if base is not None else [{ZERO} for _ in range(NBLOCKS)]
        self.inflight: dict[int, set] = {}
        self.window: list | None = None
        # For a power cut (--power): what each block may hold if nothing
        # written since the last FLUSH (or FUA) covering it survives, and
        # every write issued since then (any of which may have landed).
        self.durable: list[set] = ([set(x) for x in durable] if durable is not None
                                   else [set(x) for x in self.acked])
        self.since: dict[int, set] = {}
        self.frozen = False     # set before the power cut: later flushes prove nothing
        self.acked_tokens: set = set()      # for reports: what became of each write
        self.flushed_tokens: set = set()

    def issue(self, b: int, tok) -> None:
        with self.lock:
            self.inflight.setdefault(b, set()).add(tok)
            self.since.setdefault(b, set()).add(tok)
            if self.window is not None:
                self.window.append((b, tok))

    def ack(self, b: int, tok) -> None:
        # One writer per volume: an ack supersedes every earlier write of b,
        # landed or not.
        with self.lock:
            self.acked[b] = {tok}
            self.inflight.pop(b, None)
            self.since.setdefault(b, set()).add(tok)
            self.acked_tokens.add(tok)

    def flush_done(self) -> None:
        """A FLUSH was answered: every write acknowledged before it is durable
        (the volume's one writer had nothing else in flight)."""
        with self.lock:
            if self.frozen:
                return
            for b in self.since:
                self.durable[b] = set(self.acked[b])
                self.flushed_tokens |= self.acked[b]
            self.since = {b: set(t) for b, t in self.inflight.items()}

    def fua_done(self, b: int, tok) -> None:
        """A FUA write of b was answered: b durably holds it (earlier writes of b
        are superseded, later ones are not issued yet: one writer)."""
        with self.lock:
            if self.frozen:
                return
            self.durable[b] = {tok}
            self.since.pop(b, None)
            self.flushed_tokens.add(tok)

    def freeze(self) -> None:
        """Just before the power cut: a FLUSH answered from now on may have been
        answered by a disk that no longer stores anything."""
        with self.lock:
            self.frozen = True

    def power_candidates(self) -> list[set]:
        """What each block may hold after a power cut now."""
        with self.lock:
            out = [set(s) for s in self.durable]
            for b, toks in self.since.items():
                out[b] |= toks
            for b, toks in self.inflight.items():
                out[b] |= toks
        return out

    def after_power_cut(self) -> VolumeModel:
        """The model to go on with after the restart: each block holds one of
        its power candidates, all of them durable now."""
        cands = self.power_candidates()
        return VolumeModel(cands, durable=cands)

    def candidates(self, b: int) -> set:
        with self.lock:
            return self.acked[b] | self.inflight.get(b, set())

    def all_candidates(self) -> list[set]:
        with self.lock:
            out = [set(s) for s in self.acked]
            for b, toks in self.inflight.items():
                out[b] |= toks
        return out

    def snapshot_around(self, call):
        """Run call() (a split); return (its result, the model of the image
        at that moment): what each block held when the call was sent, plus
        whatever was written while it was under way."""
        with self.lock:
            base = [set(s) for s in self.acked]
            for b, toks in self.inflight.items():
                base[b] |= toks
            self.window = []
        # After a power cut the image may hold, for each block, anything P
        # could have held then (its durable write or any later one).
        durable = self.power_candidates()
        try:
            result = call()
        finally:
            with self.lock:
                issued, self.window = self.window, None
        for b, tok in issued:
            base[b].add(tok)
            durable[b].add(tok)
        return result, VolumeModel(base, durable=durable)


GENERATIONS = itertools.count(1)
_gen_lock = threading.Lock()


def next_gen() -> int:
    with _gen_lock:
        return next(GENERATIONS)


# -- load ---------------------------------------------------------------------------------------


class Worker(threading.Thread):
    """Random 4 KiB writes (some FUA, a FLUSH now and then) to one export,
    recorded in the model; with `check_reads`, also random reads, each
    checked against the model (safe: this thread is the volume's only writer).

    Stops on stop(), or on the first NBD error (the daemon was killed, or the
    export closed): that last write stays unacknowledged in the model."""

    def __init__(self, uri: str, model: VolumeModel, side: int, rng: random.Random,
                 check_reads: bool = False, hot: range | None = None,
                 area: range | None = None, flush_every: int = 499, fua_rate: float = 0.005):
        super().__init__(daemon=True)
        self.flush_every = flush_every
        self.fua_rate = fua_rate
        self.flushes = 0
        self.explain = None     # for reports (PowerRound)
        self.uri = uri
        self.model = model
        self.side = side
        self.rng = random.Random(rng.random())
        self.check_reads = check_reads
        self.hot = hot
        self.area = area        # writes go here (and to `hot`); None: anywhere
        self.stop_flag = threading.Event()
        self.gate = threading.Condition()
        self.paused = False
        self.idle = False
        self.error: BaseException | None = None
        self.bad_reads: list[str] = []
        self.writes = 0
        self.reads = 0

    def run(self) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
        except nbd.Error as e:
            self.error = e
            return
        try:
            while not self.stop_flag.is_set():
                with self.gate:
                    while self.paused and not self.stop_flag.is_set():
                        self.idle = True
                        self.gate.notify_all()
                        self.gate.wait(0.1)
                    self.idle = False
                if self.stop_flag.is_set():
                    break
                self._one(h)
        except nbd.Error as e:
            self.error = e
        finally:
            with self.gate:
                self.idle = True
                self.gate.notify_all()
            try:
                h.close()
            except Exception:  # noqa: BLE001
                pass

    def _one(self, h) -> None:
        rng = self.rng
        if self.hot and rng.random() < 0.5:
            b = rng.choice(self.hot)
        else:
            b = rng.choice(self.area) if self.area else rng.randrange(NBLOCKS)
        if self.check_reads and rng.random() < 0.3:
            want = self.model.candidates(b)
            got = decode(h.pread(BLOCK, b * BLOCK), b)
            self.reads += 1
            # (After a power cut the daemon may read what the disk lost from
            # it; those reads prove nothing. The model is frozen before the cut.)
            if got not in want and not self.model.frozen:
                self.bad_reads.append(f"block {b}: read {_shown(got, self.explain)}, may hold "
                                      f"only {sorted(_shown(t, self.explain) for t in want)}")
            return
        tok = (self.side, next_gen())
        self.model.issue(b, tok)
        fua = rng.random() < self.fua_rate
        h.pwrite(make_block(self.side, b, tok[1]), b * BLOCK, nbd.CMD_FLAG_FUA if fua else 0)
        self.model.ack(b, tok)
        if fua:
            self.model.fua_done(b, tok)
        self.writes += 1
        if self.writes % self.flush_every == 0:
            h.flush()
            self.model.flush_done()
            self.flushes += 1

    def pause(self, timeout: float = 10.0) -> None:
        """Return once no request of ours is in flight."""
        with self.gate:
            self.paused = True
            deadline = time.monotonic() + timeout
            while not self.idle and self.is_alive():
                if time.monotonic() > deadline:
                    raise RuntimeError("writer did not pause")
                self.gate.wait(0.1)

    def resume(self) -> None:
        with self.gate:
            self.paused = False
            self.gate.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_flag.set()
        with self.gate:
            self.gate.notify_all()
        self.join(timeout)


def _window(rng: random.Random, nblocks: int) -> range:
    """A random run of nblocks blocks."""
    start = rng.randrange(NBLOCKS - nblocks + 1)
    return range(start, start + nblocks)


def prefill(uri: str, model: VolumeModel, rng: random.Random) -> None:
    """Known blocks in a quarter of P, in 1 MiB runs (the rest stays a hole)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    per_mib = MiB // BLOCK
    for mib in rng.sample(range(SIZE // MiB), SIZE // MiB // 4):
        first = mib * per_mib
        toks = [(P_SIDE, next_gen()) for _ in range(per_mib)]
        h.pwrite(b"".join(make_block(P_SIDE, first + i, t[1]) for i, t in enumerate(toks)),
                 first * BLOCK)
        for i, t in enumerate(toks):
            model.ack(first + i, t)
    h.flush()
    model.flush_done()
    h.shutdown()


# -- reading and checking ------------------------------------------------------------------------


def read_all(uri: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return b"".join(h.pread(4 * MiB, off) for off in range(0, SIZE, 4 * MiB))
    finally:
        h.shutdown()


def _shown(tok, explain) -> str:
    """A token, and with `explain` (PowerRound) what became of that write
    before the cut: [flushed], [unflushed], ..."""
    text = show_token(tok)
    if explain is not None and tok != ZERO and tok[0] != "garbage":
        text += f" [{explain(tok)}]"
    return text


def check_image(what: str, image: bytes, cands: list[set], limit: int = 5,
                explain=None) -> list[str]:
    errors = []
    bad = 0
    for b in range(NBLOCKS):
        got = decode(image[b * BLOCK:(b + 1) * BLOCK], b)
        if got not in cands[b]:
            bad += 1
            if len(errors) < limit:
                errors.append(f"{what} block {b} (region {b * BLOCK // REGION}): holds "
                              f"{_shown(got, explain)}, may hold only "
                              f"{sorted(_shown(t, explain) for t in cands[b])}")
    if bad > limit:
        errors.append(f"{what}: {bad} blocks wrong in all")
    return errors


def compare_images(a_name: str, a: bytes, b_name: str, b: bytes, limit: int = 5,
                   explain=None) -> list[str]:
    if a == b:
        return []
    errors = []
    bad = 0
    for blk in range(NBLOCKS):
        x, y = a[blk * BLOCK:(blk + 1) * BLOCK], b[blk * BLOCK:(blk + 1) * BLOCK]
        if x != y:
            bad += 1
            if len(errors) < limit:
                errors.append(f"block {blk} (region {blk * BLOCK // REGION}): {a_name} holds "
                              f"{_shown(decode(x, blk), explain)}, {b_name} holds "
                              f"{_shown(decode(y, blk), explain)}")
    errors.append(f"{a_name} != {b_name}: {bad} blocks differ")
    return errors


def wait_for(d: Splitd, what: str, cond, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    info = d.call("pair.show", name="s")
    while not cond(info):
        if time.monotonic() > deadline:
            raise RoundFailed(f"{what} not reached in {timeout:g} s; pair.show: "
                              f"{brief(info)}")
        time.sleep(0.05)
        info = d.call("pair.show", name="s")
    return info


def brief(info: dict) -> str:
    keys = ("state", "reason", "pending", "diff", "remaining", "changed_p", "changed_s",
            "to_restore", "generation")
    return "{" + ", ".join(f"{k}={info.get(k)!r}" for k in keys) + "}"


class RoundFailed(Exception):
    pass


# -- one round ------------------------------------------------------------------------------------


class Round:
    def __init__(self, number: int, seed: int, phase: str, base: Path, verbose: bool = False,
                 at_call: bool | None = None, policy: str | None = None):
        self.number = number
        self.seed = seed
        self.phase = phase
        self.rng = random.Random(seed)
        self.policy = self.rng.choice(POLICIES)
        if policy is not None:
            self.policy = policy
        self.dir = base / f"round{number:03d}-{phase}"
        self.dir.mkdir(parents=True)
        self.verbose = verbose
        self.d = Splitd(self.dir)
        self.p = VolumeModel()
        self.s: VolumeModel | None = None     # S's image while split
        self.workers: list[Worker] = []
        self.notes: list[str] = []            # what happened, for the report
        self.outcome = "?"
        # A third of the resync, restore and split rounds kill while the
        # request itself is under way, the others some time after it.
        self.at_call = phase in AT_CALL_PHASES and self.rng.random() < 0.3
        if at_call is not None:
            self.at_call = at_call and phase in AT_CALL_PHASES
        self.allowed = ALLOWED_AFTER[phase]
        self.killed_in = "?"
        self.landed = ""                      # where the kill landed, for the report
        self.p_before_restore = self.p

    @property
    def label(self) -> str:
        return self.phase + ("@call" if self.at_call else "")

    def say(self, text: str) -> None:
        self.notes.append(text)
        if self.verbose:
            print(f"  [{self.number}] {text}", flush=True)

    # How often writers FLUSH and use FUA (PowerRound: much more often).
    flush_every = 499
    fua_rate = 0.005
    # The copy rate while the kill may land; during a resync, P writes all
    # over the volume (PowerRound: faster, and P keeps to a part of it, so
    # that regions are copied, and stay copied, before the cut).
    copy_rate = RATE
    resync_writes_everywhere = True
    # What P must keep after the restart (PowerRound: only flushed writes).
    kept_writes = "acknowledged writes"
    # In reports, what became of a write (PowerRound: flushed or not before the cut).
    explain = None

    def worker(self, export: str, model: VolumeModel, side: int, **kw) -> Worker:
        kw.setdefault("flush_every", self.flush_every)
        kw.setdefault("fua_rate", self.fua_rate)
        w = Worker(self.d.uri(export), model, side, self.rng, **kw)
        w.explain = self.explain
        w.start()
        self.workers.append(w)
        return w

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop()
            if w.bad_reads:
                raise RoundFailed(f"live read of {'PS'[w.side]} after the restart "
                                  f"(killed during {self.phase}): "
                                  + "; ".join(w.bad_reads[:3]))
        self.workers = []

    def run(self) -> bool:
        try:
            self.d.start()
            self._before_kill()
            self._after_restart()
            log = self.d.log()
            if "Traceback" in log:
                raise RoundFailed("the daemon logged a traceback:\n"
                                  + log[log.index("Traceback"):][:3000])
            return True
        except RoundFailed as e:
            self.outcome = f"FAILED: {e}"
            return False
        except Exception as e:  # noqa: BLE001 -- a broken round is a failed round
            self.outcome = f"FAILED (harness): {e!r}\n{traceback.format_exc()}"
            return False
        finally:
            for w in self.workers:
                w.stop_flag.set()
            for w in self.workers:
                w.join(10)
            self.d.stop()

    # -- up to the kill ---------------------------------------------------------------

    def _before_kill(self) -> None:
        d, rng = self.d, self.rng
        d.call("volume.create", name="p", size=SIZE, region_size=REGION)
        prefill(d.uri("p"), self.p, rng)
        if self.phase == "instant":
            self._instant()
            return
        hot = _window(rng, 512)
        # During a split or a restore every P write to a region copies it at
        # once; writers keep to a part of the volume there, so regions stay
        # pending (or to restore) until the kill.
        narrow = _window(rng, NBLOCKS // 4)
        pw = self.worker("p", self.p, P_SIDE, check_reads=True, hot=hot)
        time.sleep(0.1)
        d.call("pair.create", primary="p", secondary="s", create_secondary=True,
               read_policy=self.policy, rate=self.copy_rate)
        if self.phase == "copy":
            self._kill_after(rng.uniform(0.2, 2.0))
            return
        if self.phase == "pair":
            # Mirrored, P's writes flowing: with the copy unthrottled, or at
            # the low rate so that changed regions wait to be copied.
            d.call("pair.set", name="s", rate=0)
            wait_for(d, "state pair", lambda i: i["state"] == "pair", timeout=120)
            if rng.random() < 0.5:
                d.call("pair.set", name="s", rate=self.copy_rate)
            self._kill_after(rng.uniform(0.2, 2.0))
            return
        time.sleep(rng.uniform(0.2, 0.8))
        pw.area = narrow
        if self.phase == "split" and self.at_call:
            # Kill while the split request is under way: the split happened
            # (somewhere before the kill) or it did not.
            _, self.s = self.p.snapshot_around(lambda: self._call_and_kill("pair.split"))
            self.allowed = {"copy", "split"}
            return
        info, self.s = self.p.snapshot_around(lambda: d.call("pair.split", name="s"))
        self.say(f"split with {info['pending']} pending")
        if info["state"] != "split" or info["pending"] == 0:
            raise RoundFailed(f"split answered {brief(info)}")
        sw = self.worker("s", self.s, S_SIDE, check_reads=True, area=_window(rng, NBLOCKS // 4))
        if self.phase == "split":
            self._kill_after(rng.uniform(0.1, 1.5))
            return
        time.sleep(rng.uniform(0.2, 0.6))
        sw.stop()
        if sw.bad_reads:
            raise RoundFailed("live read of S while split: " + "; ".join(sw.bad_reads[:3]))
        self.workers.remove(sw)
        if self.phase == "resync":
            if self.resync_writes_everywhere:
                pw.area = None
            if self.at_call:
                self._call_and_kill("pair.resync")
                self.allowed = {"split", "resync"}
                return
            info = d.call("pair.resync", name="s")
            self.say(f"resync with {info['remaining']} to copy")
            self._kill_after(rng.uniform(0.1, 1.5))
            return
        # restore: P becomes S's image; P writes after it land on top. The
        # writer is paused around the call so each P write is clearly before
        # (overwritten by the restore) or after it.
        pw.pause()
        self.p_before_restore = self.p
        restored = VolumeModel(self.s.all_candidates(), durable=self.s.power_candidates())
        if self.at_call:
            self.p = restored       # if the restore happened; _after_restart decides
            self._call_and_kill("pair.restore")
            self.allowed = {"split", "restore"}
            return
        info = d.call("pair.restore", name="s")
        self.p = pw.model = restored
        pw.area = _window(rng, NBLOCKS // 4)    # mostly elsewhere than the split-time writes
        pw.resume()
        self.say(f"restore with {info['to_restore']} to restore")
        self._kill_after(rng.uniform(0.1, 1.5))

    def _instant(self) -> None:
        """P (prefilled, quiet) backed up into a store, then restored with
        --instant into a new volume s (a pair named s, in restore) at the
        round's copy rate; a writer on s checks its reads; kill -9."""
        d, rng = self.d, self.rng
        store = self.dir / "store"
        env = dict(os.environ, SPLITD_ADMIN_SOCKET=str(d.admin_socket))
        for args in (["init", str(store), "--chunk-size", "1M"],
                     ["run", "--volume", d.uri("p"), "--to", str(store), "--json"]):
            cp = subprocess.run([str(BIN / "splitctl"), "backup", *args], capture_output=True,
                                text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
            if cp.returncode != 0:
                raise RoundFailed(f"backup {args[0]}: {(cp.stderr or cp.stdout).strip()}")
        sid = json.loads(cp.stdout)["snapshot"]
        # The snapshot is outside the data directory (a power cut keeps it).
        self.s = VolumeModel(self.p.all_candidates())
        info = d.call("backup.instant_restore", store=str(store), snapshot=sid, volume="s",
                      rate=self.copy_rate)
        self.say(f"instant restore with {info['remaining']} regions to restore")
        self.worker("s", self.s, S_SIDE, check_reads=True, area=_window(rng, NBLOCKS // 4))
        self._kill_after(rng.uniform(0.1, 1.5))

    def _kill_after(self, delay: float) -> None:
        time.sleep(delay)
        info = self.d.call("pair.show", name="s")
        self.say(f"kill -9 after {delay:.2f} s in {info['state']} "
                 f"(remaining {info['remaining']}, pending {info['pending']})")
        self.killed_in = info["state"]
        state = "restore" if self.phase == "instant" else self.phase
        if self.phase == "pair":
            self.landed = f"{info['remaining']} regions to copy at the kill"
        elif info["state"] != state or info["remaining"] == 0:
            self.landed = f"kill landed after the {self.phase}: {info['state']}, " \
                          f"{info['remaining']} left"
        else:
            self.landed = f"{info['remaining']} regions left at the kill"
        self._kill()

    def _call_and_kill(self, method: str) -> None:
        """Send an admin request and kill -9 within a few ms, answered or not."""
        answer: list = []

        def call() -> None:
            try:
                answer.append(self.d.call(method, name="s"))
            except AdminError as e:
                answer.append(e)

        t = threading.Thread(target=call, daemon=True)
        t.start()
        delay = self.rng.uniform(0, 0.01)
        time.sleep(delay)
        self._kill()
        t.join(10)
        got = answer[0] if answer else None
        self.killed_in = f"{method} call"
        self.landed = f"kill {delay * 1000:.1f} ms into {method}"
        self.say(f"kill -9 {delay * 1000:.1f} ms into {method}: "
                 f"{'answered ' + brief(got) if isinstance(got, dict) else 'no answer'}")

    def _kill(self) -> None:
        self.d.kill9()
        for w in self.workers:
            # A request in flight fails with the connection; a paused or idle
            # writer sees the flag.
            w.stop()
            if w.is_alive():
                raise RoundFailed("a writer hung after the kill")
            if w.bad_reads:
                raise RoundFailed(f"live read of {'PS'[w.side]} before the kill: "
                                  + "; ".join(w.bad_reads[:3]))
        self.workers = []

    # -- after the restart -----------------------------------------------------------------

    def _after_restart(self) -> None:
        d = self.d
        d.start()
        if self.phase == "instant":
            info = d.call("backup.restore_status", volume="s")
        else:
            info = d.call("pair.show", name="s")
        self.say(f"after restart: {brief(info)}")
        state = info["state"]
        if self.phase == "restore" and state == "split":
            self.p = self.p_before_restore      # the restore never happened
        if state == "error":
            if not info["reason"]:
                raise RoundFailed(f"pair in error without a reason: {brief(info)}")
            self.outcome = f"error: {info['reason']} ({self.landed})"
            if self.phase != "restore":      # a half-done restore may leave P anything
                self._check_p()
            return
        if state not in self.allowed:
            raise RoundFailed(f"killed during {self.phase} ({self.killed_in}), found in state "
                              f"{state!r} (expected {' or '.join(sorted(self.allowed))}): "
                              f"{brief(info)}")
        self._first_look(info)
        if self.phase == "instant":
            self._check_instant()
        elif state == "split":
            self._check_split()
        else:
            self._check_converges()
        self.outcome = f"ok ({self.landed}; {state} after the restart)"

    def _first_look(self, info: dict) -> None:
        """Right after the restart, before anything is written again."""

    def _check_p(self, when: str = "") -> None:
        errors = check_image("P", read_all(self.d.uri("p")), self.p.all_candidates(),
                             explain=self.explain)
        if errors:
            if self.phase == "restore" and self.p is not self.p_before_restore:
                raise RoundFailed(f"P is not S's image at the restore plus P's later "
                                  f"{self.kept_writes}{when}: " + "; ".join(errors))
            raise RoundFailed(f"P lost {self.kept_writes}{when}: " + "; ".join(errors))

    def _check_split(self) -> None:
        """S must still be the image at the split (plus S's writes), whatever
        was pending: first through the read policy, then after draining."""
        d = self.d
        self.worker("s", self.s, S_SIDE, check_reads=True, area=_window(self.rng, NBLOCKS // 4))
        self.worker("p", self.p, P_SIDE, check_reads=True, area=_window(self.rng, NBLOCKS // 4))
        time.sleep(self.rng.uniform(0.2, 0.5))
        self.stop_workers()
        errors = check_image("S (before draining)", read_all(d.uri("s")), self.s.all_candidates(),
                             explain=self.explain)
        if errors:
            raise RoundFailed("S is not the image at the split: " + "; ".join(errors))
        d.call("pair.set", name="s", rate=0)
        wait_for(d, "split with pending = 0",
                 lambda i: i["state"] == "split" and i["pending"] == 0)
        errors = check_image("S (drained)", read_all(d.uri("s")), self.s.all_candidates(),
                             explain=self.explain)
        if errors:
            raise RoundFailed("S after draining is not the image at the split: "
                              + "; ".join(errors))
        self._check_p()

    def _check_instant(self) -> None:
        """s is the snapshot plus its writes: while it restores (a writer
        reads), and once the restore is done (then it stands alone)."""
        d = self.d
        self.worker("s", self.s, S_SIDE, check_reads=True, area=_window(self.rng, NBLOCKS // 4))
        time.sleep(self.rng.uniform(0.2, 0.5))
        self.stop_workers()
        errors = check_image("s", read_all(d.uri("s")), self.s.all_candidates(),
                             explain=self.explain)
        if errors:
            raise RoundFailed("s is not the snapshot plus its writes: " + "; ".join(errors))
        try:
            d.call("pair.set", name="s", rate=0)
        except AdminError:
            pass        # done already: the reads above restored what was left
        deadline = time.monotonic() + 60
        while (info := d.call("backup.restore_status", volume="s"))["state"] != "restored":
            if info["state"] == "error" or time.monotonic() > deadline:
                raise RoundFailed(f"the instant restore did not finish: {brief(info)}")
            time.sleep(0.05)
        errors = check_image("s (restored)", read_all(d.uri("s")), self.s.all_candidates(),
                             explain=self.explain)
        if errors:
            raise RoundFailed("s once restored is not the snapshot plus its writes: "
                              + "; ".join(errors))
        self._check_p()

    def _check_converges(self) -> None:
        """The mirror finishes under load; then S == P."""
        d = self.d
        d.call("pair.set", name="s", rate=0)
        self.worker("p", self.p, P_SIDE, check_reads=True)
        time.sleep(self.rng.uniform(0.2, 0.5))
        self.stop_workers()
        wait_for(d, "state pair with nothing to copy",
                 lambda i: i["state"] == "pair" and i["remaining"] == 0)
        p_image = read_all(d.uri("p"))
        errors = check_image("P", p_image, self.p.all_candidates(), explain=self.explain)
        if errors:
            raise RoundFailed("P is wrong: " + "; ".join(errors))
        info = d.call("pair.split", name="s")     # P is quiet: S must be P
        if info["pending"]:
            raise RoundFailed(f"pair said nothing to copy, split found {info['pending']} "
                              "pending")
        errors = compare_images("P", p_image, "S", read_all(d.uri("s")), explain=self.explain)
        if errors:
            raise RoundFailed("the mirror did not converge: " + "; ".join(errors))


# -- power cuts (--power) -----------------------------------------------------------------------


class PowerRound(Round):
    """A round whose kill is a power cut: the daemon's data directory is on
    ext4 on a cutdisk (harness/powerloss), and the kill is "cut, then kill -9":
    every write the disk did not have flushed is lost (or, with `keep`, a
    random part of them survives, as from a disk that wrote back part of its
    cache before the power went), and the kernel's page cache with it.

    The writers FLUSH every few dozen writes and use FUA now and then; the
    models record which writes a completed FLUSH / FUA made durable before the
    cut. After the restart each block may hold its last durable write or any
    write issued after it; every check of Round then runs on that."""

    flush_every = 23
    fua_rate = 0.02
    copy_rate = 2 * RATE
    resync_writes_everywhere = False
    kept_writes = "writes flushed before the power cut"

    def __init__(self, number: int, seed: int, phase: str, base: Path, verbose: bool = False,
                 at_call: bool | None = None, policy: str | None = None,
                 keep: float | None = None, lossless: bool = False):
        super().__init__(number, seed, phase, base, verbose, at_call, policy)
        # The harness's own check: the daemon is stopped (SIGSTOP) and
        # everything synced before the cut, so nothing is lost and the round
        # must hold exactly as a kill -9 round does.
        self.lossless = lossless
        if lossless:
            keep = 0.0
        if keep is None:
            r = random.Random(seed ^ 0x5EED)
            keep = 0.0 if r.random() < 2 / 3 else round(r.uniform(0.2, 0.8), 2)
        self.keep = keep
        self.disk: PowerDisk | None = None

    @property
    def label(self) -> str:
        return super().label + (f"+keep{self.keep:.1f}" if self.keep else "") + \
            ("+lossless" if self.lossless else "")

    def run(self) -> bool:
        why = missing_requirements()
        if why:
            self.outcome = f"FAILED (harness): cannot build the disk: {why}"
            return False
        try:
            self.disk = PowerDisk(self.dir / "disk")
            self.disk.create()
        except Exception as e:  # noqa: BLE001
            self.outcome = f"FAILED (harness): the disk stack: {e}"
            if self.disk is not None:
                self.disk.destroy()
            return False
        self.d.data_dir = self.disk.mnt / "data"
        ok = False
        try:
            ok = super().run()
        finally:
            try:
                self.disk.destroy(keep_image_in=None if ok else self.dir)
            except Exception as e:  # noqa: BLE001
                self.notes.append(f"could not take the disk apart: {e}")
        if not ok:
            self.notes.append(f"the disk image is kept as {self.dir / 'disk.img'} "
                              "(ext4; the data directory is /data)")
        return ok

    def _models(self) -> list[VolumeModel]:
        out: dict[int, VolumeModel] = {}
        for m in (self.p, self.s, self.p_before_restore, *(w.model for w in self.workers)):
            if m is not None:
                out[id(m)] = m
        return list(out.values())

    def _kill(self) -> None:
        models = self._models()
        for m in models:
            m.freeze()
        self.cut_gen = next_gen()
        self.acked_before = set().union(*(m.acked_tokens for m in models))
        self.flushed_before = set().union(*(m.flushed_tokens for m in models))
        self.explain = self._explain
        if self.lossless:
            self.d.proc.send_signal(signal.SIGSTOP)
            subprocess.run(["sync"], check=True, timeout=120)
        dropped, kept = self.disk.cut(self.keep, seed=self.rng.randrange(1 << 32))
        self.say(f"power cut: {dropped} unflushed disk blocks lost, {kept} kept "
                 "(besides the page cache)")
        if self.lossless:
            self.d.proc.send_signal(signal.SIGCONT)
        super()._kill()             # kill -9; the writers see their connections go
        self.disk.down()

    def _explain(self, tok) -> str:
        if tok[1] >= self.cut_gen:
            return "written after the restart"
        if tok in self.flushed_before:
            return "flushed before the cut"
        if tok in self.acked_before:
            return "acknowledged, not flushed"
        return "in flight at the cut"

    def _first_look(self, info: dict) -> None:
        # Before any new write: every write flushed before the cut is on P.
        # (A pair found in error was checked so already, but after a restore.)
        self._check_p(" (right after the restart)")

    def _after_restart(self) -> None:
        conv: dict[int, VolumeModel] = {}

        def after(m: VolumeModel | None) -> VolumeModel | None:
            if m is None:
                return None
            if id(m) not in conv:
                conv[id(m)] = m.after_power_cut()
            return conv[id(m)]

        self.p, self.s, self.p_before_restore = (after(self.p), after(self.s),
                                                 after(self.p_before_restore))
        t0 = time.monotonic()
        self.disk.up()
        self.say(f"power back: journal replayed, e2fsck -fn clean, mounted "
                 f"({time.monotonic() - t0:.1f} s)")
        super()._after_restart()


def run_rounds(rounds: int, seed: int, phases=PHASES, keep: bool = False,
               verbose: bool = False, out=sys.stdout,
               base: Path | None = None, power: bool = False,
               cut_keep: float | None = None, results: list | None = None,
               lossless: bool = False
               ) -> tuple[int, list, int]:
    """Run rounds (phases in turn); returns (passed, [failed Round], rounds
    that passed with the pair in error). With power, the rounds are power
    cuts (PowerRound); `results` gets (phase, passed, outcome) per round."""
    own_base = base is None
    base = Path(tempfile.mkdtemp(prefix="splitd-power-" if power else "splitd-crash-")) \
        if own_base else base
    master = random.Random(seed)
    passed, failed, errors = 0, [], 0
    for n in range(rounds):
        phase = phases[n % len(phases)]
        rseed = master.randrange(1 << 32)
        if power:
            r = PowerRound(n + 1, rseed, phase, base, verbose, keep=cut_keep, lossless=lossless)
        else:
            r = Round(n + 1, rseed, phase, base, verbose)
        t0 = time.monotonic()
        ok = r.run()
        print(f"round {r.number:3d} {r.label:18s} policy={r.policy:12s} seed={r.seed:<10d} "
              f"{time.monotonic() - t0:5.1f}s  {r.outcome.splitlines()[0][:200]}",
              file=out, flush=True)
        if results is not None:
            results.append((phase, ok, r.outcome))
        if ok:
            passed += 1
            errors += r.outcome.startswith("error")
            if not keep:
                shutil.rmtree(r.dir, ignore_errors=True)
        else:
            failed.append(r)
            print("    " + "\n    ".join(r.notes), file=out)
            print(f"    {r.outcome}", file=out)
            print(f"    data and log kept in {r.dir}", file=out, flush=True)
    if own_base and not failed and not keep:
        shutil.rmtree(base, ignore_errors=True)
    return passed, failed, errors


def per_phase_summary(results: list, phases, prefix: str) -> list[str]:
    """One line per phase: rounds run, held (of which in error), failed."""
    lines = []
    for phase in phases:
        mine = [(ok, outcome) for ph, ok, outcome in results if ph == phase]
        if not mine:
            continue
        held = sum(ok for ok, _ in mine)
        in_error = sum(ok and outcome.startswith("error") for ok, outcome in mine)
        harness = sum(not ok and outcome.startswith("FAILED (harness)") for ok, outcome in mine)
        lines.append(f"{prefix}   {phase:8s} {len(mine):3d} run, {held:3d} held"
                     f" ({in_error} in error with a reason), {len(mine) - held:3d} failed"
                     + (f" ({harness} of them harness failures)" if harness else ""))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="rounds to run (default 20)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed for the whole run (default: random, printed)")
    ap.add_argument("--phase", choices=ALL_PHASES, action="append",
                    help="only kill during this phase (repeatable; default all, in turn)")
    ap.add_argument("--power", action="store_true",
                    help="power cuts instead of kill -9: the data directory on ext4 on a "
                         "disk that loses unflushed writes (root, /dev/fuse)")
    ap.add_argument("--cut-keep", type=float, default=None, metavar="FRACTION",
                    help="--power: the part of the disk's unflushed blocks a cut keeps "
                         "(default: none in two rounds of three, 0.2-0.8 in the others)")
    ap.add_argument("--lossless", action="store_true",
                    help="--power, the harness's own check: stop the daemon and sync before "
                         "each cut, so that nothing is lost and every round must hold")
    ap.add_argument("--keep", action="store_true", help="keep every round's data directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="say what each round does")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    args.power = args.power or args.lossless
    name = "power" if args.power else "crash"
    if args.power:
        why = missing_requirements()
        if why:
            print(f"power: skipped: {why}")
            return 0
    phases = tuple(args.phase or (POWER_PHASES if args.power else PHASES))
    print(f"{name}: seed {seed}", flush=True)
    results: list = []
    passed, failed, errors = run_rounds(args.rounds, seed, phases, args.keep, args.verbose,
                                        power=args.power,
                                        cut_keep=args.cut_keep, results=results,
                                        lossless=args.lossless)
    if errors:
        print(f"{name}: {errors} round(s) left the pair in error with a reason (allowed)")
    if args.power:
        print(f"power: {args.rounds} rounds, {passed} held, {len(failed)} failed")
        for line in per_phase_summary(results, phases, "power:"):
            print(line)
    else:
        print(f"crash: {args.rounds} rounds, {passed} passed, {len(failed)} failed")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
