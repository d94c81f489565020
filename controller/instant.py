"""Instant restore: a backup snapshot restored into a new volume that is
usable at once, read-write, while the rest is copied in the background.

Design (issue 13 part 2): it is a pair in state `restore`, on the pair
machinery (DESIGN.md "Resync and restore", controller/pair.py), not beside
it. P is the new volume; S is no volume but a SnapshotSource: the snapshot,
read-only, straight from its store, through controller/served.py's
SnapshotBackend (chunks fetched, checked and decompressed in a thread pool,
never on the event loop; an LRU cache; read-ahead on sequential reads). The
restore bitmap starts as every region that overlaps a non-zero chunk: a zero
chunk has nothing to copy, and P, a new sparse file, reads zeroes there.

From then on it is a restore like any other:
- a read of P over regions still to restore copies them S->P first
  (copy-on-read, like dm-clone), then reads P;
- a write, zero or trim of P fills the regions it touches first, and is
  issued once their restore bits are durably clear;
- the copy engine copies the rest, at the pair's rate (`pair set --rate`);
- the write-intent rules hold unchanged (DESIGN.md "Crash safety",
  controller/durability.py): a restore bit is cleared in its file only
  after the copy is fdatasync'ed on P (S has no file to sync). After a
  crash at any moment a region is either durably restored (bit clear) or
  restored again (bit set, the snapshot never changes): the volume ends
  exact.

What differs from a pair of two volumes, and where:
- The bytes come from the store. SourcePair.copy_bytes takes them from the
  source's cache when every chunk they need is there; otherwise it starts
  fetching them and raises NotReady, as a restore copy that must wait does
  already: the engine leaves the pair alone while fetches are in flight
  (copy_waits; an arriving fetch kicks it), a held change of P is tried again
  after the next durability round (an arriving fetch asks for one), and a
  read of P gets a Future, answered once its regions are restored.
- A fetch that fails (a chunk missing or corrupt, the store gone) fails the
  pair: `error`, its reason naming the chunk; the reads waiting on it get
  EIO. In `error` the regions not yet restored stay unreadable and
  unwritable (EIO): P's file has zeroes there, not the snapshot's bytes, and
  serving them would be wrong bytes. A full resync cannot repair it (there is
  no volume to copy from): delete the pair and the volume, restore again.
- The pair's row names S (column `source`, JSON: store, snapshot, key file;
  schema v5) and the pair is named by P, which both volume columns hold. The
  row is committed with the volume's (one transaction): no crash leaves the
  volume without its restore.
- The store is opened, and the snapshot's index loaded and checked, in a
  thread, never on the event loop (0.2 s for 1 TiB on a local disk,
  seconds on S3): by backup.instant_restore, which checks again after the
  open and makes the volume and pair without an await in between; and at
  start, once the listeners are up (PairManager.start, _reopen). Until the
  store is open again the volume is served all the same: regions already
  restored are read and written at once, and a read or change of a region
  not yet restored waits for the store as it would for a chunk fetch
  (SnapshotSource.opening; bounded by each connection's requests and bytes
  in flight); `pair show` says `source.opening`. If the store cannot be
  opened (gone, wrong key, the snapshot forgotten) the pair goes to `error`
  with that reason and the waiting requests get EIO.
- When nothing is left and the clears are durable the pair is dissolved: its
  row removed (one transaction), then its files. The volume stands alone,
  exact. A crash before the row is gone finds a restore with nothing left at
  start and dissolves it then, without opening the store. How it ended
  (restored, or deleted) is recorded in the commit that removes the row
  (table `restores`, schema v6; gone with the volume), so that
  `backup.restore_status` says it after restarts too, and says it knows of
  no instant restore of a volume it has no record of.
- No split, resync or restore of it, and no other pair on its volume while it
  restores: P's other pairs would have restore copies wait on them, and a
  waiting restore reads S synchronously (Pair.overlay), which a store cannot.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from volumes.bitmap import Bitmap
from volumes.files import write_all

from . import states as st
from .errors import Conflict
from .pair import NotReady, Pair, _merge_by_bitmap
from .reads import Waiter
from .served import MAX_CACHE, SnapshotBackend, open_snapshot

log = logging.getLogger("splitd.instant")

# The source's chunk cache: room for what the engine and the reads of P need
# at once (it is a staging area: a restored region is read from P after).
RESTORE_CACHE = 64 << 20
# Chunks the cache holds at least, whatever the chunk size: a fetched chunk
# must stay until the copy that asked for it runs.
CACHE_CHUNKS = 8


def source_spec(store: str, snapshot: str, key_file: str | None) -> dict[str, Any]:
    """What the pair's row records of its source (column `source`)."""
    return {"kind": "snapshot", "store": store, "snapshot": snapshot, "key_file": key_file}


