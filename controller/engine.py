"""The copy engine: one for every pair, draining each pair's work bitmap.

What it copies depends on the pair's state (Pair.work_bitmap): diff P->S in
copy/pair/resync, pending P->S in split, the restore set S->P in restore.
Regions a reader waits on (read policy `wait`, or staged buffers) go first.

It runs as one background task on the event loop and copies in slices of at
most SLICE bytes, yielding to the loop between slices, so client requests
are served between any two slices and never wait behind a long copy. `step()`
is the same work, synchronous and deterministic, for tests.

Rate limits: a token bucket per pair (Pair.rate, bytes/s, 0 = unlimited) and
one for the whole engine (global_rate), both changeable while running.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from . import states as st
from .layers import ClientOps
from .pair import NotReady

log = logging.getLogger("splitd.engine")

SLICE = 2 * 1024 * 1024      # per step when no client is doing I/O
BUSY_SLICE = 256 * 1024      # per step while clients are doing I/O ...
BUSY_PAUSE = 0.001           # ... and then this long for them
HOLE_COST = 4096             # rate-limit charge for a region that is a hole
RATE_WINDOW = 1.0       # seconds over which copy rates are measured


class CopyEngine:
    def __init__(self, pairs: Callable[[], Iterable], on_drained: Callable, on_error: Callable,
                 global_rate: int = 0, ops: ClientOps | None = None):
        self.pairs = pairs              # () -> every Pair
        self.ops = ops if ops is not None else ClientOps()  # client requests served
        self.on_drained = on_drained    # (pair) -> None: state change when the work is done
        self.on_error = on_error        # (pair, reason) -> None
        self.global_rate = global_rate
        self.global_tokens = 0.0
        self.global_refill = time.monotonic()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.stopping = False

    # -- wiring ------------------------------------------------------------------

    def attach(self, pair) -> None:
        pair.kick = self.kick

    def kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        self.stopping = True
        if self._task is not None:
            self.kick()
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    # -- one step (sync) ------------------------------------------------------------

    def step(self, pair, max_bytes: int = SLICE) -> int:
        """Copy up to max_bytes worth of regions of one pair; returns data bytes
        copied. Handles the end of a drain (state change) and I/O errors."""
        bm = pair.work_bitmap()
        if bm is None:
            pair.urgent.clear()
            return 0
        budget = max(1, max_bytes // pair.region_size)
        copied = 0
        try:
            while pair.urgent and budget > 0:
                r = pair.urgent.pop()
                if bm[r]:
                    copied += pair.copy_regions(r, r, bm)
                    budget -= 1
            if budget > 0 and bm.count():
                r = bm.next_set(pair.cursor)
                if r is None:
                    r = bm.next_set(0)
                if r is not None:
                    last = min(r + budget - 1, pair.nregions - 1)
                    j = bm.next_clear(r, last)
                    end = last if j is None else j - 1
                    copied += pair.copy_regions(r, end, bm)
                    pair.cursor = end + 1 if end + 1 < pair.nregions else 0
        except NotReady:
            # A restore copy waits for P's other pairs (a durability round).
            return copied
        except OSError as e:
            self.on_error(pair, f"copy engine I/O error: {e}")
            return copied
        if bm.count() == 0 and pair.state in (st.COPY, st.RESYNC, st.RESTORE):
            self.on_drained(pair)
        return copied

    def drain(self, pair, max_steps: int = 1 << 30) -> None:
        """Step one pair until it has nothing to copy (tests)."""
        for _ in range(max_steps):
            bm = pair.work_bitmap()
            if bm is None or (bm.count() == 0 and not pair.urgent):
                if bm is not None and pair.state in (st.COPY, st.RESYNC, st.RESTORE):
                    state = pair.state
                    self.on_drained(pair)
                    if pair.state == state:
                        return  # not yet durably drained
                    # The new state may have work of its own (a restore leaves
                    # pending regions in the diff, copied P->S once in pair).
                    continue
                return
            self.step(pair)

    # -- the background task ------------------------------------------------------------

    async def run(self) -> None:
        # Background task: handles its own errors; one bad pair must not stop the others.
        sample_at = time.monotonic()
        sample_bytes: dict[str, int] = {}
        last_ops = self.ops.count
        while not self.stopping:
            busy = [p for p in self.pairs() if _has_work(p)]
            if not busy:
                for pair in self.pairs():
                    pair.rate_ewma = 0.0    # nothing being copied: no rate to show
                await self._sleep(None)
                sample_at = time.monotonic()
                sample_bytes.clear()
                continue
            # Clients first: while they do I/O, copy small slices and leave the
            # loop to them most of the time; at full speed when they are idle.
            ops = self.ops.count
            clients_active = ops != last_ops
            last_ops = ops
            slice_bytes = BUSY_SLICE if clients_active else SLICE
            now = time.monotonic()
            delay = 0.0
            worked = False
            for pair in busy:
                allowance, wait = self._allowance(pair, now)
                if allowance <= 0 and not pair.urgent:
                    delay = wait if not delay else min(delay, wait)
                    continue
                try:
                    before = pair.copied_regions
                    copied = self.step(pair, max(pair.region_size, min(slice_bytes, allowance)))
                    regions = pair.copied_regions - before
                except Exception:  # noqa: BLE001 -- logged, the pair goes to error
                    log.exception("copy engine failed on pair %s", pair.name)
                    self.on_error(pair, "internal error in the copy engine (see the log)")
                    continue
                # A hole costs little I/O, but not nothing: rate limits count it.
                self._spend(pair, max(copied, regions * HOLE_COST))
                sample_bytes[pair.name] = sample_bytes.get(pair.name, 0) + regions * pair.region_size
                worked = True
            if now - sample_at >= RATE_WINDOW:
                dt = now - sample_at
                for pair in self.pairs():
                    rate = sample_bytes.get(pair.name, 0) / dt
                    # The first sample stands alone; later ones are smoothed.
                    pair.rate_ewma = rate if not pair.rate_ewma else 0.5 * pair.rate_ewma + 0.5 * rate
                sample_bytes.clear()
                sample_at = now
            if worked:
                # Yield between slices; with clients active, for a while.
                await asyncio.sleep(BUSY_PAUSE if clients_active else 0)
            else:
                # Every busy pair is over its rate: sleep until tokens come back,
                # or until a kick (new work, a waiting reader, a rate change).
                await self._sleep(min(max(delay, 0.001), 1.0))

    async def _sleep(self, timeout: float | None) -> None:
        wake = self._wake
        assert wake is not None, "start() makes the event first"
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), timeout)
        except TimeoutError:
            pass

    # -- rate limits ----------------------------------------------------------------------

    def _allowance(self, pair, now: float) -> tuple[int, float]:
        """(bytes this pair may copy now, seconds until it may copy more)."""
        allowance = SLICE
        wait = 0.0
        if pair.rate:
            pair.tokens = min(pair.tokens + (now - pair.last_refill) * pair.rate,
                              max(pair.rate * 0.2, pair.region_size))
            pair.last_refill = now
            allowance = min(allowance, int(pair.tokens))
            if pair.tokens <= 0:
                wait = -pair.tokens / pair.rate + 0.001
        if self.global_rate:
            self.global_tokens = min(self.global_tokens + (now - self.global_refill) * self.global_rate,
                                     max(self.global_rate * 0.2, SLICE))
            self.global_refill = now
            allowance = min(allowance, int(self.global_tokens))
            if self.global_tokens <= 0:
                wait = max(wait, -self.global_tokens / self.global_rate + 0.001)
        return allowance, wait

    def _spend(self, pair, nbytes: int) -> None:
        if pair.rate:
            pair.tokens -= nbytes
        if self.global_rate:
            self.global_tokens -= nbytes


def _has_work(pair) -> bool:
    bm = pair.work_bitmap()
    if bm is None or pair.copy_waits():
        return False
    # A copy, resync or restore with nothing (left) to copy still needs one
    # step: the step is what moves it on to `pair`. Without this a resync of an
    # unchanged split, or a pair created on an empty primary, stayed there forever.
    if bm.count() > 0 or pair.urgent:
        return True
    if pair.state == st.RESTORE and (bm.lazy or not bm.synced()):
        # Restored, but not yet durably: the durability round kicks us after.
        return False
    return pair.state in _ENDS_WHEN_DRAINED


_ENDS_WHEN_DRAINED = (st.COPY, st.RESYNC, st.RESTORE)
