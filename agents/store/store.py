"""A backup store: open or create one, read snapshots back, verify, forget.

Objects (names within the backend, backend.py):

    config               JSON, plain: format, version, store id, chunk size,
                         compression level, id seed, encryption check value
    chunks/ab/ab12...    one chunk: its plaintext (zstd or raw, sealed if
                         encrypted); the name is the hex keyed BLAKE3 of the
                         plaintext. Written once, never changed.
    indexes/<snap>       the snapshot's index (index.py)
    snapshots/<snap>     the snapshot's manifest (JSON), the commit point: a
                         snapshot exists exactly when its manifest does
    leases/<uuid>        a running writer (gc.py)
    gc/<uuid>            a running or finished sweep (gc.py)

Snapshot ids sort by creation time: "20261202T130501.042Z-1a2b3c4d".

Reading always checks: a chunk is re-hashed after it is opened and must match
its name; indexes and manifests carry a checksum (or a GCM tag). A problem is
reported as CorruptObject/ObjectMissing naming the object.

What `splitctl backup ...` maps to (every error is a common.errors.SplitdError
with a `code` and a one-line message naming what is at fault):

    backup init          init_dir(path, key_file=...)   (envelope.new_key_file)
    backup run           w = store.writer(size, parent=...); w.add/zero/
                         take_from_parent/fill_from_parent; w.commit(**fields)
                         (writer.py; stats for progress in w.stats)
    backup list          store.list()                   manifests, oldest first
    backup show ID       store.show(id)                 manifest + sizes
    backup verify ID     store.verify(id, sample_pct).to_json()
    backup check         store.check(read_data=...).to_json()
    backup forget ID...  store.forget(ids)
    backup prune         store.prune(gc.RetentionPolicy(last=, daily=, ...),
                         dry_run=...)                   -> (PrunePlan, GcReport)
    backup gc            store.gc(dry_run=...)
    backup restore       --to FILE: store.restore_to_file(id, path);
                         --to URI/volume: for ext in store.iter_image(id):
                         NBD WRITE of ext.data, or WRITE_ZEROES when it is None
"""
from __future__ import annotations

import builtins
import json
import os
import random
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import blake3

from agents.store import envelope
from agents.store.backend import Backend, DirBackend
from agents.store.catalog import Catalog
from agents.store.envelope import KIND_CHUNK, KIND_INDEX, KIND_MANIFEST, Keys
from agents.store.errors import (
    CorruptObject,
    KeyRefused,
    ObjectMissing,
    StoreBadInput,
    StoreError,
)
from agents.store.index import ZERO_ID, Index
from agents.store.names import (
    chunk_id_of,
    chunk_name,
    index_name,
    iso_time,
    manifest_name,
    valid_snapshot_id,
)

if TYPE_CHECKING:
    from agents.store.gc import GcReport, PrunePlan, RetentionPolicy
    from agents.store.writer import SnapshotWriter

FORMAT = "splitd-backup-store"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 4 << 20
MAX_CHUNK_SIZE = 64 << 20
MIN_CHUNK_SIZE = 4096
DEFAULT_LEVEL = 1
TOOL_VERSION = "splitd 0.1.0"
# A stored chunk's bytes beyond its plaintext, at most (envelope.py).
_CHUNK_OVERHEAD = envelope.HEADER.size + envelope.NONCE_LEN + envelope.TAG_LEN
_local = threading.local()


@dataclass(frozen=True)
class Extent:
    """`length` bytes of the image at `offset`: `data` (bytes), or None for
    zeroes (chunks never stored)."""
    offset: int
    length: int
    data: bytes | None


@dataclass
class Problem:
    """One object that cannot be read: `what` is "missing" or "corrupt";
    `snapshots` are the snapshots it breaks."""
    object: str
    what: str
    why: str
    snapshots: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    snapshots: list[str]
    chunks_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    unreferenced_chunks: int | None = None     # check() only
    orphan_indexes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def broken_snapshots(self) -> list[str]:
        return sorted({s for p in self.problems for s in p.snapshots})

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["broken_snapshots"] = self.broken_snapshots
        return d


