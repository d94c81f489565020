"""A snapshot's image written out, and the digest of what was written.

write_to_file(store, sid, path) writes snapshot `sid` into a regular file
(zero runs stay holes: the file is truncated, then sized) or a block device
(zero runs: BLKZEROOUT). `workers` threads each take the next chunk in
offset order and carry it all the way: fetch, open (decrypt, decompress)
straight into a buffer of their own and re-hash (Store.get_chunk_into),
then write it. No queue between threads, no copy of a chunk, nothing
allocated per chunk.

Writes use O_DIRECT where the file system takes it (open(2): buffer, offset
and length aligned; the buffers are page-aligned mmaps, chunks are
multiples of 4096 bytes; a short last chunk goes through the page cache).
Through the page cache, 1 GiB of writes cost ~1.7 s of system CPU here
(page allocation and copy), and the dirty pages reached the disk only at
the final fsync, after all the decoding; direct writes cost ~0.2 s and go
to the disk while the other workers decode.

WrittenImage is what a target was given, chunk by chunk: at every chunk
offset the id of the chunk written there or zeroes, recorded by the caller
after each write succeeded, with the offset that write was given. Its
`check()` computes the image digest from that (index.py, "Image digest")
and compares it with the manifest's, so a restore that says ok wrote every
chunk of the snapshot exactly once, each at its own offset. Each chunk's
bytes were checked against its id (its keyed BLAKE3) as they were opened,
into the very buffer that was then written, so that digest is the digest of
the bytes handed to the target. What it cannot see is the target losing or
changing them afterwards; a read-back does (agents/backup/restore.py,
--verify-readback).

A chunk that is missing or fails its check does not stop the others: the
rest of the image is written, then ImageIncomplete names every bad chunk
and the byte ranges of the image it covers.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import stat
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from agents.store.errors import CorruptObject, ImageIncomplete, ObjectMissing, StoreBadInput, StoreError
from agents.store.index import ZERO_ID, Index
from agents.store.names import chunk_name
from volumes.files import write_all

if TYPE_CHECKING:
    from agents.store.store import Store

Progress = Callable[[int, int], None]
Bad = CorruptObject | ObjectMissing      # a chunk that cannot be read

# <linux/fs.h>: BLKZEROOUT _IO(0x12, 127), argument u64[2] {start, length}:
# the device zeroes the range (its WRITE ZEROES, else it writes zero pages).
BLKZEROOUT = 0x127F
ALIGN = 4096                # O_DIRECT: offset, length and address (open(2))
_SHOWN_RANGES, _SHOWN_CHUNKS = 8, 3
# A direct write waits for the disk: more workers than cores keep the cores busy.
MIN_WORKERS = 4


def format_ranges(ranges: list[tuple[int, int]], most: int = _SHOWN_RANGES) -> str:
    """"0+4194304, 16777216+8388608" (offset+length), the first `most`."""
    shown = ", ".join(f"{off}+{n}" for off, n in ranges[:most])
    return shown + (f" and {len(ranges) - most} more" if len(ranges) > most else "")


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


class WrittenImage:
    """What a target was given (module docstring). One thread records."""

    def __init__(self, store: Store, sid: str, manifest: dict[str, Any], index: Index) -> None:
        self.store = store
        self.sid = sid
        self.manifest = manifest
        self.index = index
        self.ids: list[bytes | None] = [None] * index.count
        self.bad: dict[bytes, str] = {}             # chunk id -> why
        self.unwritten: list[tuple[int, int]] = []  # where a bad chunk was not written
        self.bytes_written = 0
        self.bytes_zeroed = 0

    def _slots(self, offset: int, length: int) -> range:
        cs, size = self.index.chunk_size, self.index.size
        end = offset + length
        if offset % cs or not 0 <= offset < end <= size or (end % cs and end != size):
            raise StoreError(f"restore of {self.sid}: {offset}+{length} is not a run of whole chunks")
        slots = range(offset // cs, -(-end // cs))
        if any(self.ids[i] is not None for i in slots):
            raise StoreError(f"restore of {self.sid}: image bytes {offset}+{length} written twice")
        return slots

    def wrote(self, offset: int, length: int, cid: bytes) -> None:
        """Chunk `cid` (checked as it was opened) was written at `offset`."""
        (i,) = self._slots(offset, length)
        self.ids[i] = cid
        self.bytes_written += length

    def zeroed(self, offset: int, length: int) -> None:
        """The target reads zeroes over [offset, offset+length)."""
        for i in self._slots(offset, length):
            self.ids[i] = ZERO_ID
        self.bytes_zeroed += length

    def failed(self, offset: int, length: int, cid: bytes, error: Bad) -> None:
        """Chunk `cid` could not be read: nothing was written at `offset`."""
        self._slots(offset, length)
        self.bad.setdefault(cid, str(error))
        self.unwritten.append((offset, length))

    def check(self, target: str) -> str:
        """The image digest of what `target` was given, once it is the
        manifest's; else ImageIncomplete (bad chunks) or StoreError."""
        self.check_complete(target)
        missing = _merge([(i * self.index.chunk_size, self.index.chunk_len(i))
                          for i, cid in enumerate(self.ids) if cid is None])
        if missing:
            raise StoreError(f"restore of {self.sid} into {target} wrote nothing at image bytes "
                             f"{format_ranges(missing)}")
        entries = bytearray(b"".join(cid or b"" for cid in self.ids))
        got = Index(self.index.size, self.index.chunk_size, entries).digest(self.store._zero_map(self.index))
        want = self.manifest["image_digest"]
        if got != want:
            raise StoreError(f"{target} was not given snapshot {self.sid}: the image digest of "
                             f"what was written is {got[:16]}..., the manifest's {want[:16]}...")
        return got

    def check_complete(self, target: str) -> None:
        """ImageIncomplete if a chunk could not be read (whatever else is
        checked or not)."""
        if self.bad:
            ranges = _merge(self.unwritten)
            chunks = {chunk_name(cid): why for cid, why in sorted(self.bad.items())}
            whys = "; ".join(list(chunks.values())[:_SHOWN_CHUNKS]) + (
                f"; and {len(chunks) - _SHOWN_CHUNKS} more chunks" if len(chunks) > _SHOWN_CHUNKS else "")
            raise ImageIncomplete(
                f"snapshot {self.sid} is damaged: image bytes {format_ranges(ranges)} "
                f"(offset+length) were not restored to {target} ({whys}); the rest was",
                ranges, chunks)


