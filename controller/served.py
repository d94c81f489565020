"""Backup snapshots served as read-only NBD exports, straight from the store.

`backup.serve {store, snapshot, name}` opens a store (agents/store), loads the
snapshot's index once and checks it against the manifest's image digest (in
a thread: a second or more for a big index in S3, while every other client
is served), checks the name again, and adds an export `name` whose backend
is a SnapshotBackend:

- a READ maps to the chunks it covers; a zero chunk is zeroes, a chunk in
  the cache is copied from it, any other is fetched, opened (decrypted,
  decompressed) and re-hashed by Store.get_chunk in a thread pool, never on
  the event loop: the read is answered when its chunks are in (a Future, as
  a pair's `wait` read policy does), and every other export keeps being
  served meanwhile;
- the cache is an LRU of whole chunks keyed by chunk id (equal chunks are
  held once), bounded in bytes (`cache_size`, DEFAULT_CACHE);
- a READ that starts where one of the last few ended is sequential: the
  next READAHEAD chunks are fetched before they are asked for;
- a chunk that is missing or does not match its name fails the READ with
  EIO, and the reason (the store's CorruptObject/ObjectMissing message) is
  logged: never wrong bytes, and never cached, so a repaired store serves it;
- `base:allocation` comes from the index: a zero chunk (never stored) is a
  hole that reads as zeroes (NBD_STATE_HOLE | NBD_STATE_ZERO), every other
  chunk is data.

The export is read-only (NBD_FLAG_READ_ONLY); a change is refused EROFS.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import nbdwire as c
from agents.store import open_dir
from agents.store.errors import StoreError
from agents.store.index import ZERO_ID, Index
from agents.store.names import index_name
from common.errors import SplitdError
from controller.errors import BadInput, Conflict, NotFound
from volumes.names import parse_size, quoted, validate_name
from volumes.store import ServedRecord

if TYPE_CHECKING:
    from agents.store import Store
    from daemon.connections import ConnectionRegistry
    from volumes.store import MetadataStore

log = logging.getLogger("splitd.served")

DEFAULT_CACHE = 256 << 20
MIN_CACHE = 16 << 20
MAX_CACHE = 64 << 30
# Chunks fetched ahead of a sequential reader, and threads fetching chunks
# for every served snapshot together (a fetch is file I/O, zstd and BLAKE3,
# which release the GIL).
READAHEAD = 4
WORKERS = 4
# Zero replies up to this size are shared, immutable bytes (a new one would
# be allocated and zeroed per READ).
SHARED_ZEROES_MAX = 1 << 20

_HOLE_ZERO = c.STATE_HOLE | c.STATE_ZERO


_ZEROES: dict[int, bytes] = {}


def _zeroes(length: int) -> bytes:
    if length > SHARED_ZEROES_MAX:
        return bytes(length)
    data = _ZEROES.get(length)
    if data is None:
        if len(_ZEROES) >= 16:      # bounded: a client may ask any lengths
            _ZEROES.clear()
        data = _ZEROES[length] = bytes(length)
    return data


class ChunkCache:
    """Whole chunks by id, least recently used dropped first, at most
    `limit` bytes. Event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, cid: bytes) -> bytes | None:
        data = self._chunks.get(cid)
        if data is not None:
            self._chunks.move_to_end(cid)
        return data

    def put(self, cid: bytes, data: bytes) -> None:
        if cid in self._chunks or len(data) > self.limit:
            return
        self._chunks[cid] = data
        self.used += len(data)
        while self.used > self.limit:
            _, old = self._chunks.popitem(last=False)
            self.used -= len(old)

    def clear(self) -> None:
        self._chunks.clear()
        self.used = 0


