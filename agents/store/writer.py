"""SnapshotWriter: stream an image into the store, in any order, and commit.

    w = store.writer(size, parent=previous_id)       # takes a lease (gc.py)
    w.add(offset, data)          # whole chunks; any order; any thread
    await w.add_async(offset, data)                  # same, from asyncio
    w.zero(offset, length)       # whole chunks known to be zero (holes)
    w.take_from_parent(offset, length)               # unchanged since parent
    w.fill_from_parent()         # every chunk not given yet: from the parent
    sid = w.commit(volume=..., pair=..., split_gen=..., ...)
    # or w.abort(): nothing is committed, what was written is garbage for gc

Chunks are aligned to the image: `add`, `zero` and `take_from_parent` take
ranges that start at a multiple of the chunk size and end at one (or at the
image's end), covering one or more whole chunks; each chunk is given once.
A caller reading an NBD export asks for chunk-sized (or multiple) reads,
and turns a `base:allocation` hole or zero extent into `zero()` only for
chunks it covers entirely.

Per chunk, in a pool thread (BLAKE3, zstd and AES-GCM release the GIL, so
chunks are processed in parallel): all zeroes? -> "zero" in the index,
nothing stored. Else its id (keyed BLAKE3); if the store has it (the writer
touches it, for gc) it is reused; else compressed, sealed and written
create-exclusive. At most `max_pending` chunks are in flight: `add` blocks
(`add_async` awaits) beyond that, which bounds memory.

`commit` waits for every chunk, makes their names durable, writes the index
and names it in its lease, fences against concurrent sweeps (gc.py), then
writes the manifest: the manifest
is the commit point, so a writer that dies (even kill -9) leaves no snapshot,
only chunks and perhaps an index that gc removes later. A commit that finds
reused chunks removed by a concurrent sweep raises ConcurrentSweep naming
their offsets and stays open:

    while True:
        try:
            sid = w.commit(**fields)
            break
        except ConcurrentSweep as e:
            for off in e.offsets:
                w.add(off, read_from_source(off, w.chunk_size))
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from agents.store import envelope
from agents.store.envelope import KIND_CHUNK, KIND_INDEX, KIND_MANIFEST
from agents.store.errors import ConcurrentSweep, StoreBadInput, StoreError
from agents.store.gc import Lease, sweeps_since
from agents.store.index import ID_LEN, ZERO_ID, Index, chunk_count
from agents.store.names import chunk_name, index_name, iso_time, manifest_name, new_snapshot_id
from common.errors import SplitdError

if TYPE_CHECKING:
    from agents.store.store import Store

_UNSET, _DATA, _ZERO, _PARENT = 0, 1, 2, 3

# Fields a caller gives commit(); the rest of the manifest the writer fills in.
MANIFEST_FIELDS = {
    "source": "the daemon the image came from (host:port, or a URI)",
    "volume": "the primary volume's name",
    "pair": "the pair (primary -> secondary) that was split",
    "split_gen": "the pair's split generation",
    "split_time": "when the split happened (ISO 8601 UTC)",
    "delta_base": "the split_gen the export's x-splitd:delta covered the changes since",
    "pair_created": "when the pair was made (a pair made again counts splits from 0)",
    "read": "how the backup agent read the image: mode (full/incremental), why, bytes read",
    "directory": "the directory the backup was asked for",
    "mountpoint": "where the filesystem holding that directory was mounted (so the directory's "
                  "path inside the image is directory relative to mountpoint)",
    "created_by": "who asked (user@host, tool)",
    "note": "free text",
}


# The writer's threads compress and hash (CPU, the GIL released) and then
# wait on each chunk's fsync: with only one per CPU, a slow disk leaves the
# CPUs idle. Memory: about 2 x this many chunks in flight.
WRITER_THREADS = 8


class SnapshotWriter:
    def __init__(self, store: Store, size: int, *, chunk_size: int | None = None,
                 parent: str | None = None, workers: int | None = None,
                 max_pending: int | None = None) -> None:
        chunk_size = chunk_size or store.chunk_size
        if size <= 0:
            raise StoreBadInput(f"image size {size} must be positive")
        if chunk_size % 4096 or chunk_size <= 0:
            raise StoreBadInput(f"chunk size {chunk_size} must be a multiple of 4096")
        self.store = store
        self.size = size
        self.chunk_size = chunk_size
        self.parent = parent
        self.count = chunk_count(size, chunk_size)
        self._entries = bytearray(self.count * ID_LEN)
        self._state = bytearray(self.count)
        self._zeroes = {n: bytes(n) for n in {chunk_size, size - (self.count - 1) * chunk_size}}
        self.workers = workers or max(store.workers, WRITER_THREADS)
        self.max_pending = max_pending or 2 * self.workers
        self._slots = threading.BoundedSemaphore(self.max_pending)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._closed = False
        self.stats = dict.fromkeys(
            ("bytes_added", "zero_chunks", "zero_chunks_bytes", "parent_chunks", "new_chunks",
             "new_bytes", "stored_bytes", "reused_chunks", "reused_bytes"), 0)
        # The lease comes before the parent is looked at: from then on a sweep
        # keeps the parent's chunks even if the parent is forgotten (gc.py).
        self.lease = Lease.take(store.backend, parent)
        self.started = self.lease.start
        self._parent_index: Index | None = None
        try:
            if parent is not None:
                store.manifest(parent)        # the parent must be a committed snapshot
                self._parent_index = store.index(parent)
                if self._parent_index.chunk_size != chunk_size:
                    raise StoreBadInput(f"parent {parent} has chunk size "
                                        f"{self._parent_index.chunk_size}, not {chunk_size}")
        except BaseException:
            self.lease.release()
            raise
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="store-writer")

    # -- feeding ----------------------------------------------------------------

    def _chunks_of(self, offset: int, length: int) -> range:
        end = offset + length
        if offset % self.chunk_size or not 0 <= offset < end <= self.size \
                or (end % self.chunk_size and end != self.size):
            raise StoreBadInput(f"range {offset}+{length} is not whole chunks of "
                                f"{self.chunk_size} bytes within the image ({self.size} bytes)")
        return range(offset // self.chunk_size, chunk_count(end, self.chunk_size))

    def _claim(self, i: int, how: int) -> None:
        with self._lock:
            if self._closed:
                raise StoreError("writer is closed (committed or aborted)")
            self._raise_error()
            if self._state[i]:
                raise StoreBadInput(f"chunk at offset {i * self.chunk_size} given twice")
            self._state[i] = how

    def add(self, offset: int, data: bytes | bytearray | memoryview, *,
            handover: bool = False) -> None:
        """Queue whole chunks of data starting at `offset`. Blocks while
        `max_pending` chunks are in flight. Thread-safe. An error in a
        chunk's processing is raised by a later add() and by commit().
        handover=True: the caller gives a one-chunk bytearray away and never
        touches it again, so it is processed as it is, not copied first."""
        for i, piece in self._pieces(offset, data, handover):
            self._slots.acquire()
            self._submit(i, piece)

    async def add_async(self, offset: int, data: bytes | bytearray | memoryview, *,
                        handover: bool = False) -> None:
        """add() for a coroutine: waits for a free slot without blocking the
        event loop."""
        for i, piece in self._pieces(offset, data, handover):
            if not self._slots.acquire(blocking=False):
                await asyncio.to_thread(self._slots.acquire)
            self._submit(i, piece)

    def _pieces(self, offset: int, data: bytes | bytearray | memoryview, handover: bool
                ) -> list[tuple[int, bytes | bytearray]]:
        chunks = self._chunks_of(offset, len(data))
        if len(chunks) == 1:
            # A copy of 4 MiB costs about as much as hashing it, on the
            # caller's thread (the backup agent's event loop).
            if isinstance(data, bytes) or (handover and isinstance(data, bytearray)):
                return [(chunks[0], data)]
            return [(chunks[0], bytes(data))]
        view = memoryview(data)
        cs = self.chunk_size
        return [(i, bytes(view[(i - chunks[0]) * cs:(i - chunks[0] + 1) * cs])) for i in chunks]

    def _submit(self, i: int, piece: bytes | bytearray) -> None:
        try:
            self._claim(i, _DATA)
            self._pool.submit(self._ingest, i, piece)
        except BaseException:
            self._slots.release()
            raise

    def _ingest(self, i: int, data: bytes | bytearray) -> None:
        try:
            n = len(data)
            if data == self._zeroes[n]:
                self._set(i, ZERO_ID, zero_chunks=1, zero_chunks_bytes=n)
                return
            cid = self.store.chunk_id(data)
            name = chunk_name(cid)
            backend = self.store.backend
            if backend.touch(name):
                self._set(i, cid, reused_chunks=1, reused_bytes=n)
                return
            sealed = envelope.seal(self.store.keys, KIND_CHUNK, name, data, self.store.level)
            if backend.put_if_absent(name, sealed):
                self._set(i, cid, new_chunks=1, new_bytes=n, stored_bytes=len(sealed))
            else:
                self._set(i, cid, reused_chunks=1, reused_bytes=n)
        except BaseException as e:
            with self._lock:
                if self._error is None:
                    self._error = e
        finally:
            self._slots.release()

    def _set(self, i: int, cid: bytes, **counts: int) -> None:
        with self._lock:
            self._entries[i * ID_LEN:(i + 1) * ID_LEN] = cid
            self.stats["bytes_added"] += self._chunk_len(i)
            for k, v in counts.items():
                self.stats[k] += v

    def _chunk_len(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def zero(self, offset: int, length: int | None = None) -> None:
        """Whole chunks from `offset` (`length` bytes, default one chunk) are
        zero (holes, or known zeroes): nothing is read or stored."""
        for i in self._chunks_of(offset, length or self._chunk_len(offset // self.chunk_size)):
            self._claim(i, _ZERO)
            with self._lock:
                self.stats["zero_chunks"] += 1
                self.stats["zero_chunks_bytes"] += self._chunk_len(i)

    def take_from_parent(self, offset: int, length: int | None = None) -> None:
        """Whole chunks from `offset` are unchanged since the parent snapshot:
        the index takes the parent's entries."""
        parent = self._parent_index
        if parent is None:
            raise StoreBadInput("take_from_parent: this writer has no parent snapshot")
        for i in self._chunks_of(offset, length or self._chunk_len(offset // self.chunk_size)):
            if i >= parent.count or parent.chunk_len(i) != self._chunk_len(i):
                raise StoreBadInput(f"chunk at offset {i * self.chunk_size} is beyond the parent "
                                    f"{self.parent} ({parent.size} bytes)")
            self._claim(i, _PARENT)
            with self._lock:
                self._entries[i * ID_LEN:(i + 1) * ID_LEN] = parent.id_at(i)
                self.stats["parent_chunks"] += 1

    def fill_from_parent(self) -> int:
        """take_from_parent() for every chunk not given yet; returns how many."""
        with self._lock:
            todo = [i for i in range(self.count) if not self._state[i]]
        for i in todo:
            self.take_from_parent(i * self.chunk_size)
        return len(todo)

    def wait(self) -> None:
        """Block until every chunk given so far has been processed (stored,
        reused or found zero); stats are then up to date. Raises the first
        processing error, if any."""
        for _ in range(self.max_pending):
            self._slots.acquire()
        for _ in range(self.max_pending):
            self._slots.release()
        self._raise_error()

    def _raise_error(self) -> None:
        """Raise the first error of a chunk's processing: as it was if it is
        one of ours (NoSpace keeps its code), else wrapped in StoreError."""
        e = self._error
        if isinstance(e, SplitdError):
            raise e
        if e is not None:
            raise StoreError(f"backup failed: {e!r}") from e

    # -- finishing ----------------------------------------------------------------

    def missing(self) -> list[int]:
        """Offsets of chunks not given yet."""
        return [i * self.chunk_size for i in range(self.count) if not self._state[i]]

    def _close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)

    def commit(self, **fields: Any) -> str:
        """Wait for every chunk, then write the index and the manifest;
        returns the new snapshot's id. `fields` are the caller's manifest
        fields (MANIFEST_FIELDS).

        Nothing is committed on any error. Two errors leave the writer open,
        to be put right and committed again: StoreBadInput (unknown fields,
        or chunks never given: `missing()` lists them) and ConcurrentSweep
        (a garbage collection removed chunks this backup reused: give the
        chunks at `e.offsets` again, read afresh from the source). Any other
        error aborts the writer."""
        if self._closed:
            raise StoreError("writer is closed (committed or aborted)")
        keep_open = False
        try:
            unknown = set(fields) - MANIFEST_FIELDS.keys()
            if unknown:
                keep_open = True
                raise StoreBadInput(f"unknown manifest fields: {', '.join(sorted(unknown))}")
            self.wait()
            missing = self.missing()
            if missing:
                keep_open = True
                raise StoreBadInput(f"{len(missing)} chunks never given, the first at offset {missing[0]}")
            backend = self.store.backend
            backend.sync()
            index = Index(self.size, self.chunk_size, self._entries)
            now = time.time()
            sid = new_snapshot_id(now)
            self.store.put_sealed(KIND_INDEX, index_name(sid), index.encode())
            backend.sync()
            # Named in the lease with a fresh beat, whatever the heartbeat thread
            # did while we were descheduled: every sweep from here on marks it
            # (gc.py, point 2; on S3 a reused chunk's only protection).
            self.lease.name_index(sid)
            if sweeps_since(backend, self.lease.start):
                gone = self._recheck(index)
                if gone:
                    keep_open = True
                    raise ConcurrentSweep(
                        f"garbage collection removed {len(gone)} chunks this backup reused "
                        f"(first at offset {gone[0]}); nothing committed: give them again",
                        gone)
            manifest = {
                "id": sid,
                **{k: fields.get(k) for k in MANIFEST_FIELDS},
                "size": self.size,
                "chunk_size": self.chunk_size,
                "parent": self.parent,
                "image_digest": index.digest(self.store._zero_map(index)),
                "created_at": iso_time(now),
                "started_at": iso_time(self.started),
                "tool_version": _tool_version(),
                "host": socket.gethostname(),
                "store_id": self.store.id,
                "stats": {**self.stats, "chunks": self.count, "seconds": round(now - self.started, 3)},
            }
            self.store.put_sealed(KIND_MANIFEST, manifest_name(sid), json.dumps(manifest, indent=1).encode())
            backend.sync()
            return sid
        finally:
            if not keep_open:
                self.abort()

    def _recheck(self, index: Index) -> list[int]:
        """A sweep ran while we wrote: find what it removed that we refer to
        (gc.py explains why only then). Those chunks become "not given" again;
        returns their offsets."""
        backend = self.store.backend
        ids = sorted(index.data_ids())
        with ThreadPoolExecutor(self.workers) as pool:
            present = list(pool.map(lambda c: backend.exists(chunk_name(c)), ids))
        gone = {c for c, ok in zip(ids, present, strict=True) if not ok}
        offsets = []
        with self._lock:
            for i in range(self.count):
                if bytes(self._entries[i * ID_LEN:(i + 1) * ID_LEN]) in gone:
                    self._entries[i * ID_LEN:(i + 1) * ID_LEN] = ZERO_ID
                    self._state[i] = _UNSET
                    offsets.append(i * self.chunk_size)
        return offsets

    def abort(self) -> None:
        """Stop: nothing is committed. Chunks already written stay until gc."""
        self._close()
        self.lease.release()

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.abort()


def _tool_version() -> str:
    from agents.store.store import TOOL_VERSION
    return f"{TOOL_VERSION} (pid {os.getpid()})"
