"""The backend the NBD server talks to for every volume.

ManagedVolume has the plain volume's interface (read, write, zero, trim,
flush, extents, read_fd) and adds what the volume's pairs need: dirty
tracking and copy-on-write for a primary, read policies and fills for a
secondary. The server never branches on pair state; a volume in no pair goes
straight to the file, after two attribute checks.

A change (write, zero, trim) of a paired volume is issued only once its pairs
are ready for it (set before write, copy-on-write before the write: see
controller/durability.py). When they are not, the change is *held*: write,
zero and trim then return a Future, done when the change has been issued
(the NBD connection replies then), and the write's bytes are copied, as the
caller's buffer is reused.

It is one stable object per volume, so a connection opened before a pair was
created is tracked from the pair's first moment on.
"""
from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, Any

from volumes.volume import Volume

from . import states as st

if TYPE_CHECKING:
    from daemon.exports import Buffer

    from .durability import Durability
    from .pair import Pair

# A change held until its pairs are ready (controller/durability.py).
Held = asyncio.Future[Any]


class ClientOps:
    """Client requests served through any layer: the copy engine looks at
    whether the count moved to know if clients are active (it gives them the
    loop first)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class ManagedVolume:
    __slots__ = ("vol", "name", "primary_of", "secondary_of", "durability", "ops")

    def __init__(self, vol: Volume, durability: Durability, ops: ClientOps):
        self.vol = vol
        self.name = vol.name
        self.primary_of: list[Pair] = []        # pairs where this volume is P
        self.secondary_of: Pair | None = None   # the pair where this volume is S, if any
        self.durability = durability
        self.ops = ops

    @property
    def size(self) -> int:
        return self.vol.size

    @property
    def read_only(self) -> bool:
        return self.vol.read_only

    @property
    def streams_writes(self) -> bool:
        """Whether a WRITE may reach the volume piece by piece as its payload
        arrives. Not in a pair: a split falls "between two requests of P"
        (DESIGN.md "Split"), and a split that came while a write streamed in
        put part of a write acknowledged after it into S."""
        return not self.primary_of and self.secondary_of is None

    # -- reads ---------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | asyncio.Future[bytes]:
        self.ops.count += 1
        if self.secondary_of is not None:
            return self.secondary_of.secondary_read(offset, length)
        for pair in self.primary_of:
            data = pair.primary_read(offset, length)
            if data is not None:
                return data
        return self.vol.read(offset, length)

    def read_fd(self, offset: int, length: int) -> tuple[int, int] | None:
        # sendfile straight from the file only where the file holds the image,
        # and never from a secondary. sendfile queues references to the
        # file's page-cache pages, not their bytes: a READ of S still in the
        # socket when `pair resync` (or the full resync out of `error`)
        # rewrites S arrived complete, error 0, with P's later bytes. S's
        # replies are copies. P keeps sendfile: only writes to P change it (a
        # restore is such a write), and a reply still on its way when one
        # lands may show it, as NBD allows for requests in flight together.
        if self.secondary_of is not None:
            return None
        for pair in self.primary_of:
            if pair.primary_needs_layer(offset, length):
                return None
        return self.vol.read_fd(offset, length)

    def extents(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int]]:
        if self.secondary_of is not None:
            return self.secondary_of.secondary_extents(offset, length, limit)
        for pair in self.primary_of:
            if pair.primary_needs_layer(offset, length):
                return pair.primary_extents(offset, length, limit)
        return self.vol.extents(offset, length, limit)

    # -- changes ---------------------------------------------------------------

    def _ready(self, offset: int, length: int, write: bool = False) -> bool:
        """Are this volume's pairs ready for a change of [offset, offset+length)?
        Every pair is asked (each sets its bits now, so one round serves all);
        a restoring pair last, as its fill of P is itself a change of P that
        the other pairs must be ready for. `write`: a WRITE, which _write
        mirrors to the secondaries of mirroring pairs at once after True."""
        ready = True
        restoring = None
        for pair in self.primary_of:
            if pair.state == st.RESTORE:
                restoring = pair
                continue
            first, last = pair.regions(offset, length)
            ready = pair.primary_change_ready(first, last, write) and ready
        if restoring is not None:
            first, last = restoring.regions(offset, length)
            ready = ready and restoring.primary_change_ready(first, last)
        s = self.secondary_of
        if s is not None:
            first, last = s.regions(offset, length)
            ready = s.secondary_change_ready(first, last) and ready
        return ready

    def _change(self, offset: int, length: int, run):
        """Issue a change now if the pairs are ready, else hold it."""
        if self._ready(offset, length):
            return run()
        return self.durability.hold(lambda: self._ready(offset, length), run)

    def write(self, offset: int, data: Buffer) -> Held | None:
        """None once written; a Future if the write is held (see the module)."""
        self.ops.count += 1
        pairs = self.primary_of
        if pairs or self.secondary_of is not None:
            if len(pairs) == 1 and self.secondary_of is None and pairs[0].write_hot(offset, data):
                return None
            if not self._ready(offset, len(data), True):
                buf = bytes(data)
                return self.durability.hold(lambda: self._ready(offset, len(buf), True),
                                            lambda: self._write(offset, buf))
            if pairs:
                self._write(offset, data)
                return None
        self.vol.write(offset, data)
        return None

    def _write(self, offset: int, data: Buffer) -> None:
        """A WRITE of P, its pairs ready for it: to P's file, then to the
        secondary of every pair that mirrors (Pair.mirror_write)."""
        mirrors = [p for p in self.primary_of if p.mirrors_writes]
        if not mirrors:
            self.vol.write(offset, data)
            return
        try:
            self.vol.write(offset, data)
        except OSError:
            # P may hold part of the write: its regions are no longer known
            # to be in step with S.
            for pair in mirrors:
                pair.mirror_failed(*pair.regions(offset, len(data)))
            raise
        for pair in mirrors:
            pair.mirror_write(offset, data)

    def zero(self, offset: int, length: int, punch: bool = True,
             fast_only: bool = False) -> Held | None:
        self.ops.count += 1
        if fast_only:
            # Refused before copy-on-write or dirty bits, when already known.
            self.vol.refuse_slow_zero(punch)
        if self.primary_of or self.secondary_of is not None:
            return self._change(offset, length,
                                lambda: self.vol.zero(offset, length, punch, fast_only))
        self.vol.zero(offset, length, punch, fast_only)
        return None

    def trim(self, offset: int, length: int) -> Held | None:
        self.ops.count += 1
        if self.primary_of or self.secondary_of is not None:
            return self._change(offset, length, lambda: self.vol.trim(offset, length))
        self.vol.trim(offset, length)
        return None

    def flush(self) -> None:
        """Blocking (runs in a thread). Only the data: every bit that
        describes a write was durable before the write was issued."""
        self.vol.flush()

    # -- meta contexts ------------------------------------------------------------

    # Offered only on a secondary's export (daemon/exports.py).

    def pending_extents(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int]]:
        return self._pair_of_secondary().bitmap_extents("diff", offset, length, limit)

    def delta_extents(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int]]:
        return self._pair_of_secondary().bitmap_extents("delta", offset, length, limit)

    def _pair_of_secondary(self) -> Pair:
        pair = self.secondary_of
        if pair is None:
            raise OSError(errno.EINVAL, f"volume {self.name!r} is no longer a secondary")
        return pair