class SnapshotBackend:
    """A daemon.exports.Backend over one snapshot of a store (module docstring)."""

    read_only = True
    streams_writes = False

    def __init__(self, store: Store, sid: str, index: Index, cache_size: int,
                 pool: ThreadPoolExecutor, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.sid = sid
        self.index = index
        self.chunk_size = index.chunk_size
        self.cache = ChunkCache(cache_size)
        self.pool = pool
        self.loop = loop
        self._loading: dict[bytes, asyncio.Future[bytes]] = {}
        # Where recent reads ended: a read starting at one is sequential
        # (several connections or many requests in flight interleave).
        self._ends: deque[int] = deque(maxlen=16)
        self.errors = 0
        self.closed = False

    @property
    def size(self) -> int:
        return self.index.size

    # -- reads -----------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | asyncio.Future[bytes]:
        if self.closed:
            raise OSError(errno.ESHUTDOWN, f"snapshot {self.sid} is no longer served")
        cs = self.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        sequential = offset in self._ends
        self._ends.append(offset + length)
        parts: list[bytes | asyncio.Future[bytes]] = []
        ready = True
        for i in range(first, last + 1):
            cid = self.index.id_at(i)
            part: bytes | asyncio.Future[bytes]
            if cid == ZERO_ID:
                part = b""      # zeroes: filled in by _assemble
            else:
                part = self.cache.get(cid) or self._load(i, cid)
                ready = ready and not isinstance(part, asyncio.Future)
            parts.append(part)
        if sequential:
            self._read_ahead(last + 1)
        if ready:
            self.cache.hits += 1
            return self._assemble(offset, length, first, parts)    # type: ignore[arg-type]
        self.cache.misses += 1
        return asyncio.ensure_future(self._finish(offset, length, first, parts))

    async def _finish(self, offset: int, length: int, first: int,
                      parts: list[bytes | asyncio.Future[bytes]]) -> bytes:
        done = [await p if isinstance(p, asyncio.Future) else p for p in parts]
        return self._assemble(offset, length, first, done)

    def _assemble(self, offset: int, length: int, first: int, parts: list[bytes]) -> bytes:
        """The reply's bytes: at most one copy out of the chunks (a whole
        chunk goes as it is), zeroes shared."""
        cs = self.chunk_size
        if len(parts) == 1:
            start = offset - first * cs
            data = parts[0]
            if not data:
                return _zeroes(length)
            if start == 0 and length == len(data):
                return data
            return bytes(memoryview(data)[start:start + length])
        pieces: list[bytes | memoryview] = []
        for n, data in enumerate(parts):
            base = (first + n) * cs
            lo, hi = max(offset, base), min(offset + length, base + cs)
            pieces.append(memoryview(data)[lo - base:hi - base] if data else _zeroes(hi - lo))
        return b"".join(pieces)

    def _load(self, i: int, cid: bytes) -> asyncio.Future[bytes]:
        """The chunk at index `i`, fetched once however many reads wait on it."""
        fut = self._loading.get(cid)
        if fut is None:
            fut = self.loop.create_future()
            self._loading[cid] = fut
            work = self.loop.run_in_executor(self.pool, self._fetch, i, cid)
            work.add_done_callback(lambda w: self._loaded(cid, fut, w))
        return fut

    def _fetch(self, i: int, cid: bytes) -> bytes:
        """In a worker thread: the chunk, fetched and checked; OSError(EIO) if not."""
        try:
            return self.store.get_chunk(cid, self.index.chunk_len(i))
        except (StoreError, SplitdError, OSError, ValueError) as e:
            where = f"{i * self.chunk_size}+{self.index.chunk_len(i)}"
            raise OSError(errno.EIO, f"snapshot {self.sid} chunk at {where}: {e}") from None

    def _loaded(self, cid: bytes, fut: asyncio.Future[bytes], work: asyncio.Future[bytes]) -> None:
        del self._loading[cid]
        if work.cancelled():
            fut.cancel()
            return
        exc = work.exception()
        if exc is not None:
            self.errors += 1
            log.error("served snapshot %s: READ failed with EIO: %s", self.sid, exc)
            fut.set_exception(exc)
            # A read-ahead nobody waits on must not log "exception never retrieved".
            fut.exception()
            return
        data = work.result()
        if not self.closed:
            self.cache.put(cid, data)
        fut.set_result(data)

    def _read_ahead(self, start: int) -> None:
        """The next READAHEAD data chunks from index `start` (zero chunks
        cost nothing to serve: they do not count, up to 8 x READAHEAD of
        them are looked past)."""
        want = READAHEAD
        for i in range(start, min(start + 8 * READAHEAD, self.index.count)):
            cid = self.index.id_at(i)
            if cid == ZERO_ID:
                continue
            if cid not in self._loading and self.cache.get(cid) is None:
                self._load(i, cid)
            want -= 1
            if not want:
                break

    # -- block status ------------------------------------------------------------------

    def extents(self, offset: int, length: int, limit: int = 0) -> list[tuple[int, int]]:
        """base:allocation: zero chunks are HOLE|ZERO, the others data (0)."""
        cs = self.chunk_size
        out: list[tuple[int, int]] = []
        end = offset + length
        i = offset // cs
        pos = offset
        while pos < end:
            flags = _HOLE_ZERO if self.index.id_at(i) == ZERO_ID else 0
            stop = min(end, (i + 1) * cs)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + stop - pos, flags)
            else:
                if limit and len(out) == limit:
                    break
                out.append((stop - pos, flags))
            pos = stop
            i += 1
        return out

    # -- refused: the export is read-only ------------------------------------------------

    def read_fd(self, offset: int, length: int) -> tuple[int, int] | None:
        return None

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, f"snapshot {self.sid} is served read-only")

    write = zero = trim = _refuse

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        self.cache.clear()
        self.store.close()


