"""One pair: its bitmaps, and what happens to P and S I/O in each state.

Bitmaps (one bit per region of the primary's region size):

    diff       copy/pair/resync: regions of P not yet on S.
               split: the *pending* regions (not yet copied at the split).
               restore: pending plus regions P wrote during the restore,
               all to be copied P->S once the restore is done.
    changed_p  split: regions P wrote since the split.
    changed_s  split: regions S wrote since the split.
    delta      regions changed since the previous split (all, before the first);
               exactly those since split `delta_base` when that is not None.
    restore    restore: regions still to copy S->P.

Pending is disjoint from changed_p and changed_s: a write to a pending region
on either side first fills it and clears its pending bit.

Everything here runs on the event loop thread, synchronously. A copy of a
region and the client request that needed it therefore never interleave with
another request: "copies never run under a client write to the same region"
holds by construction. The copy engine copies in small slices between requests.

Crash safety (DESIGN.md "Crash safety", controller/durability.py): a change
of P or S asks `primary_change_ready` / `secondary_change_ready` first. They
set the bits that describe it and copy what must be copied before it (pending
regions, regions still to restore), and say whether it may be issued now:
only once those bits are durably set and those copies durably done. Copies
clear their bits lazily: in memory at once, in the file after a durability
round has synced both volumes.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable

from volumes.bitmap import Bitmap
from volumes.copy import copy_range
from volumes.files import write_all

from . import states as st
from .reads import ReadStrategy, Waiter, policy_named

log = logging.getLogger("splitd.pair")
_MIRRORING = st.MIRRORING

READ_POLICIES = st.READ_POLICIES
BITMAPS = ("diff", "changed_p", "changed_s", "delta", "restore")
# Pending regions a change copies on the spot (copy-on-write, fills); a change
# over more of them has the engine copy them first, in slices, and waits.
INLINE_FILL = 32


class NotReady(Exception):
    """A restore copy into P must wait: another pair of P first needs the
    bits that describe that change of P durable."""


class Pair:
    def __init__(self, name: str, primary, secondary, state: str, read_policy: str,
                 rate: int, group: str | None, generation: int, bitmaps: dict[str, Bitmap],
                 reason: str = "", created: float = 0.0, split_at: float | None = None,
                 split_gen: int = 0, delta_base: int | None = None):
        self.name = name                # = the secondary volume's name
        self.primary = primary          # volumes.volume.Volume
        self.secondary = secondary      # volumes.volume.Volume
        self.state = state
        self.reads: ReadStrategy = policy_named(read_policy)
        self.rate = rate                # bytes/s for the copy engine; 0 = unlimited
        self.group = group
        self.generation = generation
        self.reason = reason
        self.unrecorded = False         # in error, but the error could not be recorded
        self.created = created
        self.split_at = split_at
        # Splits the pair has had, and the split_gen that the delta bitmap
        # covers the changes since (None: "all" or unknown); PairManager keeps
        # both with the state (controller/pairs.py, "Split generations").
        self.split_gen = split_gen
        self.delta_base = delta_base
        # The number of the commit that recorded the pair's current state when
        # that commit was not synced (a split, controller/pairs.py "Splits are
        # durable before anything depends on them"); 0 once it is durable.
        self.row_commit = 0
        self.row_synced: Callable[[int], bool] = lambda seq: True  # set by PairManager
        # 1 for the first split after an unclean stop: its split_gen skips one
        # number (controller/pairs.py, "Splits are durable ...").
        self.gen_skip = 0
        self.region_size = primary.region_size
        self.size = primary.size
        self.nregions = (self.size + self.region_size - 1) // self.region_size
        self.bm = bitmaps
        self.staged: dict[int, bytes] = {}
        self.staged_bytes = 0
        self.waiters: list[Waiter] = []   # reads held by policy `wait`
        self.urgent: list[int] = []     # regions readers wait for: copy these first
        self.cursor = 0                 # where the engine scans next
        self.kick = lambda: None        # set by the engine: there is work
        self.want_round = lambda: None  # set by PairManager: a durability round is needed
        self.poke = lambda: None        # set by PairManager: copies were made
        self.settle = lambda: False     # set by PairManager: a round now, if inline
        self.fill_limit = INLINE_FILL   # PairManager: no limit while rounds run inline
        self.mirrored = 0               # writes mirrored to S (counted, for durability)
        self.mirrored_seen = 0          # ... as the last durability round saw it
        self.mirrored_at = 0.0          # ... and when that round saw it change
        self.cleared_at = 0.0           # when a round last applied lazy clears made a while ago
        # set by PairManager: other pairs of the same primary
        self.siblings: Callable[[], Iterable[Pair]] = lambda: ()
        self.on_fault = lambda reason: None  # set by PairManager: suspend the pair (error)
        # Counters (since the daemon started) and progress of the current drain.
        self.cow_count = 0
        self.cor_count = 0
        self.staged_count = 0
        self.copied_regions = 0
        self.copied_bytes = 0
        self.drain_total = 0
        self.drain_done = 0
        self.rate_ewma = 0.0
        self.tokens = 0.0
        self.last_refill = time.monotonic()

    @property
    def read_policy(self) -> str:
        """The read policy's name, as stored and shown (controller/reads.py)."""
        return self.reads.name

    @read_policy.setter
    def read_policy(self, name: str) -> None:
        self.reads = policy_named(name)

    # -- shape ----------------------------------------------------------------

    @property
    def diff(self) -> Bitmap:
        return self.bm["diff"]

    def regions(self, offset: int, length: int) -> tuple[int, int]:
        rs = self.region_size
        return offset // rs, (offset + max(length, 1) - 1) // rs

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Bytes covered by regions first..last (the last region may be short)."""
        start = first * self.region_size
        return start, min((last + 1) * self.region_size, self.size) - start

    def work_bitmap(self) -> Bitmap | None:
        """What the copy engine drains in this state (None: nothing to do)."""
        if self.state == st.RESTORE:
            return self.bm["restore"]
        if self.state in (st.COPY, st.PAIR, st.RESYNC, st.SPLIT):
            return self.diff
        return None

    def copy_waits(self) -> bool:
        """Whether the copy engine must leave this pair alone for now: its
        source is still fetching what it needs (controller/instant.py; the
        fetch kicks the engine when it is in)."""
        return False

    def start_drain(self) -> None:
        """Progress counts afresh: from 0 to what this state has to copy."""
        work = self.work_bitmap()
        self.drain_total = work.count() if work is not None else 0
        self.drain_done = 0

    def use_generation(self, generation: int, bitmaps: dict[str, Bitmap]) -> None:
        """Take a new generation of bitmaps (PairManager._transition). Staged
        buffers and urgent regions were the old bitmaps' work."""
        self.bm = bitmaps
        self.generation = generation
        self.staged.clear()
        self.staged_bytes = 0
        self.urgent.clear()
        self.cursor = 0

    def copy_source_target(self):
        return (self.secondary, self.primary) if self.state == st.RESTORE else (self.primary, self.secondary)

    # -- copying regions (sync) ------------------------------------------------------

    def copy_regions(self, first: int, last: int, bitmap: Bitmap) -> int:
        """Copy regions first..last in this state's direction and clear their
        bits in `bitmap`. Staged buffers are written instead of re-reading P."""
        src, dst = self.copy_source_target()
        # A restore copy changes P: to the primary's other pairs it is a P
        # write (copy-on-write of their pending regions, dirty tracking),
        # issued only once they are ready for it. (Every pair of P has P's
        # region size: the same regions.)
        if (dst is self.primary and not self._siblings_ready(first, last)
                and (not self.settle() or not self._siblings_ready(first, last))):
            raise NotReady
        copied = self.copy_bytes(first, last, src, dst)
        # In memory now; in the file once both copies are durable.
        bitmap.clear_lazily(first, last)
        n = last - first + 1
        self.copied_regions += n
        self.copied_bytes += copied
        self.drain_done += n
        if self.waiters:
            self.wake_waiters()
        self.poke()
        return copied

    def copy_bytes(self, first: int, last: int, src, dst) -> int:
        """The bytes of regions first..last, from src to dst (staged buffers
        instead of src where there are some); returns data bytes copied.
        NotReady if they cannot be copied yet (controller/instant.py)."""
        copied = 0
        r = first
        while r <= last:
            buf = self.staged.pop(r, None) if self.staged else None
            if buf is not None:
                self.staged_bytes -= len(buf)
                off, _ = self.span(r, r)
                write_all(dst.fd, buf, off)
                copied += len(buf)
                r += 1
                continue
            # A run of regions with nothing staged: one copy.
            end = r
            while end < last and not (self.staged and (end + 1) in self.staged):
                end += 1
            off, length = self.span(r, end)
            copied += copy_range(src, dst, off, length, self.region_size)
            r = end + 1
        return copied

    def _siblings_ready(self, first: int, last: int) -> bool:
        ready = True
        for other in self.siblings():
            ready = other.primary_change_ready(first, last) and ready
        return ready

    def fill_pending(self, first: int, last: int) -> int:
        """Copy every pending region in first..last P->S now (copy-on-write,
        copy-on-read, or filling before an S write). Returns regions filled."""
        pending = self.diff
        filled = 0
        for a, b in list(pending.runs(first, last)):
            self.copy_regions(a, b, pending)
            filled += b - a + 1
        return filled

    # -- the data path: primary -----------------------------------------------------------

    def _fill_or_queue(self, first: int, last: int, bitmap: Bitmap) -> bool:
        """Copy the regions of first..last set in `bitmap` (pending, or still
        to restore) now; or, if there are many (a large TRIM), have the engine
        copy them first, in slices, and say False: the change waits."""
        runs = []
        n = 0
        for a, b in bitmap.runs(first, last):
            runs.append((a, b))
            n += b - a + 1
            if n > self.fill_limit:
                self.urgent.extend(r for a2, b2 in bitmap.runs(first, last)
                                   for r in range(a2, b2 + 1))
                self.kick()
                return False
        filled = 0
        for a, b in runs:
            self.copy_regions(a, b, bitmap)
            filled += b - a + 1
        if bitmap is self.diff:
            self.cow_count += filled
        return True

    def primary_change_ready(self, first: int, last: int, mirrored: bool = False) -> bool:
        """A write, zero or trim of P is about to land on regions first..last:
        set the bits that describe it and copy what must be copied first.
        True once the change may be issued (its bits durably set, its copies
        durably done); otherwise ask again after a durability round.
        `mirrored`: the change is a WRITE that the caller also writes to S
        if the pair mirrors (see mirror_write), at once after this says True."""
        state = self.state
        if mirrored and state in st.MIRRORING:
            # copy, pair, resync, a WRITE: it goes to S too (mirror_write), as
            # md and DRBD mirror a write, so a region that was in step stays
            # in step and the engine has nothing to copy. Its bit is set in
            # the file only, as a copy made now, cleared lazily once both
            # copies are durable; regions still to copy keep their bits.
            self.mirrored += 1     # its lazy clears wait (durability)
            if (self.diff.intent_mirrored(first, last)
                    and self.bm["delta"].intent(first, last)):
                return True
            self.want_round()
            return False
        if state == st.SPLIT:
            pending = self.diff
            if pending.any_in(first, last):
                try:
                    if not self._fill_or_queue(first, last, pending):
                        return False
                except OSError as e:
                    # S cannot take the split image (its disk is full, say):
                    # suspend the pair, not the primary. Failing the P write
                    # instead failed every later P write there too. on_fault
                    # raises if the error cannot be recorded: then the write
                    # that would break the pair is refused.
                    self.on_fault(f"copy-on-write to {self.secondary.name} failed: {e}")
                    return True
            # Copy-on-write before the write: the copy and its cleared pending
            # bit durable first, or a restart would copy this write into S.
            ready = not pending.lazy_in(first, last)
            ready = self.bm["changed_p"].intent(first, last) and ready
            ready = self.split_durable() and ready
        elif state == st.RESTORE:
            restore = self.bm["restore"]
            ready = True
            if restore.any_in(first, last):
                # P must hold the restored bytes before this write lands on them.
                try:
                    ready = self._fill_or_queue(first, last, restore)
                except NotReady:
                    ready = False
            ready = not restore.lazy_in(first, last) and ready
            ready = self.diff.intent(first, last) and ready
            ready = self.bm["delta"].intent(first, last) and ready
        elif state == st.ERROR:
            if self.unrecorded:
                # The error is known only in memory: a restart would find the
                # pair as it was, and this write would break it. Try again to
                # record it; refuse the write while that fails.
                self.on_fault(self.reason)
                if self.unrecorded:
                    raise OSError(errno.ENOSPC, f"pair {self.name} failed ({self.reason}) "
                                                "and the failure cannot be recorded: writes to "
                                                f"{self.primary.name} are refused until it can")
            return True  # only a full resync leaves error: nothing to track
        else:
            # copy, pair, resync, a zero or trim: the engine copies the
            # regions. The intent covers the whole bitmap byte (8 regions):
            # one sync then serves the changes of its neighbours too, as md's
            # coarse write-intent chunks do; the engine copies those regions
            # again, which changes nothing on S.
            diff = self.diff
            before = diff.count()
            ready = diff.intent(first & ~7, min(last | 7, self.nregions - 1))
            ready = self.bm["delta"].intent(first, last) and ready
            if diff.count() != before:
                self.drain_total += diff.count() - before
                self.kick()
        if not ready:
            self.want_round()
        return ready

    @property
    def mirrors_writes(self) -> bool:
        """Whether a WRITE of P goes to S too (primary_change_ready, mirrored)."""
        return self.state in st.MIRRORING

    def write_hot(self, offset: int, data) -> bool:
        """The hot path of a WRITE of P (ManagedVolume.write), when this is
        P's only pair: mirroring, within one region that is in step with S
        and was written lately (its bits durably set in the file already).
        Then write P and S and say True; otherwise do nothing and say False
        (the general path: primary_change_ready, then mirror_write)."""
        if self.state not in _MIRRORING:
            return False
        rs = self.region_size
        r = offset // rs
        n = len(data)
        if (offset + n - 1) // rs != r:
            return False
        bm = self.bm
        if not bm["delta"].durably_set(r) or not bm["diff"].rewrite_copied(r):
            return False
        self.mirrored += 1
        # os.pwrite at once (a short write, rare, goes through Volume.write).
        try:
            if os.pwrite(self.primary.fd, data, offset) != n:
                self.primary.write(offset, data)
        except OSError:
            self.mirror_failed(r, r)
            raise
        try:
            if os.pwrite(self.secondary.fd, data, offset) != n:
                self.secondary.write(offset, data)
        except OSError as e:
            self._mirror_write_failed(r, r, e)
        return True

    def mirror_write(self, offset: int, data) -> None:
        """A WRITE of P just issued (P's file has it): write it to S too.
        Regions whose S copy is not exact after this (a failed write of S, a
        region still to copy anyway) keep or get their bits in memory: the
        engine copies them."""
        first, last = self.regions(offset, len(data))
        diff = self.diff
        if diff.next_clear(first, last) is None:
            return      # every region is to be copied anyway
        try:
            self.secondary.write(offset, data)
        except OSError as e:
            self._mirror_write_failed(first, last, e)

    def _mirror_write_failed(self, first: int, last: int, e: OSError) -> None:
        log.warning("pair %s: mirror write to %s failed (%s); the engine copies the regions",
                    self.name, self.secondary.name, e)
        self.mirror_failed(first, last)

    def mirror_failed(self, first: int, last: int) -> None:
        """P's or S's half of a mirrored write failed: S may differ from P on
        first..last; have the engine copy the regions (their bits are set in
        the file already)."""
        diff = self.diff
        before = diff.count()
        diff.set_range(first, last)
        self.drain_total += diff.count() - before
        self.kick()

    def primary_read(self, offset: int, length: int) -> bytes | asyncio.Future[bytes] | None:
        """During a restore, P regions not yet restored come from S: copied
        into P first (copy-on-read), or, while P's other pairs are not ready
        for that change of P, read from S as they are. None: read P's file."""
        if self.state != st.RESTORE:
            return None
        first, last = self.regions(offset, length)
        restore = self.bm["restore"]
        if not restore.any_in(first, last):
            return None
        try:
            for a, b in list(restore.runs(first, last)):
                self.copy_regions(a, b, restore)
                self.cor_count += b - a + 1
        except NotReady:
            return self.overlay(offset, length, restore, self.primary, self.secondary)
        return None

    def overlay(self, offset: int, length: int, bitmap: Bitmap, base, top) -> bytes:
        """Bytes of `base` over [offset, offset+length), with those of `top`
        where the region's bit in `bitmap` is set."""
        first, last = self.regions(offset, length)
        out = bytearray(base.read(offset, length))
        for a, b in bitmap.runs(first, last):
            lo, n = self.span(a, b)
            lo, hi = max(offset, lo), min(offset + length, lo + n)
            out[lo - offset:hi - offset] = top.read(lo, hi - lo)
        return bytes(out)

    def primary_needs_layer(self, offset: int, length: int) -> bool:
        if self.state != st.RESTORE:
            return False
        first, last = self.regions(offset, length)
        return self.bm["restore"].any_in(first, last)

    # -- the data path: secondary (served only in split) ---------------------------------

    def check_secondary_served(self) -> None:
        if self.state not in st.SECONDARY_SERVED:
            raise OSError(errno.EIO, f"pair {self.name} is in state {self.state}: "
                                     "the secondary is not served")

    def secondary_change_ready(self, first: int, last: int) -> bool:
        """As primary_change_ready, for a change of S (served only in split)."""
        self.check_secondary_served()
        pending = self.diff
        # Fill from P first: a partial write must land on the split image.
        if pending.any_in(first, last) and not self._fill_or_queue(first, last, pending):
            self.want_round()
            return False
        ready = not pending.lazy_in(first, last)
        ready = self.bm["changed_s"].intent(first, last) and ready
        ready = self.split_durable() and ready
        if not ready:
            self.want_round()
        return ready

    def split_durable(self) -> bool:
        """Is the split this pair is in durably recorded? A change of P or S
        after a split waits for it: until then a power cut may take the pair
        back to its state before the split, which only holds while nothing
        has changed since (controller/pairs.py)."""
        if self.row_commit and self.row_synced(self.row_commit):
            self.row_commit = 0
        return not self.row_commit

    def secondary_read(self, offset: int, length: int) -> bytes | asyncio.Future[bytes]:
        """Bytes of S's image, or a Future of them (read policy `wait`)."""
        self.check_secondary_served()
        first, last = self.regions(offset, length)
        if not self.diff.any_in(first, last):
            return self.secondary.read(offset, length)
        return self.reads.read(self, offset, length, first, last)

    def wake_waiters(self) -> None:
        """Reply to the held reads (policy `wait`) whose regions are copied."""
        pending = self.diff
        still = []
        for w in self.waiters:
            fut = w.future
            if fut.done():
                continue
            if self.state != st.SPLIT:
                fut.set_exception(OSError(errno.EIO, f"pair {self.name} left split"))
            elif pending.any_in(w.first, w.last):
                still.append(w)
            else:
                try:
                    fut.set_result(self.secondary.read(w.offset, w.length))
                except OSError as e:
                    fut.set_exception(e)
        self.waiters = still

    def fail_waiters(self) -> None:
        for w in self.waiters:
            if not w.future.done():
                w.future.set_exception(OSError(errno.EIO, f"pair {self.name} left split"))
        self.waiters = []

    # -- meta contexts ------------------------------------------------------------------------

    def bitmap_extents(self, name: str, offset: int, length: int,
                       limit: int = 0) -> list[tuple[int, int]]:
        return self.bm[name].extents(offset, length, self.region_size, self.size, limit)

    def secondary_extents(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int]]:
        """base:allocation of S's image: P's allocation where still pending."""
        return _merge_by_bitmap(self, self.diff, offset, length,
                                self.primary.extents, self.secondary.extents, limit)

    def primary_extents(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int]]:
        if self.state != st.RESTORE:
            return self.primary.extents(offset, length, limit)
        return _merge_by_bitmap(self, self.bm["restore"], offset, length,
                                self.secondary.extents, self.primary.extents, limit)

    # -- reporting ---------------------------------------------------------------------------------

    def describe(self) -> dict:
        work = self.work_bitmap()
        remaining = work.count() if work is not None else 0
        eta = None
        if remaining and self.rate_ewma > 0:
            eta = round(remaining * self.region_size / self.rate_ewma, 1)
        return {
            "name": self.name,
            "primary": self.primary.name,
            "secondary": self.secondary.name,
            "state": self.state,
            "reason": self.reason,
            "group": self.group,
            "read_policy": self.read_policy,
            "rate": self.rate,
            "region_size": self.region_size,
            "regions": self.nregions,
            "pending": self.diff.count() if self.state == st.SPLIT else 0,
            "diff": self.diff.count(),
            "changed_p": self.bm["changed_p"].count(),
            "changed_s": self.bm["changed_s"].count(),
            "delta": self.bm["delta"].count(),
            "to_restore": self.bm["restore"].count(),
            "remaining": remaining,
            "progress": {"done": self.drain_done,
                         "total": max(self.drain_total, self.drain_done + remaining)},
            "copy_rate": round(self.rate_ewma),
            "eta_s": eta,
            "copy_on_write": self.cow_count,
            "copy_on_read": self.cor_count,
            "staged": self.staged_count,
            "copied_regions": self.copied_regions,
            "copied_bytes": self.copied_bytes,
            "generation": self.generation,
            "created": self.created,
            "split_at": self.split_at,
            "split_gen": self.split_gen,
            "delta_base": self.delta_base,
        }


def _merge_by_bitmap(pair: Pair, bitmap: Bitmap, offset: int, length: int, fn_set, fn_clear,
                     limit: int = 0):
    """Extents over a range, taken from fn_set where the region's bit is set
    and from fn_clear elsewhere. With `limit`: at most that many, from at
    most that many runs of the bitmap (runs whose extents merge would
    otherwise be walked to the end of the range), describing its start."""
    out: list[tuple[int, int]] = []
    for part_len, flag in bitmap.extents(offset, length, pair.region_size, pair.size, limit):
        # One more than the room left: the first may merge with the last one.
        room = limit - len(out) + 1 if limit else 0
        covered = 0
        for ext in (fn_set if flag else fn_clear)(offset, part_len, room):
            covered += ext[0]
            if out and out[-1][1] == ext[1]:
                out[-1] = (out[-1][0] + ext[0], ext[1])
            else:
                out.append(ext)
        offset += part_len
        if limit and (len(out) >= limit or covered < part_len):
            return out[:limit]   # a prefix of the range, without a gap
    return out
