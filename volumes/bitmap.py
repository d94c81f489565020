"""Region bitmaps: one bit per region, in a bytearray, mirrored to a file.

Rules kept here:
- Plain data: a bitmap of a 1 TiB volume with 64 KiB regions is 2 MiB, never
  an object per region.
- Write-through: every change is written to the backing file (pwrite of the
  changed bytes) before the call returns. The page cache outlives the
  process, so after a kill -9 the file is exactly the bitmap as it was.
  `sync()` (fdatasync) makes it survive power loss too; callers do that
  before they acknowledge a FLUSH or FUA, batching many changes in one sync.
- Bit i covers bytes [i * region_size, (i + 1) * region_size); bit order in a
  byte is little-endian (bit i is byte i // 8, mask 1 << (i % 8)).
"""
from __future__ import annotations

import errno
import os
import re

_NONZERO = re.compile(rb"[^\x00]")
_NOT_FF = re.compile(rb"[^\xff]")


class Bitmap:
    __slots__ = ("nbits", "bits", "fd", "path", "dirty_since_sync", "_count")

    def __init__(self, nbits: int, path: str | None = None):
        self.nbits = nbits
        self.bits = bytearray((nbits + 7) // 8)
        self.path = path
        self.fd = -1
        self.dirty_since_sync = False
        self._count: int | None = 0

    # -- files ----------------------------------------------------------------

    @classmethod
    def create(cls, nbits: int, path: str) -> "Bitmap":
        """A new all-clear bitmap file (sparse: O(1) whatever the size)."""
        bm = cls(nbits, path)
        bm.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(bm.fd, len(bm.bits))
        return bm

    @classmethod
    def load(cls, nbits: int, path: str) -> "Bitmap":
        bm = cls(nbits, path)
        bm.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            data = os.pread(bm.fd, len(bm.bits), 0)
            if len(data) < len(bm.bits):
                # Files are made full length and synced before they are used
                # (create + the caller's sync): a short one was damaged. Its
                # missing bits must not read as clear ("copied"); the caller
                # puts the pair in error instead.
                raise OSError(errno.EIO, f"bitmap file {path} is {len(data)} bytes, "
                                         f"expected {len(bm.bits)}")
        except BaseException:
            os.close(bm.fd)
            raise
        bm.bits[:] = data
        bm._clear_tail()
        bm._count = None
        return bm

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def sync(self) -> None:
        """Make the file durable (blocking: fdatasync)."""
        if self.fd >= 0 and self.dirty_since_sync:
            self.dirty_since_sync = False
            os.fdatasync(self.fd)

    def _write(self, first_byte: int, last_byte: int) -> None:
        if self.fd >= 0:
            os.pwrite(self.fd, memoryview(self.bits)[first_byte:last_byte + 1], first_byte)
            self.dirty_since_sync = True

    def _clear_tail(self) -> None:
        spare = len(self.bits) * 8 - self.nbits
        if spare:
            self.bits[-1] &= 0xFF >> spare

    # -- single bits ------------------------------------------------------------

    def __getitem__(self, i: int) -> bool:
        return bool(self.bits[i >> 3] & (1 << (i & 7)))

    def set(self, i: int) -> bool:
        """Set bit i; True if it was clear (and so was written through)."""
        byte, mask = i >> 3, 1 << (i & 7)
        if self.bits[byte] & mask:
            return False
        self.bits[byte] |= mask
        if self._count is not None:
            self._count += 1
        self._write(byte, byte)
        return True

    def clear(self, i: int) -> bool:
        byte, mask = i >> 3, 1 << (i & 7)
        if not self.bits[byte] & mask:
            return False
        self.bits[byte] &= ~mask & 0xFF
        if self._count is not None:
            self._count -= 1
        self._write(byte, byte)
        return True

    # -- ranges of bits -----------------------------------------------------------

    def set_range(self, first: int, last: int) -> bool:
        """Set bits first..last inclusive; True if any changed."""
        return self._update_range(first, last, True)

    def clear_range(self, first: int, last: int) -> bool:
        return self._update_range(first, last, False)

    def _update_range(self, first: int, last: int, value: bool) -> bool:
        if first == last:
            return self.set(first) if value else self.clear(first)
        b0, b1 = first >> 3, last >> 3
        before = bytes(self.bits[b0:b1 + 1])
        if b0 == b1:
            mask = ((1 << (last - first + 1)) - 1) << (first & 7)
            self.bits[b0] = (self.bits[b0] | mask) if value else (self.bits[b0] & ~mask & 0xFF)
        else:
            head = (0xFF << (first & 7)) & 0xFF
            tail = 0xFF >> (7 - (last & 7))
            if value:
                self.bits[b0] |= head
                self.bits[b1] |= tail
                self.bits[b0 + 1:b1] = b"\xff" * (b1 - b0 - 1)
            else:
                self.bits[b0] &= ~head & 0xFF
                self.bits[b1] &= ~tail & 0xFF
                self.bits[b0 + 1:b1] = bytes(b1 - b0 - 1)
        after = self.bits[b0:b1 + 1]
        if after == before:
            return False
        if self._count is not None:
            self._count += (int.from_bytes(after, "little").bit_count()
                            - int.from_bytes(before, "little").bit_count())
        self._write(b0, b1)
        return True

    def any_in(self, first: int, last: int) -> bool:
        """Is any bit in first..last set?"""
        return self.next_set(first, last) is not None

    def next_set(self, start: int, last: int | None = None) -> int | None:
        """The first set bit at or after `start` (and at most `last`), or None."""
        return self._next(start, self.nbits - 1 if last is None else last, _NONZERO, 0)

    def next_clear(self, start: int, last: int) -> int | None:
        """The first clear bit in start..last, or None if all are set."""
        return self._next(start, last, _NOT_FF, 0xFF)

    def _next(self, start: int, last: int, pattern, boring: int) -> int | None:
        # A byte equal to `boring` holds no bit we look for; the regex finds the
        # next other byte in C, so long runs cost nothing in Python.
        if start > last:
            return None
        bits = self.bits
        byte = start >> 3
        v = (bits[byte] ^ boring) >> (start & 7)
        if v:
            i = start + ((v & -v).bit_length() - 1)
            return i if i <= last else None
        m = pattern.search(bits, byte + 1, (last >> 3) + 1)
        if m is None:
            return None
        byte = m.start()
        v = bits[byte] ^ boring
        i = (byte << 3) + ((v & -v).bit_length() - 1)
        return i if i <= last else None

    def runs(self, first: int = 0, last: int | None = None):
        """Yield (start, end) inclusive runs of set bits within first..last."""
        if last is None:
            last = self.nbits - 1
        i = self.next_set(first, last)
        while i is not None:
            j = self.next_clear(i, last)
            end = last if j is None else j - 1
            yield i, end
            if j is None:
                return
            i = self.next_set(j, last)

    def count(self) -> int:
        if self._count is None:
            self._count = int.from_bytes(self.bits, "little").bit_count()
        return self._count

    # -- whole-bitmap operations ---------------------------------------------------------

    def replace_with(self, other: "Bitmap | bytes | bytearray") -> None:
        src = other.bits if isinstance(other, Bitmap) else other
        self.bits[:] = src
        self._count = None
        if self.bits:
            self._write(0, len(self.bits) - 1)

    def union_update(self, *others: "Bitmap") -> None:
        acc = int.from_bytes(self.bits, "little")
        for o in others:
            acc |= int.from_bytes(o.bits, "little")
        self.replace_with(acc.to_bytes(len(self.bits), "little"))

    def clear_all(self) -> None:
        self.bits[:] = bytes(len(self.bits))
        self._count = 0
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, len(self.bits))
            self.dirty_since_sync = True

    def copy_bits(self) -> bytes:
        return bytes(self.bits)

    def extents(self, offset: int, length: int, region_size: int, size: int,
                limit: int = 0) -> list[tuple[int, int]]:
        """[(length, flag)] over [offset, offset+length): flag 1 where the bit of
        the region is set, 0 elsewhere (for NBD meta contexts). With `limit`,
        at most that many, describing the start of the range only."""
        out: list[tuple[int, int]] = []
        end = offset + length
        pos = offset
        while pos < end and not (limit and len(out) >= limit):
            r = pos // region_size
            flag = 1 if self[r] else 0
            # Extend over following regions with the same value.
            if flag:
                j = self.next_clear(r, min(self.nbits - 1, (end - 1) // region_size))
            else:
                j = self.next_set(r, min(self.nbits - 1, (end - 1) // region_size))
            stop = end if j is None else min(end, j * region_size)
            out.append((stop - pos, flag))
            pos = stop
        return out
