"""Errors of the backup store, named by what the caller must do next.

    common.errors.SplitdError
     +-- StoreError                 the store cannot do this; the message says why
     |    +-- KeyRefused            the key is missing, wrong, or given for a plain store:
     |    |                         give the right key file (nothing was read or written)
     |    +-- CorruptObject         an object failed its checksum, tag or format check:
     |    |                         run `verify`/`check`; the store must be repaired
     |    +-- ConcurrentSweep       a garbage collection removed chunks this backup
     |    |                         reused; nothing was committed: give the writer
     |    |                         those chunks again (e.offsets), commit again
     |    +-- ImageIncomplete       an image was written out but for the ranges of
     |                              chunks that could not be read (e.ranges,
     |                              e.chunks): the snapshot is damaged
     +-- (NotFound) ObjectMissing   an object the caller named is not in the store
     +-- (BadInput) StoreBadInput   the call itself is wrong (offset, size, policy)

Messages are one line, key fact first, and name the object or snapshot at fault.
"""
from __future__ import annotations

from common.errors import BadInput, NotFound, SplitdError


class StoreError(SplitdError):
    pass


class KeyRefused(StoreError):
    pass


class CorruptObject(StoreError):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"corrupt object {name}: {why}")
        self.name = name


class ConcurrentSweep(StoreError):
    """`offsets`: the chunks to give the writer again before committing again."""

    def __init__(self, message: str, offsets: list[int]) -> None:
        super().__init__(message)
        self.offsets = offsets


class ObjectMissing(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"missing object {name}")
        self.name = name


class StoreBadInput(BadInput):
    pass


class ImageIncomplete(StoreError):
    """A snapshot's image was written out except where chunks could not be
    read (missing, or failing their check): `ranges` (offset, length) of the
    image not written, and `chunks` {object name: why}. The snapshot is
    damaged: `verify` names every snapshot those chunks break."""

    def __init__(self, message: str, ranges: list[tuple[int, int]], chunks: dict[str, str]) -> None:
        super().__init__(message)
        self.ranges = ranges
        self.chunks = chunks