class SnapshotSource:
    """S of an instant restore: what Pair and the durability rounds need of
    a volume (name, size, fd -1: nothing to sync, extents), and read_now."""

    fd = -1
    read_only = True

    def __init__(self, spec: Mapping[str, Any], size: int, reason: str = "") -> None:
        self.spec = dict(spec)
        self.name = f"snapshot {spec['snapshot']}"
        self.size = size
        self.backend: SnapshotBackend | None = None
        # Why there is no backend (not yet opened, could not be opened, or
        # was not: nothing was left to restore).
        self.reason = reason
        # The store is being opened (load): reads wait for it, as for a fetch.
        self.opening = False
        self.closed = False
        self.waiting: dict[tuple[int, int], asyncio.Future[bytes]] = {}
        self.on_arrived = lambda: None            # set by SourcePair
        self.on_fault = lambda reason: None       # set by SourcePair

    async def load(self, pool: ThreadPoolExecutor) -> None:
        """Open the store and the snapshot (its manifest and index: a
        second or more for a big index in S3) in a thread, then read from
        it; the reads and copies waiting meanwhile go on (on_arrived). The
        store's errors as they are (KeyRefused, NotFound, ...), the reason
        kept. A source closed meanwhile (its pair deleted) stays closed."""
        spec = self.spec
        self.opening = True
        self.reason = "its backup store is being opened"
        try:
            store, _, index = await asyncio.to_thread(open_snapshot, spec["store"],
                                                      spec["snapshot"], spec.get("key_file"))
        except BaseException as e:
            self.opening = False
            self.reason = str(e) or type(e).__name__
            raise
        self.opening = False
        if self.closed:
            store.close()
            return
        if self.size and index.size != self.size:
            store.close()
            self.reason = (f"snapshot {spec['snapshot']} is {index.size} bytes, the volume "
                           f"{self.size}")
            raise Conflict(self.reason)
        cache = min(MAX_CACHE, max(RESTORE_CACHE, CACHE_CHUNKS * index.chunk_size))
        self.backend = SnapshotBackend(store, spec["snapshot"], index, cache, pool,
                                       asyncio.get_running_loop())
        self.size = index.size
        self.reason = ""
        self.on_arrived()

    @property
    def encrypted(self) -> bool:
        return self.backend is not None and self.backend.store.encrypted

    def restore_bits(self, nbits: int, region_size: int) -> bytes:
        """The regions to restore: every one that overlaps a non-zero chunk."""
        assert self.backend is not None
        index = self.backend.index
        cs = index.chunk_size
        bm = Bitmap(nbits)
        for first, last in index.nonzero_runs():
            end = last * cs + index.chunk_len(last)
            bm.set_range(first * cs // region_size, (end - 1) // region_size)
        return bm.copy_bits()

    def read_now(self, offset: int, length: int) -> bytes | None:
        """The snapshot's bytes if every chunk they need is in; else None,
        and they are being fetched (on_arrived is called when they are in)."""
        if self.backend is None:
            if self.opening:
                return None
            raise OSError(errno.EIO, f"{self.name} is not open: {self.reason}")
        key = (offset, length)
        if key in self.waiting:
            return None
        data = self.backend.read(offset, length)
        if isinstance(data, bytes):
            return data
        self.waiting[key] = data
        data.add_done_callback(lambda fut: self._arrived(key, fut))
        return None

    def _arrived(self, key: tuple[int, int], fut: asyncio.Future[bytes]) -> None:
        self.waiting.pop(key, None)
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.on_fault(f"instant restore failed: {why}")
        self.on_arrived()

    def extents(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int]]:
        if self.backend is None:
            return [(length, 0)]
        return self.backend.extents(offset, length, limit)

    def close(self) -> None:
        self.closed = True
        for fut in self.waiting.values():
            fut.cancel()
        self.waiting.clear()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
            self.reason = "closed"