class Store:
    """An open store. Create one with `Store.init`, open it with `Store.open`
    (or `open_dir`/`init_dir` for a directory). An encrypted store needs its
    key file (`key_file`); a wrong or missing key raises KeyRefused before
    anything is read or written.

    Not thread-safe itself, except where a method says so; the writer and the
    restore helpers run their own thread pools.
    """

    def __init__(self, backend: Backend, config: dict[str, Any], keys: Keys,
                 catalog_path: str | None, workers: int | None = None) -> None:
        self.backend = backend
        self.config = config
        self.keys = keys
        self.id = config["store_id"]
        self.chunk_size: int = config["chunk_size"]
        self.level: int | None = config["compression_level"]
        # A backend whose requests wait on a network (S3) wants more in flight.
        self.workers = workers or getattr(backend, "workers", None) or min(8, (os.cpu_count() or 2))
        self._catalog_path = catalog_path
        self._catalog: Catalog | None = None
        self._zero_ids: dict[int, bytes] = {}

    # -- creating and opening -------------------------------------------------

    @classmethod
    def init(cls, backend: Backend, *, key_file: str | None = None,
             chunk_size: int = DEFAULT_CHUNK_SIZE, compression_level: int | None = DEFAULT_LEVEL,
             catalog_path: str | None = None) -> Store:
        """Create a new, empty store in `backend` (refuses if one is there).
        With `key_file` (envelope.new_key_file makes one) every object is
        encrypted with a key derived from it; keep the key file safe: without
        it the store cannot be read."""
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size % MIN_CHUNK_SIZE:
            raise StoreBadInput(f"chunk size {chunk_size} must be a multiple of 4096 "
                                f"from 4 KiB to {MAX_CHUNK_SIZE >> 20} MiB")
        if compression_level is not None and not 1 <= compression_level <= 19:
            raise StoreBadInput(f"zstd level {compression_level} must be 1..19")
        seed = os.urandom(32)
        secret = envelope.read_key_file(key_file) if key_file else None
        config = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "store_id": str(uuid.uuid4()),
            "created_at": iso_time(time.time()),
            "chunk_size": chunk_size,
            "compression_level": compression_level,
            "id_seed": seed.hex(),
            "encryption": None if secret is None else
            {"cipher": "aes-256-gcm", "key_check": envelope.key_check(secret, seed)},
        }
        if not backend.put_if_absent("config", json.dumps(config, indent=1).encode() + b"\n"):
            raise StoreError(f"{backend.describe()} already holds a store")
        backend.sync()
        return cls(backend, config, Keys.for_store(seed, secret), catalog_path)

    @classmethod
    def open(cls, backend: Backend, *, key_file: str | None = None,
             catalog_path: str | None = None, workers: int | None = None) -> Store:
        try:
            raw = backend.get("config")
        except ObjectMissing:
            raise StoreError(f"no backup store at {backend.describe()} (no config)") from None
        try:
            config = json.loads(raw)
            seed = bytes.fromhex(config["id_seed"])
        except (ValueError, KeyError, TypeError):
            raise CorruptObject("config", "not a store configuration") from None
        if config.get("format") != FORMAT:
            raise StoreError(f"{backend.describe()} is not a splitd backup store")
        if config.get("version") != FORMAT_VERSION:
            raise StoreError(f"store format version {config.get('version')} at {backend.describe()}; "
                             f"this splitd reads version {FORMAT_VERSION}")
        enc = config.get("encryption")
        where = backend.describe()
        if enc is None:
            if key_file:
                raise KeyRefused(f"store {where} is not encrypted, but a key file was given")
            secret = None
        else:
            if not key_file:
                raise KeyRefused(f"store {where} is encrypted: give its key file")
            secret = envelope.read_key_file(key_file)
            if envelope.key_check(secret, seed) != enc["key_check"]:
                raise KeyRefused(f"wrong key for store {where} (key file {key_file})")
        return cls(backend, config, Keys.for_store(seed, secret), catalog_path, workers)

    @property
    def encrypted(self) -> bool:
        return self.keys.aes is not None

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- chunks -------------------------------------------------------------------

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """The keyed BLAKE3-256 of `data`: its name in this store. Thread-safe."""
        return blake3.blake3(data, key=self.keys.id_key).digest()

    def zero_id(self, length: int) -> bytes:
        cid = self._zero_ids.get(length)
        if cid is None:
            cid = self._zero_ids[length] = self.chunk_id(bytes(length))
        return cid

    def get_chunk(self, cid: bytes, length: int) -> bytes:
        """Chunk `cid` (plaintext, `length` bytes), fetched, opened and
        re-hashed. Thread-safe: a directory store reads into a buffer of
        the calling thread's, reused (one chunk's size a thread)."""
        name = chunk_name(cid)
        # open_sealed returns new bytes, never a view of `stored`.
        data = envelope.open_sealed(self.keys, KIND_CHUNK, name, self._fetch(name, length), length)
        if len(data) != length or self.chunk_id(data) != cid:
            raise CorruptObject(name, "content does not match its name")
        return data

    def get_chunk_into(self, cid: bytes, length: int, out: memoryview | bytearray) -> memoryview:
        """Chunk `cid` opened and re-hashed like get_chunk, but into
        out[:length] (returned): nothing allocated, for callers that reuse
        one buffer per thread. Thread-safe. On an error out[:length] holds
        garbage."""
        name = chunk_name(cid)
        view = memoryview(out)[:length]
        hasher = blake3.blake3(key=self.keys.id_key)     # fed as it is opened: one pass
        n = envelope.open_sealed_into(self.keys, KIND_CHUNK, name, self._fetch(name, length), view,
                                      hasher)
        if n != length or hasher.digest() != cid:
            raise CorruptObject(name, "content does not match its name")
        return view

    def _fetch(self, name: str, length: int) -> bytes | memoryview:
        """A stored chunk of a `length`-byte plaintext, as stored."""
        if not isinstance(self.backend, DirBackend):
            return self.backend.get(name)
        # Stored is never more than the plaintext plus header, nonce and
        # tag: zstd's output is kept only when smaller. Replaced, never
        # resized: an exception may still hold a view of it.
        scratch = getattr(_local, "scratch", None)
        if scratch is None or len(scratch) < length + _CHUNK_OVERHEAD:
            scratch = _local.scratch = bytearray(length + _CHUNK_OVERHEAD)
        return self.backend.get_into(name, scratch)

    # -- snapshots ----------------------------------------------------------------

    def put_sealed(self, kind: int, name: str, plain: bytes) -> None:
        """Store a new index or manifest, sealed (create-exclusive). Indexes
        are compressed; manifests are not (small, and readable with `less`
        in a plain store)."""
        level = self.level if kind == KIND_INDEX else None
        if not self.backend.put_if_absent(name, envelope.seal(self.keys, kind, name, plain, level)):
            raise StoreError(f"{name} exists already")

    def manifest(self, sid: str) -> dict[str, Any]:
        """The manifest of snapshot `sid` (raises ObjectMissing if there is no
        such snapshot, CorruptObject if it cannot be read)."""
        if not valid_snapshot_id(sid):
            raise StoreBadInput(f"bad snapshot id {sid!r}")
        name = manifest_name(sid)
        plain = envelope.open_sealed(self.keys, KIND_MANIFEST, name, self.backend.get(name), 1 << 20)
        try:
            manifest = json.loads(plain)
        except ValueError:
            raise CorruptObject(name, "not JSON") from None
        if manifest.get("id") != sid:
            raise CorruptObject(name, f"names snapshot {manifest.get('id')!r}")
        return manifest

    def index(self, sid: str) -> Index:
        name = index_name(sid)
        # An index of a 64 TiB image at 4 MiB chunks is 512 MiB: bound what we inflate.
        plain = envelope.open_sealed(self.keys, KIND_INDEX, name, self.backend.get(name), 1 << 30)
        return Index.decode(name, plain)

    def snapshot_ids(self) -> list[str]:
        """Ids of every committed snapshot, oldest first, straight from the
        store (no catalog)."""
        return sorted(n.rsplit("/", 1)[1] for n in self.backend.list("snapshots/"))

    def catalog(self) -> Catalog:
        if self._catalog is None:
            path = self._catalog_path
            if path is None:
                if isinstance(self.backend, DirBackend):
                    path = os.path.join(self.backend.root, "cache", "catalog.sqlite")
                else:   # a remote store: a local cache, one per store
                    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
                    path = os.path.join(cache, "splitd", "stores", f"{self.id}.sqlite")
            self._catalog = Catalog(path)
        return self._catalog

    def _load_or_none(self, sid: str) -> dict[str, Any] | None:
        try:
            return self.manifest(sid)
        except (CorruptObject, ObjectMissing, StoreBadInput):
            return None

    def list(self) -> list[dict[str, Any]]:
        """Every snapshot's manifest, oldest first (through the catalog,
        brought in step with the store first). Unreadable manifests are left
        out; `check()` names them."""
        cat = self.catalog()
        cat.refresh(self.snapshot_ids(), self._load_or_none)
        return cat.manifests()

    def rebuild_catalog(self) -> int:
        """Throw the catalog away and read every manifest again; returns how
        many snapshots it holds."""
        cat = self.catalog()
        cat.clear()
        return len(self.list())

    def show(self, sid: str) -> dict[str, Any]:
        """The manifest plus sizes: `logical` (image size), `zero` (bytes in
        zero chunks), `new_data` (plaintext this snapshot added to the store),
        `stored_new` (what those chunks take in the store, after dedup and
        compression) and `referenced_stored` (the stored size of every chunk
        it refers to, shared ones included)."""
        manifest = self.manifest(sid)
        index = self.index(sid)
        lengths = _lengths(index)
        referenced = 0
        for cid in lengths:
            try:
                referenced += self.backend.size(chunk_name(cid))
            except ObjectMissing:
                pass
        zero = sum(index.chunk_len(i) for i in range(index.count) if index.id_at(i) == ZERO_ID)
        stats = manifest["stats"]
        return {"manifest": manifest, "sizes": {
            "logical": manifest["size"],
            "zero": zero,
            "new_data": stats["new_bytes"],
            "stored_new": stats["stored_bytes"],
            "referenced_stored": referenced,
            "chunks": index.count,
            "distinct_chunks": len(lengths),
        }}

    # -- reading an image ---------------------------------------------------------

    def iter_extents(self, sid: str, index: Index | None = None) -> Iterator[tuple[int, int, bytes | None]]:
        """(offset, length, chunk id) for every chunk of the image in order,
        consecutive zero chunks merged into one run with id None."""
        index = index or self.index(sid)
        run_start = None
        for i in range(index.count):
            off = i * index.chunk_size
            cid = index.id_at(i)
            if cid == ZERO_ID:
                if run_start is None:
                    run_start = off
                continue
            if run_start is not None:
                yield run_start, off - run_start, None
                run_start = None
            yield off, index.chunk_len(i), cid
        if run_start is not None:
            yield run_start, index.size - run_start, None

    def read_chunk(self, sid: str, offset: int, index: Index | None = None) -> bytes:
        """The plaintext of the chunk at `offset` (a multiple of the chunk
        size) of snapshot `sid`; zeroes for a zero chunk."""
        index = index or self.index(sid)
        if offset % index.chunk_size or not 0 <= offset < index.size:
            raise StoreBadInput(f"offset {offset} is not a chunk offset of snapshot {sid}")
        i = offset // index.chunk_size
        cid = index.id_at(i)
        if cid == ZERO_ID:
            return bytes(index.chunk_len(i))
        return self.get_chunk(cid, index.chunk_len(i))

    def checked_index(self, sid: str) -> tuple[dict[str, Any], Index]:
        """(manifest, index) of snapshot `sid`, the index checked against the
        manifest's size and image digest (CorruptObject naming it if not)."""
        manifest = self.manifest(sid)
        index = self.index(sid)
        if index.size != manifest["size"] or index.digest(self._zero_map(index)) != manifest["image_digest"]:
            raise CorruptObject(index_name(sid), "does not match the manifest's image digest")
        return manifest, index

    def iter_image(self, sid: str, *, workers: int | None = None,
                   readahead: int | None = None) -> Iterator[Extent]:
        """The whole image in order, as Extents: data chunks one by one,
        zero runs as one Extent with data None. Chunks are fetched, opened
        and checked by `workers` threads, at most `readahead` chunks ahead of
        the consumer (memory: about readahead x chunk size).

        Before the first byte, the index's image digest is checked against
        the manifest's, and every chunk is checked against its id, so the
        bytes yielded are exactly the image the manifest describes (a bad
        chunk raises CorruptObject/ObjectMissing naming it)."""
        _, index = self.checked_index(sid)
        workers = workers or self.workers
        readahead = readahead or 2 * workers
        with ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
            pending: deque[tuple[int, int, Future[bytes] | None]] = deque()
            extents = self.iter_extents(sid, index)
            try:
                for off, length, cid in extents:
                    pending.append((off, length, None if cid is None else
                                    pool.submit(self.get_chunk, cid, length)))
                    while len(pending) > readahead or (pending and pending[0][2] is None):
                        yield self._take(pending)
                while pending:
                    yield self._take(pending)
            finally:
                for _, _, fut in pending:
                    if fut is not None:
                        fut.cancel()

    @staticmethod
    def _take(pending: deque[tuple[int, int, Future[bytes] | None]]) -> Extent:
        off, length, fut = pending.popleft()
        return Extent(off, length, None if fut is None else fut.result())

    def _zero_map(self, index: Index) -> dict[int, bytes]:
        lengths = {index.chunk_size, index.chunk_len(index.count - 1)} if index.count else set()
        return {n: self.zero_id(n) for n in lengths}

    def restore_to_file(self, sid: str, path: str, *, workers: int | None = None) -> int:
        """Write snapshot `sid` into `path`: a new or existing regular file
        (truncated, then sized: zero runs stay holes) or a block device
        (zero runs are zeroed), fsynced, and check the image digest of what
        was written (image.py). Returns the bytes of data written. A chunk
        that cannot be read raises ImageIncomplete naming it and the ranges
        left unwritten, once everything else is written."""
        from agents.store.image import write_to_file
        image = write_to_file(self, sid, path, workers=workers)
        image.check(path)
        return image.bytes_written

    # -- writing --------------------------------------------------------------------

    def writer(self, size: int, *, chunk_size: int | None = None, parent: str | None = None,
               workers: int | None = None) -> SnapshotWriter:
        """A SnapshotWriter for a new snapshot of a `size`-byte image (see
        writer.py)."""
        from agents.store.writer import SnapshotWriter
        return SnapshotWriter(self, size, chunk_size=chunk_size, parent=parent, workers=workers)

    # -- verifying ------------------------------------------------------------------

    def verify(self, sid: str, sample_pct: float = 100.0, *, seed: int | None = None) -> VerifyReport:
        """Re-read and re-hash the chunks of snapshot `sid` (all of them, or a
        random `sample_pct` percent of its distinct chunks, at least one),
        after checking its manifest and index. Every missing or corrupt
        object is named in `problems` with the snapshots it breaks (found by
        reading every other index)."""
        if not 0 < sample_pct <= 100:
            raise StoreBadInput(f"sample {sample_pct}% must be in (0, 100]")
        report = VerifyReport(snapshots=[sid])
        index = self._checked_snapshot(sid, report)
        if index is None:
            return report
        cids = sorted(index.data_ids())
        if sample_pct < 100 and cids:
            rnd = random.Random(seed)
            cids = rnd.sample(cids, max(1, round(len(cids) * sample_pct / 100)))
        lengths = _lengths(index)
        bad = self._check_chunks({cid: lengths[cid] for cid in cids}, report)
        if bad:
            self._attribute(bad, report)
        return report

    def check(self, *, read_data: bool = True) -> VerifyReport:
        """Check the whole store: every manifest and index, every chunk they
        refer to (read and re-hashed with `read_data`, else only present),
        and count the chunks nothing refers to (what gc would remove)."""
        sids = self.snapshot_ids()
        report = VerifyReport(snapshots=sids)
        lengths: dict[bytes, int] = {}
        for sid in sids:
            index = self._checked_snapshot(sid, report)
            if index is not None:
                lengths.update(_lengths(index))
        bad = self._check_chunks(lengths, report, read_data=read_data)
        if bad:
            self._attribute(bad, report)
        stored = {chunk_id_of(n) for n in self.backend.list("chunks/")} - {None}
        report.unreferenced_chunks = len(stored - lengths.keys())
        have = set(sids)
        report.orphan_indexes = sorted(n.rsplit("/", 1)[1] for n in self.backend.list("indexes/")
                                       if n.rsplit("/", 1)[1] not in have)
        return report

    def _checked_snapshot(self, sid: str, report: VerifyReport) -> Index | None:
        """The snapshot's index after checking manifest, index and digest
        agree; None (with the problem in `report`) if they do not."""
        try:
            manifest = self.manifest(sid)
        except ObjectMissing as e:
            report.problems.append(Problem(e.name, "missing", "no such snapshot", [sid]))
            return None
        except CorruptObject as e:
            report.problems.append(Problem(e.name, "corrupt", str(e), [sid]))
            return None
        try:
            index = self.index(sid)
        except (ObjectMissing, CorruptObject) as e:
            what = "missing" if isinstance(e, ObjectMissing) else "corrupt"
            report.problems.append(Problem(index_name(sid), what, str(e), [sid]))
            return None
        if index.size != manifest["size"] or index.digest(self._zero_map(index)) != manifest["image_digest"]:
            report.problems.append(Problem(index_name(sid), "corrupt",
                                           "index does not match the manifest's image digest", [sid]))
            return None
        return index

    def _check_chunks(self, lengths: dict[bytes, int], report: VerifyReport,
                      read_data: bool = True) -> dict[bytes, Problem]:
        def one(cid: bytes) -> Problem | None:
            name = chunk_name(cid)
            try:
                if read_data:
                    self.get_chunk(cid, lengths[cid])
                elif not self.backend.exists(name):
                    raise ObjectMissing(name)
            except ObjectMissing:
                return Problem(name, "missing", "chunk is not in the store")
            except CorruptObject as e:
                return Problem(name, "corrupt", str(e))
            return None

        bad: dict[bytes, Problem] = {}
        with ThreadPoolExecutor(self.workers, thread_name_prefix="verify") as pool:
            for cid, problem in zip(lengths, pool.map(one, lengths), strict=True):
                report.chunks_checked += 1
                if problem is None:
                    report.bytes_checked += lengths[cid] if read_data else 0
                else:
                    bad[cid] = problem
                    report.problems.append(problem)
        return bad

    def _attribute(self, bad: dict[bytes, Problem], report: VerifyReport) -> None:
        """Name, for every bad chunk, each snapshot whose index refers to it."""
        users: dict[bytes, list[str]] = defaultdict(list)
        for sid in self.snapshot_ids():
            try:
                index = self.index(sid)
            except (ObjectMissing, CorruptObject):
                continue
            for cid in index.data_ids() & bad.keys():
                users[cid].append(sid)
        for cid, problem in bad.items():
            problem.snapshots = sorted(users[cid])

    # -- forgetting, pruning, collecting ------------------------------------------

    def forget(self, sids: Iterable[str]) -> builtins.list[str]:
        """Remove snapshots (their manifests: the commit point). Their index
        and chunks stay until `gc()` (a running backup may still use a
        forgotten snapshot as its parent). Returns the ids removed."""
        removed = []
        for sid in sids:
            if not valid_snapshot_id(sid):
                raise StoreBadInput(f"bad snapshot id {sid!r}")
            if self.backend.exists(manifest_name(sid)):
                self.backend.delete(manifest_name(sid))
                removed.append(sid)
        self.backend.sync()
        return removed

    def plan_prune(self, policy: RetentionPolicy) -> PrunePlan:
        from agents.store.gc import plan_prune
        return plan_prune(self.list(), policy)

    def prune(self, policy: RetentionPolicy, *, dry_run: bool = False,
              margin: float | None = None) -> tuple[PrunePlan, GcReport | None]:
        """Forget what `policy` does not keep, then collect garbage (`gc`).
        With `dry_run`, only say what would go (no GcReport)."""
        plan = self.plan_prune(policy)
        if dry_run:
            return plan, None
        self.forget(s["id"] for s in plan.remove)
        return plan, self.gc(margin=margin)

    def gc(self, *, dry_run: bool = False, margin: float | None = None) -> GcReport:
        """Mark and sweep (gc.py); safe while backups are being written.
        Only unreferenced objects older than the oldest running writer, less
        `margin` seconds (default gc.MARGIN), go."""
        from agents.store.gc import MARGIN, collect_garbage
        return collect_garbage(self, dry_run=dry_run, margin=MARGIN if margin is None else margin)


