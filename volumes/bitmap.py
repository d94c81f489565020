"""Region bitmaps: one bit per region, in a bytearray, mirrored to a file.

Rules kept here (md's write-intent bitmap, DESIGN.md "Crash safety"):
- Plain data: a bitmap of a 1 TiB volume with 64 KiB regions is 2 MiB, never
  an object per region.
- The file is what a restart sees. A set is written through at once (pwrite
  of the changed byte); it is *durable* once a later fdatasync has finished.
  `intent()` sets bits and says whether they are durably set: the caller
  issues the write they cover only then ("set before write").
- A clear is never written through. `clear_lazily()` clears the bit in memory
  only and remembers the region in `lazy`; the file keeps the bit set (the
  region is copied again after a crash, which is harmless) until the caller
  has made the copy durable on both sides and calls `apply_clears()`
  ("clear after both copies are durable"). Every byte written to the file is
  `bits | lazy`, so a set of a neighbouring bit never writes a clear early.
- Durability is tracked per byte of the file: `unsynced` holds the bytes
  written since the last sync began, `syncing` those of the sync under way
  (sync_begin / sync_end around an fdatasync in another thread).
- The file is allocated in full when it is made (fallocate), so a set never
  needs a new block: a full disk fails at pair creation, not in a write.
- Bit i covers bytes [i * region_size, (i + 1) * region_size); bit order in a
  byte is little-endian (bit i is byte i // 8, mask 1 << (i % 8)).
"""
from __future__ import annotations

import errno
import itertools
import os
import re

_NONZERO = re.compile(rb"[^\x00]")
_NOT_FF = re.compile(rb"[^\xff]")
# Orders lazy clears: an entry is applied only if it is the same copy that
# was made durable (a region cleared, set again and copied again is newer).
_copy_seq = itertools.count(1)


def next_copy_seq() -> int:
    """A sequence number above every lazy clear made so far."""
    return next(_copy_seq)


