"""Where a store's objects live: the small interface every backend implements,
and the directory backend.

A store is a flat namespace of named objects ("config", "chunks/ab/ab12...",
"indexes/<id>", "snapshots/<id>", "leases/<id>", "gc/<id>"). The store above
only ever asks for these operations, so an S3 backend (issue 13) maps them one
to one: put_if_absent is a PUT with `If-None-Match: *`, touch is a copy onto
itself (or a no-op where the server keeps no usable time), mtime is
LastModified.

Rules every backend keeps:
- `put_if_absent` is create-exclusive and durable: when it returns True the
  object holds exactly `data` and survives a crash; when it returns False an
  object of that name was already there and nothing was changed. It never
  leaves a partial object under the final name.
- `put` replaces atomically (readers see the old or the new object, never a
  mix); used only for small mutable objects (leases, gc markers).
- `sync()` makes durable the *names* of objects this handle created, or
  found existing (put_if_absent False, touch True: another writer may have
  created them and died before its sync), since the last sync. The
  directory backend defers its directory fsyncs to it; a commit calls it
  before writing anything that refers to those objects.
"""
from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from agents.store.errors import CorruptObject, ObjectMissing, StoreBadInput, StoreError
from common.errors import NoSpace
from volumes.files import fsync_dir, write_all


class Backend(Protocol):
    def put_if_absent(self, name: str, data: bytes) -> bool: ...
    def put(self, name: str, data: bytes) -> None: ...
    def get(self, name: str) -> bytes: ...
    def exists(self, name: str) -> bool: ...
    def touch(self, name: str) -> bool: ...
    def mtime(self, name: str) -> float: ...
    def size(self, name: str) -> int: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def delete(self, name: str) -> None: ...
    def sync(self) -> None: ...
    def describe(self) -> str: ...


def _check_name(name: str) -> None:
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise StoreBadInput(f"bad object name {name!r}")


# Directory fsyncs issued at once by sync().
SYNC_THREADS = 16


def _mountpoint(path: str) -> str:
    """The mount point of the filesystem holding `path` (which exists)."""
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


class DirBackend:
    """A store in a local directory: one file per object.

    put_if_absent writes a hidden temporary file in the target directory,
    fsyncs it, then link()s it to the final name (link fails with EEXIST, so
    the create is exclusive, and the name appears only once the data is
    durable), and unlinks the temporary name. The directory fsync that makes
    the new name durable is deferred to `sync()`, once per directory touched.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        # Directories whose entries a commit relies on and that may not be
        # durable yet: names we created, and names we found (another writer,
        # perhaps killed, may have created them and not synced). Writers'
        # threads add; sync() takes them all under the lock, so none is lost.
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._sync_lock = threading.Lock()

    def describe(self) -> str:
        return self.root

    def _mark_dirty(self, directory: str) -> None:
        with self._dirty_lock:
            self._dirty.add(directory)

    def _path(self, name: str) -> str:
        _check_name(name)
        return os.path.join(self.root, name)

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """Turn an OSError while writing `name` into the store's errors:
        NoSpace for a full filesystem or quota, StoreError otherwise."""
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                full = "is full" if e.errno == errno.ENOSPC else "is over its quota"
                raise NoSpace(f"filesystem {_mountpoint(self.root)} {full}: cannot write "
                              f"{name} of store {self.root}") from e
            raise StoreError(f"cannot write {name} in store {self.root}: {e.strerror}") from e

    def _write_temp(self, path: str, data: bytes) -> str:
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(directory, exist_ok=True)
            self._mark_dirty(os.path.dirname(directory))
            fd = os.open(tmp, flags, 0o600)
        try:
            write_all(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return tmp

    def put_if_absent(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        if os.path.exists(path):
            self._mark_dirty(os.path.dirname(path))
            return False
        with self._writing(name):
            tmp = self._write_temp(path, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                self._mark_dirty(os.path.dirname(path))
                return False
            finally:
                os.unlink(tmp)
        self._mark_dirty(os.path.dirname(path))
        return True

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        with self._writing(name):
            tmp = self._write_temp(path, data)
            os.rename(tmp, path)
            fsync_dir(os.path.dirname(path))

    def get(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectMissing(name) from None

    def get_into(self, name: str, buf: bytearray) -> memoryview:
        """Object `name` read into `buf` (an object bigger than `buf` is
        CorruptObject); a view of its bytes there. A caller that reuses
        `buf` reads without allocating: a fresh 4 MiB buffer costs ~1000
        page faults, the dearest part of reading a chunk after zstd and
        BLAKE3."""
        try:
            with open(self._path(name), "rb", buffering=0) as f:
                # To its end, not to st_size: that may change, or be 0 (a FIFO).
                view = memoryview(buf)
                got = 0
                while got < len(buf):
                    n = f.readinto(view[got:])
                    if not n:
                        return view[:got]
                    got += n
                if f.read(1):
                    raise CorruptObject(name, f"more than it can be ({len(buf)} bytes)")
                return view
        except FileNotFoundError:
            raise ObjectMissing(name) from None

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def touch(self, name: str) -> bool:
        path = self._path(name)
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        self._mark_dirty(os.path.dirname(path))
        return True

    def mtime(self, name: str) -> float:
        try:
            return os.stat(self._path(name)).st_mtime
        except FileNotFoundError:
            raise ObjectMissing(name) from None

    def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError:
            raise ObjectMissing(name) from None

    def list(self, prefix: str) -> Iterator[str]:
        """Names under `prefix` (a folder, ending in "/"), in no set order;
        temporary files are never listed."""
        top = os.path.join(self.root, prefix)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            for f in filenames:
                if not f.startswith("."):
                    yield f if rel == "." else f"{rel}/{f}"

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            with self._writing(name):
                os.unlink(path)
        except FileNotFoundError:
            return
        self._mark_dirty(os.path.dirname(path))

    def sync(self) -> None:
        # One sync at a time: a second caller returns only once the first
        # caller's fsyncs, which may cover its own entries, are done.
        with self._sync_lock:
            with self._dirty_lock:
                dirty, self._dirty = self._dirty, set()
            if len(dirty) <= 1:
                for d in dirty:
                    self._fsync_dir(d)
                return
            # A full backup dirties every chunks/xx directory (256 of them):
            # fsyncs issued one after the other each wait for a journal
            # commit, while fsyncs issued together share one (ext4, jbd2).
            # Every one is done before sync() returns, so nothing that refers
            # to these names is written before they are durable.
            with ThreadPoolExecutor(min(SYNC_THREADS, len(dirty))) as pool:
                list(pool.map(self._fsync_dir, sorted(dirty)))

    def _fsync_dir(self, d: str) -> None:
        try:
            with self._writing(os.path.relpath(d, self.root)):
                fsync_dir(d)
        except FileNotFoundError:
            pass

    def remove_stale_temporaries(self, older_than: float) -> int:
        """Remove temporary files a killed writer left (older than
        `older_than` seconds); returns how many."""
        removed = 0
        cutoff = time.time() - older_than
        for dirpath, _dirs, filenames in os.walk(self.root):
            for f in filenames:
                if f.startswith(".tmp-"):
                    path = os.path.join(dirpath, f)
                    try:
                        if os.stat(path).st_mtime < cutoff:
                            os.unlink(path)
                            removed += 1
                    except FileNotFoundError:
                        pass
        return removed
