"""What the NBD server serves: exports, looked up by name at handshake time.

An Export is the NBD server's whole view of a volume: its size, whether it is
writable, the backend that does I/O (volumes.volume.Volume or a layer over it
with the same methods), and the meta contexts it can answer BLOCK_STATUS for.
The server never looks behind this: pairs add their layers and refusals here,
not in the request path.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

import nbdwire as c
from controller.states import SECONDARY_SERVED
from volumes.volume import Volume

# What a WRITE's payload arrives as (a slice of the receive buffer, or a copy).
Buffer = bytes | bytearray | memoryview


class Backend(Protocol):
    """What the NBD server asks of an export's storage: a plain volume
    (volumes.volume.Volume) or, in the daemon, the volume's layer
    (controller.layers.ManagedVolume). A change (write, zero, trim) returns
    None once done, or a Future the server waits on before it replies (a
    pair holds the change until its write-intent bits are durable); a read
    returns the bytes, or a Future of them (read policy `wait`)."""

    @property
    def size(self) -> int: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def streams_writes(self) -> bool:
        """May a WRITE reach the storage piece by piece as its payload arrives?"""
        ...
    def read(self, offset: int, length: int) -> bytes | asyncio.Future[bytes]: ...
    def read_fd(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, offset) to sendfile the range from, or None: read() it."""
        ...
    def write(self, offset: int, data: Buffer) -> asyncio.Future[None] | None: ...
    def zero(self, offset: int, length: int, punch: bool = True,
             fast_only: bool = False) -> asyncio.Future[None] | None: ...
    def trim(self, offset: int, length: int) -> asyncio.Future[None] | None: ...
    def flush(self) -> None: ...
    def extents(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int]]: ...

# A meta context answers BLOCK_STATUS: (offset, length, limit) -> [(length,
# flags)], at most `limit` of them (0: no limit) from the start of the range.
ContextFn = Callable[[int, int, int], list[tuple[int, int]]]

BASE_ALLOCATION = c.BASE_ALLOCATION
PENDING = c.SPLITD_PENDING     # regions of a secondary not yet copied (flag 1)
DELTA = c.SPLITD_DELTA         # regions changed since the previous split (flag 1)


class ExportUnknown(Exception):
    """No export by that name (NBD_REP_ERR_UNKNOWN)."""


class ExportUnavailable(Exception):
    """The export exists but may not be opened now; the message says why."""


class Export:
    __slots__ = ("name", "backend", "size", "read_only", "description", "contexts")

    def __init__(self, name: str, backend: Backend, size: int, read_only: bool,
                 description: str = "", contexts: dict[str, ContextFn] | None = None):
        self.name = name
        self.backend = backend
        self.size = size
        self.read_only = read_only
        self.description = description
        self.contexts = contexts if contexts is not None else {BASE_ALLOCATION: backend.extents}


class VolumeExports:
    """Every volume of a VolumeManager is an export of the same name, served
    through its layer (controller.layers.ManagedVolume). A secondary is
    refused unless its pair is split. Backup snapshots served with
    `backup.serve` are exports too, read-only (controller/served.py)."""

    def __init__(self, manager, pairs, default_export: str | None = None, served=None):
        self.manager = manager
        self.pairs = pairs              # controller.pairs.PairManager
        self.default_export = default_export
        self.served = served            # controller.served.ServedSnapshots, or None

    def names(self) -> Iterable[str]:
        names = [v.name for v in self.manager.list()]
        return names + self.served.names() if self.served is not None else names

    def lookup(self, name: str) -> Export:
        if name == "" and self.default_export:
            name = self.default_export
        vol: Volume | None = self.manager.find(name)
        snap = self.served.get(name) if vol is None and self.served is not None else None
        if snap is not None:
            # A backup snapshot served from its store (controller/served.py).
            return Export(name, snap, snap.size, True,
                          description=f"splitd backup snapshot {snap.sid} (read-only)")
        why = self.served.unavailable_reason(name) if vol is None and self.served is not None \
            else None
        if why is not None:
            raise ExportUnavailable(f"served snapshot {name!r} is not available: {why}")
        if vol is None:
            raise ExportUnknown(f"no export named {name!r}" if name
                                else "no default export: give an export name")
        layer = self.pairs.layer(vol.name)
        contexts = {BASE_ALLOCATION: layer.extents}
        pair = layer.secondary_of
        if pair is not None:
            if pair.state not in SECONDARY_SERVED:
                raise ExportUnavailable(
                    f"volume {name!r} is the secondary of pair {pair.name!r} (primary "
                    f"{pair.primary.name!r}) in state {pair.state!r}: it is served only when split")
            contexts[PENDING] = layer.pending_extents
            contexts[DELTA] = layer.delta_extents
        return Export(vol.name, layer, vol.size, vol.read_only,
                      description=f"splitd volume {vol.name}", contexts=contexts)
