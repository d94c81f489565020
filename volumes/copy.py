"""Sparse copy of a byte range between two files (DESIGN.md "Copy engine").

The copy engine, copy-on-write and copy-on-read copy regions with
`copy_range`; so will restoring a volume from a backup file. A hole in the
source never becomes written data in the target: it becomes a hole (or, inside
a grain that starts with data, zeroes).
"""
from __future__ import annotations

import errno
import os
from typing import Protocol

from volumes.files import write_all


class SparseSource(Protocol):
    """What copy_range reads: an open file (a Volume, say)."""

    fd: int


class SparseTarget(Protocol):
    """What copy_range writes: an open file that can punch holes (a Volume)."""

    fd: int

    def zero(self, offset: int, length: int, punch: bool = True) -> None: ...


def copy_range(src: SparseSource, dst: SparseTarget, offset: int, length: int,
               grain: int = 65536) -> int:
    """Copy bytes [offset, offset+length) of `src` to the same offsets of
    `dst`, keeping holes at `grain` granularity; returns the data bytes
    copied (holes not counted).

    - A stretch of `src` with no data is punched in `dst` (dst.zero, punch).
    - A grain (`grain`-aligned block, the region size for pairs) that starts
      with data is copied whole: a hole inside it becomes zeroes in `dst`.
    - Data is copied with copy_file_range(2) where the two files allow it
      (no bytes through user space, reflinks where the filesystem has them),
      else with pread/pwrite. A source shorter than the range reads as zeroes.
    - Errors are OSError as the storage gave them; what was copied before an
      error stays copied.

    Only SEEK_DATA is used, never SEEK_HOLE: on tmpfs SEEK_HOLE walks every
    page up to the next hole (10-20 ms in a full 1 GiB file), while SEEK_DATA
    answers at once when there is data at the offset.
    """
    end = offset + length
    pos = offset
    copied = 0
    fd = src.fd
    while pos < end:
        data = _next_data(fd, pos, end)
        if data > pos:
            dst.zero(pos, data - pos, punch=True)
            pos = data
            continue
        # Data at pos: extend over following grains that start with data.
        stop = min(end, (pos // grain + 1) * grain)
        while stop < end and _next_data(fd, stop, end) == stop:
            stop = min(end, stop + grain)
        _copy_data(fd, dst.fd, pos, stop - pos)
        copied += stop - pos
        pos = stop
    return copied


def _next_data(fd: int, pos: int, end: int) -> int:
    """The first offset >= pos holding data, or `end` if none before it."""
    try:
        return min(os.lseek(fd, pos, os.SEEK_DATA), end)
    except OSError as e:
        if e.errno != errno.ENXIO:  # ENXIO: no data from pos to the end of file
            raise
        return end


# False once copy_file_range(2) failed for a reason that will not go away
# (another filesystem, no kernel support): pread/pwrite from then on.
_copy_file_range_ok = hasattr(os, "copy_file_range")


def _copy_data(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    global _copy_file_range_ok
    end = offset + length
    while offset < end:
        if _copy_file_range_ok:
            try:
                n = os.copy_file_range(src_fd, dst_fd, end - offset, offset, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                _copy_file_range_ok = False
                continue
            if n == 0:
                # Source shorter than expected: the rest reads as zeroes.
                write_all(dst_fd, bytes(end - offset), offset)
                return
        else:
            data = os.pread(src_fd, min(end - offset, 4 << 20), offset)
            if not data:
                data = bytes(min(end - offset, 4 << 20))
            n = write_all(dst_fd, data, offset)
        offset += n