class SourcePair(Pair):
    """A pair in `restore` whose S is a SnapshotSource (module docstring)."""

    def __init__(self, *args: Any, source: SnapshotSource, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = source
        self.secondary = source     # what copies read, and what the pair names as its S
        self.read_waiters: list[Waiter] = []
        source.on_fault = lambda reason: self.on_fault(reason)
        source.on_arrived = self._arrived

    # -- copies -----------------------------------------------------------------------

    def copy_waits(self) -> bool:
        return bool(self.source.waiting) or self.source.opening

    def copy_bytes(self, first: int, last: int, src, dst) -> int:
        """Regions first..last from the snapshot into P (NotReady while their
        chunks are fetched). All-zero regions are left as P has them: holes
        (a region to restore was never written: changes fill it first)."""
        if self.state != st.RESTORE:
            raise OSError(errno.EIO, f"pair {self.name} is in state {self.state}: nothing is "
                                     "restored from its snapshot")
        off, n = self.span(first, last)
        data = self.source.read_now(off, n)
        if data is None:
            raise NotReady
        view = memoryview(data)
        rs = self.region_size
        zero = bytes(rs)
        for pos in range(0, n, rs):
            part = view[pos:pos + rs]
            if part != zero[:len(part)]:
                write_all(self.primary.fd, part, off + pos)
        return n

    def _fill_or_queue(self, first: int, last: int, bitmap: Bitmap) -> bool:
        """Fill at most fill_limit regions of first..last per call (a large
        trim waits for several rounds, never for a fetch of all of it at
        once); True once none is left. NotReady while chunks are fetched."""
        budget = self.fill_limit
        for a, b in list(bitmap.runs(first, last)):
            b = min(b, a + budget - 1)
            self.copy_regions(a, b, bitmap)
            budget -= b - a + 1
            if budget <= 0:
                break
        return not bitmap.any_in(first, last)

    def _arrived(self) -> None:
        """Chunks came in: the engine and held changes may go on; waiting reads too."""
        self.kick()
        self.want_round()
        if self.read_waiters:
            self.retry_reads()

    # -- the data path: P -------------------------------------------------------------------

    def _unrestored(self) -> OSError:
        return OSError(errno.EIO, f"volume {self.primary.name}: region not restored "
                                  f"({self.reason})")

    def primary_change_ready(self, first: int, last: int, mirrored: bool = False) -> bool:
        if self.state == st.ERROR and self.bm["restore"].any_in(first, last):
            raise self._unrestored()
        return super().primary_change_ready(first, last, mirrored)

    def primary_needs_layer(self, offset: int, length: int) -> bool:
        if self.state not in (st.RESTORE, st.ERROR):
            return False
        return self.bm["restore"].any_in(*self.regions(offset, length))

    def primary_read(self, offset: int, length: int) -> bytes | asyncio.Future[bytes] | None:
        """Regions not yet restored are restored first (copy-on-read); while
        their chunks are fetched the read is a Future. In error: EIO."""
        if not self.primary_needs_layer(offset, length):
            return None
        if self.state == st.ERROR:
            raise self._unrestored()
        data = self._read_restored(offset, length)
        if data is not None:
            return data
        first, last = self.regions(offset, length)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.read_waiters.append(Waiter(first, last, offset, length, fut))
        return fut

    def _read_restored(self, offset: int, length: int) -> bytes | None:
        """P's bytes once the regions are restored; None while fetching."""
        restore = self.bm["restore"]
        first, last = self.regions(offset, length)
        try:
            for a, b in list(restore.runs(first, last)):
                self.copy_regions(a, b, restore)
                self.cor_count += b - a + 1
        except NotReady:
            return None
        return self.primary.read(offset, length)

    def retry_reads(self) -> None:
        """Answer the reads waiting for fetches whose regions can be restored
        (or are) now; the others wait on."""
        waiting, self.read_waiters = self.read_waiters, []
        for w in waiting:
            if w.future.done():
                continue
            if self.state != st.RESTORE:
                w.future.set_exception(self._unrestored())
                continue
            try:
                data = self._read_restored(w.offset, w.length)
            except OSError as e:
                w.future.set_exception(e)
                continue
            if data is None:
                self.read_waiters.append(w)
            else:
                w.future.set_result(data)

    def fail_waiters(self) -> None:
        super().fail_waiters()
        waiting, self.read_waiters = self.read_waiters, []
        for w in waiting:
            if not w.future.done():
                w.future.set_exception(self._unrestored())
        if self.state == st.ERROR:
            # Nothing is read from the snapshot in error: let the store and
            # the chunk cache go.
            self.source.close()
            self.source.reason = "the pair is in error"

    def primary_extents(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int]]:
        if self.state not in (st.RESTORE, st.ERROR):
            return self.primary.extents(offset, length, limit)
        return _merge_by_bitmap(self, self.bm["restore"], offset, length,
                                self.source.extents, self.primary.extents, limit)

    # -- reporting ---------------------------------------------------------------------------

    def describe(self) -> dict:
        out = super().describe()
        spec = self.source.spec
        out.update(secondary=self.source.name, kind="instant-restore",
                   source={"store": spec["store"], "snapshot": spec["snapshot"],
                           "key_file": spec.get("key_file"), "open": self.source.backend is not None,
                           "opening": self.source.opening})
        return out


def parse_source(text: str) -> dict[str, Any]:
    """The `source` column of a pair's row, checked."""
    spec = json.loads(text)
    if not isinstance(spec, dict) or spec.get("kind") != "snapshot" \
            or not isinstance(spec.get("store"), str) or not isinstance(spec.get("snapshot"), str):
        raise ValueError(f"unknown pair source {text[:200]!r}")
    return spec