def open_snapshot(store: str, snapshot: str, key_file: str | None) -> tuple[Store, dict[str, Any], Index]:
    """Open `store` and load `snapshot`'s index, checked against its manifest:
    (the open store, the manifest, the index). Blocking (a metadata read or
    two); the caller closes the store. Used by `backup.serve` and by an
    instant restore (controller/instant.py)."""
    try:
        st = open_dir(store, key_file=key_file)
    except SplitdError:
        raise
    except OSError as e:
        raise BadInput(f"cannot open backup store {store}: {e.strerror or e}") from None
    try:
        manifest = st.manifest(snapshot)
        # Loaded once (32 bytes a chunk: 8 MiB for 1 TiB at 4 MiB chunks),
        # and checked: the digest covers every chunk id.
        index = st.index(snapshot)
        if index.size != manifest["size"] or \
                index.digest(st._zero_map(index)) != manifest["image_digest"]:
            raise Conflict(f"snapshot {snapshot}: {index_name(snapshot)} does not match "
                           "the manifest's image digest (run splitctl backup verify)")
    except BaseException:
        st.close()
        raise
    return st, manifest, index


# Why a snapshot served before the stop is not served yet.
OPENING = "its backup store is being opened again (after a start)"


def check_source(store: Any, snapshot: Any, key_file: Any) -> None:
    """A snapshot named in a request (backup.serve, backup.instant_restore):
    the store, snapshot id and key file. Both paths are recorded and opened
    again at every start, so they must be absolute."""
    if not isinstance(store, str) or not store.startswith(("/", "s3://")):
        raise BadInput(f"store {quoted(store)} must be the absolute path of a backup store "
                       "directory, or s3://BUCKET/PREFIX")
    if not isinstance(snapshot, str) or not snapshot:
        raise BadInput("snapshot must be a snapshot id (splitctl backup list)")
    if key_file is not None and (not isinstance(key_file, str) or not key_file.startswith("/")):
        raise BadInput(f"key_file {quoted(key_file)} must be an absolute path")