class Bitmap:
    __slots__ = ("nbits", "bits", "fd", "path", "_count", "lazy", "unsynced", "syncing")

    def __init__(self, nbits: int, path: str | None = None):
        self.nbits = nbits
        self.bits = bytearray((nbits + 7) // 8)
        self.path = path
        self.fd = -1
        self._count: int | None = 0
        # region -> copy sequence: cleared in memory, still set in the file.
        self.lazy: dict[int, int] = {}
        # File bytes written since the last sync began / in the sync under way.
        self.unsynced: set[int] = set()
        self.syncing: set[int] = set()

    # -- files ----------------------------------------------------------------

    @classmethod
    def create(cls, nbits: int, path: str) -> Bitmap:
        """A new all-clear bitmap file (sparse: O(1) whatever the size)."""
        bm = cls(nbits, path)
        bm.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(bm.fd, len(bm.bits))
            if bm.bits:
                # Every block allocated now: a later set never meets a full
                # disk halfway (a bit set in memory but not in the file).
                os.posix_fallocate(bm.fd, 0, len(bm.bits))
        except BaseException:
            os.close(bm.fd)
            raise
        bm.unsynced.add(-1)  # new: nothing of it is durable yet
        return bm

    @classmethod
    def load(cls, nbits: int, path: str) -> Bitmap:
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
        # After a kill -9 the file may be newer than the disk: what a write is
        # told is durable must be, so make it so before anything relies on it.
        os.fdatasync(bm.fd)
        return bm

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- durability -------------------------------------------------------------

    def sync(self) -> None:
        """Make the file durable now (blocking: fdatasync on this thread)."""
        if self.fd >= 0 and self.sync_begin():
            os.fdatasync(self.fd)
        self.sync_end()

    def sync_begin(self) -> bool:
        """A sync is about to start: the bytes written so far are what it
        covers. False if there is nothing to sync."""
        if not self.unsynced:
            return False
        self.syncing |= self.unsynced
        self.unsynced = set()
        return True

    def sync_end(self) -> None:
        """The fdatasync begun after sync_begin() finished."""
        self.syncing = set()

    def synced(self) -> bool:
        return not self.unsynced and not self.syncing

    def _durable_bytes(self, b0: int, b1: int) -> bool:
        u, s = self.unsynced, self.syncing
        if not u and not s:
            return True
        if -1 in u or -1 in s:
            return False
        if b1 - b0 < 64:
            return not any(b in u or b in s for b in range(b0, b1 + 1))
        return not any(b0 <= b <= b1 for b in itertools.chain(u, s))

    def _write(self, first_byte: int, last_byte: int) -> None:
        if self.fd < 0:
            return
        data = self.bits[first_byte:last_byte + 1]
        lazy = self.lazy
        if lazy:
            if (last_byte - first_byte + 1) * 8 <= len(lazy):
                # A few bytes: look up their regions, not every lazy clear.
                for r in range(first_byte << 3, (last_byte + 1) << 3):
                    if r in lazy:
                        data[(r >> 3) - first_byte] |= 1 << (r & 7)
            else:
                for r in lazy:
                    if first_byte <= r >> 3 <= last_byte:
                        data[(r >> 3) - first_byte] |= 1 << (r & 7)
        os.pwrite(self.fd, data, first_byte)
        if last_byte - first_byte > 4096:
            self.unsynced.add(-1)  # a large write: the whole file counts as unsynced
        else:
            self.unsynced.update(range(first_byte, last_byte + 1))

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
        if self.lazy.pop(i, None) is not None:
            # Still set in the file: nothing to write.
            if self._count is not None:
                self._count += 1
            return True
        try:
            self._write(byte, byte)
        except OSError:
            self.bits[byte] &= ~mask & 0xFF  # not in the file: not set
            raise
        if self._count is not None:
            self._count += 1
        return True

    def clear(self, i: int) -> bool:
        """Clear bit i now, in memory and in the file (not for bits that
        describe data still to copy: see clear_lazily)."""
        byte, mask = i >> 3, 1 << (i & 7)
        if not self.bits[byte] & mask:
            return False
        self.bits[byte] &= ~mask & 0xFF
        if self._count is not None:
            self._count -= 1
        self._write(byte, byte)
        return True

    # -- write intent ----------------------------------------------------------------

    def intent(self, first: int, last: int) -> bool:
        """Set bits first..last (written through where they were clear in the
        file) and say whether all of them are durably set: the write they
        cover may be issued only then."""
        if first == last:
            if not self.bits[first >> 3] & (1 << (first & 7)):
                self.set(first)
            return self.durably_set(first)
        if self.lazy:
            for r in [r for r in self.lazy if first <= r <= last]:
                self.set(r)
        if self.next_clear(first, last) is not None:
            self.set_range(first, last)
        return self._durable_bytes(first >> 3, last >> 3)

    def intent_mirrored(self, first: int, last: int) -> bool:
        """For a write that goes to both copies now (P, then its mirror S):
        bits first..last that are clear in memory stay clear (there is
        nothing for the engine to copy), but are set in the file as if
        copied this moment (lazy clears, applied once both copies are
        durable: a crash before then copies the regions again). Bits set in
        memory stay set. The file is set for whole bytes (8 regions): one
        sync then serves writes to the neighbours too. True if the file bits
        of first..last are durably set: the write may be issued."""
        seq = next(_copy_seq)
        bits, lazy = self.bits, self.lazy
        added = []
        for r in range(first, last + 1):
            if bits[r >> 3] & (1 << (r & 7)):
                continue
            if lazy.pop(r, None) is None:
                added.append(r)
            lazy[r] = seq   # at the end: lazy clears stay in the order they were made
        b0, b1 = first >> 3, last >> 3
        for r in itertools.chain(range(b0 << 3, first),
                                 range(last + 1, min((b1 + 1) << 3, self.nbits))):
            if not bits[r >> 3] & (1 << (r & 7)) and r not in lazy:
                added.append(r)
                lazy[r] = seq
        if added:
            try:
                self._write(b0, b1)
            except OSError:
                for r in added:  # not in the file: not set there either
                    del lazy[r]
                raise
        return self._durable_bytes(b0, b1)

    def rewrite_copied(self, r: int) -> bool:
        """The hot path of intent_mirrored for one region: if region r is
        clear in memory and still set in the file (a lazy clear), durably,
        give its lazy clear a new copy sequence and say True. Otherwise
        change nothing and say False (take intent_mirrored)."""
        lazy = self.lazy
        if r not in lazy or self.bits[r >> 3] & (1 << (r & 7)):
            return False
        u, s = self.unsynced, self.syncing
        if (u or s) and not self._durable_bytes(r >> 3, r >> 3):
            return False
        del lazy[r]
        lazy[r] = next(_copy_seq)
        return True

    def durably_set(self, r: int) -> bool:
        """Is bit r set, in memory and durably in the file?"""
        byte = r >> 3
        if not self.bits[byte] & (1 << (r & 7)):
            return False
        u, s = self.unsynced, self.syncing
        return not ((u or s) and (byte in u or byte in s or -1 in u or -1 in s))

    def clear_lazily(self, first: int, last: int) -> None:
        """Clear bits first..last in memory only: their regions were copied.
        The file keeps them set until apply_clears()."""
        seq = next(_copy_seq)
        lazy = self.lazy
        i = self.next_set(first, last)
        while i is not None:
            j = self.next_clear(i, last)
            end = last if j is None else j - 1
            for r in range(i, end + 1):
                lazy[r] = seq
            self._set_bits(i, end, False)
            if j is None:
                break
            i = self.next_set(j, last)

    def idle_clears(self, cutoff: int) -> dict[int, int]:
        """The lazy clears made before copy sequence `cutoff`, by whole file
        bytes: a region whose byte has a newer lazy clear keeps its bit (a
        write to a region sets its whole byte in the file, intent_mirrored:
        clearing one bit of a byte still written to would make the next
        write there wait for a bitmap sync again). Such a region goes to the
        end of the lazy clears, with its byte's newest sequence: it is due
        with its byte, and the next call does not look at it again."""
        lazy = self.lazy
        old: dict[int, int] = {}
        # Lazy clears are kept in the order they were made (a region set
        # again leaves the dict; copied again, it comes back at the end):
        # the old ones are a prefix. (A region moved to the end below has
        # an older sequence than some before it: it is found a little late.)
        for r, seq in lazy.items():
            if seq >= cutoff:
                break
            old[r] = seq
        if not old:
            return old
        due: dict[int, int] = {}
        busy = []
        for r, seq in old.items():
            b = r & ~7
            newest = max(lazy.get(n, 0) for n in range(b, b + 8))
            if newest >= cutoff:
                busy.append((r, newest))
            else:
                due[r] = seq
        for r, newest in busy:
            del lazy[r]
            lazy[r] = newest
        return due

    def lazy_in(self, first: int, last: int) -> bool:
        """Is any region of first..last copied but its clear not yet durable?"""
        lazy = self.lazy
        if not lazy:
            return False
        if last - first < 64:
            return any(r in lazy for r in range(first, last + 1))
        return any(first <= r <= last for r in lazy)

    def apply_clears(self, entries: dict[int, int]) -> None:
        """Write the clears of `entries` (region -> the copy sequence that was
        made durable) to the file, where the region was not set or copied
        again since. Durable once a later sync ends."""
        lazy = self.lazy
        done = [r for r, seq in entries.items() if lazy.get(r) == seq]
        if not done:
            return
        for r in done:
            del lazy[r]
        done.sort()
        start = prev = done[0] >> 3
        for r in done[1:]:
            b = r >> 3
            if b > prev + 1:
                self._write(start, prev)
                start = b
            prev = b
        self._write(start, prev)

    def file_bits(self) -> bytes:
        """The bits as the file holds them: set, or cleared lazily."""
        if not self.lazy:
            return bytes(self.bits)
        out = bytearray(self.bits)
        for r in self.lazy:
            out[r >> 3] |= 1 << (r & 7)
        return bytes(out)

    # -- ranges of bits -----------------------------------------------------------

    def set_range(self, first: int, last: int) -> bool:
        """Set bits first..last inclusive; True if any changed."""
        return self._update_range(first, last, True)

    def clear_range(self, first: int, last: int) -> bool:
        return self._update_range(first, last, False)

    def _update_range(self, first: int, last: int, value: bool) -> bool:
        if first == last:
            return self.set(first) if value else self.clear(first)
        if value and self.lazy:
            for r in [r for r in self.lazy if first <= r <= last]:
                self.set(r)
        b0, b1 = first >> 3, last >> 3
        before = self._set_bits(first, last, value)
        if before is None:
            return False
        # Write only the bytes that changed: a byte rewritten unchanged would
        # count as not yet durable, and writes its bits cover would wait.
        lo, hi = 0, len(before) - 1
        bits = self.bits
        while before[lo] == bits[b0 + lo]:
            lo += 1
        while before[hi] == bits[b0 + hi]:
            hi -= 1
        # Bytes in between that the write rewrites with what the file held
        # already stay as durable as they were: a write they cover need not
        # wait for this one's sync.
        u = self.unsynced
        same = [] if -1 in u or hi - lo > 4096 else [
            b0 + k for k in range(lo + 1, hi) if before[k] == bits[b0 + k] and b0 + k not in u]
        try:
            self._write(b0 + lo, b0 + hi)
        except OSError:
            if value:
                # Not in the file: not set in memory either.
                self.bits[b0:b1 + 1] = before
                self._count = None
            raise
        for b in same:
            self.unsynced.discard(b)
        return True

    def _set_bits(self, first: int, last: int, value: bool) -> bytes | None:
        """Set or clear bits first..last in memory only; the bytes as they
        were, or None if nothing changed."""
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
            return None
        if self._count is not None:
            self._count += (int.from_bytes(after, "little").bit_count()
                            - int.from_bytes(before, "little").bit_count())
        return before

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

    def replace_with(self, other: Bitmap | bytes | bytearray) -> None:
        src = other.bits if isinstance(other, Bitmap) else other
        self.bits[:] = src
        self.lazy.clear()
        self._count = None
        if self.bits:
            self._write(0, len(self.bits) - 1)

    def union_update(self, *others: Bitmap) -> None:
        acc = int.from_bytes(self.bits, "little")
        for o in others:
            acc |= int.from_bytes(o.bits, "little")
        self.replace_with(acc.to_bytes(len(self.bits), "little"))

    def clear_all(self) -> None:
        self.bits[:] = bytes(len(self.bits))
        self.lazy.clear()
        self._count = 0
        if self.bits:
            self._write(0, len(self.bits) - 1)

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