def _lengths(index: Index) -> dict[bytes, int]:
    """The length of every distinct stored chunk of `index`."""
    found = {}
    for i in range(index.count):
        cid = index.id_at(i)
        if cid != ZERO_ID:
            found[cid] = index.chunk_len(i)
    return found


def backend_for(location: str) -> Backend:
    """The backend a store location names: `s3://BUCKET/PREFIX` (s3.py;
    settings from its config file or the AWS environment), else a directory."""
    from agents.store.s3 import S3Backend, is_s3
    if is_s3(location):
        return S3Backend(location)
    return DirBackend(location)


def init_dir(path: str, *, key_file: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
             compression_level: int | None = DEFAULT_LEVEL) -> Store:
    """Create a store at `path`: a directory (made if absent) or s3://BUCKET/PREFIX
    (the bucket must exist)."""
    backend = backend_for(path)
    if isinstance(backend, DirBackend):
        os.makedirs(path, exist_ok=True)
    return Store.init(backend, key_file=key_file, chunk_size=chunk_size,
                      compression_level=compression_level)


def open_dir(path: str, *, key_file: str | None = None, workers: int | None = None) -> Store:
    """Open the store at `path`: a directory or s3://BUCKET/PREFIX."""
    return Store.open(backend_for(path), key_file=key_file, workers=workers)