class ServedSnapshots:
    """The snapshots this daemon serves, by export name. Each is recorded
    in the metadata store (`db`, table `served`) when served and forgotten
    when unserved; at start (start()) every recorded one is opened again,
    in a thread each, and served once open. One that is not (yet) open is
    `unavailable` with the reason: listed, its name taken, its export
    refused naming the reason, until it opens or is unserved."""

    def __init__(self, registry: ConnectionRegistry, volume_exists: Any,
                 db: MetadataStore | None = None) -> None:
        self.registry = registry
        self.volume_exists = volume_exists      # name -> bool: a volume owns that name
        self.db = db
        self.served: dict[str, tuple[SnapshotBackend, dict[str, Any]]] = {}
        self.unavailable: dict[str, tuple[ServedRecord, str]] = {}   # name -> (its row, why)
        self._opening: set[asyncio.Task[None]] = set()
        self._pool: ThreadPoolExecutor | None = None

    def get(self, name: str) -> SnapshotBackend | None:
        entry = self.served.get(name)
        return entry[0] if entry else None

    def taken(self, name: str) -> bool:
        """Is export name `name` a served snapshot's (available or not)?"""
        return name in self.served or name in self.unavailable

    def unavailable_reason(self, name: str) -> str | None:
        entry = self.unavailable.get(name)
        return entry[1] if entry else None

    def start(self) -> None:
        """At start, on the event loop: every snapshot served before the
        stop opened again, each by a task (module docstring)."""
        if self.db is None:
            return
        for rec in self.db.list_served():
            self.unavailable[rec.name] = (rec, OPENING)
            task = asyncio.get_running_loop().create_task(self._serve_again(rec))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _serve_again(self, rec: ServedRecord) -> None:
        """Background task: one recorded snapshot opened (in a thread) and
        served; if it cannot be, it stays unavailable with the reason.
        Handles its own errors."""
        try:
            st, manifest, index = await asyncio.to_thread(open_snapshot, rec.store, rec.snapshot,
                                                          rec.key_file)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- whatever it is, it is the reason
            why = f"cannot open snapshot {rec.snapshot} of {rec.store}: {e}"
            if self.unavailable.get(rec.name, (None, ""))[0] is rec:
                self.unavailable[rec.name] = (rec, why)
                log.error("served snapshot %s not served again at start: %s (splitctl backup "
                          "unserve %s forgets it)", rec.name, why, rec.name)
            return
        if self.unavailable.get(rec.name, (None, ""))[0] is not rec:
            st.close()      # unserved meanwhile
            return
        if self.volume_exists(rec.name):
            st.close()
            why = f"a volume is named {rec.name!r} now"
            self.unavailable[rec.name] = (rec, why)
            log.error("served snapshot %s not served again at start: %s", rec.name, why)
            return
        del self.unavailable[rec.name]
        self._add(rec.name, rec.store, rec.snapshot, rec.key_file, st, manifest, index,
                  rec.cache_size)

    def names(self) -> list[str]:
        return list(self.served)

    async def serve(self, store: Any, snapshot: Any, name: Any = None, key_file: Any = None,
                    cache_size: Any = None) -> dict[str, Any]:
        """Serve `snapshot` of `store` as export `name`. The store is opened
        and the index loaded and checked in a thread (a second on a big
        index in S3): other clients are served meanwhile. The name is
        checked before and again after, then taken at once."""
        name, limit = self._check(store, snapshot, name, key_file, cache_size)
        st, manifest, index = await asyncio.to_thread(open_snapshot, store, snapshot, key_file)
        try:
            self._check(store, snapshot, name, key_file, cache_size)
        except BaseException:
            st.close()
            raise
        out = self._add(name, store, snapshot, key_file, st, manifest, index, limit)
        if self.db is not None:
            try:
                self.db.add_served(ServedRecord(name, store, snapshot, key_file, limit,
                                                time.time()))
            except BaseException:
                backend, _ = self.served.pop(name)
                backend.close()
                raise
        return out

    def _check(self, store: Any, snapshot: Any, name: Any, key_file: Any,
               cache_size: Any) -> tuple[str, int]:
        """The request checked: (the export name, the cache's bound)."""
        check_source(store, snapshot, key_file)
        name = validate_name(name if name is not None else f"backup-{snapshot}")
        limit = DEFAULT_CACHE if cache_size is None else parse_size(cache_size)
        if not MIN_CACHE <= limit <= MAX_CACHE:
            raise BadInput(f"cache_size {limit} must be from {MIN_CACHE >> 20} MiB to "
                           f"{MAX_CACHE >> 30} GiB")
        if name in self.served:
            raise Conflict(f"export {name!r} already serves snapshot {self.served[name][1]['snapshot']}"
                           f"; unserve it first (splitctl backup unserve {name})")
        if name in self.unavailable:
            raise Conflict(f"export {name!r} is a served snapshot, unavailable "
                           f"({self.unavailable[name][1]}); unserve it first (splitctl backup "
                           f"unserve {name})")
        if self.volume_exists(name):
            raise Conflict(f"export name {name!r} is a volume's; give another (--as NAME)")
        return name, limit

    def _add(self, name: str, store: str, snapshot: str, key_file: str | None, st: Store,
             manifest: dict[str, Any], index: Index, limit: int) -> dict[str, Any]:
        """Export `name` serves the opened snapshot from now on."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="served")
        backend = SnapshotBackend(st, snapshot, index, limit, self._pool, asyncio.get_running_loop())
        info = {"name": name, "store": store, "snapshot": snapshot, "key_file": key_file,
                "available": True, "size": index.size,
                "chunk_size": index.chunk_size, "cache_size": limit, "encrypted": st.encrypted,
                "directory": manifest.get("directory"), "mountpoint": manifest.get("mountpoint"),
                "volume": manifest.get("volume")}
        self.served[name] = (backend, info)
        log.info("serving snapshot %s of %s as export %s (read-only)", snapshot, store, name)
        return self.describe(name)

    def describe(self, name: str) -> dict[str, Any]:
        backend, info = self.served[name]
        return dict(info, read_only=True, connections=self.registry.count(name),
                    cached=backend.cache.used, cache_hits=backend.cache.hits,
                    cache_misses=backend.cache.misses, read_errors=backend.errors)

    def list(self) -> dict[str, Any]:
        out = [self.describe(n) for n in self.served]
        out += [{"name": rec.name, "store": rec.store, "snapshot": rec.snapshot,
                 "key_file": rec.key_file, "cache_size": rec.cache_size, "available": False,
                 "opening": why == OPENING, "reason": why}
                for rec, why in self.unavailable.values()]
        return {"served": sorted(out, key=lambda s: s["name"])}

    def unserve(self, name: Any, force: Any = False) -> dict[str, Any]:
        name = validate_name(name)
        if not isinstance(force, bool):
            raise BadInput("force must be true or false")
        if name in self.unavailable:
            rec, _ = self.unavailable[name]
            if self.db is not None:
                self.db.remove_served(name)
            del self.unavailable[name]
            log.info("forgot served snapshot %s (%s of %s), which was unavailable", name,
                     rec.snapshot, rec.store)
            return {"name": name, "snapshot": rec.snapshot, "unserved": True,
                    "connections_closed": 0}
        if name not in self.served:
            raise NotFound(f"no served snapshot named {name!r} (splitctl backup served)")
        in_use = self.registry.count(name)
        if in_use and not force:
            conns = "connection" if in_use == 1 else "connections"
            raise Conflict(f"served snapshot {name!r} is in use by {in_use} NBD {conns}; "
                           "disconnect first, or unserve with force (--force)")
        if self.db is not None:
            self.db.remove_served(name)     # first: a failed commit leaves it served
        backend, info = self.served.pop(name)
        closed = self.registry.close_export(name, "snapshot unserved") if in_use else 0
        backend.close()
        log.info("stopped serving snapshot %s as export %s", info["snapshot"], name)
        return {"name": name, "snapshot": info["snapshot"], "unserved": True,
                "connections_closed": closed}

    def close(self) -> None:
        for task in list(self._opening):
            task.cancel()       # (an open under way in its thread is left to finish)
        for backend, _ in self.served.values():
            backend.close()
        self.served.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
