"""Durability rounds: md's write-intent rules for every pair of the daemon.

DESIGN.md "Crash safety", as this module keeps it:

- Set before write. A change of P or S is issued to the volume's file only
  once the bits that describe it are durable (volumes/bitmap.py `intent`).
  A change whose bits are not yet durable is *held*: `hold()` queues it, a
  round syncs the bitmaps, and the change runs when its check says ready.
  One round covers every change that arrived meanwhile.
- Clear after both copies are durable. The copy engine (and copy-on-write,
  copy-on-read, staging) clears bits in memory only (`clear_lazily`). A
  round fdatasyncs the source and the target of those copies, then writes
  the clears to the bitmap files, then syncs the bitmaps: only then is a
  region durably copied.
- Copy-on-write before the write. A P write to a pending region is held until
  that region's copy and its cleared pending bit are durable (the check of
  the held write asks for exactly that).
- Lazily. In the mirroring states a copied region keeps its bit in the file
  until its whole bitmap byte (8 regions, what a write sets) has been idle
  for LAZY_DELAY seconds: a region written again meanwhile needs no new
  sync. Those clears are applied in one batch per LAZY_DELAY (each batch
  costs an fdatasync of P and S), not in every round a held write asks for.

A round, on the event loop with the blocking parts in a thread:

    1. pick the lazy clears that are due, and the files they copied between
    2. fdatasync those volumes (thread)
    3. write the clears (only those whose copy is still the one synced)
    4. fdatasync every bitmap with unsynced bytes, and the metadata store's
       WAL if a split was committed without a sync (thread)
    5. run the held changes that are now ready, in the order they came

Until start() is called (tests and tools without an event loop), rounds run
inline: a held change runs a round at once, on the caller's thread, and is
done before hold() returns.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable

from volumes.bitmap import next_copy_seq

from . import states as st

log = logging.getLogger("splitd.durability")

LAZY_DELAY = 2.0        # seconds a copied region keeps its bit while mirroring
IDLE_ROUND = 0.5        # seconds between rounds while lazy clears wait
HELD_ROUNDS = 100       # inline: rounds after which a held change gives up


class Held:
    """A change waiting for its bits: run() once ready() says so."""

    __slots__ = ("ready", "run", "future")

    def __init__(self, ready: Callable[[], bool], run: Callable[[], object], future=None):
        self.ready = ready
        self.run = run
        self.future = future


class Durability:
    def __init__(self, pairs: Callable[[], Iterable], on_fault: Callable, store=None):
        self.pairs = pairs              # () -> every Pair
        self.on_fault = on_fault        # (pair, reason): the pair goes to error
        # volumes.store.MetadataStore: its unsynced commits (splits) are synced
        # with the bitmaps in step 4, before the changes held for them run.
        self.store = store
        self.inline = True              # until start(): rounds on the caller's thread
        self.held: collections.deque[Held] = collections.deque()
        self.urgent = False             # a round is wanted now, not lazily
        # (monotonic time, copy sequence) at each round: lazy clears older than
        # a time are those with a sequence below its mark.
        self.marks: collections.deque[tuple[float, int]] = collections.deque()
        self.stopping = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.on_round: Callable[[], None] = lambda: None   # the engine's kick

    # -- holding changes ---------------------------------------------------------------

    def hold(self, ready: Callable[[], bool], run: Callable[[], object]):
        """Run `run` once `ready()` is true. Inline: now, after as many rounds
        as that takes (returns run's result). Otherwise: returns a Future of
        run's result, resolved by a later round."""
        if self.inline:
            for _ in range(HELD_ROUNDS):
                # Not `everything`: a mirrored write's bits are lazy clears
                # made before it is issued, which such a round would undo.
                self.round_now()
                if ready():
                    return run()
            raise OSError(errno.EIO, "a held write never became ready")
        fut = asyncio.get_running_loop().create_future()
        self.held.append(Held(ready, run, fut))
        self.want_round()
        return fut

    def want_round(self) -> None:
        """A round is needed soon (something waits for it)."""
        self.urgent = True
        if self.inline:
            return
        if self._wake is not None:
            self._wake.set()

    def settle(self) -> bool:
        """Inline only: a round now, on this thread. False (nothing done)
        once rounds run on the event loop."""
        if not self.inline:
            return False
        self.round_now(everything=True)
        return True

    def poke(self) -> None:
        """Copies were made that held changes may be waiting for."""
        if self.held and self._wake is not None:
            self.urgent = True
            self._wake.set()

    # -- the background task --------------------------------------------------------------

    def start(self) -> None:
        self.inline = False
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        """Stop the task, then make everything durable: every lazy clear is
        applied and every bitmap synced (a clean stop)."""
        self.stopping = True
        if self._task is not None and self._wake is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(self._task, 10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        await self.round(everything=True)
        for h in self.held:
            if h.future is not None and not h.future.done():
                h.future.set_exception(OSError(errno.ESHUTDOWN, "server is shutting down"))
        self.held.clear()

    async def run(self) -> None:
        # Background task: handles its own errors; one bad pair must not stop rounds.
        wake = self._wake
        assert wake is not None, "start() makes the event first"
        while not self.stopping:
            if not self.urgent:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), IDLE_ROUND)
                except TimeoutError:
                    pass
                if self.stopping:
                    return
                if not self.urgent and not self._lazy_waiting():
                    continue
            self.urgent = False
            try:
                worked = await self.round()
            except Exception:  # noqa: BLE001 -- logged; the next round tries again
                log.exception("durability round failed")
                worked = False
                await asyncio.sleep(0.1)
            if not worked:
                # Nothing was synced: held changes wait for copies (the
                # engine's urgent regions). Give the loop to the engine and
                # look again soon, rather than spin.
                await asyncio.sleep(0.002)
                if self.held:
                    self.urgent = True

    def _lazy_waiting(self) -> bool:
        for pair in self.pairs():
            for bm in pair.bm.values():
                if bm.lazy or not bm.synced():
                    return True
        return False

    # -- a round --------------------------------------------------------------------------

    def _cutoff(self, when: float) -> int:
        """A copy sequence such that every copy below it was made before `when`."""
        best = 0
        for t, seq in self.marks:
            if t > when:
                break
            best = seq
        return best

    def _plan(self, everything: bool):
        """Steps 1: the clears due now, per pair and bitmap, and the fds of
        the volumes their copies went between."""
        now = time.monotonic()
        self.marks.append((now, next_copy_seq()))
        while len(self.marks) > 1 and self.marks[1][0] < now - 2 * LAZY_DELAY:
            self.marks.popleft()
        due = []
        fds: dict[int, tuple] = {}
        for pair in self.pairs():
            # In the mirroring states a region copied recently keeps its bit
            # for a while (a hot region pays for one sync, not one per copy);
            # elsewhere (split, restore) writes may be waiting for the clear.
            # Nothing left to copy and no write mirrored lately: no region is
            # hot, the clears are due now.
            if pair.mirrored != pair.mirrored_seen:
                pair.mirrored_seen = pair.mirrored
                pair.mirrored_at = now
            delay = LAZY_DELAY
            if (everything or pair.state not in st.MIRRORING
                    or (pair.diff.count() == 0 and pair.mirrored_at < now - LAZY_DELAY)):
                delay = 0.0
            elif pair.cleared_at > now - LAZY_DELAY:
                # Each batch of clears costs an fdatasync of P and S, and
                # rounds come as often as writes wait for their bits: clears
                # that are not waited for go in one batch per LAZY_DELAY.
                continue
            for kind in ("diff", "restore"):
                bm = pair.bm[kind]
                if not bm.lazy:
                    continue
                if delay:
                    entries = bm.idle_clears(self._cutoff(now - delay))
                else:
                    entries = dict(bm.lazy)
                if entries:
                    if delay:
                        pair.cleared_at = now
                    due.append((pair, bm, entries))
                    for vol in (pair.primary, pair.secondary):
                        fds[id(vol)] = (pair, vol)
        return due, list(fds.values())

    def _sync_files(self, items) -> list[tuple[object, str]]:
        """fdatasync each (pair, volume-or-bitmap) on this thread; returns the
        failures as (pair, reason). Each fd is dup'ed by the caller."""
        failed = []
        for pair, what, fd in items:
            try:
                os.fdatasync(fd)
            except OSError as e:
                failed.append((pair, f"sync of {what} failed: {e}"))
            finally:
                os.close(fd)
        return failed

    def _dups(self, pairs_files) -> list:
        out = []
        for pair, what, fd in pairs_files:
            if fd >= 0:
                out.append((pair, what, os.dup(fd)))
        return out

    async def round(self, everything: bool = False) -> bool:
        """One round (see the module's docstring), its fdatasyncs in a
        thread. True if it did anything."""
        steps = self._steps(everything)
        failed = None
        try:
            while True:
                failed = await asyncio.to_thread(self._sync_files, steps.send(failed))
        except StopIteration as done:
            worked = done.value
        self.on_round()
        return worked

    def round_now(self, everything: bool = False) -> bool:
        """The same round on this thread (inline mode, tests)."""
        self.urgent = False
        steps = self._steps(everything)
        failed = None
        try:
            while True:
                failed = self._sync_files(steps.send(failed))
        except StopIteration as done:
            return done.value

    def _steps(self, everything: bool):
        """The steps of a round, for round() and round_now() alike: yields
        the files to fdatasync (dup'ed fds), is sent back the failures, and
        returns whether it did anything. Held changes whose bits only need
        syncing do not wait behind the volumes' fdatasyncs: the bitmaps are
        synced for them first."""
        worked = False
        if self.held and (yield from self._sync_bitmaps()):
            self._run_held()
            worked = True
        due, vols = self._plan(everything)
        if due:
            failed = yield self._dups([(p, f"volume {v.name}", v.fd) for p, v in vols])
            self._clears(due, failed)
            worked = True
        if (yield from self._sync_bitmaps()):
            worked = True
        self._run_held()
        return worked

    def _sync_bitmaps(self):
        """Step 4 (a sub-generator of _steps): True if any bitmap (or the
        metadata store's WAL, holding a split not yet durable) was synced."""
        bms = self._begin_bitmap_sync()
        wal = self._begin_wal_sync()
        if not bms and wal is None:
            return False
        files = self._dups([(p, f"a bitmap of pair {p.name}", bm.fd) for p, bm in bms])
        if wal is not None:
            files.append((None, "the metadata store's WAL", wal[1]))
        failed = yield files
        self._end_bitmap_sync(bms, [(p, r) for p, r in failed if p is not None])
        self._end_wal_sync(wal, [r for p, r in failed if p is None])
        return True

    def _begin_wal_sync(self):
        if self.store is None:
            return None
        try:
            return self.store.wal_sync_begin()
        except OSError as e:
            self._end_wal_sync((0, -1), [f"cannot open the metadata store's WAL: {e}"])
            return None

    def _end_wal_sync(self, wal, failed: list[str]) -> None:
        if wal is None:
            return
        if not failed:
            self.store.wal_sync_end(wal[0])
            return
        # A split that was answered cannot be made durable: the pairs it
        # moved stop (error, with the reason), rather than let a change
        # through that a power cut would leave without its split.
        for pair in self.pairs():
            if pair.row_commit and not pair.row_synced(pair.row_commit):
                self.on_fault(pair, f"the split could not be made durable: {failed[0]}")

    def _clears(self, due, failed) -> None:
        """Step 3: write the clears whose copies are now durable on both sides."""
        bad = {id(p) for p, _ in failed}
        for pair, reason in failed:
            self.on_fault(pair, reason)
        for pair, bm, entries in due:
            if id(pair) in bad or pair.bm.get("diff") is None or bm.fd < 0:
                continue
            if bm is not pair.bm["diff"] and bm is not pair.bm["restore"]:
                continue  # a newer generation replaced it meanwhile
            try:
                bm.apply_clears(entries)
            except OSError as e:
                self.on_fault(pair, f"could not write the bitmap of pair {pair.name}: {e}")

    def _begin_bitmap_sync(self):
        out = []
        for pair in self.pairs():
            for bm in pair.bm.values():
                if bm.fd >= 0 and bm.sync_begin():
                    out.append((pair, bm))
        return out

    def _end_bitmap_sync(self, bms, failed) -> None:
        bad = {id(p) for p, _ in failed}
        for pair, bm in bms:
            if id(pair) in bad:
                # Not durable: what it covers stays unsynced (held writes wait on).
                bm.unsynced |= bm.syncing
            bm.sync_end()
        for pair, reason in failed:
            self.on_fault(pair, reason)

    def _run_held(self) -> None:
        """Step 5: held changes that are ready now run, in the order they came."""
        if not self.held:
            return
        still: collections.deque[Held] = collections.deque()
        while self.held:
            h = self.held.popleft()
            fut = h.future
            if fut is not None and fut.done():
                continue        # the connection went away
            try:
                if not h.ready():
                    still.append(h)
                    continue
                result = h.run()
            except Exception as e:  # noqa: BLE001 -- the request's error, for its reply
                if fut is not None:
                    fut.set_exception(e)
                continue
            if fut is not None:
                fut.set_result(result)
        self.held = still
        if still:
            self.urgent = True
