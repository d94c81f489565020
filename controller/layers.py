"""The backend the NBD server talks to for every volume.

ManagedVolume has the plain volume's interface (read, write, zero, trim,
flush, extents, read_fd) and adds what the volume's pairs need: dirty
tracking and copy-on-write for a primary, read policies and fills for a
secondary. The server never branches on pair state; a volume in no pair goes
straight to the file, after two attribute checks.

It is one stable object per volume, so a connection opened before a pair was
created is tracked from the pair's first moment on.
"""
from __future__ import annotations

from volumes.volume import Volume

# Client requests served through any layer: the copy engine looks at whether
# it moved to know if clients are active (it gives them the loop first).
_ops = 0


def client_ops() -> int:
    return _ops


class ManagedVolume:
    __slots__ = ("vol", "name", "primary_of", "secondary_of")

    def __init__(self, vol: Volume):
        self.vol = vol
        self.name = vol.name
        self.primary_of: list = []      # pairs where this volume is P
        self.secondary_of = None        # the pair where this volume is S, if any

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

    def read(self, offset: int, length: int):
        global _ops
        _ops += 1
        if self.secondary_of is not None:
            return self.secondary_of.secondary_read(offset, length)
        for pair in self.primary_of:
            pair.before_primary_read(offset, length)
        return self.vol.read(offset, length)

    def read_fd(self, offset: int, length: int):
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

    def extents(self, offset: int, length: int, limit: int = 0):
        if self.secondary_of is not None:
            return self.secondary_of.secondary_extents(offset, length, limit)
        for pair in self.primary_of:
            if pair.primary_needs_layer(offset, length):
                return pair.primary_extents(offset, length, limit)
        return self.vol.extents(offset, length, limit)

    # -- changes ---------------------------------------------------------------

    def _before_change(self, offset: int, length: int) -> None:
        for pair in self.primary_of:
            pair.before_primary_change(offset, length)
        if self.secondary_of is not None:
            self.secondary_of.before_secondary_change(offset, length)

    def write(self, offset: int, data) -> None:
        global _ops
        _ops += 1
        if self.primary_of or self.secondary_of is not None:
            self._before_change(offset, len(data))
        self.vol.write(offset, data)

    def zero(self, offset: int, length: int, punch: bool = True, fast_only: bool = False) -> None:
        global _ops
        _ops += 1
        if fast_only:
            # Refused before copy-on-write or dirty bits, when already known.
            self.vol.refuse_slow_zero(punch)
        if self.primary_of or self.secondary_of is not None:
            self._before_change(offset, length)
        self.vol.zero(offset, length, punch, fast_only)

    def trim(self, offset: int, length: int) -> None:
        global _ops
        _ops += 1
        if self.primary_of or self.secondary_of is not None:
            self._before_change(offset, length)
        self.vol.trim(offset, length)

    def flush(self) -> None:
        """Blocking (runs in a thread): the bitmaps that describe this volume's
        writes are made durable before the data flush completes."""
        for pair in list(self.primary_of):
            if pair.cow_count:
                # Copy-on-write put the split image of regions into S: it must
                # be durable before the bitmaps that say it is there.
                pair.secondary.flush()
            pair.sync_bitmaps()
        if self.secondary_of is not None:
            self.secondary_of.sync_bitmaps()
        self.vol.flush()

    # -- meta contexts ------------------------------------------------------------

    def pending_extents(self, offset: int, length: int, limit: int = 0):
        return self.secondary_of.bitmap_extents("diff", offset, length, limit)

    def delta_extents(self, offset: int, length: int, limit: int = 0):
        return self.secondary_of.bitmap_extents("delta", offset, length, limit)