def write_to_file(store: Store, sid: str, path: str, *, workers: int | None = None,
                  progress: Progress | None = None) -> WrittenImage:
    """Snapshot `sid` into `path`: a new or existing regular file (truncated,
    then sized: zero runs stay holes) or a block device at least the image's
    size (zero runs are zeroed), fsynced before returning. Check the result
    with `.check(path)`; a bad chunk leaves its ranges unwritten (module
    docstring)."""
    manifest, index = store.checked_index(sid)
    size, cs = index.size, index.chunk_size
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    direct_fd = None
    try:
        mode = os.fstat(fd).st_mode
        regular = stat.S_ISREG(mode)
        if regular:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
        elif stat.S_ISBLK(mode):
            have = os.lseek(fd, 0, os.SEEK_END)
            if have < size:
                raise StoreBadInput(f"block device {path} has {have} bytes, the image {size}")
        else:
            raise StoreBadInput(f"{path} is neither a regular file nor a block device")
        try:
            direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:     # the file system does not do O_DIRECT
                raise
        out = _Target(fd, direct_fd, regular, cs)
        image = WrittenImage(store, sid, manifest, index)
        _run(store, index, out, image, workers or max(MIN_WORKERS, store.workers), progress)
        os.fsync(fd)
    finally:
        if direct_fd is not None:
            os.close(direct_fd)
        os.close(fd)
    return image


class _Target:
    """Where write_to_file's workers write: their calls are thread-safe."""

    def __init__(self, fd: int, direct_fd: int | None, regular: bool, chunk_size: int) -> None:
        self.fd = fd
        self.direct_fd = direct_fd
        self.regular = regular
        self.chunk_size = chunk_size
        self._zeroes: bytes | None = None

    def write(self, offset: int, data: memoryview) -> None:
        fd = self.direct_fd
        if fd is not None and offset % ALIGN == 0 and len(data) % ALIGN == 0:
            try:
                write_all(fd, data, offset)
                return
            except OSError as e:
                # EINVAL: a device whose logical blocks are bigger than
                # ALIGN; through the page cache from now on.
                if e.errno != errno.EINVAL:
                    raise
                self.direct_fd = None
        write_all(self.fd, data, offset)

    def zero(self, offset: int, length: int) -> None:
        if self.regular:
            return          # a hole since the truncate
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
            return
        except OSError as e:
            # EINVAL: not 512-aligned (an image size that is not); else a
            # device that cannot: write the zeroes.
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY):
                raise
        if self._zeroes is None:
            self._zeroes = bytes(self.chunk_size)
        for off in range(offset, offset + length, self.chunk_size):
            write_all(self.fd, memoryview(self._zeroes)[:min(self.chunk_size, offset + length - off)], off)


def _run(store: Store, index: Index, out: _Target, image: WrittenImage, workers: int,
         progress: Progress | None) -> None:
    """Every extent of `index` through `workers` threads, at most 2 x workers
    ahead of the one recording results (in offset order, this thread)."""
    buffers: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
    for _ in range(workers):
        buffers.put(mmap.mmap(-1, index.chunk_size))    # page-aligned, for O_DIRECT

    def one(offset: int, length: int, cid: bytes | None) -> Bad | None:
        if cid is None:
            out.zero(offset, length)
            return None
        buf = buffers.get()     # never waits: at most `workers` jobs run
        try:
            out.write(offset, store.get_chunk_into(cid, length, memoryview(buf)))
        except (CorruptObject, ObjectMissing) as e:
            return e
        finally:
            buffers.put(buf)
        return None

    done = 0
    pending: deque[tuple[int, int, bytes | None, Future[Bad | None]]] = deque()

    def settle() -> None:
        nonlocal done
        offset, length, cid, fut = pending.popleft()
        error = fut.result()
        if cid is None:
            image.zeroed(offset, length)
        elif error is None:
            image.wrote(offset, length, cid)
        else:
            image.failed(offset, length, cid, error)
        done += length
        if progress is not None:
            progress(done, index.size)

    with ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
        try:
            for offset, length, cid in store.iter_extents(image.sid, index):
                pending.append((offset, length, cid, pool.submit(one, offset, length, cid)))
                while len(pending) > 2 * workers:
                    settle()
            while pending:
                settle()
        finally:
            for *_, fut in pending:
                fut.cancel()
